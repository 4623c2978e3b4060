"""Inter-annotator agreement: percent agreement, Cohen's kappa (two raters) and Krippendorff's alpha (any number of
raters, missing labels allowed; nominal for outcomes, interval for Likert scores). Pure functions of label lists;
no database.

A unit is one item; its labels are what each rater said, None where that rater did not label it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from itertools import combinations

Label = Hashable


def _present(unit: Sequence[Label | None]) -> list[Label]:
    return [v for v in unit if v is not None]


def percent_agreement(units: Sequence[Sequence[Label | None]]) -> float | None:
    """Agreeing rater pairs over all rater pairs that labelled the same unit (units with one label count for
    nothing). None when no unit has two labels."""
    agree = total = 0
    for unit in units:
        for a, b in combinations(_present(unit), 2):
            agree += a == b
            total += 1
    return agree / total if total else None


def cohen_kappa(a: Sequence[Label | None], b: Sequence[Label | None]) -> float | None:
    """Cohen (1960): kappa = (p_o - p_e) / (1 - p_e) over the units both raters labelled, with p_e from each
    rater's own label frequencies. None with no shared unit; 1.0 when both raters always give one same label
    (p_e = 1, perfect but uninformative agreement)."""
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa needs label lists of equal length, got {len(a)} and {len(b)}")
    shared = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not shared:
        return None
    n = len(shared)
    p_o = sum(x == y for x, y in shared) / n
    count_a = Counter(x for x, _ in shared)
    count_b = Counter(y for _, y in shared)
    p_e = sum(count_a[c] * count_b[c] for c in count_a) / (n * n)
    if p_e == 1.0:
        return 1.0
    return (p_o - p_e) / (1.0 - p_e)


def _coincidences(units: Sequence[Sequence[Label | None]]) -> Counter:
    """Krippendorff's coincidence matrix o_ck = sum over units u of (ordered pairs (c, k) of labels from different
    raters in u) / (m_u - 1), m_u the number of labels in u; units with fewer than 2 labels are not pairable."""
    coincidences: Counter = Counter()
    for unit in units:
        values = _present(unit)
        m = len(values)
        if m < 2:
            continue
        for i, c in enumerate(values):
            for j, k in enumerate(values):
                if i != j:
                    coincidences[(c, k)] += 1.0 / (m - 1)
    return coincidences


def _alpha(units: Sequence[Sequence[Label | None]], delta2: Callable[[Label, Label], float]) -> float | None:
    """alpha = 1 - D_o / D_e for a difference function delta2 (Krippendorff 2011, sections C and E):
        D_o = sum_{c,k} o_ck delta2(c, k) / n,   D_e = sum_{c,k} n_c n_k delta2(c, k) / (n (n - 1)),
    n_c = sum_k o_ck, n = sum_c n_c; the common 1/n cancels, leaving 1 - (n - 1) sum o delta2 / sum n n delta2.
    None when fewer than two pairable labels exist or the pairable labels do not vary (D_e = 0)."""
    coincidences = _coincidences(units)
    n_c: Counter = Counter()
    for (c, _k), o in coincidences.items():
        n_c[c] += o
    n = sum(n_c.values())
    if n < 2:
        return None
    observed = sum(o * delta2(c, k) for (c, k), o in coincidences.items())
    expected = sum(n_c[c] * n_c[k] * delta2(c, k) for c in n_c for k in n_c) / (n - 1)
    if expected == 0:
        return None
    return 1.0 - observed / expected


def krippendorff_alpha_nominal(units: Sequence[Sequence[Label | None]]) -> float | None:
    """Krippendorff's alpha for nominal data with missing labels (Krippendorff 2011, "Computing Krippendorff's
    Alpha-Reliability", section C): delta2(c, k) = 0 if c == k else 1, so
        D_o ∝ sum_{c != k} o_ck,  D_e ∝ sum_{c != k} n_c n_k / (n - 1).
    None when fewer than two pairable labels exist or every pairable label is the same (D_e = 0)."""
    return _alpha(units, lambda c, k: float(c != k))


def krippendorff_alpha_interval(units: Sequence[Sequence[float | None]]) -> float | None:
    """Krippendorff's alpha for interval data (Krippendorff 2011, section E): delta2(c, k) = (c - k)^2, so a
    3-versus-4 disagreement on a Likert scale costs a ninth of a 1-versus-4 one (nominal alpha would count both
    alike). The agreement measure for HelpSteer2-style 0-4 attribute scores. None as for the nominal alpha."""
    return _alpha(units, lambda c, k: float((c - k) ** 2))
