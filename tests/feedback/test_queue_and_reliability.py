"""Human-in-the-loop rounds in the feedback layer: round projects, the priority-ordered queue with per-item
annotator counts, the 0003 -> 0004 migration, annotator reliability (one-coin Dawid & Skene) checked by hand and
on a simulated pool, export with confidence columns, the CLI and the admin pages."""

import itertools
import json
import math
import random
import uuid
from collections import Counter

import numpy as np
import pytest

from rlhfkit.errors import ConfigError, UserError
from rlhfkit.feedback.export import export_by_criterion, export_rows, export_run_rows, reliability_reports
from rlhfkit.feedback.reliability import Label, beta_cdf, dawid_skene
from rlhfkit.feedback.service import Conflict, FeedbackError, FeedbackService, ItemSpec, NotFound
from rlhfkit.feedback.store import open_store

from .fb_helpers import arith_items, old_database, upgraded_service


def sid() -> str:
    return uuid.uuid4().hex


def pair(i: int, **kw) -> ItemSpec:
    return ItemSpec(f"question {i} ?", [f"answer {i} one .", f"answer {i} two ."], ["m0", "m1"], **kw)


def label_all(svc, user_id, project_id):
    """Take tasks and answer A until the queue is dry for this user; the item ids in the order given."""
    got = []
    while (t := svc.next_task(user_id, project_id)) is not None:
        got.append(t.item_id)
        svc.submit(user_id, t.assignment_id, sid(), outcome="A", strength="better")
    return got


# ------------------------------------------------------------------------------------------ round projects
def test_round_projects_are_listed_by_round_and_a_round_is_taken_once(svc):
    second = svc.create_project("exp-r2", run="exp", round=2)
    first = svc.create_project("exp-r1", run="exp", round=1)
    svc.create_project("other-r1", run="other", round=1)
    svc.create_project("plain")
    assert [(p.name, p.run, p.round) for p in svc.round_projects("exp")] == [("exp-r1", "exp", 1), ("exp-r2", "exp", 2)]
    assert (first.run, first.round, second.round) == ("exp", 1, 2)
    assert svc.project("plain").run is None and svc.round_projects("nope") == []
    with pytest.raises(Conflict, match="run 'exp' already has round 2 \\(project 'exp-r2'\\)"):
        svc.create_project("exp-r2b", run="exp", round=2)
    with pytest.raises(FeedbackError, match="both a run name and a round number"):
        svc.create_project("half", run="exp")
    with pytest.raises(FeedbackError, match="round must be a whole number from 1"):
        svc.create_project("zero", run="exp", round=0)
    with pytest.raises(FeedbackError, match="run name"):
        svc.create_project("bad-run", run="no spaces", round=1)


def test_item_overrides_are_checked_and_make_the_queue_ordered(svc):
    p = svc.create_project("o")
    svc.add_items(p.id, arith_items(2))
    assert not svc.project(p.id).ordered  # plain items keep the position-order fast path
    for bad, match in ((dict(annotators=0), "annotators must be a whole number of at least 1, got 0"),
                       (dict(annotators=True), "annotators must be"), (dict(priority=math.nan), "priority must be "
                       "a finite number"), (dict(priority=math.inf), "finite"), (dict(priority="high"), "finite")):
        with pytest.raises(FeedbackError, match=match):
            svc.add_items(p.id, [pair(9, **bad)])
    assert not svc.project(p.id).ordered  # a refused batch changes nothing
    svc.add_items(p.id, [pair(3, annotators=2)])
    assert svc.project(p.id).ordered


# ---------------------------------------------------------------------------------------------- the queue
def test_fresh_items_go_by_priority_and_started_items_finish_first(svc):
    p = svc.create_project("prio", annotators_per_item=1)
    # positions 0..4; priorities: none, 1, 5, 5, -2 -> order 2, 3 (tie: position), 1, 4 (-2), 0 (none last)
    svc.add_items(p.id, [pair(0), pair(1, priority=1), pair(2, priority=5), pair(3, priority=5, annotators=3),
                         pair(4, priority=-2)])
    ids = [i for i, _ in svc.item_prompts(p.id)]
    ann, bob, cy = (svc.add_user(n, "annotator", "password1").id for n in ("ann", "bob", "cy"))
    assert label_all(svc, ann, p.id) == [ids[2], ids[3], ids[1], ids[4], ids[0]]
    # ann started item 3 (3 annotators): bob gets it before any fresh item, though item 2 ranks level with it
    # and the rest were all taken by ann (annotator count 1)
    assert label_all(svc, bob, p.id) == [ids[3]]
    assert label_all(svc, cy, p.id) == [ids[3]]
    counts = Counter(j["item_id"] for j in svc.judged_items(p.id))
    assert counts == {ids[0]: 1, ids[1]: 1, ids[2]: 1, ids[3]: 3, ids[4]: 1}  # each item's own count, exactly
    prog = svc.progress(p.id)
    assert (prog.complete_items, prog.labels, prog.slots, prog.skips) == (5, 7, 7, 0)
    assert prog.outcomes == {"A": 7, "B": 0, "tie": 0, "both_bad": 0}


