"""Over-optimisation curves: the best-of-n estimator and the Gao et al. fits, against hand arithmetic."""

import itertools
import math

import pytest
import torch

from rlhfkit.eval.overopt import best_of_n_expectation, fit_best_of_n, fit_rl


def test_best_of_n_expectation_by_hand():
    # one prompt, m = 3 samples with proxy [0.1, 0.9, 0.5] and gold [1, 2, 3].
    # Ranked by proxy: gold [1, 3, 2]. Best-of-2 over the 3 subsets {0,1},{0,2},{1,2} picks gold 2, 3, 2 -> 7/3.
    # Weights C(i,1)/C(3,2) = [0, 1/3, 2/3]: 3/3 + 4/3 = 7/3.
    proxy = torch.tensor([[0.1, 0.9, 0.5]])
    gold = torch.tensor([[1.0, 2.0, 3.0]])
    assert float(best_of_n_expectation(proxy, gold, 2)) == pytest.approx(7 / 3)
    assert float(best_of_n_expectation(proxy, gold, 1)) == pytest.approx(2.0)  # the plain mean
    assert float(best_of_n_expectation(proxy, gold, 3)) == pytest.approx(2.0)  # always the proxy's favourite


def test_best_of_n_expectation_equals_enumeration_over_subsets():
    torch.manual_seed(0)
    proxy, gold = torch.randn(4, 7), torch.randn(4, 7)
    for n in (1, 2, 3, 5, 7):
        brute = []
        for b in range(4):
            picks = [gold[b, max(s, key=lambda j: float(proxy[b, j]))] for s in itertools.combinations(range(7), n)]
            brute.append(sum(float(x) for x in picks) / len(picks))
        assert float(best_of_n_expectation(proxy, gold, n)) == pytest.approx(sum(brute) / 4, abs=1e-9)


def test_best_of_n_expectation_rejects_n_above_samples():
    with pytest.raises(ValueError, match="at least 5 samples"):
        best_of_n_expectation(torch.zeros(1, 4), torch.zeros(1, 4), 5)


def test_fit_best_of_n_recovers_exact_curve_and_peak():
    d = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    y = [x * (1.2 - 0.4 * x) for x in d]  # peak at alpha / (2 beta) = 1.5, value 1.5 * (1.2 - 0.6) = 0.9
    fit = fit_best_of_n(d, y)
    assert fit.alpha == pytest.approx(1.2) and fit.beta == pytest.approx(0.4)
    assert fit.r2 == pytest.approx(1.0) and fit.peak_d == pytest.approx(1.5)
    assert fit.peak_gold_delta == pytest.approx(0.9)
    assert fit.predict(1.0) == pytest.approx(0.8)


def test_fit_rl_recovers_exact_curve_and_peak():
    d = [0.5, 1.0, 2.0, 3.0, 4.0]
    y = [x * (1.0 - 0.5 * math.log(x)) for x in d]  # peak: 1 - 0.5 (ln d + 1) = 0 -> d = e
    fit = fit_rl(d, y)
    assert fit.alpha == pytest.approx(1.0) and fit.beta == pytest.approx(0.5)
    assert fit.r2 == pytest.approx(1.0) and fit.peak_d == pytest.approx(math.e)


def test_fits_report_no_peak_for_a_curve_that_never_turns_down_and_low_r2_for_noise():
    rising = fit_best_of_n([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.5, 4.5])  # convex: beta < 0
    assert rising.beta < 0 and rising.peak_d is None
    noise = fit_best_of_n([0.5, 1.0, 1.5, 2.0, 2.5], [1.0, -1.0, 1.0, -1.0, 1.0])
    assert noise.r2 < 0.5
    with pytest.raises(ValueError, match="d > 0"):
        fit_rl([0.0, 1.0, 2.0], [0.0, 1.0, 1.5])
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_best_of_n([1.0, 2.0], [1.0, 2.0])
