import torch

from rlhfkit.models import load_causal_lm, load_tokenizer, logprobs_of
from rlhfkit.data.encoding import render_prompt, user_turn
from rlhfkit.generation import encode_prompts, sample


def test_prompts_are_left_padded_message_lists_through_the_chat_template_strings_as_plain_text(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    ids, mask = encode_prompts(tok, [user_turn("say hi to ada ."), user_turn("what is 2 plus 3 ?"), "hi bo ."])
    assert tok.padding_side == "right"  # untouched
    assert (mask[:, -1] == 1).all() and mask[0, 0] == 0  # left padding: real tokens end at the last column
    assert render_prompt(tok, user_turn("hi")) == "<|user|> hi </s> <|assistant|> "
    first = tok.convert_ids_to_tokens(ids[1][mask[1].bool()])
    assert first[0] == "<|user|>" and first[-1] == "<|assistant|>"
    # a string is never templated implicitly: plain text with the tokenizer's BOS, as SFT and reward data encode it
    assert tok.convert_ids_to_tokens(ids[2][mask[2].bool()]) == ["<s>", "hi", "bo", "."]


def test_sample_masks_after_eos_and_greedy_matches_argmax(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    model = load_causal_lm(str(tiny_model), tok)
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = 3.0  # make EOS likely enough that both ended and unended rows occur
    hook = model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    torch.manual_seed(0)
    out = sample(model, tok, ["say hi to ada .", "what is 2 plus 3 ?"] * 4, max_new_tokens=6, temperature=1.0)
    assert out.response_ids.shape[0] == 8 and out.response_mask.shape == out.response_ids.shape
    for row, m, ended in zip(out.response_ids, out.response_mask, out.ended):
        n = int(m.sum())
        if ended:
            assert row[n - 1] == tok.eos_token_id and (row[:n - 1] != tok.eos_token_id).all()
        else:
            assert n == out.response_ids.shape[1]
        assert (row[n:] == tok.pad_token_id).all()
    assert out.ended.any() and not out.ended.all()
    hook.remove()
    greedy = sample(model, tok, ["say hi to ada ."], max_new_tokens=3, temperature=0)
    full = torch.cat([greedy.prompt_ids, greedy.response_ids], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full).logits
    P = greedy.prompt_ids.shape[1]
    for t in range(int(greedy.response_mask.sum())):
        assert logits[0, P - 1 + t].argmax() == greedy.response_ids[0, t]
    lp = logprobs_of(model, full, torch.ones_like(full))
    assert torch.isfinite(lp).all()
