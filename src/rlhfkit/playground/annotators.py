"""Simulated annotators: noisy, biased people whose judgments are sampled from the hidden gold judge.

Annotator j prefers a over b with probability (a Bradley-Terry choice with per-annotator temperature, position
and length bias, in the spirit of AlpacaFarm's simulated annotators, Dubois et al. 2023)
    P(a > b) = sigma(beta_j (g(a) - g(b)) + delta_j s + lambda_j (len a - len b)),   s = +1 if a is shown first
then, with probability noise_j, replaces the label by a fair coin (AlpacaFarm's random-label noise). The gold
gap decides ties (|dg| < tau_j), "both bad" (max g < floor_j) and the Llama 2 strength level. lambda_j > 0 is the
flaw on purpose: annotators slightly prefer longer answers, which a reward model learns and PPO can exploit,
while the gold judge penalises rambling.

Like gold.py, this module stands in for people: only the labelling stage and evaluation may import it, never
training code. All randomness comes from the `random.Random` passed in, so a seed fixes every judgment.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from .gold import CRITERIA, criterion_score, gold_score, is_refusal
from .responses import BALANCED, Mixture, sample_pair
from .tasks import Prompt, split_words

OUTCOMES = ("A", "B", "tie", "both_bad")
# Llama 2's four strength levels (Touvron et al. 2023, section 3.2.1), strongest first.
STRENGTHS = ("significantly_better", "better", "slightly_better", "negligible")
# Lower edges of |gold gap| for each level but the last. A good demonstration sits ~2.5 above a wrong answer
# and ~0.8 above the same answer without pleasantries, so the levels spread over the pairs people see.
STRENGTH_EDGES = (2.0, 1.0, 0.5)


def strength_from_gap(gap: float) -> str:
    """The strength level for a gold gap (sign ignored)."""
    for edge, level in zip(STRENGTH_EDGES, STRENGTHS):
        if abs(gap) >= edge:
            return level
    return STRENGTHS[-1]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass(frozen=True)
class Judgment:
    """One pairwise judgment. `outcome` names the winner by argument position: "A" is the first response
    passed to `compare`, whichever side it was displayed on."""

    outcome: str  # one of OUTCOMES
    strength: str  # one of STRENGTHS; "negligible" for ties, both-bad and choices against the gold judge
    annotator: str
    order: tuple[str, str]  # display order, first shown first: ("A", "B") or ("B", "A")


@dataclass(frozen=True)
class RankJudgment:
    """A K-way ranking: indices into the responses passed to `rank`, best first."""

    ranking: tuple[int, ...]
    annotator: str


@dataclass(frozen=True)
class Annotator:
    """One simulated annotator's parameters (see the module docstring for the model)."""

    id: str
    beta: float  # rationality: logit per gold point; 0 would be random guessing
    position_bias: float  # delta: logit added to whichever response is shown first
    length_bias: float  # lambda: logit per token that one response is longer than the other
    noise: float  # probability that the label is replaced by a fair coin flip
    tie_threshold: float  # tau: gold gaps below this are judged a tie
    both_bad_floor: float  # both responses scoring below this gold value are judged "both bad"
    refusal_bias: float = 0.0  # gold points a refusing response seems better by (harmlessness raters' caution)
    behaviour: str = "honest"
    """honest: the model above. random: a click-through worker who picks A or B by a fair coin, never reading.
    adversarial: someone who reads carefully (the model above) and then answers the opposite."""

    def prob_first_wins(self, gold_a: float, gold_b: float, len_a: int, len_b: int, a_first: bool) -> float:
        """P(a > b) before label noise."""
        s = 1.0 if a_first else -1.0
        logit = self.beta * (gold_a - gold_b) + self.position_bias * s + self.length_bias * (len_a - len_b)
        return _sigmoid(logit)

    def compare(self, prompt: Prompt, a: str, b: str, rng: random.Random, shuffle: bool = True,
                criterion: str | None = None) -> Judgment:
        """Judge responses `a` and `b` to `prompt`, overall or on one criterion of the gold judge (helpfulness,
        harmlessness, honesty). With `shuffle` the display order is random (as a labelling interface does it);
        otherwise `a` is shown first."""
        a_first = rng.random() < 0.5 if shuffle else True
        order = ("A", "B") if a_first else ("B", "A")
        if self.behaviour == "random":
            return Judgment("A" if rng.random() < 0.5 else "B", STRENGTHS[-1], self.id, order)
        gold_a, gold_b = criterion_score(prompt, a, criterion), criterion_score(prompt, b, criterion)
        if self.refusal_bias:  # what this rater sees: a refusal looks safer than it is, whatever was asked
            gold_a += self.refusal_bias * is_refusal(a)
            gold_b += self.refusal_bias * is_refusal(b)
        gap = gold_a - gold_b
        # Ties and "both bad" come from the gold judge directly: people agree on those far more than on
        # which of two close answers is better.
        if max(gold_a, gold_b) < self.both_bad_floor:
            return Judgment("both_bad", STRENGTHS[-1], self.id, order)
        if abs(gap) < self.tie_threshold:
            return Judgment("tie", STRENGTHS[-1], self.id, order)
        p = self.prob_first_wins(gold_a, gold_b, len(split_words(a)), len(split_words(b)), a_first)
        a_wins = rng.random() < p
        if rng.random() < self.noise:  # careless: a coin decides (AlpacaFarm's label noise)
            a_wins = rng.random() < 0.5
        # An annotator who picked the worse response was not confidently right; a large margin on such a
        # pair would make a margin loss amplify the noise.
        if self.behaviour == "adversarial":
            a_wins = not a_wins
        agrees = a_wins == (gap > 0)
        return Judgment("A" if a_wins else "B", strength_from_gap(gap) if agrees else STRENGTHS[-1], self.id, order)

    def rank(self, prompt: Prompt, responses: Sequence[str], rng: random.Random) -> RankJudgment:
        """Rank `responses` best first by Plackett-Luce: repeatedly pick the next best with probability
        softmax(beta g + lambda len) over those left; with probability `noise` a pick is uniform instead."""
        if len(responses) < 2:
            raise ValueError(f"rank needs at least two responses, got {len(responses)}")
        utility = [self.beta * gold_score(prompt, r) + self.length_bias * len(split_words(r)) for r in responses]
        left = list(range(len(responses)))
        ranking: list[int] = []
        while len(left) > 1:
            if rng.random() < self.noise:
                pick = rng.randrange(len(left))
            else:
                top = max(utility[i] for i in left)  # subtract the max so exp never overflows
                weights = [math.exp(utility[i] - top) for i in left]
                pick = rng.choices(range(len(left)), weights=weights)[0]
            ranking.append(left.pop(pick))
        ranking.append(left[0])
        return RankJudgment(tuple(ranking), self.id)


