import json
import subprocess
import sys
import textwrap

import pytest
import torch

from rlhfkit.config import LoraConfig
from rlhfkit.errors import UserError
from rlhfkit.models import (
    build_llama, ensure_pad_token, load_causal_lm, load_tokenizer, logprobs_of, save_pretrained,
    train_word_tokenizer,
)
from helpers import corpus


def test_pad_equal_to_eos_gets_a_distinct_pad_and_embeddings_grow(tmp_path, caplog):
    tok = train_word_tokenizer(corpus())
    model = build_llama(tok, hidden_size=32, num_layers=1, num_heads=4)
    tok.pad_token = tok.eos_token  # the classic mistake
    save_pretrained(model, tok, tmp_path / "m")
    with caplog.at_level("WARNING"):
        loaded_tok = load_tokenizer(str(tmp_path / "m"))
    assert loaded_tok.pad_token_id != loaded_tok.eos_token_id
    assert "pad token equals its EOS" in caplog.text
    loaded = load_causal_lm(str(tmp_path / "m"), loaded_tok)
    assert loaded.get_input_embeddings().num_embeddings == len(loaded_tok)
    assert loaded.config.pad_token_id == loaded_tok.pad_token_id


def test_ensure_pad_token_leaves_a_good_tokenizer_alone():
    tok = train_word_tokenizer(corpus())
    before = len(tok)
    assert ensure_pad_token(tok) is False and len(tok) == before


def test_logprobs_of_matches_a_manual_log_softmax(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    model = load_causal_lm(str(tiny_model), tok).eval()
    ids = torch.tensor([tok("what is 2 plus 3 ? 5 .")["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = logprobs_of(model, ids, mask, temperature=0.7)
        logits = model(input_ids=ids).logits[:, :-1] / 0.7
        want = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_left_padding_does_not_change_logprobs(tiny_model):
    tok = load_tokenizer(str(tiny_model), padding_side="left")
    model = load_causal_lm(str(tiny_model), tok).eval()
    texts = ["say hi to ada .", "what is 2 plus 3 ? 5 , bo !"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        lp, entropy = logprobs_of(model, batch["input_ids"], batch["attention_mask"], return_entropy=True)
        alone = logprobs_of(model, *(torch.tensor([tok(texts[0])["input_ids"]]),) * 1,
                            torch.ones(1, len(tok(texts[0])["input_ids"]), dtype=torch.long))
    n = alone.shape[1]
    torch.testing.assert_close(lp[0, -n:], alone[0], rtol=1e-4, atol=1e-4)
    assert (entropy >= 0).all() and (entropy <= torch.log(torch.tensor(float(len(tok)))) + 1e-4).all()


def test_saved_model_loads_with_plain_transformers(tmp_path, tiny_model):
    tok = load_tokenizer(str(tiny_model))
    model = load_causal_lm(str(tiny_model), tok, lora=LoraConfig(enabled=True, r=4))
    with torch.no_grad():  # make the adapter non-trivial so merging matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    ids = torch.tensor([tok("say hi to ada .")["input_ids"]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save_pretrained(model, tok, tmp_path / "out")
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r})
        t = AutoTokenizer.from_pretrained({str(tmp_path / 'out')!r})
        ids = torch.tensor([t("say hi to ada .")["input_ids"]])
        print(json.dumps({{"logits": m(input_ids=ids).logits[0, -1, :5].tolist(),
                          "rlhfkit": any(k.startswith("rlhfkit") for k in sys.modules)}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rlhfkit"] is False
    assert result["logits"] == pytest.approx(want[0, -1, :5].tolist(), abs=1e-4)


def test_a_plain_models_log_probs_import_no_peft(tiny_model):
    """Importing peft sets up torch.compile machinery (about a second on a CPU): a run without LoRA never pays it,
    as it used to in its first log-prob pass (`is_peft` imported peft to ask)."""
    script = textwrap.dedent(f"""
        import json, sys
        import torch
        from rlhfkit.models import is_peft, load_causal_lm, load_tokenizer, logprobs_of
        tok = load_tokenizer({str(tiny_model)!r})
        model = load_causal_lm({str(tiny_model)!r}, tok)
        ids = torch.tensor([tok("hello there")["input_ids"]])
        logprobs_of(model, ids, torch.ones_like(ids))
        print(json.dumps({{"peft": "peft" in sys.modules, "is_peft": is_peft(model)}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"peft": False, "is_peft": False}


def test_missing_or_wrong_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_causal_lm(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_causal_lm(str(tmp_path / "empty"))


def test_lora_target_typo_is_named(tiny_model):
    with pytest.raises(UserError, match=r"lora.target_modules \['qq_proj'\]"):
        load_causal_lm(str(tiny_model), lora=LoraConfig(enabled=True, target_modules=["qq_proj"]))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_disable_dropout_reaches_the_attention_modules_own_copy(family):
    """LlamaAttention / Qwen2Attention copy attention_dropout when built; zeroing the config alone left two
    train-mode forwards different."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from rlhfkit.models import disable_dropout

    cls, cfg_cls = (LlamaForCausalLM, LlamaConfig) if family == "llama" else (Qwen2ForCausalLM, Qwen2Config)
    torch.manual_seed(0)
    model = cls(cfg_cls(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.5)).train()
    ids = torch.randint(0, 50, (2, 12))
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is live
    disable_dropout(model)
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
