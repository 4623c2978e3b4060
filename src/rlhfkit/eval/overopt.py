"""Reward over-optimisation curves (Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model
Over-optimization"): the gold score and the proxy reward as functions of d = sqrt(KL(π || π_init)).

Pure functions of numbers (no models): the unbiased best-of-n estimator, the two functional forms the paper fits,
and their least-squares fits with R² and the fitted peak."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch


def best_of_n_expectation(proxy: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """Expected `values` of the proxy's favourite among n of a prompt's m samples drawn without replacement,
    exactly (Gao et al. App. I's unbiased estimator), averaged over prompts.

    proxy, values: (B, m) with m >= n. Sorted by proxy ascending, sample i (0-based) is the favourite of a random
    n-subset with probability C(i, n−1) / C(m, n): it must be in the subset and the other n−1 must come from the
    i samples below it. Ties in proxy are broken by position, as an argmax would."""
    B, m = proxy.shape  # (B, m)
    if not 1 <= n <= m:
        raise ValueError(f"best-of-{n} needs at least {n} samples per prompt, got {m}")
    order = torch.argsort(proxy, dim=1, stable=True)  # (B, m) ascending
    ranked = torch.gather(values.double(), 1, order)  # (B, m)
    weights = torch.tensor([math.comb(i, n - 1) / math.comb(m, n) for i in range(m)], dtype=torch.float64)  # (m,)
    return (ranked * weights).sum(1).mean()


@dataclass
class CurveFit:
    """A fitted over-optimisation curve. gold_delta(d) = d(α − β d) for best-of-n, d(α − β ln d) for RL."""

    form: str
    alpha: float
    beta: float
    r2: float
    peak_d: float | None
    """d at which the fitted curve peaks (None when it never turns down: β <= 0)."""
    peak_gold_delta: float | None

    def predict(self, d: float) -> float:
        if self.form == "bon":
            return d * (self.alpha - self.beta * d)
        return d * (self.alpha - self.beta * math.log(d)) if d > 0 else 0.0

    def to_dict(self) -> dict[str, float | str | None]:
        return asdict(self)


def _least_squares(features: list[list[float]], target: Sequence[float]) -> tuple[list[float], float]:
    """Coefficients (no intercept: both curves pass through the origin) and R² against the mean of target."""
    X = torch.tensor(features, dtype=torch.float64)  # (N, 2)
    y = torch.tensor(list(target), dtype=torch.float64)  # (N,)
    coef = torch.linalg.lstsq(X, y[:, None]).solution.squeeze(1)  # (2,)
    residual = float(((X @ coef - y) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    return coef.tolist(), 1.0 - residual / total if total > 0 else 0.0


def fit_best_of_n(d: Sequence[float], gold_delta: Sequence[float]) -> CurveFit:
    """Fit gold_delta = d(α − β d) (Gao et al. Eq. 2). The peak is at d* = α / (2β)."""
    _check(d, gold_delta)
    (alpha, neg_beta), r2 = _least_squares([[x, -x * x] for x in d], gold_delta)
    beta = neg_beta
    peak = alpha / (2 * beta) if beta > 0 else None
    return CurveFit("bon", alpha, beta, r2, peak, None if peak is None else peak * (alpha - beta * peak))


def fit_rl(d: Sequence[float], gold_delta: Sequence[float]) -> CurveFit:
    """Fit gold_delta = d(α − β ln d) (Gao et al. Eq. 3). d/dd = α − β(ln d + 1) = 0 gives d* = exp(α/β − 1)."""
    _check(d, gold_delta)
    if any(x <= 0 for x in d):
        raise ValueError("the RL form needs d > 0 (ln d); drop the initial policy's point, whose delta is 0")
    (alpha, neg_beta), r2 = _least_squares([[x, -x * math.log(x)] for x in d], gold_delta)
    beta = neg_beta
    peak = math.exp(alpha / beta - 1) if beta > 0 and alpha / beta - 1 < 50 else None
    return CurveFit("rl", alpha, beta, r2, peak,
                    None if peak is None else peak * (alpha - beta * math.log(peak)))


def _check(d: Sequence[float], y: Sequence[float]) -> None:
    if len(d) != len(y):
        raise ValueError(f"{len(d)} d values but {len(y)} scores")
    if len(d) < 3:
        raise ValueError(f"a two-parameter fit needs at least 3 points, got {len(d)}")
