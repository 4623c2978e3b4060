"""Export judgments to the preference formats the trainers read (`rlhfkit.data.preference.read_preferences`):
one TRL explicit-prompt row per A/B judgment with `margin` from its strength (Llama 2 §3.2.2), the C(K,2) pairs
of each ranking written together (or one K-way row), and optionally KTO's unpaired rows; or, for projects with
overlap (several annotators per item), one majority-vote row per item. A rubric project's rows come one per
criterion verdict (with a `criterion` column, or one file per criterion); an attribute project's in HelpSteer2's
scored-response format. The annotator's name and the responses' source ids are kept on every row. With an
annotator reliability fit (`reliability_reports`), pair rows also carry `confidence`, the posterior probability that
chosen is truly better than rejected, and `annotator_accuracy`; `export_run_rows` exports a rounds run's projects
together."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from rlhfkit.data.preference import STRENGTHS, strength_to_margin
from rlhfkit.errors import UserError
from rlhfkit.feedback.reliability import ReliabilityReport
from rlhfkit.feedback.service import FeedbackService, ProjectInfo

Reliability = ReliabilityReport | Mapping[str | None, ReliabilityReport]
"""A reliability fit for an export: one report, or {criterion: report} for a rubric project (None: whole-item)."""


@dataclass
class ExportReport:
    """What the export wrote and what it left out (nothing is dropped without being counted)."""

    rows: int = 0
    judgments: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Judgments (export_rows) or items (majority_rows) that gave no row, by reason."""
    items: int = 0
    """Items whose judgments were read (majority_rows counts per item; export_rows leaves it 0)."""
    criteria: dict[str, int] = field(default_factory=dict)
    """A rubric project's rows per criterion (empty for other projects)."""

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


def _answers(j: dict[str, Any], criteria: tuple[str, ...]) -> list[tuple[str | None, str, str | None]]:
    """(criterion, outcome, strength) of each verdict in a non-skip judgment: one per criterion of a rubric
    project, in the project's order, else the judgment's own outcome with criterion None."""
    if j["rubric"] is not None:
        return [(c, j["rubric"][c]["outcome"], j["rubric"][c]["strength"]) for c in criteria]
    return [(None, j["outcome"], j["strength"])]


def _with_criterion(row: dict[str, Any], criterion: str | None) -> dict[str, Any]:
    return row if criterion is None else {**row, "criterion": criterion}


def _no_attributes(info: Any, what: str) -> None:
    if info.mode == "attributes":
        raise UserError(f"project {info.name!r} scores attributes, so it has no preference pairs for {what}; "
                        "export its HelpSteer2-style rows (attribute_rows; `rlhfkit label export` picks them for "
                        "an attribute project).")


def export_rows(service: FeedbackService, project: str | int, *, kto: bool = False,
                rankings_as: Literal["pairs", "ranking"] = "pairs", include_gold: bool = False,
                margin_scale: Literal["large", "small"] = "small", conversational: bool = False,
                reliability: Reliability | None = None) -> tuple[list[dict[str, Any]], ExportReport]:
    """Rows for one project.

    Pairs (default): A/B → {prompt, chosen, rejected, margin, strength, annotator, source, chosen_source,
    rejected_source, item_id}; ties and "both bad" carry no direction and are left out; a ranking gives its
    C(K,2) pairs (rankings_as="pairs", tied tiers form no pair) or one K-way row (rankings_as="ranking"). When
    any pair has a margin every pair has one, 0.0 for a judgment without a strength (see `_margin_on_every_pair`).
    kto=True writes unpaired {prompt, completion, label} rows instead: the chosen response desirable, the
    rejected one undesirable, both responses of a "both bad" judgment undesirable. Ties are left out there
    too, departing from the issue's "ties to KTO rows": a tie says two responses are equally good or equally
    bad, not which, so it gives no desirable/undesirable label. Skips and, unless include_gold, gold items are
    never exported. margin_scale picks the strength→margin map (RewardConfig's default is "small").

    A rubric project (criteria) gives one such row per criterion verdict, each with a `criterion` column;
    ties and "both bad" verdicts are treated as above, one verdict at a time (`export_by_criterion` writes one
    file per criterion instead).

    reliability (a fit of this project's judgments, e.g. `reliability_reports`; per criterion for a rubric
    project) adds to every pair row `confidence`, the posterior probability that `chosen` is truly better than
    `rejected` (a soft Bradley-Terry target in [0, 1]), and `annotator_accuracy`, the annotator's estimated
    accuracy. Pairwise projects only, and not with kto."""
    rows, report = _judgment_rows(service, project, kto=kto, rankings_as=rankings_as, include_gold=include_gold,
                                  margin_scale=margin_scale, conversational=conversational)
    if reliability is not None:
        _add_reliability(service.project(project), rows, reliability, kto)
    return _finish(rows, report)


