"""Public data sets' row shapes, as their cards show them: each loads as meant, or is refused with one line naming
file, row, field and the fix. Rows follow the cards' field names, types and nesting (values are short stand-ins)."""

import copy
import gzip
import json
import logging

import pytest

from rlhfkit.config import load_config, parse_args, save_config
from rlhfkit.data.kto import KTOExample, read_kto_records
from rlhfkit.data.preference import PreferencePair, read_preferences
from rlhfkit.data.preference_tokens import tokenize_pair
from rlhfkit.data.readers import DataPath, read_prompts, read_rows
from rlhfkit.data.sft import encode_row, read_sft_examples
from rlhfkit.errors import ConfigError, DataError, UserError
from rlhfkit.models import load_tokenizer, train_word_tokenizer
from rlhfkit.policy.dpo import DPOConfig
from rlhfkit.policy.sft import SFTConfig
from rlhfkit.reward.train import RewardConfig
from helpers import write_jsonl

USER = [{"role": "user", "content": "say hi to ada ."}]
HI_ADA = [{"role": "assistant", "content": "hi ada ."}]
HELLO = [{"role": "assistant", "content": "hello world ."}]


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def plain_tok(tiny_model):
    """The same tokenizer without a chat template, like the DPO paper's Pythia models."""
    t = copy.deepcopy(load_tokenizer(str(tiny_model)))
    t.chat_template = None
    return t


def ultrafeedback_row(prompt="say hi to ada .", chosen="hi ada .", rejected="hello world .", score_chosen=8.5,
                      score_rejected=5.0):
    """A HuggingFaceH4/ultrafeedback_binarized row (train_prefs / test_prefs): chosen and rejected are whole
    conversations that begin with the prompt's user turn; `messages` repeats chosen."""
    conv = [{"content": prompt, "role": "user"}]
    return {"prompt": prompt, "prompt_id": "4b9f5c0a" * 8,
            "chosen": conv + [{"content": chosen, "role": "assistant"}],
            "rejected": conv + [{"content": rejected, "role": "assistant"}],
            "messages": conv + [{"content": chosen, "role": "assistant"}],
            "score_chosen": score_chosen, "score_rejected": score_rejected}


def orca_row(system="you are a helpful assistant .", question="what is 2 plus 3 ?"):
    """An argilla/distilabel-intel-orca-dpo-pairs row: system + input, plain-string answers, no prompt column.
    The two answers share their first words, which the implicit-prompt rule would take as the prompt."""
    return {"system": system, "input": question, "chosen": "2 plus 3 is 5 .", "rejected": "2 plus 3 is 6 .",
            "generations": ["2 plus 3 is 5 .", "2 plus 3 is 6 ."], "order": ["chosen", "rejected"],
            "labelling_model": "gpt-4-1106-preview", "rating": [10.0, 4.0], "rationale": "the sum is 5",
            "status": "unchanged", "original_chosen": "2 plus 3 is 5 .", "original_rejected": "2 plus 3 is 6 .",
            "chosen_score": 10.0, "in_gsm8k_train": False}


def oasst_rows():
    """OpenAssistant/oasst1: one message per row, linked into a tree by parent_id."""
    common = {"user_id": "c3fe8c76", "created_date": "2023-02-05T14:23:50.983374+00:00", "lang": "en",
              "review_count": 3, "review_result": True, "deleted": False, "synthetic": False, "model_name": None,
              "detoxify": None, "message_tree_id": "6ab24d72", "tree_state": "ready_for_export", "emojis": None,
              "labels": None}
    return [{**common, "message_id": "6ab24d72", "parent_id": None, "text": "say hi to ada .", "role": "prompter",
             "rank": None},
            {**common, "message_id": "c8e83833", "parent_id": "6ab24d72", "text": "hi ada .", "role": "assistant",
             "rank": 0}]


def one_pair(path, **kwargs):
    [rec] = read_preferences(str(path), **kwargs)
    return rec


