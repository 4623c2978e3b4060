"""The tokenise rule on real byte-level BPE tokenizers and the families' chat conventions, for string and message
prompts: the same prompt and response become the same ids in every stage; a response ends at its first EOS, so
the reward is read at the same token in reward training and in PPO; sampler log-probs equal training log-probs."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.data.collate import encode_responses
from rlhfkit.data.encoding import encode_prompt, user_turn
from rlhfkit.data.kto import KTOExample, tokenize_kto
from rlhfkit.data.preference import PreferencePair
from rlhfkit.data.preference_tokens import tokenize_pair
from rlhfkit.data.sft import encode_row
from rlhfkit.models import load_causal_lm, load_tokenizer, logprobs_of
from rlhfkit.generation import encode_prompts, sample

PROMPT_TEXT = "Question: What is 3 + 4?\nAnswer:"
CHOSEN, REJECTED = " 3 + 4 = 7, Ada.", " It is 8, I think."
CHAT = [{"role": "user", "content": "What is 3 + 4? Say it briefly."}]
CHAT_SYSTEM = [{"role": "system", "content": "You answer in one line."}, *CHAT]


def cases(family):
    """(name, prompt, chosen, rejected) in every format the family takes."""
    out = [("text", PROMPT_TEXT, CHOSEN, REJECTED)]
    if family.has_template:
        assistant = lambda t: [{"role": "assistant", "content": t.strip()}]  # noqa: E731
        out += [("messages", CHAT, assistant(CHOSEN), assistant(REJECTED)),
                ("messages+system", CHAT_SYSTEM, assistant(CHOSEN), assistant(REJECTED))]
    return out


def test_a_prompt_and_response_become_the_same_ids_in_every_stage(family):
    tok = load_tokenizer(str(family.path))
    eos = tok.eos_token_id
    for name, prompt, chosen, rejected in cases(family):
        prompt_ids = encode_prompt(tok, prompt)
        # sampling (PPO, best-of-n, online DPO, labelling): the left-padded batch holds exactly these ids
        ids, mask = encode_prompts(tok, [prompt, CHAT if family.has_template else "x"])
        assert ids[0][mask[0].bool()].tolist() == prompt_ids, name
        # reward / DPO pairs
        pair = tokenize_pair(tok, PreferencePair(prompt, chosen, rejected), max_length=256)
        assert pair.prompt_ids == prompt_ids, name
        response = pair.chosen_input_ids[len(prompt_ids):]
        # the response ends at its first EOS, and nothing the template writes after it (ChatML's "\n") is kept
        assert response[-1] == eos and eos not in response[:-1], (name, tok.convert_ids_to_tokens(response))
        # SFT: prompt + completion are the same ids, and the completion (through EOS) is the target
        row = {"prompt": prompt, "completion": chosen}
        sft_ids, loss_mask = encode_row(tok, row, "<test>", 1)
        assert sft_ids == pair.chosen_input_ids, name
        assert loss_mask == [0] * len(prompt_ids) + [1] * len(response), name
        if name == "messages":  # a whole `messages` conversation too
            msg_ids, msg_mask = encode_row(tok, {"messages": prompt + chosen}, "<test>", 1)
            assert (msg_ids, msg_mask) == (sft_ids, loss_mask)
        # KTO
        (kto,), _ = tokenize_kto(tok, [KTOExample(prompt, chosen, True)], max_length=256)
        assert kto.prompt_ids + kto.response_ids == pair.chosen_input_ids, name
        # scoring (score_texts, reward normalisation, best-of-n): the same ids, read at the EOS
        batch = encode_responses(tok, prompt, [chosen], max_length=256)
        assert batch["input_ids"][0].tolist() == pair.chosen_input_ids, name
        assert batch["input_ids"][0, batch["last_index"][0]] == eos


def test_chatml_reward_is_read_at_im_end_not_at_the_newline_after_it(family_dir):
    """The defect: with turns ending `<|im_end|>\\n`, training encoded the newline after EOS, so the reward model
    read its score at "\\n" while PPO, whose rollouts stop at EOS, read it at `<|im_end|>`."""
    tok = load_tokenizer(str(family_dir("qwen2").path))
    pair = tokenize_pair(tok, PreferencePair(CHAT, [{"role": "assistant", "content": "Seven."}],
                                             [{"role": "assistant", "content": "Eight."}]), max_length=256)
    assert tok.convert_ids_to_tokens(pair.chosen_input_ids[-1:]) == ["<|im_end|>"]
    # the prompt carries the default system prompt the template injects, once
    text = tok.decode(pair.prompt_ids)
    assert text.count("You are Qwen") == 1 and text.endswith("<|im_start|>assistant\n")


def test_string_prompts_are_plain_text_everywhere_message_prompts_templated(family):
    tok = load_tokenizer(str(family.path))
    plain = tok(PROMPT_TEXT, add_special_tokens=True)["input_ids"]
    assert encode_prompt(tok, PROMPT_TEXT) == plain  # never templated implicitly, whatever the tokenizer has
    if family.has_template:
        templated = encode_prompt(tok, user_turn(PROMPT_TEXT))
        assert templated != plain and tok.decode(templated).count(PROMPT_TEXT) == 1
        if family.spec.bos_token:  # the template writes BOS itself: exactly one
            assert templated.count(tok.convert_tokens_to_ids(family.spec.bos_token)) == 1


@pytest.mark.parametrize("backend", ["hf", "static"])
def test_sampler_logprobs_equal_training_logprobs_and_rollouts_end_at_eos(family, backend):
    tok = load_tokenizer(str(family.path))
    model = load_causal_lm(str(family.path), tok).eval()
    bias = torch.zeros(model.get_output_embeddings().weight.shape[0])
    bias[tok.eos_token_id] = 4.0  # a random model: make EOS likely enough that rows end
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, out: out + bias)
    prompts = [p for _, p, _, _ in cases(family)] * 3
    try:
        torch.manual_seed(0)
        out = sample(model, tok, prompts, max_new_tokens=12, temperature=0.8, backend=backend)
        ids = torch.cat([out.prompt_ids, out.response_ids], 1)
        mask = torch.cat([out.prompt_mask, out.response_mask], 1)
        with torch.no_grad():
            lp = logprobs_of(model, ids, mask, temperature=0.8)[:, out.prompt_ids.shape[1] - 1:]  # (B, R)
    finally:
        hook.remove()
    real = out.response_mask.bool()
    torch.testing.assert_close(lp[real], out.logprobs[real], rtol=1e-4, atol=1e-4)
    assert out.ended.any()
    for row, m, ended in zip(out.response_ids, out.response_mask, out.ended):
        n = int(m.sum())
        if ended:  # PPO reads the reward at the last real token: the EOS, as the reward model was trained
            assert row[n - 1] == tok.eos_token_id and (row[: n - 1] != tok.eos_token_id).all()


def test_log_probs_from_the_head_in_chunks_equal_the_full_logits_with_gradients(family, monkeypatch):
    """Each family's real layout (Qwen2 and Llama's untied or tied head, GPT-2's tied wte) takes the chunked LM
    head, and its log-probs and gradients are the full logits' on templated, padded batches."""
    import rlhfkit.models as models
    from rlhfkit.models import position_ids_from_mask, token_logprobs
    from rlhfkit.data.collate import sequence_batch

    tok = load_tokenizer(str(family.path))
    model = load_causal_lm(str(family.path), tok)
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(models, "LOGIT_CHUNK_BYTES", 4 * vocab * 5)  # 5 rows a chunk: several per batch
    rows = []
    for _, prompt, chosen, rejected in cases(family):
        for response in (chosen, rejected):
            p = encode_prompt(tok, prompt)
            rows.append(p + tok(response if isinstance(response, str) else response[0]["content"],
                                add_special_tokens=False)["input_ids"])
    batch = sequence_batch(rows, tok.pad_token_id, False)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    results = []
    for chunked in (False, True):
        model.zero_grad()
        if chunked:
            lp = logprobs_of(model, ids, mask, temperature=0.9)
        else:
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
            lp = token_logprobs(out.logits, ids, 0.9)
        lp = lp * mask[:, 1:]
        lp.sum().backward()
        results.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert models._HEAD_CHECKED.get(models.causal_lm_of(model)) is True  # the chunked path ran
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, rtol=1e-4, atol=2e-5, msg=n)


