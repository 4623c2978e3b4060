"""The private library APIs rlhfkit relies on (all in rlhfkit/compat.py) still exist and still do what it uses
them for: this fails, naming the API, when an upgrade of accelerate or transformers changes one."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from rlhfkit.compat import declares_static_cache, reset_accelerator_state


def test_accelerate_still_has_reset_state_and_it_lets_a_second_run_change_precision():
    assert callable(getattr(AcceleratorState, "_reset_state", None)), \
        "accelerate removed AcceleratorState._reset_state: update rlhfkit.compat.reset_accelerator_state"
    reset_accelerator_state()
    Accelerator(cpu=True, mixed_precision="no")
    with pytest.raises(ValueError):  # what the reset is for: Accelerate refuses other settings in one process
        Accelerator(cpu=True, mixed_precision="bf16")
    reset_accelerator_state()
    assert Accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"
    reset_accelerator_state()


def test_transformers_still_marks_static_cache_models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert declares_static_cache(llama), ("transformers no longer sets _can_compile_fullgraph on Llama: update "
                                          "rlhfkit.compat.declares_static_cache")
    assert declares_static_cache(torch.nn.Linear(2, 2)) is False
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2))
    assert isinstance(declares_static_cache(gpt2), bool)