# ---------------------------------------------------------------------------- 1. UltraFeedback conversations
def test_ultrafeedback_row_takes_the_shared_turns_as_the_prompt(tmp_path, tok):
    rec = one_pair(write_jsonl(tmp_path / "uf.jsonl", [ultrafeedback_row()]))
    assert rec.prompt == USER and rec.chosen == HI_ADA and rec.rejected == HELLO
    item = tokenize_pair(tok, rec, 64)  # and it encodes as a conversational pair
    assert tok.decode([t for t, m in zip(item.chosen_input_ids, item.chosen_response_mask) if m],
                      skip_special_tokens=True) == "hi ada."


def test_ultrafeedback_multi_turn_conversations_split_where_the_assistant_turns_differ(tmp_path):
    row = ultrafeedback_row()
    history = [{"role": "user", "content": "say hi to ada ."}, {"role": "assistant", "content": "hi ada ."},
               {"role": "user", "content": "and bo ?"}]
    row["chosen"] = history + [{"role": "assistant", "content": "hi bo ."}]
    row["rejected"] = history + [{"role": "assistant", "content": "no ."}]
    rec = one_pair(write_jsonl(tmp_path / "uf.jsonl", [row]))
    assert rec.prompt == history and rec.chosen == [{"role": "assistant", "content": "hi bo ."}]


@pytest.mark.parametrize("change,field,reason", [
    (lambda r: r.update(prompt="say hi to bo ."), "prompt", "is not the first user turn"),
    (lambda r: r["rejected"].__setitem__(0, {"role": "user", "content": "say hi to bo ."}), "rejected[0]",
     "must begin with the same prompt turns"),
    (lambda r: r["rejected"].insert(1, {"role": "user", "content": "and bo ?"}), "rejected[1]",
     "must first differ at an assistant turn"),
])
def test_ultrafeedback_rows_that_do_not_fit_are_refused(tmp_path, change, field, reason):
    row = ultrafeedback_row()
    change(row)
    with pytest.raises(DataError) as err:
        read_preferences(str(write_jsonl(tmp_path / "uf.jsonl", [row])))
    assert (err.value.row, err.value.field) == (1, field) and reason in err.value.reason


# -------------------------------------------------------------------------------------- 2. scored ties
def test_a_tie_is_refused_by_default_naming_the_option(tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", [ultrafeedback_row(), ultrafeedback_row(score_chosen=7.0,
                                                                                      score_rejected=7.0)])
    with pytest.raises(DataError) as err:
        read_preferences(str(path))
    assert (err.value.row, err.value.field) == (2, "score_rejected")
    assert "tie" in err.value.reason and "--preference-ties drop" in err.value.reason


def test_dropped_ties_are_counted_and_logged_with_their_rows(tmp_path, caplog):
    rows = [ultrafeedback_row(), ultrafeedback_row(score_chosen=7.0, score_rejected=7.0), ultrafeedback_row(),
            ultrafeedback_row(score_chosen=3, score_rejected=3)]
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="rlhfkit.data.preference"):
        records = read_preferences(str(path), ties="drop")
    assert [r.row for r in records] == [1, 3]
    assert "left out 2 of 4 rows" in caplog.text and "[2, 4]" in caplog.text
    # the KTO reader (paired rows are unpaired into desirable / undesirable) honours the same option
    assert [r.row for r in read_kto_records(str(path), ties="drop")] == [1, 3]
    with pytest.raises(DataError, match="tie"):
        read_kto_records(str(path))


