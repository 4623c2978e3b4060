"""Reward-model training (`rlhfkit reward`): Bradley-Terry on pairs (with Llama-2 margins when labelled),
InstructGPT K-way ranking loss on rankings, optional reward centring; ensembles of bootstrap members;
normalisation on reference-policy samples; held-out accuracy, calibration and length bias. One criterion of a
rubric export per model (--criterion), and a safety classifier term for harmlessness models that act as Safe
RLHF's cost model (--safety-loss-weight).

The loop reads top to bottom like policy/sft.py: global batch -> this process's share -> micro-batches ->
per-item losses summed and divided by the items of the whole optimizer step -> one step -> log -> checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from rlhfkit.config import PreferenceDataConfig, TrainConfig, load_yaml, save_config
from rlhfkit.data.collate import collate_pairs, collate_rankings
from rlhfkit.data.preference import read_preferences
from rlhfkit.data.preference_tokens import TokenizedPair, TokenizedRanking, tokenize_preferences
from rlhfkit.data.readers import DataPath, read_prompts, split_eval
from rlhfkit.errors import ConfigError, UserError
from rlhfkit.losses import RewardStats, batched_ranking_loss, bradley_terry_loss, centering_penalty
from rlhfkit.models import load_tokenizer
from rlhfkit.reward.model import ENSEMBLE_FILE, apply_normalisation, load_reward_model, sequence_scores
from rlhfkit.train import Run, check_finite

log = logging.getLogger(__name__)

Item = TokenizedPair | TokenizedRanking


NORMALISER_SEED_OFFSET = 7919
"""Added to the run's seed for the normaliser's reference samples: their own random stream, far from the ensemble
members' seeds (seed + 0, 1, 2, ...), so the reference samples do not change with the ensemble size."""

@dataclass
class RewardConfig(PreferenceDataConfig, TrainConfig):
    """Train a reward model (or an ensemble) on preference pairs and rankings."""

    learning_rate: float = 5e-5
    """Peak learning rate of AdamW."""
    eval_data: str = ""
    """Held-out preference file; when empty, eval_fraction of --data is held out (deterministically, by seed)."""
    eval_fraction: float = 0.05
    """Fraction of --data held out for evaluation when eval_data is empty (needs 20+ rows)."""
    eval_batch_size: int = 32
    """Pairs per evaluation forward pass."""
    max_length: int = 512
    """Longest prompt + response (tokens) allowed."""
    overlong: Literal["error", "truncate"] = "error"
    """Over-long pairs: stop naming the row, or cut response tails and report how many were cut."""
    padding_free: bool = True
    """Lay each micro-batch's sequences end to end in as few rows as fit the longest one (block-diagonal attention,
    positions restarting per sequence) instead of padding every one to it: the same scores and gradients with
    less arithmetic spent on padding."""
    use_margin: bool = True
    """Use each pair's margin (or its strength level mapped to one) in -log sigma(r_c - r_r - m) (Llama 2)."""
    margin_scale: Literal["large", "small"] = "small"
    """Strength-to-margin map: large = 3/2/1/0, small = 1, 2/3, 1/3, 0 (Llama 2 section 3.2.2)."""
    center_eta: float = 0.0
    """Reward-centring regulariser eta * (r_c + r_r)^2 (Eisenstein et al. 2023; 0.01 is typical, 0 disables)."""
    ensemble_size: int = 1
    """Members to train (different seeds and bootstrap resamples); PPO can penalise their disagreement."""
    bootstrap: bool = True
    """Train each ensemble member on a bootstrap resample of the training data (only when ensemble_size > 1)."""
    normalize_prompts: str = ""
    """Prompts file ({"prompt": ...} or {"text": ...} rows) to sample reference responses from for normalising
    scores to mean 0, std 1 (lm-human-preferences); empty skips normalisation."""
    normalize_policy: str = ""
    """Policy that samples the normalisation responses (default: --model, the SFT reference policy)."""
    normalize_samples: int = 256
    """Reference samples for normalisation (lm-human-preferences used 256)."""
    normalize_max_new_tokens: int = 48
    """Longest normalisation sample."""
    normalize_temperature: float = 1.0
    """Sampling temperature for normalisation samples (use the temperature PPO will sample with)."""
    safety_loss_weight: float = 0.0
    """Weight of a safety classifier term on responses labelled safe or unsafe (chosen_safe / rejected_safe, as
    `rlhfkit data convert pku-saferlhf` and rubric exports write them): -log sigma(s x r) with s = +1 safe, -1
    unsafe. This is Safe RLHF's cost-model loss (Dai et al. 2024) with cost = -reward, so a harmlessness score
    below 0 means "unsafe" (cost > 0). Normalisation then scales the score but keeps its zero. 0 disables."""

    def validate(self) -> None:
        super().validate()
        if self.ensemble_size < 1:
            raise ConfigError(f"ensemble_size must be at least 1, got {self.ensemble_size}.")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        if self.center_eta < 0:
            raise ConfigError(f"center_eta must be 0 or more, got {self.center_eta}.")
        if self.normalize_policy and not self.normalize_prompts:
            raise ConfigError("--normalize-policy names the policy to sample for normalisation, but no prompts are "
                              "given: add --normalize-prompts (a prompts file), or drop --normalize-policy.")
        if self.normalize_prompts and self.normalize_samples < 2:
            raise ConfigError("normalize_samples must be at least 2 to estimate a standard deviation.")
        if not (self.safety_loss_weight >= 0 and math.isfinite(self.safety_loss_weight)):
            raise ConfigError(f"safety_loss_weight must be 0 or more, got {self.safety_loss_weight}.")


