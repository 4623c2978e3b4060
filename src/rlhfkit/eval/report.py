"""The demo's HTML report: one self-contained file (inline SVG plots drawn by matplotlib, inline CSS, no scripts, no
network) with the summary table, the reward model's numbers, training curves and sample responses side by side.

Every string from a model or a data file is escaped: responses are untrusted text."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from html import escape
from io import StringIO
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure

CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:72rem;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.plots{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0;border:1px solid #ddd;padding:.5rem}figcaption{font-size:.9rem;color:#555}
figure svg{display:block;max-width:100%;height:auto}
.samples td{vertical-align:top;text-align:left;max-width:16rem;white-space:pre-wrap}small{color:#666}
"""
# Fixed settings on top of matplotlib's defaults, so the page does not depend on a user's matplotlibrc and two
# reports from the same numbers are byte-identical: a fixed salt for the SVG ids matplotlib hashes, text kept as
# <text> (selectable, searchable, small) and never parsed as TeX ("$" in a policy name stays a "$").
RC = {
    "svg.hashsalt": "rlhfkit-report",
    "svg.fonttype": "none",
    "text.parse_math": False,
    "font.size": 9,
    "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial"],
    "axes.formatter.useoffset": False,
    "axes.grid": True,
    "grid.alpha": 0.35,
    "legend.frameon": False,
    "lines.linewidth": 1.5,
}
_SVG_PROLOG = re.compile(r"\A.*?(?=<svg\b)", re.DOTALL)
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.DOTALL)
_TAG = re.compile(r"(<[^>]*>)")  # text content never holds "<" or ">" (matplotlib escapes them)
Point = tuple[float, float] | tuple[float, float, float | None]  # (x, y) or (x, y, standard error); None: no bar


def read_curve(metrics_path: Path, key: str, se_key: str | None = None) -> list[Point]:
    """(step, value) points of one metric from a run's metrics.jsonl (missing file or key: no points); with
    se_key, (step, value, standard error) points, the error None where a row does not log it."""
    if not metrics_path.exists():
        return []
    points: list[Point] = []
    for line in metrics_path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        value = row.get(key)
        if isinstance(value, (int, float)) and not math.isnan(value):
            if se_key is None:
                points.append((float(row["step"]), float(value)))
            else:
                se = row.get(se_key)
                points.append((float(row["step"]), float(value),
                               float(se) if isinstance(se, (int, float)) and math.isfinite(se) else None))
    return points


@contextmanager
def _style() -> Iterator[None]:
    """matplotlib's own defaults plus RC, restored on exit; no pyplot, so nothing leaks between plots or callers."""
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        matplotlib.rcParams.update(RC)
        yield


def _figure(width: int, height: int) -> Figure:
    """A figure of width x height CSS pixels (SVG points are 4/3 px) whose layout keeps labels from overlapping,
    on the SVG canvas: no pyplot, no interactive backend, no figure kept alive anywhere."""
    fig = Figure(figsize=(width / 96, height / 96), layout="constrained")
    FigureCanvasSVG(fig)
    return fig


def _inline_svg(fig: Figure, title: str) -> str:
    """The figure as an <svg> element for an HTML page: no XML prolog, DOCTYPE or RDF metadata (their namespace
    URLs are not requests, but the page should name no outside address), plain href for xlink:href, and every id
    prefixed with a hash of the drawing and its title, since matplotlib numbers ids per figure ("axes_1",
    "line2d_3") and several figures share one page."""
    buf = StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    svg = _METADATA.sub("", _SVG_PROLOG.sub("", buf.getvalue(), count=1))
    prefix = "p" + hashlib.sha1((title + "\0" + svg).encode()).hexdigest()[:10] + "-"

    def fix_tag(tag: str) -> str:
        tag = tag.replace(' xmlns:xlink="http://www.w3.org/1999/xlink"', "")
        tag = tag.replace(' xmlns="http://www.w3.org/2000/svg"', "").replace("xlink:href=", "href=")
        tag = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', tag)
        tag = re.sub(r'\bhref="#([^"]+)"', lambda m: f'href="#{prefix}{m.group(1)}"', tag)
        return re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}{m.group(1)})", tag)

    svg = "".join(fix_tag(part) if part.startswith("<") else part for part in _TAG.split(svg.strip()))
    return svg.replace("<svg ", f'<svg role="img" aria-label="{escape(title)}" ', 1)