def test_margin_from_scores_is_the_score_gap(tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", [ultrafeedback_row(score_chosen=8.5, score_rejected=5.0)])
    assert one_pair(path).margin is None  # scores alone set no margin
    assert one_pair(path, margin_from_scores=True).margin == pytest.approx(3.5)
    row = {**ultrafeedback_row(), "margin": 1.0}
    with pytest.raises(DataError, match="keep one of them"):
        read_preferences(str(write_jsonl(tmp_path / "m.jsonl", [row])), margin_from_scores=True)


def test_scores_that_contradict_the_label_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", [ultrafeedback_row(score_chosen=4.0, score_rejected=6.5)])
    with pytest.raises(DataError) as err:
        read_preferences(str(path))
    assert err.value.field == "score_rejected" and "contradicts" in err.value.reason


def test_reward_and_dpo_configs_share_the_tie_and_margin_fields(tmp_path, tok):
    from rlhfkit.reward.train import load_items

    for cls in (RewardConfig, DPOConfig):
        cfg = parse_args(cls, ["--preference-ties", "drop", "--margin-from-scores"])
        assert (cfg.preference_ties, cfg.margin_from_scores) == ("drop", True)
    rows = [ultrafeedback_row(score_chosen=9.0, score_rejected=5.0),
            ultrafeedback_row(score_chosen=6, score_rejected=6)]
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    cfg = RewardConfig(data=str(path), preference_ties="drop", margin_from_scores=True, eval_fraction=0.0)
    train, _, info = load_items(cfg, tok)  # the stage passes both through to the reader
    assert info["pairs"] == 1 and train[0].margin == pytest.approx(4.0)


# ------------------------------------------------------------------- 3. Anthropic HH without a chat template
HH_SHARED = "\n\nHuman: say hi to ada .\n\nAssistant: hi ada .\n\nHuman: and bo ?\n\nAssistant:"
HH_ROW = {"chosen": HH_SHARED + " hi bo .", "rejected": HH_SHARED + " hello world ."}  # Anthropic/hh-rlhf


def test_hh_stays_raw_text_for_a_tokenizer_without_a_chat_template(tmp_path, plain_tok):
    rec = one_pair(write_jsonl(tmp_path / "hh.jsonl", [HH_ROW]), chat=False)
    # the DPO paper's HH setup: the prompt is the text through the last "\n\nAssistant:", the response the rest
    assert (rec.prompt, rec.chosen, rec.rejected) == (HH_SHARED, " hi bo .", " hello world .")
    item = tokenize_pair(plain_tok, rec, 128)
    assert item.prompt_ids == plain_tok(HH_SHARED)["input_ids"]
    assert item.chosen_input_ids[-1] == plain_tok.eos_token_id


def test_the_dpo_stage_reads_hh_by_whether_the_tokenizer_has_a_template(tmp_path, tok, plain_tok):
    from rlhfkit.policy.dpo import load_data

    path = write_jsonl(tmp_path / "hh.jsonl", [HH_ROW])
    cfg = DPOConfig(data=str(path), eval_fraction=0.0, max_length=128)
    raw, _, _ = load_data(cfg, plain_tok)  # today: refused, the rows became chat messages
    assert raw.items[0].prompt_ids == plain_tok(HH_SHARED)["input_ids"]
    chat, _, _ = load_data(cfg, tok)  # with a template: messages rendered through it
    assert tok.convert_ids_to_tokens(chat.items[0].prompt_ids).count("<|user|>") == 2


# ------------------------------------------------------- 4. prompt-like columns and the column mapping
def test_a_prompt_like_column_stops_the_implicit_prompt(tmp_path):
    path = write_jsonl(tmp_path / "orca.jsonl", [orca_row()])
    with pytest.raises(DataError) as err:  # today: prompt "2 plus 3 is", responses " 5 ." and " 6 ."
        read_preferences(str(path))
    assert (err.value.row, err.value.field) == (1, "prompt")
    assert "'input'" in err.value.reason and "--data-fields prompt=input,system=system" in err.value.reason


def test_data_fields_map_orca_columns_to_a_system_and_user_prompt(tmp_path, tok):
    path = write_jsonl(tmp_path / "orca.jsonl", [orca_row(), orca_row(system="")])
    with_system, without = read_preferences(DataPath(str(path), fields={"prompt": "input", "system": "system"}))
    assert with_system.prompt == [{"role": "system", "content": "you are a helpful assistant ."},
                                  {"role": "user", "content": "what is 2 plus 3 ?"}]
    assert with_system.chosen == [{"role": "assistant", "content": "2 plus 3 is 5 ."}]
    assert without.prompt == [{"role": "user", "content": "what is 2 plus 3 ?"}]  # empty system: no message
    item = tokenize_pair(tok, with_system, 128)
    assert tok.convert_ids_to_tokens(item.prompt_ids)[:1] == ["<|system|>"]
    # only the prompt mapped: a string prompt (no template needed), the system column left as it is
    plain = read_preferences(DataPath(str(path), fields={"prompt": "input"}))[0]
    assert (plain.prompt, plain.chosen) == ("what is 2 plus 3 ?", "2 plus 3 is 5 .")


def test_a_mapped_column_missing_from_a_row_is_named(tmp_path):
    path = write_jsonl(tmp_path / "orca.jsonl", [orca_row(), {k: v for k, v in orca_row().items() if k != "input"}])
    with pytest.raises(DataError) as err:
        read_preferences(DataPath(str(path), fields={"prompt": "input"}))
    assert (err.value.row, err.value.field) == (2, "input") and "prompt=input" in err.value.reason


def test_data_fields_parse_from_flags_and_yaml_and_reach_every_reader(tmp_path, tok):
    cfg = parse_args(SFTConfig, ["--data-fields", "prompt=question,completion=answer"])
    assert cfg.data_fields == {"prompt": "question", "completion": "answer"}
    (tmp_path / "c.yaml").write_text("data_fields:\n  prompt: question\n  completion: answer\n")
    assert parse_args(SFTConfig, ["--config", str(tmp_path / "c.yaml")]).data_fields == cfg.data_fields
    save_config(cfg, tmp_path / "run.yaml")  # a run's saved config reads back the same
    assert load_config(SFTConfig, tmp_path / "run.yaml") == cfg
    with pytest.raises(ConfigError, match="key=value"):
        parse_args(SFTConfig, ["--data-fields", "prompt"])
    with pytest.raises(ConfigError, match="unknown column 'promt'"):
        SFTConfig(model="m", data="d", output_dir="o", data_fields={"promt": "question"}).validate()
    rows = [{"question": "what is 2 plus 3 ?", "answer": "5 ."}]
    cfg = SFTConfig(data=str(write_jsonl(tmp_path / "qa.jsonl", rows)), data_fields=cfg.data_fields)
    [ex], _ = read_sft_examples(cfg.data_source(), tok, 64)  # sft
    assert tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m], skip_special_tokens=True) == "5."
    assert read_prompts(cfg.data_source()) == ["what is 2 plus 3 ?"]  # ppo, online-dpo prompts
    with pytest.raises(DataError) as err:  # unmapped: the prompt-like column is named in the error
        read_prompts(str(tmp_path / "qa.jsonl"))
    assert "--data-fields prompt=question" in err.value.reason


