"""PPO's clipped policy and value losses (Schulman et al. 2017; lm-human-preferences). Pure tensor functions.

Shapes: (B, R); mask: 1 = real response token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.losses.masked import Aggregation, aggregate, masked_mean, masked_var


@dataclass
class PolicyStats:
    clip_fraction: torch.Tensor
    """Share of tokens whose ratio left [1 - eps, 1 + eps] in the direction the clip binds."""
    approx_kl: torch.Tensor
    """k3 estimate of KL(pi_old || pi_new) over the minibatch (how far one update moved the policy): with
    r = pi_new / pi_old on tokens sampled from pi_old, (r - 1) - log r (Schulman, "Approximating KL divergence")."""
    ratio_mean: torch.Tensor


@dataclass
class ValueStats:
    clip_fraction: torch.Tensor
    explained_variance: torch.Tensor
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, 0 predicts nothing."""


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float = 0.2, aggregation: Aggregation = "token_mean",
                    max_tokens: int | None = None) -> tuple[torch.Tensor, PolicyStats]:
    """L = E[max(-A rho, -A clip(rho, 1 - eps, 1 + eps))], rho = exp(log pi - log pi_old) (Schulman et al. 2017),
    reduced over real tokens by `aggregation` (see `masked.aggregate`: token_mean, sequence_mean as in the GRPO
    paper, or Dr. GRPO's constant normaliser max_tokens)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation, max_tokens)
    with torch.no_grad():
        stats = PolicyStats(
            clip_fraction=masked_mean((clipped > unclipped).float(), mask),
            # KL(old || new) from samples of old: with r = new / old, E_old[(r - 1) - log r]
            approx_kl=masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            ratio_mean=masked_mean(ratio, mask),
        )
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> tuple[torch.Tensor, ValueStats]:
    """L_V = 1/2 E[max((V - G)^2, (V_clip - G)^2)], V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
    (lm-human-preferences' clipped value loss)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        var_returns = masked_var(returns, mask, unbiased=False)
        explained = 1.0 - masked_var(returns - values, mask, unbiased=False) / var_returns.clamp(min=1e-8)
        stats = ValueStats(clip_fraction=masked_mean((clipped_err > unclipped_err).float(), mask),
                           explained_variance=explained)
    return loss, stats
