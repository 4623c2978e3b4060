import pytest
import torch

from rlhfkit.data.collate import collate_packed, collate_sft, pack_examples
from rlhfkit.data.sft import read_sft_examples
from rlhfkit.errors import DataError
from rlhfkit.models import build_llama, load_tokenizer, logprobs_of
from helpers import write_jsonl


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(str(tiny_model))


def test_prompt_completion_masks_only_completion_and_eos(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "what is 2 plus 3 ?", "completion": "5 , ada !"}])
    [ex], report = read_sft_examples(str(path), tok, 64)
    prompt_ids = tok("what is 2 plus 3 ?")["input_ids"]
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids
    assert ex.input_ids[-1] == tok.eos_token_id
    assert ex.loss_mask == [0] * len(prompt_ids) + [1] * (len(ex.input_ids) - len(prompt_ids))
    assert tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m], skip_special_tokens=True) == "5, ada!"
    assert report.rows == 1 and report.truncated == 0


def test_messages_mask_every_assistant_turn_through_its_eos(tmp_path, tok):
    msgs = [{"role": "user", "content": "say hi to ada ."}, {"role": "assistant", "content": "hi ada ."},
            {"role": "user", "content": "and bo ?"}, {"role": "assistant", "content": "hi bo ."}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    [ex], _ = read_sft_examples(str(path), tok, 64)
    learned = tok.convert_ids_to_tokens([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert learned == ["hi", "ada", ".", "</s>", "hi", "bo", ".", "</s>"]
    # the template is applied once: exactly one user marker per user turn
    assert tok.convert_ids_to_tokens(ex.input_ids).count("<|user|>") == 2


def test_conversational_prompt_completion_trains_on_completion_only(tmp_path, tok):
    row = {"prompt": [{"role": "user", "content": "say hi to ada ."}],
           "completion": [{"role": "assistant", "content": "hi ada ."}]}
    [ex], _ = read_sft_examples(str(write_jsonl(tmp_path / "d.jsonl", [row])), tok, 64)
    learned = tok.convert_ids_to_tokens([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert learned == ["hi", "ada", ".", "</s>"]


@pytest.mark.parametrize("row,field,reason", [
    ({"prompt": "hi"}, "completion", "missing"),
    ({"prompt": "hi", "completion": 3}, "completion", "must be a string"),
    ({"prompt": "hi", "completion": "  "}, "completion", "is empty"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant message"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "unknown role"),
    ({"question": "hi"}, "prompt", "missing"),
])
def test_bad_rows_name_file_row_field(tmp_path, tok, row, field, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "completion": "fine"}, row])
    with pytest.raises(DataError) as err:
        read_sft_examples(str(path), tok, 64)
    assert (err.value.row, err.value.field) == (2, field)
    assert reason in err.value.reason and str(path) in str(err.value)


def test_overlong_rows_error_by_default_and_truncate_reports(tmp_path, tok):
    rows = [{"prompt": "hi", "completion": "ada " * 3}, {"prompt": "hi", "completion": "ada " * 30}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match="row 2: is 33 tokens, longer than max_length 16"):
        read_sft_examples(str(path), tok, 16)
    examples, report = read_sft_examples(str(path), tok, 16, overlong="truncate")
    assert len(examples) == 2  # nothing dropped
    assert report.truncated == 1 and report.truncated_rows == [2] and len(examples[1].input_ids) == 16


def test_row_with_no_completion_left_after_truncation_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ada " * 20, "completion": "bo"}])
    with pytest.raises(DataError, match="no completion tokens within max_length"):
        read_sft_examples(str(path), tok, 8, overlong="truncate")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_the_same_loss_terms_as_separate_rows(tmp_path, tok, attn):
    """Under eager attention too: transformers adds a 4-D mask to the scores there, so a boolean block-diagonal
    mask let packed examples see each other."""
    from helpers import sft_rows

    path = write_jsonl(tmp_path / "d.jsonl", sft_rows(6))
    examples, _ = read_sft_examples(str(path), tok, 64)
    rows = pack_examples(examples, 40)
    assert len(rows) < len(examples)
    assert sorted(e.row for r in rows for e in r.examples) == [e.row for e in examples]  # none lost
    model = build_llama(tok, hidden_size=32, num_layers=2, num_heads=4, max_positions=128).eval()
    model.set_attn_implementation(attn)
    packed = collate_packed(rows, tok.pad_token_id)
    plain = collate_sft(examples, tok.pad_token_id)
    with torch.no_grad():
        lp_packed = logprobs_of(model, packed["input_ids"], packed["attention_mask"], position_ids=packed["position_ids"])
        lp_plain = logprobs_of(model, plain["input_ids"], plain["attention_mask"])
    packed_terms = lp_packed[packed["loss_mask"][:, 1:].bool()]
    plain_terms = lp_plain[plain["loss_mask"][:, 1:].bool()]
    # the same targets in a different order: compare sorted values
    torch.testing.assert_close(packed_terms.sort().values, plain_terms.sort().values, rtol=1e-5, atol=1e-5)
