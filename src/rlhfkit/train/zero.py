"""DeepSpeed ZeRO (stages 2 and 3) for every stage, selected by `accelerate launch --config_file
examples/accelerate/zero2.yaml` (or zero3.yaml), or by `--sharding zero2|zero3`.

Accelerate starts the processes and forms the process group; the DeepSpeed engine is built here, inside the shared
training machinery (`train.run.Run`), because Accelerate's DeepSpeed integration steps the optimizer inside
`backward`, while every rlhfkit trainer runs its own micro-batch loop and decides itself where an optimizer step
ends. The engine runs with `managed_gradient_accumulation: false`: each `backward` accumulates (ZeRO-2/3
reduce-scatter each micro-batch's gradients into this process's partition) and `step` is the boundary that
clips to --max-grad-norm, updates and zeroes. So one optimizer step is the same global batch as under DDP or FSDP.

What is partitioned:
- ZeRO-2: the optimizer state and the gradients; every process keeps the whole weights (so sampling, evaluation
  and the final save need no gathering).
- ZeRO-3: the weights too. DeepSpeed gathers each module's weights in a hook before its forward and frees them
  after. Sampling and evaluation run inside `gathered(model)`: every weight gathered once and the hooks lifted for
  the block, so each process may run any number of forwards (decoding is hundreds of one-token forwards, and
  ranks whose responses end at different lengths would otherwise make different numbers of collective calls).
  In training, the LM head's weight is gathered only while the head's own forward runs, and the head carries
  DeepSpeed's hooks, so `models.output_head` declines it and log-probs come from the model's full logits (the
  chunked head reads the weight outside that forward); inside `gathered` the hooks are lifted and the chunked
  head is used again.
- Precision: the engine holds fp32 weights and --precision bf16 runs the forward under autocast, exactly as the
  unsharded run does (DeepSpeed's own bf16 mode would keep bf16 weights with fp32 master copies: other
  numerics). fp16 is refused (its loss scaling would be DeepSpeed's, not the unsharded run's).
- PPO's frozen reference and reward models are partitioned under ZeRO-3 (`shard_frozen`: ZeRO-3 inference) unless
  --frozen-models replicate, and replicated under ZeRO-2 unless --frozen-models shard.
- ZeRO-Offload (offload_optimizer_device / offload_param_device: cpu in the launch config) steps the optimizer on
  the CPU with DeepSpeed's CPU AdamW, the same update as torch's AdamW up to float rounding.
- Checkpoints are DeepSpeed's own (each process writes its partition of the optimizer state, and of the weights
  under ZeRO-3) inside the same atomic, checksummed checkpoint directory as every other run; the final model is
  gathered to the main process and saved as full Hugging Face weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from rlhfkit.errors import UserError

log = logging.getLogger(__name__)

ZERO_DIR = "deepspeed"  # inside checkpoints/step-N/: DeepSpeed's checkpoint files
_TAG = "state"
_OFFLOAD = {"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "offload_optimizer",
            "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "offload_param"}


def launcher_uses_deepspeed() -> bool:
    """True when `accelerate launch` was given a DeepSpeed config (it exports ACCELERATE_USE_DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def zero_section_from_launcher() -> dict[str, Any]:
    """The `zero_optimization` settings the launcher's DeepSpeed config names: the stage and offload devices of an
    accelerate config (zero_stage, offload_*_device), or the section of the DeepSpeed JSON it points to."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path:
        try:
            full = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"the launch config's deepspeed_config_file {path} could not be read as JSON "
                            f"({exc}); fix the file or use zero_stage in the accelerate config.") from None
        section = dict(full.get("zero_optimization") or {})
        ignored = sorted(k for k in full if k not in ("zero_optimization",))
        if ignored:
            log.warning("deepspeed_config_file %s: only zero_optimization is read; rlhfkit sets %s from its own "
                        "settings (batch size, --max-grad-norm, --precision)", path, ", ".join(ignored))
        return section
    section: dict[str, Any] = {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))}
    for env, key in _OFFLOAD.items():
        device = os.environ.get(env, "none")
        if device not in ("none", ""):
            section[key] = {"device": device}
    return section


def stage_wanted(sharding: str) -> int:
    """The ZeRO stage this run asks for: from --sharding zero2/zero3, or from the launcher under `auto`; 0 for
    none."""
    if sharding in ("zero2", "zero3"):
        return int(sharding[-1])
    if sharding == "auto" and launcher_uses_deepspeed():
        return int(zero_section_from_launcher().get("stage", 2))
    return 0


def check_usable(cfg: Any, stage: int) -> None:
    """Refuse what this integration does not do, naming the alternative; set DeepSpeed's CPU accelerator on a
    machine without a GPU."""
    if stage not in (2, 3):
        raise UserError(f"the launch config asks for DeepSpeed ZeRO stage {stage}; rlhfkit runs stages 2 and 3 "
                        "(examples/accelerate/zero2.yaml, zero3.yaml). For stage 0/1 use examples/accelerate/"
                        "ddp.yaml.")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError("this run asks for DeepSpeed ZeRO but deepspeed is not installed; pip install "
                        "'rlhfkit[deepspeed]' (or deepspeed), or launch with examples/accelerate/fsdp.yaml.") from None
    if cfg.precision == "fp16":
        raise UserError("--precision fp16 is not supported under DeepSpeed in rlhfkit; use --precision bf16 (no "
                        "loss scaling needed) or fp32.")
    if cfg.lora.enabled and cfg.lora.load_in_4bit:
        raise UserError("QLoRA (lora.load_in_4bit) is not supported under DeepSpeed ZeRO (its 4-bit weights are "
                        "not partitioned); train it replicated (examples/accelerate/ddp.yaml), or use plain LoRA.")
    if cfg.compile:
        raise UserError("--compile is not supported under DeepSpeed ZeRO in rlhfkit (the engine's hooks would "
                        "split the compiled graph); drop --compile, or launch with examples/accelerate/fsdp.yaml.")


def quiet() -> None:
    """DeepSpeed logs its configuration and every engine event at INFO; keep warnings only."""
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def engine_config(cfg: Any, stage: int, section: dict[str, Any] | None) -> dict[str, Any]:
    """The DeepSpeed config of a run: ZeRO settings from the launcher, everything else from rlhfkit's own."""
    zero = {"contiguous_gradients": True, "overlap_comm": False, **(section or {}), "stage": stage}
    if stage == 3:
        # gathering the consolidated state for the final save is a collective every process makes
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", False)
    return {
        # the trainers make their own micro-batches: one backward per micro-batch, step() ends the optimizer step
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(cfg.max_grad_norm),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW, with rlhfkit's parameter groups
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }


def wrap(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Any, stage: int,
         section: dict[str, Any] | None) -> tuple[Any, Any]:
    """The DeepSpeed engine and its ZeRO optimizer around model and optimizer (collective); `section` is the
    launcher's zero_optimization settings, if it gave any."""
    import deepspeed

    quiet()
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                        config=engine_config(cfg, stage, section),
                                                        dist_init_required=False)
    return engine, zero_optimizer


