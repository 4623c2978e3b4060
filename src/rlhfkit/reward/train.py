"""Reward-model training (`rlhfkit reward`): Bradley-Terry on pairs (with Llama-2 margins when labelled, a soft
target when a row gives its label's confidence), InstructGPT K-way ranking loss on rankings, optional reward
centring; ensembles of bootstrap members; normalisation on reference-policy samples; held-out accuracy,
calibration and length bias. One criterion of a rubric export per model (--criterion), or one model with a head
per criterion on a shared trunk (--criteria), and a safety classifier term for harmlessness scores that act as
Safe RLHF's cost model (--safety-loss-weight). --objective regression instead predicts attribute scores of single
responses (HelpSteer2), a head per attribute.

The loop reads top to bottom like policy/sft.py: global batch -> this process's share -> micro-batches ->
per-item losses summed and divided by the items of the whole optimizer step -> one step -> log -> checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from rlhfkit.config import PreferenceDataConfig, TrainConfig, load_yaml, save_config
from rlhfkit.data.collate import collate_pairs, collate_rankings
from rlhfkit.data.preference import parse_preference, read_preferences, untied_rows
from rlhfkit.data.preference_tokens import PreferenceReport, TokenizedPair, TokenizedRanking, tokenize_preferences
from rlhfkit.data.readers import DataPath, read_prompts, split_eval
from rlhfkit.data.scored import HELPSTEER2_ATTRIBUTES, TokenizedScored, collate_scored, read_scored, tokenize_scored
from rlhfkit.errors import ConfigError, DataError, UserError
from rlhfkit.losses import RewardStats, batched_ranking_loss, bradley_terry_loss, centering_penalty
from rlhfkit.losses.reward import attribute_regression_loss
from rlhfkit.models import attention_token_weight, load_tokenizer
from rlhfkit.reward.model import (
    CRITERIA_KEY, ENSEMBLE_FILE, HEAD_SEPARATOR, LIKELIHOOD_KEY, OFFSET_KEY, OFFSETS_KEY, apply_normalisation,
    check_likelihood_term, head_and_likelihood, head_offsets, head_scores, likelihood_coef, load_reward_model,
    name_heads, scoring_batches, sequence_scores,
)
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
    share_prompt: bool = True
    """With padding_free: the responses of one pair or ranking share a single copy of their prompt in the packed
    row (each response attends to it and to itself), so the prompt goes through the model once per item instead
    of once per response. The same scores and gradients; on the demo's labels 18% fewer tokens per step. Rows grow
    as wide as a whole item, and packed rows attend densely: a batch whose wider rows would cost more attention
    than the prompt copies save (long responses to short prompts, on a small model) is laid out without sharing."""
    use_margin: bool = True
    """Use each pair's margin (or its strength level mapped to one) in -log sigma(r_c - r_r - m) (Llama 2)."""
    use_confidence: bool = True
    """Rows with a confidence column (the probability that chosen is truly better, e.g. from annotator
    reliability) train as soft Bradley-Terry targets: -c log sigma(r_c - r_r - m) - (1 - c) log sigma(r_r - r_c).
    Off trains every row as certain. Held-out metrics always treat the labels as certain."""
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
    criteria: list[str] = field(default_factory=list)
    """One model with a head per criterion on a shared trunk, instead of --criterion: train on the rows of a rubric
    export judged on these criteria (its `criterion` column), each row's loss on its own criterion's head, e.g.
    helpfulness,harmlessness,honesty. A reward then names its head: --rewards helpfulness=DIR#helpfulness."""
    other_criteria: Literal["error", "drop"] = "error"
    """--criteria: rows judged on a criterion the list does not name stop the run, naming them (error), or are left
    out, counted and logged (drop)."""
    safety_criterion: str = "harmlessness"
    """--criteria with --safety-loss-weight: the head that learns the safety classifier term, on every response
    labelled safe or unsafe whatever its row's criterion, and keeps its zero through normalisation."""
    objective: Literal["preference", "regression"] = "preference"
    """preference: Bradley-Terry / ranking loss on pairs and rankings. regression: predict the --attributes scores
    of single responses (HelpSteer2 rows: prompt, response and a number per attribute, or the numbers under
    "scores") with a head per attribute, by mean squared error; no normalisation (the heads keep the attributes'
    own scale)."""
    attributes: list[str] = field(default_factory=lambda: list(HELPSTEER2_ATTRIBUTES))
    """--objective regression: the score columns to predict, one head each (default HelpSteer2's five)."""
    likelihood_term: bool = False
    """After training, add the response's log-likelihood under the model's own trunk (read through its tied input
    embeddings) to the score, with a weight fit, beside a gain on the head, by Bradley-Terry on up to
    likelihood_fit_pairs training pairs. The score is then w.h + c log p(response | prompt) + offset. A small model's
    last-token head can miss what its language model knows -- whether an answer is right -- which the likelihood
    carries (the log-likelihood as a reward: Rafailov et al. 2023). Needs one head and tied embeddings; a fit that
    gives the likelihood no positive weight leaves the term out (logged, and in summary.json)."""
    likelihood_fit_pairs: int = 4096
    """Training pairs (rankings count each ordered pair they hold) the likelihood term's weights are fit on."""

    def heads(self) -> list[str]:
        """The named heads this run trains: --criteria, --attributes of a regression, else [] (one head)."""
        return list(self.attributes) if self.objective == "regression" else list(self.criteria)

    def validate(self) -> None:
        super().validate()
        if self.lora.load_in_4bit:
            raise ConfigError("lora.load_in_4bit (QLoRA) is not supported by the reward stage yet; train the "
                              "reward model with plain LoRA (drop lora.load_in_4bit).")
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
        if self.objective == "regression":
            given = [flag for flag, on in (
                ("--criterion", bool(self.criterion)), ("--criteria", bool(self.criteria)),
                ("--safety-loss-weight", self.safety_loss_weight > 0),
                ("--normalize-prompts", bool(self.normalize_prompts)),
                ("--center-eta", self.center_eta > 0), ("--margin-from-scores", self.margin_from_scores),
                ("--preference-ties drop", self.preference_ties == "drop")) if on]
            if given:
                raise ConfigError(f"--objective regression predicts attribute scores of single responses on "
                                  f"their own scale (no normalisation), so {', '.join(given)} (preference options) "
                                  "do not apply; drop them.")
            check_head_names(self.attributes, "--attributes")
        elif list(self.attributes) != list(HELPSTEER2_ATTRIBUTES):
            raise ConfigError("--attributes names the scores --objective regression predicts; add --objective "
                              "regression, or drop --attributes (for preference heads use --criteria).")
        if self.criteria:
            if self.criterion:
                raise ConfigError(f"--criterion {self.criterion} trains one head and --criteria one per criterion; "
                                  "pass one of them.")
            check_head_names(self.criteria, "--criteria")
            if len(self.criteria) < 2:
                raise ConfigError(f"--criteria lists one criterion ({self.criteria[0]}); a model with one head is "
                                  f"--criterion {self.criteria[0]}.")
            if self.safety_loss_weight > 0 and self.safety_criterion not in self.criteria:
                raise ConfigError(f"--safety-loss-weight trains the head of --safety-criterion "
                                  f"{self.safety_criterion!r}, which is not among --criteria "
                                  f"({', '.join(self.criteria)}); name it with --safety-criterion NAME.")
        if self.likelihood_term:
            given = [flag for flag, on in (("--criteria", bool(self.criteria)),
                                           ("--objective regression", self.objective == "regression"),
                                           ("--safety-loss-weight", self.safety_loss_weight > 0)) if on]
            if given:
                raise ConfigError(f"--likelihood-term adds a term to a one-head preference model's score; it does "
                                  f"not combine with {', '.join(given)}: drop one or the other.")
            if self.likelihood_fit_pairs < 2:
                raise ConfigError(f"likelihood_fit_pairs must be at least 2, got {self.likelihood_fit_pairs}.")
        elif self.other_criteria != "error":
            raise ConfigError("--other-criteria says what to do with rows of criteria --criteria does not list; it "
                              "applies only with --criteria.")


