"""Store, queue, submissions, reports and export, through the service layer every client uses."""

import json
import random
import sqlite3
import threading
import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from .fb_helpers import arith_items
from rlhfkit.data.preference import PreferencePair, Ranking, read_preferences
from rlhfkit.errors import ConfigError, UserError
from rlhfkit.feedback.export import export_rows, majority_rows, write_export
from rlhfkit.feedback.service import Conflict, FeedbackError, FeedbackService, Forbidden, ItemSpec
from rlhfkit.feedback.store import Base, head_revision, open_store


def sid() -> str:
    return uuid.uuid4().hex


# ---------------------------------------------------------------------------------------------------- store
def test_migrated_schema_equals_the_models_and_reopening_is_a_no_op(tmp_path):
    path = tmp_path / "f.db"
    store = open_store(str(path))
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    FeedbackService(store).add_user("ann", "annotator", "pw-123456")
    store.close()
    again = open_store(str(path))  # a DB made by the migration opens (and upgrades) with the data intact
    assert FeedbackService(again).user_by_name("ann").role == "annotator"
    raw = sqlite3.connect(path)
    assert raw.execute("select version_num from alembic_version").fetchall() == [(head_revision(),)]
    raw.execute("update alembic_version set version_num = 'from-the-future'")
    raw.commit()
    raw.close()
    again.close()
    with pytest.raises(UserError, match="upgrade rlhfkit"):
        open_store(str(path))


def test_an_empty_pre_existing_sqlite_file_is_migrated(tmp_path):
    path = tmp_path / "old.db"
    sqlite3.connect(path).close()
    store = open_store(str(path))
    assert FeedbackService(store).projects() == []


def test_opening_waits_for_a_writer_holding_a_new_file(tmp_path):
    """The rounds loop and a person's pages open a new feedback file at the same moment (CI failed a rounds test on
    it). Switching a file to WAL mode needs its exclusive lock, and SQLite answers "database is locked" at once,
    without its busy handler, while another connection holds the write lock of a file still in rollback mode."""
    path = tmp_path / "new.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("CREATE TABLE scratch (x)")
    release = threading.Timer(0.5, lambda: writer.execute("ROLLBACK"))
    release.start()
    try:
        store = open_store(str(path))
    finally:
        release.join()
        writer.close()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    assert FeedbackService(store).projects() == []


