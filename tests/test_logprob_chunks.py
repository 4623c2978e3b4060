"""The LM head chunk by chunk (models.logprobs_of): the same log-probs, entropies and gradients as the full
(B, T, V) logits, without ever materialising them; models whose logits are more than the head's linear map fall
back to the full logits."""

from __future__ import annotations

import pytest
import torch

import rlhfkit.models as models
from helpers import largest_tensor_mode
from rlhfkit.models import logprobs_of, position_ids_from_mask, token_logprobs

V = 3000


def llama(tied: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


def batch(seed: int = 1, B: int = 3, T: int = 20):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -6:] = 0  # right padding on one row
    return ids, mask


def full_logprobs(model, ids, mask, temperature=1.0, return_entropy=False, start=0, keep=None):
    """What logprobs_of computed before chunking: the model's full logits, then log-softmax."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    return token_logprobs(out.logits, ids, temperature, return_entropy, start, keep)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows, so every batch here spans several chunks."""
    monkeypatch.setattr(models, "LOGIT_CHUNK_BYTES", 4 * V * 7)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("start,use_keep", [(0, False), (0, True), (5, False), (5, True)])
def test_chunked_equals_full_logits_in_values_entropies_and_gradients(small_chunks, tied, start, use_keep):
    model = llama(tied)
    ids, mask = batch()
    keep = (torch.rand(ids.shape[0], ids.shape[1] - 1 - start, generator=torch.Generator().manual_seed(2)) > 0.3
            if use_keep else None)
    results = {}
    for name, fn in (("full", full_logprobs), ("chunked", logprobs_of)):
        model.zero_grad()
        lp, ent = fn(model, ids, mask, 0.7, return_entropy=True, start=start, keep=keep)
        assert lp.shape == ent.shape == (3, 19 - start)
        assert not ent.requires_grad  # a metric: no softmax kept for a backward that never comes
        lp.sum().backward()
        results[name] = (lp.detach(), ent.detach(), grads(model))
    (lp_f, ent_f, g_f), (lp_c, ent_c, g_c) = results["full"], results["chunked"]
    torch.testing.assert_close(lp_c, lp_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_c, ent_f, rtol=1e-5, atol=1e-5)
    if keep is not None:
        assert (lp_c[~keep] == 0).all() and (ent_c[~keep] == 0).all()
    assert g_c.keys() == g_f.keys() and len(g_f) == len(list(model.parameters()))
    for name in g_f:
        torch.testing.assert_close(g_c[name], g_f[name], rtol=1e-4, atol=2e-5, msg=name)


def test_no_grad_and_one_chunk_paths_agree(small_chunks, monkeypatch):
    model = llama()
    ids, mask = batch()
    want = full_logprobs(model, ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(logprobs_of(model, ids, mask), want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(models, "LOGIT_CHUNK_BYTES", 2**30)  # everything in one chunk
    torch.testing.assert_close(logprobs_of(model, ids, mask), want, rtol=1e-5, atol=1e-5)


def test_no_tensor_the_size_of_the_logits_exists_in_forward_or_backward(small_chunks):
    """The point of chunking: neither pass holds B × T × V floats (the full path does, so this can fail)."""
    model = llama()
    ids, mask = batch(B=4, T=40)
    logits_size = 4 * 39 * V
    for fn, expect_small in ((full_logprobs, False), (logprobs_of, True)):
        model.zero_grad()
        with largest_tensor_mode() as seen:
            fn(model, ids, mask).sum().backward()
        # the head's weight and its gradient (V × 32) are the largest tensors left; a chunk is 7 × V
        assert (seen.largest < logits_size / 4) == expect_small, (fn.__name__, seen.largest, logits_size)


def test_lora_model_gets_the_same_values_and_adapter_gradients(small_chunks):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               lora_dropout=0.0, init_lora_weights=False))
    ids, mask = batch()
    results = {}
    for name, fn in (("full", full_logprobs), ("chunked", logprobs_of)):
        model.zero_grad()
        lp = fn(model, ids, mask)
        lp.sum().backward()
        results[name] = (lp.detach(), grads(model))
    torch.testing.assert_close(results["chunked"][0], results["full"][0], rtol=1e-5, atol=1e-5)
    assert results["full"][1] and all("lora" in n for n in results["full"][1])
    for n, g in results["full"][1].items():
        torch.testing.assert_close(results["chunked"][1][n], g, rtol=1e-4, atol=2e-5, msg=n)
    with model.disable_adapter(), torch.no_grad():  # the reference through the adapter switch
        torch.testing.assert_close(logprobs_of(model, ids, mask), full_logprobs(model, ids, mask), rtol=1e-5,
                                   atol=1e-5)