def reliability_reports(service: FeedbackService, projects: Sequence[ProjectInfo | int | str],
                        **settings: Any) -> dict[str | None, ReliabilityReport]:
    """The reliability fit an export with reliability needs, pooled over the projects (a run's rounds): {None:
    report} for whole-item outcomes, {criterion: report} for rubric projects (the first project's criteria).
    settings go to `FeedbackService.reliability`."""
    infos = [p if isinstance(p, ProjectInfo) else service.project(p) for p in projects]
    if not infos:
        raise UserError("reliability needs at least one project; name a project or a run with round projects.")
    ids = [p.id for p in infos]
    if infos[0].rubric:
        return {c: service.reliability(ids, criterion=c, **settings) for c in infos[0].criteria}
    return {None: service.reliability(ids, **settings)}


def _add_reliability(info: ProjectInfo, rows: list[dict[str, Any]], reliability: Reliability, kto: bool) -> None:
    """Give each pair row `confidence` (P(chosen is truly better)) and `annotator_accuracy` from the fit of its
    criterion; UserError when the fit does not cover a row."""
    if info.mode != "pairwise" or kto:
        raise UserError(f"reliability columns are for preference pairs of pairwise projects; project {info.name!r} "
                        f"is a {info.mode} project{' exported as KTO rows' if kto else ''}, so drop reliability.")
    add_reliability_columns(rows, reliability)


def add_reliability_columns(rows: list[dict[str, Any]], reliability: Reliability) -> None:
    """Give exported pair rows `confidence` and `annotator_accuracy` from a fit of their judgments. Fit after
    exporting (a fit may cover judgments the rows lack, never the other way round): while people keep labelling,
    a fit made first can miss a judgment the export then reads."""
    reports = {reliability.criterion: reliability} if isinstance(reliability, ReliabilityReport) else reliability
    for row in rows:
        criterion = row.get("criterion")
        fit = reports.get(criterion)
        p = None if fit is None else fit.confidence(row["item_id"], row["annotator"])
        if p is None:
            what = f"criterion {criterion!r}" if criterion else "whole-item outcomes"
            raise UserError(f"the reliability fit has no posterior for item {row['item_id']}'s judgment by "
                            f"{row['annotator']} ({what}); fit it over the exported projects (reliability_reports) "
                            "after the last judgment.")
        row["confidence"] = p
        row["annotator_accuracy"] = fit.annotator(row["annotator"]).accuracy


def export_run_rows(service: FeedbackService, run: str, *, rankings_as: Literal["pairs", "ranking"] = "pairs",
                    include_gold: bool = False, margin_scale: Literal["large", "small"] = "small",
                    conversational: bool = False, reliability: Reliability | None = None,
                    ) -> tuple[list[dict[str, Any]], ExportReport]:
    """The rows of every round project of a rounds run, round after round: each project's export_rows (pairs,
    or K-way rankings) with a `round` column; item_id stays the store's (unique across projects). reliability:
    a fit pooled over the run (`reliability_reports(service, service.round_projects(run))`), as export_rows
    takes it. Margins are filled over all the rows together."""
    projects = service.round_projects(run)
    if not projects:
        raise UserError(f"run {run!r} has no round projects; check the run name (rounds are created with run= and "
                        "round=).")
    rows: list[dict[str, Any]] = []
    total = ExportReport()
    for info in projects:
        _no_attributes(info, "export_run_rows")
        got, report = _judgment_rows(service, info.id, kto=False, rankings_as=rankings_as, include_gold=include_gold,
                                     margin_scale=margin_scale, conversational=conversational)
        if reliability is not None:
            _add_reliability(info, got, reliability, kto=False)
        rows += [{**row, "round": info.round} for row in got]
        total.judgments += report.judgments
        for reason, n in report.skipped.items():
            total.skipped[reason] = total.skipped.get(reason, 0) + n
    return _finish(rows, total)


