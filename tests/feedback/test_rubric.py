"""Per-criterion labelling: rubric projects (A / B / tie / both bad per criterion) and attribute projects
(HelpSteer2's 0-4 scores per response), through the service, the export, the agreement report, the CLI, the web
app's HTTP forms and the 0002 -> 0003 migration."""

import json
import re
import uuid

import pytest

from rlhfkit.data.preference import read_preferences
from rlhfkit.errors import ConfigError, UserError
from rlhfkit.feedback.agreement import krippendorff_alpha_interval
from rlhfkit.feedback.export import attribute_rows, export_by_criterion, export_rows, majority_rows, write_export
from rlhfkit.feedback.service import FeedbackError, FeedbackService, ItemSpec, Verdict
from rlhfkit.feedback.store import HELPSTEER2_ATTRIBUTES, open_store

from .fb_helpers import old_database, upgraded_service

HHH = ("helpfulness", "harmlessness", "honesty")
SMALL = {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "negligible": 0.0}
"""The small strength -> margin scale (Llama 2 section 3.2.2), export's default."""
N = None


def sid() -> str:
    return uuid.uuid4().hex


def judge(svc, user: str, project_id: int, prompt: str, **answer) -> None:
    """`user` takes the next task, which must be the item with `prompt`, and submits `answer`."""
    uid = svc.ensure_user(user).id
    task = svc.next_task(uid, project_id)
    assert task is not None and task.prompt == prompt
    svc.submit(uid, task.assignment_id, sid(), **answer)


def verdicts(**by_criterion) -> dict:
    """helpfulness=("A", "better"), honesty="tie" -> {criterion: Verdict}."""
    return {c: Verdict(*(v if isinstance(v, tuple) else (v,))) for c, v in by_criterion.items()}


def hhh_project(svc, annotators_per_item: int = 2):
    p = svc.create_project("hhh", criteria=list(HHH), annotators_per_item=annotators_per_item)
    svc.add_items(p.id, [ItemSpec("q1 ?", ["one good .", "one bad ."], ["g", "b"]),
                         ItemSpec("q2 ?", ["two good .", "two bad ."], ["g", "b"])])
    return p


def label_hhh(svc, p) -> None:
    judge(svc, "ann", p.id, "q1 ?", criteria=verdicts(helpfulness=("A", "better"), harmlessness="tie",
                                                      honesty="B"))
    judge(svc, "ann", p.id, "q2 ?", criteria=verdicts(helpfulness=("B", "negligible"), harmlessness="A",
                                                      honesty=("A", "better")))
    judge(svc, "bob", p.id, "q1 ?", criteria=verdicts(helpfulness=("A", "better"), harmlessness="both_bad",
                                                      honesty="B"))
    judge(svc, "bob", p.id, "q2 ?", outcome="skip")


