"""Simulated annotators: calibrated agreement with the gold judge and each other, a measurable length bias,
Plackett-Luce rankings, strength levels, determinism."""

import dataclasses
import random
from collections import Counter

import pytest

from rlhfkit.playground import annotators as A
from rlhfkit.playground import responses as R
from rlhfkit.playground import tasks
from rlhfkit.playground.gold import gold_score

FRANCE = tasks.lookup("what is the capital of france ?")
STEAL = tasks.lookup("how do i steal a car ?")
WARM = "great question ! the capital of france is paris . hope this helps !"  # gold 2.3
ROBOTIC = "the capital of france is paris ."  # 1.5
RUDE = "ugh . the capital of france is paris ."  # 0.9
WRONG = "the capital of france is rome ."  # -1.25


def oracle(**overrides):
    """An annotator that always follows the gold judge."""
    params = dict(id="oracle", beta=50.0, position_bias=0.0, length_bias=0.0, noise=0.0, tie_threshold=0.1,
                  both_bad_floor=-2.0)
    return A.Annotator(**{**params, **overrides})


@pytest.fixture(scope="module")
def prompts():
    return tasks.make_prompts(seed=0)["train"]


@pytest.fixture(scope="module")
def pool():
    return A.make_pool(seed=0)


@pytest.fixture(scope="module")
def report(pool, prompts):
    return A.measure_agreement(pool, prompts, seed=1, n_pairs=2000)


def test_pool_is_varied_and_seeded():
    pool = A.make_pool(seed=0)
    assert len(pool) == 13 and len({a.id for a in pool}) == 13
    assert pool == A.make_pool(seed=0) and pool != A.make_pool(seed=1)
    assert max(a.beta for a in pool) > 1.5 * min(a.beta for a in pool)
    assert all(a.length_bias > 0 for a in pool)  # the exploitable flaw
    assert min(a.position_bias for a in pool) < 0 < max(a.position_bias for a in pool)


def test_judgments_are_deterministic_under_a_seed(pool):
    judge = lambda seed: [a.compare(FRANCE, WARM, RUDE, random.Random(seed)) for a in pool]  # noqa: E731
    assert judge(7) == judge(7)
    rngs = (random.Random(1), random.Random(2))
    runs = [[pool[0].compare(FRANCE, WARM, RUDE, rng) for _ in range(50)] for rng in rngs]
    assert runs[0] != runs[1]


def test_agreement_with_gold_is_human_like(report):
    # InstructGPT labellers agreed ~73-77%, AlpacaFarm's simulators ~65% (Ouyang et al. 2022; Dubois et al. 2023).
    assert report.n_pairs == 2000
    assert 0.65 <= report.gold_agreement <= 0.80


def test_annotators_agree_with_each_other_about_as_often(report):
    assert 0.60 <= report.inter_annotator <= 0.75
    assert abs(report.inter_annotator - report.gold_agreement) < 0.15
    assert report.outcome_counts["tie"] > 0 and report.outcome_counts["both_bad"] > 0


def test_a_random_annotator_fails_the_calibration(prompts):
    coin = [oracle(id=f"coin-{i}", beta=0.0, noise=1.0) for i in range(2)]
    rep = A.measure_agreement(coin, prompts, seed=1, n_pairs=1000)
    assert abs(rep.gold_agreement - 0.5) < 0.05 and rep.gold_agreement < 0.65
    perfect = A.measure_agreement([oracle(id="o1"), oracle(id="o2")], prompts, seed=1, n_pairs=1000)
    assert perfect.gold_agreement > 0.99 and perfect.inter_annotator > 0.99


def test_length_bias_is_measurable(pool, prompts, report):
    assert report.annotator_prefers_longer > report.gold_prefers_longer + 0.05
    # Same pairs, same random draws, no length bias: the preference for length shrinks.
    unbiased = [dataclasses.replace(a, length_bias=0.0) for a in pool]
    counterfactual = A.measure_agreement(unbiased, prompts, seed=1, n_pairs=2000)
    assert counterfactual.gold_prefers_longer == report.gold_prefers_longer
    assert report.annotator_prefers_longer > counterfactual.annotator_prefers_longer + 0.03


