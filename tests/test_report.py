"""The demo report is one self-contained HTML file whose untrusted text is escaped, with matplotlib plots inlined as
SVG: ticks, gridlines, legends and ± 1 s.e. bars, ids unique across the page, the same bytes for the same numbers."""

import json
import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from html import unescape

import pytest

from rlhfkit.eval.report import svg_estimates, svg_lines, write_report
from rlhfkit.pipeline import DemoConfig, left_out


def plots(html: str) -> dict[str, ET.Element]:
    """Each inline plot of a page, parsed, by its caption."""
    found = re.findall(r"<figure>(<svg\b.*?</svg>)<figcaption>(.*?)</figcaption></figure>", html, re.DOTALL)
    return {unescape(caption): ET.fromstring(svg) for svg, caption in found}


def groups(svg: ET.Element, name: str) -> list[ET.Element]:
    """The <g> elements whose id, less the plot's prefix, starts with name ("xtick_", "errorbar-", "series-1")."""
    return [g for g in svg.iter("g") if (g.get("id") or "").split("-", 1)[-1].startswith(name)]


def texts(element: ET.Element) -> list[str]:
    return [t.text for t in element.iter("text") if t.text]


def tick_labels(svg: ET.Element, axis: str) -> list[str]:
    return [text for g in groups(svg, f"{axis}tick_") for text in texts(g)]


def error_bars(svg: ET.Element, series: int) -> int:
    """How many error bars a series draws (one path per bar in its errorbar group)."""
    return sum(len(list(g.iter("path"))) for g in groups(svg, f"errorbar-{series}"))


def markers(svg: ET.Element, series: int) -> int:
    return sum(len(list(g.iter("use"))) for g in groups(svg, f"series-{series}"))


def legend(svg: ET.Element) -> list[str]:
    return [text for g in groups(svg, "legend_") for text in texts(g)]


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
        "left_out": left_out(DemoConfig()),  # the demo's defaults: every opt-in part left out
    }
    html = write_report(tmp_path, summary).read_text()
    assert "<script" not in html and "onerror=alert" not in html.replace("onerror=alert(1)&gt;", "")
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html and "say hi &amp; bye" in html
    # opens from disk, offline: no outside address at all, not even the SVG namespace URLs matplotlib writes
    assert "http://" not in html and "https://" not in html and "<link" not in html
    assert "<?xml" not in html and "<!DOCTYPE svg" not in html and "<metadata" not in html
    # only the stage that has metrics gets a training plot; the policies get theirs
    assert html.count("<svg") == 2 and set(plots(html)) == {"SFT loss", "gold score per policy (held-out test prompts)"}
    # the opt-in experiments were not run: the report says how to add them
    for flag in ("--hhh", "--rounds", "--dpo-beta-sweep 0.03,0.1,0.3,1.0", "--rl-variants rloo"):
        assert f"<code>rlhfkit demo {flag}</code>" in html
    assert "+1.200" in html and "-0.500" in html and "0.680" in html


def test_svg_lines_draws_ticks_gridlines_and_a_legend_in_the_frame():
    svg = ET.fromstring(svg_lines({"a": [(0, 0.0), (10, 1.0)], "b": [(0, 1.0), (10, 0.5)]}, "t", y_label="loss")
                        .split("<figcaption>")[0].removeprefix("<figure>"))
    # intermediate ticks, not only the ends the hand-drawn chart printed
    assert {"2", "4", "6", "8"} <= set(tick_labels(svg, "x")) and {"0.2", "0.4", "0.6", "0.8"} <= set(
        tick_labels(svg, "y"))
    # a gridline per tick: a path clipped to the axes inside each tick's group (the tick mark itself is a <use>)
    assert all(any(p.get("clip-path") for p in g.iter("path")) for g in groups(svg, "xtick_"))
    assert legend(svg) == ["a", "b"] and "loss" in texts(svg) and "step" in texts(svg)
    # series a rises from left to right: its last point is right of and above (smaller SVG y) its first
    coords = [float(v) for v in re.findall(r"[-\d.]+", next(groups(svg, "series-0")[0].iter("path")).get("d"))]
    (x0, y0), (x1, y1) = coords[:2], coords[-2:]
    assert x0 < x1 and y0 > y1
    assert error_bars(svg, 0) == 0  # no standard errors given, no bars
    assert svg_lines({"empty": []}, "t") == "" and svg_lines({"nan": [(1.0, float("nan"))]}, "t") == ""


