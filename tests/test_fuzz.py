"""Property-based fuzzing (hypothesis) of every data reader and of the config parser: any input either parses or
raises the project's one-line user error (UserError: ConfigError, DataError); no other exception escapes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhfkit.errors import UserError

EXAMPLES = 150
FIELDS = ["prompt", "chosen", "rejected", "completion", "label", "messages", "text", "responses", "ranking",
          "margin", "strength", "score_chosen", "score_rejected", "role", "content", "system", "input",
          "conversations", "from", "value", "tools", "tool_calls", "message_id", "parent_id", "annotator"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt",
                                                           "\n\nHuman: hi\n\nAssistant: yo", ""]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS + ["x"]), inner, max_size=4)),
    max_leaves=12)
words = st.text(st.sampled_from("abc hi ada bo .?!\n"), min_size=0, max_size=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "user", "assistant",
                                                                   "system", "tool", "bot"]),
                                           "content": st.one_of(words, words, scalars)}), min_size=0, max_size=4)
texts = st.one_of(words, messages, words, messages, values)  # mostly well-typed, sometimes anything
turn = lambda role: st.lists(st.fixed_dictionaries({"role": st.just(role), "content": words}),  # noqa: E731
                              min_size=1, max_size=2)
shaped = st.one_of(  # rows near the accepted shapes, so the fuzzer also walks the paths past the first check
    st.fixed_dictionaries({"prompt": words, "chosen": words, "rejected": words},
                          optional={"margin": scalars, "score_chosen": scalars, "score_rejected": scalars}),
    st.fixed_dictionaries({"prompt": turn("user"), "chosen": turn("assistant"), "rejected": turn("assistant")},
                          optional={"label": scalars, "completion": turn("assistant")}),
    st.fixed_dictionaries({"prompt": texts, "chosen": texts, "rejected": texts},
                          optional={"margin": scalars, "strength": scalars, "score_chosen": scalars,
                                    "score_rejected": scalars, "system": texts, "input": texts}),
    st.fixed_dictionaries({"prompt": texts, "completion": texts}, optional={"label": scalars, "tools": values}),
    st.fixed_dictionaries({"messages": messages}),
    st.fixed_dictionaries({"prompt": texts, "responses": st.lists(texts, max_size=4),
                           "ranking": st.lists(st.one_of(st.integers(-1, 4), st.lists(st.integers(-1, 4),
                                                                                     max_size=2)), max_size=4)}),
    st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries(
        {"from": st.sampled_from(["human", "gpt", "system", "x"]), "value": words}), max_size=4)}),
    st.fixed_dictionaries({"chosen": words.map(lambda w: "\n\nHuman: hi\n\nAssistant: " + w),
                           "rejected": words.map(lambda w: "\n\nHuman: hi\n\nAssistant: " + w)}),
)
rows = st.one_of(shaped, st.dictionaries(st.sampled_from(FIELDS), values, max_size=6))
settings_ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _write(rows_: list) -> str:
    fh = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8")
    with fh:
        for r in rows_:
            fh.write(json.dumps(r) + "\n")
    return fh.name


def _user_error_or_ok(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), str(exc)  # one line
    finally:
        for a in args:
            if isinstance(a, str) and a.startswith(tempfile.gettempdir()):
                Path(a).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def tok(tiny_model):
    from rlhfkit.models import load_tokenizer

    return load_tokenizer(str(tiny_model))


@settings_
@given(st.lists(rows, min_size=1, max_size=3))
def test_preference_reader_parses_or_names_the_row(rows_):
    from rlhfkit.data.preference import read_preferences

    for chat in (True, False):
        _user_error_or_ok(read_preferences, _write(rows_), chat=chat, ties="drop")


@settings_
@given(st.lists(rows, min_size=1, max_size=3))
def test_kto_reader_parses_or_names_the_row(rows_):
    from rlhfkit.data.kto import read_kto_records

    _user_error_or_ok(read_kto_records, _write(rows_))


@settings_
@given(st.lists(rows, min_size=1, max_size=3))
def test_prompt_reader_parses_or_names_the_row(rows_):
    from rlhfkit.data.readers import read_prompts

    _user_error_or_ok(read_prompts, _write(rows_))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])
@given(rows)
def test_sft_rows_encode_or_name_the_row(tok, row):
    from rlhfkit.data.sft import encode_row

    _user_error_or_ok(encode_row, tok, row, "<fuzz>", 1)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])
@given(st.lists(rows, min_size=1, max_size=2))
def test_preferences_tokenise_or_name_the_row(tok, rows_):
    from rlhfkit.data.preference import read_preferences
    from rlhfkit.data.preference_tokens import tokenize_preferences

    path = _write(rows_)
    try:
        records = read_preferences(path)
    except UserError:
        return
    finally:
        Path(path).unlink(missing_ok=True)
    _user_error_or_ok(tokenize_preferences, tok, records, 64)


@settings_
@given(st.binary(max_size=300), st.sampled_from([".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet"]))
def test_any_bytes_in_a_data_file_read_or_name_the_file(data, suffix):
    from rlhfkit.data.readers import read_rows

    fh = tempfile.NamedTemporaryFile("wb", suffix=suffix, delete=False)
    with fh:
        fh.write(data)
    _user_error_or_ok(read_rows, fh.name)


# ----------------------------------------------------------------------------------------------- configs
def _stage_classes():
    from rlhfkit.policy.dpo import DPOConfig
    from rlhfkit.policy.ppo import PPOConfig
    from rlhfkit.policy.sft import SFTConfig
    from rlhfkit.reward.train import RewardConfig

    return [SFTConfig, RewardConfig, DPOConfig, PPOConfig]


FLAG_NAMES = ["--learning-rate", "--max-steps", "--seed", "--lora.r", "--lora.dropout", "--adam-beta1", "--beta",
              "--kl-coef", "--advantage", "--report-to", "--data-fields", "--resume", "--no-resume", "--precision",
              "--warmup-steps", "--lora.target-modules", "--unknown-thing", "--batch-size", "--temperature",
              "--center-eta", "--loss", "--config", "--model", "--data", "--output-dir", "--chat", "--whiten"]
flag_values = st.one_of(st.sampled_from(["nan", "inf", "-1", "0", "1e-300", "2e70", str(2**70), "true", "none",
                                         "a=b,c", "=", "[1, 2", "{x: 1}", "grpo", "bf16", "", "k3", "ipo"]),
                        st.text(max_size=10))
argvs = st.lists(st.one_of(st.sampled_from(FLAG_NAMES), flag_values), max_size=8)


@settings_
@given(argvs, st.integers(0, 3))
def test_config_parser_parses_or_names_the_flag(argv, which):
    from rlhfkit.config import parse_args

    cls = _stage_classes()[which]
    try:
        cfg = parse_args(cls, ["--model", "m", "--data", "d", "--output-dir", "o", *argv], prog="rlhfkit x")
        cfg.validate()
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), str(exc)
    except SystemExit:  # --help
        pass


yaml_docs = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(
        ["learning_rate", "max_steps", "lora", "r", "dropout", "beta", "data_fields", "report_to", "seed", "x",
         "target_modules", "kl_coef", "advantage"]), inner, max_size=4)), max_leaves=10)


@settings_
@given(yaml_docs, st.integers(0, 3))
def test_yaml_configs_parse_or_name_the_key(doc, which):
    import yaml

    from rlhfkit.config import parse_args

    fh = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    with fh:
        fh.write(yaml.safe_dump(doc))
    try:
        cfg = parse_args(_stage_classes()[which], ["--config", fh.name, "--model", "m", "--data", "d",
                                                   "--output-dir", "o"], prog="rlhfkit x")
        cfg.validate()
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), str(exc)
    finally:
        Path(fh.name).unlink(missing_ok=True)
