"""Soft preference labels in the losses: Bradley-Terry with a confidence c, and cDPO with a per-pair flip
probability; hand values with every σ written out, c = 1 bit-equal to the hard loss, and the gradients' zeros."""

import math

import pytest
import torch

from rlhfkit.losses.dpo import cdpo_loss, confidence_label_smoothing, dpo_loss
from rlhfkit.losses.reward import bradley_terry_loss

LN2, LN3 = math.log(2), math.log(3)


def t(*values, grad=False, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def nls(x):
    """−log σ(x) = log(1 + e^−x), by hand."""
    return math.log1p(math.exp(-x))


# ------------------------------------------------------------------------------------------------ Bradley-Terry
def test_soft_bradley_terry_by_hand():
    # gaps Δ = r_c − r_r = [0, ln 3, −ln 3], margins [0, 0, 1], confidences [0.5, 0.9, 0.2];
    # loss = −c log σ(Δ − m) − (1 − c) log σ(−Δ)
    chosen, rejected = t(1.0, LN3, 0.0), t(1.0, 0.0, LN3)
    loss, stats = bradley_terry_loss(chosen, rejected, margin=t(0.0, 0.0, 1.0), confidence=t(0.5, 0.9, 0.2))
    # pair 0: 0.5·log 2 + 0.5·log 2 = log 2 = 0.693147
    # pair 1: σ(ln 3) = 3/4, σ(−ln 3) = 1/4: 0.9·log(4/3) + 0.1·log 4 = 0.9·0.287682 + 0.1·1.386294 = 0.397543
    # pair 2: the margin shifts only the labelled term: −log σ(−ln 3 − 1) = log(1 + 3e) = 2.214283, and the
    #         reversed term −log σ(ln 3) = 0.287682: 0.2·2.214283 + 0.8·0.287682 = 0.673002
    expected = [LN2, 0.9 * math.log(4 / 3) + 0.1 * math.log(4),
                0.2 * math.log(1 + 3 * math.e) + 0.8 * math.log(4 / 3)]
    assert expected == pytest.approx([0.693147, 0.397543, 0.673002], abs=1e-6)
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-12)  # 0.587898
    # the stats are those of the labelled order whatever c says: pair 2 (Δ < 0) and the tie count as wrong
    assert stats.accuracy.item() == pytest.approx(1 / 3)
    assert stats.margin.item() == pytest.approx(0.0, abs=1e-12)


def test_confidence_one_is_the_hard_loss_bit_for_bit_in_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    chosen0, rejected0 = torch.randn(16, generator=gen), torch.randn(16, generator=gen)  # float32, as training
    margin = torch.rand(16, generator=gen) * 2
    results = []
    for confidence in (None, torch.ones(16), 1.0):
        chosen, rejected = chosen0.clone().requires_grad_(), rejected0.clone().requires_grad_()
        loss, stats = bradley_terry_loss(chosen, rejected, margin, confidence)
        loss.backward()
        results.append((loss.detach(), chosen.grad, rejected.grad, stats.accuracy))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_soft_gradient_vanishes_where_sigma_of_the_gap_equals_the_confidence():
    # d/dΔ [−c log σ(Δ) − (1 − c) log σ(−Δ)] = −c σ(−Δ) + (1 − c) σ(Δ) = σ(Δ) − c (m = 0)
    gap = t(0.0, LN3, LN3, grad=True)
    loss, _ = bradley_terry_loss(gap, torch.zeros(3, dtype=torch.float64), confidence=t(0.5, 0.75, 0.9))
    loss.backward()
    # Δ = 0, c = 1/2: σ(0) − 1/2 = 0; Δ = ln 3, c = 3/4: 3/4 − 3/4 = 0; Δ = ln 3, c = 0.9: 0.75 − 0.9 = −0.15,
    # each divided by the 3 pairs of the mean
    assert gap.grad.tolist() == pytest.approx([0.0, 0.0, -0.15 / 3], abs=1e-12)


def test_confidence_zero_is_the_pair_reversed():
    chosen, rejected = t(0.3, -1.2, 2.0), t(0.1, 0.4, -0.5)
    soft, _ = bradley_terry_loss(chosen, rejected, confidence=0.0)
    reversed_, _ = bradley_terry_loss(rejected, chosen)
    assert soft.item() == pytest.approx(reversed_.item(), rel=1e-12)


@pytest.mark.parametrize("confidence,match", [
    (t(0.5, 1.5), r"\[0, 1\]"), (t(-0.1, 0.5), r"\[0, 1\]"), (t(float("nan"), 0.5), r"\[0, 1\]"),
    (t(0.5, 0.5).reshape(2, 1), "shape"),  # would broadcast to (2, 2)
])
def test_soft_bradley_terry_refuses_a_confidence_that_is_not_a_probability_per_pair(confidence, match):
    with pytest.raises(ValueError, match=match):
        bradley_terry_loss(t(1.0, 2.0), t(0.0, 0.0), confidence=confidence)