def test_many_openers_of_one_new_database_all_get_it(tmp_path):
    """Eight openers of each new file at once: every one gets a migrated, WAL-mode store."""
    failures, modes = [], set()
    for i in range(10):
        path = str(tmp_path / f"new{i}.db")
        start = threading.Barrier(8)

        def opener() -> None:
            start.wait()
            try:
                store = open_store(path)
                with store.engine.connect() as conn:
                    modes.add(conn.exec_driver_sql("PRAGMA journal_mode").scalar())
                assert FeedbackService(store).projects() == []
                store.close()
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                failures.append(f"{path}: {exc}")

        threads = [threading.Thread(target=opener) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []
    assert modes == {"wal"}

# ---------------------------------------------------------------------------------------------------- users
def test_passwords_are_salted_hashes_and_no_default_account_exists(svc, store):
    assert svc.user_by_name("admin") is None and svc.authenticate("admin", "admin") is None
    svc.add_user("boss", "admin", "correct horse")
    svc.add_user("boss2", "admin", "correct horse")
    with store.engine.connect() as conn:
        hashes = [h for (h,) in conn.exec_driver_sql("select password_hash from users")]
    assert all(h.startswith("scrypt$") and "correct" not in h for h in hashes) and hashes[0] != hashes[1]
    assert svc.authenticate("boss", "correct horse").role == "admin"
    assert svc.authenticate("boss", "wrong horse!") is None
    with pytest.raises(Conflict):
        svc.add_user("boss", "annotator", "another one")
    with pytest.raises(FeedbackError, match="too short"):
        svc.add_user("shorty", "annotator", "x")
    sim = svc.ensure_user("sim-00")
    assert svc.authenticate("sim-00", "") is None and sim.role == "annotator"


# ---------------------------------------------------------------------------------------------------- queue
def test_queue_never_repeats_an_item_and_respects_overlap(svc):
    p = svc.create_project("q", annotators_per_item=2)
    svc.add_items(p.id, arith_items(5))
    users = [svc.add_user(f"u{i}", "annotator", "password1").id for i in range(3)]
    seen = {u: [] for u in users}
    for _ in range(10):
        for u in users:
            t = svc.next_task(u, p.id)
            if t is None:
                continue
            assert svc.next_task(u, p.id).assignment_id == t.assignment_id  # an open task is served again
            seen[u].append(t.item_id)
            svc.submit(u, t.assignment_id, sid(), outcome="tie")
    for u in users:
        assert len(seen[u]) == len(set(seen[u]))
    counts = {}
    for items in seen.values():
        for i in items:
            counts[i] = counts.get(i, 0) + 1
    assert sorted(counts.values()) == [2] * 5  # every item exactly annotators_per_item times
    assert svc.progress(p.id).complete_items == 5  # a tie is a label (a skip would not be)
    assert svc.progress(p.id).judgments == 10


def _reference_order(store, project_id, user_id, cutoff):
    """next_task's rule as one query over every item of the project (what the service ran before it kept hints):
    the items this user may be given now, best first. Not given to them before; gold, or held (judged, or
    assigned after cutoff) by fewer than annotators_per_item people; the most-held first, then by position."""
    from sqlalchemy import func, or_, select

    from rlhfkit.feedback.store import Assignment, Gold, Item, Project

    with store.session() as s:
        k = s.get(Project, project_id).annotators_per_item
        held = (select(Assignment.item_id, func.count().label("n"))
                .where(or_(Assignment.completed_at.is_not(None), Assignment.created_at > cutoff))
                .group_by(Assignment.item_id).subquery())
        mine = select(Assignment.item_id).where(Assignment.user_id == user_id)
        n_held = func.coalesce(held.c.n, 0)
        return list(s.scalars(select(Item.id).outerjoin(held, held.c.item_id == Item.id)
                              .outerjoin(Gold, Gold.item_id == Item.id)
                              .where(Item.project_id == project_id, Item.id.not_in(mine),
                                     or_(Gold.item_id.is_not(None), n_held < k))
                              .order_by(n_held.desc(), Item.position)))


@pytest.mark.parametrize("processes", [1, 2])
def test_queue_picks_what_one_query_over_all_items_would(store, processes):
    """The queue keeps hints so a request looks at the items in play, not the whole project. Checked against the
    rule written as one query over every item, through overlap, gold items, skips, tasks left open and expiring,
    and items added while labelling runs: one service picks exactly the rule's first item every time; two
    services on one store (two server processes) only ever pick an item the rule allows, and run dry only when
    it does."""
    from sqlalchemy import select, update

    from rlhfkit.feedback.store import Assignment, Item, now

    rng = random.Random(processes)
    services = [FeedbackService(store, rng=random.Random(i)) for i in range(processes)]
    ttl = services[0].assignment_ttl_s
    users = [services[0].add_user(f"q{i}", "annotator", "password1").id for i in range(4)]
    compared = 0
    for k in (1, 2, 3):
        p = services[0].create_project(f"hints-{k}", annotators_per_item=k)
        other = services[0].create_project(f"other-{k}")  # another project's items interleave the ids
        for batch in range(3):
            services[0].add_items(other.id, arith_items(3, start=batch))
            gold = [ItemSpec("what is 1 plus 1 ?", ["1 plus 1 is 2 .", "1 plus 1 is 3 ."], gold_outcome="A")]
            services[0].add_items(p.id, arith_items(6, start=10 * batch) + (gold if batch == 1 else []))
            for _ in range(60):
                svc, user = rng.choice(services), rng.choice(users)
                if rng.random() < 0.1:  # the open tasks expire (their annotators walked away)
                    with store.session() as s, s.begin():
                        s.execute(update(Assignment).where(Assignment.completed_at.is_(None))
                                  .values(created_at=Assignment.created_at - 2 * ttl))
                with store.session() as s:  # an open task of this user is served again before anything new
                    has_open = s.scalar(select(Assignment.id).join(Item, Item.id == Assignment.item_id).where(
                        Assignment.user_id == user, Item.project_id == p.id, Assignment.completed_at.is_(None)))
                allowed = _reference_order(store, p.id, user, now() - ttl)
                task = svc.next_task(user, p.id)
                if has_open is None:
                    assert (task is None) == (not allowed), (k, batch)
                    if task is not None:
                        assert task.item_id == allowed[0] if processes == 1 else task.item_id in allowed
                    compared += 1
                if task is not None and rng.random() < 0.8:  # the rest are left open
                    outcome = "skip" if rng.random() < 0.2 else "A"
                    svc.submit(user, task.assignment_id, sid(), outcome=outcome,
                               strength="better" if outcome == "A" else None)
    assert compared > 200


def test_display_order_is_random_and_recorded(svc):
    p = svc.create_project("order")
    svc.add_items(p.id, arith_items(40))
    u = svc.add_user("ann", "annotator", "password1").id
    orders = []
    while (t := svc.next_task(u, p.id)) is not None:
        orders.append(tuple(t.display_order))
        svc.submit(u, t.assignment_id, sid(), outcome="A", strength="better")
    assert set(orders) == {(0, 1), (1, 0)}
    assert [tuple(j["display_order"]) for j in svc.judged_items(p.id)] == orders


def test_gold_items_go_to_everyone_and_score_accuracy(svc):
    p = svc.create_project("gold", annotators_per_item=1)
    svc.add_items(p.id, arith_items(2) + [ItemSpec("what is 1 plus 1 ?", ["1 plus 1 is 2 .", "1 plus 1 is 3 ."],
                                                   gold_outcome="A")])
    a, b = (svc.add_user(n, "annotator", "password1").id for n in ("a", "b"))
    for user, answer in ((a, "A"), (b, "B")):
        while (t := svc.next_task(user, p.id)) is not None:
            svc.submit(user, t.assignment_id, sid(), outcome=answer, strength="better")
    prog = {x.name: x for x in svc.progress(p.id).annotators}
    assert (prog["a"].gold_seen, prog["a"].gold_accuracy) == (1, 1.0)
    assert (prog["b"].gold_seen, prog["b"].gold_accuracy) == (1, 0.0)
    assert prog["a"].judgments + prog["b"].judgments == 4  # 2 regular items once each + the gold item twice


# --------------------------------------------------------------------------------------------------- submit
def test_submit_is_idempotent_on_the_submission_id(svc):
    p = svc.create_project("idem")
    svc.add_items(p.id, arith_items(2))
    u = svc.add_user("ann", "annotator", "password1").id
    t = svc.next_task(u, p.id)
    s = sid()
    first = svc.submit(u, t.assignment_id, s, outcome="A", strength="better")
    retry = svc.submit(u, t.assignment_id, s, outcome="A", strength="better")
    assert not first.duplicate and retry.duplicate and retry.judgment_id == first.judgment_id
    with pytest.raises(Conflict):  # a second, different submission for the same task
        svc.submit(u, t.assignment_id, sid(), outcome="B", strength="better")
    assert svc.progress(p.id).judgments == 1


def test_submissions_are_checked_against_owner_and_mode(svc):
    p = svc.create_project("checks")
    r = svc.create_project("ranks", mode="ranking", responses_per_item=3)
    svc.add_items(p.id, arith_items(1))
    svc.add_items(r.id, [ItemSpec("say hi .", ["hi !", "hello there .", "go away ."])])
    ann, other = (svc.add_user(n, "annotator", "password1").id for n in ("ann", "other"))
    t = svc.next_task(ann, p.id)
    with pytest.raises(Forbidden):
        svc.submit(other, t.assignment_id, sid(), outcome="A", strength="better")
    with pytest.raises(FeedbackError, match="strength"):
        svc.submit(ann, t.assignment_id, sid(), outcome="A")
    with pytest.raises(FeedbackError, match="unknown"):
        svc.submit(ann, t.assignment_id, sid(), outcome="C")
    with pytest.raises(FeedbackError, match="flag"):
        svc.submit(ann, t.assignment_id, sid(), outcome="tie", flags=["spicy"])
    s = sid()
    svc.submit(ann, t.assignment_id, s, outcome="both_bad", flags=["harmful"], rationale="rude")
    with pytest.raises(Forbidden):  # someone else's submission id
        svc.submit(other, t.assignment_id, s, outcome="A", strength="better")
    rt = svc.next_task(ann, r.id)
    with pytest.raises(FeedbackError, match="exactly once"):
        svc.submit(ann, rt.assignment_id, sid(), ranking=[[0], [1]])
    svc.submit(ann, rt.assignment_id, sid(), ranking=[[2], [0, 1]])
    assert [f.flags for f in svc.flagged(p.id)] == [["harmful"]]


def test_concurrent_submissions_of_one_id_store_one_judgment(svc):
    p = svc.create_project("race")
    svc.add_items(p.id, arith_items(1))
    u = svc.add_user("ann", "annotator", "password1").id
    t = svc.next_task(u, p.id)
    s, acks, errors = sid(), [], []

    def go():
        try:
            acks.append(svc.submit(u, t.assignment_id, s, outcome="A", strength="slightly_better"))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and len({a.judgment_id for a in acks}) == 1 and sum(not a.duplicate for a in acks) == 1


# ------------------------------------------------------------------------------------------- agreement, export
def test_agreement_report_on_a_project(svc):
    p = svc.create_project("agree", annotators_per_item=2)
    svc.add_items(p.id, arith_items(6))
    a, b = (svc.add_user(n, "annotator", "password1").id for n in ("a", "b"))
    answers = {a: ["A", "A", "A", "B", "tie", "A"], b: ["A", "A", "B", "B", "tie", "skip"]}
    for user, outs in answers.items():
        for out in outs:
            t = svc.next_task(user, p.id)
            svc.submit(user, t.assignment_id, sid(), outcome=out, strength="better" if out in "AB" else None)
    rep = svc.agreement(p.id, min_shared=3)
    # items (in queue order) shared with labels: AA, AA, AB, BB, tie-tie; the skip leaves item 6 one label
    assert rep.units == 5 and rep.percent == pytest.approx(4 / 5)
    assert set(rep.kappa) == {"a|b"} and rep.alpha is not None and 0 < rep.alpha < 1


def test_export_rows_read_back_as_preference_data(svc, tmp_path):
    p = svc.create_project("exp")
    r = svc.create_project("exp-rank", mode="ranking", responses_per_item=3)
    svc.add_items(p.id, arith_items(4))
    svc.add_items(r.id, [ItemSpec("say hi to ada .", ["hi ada !", "hello .", "no ."], ["m1", "m2", "m3"])])
    u = svc.add_user("ann", "annotator", "password1").id
    for out in ("A", "B", "tie", "both_bad"):
        t = svc.next_task(u, p.id)
        svc.submit(u, t.assignment_id, sid(), outcome=out, strength="significantly_better" if out in "AB" else None)
    t = svc.next_task(u, r.id)
    svc.submit(u, t.assignment_id, sid(), ranking=[[0], [2], [1]])

    rows, report = export_rows(svc, "exp")
    assert len(rows) == 2 and report.skipped == {"tie": 1, "both_bad": 1}
    assert rows[0]["margin"] == 1.0 and rows[0]["annotator"] == "ann"  # significantly better, small scale
    assert (rows[0]["chosen_source"], rows[1]["chosen_source"]) == ("good-model", "bad-model")
    pairs = read_preferences(str(write_export(tmp_path / "p.jsonl", rows)))
    assert all(isinstance(x, PreferencePair) for x in pairs) and pairs[1].chosen.endswith(" .")

    rank_rows, _ = export_rows(svc, "exp-rank")
    assert [(x["chosen"], x["rejected"]) for x in rank_rows] == [("hi ada !", "no ."), ("hi ada !", "hello ."),
                                                                ("no .", "hello .")]  # C(3,2) = 3
    k_way = read_preferences(str(write_export(tmp_path / "k.jsonl", export_rows(svc, "exp-rank",
                                                                              rankings_as="ranking")[0])))
    assert isinstance(k_way[0], Ranking) and k_way[0].ranking == [[0], [2], [1]]

    kto_rows, _ = export_rows(svc, "exp", kto=True)
    assert [x["label"] for x in kto_rows] == [True, False, True, False, False, False]  # A, B, both_bad
    from rlhfkit.data.kto import parse_kto_row
    assert all(parse_kto_row(x, "k", i).desirable == x["label"] for i, x in enumerate(kto_rows))


def _label_all(svc, project_id, answers):
    """Each user (in turn, as the queue serves them) answers every item it gets: answers[user][prompt] is an
    outcome, (outcome, strength) or a ranking list."""
    for name, by_prompt in answers.items():
        u = svc.ensure_user(name).id
        while (t := svc.next_task(u, project_id)) is not None:
            a = by_prompt[t.prompt]
            if isinstance(a, list):
                svc.submit(u, t.assignment_id, sid(), ranking=a)
            else:
                out, strength = a if isinstance(a, tuple) else (a, "better" if a in ("A", "B") else None)
                svc.submit(u, t.assignment_id, sid(), outcome=out, strength=strength)


def test_majority_rows_vote_pairs_and_count_what_they_leave_out(svc, tmp_path):
    p = svc.create_project("overlap", annotators_per_item=3)
    items = arith_items(6)
    svc.add_items(p.id, items + [ItemSpec("what is 7 plus 7 ?", ["14 .", "15 ."], ["g", "b"], gold_outcome="A")])
    q = [i.prompt for i in items]
    votes = {  # per item: ann1, ann2, ann3
        q[0]: [("A", "significantly_better"), ("A", "better"), ("B", "slightly_better")],  # A by 2-1
        q[1]: [("B", "better"), ("B", "significantly_better"), ("B", "slightly_better")],  # B unanimous
        q[2]: ["A", "B", "tie"],  # every outcome once: no majority
        q[3]: ["tie", "tie", "A"],  # a tie wins
        q[4]: ["both_bad", "both_bad", "B"],
        q[5]: ["A", "skip", "B"],  # a skip is no vote: 1-1
    }
    answers = {f"ann{k}": {**{prompt: v[k] for prompt, v in votes.items()}, "what is 7 plus 7 ?": "A"}
               for k in range(3)}
    _label_all(svc, p.id, answers)
    rows, report = majority_rows(svc, "overlap", conversational=True)
    assert report.judgments == 21 and report.items == 6
    assert report.skipped == {"gold item": 3, "skip": 1, "vote_tie": 2, "tie": 1, "both_bad": 1}
    assert report.rows == len(rows) == 2
    # every non-gold item gives a row or one counted reason: nothing is dropped silently
    assert report.rows + sum(n for r, n in report.skipped.items() if r not in ("gold item", "skip")) == report.items
    a, b = rows
    assert a["votes"] == {"A": 2, "B": 1} and a["chosen_source"] == "good-model"
    # strict voters' strengths (significantly_better, better) and one dissent counted as negligible: median better
    assert a["strength"] == "better" and a["margin"] == pytest.approx(2 / 3)
    assert b["chosen_source"] == "bad-model" and b["strength"] == "better" and b["annotator"] == "ann0+ann1+ann2"
    back = read_preferences(str(write_export(tmp_path / "m.jsonl", rows)))
    assert [x.chosen[0]["content"] for x in back] == [items[0].responses[0], items[1].responses[1]]

    one = svc.create_project("single")  # with one judgment per item it agrees with export_rows
    svc.add_items(one.id, arith_items(3))
    _label_all(svc, one.id, {"ann0": {i.prompt: o for i, o in zip(arith_items(3), ["A", "B", "tie"])}})
    single, _ = export_rows(svc, "single")
    voted, rep = majority_rows(svc, "single")
    assert [(r["chosen"], r["margin"]) for r in voted] == [(r["chosen"], r["margin"]) for r in single]
    assert rep.skipped == {"tie": 1}


def test_majority_rows_aggregate_rankings_by_borda_count(svc, tmp_path):
    r = svc.create_project("rank3", mode="ranking", responses_per_item=3, annotators_per_item=3)
    svc.add_items(r.id, [ItemSpec("say hi to ada .", ["hi ada !", "hello .", "no ."], ["m1", "m2", "m3"]),
                         ItemSpec("say hi to bo .", ["hi bo !", "hey .", "go ."], ["m1", "m2", "m3"])])
    rankings = {
        # places: 0 -> 0, 1, 0 (sum 1); 1 -> 2, 0, 2 (4); 2 -> 1, 2, 1 (4): 0 first, then 1 and 2 tied
        "say hi to ada .": [[[0], [2], [1]], [[1], [0], [2]], [[0], [2], [1]]],
        # a cycle: every response has places 0 + 1 + 2
        "say hi to bo .": [[[0], [1], [2]], [[1], [2], [0]], [[2], [0], [1]]],
    }
    _label_all(svc, r.id, {f"ann{k}": {q: v[k] for q, v in rankings.items()} for k in range(3)})
    rows, report = majority_rows(svc, "rank3", rankings_as="ranking")
    assert report.items == 2 and report.skipped == {"vote_tie": 1} and len(rows) == 1
    assert rows[0]["ranking"] == [[0], [1, 2]] and rows[0]["annotator"] == "ann0+ann1+ann2"
    k_way = read_preferences(str(write_export(tmp_path / "k.jsonl", rows)))
    assert isinstance(k_way[0], Ranking) and k_way[0].ranking == [[0], [1, 2]]
    pairs, _ = majority_rows(svc, "rank3")  # the tied tier forms no pair
    assert [(x["chosen"], x["rejected"]) for x in pairs] == [("hi ada !", "hello ."), ("hi ada !", "no .")]
    # a tied tier shares its mid-place: [[0, 1], [2]] gives 0 and 1 place 0.5 each
    t = svc.create_project("rank-tied", mode="ranking", responses_per_item=3, annotators_per_item=2)
    svc.add_items(t.id, [ItemSpec("say hi to cy .", ["hi cy !", "hey .", "go ."], ["m1", "m2", "m3"])])
    _label_all(svc, t.id, {"ann0": {"say hi to cy .": [[0, 1], [2]]}, "ann1": {"say hi to cy .": [[1], [0], [2]]}})
    assert majority_rows(svc, "rank-tied", rankings_as="ranking")[0][0]["ranking"] == [[1], [0], [2]]


def test_export_trains_a_reward_model(svc, tmp_path, tiny_model):
    from rlhfkit.reward import train as rtrain

    p = svc.create_project("train")
    svc.add_items(p.id, arith_items(24))
    u = svc.add_user("ann", "annotator", "password1").id
    while (t := svc.next_task(u, p.id)) is not None:
        svc.submit(u, t.assignment_id, sid(), outcome="A", strength="better")
    path = write_export(tmp_path / "prefs.jsonl", export_rows(svc, "train")[0])
    out = tmp_path / "rm"
    rtrain.main(rtrain.RewardConfig(model=str(tiny_model), data=str(path), output_dir=str(out), max_steps=3,
                                    batch_size=4, report_to=["jsonl"], progress=False, eval_fraction=0.2))
    assert (out / "config.json").is_file() and (out / "metrics.jsonl").read_text().strip()


def test_cli_create_simulate_export(tmp_path, monkeypatch):
    from rlhfkit import label as cli
    from rlhfkit.playground.responses import sample_pair
    from rlhfkit.playground.tasks import make_prompts

    prompts = make_prompts(seed=0, n_train=8, n_val=1, n_test=1)["train"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in prompts))
    rng = random.Random(0)
    with (tmp_path / "a.jsonl").open("w") as fa, (tmp_path / "b.jsonl").open("w") as fb:
        for p in prompts:
            x, y = sample_pair(p, rng)
            fa.write(json.dumps({"prompt": p.text, "response": x}) + "\n")
            fb.write(json.dumps({"prompt": p.text, "response": y}) + "\n")
    db = str(tmp_path / "f.db")
    run = lambda *argv: cli.main(cli.parse_label_args(list(argv)))  # noqa: E731
    created = run("create", "--db", db, "--project", "sim", "--prompts", str(tmp_path / "prompts.jsonl"),
                  "--responses", f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}", "--annotators-per-item", "2")
    assert created["items"] + created["prompts_without_enough_responses"] == len(prompts)
    summary = run("simulate", "--db", db, "--project", "sim", "--annotators", "3")
    assert summary["judgments_stored"] == 2 * created["items"]
    assert run("simulate", "--db", db, "--project", "sim", "--annotators", "3")["judgments_stored"] == 0
    exported = run("export", "--db", db, "--project", "sim", "--output", str(tmp_path / "out.jsonl"))
    assert exported["rows"] == len(read_preferences(str(tmp_path / "out.jsonl"))) > 0
    # two annotators per item: --majority merges them to at most one row per item, every other item counted
    merged = run("export", "--db", db, "--project", "sim", "--output", str(tmp_path / "maj.jsonl"), "--majority")
    assert merged["judgments"] == 2 * created["items"]
    per_item = {k: v for k, v in merged["left_out"].items() if k not in ("skip", "gold item")}  # by item
    assert merged["rows"] + sum(per_item.values()) == merged["items"] <= created["items"]
    assert 0 < merged["rows"] == len(read_preferences(str(tmp_path / "maj.jsonl"))) <= exported["rows"]
    with pytest.raises(ConfigError, match="drop --kto"):
        run("export", "--db", db, "--project", "sim", "--output", str(tmp_path / "x.jsonl"), "--majority", "--kto")
    monkeypatch.delenv("RLHFKIT_PASSWORD", raising=False)
    monkeypatch.setattr("sys.stdin.isatty", lambda: False, raising=False)
    with pytest.raises(UserError, match="no default"):
        run("add-user", "--db", db, "--user", "x")
    monkeypatch.setenv("RLHFKIT_PASSWORD", "s3cret-enough")
    assert run("add-user", "--db", db, "--user", "x", "--role", "admin")["role"] == "admin"
