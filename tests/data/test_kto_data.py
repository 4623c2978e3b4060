import pytest
import torch

from rlhfkit.data.collate import collate_completions
from rlhfkit.data.kto import (
    KTOExample,
    TokenizedCompletion,
    kl_partners,
    mismatched,
    read_kto_records,
    tokenize_kto,
    unpair,
)
from rlhfkit.data.preference import PreferencePair, Ranking
from rlhfkit.errors import DataError
from rlhfkit.models import load_tokenizer
from helpers import write_jsonl

USER = [{"role": "user", "content": "say hi to ada ."}]
HI_ADA = [{"role": "assistant", "content": "hi ada ."}]


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(str(tiny_model))


def test_unpaired_standard_and_conversational_rows_and_paired_rows_in_one_file(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [
        {"prompt": "what is 2 plus 3 ?", "completion": "5 .", "label": True},
        {"prompt": USER, "completion": HI_ADA, "label": False},
        {"prompt": "hi", "chosen": "hi ada", "rejected": "hi bo"},
        {"prompt": "hi", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
    ])
    records = read_kto_records(str(path))
    assert records[0] == KTOExample("what is 2 plus 3 ?", "5 .", True) and records[0].row == 1
    assert records[1] == KTOExample(USER, HI_ADA, False)
    assert isinstance(records[2], PreferencePair) and isinstance(records[3], Ranking)
    examples = unpair(records)
    # a pair gives one desirable and one undesirable example; a 3-way ranking gives 3 pairs, so 6 examples
    assert [(e.completion, e.desirable) for e in examples[2:4]] == [("hi ada", True), ("hi bo", False)]
    assert [(e.completion, e.desirable) for e in examples[4:]] == [
        ("c", True), ("a", False), ("c", True), ("b", False), ("a", True), ("b", False)]
    assert all(e.row == 4 for e in examples[4:])


@pytest.mark.parametrize("row,field,reason", [
    ({"prompt": "hi", "completion": "yo"}, "label", "missing"),
    ({"prompt": "hi", "completion": "yo", "label": 2}, "label", "true (desirable) or false"),
    ({"prompt": "hi", "label": True}, "completion", "missing"),
    ({"prompt": "hi", "completion": " ", "label": True}, "completion", "is empty"),
    ({"completion": "yo", "label": True}, "prompt", "missing"),
    ({"prompt": "hi", "completion": HI_ADA, "label": True}, "completion", "must be a string like the prompt"),
    ({"prompt": USER, "completion": [{"role": "user", "content": "x"}], "label": True}, "completion[0].role",
     "starts with an assistant message"),
    ({"prompt": "hi", "chosen": "a"}, "rejected", "missing"),
])
def test_bad_rows_name_file_row_field_and_reason(tmp_path, row, field, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "completion": "yes", "label": True}, row])
    with pytest.raises(DataError) as err:
        read_kto_records(str(path))
    assert (err.value.path, err.value.row, err.value.field) == (str(path), 2, field)
    assert reason in err.value.reason


def test_tokenize_marks_the_completion_and_applies_the_overlong_policy(tok):
    ex = KTOExample("what is 2 plus 3 ?", "2 plus 3 is 5 .", True, row=7, path="f.jsonl")
    [t], report = tokenize_kto(tok, [ex], max_length=64)
    assert t.prompt_ids == tok("what is 2 plus 3 ?")["input_ids"]  # with BOS, like a preference prompt
    assert t.response_ids == tok("2 plus 3 is 5 .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert t.response_mask == [0] * len(t.prompt_ids) + [1] * len(t.response_ids) and t.desirable
    assert (report.desirable, report.undesirable, report.truncated) == (1, 0, 0)
    limit = len(t.prompt_ids) + 2
    with pytest.raises(DataError, match=r"f.jsonl, row 7: .*> max_length"):
        tokenize_kto(tok, [ex], max_length=limit)
    [cut], report = tokenize_kto(tok, [ex], max_length=limit, overlong="truncate")
    assert cut.response_ids == t.response_ids[:2] and report.truncated_rows == [7]


def test_kl_partners_are_a_fixed_derangement():
    for n in (2, 3, 10):
        partner = kl_partners(n, seed=3)
        assert sorted(partner) == list(range(n))  # every completion is used once
        assert all(partner[i] != i for i in range(n))  # never an example's own completion
        assert partner == kl_partners(n, seed=3)  # fixed before training: a cached reference stays valid
    assert kl_partners(10, seed=3) != kl_partners(10, seed=4)
    assert kl_partners(1, seed=0) == [0] and kl_partners(0, seed=0) == []


def test_mismatched_pairs_put_the_partners_completion_after_the_own_prompt():
    a = TokenizedCompletion([1, 2], [10, 11, 12, 3], True)
    b = TokenizedCompletion([4, 5, 6], [20, 3], False)
    mm = mismatched([a, b], [1, 0], max_length=6)
    assert (mm[0].prompt_ids, mm[0].response_ids, mm[0].truncated) == ([1, 2], [20, 3], False)
    assert (mm[1].prompt_ids, mm[1].response_ids, mm[1].truncated) == ([4, 5, 6], [10, 11, 12], True)  # 6 tokens


def test_collate_right_pads_and_carries_the_labels():
    a = TokenizedCompletion([1, 2], [10, 3], True)
    b = TokenizedCompletion([4], [20, 21, 22, 3], False)
    batch = collate_completions([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 10, 3, 0], [4, 20, 21, 22, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert batch["desirable"].tolist() == [True, False] and batch["desirable"].dtype == torch.bool
