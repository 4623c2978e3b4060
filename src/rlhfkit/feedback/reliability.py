"""Annotator reliability for pairwise labels: the one-coin Dawid & Skene (1979) model fit by EM, gold items
clamping the truth, a Beta prior on each annotator's accuracy. It gives each annotator an estimated accuracy with
its uncertainty and a flag (ok, random, adversarial, too few labels), and each judgment the posterior probability
that its chosen response is truly the better one: the `confidence` column of an export with reliability.

The model (Dawid & Skene 1979, "Maximum likelihood estimation of observer error-rates using the EM algorithm",
Applied Statistics 28(1), with one accuracy per annotator instead of a confusion matrix): each item i has a latent
truth z_i in {A, B} ("A" is the item's response 0, whichever side it was shown on), P(z_i = A) = pi; annotator k
gives the true answer with probability a_k and the other one otherwise, independently across judgments. EM
alternates P(z_i | labels) (E-step) and the MAP a_k, pi given those posteriors (M-step); a Beta(alpha, beta)
prior on a_k, as in Raykar et al. 2010 ("Learning from crowds", JMLR 11), keeps an annotator with one or two
judgments off 0 and 1. Ties, "both bad" and skips say nothing about which response is better, so they are not
used, only counted.

Why this model and not Bradley-Terry with a temperature per annotator (P(k picks A) = sigmoid(beta_k (r(A) -
r(B)))): that needs a reward model r, so it can run only after a refit, and it charges the reward model's own
errors to the annotators (in a rounds loop the model trained on the labels would judge its labellers). Dawid &
Skene needs nothing but the labels, runs in milliseconds inside the labelling app while labels arrive, and gold
items anchor it to known answers (they also break the model's A/B mirror symmetry, which labels alone break only
through the majority EM starts from). One coin rather than Dawid & Skene's full 2x2 confusion matrix: the queue
shuffles which response is shown first, so an annotator's side bias ("always the left one") is, in the A/B of
item indices, just random answering; one parameter per annotator is also all that a few dozen labels support.

The Beta prior's default, Beta(3, 2), counts as two right and one wrong judgment: a newcomer is presumed about
two-thirds right until gold and overlap say otherwise (InstructGPT's trained labellers agreed with each other
about 73% of the time, Ouyang et al. 2022, arXiv 2203.02155: accuracies near 0.8 if both err independently). A
symmetric Beta(2, 2) would make every unverified annotator a coin flip, so the lone labels of, say, a single AI
judge without gold would export with confidence 0.5 and teach a reward model nothing."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from rlhfkit.errors import UserError

PRIOR = (3.0, 2.0)
"""Beta(alpha, beta) prior on an annotator's accuracy (see the module docstring)."""
MIN_INFORMATIVE = 10
"""Fewer informative judgments (on gold items, or on items someone else also judged A or B) flag "too_few"."""
RANDOM_BELOW = 0.6
"""An annotator whose accuracy is confidently below this is flagged "random" (0.5 is a coin)."""
FLAG_PROBABILITY = 0.9
"""The posterior probability that "confidently" means, for the "random" and "adversarial" flags."""
FLAGS = ("ok", "random", "adversarial", "too_few")
DIRECTIONS = ("A", "B")


@dataclass(frozen=True)
class Label:
    """One judgment as the model reads it: outcome A, B, tie, both_bad or skip (A = the item's response 0); gold
    is the item's known answer (A, B, tie or both_bad) when it is a gold item."""

    item_id: int
    annotator: str
    outcome: str
    gold: str | None = None