def _finish(rows: list[dict[str, Any]], report: ExportReport) -> tuple[list[dict[str, Any]], ExportReport]:
    _margin_on_every_pair(rows)
    report.rows = len(rows)
    for row in rows:
        if "criterion" in row:
            report.criteria[row["criterion"]] = report.criteria.get(row["criterion"], 0) + 1
    return rows, report


def _judgment_rows(service: FeedbackService, project: str | int, *, kto: bool, rankings_as: str,
                   include_gold: bool, margin_scale: Literal["large", "small"], conversational: bool,
                   ) -> tuple[list[dict[str, Any]], ExportReport]:
    """export_rows without the margin fill (which `export_by_criterion` does per file)."""
    info = service.project(project)
    _no_attributes(info, "export_rows")
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

        def pair(better: int, worse: int, strength: str | None, criterion: str | None = None) -> dict[str, Any]:
            row: dict[str, Any] = {"prompt": prompt, "chosen": resp(better), "rejected": resp(worse)}
            if strength is not None:
                row["margin"] = strength_to_margin(strength, margin_scale)
                row["strength"] = strength
            row = _with_criterion(row, criterion)
            row.update(annotator=j["annotator"], source=source, chosen_source=sources[better],
                       rejected_source=sources[worse], item_id=j["item_id"])
            return row

        def unpaired(i: int, desirable: bool, criterion: str | None = None) -> dict[str, Any]:
            row = _with_criterion({"prompt": prompt, "completion": resp(i), "label": desirable}, criterion)
            return {**row, "annotator": j["annotator"], "source": source, "completion_source": sources[i],
                    "item_id": j["item_id"]}

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
        for criterion, outcome, strength in _answers(j, info.criteria):
            if outcome in ("A", "B"):
                better, worse = (0, 1) if outcome == "A" else (1, 0)
                rows += ([unpaired(better, True, criterion), unpaired(worse, False, criterion)] if kto
                         else [pair(better, worse, strength, criterion)])
            elif outcome == "both_bad" and kto:
                rows += [unpaired(0, False, criterion), unpaired(1, False, criterion)]
            else:
                report.skip(outcome)
    return rows, report


