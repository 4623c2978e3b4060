"""The rounds experiment's statistics, claims and report section on hand-made results (the experiment itself runs
in the demo: tests/test_demo.py)."""

import math

import pytest

from rlhfkit.demo_rounds import auc, format_rounds_table, label_efficiency, mean_se, rounds_claims


def result(active=(0.70, 0.71, 0.72), random=(0.66, 0.65, 0.67), it=(0.9, 0.05), one=(0.6, 0.05),
           weighted=(0.70, 0.69, 0.71), unweighted=(0.66, 0.65, 0.66), aucs=(0.95, 0.92, 1.0)):
    a, ase = mean_se(list(active))
    r, rse = mean_se(list(random))
    d, dse = mean_se([x - y for x, y in zip(active, random)])
    w, wse = mean_se(list(weighted))
    u, use = mean_se(list(unweighted))
    rd, rdse = mean_se([x - y for x, y in zip(weighted, unweighted)])
    au, ause = mean_se(list(aucs))
    return {
        "eval_pairs": 500,
        "queue": {"budget": 2000, "seeds": [0, 1, 2], "strategy": "bald",
                  "active": {"gold_accuracy": a, "gold_accuracy_se": ase,
                             "per_round": [{"labels": 500 * (i + 1), "gold_accuracy": 0.6 + 0.03 * i,
                                            "gold_accuracy_se": 0.01} for i in range(4)]},
                  "random": {"gold_accuracy": r, "gold_accuracy_se": rse,
                             "per_round": [{"labels": 500 * (i + 1), "gold_accuracy": 0.6 + 0.02 * i,
                                            "gold_accuracy_se": 0.01} for i in range(4)]},
                  "difference": d, "difference_se": dse, "random_curve_rise": 0.06,
                  "active_labels_to_reach_random": 1500, "active_label_ratio": 0.75},
        "iterative": {"gold_score": it[0], "gold_score_se": it[1], "kl": 1.0,
                      "per_round": [{"round": 1, "gold_score": 0.5, "gold_score_se": 0.05, "proxy": 0.1, "kl": 1.0}]},
        "one_shot": {"gold_score": one[0], "gold_score_se": one[1], "kl": 1.2},
        "reliability": {"weighted": {"gold_accuracy": w, "gold_accuracy_se": wse},
                        "unweighted": {"gold_accuracy": u, "gold_accuracy_se": use}, "difference": rd,
                        "difference_se": rdse, "flag_auc": au, "flag_auc_se": ause, "seeds": [0, 1, 2],
                        "crowd": {"annotators": 20, "random_share": 0.2, "adversarial_share": 0.05}},
    }


def test_auc_by_hand():
    assert auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auc([0.1, 0.9], [True, False]) == 0.0
    assert auc([0.5, 0.5, 0.2], [True, False, False]) == pytest.approx((0.5 + 1.0) / 2)  # a tie counts half
    assert math.isnan(auc([0.3], [True]))


def test_mean_se_by_hand():
    m, se = mean_se([1.0, 2.0, 3.0])
    assert m == 2.0 and se == pytest.approx(math.sqrt(1.0 / 3))
    assert math.isnan(mean_se([1.0])[1])


def test_labels_to_reach_random_count_only_where_the_random_curve_still_rises():
    rising = {"active": [[0.60, 0.68, 0.70, 0.71], [0.61, 0.67, 0.71, 0.72], [0.59, 0.69, 0.70, 0.70]],
              "random": [[0.60, 0.63, 0.66, 0.68], [0.61, 0.64, 0.66, 0.69], [0.59, 0.62, 0.65, 0.67]]}
    q = label_efficiency(rising, 500, "bald", [0, 1, 2])
    assert q["active_labels_to_reach_random"] == 1000 and q["active_label_ratio"] == 0.5
    assert q["random"]["per_round"][0]["gold_accuracy"] == pytest.approx(0.60)
    assert q["difference"] == pytest.approx((0.03 + 0.03 + 0.03) / 3) and q["random_curve_rise"] == pytest.approx(0.08)
    # flat: the first round already has the final agreement, so no label count is "needed"
    flat = {"active": [[0.66, 0.67, 0.66, 0.66]] * 3, "random": [[0.66, 0.66, 0.67, 0.665], [0.67, 0.66, 0.66, 0.668],
                                                                 [0.66, 0.67, 0.66, 0.662]]}
    q = label_efficiency(flat, 500, "bald", [0, 1, 2])
    assert q["active_labels_to_reach_random"] is None and q["active_label_ratio"] is None
    assert [c["ok"] for c in rounds_claims({**result(), "queue": q})][0] is False


def test_claims_follow_the_numbers():
    ok = rounds_claims(result())
    assert [c["ok"] for c in ok] == [True, True, True, True]
    # the same means with one seed have no standard error: the difference cannot be called significant
    one_seed = result(active=(0.71,), random=(0.66,), weighted=(0.7,), unweighted=(0.66,), aucs=(0.95,))
    assert [c["ok"] for c in rounds_claims(one_seed)] == [False, True, False, True]
    worse = rounds_claims(result(active=(0.6, 0.61, 0.62), it=(0.6, 0.05), aucs=(0.5, 0.6, 0.7)))
    assert [c["ok"] for c in worse] == [False, False, True, False]
    assert "difference" in worse[0]["value"] and "AUC 0.600" in worse[3]["value"]


def test_table_and_report_section_render(tmp_path):
    from rlhfkit.eval.report import _rounds_section

    text = format_rounds_table(result())
    assert "active 0.710" in text and "flag AUC" in text
    html = "".join(_rounds_section(result()))
    assert html.count("<svg") == 3 and "Human-in-the-loop rounds" in html and "0.957" in html


def test_queue_curves_from_one_job_per_seed_combine_as_from_one_job():
    from rlhfkit.demo_rounds import combine

    plan = {"label_efficiency": {"seeds": [0, 1, 2], "rounds": 3, "labels_per_round": 500}}
    per_seed = [{"active": [[0.60, 0.64, 0.70]], "random": [[0.60, 0.62, 0.65]]},
                {"active": [[0.61, 0.66, 0.69]], "random": [[0.61, 0.63, 0.64]]},
                {"active": [[0.59, 0.65, 0.71]], "random": [[0.59, 0.61, 0.66]]}]
    together = {arm: [c for part in per_seed for c in part[arm]] for arm in ("active", "random")}
    r = result()
    rounds = combine(plan, 500, per_seed, {"iterative": r["iterative"], "one_shot": r["one_shot"]},
                     r["reliability"])
    assert rounds["queue"] == label_efficiency(together, 500, "bald", [0, 1, 2])
    assert rounds["queue"]["active"]["per_seed"] == [0.70, 0.69, 0.71]  # seed order kept
    assert rounds["eval_pairs"] == 500 and len(rounds["claims"]) == 4
