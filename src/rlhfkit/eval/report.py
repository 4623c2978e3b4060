"""The demo's HTML report: one self-contained file (inline SVG plots, inline CSS, no scripts, no network) with
the summary table, the reward model's numbers, training curves and sample responses side by side.

Every string from a model or a data file is escaped: responses are untrusted text."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any, Sequence

CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:72rem;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.plots{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0;border:1px solid #ddd;padding:.5rem}figcaption{font-size:.9rem;color:#555}
.samples td{vertical-align:top;text-align:left;max-width:16rem;white-space:pre-wrap}small{color:#666}
"""
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def read_curve(metrics_path: Path, key: str) -> list[tuple[float, float]]:
    """(step, value) points of one metric from a run's metrics.jsonl (missing file or key: no points)."""
    if not metrics_path.exists():
        return []
    points = []
    for line in metrics_path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        value = row.get(key)
        if isinstance(value, (int, float)) and value == value:  # skip NaN
            points.append((float(row["step"]), float(value)))
    return points


def svg_lines(series: dict[str, Sequence[tuple[float, float]]], title: str, width: int = 420,
              height: int = 240, x_label: str = "step", dots: Sequence[str] = ()) -> str:
    """A small line chart as inline SVG: one polyline per series (or, for the series named in `dots`, one circle
    per point: measurements beside a fitted curve), axes labelled with min and max."""
    series = {name: pts for name, pts in series.items() if pts}
    if not series:
        return ""
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, top, bottom = 48, 10, 10, 28

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom)

    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}">',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#999"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#999"/>',
             f'<text x="2" y="{top + 10}" font-size="10">{y1:.3g}</text>',
             f'<text x="2" y="{height - bottom}" font-size="10">{y0:.3g}</text>',
             f'<text x="{left}" y="{height - 8}" font-size="10">{escape(x_label)} {x0:.3g}</text>',
             f'<text x="{width - right - 70}" y="{height - 8}" font-size="10">{escape(x_label)} {x1:.3g}</text>']
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        if name in dots:
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>' for x, y in pts]
        else:
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        per_row = 2 if max(len(n) for n in series) > 14 else 3  # long legend names get wider columns
        row, col = divmod(i, per_row)
        parts.append(f'<text x="{left + 8 + (360 // per_row) * col}" y="{top + 12 + 13 * row}" font-size="11" '
                     f'fill="{colour}">{escape(name)}</text>')
    parts.append("</svg>")
    return f'<figure>{"".join(parts)}<figcaption>{escape(title)}</figcaption></figure>'


def _num(value: Any, fmt: str = ".3f") -> str:
    return "–" if not isinstance(value, (int, float)) else format(value, fmt)


