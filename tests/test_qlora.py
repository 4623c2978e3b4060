"""QLoRA (Dettmers et al. 2023): the frozen base loaded in 4-bit NF4 by bitsandbytes (which quantizes on the CPU
too), LoRA adapters trained on top; the saved model is the adapter merged into the base's full-precision weights,
which plain transformers loads without bitsandbytes."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.config import LoraConfig
from rlhfkit.errors import ConfigError, UserError
from rlhfkit.policy import dpo, sft
from rlhfkit.train import read_metrics

from helpers import make_tiny_model, preference_rows, write_jsonl


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """Hidden size 128: bitsandbytes quantizes in blocks of 64 along a row, and its CPU inference kernel needs
    whole blocks (the suite's 32-wide model has none)."""
    return make_tiny_model(tmp_path_factory.mktemp("qlora") / "model", hidden=128)


def qlora(**kw) -> LoraConfig:
    return LoraConfig(enabled=True, r=4, alpha=8, load_in_4bit=True, **kw)


def test_the_4bit_base_is_quantized_and_frozen_and_only_adapters_train(tiny_model):
    import bitsandbytes as bnb

    from rlhfkit.models import load_causal_lm

    model = load_causal_lm(str(tiny_model), lora=qlora())
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.quant_type == "nf4" for m in quantized)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_qlora_sft_trains_and_saves_the_adapter_merged_into_full_precision_weights(tmp_path, tiny_model, sft_file):
    out = tmp_path / "q"
    sft.main(sft.SFTConfig(model=str(tiny_model), data=str(sft_file), output_dir=str(out), max_steps=6, batch_size=4,
                           learning_rate=3e-3, seed=1, report_to=["jsonl"], progress=False, save_every=6,
                           eval_fraction=0.0, lora=qlora()))
    losses = [m["loss"] for m in read_metrics(out / "metrics.jsonl")]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert (out / "checkpoints" / "step-6" / "model" / "adapter_model.safetensors").exists()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    base = load_file(str(tiny_model / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    adapted = 0
    for key, weight in merged.items():
        stem = key.removesuffix(".weight")
        a_key = f"base_model.model.{stem}.lora_A.weight"
        if a_key in adapter:  # W + (alpha / r) B A, on the base's own full-precision W (not its 4-bit copy)
            delta = adapter[f"base_model.model.{stem}.lora_B.weight"] @ adapter[a_key] * (8 / 4)
            torch.testing.assert_close(weight, base[key] + delta)
            adapted += 1
        else:
            torch.testing.assert_close(weight, base[key], rtol=0, atol=0)
    assert adapted == 2 * 4  # q, k, v, o of both layers
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # plain weights: no bitsandbytes needed to load them


def test_qlora_dpo_uses_the_adapter_disabled_4bit_base_as_reference(tmp_path, tiny_model):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(16))
    summary = dpo.main(dpo.DPOConfig(model=str(tiny_model), data=str(pairs), output_dir=str(tmp_path / "d"),
                                     max_steps=2, batch_size=4, report_to=["jsonl"], progress=False,
                                     lora=qlora(), reference="adapter"))
    first = read_metrics(tmp_path / "d" / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-5)  # zero-initialised adapter: pi = pi_ref
    assert summary["reference"] == "adapter"


def test_qlora_needs_lora_and_is_refused_under_fsdp(tmp_path, tiny_model, sft_file):
    with pytest.raises(ConfigError, match="lora.load_in_4bit needs lora.enabled"):
        sft.SFTConfig(model=str(tiny_model), data=str(sft_file), output_dir=str(tmp_path / "x"),
                      lora=LoraConfig(load_in_4bit=True)).validate()
    with pytest.raises(UserError, match="QLoRA .* is not supported under FSDP"):
        from rlhfkit.train.sharding import check_shardable

        check_shardable(sft.SFTConfig(model=str(tiny_model), data=str(sft_file), output_dir=str(tmp_path / "y"),
                                      lora=qlora()))


def test_adapter_gradients_equal_a_full_precision_model_holding_the_dequantized_base_even_after_eval(tiny_model):
    """QLoRA's gradients are LoRA's on the dequantized weights. An eval-mode no-grad forward first, as DPO's
    reference pass and every evaluation do: bitsandbytes' CPU kernel repacks the weights for inference then, and
    its repacked matmul has no backward (the gradients through the base layers went wrong)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from rlhfkit.models import load_causal_lm

    quantized = load_causal_lm(str(tiny_model), lora=qlora())
    plain = load_causal_lm(str(tiny_model), lora=LoraConfig(enabled=True, r=4, alpha=8))
    torch.manual_seed(0)
    plain_modules = dict(plain.named_modules())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                plain_modules[name].weight.copy_(dequantize_4bit(module.weight.data, module.weight.quant_state))
        plain_params = dict(plain.named_parameters())
        for name, param in quantized.named_parameters():
            if "lora_B" in name:  # nonzero, so gradients reach every layer's adapters
                param.normal_(0, 0.1)
            if "lora_" in name:
                plain_params[name].copy_(param)
    ids = torch.randint(4, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    quantized.eval()
    with torch.no_grad():
        quantized(input_ids=ids)
    grads = []
    for model in (quantized, plain):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-6, msg=name)