def offloads_optimizer(section: dict[str, Any] | None) -> bool:
    """Whether the launcher's ZeRO settings move the optimizer to the CPU (ZeRO-Offload)."""
    device = ((section or {}).get("offload_optimizer") or {}).get("device", "none")
    return device not in ("none", None)


def is_engine(model: Any) -> bool:
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:
        return False
    return isinstance(model, DeepSpeedEngine)


def _offload(engine: Any) -> Any:
    """ZeRO-3's parameter coordinator (the object holding the gather/free hooks)."""
    optimizer = engine.optimizer
    return getattr(optimizer, "parameter_offload", optimizer)


_FROZEN_ENGINES: dict[int, Any] = {}  # id(frozen module) -> the ZeRO-3 inference engine partitioning it


def shard_frozen(modules: list[torch.nn.Module]) -> None:
    """Partition frozen networks' weights over the processes (ZeRO-3 inference: no optimizer, forward only). The
    modules stay what they were and are called as before: DeepSpeed's hooks on each submodule gather its weights
    for its forward and free them after, so every process must make the same forward calls (as under FSDP);
    `gathered` lifts that for blocks whose number of forwards depends on each process's data."""
    import deepspeed

    quiet()
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "bf16": {"enabled": False}, "fp16": {"enabled": False}, "steps_per_print": 1 << 30,
              "wall_clock_breakdown": False}
    for module in modules:
        engine = deepspeed.initialize(model=module, config=config, dist_init_required=False)[0]
        engine.eval()
        _FROZEN_ENGINES[id(module)] = engine


def _engine_of(model: Any) -> Any | None:
    if is_engine(model):
        return model
    return _FROZEN_ENGINES.get(id(model))


@contextlib.contextmanager
def gathered(model: Any) -> Iterator[None]:
    """Every ZeRO-3 weight of `model` (a training engine, or a frozen network partitioned by `shard_frozen`)
    gathered for the block and the gather/free hooks lifted, so the block may run any number of forwards with no
    collective calls; partitioned and hooked again after. A no-op for ZeRO-2 and unpartitioned models."""
    model = _engine_of(model)
    if model is None or model.zero_optimization_stage() != 3:
        yield
        return
    import deepspeed

    offload = _offload(model)
    params = list(model.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for param in params:
            param.ds_active_sub_modules.clear()
        hooks = list(offload.forward_hooks) + list(offload.backward_hooks)
        for hook in hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


def grad_norm_and_step(engine: Any) -> float:
    """Finish the optimizer step (the reduction of the accumulated gradients, clipping, the update, zeroing) and
    return the gradient norm before clipping."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else 0.0


def save(path: Path, engine: Any) -> None:
    """Each process writes its partitions (collective)."""
    engine.save_checkpoint(str(path), tag=_TAG, save_latest=False)


def load(path: Path, engine: Any) -> None:
    """Read this process's partitions back (collective); the scheduler and RNG are restored by the caller."""
    loaded, _ = engine.load_checkpoint(str(path), tag=_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {path}")


def required_files(ckpt: Path) -> list[str]:
    """The files a DeepSpeed checkpoint cannot be resumed without: the main process's model states (ZeRO-2
    writes them once, ZeRO-3 a partition per process) and its optimizer partition."""
    state = f"{ZERO_DIR}/{_TAG}"
    model = ("zero_pp_rank_0_mp_rank_00_model_states.pt"
             if (ckpt / state / "zero_pp_rank_0_mp_rank_00_model_states.pt").exists() else "mp_rank_00_model_states.pt")
    return [f"{state}/{model}", f"{state}/zero_pp_rank_0_mp_rank_00_optim_states.pt"]


def full_state(engine: Any) -> dict[str, torch.Tensor]:
    """A ZeRO-3 engine's full state dict, consolidated on the main process in CPU memory; empty elsewhere
    (collective). (ZeRO-2 keeps whole weights on every process: its model is saved as it is.)"""
    state = engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu() for k, v in (state or {}).items()}
