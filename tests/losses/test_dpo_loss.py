"""Preference losses against hand arithmetic; every σ value is written out in the comments."""

import math

import pytest
import torch

from rlhfkit.losses.dpo import (
    cdpo_loss,
    dpo_loss,
    ipo_loss,
    kto_loss,
    kto_weights_ok,
    orpo_loss,
    sequence_logps,
    simpo_loss,
)

LN2 = math.log(2)


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def gaps_0_10_20():
    # reference log-probs all -10; policy chosen [-10, -5, 0], policy rejected [-10, -15, -20]
    # chosen log-ratios [0, 5, 10], rejected log-ratios [0, -5, -10] -> h = [0, 10, 20]
    return t(-10.0, -5.0, 0.0), t(-10.0, -15.0, -20.0), t(-10.0, -10.0, -10.0), t(-10.0, -10.0, -10.0)


# ---------------------------------------------------------------- sequence_logps


def test_sequence_logps_sums_only_response_tokens():
    token_logprobs = t(-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0).reshape(2, 4)  # (B, T)
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])  # 1 = response token; row 0 ends in padding
    logps, lengths = sequence_logps(token_logprobs, mask)
    # row 0: -2 - 3 = -5 over 2 tokens; row 1: -7 - 8 = -15 over 2 tokens
    assert logps.tolist() == [-5.0, -15.0]
    assert lengths.tolist() == [2.0, 2.0]
    assert lengths.dtype == token_logprobs.dtype


# ---------------------------------------------------------------- DPO


def test_dpo_gaps_0_10_20_with_beta_0_1_by_hand():
    loss, stats = dpo_loss(*gaps_0_10_20(), beta=0.1)
    # βh = [0, 1, 2]; -log σ(x) = log(1 + e^-x):
    #   x=0: log 2 = 0.693147;  x=1: log(1.367879) = 0.313262;  x=2: log(1.135335) = 0.126928
    expected = [0.693147, 0.313262, 0.126928]
    assert stats.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(sum(expected) / 3, abs=1e-6)  # 1.133337 / 3 = 0.377779
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(t(0.0, 1.0, 2.0)).mean().item())
    # rewards β·log-ratio: chosen 0.1·[0, 5, 10], rejected 0.1·[0, -5, -10]
    assert stats.chosen_rewards.tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert stats.rejected_rewards.tolist() == pytest.approx([0.0, -0.5, -1.0])
    assert stats.margins.tolist() == pytest.approx([0.0, 1.0, 2.0])
    # the tie (margin 0) is not a win: 2 of 3
    assert stats.accuracy.item() == pytest.approx(2 / 3)


def test_dpo_identical_chosen_and_rejected_give_log2_and_zero_parameter_gradient():
    # A tiny "model": log-probs of a 3-token response from logits θ (V = 4). Chosen and rejected are the same
    # sequence, so h = 0 for any β and the two gradient paths cancel exactly in parameter space.
    theta = torch.tensor([0.3, -1.2, 2.0, 0.5], dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([[2, 0, 3]])  # (B, T)
    mask = torch.ones(1, 3)  # 1 = response token
    ref_theta = theta.detach() + 0.7
    for beta in (0.01, 0.1, 1.0, 10.0):
        theta.grad = None
        token_logprobs = torch.log_softmax(theta, -1)[tokens]  # (B, T)
        chosen, _ = sequence_logps(token_logprobs, mask)
        rejected, _ = sequence_logps(torch.log_softmax(theta, -1)[tokens], mask)
        ref, _ = sequence_logps(torch.log_softmax(ref_theta, -1)[tokens], mask)
        loss, stats = dpo_loss(chosen, rejected, ref, ref.clone(), beta=beta)
        assert loss.item() == pytest.approx(LN2)
        assert stats.accuracy.item() == 0.0
        loss.backward()
        assert torch.equal(theta.grad, torch.zeros_like(theta))


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = t(-3.0, -8.0, grad=True), t(-4.0, -2.0, grad=True)
    ref_c, ref_r = t(-3.0, -5.0), t(-4.0, -5.0)
    loss, _ = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.5)
    loss.backward()
    # descent moves a logp by -grad, so chosen must have negative grads and rejected positive ones
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    # by hand: dL/dc_i = -β σ(-β h_i) / B. h = [0 - 0, (-3) - 3] = [0, -6]; βh = [0, -3];
    #   σ(0) = 0.5 -> -0.5·0.5/2 = -0.125;  σ(3) = 0.952574 -> -0.5·0.952574/2 = -0.238144
    assert chosen.grad.tolist() == pytest.approx([-0.125, -0.238144], abs=1e-6)
    assert rejected.grad.tolist() == pytest.approx([0.125, 0.238144], abs=1e-6)


