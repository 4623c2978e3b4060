import json

import pytest
import torch

from rlhfkit.data.collate import collate_pairs, collate_rankings
from rlhfkit.data.preference import (
    PreferencePair,
    Ranking,
    margin_of,
    ranking_to_pairs,
    read_preferences,
    strength_to_margin,
    write_preferences,
)
from rlhfkit.data.preference_tokens import tokenize_pair, tokenize_preferences, tokenize_ranking
from rlhfkit.errors import DataError, UserError
from rlhfkit.losses.reward import batched_ranking_loss, ranking_loss
from rlhfkit.models import load_tokenizer, train_word_tokenizer
from helpers import corpus, write_jsonl

USER = [{"role": "user", "content": "say hi to ada ."}]
HI_ADA = [{"role": "assistant", "content": "hi ada ."}]
HI_BO = [{"role": "assistant", "content": "hi bo ."}]


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(str(tiny_model))


def read_one(tmp_path, row):
    [rec] = read_preferences(str(write_jsonl(tmp_path / "p.jsonl", [row])))
    return rec


# ------------------------------------------------------------------------------------------------- reading
def test_explicit_standard_row_with_optional_columns(tmp_path):
    rec = read_one(tmp_path, {"prompt": "what is 2 plus 3 ?", "chosen": "5", "rejected": "6", "margin": 1.5,
                              "strength": "better", "annotator": "eve", "source": "gold", "id": 7})
    assert rec == PreferencePair("what is 2 plus 3 ?", "5", "6", margin=1.5, strength="better", annotator="eve",
                                 source="gold")
    assert (rec.row, rec.path, rec.conversational) == (1, str(tmp_path / "p.jsonl"), False)


def test_explicit_conversational_row(tmp_path):
    rec = read_one(tmp_path, {"prompt": USER, "chosen": HI_ADA, "rejected": HI_BO})
    assert rec.conversational and rec.prompt == USER and rec.chosen == HI_ADA and rec.rejected == HI_BO
    assert rec.margin is None and rec.strength is None


@pytest.mark.parametrize("chosen,rejected,prompt,chosen_part,rejected_part", [
    # diverging at a whole word: the separating space goes with the responses
    ("what is 2 plus 3 ? 5 .", "what is 2 plus 3 ? 6 .", "what is 2 plus 3 ?", " 5 .", " 6 ."),
    # diverging inside a word ("ada" vs "adam"): back off to the word's start, never split a word
    ("say hi to ada now", "say hi to adam now", "say hi to", " ada now", " adam now"),
    # one response a prefix of the other
    ("say hi to ada", "say hi to ada and bo", "say hi to", " ada", " ada and bo"),
    # a turn boundary (newline) counts as whitespace
    ("Q: hi\nA: hello ada", "Q: hi\nA: go away", "Q: hi\nA:", " hello ada", " go away"),
])
def test_implicit_standard_prompt_is_the_common_prefix_at_a_word_boundary(
        tmp_path, chosen, rejected, prompt, chosen_part, rejected_part):
    rec = read_one(tmp_path, {"chosen": chosen, "rejected": rejected})
    assert (rec.prompt, rec.chosen, rec.rejected) == (prompt, chosen_part, rejected_part)
    assert rec.prompt + rec.chosen == chosen and rec.prompt + rec.rejected == rejected  # nothing lost


def test_implicit_conversational_prompt_is_all_but_the_last_assistant_turn(tmp_path):
    history = [{"role": "system", "content": "be kind"}, *USER, *HI_ADA, {"role": "user", "content": "and bo ?"}]
    rec = read_one(tmp_path, {"chosen": history + HI_BO, "rejected": history + HI_ADA})
    assert rec.prompt == history and rec.chosen == HI_BO and rec.rejected == HI_ADA


def test_anthropic_hh_transcripts_become_conversational_pairs(tmp_path):
    shared = "\n\nHuman: say hi to ada .\n\nAssistant: hi ada .\n\nHuman: and bo ?\n\nAssistant:"
    rec = read_one(tmp_path, {"chosen": shared + " hi bo .", "rejected": shared + " no .", "annotator": "crowd-3"})
    assert rec.prompt == [*USER, *HI_ADA, {"role": "user", "content": "and bo ?"}]
    assert rec.chosen == [{"role": "assistant", "content": "hi bo ."}]
    assert rec.rejected == [{"role": "assistant", "content": "no ."}]
    assert rec.annotator == "crowd-3"


