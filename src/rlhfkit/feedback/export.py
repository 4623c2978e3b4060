"""Export judgments to the preference formats the trainers read (`rlhfkit.data.preference.read_preferences`):
one TRL explicit-prompt row per A/B judgment with `margin` from its strength (Llama 2 §3.2.2), the C(K,2) pairs
of each ranking written together (or one K-way row), and optionally KTO's unpaired rows; or, for projects with
overlap (several annotators per item), one majority-vote row per item. The annotator's name and the responses'
source ids are kept on every row."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlhfkit.data.preference import STRENGTHS, strength_to_margin
from rlhfkit.errors import UserError
from rlhfkit.feedback.service import FeedbackService


@dataclass
class ExportReport:
    """What the export wrote and what it left out (nothing is dropped without being counted)."""

    rows: int = 0
    judgments: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Judgments (export_rows) or items (majority_rows) that gave no row, by reason."""
    items: int = 0
    """Items whose judgments were read (majority_rows counts per item; export_rows leaves it 0)."""

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _text(value: str, role: str, conversational: bool) -> Any:
    return [{"role": role, "content": value}] if conversational else value


def _margin_on_every_pair(rows: list[dict[str, Any]]) -> None:
    """When any pair row has a margin, give one to every pair row: a column present on some rows and not others
    reaches TRL's RewardTrainer collator as None and fails there. A judgment without a strength gets 0.0, the
    margin of "negligible": plain Bradley-Terry, which is what a row without a margin trains as anyway (our
    collate_pairs reads a missing margin as 0). K-way and KTO rows take no margin."""
    if any("margin" in row for row in rows):
        for row in rows:
            if "chosen" in row:
                row.setdefault("margin", 0.0)


def export_rows(service: FeedbackService, project: str | int, *, kto: bool = False,
                rankings_as: Literal["pairs", "ranking"] = "pairs", include_gold: bool = False,
                margin_scale: Literal["large", "small"] = "small", conversational: bool = False,
                ) -> tuple[list[dict[str, Any]], ExportReport]:
    """Rows for one project.

    Pairs (default): A/B → {prompt, chosen, rejected, margin, strength, annotator, source, chosen_source,
    rejected_source, item_id}; ties and "both bad" carry no direction and are left out; a ranking gives its
    C(K,2) pairs (rankings_as="pairs", tied tiers form no pair) or one K-way row (rankings_as="ranking"). When
    any pair has a margin every pair has one, 0.0 for a judgment without a strength (see `_margin_on_every_pair`).
    kto=True writes unpaired {prompt, completion, label} rows instead: the chosen response desirable, the
    rejected one undesirable, both responses of a "both bad" judgment undesirable. Ties are left out there
    too, departing from the issue's "ties to KTO rows": a tie says two responses are equally good or equally
    bad, not which, so it gives no desirable/undesirable label. Skips and, unless include_gold, gold items are
    never exported. margin_scale picks the strength→margin map (RewardConfig's default is "small")."""
    info = service.project(project)
    report = ExportReport()
    rows: list[dict[str, Any]] = []
    source = f"label:{info.name}"
    for j in service.judged_items(info.id):
        report.judgments += 1
        if j["gold"] and not include_gold:
            report.skip("gold item")
            continue
        if j["outcome"] == "skip":
            report.skip("skip")
            continue
        prompt = _text(j["prompt"], "user", conversational)
        responses, sources = j["responses"], j["sources"]

        def resp(i: int) -> Any:
            return _text(responses[i], "assistant", conversational)

        def pair(better: int, worse: int, strength: str | None) -> dict[str, Any]:
            row: dict[str, Any] = {"prompt": prompt, "chosen": resp(better), "rejected": resp(worse)}
            if strength is not None:
                row["margin"] = strength_to_margin(strength, margin_scale)
                row["strength"] = strength
            row.update(annotator=j["annotator"], source=source, chosen_source=sources[better],
                       rejected_source=sources[worse], item_id=j["item_id"])
            return row

        def unpaired(i: int, desirable: bool) -> dict[str, Any]:
            return {"prompt": prompt, "completion": resp(i), "label": desirable, "annotator": j["annotator"],
                    "source": source, "completion_source": sources[i], "item_id": j["item_id"]}

        if j["ranking"] is not None:
            tiers = j["ranking"]
            if kto:
                # only the ends of a ranking are absolute enough to call: the top tier desirable, the bottom not
                rows += [unpaired(i, True) for i in tiers[0]] + [unpaired(i, False) for i in tiers[-1]]
            elif rankings_as == "ranking":
                rows.append({"prompt": prompt, "responses": [resp(i) for i in range(len(responses))],
                             "ranking": [list(t) for t in tiers], **({"strength": j["strength"]} if j["strength"] else {}),
                             "annotator": j["annotator"], "source": source, "sources": sources,
                             "item_id": j["item_id"]})
            else:
                for t, better in enumerate(tiers):  # grouped by prompt: a ranking's pairs are consecutive rows
                    for worse in tiers[t + 1 :]:
                        rows += [pair(b, w, j["strength"]) for b in better for w in worse]
            continue
        outcome = j["outcome"]
        if outcome in ("A", "B"):
            better, worse = (0, 1) if outcome == "A" else (1, 0)
            rows += [unpaired(better, True), unpaired(worse, False)] if kto else [pair(better, worse, j["strength"])]
        elif outcome == "both_bad" and kto:
            rows += [unpaired(0, False), unpaired(1, False)]
        else:
            report.skip(outcome)
    _margin_on_every_pair(rows)
    report.rows = len(rows)
    return rows, report