def make_pool(seed: int = 0, n: int = 13) -> list[Annotator]:
    """`n` annotators with varied parameters (AlpacaFarm simulated 13). The ranges are calibrated so that on
    balanced playground pairs an annotator agrees with the gold judge on about 70% of strict preferences and
    two annotators agree with each other about as often as people do (60-70%)."""
    if n < 1:
        raise ValueError(f"make_pool needs n >= 1, got {n}")
    rng = random.Random(seed)
    pool = []
    for j in range(n):
        pool.append(Annotator(
            id=f"sim-{j:02d}",
            beta=math.exp(rng.uniform(math.log(0.5), math.log(2.0))),
            position_bias=rng.uniform(-0.3, 0.3),
            length_bias=rng.uniform(0.04, 0.12),
            noise=rng.uniform(0.2, 0.45),
            tie_threshold=rng.uniform(0.1, 0.4),
            both_bad_floor=rng.uniform(-1.75, -1.0),
        ))
    return pool


BEHAVIOURS = ("honest", "random", "adversarial")


def make_mixed_pool(seed: int = 0, n: int = 20, random_share: float = 0.2, adversarial_share: float = 0.05
                    ) -> list[Annotator]:
    """`make_pool(seed, n)` with round(random_share × n) of its annotators replaced by random clickers and
    round(adversarial_share × n) by adversaries (at least one each when the share is above 0), at positions drawn
    from the seed: the crowd a reliability estimate has to clean up."""
    from dataclasses import replace

    pool = make_pool(seed, n)
    rng = random.Random(seed + 7)
    n_random = max(1, round(random_share * n)) if random_share > 0 else 0
    n_adv = max(1, round(adversarial_share * n)) if adversarial_share > 0 else 0
    if n_random + n_adv > n:
        raise ValueError(f"{n_random} random and {n_adv} adversarial annotators do not fit in a pool of {n}")
    bad = rng.sample(range(n), n_random + n_adv)
    for k, j in enumerate(bad):
        pool[j] = replace(pool[j], behaviour="random" if k < n_random else "adversarial")
    return pool


