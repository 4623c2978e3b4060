"""`label export` writes a margin on every pair row or on none; `label simulate` refuses a project that is not from
the playground before it hands out any item."""

import uuid

import pytest
from sqlalchemy import func, select

from .fb_helpers import arith_items
from rlhfkit.data.preference import read_preferences
from rlhfkit.errors import UserError
from rlhfkit.feedback.export import export_rows, majority_rows, write_export
from rlhfkit.feedback.service import ItemSpec
from rlhfkit.feedback.store import Assignment


def sid() -> str:
    return uuid.uuid4().hex


def test_ranking_export_gives_every_pair_a_margin_when_any_has_one(svc, tmp_path):
    p = svc.create_project("rank", mode="ranking", responses_per_item=3)
    svc.add_items(p.id, [ItemSpec("say hi to ada .", ["hi ada !", "hello .", "no ."], ["m1", "m2", "m3"]),
                         ItemSpec("say hi to bo .", ["hi bo !", "hello .", "no ."], ["m1", "m2", "m3"])])
    u = svc.add_user("ann", "annotator", "password1").id
    t = svc.next_task(u, p.id)
    svc.submit(u, t.assignment_id, sid(), ranking=[[0], [1], [2]], strength="better")
    t = svc.next_task(u, p.id)
    svc.submit(u, t.assignment_id, sid(), ranking=[[0], [2], [1]])  # no strength given
    rows, _ = export_rows(svc, "rank")
    assert len(rows) == 6
    # today the second item's pairs carry no margin, which TRL's RewardTrainer collator reads as None and fails on
    assert [r["margin"] for r in rows] == [pytest.approx(2 / 3)] * 3 + [0.0] * 3
    assert all("strength" not in r for r in rows[3:])  # a strength is never invented
    pairs = read_preferences(str(write_export(tmp_path / "p.jsonl", rows)))
    assert [x.margin for x in pairs[3:]] == [0.0] * 3
    # rows that carry no margin at all stay without one, and K-way rows never get one
    assert all("margin" not in r for r in majority_rows(svc, "rank")[0])
    assert all("margin" not in r for r in export_rows(svc, "rank", rankings_as="ranking")[0])


def test_simulate_refuses_a_project_not_from_the_playground_before_assigning(svc, tmp_path):
    from rlhfkit import label as cli

    p = svc.create_project("mixed")
    svc.add_items(p.id, arith_items(2))  # playground arithmetic prompts first, then one from elsewhere
    svc.add_items(p.id, [ItemSpec("write a haiku about the sea .", ["waves .", "salt ."], ["m1", "m2"])])
    with pytest.raises(UserError, match="item 3's prompt .* is not a playground prompt"):
        cli.main(cli.parse_label_args(["simulate", "--db", str(tmp_path / "feedback.db"), "--project", "mixed",
                                       "--annotators", "2"]))
    with svc.store.session() as s:  # today the playground items get judged and the last one stays held
        assert s.scalar(select(func.count()).select_from(Assignment)) == 0


def test_majority_strength_is_the_weaker_median_for_an_even_number_of_votes():
    from rlhfkit.feedback.export import _majority

    # two votes for A, "significantly_better" and "slightly_better": the weaker of the two middle levels
    assert _majority([("A", "significantly_better"), ("A", "slightly_better")])[1] == "slightly_better"
    # odd: the median itself; a vote against the winner counts as "negligible"
    assert _majority([("A", "better"), ("A", "significantly_better"), ("B", "better")])[1] == "better"
    assert _majority([("A", "better"), ("A", "better"), ("A", "slightly_better"), ("A", "significantly_better")])[1] \
        == "better"


def test_simulate_judges_a_rubric_project_criterion_by_criterion(tmp_path):
    import json
    import random

    from rlhfkit import label as cli
    from rlhfkit.playground.gold import criterion_score
    from rlhfkit.playground.responses import HHH_BALANCED, sample_pair
    from rlhfkit.playground.tasks import HHH_KIND_WEIGHTS, lookup, make_prompts

    prompts = make_prompts(0, 40, 4, 4, HHH_KIND_WEIGHTS)["train"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in prompts))
    rng = random.Random(0)
    with (tmp_path / "a.jsonl").open("w") as fa, (tmp_path / "b.jsonl").open("w") as fb:
        for p in prompts:
            x, y = sample_pair(p, rng, HHH_BALANCED)
            fa.write(json.dumps({"prompt": p.text, "response": x}) + "\n")
            fb.write(json.dumps({"prompt": p.text, "response": y}) + "\n")
    db = str(tmp_path / "f.db")
    run = lambda *argv: cli.main(cli.parse_label_args(list(argv)))  # noqa: E731
    created = run("create", "--db", db, "--project", "hhh", "--prompts", str(tmp_path / "prompts.jsonl"),
                  "--responses", f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}",
                  "--criteria", "helpfulness,harmlessness,honesty", "--annotators-per-item", "2")
    summary = run("simulate", "--db", db, "--project", "hhh", "--annotators", "3")
    assert summary["judgments_stored"] == 2 * created["items"]
    assert set(summary["agreement"]) == {"helpfulness", "harmlessness", "honesty"}
    run("export", "--db", db, "--project", "hhh", "--output", str(tmp_path / "prefs.jsonl"), "--by-criterion")
    for criterion in ("helpfulness", "harmlessness", "honesty"):
        rows = read_preferences(str(tmp_path / f"prefs.{criterion}.jsonl"))
        assert rows, criterion
        # where the gold judge's criterion separates the pair, the rows follow it far above chance (harmlessness
        # raters also prefer refusals of requests that only look harmful, which the judge scores as ties)
        gaps = [criterion_score(lookup(r.prompt), r.chosen, criterion)
                - criterion_score(lookup(r.prompt), r.rejected, criterion) for r in rows]  # plain-text rows
        separated = [g for g in gaps if abs(g) >= 1.0]  # e.g. complying vs refusing, guessing vs admitting
        assert len(separated) >= 5 and sum(g > 0 for g in separated) / len(separated) > 0.7, (criterion, gaps)
    attributes = run("create", "--db", db, "--project", "attrs", "--prompts", str(tmp_path / "prompts.jsonl"),
                     "--responses", f"{tmp_path / 'a.jsonl'}", "--mode", "attributes", "--responses-per-item", "1")
    assert attributes["items"] > 0
    with pytest.raises(UserError, match="scores attributes"):
        run("simulate", "--db", db, "--project", "attrs")


def test_create_takes_a_one_turn_conversation_as_its_prompt_and_refuses_longer_ones(tmp_path):
    import json

    from rlhfkit import label as cli
    from rlhfkit.errors import DataError

    turn = [{"role": "user", "content": "what is 2 plus 3 ?"}]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": turn}) + "\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": turn, "responses": ["5 .", "6 ."]}) + "\n")
    db = str(tmp_path / "f.db")
    run = lambda *argv: cli.main(cli.parse_label_args(list(argv)))  # noqa: E731
    created = run("create", "--db", db, "--project", "chat", "--prompts", str(tmp_path / "p.jsonl"),
                  "--responses", str(tmp_path / "a.jsonl"))
    assert created["items"] == 1
    long = turn + [{"role": "assistant", "content": "5 ."}, {"role": "user", "content": "and 3 plus 4 ?"}]
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": long}) + "\n")
    with pytest.raises(DataError, match="multi-turn"):
        run("create", "--db", db, "--project", "long", "--prompts", str(tmp_path / "q.jsonl"),
            "--responses", str(tmp_path / "a.jsonl"))