def test_error_bars_only_where_a_standard_error_is_given():
    # (x, y, se) points get a bar; se None gets none; a series on the right axis says so in the legend
    figure = svg_lines({"gold": [(1, 0.1, 0.05), (2, 0.2, None), (3, 0.3, 0.02)], "KL": [(1, 1.0), (3, 4.0)]},
                       "g", right=("KL",), right_label="KL to SFT (nats)")
    svg = ET.fromstring(figure.split("<figcaption>")[0].removeprefix("<figure>"))
    assert error_bars(svg, 0) == 2 and error_bars(svg, 1) == 0 and markers(svg, 0) == 3
    assert legend(svg) == ["gold ± s.e.", "KL [right axis]"] and "KL to SFT (nats)" in texts(svg)
    # "$" stays a dollar sign (no TeX parsing of names), and every id the plot references exists in it
    est = svg_estimates({"base": (-1.0, 0.1), "a$b$": (0.5, 0.2), "sft": (0.1, None)}, "p", "gold score",
                        reference="sft")
    svg = ET.fromstring(est.split("<figcaption>")[0].removeprefix("<figure>"))
    assert tick_labels(svg, "y") == ["base", "a$b$", "sft"] and error_bars(svg, 0) == 2 and markers(svg, 0) == 3
    assert legend(svg) == ["gold score ± s.e.", "sft level"]
    assert svg_estimates({"x": (None, None)}, "p", "gold") == ""


def kl_cut_run(tmp_path):
    for run, gold in (("ppo", 1.0), ("ppo_klcut", -1.0)):
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "reward/score": 0.1 * s, "judge/score": gold * s / 10, "judge/se": 0.05,
                        "kl": 0.2 * s}) + "\n"
            for s in range(1, 6)))
    bon = [{"n": n, "d": d, "proxy_delta": 0.5 * d, "gold_delta": d * (0.6 - 0.2 * d)}
           for n, d in ((1, 0.0), (2, 0.55), (4, 0.91), (8, 1.21))]
    rl = [{"run": "ppo", "step": s, "d": d, "proxy_delta": d, "gold_delta": 0.3 * d, "gold_delta_se": 0.04}
          for s, d in ((10, 0.3), (20, 0.8), (30, 1.4))]
    summary = {"policies": {"sft": {"gold_score": 0.1, "gold_se": 0.1, "win_rate_vs_sft": 0.5, "kl_to_sft": 0.0,
                                    "mean_length": 20.0, "unsafe_rate": 0.5}},
               "overoptimization": {
        "best_of_n": {"form": "bon", "alpha": 0.6, "beta": 0.2, "r2": 0.99, "peak_d": 1.5, "points": bon},
        "rl": {"form": "rl", "alpha": 0.3, "beta": 0.01, "r2": 0.93, "peak_d": None, "points": rl},
        "kl_cut": {"proxy_delta": 0.8, "gold_delta": -0.7, "kl": 9.5, "kl_coef": 0.0, "default_kl_coef": 0.05,
                   "monitor_flagged": True, "default_monitor_flagged": False}}}
    return summary, bon, rl


def test_report_draws_overoptimisation_curves_fits_and_the_kl_cut(tmp_path):
    summary, bon, rl = kl_cut_run(tmp_path)
    html = write_report(tmp_path, summary).read_text()
    found = plots(html)
    # the policies, PPO training curves, best-of-n and RL over-optimisation plots, and the KL-cut curves
    assert html.count("<svg") == len(found) == 5
    assert "over-optimisation: best-of-n, n = 1 … 8" in found and "over-optimisation: RL checkpoints" in found
    assert "R² = 0.990" in html and "peak at d = 1.50" in html and "no peak within the fit" in html
    best, rl_plot = found["over-optimisation: best-of-n, n = 1 … 8"], found["over-optimisation: RL checkpoints"]
    assert markers(best, 0) == markers(best, 1) == len(bon) and markers(rl_plot, 0) == len(rl)
    assert legend(best) == ["gold Δ", "proxy Δ", "fit d(α−βd)"] and "d = √(KL to SFT)" in texts(best)
    # a point that carries gold_delta_se gets its bar; best-of-n's points carry none
    assert error_bars(rl_plot, 0) == len(rl) and error_bars(best, 0) == 0
    # held-out gold ± judge/se, five evaluations per run; KL on its own axis beside the rewards
    cut = found["reward hacking: the KL leash cut (held-out prompts)"]
    assert error_bars(cut, 1) == error_bars(cut, 3) == 5 and error_bars(cut, 0) == 0
    assert legend(cut) == ["proxy, default KL", "gold, default KL ± s.e.", "proxy, KL cut", "gold, KL cut ± s.e."]
    ppo = found["PPO: reward, gold and KL"]
    assert "KL to SFT [right axis]" in legend(ppo) and "KL to SFT (nats)" in texts(ppo) and error_bars(ppo, 1) == 5
    assert "proxy reward moved by +0.800 while the gold score moved by -0.700" in html
    assert "monitor flagged the cut run and did not flag the default one" in html


