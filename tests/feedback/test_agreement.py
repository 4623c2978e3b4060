"""Agreement metrics against published worked examples."""

import pytest

from rlhfkit.feedback.agreement import cohen_kappa, krippendorff_alpha_nominal, percent_agreement

N = None
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers, 12 units, missing
# data; the paper's nominal alpha is 0.743.
KRIPP = {
    "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
    "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
    "C": [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
    "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N],
}


def test_krippendorff_alpha_nominal_matches_the_papers_worked_example():
    units = list(zip(*KRIPP.values()))
    # by hand: unit 12 has one value and drops out, leaving n = 40 pairable values with counts
    # n_1..n_5 = 9, 13, 10, 5, 3, so sum_{c!=k} n_c n_k = 40^2 - (81 + 169 + 100 + 25 + 9) = 1216. Only units 2
    # (2,3,2,2), 6 (1,2,3,4) and 8 (1,2,1,1) disagree; each has m = 4 values, so their disagreeing ordered pairs
    # weigh 1/3: 6/3 + 12/3 + 6/3 = 8 = sum_{c!=k} o_ck.  alpha = 1 - (n-1) * 8 / 1216 = 1 - 312/1216.
    assert krippendorff_alpha_nominal(units) == pytest.approx(1 - 312 / 1216, abs=1e-12)
    assert round(krippendorff_alpha_nominal(units), 3) == 0.743


def test_cohen_kappa_matches_the_textbook_example():
    # 50 proposals, two readers: yes/yes 20, yes/no 5, no/yes 10, no/no 15 → p_o = 0.7,
    # p_e = 0.5·0.6 + 0.5·0.4 = 0.5, kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    # units labelled by only one of the two are ignored
    assert cohen_kappa(a + ["y", N], b + [N, "n"]) == pytest.approx(0.4)
    assert cohen_kappa([N], ["y"]) is None


def test_percent_agreement_counts_rater_pairs_on_shared_units():
    # unit 1: 3 labels, pairs (x,x) (x,y) (x,y) → 1 of 3; unit 2: (z,z) → 1 of 1; unit 3: one label, no pair
    assert percent_agreement([["x", "x", "y"], ["z", "z", N], ["q", N, N]]) == pytest.approx(2 / 4)
    assert percent_agreement([["x", N]]) is None


def test_perfect_and_chance_agreement_limits():
    assert krippendorff_alpha_nominal([["a", "a"], ["b", "b"], ["a", "a"]]) == pytest.approx(1.0)
    # everyone always says the same thing: no variation to be reliable about
    assert krippendorff_alpha_nominal([["a", "a"], ["a", "a"]]) is None
    # systematic disagreement is worse than chance
    assert krippendorff_alpha_nominal([["a", "b"], ["b", "a"]]) < 0