def test_dpo_never_backpropagates_into_the_reference():
    ref_c, ref_r = t(-1.0, grad=True), t(-2.0, grad=True)
    loss, _ = dpo_loss(t(-1.5, grad=True), t(-1.0, grad=True), ref_c, ref_r)
    loss.backward()
    assert ref_c.grad is None and ref_r.grad is None


def test_dpo_rejects_mismatched_shapes_that_would_broadcast():
    # (B, 1) against (B,) would broadcast to (B, B) and average the wrong pairs
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss(t(1.0, 2.0), t(0.0, 0.0), t(0.0, 0.0).reshape(2, 1), t(0.0, 0.0))


# ---------------------------------------------------------------- cDPO


def test_cdpo_mixed_form_by_hand():
    loss, stats = cdpo_loss(*gaps_0_10_20(), beta=0.1, label_smoothing=0.1)
    # -(1-ε) log σ(x) - ε log σ(-x), and -log σ(-x) = x - log σ(x), so the loss is -log σ(x) + ε x:
    #   x=0: 0.9·0.693147 + 0.1·0.693147 = 0.693147
    #   x=1: 0.9·0.313262 + 0.1·1.313262 = 0.281936 + 0.131326 = 0.413262
    #   x=2: 0.9·0.126928 + 0.1·2.126928 = 0.114235 + 0.212693 = 0.326928
    expected = [0.693147, 0.413262, 0.326928]
    assert stats.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert stats.margins.tolist() == pytest.approx([0.0, 1.0, 2.0])


def test_cdpo_with_zero_smoothing_equals_dpo():
    inputs = (t(-3.0, -8.0, -1.0), t(-4.0, -2.0, -9.0), t(-3.5, -5.0, -2.0), t(-4.0, -5.0, -3.0))
    c_loss, c_stats = cdpo_loss(*inputs, beta=0.3, label_smoothing=0.0)
    d_loss, d_stats = dpo_loss(*inputs, beta=0.3)
    assert c_loss.item() == pytest.approx(d_loss.item(), rel=1e-12)
    assert torch.allclose(c_stats.losses, d_stats.losses)