# -------------------------------------------------------------------------------- 5. OpenAssistant rows
@pytest.mark.parametrize("reader", ["sft", "preferences", "kto", "prompts"])
def test_oasst_message_rows_are_refused_pointing_to_the_converter(tmp_path, tok, reader):
    path = str(write_jsonl(tmp_path / "oasst1.jsonl", oasst_rows()))
    read = {"sft": lambda: read_sft_examples(path, tok, 64), "preferences": lambda: read_preferences(path),
            "kto": lambda: read_kto_records(path), "prompts": lambda: read_prompts(path)}[reader]
    with pytest.raises(DataError) as err:  # today sft trains each message as a document of its own
        read()
    assert err.value.row == 1 and "rlhfkit data convert oasst1" in err.value.reason


# ------------------------------------------------------------------------------------------- 6. readers
def test_gzipped_json_lines_and_json(tmp_path):
    rows = [HH_ROW, {"chosen": HH_SHARED + " no .", "rejected": HH_SHARED + " hello ."}]
    with gzip.open(tmp_path / "train.jsonl.gz", "wt", encoding="utf-8") as fh:  # how Anthropic/hh-rlhf ships
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "train.json.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps(rows))
    for name in ("train.jsonl.gz", "train.json.gz"):
        assert read_rows(str(tmp_path / name)) == [(1, rows[0]), (2, rows[1])], name
    (tmp_path / "bad.jsonl.gz").write_text("not gzip")
    with pytest.raises(UserError, match="not a gzip file"):
        read_rows(str(tmp_path / "bad.jsonl.gz"))


