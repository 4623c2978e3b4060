import math

import pytest
import torch

from rlhfkit.losses import masked_mean, masked_sum, masked_var, whiten


def test_masked_mean_ignores_masked_entries():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    # real entries 1, 2, 3, 5 -> mean 11 / 4
    assert masked_mean(values, mask).item() == pytest.approx(2.75)
    # per row: (1+2)/2 = 1.5 and (3+5)/2 = 4
    assert masked_mean(values, mask, dim=1).tolist() == pytest.approx([1.5, 4.0])
    assert masked_sum(values, mask).item() == pytest.approx(11.0)


def test_masked_mean_of_empty_row_is_zero_not_nan():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[0, 0], [1, 1]])
    assert masked_mean(values, mask, dim=1).tolist() == [0.0, 3.5]


def test_masked_var_unbiased_and_biased_by_hand():
    values = torch.tensor([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0, 1000.0])
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0])
    # textbook data: mean 5, squared deviations sum to 32 -> biased 32/8 = 4, unbiased 32/7
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(4.0)
    assert masked_var(values, mask).item() == pytest.approx(32 / 7)


def test_masked_var_needs_two_entries_when_unbiased():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(torch.tensor([1.0, 2.0]), torch.tensor([1, 0]))


def test_whiten_by_hand_and_padding_stays_zero():
    values = torch.tensor([1.0, 3.0, 99.0])
    mask = torch.tensor([1, 1, 0])
    # mean 2, unbiased var ((1)^2 + (1)^2) / 1 = 2 -> (x - 2) / sqrt(2)
    out = whiten(values, mask, eps=0.0)
    assert out.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0])
    kept = whiten(values, mask, shift_mean=False, eps=0.0)
    assert kept.tolist() == pytest.approx([2 - 1 / math.sqrt(2), 2 + 1 / math.sqrt(2), 0.0])


def test_whiten_of_a_single_real_entry_centres_it_instead_of_raising():
    """One response that is a lone EOS on this process: one real advantage token (PPO whitening raised)."""
    values, mask = torch.tensor([[0.7, 0.0, 0.0]]), torch.tensor([[1, 0, 0]])
    assert whiten(values, mask).tolist() == [[0.0, 0.0, 0.0]]
    assert whiten(values, mask, shift_mean=False)[0].tolist() == pytest.approx([0.7, 0.0, 0.0])


def test_loss_aggregations_by_hand():
    from rlhfkit.losses.masked import aggregate

    # two responses: [1, 2, 3] (3 tokens) and [10, pad, pad] (1 token)
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(values, mask, "token_mean").item() == pytest.approx(16 / 4)
    assert aggregate(values, mask, "sequence_mean").item() == pytest.approx((2.0 + 10.0) / 2)
    assert aggregate(values, mask, "constant", max_tokens=4).item() == pytest.approx(16 / (2 * 4))
    with pytest.raises(ValueError, match="max_tokens"):
        aggregate(values, mask, "constant")
