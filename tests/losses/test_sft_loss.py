import math

import pytest
import torch

from rlhfkit.losses import sft_loss


def test_sft_loss_counts_only_masked_tokens():
    # log-probs log(1/2), log(1/4), log(1/8); the middle token is prompt (mask 0)
    logprobs = torch.log(torch.tensor([[0.5, 0.25, 0.125]]))
    mask = torch.tensor([[1, 0, 1]])
    loss, stats = sft_loss(logprobs, mask)
    # NLL = ln2 + 3 ln2 = 4 ln2 over 2 tokens -> 2 ln2
    assert loss.item() == pytest.approx(2 * math.log(2))
    assert stats.nll_sum.item() == pytest.approx(4 * math.log(2))
    assert stats.num_tokens.item() == 2


def test_sft_loss_global_normaliser_makes_microbatches_add_up():
    logprobs = torch.log(torch.tensor([[0.5, 0.25], [0.125, 0.5]]))
    mask = torch.tensor([[1, 1], [1, 0]])
    full, _ = sft_loss(logprobs, mask)
    # split into two micro-batches normalised by the 3 tokens of the whole step: the parts sum to the whole
    a, _ = sft_loss(logprobs[:1], mask[:1], num_tokens=3)
    b, _ = sft_loss(logprobs[1:], mask[1:], num_tokens=3)
    assert (a + b).item() == pytest.approx(full.item())
    # whereas averaging per-micro-batch means weights the 1-token micro-batch too much
    a_mean, _ = sft_loss(logprobs[:1], mask[:1])
    b_mean, _ = sft_loss(logprobs[1:], mask[1:])
    assert ((a_mean + b_mean) / 2).item() != pytest.approx(full.item())