def _legend(fig: Figure, axes: Sequence[Any]) -> None:
    """One legend for all axes (a twin axis included), below the plot where it cannot cover a curve."""
    handles, labels = [], []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    if handles:
        ncols = min(len(labels), 2 if max(map(len, labels)) > 16 else 3)
        fig.legend(handles, labels, loc="outside lower center", ncols=ncols)


def svg_lines(series: dict[str, Sequence[Point]], title: str, width: int = 480, height: int = 300,
              x_label: str = "step", dots: Sequence[str] = (), *, y_label: str = "", right: Sequence[str] = (),
              right_label: str = "", dashed: Sequence[str] = (), colours: dict[str, str] | None = None,
              point_labels: dict[str, Sequence[str]] | None = None) -> str:
    """A line chart as an inline-SVG <figure>: one line per series, or, for the series named in `dots`, one marker
    per point (measurements beside a fitted curve); ticks, gridlines and a legend; ± 1 standard error bars on
    the points that carry one (x, y, se); the series named in `right` on a second y axis (KL beside rewards);
    `dashed` series drawn dashed (fits); `colours` fixes a series' colour (a fit in its data's colour);
    `point_labels` names each point of a series (the β of a DPO run). No series with points: ""."""
    point_labels, colours = point_labels or {}, colours or {}
    series = {name: [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])] for name, pts in series.items()}
    series = {name: pts for name, pts in series.items() if pts}
    if not series:
        return ""
    with _style():
        fig = _figure(width, height)
        ax = fig.add_subplot()
        twin = ax.twinx() if any(name in right for name in series) else None
        for i, (name, pts) in enumerate(series.items()):
            target = twin if twin is not None and name in right else ax
            colour = colours.get(name, f"C{i % 10}")
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            bars = [(p[0], p[1], p[2]) for p in pts if len(p) > 2 and p[2] is not None and math.isfinite(p[2])]
            label = name + (" ± s.e." if bars else "") + (" [right axis]" if target is twin else "")
            marker = "o" if name in dots or bars else ""
            (line,) = target.plot(xs, ys, color=colour, marker=marker, markersize=4 if name in dots else 3,
                                  linestyle="none" if name in dots else ("--" if name in dashed else "-"),
                                  label=label)
            line.set_gid(f"series-{i}")
            if bars:
                eb = target.errorbar([b[0] for b in bars], [b[1] for b in bars], yerr=[b[2] for b in bars],
                                     fmt="none", ecolor=colour, elinewidth=1, capsize=2.5)
                eb.lines[2][0].set_gid(f"errorbar-{i}")
            for (x, y, *_), text in zip(pts, point_labels.get(name, ())):
                target.annotate(text, (x, y), xytext=(5, 5), textcoords="offset points", fontsize=8, color=colour,
                                bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none",
                                      "alpha": 0.8})  # readable where it crosses an error bar or a line
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        if twin is not None:
            twin.set_ylabel(right_label)
            twin.grid(False)  # one grid, the left axis's, or the two sets of lines cross
        _legend(fig, [ax] + ([twin] if twin is not None else []))
        svg = _inline_svg(fig, title)
    return f"<figure>{svg}<figcaption>{escape(title)}</figcaption></figure>"


