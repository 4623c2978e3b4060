"""The family fixtures themselves: real byte-level BPE tokenizers, the families' chat conventions, directories that
plain transformers loads, and what rlhfkit's loaders make of them."""

import json

import pytest
import torch

from realistic.families import FAMILIES, QWEN_SYSTEM, SPECS, build_model, build_tokenizer, train_tokenizer

TEXTS = [
    "Hello, world!",
    "Question: What is 13 + 29?\nAnswer: 42.",
    "Sure:\n- apples\n- pears\n\n  indented   spaces\tand a tab",
    "Unicode too: café, naïve, 東京, emoji ☕.",
    "She said, \"It's fine.\" He'd left...",
]
CHAT = [{"role": "user", "content": "Say hello to Bo, please."}, {"role": "assistant", "content": "Hello, Bo!"}]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_text(family, text):
    tok = family.tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids or tok.unk_token == tok.eos_token  # byte-level: nothing is unknown


def test_tokenizer_is_byte_level_bpe_with_merges(family):
    tok = family.tokenizer()
    state = json.loads(tok.backend_tokenizer.to_str())
    assert state["model"]["type"] == "BPE" and len(state["model"]["merges"]) >= 200
    assert tok.convert_ids_to_tokens(tok(" the", add_special_tokens=False)["input_ids"]) == ["Ġthe"]
    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    # a merge across a boundary: the space ending one text and the word starting the next become one token
    # when encoded together, two when encoded apart (what a prompt/response split can do)
    joint, apart = ids("Say hello to Ada"), ids("Say hello to ") + ids("Ada")
    assert tok.convert_ids_to_tokens(joint)[-1] == "ĠAda" and len(apart) == len(joint) + 1


def test_building_is_deterministic(family):
    spec = SPECS[family.name]
    assert train_tokenizer(spec, seed=0).to_str() == train_tokenizer(spec, seed=0).to_str()
    tok = build_tokenizer(spec)
    a, b = build_model(spec, tok, seed=0).state_dict(), build_model(spec, tok, seed=0).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_saved_directory_loads_with_plain_transformers(family):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(family.path))
    model = AutoModelForCausalLM.from_pretrained(str(family.path))
    assert type(model).__name__ == family.spec.architecture
    assert model.config.vocab_size == len(tok)
    assert AutoConfig.from_pretrained(str(family.path)).eos_token_id == tok.eos_token_id
    assert tok.eos_token == family.spec.eos_token
    saved = json.loads((family.path / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == family.spec.tokenizer_class
    ids = tok("Hello, world!", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_qwen2_chatml_conventions(family_dir):
    tok = family_dir("qwen2").tokenizer()
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == (f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n"
                    "<|im_start|>user\nSay hello to Bo, please.<|im_end|>\n"
                    "<|im_start|>assistant\nHello, Bo!<|im_end|>\n")
    with_system = [{"role": "system", "content": "Be brief."}] + CHAT[:1]
    prompt = tok.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hello to Bo, please.<|im_end|>\n"
                      "<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # no BOS
    assert ids.count(tok.eos_token_id) == 3 and ids[-2] == tok.eos_token_id  # each turn ends <|im_end|> then \n
    assert tok.convert_ids_to_tokens(ids[-1]) == "Ċ"
    assert tok("plain text")["input_ids"] == tok("plain text", add_special_tokens=False)["input_ids"]


def test_llama3_conventions(family_dir):
    tok = family_dir("llama3").tokenizer()
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|eot_id|>", None)
    padded = [{"role": "user", "content": "  Say hello to Bo, please.\n"}, CHAT[1]]
    text = tok.apply_chat_template(padded, tokenize=False, add_generation_prompt=False)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nSay hello to Bo, please.<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nHello, Bo!<|eot_id|>")
    prompt = tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert prompt.count("<|begin_of_text|>") == 1
    ids = tok("plain text")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1:] == tok("plain text", add_special_tokens=False)["input_ids"]
    assert tok(text, add_special_tokens=False)["input_ids"].count(tok.bos_token_id) == 1


def test_gpt2_is_a_base_model(family_dir):
    tok = family_dir("gpt2").tokenizer()
    assert getattr(tok, "chat_template", None) is None
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token is None
    assert tok("plain text")["input_ids"] == tok("plain text", add_special_tokens=False)["input_ids"]  # no BOS added


def test_rlhfkit_load_tokenizer_gives_a_pad_distinct_from_eos(family):
    from rlhfkit.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(family.path))
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    if family.spec.pad_token:
        assert tok.pad_token == family.spec.pad_token  # a real distinct pad is kept, not replaced
    else:
        assert len(tok) == len(family.tokenizer()) + 1  # one token added
    model = load_causal_lm(str(family.path), tok)
    assert model.get_input_embeddings().num_embeddings >= len(tok)
    assert model.config.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("name", [n for n in FAMILIES if SPECS[n].chat_template])
def test_templates_are_prefix_stable(family_dir, name):
    """Rendering the first turns is a prefix of rendering all of them, which rlhfkit relies on to find turns."""
    tok = family_dir(name).tokenizer()
    convo = [{"role": "system", "content": "Be brief."}] + CHAT + [{"role": "user", "content": "Again?"},
                                                                   {"role": "assistant", "content": "Hello again."}]
    full = tok.apply_chat_template(convo, tokenize=False)
    for i in range(1, len(convo)):
        assert full.startswith(tok.apply_chat_template(convo[:i], tokenize=False))
        if convo[i]["role"] == "assistant":
            assert full.startswith(tok.apply_chat_template(convo[:i], tokenize=False, add_generation_prompt=True))


def test_data_files_read_with_rlhfkit_readers(family, family_data):
    from rlhfkit.data.kto import read_kto_records
    from rlhfkit.data.preference import read_preferences
    from rlhfkit.data.readers import read_prompts
    from rlhfkit.data.sft import read_sft_examples
    from rlhfkit.models import load_tokenizer

    data = family_data(family)
    tok = load_tokenizer(str(family.path))
    for fmt in family.formats:
        examples, _ = read_sft_examples(str(data.path("sft", fmt)), tok, max_length=512)
        assert len(examples) == 32 and all(0 < sum(e.loss_mask) < len(e.input_ids) for e in examples)
        pairs = read_preferences(str(data.path("preferences", fmt)))
        assert len(pairs) == 32 and all(p.conversational == (fmt == "messages") for p in pairs)
        assert len(read_kto_records(str(data.path("kto", fmt)))) == 32
        prompts = read_prompts(str(data.path("prompts", fmt)))
        assert len(prompts) == 12 and all(isinstance(p, str if fmt == "text" else list) for p in prompts)
    texts = (data.path("sft", "text").read_text())
    assert "\\n" in texts and "," in texts and ": " in texts  # newlines, punctuation, spaces
