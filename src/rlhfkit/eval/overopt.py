"""Reward over-optimisation curves (Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model
Over-optimization"): the gold score and the proxy reward as functions of d = sqrt(KL(π || π_init)).

Pure functions of numbers (no models): the unbiased best-of-n estimator, the two functional forms the paper fits,
their least-squares fits with R² and the fitted peak, and the online monitor PPO runs to catch the proxy rising
while a held-out judge falls. Imports only torch and the standard library, so training may call it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

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


class OveroptimisationMonitor:
    """Gao et al. 2022's signature of reward hacking: the proxy reward keeps rising while a held-out judge falls.
    Windows are means of `window` consecutive evaluations. Fires when the latest window's judge mean sits more
    than z standard errors below the best earlier window's (one that does not overlap it) while its proxy mean is
    above that window's: the judge has come down from its peak as the proxy kept climbing.

    The standard error of that fall: when every evaluation in both windows judged the same fixed prompts and
    passed its per-prompt judge means, the fall is a paired difference and its SE comes from the spread of the
    per-prompt differences (how hard a prompt is cancels out, so a real fall is seen sooner). Otherwise it comes
    from each evaluation's own SE (per-sample spread), the two windows taken as independent. Either way
    evaluation noise alone does not raise the alarm, and a slow steady decline is caught once it adds up.

    z is the threshold of one comparison. The monitor makes many: the best earlier window is the highest of k
    candidates (its mean is biased upward by the choice), and it looks again after every evaluation. At the
    j-th look there are j candidates, so the threshold is Bonferroni-corrected over the j x j comparisons made
    by then: one-sided level (1 - Phi(z)) / j^2. With a flat judge (no real fall) and a rising proxy, a run of 12
    evaluations in windows of 3 raised a false alarm in 20% of simulated runs at a plain z = 2, and 3.5% with
    the correction; a fall of 0.3 (7.5 standard errors of one evaluation) was still caught every time, about
    a third of an evaluation later."""

    def __init__(self, window: int, z: float = 2.0):
        self.window, self.z = window, z
        self.history: list[tuple[float, float, float]] = []  # (proxy, judge, judge standard error)
        self.per_prompt: list[list[float] | None] = []  # per-prompt judge means of each evaluation, if given

    def _window(self, end: int) -> tuple[float, float, float]:
        """(proxy mean, judge mean, SE of the judge mean) over history[end - window : end]."""
        xs = self.history[end - self.window : end]
        w = len(xs)
        return (sum(x[0] for x in xs) / w, sum(x[1] for x in xs) / w, sum(x[2] ** 2 for x in xs) ** 0.5 / w)

    def _prompt_means(self, end: int) -> list[float] | None:
        """Per-prompt judge means over the window ending at `end`, or None when an evaluation lacks them."""
        vs = self.per_prompt[end - self.window : end]
        if any(v is None for v in vs) or len({len(v) for v in vs}) != 1:  # type: ignore[arg-type]
            return None
        return [sum(col) / len(col) for col in zip(*vs)]  # type: ignore[misc]

    def _fall_se(self, peak_end: int, last_end: int) -> float:
        a, b = self._prompt_means(peak_end), self._prompt_means(last_end)
        if a is not None and b is not None and len(a) == len(b) and len(a) > 1:
            diffs = [x - y for x, y in zip(a, b)]
            return mean_se(diffs)[1]
        return (self._window(peak_end)[2] ** 2 + self._window(last_end)[2] ** 2) ** 0.5  # independent windows

    def update(self, proxy: float, judge: float, judge_se: float = 0.0,
               per_prompt: Sequence[float] | None = None) -> bool:
        """Record one evaluation; per_prompt: its judge mean for each held-out prompt (same prompts, same order
        every time). Returns whether the monitor fires now."""
        self.history.append((proxy, judge, judge_se))
        self.per_prompt.append(None if per_prompt is None else [float(v) for v in per_prompt])
        n, w = len(self.history), self.window
        if n < 2 * w:
            return False
        last = self._window(n)
        peak_end = max(range(w, n - w + 1), key=lambda end: self._window(end)[1])
        peak = self._window(peak_end)
        return last[0] > peak[0] and peak[1] - last[1] > self.threshold(n) * self._fall_se(peak_end, n)

    def threshold(self, n: int) -> float:
        """The z the fall must exceed after n evaluations: z Bonferroni-corrected over the j candidate peak
        windows and the j looks so far (j = n - 2 window + 1)."""
        from statistics import NormalDist

        j = max(1, n - 2 * self.window + 1)
        normal = NormalDist()
        return normal.inv_cdf(1.0 - (1.0 - normal.cdf(self.z)) / (j * j))

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "per_prompt": self.per_prompt}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [tuple(h) if len(h) == 3 else (*h, 0.0) for h in state["history"]]
        self.per_prompt = list(state.get("per_prompt") or [None] * len(self.history))


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, (var / n) ** 0.5
