"""The static-cache sampler: token-for-token equal to HF generate when greedy, log-probs equal to what the trainer
recomputes, EOS handling, and the top-k / top-p filters on hand values."""

import logging
import math

import pytest
import torch

from rlhfkit.models import load_causal_lm, load_tokenizer, logprobs_of
from rlhfkit import generation as generation_mod
from rlhfkit.data.encoding import user_turn
from rlhfkit.generation import (Decoding, choose_tokens, encode_prompts, generate_hf, generate_static, resolve_backend,
                                sample, stream, top_k_filter, top_p_filter)

# chat prompts (the tiny model's template), as the policies these tests stand for are sampled
PROMPTS = [user_turn(t) for t in
           ["say hi to ada .", "what is 2 plus 3 ?", "hi", "what is 9 plus 9 ? say hi to bo and to cy , please"]]


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def model(tiny_model, tok):
    """The tiny Llama with larger random weights: the default init's near-uniform logits make greedy decoding
    emit one token forever, which would let a wrong mask or position pass unnoticed."""
    m = load_causal_lm(str(tiny_model), tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for p in m.parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.3)
    return m.eval()


def prompt_batch(tok):
    ids, mask = encode_prompts(tok, PROMPTS)  # (B, P) left-padded, mixed lengths
    assert len(set(mask.sum(-1).tolist())) == len(PROMPTS)
    return ids, mask


def common(tok, **kw):
    return dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)


def test_greedy_static_equals_hf_generate_on_left_padded_prompts(model, tok):
    ids, mask = prompt_batch(tok)
    hf_ids, hf_lp, _ = generate_hf(model, ids, mask, Decoding(max_new_tokens=12, temperature=0, **common(tok)))
    st_ids, st_lp, _ = generate_static(model, ids, mask, Decoding(max_new_tokens=12, temperature=0, **common(tok)))
    assert hf_ids.shape == st_ids.shape == (len(PROMPTS), 12)
    assert torch.equal(st_ids, hf_ids)
    assert len(set(st_ids.flatten().tolist())) > 3  # the check is not vacuous: varied tokens, rows differ
    assert not torch.equal(st_ids[0], st_ids[2])
    torch.testing.assert_close(st_lp, hf_lp, atol=1e-5, rtol=0)
    # and through sample(): same rollout from both backends
    a = sample(model, tok, PROMPTS, max_new_tokens=12, temperature=0, backend="hf")
    b = sample(model, tok, PROMPTS, max_new_tokens=12, temperature=0, backend="static")
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
    assert torch.equal(a.response_mask, b.response_mask) and torch.equal(a.ended, b.ended)


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 20)])
def test_sampling_logprobs_equal_the_trainers_recomputation(model, tok, temperature, top_p, top_k):
    """Sampler/trainer consistency: the log-probs returned with the tokens are what `logprobs_of` gives on the
    sampled sequences, right-padded for scoring, at the same temperature (before top-p/top-k truncation)."""
    torch.manual_seed(0)
    out = sample(model, tok, PROMPTS * 2, max_new_tokens=10, temperature=temperature, top_p=top_p, top_k=top_k,
                 backend="static")
    B, R = out.response_ids.shape
    rows, starts = [], []
    for b in range(B):
        prompt = out.prompt_ids[b][out.prompt_mask[b].bool()]
        resp = out.response_ids[b][out.response_mask[b].bool()]
        rows.append(torch.cat([prompt, resp]))
        starts.append(len(prompt))
    T = max(len(r) for r in rows)
    ids = torch.full((B, T), tok.pad_token_id)  # (B, T) right-padded
    mask = torch.zeros(B, T, dtype=torch.long)  # (B, T) 1 = real token
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = r, 1
    with torch.no_grad():
        lp = logprobs_of(model, ids, mask, temperature=temperature)  # (B, T-1)
    expected = torch.zeros(B, R)
    for b in range(B):
        n = int(out.response_mask[b].sum())
        expected[b, :n] = lp[b, starts[b] - 1 : starts[b] - 1 + n]
    assert out.logprobs is not None and out.logprobs.shape == (B, R)
    torch.testing.assert_close(out.logprobs, expected, atol=1e-4, rtol=0)
    assert (out.logprobs[out.response_mask.bool()] < 0).all()
    # the truncated law puts at least as much mass on every kept token
    assert (out.filtered_logprobs >= out.logprobs - 1e-6).all()
    if top_p == 1.0 and top_k == 0:
        torch.testing.assert_close(out.filtered_logprobs, out.logprobs)


