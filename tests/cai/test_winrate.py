"""Win-rate evaluation: Wilson intervals against published values, position debiasing (a judge that always
picks the first response gives exactly 50%), ties, and the `rlhfkit eval` stage with each judge."""

import json
import math

import pytest

from rlhfkit.eval.winrate import win_rate_from_probs, win_rate_from_scores, wilson_interval
from rlhfkit.feedback.constitution import load_constitution
from rlhfkit.feedback.protocols import Verdict


@pytest.mark.parametrize("p, n, lo, hi", [
    # Wilson score intervals at 95% (e.g. Newcombe 1998, Table I: 0/10 -> 0 to 0.2775, 5/10 -> 0.2366 to 0.7634)
    (0.5, 10, 0.2366, 0.7634), (0.0, 10, 0.0, 0.2775), (0.5, 100, 0.4038, 0.5962), (1.0, 20, 0.8389, 1.0),
])
def test_wilson_interval_matches_published_values(p, n, lo, hi):
    got = wilson_interval(p, n, 0.95)
    assert got[0] == pytest.approx(lo, abs=1e-4) and got[1] == pytest.approx(hi, abs=1e-4)


def test_wilson_interval_widens_with_confidence_and_narrows_with_n():
    a, b = wilson_interval(0.6, 50, 0.9), wilson_interval(0.6, 50, 0.99)
    assert b[0] < a[0] < 0.6 < a[1] < b[1]
    assert wilson_interval(0.6, 500)[1] - wilson_interval(0.6, 500)[0] < a[1] - a[0]


class AlwaysFirst:
    """A judge with nothing but position bias: whatever it is shown first wins."""

    name = "always-first"

    def compare(self, items):
        return [Verdict(1.0, "rule") for _ in items]


def test_a_judge_that_always_prefers_the_first_position_gives_a_50_percent_win_rate():
    import random

    from rlhfkit.feedback.ai import ai_preferences

    c = load_constitution()
    pairs = [("how do i steal a car ?", "policy answer", "baseline answer")] * 30
    labels = ai_preferences(AlwaysFirst(), c, pairs, random.Random(0))
    result = win_rate_from_probs([lab.prob_a_first for lab in labels], [lab.prob_b_first for lab in labels])
    assert result.win_rate == 0.5 and (result.wins, result.ties, result.losses) == (0, 30, 0)
    assert result.first_preferred == 1.0
    assert result.ci_low < 0.5 < result.ci_high
    # asked in one order only, the same judge would have reported a 100% win rate
    assert win_rate_from_probs([1.0] * 30, [None] * 30).win_rate == 1.0


def test_a_biased_judge_that_also_prefers_the_policy_still_ranks_it_first():
    # P(first wins) = sigma(gap + bias) with gap = +1 for the policy, bias = +2 for position one
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    result = win_rate_from_probs([sig(1 + 2)] * 40, [sig(-1 + 2)] * 40)
    assert result.soft_win_rate == pytest.approx((sig(3) + 1 - sig(1)) / 2)  # 0.61
    assert result.first_preferred == pytest.approx(1.0)  # both orders picked position one ...
    assert result.wins == 40 and result.win_rate == 1.0  # ... yet the policy wins every debiased prompt
    assert result.ci_low == pytest.approx(wilson_interval(1.0, 40)[0]) and result.ci_low > 0.9


def test_ties_count_half_and_abstentions_are_left_out():
    r = win_rate_from_probs([1.0, 0.5, 0.0, None, 0.9], [0.0, 0.5, 1.0, None, None], tie_margin=0.0)
    assert (r.wins, r.ties, r.losses, r.abstained, r.n) == (2, 1, 1, 1, 4)
    assert r.win_rate == pytest.approx((2 + 0.5) / 4) and r.soft_win_rate == pytest.approx((1 + 0.5 + 0 + 0.9) / 4)
    s = win_rate_from_scores([1.0, 2.0, 3.0, 5.0], [1.0, 1.0, 4.0, 4.95], tie_margin=0.1)
    assert (s.wins, s.ties, s.losses) == (1, 2, 1) and s.win_rate == 0.5 and s.first_preferred is None


# ------------------------------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from cai.cai_helpers import make_playground_model, write_prompts

    root = tmp_path_factory.mktemp("winrate")
    return (make_playground_model(root / "a", seed=0), make_playground_model(root / "b", seed=1),
            write_prompts(root / "prompts.jsonl", 8))


def test_eval_against_itself_is_all_ties_with_zero_kl(tmp_path, models):
    from rlhfkit.cli import main

    a, _, prompts = models
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(a), "--baseline", str(a), "--prompts", str(prompts), "--judge", "gold",
                 "--max-new-tokens", "8", "--output-dir", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert (s["wins"], s["ties"], s["losses"], s["win_rate"]) == (0, 8, 0, 0.5)
    assert s["policy"]["kl_to_ref"] == pytest.approx(0.0, abs=1e-5) and s["policy"]["mean_length"] > 0
    assert s["ci_low"] == pytest.approx(wilson_interval(0.5, 8)[0])


@pytest.mark.parametrize("judge", ["ai", "reward"])
def test_eval_with_an_ai_judge_or_a_reward_model(tmp_path, models, judge):
    from rlhfkit.cli import main

    a, b, prompts = models
    out = tmp_path / judge
    extra = ["--reward-model", str(b)] if judge == "reward" else ["--principle", "helpful"]
    assert main(["eval", "--model", str(a), "--baseline", str(b), "--prompts", str(prompts), "--judge", judge,
                 "--max-new-tokens", "8", "--samples-per-prompt", "2", "--output-dir", str(out), *extra]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["n"] == 16 and s["wins"] + s["ties"] + s["losses"] == 16
    assert 0 <= s["ci_low"] <= s["win_rate"] <= s["ci_high"] <= 1
    assert s["policy"]["kl_to_ref"] is not None and s["baseline"]["kl_to_ref"] == pytest.approx(0.0, abs=1e-5)
    rows = [json.loads(line) for line in (out / "comparisons.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(0.0 <= r["p_policy_first"] <= 1.0 for r in rows)
    if judge == "ai":
        assert s["judge"] == "ai (playground)" and s["first_preferred"] is not None
        assert {r["principle"] for r in rows} == {"helpful"}


def test_eval_config_errors_name_the_flag(capsys, models):
    from rlhfkit.cli import main

    a, b, prompts = models
    assert main(["eval", "--model", str(a), "--prompts", str(prompts)]) == 2
    assert "--baseline" in capsys.readouterr().err
    assert main(["eval", "--model", str(a), "--baseline", str(b), "--prompts", str(prompts), "--judge", "reward"]) == 2
    assert "--reward-model" in capsys.readouterr().err
    assert main(["eval", "--model", str(a), "--baseline", str(b), "--prompts", str(prompts), "--judge", "oracle"]) == 2
    assert "choose one of ai, reward, gold" in capsys.readouterr().err