def test_k_way_rows_with_flat_and_tied_rankings(tmp_path):
    rows = [{"prompt": "say hi", "responses": ["hi", "go", "hello"], "ranking": [2, 0, 1], "annotator": "bo"},
            {"prompt": USER, "responses": [HI_ADA, HI_BO, [{"role": "assistant", "content": "hi"}]],
             "ranking": [[1], [2, 0]], "strength": "slightly_better"}]
    flat, tied = read_preferences(str(write_jsonl(tmp_path / "k.jsonl", rows)))
    assert flat == Ranking("say hi", ["hi", "go", "hello"], [[2], [0], [1]], annotator="bo")
    assert tied.ranking == [[1], [2, 0]] and tied.conversational and tied.strength == "slightly_better"
    assert (flat.row, tied.row) == (1, 2)


def test_json_parquet_and_datasets_dir_read_the_same_records(tmp_path):
    import datasets

    rows = [{"prompt": USER, "chosen": HI_ADA, "rejected": HI_BO, "margin": 2.0},
            {"prompt": USER, "chosen": HI_BO, "rejected": HI_ADA, "margin": None}]  # None = absent (Parquet columns)
    expected = read_preferences(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert [r.margin for r in expected] == [2.0, None]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "ds"))
    for name in ("p.json", "p.parquet", "ds"):
        assert read_preferences(str(tmp_path / name)) == expected, name


def test_strength_to_margin_both_scales_and_margin_of():
    assert [strength_to_margin(s) for s in ("significantly_better", "better", "slightly_better", "negligible")] \
        == [3.0, 2.0, 1.0, 0.0]
    assert [strength_to_margin(s, "small") for s in ("significantly_better", "better", "slightly_better",
                                                     "negligible")] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    with pytest.raises(UserError, match="unknown"):
        strength_to_margin("much_better")
    with pytest.raises(UserError, match="scale"):
        strength_to_margin("better", "medium")
    assert margin_of(PreferencePair("p", "a", "b", strength="better"), "small") == pytest.approx(2 / 3)
    assert margin_of(PreferencePair("p", "a", "b", margin=0.5, strength="better")) == 0.5  # explicit wins
    assert margin_of(PreferencePair("p", "a", "b")) is None


# ---------------------------------------------------------------------------------------------- validation
HH = "\n\nHuman: hi\n\nAssistant:"