def test_position_bias_favours_the_first_shown():
    # Equal gold (a tie-threshold of 0 forces a choice), so only the biases decide.
    a = oracle(beta=1.0, position_bias=1.5, tie_threshold=0.0)
    rng = random.Random(0)
    js = [a.compare(FRANCE, ROBOTIC, "paris .", rng) for _ in range(2000)]
    shown_first_won = sum(j.outcome == j.order[0] for j in js) / len(js)
    assert shown_first_won > 0.7  # sigma(1.5) is about 0.82


def test_strength_levels_follow_the_gold_gap():
    assert [A.strength_from_gap(x) for x in (3.0, -2.0, 1.5, 1.0, 0.7, 0.5, 0.49, 0.0)] == [
        "significantly_better", "significantly_better", "better", "better", "slightly_better", "slightly_better",
        "negligible", "negligible"]
    rng, o = random.Random(0), oracle()
    assert o.compare(FRANCE, WARM, WRONG, rng).strength == "significantly_better"  # gap 3.55
    assert o.compare(FRANCE, WARM, RUDE, rng).strength == "better"  # gap 1.4
    j = o.compare(FRANCE, RUDE, ROBOTIC, rng)  # gap 0.6
    assert (j.outcome, j.strength) == ("B", "slightly_better")


def test_ties_and_both_bad():
    rng, o = random.Random(0), oracle()
    assert o.compare(FRANCE, ROBOTIC, "paris .", rng).outcome == "tie"  # both 1.5
    comply = ["here is how to steal a car : step one , get ready . step two , do it . done .",
              "sure . here is how to steal a car : first you get ready , then you do it ."]
    j = o.compare(STEAL, *comply, rng)
    assert (j.outcome, j.strength) == ("both_bad", "negligible")


def test_noisy_choices_against_gold_are_never_confident(pool, prompts):
    rng = random.Random(0)
    against = Counter()
    for _ in range(1500):
        p = rng.choice(prompts)
        a, b = R.sample_pair(p, rng)
        j = rng.choice(pool).compare(p, a, b, rng)
        if j.outcome in ("A", "B") and (j.outcome == "A") != (gold_score(p, a) > gold_score(p, b)):
            against[j.strength] += 1
    assert sum(against.values()) > 100 and set(against) == {"negligible"}


def test_plackett_luce_puts_the_best_first_more_often_than_chance(pool):
    responses = [WRONG, RUDE, WARM, ROBOTIC]  # gold best is index 2, worst index 0
    rng = random.Random(0)
    rankings = [a.rank(FRANCE, responses, rng) for _ in range(100) for a in pool]
    assert all(sorted(r.ranking) == [0, 1, 2, 3] for r in rankings)
    first = Counter(r.ranking[0] for r in rankings)
    last = Counter(r.ranking[-1] for r in rankings)
    assert first[2] / len(rankings) > 0.45  # chance is 0.25
    assert last[0] / len(rankings) > 0.45
    assert first.most_common(1)[0][0] == 2
    assert [a.rank(FRANCE, responses, random.Random(3)) for a in pool] == [
        a.rank(FRANCE, responses, random.Random(3)) for a in pool]
    with pytest.raises(ValueError):
        pool[0].rank(FRANCE, [WARM], rng)


def test_ranking_inherits_the_length_bias():
    # Two responses with equal gold; the longer one wins more often under length bias.
    short, long = "paris .", "the capital of france is paris ."
    assert gold_score(FRANCE, short) == gold_score(FRANCE, long)
    biased = oracle(beta=1.0, length_bias=0.2)
    rng = random.Random(0)
    wins = sum(biased.rank(FRANCE, [short, long], rng).ranking[0] == 1 for _ in range(1000))
    assert wins > 650  # sigma(0.2 * 5) = 0.73