def test_eos_stops_rows_and_masks_are_right(model, tok):
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = 4.0  # EOS likely enough that some rows end early and some do not
    hook = model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    try:
        torch.manual_seed(1)
        out = sample(model, tok, PROMPTS * 4, max_new_tokens=8, temperature=1.0, backend="static")
    finally:
        hook.remove()
    assert out.ended.any() and not out.ended.all()
    for row, m, lp, ended in zip(out.response_ids, out.response_mask, out.logprobs, out.ended):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # mask is a prefix
        if ended:
            assert row[n - 1] == tok.eos_token_id and (row[: n - 1] != tok.eos_token_id).all()
        else:
            assert n == out.response_ids.shape[1] and (row != tok.eos_token_id).all()
        assert (row[n:] == tok.pad_token_id).all() and (lp[n:] == 0).all() and (lp[:n] < 0).all()


@pytest.mark.parametrize("check_every", [1, 8])
def test_loop_stops_once_every_row_has_ended(model, tok, monkeypatch, check_every):
    """check_every 8 is the GPU setting: the loop runs on to the next check, then trims the all-pad columns."""
    monkeypatch.setattr(generation_mod, "_steps_between_checks", lambda device: check_every)
    ids, mask = prompt_batch(tok)
    step = {"n": 0}

    def hook(module, inputs, output):  # output: (B, 1, V) next-token logits of forward number step["n"]
        step["n"] += 1
        eos_bias = torch.full((output.shape[0],), -1e4)  # (B,) no EOS ...
        if step["n"] == 3:
            eos_bias[1] = 1e4  # ... except row 1 at its third token
        if step["n"] == 4:
            eos_bias[:] = 1e4  # ... and every row at the fourth
        output = output.clone()
        output[:, :, tok.eos_token_id] += eos_bias[:, None]
        return output

    handle = model.lm_head.register_forward_hook(hook)
    try:
        out_ids, lp, _ = generate_static(model, ids, mask, Decoding(max_new_tokens=20, temperature=1.0, **common(tok)))
    finally:
        handle.remove()
    assert out_ids.shape == (4, 4) and step["n"] == max(4, check_every)  # stopped early, not after 20 forwards
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert out_ids[1, 2] == eos and out_ids[1, 3] == pad and lp[1, 3] == 0  # finished row emits pad
    assert (out_ids[[0, 2, 3], 3] == eos).all() and (out_ids[:, :2] != eos).all()


def test_top_k_1_equals_greedy(model, tok):
    ids, mask = prompt_batch(tok)
    greedy, _, _ = generate_static(model, ids, mask, Decoding(max_new_tokens=8, temperature=0, **common(tok)))
    torch.manual_seed(3)
    top1, _, flp = generate_static(model, ids, mask,
                                   Decoding(max_new_tokens=8, temperature=1.0, top_k=1, **common(tok)))
    assert torch.equal(top1, greedy)
    assert torch.allclose(flp, torch.zeros_like(flp))  # the truncated law is a point mass


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # ranked: 0.5 (1), 0.3 (3), 0.15 (0), 0.05 (2)
    logits = probs.log()
    kept = lambda p: set(torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist())  # noqa: E731
    assert kept(0.4) == {1}  # 0.5 >= 0.4 already
    assert kept(0.75) == {1, 3}  # 0.5 < 0.75, 0.5 + 0.3 = 0.8 >= 0.75
    assert kept(0.85) == {1, 3, 0}  # 0.8 < 0.85, 0.95 >= 0.85
    assert kept(0.99) == {0, 1, 2, 3}
    assert kept(1e-6) == {1}  # at least one token
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    # kept logits are unchanged, so the renormalised law is p_i / 0.8 over {1, 3}
    f = top_p_filter(logits, 0.75)
    torch.testing.assert_close(torch.softmax(f, -1), torch.tensor([[0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]]))


