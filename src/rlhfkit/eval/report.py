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
              height: int = 240) -> str:
    """A small line chart as inline SVG: one polyline per series, axes labelled with min and max."""
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
             f'<text x="{left}" y="{height - 8}" font-size="10">step {x0:.0f}</text>',
             f'<text x="{width - right - 60}" y="{height - 8}" font-size="10">step {x1:.0f}</text>']
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        parts.append(f'<text x="{left + 8 + 110 * i}" y="{top + 12}" font-size="11" fill="{colour}">'
                     f'{escape(name)}</text>')
    parts.append("</svg>")
    return f'<figure>{"".join(parts)}<figcaption>{escape(title)}</figcaption></figure>'


def _num(value: Any, fmt: str = ".3f") -> str:
    return "–" if not isinstance(value, (int, float)) else format(value, fmt)


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
    rm = summary.get("reward_model")
    if rm:
        html.append("<h2>Reward model</h2><table>")
        for key, label in (("gold_accuracy", "agreement with the gold judge"),
                           ("label_gold_accuracy", "annotators' labels vs the gold judge (same pairs)"),
                           ("heldout_accuracy", "held-out label accuracy"), ("ece", "expected calibration error"),
                           ("length_correlation", "correlation of score with response length")):
            html.append(f"<tr><td class='l'>{escape(label)}</td><td>{_num(rm.get(key))}</td></tr>")
        html.append("</table>")
    curves = [
        ({"train": read_curve(root / "base" / "metrics.jsonl", "loss"),
          "held-out": read_curve(root / "base" / "metrics.jsonl", "eval/loss")}, "pretraining loss"),
        ({"train": read_curve(root / "sft" / "metrics.jsonl", "loss"),
          "held-out": read_curve(root / "sft" / "metrics.jsonl", "eval/loss")}, "SFT loss"),
        ({"train": read_curve(root / "reward" / "metrics.jsonl", "accuracy"),
          "held-out": read_curve(root / "reward" / "metrics.jsonl", "eval/accuracy")}, "reward model pair accuracy"),
        ({"margin": read_curve(root / "dpo" / "metrics.jsonl", "rewards/margin"),
          "accuracy": read_curve(root / "dpo" / "metrics.jsonl", "rewards/accuracy")}, "DPO implicit reward"),
    ]
    plots = [svg_lines(series, title) for series, title in curves]
    html.append("<h2>Training curves</h2><div class='plots'>" + "".join(p for p in plots if p) + "</div>")
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