def test_set_priorities_reorders_fresh_items_only_and_names_a_stranger(svc):
    p = svc.create_project("re", annotators_per_item=2)
    svc.add_items(p.id, [pair(i) for i in range(4)])
    other = svc.create_project("elsewhere")
    svc.add_items(other.id, [pair(9)])
    ids = [i for i, _ in svc.item_prompts(p.id)]
    stranger = svc.item_prompts(other.id)[0][0]
    ann, bob = (svc.add_user(n, "annotator", "password1").id for n in ("ann", "bob"))
    t = svc.next_task(ann, p.id)  # the fast path: position 0
    assert t.item_id == ids[0]
    svc.submit(ann, t.assignment_id, sid(), outcome="A", strength="better")
    assert svc.set_priorities(p.id, {ids[0]: -100.0, ids[1]: 1.0, ids[3]: 7}) == 3
    assert svc.project(p.id).ordered
    # ids[0] is started (held 1 of 2): it still goes first whatever its priority; then fresh by priority
    assert label_all(svc, bob, p.id) == [ids[0], ids[3], ids[1], ids[2]]
    with pytest.raises(NotFound, match=f"item {stranger} is not in project 're'"):
        svc.set_priorities(p.id, {ids[1]: 2.0, stranger: 1.0})
    with pytest.raises(FeedbackError, match=f"item {ids[1]}: priority must be a finite number"):
        svc.set_priorities(p.id, {ids[1]: math.nan})
    assert svc.set_priorities(p.id, {}) == 0


def test_gold_items_are_spread_through_each_annotators_tasks(svc):
    p = svc.create_project("spread")
    # 10 items, 2 of them gold: a gold item is due while gold_given * 10 < (given + 1) * 2, so at tasks 1 and 6
    specs = [pair(i, priority=float(10 - i)) for i in range(8)]
    specs[3:3] = [pair(100, gold_outcome="A")]
    specs.append(pair(101, gold_outcome="B"))
    svc.add_items(p.id, specs)
    gold = {i for i, prompt in svc.item_prompts(p.id) if prompt in ("question 100 ?", "question 101 ?")}
    for name in ("ann", "bob"):
        got = label_all(svc, svc.add_user(name, "annotator", "password1").id, p.id)
        assert [n for n, i in enumerate(got, 1) if i in gold] == ([1, 6] if name == "ann" else [1, 2])
    # bob found the 8 regular items taken (1 annotator each) so he got both gold items; ann got all ten
    assert {x.name: x.gold_seen for x in svc.progress(p.id).annotators} == {"ann": 2, "bob": 2}


def _ordered_reference(store, project_id, user_id, cutoff):
    """_pick_ordered's documented rule in plain Python over every row: the item this user gets now, or None."""
    from sqlalchemy import select

    from rlhfkit.feedback.store import Assignment, Gold, Item, Project

    with store.session() as s:
        k = s.get(Project, project_id).annotators_per_item
        items = s.execute(select(Item.id, Item.position, Item.priority, Item.annotators)
                          .where(Item.project_id == project_id)).all()
        gold = set(s.scalars(select(Gold.item_id))) & {it.id for it in items}
        assigned = s.execute(select(Assignment.item_id, Assignment.user_id, Assignment.created_at,
                                    Assignment.completed_at).where(Assignment.item_id.in_([it.id for it in items]))
                             ).all()
    held = Counter(i for i, _, created, done in assigned if done is not None or created > cutoff)
    given = [i for i, u, _, _ in assigned if u == user_id]

    def rank(it):
        return (it.priority is None, -(it.priority or 0.0), it.position)

    open_items = [it for it in items if it.id not in set(given)]
    gold_open = sorted((it for it in open_items if it.id in gold), key=rank)
    if gold and gold_open and sum(i in gold for i in given) * len(items) < (len(given) + 1) * len(gold):
        return gold_open[0].id
    regular = [it for it in open_items if it.id not in gold]
    started = [it for it in regular if 0 < held[it.id] < (it.annotators or k)]
    if started:
        return min(started, key=lambda it: (-held[it.id], *rank(it))).id
    fresh = [it for it in regular if held[it.id] == 0]
    if fresh:
        return min(fresh, key=rank).id
    return gold_open[0].id if gold_open else None