def test_chat_flag_reads_string_prompts_as_a_user_turn_in_every_stage(family_dir, tmp_path):
    """--chat: data that stores prompts as text (UltraFeedback's `prompt` column) used with a chat model; every
    reader then gives the same templated prompt ids."""
    import json

    from rlhfkit.data.readers import DataPath, read_prompts
    from rlhfkit.data.preference import read_preferences
    from rlhfkit.data.preference_tokens import tokenize_preferences
    from rlhfkit.data.sft import read_sft_examples

    tok = load_tokenizer(str(family_dir("qwen2").path))
    q = "What is 3 + 4?"
    want = encode_prompt(tok, user_turn(q))
    files = {"prefs": {"prompt": q, "chosen": "Seven.", "rejected": "Eight."},
             "sft": {"prompt": q, "completion": "Seven."}, "prompts": {"prompt": q}}
    for name, row in files.items():
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    chat = lambda name: DataPath(str(tmp_path / f"{name}.jsonl"), chat=True)  # noqa: E731
    (pair,), _ = tokenize_preferences(tok, read_preferences(chat("prefs")), 256)
    (example,), _ = read_sft_examples(chat("sft"), tok, 256)
    (prompt,) = read_prompts(chat("prompts"))
    assert pair.prompt_ids == want and example.input_ids[: len(want)] == want
    assert encode_prompt(tok, prompt) == want
    assert example.input_ids == pair.chosen_input_ids  # and the response the same ids, ending at <|im_end|>
    # without the flag the same files are plain text everywhere
    (plain,), _ = tokenize_preferences(tok, read_preferences(str(tmp_path / "prefs.jsonl")), 256)
    assert plain.prompt_ids == encode_prompt(tok, q) != want