def check_head_names(names: Sequence[str], flag: str) -> None:
    """Head names become config entries, metric names and the suffix of DIR#name: non-empty, distinct, no '#'."""
    if not names:
        raise ConfigError(f"{flag} is empty; name at least one head.")
    bad = [n for n in names if not n.strip() or HEAD_SEPARATOR in n or n != n.strip()]
    if bad:
        raise ConfigError(f"{flag}: {bad[0]!r} is not a usable head name (empty, surrounded by spaces, or holding "
                          f"'{HEAD_SEPARATOR}'); rename it.")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ConfigError(f"{flag} lists {', '.join(repeated)} more than once; list each head once.")


# --------------------------------------------------------------------------------------------- data
@dataclass
class CriterionPair(TokenizedPair):
    """A pair judged on one criterion of --criteria: its loss falls on that criterion's head."""

    head: int = 0


@dataclass
class CriterionRanking(TokenizedRanking):
    """A ranking judged on one criterion of --criteria: its loss falls on that criterion's head."""

    head: int = 0


def on_head(item: Item, head: int) -> Item:
    """The item, marked with the index of the head its loss is on."""
    cls = CriterionPair if isinstance(item, TokenizedPair) else CriterionRanking
    return cls(**{f.name: getattr(item, f.name) for f in dataclasses.fields(item)}, head=head)


def criteria_rows(rows: list[tuple[int, dict[str, Any]]], path: str, criteria: Sequence[str],
                  other: Literal["error", "drop"], require_all: bool = True) -> list[tuple[int, dict[str, Any], int]]:
    """(row number, row, head index) of the rows judged on one of `criteria` (a rubric export's `criterion`
    column). Rows of criteria not listed stop the run, or with other="drop" are left out and logged; a row without
    a criterion among rows with one, and (with require_all) a listed criterion no row is judged on, are refused."""
    for n, row in rows:
        if row.get("criterion") is not None and not isinstance(row["criterion"], str):
            raise DataError(path, n, "criterion", f"must be a string (the criterion the pair is judged on), got "
                            f"{row['criterion']!r}")
    named = sorted({row["criterion"] for _, row in rows if row.get("criterion") is not None})
    if not named:
        raise UserError(f"{path}: --criteria trains a head per criterion from a rubric export's criterion column, "
                        "but no row has one; export the rubric project's judgments, or train one head without "
                        "--criteria.")
    unnamed = [n for n, row in rows if row.get("criterion") is None]
    if unnamed:
        raise DataError(path, unnamed[0], "criterion", f"missing, while other rows name theirs; {len(unnamed)} rows "
                        "have none: give every row its criterion")
    missing = [c for c in criteria if c not in named]
    if missing and require_all:
        raise UserError(f"{path}: no row is judged on {', '.join(missing)} (the file has {', '.join(named)}); drop "
                        "it from --criteria or add its judgments.")
    unlisted = [c for c in named if c not in criteria]
    if unlisted:
        count = sum(row["criterion"] in unlisted for _, row in rows)
        if other == "error":
            raise UserError(f"{path}: {count} rows are judged on {', '.join(unlisted)}, which --criteria does not "
                            "list; add them to --criteria, or pass --other-criteria drop to leave those rows out.")
        log.warning("%s: left out %d rows judged on %s, which --criteria does not list (--other-criteria drop)",
                    path, count, ", ".join(unlisted))
    index = {c: k for k, c in enumerate(criteria)}
    return [(n, row, index[row["criterion"]]) for n, row in rows if row["criterion"] in index]


