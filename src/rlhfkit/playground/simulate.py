"""Labelling simulation: the playground's simulated annotators label a feedback project through the feedback
service's public API, exactly as people do through the web app (`rlhfkit label simulate`). They judge with the
hidden gold judge, so this module is one of the few allowed to reach it."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from typing import Any, Callable

from rlhfkit.errors import UserError
from rlhfkit.feedback.commands import LabelConfig, need, service_for
from rlhfkit.feedback.service import Ack, Verdict
from rlhfkit.playground.annotators import make_criterion_pools, make_pool
from rlhfkit.playground.gold import CRITERIA
from rlhfkit.playground.tasks import lookup


def _check_playground_prompts(svc: Any, project_id: int, lookup: Callable[[str], Any]) -> None:
    """UserError naming the first item whose prompt is not a playground prompt: simulated annotators judge with
    the playground's hidden fields, so they can label nothing else."""
    for item_id, prompt in svc.item_prompts(project_id):
        try:
            lookup(prompt)
        except KeyError:
            raise UserError(f"item {item_id}'s prompt ({prompt[:40]!r}) is not a playground prompt, so "
                            "simulated annotators cannot judge it; simulate only projects made from "
                            "playground prompts.") from None


def _item_outcome(outcome: str, display_order: list[int]) -> str:
    """compare's "A" is the response shown first: map a winner back to the item's response index."""
    if outcome not in ("A", "B"):
        return outcome
    winner = display_order[0 if outcome == "A" else 1]
    return "A" if winner == 0 else "B"


def simulate(cfg: LabelConfig) -> dict:
    """Each simulated annotator takes tasks from the queue in turn and submits through the service layer,
    judging the responses in the display order the queue drew (so its position bias acts on what it saw). On a
    rubric project every criterion is judged by that criterion's own annotator (`make_criterion_pools`: the
    annotator who took the task answers through the pools' member of the same index)."""
    need(cfg, "project")
    rng = random.Random(cfg.seed)
    svc = service_for(cfg, rng=random.Random(cfg.seed + 1))
    project = svc.project(cfg.project)
    if project.mode == "attributes":
        raise UserError(f"project {project.name!r} scores attributes; simulated annotators judge pairs, rankings and "
                        "rubric criteria only.")
    unknown = [c for c in (project.criteria if project.rubric else ()) if c not in CRITERIA]
    if unknown:
        raise UserError(f"project {project.name!r} has criteria {unknown} that the gold judge does not score; "
                        f"simulated annotators judge {', '.join(CRITERIA)}.")
    _check_playground_prompts(svc, project.id, lookup)  # before any item is assigned, so none is left held
    pool = make_pool(cfg.seed, cfg.annotators)
    by_criterion = make_criterion_pools(cfg.seed, cfg.annotators) if project.rubric else {}
    users = {a.id: svc.ensure_user(a.id) for a in pool}
    active = list(pool)
    stored = 0
    while active:
        for annotator in list(active):
            task = svc.next_task(users[annotator.id].id, project.id)
            if task is None:
                active.remove(annotator)
                continue
            try:
                prompt = lookup(task.prompt)
            except KeyError:
                raise UserError(f"item {task.item_id}'s prompt is not a playground prompt, so simulated annotators "
                                "cannot judge it; simulate only projects made from playground prompts.") from None
            shown = [task.responses[i] for i in task.display_order]
            sub = f"sim-{project.id:04d}-{task.assignment_id:08d}"
            if project.rubric:
                verdicts = {}
                for c in project.criteria:
                    judge = by_criterion[c][pool.index(annotator)]
                    j = judge.compare(prompt, shown[0], shown[1], rng, shuffle=False, criterion=c)
                    outcome = _item_outcome(j.outcome, task.display_order)
                    verdicts[c] = Verdict(outcome, j.strength if outcome in ("A", "B") else None)
                ack: Ack = svc.submit(users[annotator.id].id, task.assignment_id, sub, criteria=verdicts)
            elif project.mode == "pairwise":
                # shown first = compare's "A"; map the winner back to the item's response index
                j = annotator.compare(prompt, shown[0], shown[1], rng, shuffle=False)
                outcome = _item_outcome(j.outcome, task.display_order)
                ack = svc.submit(users[annotator.id].id, task.assignment_id, sub, outcome=outcome,
                                      strength=j.strength if outcome in ("A", "B") else None)
            else:
                r = annotator.rank(prompt, shown, rng)
                ack = svc.submit(users[annotator.id].id, task.assignment_id, sub,
                                 ranking=[[task.display_order[i]] for i in r.ranking])
            stored += not ack.duplicate
    progress = svc.progress(project.id)
    summary = {"project": project.name, "judgments_stored": stored, "complete_items": progress.complete_items}
    if project.rubric:
        summary["agreement"] = {c: {"units": a.units, "percent": a.percent, "alpha": a.alpha}
                                for c, a in svc.agreement_by_criterion(project.id).items()}
    print(json.dumps(summary))
    return summary


def _turn_seed(seed: int, project_id: int, user: str, done: int) -> int:
    """A seed for one simulated judgment, from who judges and how many tasks of the project they have finished: a
    run killed mid-way and rerun draws exactly the judgments (and display orders) of an uninterrupted one."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{project_id}|{user}|{done}".encode()).digest()[:8], "little")


def label_until(svc: Any, project_id: int, pool: Sequence[Any], seed: int, budget: int,
                after_label: Callable[[int], None] | None = None) -> int:
    """The pool's annotators take tasks of a plain pairwise project in turn (annotator T mod n after T finished
    tasks) until the project holds `budget` labels (`Progress.labels`: A/B/tie/both-bad judgments of non-gold
    items) or its queue is empty for everyone. Every judgment and display order is drawn from `_turn_seed`, so a
    killed and rerun labelling continues exactly as an uninterrupted one would have (an open task is handed back
    to the annotator who held it). after_label(labels so far) runs after each stored label (the rounds loop
    reorders the queue there). Returns the labels the project holds."""
    project = svc.project(project_id)
    if project.mode != "pairwise" or project.rubric:
        raise UserError(f"project {project.name!r}: simulated rounds label plain pairwise projects only.")
    _check_playground_prompts(svc, project.id, lookup)
    users = {a.id: svc.ensure_user(a.id) for a in pool}
    done = {a.id: svc.user_progress(users[a.id].id, project.id)[0] for a in pool}
    turn = sum(done.values())
    labels = svc.progress(project.id).labels
    gold = svc.gold_item_ids(project.id)
    idle: set[str] = set()
    while labels < budget and len(idle) < len(pool):
        annotator = pool[turn % len(pool)]
        turn += 1
        if annotator.id in idle:
            continue
        uid = users[annotator.id].id
        svc.rng = random.Random(_turn_seed(seed, project.id, annotator.id, done[annotator.id]))
        task = svc.next_task(uid, project.id)
        if task is None:
            idle.add(annotator.id)
            continue
        rng = random.Random(_turn_seed(seed + 1, project.id, annotator.id, done[annotator.id]))
        shown = [task.responses[i] for i in task.display_order]
        j = annotator.compare(lookup(task.prompt), shown[0], shown[1], rng, shuffle=False)
        outcome = _item_outcome(j.outcome, task.display_order)
        svc.submit(uid, task.assignment_id, f"sim-{project.id:04d}-{task.assignment_id:08d}", outcome=outcome,
                   strength=j.strength if outcome in ("A", "B") else None)
        done[annotator.id] += 1
        labels += task.item_id not in gold  # every simulated answer is a label (they never skip)
        if after_label is not None:
            after_label(labels)
    return labels
