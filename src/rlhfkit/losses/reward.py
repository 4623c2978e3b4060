"""Reward-model losses on scalar rewards: Bradley-Terry (optionally with a Llama-2 margin and a soft label),
InstructGPT K-way ranking, pick-best-of-K, and the reward-centring penalty. Each preference loss returns (loss,
RewardStats). Also attribute regression (HelpSteer2), which returns (loss, RegressionStats)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RewardStats:
    """Diagnostics of one reward-loss evaluation (detached), taken over the ordered pairs (winner w, loser l)."""

    accuracy: torch.Tensor
    """Fraction of pairs with r_w > r_l strictly (a tie in reward counts as wrong)."""
    margin: torch.Tensor
    """Mean reward gap r_w − r_l (what the model predicts, not the label margin m)."""
    chosen_reward: torch.Tensor
    """Mean reward of the preferred response of each pair."""
    rejected_reward: torch.Tensor
    """Mean reward of the dispreferred response of each pair."""
    num_pairs: torch.Tensor
    """Number of ordered pairs the statistics cover."""
    margin_sum: torch.Tensor
    """Sum of the reward gaps (the step's mean over several micro-batches needs sums: mean·n of a float32 mean is
    not the float32 sum unless n is a power of two)."""
    chosen_sum: torch.Tensor
    """Sum of the preferred responses' rewards."""
    rejected_sum: torch.Tensor
    """Sum of the dispreferred responses' rewards."""


def _pair_stats(winner: torch.Tensor, loser: torch.Tensor) -> RewardStats:
    winner, loser = winner.detach().float(), loser.detach().float()
    gap = winner - loser
    return RewardStats(
        accuracy=(gap > 0).float().mean(),
        margin=gap.mean(),
        chosen_reward=winner.mean(),
        rejected_reward=loser.mean(),
        num_pairs=torch.tensor(gap.numel()),
        margin_sum=gap.sum(),
        chosen_sum=winner.sum(),
        rejected_sum=loser.sum(),
    )


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    confidence: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, RewardStats]:
    """Mean of −log σ(r_c − r_r − m) over pairs; with a confidence c, the soft Bradley-Terry loss
    −c·log σ(r_c − r_r − m) − (1 − c)·log σ(r_r − r_c).

    chosen_rewards, rejected_rewards: (B,) one scalar per response (read at the last real token).
    margin: None, a float, or (B,) label margins m ≥ 0 (e.g. from `strength_to_margin`); None means m = 0.
    confidence: None, a float, or (B,) probabilities c in [0, 1] that chosen is truly better; None means c = 1,
    and c = 1 gives exactly the loss without it. The stats are those of the labelled order whatever c is
    (accuracy counts r_c > r_r)."""
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"chosen_rewards {tuple(chosen_rewards.shape)} and rejected_rewards "
                         f"{tuple(rejected_rewards.shape)} must have the same shape.")
    gap = chosen_rewards - rejected_rewards  # (B,)
    logits = gap
    if margin is not None:
        # Llama 2 (Touvron et al. 2023) §3.2.2, Eq. 2: the margin asks for a larger gap on clearly better pairs
        logits = gap - torch.as_tensor(margin, dtype=gap.dtype, device=gap.device)
    # Christiano et al. 2017; Stiennon et al. 2020 Eq. 1: L = −log σ(r(x, y_w) − r(x, y_l)); logsigmoid is exact
    # for large |gaps| where log(sigmoid(.)) would underflow to log 0 = −inf
    if confidence is None:
        return -F.logsigmoid(logits).mean(), _pair_stats(chosen_rewards, rejected_rewards)
    c = torch.as_tensor(confidence, dtype=gap.dtype, device=gap.device)
    if c.dim() != 0 and c.shape != gap.shape:  # a (B, 1) against (B,) would broadcast to (B, B)
        raise ValueError(f"confidence must be a scalar or have shape {tuple(gap.shape)} like the rewards, got "
                         f"{tuple(c.shape)}.")
    if not bool(((c >= 0) & (c <= 1)).all()):  # NaN fails both comparisons
        raise ValueError("confidence must lie in [0, 1]: it is the probability that chosen is truly better.")
    # Soft label: the cross-entropy of σ(gap) against the target probability c (Christiano et al. 2017 §2.2.3 fit
    # the same cross-entropy against a target distribution, 1/2 each for "equally good"). Departure, with the
    # margin: it is the strength of the labelled preference, so it shifts only the labelled term; the reversed
    # hypothesis carries no strength of its own and keeps m = 0. Then c = 1 gives Llama 2's loss exactly, and
    # c = 1/2 with m = 0 has its minimum at gap 0.
    losses = -c * F.logsigmoid(logits) - (1 - c) * F.logsigmoid(-gap)  # (B,)
    return losses.mean(), _pair_stats(chosen_rewards, rejected_rewards)