def read_items(cfg: RewardConfig, tokenizer: Any, source: DataPath, held_out: bool = False
               ) -> tuple[list[Item], PreferenceReport]:
    """The preference file's items, tokenised; with --criteria each marked with its criterion's head."""
    if not cfg.criteria:
        records = read_preferences(source, **cfg.reader_options(tokenizer))
        return tokenize_preferences(tokenizer, records, cfg.max_length, cfg.overlong, cfg.margin_scale)
    chat = cfg.reader_options(tokenizer)["chat"]
    rows = criteria_rows(untied_rows(source, None, cfg.preference_ties), str(source), cfg.criteria,
                         cfg.other_criteria, require_all=not held_out)
    records = [parse_preference(row, str(source), n, chat=chat, margin_from_scores=cfg.margin_from_scores)
               for n, row, _ in rows]
    items, report = tokenize_preferences(tokenizer, records, cfg.max_length, cfg.overlong, cfg.margin_scale)
    return [on_head(item, head) for item, (_, _, head) in zip(items, rows)], report


def load_items(cfg: RewardConfig, tokenizer: Any) -> tuple[list[Item], list[Item], dict[str, Any]]:
    items, report = read_items(cfg, tokenizer, cfg.data_source())
    if not cfg.use_margin:
        items = [replace(i, margin=None) if isinstance(i, TokenizedPair) else i for i in items]
    if cfg.eval_data:
        held_out, eval_report = read_items(cfg, tokenizer, cfg.data_source(cfg.eval_data, True), held_out=True)
        train = items
        truncated = report.truncated + eval_report.truncated
    else:
        train, held_out = split_eval(items, cfg.eval_fraction, cfg.seed)
        truncated = report.truncated
    info = {"pairs": report.pairs, "rankings": report.rankings, "truncated_rows": truncated,
            "train_items": len(train), "held_out_items": len(held_out)}
    soft = sum(isinstance(i, TokenizedPair) and i.confidence is not None for i in train)
    if soft and cfg.use_confidence:
        info["confidence_pairs"] = int(soft)
    if cfg.criterion:
        info["criterion"] = cfg.criterion
    if cfg.criteria:
        info["criteria"] = list(cfg.criteria)
        info["train_items_per_criterion"] = {c: sum(i.head == k for i in train) for k, c in enumerate(cfg.criteria)}
    if cfg.safety_loss_weight > 0:
        labelled = sum(isinstance(i, TokenizedPair) and (i.chosen_safe is not None) + (i.rejected_safe is not None)
                       for i in train)
        if not labelled:
            raise UserError(f"--safety-loss-weight {cfg.safety_loss_weight:g} needs responses labelled safe or "
                            f"unsafe, but no training pair in {cfg.data} has chosen_safe / rejected_safe; add the "
                            "labels (e.g. `rlhfkit data convert pku-saferlhf`) or set --safety-loss-weight 0.")
        info["safety_labelled_responses"] = int(labelled)
    return train, held_out, info


def load_scored_items(cfg: RewardConfig, tokenizer: Any) -> tuple[list[TokenizedScored], list[TokenizedScored],
                                                                  dict[str, Any]]:
    """--objective regression: the scored responses of --data (and --eval-data), tokenised, split as pairs are."""
    items = tokenize_scored(tokenizer, read_scored(cfg.data_source(), cfg.attributes), cfg.max_length, cfg.overlong)
    if cfg.eval_data:
        held_out = tokenize_scored(tokenizer, read_scored(cfg.data_source(cfg.eval_data, True), cfg.attributes),
                                   cfg.max_length, cfg.overlong)
        train = items
    else:
        train, held_out = split_eval(items, cfg.eval_fraction, cfg.seed)
    truncated = sum(i.truncated for i in train + held_out)
    if truncated:
        log.warning("truncated the responses of %d scored rows to max_length %d (rows %s)", truncated,
                    cfg.max_length, [i.row for i in train + held_out if i.truncated][:10])
    return train, held_out, {"responses": len(train) + len(held_out), "attributes": list(cfg.attributes),
                             "truncated_rows": truncated, "train_items": len(train), "held_out_items": len(held_out)}


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


def preference_count_keys(cfg: RewardConfig) -> list[str]:
    """The counts a preference micro-batch returns (every process sums the same keys, in this order)."""
    keys = ["loss_sum", "correct", "compared", "margin_sum", "chosen_sum", "rejected_sum", "pairs", "safety_correct",
            "safety_labelled"]
    return keys + [f"{k}_{c}" for c in cfg.criteria for k in ("correct", "compared")]