# --------------------------------------------------------------------------------------------- data
def load_items(cfg: RewardConfig, tokenizer: Any) -> tuple[list[Item], list[Item], dict[str, Any]]:
    margin_scale = cfg.margin_scale
    records = read_preferences(cfg.data_source(), **cfg.reader_options(tokenizer))
    items, report = tokenize_preferences(tokenizer, records, cfg.max_length, cfg.overlong, margin_scale)
    if not cfg.use_margin:
        items = [replace(i, margin=None) if isinstance(i, TokenizedPair) else i for i in items]
    if cfg.eval_data:
        eval_records = read_preferences(cfg.data_source(cfg.eval_data, True), **cfg.reader_options(tokenizer))
        held_out, eval_report = tokenize_preferences(tokenizer, eval_records, cfg.max_length, cfg.overlong, margin_scale)
        train = items
        truncated = report.truncated + eval_report.truncated
    else:
        train, held_out = split_eval(items, cfg.eval_fraction, cfg.seed)
        truncated = report.truncated
    info = {"pairs": report.pairs, "rankings": report.rankings, "truncated_rows": truncated,
            "train_items": len(train), "held_out_items": len(held_out)}
    if cfg.criterion:
        info["criterion"] = cfg.criterion
    if cfg.safety_loss_weight > 0:
        labelled = sum(isinstance(i, TokenizedPair) and (i.chosen_safe is not None) + (i.rejected_safe is not None)
                       for i in train)
        if not labelled:
            raise UserError(f"--safety-loss-weight {cfg.safety_loss_weight:g} needs responses labelled safe or "
                            f"unsafe, but no training pair in {cfg.data} has chosen_safe / rejected_safe; add the "
                            "labels (e.g. `rlhfkit data convert pku-saferlhf`) or set --safety-loss-weight 0.")
        info["safety_labelled_responses"] = int(labelled)
    return train, held_out, info