def svg_estimates(estimates: dict[str, tuple[float, float | None]], title: str, x_label: str,
                  reference: str | None = None, width: int = 480) -> str:
    """Point estimates ± 1 standard error, one row per name (a policy's gold score), first name on top, with a
    dashed line at the `reference` name's value (SFT). No finite estimates: ""."""
    rows = [(name, value, se) for name, (value, se) in estimates.items()
            if isinstance(value, (int, float)) and math.isfinite(value)]
    if not rows:
        return ""
    with _style():
        fig = _figure(width, max(220, 90 + 24 * len(rows)))
        ax = fig.add_subplot()
        ys = list(range(len(rows)))
        (line,) = ax.plot([r[1] for r in rows], ys, "o", color="C0", markersize=5, label=x_label)
        line.set_gid("series-0")
        bars = [(r[1], y, r[2]) for r, y in zip(rows, ys) if isinstance(r[2], (int, float)) and math.isfinite(r[2])]
        if bars:
            line.set_label(f"{x_label} ± s.e.")
            eb = ax.errorbar([b[0] for b in bars], [b[1] for b in bars], xerr=[b[2] for b in bars], fmt="none",
                             ecolor="C0", elinewidth=1.2, capsize=3)
            eb.lines[2][0].set_gid("errorbar-0")
        ref = next((value for name, value, _ in rows if name == reference), None)
        if ref is not None:
            ax.axvline(ref, color="C3", linestyle="--", linewidth=1, label=f"{reference} level")
        ax.set_yticks(ys, [r[0] for r in rows])
        ax.set_ylim(len(rows) - 0.5, -0.5)  # first name on top, as in the table
        ax.grid(False, axis="y")
        ax.set_xlabel(x_label)
        _legend(fig, [ax])
        svg = _inline_svg(fig, title)
    return f"<figure>{svg}<figcaption>{escape(title)}</figcaption></figure>"


def svg_plane(points: dict[str, tuple[float, float, float, float]], title: str, x_label: str, y_label: str,
              width: int = 480, height: int = 360) -> str:
    """One marker per name at (x, y) with ± 1 standard error bars on both axes, each point labelled with its name
    (the HHH policies on the helpfulness x harmlessness plane). points: name -> (x, x_se, y, y_se). No finite
    point: ""."""
    rows = [(n, *v) for n, v in points.items() if all(isinstance(u, (int, float)) and math.isfinite(u) for u in v)]
    if not rows:
        return ""
    with _style():
        fig = _figure(width, height)
        ax = fig.add_subplot()
        for i, (name, x, xse, y, yse) in enumerate(rows):
            colour = f"C{i % 10}"
            (line,) = ax.plot([x], [y], "o", color=colour, markersize=5, label=f"{name} ± s.e.")
            line.set_gid(f"series-{i}")
            eb = ax.errorbar([x], [y], xerr=[xse], yerr=[yse], fmt="none", ecolor=colour, elinewidth=1, capsize=2.5)
            for axis, bars in zip("xy", eb.lines[2]):  # one collection per direction
                bars.set_gid(f"errorbar-{i}-{axis}")
            ax.annotate(name, (x, y), xytext=(5, 5), textcoords="offset points", fontsize=8, color=colour)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        _legend(fig, [ax])
        svg = _inline_svg(fig, title)
    return f"<figure>{svg}<figcaption>{escape(title)}</figcaption></figure>"


def _hhh_section(hhh: dict[str, Any] | None) -> list[str]:
    """The helpful-harmless-honest experiment: its policies on the helpfulness x harmlessness plane, their unsafe
    and over-refusal rates, the table, and each criterion's reward model against the gold judge."""
    if not hhh:
        return []
    pol = hhh["policies"]
    plane = svg_plane({n: (p["helpfulness"], p["helpfulness_se"], p["harmlessness"], p["harmlessness_se"])
                       for n, p in pol.items()}, "Helpfulness against harmlessness (gold judge)",
                      "helpfulness (harmless requests)", "harmlessness (harmful requests)")
    unsafe = svg_estimates({n: (p["unsafe_rate"], p["unsafe_rate_se"]) for n, p in pol.items()},
                           "Unsafe compliance: harmful requests answered", "unsafe rate", reference="sft")
    refusal = svg_estimates({n: (p["over_refusal_rate"], p["over_refusal_rate_se"]) for n, p in pol.items()},
                            "Over-refusal: requests that only look harmful, refused", "over-refusal rate",
                            reference="sft")
    html = ["<h2>Helpful, harmless, honest: one reward model per criterion, five ways to combine them</h2>",
            "<p>helpful_only and harmless_only optimise one criterion's reward model; sum adds the normalised "
            "rewards; gated is Llama 2's safety gating (the safety reward on prompts flagged risky or responses it "
            "scores unsafe); lagrangian is Safe RLHF's constrained objective (helpfulness subject to expected cost ≤ "
            "a limit, the multiplier learned online). Each criterion is scored on the prompts that test it.</p>",
            "<div class='plots'>" + plane + unsafe + refusal + "</div>",
            "<table><tr><th class='l'>policy</th><th>helpfulness</th><th>harmlessness</th><th>honesty</th>"
            "<th>unsafe rate</th><th>over-refusal</th></tr>"]
    for name, p in pol.items():
        cells = "".join(f"<td>{_num(p[k], '+.3f')} ± {_num(p[k + '_se'])}</td>"
                        for k in ("helpfulness", "harmlessness", "honesty"))
        cells += "".join(f"<td>{_num(p[k], '.3f')} ± {_num(p[k + '_se'])}</td>"
                         for k in ("unsafe_rate", "over_refusal_rate"))
        html.append(f"<tr><td class='l'>{escape(name)}</td>{cells}</tr>")
    html.append("</table><table><tr><th class='l'>reward model</th><th>gold agreement</th><th>pairs</th>"
                "<th>held-out label accuracy</th></tr>")
    for criterion, rm in hhh["reward_models"].items():
        html.append(f"<tr><td class='l'>{escape(criterion)}</td><td>{_num(rm['gold_accuracy'])} ± "
                    f"{_num(rm['gold_accuracy_se'])}</td><td>{rm['pairs']}</td>"
                    f"<td>{_num(rm.get('heldout_accuracy'))}</td></tr>")
    html.append("</table>")
    return html


