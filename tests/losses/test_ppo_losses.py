"""PPO math by hand: KL-penalised rewards, GAE (closed form and the reference loop), clipped losses, critic-free
advantages, the adaptive KL controller."""

import math
import random

import pytest
import torch


def close(got, want, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64), rtol=0, atol=tol)

from rlhfkit.losses.advantages import (
    gae, grpo_advantages, kl_penalised_rewards, kl_per_token, reinforce_advantages, rloo_advantages,
)
from rlhfkit.losses.ppo import ppo_policy_loss, ppo_value_loss
from rlhfkit.losses.advantages import KLController


def test_kl_penalised_rewards_put_the_score_on_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -9.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.5, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = kl_penalised_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    # k1 = log pi - log pi_ref: row 0 [0.5, 0, -1], row 1 [1, 0.5, (pad) 0]
    close(kl, [[0.5, 0.0, -1.0], [1.0, 0.5, 0.0]])
    # r = -0.1 kl, plus the score at the last real token (index 2 in row 0, index 1 in row 1)
    close(rewards, [[-0.05, 0.0, 0.1 + 2.0], [-0.1, -0.05 - 1.0, 0.0]])


def test_kl_estimators_by_hand():
    lp, ref = torch.tensor([0.0]), torch.tensor([math.log(2)])  # ratio pi_ref / pi = 2
    assert kl_per_token(lp, ref, "k1").item() == pytest.approx(-math.log(2))
    assert kl_per_token(lp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_per_token(lp, ref, "k3").item() == pytest.approx(1 - math.log(2))  # (2 - 1) - ln 2 >= 0


def test_gae_closed_form_short_episode():
    # rewards [0, 0, 1], values [0.5, 0.5, 0.5], gamma 1, lambda 0.5:
    # delta_2 = 1 - 0.5 = 0.5;         A_2 = 0.5
    # delta_1 = 0 + 0.5 - 0.5 = 0;     A_1 = 0 + 0.5 * 0.5 = 0.25
    # delta_0 = 0;                     A_0 = 0 + 0.5 * 0.25 = 0.125;  returns = A + V
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]]), torch.ones(1, 3), 1.0, 0.5)
    close(adv, [[0.125, 0.25, 0.5]])
    close(ret, [[0.625, 0.75, 1.0]])


def gae_reference_loop(rewards, values, lengths, gamma, lam):
    out = []
    for r, v, n in zip(rewards, values, lengths):
        adv = [0.0] * len(r)
        running = 0.0
        for t in reversed(range(n)):
            nxt = v[t + 1] if t + 1 < n else 0.0
            running = r[t] + gamma * nxt - v[t] + gamma * lam * running
            adv[t] = running
        out.append(adv)
    return out


def test_vectorised_gae_equals_the_reference_loop():
    rng = random.Random(0)
    B, R = 5, 7
    lengths = [rng.randint(1, R) for _ in range(B)]
    rewards = [[rng.uniform(-1, 1) if t < n else 0.0 for t in range(R)] for n in lengths]
    values = [[rng.uniform(-1, 1) for _ in range(R)] for _ in range(B)]
    mask = torch.tensor([[1 if t < n else 0 for t in range(R)] for n in lengths])
    adv, _ = gae(torch.tensor(rewards), torch.tensor(values), mask, gamma=0.99, lam=0.9)
    close(adv, gae_reference_loop(rewards, values, lengths, 0.99, 0.9), tol=1e-5)