@pytest.mark.parametrize("row,field,reason", [
    ({"prompt": "hi", "chosen": "a"}, "rejected", "missing"),
    ({"prompt": "hi", "rejected": "a"}, "chosen", "missing"),
    ({"question": "hi", "answer": "a"}, "chosen", "missing"),
    ({"prompt": "hi", "chosen": "  ", "rejected": "b"}, "chosen", "is empty"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "is empty"),
    ({"prompt": "hi", "chosen": 5, "rejected": "b"}, "chosen", "must be a string"),
    ({"prompt": "hi", "chosen": HI_ADA, "rejected": "b"}, "chosen", "must be a string like the prompt"),
    ({"prompt": USER, "chosen": "a", "rejected": HI_BO}, "chosen", "must be a list of messages"),
    ({"prompt": USER, "chosen": USER, "rejected": HI_BO}, "chosen[0].role", "starts with an assistant"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": HI_ADA, "rejected": HI_BO}, "prompt[0].role",
     "unknown role"),
    ({"prompt": "hi", "chosen": "same", "rejected": "same "}, "rejected", "identical to chosen"),
    ({"prompt": USER, "chosen": HI_ADA, "rejected": HI_ADA}, "rejected", "identical to chosen"),
    ({"chosen": "hi ada", "rejected": "hi ada"}, "rejected", "identical to chosen"),
    ({"chosen": "ada", "rejected": "bo"}, "prompt", "share no leading words"),
    ({"chosen": USER + HI_ADA, "rejected": [{"role": "user", "content": "x"}, *HI_BO]}, "rejected",
     "before the last assistant turn differ"),
    ({"chosen": HI_ADA + USER, "rejected": USER + HI_BO}, "chosen[1].role", "last message must be the assistant"),
    ({"chosen": HH + " a", "rejected": "\n\nHuman: ho\n\nAssistant: b"}, "rejected", "before the last Assistant"),
    ({"chosen": HH + " a", "rejected": HH + "  "}, "rejected", "final Assistant turn is empty"),
    ({"chosen": HH + " a", "rejected": HH + " a"}, "rejected", "identical to chosen"),
    ({"chosen": HH + " a", "rejected": "no transcript"}, "rejected", "not an Anthropic HH transcript"),
    ({"prompt": "hi", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "must be a number"),
    ({"prompt": "hi", "chosen": "a", "rejected": "b", "margin": -1}, "margin", ">= 0"),
    ({"prompt": "hi", "chosen": "a", "rejected": "b", "strength": "much_better"}, "strength", "unknown strength"),
    ({"prompt": "hi", "chosen": "a", "rejected": "b", "annotator": 3}, "annotator", "non-empty string"),
    ({"prompt": "hi", "responses": ["a"], "ranking": [0]}, "responses", "at least 2"),
    ({"prompt": "hi", "responses": "a b", "ranking": [0]}, "responses", "must be a list"),
    ({"prompt": "hi", "ranking": [0, 1]}, "responses", "missing"),
    ({"prompt": "hi", "responses": ["a", "b"]}, "ranking", "missing"),
    ({"prompt": "hi", "responses": ["a", "b", "c"], "ranking": [0, 1]}, "ranking", "not a permutation"),
    ({"prompt": "hi", "responses": ["a", "b", "c"], "ranking": [0, 1, 1]}, "ranking", "not a permutation"),
    ({"prompt": "hi", "responses": ["a", "b", "c"], "ranking": [0, [1, 3]]}, "ranking", "not a permutation"),
    ({"prompt": "hi", "responses": ["a", "b"], "ranking": [[0, 1]]}, "ranking", "ties every response"),
    ({"prompt": "hi", "responses": ["a", "b"], "ranking": ["a", "b"]}, "ranking", "response indices"),
    ({"prompt": "hi", "responses": ["a", ""], "ranking": [0, 1]}, "responses[1]", "is empty"),
    ({"prompt": "hi", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]}, "responses[2]",
     "identical to responses[0]"),
])
def test_bad_rows_name_file_row_field_and_reason(tmp_path, row, field, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "yes", "rejected": "no"}, row])
    with pytest.raises(DataError) as err:
        read_preferences(str(path))
    assert (err.value.path, err.value.row, err.value.field) == (str(path), 2, field)
    assert reason in err.value.reason and f"row 2, field '{field}'" in str(err.value)


def test_identical_responses_may_be_tied_in_a_ranking(tmp_path):
    rec = read_one(tmp_path, {"prompt": "hi", "responses": ["a", "b", "a"], "ranking": [1, [0, 2]]})
    assert ranking_to_pairs(rec) == [PreferencePair("hi", "b", "a"), PreferencePair("hi", "b", "a")]


# ------------------------------------------------------------------------------------- writing and expanding
def test_ranking_to_pairs_gives_every_non_tied_pair_best_first():
    r = Ranking("p", ["r0", "r1", "r2", "r3"], [[2], [0], [3], [1]], strength="better", annotator="eve")
    pairs = ranking_to_pairs(r)
    assert len(pairs) == 6  # C(4, 2)
    assert [(p.chosen, p.rejected) for p in pairs] == [("r2", "r0"), ("r2", "r3"), ("r2", "r1"), ("r0", "r3"),
                                                      ("r0", "r1"), ("r3", "r1")]
    assert all(p.annotator == "eve" and p.strength == "better" and p.prompt == "p" for p in pairs)
    tied = ranking_to_pairs(Ranking("p", ["r0", "r1", "r2", "r3"], [[0], [2, 1], [3]]))
    assert [(p.chosen, p.rejected) for p in tied] == [("r0", "r2"), ("r0", "r1"), ("r0", "r3"), ("r2", "r3"),
                                                     ("r1", "r3")]  # 5: the tie (2, 1) forms no pair