def test_top_k_filter_and_choose_tokens_logprobs_by_hand():
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[False, True, False, True]]
    assert torch.equal(top_k_filter(logits, 0), logits)
    torch.manual_seed(0)
    for _ in range(20):  # top-k 2 at temperature 1: only tokens 1 and 3; log p and log p / 0.8
        token, lp, flp = choose_tokens(logits, temperature=1.0, top_k=2)
        t = int(token)
        assert t in (1, 3)
        p = {1: 0.5, 3: 0.3}[t]
        assert math.isclose(float(lp), math.log(p), abs_tol=1e-6)
        assert math.isclose(float(flp), math.log(p / 0.8), abs_tol=1e-6)
    # temperature 2 halves the logits: log-probs come from softmax(log(p) / 2) = sqrt(p) / sum sqrt(p)
    token, lp, _ = choose_tokens(logits, temperature=2.0)
    z = sum(math.sqrt(q) for q in (0.15, 0.5, 0.05, 0.3))
    assert math.isclose(float(lp), math.log(math.sqrt([0.15, 0.5, 0.05, 0.3][int(token)]) / z), abs_tol=1e-6)
    token, lp, flp = choose_tokens(logits, temperature=0)
    assert int(token) == 1 and math.isclose(float(lp), math.log(0.5), abs_tol=1e-6) and float(flp) == float(lp)


def test_backend_choice_and_fallback_for_unsupported_models(model, tok, caplog, monkeypatch):
    assert resolve_backend(model, "hf") == "hf"
    assert resolve_backend(model, "static") == "static"
    assert resolve_backend(model, "auto") == "static"  # measured no slower on CPU either (benchmarks/sampling.py)
    monkeypatch.setattr(type(model), "_can_compile_fullgraph", False)
    with caplog.at_level(logging.INFO, logger="rlhfkit.generation"):
        assert resolve_backend(model, "static") == "hf"
    assert "does not declare static-cache support" in caplog.text and "Hugging Face generate" in caplog.text
    out = sample(model, tok, PROMPTS[:2], max_new_tokens=4, temperature=0, backend="static")  # still samples
    assert out.response_ids.shape == (2, 4) and out.logprobs is not None
    with pytest.raises(ValueError, match="backend"):
        resolve_backend(model, "vllm")