# --------------------------------------------------------------------------------------------- loss
def _to(batch: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def count_ordered_pairs(counts: dict[str, float], stats: RewardStats) -> None:
    """Add a loss's ordered pairs and how many of them the model orders right to the step's counts."""
    n = int(stats.num_pairs)
    # accuracy is the float32 fraction k/n of an integer count k < 2^23: its error is under 2^-24·k, so rounding
    # accuracy·n gives back exactly k
    counts["correct"] += round(float(stats.accuracy) * n)
    counts["compared"] += n


def micro_batch_loss(model: Any, items: list[Item], pad_id: int, cfg: RewardConfig, device: Any,
                     step_items: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of per-item losses over this micro-batch divided by the items of the whole step, and raw counts."""
    pairs = [i for i in items if isinstance(i, TokenizedPair)]
    rankings = [i for i in items if isinstance(i, TokenizedRanking)]
    total = torch.zeros((), device=device)
    counts = {"loss_sum": 0.0, "correct": 0.0, "compared": 0.0, "margin_sum": 0.0, "chosen_sum": 0.0,
              "rejected_sum": 0.0, "pairs": 0.0, "safety_correct": 0.0, "safety_labelled": 0.0}
    if pairs:
        batch = _to(collate_pairs(pairs, pad_id, cfg.padding_free), device)
        B = len(pairs)
        scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"], batch["last_index"],
                                 batch.get("position_ids"), batch.get("row_index"))  # (2B,)
        chosen, rejected = scores[:B], scores[B:]
        margin = batch["margin"] if cfg.use_margin else None
        loss, stats = bradley_terry_loss(chosen, rejected, margin)
        pair_sum = loss * B
        if cfg.center_eta > 0:
            pair_sum = pair_sum + centering_penalty(chosen, rejected, cfg.center_eta) * B
        if cfg.safety_loss_weight > 0:  # Safe RLHF's classifier term, per labelled response, summed into the pair's
            sign = batch["safety"]  # (2B,) +1 safe, -1 unsafe, 0 unlabelled
            labelled = sign != 0
            pair_sum = pair_sum + cfg.safety_loss_weight * (torch.nn.functional.softplus(-sign * scores)
                                                            * labelled).sum()
            counts["safety_correct"] += float(((sign * scores > 0) & labelled).sum())
            counts["safety_labelled"] += float(labelled.sum())
        total = total + pair_sum
        count_ordered_pairs(counts, stats)
        # the step's logged means are sums over its micro-batches, which the loss's stats carry
        counts["margin_sum"] += float(stats.margin_sum)
        counts["chosen_sum"] += float(stats.chosen_sum)
        counts["rejected_sum"] += float(stats.rejected_sum)
        counts["pairs"] += B
    if rankings:
        batch = _to(collate_rankings(rankings, pad_id, cfg.padding_free), device)
        scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"], batch["last_index"],
                                 batch.get("position_ids"), batch.get("row_index"))  # (N,)
        G, K = batch["beats"].shape[:2]
        rewards = torch.zeros((G, K), device=device, dtype=scores.dtype)
        rewards = rewards.index_put((batch["group_index"], batch["slot_index"]), scores)  # (G, K)
        loss, stats = batched_ranking_loss(rewards, batch["beats"])
        total = total + loss * G
        count_ordered_pairs(counts, stats)
    counts["loss_sum"] = float(total.detach())
    return total / step_items, counts


@torch.no_grad()
def evaluate(model: Any, items: list[Item], pad_id: int, batch_size: int, device: Any) -> dict[str, float]:
    """Held-out pair accuracy, BT loss, expected calibration error of sigma(r_c - r_r), and the correlation of
    score with response length (the door reward hacking walks through). Rankings are expanded to their pairs."""
    was_training = model.training
    model.eval()
    gaps: list[float] = []
    scores_all: list[float] = []
    lengths: list[float] = []
    pairs = [i for i in items if isinstance(i, TokenizedPair)]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = _to(collate_pairs(chunk, pad_id), device)
        s = sequence_scores(model, batch["input_ids"], batch["attention_mask"], batch["last_index"])
        B = len(chunk)
        gaps += (s[:B] - s[B:]).tolist()
        scores_all += s.tolist()
        lengths += batch["response_mask"].sum(-1).float().tolist()
    for r in (i for i in items if isinstance(i, TokenizedRanking)):
        batch = _to(collate_rankings([r], pad_id), device)
        s = sequence_scores(model, batch["input_ids"], batch["attention_mask"], batch["last_index"])
        beats = batch["beats"][0]
        for i, j in beats.nonzero().tolist():
            gaps.append(float(s[i] - s[j]))
        scores_all += s.tolist()
        lengths += batch["response_mask"].sum(-1).float().tolist()
    model.train(was_training)
    if not gaps:
        return {}
    gap = torch.tensor(gaps, dtype=torch.float64)
    return {
        "eval/accuracy": float((gap > 0).double().mean()),
        "eval/loss": float(torch.nn.functional.softplus(-gap).mean()),
        "eval/ece": expected_calibration_error(gap),
        "eval/margin": float(gap.mean()),
        "eval/length_correlation": pearson(scores_all, lengths),
        "eval/pairs": len(gaps),
    }


def expected_calibration_error(gaps: torch.Tensor, bins: int = 10) -> float:
    """ECE of the Bradley-Terry probability sigma(r_c - r_r): each pair predicts the side it rates higher with
    confidence max(p, 1 - p); bins of confidence in [0.5, 1] compare mean confidence with accuracy."""
    p = torch.sigmoid(gaps.double())
    confidence = torch.maximum(p, 1 - p)
    correct = (gaps > 0).double()
    edges = torch.linspace(0.5, 1.0, bins + 1, dtype=torch.float64)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence >= lo) & ((confidence < hi) if hi < 1.0 else (confidence <= hi))
        if in_bin.any():
            ece += float(in_bin.double().mean() * (correct[in_bin].mean() - confidence[in_bin].mean()).abs())
    return ece


def pearson(x: list[float], y: list[float]) -> float:
    if len(x) < 2:
        return float("nan")
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else 0.0


# -------------------------------------------------------------------------------------- normalisation
def reference_samples(cfg: RewardConfig) -> tuple[list[Any], list[str]] | None:
    """(prompts, responses) sampled from the reference policy, for normalisation; None when disabled."""
    if not cfg.normalize_prompts:
        return None
    from rlhfkit.models import load_causal_lm
    from rlhfkit.generation import sample

    prompts = read_prompts(DataPath(cfg.normalize_prompts, chat=cfg.chat))  # as the policy will be sampled
    policy_dir = cfg.normalize_policy or cfg.model
    tokenizer = load_tokenizer(policy_dir)
    policy = load_causal_lm(policy_dir, tokenizer)
    picked = [prompts[i % len(prompts)] for i in range(cfg.normalize_samples)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + NORMALISER_SEED_OFFSET)
        rollout = sample(policy, tokenizer, picked, max_new_tokens=cfg.normalize_max_new_tokens,
                         temperature=cfg.normalize_temperature)
    return picked, rollout.texts


@torch.no_grad()
def normalise(model: Any, tokenizer: Any, samples: tuple[list[Any], list[str]], max_length: int,
              device: Any, keep_zero: bool = False) -> dict[str, float]:
    """Scores on the reference samples to mean 0 and std 1, or, with keep_zero (a safety-trained model whose zero
    is the safe / unsafe boundary), to std 1 about the same zero."""
    from rlhfkit.data.collate import encode_responses

    was_training = model.training
    model.eval()
    scores: list[float] = []
    for prompt, response in zip(*samples):
        batch = _to(encode_responses(tokenizer, prompt, [response or " "], max_length), device)
        scores += sequence_scores(model, batch["input_ids"], batch["attention_mask"], batch["last_index"]).tolist()
    model.train(was_training)
    t = torch.tensor(scores, dtype=torch.float64)
    mean, std = float(t.mean()), float(t.std())
    gain, offset = apply_normalisation(model, 0.0 if keep_zero else mean, std)
    return {"raw_mean": mean, "raw_std": std, "gain": gain, "offset": offset, "samples": len(scores),
            "kept_zero": keep_zero}


# ------------------------------------------------------------------------------------------ training
def train_member(cfg: RewardConfig, samples: tuple[list[Any], list[str]] | None,
                 bootstrap_seed: int | None) -> dict[str, Any]:
    run = Run(cfg, stage="reward")
    device = run.accelerator.device
    tokenizer = load_tokenizer(cfg.model, padding_side="right")
    train, held_out, info = load_items(cfg, tokenizer)
    if bootstrap_seed is not None:
        gen = torch.Generator().manual_seed(bootstrap_seed)
        train = [train[i] for i in torch.randint(len(train), (len(train),), generator=gen).tolist()]
    log.info("reward: %d training items, %d held out, %d truncated", len(train), len(held_out), info["truncated_rows"])

    model = load_reward_model(cfg.model, tokenizer)
    if cfg.dropout_off:
        from rlhfkit.models import disable_dropout

        disable_dropout(model)
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        model = get_peft_model(model, PeftLoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules), task_type="SEQ_CLS", modules_to_save=["score"]))
    model, optimizer, scheduler, sampler, start_step = run.begin(model, len(train))
    micro = cfg.batch_size
    last: dict[str, Any] = {}
    for step in range(start_step + 1, cfg.max_steps + 1):
        indices = run.shard(sampler.next_indices(micro * cfg.grad_accum * run.world))
        step_items = float(micro * cfg.grad_accum * run.world)
        totals = {"loss_sum": 0.0, "correct": 0.0, "compared": 0.0, "margin_sum": 0.0, "chosen_sum": 0.0,
                  "rejected_sum": 0.0, "pairs": 0.0, "safety_correct": 0.0, "safety_labelled": 0.0}
        chunks = [indices[k : k + micro] for k in range(0, len(indices), micro)]
        for k, chunk in enumerate(chunks):
            with run.micro_step(model, k, len(chunks)):
                loss, counts = micro_batch_loss(model, [train[i] for i in chunk], tokenizer.pad_token_id, cfg,
                                                device, step_items)
                run.accelerator.backward(loss * run.world)
            for key, value in counts.items():
                totals[key] += value
        summed = {k: float(run.all_sum(v)) for k, v in totals.items()}
        loss_value = summed["loss_sum"] / step_items
        check_finite({"loss": loss_value}, step)
        lr = scheduler.get_last_lr()[0]
        grad_norm = run.step_optimizer(model, optimizer, scheduler, step)
        metrics: dict[str, Any] = {"loss": loss_value, "accuracy": summed["correct"] / max(1.0, summed["compared"]),
                                   "grad_norm": grad_norm, "lr": lr, "epoch": round(sampler.epochs_done, 4)}
        if summed["pairs"]:
            metrics.update({"margin": summed["margin_sum"] / summed["pairs"],
                            "rewards/chosen": summed["chosen_sum"] / summed["pairs"],
                            "rewards/rejected": summed["rejected_sum"] / summed["pairs"]})
        if summed["safety_labelled"]:
            metrics["safety_accuracy"] = summed["safety_correct"] / summed["safety_labelled"]
        if held_out and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
            metrics.update(evaluate(model, held_out, tokenizer.pad_token_id, cfg.eval_batch_size, device))
        run.log(step, metrics, headline=("loss", "accuracy", "eval/accuracy"))
        run.end_step(step, model, optimizer, scheduler, {"sampler": sampler.state_dict()})
        last = metrics

    summary: dict[str, Any] = {"stage": "reward", "steps": cfg.max_steps, **info,
                               "final_loss": last.get("loss"), "train_accuracy": last.get("accuracy")}
    summary.update({k.replace("eval/", "heldout_"): v for k, v in last.items() if k.startswith("eval/")})
    # ECE and accuracy above are on the trained scale; normalisation changes the scale, not the ordering
    if samples is not None:
        summary["normalisation"] = normalise(run.accelerator.unwrap_model(model), tokenizer, samples,
                                             cfg.max_length, device, keep_zero=cfg.safety_loss_weight > 0)
    net = run.accelerator.unwrap_model(model)
    net = net.get_base_model() if hasattr(net, "get_base_model") else net
    if cfg.criterion:  # saved in config.json: which criterion this model scores
        net.config.rlhfkit_criterion = cfg.criterion
    if cfg.safety_loss_weight > 0:  # its zero separates safe from unsafe (cost = -score > 0: unsafe)
        net.config.rlhfkit_safety_zero = True
    run.finish(model, tokenizer, summary)
    return summary


def main(cfg: RewardConfig) -> dict[str, Any]:
    cfg.validate()
    samples = reference_samples(cfg)
    if cfg.ensemble_size == 1:
        return train_member(cfg, samples, None)
    root = Path(cfg.output_dir)
    if (root / "config.yaml").exists() and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{root} already holds a reward run; pass --resume to continue it, --overwrite to "
                        "replace it, or choose another --output-dir.")
    if cfg.overwrite and not cfg.resume:
        for old in root.glob("member-*"):
            shutil.rmtree(old)
        (root / ENSEMBLE_FILE).unlink(missing_ok=True)
    if cfg.resume and (root / "config.yaml").exists():
        saved = load_yaml(root / "config.yaml")
        now = dataclasses.asdict(cfg)
        changed = [k for k in ("data", "model", "ensemble_size", "bootstrap", "seed", "learning_rate")
                   if saved.get(k) != now.get(k)]
        if changed:
            raise ConfigError(f"--resume: {', '.join(changed)} differ from the run in {root}; resume with the "
                              "same settings.")
    save_config(cfg, root / "config.yaml")
    members: list[dict[str, Any]] = []
    names = []
    for i in range(cfg.ensemble_size):
        name = f"member-{i}"
        names.append(name)
        member_dir = root / name
        member_cfg = replace(cfg, output_dir=str(member_dir), seed=cfg.seed + i, ensemble_size=1)
        if cfg.resume and (member_dir / "summary.json").exists():
            members.append(json.loads((member_dir / "summary.json").read_text()))
            continue
        if cfg.resume and not (member_dir / "config.yaml").exists():
            member_cfg = replace(member_cfg, resume=False)
        boot = cfg.seed * 1000 + i if cfg.bootstrap else None
        members.append(train_member(member_cfg, samples, boot))
    (root / ENSEMBLE_FILE).write_text(json.dumps({"members": names}, indent=2))
    summary = {"stage": "reward", "ensemble_size": cfg.ensemble_size, "members": members}
    for key in ("heldout_accuracy", "heldout_ece", "heldout_length_correlation", "heldout_loss"):
        values = [m[key] for m in members if isinstance(m.get(key), (int, float)) and not math.isnan(m[key])]
        if values:
            summary[key] = sum(values) / len(values)
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
