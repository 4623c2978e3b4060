"""The frozen reference policy π_ref of DPO-family training (policy/dpo.py, policy/kto.py): its sequence
log-probs, computed once before training and cached in the run directory (ref_logps.safetensors), or taken on
the fly from the policy with its LoRA adapter switched off."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
from array import array
from pathlib import Path
from typing import Any, Iterator, Literal, Protocol, Sequence

import torch

from rlhfkit.errors import UserError
from rlhfkit.losses import sequence_logps
from rlhfkit.models import load_causal_lm, logprobs_at, logprobs_of
from rlhfkit.train import Run

log = logging.getLogger(__name__)

REF_CACHE = "ref_logps.safetensors"


class ReferenceData(Protocol):
    """Training or held-out data whose every item has two sequences, column 0 and column 1 (chosen and rejected;
    for KTO the example's completion and its mismatched partner), each with a log π_ref."""

    ref: torch.Tensor | None
    """(N, 2) cached log π_ref of column 0 and column 1, once prepare_reference has filled it."""

    @property
    def layout(self) -> str:
        """Names the column layout in the cache fingerprint ('pairs' or 'kto'), so one layout's cache is never
        read as the other's."""
        ...

    def __len__(self) -> int: ...

    def collate_both(self, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """(2B, T): column-0 sequences in rows 0..B-1, column-1 sequences in rows B..2B-1."""
        ...

    def sequences(self) -> Iterator[tuple[list[int], list[int]]]:
        """(input_ids, response_mask) of every sequence whose log π_ref is cached, item by item, column 0 first."""
        ...


class ReferenceConfig(Protocol):
    """The config fields reference handling reads (DPOConfig has them all)."""

    model: str
    ref_model: str
    ref_batch_size: int
    precision: str
    resume: bool
    lora: Any


# ------------------------------------------------------------------------------------------------ log-probs
def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def sequence_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ log π over each sequence's response tokens, and the response lengths: (N,), (N,). A packed batch
    (`segment` and `position_ids` present) sums each sequence's tokens wherever its row holds them; a batch whose
    pairs share their prompt (`target_owner` present, `shared_prefix_batch`) scores its listed response tokens."""
    if "target_owner" in batch:
        return shared_prefix_logprobs(model, batch)
    response = batch["response_mask"][:, 1:]  # (R, T-1): the LM head runs on these positions only
    logprobs = logprobs_of(model, batch["input_ids"], batch["attention_mask"], position_ids=batch.get("position_ids"),
                           keep=response)  # (R, T-1), entry t scores token t+1
    if "segment" not in batch:
        return sequence_logps(logprobs, response)  # (N,), (N,)
    # a target token's sequence; a sequence's first token (a prompt token, never a response one) is the only
    # target whose predicting position belongs to the sequence before it
    owner = batch["segment"][:, 1:].clamp(min=0).reshape(-1)  # (R * (T-1),); padding (-1) carries mask 0
    mask = response.to(logprobs.dtype)
    n = batch["last_index"].shape[0]
    logps = logprobs.new_zeros(n).index_add(0, owner, (logprobs * mask).reshape(-1))  # (N,)
    lengths = mask.new_zeros(n).index_add(0, owner, mask.reshape(-1))  # (N,)
    return logps, lengths


def shared_prefix_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logprobs` of a shared-prefix batch: each response token's log-prob read from the hidden state at
    (target_row, target_col) -- the LM head runs on those rows only, a chunk at a time -- summed per sequence
    (target_owner). Returns (N,), (N,)."""
    lp = logprobs_at(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["target_row"],
                     batch["target_col"], batch["target_id"])  # (M,)
    n = batch["last_index"].shape[0]
    owner = batch["target_owner"]
    logps = lp.new_zeros(n).index_add(0, owner, lp)  # (N,)
    lengths = lp.new_zeros(n).index_add(0, owner, torch.ones_like(lp))  # (N,)
    return logps, lengths


@contextlib.contextmanager
def reference_mode(model: Any, peft_model: Any | None = None) -> Iterator[None]:
    """No gradient, eval mode (no dropout) and, given the peft model, its adapter disabled: the network is π_ref."""
    was_training = model.training
    model.eval()
    adapter_off = peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext()
    try:
        with torch.no_grad(), adapter_off:
            yield
    finally:
        model.train(was_training)


def column_logps(run: Run, model: Any, data: ReferenceData, idx: list[int], pad_id: int) -> torch.Tensor:
    """(B, 2) sequence log-probs of both columns of items idx, in one forward pass. Call inside reference_mode."""
    batch = to_device(data.collate_both(idx, pad_id), run.accelerator.device)
    with run.accelerator.autocast():
        logps, _ = sequence_logprobs(model, batch)  # (2B,)
    return logps.float().view(2, len(idx)).T  # (B, 2)


class Reference:
    """Where log π_ref comes from: the cache (kind 'cached'), the policy with its LoRA adapter disabled
    ('adapter'), or nowhere ('none': SimPO and ORPO are reference-free)."""

    def __init__(self, kind: Literal["cached", "adapter", "none"], run: Run, pad_id: int, peft_model: Any = None):
        self.kind, self.run, self.pad_id, self.peft_model = kind, run, pad_id, peft_model

    def logps(self, model: Any, data: ReferenceData, idx: list[int]) -> torch.Tensor | None:
        """(B, 2) log π_ref of items idx, or None without a reference."""
        if self.kind == "none":
            return None
        if self.kind == "cached":
            assert data.ref is not None
            ref = data.ref[idx]  # (B, 2)
            if torch.isnan(ref).any():  # a row prepare_reference was not asked for: never train on NaN silently
                missing = [i for i, r in zip(idx, ref) if torch.isnan(r).any()]
                raise RuntimeError(f"reference log-probs of items {missing} were not computed: prepare_reference's "
                                   "`needed` missed items the run reads.")
            return ref.to(self.run.accelerator.device)
        with reference_mode(model, self.peft_model):
            return column_logps(self.run, model, data, idx, self.pad_id)


# --------------------------------------------------------------------------------------- the reference cache
def _model_digest(path: str) -> str:
    """Content hash of a model directory's config and weights; the id itself for a hub id."""
    p = Path(path)
    h = hashlib.sha256()
    if not p.is_dir():
        h.update(path.encode())
        return h.hexdigest()
    for f in sorted(p.iterdir()):
        if f.is_file() and (f.name == "config.json" or f.suffix in (".safetensors", ".bin")):
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()


def reference_fingerprint(cfg: ReferenceConfig, train: ReferenceData, held: ReferenceData) -> str:
    """What the cached numbers depend on: the reference model's bytes, the precision, the column layout, and every
    token id and response mask they were computed on (which covers the data files, the tokenizer, max_length,
    overlong, the held-out split and KTO's mismatched partners)."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": 1, "loss_layout": train.layout,
                         "precision": cfg.precision, "ref_model": _model_digest(cfg.ref_model or cfg.model)},
                        sort_keys=True).encode())
    for name, split in (("train", train), ("eval", held)):
        h.update(f"{name}:{len(split)}".encode())
        for ids, mask in split.sequences():
            h.update(array("q", [len(ids)]).tobytes() + array("q", ids).tobytes() + array("q", mask).tobytes())
    return h.hexdigest()


def read_reference_cache(path: Path, fingerprint: str) -> dict[str, torch.Tensor] | None:
    """The cached tables when the file exists and was made for exactly this fingerprint, else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as fh:
        if (fh.metadata() or {}).get("fingerprint") != fingerprint:
            return None
        return {key: fh.get_tensor(key) for key in fh.keys()}


def write_reference_cache(path: Path, tables: dict[str, torch.Tensor], fingerprint: str) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tables.items()}, str(tmp), metadata={"fingerprint": fingerprint})
    os.replace(tmp, path)  # atomic: a killed run leaves either the old file or the new one