# ----------------------------------------------------------------------------------------------------- DPO family
def gaps_0_10_20():
    # reference log-probs all −10; chosen log-ratios [0, 5, 10], rejected [0, −5, −10] -> h = [0, 10, 20]
    return t(-10.0, -5.0, 0.0), t(-10.0, -15.0, -20.0), t(-10.0, -10.0, -10.0), t(-10.0, -10.0, -10.0)


def test_cdpo_with_a_flip_probability_per_pair_by_hand():
    loss, stats = cdpo_loss(*gaps_0_10_20(), beta=0.1, label_smoothing=t(0.5, 0.0, 0.9))
    # βh = [0, 1, 2]; −(1−ε) log σ(x) − ε log σ(−x):
    #   x=0, ε=0.5: log 2 = 0.693147
    #   x=1, ε=0:   −log σ(1) = log(1 + e^−1) = 0.313262
    #   x=2, ε=0.9: 0.1·0.126928 + 0.9·2.126928 = 1.926928 (above 1/2 the pair is trained as reversed)
    expected = [LN2, nls(1.0), 0.1 * nls(2.0) + 0.9 * nls(-2.0)]
    assert expected == pytest.approx([0.693147, 0.313262, 1.926928], abs=1e-6)
    assert stats.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-12)
    assert stats.accuracy.item() == pytest.approx(2 / 3)  # the labelled order: the tie is wrong


def test_a_float_smoothing_and_a_tensor_of_it_give_the_same_bits():
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(8, generator=gen) * 5 for _ in range(4)]  # float32
    a, sa = cdpo_loss(*inputs, beta=0.3, label_smoothing=0.1)
    b, sb = cdpo_loss(*inputs, beta=0.3, label_smoothing=torch.full((8,), 0.1))
    assert torch.equal(a, b) and torch.equal(sa.losses, sb.losses)


def test_dpo_equals_cdpo_with_zero_flip_probability_bit_for_bit_in_value_and_gradient():
    gen = torch.Generator().manual_seed(2)
    base = [torch.randn(8, generator=gen) * 5 for _ in range(4)]  # float32
    results = []
    for smoothing in (None, torch.zeros(8)):
        chosen, rejected = base[0].clone().requires_grad_(), base[1].clone().requires_grad_()
        args = (chosen, rejected, base[2], base[3])
        loss, _ = dpo_loss(*args, beta=0.2) if smoothing is None else cdpo_loss(*args, beta=0.2,
                                                                                label_smoothing=smoothing)
        loss.backward()
        results.append((loss.detach(), chosen.grad, rejected.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_cdpo_gradient_vanishes_at_h_zero_for_a_coin_flip_label():
    chosen = t(-10.0, grad=True)
    loss, _ = cdpo_loss(chosen, t(-10.0), t(-10.0), t(-10.0), beta=0.1, label_smoothing=t(0.5))
    loss.backward()
    # d/dh = β[−(1−ε) σ(−βh) + ε σ(βh)] = 0.1·(−0.5·0.5 + 0.5·0.5) = 0 at h = 0
    assert chosen.grad.item() == pytest.approx(0.0, abs=1e-15)


def test_confidence_label_smoothing_composes_the_two_flips():
    c = t(1.0, 0.0, 0.5, 0.8)
    # ε_i = 1 − [c(1 − ε₀) + (1 − c)ε₀] with ε₀ = 0.1:
    #   c=1: 1 − 0.9 = 0.1;  c=0: 1 − 0.1 = 0.9;  c=0.5: 1 − 0.5 = 0.5;  c=0.8: 1 − (0.72 + 0.02) = 0.26
    assert confidence_label_smoothing(c, 0.1).tolist() == pytest.approx([0.1, 0.9, 0.5, 0.26], rel=1e-12)
    assert confidence_label_smoothing(c).tolist() == pytest.approx([0.0, 1.0, 0.5, 0.2], rel=1e-12)  # 1 − c
    # c = 1 gives ε₀ itself in float32, so the soft path reproduces the configured cDPO bit for bit
    ones = confidence_label_smoothing(torch.ones(3), 0.1)
    assert torch.equal(ones, torch.full((3,), 0.1))
    with pytest.raises(ValueError, match="label_smoothing"):
        confidence_label_smoothing(c, 0.5)


@pytest.mark.parametrize("smoothing,match", [
    (t(0.5, 1.5, 0.0), r"\[0, 1\]"), (t(-0.1, 0.5, 0.0), r"\[0, 1\]"), (t(0.5, 0.5), "label_smoothing"),
])
def test_a_per_pair_smoothing_must_be_a_probability_per_pair(smoothing, match):
    with pytest.raises(ValueError, match=match):
        cdpo_loss(*gaps_0_10_20(), label_smoothing=smoothing)