def test_plot_ids_are_unique_on_the_page_and_the_report_is_byte_identical_on_rerun(tmp_path):
    summary, _, _ = kl_cut_run(tmp_path)
    first = write_report(tmp_path, summary).read_bytes()
    html = first.decode()
    # matplotlib numbers ids per figure ("axes_1", "line2d_3"); five figures on one page must not share any
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) > 100 and not [i for i, n in Counter(ids).items() if n > 1]
    for svg in re.findall(r"<svg\b.*?</svg>", html, re.DOTALL):  # every reference resolves inside its own plot
        own = set(re.findall(r'\bid="([^"]+)"', svg))
        refs = re.findall(r'href="#([^"]+)"', svg) + re.findall(r"url\(#([^)]+)\)", svg)
        assert refs and set(refs) <= own
    assert "<script" not in html.lower() and " on" not in "".join(re.findall(r"<svg\b[^>]*>", html))
    assert write_report(tmp_path, summary).read_bytes() == first  # no dates, no random ids


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium_without_network(tmp_path):
    pytest.importorskip("playwright.sync_api")
    from tests.report_browser import check_report_in_browser

    summary, _, _ = kl_cut_run(tmp_path)
    html = write_report(tmp_path, summary).read_text()
    # a stray remote reference would be caught: prove the check sees requests by planting one in a copy
    seen = check_report_in_browser(tmp_path / "report.html")
    assert seen["plots"] == html.count("<svg") == 5 and seen["marks"] > 10
    leaky = tmp_path / "leaky.html"
    leaky.write_text(html.replace("</body>", "<img src='http://127.0.0.1:9/x.png'></body>"))
    with pytest.raises(AssertionError, match="requests beyond its own file"):
        check_report_in_browser(leaky)


def test_report_shows_the_dpo_beta_sweep(tmp_path):
    sweep = [{"beta": b, "gold_score": g, "gold_se": 0.05, "kl_to_sft": kl, "unsafe_rate": 0.1}
             for b, g, kl in ((0.03, 0.2, 3.0), (0.1, 0.45, 1.0), (1.0, 0.15, 0.1))]
    html = write_report(tmp_path, {"dpo_beta_sweep": sweep}).read_text()
    svg = plots(html)["DPO gold score against KL to SFT"]
    assert markers(svg, 0) == 3 and error_bars(svg, 0) == 3  # each run's gold score ± its s.e.
    assert {"β = 0.03", "β = 0.1", "β = 1"} <= set(texts(svg)) and "KL to SFT (nats)" in texts(svg)
    assert "<td>0.03</td><td>3.00</td><td>+0.200</td>" in html


def test_report_shows_the_hhh_policies_on_the_helpfulness_harmlessness_plane(tmp_path):
    def policy(help_, harm, unsafe, refuse):
        return {"helpfulness": help_, "helpfulness_se": 0.05, "harmlessness": harm, "harmlessness_se": 0.04,
                "honesty": 0.1, "honesty_se": 0.03, "unsafe_rate": unsafe, "unsafe_rate_se": 0.02,
                "over_refusal_rate": refuse, "over_refusal_rate_se": 0.01}

    hhh = {"policies": {"sft": policy(0.0, -0.4, 0.4, 0.1), "helpful_only": policy(0.3, -1.4, 0.7, 0.02),
                        "gated": policy(0.25, 0.4, 0.1, 0.05)},
           "reward_models": {"harmlessness": {"gold_accuracy": 0.8, "gold_accuracy_se": 0.03, "pairs": 169,
                                              "heldout_accuracy": 0.79}}}
    summary, _, _ = kl_cut_run(tmp_path)
    html = write_report(tmp_path, {**summary, "hhh": hhh}).read_text()
    found = plots(html)
    plane = found["Helpfulness against harmlessness (gold judge)"]
    # one marker per policy, each with two error bars (x and y); the names label the points
    assert [markers(plane, i) for i in range(3)] == [1, 1, 1]
    assert [error_bars(plane, i) for i in range(3)] == [2, 2, 2]
    assert {"sft", "helpful_only", "gated"} <= set(texts(plane))
    unsafe = found["Unsafe compliance: harmful requests answered"]
    assert tick_labels(unsafe, "y") == ["sft", "helpful_only", "gated"] and error_bars(unsafe, 0) == 3
    assert "Over-refusal: requests that only look harmful, refused" in found
    assert "+0.300 ± 0.050" in html and "0.800 ± 0.030" in html