@dataclass(frozen=True)
class AnnotatorReliability:
    name: str
    accuracy: float
    """The MAP estimate of a_k: P(this annotator's A/B label is the true one)."""
    accuracy_se: float
    """The standard deviation of a_k's Beta posterior over informative judgments, Beta(alpha + right, beta +
    wrong) with right = the expected number of them that are right under the fit (lone labels are left out, as
    they carry almost no evidence about their annotator)."""
    judgments: int
    """A/B judgments (what the model uses)."""
    unused: int
    """Ties, "both bad" and skips."""
    gold_judgments: int
    """Non-skip judgments of gold items."""
    gold_accuracy: float | None
    """The share of gold_judgments equal to the gold answer (None without any)."""
    overlap_judgments: int
    """A/B judgments of non-gold items that someone else also judged A or B."""
    informative: int
    """A/B judgments of A/B gold items plus overlap_judgments: those that can disagree with something."""
    flag: str
    """too_few (fewer than min_informative informative judgments), adversarial (P(a_k < 0.5) >= flag_probability),
    random (P(a_k < random_below) >= flag_probability), else ok; checked in that order."""
    suspicion: float
    """P(a_k < random_below) under the posterior above: higher = more likely random or adversarial (for ranking
    annotators; it is the random flag's statistic)."""


@dataclass
class ReliabilityReport:
    """The fit over one or more projects (a run's rounds pooled: an annotator is one person across rounds)."""

    annotators: list[AnnotatorReliability]
    """Every annotator with a judgment, by name."""
    posteriors: dict[tuple[int, str], float]
    """(item id, annotator) -> P(z_i = that judgment's label | all labels), for each A/B judgment: the
    probability that its chosen response is truly better. 1 or 0 on A/B gold items; 0.5 on gold items whose
    answer is a tie or "both bad" (neither response is better)."""
    items: dict[int, float]
    """Item id -> P(z_i = A | all labels), for each item with an A/B judgment (gold items: 1, 0 or 0.5)."""
    class_prior: float
    """pi = P(z = A) over non-gold items, MAP under Beta(2, 2)."""
    unused: dict[str, int]
    """Judgments the model does not use, by outcome (tie, both_bad, skip)."""
    criterion: str | None = None
    """The rubric criterion whose verdicts were fit; None for whole-item outcomes."""
    iterations: int = 0
    converged: bool = True
    settings: dict[str, Any] = field(default_factory=dict)
    """prior, min_informative, random_below and flag_probability as used."""

    def annotator(self, name: str) -> AnnotatorReliability | None:
        return next((a for a in self.annotators if a.name == name), None)

    def confidence(self, item_id: int, annotator: str) -> float | None:
        """P(the annotator's chosen response of the item is truly better); None for a tie, "both bad" or skip."""
        return self.posteriors.get((item_id, annotator))

    def to_dict(self) -> dict[str, Any]:
        """The report without the per-judgment posteriors, as JSON-ready values (floats to 4 places)."""
        def rounded(value: Any) -> Any:
            return round(value, 4) if isinstance(value, float) else value

        return {"criterion": self.criterion, "class_prior": round(self.class_prior, 4),
                "iterations": self.iterations, "converged": self.converged, "unused": dict(self.unused),
                "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in self.settings.items()},
                "annotators": [{k: rounded(v) for k, v in asdict(a).items()} for a in self.annotators]}


# ----------------------------------------------------------------------------------------------- Beta CDF
def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), the CDF of Beta(a, b) at x, by its continued fraction
    (DLMF 8.17.22-24, evaluated with the modified Lentz method as in Numerical Recipes section 6.4); the symmetry
    I_x(a, b) = 1 - I_{1-x}(b, a) keeps the fraction where it converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float, max_terms: int = 500, eps: float = 1e-15) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_terms + 1):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # the even step d_{2m}
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # the odd step d_{2m+1}
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _beta_sd(a: float, b: float) -> float:
    return math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))