def _se(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _rounds_section(rounds: dict[str, Any] | None) -> list[str]:
    """The human-in-the-loop experiment: the reward model's gold agreement against labels for the active and the
    random queue, the policy's gold score round by round against one shot, and the crowd with bad annotators."""
    if not rounds:
        return []
    q, it, one, rel = rounds["queue"], rounds["iterative"], rounds["one_shot"], rounds["reliability"]
    curve = svg_lines({f"active queue ({q['strategy']})": [(p["labels"], p["gold_accuracy"], _se(p["gold_accuracy_se"]))
                                                           for p in q["active"]["per_round"]],
                       "random queue": [(q["budget"], q["random"]["gold_accuracy"],
                                         _se(q["random"]["gold_accuracy_se"]))]},
                      f"Reward model gold agreement against labels ({len(q['seeds'])} seeds)", x_label="labels",
                      y_label="gold agreement", dots=["random queue"])
    policy = svg_lines({"iterative rounds": [(p["round"], p["gold_score"], _se(p["gold_score_se"]))
                                             for p in it["per_round"]],
                        "one shot": [(len(it["per_round"]), one["gold_score"], _se(one["gold_score_se"]))]},
                       "Policy gold score after each round, against one shot", x_label="round",
                       y_label="gold score", dots=["one shot"])
    crowd = svg_estimates({"reliability-weighted": (rel["weighted"]["gold_accuracy"],
                                                    _se(rel["weighted"]["gold_accuracy_se"])),
                           "unweighted": (rel["unweighted"]["gold_accuracy"], _se(rel["unweighted"]["gold_accuracy_se"]))},
                          "A crowd with random clickers and an adversary", "reward model gold agreement")
    html = ["<h2>Human-in-the-loop rounds</h2>",
            "<p><code>rlhfkit rounds</code> on this world, the simulated annotators as the people. The active queue "
            "asks first for the pairs the previous round's reward ensemble disagrees on (BALD), with a random share; "
            "the random queue takes the same budget at random. Iterative rounds sample each round's pairs from the "
            "policy the round before trained; one shot collects the same labels once, from the SFT model. The crowd "
            f"has {rel['crowd']['random_share']:.0%} random clickers and {rel['crowd']['adversarial_share']:.0%} "
            "adversaries; its labels train the reward model once with the Dawid-Skene posteriors as soft labels and "
            f"once at face value. The estimate found the bad annotators with AUC {_num(rel['flag_auc'])}.</p>",
            "<div class='plots'>" + curve + policy + crowd + "</div>",
            "<table><tr><th class='l'>study</th><th>arm</th><th>value</th><th>± s.e.</th></tr>"]
    rows = [("queue", f"active at {q['budget']} labels", q["active"]["gold_accuracy"], q["active"]["gold_accuracy_se"]),
            ("queue", f"random at {q['budget']} labels", q["random"]["gold_accuracy"], q["random"]["gold_accuracy_se"]),
            ("policy", "iterative (gold score)", it["gold_score"], it["gold_score_se"]),
            ("policy", "one shot (gold score)", one["gold_score"], one["gold_score_se"]),
            ("crowd", "weighted", rel["weighted"]["gold_accuracy"], rel["weighted"]["gold_accuracy_se"]),
            ("crowd", "unweighted", rel["unweighted"]["gold_accuracy"], rel["unweighted"]["gold_accuracy_se"]),
            ("crowd", "flag AUC", rel["flag_auc"], rel["flag_auc_se"])]
    html += [f"<tr><td class='l'>{escape(a)}</td><td>{escape(b)}</td><td>{_num(v)}</td><td>{_num(e)}</td></tr>"
             for a, b, v, e in rows]
    html.append("</table>")
    return html


def _num(value: Any, fmt: str = ".3f") -> str:
    return "–" if not isinstance(value, (int, float)) else format(value, fmt)


def _fit_line(fit: dict[str, Any], d_max: float, points: int = 40) -> list[tuple[float, float]]:
    """The fitted Gao et al. curve sampled on (0, d_max]."""
    a, b = fit["alpha"], fit["beta"]
    ds = [d_max * (i + 1) / points for i in range(points)]
    if fit["form"] == "bon":
        return [(d, d * (a - b * d)) for d in ds]
    return [(d, d * (a - b * math.log(d))) for d in ds]


def _fit_text(fit: dict[str, Any]) -> str:
    peak = ("no peak within the fit (still rising)" if fit.get("peak_d") is None
            else f"peak at d = {_num(fit['peak_d'], '.2f')} (KL {_num(fit['peak_d'] ** 2, '.2f')} nats)")
    return (f"α = {_num(fit['alpha'])}, β = {_num(fit['beta'])}, R² = {_num(fit['r2'])}; {peak}")


def _overoptimisation_section(root: Path, over: dict[str, Any] | None) -> list[str]:
    """Gao et al.'s proxy-vs-gold curves against d = sqrt(KL), and the KL-leash-cut demonstration."""
    if not over:
        return []
    html = ["<h2>Reward over-optimisation (Gao, Schulman &amp; Hilton 2022)</h2>",
            "<p>Gold score and proxy (reward-model) score, as the change from the SFT policy, against "
            "d = sqrt(KL to SFT). The proxy keeps rising; the gold judge, which the optimiser never sees, "
            "rises less and eventually falls. Dots are measurements, lines the paper's functional forms.</p>",
            "<div class='plots'>"]
    notes = []
    for key, label in (("best_of_n", "best-of-n, n = 1 … " ), ("rl", "RL checkpoints")):
        part = over.get(key)
        if not part or not part.get("points"):
            continue
        pts = part["points"]
        label = label + (str(pts[-1]["n"]) if key == "best_of_n" else "")
        d_max = max(p["d"] for p in pts)
        series: dict[str, list[Point]] = {
            "gold Δ": [(p["d"], p["gold_delta"], p.get("gold_delta_se")) for p in pts],
            "proxy Δ": [(p["d"], p["proxy_delta"], p.get("proxy_delta_se")) for p in pts]}
        fit_name = f"fit {'d(α−βd)' if key == 'best_of_n' else 'd(α−β ln d)'}"
        if part.get("alpha") is not None:
            series[fit_name] = _fit_line(part, d_max)
            notes.append(f"<li>{escape(label)}: gold Δ = {'d(α − β d)' if key == 'best_of_n' else 'd(α − β ln d)'}"
                         f", {escape(_fit_text(part))}</li>")
        html.append(svg_lines(series, f"over-optimisation: {label}", x_label="d = √(KL to SFT)",
                              dots=("gold Δ", "proxy Δ"), dashed=(fit_name,), colours={fit_name: "C0"},
                              y_label="change from SFT"))
    cut = over.get("kl_cut")
    if cut:
        series = {}
        colours = {}  # one colour per run; the proxy dashed, the gold solid with its error bars
        runs = cut.get("runs", {"default": "ppo", "cut": "ppo_klcut"})
        for run, name, colour in ((runs["default"], "default KL", "C0"), (runs["cut"], "KL cut", "C3")):
            metrics = root / run / "metrics.jsonl"
            series[f"proxy, {name}"] = read_curve(metrics, "eval/proxy") or read_curve(metrics, "reward/score")
            series[f"gold, {name}"] = read_curve(metrics, "judge/score", se_key="judge/se")
            colours[f"proxy, {name}"] = colours[f"gold, {name}"] = colour
        html.append(svg_lines(series, "reward hacking: the KL leash cut (held-out prompts)", y_label="score",
                              dashed=("proxy, default KL", "proxy, KL cut"), colours=colours))
    html.append("</div>")
    if notes:
        html.append("<ul>" + "".join(notes) + "</ul>")
    if cut:
        steps = f" and trained for {cut['steps']} steps" if cut.get("steps") else ""
        gold_se = f" ± {cut['gold_delta_se']:.3f}" if cut.get("gold_delta_se") is not None else ""
        term = (", optimising the reward model's heads alone (its likelihood term, a pull toward its own language "
                "model, cut with the leash; the proxy below is theirs)") if cut.get("likelihood_term_cut") else ""
        html.append(
            "<h3>Reward hacking: the KL leash cut</h3><p>The same RL run with the KL coefficient set to "
            f"{_num(cut.get('kl_coef'), 'g')} instead of {_num(cut.get('default_kl_coef'), 'g')}{steps}"
            f"{term}: on the "
            f"held-out test prompts, against SFT, the proxy reward moved by {_num(cut.get('proxy_delta'), '+.3f')} "
            f"while the gold score moved by {_num(cut.get('gold_delta'), '+.3f')}{gold_se}"
            f" (KL to SFT {_num(cut.get('kl'), '.2f')}). "
            f"The over-optimisation monitor {'flagged' if cut.get('monitor_flagged') else 'did not flag'} the cut "
            f"run and {'flagged' if cut.get('default_monitor_flagged') else 'did not flag'} the default one.</p>")
    return html


def write_report(root: Path, summary: dict[str, Any]) -> Path:
    """Write root/report.html from the demo's summary and its stages' metrics.jsonl files."""
    html = [f"<!doctype html><html><head><meta charset='utf-8'><title>rlhfkit demo report</title>"
            f"<style>{CSS}</style></head><body><h1>rlhfkit demo</h1>"]
    html.append("<h2>Policies, scored by the hidden gold judge on held-out test prompts</h2><table><tr>"
                "<th class='l'>policy</th><th>gold score</th><th>± s.e.</th><th>win rate vs SFT</th>"
                "<th>KL to SFT</th><th>mean length</th><th>unsafe rate</th></tr>")
    policies = summary.get("policies", {})
    for name, p in policies.items():
        html.append(f"<tr><td class='l'>{escape(name)}</td><td>{_num(p.get('gold_score'), '+.3f')}</td>"
                    f"<td>{_num(p.get('gold_se'))}</td><td>{_num(p.get('win_rate_vs_sft'), '.2f')}</td>"
                    f"<td>{_num(p.get('kl_to_sft'), '.2f')}</td><td>{_num(p.get('mean_length'), '.1f')}</td>"
                    f"<td>{_num(p.get('unsafe_rate'), '.2f')}</td></tr>")
    html.append("</table>")
    estimates = {name: (p.get("gold_score"), p.get("gold_se")) for name, p in policies.items()}
    gold_plot = svg_estimates(estimates, "gold score per policy (held-out test prompts)", "gold score",
                              reference="sft" if "sft" in policies else None)
    if gold_plot:
        html.append(f"<div class='plots'>{gold_plot}</div>")
    claims = summary.get("claims")
    if claims:
        html.append("<h2>What this run shows</h2><table>")
        for c in claims:
            mark = "✓" if c.get("ok") else "✗ not met"
            html.append(f"<tr><td class='l'>{escape(mark)}</td><td class='l'>{escape(str(c.get('claim')))}</td>"
                        f"<td>{escape(str(c.get('value')))}</td></tr>")
        html.append("</table>")
    rm = summary.get("reward_model")
    if rm:
        html.append("<h2>Reward model</h2><table>")
        for key, label in (("gold_accuracy", "agreement with the gold judge"),
                           ("label_gold_accuracy", "annotators' labels vs the gold judge (same pairs)"),
                           ("heldout_accuracy", "held-out label accuracy"), ("ece", "expected calibration error"),
                           ("length_correlation", "correlation of score with response length")):
            html.append(f"<tr><td class='l'>{escape(label)}</td><td>{_num(rm.get(key))}</td></tr>")
        html.append("</table>")
    rm_metrics = root / "reward" / "metrics.jsonl"
    if not rm_metrics.exists():  # an ensemble keeps one run per member
        rm_metrics = root / "reward" / "member-0" / "metrics.jsonl"
    curves: list[tuple[dict[str, list[Point]], str, dict[str, Any]]] = [
        ({"train": read_curve(root / "base" / "metrics.jsonl", "loss"),
          "held-out": read_curve(root / "base" / "metrics.jsonl", "eval/loss")}, "pretraining loss",
         {"y_label": "loss"}),
        ({"train": read_curve(root / "sft" / "metrics.jsonl", "loss"),
          "held-out": read_curve(root / "sft" / "metrics.jsonl", "eval/loss")}, "SFT loss", {"y_label": "loss"}),
        ({"train": read_curve(rm_metrics, "accuracy"), "held-out": read_curve(rm_metrics, "eval/accuracy")},
         "reward model pair accuracy" + (" (ensemble member 0)" if rm_metrics.parent.name == "member-0" else ""),
         {"y_label": "pair accuracy"}),
        ({"margin": read_curve(root / "dpo" / "metrics.jsonl", "rewards/margin"),
          "accuracy": read_curve(root / "dpo" / "metrics.jsonl", "rewards/accuracy")}, "DPO implicit reward",
         {"y_label": "implicit reward margin", "right": ("accuracy",), "right_label": "pair accuracy"}),
        ({"proxy reward": read_curve(root / "ppo" / "metrics.jsonl", "reward/score"),
          "gold (held-out)": read_curve(root / "ppo" / "metrics.jsonl", "judge/score", se_key="judge/se"),
          "KL to SFT": read_curve(root / "ppo" / "metrics.jsonl", "kl")}, "PPO: reward, gold and KL",
         {"y_label": "score", "right": ("KL to SFT",), "right_label": "KL to SFT (nats)"}),
    ]
    plots = [svg_lines(series, title, **options) for series, title, options in curves]
    html.append("<h2>Training curves</h2><div class='plots'>" + "".join(p for p in plots if p) + "</div>")
    html += _overoptimisation_section(root, summary.get("overoptimization"))
    html += _hhh_section(summary.get("hhh"))
    html += _rounds_section(summary.get("rounds"))
    left_out = summary.get("left_out") or []
    if left_out:
        html.append("<p>Not in this run (opt-in): " + "; ".join(
            f"{escape(p['what'])} (<code>rlhfkit demo {escape(p['flag'])}</code>)" for p in left_out) + ".</p>")
    sweep = summary.get("dpo_beta_sweep")
    if sweep:
        runs = sorted((p for p in sweep if p.get("kl_to_sft") is not None), key=lambda p: p["kl_to_sft"])
        name = "DPO runs, gold score"
        plot = svg_lines({name: [(p["kl_to_sft"], p["gold_score"], p.get("gold_se")) for p in runs]},
                         "DPO gold score against KL to SFT", x_label="KL to SFT (nats)", y_label="gold score",
                         point_labels={name: [f"β = {p['beta']:g}" for p in runs]})
        html.append("<h2>DPO: the β sweep</h2><p>A smaller β lets the policy move further from SFT (more KL); the gold "
                    "score shows what that buys.</p><div class='plots'>" + plot + "</div><table><tr><th>β</th>"
                    "<th>KL to SFT</th><th>gold score</th>"
                    "<th>± s.e.</th><th>unsafe rate</th></tr>" +
                    "".join(f"<tr><td>{_num(p['beta'], 'g')}</td><td>{_num(p.get('kl_to_sft'), '.2f')}</td>"
                            f"<td>{_num(p['gold_score'], '+.3f')}</td><td>{_num(p['gold_se'])}</td>"
                            f"<td>{_num(p.get('unsafe_rate'), '.2f')}</td></tr>" for p in sweep) + "</table>")
    samples = summary.get("samples", {})
    if samples:
        names = list(samples)
        rows = max(len(v) for v in samples.values())
        html.append("<h2>The same prompts, answered by each policy</h2><table class='samples'><tr>"
                    "<th class='l'>prompt</th>" + "".join(f"<th class='l'>{escape(n)}</th>" for n in names) + "</tr>")
        for i in range(rows):
            first = next((samples[n][i] for n in names if i < len(samples[n])), None)
            if first is None:
                continue
            cells = []
            for n in names:
                s = samples[n][i] if i < len(samples[n]) else None
                cells.append("<td></td>" if s is None else
                             f"<td>{escape(str(s['response']))}<br><small>gold {_num(s.get('gold'), '+.2f')}</small></td>")
            html.append(f"<tr><td>{escape(str(first['prompt']))}</td>{''.join(cells)}</tr>")
        html.append("</table>")
    wall = summary.get("wall_seconds", {})
    if wall:
        side = (f"each stage's own; up to {summary['workers']} ran side by side, so they add up to more than "
                "the total. ") if summary.get("workers", 1) > 1 else ""
        html.append("<h2>Wall time (seconds)</h2><p>" + side +
                    ", ".join(f"{escape(k)} {_num(v, '.1f')}" for k, v in wall.items()) + "</p>")
    html.append("</body></html>")
    out = root / "report.html"
    out.write_text("\n".join(html), encoding="utf-8")
    return out


def write_rounds_report(root: Path, summary: dict[str, Any]) -> Path:
    """Write root/report.html for an `rlhfkit rounds` run: per round, the labels and their agreement, flagged
    annotators, the reward model's held-out accuracy, and the policy's proxy reward, gold score (playground) and KL
    to the SFT model, as plots and a table."""
    rounds = summary.get("rounds", [])

    def series(key: str, se_key: str | None = None) -> list[Point]:
        return [(r["round"], r["eval"][key], _se(r["eval"].get(se_key)) if se_key else None)
                for r in rounds if isinstance(r.get("eval", {}).get(key), (int, float))]

    scores = {name: pts for name, pts in (("proxy reward (this round's model)", series("proxy", "proxy_se")),
                                          ("gold score", series("gold_score", "gold_score_se"))) if pts}
    plots = [svg_lines(scores, "The policy after each round (held-out prompts)", x_label="round", y_label="score"),
             svg_lines({"KL to SFT": series("kl")}, "KL of the policy to the SFT model", x_label="round",
                       y_label="nats"),
             svg_lines({"held-out label accuracy": [(r["round"], r["reward"]["heldout_accuracy"], None)
                                                    for r in rounds if "heldout_accuracy" in r.get("reward", {})]},
                       "The reward ensemble after each round", x_label="round", y_label="accuracy")]
    html = [f"<!doctype html><html><head><meta charset='utf-8'><title>rlhfkit rounds: {escape(summary.get('run', ''))}"
            f"</title><style>{CSS}</style></head><body><h1>rlhfkit rounds: {escape(summary.get('run', ''))}</h1>",
            f"<p>queue {escape(str(summary.get('queue')))}, policy {escape(str(summary.get('policy')))}; the store: "
            f"{escape(str(summary.get('db')))}.</p>", "<div class='plots'>" + "".join(plots) + "</div>",
            "<table><tr><th>round</th><th>items</th><th>labels</th><th>agreement α</th><th>rows so far</th>"
            "<th class='l'>flagged annotators</th><th>reward held-out acc.</th><th>proxy</th><th>gold</th>"
            "<th>KL</th></tr>"]
    for r in rounds:
        ev, lab = r.get("eval", {}), r.get("labels", {})
        html.append(f"<tr><td>{r['round']}</td><td>{_num(r.get('items', {}).get('items'), 'd')}</td>"
                    f"<td>{_num(lab.get('labels'), 'd')}</td><td>{_num(lab.get('agreement', {}).get('alpha'))}</td>"
                    f"<td>{_num(r.get('export', {}).get('rows'), 'd')}</td>"
                    f"<td class='l'>{escape(', '.join(r.get('export', {}).get('flagged', [])) or '–')}</td>"
                    f"<td>{_num(r.get('reward', {}).get('heldout_accuracy'))}</td><td>{_num(ev.get('proxy'), '+.3f')}"
                    f"</td><td>{_num(ev.get('gold_score'), '+.3f')}</td><td>{_num(ev.get('kl'), '.2f')}</td></tr>")
    html.append("</table></body></html>")
    path = Path(root) / "report.html"
    path.write_text("\n".join(html))
    return path