def test_the_ordered_queue_picks_what_its_rule_says(store):
    """Random labelling with overlap overrides, priorities set while labelling runs, gold items, skips, tasks
    left open and expiring and items added midway: every pick equals the rule written out in plain Python."""
    from sqlalchemy import select, update

    from rlhfkit.feedback.store import Assignment, Item, now

    rng = random.Random(7)
    svc = FeedbackService(store, rng=random.Random(1))
    ttl = svc.assignment_ttl_s
    users = [svc.add_user(f"q{i}", "annotator", "password1").id for i in range(4)]
    p = svc.create_project("ordered", annotators_per_item=2)
    compared = 0
    for batch in range(3):
        specs = [pair(10 * batch + i, priority=rng.choice([None, 0.0, 1.0, rng.uniform(-3, 3)]),
                      annotators=rng.choice([None, 1, 3])) for i in range(8)]
        if batch < 2:
            specs.append(pair(900 + batch, gold_outcome=rng.choice(["A", "B", "tie"])))
        svc.add_items(p.id, specs)
        for _ in range(70):
            user = rng.choice(users)
            if rng.random() < 0.1:  # the open tasks expire
                with store.session() as s, s.begin():
                    s.execute(update(Assignment).where(Assignment.completed_at.is_(None))
                              .values(created_at=Assignment.created_at - 2 * ttl))
            if rng.random() < 0.1:  # the rounds loop re-orders the queue
                ids = [i for i, _ in svc.item_prompts(p.id)]
                svc.set_priorities(p.id, {i: rng.uniform(-5, 5) for i in rng.sample(ids, 3)})
            with store.session() as s:
                has_open = s.scalar(select(Assignment.id).join(Item, Item.id == Assignment.item_id).where(
                    Assignment.user_id == user, Item.project_id == p.id, Assignment.completed_at.is_(None)))
            expected = _ordered_reference(store, p.id, user, now() - ttl)
            task = svc.next_task(user, p.id)
            if has_open is None:
                assert (task.item_id if task else None) == expected, batch
                compared += 1
            if task is not None and rng.random() < 0.8:
                outcome = "skip" if rng.random() < 0.2 else "B"
                svc.submit(user, task.assignment_id, sid(), outcome=outcome,
                           strength="better" if outcome == "B" else None)
    assert compared > 120
    # nobody judged an item twice
    pairs = [(j["item_id"], j["annotator"]) for j in svc.judged_items(p.id)]
    assert len(pairs) == len(set(pairs))


# ------------------------------------------------------------------------------------------------ migration
def test_a_0003_database_upgrades_in_place_and_keeps_its_queue(tmp_path):
    path = tmp_path / "old.db"
    old_database(path, "0003", prompts=("q1 ?", "q2 ?", "q3 ?"))  # the schema as that release left it

    svc = upgraded_service(path)
    old = svc.project("old")
    assert (old.run, old.round, old.ordered) == (None, None, False)
    ann = svc.user_by_name("ann").id
    assert svc.next_task(ann, old.id).prompt == "q2 ?"  # position order, as before
    prog = svc.progress(old.id)
    assert (prog.labels, prog.slots, prog.complete_items) == (1, 3, 1)
    assert svc.reliability([old.id]).annotator("ann").judgments == 1
    # the upgraded database takes rounds and prioritised items
    r1 = svc.create_project("run-r1", run="run", round=1)
    svc.add_items(r1.id, [pair(1, priority=1.0), pair(2, priority=2.0, annotators=2)])
    assert svc.next_task(ann, r1.id).prompt == "question 2 ?"
    assert [p.name for p in svc.round_projects("run")] == ["run-r1"]
    svc.store.close()


# ----------------------------------------------------------------------------------------------- Beta CDF
def test_beta_cdf_matches_closed_forms():
    for x in (0.05, 0.3, 0.5, 0.6, 0.77, 0.95):
        assert beta_cdf(x, 1, 1) == pytest.approx(x, abs=1e-12)
        assert beta_cdf(x, 2, 2) == pytest.approx(3 * x**2 - 2 * x**3, abs=1e-12)
        # integer a, b: I_x(a, b) = P(Binomial(a + b - 1, x) >= a)
        for a, b in ((7, 3), (20, 35)):
            n = a + b - 1
            expected = sum(math.comb(n, j) * x**j * (1 - x) ** (n - j) for j in range(a, n + 1))
            assert beta_cdf(x, a, b) == pytest.approx(expected, abs=1e-12)
    assert (beta_cdf(0.0, 3, 2), beta_cdf(1.0, 3, 2)) == (0.0, 1.0)