@pytest.mark.parametrize("eps", [-0.1, 0.5, 1.0])
def test_cdpo_rejects_smoothing_outside_zero_to_half(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        cdpo_loss(*gaps_0_10_20(), label_smoothing=eps)


# ---------------------------------------------------------------- IPO


def test_ipo_squares_distance_to_one_over_two_tau():
    loss, stats = ipo_loss(*gaps_0_10_20(), tau=0.1)
    # 1/(2τ) = 5; h = [0, 10, 20] -> (h - 5)² = [25, 25, 225]; mean 275/3
    # (overshooting by 5 costs as much as undershooting by 5: IPO does not push h to infinity)
    assert stats.losses.tolist() == pytest.approx([25.0, 25.0, 225.0])
    assert loss.item() == pytest.approx(275 / 3)
    # rewards τ·log-ratio: chosen 0.1·[0, 5, 10]
    assert stats.chosen_rewards.tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert stats.accuracy.item() == pytest.approx(2 / 3)


def test_ipo_length_normalised_option_by_hand():
    chosen_lengths, rejected_lengths = t(1.0, 5.0, 10.0), t(2.0, 5.0, 5.0)
    loss, stats = ipo_loss(*gaps_0_10_20(), tau=0.25, length_normalize=True,
                           chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    # per-token log-ratios: chosen [0/1, 5/5, 10/10] = [0, 1, 1]; rejected [0/2, -5/5, -10/5] = [0, -1, -2]
    # h = [0, 2, 3]; 1/(2τ) = 2 -> (h - 2)² = [4, 0, 1]; mean 5/3
    assert stats.losses.tolist() == pytest.approx([4.0, 0.0, 1.0])
    assert loss.item() == pytest.approx(5 / 3)
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        ipo_loss(*gaps_0_10_20(), length_normalize=True)


# ---------------------------------------------------------------- SimPO


def test_simpo_by_hand():
    chosen, rejected = t(-2.0, -6.0), t(-6.0, -2.0)
    chosen_lengths, rejected_lengths = torch.tensor([2, 3]), torch.tensor([3, 4])
    loss, stats = simpo_loss(chosen, rejected, chosen_lengths, rejected_lengths, beta=2.0, gamma=0.5)
    # per-token means: chosen [-2/2, -6/3] = [-1, -2]; rejected [-6/3, -2/4] = [-2, -0.5]
    # rewards β·mean: chosen [-2, -4], rejected [-4, -1]; margins [2, -3]
    # argument margin - γ = [1.5, -3.5]
    #   σ(1.5) = 0.817574 -> -log = 0.201413;  σ(-3.5) = 0.029312 -> -log = 3.5 + log(1 + e^-3.5) = 3.529750
    assert stats.chosen_rewards.tolist() == pytest.approx([-2.0, -4.0])
    assert stats.rejected_rewards.tolist() == pytest.approx([-4.0, -1.0])
    assert stats.margins.tolist() == pytest.approx([2.0, -3.0])
    assert stats.accuracy.item() == pytest.approx(0.5)
    assert stats.losses.tolist() == pytest.approx([0.201413, 3.529750], abs=1e-6)
    assert loss.item() == pytest.approx((0.201413 + 3.529750) / 2, abs=1e-6)  # 1.865582


def test_simpo_gamma_is_the_margin_itself():
    # with equal rewards the argument is exactly -γ: loss = log(1 + e^γ); γ = 1 -> log(1 + 2.718282) = 1.313262
    loss, _ = simpo_loss(t(-2.0), t(-4.0), t(1.0), t(2.0), beta=3.0, gamma=1.0)
    assert loss.item() == pytest.approx(1.313262, abs=1e-6)


def test_simpo_rejects_empty_responses():
    with pytest.raises(ValueError, match="rejected_lengths"):
        simpo_loss(t(-2.0), t(-4.0), t(1.0), t(0.0))


# ---------------------------------------------------------------- KTO


def kto_inputs(kl_gaps):
    # r = log π - log π_ref = [4, -2, 2]; example 0 desirable, 1 and 2 undesirable
    policy, ref = t(-6.0, -12.0, -8.0, grad=True), t(-10.0, -10.0, -10.0)
    desirable = torch.tensor([True, False, False])
    kl_ref = t(-20.0, -20.0)
    kl_policy = (kl_ref + t(*kl_gaps)).detach().requires_grad_(True)
    return policy, ref, desirable, kl_policy, kl_ref


def test_kto_by_hand():
    policy, ref, desirable, kl_policy, kl_ref = kto_inputs([1.0, 3.0])
    loss, stats = kto_loss(policy, ref, desirable, kl_policy, kl_ref, beta=0.5,
                           desirable_weight=1.0, undesirable_weight=2.0)
    # z₀ = max(0, mean(1, 3)) = 2
    # ex 0 (desirable, r=4):   v = 1·σ(0.5·(4-2)) = σ(1) = 0.731059    -> λ_D - v = 0.268941
    # ex 1 (undesirable, r=-2): v = 2·σ(0.5·(2+2)) = 2·σ(2) = 2·0.880797 -> 2 - 1.761594 = 0.238406
    # ex 2 (undesirable, r=2):  v = 2·σ(0.5·(2-2)) = 2·0.5 = 1           -> 2 - 1 = 1.0
    assert stats.kl.item() == pytest.approx(2.0)
    assert stats.losses.tolist() == pytest.approx([0.268941, 0.238406, 1.0], abs=1e-6)
    assert loss.item() == pytest.approx((0.268941 + 0.238406 + 1.0) / 3, abs=1e-6)  # 0.502449
    # rewards β·r = [2, -1, 1]
    assert stats.rewards.tolist() == pytest.approx([2.0, -1.0, 1.0])
    assert stats.desirable_rewards.tolist() == pytest.approx([2.0])
    assert stats.undesirable_rewards.tolist() == pytest.approx([-1.0, 1.0])
    loss.backward()
    # z₀ carries no gradient; the desirable log-prob is pushed up, the undesirable ones down
    assert kl_policy.grad is None
    assert policy.grad[0] < 0 and (policy.grad[1:] > 0).all()


def test_kto_reference_point_is_clamped_at_zero():
    policy, ref, desirable, kl_policy, kl_ref = kto_inputs([-1.0, -3.0])
    loss, stats = kto_loss(policy, ref, desirable, kl_policy, kl_ref, beta=0.5,
                           desirable_weight=1.0, undesirable_weight=2.0)
    # mean(-1, -3) = -2 < 0 -> z₀ = 0
    # ex 0: 1 - σ(0.5·4) = 1 - 0.880797 = 0.119203
    # ex 1: 2·(1 - σ(0.5·(0+2))) = 2·(1 - 0.731059) = 0.537883
    # ex 2: 2·(1 - σ(0.5·(0-2))) = 2·(1 - 0.268941) = 1.462117
    assert stats.kl.item() == 0.0
    assert stats.losses.tolist() == pytest.approx([0.119203, 0.537883, 1.462117], abs=1e-6)
    assert loss.item() == pytest.approx(2.119203 / 3, abs=1e-6)
    # the clamp applies to the mean, not to each pair: mean(-1, 3) = 1, whereas mean(max(0,-1), max(0,3)) = 1.5
    _, mixed = kto_loss(*kto_inputs([-1.0, 3.0]), beta=0.5)
    assert mixed.kl.item() == pytest.approx(1.0)


def test_kto_weights_ok_ratio_window():
    # (1·40):(1·30) = 4/3 -> at the upper edge, fine; (1·30):(1·30) = 1 -> lower edge, fine
    assert kto_weights_ok(40, 30, 1.0, 1.0)
    assert kto_weights_ok(30, 30, 1.0, 1.0).ratio == pytest.approx(1.0)
    # 1:10 imbalance with equal weights -> ratio 0.1, below 1; desirable_weight should be in [10, 13.333]
    check = kto_weights_ok(100, 1000, 1.0, 1.0)
    assert not check
    assert check.ratio == pytest.approx(0.1)
    assert "below 1" in check.message and "10.000" in check.message and "13.333" in check.message
    # following that advice fixes it
    assert kto_weights_ok(100, 1000, 12.0, 1.0)
    # too much desirable weight -> above 4/3
    assert "above 4/3" in kto_weights_ok(100, 50, 1.0, 1.0).message
    assert not kto_weights_ok(0, 10, 1.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        kto_weights_ok(10, 10, 0.0, 1.0)


# ---------------------------------------------------------------- ORPO


def test_orpo_by_hand():
    # pair 0: chosen per-token p = 0.5 over 2 tokens, rejected p = 0.2 over 3 tokens
    # pair 1: chosen p = 0.2 over 1 token,  rejected p = 0.5 over 4 tokens
    chosen = t(2 * math.log(0.5), math.log(0.2))
    rejected = t(3 * math.log(0.2), 4 * math.log(0.5))
    chosen_lengths, rejected_lengths = torch.tensor([2, 1]), torch.tensor([3, 4])
    # L_SFT per pair: mean token NLL of the chosen response: [-log 0.5, -log 0.2] = [0.693147, 1.609438]
    nll = -chosen / chosen_lengths
    loss, stats = orpo_loss(chosen, rejected, chosen_lengths, rejected_lengths, nll, lam=0.1)
    # odds = p/(1-p): 0.5 -> 1 (log 0), 0.2 -> 0.25 (log -1.386294)
    # pair 0: log odds ratio = 0 - (-1.386294) = log 4 -> -log σ(log 4) = log(1 + 1/4) = 0.223144
    # pair 1: log odds ratio = -log 4               -> -log σ(-log 4) = log(1 + 4) = 1.609438
    assert stats.chosen_rewards.tolist() == pytest.approx([0.0, math.log(0.25)])
    assert stats.margins.tolist() == pytest.approx([math.log(4), -math.log(4)])
    assert stats.accuracy.item() == pytest.approx(0.5)
    assert stats.odds_ratio_losses.tolist() == pytest.approx([0.223144, 1.609438], abs=1e-6)
    # total: 0.693147 + 0.1·0.223144 = 0.715461;  1.609438 + 0.1·1.609438 = 1.770382; mean 1.242922
    assert stats.losses.tolist() == pytest.approx([0.715461, 1.770382], abs=1e-6)
    assert loss.item() == pytest.approx(1.242922, abs=1e-6)
    # an already-reduced scalar L_SFT gives the same mean
    scalar_loss, _ = orpo_loss(chosen, rejected, chosen_lengths, rejected_lengths, nll.mean(), lam=0.1)
    assert scalar_loss.item() == pytest.approx(loss.item())


def test_orpo_log_odds_stay_accurate_near_probability_one():
    # per-token mean log-prob -1e-6 (p ≈ 0.999999): naive log(1 - exp(m)) loses ~half the float32 digits.
    # Exact: log odds = m - log(-expm1(m)) = -1e-6 - log(9.999995e-7) = 13.815511 (float64)
    m = -1e-6
    exact = m - math.log(-math.expm1(m))
    chosen = torch.tensor([m], dtype=torch.float32)
    rejected = torch.tensor([-1.0], dtype=torch.float32)
    one = torch.tensor([1.0])
    _, stats = orpo_loss(chosen, rejected, one, one, torch.tensor(0.0))
    assert stats.chosen_rewards.item() == pytest.approx(exact, rel=1e-5)
    # p = e^-1 = 0.367879: log odds = -1 - log(1 - 0.367879) = -1 + 0.458675 = -0.541325
    assert stats.rejected_rewards.item() == pytest.approx(-0.541325, abs=1e-5)


# ---------------------------------------------------------------- stability


def test_huge_gaps_give_finite_losses_and_gradients():
    # h = ±1000 (log-probs ±1000 from the reference), far past where σ saturates
    def leaves():
        return t(0.0, -1000.0, grad=True), t(-1000.0, 0.0, grad=True)

    ref = t(0.0, 0.0)
    cases = [
        lambda c, r: dpo_loss(c, r, ref, ref, beta=1.0),
        lambda c, r: cdpo_loss(c, r, ref, ref, beta=1.0, label_smoothing=0.1),
        lambda c, r: ipo_loss(c, r, ref, ref, tau=0.1),
        lambda c, r: simpo_loss(c, r, t(1.0, 1.0), t(1.0, 1.0)),
        lambda c, r: orpo_loss(c, r, t(1.0, 1.0), t(1.0, 1.0), -c, lam=0.1),
        lambda c, r: kto_loss(torch.cat([c, r]), t(-500.0, 500.0, 500.0, -500.0),
                              torch.tensor([True, True, False, False]), c * 2, r * 2),
    ]
    for make in cases:
        chosen, rejected = leaves()
        loss, _ = make(chosen, rejected)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    # and DPO's values are the exact limits: -log σ(1000) = 0, -log σ(-1000) = 1000
    _, stats = dpo_loss(*leaves(), ref, ref, beta=1.0)
    assert stats.losses.tolist() == pytest.approx([0.0, 1000.0])