# Per-criterion pools (`make_criterion_pools`): each criterion is judged by its own people with their own failings.
# Helpfulness raters like long answers (the length bias the overall pool has); harmlessness raters are consistent (a
# refusal or a compliance is easy to see) but cautious: a refusal looks more harmless to them than it is, even of
# a request that only sounds harmful (refusal bias, in gold points), which is how a harmlessness reward model
# comes to reward over-refusal; honesty raters are the noisiest (they have to notice that an answer could not
# have been known).
CRITERION_POOLS = {
    #                beta range   noise range   length bias   tie threshold  refusal bias
    "helpfulness": ((1.0, 2.5), (0.1, 0.3), (0.03, 0.08), (0.1, 0.3), (0.0, 0.0)),
    "harmlessness": ((1.0, 2.5), (0.1, 0.25), (0.0, 0.02), (0.2, 0.4), (0.5, 1.0)),
    "honesty": ((1.0, 2.0), (0.15, 0.3), (0.0, 0.04), (0.2, 0.4), (0.0, 0.0)),
}


def make_criterion_pools(seed: int = 0, n: int = 9) -> dict[str, list[Annotator]]:
    """`n` simulated annotators per criterion of the gold judge (CRITERION_POOLS gives each pool's ranges).
    Both-bad is left to the overall judgment: per criterion a pair is a preference or a tie."""
    if n < 1:
        raise ValueError(f"make_criterion_pools needs n >= 1, got {n}")
    rng = random.Random(seed)
    pools: dict[str, list[Annotator]] = {}
    for criterion in CRITERIA:
        (b0, b1), (n0, n1), (l0, l1), (t0, t1), (r0, r1) = CRITERION_POOLS[criterion]
        pools[criterion] = [Annotator(
            id=f"sim-{criterion[:4]}-{j:02d}",
            beta=math.exp(rng.uniform(math.log(b0), math.log(b1))),
            position_bias=rng.uniform(-0.3, 0.3),
            length_bias=rng.uniform(l0, l1),
            noise=rng.uniform(n0, n1),
            tie_threshold=rng.uniform(t0, t1),
            both_bad_floor=float("-inf"),
            refusal_bias=rng.uniform(r0, r1),
        ) for j in range(n)]
    return pools


# ------------------------------------------------------------------------------------------------ calibration
@dataclass(frozen=True)
class AgreementReport:
    """How the pool behaves on sampled pairs; fractions are over strict (A/B) preferences only."""

    n_pairs: int
    gold_agreement: float  # annotator chose the gold judge's better response
    inter_annotator: float  # two annotators on the same pair chose the same response
    annotator_prefers_longer: float  # of judgments between responses of different length
    gold_prefers_longer: float  # the gold judge on the same pairs
    outcome_counts: dict[str, int]


def measure_agreement(
    pool: Sequence[Annotator], prompts: Sequence[Prompt], seed: int, n_pairs: int = 2000,
    mixture: Mixture = BALANCED,
) -> AgreementReport:
    """Draw `n_pairs` response pairs on `prompts`, have two different annotators of `pool` judge each pair
    (as a labelling campaign with overlap would), and measure agreement and length preference."""
    if len(pool) < 2:
        raise ValueError("measure_agreement needs at least two annotators")
    rng = random.Random(seed)
    gold_hits = gold_total = inter_hits = inter_total = 0
    long_ann = long_gold = long_total = 0
    counts = dict.fromkeys(OUTCOMES, 0)
    for _ in range(n_pairs):
        prompt = rng.choice(prompts)
        a, b = sample_pair(prompt, rng, mixture)
        gap = gold_score(prompt, a) - gold_score(prompt, b)
        len_gap = len(split_words(a)) - len(split_words(b))
        first, second = rng.sample(list(pool), 2)
        outcomes = [first.compare(prompt, a, b, rng).outcome, second.compare(prompt, a, b, rng).outcome]
        for outcome in outcomes:
            counts[outcome] += 1
            if outcome not in ("A", "B"):
                continue
            if gap != 0:
                gold_total += 1
                gold_hits += (outcome == "A") == (gap > 0)
                if len_gap != 0:
                    long_total += 1
                    long_ann += (outcome == "A") == (len_gap > 0)
                    long_gold += (gap > 0) == (len_gap > 0)
        if all(o in ("A", "B") for o in outcomes):
            inter_total += 1
            inter_hits += outcomes[0] == outcomes[1]
    return AgreementReport(
        n_pairs=n_pairs,
        gold_agreement=gold_hits / max(gold_total, 1),
        inter_annotator=inter_hits / max(inter_total, 1),
        annotator_prefers_longer=long_ann / max(long_total, 1),
        gold_prefers_longer=long_gold / max(long_total, 1),
        outcome_counts=counts,
    )
