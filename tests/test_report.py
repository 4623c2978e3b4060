"""The demo report is one self-contained HTML file whose untrusted text is escaped."""

import json

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
