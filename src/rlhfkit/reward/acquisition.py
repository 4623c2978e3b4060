"""Which comparisons to ask people for: acquisition scores of candidate pairs from a reward ensemble.

Each member m of an ensemble gives a pair (A, B) the Bradley-Terry probability p_m = sigma(r_m(A) - r_m(B)). The
members stand in for samples of the reward model's posterior (bootstrapped ensembles, Osband et al. 2016), so

- disagreement: the members' variance of p_m, Var_m p_m (the query-by-committee score);
- BALD (Houlsby et al. 2011): the mutual information between the label and the model,
  H[E_m p_m] - E_m H[p_m]. It is high where the members are each confident but disagree, and low where they all
  say "coin flip": a pair that is a coin flip for everyone is noise (aleatoric), and labelling it teaches
  nothing, which is the difference from plain uncertainty sampling.

As labels arrive within a round, the members are reweighted by how well each predicted them (the posterior
update of a particle approximation, w_m ∝ exp(τ·loglik_m)); the tempering τ ≤ 1 is the largest that keeps the
effective sample size at least half the ensemble (adaptive tempering, as in sequential Monte Carlo), so a few
labels cannot collapse the ensemble onto one member. The weighted scores then reorder the queue.

A `random_share` of the queue is ordered at random, interleaved through the active order, so the labels never
collapse onto one corner of the candidates (what the reward model has not yet been told about cannot show up as
disagreement)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Literal

import torch

Strategy = Literal["random", "disagreement", "bald"]
STRATEGIES = ("random", "disagreement", "bald")


def pair_probabilities(scores_a: torch.Tensor, scores_b: torch.Tensor) -> torch.Tensor:
    """(M, N) member probabilities that A beats B, from (M, N) member scores of A and of B."""
    return torch.sigmoid(scores_a.double() - scores_b.double())


def _entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-12, 1 - 1e-12)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def _weights(weights: torch.Tensor | None, m: int) -> torch.Tensor:
    if weights is None:
        return torch.full((m,), 1.0 / m, dtype=torch.float64)
    w = weights.double()
    return w / w.sum()


def disagreement(p: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) weighted variance over members of (M, N) probabilities."""
    w = _weights(weights, p.shape[0])[:, None]
    mean = (w * p).sum(0)
    return (w * (p - mean) ** 2).sum(0)


def bald(p: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) mutual information H[E_w p] - E_w H[p] (nats) of (M, N) member probabilities."""
    w = _weights(weights, p.shape[0])[:, None]
    return _entropy((w * p).sum(0)) - (w * _entropy(p)).sum(0)


def tempered_weights(loglik: torch.Tensor, min_ess: float = 0.8) -> tuple[torch.Tensor, float]:
    """Member weights ∝ exp(τ·loglik) with the largest τ in [0, 1] whose effective sample size
    (Σw)² / Σw² is at least min_ess × M (found by bisection). Returns (weights, τ)."""
    ll = loglik.double()
    m = ll.shape[0]

    def at(tau: float) -> torch.Tensor:
        return torch.softmax(tau * ll, 0)

    def ess(w: torch.Tensor) -> float:
        return float(1.0 / (w ** 2).sum())

    if ess(at(1.0)) >= min_ess * m:
        return at(1.0), 1.0
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ess(at(mid)) >= min_ess * m else (lo, mid)
    return at(lo), lo


def labelled_loglik(p: torch.Tensor, winners: Sequence[int]) -> torch.Tensor:
    """(M,) log-likelihood of each member for labelled pairs: p is (M, L) P(A beats B) for the L labelled pairs,
    winners[l] is 0 when A won and 1 when B won."""
    if not len(winners):
        return torch.zeros(p.shape[0], dtype=torch.float64)
    won_a = torch.tensor([w == 0 for w in winners], dtype=torch.bool)
    q = torch.where(won_a, p.double(), 1 - p.double()).clamp_min(1e-12)
    return q.log().sum(1)


def acquisition_scores(p: torch.Tensor, strategy: Strategy, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) how useful a label on each pair is, under `strategy` (random: zeros)."""
    if strategy == "random":
        return torch.zeros(p.shape[1], dtype=torch.float64)
    if strategy == "disagreement":
        return disagreement(p, weights)
    if strategy == "bald":
        return bald(p, weights)
    raise ValueError(f"unknown acquisition strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")


def queue_priorities(scores: torch.Tensor | None, n: int, random_share: float, seed: int) -> list[float]:
    """Priorities (higher first) for n queue items: the items ranked by `scores` (None: all at random), with a
    random `random_share` of them placed at uniformly random ranks, interleaved through the order. Priorities
    lie in (0, 1): position k of n gets 1 - (k + 0.5) / n."""
    if not 0.0 <= random_share <= 1.0:
        raise ValueError(f"random_share must be in [0, 1], got {random_share}")
    rng = random.Random(seed)
    order = list(range(n))
    if scores is None or random_share >= 1.0:
        rng.shuffle(order)
    else:
        ranked = sorted(range(n), key=lambda i: (-float(scores[i]), i))
        k = round(random_share * n)
        chosen = set(rng.sample(range(n), k)) if k else set()
        active = [i for i in ranked if i not in chosen]
        randoms = list(chosen)
        rng.shuffle(randoms)
        slots = set(rng.sample(range(n), len(randoms)))  # where the random picks sit in the order
        order, a, r = [], iter(active), iter(randoms)
        for pos in range(n):
            order.append(next(r) if pos in slots else next(a))
    out = [0.0] * n
    for pos, i in enumerate(order):
        out[i] = 1.0 - (pos + 0.5) / n
    return out


def expected_information(p: torch.Tensor) -> float:
    """Mean BALD of the pairs (nats): how much the ensemble expects to learn from labelling all of them."""
    return float(bald(p).mean()) if p.numel() else math.nan