def test_json_lines_under_a_json_name(tmp_path):
    shp = {"post_id": "himc90", "domain": "askculinary_train", "upvote_ratio": 0.99, "history": "say hi to ada .",
           "c_root_id_A": "fuxm8rj", "c_root_id_B": "fuxdjyl", "created_at_utc_A": 1593535113,
           "created_at_utc_B": 1593531003, "score_A": 12, "score_B": 3, "human_ref_A": "hi ada .",
           "human_ref_B": "hello .", "labels": 1, "seconds_difference": 4110.0, "score_ratio": 4.0}
    path = tmp_path / "train.json"  # stanfordnlp/SHP: one JSON object per line in .json files
    path.write_text(json.dumps(shp) + "\n\n" + json.dumps({**shp, "labels": 0}) + "\n")
    assert read_rows(str(path)) == [(1, shp), (3, {**shp, "labels": 0})]
    path.write_text(json.dumps(shp) + "\n" + '{"post_id": \n')
    with pytest.raises(DataError, match=r"train.json, row 2: not valid JSON"):
        read_rows(str(path))


def test_datasetdict_splits_are_chosen_by_data_split(tmp_path, tok):
    import datasets

    from rlhfkit.reward.train import load_items

    train = datasets.Dataset.from_list([ultrafeedback_row(), ultrafeedback_row(chosen="hi ada , i like red .")])
    test = datasets.Dataset.from_list([ultrafeedback_row(chosen="hi ada !")])
    datasets.DatasetDict({"train_prefs": train, "test_prefs": test}).save_to_disk(str(tmp_path / "uf"))
    cfg = RewardConfig(data=str(tmp_path / "uf"), eval_data=str(tmp_path / "uf"))
    with pytest.raises(UserError) as err:  # the default split "train" is not there
        load_items(cfg, tok)
    assert "['test_prefs', 'train_prefs']" in str(err.value) and "--data-split" in str(err.value)
    cfg = RewardConfig(data=str(tmp_path / "uf"), data_split="train_prefs", eval_data=str(tmp_path / "uf"))
    with pytest.raises(UserError, match="--eval-data-split"):
        load_items(cfg, tok)
    cfg.eval_data_split = "test_prefs"
    train_items, held_out, _ = load_items(cfg, tok)
    assert (len(train_items), len(held_out)) == (2, 1)
    train.save_to_disk(str(tmp_path / "single"))  # a plain Dataset has no splits to pick from
    with pytest.raises(UserError, match="drop --data-split"):
        read_rows(DataPath(str(tmp_path / "single"), "train_prefs"))


# ----------------------------------------------------------------------------------------- 7. SFT chats
def test_sharegpt_conversations_encode_like_messages(tok):
    sharegpt = {"id": "QWJhYvA_0", "conversations": [
        {"from": "system", "value": ""}, {"from": "human", "value": "say hi to ada ."},
        {"from": "gpt", "value": "hi ada ."}, {"from": "human", "value": "and bo ?"},
        {"from": "gpt", "value": "hi bo ."}]}
    messages = {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "say hi to ada ."},
                             {"role": "assistant", "content": "hi ada ."}, {"role": "user", "content": "and bo ?"},
                             {"role": "assistant", "content": "hi bo ."}]}
    ids, mask = encode_row(tok, sharegpt, "s.jsonl", 1)  # an empty system turn is accepted (today: refused)
    assert (ids, mask) == encode_row(tok, messages, "m.jsonl", 1)
    assert tok.convert_ids_to_tokens([t for t, m in zip(ids, mask) if m]) == ["hi", "ada", ".", "</s>", "hi", "bo",
                                                                             ".", "</s>"]
    with pytest.raises(DataError) as err:
        encode_row(tok, {"conversations": [{"from": "bot", "value": "hi"}]}, "s.jsonl", 4)
    assert err.value.field == "conversations[0].from" and "unknown speaker" in err.value.reason