def _majority(votes: list[tuple[str, str | None]]) -> tuple[str, str | None, dict[str, int]] | str:
    """(winning outcome A or B, its strength, the vote counts) from (outcome, strength) votes, or the reason no
    row comes out: "vote_tie" for a shared top count, else the winning tie / both_bad."""
    counts = Counter(outcome for outcome, _ in votes)
    (top, n), *rest = counts.most_common()
    if rest and rest[0][1] == n:
        return "vote_tie"
    if top not in ("A", "B"):
        return top
    levels = sorted(STRENGTHS.index(strength or STRENGTHS[-1]) if outcome == top
                    else len(STRENGTHS) - 1 for outcome, strength in votes if outcome in ("A", "B"))
    strength = STRENGTHS[levels[len(levels) // 2]] if levels else None  # the lower (weaker) median
    return top, strength, dict(counts)


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
    `annotator` ("a+b+c") and the item id. Skips and gold items are left out and counted, as in export_rows.
    A rubric project gets one vote per (item, criterion), its rows carrying a `criterion` column."""
    rows, report = _majority_rows(service, project, rankings_as=rankings_as, margin_scale=margin_scale,
                                  conversational=conversational)
    return _finish(rows, report)


def _majority_rows(service: FeedbackService, project: str | int, *, rankings_as: str,
                   margin_scale: Literal["large", "small"], conversational: bool,
                   ) -> tuple[list[dict[str, Any]], ExportReport]:
    """majority_rows without the margin fill."""
    info = service.project(project)
    _no_attributes(info, "majority_rows")
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

        def pair(better: int, worse: int, strength: str | None, criterion: str | None = None) -> dict[str, Any]:
            row: dict[str, Any] = {"prompt": prompt, "chosen": _text(responses[better], "assistant", conversational),
                                   "rejected": _text(responses[worse], "assistant", conversational)}
            if strength is not None:
                row.update(margin=strength_to_margin(strength, margin_scale), strength=strength)
            return {**_with_criterion(row, criterion), **common, "chosen_source": sources[better],
                    "rejected_source": sources[worse], "item_id": item_id}

        if first["ranking"] is None:
            # one vote per criterion of a rubric project (criterion None: the whole judgment's outcome)
            answers = [_answers(v, info.criteria) for v in votes]
            for n, (criterion, _, _) in enumerate(answers[0]):
                won = _majority([(a[n][1], a[n][2]) for a in answers])
                if isinstance(won, str):
                    report.skip(won)
                    continue
                top, strength, counts = won
                better, worse = (0, 1) if top == "A" else (1, 0)
                rows.append({**pair(better, worse, strength, criterion), "votes": counts})
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
    return rows, report


def export_by_criterion(service: FeedbackService, project: str | int, *, majority: bool = False, kto: bool = False,
                        include_gold: bool = False, margin_scale: Literal["large", "small"] = "small",
                        conversational: bool = False, reliability: Reliability | None = None,
                        ) -> tuple[dict[str, list[dict[str, Any]]], ExportReport]:
    """A rubric project's rows as one standard preference file per criterion: {criterion: rows}, in the project's
    criterion order (a criterion with no row gets an empty list), the rows exactly those of export_rows
    (majority_rows with majority=True) without their `criterion` column. Margins are filled per file, so a
    criterion whose verdicts carry no strength gets no margin column. reliability ({criterion: fit}) adds the
    confidence columns as in export_rows (not with majority)."""
    info = service.project(project)
    if not info.rubric:
        raise UserError(f"project {info.name!r} has no criteria, so there is nothing to split by criterion; drop "
                        "--by-criterion (a rubric project is created with --criteria).")
    if majority:
        if kto or include_gold:
            raise UserError("majority rows merge preference pairs: drop kto and include_gold.")
        if reliability is not None:
            raise UserError("majority rows merge several annotators' judgments, so they have no per-judgment "
                            "confidence; drop majority or reliability.")
        rows, report = _majority_rows(service, info.id, rankings_as="pairs", margin_scale=margin_scale,
                                      conversational=conversational)
    else:
        rows, report = _judgment_rows(service, info.id, kto=kto, rankings_as="pairs", include_gold=include_gold,
                                      margin_scale=margin_scale, conversational=conversational)
        if reliability is not None:
            _add_reliability(info, rows, reliability, kto)
    files: dict[str, list[dict[str, Any]]] = {c: [] for c in info.criteria}
    for row in rows:
        files[row.pop("criterion")].append(row)
    for criterion, criterion_rows in files.items():
        _margin_on_every_pair(criterion_rows)
        report.criteria[criterion] = len(criterion_rows)
    report.rows = len(rows)
    return files, report


def attribute_rows(service: FeedbackService, project: str | int) -> tuple[list[dict[str, Any]], ExportReport]:
    """An attribute project's scores in HelpSteer2's row format (Wang et al. 2024, arXiv 2406.08673): one row per
    (judgment, response), {"prompt", "response", <attribute>: 0-4 for each attribute, "annotator", "source",
    "response_source", "item_id"}, responses in item order. `rlhfkit data convert helpsteer2` reads these rows
    when the attributes are HelpSteer2's five. Skips are left out and counted."""
    info = service.project(project)
    if info.mode != "attributes":
        raise UserError(f"project {info.name!r} is a {info.mode} project, not an attribute project; export its "
                        "preference pairs instead.")
    report = ExportReport()
    rows: list[dict[str, Any]] = []
    source = f"label:{info.name}"
    for j in service.judged_items(info.id):
        report.judgments += 1
        if j["outcome"] == "skip":
            report.skip("skip")
            continue
        for i, scored in enumerate(j["scores"]):
            rows.append({"prompt": j["prompt"], "response": j["responses"][i],
                         **{a: scored[a] for a in info.criteria}, "annotator": j["annotator"], "source": source,
                         "response_source": j["sources"][i], "item_id": j["item_id"]})
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