def _fit_line(fit: dict[str, Any], d_max: float, points: int = 40) -> list[tuple[float, float]]:
    """The fitted Gao et al. curve sampled on (0, d_max]."""
    import math

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
        series = {"gold Δ": [(p["d"], p["gold_delta"]) for p in pts],
                  "proxy Δ": [(p["d"], p["proxy_delta"]) for p in pts]}
        if part.get("alpha") is not None:
            series[f"fit {'d(α−βd)' if key == 'best_of_n' else 'd(α−β ln d)'}"] = _fit_line(part, d_max)
            notes.append(f"<li>{escape(label)}: gold Δ = {'d(α − β d)' if key == 'best_of_n' else 'd(α − β ln d)'}"
                         f", {escape(_fit_text(part))}</li>")
        html.append(svg_lines(series, f"over-optimisation: {label}", x_label="d", dots=("gold Δ", "proxy Δ")))
    cut = over.get("kl_cut")
    if cut:
        series = {}
        runs = cut.get("runs", {"default": "ppo", "cut": "ppo_klcut"})
        for run, name in ((runs["default"], "default KL"), (runs["cut"], "KL cut")):
            metrics = root / run / "metrics.jsonl"
            series[f"proxy, {name}"] = read_curve(metrics, "eval/proxy") or read_curve(metrics, "reward/score")
            series[f"gold, {name}"] = read_curve(root / run / "metrics.jsonl", "judge/score")
        html.append(svg_lines(series, "reward hacking: the KL leash cut (held-out prompts)"))
    html.append("</div>")
    if notes:
        html.append("<ul>" + "".join(notes) + "</ul>")
    if cut:
        steps = f" and trained for {cut['steps']} steps" if cut.get("steps") else ""
        gold_se = f" ± {cut['gold_delta_se']:.3f}" if cut.get("gold_delta_se") is not None else ""
        html.append(
            "<h3>Reward hacking: the KL leash cut</h3><p>The same RL run with the KL coefficient set to "
            f"{_num(cut.get('kl_coef'), 'g')} instead of {_num(cut.get('default_kl_coef'), 'g')}{steps}: on the "
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
    for name, p in summary.get("policies", {}).items():
        html.append(f"<tr><td class='l'>{escape(name)}</td><td>{_num(p.get('gold_score'), '+.3f')}</td>"
                    f"<td>{_num(p.get('gold_se'))}</td><td>{_num(p.get('win_rate_vs_sft'), '.2f')}</td>"
                    f"<td>{_num(p.get('kl_to_sft'), '.2f')}</td><td>{_num(p.get('mean_length'), '.1f')}</td>"
                    f"<td>{_num(p.get('unsafe_rate'), '.2f')}</td></tr>")
    html.append("</table>")
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
    curves = [
        ({"train": read_curve(root / "base" / "metrics.jsonl", "loss"),
          "held-out": read_curve(root / "base" / "metrics.jsonl", "eval/loss")}, "pretraining loss"),
        ({"train": read_curve(root / "sft" / "metrics.jsonl", "loss"),
          "held-out": read_curve(root / "sft" / "metrics.jsonl", "eval/loss")}, "SFT loss"),
        ({"train": read_curve(rm_metrics, "accuracy"), "held-out": read_curve(rm_metrics, "eval/accuracy")},
         "reward model pair accuracy" + (" (ensemble member 0)" if rm_metrics.parent.name == "member-0" else "")),
        ({"margin": read_curve(root / "dpo" / "metrics.jsonl", "rewards/margin"),
          "accuracy": read_curve(root / "dpo" / "metrics.jsonl", "rewards/accuracy")}, "DPO implicit reward"),
        ({"proxy reward": read_curve(root / "ppo" / "metrics.jsonl", "reward/score"),
          "gold (held-out)": read_curve(root / "ppo" / "metrics.jsonl", "judge/score"),
          "KL to SFT": read_curve(root / "ppo" / "metrics.jsonl", "kl")}, "PPO: reward, gold and KL"),
    ]
    plots = [svg_lines(series, title) for series, title in curves]
    html.append("<h2>Training curves</h2><div class='plots'>" + "".join(p for p in plots if p) + "</div>")
    html += _overoptimisation_section(root, summary.get("overoptimization"))
    sweep = summary.get("dpo_beta_sweep")
    if sweep:
        pts = sorted((p["kl_to_sft"], p["gold_score"]) for p in sweep if p.get("kl_to_sft") is not None)
        html.append("<h2>DPO: the β sweep</h2><p>A smaller β lets the policy move further from SFT (more KL); the gold "
                    "score shows what that buys.</p><div class='plots'>" +
                    svg_lines({"gold score": pts, "DPO runs": pts}, "DPO gold score against KL to SFT", x_label="KL",
                              dots=("DPO runs",)) + "</div><table><tr><th>β</th><th>KL to SFT</th><th>gold score</th>"
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
        html.append("<h2>Wall time (seconds)</h2><p>" +
                    ", ".join(f"{escape(k)} {_num(v, '.1f')}" for k, v in wall.items()) + "</p>")
    html.append("</body></html>")
    out = root / "report.html"
    out.write_text("\n".join(html), encoding="utf-8")
    return out
