"""The field checks the SFT, preference and KTO readers share (`data.rows`): a bad field gets the same error,
naming file, row and field, whichever reader meets it."""

from types import SimpleNamespace

import pytest

from rlhfkit.data.kto import parse_kto_row
from rlhfkit.data.preference import parse_preference
from rlhfkit.data.sft import encode_row
from rlhfkit.errors import DataError

NO_TOKENIZER = SimpleNamespace(eos_token_id=2)  # every check below fails before anything is tokenised


def read_sft(row):
    return encode_row(NO_TOKENIZER, row, "d.jsonl", 4)


READERS = {
    "sft": (read_sft, {"completion": "fine ."}),
    "preference": (lambda row: parse_preference(row, "d.jsonl", 4), {"chosen": "a .", "rejected": "b ."}),
    "kto": (lambda row: parse_kto_row(row, "d.jsonl", 4), {"completion": "fine .", "label": True}),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("prompt,field,reason", [
    ("  ", "prompt", "is empty"),
    (3, "prompt", "must be a string, got int"),
    ([], "prompt", "must be a non-empty list of {role, content} messages"),
    ([{"role": "robot", "content": "hi"}], "prompt[0].role", "unknown role 'robot'; use one of"),
    ([{"role": "user", "content": " "}], "prompt[0].content", "must be a non-empty string"),
    ([{"role": "user"}], "prompt[0]", "each message must be an object with 'role' and 'content'"),
])
def test_a_bad_prompt_reads_the_same_in_every_reader(reader, prompt, field, reason):
    read, rest = READERS[reader]
    with pytest.raises(DataError) as err:
        read({"prompt": prompt, **rest})
    assert (err.value.path, err.value.row, err.value.field) == ("d.jsonl", 4, field)
    assert err.value.reason.startswith(reason)


@pytest.mark.parametrize("reader", READERS)
def test_a_message_response_to_a_message_prompt_must_open_with_the_assistant(reader):
    read, rest = READERS[reader]
    key = "chosen" if reader == "preference" else "completion"
    row = {**rest, "prompt": [{"role": "user", "content": "hi ."}], key: [{"role": "user", "content": "yo ."}]}
    if reader == "preference":
        row["rejected"] = [{"role": "assistant", "content": "no ."}]
    with pytest.raises(DataError) as err:
        read(row)
    assert err.value.field == f"{key}[0].role"
    assert err.value.reason.endswith("starts with an assistant message")


def test_optional_text_fields_are_non_empty_strings_when_given():
    row = {"prompt": "hi", "chosen": "a .", "rejected": "b .", "annotator": " "}
    with pytest.raises(DataError) as err:
        parse_preference(row, "d.jsonl", 4)
    assert err.value.field == "annotator" and "must be a non-empty string when given" in err.value.reason
    assert parse_preference({**row, "annotator": "ann-1"}, "d.jsonl", 4).annotator == "ann-1"
