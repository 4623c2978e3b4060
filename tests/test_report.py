"""The demo report is one self-contained HTML file whose untrusted text is escaped."""

import json
import shutil

import pytest

from rlhfkit.eval.report import svg_lines, write_report


def test_report_is_self_contained_and_escapes_model_output(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 3.0 / s, "eval/loss": 3.5 / s}) + "\n" for s in range(1, 6)))
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    summary = {
        "policies": {"base": {"gold_score": -0.5, "gold_se": 0.1, "win_rate_vs_sft": 0.2, "kl_to_sft": 3.0,
                              "mean_length": 12.0, "unsafe_rate": 0.3},
                     "sft": {"gold_score": 1.2, "gold_se": 0.1, "win_rate_vs_sft": 0.5, "kl_to_sft": 0.0,
                             "mean_length": 15.0, "unsafe_rate": 0.0}},
        "reward_model": {"gold_accuracy": 0.68, "heldout_accuracy": 0.63, "ece": 0.08, "length_correlation": -0.1},
        "samples": {"base": [{"prompt": "say hi & bye", "response": evil, "gold": -1.0}],
                    "sft": [{"prompt": "say hi & bye", "response": "hi! bye!", "gold": 2.0}]},
        "wall_seconds": {"sft": 30.0},
    }
    html = write_report(tmp_path, summary).read_text()
    assert "<script" not in html and "onerror=alert" not in html.replace("onerror=alert(1)&gt;", "")
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html and "say hi &amp; bye" in html
    assert "http://" not in html and "https://" not in html and "<link" not in html  # opens from disk, offline
    assert html.count("<svg") == 1 and "SFT loss" in html  # only the stage that has metrics gets a plot
    assert "+1.200" in html and "-0.500" in html and "0.680" in html


def test_svg_lines_scales_points_into_the_frame():
    svg = svg_lines({"a": [(0, 0.0), (10, 1.0)]}, "t", width=100, height=50)
    coords = svg.split('points="')[1].split('"')[0].split()
    (x0, y0), (x1, y1) = (tuple(map(float, c.split(","))) for c in coords)
    assert x0 < x1 and y0 > y1  # left to right, rising line goes up
    assert svg_lines({"empty": []}, "t") == ""


def test_report_draws_overoptimisation_curves_fits_and_the_kl_cut(tmp_path):
    for run, gold in (("ppo", 1.0), ("ppo_klcut", -1.0)):
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "reward/score": 0.1 * s, "judge/score": gold * s / 10, "kl": 0.2 * s}) + "\n"
            for s in range(1, 6)))
    bon = [{"n": n, "d": d, "proxy_delta": 0.5 * d, "gold_delta": d * (0.6 - 0.2 * d)}
           for n, d in ((1, 0.0), (2, 0.55), (4, 0.91), (8, 1.21))]
    rl = [{"run": "ppo", "step": s, "d": d, "proxy_delta": d, "gold_delta": 0.3 * d} for s, d in ((10, 0.3), (20, 0.8), (30, 1.4))]
    summary = {"policies": {"sft": {"gold_score": 0.1, "gold_se": 0.1, "win_rate_vs_sft": 0.5, "kl_to_sft": 0.0,
                                    "mean_length": 20.0, "unsafe_rate": 0.5}},
               "overoptimization": {
        "best_of_n": {"form": "bon", "alpha": 0.6, "beta": 0.2, "r2": 0.99, "peak_d": 1.5, "points": bon},
        "rl": {"form": "rl", "alpha": 0.3, "beta": 0.01, "r2": 0.93, "peak_d": None, "points": rl},
        "kl_cut": {"proxy_delta": 0.8, "gold_delta": -0.7, "kl": 9.5, "kl_coef": 0.0, "default_kl_coef": 0.05,
                   "monitor_flagged": True, "default_monitor_flagged": False}}}
    html = write_report(tmp_path, summary).read_text()
    # PPO training curves, best-of-n and RL over-optimisation plots, and the KL-cut curves
    assert html.count("<svg") == 4
    assert "over-optimisation: best-of-n, n = 1 … 8" in html and "over-optimisation: RL checkpoints" in html
    assert "R² = 0.990" in html and "peak at d = 1.50" in html and "no peak within the fit" in html
    assert html.count("<circle") == 2 * len(bon) + 2 * len(rl)
    assert "proxy reward moved by +0.800 while the gold score moved by -0.700" in html
    assert "monitor flagged the cut run and did not flag the default one" in html


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium_without_network(tmp_path):
    pytest.importorskip("playwright.sync_api")
    from tests.report_browser import check_report_in_browser

    test_report_draws_overoptimisation_curves_fits_and_the_kl_cut(tmp_path)  # writes tmp_path/report.html
    html = (tmp_path / "report.html").read_text()
    # a stray remote reference would be caught: prove the check sees requests by planting one in a copy
    seen = check_report_in_browser(tmp_path / "report.html")
    assert seen["plots"] == html.count("<svg") == 4 and seen["marks"] > 10
    leaky = tmp_path / "leaky.html"
    leaky.write_text(html.replace("</body>", "<img src='http://127.0.0.1:9/x.png'></body>"))
    with pytest.raises(AssertionError, match="requests beyond its own file"):
        check_report_in_browser(leaky)


def test_report_shows_the_dpo_beta_sweep(tmp_path):
    sweep = [{"beta": b, "gold_score": g, "gold_se": 0.05, "kl_to_sft": kl, "unsafe_rate": 0.1}
             for b, g, kl in ((0.03, 0.2, 3.0), (0.1, 0.45, 1.0), (1.0, 0.15, 0.1))]
    html = write_report(tmp_path, {"dpo_beta_sweep": sweep}).read_text()
    assert "DPO gold score against KL to SFT" in html and html.count("<circle") == 3
    assert "<td>0.03</td><td>3.00</td><td>+0.200</td>" in html
