"""Sharded data parallelism for every stage: PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

Accelerate starts the processes and forms the process group; the sharding is applied here, inside the shared
training machinery (`train.run.Run`), because Accelerate's own FSDP plugin needs GPUs: on a CPU it silently
falls back to DDP (checked with accelerate 1.15). So one code path shards on CPUs (gloo) and GPUs (NCCL), and
`accelerate launch --config_file examples/accelerate/fsdp.yaml` selects it (ACCELERATE_USE_FSDP), as does
`--sharding fsdp`.

What is sharded, and how:
- The trained model: every decoder layer (the classes its Hugging Face model names in `_no_split_modules`) is one
  FSDP unit, all-gathered for its forward and backward and resharded after each (ZeRO-3); the root unit (embeddings,
  final norm, LM head, a value head) stays gathered from forward to backward, as FSDP2 does for the root by
  default, which the chunked LM head of `models.logprobs_of` relies on (it applies the head's weight after the
  forward returns). Gradients are reduce-scattered (averaged over processes, as DDP does), the optimizer holds
  only its shard's state.
- Frozen models (PPO's reference and reward models) are sharded the same way by default and run forward only,
  every process making the same calls on equal batches; their gathered root weights are freed after each use
  (`release`), and a reward model that scores texts (another vocabulary, evaluation) is gathered whole for it,
  since its number of forwards then depends on each process's texts. `frozen_models: replicate` keeps a full
  copy per process instead.
- Sampling and evaluation run inside `gathered(model)`: every unit all-gathered once and kept gathered until the
  block ends. Decoding is hundreds of one-token forwards; a sharded forward would all-gather every layer for
  every token, and ranks whose responses end at different lengths would call it different numbers of times
  (a collective mismatch, i.e. a hang).
- Checkpoints are sharded (torch.distributed.checkpoint: each process writes its shard of the model and optimizer
  state; the directory needs a file system every process sees), inside the same atomic, checksummed
  checkpoint directory as unsharded runs. The final model is gathered to the main process and saved as full
  Hugging Face weights (`Skeleton`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)

SHARDED_DIR = "sharded"  # inside checkpoints/step-N/: the torch.distributed.checkpoint files


def fsdp_from_launcher() -> bool:
    """True when `accelerate launch` was given an FSDP config (it exports ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def reshard_from_launcher(default: bool) -> bool:
    value = os.environ.get("FSDP_RESHARD_AFTER_FORWARD")
    return default if value is None else value.lower() == "true"


def check_shardable(cfg: Any) -> None:
    """Refuse what FSDP cannot shard, naming the alternative."""
    from rlhfkit.errors import UserError

    if cfg.lora.enabled and cfg.lora.load_in_4bit:
        raise UserError("QLoRA (lora.load_in_4bit) is not supported under FSDP (its 4-bit weights are not "
                        "sharded); train it replicated (examples/accelerate/ddp.yaml), or use plain LoRA with FSDP.")


def layer_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules to shard one by one: instances of the classes the model's Hugging Face parts name in
    `_no_split_modules` (their decoder layers), outermost first and never one inside another."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    units: list[torch.nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or module is model:
            continue
        if type(module).__name__ in names:
            units.append(module)
            inside.update(id(m) for m in module.modules())
    return units


class Skeleton:
    """A copy of a model's structure whose parameters live on the meta device (no memory), made before sharding,
    so the main process can rebuild the plain model from a gathered state dict and save it with the code that
    saves unsharded models (LoRA merging, value heads and tied weights included)."""

    def __init__(self, model: torch.nn.Module):
        memo: dict[int, Any] = {}
        for param in model.parameters():
            memo[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="meta"),
                                                 requires_grad=param.requires_grad)
        self.module = copy.deepcopy(model, memo)
        by_tensor: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            by_tensor.setdefault(id(param), []).append(name)
        # names of one tensor (tied embeddings): a state dict may hold any one of them
        self.aliases = {name: names for names in by_tensor.values() for name in names}

    def filled(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The plain model holding `state` (a full state dict); ties the embeddings again where the model ties
        them (loading assigns each key its own tensor)."""
        module = self.module
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
        untied = [k for k in missing if not any(a in state for a in self.aliases.get(k, ()))]
        if unexpected or untied:
            raise RuntimeError(f"the gathered state does not match the model: missing {untied[:5]}, "
                               f"unexpected {unexpected[:5]}")
        for sub in module.modules():
            if hasattr(sub, "tie_weights") and hasattr(sub, "get_output_embeddings"):
                sub.tie_weights()
        return module


def directly_called(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Parts our code calls without going through the model's own forward, each made an FSDP unit of its own (a
    unit's weights are gathered by its own forward hook): a reward model's backbone and score head
    (`reward.model.sequence_scores` reads the score at the last token itself)."""
    from transformers import PreTrainedModel

    parts: list[torch.nn.Module] = []
    for net in model.modules():
        if isinstance(net, PreTrainedModel) and isinstance(getattr(net, "score", None), torch.nn.Module):
            backbone = getattr(net, net.base_model_prefix, None)
            parts += [p for p in (backbone, net.score) if isinstance(p, torch.nn.Module)]
    return parts


def shard(model: torch.nn.Module, world: int, device: torch.device, reshard_after_forward: bool = True) -> None:
    """Apply fully_shard in place: each decoder layer, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    units = layer_units(model)
    if not units:
        log.warning("no decoder layers found to shard one by one (the model names no _no_split_modules); the "
                    "whole model is one FSDP unit, gathered whole for every forward")
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for part in directly_called(model):
        fully_shard(part, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    # FSDP2 takes the first unit to run forward as the root; sampling calls the policy inside a value-head
    # wrapper first, so settle the root now (what the root's first forward would do)
    model._get_fsdp_state()._lazy_init()


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model: Any) -> Iterator[None]:
    """Every FSDP unit of `model` all-gathered for the block (no collectives inside it, so each process may run
    any number of forwards), resharded after. A no-op for an unsharded model."""
    from torch.distributed.fsdp import FSDPModule

    if not is_sharded(model):
        yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    states = [(m, m._get_fsdp_state()._fsdp_param_group) for m in units]
    before = {id(m): (g is not None and g.post_forward_mesh_info is not None) for m, g in states}
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(before[id(unit)], recurse=False)


@contextlib.contextmanager
def gathered_all(models: list[Any], gather: Any = None) -> Iterator[None]:
    """`gathered` (or another `gather` context, such as DeepSpeed's `zero.gathered`) for several models at once."""
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context((gather or gathered)(model))
        yield


def release(models: list[Any]) -> None:
    """Free what frozen sharded models hold gathered after a forward (their root units, and a reward model's
    backbone and head, keep their weights from forward to backward, and a frozen model has no backward)."""
    from torch.distributed.fsdp import FSDPModule

    for model in models:
        for unit in model.modules():
            if isinstance(unit, FSDPModule):
                unit.reshard()


def grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """The global gradient norm (clipping to max_norm when > 0) of sharded parameters."""
    grads = [p for p in params if p.grad is not None]
    if max_norm > 0:
        total = torch.nn.utils.clip_grad_norm_(grads, max_norm)
    else:
        total = torch.nn.utils.get_total_norm([p.grad for p in grads])
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    return float(total)


def save_sharded(path: Path, model: Any, optimizer: Any) -> None:
    """Each process writes its shard of the model and optimizer state under path (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))


def load_sharded(path: Path, model: Any, optimizer: Any) -> None:
    """Read this process's shards back into the sharded model and its optimizer (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state(model: Any) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on the main process, in CPU memory; empty elsewhere (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