def own_head_scores(model: Any, batch: dict[str, torch.Tensor], heads: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each sequence's score on its own head, and every head's scores, from one forward pass. heads: (N,) the
    head of each sequence, None for a one-head model (then the second result is None). Returns (N,), (N, K)."""
    args = (batch["input_ids"], batch["attention_mask"], batch["last_index"], batch.get("position_ids"),
            batch.get("row_index"))
    # a padded batch's response tokens, for a model with a likelihood term (only evaluation scores one: it is
    # fit after training, on padded batches)
    response = batch.get("response_mask") if batch.get("row_index") is None else None
    if heads is None:
        return sequence_scores(model, *args, response_mask=response), None
    every = head_scores(model, *args, response_mask=response)  # (N, K)
    # a row's loss reaches only its criterion's head: the other heads' scores of it get no gradient
    return every.gather(1, heads[:, None]).squeeze(1), every  # (N,)


def count_per_criterion(counts: dict[str, float], criteria: Sequence[str], heads: torch.Tensor,
                        correct: torch.Tensor, compared: torch.Tensor) -> None:
    """Add ordered pairs ordered right / compared per criterion. heads, correct, compared: (G,) per pair or
    ranking."""
    for k, c in enumerate(criteria):
        on = heads == k
        counts[f"correct_{c}"] += float(correct[on].sum())
        counts[f"compared_{c}"] += float(compared[on].sum())


def micro_batch_loss(model: Any, items: list[Item], pad_id: int, cfg: RewardConfig, device: Any,
                     step_items: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of per-item losses over this micro-batch divided by the items of the whole step, and raw counts.
    With --criteria each item's loss is on its criterion's head (`CriterionPair.head`). Pairs with a confidence
    train as soft labels (with use_confidence); the counts are of the labelled order, as held-out accuracy is."""
    pairs = [i for i in items if isinstance(i, TokenizedPair)]
    rankings = [i for i in items if isinstance(i, TokenizedRanking)]
    total = torch.zeros((), device=device)
    counts = dict.fromkeys(preference_count_keys(cfg), 0.0)
    weight = attention_token_weight(model)  # share a prompt only where that costs less (collate.shared_prefix_pays)
    if pairs:
        batch = _to(collate_pairs(pairs, pad_id, cfg.padding_free, cfg.share_prompt, weight), device)
        B = len(pairs)
        heads = torch.tensor([p.head for p in pairs] * 2, device=device) if cfg.criteria else None  # (2B,)
        scores, every = own_head_scores(model, batch, heads)  # (2B,), (2B, K) or None
        chosen, rejected = scores[:B], scores[B:]
        margin = batch["margin"] if cfg.use_margin else None
        soft = cfg.use_confidence and any(p.confidence is not None for p in pairs)
        loss, stats = bradley_terry_loss(chosen, rejected, margin, batch["confidence"] if soft else None)
        pair_sum = loss * B
        if cfg.center_eta > 0:
            pair_sum = pair_sum + centering_penalty(chosen, rejected, cfg.center_eta) * B
        if cfg.safety_loss_weight > 0:  # Safe RLHF's classifier term, per labelled response, summed into the pair's
            sign = batch["safety"]  # (2B,) +1 safe, -1 unsafe, 0 unlabelled
            labelled = sign != 0
            # with --criteria the safety head learns it from every labelled response, whatever its row's criterion
            safety = scores if every is None else every[:, cfg.criteria.index(cfg.safety_criterion)]  # (2B,)
            pair_sum = pair_sum + cfg.safety_loss_weight * (torch.nn.functional.softplus(-sign * safety)
                                                            * labelled).sum()
            counts["safety_correct"] += float(((sign * safety > 0) & labelled).sum())
            counts["safety_labelled"] += float(labelled.sum())
        total = total + pair_sum
        count_ordered_pairs(counts, stats)
        # the step's logged means are sums over its micro-batches, which the loss's stats carry
        counts["margin_sum"] += float(stats.margin_sum)
        counts["chosen_sum"] += float(stats.chosen_sum)
        counts["rejected_sum"] += float(stats.rejected_sum)
        counts["pairs"] += B
        if heads is not None:
            count_per_criterion(counts, cfg.criteria, heads[:B], (chosen > rejected).detach(),
                                torch.ones(B, device=device))
    if rankings:
        batch = _to(collate_rankings(rankings, pad_id, cfg.padding_free, cfg.share_prompt, weight), device)
        heads = (torch.tensor([r.head for r in rankings for _ in r.input_ids], device=device)  # (N,)
                 if cfg.criteria else None)
        scores, _ = own_head_scores(model, batch, heads)  # (N,)
        G, K = batch["beats"].shape[:2]
        rewards = torch.zeros((G, K), device=device, dtype=scores.dtype)
        rewards = rewards.index_put((batch["group_index"], batch["slot_index"]), scores)  # (G, K)
        loss, stats = batched_ranking_loss(rewards, batch["beats"])
        total = total + loss * G
        count_ordered_pairs(counts, stats)
        if heads is not None:
            beats = batch["beats"]  # (G, K, K)
            right = beats & (rewards[:, :, None] > rewards[:, None, :]).detach()  # (G, K, K)
            count_per_criterion(counts, cfg.criteria, torch.tensor([r.head for r in rankings], device=device),
                                right.sum((1, 2)), beats.sum((1, 2)))
    counts["loss_sum"] = float(total.detach())
    return total / step_items, counts


def preference_step_metrics(cfg: RewardConfig, summed: dict[str, float]) -> dict[str, float]:
    """A preference step's logged means, from the counts summed over its micro-batches and processes."""
    metrics = {"accuracy": summed["correct"] / max(1.0, summed["compared"])}
    if summed["pairs"]:
        metrics.update({"margin": summed["margin_sum"] / summed["pairs"],
                        "rewards/chosen": summed["chosen_sum"] / summed["pairs"],
                        "rewards/rejected": summed["rejected_sum"] / summed["pairs"]})
    if summed["safety_labelled"]:
        metrics["safety_accuracy"] = summed["safety_correct"] / summed["safety_labelled"]
    for c in cfg.criteria:
        if summed[f"compared_{c}"]:
            metrics[f"accuracy_{c}"] = summed[f"correct_{c}"] / summed[f"compared_{c}"]
    return metrics


def regression_count_keys(cfg: RewardConfig) -> list[str]:
    return ["loss_sum", "responses"] + [f"sse_{a}" for a in cfg.attributes]


def regression_batch_loss(model: Any, items: list[TokenizedScored], pad_id: int, cfg: RewardConfig, device: Any,
                          step_items: float) -> tuple[torch.Tensor, dict[str, float]]:
    """--objective regression: the per-response squared errors of this micro-batch (each averaged over the
    attributes), summed and divided by the responses of the whole step, and raw counts."""
    batch = _to(collate_scored(items, pad_id, cfg.padding_free), device)
    predictions = head_scores(model, batch["input_ids"], batch["attention_mask"], batch["last_index"],
                              batch.get("position_ids"), batch.get("row_index"))  # (B, K), offsets added
    loss, stats = attribute_regression_loss(predictions, batch["targets"])
    total = loss * len(items)
    counts = {"loss_sum": float(total.detach()), "responses": float(stats.num_responses)}
    counts.update({f"sse_{a}": float(stats.squared_error_sum[k]) for k, a in enumerate(cfg.attributes)})
    return total / step_items, counts


def regression_step_metrics(cfg: RewardConfig, summed: dict[str, float]) -> dict[str, float]:
    n = max(1.0, summed["responses"])
    mse = {a: summed[f"sse_{a}"] / n for a in cfg.attributes}
    return {"rmse": math.sqrt(sum(mse.values()) / len(mse)), **{f"rmse_{a}": math.sqrt(v) for a, v in mse.items()}}


@torch.no_grad()
def evaluate(model: Any, items: list[Item], pad_id: int, batch_size: int, device: Any,
             criteria: Sequence[str] = ()) -> dict[str, float]:
    """Held-out pair accuracy, BT loss, expected calibration error of sigma(r_c - r_r), and the correlation of
    score with response length (the door reward hacking walks through). Rankings are expanded to their pairs.
    With criteria (items on heads), each pair is scored on its criterion's head, and accuracy and length
    correlation are reported per criterion too (eval/accuracy_<criterion>); the length correlation of scores of
    different heads pooled together means nothing, so it is reported per criterion only."""
    was_training = model.training
    model.eval()
    gaps: list[float] = []
    gap_heads: list[int] = []
    scores_all: list[float] = []
    score_heads: list[int] = []
    lengths: list[float] = []
    pairs = [i for i in items if isinstance(i, TokenizedPair)]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = _to(collate_pairs(chunk, pad_id), device)
        heads = [p.head for p in chunk] if criteria else [0] * len(chunk)
        s, _ = own_head_scores(model, batch, torch.tensor(heads * 2, device=device) if criteria else None)
        B = len(chunk)
        gaps += (s[:B] - s[B:]).tolist()
        gap_heads += heads
        scores_all += s.tolist()
        score_heads += heads * 2
        lengths += batch["response_mask"].sum(-1).float().tolist()
    for r in (i for i in items if isinstance(i, TokenizedRanking)):
        batch = _to(collate_rankings([r], pad_id), device)
        head = r.head if criteria else 0
        K = len(r.input_ids)
        s, _ = own_head_scores(model, batch, torch.full((K,), head, device=device) if criteria else None)
        beats = batch["beats"][0]
        for i, j in beats.nonzero().tolist():
            gaps.append(float(s[i] - s[j]))
            gap_heads.append(head)
        scores_all += s.tolist()
        score_heads += [head] * K
        lengths += batch["response_mask"].sum(-1).float().tolist()
    model.train(was_training)
    if not gaps:
        return {}
    gap = torch.tensor(gaps, dtype=torch.float64)
    out = {
        "eval/accuracy": float((gap > 0).double().mean()),
        "eval/loss": float(torch.nn.functional.softplus(-gap).mean()),
        "eval/ece": expected_calibration_error(gap),
        "eval/margin": float(gap.mean()),
        "eval/length_correlation": pearson(scores_all, lengths),
        "eval/pairs": len(gaps),
    }
    if not criteria:
        return out
    del out["eval/length_correlation"]
    on_gap, on_score = torch.tensor(gap_heads), torch.tensor(score_heads)
    for k, c in enumerate(criteria):
        if not bool((on_gap == k).any()):
            continue
        out[f"eval/accuracy_{c}"] = float((gap[on_gap == k] > 0).double().mean())
        out[f"eval/pairs_{c}"] = int((on_gap == k).sum())
        picked = (on_score == k).nonzero().flatten().tolist()
        out[f"eval/length_correlation_{c}"] = pearson([scores_all[i] for i in picked], [lengths[i] for i in picked])
    return out


@torch.no_grad()
def evaluate_regression(model: Any, items: list[TokenizedScored], pad_id: int, batch_size: int, device: Any,
                        attributes: Sequence[str]) -> dict[str, float]:
    """Held-out RMSE of each attribute's prediction on the attribute's own scale, its Pearson correlation with the
    labels, and the loss (mean over attributes of the MSE)."""
    was_training = model.training
    model.eval()
    predictions, targets = [], []
    for start in range(0, len(items), batch_size):
        batch = _to(collate_scored(items[start : start + batch_size], pad_id), device)
        predictions.append(head_scores(model, batch["input_ids"], batch["attention_mask"],
                                       batch["last_index"]).double().cpu())  # (b, K)
        targets.append(batch["targets"].double().cpu())  # (b, K)
    model.train(was_training)
    if not predictions:
        return {}
    p, t = torch.cat(predictions), torch.cat(targets)  # (N, K)
    mse = (p - t).pow(2).mean(0)  # (K,)
    out: dict[str, float] = {"eval/loss": float(mse.mean()), "eval/rmse": float(mse.mean().sqrt()),
                             "eval/responses": len(p)}
    for k, a in enumerate(attributes):
        out[f"eval/rmse_{a}"] = float(mse[k].sqrt())
        if len(p) > 1:
            out[f"eval/pearson_{a}"] = pearson(p[:, k].tolist(), t[:, k].tolist())
    return out


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


# ------------------------------------------------------------------------------------- likelihood term
@torch.no_grad()
def likelihood_features(model: Any, items: list[Item], pad_id: int, batch_size: int, device: Any
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per ordered pair of the items (a pair's chosen over rejected; every pair a ranking orders), the differences
    of the head's logit and of the response log-likelihood, better minus worse. Returns (P,), (P,) float64."""
    was_training = model.training
    model.eval()
    d_head: list[torch.Tensor] = []
    d_like: list[torch.Tensor] = []
    pairs = [i for i in items if isinstance(i, TokenizedPair)]
    for start in range(0, len(pairs), batch_size):
        batch = _to(collate_pairs(pairs[start : start + batch_size], pad_id), device)
        logit, like = head_and_likelihood(model, batch["input_ids"], batch["attention_mask"], batch["last_index"],
                                          batch["response_mask"])  # (2B,)
        B = logit.shape[0] // 2
        d_head.append((logit[:B] - logit[B:]).double().cpu())
        d_like.append((like[:B] - like[B:]).double().cpu())
    rankings = [i for i in items if isinstance(i, TokenizedRanking)]
    for start in range(0, len(rankings), batch_size):
        batch = _to(collate_rankings(rankings[start : start + batch_size], pad_id), device)
        logit, like = head_and_likelihood(model, batch["input_ids"], batch["attention_mask"], batch["last_index"],
                                          batch["response_mask"])  # (N,)
        G, K = batch["beats"].shape[:2]
        at = (batch["group_index"], batch["slot_index"])
        for feature, out in ((logit, d_head), (like, d_like)):
            grid = torch.zeros((G, K), dtype=torch.float64, device=feature.device).index_put(at, feature.double())
            out.append((grid[:, :, None] - grid[:, None, :])[batch["beats"]].cpu())  # (ordered pairs,)
    model.train(was_training)
    return torch.cat(d_head), torch.cat(d_like)


def fit_likelihood_weights(d_head: torch.Tensor, d_like: torch.Tensor) -> tuple[float, float]:
    """(gain on the head, weight of the likelihood) maximising the Bradley-Terry likelihood of the ordered pairs
    sigma(gain * d_head + weight * d_like), by L-BFGS from (1, 0) (the model as trained). float64."""
    x = torch.stack([d_head, d_like], 1).double()  # (P, 2)
    scale = x.std(0).clamp_min(1e-12)  # fit on standardised features, report on the raw ones
    w = torch.tensor([float(scale[0]), 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")
    z = x / scale

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(z @ w)).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    gain, weight = (w.detach() / scale).tolist()
    return float(gain), float(weight)


def fit_likelihood_term(model: Any, items: list[Item], pad_id: int, cfg: RewardConfig, device: Any
                        ) -> dict[str, Any]:
    """Fit the likelihood term of a trained one-head model (`RewardConfig.likelihood_term`) on up to
    cfg.likelihood_fit_pairs of its training pairs, drawn by seed: the head's gain is folded into the score head
    (and its offset), the likelihood's weight stored as `rlhfkit_likelihood_coef`. A fit that gives either feature
    no positive weight leaves the model as trained. Returns what was fit, for summary.json."""
    from rlhfkit.reward.model import _unwrap

    net = _unwrap(model)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed + 17)).tolist()
    picked: list[Item] = []
    pairs = 0
    for i in order:
        if pairs >= cfg.likelihood_fit_pairs:
            break
        item = items[i]
        picked.append(item)
        pairs += 1 if isinstance(item, TokenizedPair) else _ordered_pairs(item)
    d_head, d_like = likelihood_features(model, picked, pad_id, cfg.eval_batch_size, device)
    gain, weight = fit_likelihood_weights(d_head, d_like)
    before = float((d_head > 0).double().mean())
    after = float((gain * d_head + weight * d_like > 0).double().mean())
    out = {"pairs": int(d_head.numel()), "train_accuracy_head": before, "train_accuracy_with_term": after,
           "head_gain": gain, "coef": weight, "used": gain > 0 and weight > 0}
    if not out["used"]:
        log.warning("reward: the likelihood term's fit gave weights (head %.3g, likelihood %.3g); one is not "
                    "positive, so the model scores with its head alone", gain, weight)
        return out
    with torch.no_grad():
        net.score.weight.mul_(gain)
    if getattr(net.config, OFFSETS_KEY, None) is not None:
        setattr(net.config, OFFSETS_KEY, [gain * o for o in head_offsets(net.config)])
    else:
        setattr(net.config, OFFSET_KEY, gain * head_offsets(net.config)[0])
    setattr(net.config, LIKELIHOOD_KEY, weight)
    log.info("reward: likelihood term fit on %d training pairs: head gain %.3f, likelihood weight %.4f; training "
             "pair accuracy %.3f -> %.3f", out["pairs"], gain, weight, before, after)
    return out


def _ordered_pairs(ranking: TokenizedRanking) -> int:
    """The ordered pairs a ranking holds: responses in different tiers."""
    sizes = [len(tier) for tier in ranking.ranking]
    total = sum(sizes)
    return (total * total - sum(n * n for n in sizes)) // 2


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
              device: Any, keep_zero: bool = False, criteria: Sequence[str] = (), safety_criterion: str = ""
              ) -> dict[str, Any]:
    """Scores on the reference samples to mean 0 and std 1, or, with keep_zero (a safety-trained model whose zero
    is the safe / unsafe boundary), to std 1 about the same zero. With criteria (a head each), every head is
    normalised on the same samples, each by its own statistics (its gain folded into its row of the score weight,
    its offset in its entry of the offsets); with keep_zero only the safety_criterion head keeps its zero. Returns
    the statistics, per criterion with criteria."""
    was_training = model.training
    model.eval()
    prompts, responses = samples
    t = torch.zeros((len(prompts), max(1, len(criteria))), dtype=torch.float64)  # (N, K)
    for rows, ids, mask, last, response in scoring_batches(tokenizer, device, prompts,
                                                           [r or " " for r in responses], max_length):
        scores = (head_scores(model, ids, mask, last, response_mask=response) if criteria
                  else sequence_scores(model, ids, mask, last, response_mask=response)[:, None])
        scores = scores.double().cpu()  # (Nb, K)
        for j, idx in enumerate(rows):
            t[idx] = scores[j]
    model.train(was_training)
    out: dict[str, Any] = {}
    for k, name in enumerate(criteria or [""]):
        kept = keep_zero and (not criteria or name == safety_criterion)
        mean, std = float(t[:, k].mean()), float(t[:, k].std())
        gain, offset = apply_normalisation(model, 0.0 if kept else mean, std, head=k if criteria else None)
        out[name] = {"raw_mean": mean, "raw_std": std, "gain": gain, "offset": offset, "samples": len(t),
                     "kept_zero": kept}
    return out if criteria else out[""]


# ------------------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class Objective:
    """What --objective trains: how its data is read, its micro-batch loss (same signature for every objective),
    its held-out evaluation, and the step metrics made from the counts its loss returns."""

    load: Callable[[RewardConfig, Any], tuple[list[Any], list[Any], dict[str, Any]]]
    loss: Callable[..., tuple[torch.Tensor, dict[str, float]]]
    evaluate: Callable[..., dict[str, float]]
    count_keys: Callable[[RewardConfig], list[str]]
    step_metrics: Callable[[RewardConfig, dict[str, float]], dict[str, float]]
    headline: tuple[str, str, str]
    """The metrics the progress bar shows: loss, the training quality measure, its held-out value."""


OBJECTIVES = {
    "preference": Objective(load_items, micro_batch_loss, evaluate, preference_count_keys, preference_step_metrics,
                            ("loss", "accuracy", "eval/accuracy")),
    "regression": Objective(load_scored_items, regression_batch_loss, evaluate_regression, regression_count_keys,
                            regression_step_metrics, ("loss", "rmse", "eval/rmse")),
}


def prepare_heads(model: Any, cfg: RewardConfig, train: list[Any]) -> None:
    """Name the heads of a run with --criteria or --attributes in the model's config. A regression head not yet
    trained for this objective starts from its attribute's mean over the training data as its offset: the score
    head has no bias, so the constant predictor is where a fresh head should start, not 0 on a 0-4 scale."""
    names = cfg.heads()
    have = getattr(model.config, CRITERIA_KEY, None)
    if have is not None and list(have) != names:
        raise UserError(f"{cfg.model} is a reward model with the heads {', '.join(have)}, but this run trains "
                        f"{', '.join(names)}; start from the SFT model, or list the same heads in the same order.")
    continuing = have is not None and getattr(model.config, "rlhfkit_objective", "preference") == cfg.objective
    name_heads(model, names)
    if cfg.objective == "regression":
        if not continuing:
            means = torch.tensor([i.targets for i in train], dtype=torch.float64).mean(0)  # (K,)
            setattr(model.config, OFFSETS_KEY, [float(m) for m in means])
        model.config.rlhfkit_objective = "regression"  # its heads predict attribute values, not preferences


def train_member(cfg: RewardConfig, samples: tuple[list[Any], list[str]] | None,
                 bootstrap_seed: int | None) -> dict[str, Any]:
    run = Run(cfg, stage="reward")
    device = run.accelerator.device
    tokenizer = load_tokenizer(cfg.model, padding_side="right")
    objective = OBJECTIVES[cfg.objective]
    train, held_out, info = objective.load(cfg, tokenizer)
    if bootstrap_seed is not None:
        gen = torch.Generator().manual_seed(bootstrap_seed)
        train = [train[i] for i in torch.randint(len(train), (len(train),), generator=gen).tolist()]
    log.info("reward: %d training items, %d held out, %d truncated", len(train), len(held_out), info["truncated_rows"])

    heads = cfg.heads()
    model = load_reward_model(cfg.model, tokenizer, num_labels=max(1, len(heads)))
    if cfg.likelihood_term:
        check_likelihood_term(model.config, cfg.model)
    if likelihood_coef(model.config):  # continuing from a model that has one: its head trains alone, as it did
        log.info("reward: %s scores with a likelihood term; training its head without it (%s)", cfg.model,
                 "refit after training" if cfg.likelihood_term else "--likelihood-term is off, so it is dropped")
        delattr(model.config, LIKELIHOOD_KEY)
    if heads:
        prepare_heads(model, cfg, train)
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
        totals = dict.fromkeys(objective.count_keys(cfg), 0.0)
        chunks = [indices[k : k + micro] for k in range(0, len(indices), micro)]
        for k, chunk in enumerate(chunks):
            with run.micro_step(model, k, len(chunks)):
                loss, counts = objective.loss(model, [train[i] for i in chunk], tokenizer.pad_token_id, cfg,
                                              device, step_items)
                run.backward(model, loss * run.world)
            for key, value in counts.items():
                totals[key] += value
        summed = {k: float(run.all_sum(v)) for k, v in totals.items()}
        loss_value = summed["loss_sum"] / step_items
        check_finite({"loss": loss_value}, step)
        lr = scheduler.get_last_lr()[0]
        grad_norm = run.step_optimizer(model, optimizer, scheduler, step)
        metrics: dict[str, Any] = {"loss": loss_value, **objective.step_metrics(cfg, summed), "grad_norm": grad_norm,
                                   "lr": lr, "epoch": round(sampler.epochs_done, 4)}
        if held_out and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
            with run.gathered(model):  # each process evaluates its share: any number of forwards
                metrics.update(objective.evaluate(model, held_out, tokenizer.pad_token_id, cfg.eval_batch_size,
                                                  device, heads))
        run.log(step, metrics, headline=objective.headline)
        run.end_step(step, model, optimizer, scheduler, {"sampler": sampler.state_dict()})
        last = metrics

    measure = objective.headline[1]
    summary: dict[str, Any] = {"stage": "reward", "steps": cfg.max_steps, **info,
                               "final_loss": last.get("loss"), f"train_{measure}": last.get(measure)}
    summary.update({k.replace("eval/", "heldout_"): v for k, v in last.items() if k.startswith("eval/")})
    if held_out:
        for c in cfg.criteria:  # null, not absent, when the held-out split holds no pair of this criterion
            summary.setdefault(f"heldout_accuracy_{c}", None)
    if cfg.likelihood_term:  # fit on training pairs, then the held-out measures again with the term
        with run.gathered(model):
            fit = fit_likelihood_term(run.accelerator.unwrap_model(model), train, tokenizer.pad_token_id, cfg, device)
            summary["likelihood_term"] = fit
            if fit["used"] and held_out:
                again = objective.evaluate(run.accelerator.unwrap_model(model), held_out, tokenizer.pad_token_id,
                                           cfg.eval_batch_size, device, heads)
                fit.update({f"heldout_{k[len('eval/'):]}_head": summary.get(k.replace("eval/", "heldout_"))
                            for k in again})
                summary.update({k.replace("eval/", "heldout_"): v for k, v in again.items()})
    # ECE and accuracy above are on the trained scale; normalisation changes the scale, not the ordering
    if samples is not None:
        with run.gathered(model):
            summary["normalisation"] = normalise(run.accelerator.unwrap_model(model), tokenizer, samples,
                                                 cfg.max_length, device, keep_zero=cfg.safety_loss_weight > 0,
                                                 criteria=cfg.criteria, safety_criterion=cfg.safety_criterion)
    net = run.accelerator.unwrap_model(model)
    net = net.get_base_model() if hasattr(net, "get_base_model") else net
    if cfg.criterion:  # saved in config.json: which criterion this model scores
        net.config.rlhfkit_criterion = cfg.criterion
    if cfg.safety_loss_weight > 0:  # its zero separates safe from unsafe (cost = -score > 0: unsafe)
        if cfg.criteria:
            net.config.rlhfkit_safety_criterion = cfg.safety_criterion
        else:
            net.config.rlhfkit_safety_zero = True
    if heads:
        summary["heads"] = heads
        summary["offsets"] = dict(zip(heads, head_offsets(net.config)))
    run.finish(model, tokenizer, summary)
    return summary


def member_config(cfg: RewardConfig, i: int) -> RewardConfig:
    """Member i of an ensemble run: its own directory (output_dir/member-i) and seed, trained alone."""
    return replace(cfg, output_dir=str(Path(cfg.output_dir) / f"member-{i}"), seed=cfg.seed + i, ensemble_size=1)


def bootstrap_seed(cfg: RewardConfig, i: int) -> int | None:
    """The seed of member i's bootstrap resample of the training items; None without --bootstrap."""
    return cfg.seed * 1000 + i if cfg.bootstrap else None


def main(cfg: RewardConfig) -> dict[str, Any]:
    cfg.validate()
    if cfg.ensemble_size == 1:
        return train_member(cfg, reference_samples(cfg), None)
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
        changed = [k for k in ("data", "model", "ensemble_size", "bootstrap", "seed", "learning_rate", "objective",
                                "criteria", "attributes") if saved.get(k, now.get(k)) != now.get(k)]
        if changed:
            raise ConfigError(f"--resume: {', '.join(changed)} differ from the run in {root}; resume with the "
                              "same settings.")
    save_config(cfg, root / "config.yaml")
    members: list[dict[str, Any]] = []
    names = []
    samples: list[Any] = []  # the reference samples, drawn once, when a member is first trained here
    for i in range(cfg.ensemble_size):
        name = f"member-{i}"
        names.append(name)
        member_dir = root / name
        member_cfg = member_config(cfg, i)
        if cfg.resume and (member_dir / "summary.json").exists():
            members.append(json.loads((member_dir / "summary.json").read_text()))
            continue
        if cfg.resume and not (member_dir / "config.yaml").exists():
            member_cfg = replace(member_cfg, resume=False)
        if not samples:
            samples.append(reference_samples(cfg))
        members.append(train_member(member_cfg, samples[0], bootstrap_seed(cfg, i)))
    (root / ENSEMBLE_FILE).write_text(json.dumps({"members": names}, indent=2))
    summary = {"stage": "reward", "ensemble_size": cfg.ensemble_size, "members": members}
    per_head = [f"heldout_{m}_{h}" for h in cfg.heads() for m in ("accuracy", "rmse", "pearson")]
    for key in ("heldout_accuracy", "heldout_ece", "heldout_length_correlation", "heldout_loss", "heldout_rmse",
                *per_head):
        values = [m[key] for m in members if isinstance(m.get(key), (int, float)) and not math.isnan(m[key])]
        if values:
            summary[key] = sum(values) / len(values)
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
