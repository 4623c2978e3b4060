"""Packed (padding-free) batches give every sequence exactly the numbers its padded batch gives, on each family
and under both attention kernels a user may load (sdpa, the default, and eager)."""

from __future__ import annotations

import pytest
import torch

from realistic.families import FAMILIES


def _model(path, tokenizer, impl):
    from transformers import AutoModelForCausalLM

    from rlhfkit.models import disable_dropout

    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation=impl)
    model.resize_token_embeddings(len(tokenizer))
    disable_dropout(model)
    return model.eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", FAMILIES)
def test_sft_packed_batch_equals_padded(family_dir, family_data, name, impl):
    from rlhfkit.data.sft import read_sft_examples
    from rlhfkit.models import load_tokenizer
    from rlhfkit.policy.sft import collate_padding_free, collate_sft, token_nll

    family = family_dir(name)
    tok = load_tokenizer(str(family.path))
    fmt = family.formats[-1]
    examples, _ = read_sft_examples(str(family_data(family).path("sft", fmt)), tok, max_length=512)
    examples = sorted(examples, key=lambda e: len(e.input_ids))
    examples = examples[:7] + examples[-1:]  # short ones that fit beside the longest
    model = _model(family.path, tok, impl)
    packed = collate_padding_free(examples, tok.pad_token_id)
    padded = collate_sft(examples, tok.pad_token_id)
    assert packed["input_ids"].shape[0] < len(examples)  # really packed
    with torch.no_grad():
        _, a = token_nll(model, packed)
        _, b = token_nll(model, padded)
    assert int(a.num_tokens) == int(b.num_tokens)
    assert float(a.nll_sum) == pytest.approx(float(b.nll_sum), rel=1e-4)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", FAMILIES)
def test_reward_packed_batch_equals_padded(family_dir, family_data, name, impl):
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.data.collate import collate_pairs
    from rlhfkit.data.preference import read_preferences
    from rlhfkit.data.preference_tokens import tokenize_preferences
    from rlhfkit.models import load_tokenizer
    from rlhfkit.reward.model import sequence_scores

    family = family_dir(name)
    tok = load_tokenizer(str(family.path))
    fmt = family.formats[-1]
    pairs, _ = tokenize_preferences(tok, read_preferences(str(family_data(family).path("preferences", fmt))), 512)
    pairs = sorted(pairs, key=lambda p: len(p.chosen_input_ids) + len(p.rejected_input_ids))
    pairs = pairs[:5] + pairs[-1:]  # short ones that fit beside the longest
    model = AutoModelForSequenceClassification.from_pretrained(str(family.path), num_labels=1,
                                                               attn_implementation=impl)
    model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    model.eval()
    scores = []
    for padding_free, share_prompt in ((True, False), (False, False), (True, True)):
        batch = collate_pairs(pairs, tok.pad_token_id, padding_free=padding_free, share_prompt=share_prompt)
        if padding_free:
            assert batch["input_ids"].shape[0] < 2 * len(pairs)
        with torch.no_grad():
            scores.append(sequence_scores(model, batch["input_ids"], batch["attention_mask"], batch["last_index"],
                                          batch.get("position_ids"), batch.get("row_index")))
    assert scores[0] == pytest.approx(scores[1], abs=1e-4)
    assert scores[2] == pytest.approx(scores[1], abs=1e-4)  # each pair's prompt laid out once, shared


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", FAMILIES)
def test_pair_logprobs_with_a_shared_prompt_equal_padded(family_dir, family_data, name, impl):
    """DPO's sequence log-probs with each pair's prompt laid out once for both responses (the default) equal
    those of the padded and the packed layouts, on each family's own tokenizer and chat template."""
    from rlhfkit.data.collate import collate_pairs
    from rlhfkit.data.preference import read_preferences
    from rlhfkit.data.preference_tokens import tokenize_preferences
    from rlhfkit.models import load_tokenizer
    from rlhfkit.policy.reference import sequence_logprobs

    family = family_dir(name)
    tok = load_tokenizer(str(family.path))
    pairs, _ = tokenize_preferences(tok, read_preferences(str(family_data(family).path("preferences",
                                                                                        family.formats[-1]))), 512)
    pairs = sorted(pairs, key=lambda p: len(p.chosen_input_ids) + len(p.rejected_input_ids))
    pairs = pairs[:5] + pairs[-1:]
    model = _model(family.path, tok, impl)
    out = []
    for padding_free, share_prompt in ((False, False), (True, False), (True, True)):
        batch = collate_pairs(pairs, tok.pad_token_id, padding_free=padding_free, share_prompt=share_prompt)
        with torch.no_grad():
            out.append(sequence_logprobs(model, batch))
    for logps, lengths in out[1:]:
        assert torch.equal(lengths, out[0][1])
        torch.testing.assert_close(logps, out[0][0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_dropout_is_off_in_training_mode(tmp_path, family_dir, name):
    """Some checkpoints ship attention dropout (GPT-2: 0.1 everywhere, its real default); rlhfkit switches every
    kind off, so two training-mode forward passes agree (PPO's ratio and KL rely on it)."""
    import json
    import shutil

    from rlhfkit.models import load_causal_lm, load_tokenizer

    src = family_dir(name).path
    path = tmp_path / name
    shutil.copytree(src, path)
    config = json.loads((path / "config.json").read_text())
    for key in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop"):
        if key in config:
            config[key] = 0.1
    (path / "config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(path))
    model = load_causal_lm(str(path), tok).train()
    ids = torch.tensor([tok("Question: What is 13 + 29?\nAnswer: 42, Ada!")["input_ids"]])
    torch.manual_seed(0)
    first = model(input_ids=ids).logits
    second = model(input_ids=ids).logits
    assert torch.equal(first, second)