# ------------------------------------------------------------------------------------------- reliability
def test_on_gold_items_alone_the_fit_is_the_beta_posterior_by_hand():
    gold = {1: "A", 2: "A", 3: "B", 4: "B", 5: "A", 6: "A", 7: "A"}
    labels = [Label(i, "ann", o, gold[i]) for i, o in zip(range(1, 6), "AABBB")]  # 4 of 5 right
    labels += [Label(i, "bob", gold[i], gold[i]) for i in range(1, 6)]  # 5 of 5 right
    labels += [Label(6, "bob", "tie", "A"), Label(7, "bob", "skip", "A")]
    report = dawid_skene(labels, min_informative=5)
    ann, bob = report.annotator("ann"), report.annotator("bob")
    # Beta(3, 2) prior: MAP (3 - 1 + right) / (3 + 2 - 2 + n); posterior Beta(3 + right, 2 + wrong)
    assert ann.accuracy == pytest.approx(6 / 8) and bob.accuracy == pytest.approx(7 / 8)
    assert ann.accuracy_se == pytest.approx(math.sqrt(7 * 3 / (10**2 * 11)))  # the sd of Beta(7, 3)
    # suspicion = P(a < 0.6) under Beta(7, 3) = P(Binomial(9, 0.6) >= 7)
    assert ann.suspicion == pytest.approx(sum(math.comb(9, j) * 0.6**j * 0.4 ** (9 - j) for j in (7, 8, 9)))
    assert (ann.flag, bob.flag) == ("ok", "ok")
    assert (ann.gold_judgments, ann.gold_accuracy, bob.gold_judgments, bob.gold_accuracy) == (5, 0.8, 6, 5 / 6)
    assert (bob.judgments, bob.unused, bob.informative, bob.overlap_judgments) == (5, 2, 5, 0)
    assert report.confidence(5, "ann") == 0.0 and report.confidence(1, "ann") == 1.0
    assert report.confidence(6, "bob") is None  # a tie says nothing about which response is better
    assert report.unused == {"tie": 1, "both_bad": 0, "skip": 1}
    assert report.class_prior == 0.5  # no free item: Beta(2, 2)'s mode
    assert dawid_skene(labels).annotator("ann").flag == "too_few"  # 5 informative judgments < 10


TINY = [Label(1, "u", "A"), Label(1, "v", "A"), Label(1, "w", "B"),
        Label(2, "u", "B"), Label(2, "v", "B"),
        Label(3, "u", "A"), Label(3, "w", "A"),
        Label(4, "v", "B"),  # a lone label
        Label(5, "u", "A", "A"), Label(5, "v", "A", "A"), Label(5, "w", "B", "A"),  # gold
        Label(6, "w", "tie")]


def test_tiny_case_posteriors_equal_brute_force_enumeration_and_the_em_fixed_point():
    report = dawid_skene(TINY)
    acc = {a.name: a.accuracy for a in report.annotators}
    pi = report.class_prior
    free = [1, 2, 3, 4]
    votes = {i: [(lab.annotator, lab.outcome) for lab in TINY if lab.item_id == i and lab.outcome in ("A", "B")]
             for i in free}
    # the joint posterior over z in {A, B}^4 by enumeration, with the fitted accuracies and class prior
    joint = {}
    for z in itertools.product("AB", repeat=len(free)):
        p = 1.0
        for truth, i in zip(z, free):
            p *= pi if truth == "A" else 1 - pi
            for k, said in votes[i]:
                p *= acc[k] if said == truth else 1 - acc[k]
        joint[z] = p
    total = sum(joint.values())
    for n, i in enumerate(free):
        p_a = sum(p for z, p in joint.items() if z[n] == "A") / total
        assert report.items[i] == pytest.approx(p_a, abs=1e-12)
        for k, said in votes[i]:
            assert report.confidence(i, k) == pytest.approx(p_a if said == "A" else 1 - p_a, abs=1e-12)
    assert report.items[5] == 1.0 and report.confidence(5, "w") == 0.0  # gold clamps the truth
    # the M-step written out: the fit is its own fixed point
    for k in "uvw":
        mine = [(lab.item_id, lab.outcome) for lab in TINY if lab.annotator == k and lab.outcome in ("A", "B")]
        right = sum(report.items[i] if said == "A" else 1 - report.items[i] for i, said in mine)
        assert acc[k] == pytest.approx((3 - 1 + right) / (3 + 2 - 2 + len(mine)), abs=1e-7)
    assert pi == pytest.approx((sum(report.items[i] for i in free) + 1) / (len(free) + 2), abs=1e-7)
    assert report.converged and report.unused["tie"] == 1


