"""Acquisition scores for the labelling queue, against hand-computed values."""

import math

import pytest
import torch

from rlhfkit.reward.acquisition import (
    acquisition_scores, bald, disagreement, labelled_loglik, pair_probabilities, queue_priorities, tempered_weights,
)


def H(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_bald_and_disagreement_by_hand():
    # pair 0: the members disagree confidently; pair 1: both say coin flip; pair 2: both sure and agree
    p = torch.tensor([[0.9, 0.5, 0.95], [0.1, 0.5, 0.95]], dtype=torch.float64)
    assert bald(p)[0].item() == pytest.approx(math.log(2) - H(0.9), abs=1e-9)
    assert bald(p)[1].item() == pytest.approx(0.0, abs=1e-9)  # aleatoric: nothing to learn from a label
    assert bald(p)[2].item() == pytest.approx(0.0, abs=1e-9)
    assert disagreement(p).tolist() == pytest.approx([0.16, 0.0, 0.0], abs=1e-12)
    # weighted: all weight on member 0 leaves one opinion, so no disagreement and no information
    w = torch.tensor([1.0, 0.0])
    assert bald(p, w)[0].item() == pytest.approx(0.0, abs=1e-6) and disagreement(p, w)[0].item() == 0.0
    w = torch.tensor([3.0, 1.0])  # normalised to 0.75 / 0.25: mean 0.7, variance 0.75*0.04 + 0.25*0.36 = 0.12
    assert disagreement(p, w)[0].item() == pytest.approx(0.12)
    assert bald(p, w)[0].item() == pytest.approx(H(0.7) - H(0.9), abs=1e-9)
    assert torch.equal(acquisition_scores(p, "random"), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown acquisition strategy"):
        acquisition_scores(p, "entropy")


def test_pair_probabilities_and_labelled_loglik():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    p = pair_probabilities(a, b)
    assert p[0, 0].item() == pytest.approx(1 / (1 + math.exp(-1))) and p[0, 1].item() == pytest.approx(
        1 / (1 + math.exp(2)))
    # winners: A won pair 0, B won pair 1
    assert labelled_loglik(p, [0, 1]).item() == pytest.approx(math.log(p[0, 0].item()) + math.log(1 - p[0, 1].item()))
    assert labelled_loglik(p, []).tolist() == [0.0]


def test_tempering_keeps_the_ensemble_from_collapsing():
    w, tau = tempered_weights(torch.tensor([0.0, -0.01, -0.02]))
    assert tau == 1.0 and w.sum().item() == pytest.approx(1.0)  # close log-likelihoods: the full update
    w, tau = tempered_weights(torch.tensor([0.0, -30.0, -30.0]))
    assert 0.0 < tau < 1.0
    ess = 1.0 / float((w ** 2).sum())
    assert ess == pytest.approx(0.8 * 3, rel=1e-3)  # the largest step that keeps 80% of the ensemble
    assert w[0] > w[1] == pytest.approx(w[2].item())


def test_queue_priorities_rank_the_scores_and_interleave_a_random_share():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3])
    prio = queue_priorities(scores, 4, 0.0, seed=0)
    assert sorted(range(4), key=lambda i: -prio[i]) == [1, 2, 3, 0]
    assert all(0 < x < 1 for x in prio) and len(set(prio)) == 4
    n = 1000
    scores = torch.arange(n, dtype=torch.float64)  # item i is worth i
    prio = queue_priorities(scores, n, 0.2, seed=1)
    order = sorted(range(n), key=lambda i: -prio[i])
    # the active part keeps its order; about a fifth of every stretch of the queue is random picks
    head = order[:100]
    off_order = sum(1 for i in head if i < n - 200)  # far down the active ranking: only a random pick gets here
    assert 10 <= off_order <= 30
    assert queue_priorities(scores, n, 0.2, seed=1) == prio  # seeded
    assert sorted(queue_priorities(None, 5, 0.0, seed=3)) == sorted(queue_priorities(scores[:5], 5, 0.0, 3))
    with pytest.raises(ValueError, match="random_share"):
        queue_priorities(scores, n, 1.5, seed=0)