def test_write_then_read_gives_equal_records(tmp_path):
    records = [
        PreferencePair("what is 2 plus 3 ?", " 5", " 6"),
        PreferencePair("say hi", "hi ada", "go", margin=2.5, annotator="eve", source="sim"),
        PreferencePair(USER, HI_ADA, HI_BO, strength="negligible"),
        Ranking("say hi", ["hi", "go", "hello"], [[2], [0], [1]], annotator="bo"),
        Ranking(USER, [HI_ADA, HI_BO, [{"role": "assistant", "content": "hi"}]], [[1], [2, 0]], strength="better"),
    ]
    path = write_preferences(records, tmp_path / "out" / "prefs.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"prompt": "what is 2 plus 3 ?", "chosen": " 5", "rejected": " 6"}  # no null columns
    assert lines[1]["margin"] == 2.5 and lines[1]["annotator"] == "eve" and lines[1]["source"] == "sim"
    assert lines[3]["ranking"] == [2, 0, 1] and lines[4]["ranking"] == [[1], [2, 0]]
    back = read_preferences(str(path))
    assert back == records
    assert [r.row for r in back] == [1, 2, 3, 4, 5]
    with pytest.raises(UserError, match="jsonl"):
        write_preferences(records, tmp_path / "prefs.parquet")


def test_expanded_ranking_round_trips_as_pairs(tmp_path):
    r = Ranking("say hi", ["hi", "go", "hello"], [[2], [0, 1]], annotator="bo")
    path = write_preferences(ranking_to_pairs(r), tmp_path / "pairs.jsonl")
    assert read_preferences(str(path)) == [PreferencePair("say hi", "hello", "hi", annotator="bo"),
                                           PreferencePair("say hi", "hello", "go", annotator="bo")]


# -------------------------------------------------------------------------------------------------- tokenising
def test_standard_pair_is_prompt_with_specials_plus_response_plus_eos(tok):
    pair = PreferencePair("what is 2 plus 3 ?", " 5 , ada !", " 6", margin=1.0)
    tp = tokenize_pair(tok, pair, 64)
    prompt_ids = tok("what is 2 plus 3 ?")["input_ids"]
    assert prompt_ids[0] == tok.bos_token_id and tp.prompt_ids == prompt_ids
    eos = tok.eos_token_id
    assert tp.chosen_input_ids == prompt_ids + tok(" 5 , ada !", add_special_tokens=False)["input_ids"] + [eos]
    assert tp.rejected_input_ids == prompt_ids + tok(" 6", add_special_tokens=False)["input_ids"] + [eos]
    assert tp.chosen_response_mask == [0] * len(prompt_ids) + [1] * 5  # 5 , ada ! </s>
    assert tp.rejected_response_mask == [0] * len(prompt_ids) + [1] * 2  # 6 </s>
    assert tp.chosen_attention_mask == [1] * len(tp.chosen_input_ids)
    assert tp.margin == 1.0 and not tp.truncated


def test_conversational_pair_shares_the_templated_prompt_and_masks_the_assistant_turn(tok):
    tp = tokenize_pair(tok, PreferencePair(USER, HI_ADA, HI_BO, strength="better"), 64, margin_scale="small")
    prompt_text = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert tp.prompt_ids == tok(prompt_text, add_special_tokens=False)["input_ids"]
    for ids, mask, words in ((tp.chosen_input_ids, tp.chosen_response_mask, ["hi", "ada", ".", "</s>"]),
                             (tp.rejected_input_ids, tp.rejected_response_mask, ["hi", "bo", ".", "</s>"])):
        assert ids[: len(tp.prompt_ids)] == tp.prompt_ids
        assert tok.convert_ids_to_tokens([t for t, m in zip(ids, mask) if m]) == words
        tokens = tok.convert_ids_to_tokens(ids)
        assert tokens.count("<|user|>") == 1 and tokens.count("<|assistant|>") == 1  # templated once
    assert tp.margin == pytest.approx(2 / 3)  # strength "better" on the small scale


SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|system|> you are a helpful bot </s> ' }}{% endif %}"
    "{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def test_default_system_prompt_appears_exactly_once_in_chosen_and_rejected():
    # TRL PR#1930: rendering the prompt and each response through the template separately injected the
    # default system prompt twice. This template injects one whenever the conversation has none (like Llama 2
    # and Qwen templates), so rendering a bare assistant message would carry a second one.
    tok = train_word_tokenizer(corpus() + ["you are a helpful bot , be kind"])
    tok.chat_template = SYSTEM_TEMPLATE
    assert "<|system|>" in tok.apply_chat_template(HI_ADA, tokenize=False)  # the hazard is real
    tp = tokenize_pair(tok, PreferencePair(USER, HI_ADA, HI_BO), 64)
    for ids, mask in ((tp.chosen_input_ids, tp.chosen_response_mask),
                      (tp.rejected_input_ids, tp.rejected_response_mask)):
        tokens = tok.convert_ids_to_tokens(ids)
        assert tokens.count("<|system|>") == 1 and tokens.count("helpful") == 1
        assert tokens[0] == "<|system|>" and tok.convert_ids_to_tokens(tp.prompt_ids)[0] == "<|system|>"
        assert "<|system|>" not in [t for t, m in zip(tokens, mask) if m]  # it belongs to the prompt
    # a given system message replaces the default and still appears once
    own = [{"role": "system", "content": "be kind"}, *USER]
    tp = tokenize_pair(tok, PreferencePair(own, HI_ADA, HI_BO), 64)
    for ids in (tp.chosen_input_ids, tp.rejected_input_ids):
        tokens = tok.convert_ids_to_tokens(ids)
        assert tokens.count("<|system|>") == 1 and "helpful" not in tokens and "kind" in tokens


def test_template_that_is_not_prefix_stable_is_a_clear_error():
    tok = train_word_tokenizer(corpus())
    # numbers the turns from the end, so the prompt rendering is not a prefix of the full one
    tok.chat_template = ("{% for m in messages %}{{ (messages|length - loop.index)|string + ' ' + m['content'] + "
                         "' </s> ' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")
    with pytest.raises(UserError, match="not prefix-stable"):
        tokenize_pair(tok, PreferencePair(USER, HI_ADA, HI_BO), 64)


def test_overlong_pair_is_an_error_by_default_naming_row_and_lengths(tok):
    pair = PreferencePair("say hi to", " ada " * 10, " bo", row=4, path="p.jsonl")
    # prompt = <s> say hi to = 4 tokens; chosen response = 10 + EOS = 11 -> 15 > 12; rejected 4 + 2 = 6 fits
    with pytest.raises(DataError) as err:
        tokenize_pair(tok, pair, 12)
    assert err.value.row == 4 and "chosen 15 tokens (prompt 4 + response 11) > max_length 12" in err.value.reason
    assert "overlong: truncate" in err.value.reason and "rejected" not in err.value.reason


def test_truncate_cuts_response_tails_keeps_the_prompt_and_reports(tok, tmp_path):
    rows = [{"prompt": "say hi to", "chosen": " ada " * 10, "rejected": " bo"},
            {"prompt": "say hi to", "chosen": " ada", "rejected": " bo"}]
    records = read_preferences(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    items, report = tokenize_preferences(tok, records, 12, overlong="truncate")
    assert len(items) == 2  # nothing dropped
    assert (report.pairs, report.rankings, report.truncated, report.truncated_rows) == (2, 0, 1, [1])
    long = items[0]
    assert long.truncated and len(long.chosen_input_ids) == 12
    assert long.chosen_input_ids[:4] == long.prompt_ids == tok("say hi to")["input_ids"]
    assert sum(long.chosen_response_mask) == 8 and long.chosen_input_ids[-1] != tok.eos_token_id
    assert long.rejected_input_ids[-1] == tok.eos_token_id  # the short response is untouched
    with pytest.raises(DataError, match="leaving no room for a response") as err:
        tokenize_pair(tok, records[0], 4, overlong="truncate")
    assert err.value.field == "prompt"


def test_pairs_that_tokenise_or_truncate_to_the_same_ids_are_rejected(tok):
    # the word tokenizer lowercases, so these differ as text but not as ids
    with pytest.raises(DataError, match="same ids as chosen"):
        tokenize_pair(tok, PreferencePair("say hi", " Ada", " ada", row=2), 32)
    # they differ only in the 4th response token; <s> say = 2 prompt tokens, so max_length 5 keeps 3
    with pytest.raises(DataError, match="same ids as chosen within max_length 5"):
        tokenize_pair(tok, PreferencePair("say", " hi ada , bo", " hi ada , cy"), 5, overlong="truncate")
    kept = tokenize_pair(tok, PreferencePair("say", " hi ada , bo", " hi ada , cy"), 6, overlong="truncate")
    assert kept.truncated and kept.chosen_input_ids[-1] != kept.rejected_input_ids[-1]  # 4 kept: bo vs cy


def test_collate_puts_chosen_then_rejected_and_indexes_the_last_real_token(tok):
    pairs = [tokenize_pair(tok, PreferencePair("say hi to", " ada and bo", " bo", margin=2.0), 64),
             tokenize_pair(tok, PreferencePair("what is 2 plus 3 ?", " 5", " 6 , ada , bo , cy"), 64)]
    batch = collate_pairs(pairs, tok.pad_token_id)
    ids = batch["input_ids"]
    assert ids.shape[0] == 4 and batch["attention_mask"].shape == ids.shape == batch["response_mask"].shape
    expected_rows = [p.chosen_input_ids for p in pairs] + [p.rejected_input_ids for p in pairs]
    for row, seq in enumerate(expected_rows):
        n = len(seq)
        assert ids[row, :n].tolist() == seq  # chosen rows 0..B-1, rejected rows B..2B-1, same order
        assert (ids[row, n:] == tok.pad_token_id).all() and batch["attention_mask"][row].sum() == n  # right padding
        last = batch["last_index"][row].item()
        assert last == n - 1 and ids[row, last] == tok.eos_token_id  # EOS, not padding
        assert batch["attention_mask"][row, last] == 1 and batch["response_mask"][row, last] == 1
    assert (batch["last_index"] < ids.shape[1] - 1).sum() == 3  # only the longest row ends at the edge
    assert batch["response_mask"][2].tolist()[:5] == [0, 0, 0, 0, 1]  # rejected of pair 0: prompt then "bo"
    assert batch["margin"].tolist() == [2.0, 0.0]  # a missing margin is 0 (plain Bradley-Terry)
    # reading a score at last_index picks each sequence's EOS even when the pad id is the EOS id
    same_pad = collate_pairs(pairs, tok.eos_token_id)
    assert torch.equal(same_pad["last_index"], batch["last_index"])


def test_rankings_tokenise_and_collate_into_the_batched_ranking_loss(tok):
    r3 = Ranking("say hi", [" ada", " bo", " cy"], [[2], [0], [1]], row=1)
    r2 = Ranking(USER, [HI_ADA, HI_BO], [[1], [0]], row=2)
    t3, t2 = tokenize_ranking(tok, r3, 32), tokenize_ranking(tok, r2, 32)
    assert [s[: len(t3.prompt_ids)] for s in t3.input_ids] == [t3.prompt_ids] * 3
    assert [sum(m) for m in t3.response_mask] == [2, 2, 2]  # word + EOS
    batch = collate_rankings([t3, t2], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 5  # 3 + 2 responses, each scored once
    assert batch["group_index"].tolist() == [0, 0, 0, 1, 1] and batch["slot_index"].tolist() == [0, 1, 2, 0, 1]
    for n in range(5):
        assert batch["input_ids"][n, batch["last_index"][n]] == tok.eos_token_id
    beats = batch["beats"]
    assert beats[0].sum() == 3 and beats[0, 2, 0] and beats[0, 2, 1] and beats[0, 0, 1]
    assert beats[1].sum() == 1 and beats[1, 1, 0] and not beats[1, :, 2].any()  # padding slot in no pair
    # scatter per-sequence scores into (G, K) and check against the single-prompt losses
    scores = torch.tensor([0.5, -1.0, 2.0, 0.1, 0.7])
    rewards = torch.zeros(2, 3)
    rewards[batch["group_index"], batch["slot_index"]] = scores
    loss, _ = batched_ranking_loss(rewards, beats)
    l3, _ = ranking_loss(scores[:3], r3.ranking)
    l2, _ = ranking_loss(scores[3:], r2.ranking)
    assert loss.item() == pytest.approx((l3.item() + l2.item()) / 2)


def test_overlong_ranking_names_the_response(tok):
    r = Ranking("say", [" ada", " bo " * 10], [[0], [1]], row=3, path="k.jsonl")
    with pytest.raises(DataError, match=r"responses\[1\] 13 tokens") as err:
        tokenize_ranking(tok, r, 8)
    assert err.value.row == 3
    t = tokenize_ranking(tok, r, 8, overlong="truncate")
    assert t.truncated and [len(s) for s in t.input_ids] == [4, 8]
