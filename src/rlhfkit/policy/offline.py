"""What the offline preference trainers share -- the DPO family (policy/dpo.py) and KTO (policy/kto.py): their one
config (`rlhfkit dpo` trains either, by --loss), the record reader with its held-out split, the tally of
per-pair metrics reduced over processes, and the set-up and summary around their training loops."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from rlhfkit.config import PreferenceDataConfig, TrainConfig
from rlhfkit.data.preference import PreferencePair
from rlhfkit.data.readers import split_eval
from rlhfkit.errors import ConfigError, UserError
from rlhfkit.models import attention_token_weight, load_causal_lm, load_tokenizer
from rlhfkit.policy.reference import Reference, prepare_reference, visited_items
from rlhfkit.train import Run

log = logging.getLogger(__name__)

REFERENCE_FREE = ("simpo", "orpo")
SOFT_LABEL_LOSSES = ("dpo", "cdpo")
"""The losses that train a pair's `confidence` as a soft target: both are the cross-entropy of σ(βh) against a
label probability (cDPO's, Mitchell 2023), which a per-pair confidence sets. IPO, SimPO, ORPO and KTO have no
such probability in their loss, so they refuse data with a confidence column rather than ignore it."""
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
    """cdpo only: assumed probability ε in [0, 0.5) that a preference label is flipped. With a confidence column
    it composes with each row's c as an independent flip: the label is right with probability c(1 - ε) + (1 - c)ε."""
    padding_free: bool = True
    """Each micro-batch's chosen and rejected sequences packed into rows as wide as the longest one (block-diagonal
    attention, positions restarting per sequence), so little of a forward pass is padding; off pads every
    sequence to the longest (KTO: its completions and mismatched pairs alike). The same log-probs either way
    (tested)."""
    share_prompt: bool = True
    """With padding_free, pair losses (not kto): a pair's chosen and rejected sequences share one copy of their
    prompt in the packed row, each attending to it and to itself, so the prompt goes through the policy and the
    reference once per pair instead of twice. The same log-probs and gradients (tested). Rows grow as wide as a
    whole pair, and packed rows attend densely: a batch whose wider rows would cost more attention than the prompt
    copies save (long responses to short prompts, on a small model) is laid out without sharing."""
    use_confidence: bool = True
    """dpo and cdpo: rows with a confidence column (the probability that chosen is truly better, e.g. from
    annotator reliability) train as soft targets, cDPO with a per-row flip probability 1 - confidence; off trains
    every row as certain. Held-out metrics always treat the labels as certain. The other losses refuse data with
    the column unless this is off."""
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
    ref_batch_size: int = 64
    """Pairs per forward pass while computing the cached reference log-probs (batched by length; the logits are
    formed a chunk of rows at a time, so a large batch costs hidden states, not B × T × V logits)."""
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


def read_records(cfg: DPOConfig, tokenizer: Any,
                 read: Callable[..., list[Any]]) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Training and held-out rows as `read` parses them (eval_data, or eval_fraction of --data held out by seed).
    Rows are split before anything expands them (rankings into pairs, pairs into KTO examples), so one row's
    items never land on both sides. Rows with a confidence are refused for a loss that cannot use it
    (`check_confidence`)."""
    opts = cfg.reader_options(tokenizer)
    records = read(cfg.data_source(), **opts)
    held_records = read(cfg.data_source(cfg.eval_data, held_out=True), **opts) if cfg.eval_data else []
    soft = check_confidence(cfg, records + held_records)
    if not cfg.eval_data:
        records, held_records = split_eval(records, cfg.eval_fraction, cfg.seed)
    info = {"train_rows": len(records), "held_out_rows": len(held_records)}
    if soft:
        info["confidence_rows"] = soft
    return records, held_records, info


def check_confidence(cfg: DPOConfig, records: list[Any]) -> int:
    """How many pair rows (training and held-out) carry a confidence, 0 with use_confidence off; a loss outside
    SOFT_LABEL_LOSSES given such rows is a UserError naming the first one and the fixes."""
    soft = [r for r in records if isinstance(r, PreferencePair) and r.confidence is not None]
    if not soft or not cfg.use_confidence:
        return 0
    if cfg.loss not in SOFT_LABEL_LOSSES:
        first = soft[0]
        raise UserError(f"{first.path}, row {first.row}: {len(soft)} rows have a confidence (the probability that "
                        f"chosen is truly better), which --loss {cfg.loss} has no soft target for; use --loss dpo or "
                        "--loss cdpo, pass --use-confidence false to train every row as certain, or drop the "
                        "column.")
    return len(soft)


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


# ------------------------------------------------------------------------------------ set-up and summary
@dataclass
class Started:
    """An offline preference run ready for its first step: data, the prepared model, optimizer and schedule, and
    where log π_ref comes from."""

    run: Run
    tokenizer: Any
    train: Any
    held: Any
    info: dict[str, Any]
    model: Any
    optimizer: Any
    scheduler: Any
    sampler: Any
    start_step: int
    reference: Reference
    ref_cache: str | None
    """'reused', 'extended' or 'computed' with reference: cached (prepare_reference), else None."""


def start(cfg: DPOConfig, load_data: Callable[[DPOConfig, Any], tuple[Any, Any, dict[str, Any]]],
          ref_kind: Literal["cached", "adapter", "none"]) -> Started:
    """Run, tokenizer, data (`load_data`: the trainer's split and tokenising), the policy, the reference (cached
    log-probs computed before resume loads trained weights, or the adapter switched off), then run.begin."""
    run = Run(cfg, stage="dpo")  # `rlhfkit dpo` trains every offline loss: one stage name
    tokenizer = load_tokenizer(cfg.model, padding_side="right")
    train, held, info = load_data(cfg, tokenizer)
    log.info("dpo (%s): %s", cfg.loss, info)
    model = load_causal_lm(cfg.model, tokenizer, lora=cfg.lora, dropout_off=cfg.dropout_off)
    for split in (train, held):  # pair splits share a prompt only in the batches where it costs less
        if hasattr(split, "token_weight"):
            split.token_weight = attention_token_weight(model)
    # only the items max_steps will draw need a reference log-prob (the trainers draw batch x grad_accum x world
    # items a step from run.begin's EpochSampler, seeded by cfg.seed)
    needed = visited_items(len(train), cfg.seed, cfg.batch_size * cfg.grad_accum * run.world, cfg.max_steps)
    ref_cache = prepare_reference(run, cfg, model, tokenizer, train, held, needed) if ref_kind == "cached" else None
    model, optimizer, scheduler, sampler, start_step = run.begin(model, len(train))
    peft_model = run.accelerator.unwrap_model(model) if ref_kind == "adapter" else None
    reference = Reference(ref_kind, run, tokenizer.pad_token_id, peft_model)
    return Started(run, tokenizer, train, held, info, model, optimizer, scheduler, sampler, start_step, reference,
                   ref_cache)


def finish(cfg: DPOConfig, s: Started, ref_kind: str, last: dict[str, Any]) -> dict[str, Any]:
    """The run's summary.json (the last step's metrics), written with the final model."""
    summary = {
        "stage": "dpo",
        "loss": cfg.loss,
        "steps": cfg.max_steps,
        **s.info,
        "reference": ref_kind,
        "ref_cache": s.ref_cache,
        "final_loss": last.get("loss"),
        "reward_accuracy": last.get("rewards/accuracy"),
        "reward_margin": last.get("rewards/margin"),
        "eval_loss": last.get("eval/loss"),
        "eval_reward_accuracy": last.get("eval/rewards/accuracy"),
        "eval_reward_margin": last.get("eval/rewards/margin"),
    }
    s.run.finish(s.model, s.tokenizer, summary)
    return summary