def test_compile_failure_falls_back_to_eager(model, tok, caplog, monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("inductor exploded")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(generation_mod, "_DECODERS", type(generation_mod._DECODERS)())
    ids, mask = prompt_batch(tok)
    eager, _, _ = generate_static(model, ids, mask, Decoding(max_new_tokens=6, temperature=0, **common(tok)))
    monkeypatch.setattr(generation_mod, "_DECODERS", type(generation_mod._DECODERS)())
    with caplog.at_level(logging.WARNING, logger="rlhfkit.generation"):
        out, _, _ = generate_static(model, ids, mask, Decoding(max_new_tokens=6, temperature=0, **common(tok)),
                                    compile=True)
    assert torch.equal(out, eager)
    assert "torch.compile of the decode step failed" in caplog.text and "inductor exploded" in caplog.text


def test_static_path_runs_other_architectures_gpt2_and_lora(tok, model):
    """Not only Llama: GPT-2 (learned absolute positions) greedy matches HF generate, and so does a LoRA-wrapped
    Llama (the static loop calls the peft base model, whose injected LoRA layers still apply)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhfkit.config import LoraConfig
    from rlhfkit.models import add_lora

    ids, mask = prompt_batch(tok)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                      initializer_range=0.3, pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)).eval()
    assert resolve_backend(gpt2, "static") == "static"
    hf, _, _ = generate_hf(gpt2, ids, mask, Decoding(max_new_tokens=8, temperature=0, **common(tok)))
    st, _, _ = generate_static(gpt2, ids, mask, Decoding(max_new_tokens=8, temperature=0, **common(tok)))
    assert torch.equal(st, hf) and len(set(st.flatten().tolist())) > 2

    import copy

    lora = add_lora(copy.deepcopy(model), LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # a non-zero adapter, so a path that skipped LoRA would differ
    lora.eval()
    hf, _, _ = generate_hf(lora, ids, mask, Decoding(max_new_tokens=8, temperature=0, **common(tok)))
    st, _, _ = generate_static(lora, ids, mask, Decoding(max_new_tokens=8, temperature=0, **common(tok)))
    plain, _, _ = generate_static(model, ids, mask, Decoding(max_new_tokens=8, temperature=0, **common(tok)))
    assert torch.equal(st, hf) and not torch.equal(st, plain)


def test_a_cache_dtype_clash_falls_back_to_hf_generate(model, tok, caplog, monkeypatch):
    """Seen on an H200 with a model whose forward Accelerate had patched to run under bf16 autocast: RoPE keeps
    the keys in fp32 while the values come out in bf16, and the one-dtype static cache refuses them."""
    def clash(*args, **kwargs):
        raise RuntimeError("index_copy_(): self and source expected to have the same dtype, but got (self) Float "
                           "and (source) BFloat16")

    monkeypatch.setattr(generation_mod, "generate_static", clash)
    with caplog.at_level(logging.WARNING):
        torch.manual_seed(0)
        got = sample(model, tok, ["say hi", "say hello there"], max_new_tokens=6, temperature=0.0, backend="static")
    torch.manual_seed(0)
    want = sample(model, tok, ["say hi", "say hello there"], max_new_tokens=6, temperature=0.0, backend="hf")
    assert torch.equal(got.response_ids, want.response_ids)
    assert "using transformers' generate" in caplog.text

    def other(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(generation_mod, "generate_static", other)
    with pytest.raises(RuntimeError, match="out of memory"):  # anything else is not swallowed
        sample(model, tok, ["say hi"], max_new_tokens=2, backend="static")


def test_low_precision_sampling_uses_a_bf16_copy_refreshed_from_the_current_weights(tiny_model, tok):
    """dtype=bf16 on an fp32 model samples exactly as a bf16 copy of it does, leaves the fp32 weights alone, and
    sees weight updates made between calls (the copy is refreshed, not frozen at the first call)."""
    import copy

    model = load_causal_lm(str(tiny_model), tok).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p in model.parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.3)
    ids, mask = prompt_batch(tok)
    kw = dict(max_new_tokens=10, temperature=0, **common(tok))

    def bf16_copy():
        twin = copy.deepcopy(model)
        for p in twin.parameters():
            p.data = p.data.to(torch.bfloat16)
        return twin

    for round_ in range(2):
        got, lp, _ = generate_static(model, ids, mask, Decoding(**kw), dtype=torch.bfloat16)
        want, want_lp, _ = generate_static(bf16_copy(), ids, mask, Decoding(**kw))
        assert torch.equal(got, want), round_
        torch.testing.assert_close(lp, want_lp)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        with torch.no_grad():  # an optimizer step between rollouts
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(-1.0)
    fp32, _, _ = generate_static(model, ids, mask, Decoding(**kw))
    assert fp32.shape[0] == len(PROMPTS)
    # through sample(), the hf backend runs under autocast instead
    out = sample(model, tok, PROMPTS, max_new_tokens=6, temperature=0, backend="hf", dtype=torch.bfloat16)
    assert out.response_ids.shape[0] == len(PROMPTS)


def test_stream_equals_batched_sampling_greedy_and_reports_untempered_logprobs(model, tok):
    """`rlhfkit serve` streams through `generation.stream`: greedy, it emits the batched sampler's tokens for the
    same prompt, and each reported log-prob is the model's own (temperature-free) one, equal to the recomputation."""
    ids, mask = encode_prompts(tok, PROMPTS[1:2])
    batched = sample(model, tok, PROMPTS[1:2], max_new_tokens=8, temperature=0.0, backend="hf")
    want = batched.response_ids[0][batched.response_mask[0].bool()].tolist()
    steps = list(stream(model, ids[0].tolist(), Decoding(8, tok.eos_token_id, tok.pad_token_id, 0.0), top_logprobs=3))
    assert [s.token_id for s in steps] == want
    full = torch.cat([ids, torch.tensor([want])], 1)
    lp = logprobs_of(model, full, torch.ones_like(full))[0, ids.shape[1] - 1:]  # (R,): the response tokens'
    torch.testing.assert_close(torch.tensor([s.logprob for s in steps]), lp[: len(steps)], rtol=1e-4, atol=1e-4)
    assert all(len(s.top) == 3 and s.top[0][1] >= s.top[1][1] >= s.top[2][1] for s in steps)


def test_stream_stops_when_asked_and_survives_degenerate_sampling_settings(model, tok):
    ids = encode_prompts(tok, PROMPTS[:1])[0][0].tolist()
    calls = []
    out = list(stream(model, ids, Decoding(8, None, 0), should_stop=lambda: calls.append(1) or len(calls) > 2))
    assert len(out) == 2  # asked before each forward pass: the third ask stops it
    g = torch.Generator().manual_seed(0)
    # a top_p that underflows to 0 in float32 keeps the most likely token; a tiny temperature is greedy
    greedy = [s.token_id for s in stream(model, ids, Decoding(4, None, 0, temperature=0.0))]
    assert [s.token_id for s in stream(model, ids, Decoding(4, None, 0, top_p=1e-320), generator=g)] == greedy
    assert [s.token_id for s in stream(model, ids, Decoding(4, None, 0, temperature=1e-300), generator=g)] == greedy
