"""KL in the PPO objective: approx_kl against the exact KL, and one step on a pure KL penalty lowers the KL for
every allowed (placement, estimator) choice, while k2 / k3 as a detached reward raise it (the defect)."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.losses.advantages import kl_loss, kl_per_token, rloo_advantages
from rlhfkit.losses.masked import masked_mean
from rlhfkit.losses.ppo import ppo_policy_loss


def exact_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(p || q) of two categorical distributions given by logits."""
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return float((lp.exp() * (lp - lq)).sum())


def test_approx_kl_estimates_kl_old_new_from_samples_of_old():
    torch.manual_seed(0)
    old = torch.tensor([1.0, 0.2, -0.5, -1.5, 0.7])
    new = torch.tensor([0.6, 0.5, -0.2, -1.0, 0.9])
    tokens = torch.distributions.Categorical(logits=old).sample((200_000,))  # drawn from pi_old
    old_lp = torch.log_softmax(old, -1)[tokens][None]  # (1, N)
    new_lp = torch.log_softmax(new, -1)[tokens][None]
    mask = torch.ones_like(old_lp)
    _, stats = ppo_policy_loss(new_lp, old_lp, torch.zeros_like(old_lp), mask)
    want = exact_kl(old, new)  # KL(old || new) = 0.0894...
    assert float(stats.approx_kl) == pytest.approx(want, rel=0.03)
    # the inverted ratio (the old formula) estimates a different quantity: it must not pass this test
    log_ratio = new_lp - old_lp
    inverted = float(masked_mean(torch.expm1(-log_ratio) + log_ratio, mask))
    assert abs(inverted - want) > 0.05 * want


def _one_step_kl(placement: str, kind: str, lr: float = 0.5, n: int = 20_000, seed: int = 0) -> tuple[float, float]:
    """Exact KL(pi || pi_ref) before and after one policy-gradient step on a pure KL penalty (no score), for a
    one-token categorical policy sampled n times. The estimator sits in the reward (detached, REINFORCE with an
    RLOO baseline) or in the loss (with gradient)."""
    gen = torch.Generator().manual_seed(seed)
    ref = torch.tensor([0.5, -0.3, 0.0, 1.2, -1.0, 0.3])
    logits = (ref + torch.randn(6, generator=gen) * 0.6).requires_grad_(True)
    before = exact_kl(logits.detach(), ref)
    tokens = torch.multinomial(torch.softmax(logits.detach(), -1), n, replacement=True, generator=gen)
    lp = torch.log_softmax(logits, -1)[tokens][None]  # (1, n) with gradient
    ref_lp = torch.log_softmax(ref, -1)[tokens][None]
    mask = torch.ones_like(lp)
    if placement == "reward":
        reward = -kl_per_token(lp.detach(), ref_lp, kind)  # (1, n) detached per-token reward
        adv = rloo_advantages(reward.reshape(-1), n).reshape(1, n)
        loss, _ = ppo_policy_loss(lp, lp.detach(), adv, mask)
    else:
        loss = masked_mean(kl_loss(lp, ref_lp, mask, kind), mask)
    loss.backward()
    with torch.no_grad():
        logits -= lr * logits.grad
    return before, exact_kl(logits.detach(), ref)


@pytest.mark.parametrize("placement,kind", [("reward", "k1"), ("loss", "k2"), ("loss", "k3")])
def test_one_step_on_a_pure_kl_penalty_lowers_the_kl(placement, kind):
    for seed in range(3):
        before, after = _one_step_kl(placement, kind, seed=seed)
        assert after < before, (placement, kind, seed, before, after)


def test_k2_and_k3_as_a_detached_reward_do_not_follow_the_kl_gradient():
    """Why they are refused in the reward: their policy gradient is not grad KL. Measured on the same draws as
    the k1 step: k1 lowers the KL more than either (and on these draws k3 raises it)."""
    rises = 0
    for seed in range(3):
        before, after_k1 = _one_step_kl("reward", "k1", seed=seed)
        for kind in ("k2", "k3"):
            _, after = _one_step_kl("reward", kind, seed=seed)
            assert after > after_k1
            rises += after > before
    assert rises >= 1


def test_k1_is_refused_as_a_loss_term():
    with pytest.raises(ValueError, match="zero expected gradient"):
        kl_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), "k1")


def test_ppo_config_refuses_k2_k3_in_the_reward_and_k1_in_the_loss():
    from rlhfkit.errors import ConfigError
    from rlhfkit.policy.ppo import PPOConfig, kl_estimator_of

    base = dict(model="m", data="d", output_dir="o", reward_model="r")
    for kind in ("k2", "k3"):
        with pytest.raises(ConfigError, match="cannot be used in the reward"):
            PPOConfig(**base, kl_estimator=kind).validate()
    with pytest.raises(ConfigError, match="cannot be used as a loss term"):
        PPOConfig(**base, kl_penalty="loss", kl_estimator="k1").validate()
    assert kl_estimator_of(PPOConfig(**base)) == "k1"
    assert kl_estimator_of(PPOConfig(**base, kl_penalty="loss")) == "k3"