def test_a_model_that_transforms_its_logits_takes_the_full_path(small_chunks, caplog):
    """Logits scaled in forward with nothing in the config to say so: the first call's check finds the head's map
    does not match, warns once, and every call uses the full logits (so the values are the model's)."""
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    torch.manual_seed(0)
    model = Scaled(llama().config)
    ids, mask = batch()
    with caplog.at_level("WARNING"):
        got = logprobs_of(model, ids, mask)
        again = logprobs_of(model, ids, mask)
    torch.testing.assert_close(got, full_logprobs(model, ids, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got)
    assert sum("not its output head's linear map" in r.message for r in caplog.records) == 1


def test_policy_with_value_head_response_forward_matches_the_full_logits(small_chunks):
    from rlhfkit.policy.ppo import PolicyWithValue, reference_logprobs, response_forward

    net = PolicyWithValue(llama())
    torch.nn.init.normal_(net.value_head.weight)
    ids, mask = batch()
    P = 6
    net.zero_grad()
    lp, values, ent = response_forward(net, ids, mask, P, 0.8, entropy=True)
    (lp.sum() + values.sum()).backward()
    got = grads(net)
    net.zero_grad()
    logits, values_full = net(ids, mask)
    lp_f, ent_f = token_logprobs(logits, ids, 0.8, True, P - 1)
    (lp_f.sum() + values_full[:, P - 1 : -1].sum()).backward()
    torch.testing.assert_close(lp, lp_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values, values_full[:, P - 1 : -1])
    for n, g in grads(net).items():
        torch.testing.assert_close(got[n], g, rtol=1e-4, atol=2e-5, msg=n)
    ref = llama(seed=3)
    torch.testing.assert_close(reference_logprobs(ref, net, ids, mask, P, 0.8),
                               full_logprobs(ref, ids, mask, 0.8, start=P - 1), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_matches_the_full_path_to_bf16_precision(small_chunks):
    model = llama()
    ids, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = logprobs_of(model, ids, mask)
        want = full_logprobs(model, ids, mask)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_hf_generate_backend_never_holds_every_steps_logits(small_chunks):
    """The hf sampler used to ask generate for each step's logits (B × R × V floats); its log-probs now come from
    one forward with the head in chunks, equal to the training path's, and no tensor near B × R × V exists."""
    from rlhfkit.generation import Decoding, generate_hf

    model = llama().eval()
    ids, mask = batch(B=4, T=6)
    mask[:] = 1
    decoding = Decoding(max_new_tokens=60, eos_token_id=2, pad_token_id=0, temperature=0.9, top_p=0.9, top_k=50)
    torch.manual_seed(0)
    with largest_tensor_mode() as seen:
        response, lp, flp = generate_hf(model, ids, mask, decoding)
    assert response.shape[0] == 4 and response.shape[1] <= 60
    # the head's weight (V × 32) is the largest tensor left; every step's logits would be 4 × 60 × V
    assert seen.largest <= V * 32 < 4 * 60 * V / 4, seen.largest
    full = torch.cat([ids, response], 1)
    real = torch.cat([mask, torch.ones_like(response)], 1)
    want = full_logprobs(model, full, real, 0.9, start=ids.shape[1] - 1)
    ended = (response == 2).long()
    live = (ended.cumsum(-1) - ended) == 0
    torch.testing.assert_close(lp[live], want[live], rtol=1e-5, atol=1e-5)
    assert (flp[live] >= lp[live] - 1e-6).all()  # the truncated distribution puts at least as much on a kept token