def majority_rows(service: FeedbackService, project: str | int, *,
                  rankings_as: Literal["pairs", "ranking"] = "pairs", margin_scale: Literal["large", "small"] = "small",
                  conversational: bool = False) -> tuple[list[dict[str, Any]], ExportReport]:
    """One row per item, aggregating the item's judgments (a project with annotators_per_item > 1): how
    InstructGPT and Anthropic's HH collection reduce label noise with overlap.

    Pairwise: the outcome with the most votes (A, B, tie, both_bad) wins; a shared top count is skipped as
    "vote_tie", a winning tie or "both bad" is skipped under its name. The row's strength is the median of the
    strict voters' strengths, each dissenting vote counted as "negligible", so a split vote asks for no margin.
    Rankings: Borda count (each response's mean place, tied tiers sharing their mid-place), equal means tie; a
    ranking that comes out all tied is skipped as "vote_tie". Rows carry the pairwise `votes`, every voter in
    `annotator` ("a+b+c") and the item id. Skips and gold items are left out and counted, as in export_rows."""
    info = service.project(project)
    report = ExportReport()
    source = f"label:{info.name}"
    by_item: dict[int, list[dict[str, Any]]] = {}
    for j in service.judged_items(info.id):  # in queue order, so rows keep the item order
        report.judgments += 1
        if j["gold"]:
            report.skip("gold item")
        elif j["outcome"] == "skip":
            report.skip("skip")
        else:
            by_item.setdefault(j["item_id"], []).append(j)
    rows: list[dict[str, Any]] = []
    for item_id, votes in by_item.items():
        report.items += 1
        first = votes[0]
        prompt = _text(first["prompt"], "user", conversational)
        responses, sources = first["responses"], first["sources"]
        common = {"annotator": "+".join(v["annotator"] for v in votes), "source": source}

        def pair(better: int, worse: int, strength: str | None) -> dict[str, Any]:
            row: dict[str, Any] = {"prompt": prompt, "chosen": _text(responses[better], "assistant", conversational),
                                   "rejected": _text(responses[worse], "assistant", conversational)}
            if strength is not None:
                row.update(margin=strength_to_margin(strength, margin_scale), strength=strength)
            return {**row, **common, "chosen_source": sources[better], "rejected_source": sources[worse],
                    "item_id": item_id}

        if first["ranking"] is None:
            counts = Counter(v["outcome"] for v in votes)
            (top, n), *rest = counts.most_common()
            if rest and rest[0][1] == n:
                report.skip("vote_tie")
                continue
            if top not in ("A", "B"):
                report.skip(top)
                continue
            levels = sorted(STRENGTHS.index(v["strength"] or STRENGTHS[-1]) if v["outcome"] == top
                            else len(STRENGTHS) - 1 for v in votes if v["outcome"] in ("A", "B"))
            strength = STRENGTHS[levels[(len(levels) - 1) // 2]] if levels else None  # lower (weaker) median
            better, worse = (0, 1) if top == "A" else (1, 0)
            rows.append({**pair(better, worse, strength), "votes": dict(counts)})
            continue
        # Borda: a response's place is its tier's mid-place (0-based); doubled so the sums stay integers
        place2 = [0] * len(responses)
        for v in votes:
            start = 0
            for tier in v["ranking"]:
                for i in tier:
                    place2[i] += 2 * start + len(tier) - 1
                start += len(tier)
        tiers = [[i for i in range(len(responses)) if place2[i] == p] for p in sorted(set(place2))]
        if len(tiers) < 2:
            report.skip("vote_tie")
            continue
        if rankings_as == "ranking":
            rows.append({"prompt": prompt, "responses": [_text(r, "assistant", conversational) for r in responses],
                         "ranking": tiers, **common, "sources": sources, "item_id": item_id})
        else:
            for t, better in enumerate(tiers):
                for worse in tiers[t + 1 :]:
                    rows += [pair(b, w, None) for b in better for w in worse]
    _margin_on_every_pair(rows)
    report.rows = len(rows)
    return rows, report


def write_export(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    p = Path(path)
    if p.suffix.lower() not in (".jsonl", ".ndjson"):
        raise UserError(f"{path}: the export is JSON Lines; use a .jsonl file name.")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(p)  # a reader never sees half an export
    return p
