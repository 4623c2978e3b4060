"""Sharded training (FSDP2, DeepSpeed ZeRO-3) and QLoRA on the real families: Qwen2 (tied embeddings, ChatML), Llama 3 and GPT-2
(its own block class, Conv1D layers, real dropout), each with its byte-level BPE tokenizer and chat template."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from realistic.test_stages import QUIET, assert_plain_transformers_loads, case
from test_fsdp import assert_same, assert_sharded_checkpoint, launch, ok, single

SHARDED = [("fsdp", "qwen2"), ("fsdp", "llama3"), ("fsdp", "gpt2"), ("zero3", "qwen2"), ("zero3", "gpt2")]


@pytest.mark.slow
@pytest.mark.parametrize("config,name", SHARDED)
def test_sharded_sft_on_a_real_family_matches_one_process(tmp_path, family_dir, family_data, config, name):
    family, data = case(family_dir, family_data, name)
    fmt = "messages" if family.has_template else "text"
    common = ["--model", str(family.path), "--data", str(data.path("sft", fmt)), "--max-steps", "3",
              "--save-every", "3", "--seed", "1", "--learning-rate", "3e-3", "--eval-fraction", "0",
              "--report-to", "jsonl", "--progress", "false"]
    one, two = tmp_path / "one", tmp_path / "two"
    ok(single("sft", [*common, "--output-dir", str(one), "--batch-size", "8"]))
    ok(launch(config, "sft", [*common, "--output-dir", str(two), "--batch-size", "4"]))
    if config == "fsdp":
        assert_sharded_checkpoint(two, 3)
    else:
        from test_deepspeed import assert_zero_checkpoint

        assert_zero_checkpoint(two, 3, 3)
    assert_same(one, two, "loss")
    assert_plain_transformers_loads(two, family)
    if name == "qwen2":  # tied: saved once, and the loaded model's head is its embedding matrix again
        from transformers import AutoModelForCausalLM

        assert not any(k.startswith("lm_head") for k in load_file(str(two / "model.safetensors")))
        model = AutoModelForCausalLM.from_pretrained(two)
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_qlora_sft_on_a_real_family(tmp_path, family_dir, family_data, name):
    """QLoRA on a real family (GPT-2's attention is a Conv1D, so its adapters go on c_attn): trains, and saves
    plain full-precision weights the family's loader reads."""
    from rlhfkit.config import LoraConfig
    from rlhfkit.policy import sft
    from rlhfkit.train import read_metrics

    family, data = case(family_dir, family_data, name)
    targets = ["c_attn"] if name == "gpt2" else ["q_proj", "v_proj"]
    out = tmp_path / "q"
    sft.main(sft.SFTConfig(model=str(family.path), data=str(data.path("sft", "text")), output_dir=str(out),
                           max_steps=4, batch_size=8, learning_rate=3e-3, eval_fraction=0.0,
                           lora=LoraConfig(enabled=True, r=4, load_in_4bit=True, target_modules=targets), **QUIET))
    losses = [m["loss"] for m in read_metrics(out / "metrics.jsonl")]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert_plain_transformers_loads(out, family)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