TOOL_TEMPLATE = (
    "{% if tools %}tools : {% for t in tools %}{{ t.function.name }} {% endfor %}</s> {% endif %}"
    "{% for m in messages %}{{ m.role }} : "
    "{% if m.tool_calls %}{% for c in m.tool_calls %}call {{ c.function.name }} "
    "{% for k, v in c.function.arguments.items() %}{{ k }} {{ v }} {% endfor %}{% endfor %}"
    "{% else %}{{ m.content }} {% endif %}</s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tool_tok():
    t = train_word_tokenizer(["system user assistant tool tools : call get_weather city paris sunny it is in"])
    t.chat_template = TOOL_TEMPLATE
    return t


def test_tool_calls_and_tools_reach_the_template_and_the_call_is_learned(tool_tok):
    # TRL's tool-calling format; Parquet gives every message every key, unset ones None
    row = {"messages": [
        {"role": "user", "content": "sunny in paris ?", "tool_calls": None, "name": None},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "paris"}}}]},
        {"role": "tool", "name": "get_weather", "content": "sunny", "tool_calls": None},
        {"role": "assistant", "content": "it is sunny", "tool_calls": None}], "tools": TOOLS}
    ids, mask = encode_row(tool_tok, row, "t.jsonl", 1)
    tokens = tool_tok.convert_ids_to_tokens(ids)
    assert tokens[:4] == ["tools", ":", "get_weather", "</s>"]  # the tools column went to the template
    assert tool_tok.convert_ids_to_tokens([t for t, m in zip(ids, mask) if m]) == [
        "call", "get_weather", "city", "paris", "</s>", "it", "is", "sunny", "</s>"]  # the call is a target
    # arguments as a JSON string (OpenAI's form) and tools as a JSON string (LLaMA-Factory's) read the same
    as_strings = json.loads(json.dumps(row))
    as_strings["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"city": "paris"}'
    as_strings["tools"] = json.dumps(TOOLS)
    assert encode_row(tool_tok, as_strings, "t.jsonl", 1) == (ids, mask)


def test_sharegpt_function_call_turns_become_tool_calls(tool_tok):
    call = '{"name": "get_weather", "arguments": {"city": "paris"}}'
    row = {"conversations": [{"from": "human", "value": "sunny in paris ?"}, {"from": "function_call", "value": call},
                             {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "it is sunny"}],
           "system": "", "tools": json.dumps(TOOLS)}
    ids, mask = encode_row(tool_tok, row, "s.jsonl", 1)
    assert tool_tok.convert_ids_to_tokens([t for t, m in zip(ids, mask) if m])[:5] == [
        "call", "get_weather", "city", "paris", "</s>"]


@pytest.mark.parametrize("message,field", [
    ({"role": "user", "content": "x", "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
     "messages[0].tool_calls"),
    ({"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"arguments": {}}}]},
     "messages[0].tool_calls[0]"),
    ({"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"role": "user", "content": ""}, "messages[0].content"),  # only a system message may be empty
])
def test_bad_tool_messages_are_refused(tool_tok, message, field):
    with pytest.raises(DataError) as err:
        encode_row(tool_tok, {"messages": [message]}, "t.jsonl", 3)
    assert (err.value.row, err.value.field) == (3, field)


# ------------------------------------------------------------------------------------------- 8. KTO labels
def test_kto_labels_may_be_0_and_1_but_no_other_number(tmp_path):
    rows = [{"prompt": "hi", "completion": "hi ada", "label": 1}, {"prompt": "hi", "completion": "go", "label": 0}]
    records = read_kto_records(str(write_jsonl(tmp_path / "k.jsonl", rows)))
    assert records == [KTOExample("hi", "hi ada", True), KTOExample("hi", "go", False)]
    assert all(isinstance(r.desirable, bool) for r in records)
    for bad in (2, -1, "1", 1.0):
        with pytest.raises(DataError) as err:
            read_kto_records(str(write_jsonl(tmp_path / "b.jsonl", [{**rows[0], "label": bad}])))
        assert err.value.field == "label", bad


def test_preference_pair_records_are_unchanged_for_plain_trl_rows(tmp_path):
    # the new shapes leave TRL's explicit-prompt rows as they were
    rec = one_pair(write_jsonl(tmp_path / "p.jsonl", [{"prompt": USER, "chosen": HI_ADA, "rejected": HELLO}]))
    assert rec == PreferencePair(USER, HI_ADA, HELLO)
