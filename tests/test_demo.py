"""`rlhfkit demo --quick` end to end on the playground: base -> SFT -> gold evaluation, cached reruns."""

import importlib.util
import json
import math
import shutil
import subprocess
import sys

import pytest

from rlhfkit.pipeline import DemoConfig, main
from rlhfkit.train import read_metrics


@pytest.mark.slow
@pytest.mark.timeout(3000)  # the quick demo alone is about 6 minutes on a 2-core machine, two stages at a time
def test_quick_demo_makes_sft_clearly_better_than_base_and_caches(tmp_path):
    out = tmp_path / "demo"
    # every opt-in part too (the two experiments, a beta sweep, RLOO), so the whole demo is covered
    summary = main(DemoConfig(output_dir=str(out), quick=True, progress=False, hhh=True, rounds=True,
                              dpo_beta_sweep=[0.3], rl_variants=["rloo"]))
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["policies"] == summary["policies"]
    base, sft, dpo = summary["policies"]["base"], summary["policies"]["sft"], summary["policies"]["dpo"]
    ppo, grpo = summary["policies"]["ppo"], summary["policies"]["grpo"]
    for policy in (base, sft, dpo, ppo, grpo):
        for key in ("gold_score", "gold_se", "win_rate_vs_sft", "kl_to_sft", "mean_length", "unsafe_rate"):
            assert isinstance(policy[key], float), key
    # SFT on contractor demonstrations beats the web-text base model by a wide, significant margin
    assert sft["gold_score"] - base["gold_score"] > 3 * (sft["gold_se"] ** 2 + base["gold_se"] ** 2) ** 0.5
    # the win rate against SFT (per prompt) agrees with the gold means wherever they differ by more than 2 s.e.
    for name, policy in summary["policies"].items():
        gap = policy["gold_score"] - sft["gold_score"]
        if abs(gap) > 2 * (policy["gold_se"] ** 2 + sft["gold_se"] ** 2) ** 0.5:
            assert (policy["win_rate_vs_sft"] > 0.5) == (gap > 0), name
    assert base["win_rate_vs_sft"] < 0.35 and base["kl_to_sft"] > 1.0
    assert {"pretrain", "sft", "label", "reward", "dpo", "ppo", "grpo", "grpo_klcut", "eval", "total"} <= set(summary["wall_seconds"])
    rm = summary["reward_model"]
    assert rm["pairs"] > 100 and rm["gold_accuracy"] > 0.6  # well above chance even in the quick run
    assert 0.6 < rm["label_gold_accuracy"] < 0.85  # the annotators are noisy like people
    for key in ("heldout_accuracy", "ece", "length_correlation"):
        assert isinstance(rm[key], float)
    assert dpo["kl_to_sft"] > 0 and ppo["kl_to_sft"] > 0
    # the KL leash holds: the same GRPO run with it cut walks several times further from SFT
    assert summary["overoptimization"]["kl_cut"]["kl"] > 3 * grpo["kl_to_sft"]
    # the labels went through the feedback store, and the reward model is an ensemble
    labels = json.loads((out / "data" / "labels.json").read_text())
    assert (out / "feedback.db").exists() and labels["train-sft"]["judgments"] > 50
    assert json.loads((out / "reward" / "summary.json").read_text())["ensemble_size"] == 2
    over = summary["overoptimization"]
    for key in ("best_of_n", "rl"):
        assert {"alpha", "beta", "r2", "peak_d"} <= set(over[key]), key
    points = over["best_of_n"]["points"]
    assert [p["n"] for p in points] == [1, 2, 4, 8, 16]
    # picking by the reward model raises its own score with n, and gold's too (0.67 at n = 4 in the quick and the
    # full demo; by n = 64 over-optimisation gives some of it back): it ranks candidates much as gold does
    assert all(a["proxy_delta"] < b["proxy_delta"] for a, b in zip(points, points[1:]))
    assert max(p["gold_delta"] for p in points) > 0.3
    assert {"proxy_delta", "gold_delta", "monitor_flagged"} <= set(over["kl_cut"])
    assert {c["claim"] for c in summary["claims"]} and all(isinstance(c["ok"], bool) for c in summary["claims"])
    bon = summary["policies"]["best_of_n"]
    assert bon["kl_to_sft"] == pytest.approx(math.log(16) - 15 / 16)  # the analytic bound for n = 16
    assert isinstance(bon["gold_score"], float) and 0.0 <= bon["win_rate_vs_sft"] <= 1.0
    # the helpful-harmless-honest experiment: five combinations and SFT, each scored per criterion with its rates
    hhh = summary["hhh"]
    assert list(hhh["policies"]) == ["sft", "helpful_only", "harmless_only", "sum", "gated", "lagrangian"]
    for name, policy in hhh["policies"].items():
        for key in ("helpfulness", "harmlessness", "honesty", "unsafe_rate", "over_refusal_rate"):
            assert math.isfinite(policy[key]) and math.isfinite(policy[key + "_se"]), (name, key)
    assert set(hhh["reward_models"]) == {"helpfulness", "harmlessness", "honesty"}
    assert hhh["policies"]["gated"]["reward_models"]["harmlessness"]["pairs"] > 50
    lagrangian = read_metrics(out / "hhh" / "lagrangian" / "metrics.jsonl")
    assert all("combine/lambda" in m and "reward/harmlessness" in m for m in lagrangian)
    # the tension is there even in the quick run: optimising helpfulness alone complies with harmful requests
    assert hhh["policies"]["helpful_only"]["unsafe_rate"] > hhh["policies"]["harmless_only"]["unsafe_rate"] + 0.2
    assert sum(c["claim"].startswith("the honesty reward model") for c in summary["claims"]) == 1
    assert {"hhh_pretrain", "hhh_sft", "hhh_reward_harmlessness", "hhh_gated", "hhh_eval"} <= set(summary["wall_seconds"])
    # the human-in-the-loop rounds: both queues, rounds against one shot, the crowd with bad annotators
    rounds = summary["rounds"]
    for arm in ("active", "random"):
        assert 0.4 < rounds["queue"][arm]["gold_accuracy"] < 1.0 and len(rounds["queue"][arm]["per_round"]) == 2
    for key in ("iterative", "one_shot"):
        assert math.isfinite(rounds[key]["gold_score"]) and rounds[key]["gold_score_se"] > 0
    rel = rounds["reliability"]
    assert 0.0 <= rel["flag_auc"] <= 1.0 and rel["weighted"]["gold_accuracy"] > 0.4
    assert sum(c["claim"].startswith("the reliability estimate finds") for c in summary["claims"]) == 1
    assert (out / "rounds" / "active-0" / "round-2" / "queue.pt").exists()  # round 2 was ordered by the ensemble
    report = (out / "report.html").read_text()
    # the gold score per policy, five training curves, best-of-n and RL over-optimisation, the KL cut, the HHH
    # plane, unsafe and over-refusal rates, the rounds (queues, rounds against one shot, the crowd) and the beta sweep
    assert report.count("<svg") == 16 and "best_of_n" in report and "<script" not in report
    assert "Helpfulness against harmlessness" in report and "Human-in-the-loop rounds" in report
    assert "Not in this run" not in report and summary["left_out"] == []
    assert [p["beta"] for p in summary["dpo_beta_sweep"]] == [0.1, 0.3] and "rloo" in summary["policies"]
    assert "DPO: the β sweep" in report
    if shutil.which("chromium") and importlib.util.find_spec("playwright"):
        from tests.report_browser import check_report_in_browser

        seen = check_report_in_browser(out / "report.html")
        assert seen["plots"] == 16 and seen["table_rows"] == 1 + len(summary["policies"])
    for name in ("base", "sft"):
        assert (out / name / "model.safetensors").exists() and (out / "configs" / "pretrain.yaml").exists()

    # a rerun reuses both finished training stages and reproduces the evaluation exactly (deterministic seed)
    again = main(DemoConfig(output_dir=str(out), quick=True, progress=False, hhh=True, rounds=True,
                            dpo_beta_sweep=[0.3], rl_variants=["rloo"]))
    for stage in ("pretrain", "sft", "label", "reward", "dpo", "ppo", "grpo", "grpo_klcut", "hhh_world", "hhh_sft",
                  "hhh_label", "hhh_reward_helpfulness", "hhh_gated"):
        assert stage not in again["wall_seconds"], stage
    assert again["policies"] == summary["policies"]
    assert again["hhh"]["policies"] == hhh["policies"]
    assert again["rounds"]["queue"] == rounds["queue"]  # the rounds runs are reused, not repeated

    # any stage reruns alone from the config the demo wrote
    proc = subprocess.run([sys.executable, "-m", "rlhfkit", "sft", "--config", str(out / "configs" / "sft.yaml"),
                           "--output-dir", str(tmp_path / "sft-again"), "--max-steps", "2", "--warmup-steps", "1",
                           "--progress", "false"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "sft-again" / "model.safetensors").exists()