def test_tiny_case_equals_a_plain_python_em():
    """The same EM with dicts and loops, from the same start (soft majority, gold clamped)."""
    labs = [lab for lab in TINY if lab.outcome in ("A", "B")]
    items = sorted({lab.item_id for lab in labs})
    gold = {lab.item_id: lab.gold for lab in labs if lab.gold}
    r = {}
    for i in items:
        said = [lab.outcome for lab in labs if lab.item_id == i]
        r[i] = (1.0 if gold[i] == "A" else 0.0) if i in gold else said.count("A") / len(said)
    for _ in range(2000):
        acc = {}
        for k in "uvw":
            mine = [lab for lab in labs if lab.annotator == k]
            right = sum(r[lab.item_id] if lab.outcome == "A" else 1 - r[lab.item_id] for lab in mine)
            acc[k] = (2 + right) / (3 + len(mine))
        free = [i for i in items if i not in gold]
        pi = (sum(r[i] for i in free) + 1) / (len(free) + 2)
        for i in free:
            a, b = pi, 1 - pi
            for lab in labs:
                if lab.item_id == i:
                    a *= acc[lab.annotator] if lab.outcome == "A" else 1 - acc[lab.annotator]
                    b *= acc[lab.annotator] if lab.outcome == "B" else 1 - acc[lab.annotator]
            r[i] = a / (a + b)
    report = dawid_skene(TINY)
    for k in "uvw":
        assert report.annotator(k).accuracy == pytest.approx(acc[k], abs=1e-7)
    assert report.class_prior == pytest.approx(pi, abs=1e-7)


def test_ties_and_both_bad_gold_items_stay_out_of_the_fit():
    base = dawid_skene(TINY)
    extra = TINY + [Label(7, "u", "A", "tie"), Label(7, "v", "B", "tie"), Label(8, "w", "both_bad", "both_bad")]
    report = dawid_skene(extra)
    for k in "uvw":
        assert report.annotator(k).accuracy == pytest.approx(base.annotator(k).accuracy, abs=1e-12)
    assert report.confidence(7, "u") == report.confidence(7, "v") == 0.5 == report.items[7]
    assert report.annotator("w").gold_accuracy == 0.5  # right on the both_bad gold, wrong on item 5
    empty = dawid_skene([Label(9, "lone", "skip")])  # nobody said A or B: the prior, and too few to judge
    assert (empty.annotator("lone").accuracy, empty.annotator("lone").flag, empty.items) == (2 / 3, "too_few", {})
    with pytest.raises(UserError, match="prior"):
        dawid_skene(TINY, prior=(1.0, 2.0))
    with pytest.raises(UserError, match="random_below"):
        dawid_skene(TINY, random_below=0.4)


ACCURACY = {**{f"good{k:02d}": 0.8 for k in range(16)}, **{f"random{k}": 0.5 for k in range(4)}, "adversary": 0.2}
BAD = {name for name, a in ACCURACY.items() if a < 0.7}


def _auc(suspicion: dict[str, float]) -> float:
    """P(a bad annotator is more suspect than a good one), ties counting half."""
    pairs = [(suspicion[b], suspicion[g]) for b in BAD for g in ACCURACY if g not in BAD]
    return sum((b > g) + 0.5 * (b == g) for b, g in pairs) / len(pairs)


