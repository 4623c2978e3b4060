"""One prompt, one set of ids: with a real byte-level BPE tokenizer and a real chat template, a prompt becomes the
same ids in SFT, reward/DPO and KTO data, in sampling and in the server, and every stage's response ends at the
family's EOS (ChatML writes a newline after `<|im_end|>`; Llama 3 trims content)."""

from __future__ import annotations

import pytest

from realistic.families import FAMILIES, SPECS

CASES = [(name, fmt) for name in FAMILIES for fmt in (("text", "messages") if SPECS[name].chat_template else ("text",))]
CASE_IDS = [f"{n}-{f}" for n, f in CASES]


@pytest.fixture(scope="module")
def engines(family_dir):
    """The server's engine per family (it encodes prompts for /v1/completions and /v1/chat/completions)."""
    from rlhfkit.serve import Engine

    made = {}

    def get(name):
        if name not in made:
            made[name] = Engine(str(family_dir(name).path), name="policy", device="cpu")
        return made[name]

    return get


def _pairs(family_dir, family_data, name, fmt, n=8):
    from rlhfkit.data.preference import read_preferences
    from rlhfkit.models import load_tokenizer

    family = family_dir(name)
    tok = load_tokenizer(str(family.path))
    return tok, read_preferences(str(family_data(family).path("preferences", fmt)))[:n]


def _content(response):
    return response if isinstance(response, str) else response[0]["content"]


@pytest.mark.parametrize("name, fmt", CASES, ids=CASE_IDS)
def test_a_prompt_is_the_same_ids_in_every_stage(family_dir, family_data, engines, name, fmt):
    from rlhfkit.data.kto import KTOExample, tokenize_kto
    from rlhfkit.data.collate import encode_responses
    from rlhfkit.data.preference_tokens import tokenize_pair
    from rlhfkit.data.sft import encode_row
    from rlhfkit.generation import encode_prompts

    tok, pairs = _pairs(family_dir, family_data, name, fmt)
    engine = engines(name)
    for pair in pairs:
        reference = tokenize_pair(tok, pair, 512).prompt_ids
        ids, mask = encode_row(tok, {"prompt": pair.prompt, "completion": pair.chosen}, "<test>", 1)
        sft_prompt = ids[: mask.index(1)]
        kto_prompt = tokenize_kto(tok, [KTOExample(pair.prompt, pair.chosen, True)], 512)[0][0].prompt_ids
        sampled, sampled_mask = encode_prompts(tok, [pair.prompt])
        sampled = sampled[0][sampled_mask[0].bool()].tolist()
        scored = encode_responses(tok, pair.prompt, [pair.chosen], 512)["input_ids"][0].tolist()[: len(reference)]
        served = engine.encode_text(pair.prompt)[0] if isinstance(pair.prompt, str) else engine.encode_chat(pair.prompt)
        assert sft_prompt == reference, "SFT"
        assert kto_prompt == reference, "KTO"
        assert sampled == reference, "sampling (PPO, best-of-n, online DPO)"
        assert scored == reference, "reward scoring"
        assert served == reference, "serve"
        if isinstance(pair.prompt, str):  # plain text: the tokenizer's own encoding, never a chat template
            assert reference == tok(pair.prompt)["input_ids"]
        else:
            rendered = tok.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
            assert reference == tok(rendered, add_special_tokens=False)["input_ids"]
            if SPECS[name].bos_token:
                assert reference.count(tok.bos_token_id) == 1 and reference[0] == tok.bos_token_id


@pytest.mark.parametrize("name, fmt", CASES, ids=CASE_IDS)
def test_every_stage_ends_a_response_at_eos(family_dir, family_data, name, fmt):
    """The response is its content's tokens then EOS, nothing after: what the reward model is trained and read
    at, what DPO/KTO sum over, what SFT teaches, and where PPO's rollouts stop."""
    from rlhfkit.data.kto import KTOExample, tokenize_kto
    from rlhfkit.data.collate import encode_responses
    from rlhfkit.data.preference_tokens import tokenize_pair
    from rlhfkit.data.sft import encode_row

    tok, pairs = _pairs(family_dir, family_data, name, fmt)
    eos = tok.eos_token_id
    for pair in pairs:
        tp = tokenize_pair(tok, pair, 512)
        P = len(tp.prompt_ids)
        for full, mask, text in ((tp.chosen_input_ids, tp.chosen_response_mask, pair.chosen),
                                 (tp.rejected_input_ids, tp.rejected_response_mask, pair.rejected)):
            response = full[P:]
            assert response[-1] == eos and response.count(eos) == 1, tok.convert_ids_to_tokens(response)
            assert mask == [0] * P + [1] * len(response)
            expected = _content(text) if SPECS[name].name != "llama3" or fmt == "text" else _content(text).strip()
            assert tok.decode(response[:-1]) == expected
        batch = encode_responses(tok, pair.prompt, [pair.chosen, pair.rejected], 512)
        read_at = batch["input_ids"][range(2), batch["last_index"]]
        assert read_at.tolist() == [eos, eos]  # the reward is read at EOS
        ids, loss_mask = encode_row(tok, {"prompt": pair.prompt, "completion": pair.chosen}, "<test>", 1)
        assert ids == tp.chosen_input_ids and loss_mask == tp.chosen_response_mask  # SFT learns exactly that
        (kto,), _ = tokenize_kto(tok, [KTOExample(pair.prompt, pair.chosen, True)], 512)
        assert kto.input_ids == tp.chosen_input_ids


@pytest.mark.parametrize("name", [n for n in FAMILIES if SPECS[n].chat_template])
def test_sft_conversation_targets_are_the_assistant_turns(family_dir, family_data, name):
    """In a multi-turn `messages` row every assistant turn is learned through its EOS, and nothing else is:
    not the template's headers, not the user's text, not what the template writes after EOS."""
    from rlhfkit.data.sft import encode_row
    from rlhfkit.models import load_tokenizer

    tok = load_tokenizer(str(family_dir(name).path))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello to Bo, please."},
                {"role": "assistant", "content": "Hello, Bo!"}, {"role": "user", "content": "And to Ada?"},
                {"role": "assistant", "content": "Hello, Ada! Nice to meet you."}]
    ids, mask = encode_row(tok, {"messages": messages}, "<test>", 1)
    eos = tok.eos_token_id
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [tok.decode(r, skip_special_tokens=True) for r in runs] == ["Hello, Bo!", "Hello, Ada! Nice to meet you."]
    assert all(r[-1] == eos and r.count(eos) == 1 for r in runs)
    assert ids[-1] == eos  # the text the template writes after the final EOS is not kept
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ids) == rendered.rstrip("\n")