def test_clipped_policy_loss_by_hand():
    # ratios e^0.5 = 1.6487 (A = +1) and e^-0.5 = 0.6065 (A = -1), clip 0.2:
    # token 0: max(-1.6487, -1.2) = -1.2 (clipped);  token 1: max(0.6065, 0.8) = 0.8 (clipped) -> mean -0.2
    lp, old = torch.tensor([[0.5, -0.5]]), torch.zeros(1, 2)
    loss, stats = ppo_policy_loss(lp, old, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), clip=0.2)
    assert loss.item() == pytest.approx(-0.2)
    assert stats.clip_fraction.item() == 1.0
    # inside the trust region nothing is clipped: loss = -mean(A * ratio)
    loss, stats = ppo_policy_loss(torch.tensor([[0.1]]), torch.zeros(1, 1), torch.tensor([[2.0]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(-2 * math.exp(0.1)) and stats.clip_fraction.item() == 0.0


def test_clipped_value_loss_by_hand():
    # V = 2, V_old = 0, G = 2, clip 0.2: V_clip = 0.2; max((2-2)^2, (0.2-2)^2) = 3.24 -> 0.5 * 3.24 = 1.62
    loss, stats = ppo_value_loss(torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(1.62)
    assert stats.clip_fraction.item() == 1.0


def test_critic_free_advantages_by_hand():
    scores = torch.tensor([1.0, 3.0, 0.0, 4.0])  # two prompts, two samples each
    # RLOO: each sample minus the other's score
    assert rloo_advantages(scores, 2).tolist() == [-2.0, 2.0, -4.0, 4.0]
    # GRPO: (x - mean) / std, std of [1, 3] (unbiased) = sqrt(2)
    assert grpo_advantages(scores, 2, eps=0.0).tolist() == pytest.approx(
        [-1 / math.sqrt(2), 1 / math.sqrt(2), -1 / math.sqrt(2), 1 / math.sqrt(2)])
    assert grpo_advantages(scores, 2, scale=False).tolist() == [-1.0, 1.0, -2.0, 2.0]
    assert reinforce_advantages(scores, 2.0).tolist() == [-1.0, 1.0, -2.0, 2.0]


def test_critic_free_advantages_by_hand_with_three_samples_per_prompt():
    # with k = 3 the estimators part ways; group [1, 2, 6] (mean 3), group [4, 4, 4]
    scores = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 4.0])
    # RLOO: each score minus the mean of the other two: 1 - 4, 2 - 3.5, 6 - 1.5  (= 3/2 x (R - mean))
    assert rloo_advantages(scores, 3).tolist() == [-3.0, -1.5, 4.5, 0.0, 0.0, 0.0]
    # GRPO: (R - 3) / std, unbiased std of [1, 2, 6] = sqrt((4 + 1 + 9) / 2) = sqrt(7); an equal group gets 0
    s7 = math.sqrt(7)
    close(grpo_advantages(scores, 3, eps=0.0)[:3], [-2 / s7, -1 / s7, 3 / s7])
    assert grpo_advantages(scores, 3)[3:].tolist() == [0.0, 0.0, 0.0]
    # REINFORCE against the batch mean 21 / 6 = 3.5 (what advantage reinforce uses): groups play no part
    close(reinforce_advantages(scores, scores.mean()), [-2.5, -1.5, 2.5, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="RLOO needs at least 2 samples per prompt"):
        rloo_advantages(scores, 1)


def test_adaptive_kl_controller_update_by_hand():
    ctl = KLController(0.1, adaptive=True, target=6.0, horizon=10_000)
    ctl.update(kl=9.0, n_samples=512)  # e = clip(9/6 - 1, -0.2, 0.2) = 0.2 -> beta * (1 + 0.2 * 512 / 10000)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.0512))
    ctl.update(kl=5.4, n_samples=1000)  # e = -0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.0512) * (1 - 0.1 * 0.1))
    fixed = KLController(0.1, adaptive=False, target=6.0, horizon=10_000)
    fixed.update(100.0, 512)
    assert fixed.value == 0.1


def test_overoptimisation_monitor_fires_only_when_proxy_rises_and_judge_falls():
    from rlhfkit.eval.overopt import OveroptimisationMonitor

    healthy = OveroptimisationMonitor(window=2)
    assert not any(healthy.update(p, j) for p, j in [(0, 0), (1, 1), (2, 2), (3, 3)])  # both rise
    hacked = OveroptimisationMonitor(window=2)
    fired = [hacked.update(p, j) for p, j in [(0, 1.0), (1, 1.2), (2, 0.5), (3, 0.2)]]
    # windows [(0,1),(1,1.2)] -> [(2,0.5),(3,0.2)]: proxy mean 0.5 -> 2.5 up, judge 1.1 -> 0.35 down
    assert fired == [False, False, False, True]


def test_overoptimisation_monitor_ignores_a_fall_within_the_judges_noise():
    from rlhfkit.eval.overopt import OveroptimisationMonitor

    # window 1: the judge falls by 0.3 while the proxy rises. Each evaluation's SE is 0.2, so the difference of
    # two evaluations has SE sqrt(0.2^2 + 0.2^2) = 0.283 and z = 2 needs a fall above 0.566: not noise-proof yet.
    noisy = OveroptimisationMonitor(window=1, z=2.0)
    assert [noisy.update(p, j, 0.2) for p, j in [(0.0, 1.0), (0.5, 0.7)]] == [False, False]
    # the same fall measured ten times more precisely (SE 0.02 -> threshold 0.057) is a real fall
    precise = OveroptimisationMonitor(window=1, z=2.0)
    assert [precise.update(p, j, 0.02) for p, j in [(0.0, 1.0), (0.5, 0.7)]] == [False, True]
    # window 2: SE of a window mean is sqrt(2 * 0.1^2) / 2 = 0.0707, of the difference 0.1. The j-th look
    # (j = n - 2 window + 1) corrects z = 2 over j candidate peaks and j looks: 2.000, 2.531, 2.803 at j = 1, 2, 3
    w2 = OveroptimisationMonitor(window=2, z=2.0)
    assert [round(w2.threshold(n), 3) for n in (4, 5, 6)] == [2.0, 2.531, 2.803]
    fired = [w2.update(p, j, 0.1) for p, j in [(0, 1.0), (1, 1.0), (2, 0.9), (3, 0.9), (4, 0.65), (5, 0.65)]]
    # against the peak window (mean 1.0): 0.9 is a fall of 0.1 (< 0.200), 0.775 of 0.225 (< 0.253), 0.65 of 0.35
    # (> 0.280)
    assert fired == [False, False, False, False, False, True]
    # a slow decline: no two neighbouring windows differ by 2 SE, but the fall from the peak adds up. The SE of
    # a fall is sqrt(2) * 0.05 = 0.0707; thresholds 0.141, 0.179, 0.198, 0.211, 0.220 against falls of 0.05 ...
    # 0.25
    slow = OveroptimisationMonitor(window=1, z=2.0)
    fired = [slow.update(p, j, 0.05) for p, j in enumerate([1.0, 0.95, 0.9, 0.85, 0.8, 0.75])]
    assert fired == [False, False, False, False, False, True]
    # an old checkpoint's (proxy, judge) pairs load with a zero standard error
    restored = OveroptimisationMonitor(window=1)
    restored.load_state_dict({"history": [[0.0, 1.0]]})
    assert restored.history == [(0.0, 1.0, 0.0)]
    assert restored.per_prompt == [None]


def test_overoptimisation_monitor_keeps_false_alarms_rare_over_a_whole_run():
    """The alarm compares the latest window with the best of the earlier ones and looks after every evaluation,
    so an uncorrected z = 2 fires on a leashed run whose judge only wobbles: simulated, 12 evaluations in
    windows of 3 with a flat judge (SE 0.04 each) and a slowly rising proxy, a plain z = 2 raised an alarm in
    20% of runs. The corrected threshold keeps it under 5%, and still catches a real fall of the judge by 0.3
    (starting at the 5th evaluation, spread over the rest) in every run."""
    import random

    from rlhfkit.eval.overopt import OveroptimisationMonitor

    def alarms(seed: int, fall: float) -> bool:
        rng = random.Random(seed)
        monitor = OveroptimisationMonitor(window=3, z=2.0)
        return any([monitor.update(0.3 + 0.01 * i + rng.gauss(0, 0.005),
                                   0.6 - fall * max(0, i - 3) / 8 + rng.gauss(0, 0.04), 0.04) for i in range(12)])

    assert sum(alarms(seed, 0.0) for seed in range(2000)) / 2000 < 0.05
    assert all(alarms(seed, 0.3) for seed in range(500))


def test_overoptimisation_monitor_pairs_the_fall_prompt_by_prompt():
    """Hard and easy prompts spread the judge's scores widely (per-sample SE 1.0 here), but every prompt fell
    by about 0.3: as a paired difference that fall is far outside the noise; unpaired it is not."""
    from rlhfkit.eval.overopt import OveroptimisationMonitor

    before = [-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]
    after = [b - 0.3 + 0.05 * (-1) ** i for i, b in enumerate(before)]  # falls of 0.25 and 0.35 in turn
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    unpaired = OveroptimisationMonitor(window=1, z=2.0)
    assert [unpaired.update(p, mean(j), 1.0) for p, j in [(0.0, before), (0.5, after)]] == [False, False]
    paired = OveroptimisationMonitor(window=1, z=2.0)
    fired = [paired.update(p, mean(j), 1.0, j) for p, j in [(0.0, before), (0.5, after)]]
    # differences 0.25/0.35 alternate: mean 0.3, sample sd 0.0548, SE 0.0224 -> threshold 0.045 < 0.3
    assert fired == [False, True]
    # the same per-prompt fall with the proxy falling too is not reward hacking
    honest = OveroptimisationMonitor(window=1, z=2.0)
    assert [honest.update(p, mean(j), 1.0, j) for p, j in [(0.5, before), (0.0, after)]] == [False, False]
    # a prompt whose score went up offsets the others: falls 0.3, 0.3, 0.3, 0.3, 0.3 and a rise of 1.5 -> mean 0
    mixed = OveroptimisationMonitor(window=1, z=2.0)
    up = [b - 0.3 for b in before[:-1]] + [before[-1] + 1.5]
    assert [mixed.update(p, mean(j), 1.0, j) for p, j in [(0.0, before), (0.5, up)]] == [False, False]
    # an evaluation without per-prompt means falls back to the unpaired SE; the state round-trips
    partial = OveroptimisationMonitor(window=1, z=2.0)
    assert [partial.update(0.0, mean(before), 1.0, before), partial.update(0.5, mean(after), 1.0)] == [False, False]
    restored = OveroptimisationMonitor(window=1, z=2.0)
    restored.load_state_dict(__import__("json").loads(__import__("json").dumps(paired.state_dict())))
    lower = [a - 0.1 for a in after]
    assert restored.per_prompt == paired.per_prompt and restored.update(1.0, mean(lower), 1.0, lower)


def test_critic_free_defaults_are_the_estimators_as_published():
    """GRPO / RLOO advantages are not re-whitened by default: a group whose rewards are all equal keeps zero
    advantage and signs never flip inside a group (re-whitening shifted them by a length-weighted batch mean)."""
    from rlhfkit.losses import whiten
    from rlhfkit.policy.ppo import ADVANTAGE_ESTIMATORS, PPOConfig, loss_aggregation_of, whitens

    base = dict(model="m", data="d", output_dir="o", reward_model="r", samples_per_prompt=2)
    for name in ("grpo", "dr_grpo", "rloo", "reinforce"):
        assert not whitens(PPOConfig(**base, advantage=name))
    assert whitens(PPOConfig(**base)) and whitens(PPOConfig(**base, advantage="grpo", whiten=True))
    assert loss_aggregation_of(PPOConfig(**base, advantage="dr_grpo")) == "constant"
    assert loss_aggregation_of(PPOConfig(**base, advantage="grpo")) == "token_mean"
    # group 0: equal rewards; group 1: [1, 0]; responses of 1, 3, 2 and 1 tokens
    rewards = torch.tensor([0.5, 0.5, 1.0, 0.0])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]])
    cfg = PPOConfig(**base)
    per_token = torch.zeros(4, 3)
    per_token[:, 0] = rewards  # the estimators read the sequence reward as the sum over its tokens

    def estimate(name):
        adv_tok, returns = ADVANTAGE_ESTIMATORS[name](per_token, None, mask, 2, cfg)
        assert returns is None  # no critic
        assert torch.equal(adv_tok, adv_tok[:, :1] * mask)  # one advantage, spread over the response's tokens
        return adv_tok[:, 0]

    for name in ("grpo", "dr_grpo", "rloo"):
        adv = estimate(name)
        assert adv[:2].tolist() == [0.0, 0.0] and adv[2] > 0 > adv[3]
        rewhitened = whiten(adv[:, None] * mask, mask)
        assert rewhitened[0, 0] != 0  # what the old default did to the equal group
    assert estimate("dr_grpo").tolist() == [0.0, 0.0, 0.5, -0.5]  # no std division