def beats_from_ranking(ranking: list, num_responses: int) -> torch.Tensor:
    """(K, K) bool matrix, beats[i, j] = True when response i is ranked strictly above response j.

    ranking: best first, each entry a response index or a list of tied indices, e.g. [[0], [2, 1], 3]
    (0 best, 2 and 1 tied, 3 worst). It must mention every index in range(K) exactly once."""
    tiers = [list(t) if isinstance(t, (list, tuple)) else [t] for t in ranking]
    flat = [int(i) for tier in tiers for i in tier]
    if sorted(flat) != list(range(num_responses)):
        raise ValueError(f"ranking {ranking} is not a permutation of the response indices 0..{num_responses - 1}.")
    tier_of = torch.empty(num_responses, dtype=torch.long)  # (K,)
    for t, tier in enumerate(tiers):
        for i in tier:
            tier_of[int(i)] = t
    return tier_of[:, None] < tier_of[None, :]  # (K, K): i's tier is better (smaller) than j's


def batched_ranking_loss(rewards: torch.Tensor, beats: torch.Tensor) -> tuple[torch.Tensor, RewardStats]:
    """InstructGPT K-way ranking loss for G prompts, each with up to K responses scored once.

    rewards: (G, K), one scalar per response; padding slots may hold any finite value.
    beats: (G, K, K) bool, beats[g, i, j] = True when response i of prompt g is preferred to response j.
    Padding slots and tied pairs have False in both directions, so they contribute nothing.
    Each prompt's loss is normalised by its own number of ordered pairs, then prompts are averaged: a prompt is
    one batch element, however many responses it has."""
    if rewards.dim() != 2 or beats.shape != (*rewards.shape, rewards.shape[1]):
        raise ValueError(f"rewards must be (G, K) and beats (G, K, K); got {tuple(rewards.shape)} and "
                         f"{tuple(beats.shape)}.")
    beats = beats.bool()
    if (beats & beats.transpose(1, 2)).any():
        raise ValueError("beats says both i beats j and j beats i for some pair (or i beats itself).")
    gaps = rewards[:, :, None] - rewards[:, None, :]  # (G, K, K): gaps[g, i, j] = r_i − r_j
    # where() rather than multiplying by the mask, so a non-finite value in a padding slot cannot leak in
    pair_losses = torch.where(beats, -F.logsigmoid(gaps), torch.zeros_like(gaps))  # (G, K, K)
    num_pairs = beats.sum(dim=(1, 2))  # (G,): C(K, 2) for a full ranking, fewer with ties
    if not bool((num_pairs > 0).all()):
        raise ValueError("every prompt needs at least one ordered (non-tied) pair of responses.")
    # InstructGPT (Ouyang et al. 2022) Eq. 1: loss = −1/C(K,2) · Σ_(w,l) log σ(r_w − r_l) over the pairs of one
    # prompt. Departure: with ties we divide by the number of non-tied pairs, so ties do not shrink the loss.
    per_prompt = pair_losses.sum(dim=(1, 2)) / num_pairs.to(gaps.dtype)  # (G,)
    loss = per_prompt.mean()
    winner = rewards[:, :, None].expand_as(gaps)[beats]  # (N,) r_w of each ordered pair
    loser = rewards[:, None, :].expand_as(gaps)[beats]  # (N,) r_l of each ordered pair
    return loss, _pair_stats(winner, loser)


