"""Direct preference optimisation (`rlhfkit dpo`): DPO, cDPO, IPO, SimPO and ORPO on preference pairs, KTO on
unpaired judgments; no reward model, no sampling.

The loop reads top to bottom like sft.py: global batch -> this process's share -> micro-batches (chosen and
rejected in one forward pass) -> loss normalised by the pair count of the whole optimizer step -> one optimizer
step -> log -> checkpoint. The reference log-probs are computed once before training and cached in the run
directory (ref_logps.safetensors), so no reference model is held during training; with LoRA and
`reference: adapter` the reference is the policy with its adapter switched off, computed on the fly."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch

from rlhfkit.config import PreferenceDataConfig, TrainConfig
from rlhfkit.data.kto import (
    TokenizedCompletion, collate_completions, kl_partners, mismatched, read_kto_records, tokenize_kto, unpair,
)
from rlhfkit.data.preference import (
    PreferencePair, Ranking, TokenizedPair, collate_pairs, ranking_to_pairs, read_preferences, tokenize_preferences,
)
from rlhfkit.errors import ConfigError, UserError
from rlhfkit.losses import (
    PreferenceStats, cdpo_loss, dpo_loss, ipo_loss, kto_loss, orpo_loss, sequence_logps, simpo_loss,
)
from rlhfkit.losses.dpo import kto_weights_ok
from rlhfkit.models import load_causal_lm, load_tokenizer, logprobs_of
from rlhfkit.policy.sft import split_eval
from rlhfkit.train import Run, check_finite

log = logging.getLogger(__name__)

REF_CACHE = "ref_logps.safetensors"
REFERENCE_FREE = ("simpo", "orpo")
DEFAULT_BETA = {"dpo": 0.1, "cdpo": 0.1, "kto": 0.1, "simpo": 2.0}
"""β when the config leaves it unset: DPO's and KTO's papers use 0.1; SimPO's reward is a per-token average, so
its β is larger (2.0–2.5 in arXiv 2405.14734)."""


@dataclass
class DPOConfig(PreferenceDataConfig, TrainConfig):
    """Preference optimisation without a reward model: DPO and its variants."""

    loss: Literal["dpo", "cdpo", "ipo", "simpo", "kto", "orpo"] = "dpo"
    """dpo (sigmoid, Rafailov et al. 2023), cdpo (label smoothing), ipo (Azar et al. 2023), simpo (reference-free,
    length-normalised), kto (unpaired thumbs-up/down data, Ethayarajh et al. 2024), orpo (reference-free, SFT +
    odds ratio)."""
    beta: float | None = None
    """Temperature β of the implicit reward β·(log π − log π_ref) (dpo, cdpo, kto) or β/|y|·log π (simpo).
    Unset: 0.1, or 2.0 for simpo. ipo uses tau and orpo orpo_lambda instead."""
    label_smoothing: float = 0.1
    """cdpo only: assumed probability ε in [0, 0.5) that a preference label is flipped."""
    tau: float = 0.1
    """ipo only: the log-ratio gap is regressed onto 1/(2·tau)."""
    simpo_gamma: float = 0.5
    """simpo only: target reward margin γ (the margin itself, as in the paper's Eq. 6)."""
    orpo_lambda: float = 0.1
    """orpo only: weight λ of the odds-ratio term added to the chosen response's NLL."""
    kto_desirable_weight: float = 1.0
    """kto only: λ_D, weight of desirable examples. Keep (λ_D·n_D):(λ_U·n_U) in [1, 4/3]; a warning says when not."""
    kto_undesirable_weight: float = 1.0
    """kto only: λ_U, weight of undesirable examples."""
    max_length: int = 512
    """Longest tokenised prompt + response allowed."""
    overlong: Literal["error", "truncate"] = "error"
    """What to do with a longer pair: stop with an error naming the row, or cut the response tails (the prompt is
    kept whole) and report how many were cut."""
    reference: Literal["cached", "adapter"] = "cached"
    """Where log π_ref comes from: cached (computed once before training from ref_model, stored in output_dir as
    ref_logps.safetensors and reused on resume), or adapter (needs lora.enabled: the policy with its LoRA adapter
    disabled, computed on the fly; no cache, no second model). simpo and orpo use no reference."""
    ref_model: str = ""
    """Reference model directory for reference: cached; empty means --model (the usual choice: the SFT policy)."""
    ref_batch_size: int = 16
    """Pairs per forward pass while computing the cached reference log-probs."""
    eval_data: str = ""
    """Held-out data file; when empty, eval_fraction of --data is held out (deterministically, by seed)."""
    eval_fraction: float = 0.05
    """Fraction of --data rows held out for evaluation when eval_data is empty (0 disables; needs 20+ rows)."""
    eval_batch_size: int = 16
    """Pairs (or KTO examples) per evaluation forward pass."""

    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.loss, 0.1)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}.")
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"beta must be positive, got {self.beta}.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}; it is the assumed "
                              "probability that a label is flipped (0.5 would mean the labels carry no information).")
        if self.tau <= 0:
            raise ConfigError(f"tau must be positive, got {self.tau}.")
        if self.orpo_lambda < 0:
            raise ConfigError(f"orpo_lambda must be 0 or more, got {self.orpo_lambda}.")
        for name in ("kto_desirable_weight", "kto_undesirable_weight"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}.")
        for name in ("ref_batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.reference == "adapter":
            if not self.lora.enabled:
                raise ConfigError("reference: adapter needs lora.enabled: true (the reference is the policy with "
                                  "its LoRA adapter switched off); use reference: cached for full fine-tuning.")
            if self.ref_model and self.ref_model != self.model:
                raise ConfigError("ref_model cannot be used with reference: adapter (the reference is --model with "
                                  "the adapter off); use reference: cached to take the reference from ref_model.")


# ----------------------------------------------------------------------------------------------------- data
@dataclass
class Split:
    """Training or held-out data in the layout its loss needs. Every item has two sequences, column 0 and
    column 1: chosen and rejected (paired losses), or the example's completion and its mismatched pair (KTO)."""

    items: list[Any]
    """TokenizedPair (paired losses) or TokenizedCompletion (kto)."""
    kl_items: list[TokenizedCompletion] | None = None
    """kto: item i's prompt followed by its fixed partner's completion, for the reference point z₀."""
    ref: torch.Tensor | None = None
    """(N, 2) cached sequence log π_ref of column 0 and column 1, when reference: cached."""

    def __len__(self) -> int:
        return len(self.items)

    def collate(self, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """The policy's batch: (2B, T) chosen rows then rejected rows, or (B, T) KTO completions."""
        if self.kl_items is None:
            return collate_pairs([self.items[i] for i in idx], pad_id)
        return collate_completions([self.items[i] for i in idx], pad_id)

    def collate_kl(self, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        assert self.kl_items is not None
        return collate_completions([self.kl_items[i] for i in idx], pad_id)

    def collate_both(self, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """(2B, T): column-0 sequences in rows 0..B-1, column-1 sequences in rows B..2B-1."""
        if self.kl_items is None:
            return collate_pairs([self.items[i] for i in idx], pad_id)
        return collate_completions([self.items[i] for i in idx] + [self.kl_items[i] for i in idx], pad_id)

    def sequences(self) -> Iterator[tuple[list[int], list[int]]]:
        """(input_ids, response_mask) of every sequence whose reference log-prob is cached."""
        for i, item in enumerate(self.items):
            if isinstance(item, TokenizedPair):
                yield item.chosen_input_ids, item.chosen_response_mask
                yield item.rejected_input_ids, item.rejected_response_mask
            else:
                assert self.kl_items is not None
                yield item.input_ids, item.response_mask
                yield self.kl_items[i].input_ids, self.kl_items[i].response_mask


def _expand(records: list[Any]) -> list[PreferencePair]:
    return [p for r in records for p in (ranking_to_pairs(r) if isinstance(r, Ranking) else [r])]


def load_data(cfg: DPOConfig, tokenizer: Any) -> tuple[Split, Split, dict[str, Any]]:
    """Training and held-out splits. Rows are split before K-way rankings are expanded into pairs (and before
    KTO unpairs pairs), so one ranking's pairs never land on both sides."""
    read, opts = read_kto_records if cfg.loss == "kto" else read_preferences, cfg.reader_options(tokenizer)
    records = read(cfg.data_source(), **opts)
    held_records = read(cfg.data_source(cfg.eval_data, held_out=True), **opts) if cfg.eval_data else []
    if not cfg.eval_data:
        records, held_records = split_eval(records, cfg.eval_fraction, cfg.seed)
    info: dict[str, Any] = {"train_rows": len(records), "held_out_rows": len(held_records)}
    if cfg.loss != "kto":
        train_pairs, report = tokenize_preferences(tokenizer, _expand(records), cfg.max_length, cfg.overlong)
        held_pairs = tokenize_preferences(tokenizer, _expand(held_records), cfg.max_length, cfg.overlong)[0]
        info.update(train_pairs=len(train_pairs), held_out_pairs=len(held_pairs), truncated_rows=report.truncated)
        return Split(train_pairs), Split(held_pairs), info

    def build(recs: list[Any], seed: int) -> tuple[Split, Any]:
        examples, report = tokenize_kto(tokenizer, unpair(recs), cfg.max_length, cfg.overlong)
        return Split(examples, mismatched(examples, kl_partners(len(examples), seed), cfg.max_length)), report

    train, report = build(records, cfg.seed)
    held = build(held_records, cfg.seed + 1)[0]
    check = kto_weights_ok(report.desirable, report.undesirable, cfg.kto_desirable_weight,
                           cfg.kto_undesirable_weight)
    if not check:
        log.warning("kto: %s", check.message)
    info.update(train_examples=len(train), held_out_examples=len(held), desirable=report.desirable,
                undesirable=report.undesirable, truncated_rows=report.truncated)
    return train, held, info


# ------------------------------------------------------------------------------------------------ log-probs
def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def sequence_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ log π over each row's response tokens, and the response lengths: (N,), (N,)."""
    logprobs = logprobs_of(model, batch["input_ids"], batch["attention_mask"])  # (N, T-1), entry t scores token t+1
    return sequence_logps(logprobs, batch["response_mask"][:, 1:])  # (N,), (N,)


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


def pair_logps(run: Run, model: Any, split: Split, idx: list[int], pad_id: int) -> torch.Tensor:
    """(B, 2) sequence log-probs of both columns of items idx, in one forward pass. Call inside reference_mode."""
    batch = _to(split.collate_both(idx, pad_id), run.accelerator.device)
    with run.accelerator.autocast():
        logps, _ = sequence_logprobs(model, batch)  # (2B,)
    return logps.float().view(2, len(idx)).T  # (B, 2)


class Reference:
    """Where log π_ref comes from: the cache (kind 'cached'), the policy with its LoRA adapter disabled
    ('adapter'), or nowhere ('none': SimPO and ORPO are reference-free)."""

    def __init__(self, kind: Literal["cached", "adapter", "none"], run: Run, pad_id: int, peft_model: Any = None):
        self.kind, self.run, self.pad_id, self.peft_model = kind, run, pad_id, peft_model

    def logps(self, model: Any, split: Split, idx: list[int]) -> torch.Tensor | None:
        """(B, 2) log π_ref of items idx, or None without a reference."""
        if self.kind == "none":
            return None
        if self.kind == "cached":
            assert split.ref is not None
            return split.ref[idx].to(self.run.accelerator.device)  # (B, 2)
        with reference_mode(model, self.peft_model):
            return pair_logps(self.run, model, split, idx, self.pad_id)


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


def reference_fingerprint(cfg: DPOConfig, train: Split, held: Split) -> str:
    """What the cached numbers depend on: the reference model's bytes, the precision, and every token id and
    response mask they were computed on (which covers the data files, the tokenizer, max_length, overlong, the
    held-out split and KTO's mismatched partners)."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": 1, "loss_layout": "kto" if cfg.loss == "kto" else "pairs",
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


def compute_reference_logps(run: Run, model: Any, split: Split, pad_id: int, batch_size: int,
                            peft_model: Any = None) -> torch.Tensor:
    """(N, 2) log π_ref of every item, each process scoring a strided share that is then gathered."""
    n, world = len(split), run.world
    per = -(-n // world)
    shares = [list(range(r, n, world)) for r in range(world)]
    shares = [s + [0] * (per - len(s)) for s in shares]  # equal sizes for the gather; padding rows are dropped
    mine = shares[run.rank]
    parts = [torch.zeros((0, 2), device=run.accelerator.device)]
    with reference_mode(model, peft_model):
        for start in range(0, len(mine), batch_size):
            parts.append(pair_logps(run, model, split, mine[start : start + batch_size], pad_id))
    local = torch.cat(parts)  # (per, 2)
    gathered = (run.accelerator.gather(local) if world > 1 else local).cpu()  # (world * per, 2), rank-major
    items = [i for r in range(world) for i in range(r, n, world)]
    rows = [r * per + k for r in range(world) for k in range(len(range(r, n, world)))]
    out = torch.zeros((n, 2), dtype=torch.float32)
    out[torch.tensor(items, dtype=torch.long)] = gathered[torch.tensor(rows, dtype=torch.long)]
    return out


def prepare_reference(run: Run, cfg: DPOConfig, model: Any, tokenizer: Any, train: Split, held: Split) -> str:
    """Fill train.ref and held.ref from the run's cache, computing it first when it is missing or was made for
    other data or another reference model. Call before resume loads trained weights: when ref_model is --model,
    the freshly loaded policy (adapter off) is the reference, so no second copy is ever loaded.
    Returns 'reused' or 'computed'."""
    path = run.dir / REF_CACHE
    fingerprint = reference_fingerprint(cfg, train, held)
    tables = read_reference_cache(path, fingerprint)
    stale = tables is None and path.exists()
    run.accelerator.wait_for_everyone()  # every process has decided before the file may be replaced
    if stale and cfg.resume and run.resume_from is not None:
        raise UserError(f"{path} was computed for other data or another reference model than this run now sees "
                        "(a file changed since the run started); restore them, or start again with --overwrite.")
    if tables is not None:
        log.info("dpo: reusing the reference log-probs in %s", path)
        status = "reused"
    else:
        if stale:
            log.warning("dpo: %s was made for other data or another reference model; recomputing it", path)
        ref_path = cfg.ref_model or cfg.model
        own = ref_path == cfg.model
        device = run.accelerator.device
        if own:
            ref_model, peft_model = model.to(device), (model if cfg.lora.enabled else None)
        else:
            ref_model, peft_model = load_causal_lm(ref_path, tokenizer, dropout_off=True).to(device), None
        log.info("dpo: computing reference log-probs of %d + %d items with %s", len(train), len(held), ref_path)
        tables = {name: compute_reference_logps(run, ref_model, split, tokenizer.pad_token_id, cfg.ref_batch_size,
                                                peft_model)
                  for name, split in (("train", train), ("eval", held))}
        if not own:  # free the reference model: training holds only the policy
            del ref_model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if run.is_main:
            write_reference_cache(path, tables, fingerprint)
        run.accelerator.wait_for_everyone()
        status = "computed"
    train.ref, held.ref = tables["train"], tables["eval"]
    return status


# ---------------------------------------------------------------------------------------------------- losses
@dataclass
class PairLogps:
    """One micro-batch's sequence log-probs, split into chosen and rejected. All (B,)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None


def pair_loss(cfg: DPOConfig) -> Callable[[PairLogps], tuple[torch.Tensor, PreferenceStats]]:
    """The name -> loss function table at the config edge (STYLE.md section 8), for the paired losses."""
    beta = cfg.resolved_beta()
    table: dict[str, Callable[[PairLogps], tuple[torch.Tensor, PreferenceStats]]] = {
        "dpo": lambda s: dpo_loss(s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, beta=beta),
        "cdpo": lambda s: cdpo_loss(s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, beta=beta,
                                    label_smoothing=cfg.label_smoothing),
        "ipo": lambda s: ipo_loss(s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, tau=cfg.tau),
        "simpo": lambda s: simpo_loss(s.chosen, s.rejected, s.chosen_lengths, s.rejected_lengths, beta=beta,
                                      gamma=cfg.simpo_gamma),
        # ORPO's L_SFT per pair: the chosen response's mean token NLL, −log π(y_w)/|y_w| (arXiv 2403.07691 Eq. 6)
        "orpo": lambda s: orpo_loss(s.chosen, s.rejected, s.chosen_lengths, s.rejected_lengths,
                                    chosen_nll=-s.chosen / s.chosen_lengths, lam=cfg.orpo_lambda),
    }
    return table[cfg.loss]


def paired_terms(model: Any, batch: dict[str, torch.Tensor], ref: torch.Tensor | None,
                 loss_fn: Callable[[PairLogps], tuple[torch.Tensor, PreferenceStats]]):
    """Mean loss over the micro-batch's pairs (chosen and rejected in one forward pass) and per-pair values for
    the step's metrics. ref: (B, 2) log π_ref of chosen and rejected, or None."""
    logps, lengths = sequence_logprobs(model, batch)  # (2B,), (2B,)
    B = batch["margin"].shape[0]
    s = PairLogps(logps[:B], logps[B:], lengths[:B], lengths[B:],
                  None if ref is None else ref[:, 0], None if ref is None else ref[:, 1])
    loss, stats = loss_fn(s)
    return loss, {
        "loss": stats.losses,
        "rewards/chosen": stats.chosen_rewards,
        "rewards/rejected": stats.rejected_rewards,
        "rewards/accuracy": (stats.margins > 0).float(),
        "logps/chosen": s.chosen.detach(),
        "logps/rejected": s.rejected.detach(),
    }


def kto_terms(model: Any, batch: dict[str, torch.Tensor], ref: torch.Tensor, z0: torch.Tensor, cfg: DPOConfig):
    """Mean KTO loss over the micro-batch's examples, given the step's reference point z0 (a 0-d tensor, before
    clamping). "chosen" in the metric names means desirable and "rejected" undesirable, as in TRL's KTO logs."""
    logps, _ = sequence_logprobs(model, batch)  # (B,)
    desirable = batch["desirable"]  # (B,) bool
    # kto_loss averages kl_policy − kl_ref over what it is given; passing the whole step's mean as one entry makes
    # z₀ the step-wide estimate (the same for every micro-batch, so 1x8 accumulation equals 8x1)
    loss, stats = kto_loss(logps, ref[:, 0], desirable, z0.view(1).to(logps), torch.zeros(1, device=logps.device),
                           beta=cfg.resolved_beta(), desirable_weight=cfg.kto_desirable_weight,
                           undesirable_weight=cfg.kto_undesirable_weight)
    return loss, {
        "loss": stats.losses,
        "rewards/chosen": stats.desirable_rewards,
        "rewards/rejected": stats.undesirable_rewards,
        "logps/chosen": logps[desirable].detach(),
        "logps/rejected": logps[~desirable].detach(),
    }


@torch.no_grad()
def kl_reference_point(run: Run, model: Any, split: Split, chunks: list[list[int]], refs: list[torch.Tensor],
                       pad_id: int) -> torch.Tensor:
    """KTO's z₀ before clamping: mean of log π − log π_ref over the mismatched pairs of every micro-batch on every
    process. No gradient flows through z₀ (arXiv 2402.01306), so the policy side runs under no_grad, in the
    model's current mode."""
    total = torch.zeros((), dtype=torch.float64)
    for idx, ref in zip(chunks, refs):
        batch = _to(split.collate_kl(idx, pad_id), run.accelerator.device)
        with run.accelerator.autocast():
            logps, _ = sequence_logprobs(model, batch)  # (B,)
        total += (logps.float() - ref[:, 1]).double().sum().cpu()
    count = run.all_sum(sum(len(idx) for idx in chunks))
    return (run.all_sum(total) / count.clamp(min=1)).float().cpu()


class Tally:
    """Sums and counts of per-pair (or per-example) values over a step or an evaluation, reduced over processes."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, v in values.items():
            entry = self.sums.setdefault(name, [0.0, 0.0])
            entry[0] += float(v.detach().double().sum())
            entry[1] += v.numel()

    def means(self, run: Run, prefix: str = "") -> dict[str, float]:
        names = list(self.sums)  # every process adds the same names in the same order
        totals = run.all_sum(torch.tensor([self.sums[n] for n in names], dtype=torch.float64)).cpu()
        out = {prefix + n: float(s / c) for n, (s, c) in zip(names, totals.tolist()) if c > 0}
        if prefix + "rewards/chosen" in out and prefix + "rewards/rejected" in out:
            out[prefix + "rewards/margin"] = out[prefix + "rewards/chosen"] - out[prefix + "rewards/rejected"]
        return out


@torch.no_grad()
def evaluate(run: Run, cfg: DPOConfig, model: Any, held: Split, reference: Reference,
             pad_id: int) -> dict[str, float]:
    """The step metrics on held-out data (eval/ prefix), summed over every process's share."""
    was_training = model.training
    model.eval()
    mine = list(range(run.rank, len(held), run.world))
    chunks = [mine[k : k + cfg.eval_batch_size] for k in range(0, len(mine), cfg.eval_batch_size)]
    refs = [reference.logps(model, held, idx) for idx in chunks]
    tally = Tally()
    extra: dict[str, float] = {}
    if cfg.loss == "kto":
        z0 = kl_reference_point(run, model, held, chunks, refs, pad_id)
        extra["eval/kl"] = float(z0.clamp(min=0.0))
    loss_fn = pair_loss(cfg) if cfg.loss != "kto" else None
    for idx, ref in zip(chunks, refs):
        batch = _to(held.collate(idx, pad_id), run.accelerator.device)
        with run.accelerator.autocast():
            if loss_fn is None:
                _, values = kto_terms(model, batch, ref, z0, cfg)
            else:
                _, values = paired_terms(model, batch, ref, loss_fn)
        tally.add(values)
    model.train(was_training)
    return {**tally.means(run, prefix="eval/"), **extra}


# ------------------------------------------------------------------------------------------------------ main
def main(cfg: DPOConfig) -> dict[str, Any]:
    run = Run(cfg, stage="dpo")
    device = run.accelerator.device
    tokenizer = load_tokenizer(cfg.model, padding_side="right")
    pad_id = tokenizer.pad_token_id
    train, held, info = load_data(cfg, tokenizer)
    log.info("dpo (%s): %s", cfg.loss, info)

    model = load_causal_lm(cfg.model, tokenizer, lora=cfg.lora, dropout_off=cfg.dropout_off)
    ref_kind: Literal["cached", "adapter", "none"] = "none" if cfg.loss in REFERENCE_FREE else cfg.reference
    ref_cache = prepare_reference(run, cfg, model, tokenizer, train, held) if ref_kind == "cached" else None
    model, optimizer, scheduler, sampler, start_step = run.begin(model, len(train))
    peft_model = run.accelerator.unwrap_model(model) if ref_kind == "adapter" else None
    reference = Reference(ref_kind, run, pad_id, peft_model)
    loss_fn = pair_loss(cfg) if cfg.loss != "kto" else None
    micro = cfg.batch_size
    last: dict[str, Any] = {}
    for step in range(start_step + 1, cfg.max_steps + 1):
        indices = run.shard(sampler.next_indices(micro * cfg.grad_accum * run.world))
        chunks = [indices[k : k + micro] for k in range(0, len(indices), micro)]
        # the loss is a mean over the pairs (KTO: examples) of the whole optimizer step, over all micro-batches
        # and processes, so 1x8 accumulation equals 8x1 and N processes equal one (DDP averages: hence * world)
        step_items = float(run.all_sum(len(indices)))
        refs = [reference.logps(model, train, idx) for idx in chunks]  # (B, 2) each, or None
        extra: dict[str, float] = {}
        if loss_fn is None:
            z0 = kl_reference_point(run, model, train, chunks, refs, pad_id)
            extra["kl"] = float(z0.clamp(min=0.0))
        tally = Tally()
        for k, (idx, ref) in enumerate(zip(chunks, refs)):
            batch = _to(train.collate(idx, pad_id), device)
            with run.micro_step(model, k, len(chunks)):
                if loss_fn is None:
                    loss, values = kto_terms(model, batch, ref, z0, cfg)
                else:
                    loss, values = paired_terms(model, batch, ref, loss_fn)
                run.accelerator.backward(loss * (len(idx) / step_items * run.world))
            tally.add(values)
        lr = scheduler.get_last_lr()[0]
        metrics: dict[str, Any] = tally.means(run)
        check_finite({"loss": metrics["loss"]}, step)
        grad_norm = run.step_optimizer(model, optimizer, scheduler, step)
        metrics.update(extra)
        metrics.update({"grad_norm": grad_norm, "lr": lr, "pairs" if loss_fn else "examples": int(step_items),
                        "epoch": round(sampler.epochs_done, 4)})
        if len(held) and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
            metrics.update(evaluate(run, cfg, model, held, reference, pad_id))
        run.log(step, metrics, headline=("loss", "rewards/margin", "eval/loss"))
        run.end_step(step, model, optimizer, scheduler, {"sampler": sampler.state_dict()})
        last = metrics

    summary = {
        "stage": "dpo",
        "loss": cfg.loss,
        "steps": cfg.max_steps,
        **info,
        "reference": ref_kind,
        "ref_cache": ref_cache,
        "final_loss": last.get("loss"),
        "reward_accuracy": last.get("rewards/accuracy"),
        "reward_margin": last.get("rewards/margin"),
        "eval_loss": last.get("eval/loss"),
        "eval_reward_accuracy": last.get("eval/rewards/accuracy"),
        "eval_reward_margin": last.get("eval/rewards/margin"),
    }
    run.finish(model, tokenizer, summary)
    return summary
