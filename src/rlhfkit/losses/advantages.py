"""Per-token rewards and advantage estimators: KL-penalised rewards, GAE, and the critic-free GRPO, RLOO and
REINFORCE-with-baseline. Pure tensor functions.

Shapes: B sequences, R response tokens. mask: 1 = real response token (EOS included), 0 = padding after it."""

from __future__ import annotations

from typing import Literal

import torch

from rlhfkit.losses.masked import whiten

KLEstimator = Literal["k1", "k2", "k3"]


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence"),
    with log-ratio log r = log pi_ref - log pi: k1 = -log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r (>= 0)."""
    log_ratio = ref_logprobs - logprobs  # (B, R)
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; use k1, k2 or k3")


def kl_penalised_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -beta * KL_t + [t = T] * score (Ziegler et al. 2019; N implementation details of RLHF: per-token KL
    penalty plus the reward-model score at the last real token), KL_t the k1 estimate log pi - log pi_ref.
    Returns (rewards, kl), each (B, R).

    Only k1 belongs in a detached reward: policy-gradient on the reward -k1 follows grad KL(pi || pi_ref), while
    k2 or k3 as a reward is a different objective whose gradient moves the policy away from the reference (one
    step on a pure KL penalty raises the KL). k2 / k3 are used as a loss term instead (`kl_loss`)."""
    mask = mask.to(logprobs.dtype)
    kl = kl_per_token(logprobs, ref_logprobs, "k1") * mask  # (B, R)
    rewards = -kl_coef * kl  # (B, R)
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (B,) index of the last real token (EOS when it ended)
    rewards = rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))
    return rewards * mask, kl


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kind: KLEstimator = "k3",
            ) -> torch.Tensor:
    """KL(pi || pi_ref) as a loss term with gradient through logprobs (B, R), on tokens sampled from pi: the
    GRPO paper's k3 (Shao et al. 2024, Eq. 4) or k2, whose gradient E_pi[(log pi - log pi_ref) grad log pi] is
    exactly grad KL(pi || pi_ref) on-policy. k1 is refused: as a loss on fixed samples its expected gradient
    E_pi[grad log pi] is zero, so it would not pull the policy back. Returns (B, R) per-token values."""
    if kind == "k1":
        raise ValueError("k1 as a KL loss term has zero expected gradient; use k2 or k3 (or k1 in the reward)")
    return kl_per_token(logprobs, ref_logprobs, kind) * mask.to(logprobs.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, right to left: delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = delta_t + gamma lambda A_{t+1}, returns G_t = A_t + V_t; V after the last real token is 0.
    Vectorised over the batch (one pass over R). Returns (advantages, returns), each (B, R)."""
    mask = mask.to(values.dtype)
    values = values * mask
    R = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(R)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def whiten_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Advantages normalised to mean 0, std 1 over real tokens (N implementation details: whitened advantages)."""
    return whiten(advantages, mask, shift_mean=True)


def grpo_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """GRPO (Shao et al. 2024, outcome supervision): A_i = (R_i - mean_group R) / std_group R for the G samples
    of one prompt; scale=False is Dr. GRPO's unscaled form (Liu et al. 2025: the std division over-weights
    prompts that are too easy or too hard). scores: (B,) with groups contiguous. Returns (B,)."""
    grouped = scores.view(-1, group_size)  # (B/G, G)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): A_i = R_i - 1/(k-1) sum_{j != i} R_j over the k samples of one prompt. (B,)"""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    grouped = scores.view(-1, group_size)  # (B/k, k)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def reinforce_advantages(scores: torch.Tensor, baseline: float | torch.Tensor) -> torch.Tensor:
    """REINFORCE with a baseline: A = R - b (b a running mean or the batch mean). (B,)"""
    return scores - baseline


class KLController:
    """Fixed beta, or Ziegler et al.'s adaptive one: e = clip(KL / target - 1, -0.2, 0.2),
    beta <- beta * (1 + e * n / horizon)."""

    def __init__(self, init: float, adaptive: bool, target: float, horizon: int):
        self.value, self.adaptive, self.target, self.horizon = init, adaptive, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        if not self.adaptive:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]