def test_a_simulated_pool_labelling_through_the_queue_flags_its_bad_annotators(svc):
    """16 good annotators (accuracy 0.8), 4 random clickers and an adversary (0.2) label 300 items, a fifth of them
    by 3 annotators, and 20 gold items, through the queue of a round project."""
    rng = random.Random(0)
    p = svc.create_project("sim-r1", run="sim", round=1)
    specs = [pair(i, annotators=3 if i < 60 else 1) for i in range(300)]
    specs += [pair(1000 + g, gold_outcome=rng.choice("AB")) for g in range(20)]
    rng.shuffle(specs)
    svc.add_items(p.id, specs)
    by_prompt = {s.prompt: s.gold_outcome or rng.choice("AB") for s in specs}
    truth = {i: by_prompt[prompt] for i, prompt in svc.item_prompts(p.id)}
    users = {name: svc.ensure_user(name).id for name in ACCURACY}
    active = list(ACCURACY)
    while active:
        for name in list(active):
            task = svc.next_task(users[name], p.id)
            if task is None:
                active.remove(name)
                continue
            z = truth[task.item_id]
            said = z if rng.random() < ACCURACY[name] else "AB"[z == "A"]
            svc.submit(users[name], task.assignment_id, sid(), outcome=said, strength="better")
    judged = svc.judged_items(p.id)
    assert Counter(j["annotator"] for j in judged if j["gold"]) == {name: 20 for name in ACCURACY}
    assert Counter(Counter(j["item_id"] for j in judged if not j["gold"]).values()) == {1: 240, 3: 60}

    report = svc.reliability([p.id])
    flags = {a.name: a.flag for a in report.annotators}
    assert flags["adversary"] == "adversarial"
    assert all(flags[name] == "ok" for name in ACCURACY if name not in BAD), flags
    # about 30 informative judgments each cannot always tell a coin from 0.6 with 90% certainty: the flag catches
    # some random clickers, and the suspicion ranks them all above the good annotators
    assert any(flags[f"random{k}"] == "random" for k in range(4)), flags
    assert _auc({a.name: a.suspicion for a in report.annotators}) >= 0.9
    # as soft targets the posteriors beat the raw labels (each a confidence of 1): a lower Brier score
    regular = [j for j in judged if not j["gold"]]
    right = np.array([j["outcome"] == truth[j["item_id"]] for j in regular], dtype=float)
    confidence = np.array([report.confidence(j["item_id"], j["annotator"]) for j in regular])
    assert np.mean((confidence - right) ** 2) < 0.75 * np.mean((1.0 - right) ** 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_on_a_simulated_pool_the_posterior_beats_the_majority_vote(seed):
    """The same pool on 2,000 items (a fifth of them judged by 3 annotators, the rest by 1) and 20 gold items seen
    by all, straight into the model: the posterior's side is right more often than the majority label, and the
    suspicion ranks the bad annotators first."""
    rng = random.Random(seed)
    names = sorted(ACCURACY)
    truth = {i: rng.choice("AB") for i in range(2020)}
    labels = []
    for i, z in truth.items():
        gold = z if i >= 2000 else None
        for name in names if gold else rng.sample(names, 3 if i < 400 else 1):
            labels.append(Label(i, name, z if rng.random() < ACCURACY[name] else "AB"[z == "A"], gold))
    report = dawid_skene(labels)
    votes = {}
    for lab in labels:
        if lab.gold is None:
            votes.setdefault(lab.item_id, []).append(lab.outcome)
    majority = np.mean([max("AB", key=said.count) == truth[i] for i, said in votes.items()])  # odd counts: no ties
    posterior = np.mean([("A" if report.items[i] > 0.5 else "B") == truth[i] for i in votes])
    assert posterior > majority + 0.01
    assert _auc({a.name: a.suspicion for a in report.annotators}) >= 0.9
    assert report.annotator("adversary").flag == "adversarial"


# --------------------------------------------------------------------------------------------------- export
def _two_rounds(svc):
    """Run "hitl": two round projects labelled by ann (always right), bob (always wrong) and cy (right), with gold
    items and 3-annotator overlap; response 0 is the better one everywhere."""
    ids = {}
    for rnd in (1, 2):
        p = svc.create_project(f"hitl-r{rnd}", run="hitl", round=rnd)
        specs = [pair(100 * rnd + i, annotators=3 if i < 4 else 1) for i in range(8)]
        specs += [pair(100 * rnd + 50 + g, gold_outcome="A") for g in range(6)]
        svc.add_items(p.id, specs)
        ids[rnd] = p.id
    users = {n: svc.ensure_user(n).id for n in ("ann", "bob", "cy")}
    for rnd, pid in ids.items():
        active = list(users)
        while active:
            for n in list(active):
                t = svc.next_task(users[n], pid)
                if t is None:
                    active.remove(n)
                    continue
                outcome = ("B" if n == "bob" else "A") if t.prompt != "question 107 ?" else "tie"
                svc.submit(users[n], t.assignment_id, sid(), outcome=outcome,
                           strength="better" if outcome != "tie" else None)
    return ids


def test_export_with_reliability_adds_confidence_and_run_rows_carry_their_round(svc):
    ids = _two_rounds(svc)
    reports = reliability_reports(svc, svc.round_projects("hitl"))
    fit = reports[None]
    assert {a.name: a.flag for a in fit.annotators}["bob"] == "adversarial"
    rows, report = export_run_rows(svc, "hitl", reliability=reports)
    assert {r["round"] for r in rows} == {1, 2} and report.rows == len(rows)
    assert report.skipped["gold item"] == 2 * 6 * 3 and report.skipped["tie"] >= 1
    for row in rows:
        assert 0.0 <= row["confidence"] <= 1.0
        assert row["confidence"] == fit.confidence(row["item_id"], row["annotator"])
        assert row["annotator_accuracy"] == fit.annotator(row["annotator"]).accuracy
    ann = [r for r in rows if r["annotator"] == "ann"]
    bob = [r for r in rows if r["annotator"] == "bob"]
    assert min(r["confidence"] for r in ann) > 0.8 and max(r["confidence"] for r in bob) < 0.2
    assert all(b["chosen"].endswith("two .") for b in bob)  # bob chose the worse response: low confidence
    # one project at a time gives the same rows, without the round column
    one, _ = export_rows(svc, ids[1], reliability=fit)
    assert [{k: v for k, v in r.items() if k != "round"} for r in rows if r["round"] == 1] == one
    with pytest.raises(UserError, match="no posterior for item"):
        export_rows(svc, ids[1], reliability=svc.reliability([ids[2]]))
    with pytest.raises(UserError, match="drop reliability"):
        export_rows(svc, ids[1], kto=True, reliability=fit)
    with pytest.raises(UserError, match="has no round projects"):
        export_run_rows(svc, "nope")


def test_reliability_refuses_rankings_and_wants_a_criterion_for_rubrics(svc):
    ranks = svc.create_project("ranks", mode="ranking", responses_per_item=3)
    rubric = svc.create_project("rubric", criteria=["helpfulness", "honesty"])
    plain = svc.create_project("plain")
    with pytest.raises(FeedbackError, match="'ranks' is a ranking project; annotator reliability is estimated "
                                            "from pairwise"):
        svc.reliability([ranks.id])
    with pytest.raises(FeedbackError, match="pass criterion, one of helpfulness, honesty"):
        svc.reliability([rubric.id])
    with pytest.raises(FeedbackError, match="drop criterion"):
        svc.reliability([plain.id], criterion="honesty")
    with pytest.raises(FeedbackError, match="non-empty list of project ids"):
        svc.reliability(plain.id)
    with pytest.raises(FeedbackError, match="flag_probability"):
        svc.reliability([plain.id], flag_probability=1.5)


def test_a_rubric_project_is_fit_per_criterion(svc):
    from rlhfkit.feedback.service import Verdict

    p = svc.create_project("rub", criteria=["helpfulness", "honesty"], annotators_per_item=2)
    svc.add_items(p.id, [pair(i) for i in range(3)])
    ann, bob = (svc.add_user(n, "annotator", "password1").id for n in ("ann", "bob"))
    for user, honesty in ((ann, "A"), (bob, "B")):
        while (t := svc.next_task(user, p.id)) is not None:
            svc.submit(user, t.assignment_id, sid(), criteria={"helpfulness": Verdict("A", "better"),
                                                               "honesty": Verdict(honesty)})
    reports = reliability_reports(svc, [p])
    assert list(reports) == ["helpfulness", "honesty"]
    assert all(v > 0.5 for v in reports["helpfulness"].posteriors.values())  # everyone agrees
    assert reports["honesty"].confidence(svc.item_prompts(p.id)[0][0], "ann") == pytest.approx(0.5, abs=0.2)
    rows, _ = export_rows(svc, p.id, reliability=reports)
    assert {r["criterion"] for r in rows} == {"helpfulness", "honesty"}
    assert all(r["confidence"] == reports[r["criterion"]].confidence(r["item_id"], r["annotator"]) for r in rows)
    files, _ = export_by_criterion(svc, p.id, reliability=reports)
    assert [r["confidence"] for r in files["honesty"]] == [r["confidence"] for r in rows if r["criterion"] == "honesty"]


# ---------------------------------------------------------------------------------------------------- CLI
def test_label_reliability_and_export_run_from_the_command_line(tmp_path, capsys):
    from rlhfkit import label as cli

    db = str(tmp_path / "f.db")
    store = open_store(db)
    _two_rounds(FeedbackService(store, rng=random.Random(0)))
    store.close()
    run = lambda *argv: cli.main(cli.parse_label_args(list(argv)))  # noqa: E731
    printed = run("reliability", "--db", db, "--run", "hitl")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == printed
    assert printed["projects"] == ["hitl-r1", "hitl-r2"]
    flags = {a["name"]: a["flag"] for a in printed["annotators"]}
    assert flags["bob"] == "adversarial" and flags["ann"] == "ok"
    columns = {"accuracy", "accuracy_se", "gold_accuracy", "overlap_judgments", "suspicion"}
    assert columns <= set(printed["annotators"][0])
    out = tmp_path / "prefs.jsonl"
    summary = run("export", "--db", db, "--run", "hitl", "--output", str(out), "--reliability")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["rows"] == len(rows) > 0 and summary["rounds"] == [1, 2]
    assert summary["flagged_annotators"] == {"bob": "adversarial"}
    assert all({"confidence", "annotator_accuracy", "round", "item_id"} <= set(r) for r in rows)
    one = run("export", "--db", db, "--project", "hitl-r2", "--output", str(tmp_path / "r2.jsonl"), "--reliability")
    assert one["rows"] == sum(r["round"] == 2 for r in rows)
    with pytest.raises(ConfigError, match="--project P or --run R"):
        run("reliability", "--db", db)
    with pytest.raises(ConfigError, match="drop --majority"):
        run("export", "--db", db, "--run", "hitl", "--output", str(out), "--majority")
    with pytest.raises(ConfigError, match="has no round projects"):
        run("export", "--db", db, "--run", "nope", "--output", str(out))


# ------------------------------------------------------------------------------------------------- admin
def test_the_admin_pages_show_the_round_and_a_flagged_annotator(app, svc):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from .web_helpers import login

    ids = _two_rounds(svc)
    boss = TestClient(app, base_url="http://127.0.0.1")
    assert login(boss, "boss").status_code == 303
    page = boss.get(f"/admin/p/{ids[2]}").text
    prog = svc.progress(ids[2])
    assert f"Run hitl · round 2: {prog.labels} label(s) so far on 8 items" in page
    assert "pooled over run hitl's 2 rounds" in page
    row = page[page.index('data-annotator="bob"'):]
    row = row[: row.index("</tr>")]
    assert 'data-flag="adversarial" class="flagged error"' in row and "<mark>adversarial</mark>" in row
    assert 'class="flagged' not in page[page.index('data-annotator="ann"'):][:60]
    home = boss.get("/admin").text
    assert 'data-run="hitl"' in home and "Run hitl" in home
    run_table = home[home.index('<table class="rounds" data-run="hitl"'):]
    assert run_table.index("hitl-r1") < run_table.index("hitl-r2")
    assert f"{prog.labels} of {prog.slots}" in run_table
    assert 'class="project">pairs</a>' in home  # projects outside runs keep their table


def test_gold_every_puts_a_gold_item_at_every_kth_task_until_all_are_answered(tmp_path):
    from rlhfkit.feedback.service import FeedbackService, ItemSpec
    from rlhfkit.feedback.store import open_store

    svc = FeedbackService(open_store(str(tmp_path / "g.db")))
    p = svc.create_project("g", "pairwise", gold_every=3)
    assert p.gold_every == 3
    svc.add_items(p.id, [ItemSpec(f"q{i} ?", [f"a{i} .", f"b{i} ."], priority=float(-i)) for i in range(12)]
                  + [ItemSpec(f"gold{i} ?", [f"good{i} .", f"bad{i} ."], gold_outcome="A") for i in range(3)])
    uid = svc.ensure_user("ann").id
    gold = svc.gold_item_ids(p.id)
    kinds = []
    while (task := svc.next_task(uid, p.id)) is not None:
        kinds.append("G" if task.item_id in gold else "i")
        svc.submit(uid, task.assignment_id, f"ann-{task.assignment_id:08d}", outcome="A", strength="better")
    assert "".join(kinds) == "GiiGiiGiiiiiiiiii"[:len(kinds)] and kinds.count("G") == 3 and len(kinds) == 15
    with pytest.raises(FeedbackError, match="gold_every"):
        svc.create_project("h", "pairwise", gold_every=0)


def test_a_fit_made_after_the_export_covers_it_while_people_keep_labelling(svc):
    from rlhfkit.feedback.export import add_reliability_columns

    p = svc.create_project("live", run="live", round=1)
    svc.add_items(p.id, [pair(i, priority=float(-i)) for i in range(4)])
    ann, bob = svc.ensure_user("ann").id, svc.ensure_user("bob").id

    def judge(user: int) -> None:
        task = svc.next_task(user, p.id)
        svc.submit(user, task.assignment_id, sid(), outcome="A", strength="better")

    judge(ann)
    judge(bob)
    early = reliability_reports(svc, [p.id])  # a fit made before the export ...
    rows, _ = export_run_rows(svc, "live")
    judge(ann)  # ... and a label that arrives in between
    rows_now, _ = export_run_rows(svc, "live")
    with pytest.raises(UserError, match="no posterior for item .* fit it over the exported projects"):
        add_reliability_columns(rows_now, early)
    # the order the rounds loop uses: export, then fit; a label arriving after the export is in the fit, harmless
    judge(bob)
    add_reliability_columns(rows_now, reliability_reports(svc, [p.id]))
    assert len(rows_now) == 3 and all(0.0 <= r["confidence"] <= 1.0 and "annotator_accuracy" in r for r in rows_now)
    assert len(rows) == 2