def ranking_loss(rewards: torch.Tensor, ranking: list | torch.Tensor) -> tuple[torch.Tensor, RewardStats]:
    """K-way ranking loss for ONE prompt whose K responses are each scored once.

    rewards: (K,). ranking: best-first list (ties as nested lists, see `beats_from_ranking`) or a (K, K)
    "i beats j" matrix."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (K,) for one prompt, got {tuple(rewards.shape)}; "
                         "use batched_ranking_loss for several prompts.")
    if isinstance(ranking, torch.Tensor):
        beats = ranking.bool().to(rewards.device)  # (K, K)
    else:
        beats = beats_from_ranking(ranking, rewards.shape[0]).to(rewards.device)  # (K, K)
    return batched_ranking_loss(rewards[None], beats[None])


def best_of_k_loss(
    rewards: torch.Tensor, best_index: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, RewardStats]:
    """Pick-best-of-K: softmax cross-entropy of the K rewards against the index of the best response.

    rewards: (B, K); best_index: (B,) long; mask: optional (B, K), 1 = real response, 0 = padding slot (for
    prompts with fewer than K responses). Stats treat (best, other) as the ordered pairs."""
    if mask is not None:
        rewards = rewards.masked_fill(~mask.bool(), float("-inf"))  # padding gets probability 0
    # lm-human-preferences label_types.py (BestOfN): cross-entropy over the K scores
    loss = F.cross_entropy(rewards, best_index)
    best = rewards.gather(1, best_index[:, None])  # (B, 1)
    others = torch.ones_like(rewards, dtype=torch.bool).scatter(1, best_index[:, None], False)  # (B, K)
    if mask is not None:
        others &= mask.bool()
    winner = best.expand_as(rewards)[others]  # (N,)
    loser = rewards[others]  # (N,)
    stats = _pair_stats(winner, loser)
    stats.accuracy = (rewards.detach().argmax(dim=1) == best_index).float().mean()  # top-1 accuracy over prompts
    stats.chosen_reward = best.detach().float().mean()
    return loss, stats


def centering_penalty(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, eta: float = 0.01) -> torch.Tensor:
    """η · mean((r_w + r_l)²), added to a preference loss to keep rewards centred on 0.

    Returns only the term (no stats): it is an auxiliary penalty, and the preference loss it is added to
    already reports the pair statistics."""
    # Eisenstein et al. 2023 ("Helping or Herding?"), reward centring: the BT loss only fixes reward differences,
    # so the penalty pins the otherwise free offset near 0
    return eta * (chosen_rewards + rejected_rewards).pow(2).mean()


@dataclass
class RegressionStats:
    """Diagnostics of one attribute-regression loss evaluation (detached)."""

    squared_error_sum: torch.Tensor
    """(K,) each attribute's squared error summed over the batch (micro-batches add up to the step's)."""
    num_responses: torch.Tensor
    """Number of responses (rows of the batch) the sums cover."""


def attribute_regression_loss(predictions: torch.Tensor, targets: torch.Tensor
                              ) -> tuple[torch.Tensor, RegressionStats]:
    """Mean squared error of each response's predicted attribute scores, averaged over attributes, then responses.

    predictions, targets: (B, K), one column per attribute, on the attribute's own scale (e.g. 0-4)."""
    if predictions.shape != targets.shape or predictions.dim() != 2:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} must both be "
                         "(B, K).")
    # HelpSteer2 (Wang et al. 2024, arXiv 2406.08673): a linear head per attribute on the last token, trained with
    # MSE against the annotated scores (the regression reward model of SteerLM / HelpSteer, arXiv 2311.09528)
    err = (predictions.float() - targets.to(predictions.device).float()).pow(2)  # (B, K)
    return err.mean(), RegressionStats(err.detach().sum(0), torch.tensor(err.shape[0]))