def compute_reference_logps(run: Run, model: Any, data: ReferenceData, pad_id: int, batch_size: int,
                            peft_model: Any = None, items: Sequence[int] | None = None) -> torch.Tensor:
    """(len(items), 2) log π_ref of the given items (default: every item), in that order, each process scoring a
    strided share that is then gathered."""
    items = list(range(len(data))) if items is None else list(items)
    n, world = len(items), run.world
    per = -(-n // world)
    shares = [list(range(r, n, world)) for r in range(world)]  # positions in items
    shares = [s + [0] * (per - len(s)) for s in shares]  # equal sizes for the gather; padding rows are dropped
    mine = [items[k] for k in shares[run.rank]] if n else []
    # batches of items of similar length (longest first), so little of each forward is padding; the results go
    # back to the share's order (a row's log-probs do not depend on its batch-mates)
    longest = [max(len(chosen[0]), len(rejected[0])) for chosen, rejected in _pairs_of(data.sequences())]
    order = sorted(range(len(mine)), key=lambda k: -longest[mine[k]])
    parts = [torch.zeros((0, 2), device=run.accelerator.device)]
    with reference_mode(model, peft_model):
        for start in range(0, len(order), batch_size):
            parts.append(column_logps(run, model, data, [mine[k] for k in order[start : start + batch_size]], pad_id))
    local = torch.empty((len(mine), 2), device=run.accelerator.device)
    local[torch.tensor(order, dtype=torch.long, device=local.device)] = torch.cat(parts)  # (per, 2), share order
    gathered = (run.accelerator.gather(local) if world > 1 else local).cpu()  # (world * per, 2), rank-major
    positions = [k for r in range(world) for k in range(r, n, world)]
    rows = [r * per + j for r in range(world) for j in range(len(range(r, n, world)))]
    out = torch.zeros((n, 2), dtype=torch.float32)
    out[torch.tensor(positions, dtype=torch.long)] = gathered[torch.tensor(rows, dtype=torch.long)]
    return out


def _pairs_of(sequences: Iterator[tuple[list[int], list[int]]]) -> Iterator[tuple[Any, Any]]:
    """data.sequences() yields each item's two columns one after the other: pair them up."""
    seqs = iter(sequences)
    return zip(seqs, seqs)


def visited_items(num_items: int, seed: int, items_per_step: int, steps: int) -> list[int]:
    """The training items a run of `steps` optimizer steps draws, `items_per_step` at a time, from the trainer's
    seeded EpochSampler: the only rows whose reference log-probs it reads. Every item once a run reaches an
    epoch."""
    from rlhfkit.train.sampler import EpochSampler

    total = items_per_step * steps
    if total >= num_items:
        return list(range(num_items))
    return sorted(set(EpochSampler(num_items, seed).next_indices(total)))


def prepare_reference(run: Run, cfg: ReferenceConfig, model: Any, tokenizer: Any, train: ReferenceData,
                      held: ReferenceData, needed: Sequence[int] | None = None) -> str:
    """Fill train.ref and held.ref from the run's cache, computing what it lacks first. needed: the training items
    the run will read (visited_items; default every item). Only those rows are computed -- a 200-step run on
    30,000 pairs reads 3,200 of them -- and the others hold NaN, which Reference.logps refuses to hand out. A
    cache made for other data or another reference model is recomputed; one made for these but lacking rows a
    longer run needs is extended. Call before resume loads trained weights: when ref_model is --model, the freshly
    loaded policy (adapter off) is the reference, so no second copy is ever loaded.
    Returns 'reused', 'extended' or 'computed'."""
    path = run.dir / REF_CACHE
    fingerprint = reference_fingerprint(cfg, train, held)
    tables = read_reference_cache(path, fingerprint)
    stale = tables is None and path.exists()
    run.accelerator.wait_for_everyone()  # every process has decided before the file may be replaced
    if stale and cfg.resume and run.resume_from is not None:
        raise UserError(f"{path} was computed for other data or another reference model than this run now sees "
                        "(a file changed since the run started); restore them, or start again with --overwrite.")
    needed = list(range(len(train))) if needed is None else sorted(set(needed))
    if tables is None:
        if stale:
            log.warning("dpo: %s was made for other data or another reference model; recomputing it", path)
        tables = {"train": torch.full((len(train), 2), float("nan")), "eval": torch.full((len(held), 2), float("nan"))}
        status = "computed"
    else:
        status = "reused"
    lacking = {name: torch.isnan(table).any(dim=1) for name, table in tables.items()}  # (N,) rows never scored
    missing = {"train": [i for i in needed if lacking["train"][i]],
               "eval": lacking["eval"].nonzero().flatten().tolist()}
    if status == "reused" and (missing["train"] or missing["eval"]):
        status = "extended"
    if status == "reused":
        log.info("dpo: reusing the reference log-probs in %s", path)
    else:
        ref_path = cfg.ref_model or cfg.model
        own = ref_path == cfg.model
        device = run.accelerator.device
        if own:
            ref_model, peft_model = model.to(device), (model if cfg.lora.enabled else None)
        else:
            ref_model, peft_model = load_causal_lm(ref_path, tokenizer, dropout_off=True).to(device), None
        log.info("dpo: computing reference log-probs of %d of %d training items (the ones this run reads) and %d "
                 "held-out items with %s", len(missing["train"]), len(train), len(missing["eval"]), ref_path)
        for name, split in (("train", train), ("eval", held)):
            if missing[name]:
                rows = torch.tensor(missing[name], dtype=torch.long)
                tables[name][rows] = compute_reference_logps(run, ref_model, split, tokenizer.pad_token_id,
                                                             cfg.ref_batch_size, peft_model, missing[name])
        if not own:  # free the reference model: training holds only the policy
            del ref_model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if run.is_main:
            write_reference_cache(path, tables, fingerprint)
        run.accelerator.wait_for_everyone()
    train.ref, held.ref = tables["train"], tables["eval"]
    return status
