"""`rlhfkit data convert`: public data set rows (field names, types and nesting as their cards show) become rows
that rlhfkit's readers accept, with the right chosen side, margins, filters counted and bad rows named."""

import gzip
import json
import math

import pytest

from rlhfkit.cli import main as cli_main
from rlhfkit.data.convert import REDDIT_TEMPLATE, ConvertConfig, convert, parse_convert_args
from rlhfkit.data.preference import Ranking, read_preferences
from rlhfkit.errors import ConfigError, DataError, UserError
from helpers import write_jsonl


def run(tmp_path, kind, rows, name="in.jsonl", **options):
    src = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(src, "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        write_jsonl(src, rows)
    out = tmp_path / "out.jsonl"
    report = convert(ConvertConfig(kind=kind, input=[str(src)], output=str(out), **options))
    return report, [json.loads(line) for line in out.read_text().splitlines()], str(out)


# ------------------------------------------------------------------------------------------------------ oasst1
def oa(mid, parent, role, text, rank=None, lang="en", deleted=False, review=True):
    """One message row with every field of the OpenAssistant/oasst1 card (emojis and labels as `datasets`
    returns a sequence of structs: a dict of lists)."""
    return {"message_id": mid, "parent_id": parent, "user_id": f"user-{mid}",
            "created_date": "2023-02-06T13:50:44.657083+00:00", "text": text, "role": role, "lang": lang,
            "review_count": 3, "review_result": review, "deleted": deleted, "rank": rank, "synthetic": False,
            "model_name": None,
            "detoxify": {"toxicity": 0.0003, "severe_toxicity": 3e-05, "obscene": 0.0002, "identity_attack": 0.0001,
                         "insult": 0.0002, "threat": 4e-05, "sexual_explicit": 3e-05},
            "message_tree_id": "tree-" + (parent or mid)[:2], "tree_state": "ready_for_export",
            "emojis": {"name": ["+1", "_skip_reply"], "count": [2, 1]},
            "labels": {"name": ["spam", "fails_task", "quality"], "value": [0.0, 0.25, 0.75], "count": [3, 2, 2]}}


OASST = [
    oa("p1", None, "prompter", "How do I boil an egg?"),
    oa("a1", "p1", "assistant", "Put it in water.", rank=1),
    oa("a2", "p1", "assistant", "Boil water, add the egg, wait 8 minutes.", rank=0),
    oa("a3", "p1", "assistant", "Eggs are laid by hens.", rank=None),  # never ranked
    oa("a4", "p1", "assistant", "[removed]", rank=2, deleted=True),
    oa("p2", "a2", "prompter", "And a soft one?", rank=0),
    oa("a5", "p2", "assistant", "About 6 minutes.", rank=0),
    oa("a6", "p2", "assistant", "Three minutes at most.", rank=1),
    oa("p3", "a2", "prompter", "Und ein weiches?", rank=1, lang="de"),
    oa("a7", "p3", "assistant", "Etwa 6 Minuten.", rank=0, lang="de"),
    oa("a9", "p3", "assistant", "Drei Minuten.", rank=1, lang="de"),
    oa("p4", "a1", "prompter", "spam spam", rank=None, review=False),
    oa("a8", "p4", "assistant", "ok", rank=None),
    oa("q1", None, "prompter", "Say hi."),
    oa("b1", "q1", "assistant", "Hi!", rank=None),
]


def test_oasst1_siblings_become_rankings_by_rank(tmp_path):
    report, rows, out = run(tmp_path, "oasst1", OASST)
    recs = read_preferences(out)
    assert all(isinstance(r, Ranking) for r in recs) and len(recs) == 3
    first, soft, german = recs
    assert first.prompt == [{"role": "user", "content": "How do I boil an egg?"}]
    # a1 (rank 1) and a2 (rank 0) in input order; the deleted a4 and the unranked a3 are out
    assert [r[0]["content"] for r in first.responses] == ["Put it in water.",
                                                          "Boil water, add the egg, wait 8 minutes."]
    assert first.ranking == [[1], [0]]
    assert soft.prompt == [{"role": "user", "content": "How do I boil an egg?"},
                           {"role": "assistant", "content": "Boil water, add the egg, wait 8 minutes."},
                           {"role": "user", "content": "And a soft one?"}]
    assert soft.ranking == [[0], [1]] and soft.responses[0] == [{"role": "assistant", "content": "About 6 minutes."}]
    assert german.prompt[-1]["content"] == "Und ein weiches?"
    assert all(r.source == "oasst1" for r in recs) and rows[0]["prompt_id"] == "p1"
    assert report.skipped == {"deleted messages": 1, "messages that failed review": 1,
                              "messages below a skipped message": 1,
                              "prompter turns with fewer than 2 ranked replies": 1}
    assert report.notes == {"unranked replies left out of rankings": 2}  # a3, b1
    assert report.written == 3 and report.rows_read == len(OASST)


def test_oasst1_lang_filter_and_sft_threads_follow_the_best_reply(tmp_path):
    sft = tmp_path / "sft.jsonl"
    report, rows, _ = run(tmp_path, "oasst1", OASST, lang=["en"], sft_output=str(sft))
    assert [r["prompt"][-1]["content"] for r in rows] == ["How do I boil an egg?", "And a soft one?"]
    assert report.skipped["messages not in --lang en"] == 1  # p3; its two replies sit below it
    assert report.skipped["messages below a skipped message"] == 3
    threads = [json.loads(line) for line in sft.read_text().splitlines()]
    # best reply at each turn: a2 (rank 0), then p2 (rank 0 among prompter replies), then a5 (rank 0)
    assert threads[0]["messages"] == [
        {"role": "user", "content": "How do I boil an egg?"},
        {"role": "assistant", "content": "Boil water, add the egg, wait 8 minutes."},
        {"role": "user", "content": "And a soft one?"},
        {"role": "assistant", "content": "About 6 minutes."}]
    assert threads[1]["messages"] == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    assert report.sft_written == 2


def test_oasst1_equal_ranks_are_one_tier_and_parquet_reads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [oa("p1", None, "prompter", "Name a colour."), oa("a1", "p1", "assistant", "Red.", rank=1),
            oa("a2", "p1", "assistant", "Blue.", rank=0), oa("a3", "p1", "assistant", "Green.", rank=1)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "oasst1.parquet")  # the card's layout on the hub
    out = tmp_path / "out.jsonl"
    convert(ConvertConfig(kind="oasst1", input=[str(tmp_path / "oasst1.parquet")], output=str(out)))
    [rec] = read_preferences(str(out))
    assert rec.ranking == [[1], [0, 2]]


def test_oasst1_orphan_is_an_error_unless_allowed(tmp_path):
    rows = OASST[:3] + [oa("x1", "gone", "prompter", "Where is my parent?"), oa("x2", "x1", "assistant", "Lost.")]
    with pytest.raises(DataError) as err:
        run(tmp_path, "oasst1", rows)
    assert (err.value.row, err.value.field) == (4, "parent_id") and "'gone'" in str(err.value)
    report, out, _ = run(tmp_path, "oasst1", rows, allow_orphans=True)
    assert len(out) == 1
    assert report.skipped["orphaned messages (parent not in the input)"] == 1
    assert report.skipped["messages below a skipped message"] == 1


@pytest.mark.parametrize("bad, field, words", [
    ({"role": "user"}, "role", "'prompter' or 'assistant'"),
    ({"rank": "first"}, "rank", "non-negative integer"),
    ({"text": None}, "text", "missing"),
])
def test_oasst1_bad_message_names_row_and_field(tmp_path, bad, field, words):
    rows = [dict(r) for r in OASST[:3]]
    rows[1].update(bad)
    with pytest.raises(DataError) as err:
        run(tmp_path, "oasst1", rows)
    assert (err.value.row, err.value.field) == (2, field) and words in str(err.value)


def test_oasst1_structure_errors(tmp_path):
    with pytest.raises(DataError, match="repeats"):
        run(tmp_path, "oasst1", OASST[:3] + [OASST[1]])
    with pytest.raises(DataError, match="alternate prompter and assistant"):
        run(tmp_path, "oasst1", OASST[:2] + [oa("a9", "a1", "assistant", "me too")])
    cycle = OASST[:2] + [oa("c1", "c2", "prompter", "x"), oa("c2", "c1", "assistant", "y")]
    with pytest.raises(DataError, match="cycle"):
        run(tmp_path, "oasst1", cycle)


# --------------------------------------------------------------------------------------------------------- SHP
def shp(post, history, a, b, label, score_a, score_b, ratio):
    return {"post_id": post, "domain": "askculinary_train", "upvote_ratio": 0.97, "history": history,
            "c_root_id_A": f"{post}-a", "c_root_id_B": f"{post}-b", "created_at_utc_A": 1590428371,
            "created_at_utc_B": 1590455542, "score_A": score_a, "score_B": score_b, "human_ref_A": a,
            "human_ref_B": b, "labels": label, "seconds_difference": 27171.0, "score_ratio": ratio}


SHP = [
    shp("p1", "Why does my bread not rise?", "Your yeast may be dead.", "Bread is hard.", 1, 40, 10, 4.0),
    shp("p1", "Why does my bread not rise?", "Try a warmer room.", "Use fresh yeast.", 0, 3, 12, 4.0 * 1.5),
    shp("p1", "Why does my bread not rise?", "Knead longer.", "Bread is hard.", 1, 15, 10, 1.5),
    shp("p2", "Is cast iron safe?", "Yes, season it.", "No.", 1, 20, 2, 10.0),
]


def test_shp_labels_pick_the_side_and_json_lines_in_a_json_file_read(tmp_path):
    report, rows, out = run(tmp_path, "shp", SHP, name="train.json")  # SHP ships JSON Lines named .json
    recs = read_preferences(out)
    assert [(r.prompt, r.chosen, r.rejected) for r in recs[:2]] == [
        ("Why does my bread not rise?", "Your yeast may be dead.", "Bread is hard."),  # labels 1 -> A
        ("Why does my bread not rise?", "Use fresh yeast.", "Try a warmer room.")]  # labels 0 -> B
    assert all(r.margin is None and r.source == "shp" for r in recs) and report.written == 4


def test_shp_log_score_ratio_margin_and_filters_are_counted(tmp_path):
    report, _, out = run(tmp_path, "shp", SHP, margin="log_score_ratio", min_score_ratio=2.0, max_pairs_per_post=1)
    recs = read_preferences(out)
    # p1 keeps its strongest pair (ratio 6) of the two at >= 2; p2 its only one
    assert [r.chosen for r in recs] == ["Use fresh yeast.", "Yes, season it."]
    assert recs[0].margin == pytest.approx(math.log(6.0)) and recs[1].margin == pytest.approx(math.log(10.0))
    assert report.skipped == {"below --min-score-ratio 2": 1, "beyond --max-pairs-per-post 1": 1}


def test_shp_bad_rows(tmp_path):
    bad = [dict(SHP[0], labels="1")]
    with pytest.raises(DataError) as err:
        run(tmp_path, "shp", bad)
    assert (err.value.row, err.value.field) == (1, "labels")
    no_b = {k: v for k, v in SHP[0].items() if k != "human_ref_B"}
    with pytest.raises(DataError, match="field 'human_ref_B': missing; an SHP row has"):
        run(tmp_path, "shp", [SHP[1], no_b])
    with pytest.raises(DataError, match="score_ratio.*>= 1"):
        run(tmp_path, "shp", [dict(SHP[0], score_ratio=0.5)], margin="log_score_ratio")
    report, rows, _ = run(tmp_path, "shp", [SHP[0], dict(SHP[1], human_ref_A="Same.", human_ref_B="Same.")])
    assert len(rows) == 1 and report.skipped == {"identical responses": 1}


# ------------------------------------------------------------------------------------------ summarize_from_feedback
def comparison(choice, post="I (25M) keep forgetting to water my plants.", confidence=None):
    return {"info": {"id": "t3_3pb8rl", "post": post, "title": "How do I remember chores?",
                     "subreddit": "productivity", "site": None, "article": None},
            "summaries": [{"text": " I forget to water plants, how do I remember?", "policy": "sup2", "note": None},
                          {"text": " plants.", "policy": "ref", "note": "too short"}],
            "choice": choice, "worker": "HNzkrs9geGu1YMMfZ5Qvdt0ZaCthfB", "batch": "batch5", "split": "train",
            "extra": {"confidence": confidence}}


def test_summarize_prompt_choice_and_annotator(tmp_path):
    cnndm = {"info": {"id": "0b5c2f", "post": None, "title": "Fox thinks it is a dog", "subreddit": None,
                      "site": "dailymail", "article": "Todd the fox wags his tail."},
             "summaries": [{"text": "A tame fox acts like a dog.", "policy": "pretrain", "note": None},
                           {"text": "A fox.", "policy": "sup", "note": None}],
             "choice": 0, "worker": "w2", "batch": "cnndm1", "split": "valid2", "extra": None}
    report, rows, out = run(tmp_path, "summarize", [comparison(1, confidence=7), comparison(0), cnndm])
    recs = read_preferences(out)
    assert recs[0].prompt == ("SUBREDDIT: r/productivity\n\nTITLE: How do I remember chores?\n\n"
                              "POST: I (25M) keep forgetting to water my plants.\n\nTL;DR:")
    assert (recs[0].chosen, recs[0].rejected) == (" plants.", " I forget to water plants, how do I remember?")
    assert recs[1].chosen == " I forget to water plants, how do I remember?"
    assert recs[0].annotator == "HNzkrs9geGu1YMMfZ5Qvdt0ZaCthfB" and recs[0].source == "summarize_from_feedback"
    assert (rows[0]["chosen_policy"], rows[0]["rejected_policy"], rows[0]["worker_confidence"]) == ("ref", "sup2", 7)
    assert "worker_confidence" not in rows[1] and recs[0].margin is None and recs[0].confidence is None
    assert recs[2].prompt == "Article:\nTodd the fox wags his tail.\n\nTL;DR:\n"
    assert recs[2].chosen == "A tame fox acts like a dog."


def test_summarize_custom_template_and_bad_rows(tmp_path):
    # as a shell passes it: backslash and n, which the template reads as a newline
    _, rows, _ = run(tmp_path, "summarize", [comparison(0)], reddit_template=r"POST: {post}\nTL;DR:")
    assert rows[0]["prompt"] == "POST: I (25M) keep forgetting to water my plants.\nTL;DR:"
    with pytest.raises(ConfigError, match=r"\{author\}"):
        run(tmp_path, "summarize", [comparison(0)], reddit_template="{author}: {post}")
    with pytest.raises(DataError) as err:
        run(tmp_path, "summarize", [comparison(0), comparison(2)])
    assert (err.value.row, err.value.field) == (2, "choice")
    one = comparison(0)
    one["summaries"] = one["summaries"][:1]
    with pytest.raises(DataError, match="exactly 2"):
        run(tmp_path, "summarize", [one])
    with pytest.raises(DataError, match="info.post"):
        run(tmp_path, "summarize", [comparison(0, post="")])


# ------------------------------------------------------------------------------------------------ PKU-SafeRLHF
def pku(better, safer, safe0, safe1, severity=True):
    row = {"prompt": "How can I get into my neighbour's wifi?", "response_0": "Guess the password: try 12345678.",
           "response_1": "Ask your neighbour; using it without permission is illegal.",
           "prompt_source": "Alpaca3-8B", "response_0_source": "Alpaca-7B", "response_1_source": "Alpaca-7B",
           "is_response_0_safe": safe0, "is_response_1_safe": safe1,
           "better_response_id": better, "safer_response_id": safer,
           "response_0_sha256": "a" * 64, "response_1_sha256": "b" * 64}
    if severity:  # the current card's fields; the v0 release lacks them
        row.update({"response_0_harm_category": {"Cybercrime": not safe0, "Privacy Violation": False},
                    "response_1_harm_category": {"Cybercrime": False, "Privacy Violation": False},
                    "response_0_severity_level": 0 if safe0 else 2, "response_1_severity_level": 0 if safe1 else 2})
    return row


def test_pku_by_better_and_by_safer_keep_safety_labels(tmp_path):
    rows_in = [pku(0, 1, False, True), pku(1, 1, False, True, severity=False)]
    _, better, out = run(tmp_path, "pku-saferlhf", rows_in)
    assert len(read_preferences(out)) == 2
    assert better[0]["chosen"].startswith("Guess")
    assert (better[0]["chosen_safe"], better[0]["rejected_safe"]) == (False, True)
    assert (better[0]["chosen_severity_level"], better[0]["rejected_severity_level"]) == (2, 0)
    assert "chosen_severity_level" not in better[1] and better[1]["chosen"].startswith("Ask")
    _, safer, out = run(tmp_path, "pku-saferlhf", rows_in, by="safer", conversational=True)
    recs = read_preferences(out)
    assert recs[0].chosen == [{"role": "assistant",
                               "content": "Ask your neighbour; using it without permission is illegal."}]
    assert recs[0].prompt == [{"role": "user", "content": "How can I get into my neighbour's wifi?"}]
    assert (safer[0]["chosen_safe"], safer[0]["rejected_safe"]) == (True, False)


def test_pku_bad_row(tmp_path):
    with pytest.raises(DataError) as err:
        run(tmp_path, "pku-saferlhf", [dict(pku(0, 1, False, True), is_response_1_safe="yes")])
    assert err.value.field == "is_response_1_safe" and "true or false" in str(err.value)


# -------------------------------------------------------------------------------------------------- HelpSteer2
def hs(prompt, response, helpfulness, correctness=3, coherence=4, complexity=1, verbosity=2):
    return {"prompt": prompt, "response": response, "helpfulness": helpfulness, "correctness": correctness,
            "coherence": coherence, "complexity": complexity, "verbosity": verbosity}


MULTI = "What is C#?\n<extra_id_1>Assistant\nA language by Microsoft.\n<extra_id_1>User\nWho uses it?"
HELPSTEER = [hs("c#", "C# is a language from Microsoft.", 3), hs("c#", "A note.", 1, verbosity=0),
             hs(MULTI, "Game developers, mostly with Unity.", 4), hs(MULTI, "People.", 4, correctness=1)]


def test_helpsteer2_scored_rows_from_gzipped_jsonl(tmp_path):
    report, rows, _ = run(tmp_path, "helpsteer2", HELPSTEER, name="train.jsonl.gz")
    assert rows[0] == {"prompt": "c#", "response": "C# is a language from Microsoft.", "source": "helpsteer2",
                       "scores": {"helpfulness": 3, "correctness": 3, "coherence": 4, "complexity": 1, "verbosity": 2}}
    assert report.unit == "scored responses" and report.written == 4
    assert report.notes == {"multi-turn prompts kept in NeMo <extra_id_1> text (--conversational splits them)": 2}


def test_helpsteer2_pairs_by_attribute_skip_ties(tmp_path):
    report, _, out = run(tmp_path, "helpsteer2", HELPSTEER, pairs=True)
    [rec] = read_preferences(out)
    assert (rec.chosen, rec.rejected, rec.margin) == ("C# is a language from Microsoft.", "A note.", 2.0)
    assert report.skipped == {"ties": 1}  # the multi-turn pair: helpfulness 4 vs 4


def test_helpsteer2_weighted_pairs_conversational(tmp_path):
    _, _, out = run(tmp_path, "helpsteer2", HELPSTEER, pairs=True, conversational=True,
                    weights={"helpfulness": 1.0, "correctness": 0.5})
    first, multi = read_preferences(out)
    assert first.margin == pytest.approx(2.0)
    assert multi.prompt == [{"role": "user", "content": "What is C#?"},
                            {"role": "assistant", "content": "A language by Microsoft."},
                            {"role": "user", "content": "Who uses it?"}]
    assert multi.chosen == [{"role": "assistant", "content": "Game developers, mostly with Unity."}]
    assert multi.margin == pytest.approx(1.0)  # correctness 3 vs 1, weight 0.5


def test_helpsteer2_bad_rows(tmp_path):
    with pytest.raises(DataError) as err:
        run(tmp_path, "helpsteer2", [hs("p", "r", 5)])
    assert err.value.field == "helpfulness" and "0-4" in str(err.value)
    with pytest.raises(DataError, match="ends with an assistant turn"):
        run(tmp_path, "helpsteer2", [hs("hi\n<extra_id_1>Assistant\nhello", "r", 2)], conversational=True)


# ------------------------------------------------------------------------------------------------ config & CLI
def test_options_that_do_not_apply_are_errors(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", SHP)
    base = dict(kind="shp", input=[str(src)], output=str(tmp_path / "o.jsonl"))
    for extra, words in [({"lang": ["en"]}, "--lang applies to data convert oasst1"),
                         ({"margin": "score_gap"}, "--margin score_gap applies to data convert helpsteer2"),
                         ({"output": str(tmp_path / "o.json")}, "must be a JSON Lines file"),
                         ({"output": str(src)}, "is also an input")]:
        with pytest.raises(ConfigError, match=words):
            convert(ConvertConfig(**{**base, **extra}))
    with pytest.raises(ConfigError, match="add --pairs"):
        convert(ConvertConfig(**{**base, "kind": "helpsteer2", "attribute": "correctness"}))
    with pytest.raises(ConfigError, match="did you mean 'shp'"):
        convert(ConvertConfig(**{**base, "kind": "shpp"}))


def test_nothing_left_is_an_error_not_an_empty_file(tmp_path):
    with pytest.raises(UserError, match="nothing to write"):
        run(tmp_path, "shp", SHP[2:3], min_score_ratio=2.0)
    assert not (tmp_path / "out.jsonl").exists()


def test_parse_takes_the_command_and_kind_words():
    cfg = parse_convert_args(["convert", "pku-saferlhf", "--input", "a.jsonl,b.jsonl", "--output", "o.jsonl",
                              "--by", "safer"])
    assert (cfg.kind, cfg.input, cfg.by) == ("pku-saferlhf", ["a.jsonl", "b.jsonl"], "safer")
    assert cfg.reddit_template == "" and REDDIT_TEMPLATE.startswith("SUBREDDIT: r/{subreddit}\n\nTITLE:")
    with pytest.raises(ConfigError, match="unknown data command 'convrt'"):
        parse_convert_args(["convrt", "shp"])


def test_cli_converts_and_prints_the_summary(tmp_path, capsys):
    src = write_jsonl(tmp_path / "train.jsonl", SHP)
    out = tmp_path / "pairs.jsonl"
    assert cli_main(["data", "convert", "shp", "--input", str(src), "--output", str(out),
                     "--min-score-ratio", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == (f"rlhfkit data convert shp: read 4 rows; wrote 3 pairs to {out}; "
                    "skipped: 1 below --min-score-ratio 2")
    assert len(read_preferences(str(out))) == 3


def test_cli_help_lists_kinds_and_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["data", "--help"]) == 0
    help_text = capsys.readouterr().out
    for kind in ("oasst1", "shp", "summarize", "pku-saferlhf", "helpsteer2"):
        assert kind in help_text
    assert "--min-score-ratio FLOAT" in help_text and "--by {better,safer}" in help_text
    src = write_jsonl(tmp_path / "bad.jsonl", [SHP[0], dict(SHP[1], labels=3)])
    assert cli_main(["data", "convert", "shp", "--input", str(src), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err == f"rlhfkit data: error: {src}, row 2, field 'labels': must be 0 or 1, got 3\n"
    assert cli_main(["data", "convert", "--input", str(src), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "name the data set" in capsys.readouterr().err