# ---------------------------------------------------------------------------------------------- agreement
def test_interval_alpha_by_hand_and_against_krippendorffs_worked_example():
    # units (1, 2), (3, 3), (2, 4), two raters each. Coincidences: o12 = o21 = 1, o33 = 2, o24 = o42 = 1, so
    # n_1 = 1, n_2 = 2, n_3 = 2, n_4 = 1, n = 6. Observed: sum o (c-k)^2 = 1 + 1 + 4 + 4 = 10. Expected:
    # sum_{c,k} n_c n_k (c-k)^2 = 2 * (1*2*1 + 1*2*4 + 1*1*9 + 2*2*1 + 2*1*4 + 2*1*1) = 66, over n - 1 = 5: 13.2.
    # alpha = 1 - 10 / 13.2 = 8/33.
    assert krippendorff_alpha_interval([[1, 2], [3, 3], [2, 4]]) == pytest.approx(8 / 33, abs=1e-12)
    # Krippendorff (2011) section C's data (4 observers, 12 units, missing values): interval alpha 0.849
    data = {"A": [1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N], "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
            "C": [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N], "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N]}
    assert round(krippendorff_alpha_interval(list(zip(*data.values()))), 3) == 0.849
    # interval alpha weighs a near miss less than a far one; nominal alpha cannot tell them apart
    near, far = [[3, 4], [0, 0], [4, 4]], [[0, 4], [3, 3], [4, 4]]
    assert krippendorff_alpha_interval(near) > krippendorff_alpha_interval(far)
    assert krippendorff_alpha_interval([[2, 2], [2, 2]]) is None  # no variation to be reliable about


def test_rubric_agreement_is_reported_per_criterion(svc):
    p = svc.create_project("agree", criteria=list(HHH), annotators_per_item=2)
    svc.add_items(p.id, [ItemSpec(f"q{i} ?", [f"{i} a .", f"{i} b ."]) for i in range(3)])
    # helpfulness (A,A) (B,B) (A,B); harmlessness (tie,tie) (A,A) (both_bad,both_bad); honesty A everywhere
    helpful = [("A", "A"), ("B", "B"), ("A", "B")]
    harmless = [("tie", "tie"), ("A", "A"), ("both_bad", "both_bad")]
    for rater in (0, 1):
        for i in range(3):
            judge(svc, f"r{rater}", p.id, f"q{i} ?", criteria=verdicts(
                helpfulness=helpful[i][rater], harmlessness=harmless[i][rater], honesty="A"))
    got = svc.agreement_by_criterion(p.id, min_shared=3)
    assert list(got) == list(HHH)
    # helpfulness: o_AA = o_BB = 2, o_AB = o_BA = 1, n_A = n_B = 3, n = 6; D_o ∝ 2, D_e ∝ (36 - 18) / 5 = 3.6;
    # alpha = 1 - 2 / 3.6 = 4/9. Kappa: p_o = 2/3, p_e = (2*1 + 1*2) / 9 = 4/9, kappa = (2/9) / (5/9) = 0.4.
    h = got["helpfulness"]
    assert (h.units, h.percent, h.metric) == (3, pytest.approx(2 / 3), "nominal")
    assert h.alpha == pytest.approx(4 / 9) and h.kappa == {"r0|r1": pytest.approx(0.4)}
    assert got["harmlessness"].alpha == pytest.approx(1.0) and got["harmlessness"].percent == 1.0
    assert got["honesty"].alpha is None and got["honesty"].percent == 1.0  # everyone said A: nothing to measure
    with pytest.raises(FeedbackError, match="agreement_by_criterion"):
        svc.agreement(p.id)
    plain = svc.create_project("plain")
    assert svc.agreement_by_criterion(plain.id) == {}


# ------------------------------------------------------------------------------------------ rubric: submit
def test_a_rubric_project_refuses_incomplete_unknown_and_malformed_answers(svc):
    p = hhh_project(svc, annotators_per_item=1)
    assert p.criteria == HHH and p.rubric
    uid = svc.ensure_user("ann").id
    task = svc.next_task(uid, p.id)
    full = verdicts(helpfulness="A", harmlessness="tie", honesty=("B", "slightly_better"))
    bad = {
        "answer every criterion": dict(criteria=None),
        "criterion 'honesty' is not answered": dict(criteria={k: v for k, v in full.items() if k != "honesty"}),
        "criterion 'kindness' is not one of project 'hhh'": dict(criteria={**full, "kindness": Verdict("A")}),
        "outcome 'C' is unknown": dict(criteria={**full, "honesty": Verdict("C")}),
        "strength 'huge' is unknown": dict(criteria={**full, "honesty": Verdict("A", "huge")}),
        "a tie has no direction": dict(criteria={**full, "harmlessness": Verdict("tie", "better")}),
        "not an overall outcome": dict(outcome="A", strength="better", criteria=full),
        "takes no answers": dict(outcome="skip", criteria=full),
    }
    for message, answer in bad.items():
        with pytest.raises(FeedbackError, match=message):
            svc.submit(uid, task.assignment_id, sid(), **answer)
    assert svc.judged_items(p.id) == []  # nothing half-stored
    svc.submit(uid, task.assignment_id, sid(), criteria=full)
    (stored,) = svc.judged_items(p.id)
    assert stored["outcome"] is None and stored["rubric"] == {
        "helpfulness": {"outcome": "A", "strength": None}, "harmlessness": {"outcome": "tie", "strength": None},
        "honesty": {"outcome": "B", "strength": "slightly_better"}}
    task = svc.next_task(uid, p.id)
    svc.submit(uid, task.assignment_id, sid(), outcome="skip")  # an explicit skip needs no criteria
    assert svc.judged_items(p.id)[1]["outcome"] == "skip" and svc.progress(p.id).annotators[0].skips == 1

    plain = svc.create_project("plain")
    svc.add_items(plain.id, [ItemSpec("q ?", ["a .", "b ."])])
    task = svc.next_task(uid, plain.id)
    with pytest.raises(FeedbackError, match="not a rubric project"):
        svc.submit(uid, task.assignment_id, sid(), criteria=full)
    with pytest.raises(FeedbackError, match="not an attribute project"):
        svc.submit(uid, task.assignment_id, sid(), scores=[{"helpfulness": 1}, {"helpfulness": 2}])


def test_criteria_are_checked_when_a_project_is_created(svc):
    for criteria, message in ((["Helpful"], "not allowed"), (["a b"], "not allowed"), (["x", "x"], "listed twice"),
                              ("helpfulness", "must be a list")):
        with pytest.raises(FeedbackError, match=message):
            svc.create_project("p", criteria=criteria)
    with pytest.raises(FeedbackError, match="pairwise projects"):
        svc.create_project("p", mode="ranking", responses_per_item=3, criteria=["helpfulness"])
    with pytest.raises(FeedbackError, match="clash with the export column"):
        svc.create_project("p", mode="attributes", criteria=["response"])
    assert svc.create_project("p", criteria=[]).criteria == ()  # no criteria: a plain pairwise project
    p = hhh_project(svc)
    with pytest.raises(FeedbackError, match="gold items are not supported"):
        svc.add_items(p.id, [ItemSpec("g ?", ["a .", "b ."], gold_outcome="A")])


# ------------------------------------------------------------------------------------------ rubric: export
def test_rubric_export_writes_one_row_per_criterion_verdict(svc, tmp_path):
    p = hhh_project(svc)
    label_hhh(svc, p)
    rows, report = export_rows(svc, "hhh")
    # q1 ann: helpfulness A better, harmlessness tie (left out), honesty B; q1 bob: helpfulness A better,
    # harmlessness both_bad (left out), honesty B; q2 ann: B negligible, A, A better; q2 bob skipped
    got = [(r["criterion"], r["annotator"], r["chosen"], r.get("strength"), r["margin"]) for r in rows]
    assert got == [
        ("helpfulness", "ann", "one good .", "better", pytest.approx(2 / 3)),
        ("honesty", "ann", "one bad .", None, 0.0),  # no strength; 0.0 because other rows have margins
        ("helpfulness", "bob", "one good .", "better", pytest.approx(2 / 3)),
        ("honesty", "bob", "one bad .", None, 0.0),
        ("helpfulness", "ann", "two bad .", "negligible", 0.0),
        ("harmlessness", "ann", "two good .", None, 0.0),
        ("honesty", "ann", "two good .", "better", pytest.approx(2 / 3)),
    ]
    assert report.judgments == 4 and report.rows == 7
    assert report.skipped == {"tie": 1, "both_bad": 1, "skip": 1}
    assert report.criteria == {"helpfulness": 3, "honesty": 3, "harmlessness": 1}
    assert rows[0]["chosen_source"] == "g" and rows[1]["chosen_source"] == "b"
    # the reader takes one criterion's rows from the combined file, and refuses to mix criteria without one
    path = str(write_export(tmp_path / "all.jsonl", rows))
    for criterion in HHH:
        back = read_preferences(path, criterion=criterion)
        assert [b.chosen for b in back] == [r["chosen"] for r in rows if r["criterion"] == criterion]
    with pytest.raises(UserError, match="several criteria"):
        read_preferences(path)

    kto, kto_report = export_rows(svc, "hhh", kto=True)
    # every A/B verdict gives a desirable and an undesirable row, bob's both_bad two undesirable ones, the tie none
    assert len(kto) == 2 * 7 + 2 and kto_report.skipped == {"tie": 1, "skip": 1}
    both_bad = [r for r in kto if r["criterion"] == "harmlessness" and r["annotator"] == "bob"]
    assert [(r["completion"], r["label"]) for r in both_bad] == [("one good .", False), ("one bad .", False)]


def test_export_by_criterion_gives_one_standard_file_per_criterion(svc, tmp_path):
    p = hhh_project(svc)
    label_hhh(svc, p)
    files, report = export_by_criterion(svc, "hhh")
    assert list(files) == list(HHH) and report.criteria == {"helpfulness": 3, "harmlessness": 1, "honesty": 3}
    assert all("criterion" not in r for rows in files.values() for r in rows)
    assert [r["margin"] for r in files["helpfulness"]] == [pytest.approx(2 / 3), pytest.approx(2 / 3), 0.0]
    # margins are filled per file: harmlessness's one verdict has no strength, so its file has no margin at all
    assert files["harmlessness"] == [{"prompt": "q2 ?", "chosen": "two good .", "rejected": "two bad .",
                                      "annotator": "ann", "source": "label:hhh", "chosen_source": "g",
                                      "rejected_source": "b", "item_id": 2}]
    assert [r["margin"] for r in files["honesty"]] == [0.0, 0.0, pytest.approx(2 / 3)]
    for criterion, rows in files.items():
        back = read_preferences(str(write_export(tmp_path / f"p.{criterion}.jsonl", rows)))
        assert len(back) == len(rows)

    majority, mreport = export_by_criterion(svc, "hhh", majority=True)
    # q1: helpfulness A,A (better, better) -> A better; harmlessness tie vs both_bad -> vote tie; honesty B,B
    # without strengths -> B negligible. q2 (bob skipped): ann's verdicts alone.
    assert [(r["chosen"], r["strength"], r["votes"]) for r in majority["helpfulness"]] == [
        ("one good .", "better", {"A": 2}), ("two bad .", "negligible", {"B": 1})]
    assert [(r["chosen"], r["strength"]) for r in majority["harmlessness"]] == [("two good .", "negligible")]
    assert [(r["chosen"], r["strength"], r["annotator"]) for r in majority["honesty"]] == [
        ("one bad .", "negligible", "ann+bob"), ("two good .", "better", "ann")]
    assert mreport.items == 2 and mreport.skipped == {"skip": 1, "vote_tie": 1}
    merged, _ = majority_rows(svc, "hhh")  # the same votes in one file, with the criterion column
    assert [r["criterion"] for r in merged] == ["helpfulness", "honesty", "helpfulness", "harmlessness", "honesty"]

    plain = svc.create_project("plain")
    with pytest.raises(UserError, match="nothing to split by criterion"):
        export_by_criterion(svc, plain.id)


# -------------------------------------------------------------------------------------------- attributes
def test_an_attribute_project_scores_each_response_and_exports_helpsteer2_rows(svc, tmp_path):
    from rlhfkit.data.convert import ConvertConfig, convert

    p = svc.create_project("hs", mode="attributes", responses_per_item=2)
    assert p.criteria == HELPSTEER2_ATTRIBUTES == ("helpfulness", "correctness", "coherence", "complexity",
                                                   "verbosity")
    svc.add_items(p.id, [ItemSpec("name a colour .", ["red .", "the colour red is a colour ."], ["m1", "m2"]),
                         ItemSpec("say hi .", ["hi ."], ["m1"])])  # one response is enough to score
    uid = svc.ensure_user("ann").id
    task = svc.next_task(uid, p.id)
    good = [dict(zip(HELPSTEER2_ATTRIBUTES, (4, 4, 4, 1, 1))), dict(zip(HELPSTEER2_ATTRIBUTES, (2, 3, 3, 1, 4)))]
    bad = {
        "score every response": None,
        "one entry per response": good[:1],
        "response index 1 has no verbosity score": [good[0], {k: v for k, v in good[1].items() if k != "verbosity"}],
        "attribute 'kindness' is not one of project 'hs'": [good[0], {**good[1], "kindness": 2}],
        "integer from 0 to 4, got 5": [good[0], {**good[1], "coherence": 5}],
        "integer from 0 to 4, got True": [good[0], {**good[1], "coherence": True}],
        "integer from 0 to 4, got 2.0": [good[0], {**good[1], "coherence": 2.0}],
    }
    for message, scores in bad.items():
        with pytest.raises(FeedbackError, match=re.escape(message)):
            svc.submit(uid, task.assignment_id, sid(), scores=scores)
    with pytest.raises(FeedbackError, match="not an overall outcome"):
        svc.submit(uid, task.assignment_id, sid(), outcome="A", scores=good)
    with pytest.raises(FeedbackError, match="not a rubric project, so a judgment takes no per-criterion verdicts; send scores"):
        svc.submit(uid, task.assignment_id, sid(), criteria=verdicts(helpfulness="A"))
    svc.submit(uid, task.assignment_id, sid(), scores=good)
    task = svc.next_task(uid, p.id)
    svc.submit(uid, task.assignment_id, sid(), scores=[dict(zip(HELPSTEER2_ATTRIBUTES, (3, 3, 4, 0, 2)))])

    rows, report = attribute_rows(svc, "hs")
    assert report.rows == 3 and report.judgments == 2
    assert rows[1] == {"prompt": "name a colour .", "response": "the colour red is a colour .", "helpfulness": 2,
                       "correctness": 3, "coherence": 3, "complexity": 1, "verbosity": 4, "annotator": "ann",
                       "source": "label:hs", "response_source": "m2", "item_id": 1}
    path = write_export(tmp_path / "hs.jsonl", rows)
    # HelpSteer2's own row format: rlhfkit's HelpSteer2 converter reads it, to scored responses and to pairs
    scored = convert(ConvertConfig(kind="helpsteer2", input=[str(path)], output=str(tmp_path / "scored.jsonl")))
    assert scored.rows_read == 3
    convert(ConvertConfig(kind="helpsteer2", input=[str(path)], output=str(tmp_path / "pairs.jsonl"), pairs=True,
                          attribute="helpfulness"))
    (pair,) = read_preferences(str(tmp_path / "pairs.jsonl"))
    assert (pair.chosen, pair.rejected, pair.margin) == ("red .", "the colour red is a colour .", 2.0)
    with pytest.raises(UserError, match="scores attributes"):
        export_rows(svc, "hs")


def test_attribute_agreement_uses_the_interval_alpha_per_attribute(svc):
    p = svc.create_project("att", mode="attributes", criteria=["helpfulness", "verbosity"], annotators_per_item=2)
    svc.add_items(p.id, [ItemSpec("q1 ?", ["a .", "b ."]), ItemSpec("q2 ?", ["c ."])])
    # helpfulness per (item, response): (1, 2), (3, 3), (2, 4) -> 8/33 as worked by hand above; verbosity all 2
    helpful = {"ann": [[1, 3], [2]], "bob": [[2, 3], [4]]}
    for rater, per_item in helpful.items():
        for prompt, values in zip(("q1 ?", "q2 ?"), per_item):
            judge(svc, rater, p.id, prompt, scores=[{"helpfulness": v, "verbosity": 2} for v in values])
    got = svc.agreement_by_criterion(p.id)
    assert list(got) == ["helpfulness", "verbosity"]
    h = got["helpfulness"]
    assert (h.units, h.metric, h.kappa) == (3, "interval", {})
    assert h.alpha == pytest.approx(8 / 33) and h.percent == pytest.approx(1 / 3)  # exact matches: 1 of 3 units
    assert got["verbosity"].alpha is None and got["verbosity"].percent == 1.0


# ---------------------------------------------------------------------------------------------- migration
def test_a_0002_database_upgrades_and_its_projects_behave_as_before(tmp_path):
    path = tmp_path / "old.db"
    old_database(path, "0002")  # the schema as that release left it

    svc = upgraded_service(path)
    old = svc.project("old")
    assert old.criteria == () and not old.rubric
    (row,), _ = export_rows(svc, "old")
    assert (row["chosen"], row["strength"], "criterion" in row) == ("q1 ? yes .", "better", False)
    assert svc.agreement("old").units == 0  # the whole-item report still works
    ann = svc.user_by_name("ann").id
    task = svc.next_task(ann, old.id)
    assert task.prompt == "q2 ?"
    svc.submit(ann, task.assignment_id, sid(), outcome="B", strength="slightly_better")
    assert [r["chosen"] for r in export_rows(svc, "old")[0]] == ["q1 ? yes .", "q2 ? no ."]
    # and the upgraded database takes rubric projects
    rubric = svc.create_project("new", criteria=["honesty"])
    assert svc.project("new").criteria == ("honesty",) == rubric.criteria
    svc.store.close()


# ---------------------------------------------------------------------------------------------------- CLI
def test_label_create_and_export_by_criterion_from_the_command_line(tmp_path, capsys):
    from rlhfkit import label as cli

    run = lambda *argv: cli.main(cli.parse_label_args(list(argv)))  # noqa: E731
    prompts = [f"what is {i} plus 1 ?" for i in range(3)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (tmp_path / "resp.jsonl").write_text("".join(
        json.dumps({"prompt": p, "responses": [f"{i + 1} .", f"{i + 2} .", f"{i + 3} ."]}) + "\n"
        for i, p in enumerate(prompts)))
    db = str(tmp_path / "f.db")
    common = ["--db", db, "--prompts", str(tmp_path / "prompts.jsonl"), "--responses", str(tmp_path / "resp.jsonl")]
    created = run("create", "--project", "hhh", *common, "--criteria", "helpfulness,harmlessness,honesty")
    assert created["items"] == 3 and created["criteria"] == list(HHH)
    for argv, message in (
            (["--project", "r", "--mode", "ranking", "--responses-per-item", "3", "--criteria", "honesty"],
             "needs --mode pairwise"),
            (["--project", "a", "--attributes", "helpfulness"], "--attributes needs --mode attributes"),
            (["--project", "hhh", "--criteria", "honesty"], "exists with --criteria helpfulness,harmlessness,honesty"),
            (["--project", "hhh", "--mode", "attributes"], "exists as a pairwise project"),
            (["--project", "a", "--criteria", "honesty", "--gold", str(tmp_path / "prompts.jsonl")], "drop --gold")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            run("create", *common, *argv)
    with pytest.raises(ConfigError, match="not allowed"):
        run("create", "--project", "bad", *common, "--criteria", "Helpful Ness")
    assert run("create", "--project", "hhh", *common)["items"] == 3  # adding items: the same or no criteria

    svc = FeedbackService(open_store(db))
    p = svc.project("hhh")
    for i in range(6):
        uid = svc.ensure_user("ann").id
        task = svc.next_task(uid, p.id)
        svc.submit(uid, task.assignment_id, sid(), criteria=verdicts(
            helpfulness=("A", "better"), harmlessness="tie" if i % 2 else "B", honesty=("B", "slightly_better")))
    out = tmp_path / "out" / "prefs.jsonl"
    whole = run("export", "--db", db, "--project", "hhh", "--output", str(out))
    assert whole["rows"] == 15 and whole["rows_per_criterion"] == {"helpfulness": 6, "harmlessness": 3, "honesty": 6}
    assert whole["left_out"] == {"tie": 3} and set(whole["agreement"]) == set(HHH)
    assert [json.loads(line)["criterion"] for line in out.read_text().splitlines()][:3] == list(HHH)
    capsys.readouterr()
    split = run("export", "--db", db, "--project", "hhh", "--output", str(out), "--by-criterion")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == split
    assert split["outputs"] == {c: str(tmp_path / "out" / f"prefs.{c}.jsonl") for c in HHH}
    assert split["rows"] == {"helpfulness": 6, "harmlessness": 3, "honesty": 6}
    for c in HHH:
        assert len(read_preferences(split["outputs"][c])) == split["rows"][c]
    assert [b.margin for b in read_preferences(split["outputs"]["honesty"])] == [pytest.approx(1 / 3)] * 6
    assert [b.margin for b in read_preferences(split["outputs"]["harmlessness"])] == [None] * 3  # no strengths
    with pytest.raises(ConfigError, match="JSON Lines"):
        run("export", "--db", db, "--project", "hhh", "--output", str(tmp_path / "x.csv"), "--by-criterion")

    run("create", "--project", "plain", *common)
    with pytest.raises(ConfigError, match="no criteria, so --by-criterion"):
        run("export", "--db", db, "--project", "plain", "--output", str(out), "--by-criterion")

    made = run("create", "--project", "hs", *common, "--mode", "attributes", "--responses-per-item", "3")
    assert made["attributes"] == list(HELPSTEER2_ATTRIBUTES) and made["items"] == 3
    custom = run("create", "--project", "hs2", *common, "--mode", "attributes", "--attributes", "helpfulness,verbosity")
    assert custom["attributes"] == ["helpfulness", "verbosity"]
    hs2 = svc.project("hs2")
    uid = svc.ensure_user("ann").id
    task = svc.next_task(uid, hs2.id)
    assert len(task.responses) == 2  # --responses-per-item 2 (the default): the first two of each prompt's three
    svc.submit(uid, task.assignment_id, sid(), scores=[{"helpfulness": 2, "verbosity": 1}] * 2)
    exported = run("export", "--db", db, "--project", "hs2", "--output", str(tmp_path / "hs2.jsonl"))
    assert exported["rows"] == 2 and exported["attributes"] == ["helpfulness", "verbosity"]
    assert set(exported["agreement"]) == {"helpfulness", "verbosity"}
    assert json.loads((tmp_path / "hs2.jsonl").read_text().splitlines()[0])["verbosity"] == 1
    for flag in ("--kto", "--by-criterion", "--majority"):
        with pytest.raises(ConfigError, match=f"{flag} applies to preference projects"):
            run("export", "--db", db, "--project", "hs2", "--output", str(tmp_path / "x.jsonl"), flag)


# --------------------------------------------------------------------------------------------------- HTTP
@pytest.fixture
def rubric_app(svc, tmp_path):
    pytest.importorskip("fastapi")
    from rlhfkit.feedback.web.app import create_app, load_or_create_secret

    from .web_helpers import PASSWORD

    svc.add_user("boss", "admin", PASSWORD)
    svc.add_user("ann", "annotator", PASSWORD)
    svc.add_user("bob", "annotator", PASSWORD)
    rub = svc.create_project("hhh", criteria=list(HHH), annotators_per_item=2)
    svc.add_items(rub.id, [ItemSpec(f"q{i} ? <b>x</b>", [f"{i} good .", f"{i} bad ."], ["g", "b"]) for i in range(3)])
    att = svc.create_project("hs", mode="attributes", criteria=["helpfulness", "verbosity"])
    svc.add_items(att.id, [ItemSpec("say hi .", ["hi .", "hello there ."], ["m1", "m2"])])
    application = create_app(svc, load_or_create_secret(tmp_path / "secret_key"), rate_limit=1000)
    application.state.ids = {"hhh": rub.id, "hs": att.id}
    return application


def _client(app, name):
    from fastapi.testclient import TestClient

    from .web_helpers import login

    c = TestClient(app, base_url="http://127.0.0.1")
    assert login(c, name).status_code == 303
    return c


def _form(html: str) -> dict:
    from .web_helpers import field

    return {k: field(html, k) for k in ("csrf", "assignment_id", "submission_id")}


def test_rubric_form_over_http_refuses_what_is_incomplete_or_unknown(rubric_app, svc):
    c = _client(rubric_app, "ann")
    pid = rubric_app.state.ids["hhh"]
    page = c.get(f"/p/{pid}")
    assert page.status_code == 200
    html = page.text
    assert [m for m in re.findall(r'name="criterion" value="([a-z_]+)"', html)] == list(HHH)
    assert "<kbd>3</kbd> or <kbd>t</kbd> tie" in html and "<kbd>z</kbd>" in html and "<b>x</b>" not in html
    left = re.search(r'<option value="([AB])" data-key="1">', html).group(1)
    f = _form(html)
    post = lambda data: c.post(f"/p/{pid}/submit", data={**f, **data}, follow_redirects=False)  # noqa: E731
    ok = {"criterion": list(HHH), "verdict": [left, "tie", "both_bad"], "verdict_strength": ["better", "", ""]}
    cases = [
        ({**ok, "verdict": [left, "tie", ""]}, "criterion honesty is not answered"),
        ({**ok, "criterion": ["helpfulness", "harmlessness", "kindness"]}, "criterion &#39;kindness&#39; is not one of"),
        ({"criterion": ["helpfulness", "harmlessness"], "verdict": [left, "tie"], "verdict_strength": ["", ""]},
         "criterion &#39;honesty&#39; is not answered"),
        ({**ok, "verdict_strength": ["better", "better", ""]}, "a tie has no direction"),
        ({**ok, "verdict": [left, "tie", "maybe"]}, "outcome &#39;maybe&#39; is unknown"),
        ({**ok, "verdict_strength": ["", ""]}, "the rubric form is incomplete"),
        ({**ok, "outcome": "A"}, "not an overall outcome"),
    ]
    for data, message in cases:
        r = post(data)
        assert r.status_code == 422 and message in r.text, (data, r.status_code, r.text[-400:])
    assert svc.judged_items(pid) == []
    assert post(ok).status_code == 303
    (stored,) = svc.judged_items(pid)
    assert stored["rubric"]["helpfulness"] == {"outcome": left, "strength": "better"}
    assert stored["rubric"]["honesty"] == {"outcome": "both_bad", "strength": None}
    skip = _form(c.get(f"/p/{pid}").text)
    assert c.post(f"/p/{pid}/submit", data={**skip, "outcome": "skip"}, follow_redirects=False).status_code == 303


def test_attribute_form_over_http_refuses_missing_and_out_of_range_scores(rubric_app, svc):
    c = _client(rubric_app, "ann")
    pid = rubric_app.state.ids["hs"]
    html = c.get(f"/p/{pid}").text
    shown = [int(i) for i in re.findall(r'name="score_response" value="(\d)"', html)]
    assert len(shown) == 4 and "Score every response on each attribute" in html
    attributes = re.findall(r'name="score_attribute" value="([a-z_]+)"', html)
    assert attributes == ["helpfulness", "verbosity"] * 2
    f = _form(html)
    post = lambda data: c.post(f"/p/{pid}/submit", data={**f, **data}, follow_redirects=False)  # noqa: E731
    ok = {"score_response": shown, "score_attribute": attributes, "score_value": ["4", "1", "2", "3"]}
    cases = [
        ({**ok, "score_value": ["4", "", "2", "3"]}, "response 1 has no verbosity score"),
        ({**ok, "score_value": ["4", "1", "7", "3"]}, "response 2: the helpfulness score must be an integer from 0 to 4, got 7"),
        ({**ok, "score_attribute": ["helpfulness", "kindness", "helpfulness", "verbosity"]},
         "attribute &#39;kindness&#39; is not one of"),
        ({**ok, "score_response": [0, 0, 5, 5]}, "the scoring form is incomplete"),
        ({**ok, "score_value": ["4", "1"]}, "the scoring form is incomplete"),
    ]
    for data, message in cases:
        r = post(data)
        assert r.status_code == 422 and message in r.text, (data, r.status_code, r.text[-400:])
    assert post(ok).status_code == 303
    (stored,) = svc.judged_items(pid)
    # stored in item order whatever the display order was
    by_item = {shown[0]: {"helpfulness": 4, "verbosity": 1}, shown[2]: {"helpfulness": 2, "verbosity": 3}}
    assert stored["scores"] == [by_item[0], by_item[1]]


def test_admin_page_shows_criteria_and_per_criterion_agreement_and_exports_one_criterion(rubric_app, svc):
    for name in ("ann", "bob"):
        uid = svc.user_by_name(name).id
        for _ in range(3):
            task = svc.next_task(uid, rubric_app.state.ids["hhh"])
            svc.submit(uid, task.assignment_id, sid(), criteria=verdicts(
                helpfulness="A", harmlessness="tie" if name == "ann" else "B", honesty=("A", "better")))
    c = _client(rubric_app, "boss")
    pid = rubric_app.state.ids["hhh"]
    html = c.get(f"/admin/p/{pid}").text
    assert "helpfulness, harmlessness, honesty" in html and 'id="export-honesty"' in html
    assert '<tr data-criterion="harmlessness"><td>harmlessness</td><td>3</td>\n<td>0.0%</td>' in html
    assert '<tr data-criterion="helpfulness"><td>helpfulness</td><td>3</td>\n<td>100.0%</td>' in html
    one = c.get(f"/admin/p/{pid}/export?format=pairs&criterion=honesty")
    assert one.status_code == 200 and 'filename="hhh.honesty-pairs.jsonl"' in one.headers["content-disposition"]
    lines = [json.loads(x) for x in one.text.splitlines()]
    assert len(lines) == 6 and all("criterion" not in x and x["strength"] == "better" for x in lines)
    bad = c.get(f"/admin/p/{pid}/export?format=pairs&criterion=kindness")
    assert bad.status_code == 422 and "kindness" in bad.text and "helpfulness, harmlessness, honesty" in bad.text
    hs = rubric_app.state.ids["hs"]
    assert 'id="export-attributes"' in c.get(f"/admin/p/{hs}").text
    assert c.get(f"/admin/p/{hs}/export?format=pairs").status_code == 422
    assert c.get(f"/admin/p/{hs}/export?format=attributes").status_code == 200


def test_a_0001_database_with_judgments_upgrades_to_the_head(tmp_path):
    """0002 once added users.active with an SQL-expression default, which made alembic rebuild the users table on
    SQLite; with foreign keys on, dropping the old table failed as soon as an assignment pointed at a user."""
    from rlhfkit.feedback.store import head_revision

    path = tmp_path / "first.db"
    old_database(path, "0001", prompts=("q ?",), judged=False)  # the first release's schema, a task left open
    svc = FeedbackService(open_store(str(path)))  # upgrades to the head
    with svc.store.engine.connect() as conn:
        assert conn.exec_driver_sql("select version_num from alembic_version").scalar() == head_revision()
    assert [a.active for a in svc.accounts() if a.name == "ann"] == [True]
    assert svc.progress(svc.project("old").id).items == 1
