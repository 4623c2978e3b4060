"""Atomic checkpoints (temp dir, then rename) holding everything an exact resume needs.

Layout of checkpoints/step-N/: model/ (save_pretrained; a LoRA run saves the adapter), optimizer.pt,
scheduler.pt, rng-rank{R}.pt for every process, and trainer_state.json (step, data cursor, controller states).
A directory named step-N exists only once complete, because rename is atomic on one file system.
manifest.json, written last, holds every file's size and SHA-256: resume verifies it and falls back to the newest
intact checkpoint (with a warning naming what is damaged) when a file was truncated, deleted or altered."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from rlhfkit.train.seeding import restore_rng_state, rng_state

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
# Test hook: SIGKILL this process while it writes the checkpoint of step N (files written, nothing published).
KILL_IN_CHECKPOINT_ENV = "RLHFKIT_KILL_IN_CHECKPOINT"
log = logging.getLogger(__name__)


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(ckpt: Path) -> None:
    """Size and SHA-256 of every file under ckpt, in ckpt/manifest.json."""
    files = {str(p.relative_to(ckpt)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (ckpt / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ckpt cannot be trusted (a missing, truncated or altered file, an unreadable manifest), or None when
    every file matches its manifest entry. A checkpoint from before manifests is trusted if its files exist."""
    manifest = ckpt / MANIFEST
    layout = checkpoint_layout(ckpt)
    required = ["trainer_state.json", "optimizer.pt", "scheduler.pt"]
    if layout == "fsdp":  # model and optimizer state in torch.distributed.checkpoint files
        required = ["trainer_state.json", "scheduler.pt", "sharded/.metadata"]
    elif layout == "deepspeed":  # model and optimizer partitions in DeepSpeed's files
        from rlhfkit.train.zero import required_files

        required = ["trainer_state.json", "scheduler.pt", *required_files(ckpt)]
    if not manifest.exists():
        missing = [f for f in required if not (ckpt / f).is_file()]
        return f"{missing[0]} is missing" if missing else None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name in required:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, want in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want.get("bytes"):
            return f"{name} has {path.stat().st_size} bytes, {want.get('bytes')} were written"
        if _sha256(path) != want.get("sha256"):
            return f"{name} does not match its checksum (the file was altered or damaged)"
    return None


def latest_intact_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files match their manifest, and a line for each newer one passed over."""
    skipped: list[str] = []
    for ckpt in reversed(checkpoint_dirs(run_dir)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt, skipped
        skipped.append(f"{ckpt}: {problem}")
    return None, skipped


def _unwrap(accelerator: Any, model: Any) -> Any:
    return accelerator.unwrap_model(model) if accelerator is not None else model


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    accelerator: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep: int = 2,
    layout: str = "full",
) -> Path:
    """Write checkpoints/step-{step} atomically from every process (collective: call on all ranks). A sharded
    (layout "fsdp") model and its optimizer go to sharded/, each process writing its own shard; a DeepSpeed
    engine's (layout "deepspeed") to deepspeed/, in DeepSpeed's own format."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    is_main = accelerator.is_main_process
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-rank{accelerator.process_index}.pt")
    if layout == "fsdp":
        from rlhfkit.train.sharding import SHARDED_DIR, save_sharded

        save_sharded(tmp / SHARDED_DIR, model, optimizer)
    elif layout == "deepspeed":
        from rlhfkit.train import zero

        zero.save(tmp / zero.ZERO_DIR, model)
    if is_main:
        if layout == "full":
            from rlhfkit.models import quiet_transformers

            quiet_transformers()
            _unwrap(accelerator, model).save_pretrained(tmp / "model", safe_serialization=True)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        state = {"step": step, "num_processes": accelerator.num_processes, **trainer_state}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    accelerator.wait_for_everyone()
    if is_main and os.environ.get(KILL_IN_CHECKPOINT_ENV) == str(step):  # test hook: die mid-write
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    if is_main:
        write_manifest(tmp)  # last: it covers every process's files
        for fh_path in tmp.rglob("*"):  # make the bytes durable before the rename publishes them
            if fh_path.is_file():
                with open(fh_path, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _load_model_weights(model: Any, model_dir: Path) -> None:
    from safetensors.torch import load_file

    from rlhfkit.models import is_peft

    if hasattr(model, "load_checkpoint_weights"):  # composite modules (policy + value head) restore their parts
        model.load_checkpoint_weights(model_dir, _load_model_weights)
        return
    if is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(model_dir / "adapter_model.safetensors")))
        return
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("model*.safetensors")):  # HF names its shards model[-i-of-n]
        state.update(load_file(str(shard)))
    result = model.load_state_dict(state, strict=False)
    # save_pretrained omits tied copies (lm_head tied to the embeddings); anything else missing is a real error
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    untied_missing = [k for k in result.missing_keys if k not in params or params[k].data_ptr() not in loaded_ptrs]
    if untied_missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint {model_dir} does not match the model: missing {untied_missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


_LAYOUT_NAMES = {"full": "unsharded", "fsdp": "sharded (FSDP)", "deepspeed": "DeepSpeed ZeRO"}


def checkpoint_layout(ckpt: Path) -> str:
    from rlhfkit.train.sharding import SHARDED_DIR
    from rlhfkit.train.zero import ZERO_DIR

    return "fsdp" if (ckpt / SHARDED_DIR).is_dir() else "deepspeed" if (ckpt / ZERO_DIR).is_dir() else "full"


def load_checkpoint(
    ckpt: Path, accelerator: Any, model: Any, optimizer: Any, scheduler: Any, restore_rng: bool = True,
    layout: str = "full",
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this process's RNG; returns trainer_state.json."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state.get("num_processes", 1) != accelerator.num_processes:
        from rlhfkit.errors import UserError

        raise UserError(
            f"{ckpt} was written by {state.get('num_processes')} processes but this run has "
            f"{accelerator.num_processes}; resume with the same number of processes."
        )
    from rlhfkit.train.sharding import SHARDED_DIR, load_sharded

    written = checkpoint_layout(ckpt)
    if written != layout:
        from rlhfkit.errors import UserError

        raise UserError(f"{ckpt} was written by a {_LAYOUT_NAMES[written]} run and this run is "
                        f"{_LAYOUT_NAMES[layout]}; resume with the same --sharding and launch config.")
    if layout == "fsdp":
        load_sharded(ckpt / SHARDED_DIR, model, optimizer)
    elif layout == "deepspeed":
        from rlhfkit.train import zero

        zero.load(ckpt / zero.ZERO_DIR, model)
    else:
        _load_model_weights(_unwrap(accelerator, model), ckpt / "model")
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    if restore_rng:
        restore_rng_state(torch.load(ckpt / f"rng-rank{accelerator.process_index}.pt", weights_only=False))
    return state