# -------------------------------------------------------------------------------------------------- EM
def check_settings(prior: tuple[float, float], min_informative: int, random_below: float,
                   flag_probability: float) -> None:
    """UserError naming the first setting out of range."""
    if len(prior) != 2 or not all(isinstance(p, (int, float)) and math.isfinite(p) and p > 1 for p in prior):
        raise UserError(f"the accuracy prior must be Beta(alpha, beta) with alpha and beta above 1 (so the MAP "
                        f"estimate stays inside (0, 1)), got {prior!r}; e.g. (3, 2).")
    if isinstance(min_informative, bool) or not isinstance(min_informative, int) or min_informative < 0:
        raise UserError(f"min_informative must be a whole number of judgments >= 0, got {min_informative!r}.")
    if not (isinstance(random_below, (int, float)) and 0.5 < random_below < 1):
        raise UserError(f"random_below must lie between 0.5 (a coin) and 1, got {random_below!r}; e.g. 0.6.")
    if not (isinstance(flag_probability, (int, float)) and 0.5 < flag_probability < 1):
        raise UserError(f"flag_probability must lie between 0.5 and 1, got {flag_probability!r}; e.g. 0.9.")


def dawid_skene(labels: Sequence[Label], *, criterion: str | None = None, prior: tuple[float, float] = PRIOR,
                min_informative: int = MIN_INFORMATIVE, random_below: float = RANDOM_BELOW,
                flag_probability: float = FLAG_PROBABILITY, tol: float = 1e-9, max_iter: int = 1000,
                ) -> ReliabilityReport:
    """Fit the one-coin model to the labels (one per (item, annotator)) and report per annotator and per judgment.

    EM starts from the soft majority of each item (the share of its A/B labels that say A) and the gold answers;
    each iteration's M-step is a_k = (alpha - 1 + sum_j q_j) / (alpha + beta - 2 + n_k) over k's A/B judgments j,
    q_j = P(z_i = label_j), and pi = (sum_i P(z_i = A) + 1) / (n + 2) over the n non-gold items; the E-step is
    logit P(z_i = A) = logit pi + sum_j s_j logit a_k(j), s_j = +1 for an A label and -1 for a B label. It stops
    when no parameter moves by tol. Gold items answered A or B keep that answer as their truth; gold items
    answered tie or "both bad" have no A/B truth, so they are left out of the fit (their A/B labels get
    posterior 0.5 and still count for gold accuracy)."""
    check_settings(prior, min_informative, random_below, flag_probability)
    alpha, beta = float(prior[0]), float(prior[1])
    names = sorted({lab.annotator for lab in labels})
    ann_index = {n: k for k, n in enumerate(names)}
    gold_of: dict[int, str] = {lab.item_id: lab.gold for lab in labels if lab.gold is not None}
    unused = {"tie": 0, "both_bad": 0, "skip": 0}
    per_unused = np.zeros(len(names), dtype=np.int64)
    gold_seen = np.zeros(len(names), dtype=np.int64)
    gold_right = np.zeros(len(names), dtype=np.int64)
    used: list[Label] = []
    undirected: list[Label] = []  # A/B labels of tie / both_bad gold items
    for lab in labels:
        k = ann_index[lab.annotator]
        if lab.gold is not None and lab.outcome != "skip":
            gold_seen[k] += 1
            gold_right[k] += lab.outcome == lab.gold
        if lab.outcome not in DIRECTIONS:
            if lab.outcome not in unused:
                raise UserError(f"item {lab.item_id}: outcome {lab.outcome!r} is not A, B, tie, both_bad or skip.")
            unused[lab.outcome] += 1
            per_unused[k] += 1
        elif lab.gold is not None and lab.gold not in DIRECTIONS:
            undirected.append(lab)
        else:
            used.append(lab)

    item_ids = sorted({lab.item_id for lab in used})
    item_index = {i: n for n, i in enumerate(item_ids)}
    n_items, n_ann = len(item_ids), len(names)
    j_item = np.array([item_index[lab.item_id] for lab in used], dtype=np.int64)
    j_ann = np.array([ann_index[lab.annotator] for lab in used], dtype=np.int64)
    j_sign = np.array([1.0 if lab.outcome == "A" else -1.0 for lab in used])  # +1: says z = A
    clamp = np.full(n_items, np.nan)
    for i, n in item_index.items():
        if i in gold_of:
            clamp[n] = 1.0 if gold_of[i] == "A" else 0.0
    clamped = ~np.isnan(clamp)
    free = ~clamped

    votes = np.bincount(j_item, minlength=n_items).astype(float)
    r = np.bincount(j_item, weights=(j_sign > 0).astype(float), minlength=n_items) / np.maximum(votes, 1)
    r[clamped] = clamp[clamped]  # r_i = P(z_i = A)
    n_k = np.bincount(j_ann, minlength=n_ann).astype(float)

    def m_step(r: np.ndarray) -> tuple[np.ndarray, float]:
        q = np.where(j_sign > 0, r[j_item], 1.0 - r[j_item])
        acc = (alpha - 1 + np.bincount(j_ann, weights=q, minlength=n_ann)) / (alpha + beta - 2 + n_k)
        pi = (r[free].sum() + 1.0) / (free.sum() + 2.0)
        return acc, float(pi)

    def e_step(acc: np.ndarray, pi: float) -> np.ndarray:
        w = np.log(acc) - np.log1p(-acc)
        logit = math.log(pi) - math.log1p(-pi) + np.bincount(j_item, weights=j_sign * w[j_ann], minlength=n_items)
        out = np.exp(-np.logaddexp(0.0, -logit))  # sigmoid without overflow
        out[clamped] = clamp[clamped]
        return out

    acc, pi = m_step(r)
    iterations, converged = 0, n_items == 0
    while not converged and iterations < max_iter:
        iterations += 1
        r = e_step(acc, pi)
        new_acc, new_pi = m_step(r)
        converged = bool(np.all(np.abs(new_acc - acc) <= tol)) and abs(new_pi - pi) <= tol
        acc, pi = new_acc, new_pi
    r = e_step(acc, pi)  # the posterior of the final parameters

    # informative judgments: on A/B gold items, or on items with another A/B label
    q = np.where(j_sign > 0, r[j_item], 1.0 - r[j_item])
    informative = clamped[j_item] | (votes[j_item] >= 2)
    overlap = ~clamped[j_item] & (votes[j_item] >= 2)
    right = np.bincount(j_ann, weights=np.where(informative, q, 0.0), minlength=n_ann)
    n_inf = np.bincount(j_ann, weights=informative.astype(float), minlength=n_ann)
    n_overlap = np.bincount(j_ann, weights=overlap.astype(float), minlength=n_ann)

    annotators = []
    for k, name in enumerate(names):
        a_post, b_post = alpha + right[k], beta + (n_inf[k] - right[k])
        below_coin = beta_cdf(0.5, a_post, b_post)
        suspicion = beta_cdf(random_below, a_post, b_post)
        if n_inf[k] < min_informative:
            flag = "too_few"
        elif below_coin >= flag_probability:
            flag = "adversarial"
        elif suspicion >= flag_probability:
            flag = "random"
        else:
            flag = "ok"
        annotators.append(AnnotatorReliability(
            name=name, accuracy=float(acc[k]), accuracy_se=_beta_sd(a_post, b_post), judgments=int(n_k[k]),
            unused=int(per_unused[k]), gold_judgments=int(gold_seen[k]),
            gold_accuracy=float(gold_right[k] / gold_seen[k]) if gold_seen[k] else None,
            overlap_judgments=int(n_overlap[k]), informative=int(n_inf[k]), flag=flag, suspicion=float(suspicion)))

    posteriors = {(lab.item_id, lab.annotator): float(p) for lab, p in zip(used, q)}
    items = {i: float(r[n]) for i, n in item_index.items()}
    for lab in undirected:  # neither response is better: the Bradley-Terry target of a tie
        posteriors[(lab.item_id, lab.annotator)] = 0.5
        items[lab.item_id] = 0.5
    return ReliabilityReport(annotators=annotators, posteriors=posteriors, items=items, class_prior=pi,
                             unused=unused, criterion=criterion, iterations=iterations, converged=converged,
                             settings={"prior": (alpha, beta), "min_informative": min_informative,
                                       "random_below": random_below, "flag_probability": flag_probability})
