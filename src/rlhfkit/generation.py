"""Generation below the stages: batched sampling for PPO, best-of-n, reward normalisation, labelling and
evaluation, and token-by-token streaming for `rlhfkit serve`. Prompts are encoded by `data.encoding`'s one rule.

Prompts are left-padded for generation (so every row's next token sits at the same column); responses come back
right-padded with a mask that covers the real tokens up to and including EOS. PPO re-scores responses with
right padding through `models.logprobs_of` (N implementation details of RLHF: left-pad to generate, right-pad to
score).

Two backends produce the tokens: Hugging Face `generate` (dynamic cache, any architecture) and `generate_static`,
our own prefill + decode loop over a preallocated `StaticCache` whose single-token decode step can be
`torch.compile`d on a GPU (generation is most of an RL step; HF's dynamic-cache loop is several times slower).
`stream` samples one sequence a token at a time for a server, with the same token choice (`choose_tokens`)."""

from __future__ import annotations

import inspect
import logging
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Sequence

import torch

from rlhfkit.compat import declares_static_cache
from rlhfkit.data.encoding import encode_prompt
from rlhfkit import models
from rlhfkit.models import position_ids_from_mask

log = logging.getLogger(__name__)

Message = dict[str, str]
Backend = Literal["auto", "hf", "static"]


def _has_shards(model: Any) -> bool:
    """Whether any part of the model is an FSDP unit."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@dataclass
class Rollout:
    prompt_ids: torch.Tensor
    """(B, P) left-padded prompt tokens."""
    prompt_mask: torch.Tensor
    """(B, P) 1 = real prompt token."""
    response_ids: torch.Tensor
    """(B, R) sampled tokens, right-padded with the pad id after EOS."""
    response_mask: torch.Tensor
    """(B, R) 1 = real response token (EOS included)."""
    ended: torch.Tensor
    """(B,) True where the response emitted EOS within max_new_tokens."""
    texts: list[str]
    """Decoded responses without special tokens."""
    logprobs: torch.Tensor | None = None
    """(B, R) float32 log-prob of each sampled token under the temperature-scaled softmax over the whole vocabulary
    (before top-k/top-p truncation), 0 at padding: what `models.logprobs_of(..., temperature)` recomputes, so it
    can serve as PPO's old_logprobs. At temperature 0 (greedy) the unscaled softmax is used."""
    filtered_logprobs: torch.Tensor | None = None
    """(B, R) log-prob under the truncated, renormalised distribution the token was actually drawn from (equals
    `logprobs` when top_k and top_p are off), 0 at padding; for importance corrections of the truncation."""

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)


def encode_prompts(tokenizer: Any, prompts: Sequence[str | Sequence[Message]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt batch (input_ids, attention_mask), each (B, P), each prompt encoded by the rule every
    stage shares (`data.encoding.encode_prompt`: a string is plain text, a message list goes through the chat
    template), so the policy is sampled on exactly the ids it was tuned and is scored on."""
    rows = [encode_prompt(tokenizer, p) for p in prompts]
    P = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (P - len(r)) + r for r in rows], dtype=torch.long)  # (B, P)
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)  # (B, P)
    return ids, mask


# ------------------------------------------------------------------------------------------ token choice (pure)
def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th are kept, as in HF's
    TopKLogitsWarper). k <= 0 or k >= V leaves the logits alone. logits: (B, V)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of most likely tokens whose cumulative
    probability is >= p, at least one token; the rest become -inf. p >= 1 leaves the logits alone. (B, V)"""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(-1) - probs  # (B, V) probability of the tokens ranked above this one
    drop_sorted = mass_before >= p  # the set was already complete before this token
    drop_sorted[..., 0] = False  # the most likely token always stays (p may underflow to 0 in float32)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def choose_tokens(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick one token per row from next-token logits (B, V): argmax at temperature <= 0, else a draw from
    softmax(logits / temperature) after top-k then top-p (HF's warper order). Returns (tokens, logprobs,
    filtered_logprobs), each (B,): log-probs of the chosen token under the full tempered distribution (what the
    trainer recomputes) and under the truncated one that was sampled. generator: the draw's random stream (a
    server keeps one per request); None uses torch's global one."""
    logits = logits.float()
    # a temperature that is 0 in float32 is greedy (dividing by it would make every logit inf or nan)
    if temperature <= 0 or temperature < torch.finfo(torch.float32).tiny:
        tokens = logits.argmax(-1)  # (B,)
        logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
        return tokens, logprobs, logprobs
    scaled = logits / temperature  # (B, V)
    logprobs_all = torch.log_softmax(scaled, -1)  # (B, V)
    filtering = 0 < top_k < logits.shape[-1] or top_p < 1.0
    filtered_all = torch.log_softmax(top_p_filter(top_k_filter(scaled, top_k), top_p), -1) if filtering \
        else logprobs_all  # (B, V)
    probs = filtered_all.exp()  # (B, V)
    if generator is None:
        tokens = torch.multinomial(probs, 1).squeeze(-1)  # (B,)
    else:  # a CPU generator for a model on a GPU: draw on the generator's device
        tokens = torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    logprobs = logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs, filtered_all.gather(-1, tokens[:, None]).squeeze(-1)


@dataclass(frozen=True)
class Decoding:
    """How each next token is chosen and when a row ends, for the generation loops."""

    max_new_tokens: int
    eos_token_id: int | None
    pad_token_id: int
    temperature: float = 1.0
    """0 (or below): greedy."""
    top_p: float = 1.0
    top_k: int = 0


# ------------------------------------------------------------------------------------------------ static cache
def _base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (its LoRA layers are injected in place, so calling the base
    model directly still applies them)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_kwarg(model: Any) -> str | None:
    """Name of the cache argument of the model's forward: `cache` from transformers 5.2x (`past_key_values`
    still accepted but deprecated), `past_key_values` before."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def static_unsupported_reason(model: Any) -> str | None:
    """Why the static-cache sampler cannot run this model (None when it can). Conservative: decoder-only models
    that transformers marks compilable (`_can_compile_fullgraph`, or `_supports_static_cache` in older
    versions), taking position ids, with full attention in every layer (sliding-window and hybrid layers
    keep a different cache layout than the full-length padding mask we pass)."""
    base = _base_model(model)
    config = getattr(base, "config", None)
    if config is None:
        return "it has no transformers config"
    name = type(base).__name__
    if getattr(config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder"
    if not declares_static_cache(base):
        return f"{name} does not declare static-cache support (_can_compile_fullgraph)"
    if _cache_kwarg(base) is None or "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{name}.forward takes no cache or position_ids argument"
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return f"{name} has non-full-attention layers {sorted(set(layer_types))}"
    if layer_types is None and getattr(text, "sliding_window", None):
        return f"{name} uses sliding-window attention"
    return None


def _last_logits(model: Any, cache_kw: str, input_ids, position_ids, attention_mask, cache) -> torch.Tensor:
    """One forward through the static cache; next-token logits of the last column, float32 (B, V). The module is
    an argument, not a closure, so a compiled copy of this function holds no reference to the model."""
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=True,
                logits_to_keep=1, **{cache_kw: cache})
    return out.logits[:, -1, :].float()


class _Decoder:
    """Per-model state of the static path: the single-token decode step (compiled or not) and, when compiled,
    the StaticCache kept between calls, because CUDA graphs record its buffers' addresses."""

    def __init__(self, model: Any):
        # a weak reference: _DECODERS is keyed weakly by the model, and a strong one here would keep it alive
        self._model = weakref.ref(_base_model(model))
        self.shadow: Any = None  # a low-precision copy of the weights to sample with (see use_dtype)
        self.active: Any = None  # what the loop runs: the model itself or its shadow
        self.cache_kw = _cache_kwarg(self.model)
        self.compiled: Callable | None = None
        self.compile_failed = False
        self.cache: Any = None
        self.cache_key: tuple | None = None

    @property
    def model(self) -> Any:
        return self.active if self.active is not None else self._model()

    def use_dtype(self, dtype: torch.dtype | None) -> None:
        """Sample with the weights in `dtype` (bf16 / fp16) when the model's own are another dtype: a copy made
        once and refreshed from the model's current weights on every call (an in-place copy, so a compiled
        step's captured buffers stay valid). Buffers such as RoPE's inverse frequencies stay in fp32."""
        base = self._model()
        if dtype is None or next(base.parameters()).dtype == dtype or _has_shards(base):
            # a copy of a sharded (FSDP) model would copy its sharding too: it samples in its own dtype
            self.active = None
            return
        if self.shadow is None or next(self.shadow.parameters()).dtype != dtype:
            import copy

            self.shadow = copy.deepcopy(base).eval()
            for param in self.shadow.parameters():
                param.requires_grad_(False)
                param.grad = None
                param.data = param.data.to(dtype)
            self.compiled, self.cache, self.cache_key = None, None, None
        else:
            with torch.no_grad():
                for mine, theirs in zip(self.shadow.parameters(), base.parameters()):
                    mine.copy_(theirs)
        self.active = self.shadow

    def forward(self, input_ids, position_ids, attention_mask, cache) -> torch.Tensor:
        return _last_logits(self.model, self.cache_kw, input_ids, position_ids, attention_mask, cache)

    def compiled_forward(self, input_ids, position_ids, attention_mask, cache) -> torch.Tensor:
        if self.compiled is None:
            on_cuda = next(self.model.parameters()).is_cuda
            # reduce-overhead = CUDA graphs: one launch per decode step instead of one per kernel. dynamic=False:
            # the decode step has one shape per (batch, cache length), compiled once each.
            self.compiled = torch.compile(_last_logits, mode="reduce-overhead" if on_cuda else "default",
                                          fullgraph=False, dynamic=False)
        return self.compiled(self.model, self.cache_kw, input_ids, position_ids, attention_mask, cache)

    def new_cache(self, batch: int, length: int, device: torch.device, keep: bool) -> Any:
        from transformers import StaticCache

        key = (batch, length, device, next(self.model.parameters()).dtype)
        if keep and self.cache is not None and self.cache_key == key:
            self.cache.reset()
            return self.cache
        cache = StaticCache(config=self.model.config, max_cache_len=length)
        if keep:
            self.cache, self.cache_key = cache, key
        else:
            self.cache, self.cache_key = None, None
        return cache


_DECODERS: "weakref.WeakKeyDictionary[Any, _Decoder]" = weakref.WeakKeyDictionary()
_CACHE_BUCKET = 64  # cache lengths are rounded up to this when compiling, so varying prompt lengths reuse a graph


def _steps_between_checks(device: torch.device) -> int:
    """Every "have all rows ended?" check is a host sync; on a GPU only look every few decode steps."""
    return 8 if device.type == "cuda" else 1


def _decoder(model: Any, compile: bool, dtype: torch.dtype | None = None) -> _Decoder:
    """The compiled decoder state (and a low-precision weight copy) lives as long as the model; an eager
    full-precision call needs none kept."""
    if not compile and dtype is None:
        return _DECODERS.get(model) or _Decoder(model)
    if model not in _DECODERS:
        _DECODERS[model] = _Decoder(model)
    return _DECODERS[model]


@torch.no_grad()
def generate_static(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    decoding: Decoding,
    compile: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill + decode over a preallocated StaticCache. input_ids, attention_mask: (B, P) left-padded, mask
    1 = real token. Returns (response_ids, logprobs, filtered_logprobs), each (B, R) with R <= max_new_tokens
    (the loop stops once every row has emitted EOS); after a row's EOS it holds pad_token_id and log-prob 0.
    compile=True wraps the decode step in torch.compile; if that fails the call reruns eagerly (warning logged).
    dtype: sample with a copy of the weights in this dtype (e.g. bf16 for a bf16-autocast run whose master
    weights are fp32), refreshed from the model on every call.
    Generation-config extras (repetition penalty, bad words ...) are not applied; use backend='hf' for those."""
    dec = _decoder(model, compile, dtype)
    dec.use_dtype(dtype)
    use_compile = compile and not dec.compile_failed
    # The static cache holds keys and values in one dtype. Under an enclosing autocast (a bf16 run's training
    # context) Llama's values come out in bf16 while RoPE promotes the keys back to the fp32 of the weights, so the
    # loop runs in the weights' own dtype: load the policy in bf16 to sample in bf16.
    try:
        with torch.autocast(input_ids.device.type, enabled=False):
            return _static_loop(dec, input_ids, attention_mask, decoding, use_compile)
    except Exception as exc:  # noqa: BLE001 - any compile/dynamo/inductor failure: fall back to eager
        if not use_compile:
            raise
        log.warning("torch.compile of the decode step failed (%s: %s); sampling eagerly from now on",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        dec.compile_failed, dec.compiled, dec.cache = True, None, None
        with torch.autocast(input_ids.device.type, enabled=False):
            return _static_loop(dec, input_ids, attention_mask, decoding, False)


def _static_loop(dec: _Decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoding: Decoding,
                 use_compile: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    max_new_tokens, eos_token_id, pad_token_id = decoding.max_new_tokens, decoding.eos_token_id, decoding.pad_token_id
    temperature, top_p, top_k = decoding.temperature, decoding.top_p, decoding.top_k
    B, P = input_ids.shape
    R = max_new_tokens
    device = input_ids.device
    length = P + R
    if use_compile:
        length = math.ceil(length / _CACHE_BUCKET) * _CACHE_BUCKET
    cache = dec.new_cache(B, length, device, keep=use_compile)
    # (B, L) 1 = key may be attended: the real prompt tokens and every generated column. Fixed for the whole loop
    # (the causal part of the mask hides columns not written yet), so the compiled step sees one shape.
    full_mask = torch.zeros(B, length, dtype=torch.long, device=device)
    full_mask[:, :P] = attention_mask
    full_mask[:, P : P + R] = 1
    prompt_lengths = attention_mask.long().sum(-1, keepdim=True)  # (B, 1)

    # prefill (eager: one call, variable length), with positions that skip the left padding
    logits = dec.forward(input_ids, position_ids_from_mask(attention_mask), full_mask, cache)  # (B, V)
    step = dec.compiled_forward if use_compile else dec.forward
    mark_step = use_compile and device.type == "cuda"
    check_every = _steps_between_checks(device)

    tokens_out = torch.full((B, R), pad_token_id, dtype=torch.long, device=device)  # (B, R)
    logprobs_out = torch.zeros(B, R, device=device)  # (B, R)
    filtered_out = torch.zeros(B, R, device=device)  # (B, R)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,) row has emitted EOS
    alive = torch.zeros(R, dtype=torch.bool, device=device)  # (R,) some row was still generating at step t
    for t in range(R):
        alive[t] = ~done.all()
        tokens, lp, flp = choose_tokens(logits, temperature, top_k, top_p)  # (B,) each
        tokens = tokens.masked_fill(done, pad_token_id)
        tokens_out[:, t] = tokens
        logprobs_out[:, t] = lp.masked_fill(done, 0.0)
        filtered_out[:, t] = flp.masked_fill(done, 0.0)
        done = done | (tokens == eos_token_id)
        if t == R - 1 or ((t + 1) % check_every == 0 and bool(done.all())):
            break
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        logits = step(tokens[:, None], prompt_lengths + t, full_mask, cache)  # (B, V); new token's position
    steps = int(alive.sum())  # drop the all-pad columns a GPU run makes between its "all ended?" checks
    return tokens_out[:, :steps], logprobs_out[:, :steps], filtered_out[:, :steps]


# ----------------------------------------------------------------------------------------------------- HF path
@torch.no_grad()
def generate_hf(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    decoding: Decoding,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hugging Face `generate` (dynamic cache); same contract as `generate_static`. The log-probs are recomputed
    after generation by one forward over prompt + response, the LM head applied in chunks of rows
    (`models.final_hidden`): asking generate for every step's logits would hold B × R × V floats, 20 GB for 64
    answers of 512 tokens with a 152k-token vocabulary."""
    max_new_tokens, eos_token_id, pad_token_id = decoding.max_new_tokens, decoding.eos_token_id, decoding.pad_token_id
    temperature, top_p, top_k = decoding.temperature, decoding.top_p, decoding.top_k
    greedy = temperature <= 0
    sequences = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=not greedy,
        temperature=None if greedy else temperature, top_p=None if greedy else top_p,
        top_k=None if greedy else (top_k or 0), pad_token_id=pad_token_id, eos_token_id=eos_token_id,
        return_dict_in_generate=True,  # whatever the model's generation_config says: one known shape
    ).sequences
    P = input_ids.shape[1]
    response = sequences[:, P:]  # (B, R)
    # generate writes pad after a row's EOS: those positions are not attended and get log-prob 0 (the EOS itself
    # keeps its log-prob)
    is_eos = (response == eos_token_id).long()
    after_eos = is_eos.cumsum(-1) - is_eos > 0  # (B, R)
    mask = torch.cat([attention_mask, (~after_eos).long()], 1)  # (B, P + R)
    logprobs, filtered = sampled_logprobs(model, sequences, mask, P, decoding)
    return response, logprobs.masked_fill(after_eos, 0.0), filtered.masked_fill(after_eos, 0.0)


def sampled_logprobs(model: Any, ids: torch.Tensor, mask: torch.Tensor, P: int, decoding: Decoding
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R) log-probs of the response tokens ids[:, P:] under the tempered full distribution and under the
    top-k / top-p truncated one, from one forward; the logits are formed a chunk of rows at a time."""
    B, T = ids.shape
    targets = ids[:, P:].reshape(-1)  # (B * R,)
    positions = position_ids_from_mask(mask)
    found = models.final_hidden(model, ids, mask, positions)
    if found is None:  # a model whose logits are more than its head's map: its own full logits
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        rows, head = out.logits[:, P - 1 : T - 1].reshape(B * (T - P), -1), None
    else:
        hidden, head, _ = found
        rows = hidden[:, P - 1 : T - 1].reshape(B * (T - P), -1)  # (B * R, H)
    vocab = head.weight.shape[0] if head is not None else rows.shape[-1]
    size = models.rows_per_chunk(vocab)
    greedy = decoding.temperature <= 0
    filtering = not greedy and (0 < decoding.top_k < vocab or decoding.top_p < 1.0)
    lps, flps = [], []
    for s in range(0, rows.shape[0], size):
        chunk = rows[s : s + size]
        logits = (chunk if head is None else torch.nn.functional.linear(chunk, head.weight, head.bias)).float()
        scaled = logits if greedy else logits / decoding.temperature  # (n, V)
        t = targets[s : s + size, None]
        lps.append(torch.log_softmax(scaled, -1).gather(-1, t).squeeze(-1))
        flps.append(torch.log_softmax(top_p_filter(top_k_filter(scaled, decoding.top_k), decoding.top_p), -1)
                    .gather(-1, t).squeeze(-1) if filtering else lps[-1])
    R = T - P
    return torch.cat(lps).view(B, R), torch.cat(flps).view(B, R)


# ------------------------------------------------------------------------------------------------------ sample
_FELL_BACK: set[str] = set()


def resolve_backend(model: Any, backend: Backend = "auto") -> Literal["hf", "static"]:
    """The backend that will run. 'auto' is the static loop on every device where the model supports it: several
    times faster than HF generate on a GPU (benchmarks/RESULTS.md) and 1.0-1.2x on the playground model on 2 CPU cores
    (benchmarks/sampling.py), and it returns the log-probs without keeping every step's logits. 'static' and
    'auto' fall back to 'hf', with a log line, for architectures the static loop does not support."""
    if backend not in ("auto", "hf", "static"):
        raise ValueError(f"backend must be 'auto', 'hf' or 'static', not {backend!r}")
    if backend == "hf":
        return "hf"
    reason = static_unsupported_reason(model)
    if reason is not None:
        if reason not in _FELL_BACK:
            _FELL_BACK.add(reason)
            log.info("static-cache sampler unavailable (%s); sampling with Hugging Face generate", reason)
        return "hf"
    return "static"


@torch.no_grad()
def sample(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[Message]],
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 64,
    backend: Backend = "auto",
    compile: bool = False,
    dtype: torch.dtype | None = None,
) -> Rollout:
    """Sample one response per prompt (repeat prompts for several). temperature 0 means greedy. A prompt is a
    string (plain text) or a message list (chat template); `data.encoding.user_turn` makes a string a chat turn.

    backend: 'hf' (transformers generate), 'static' (our static-cache loop) or 'auto' (the faster one for the
    model's device). compile: torch.compile the static loop's decode step (worth it on a GPU only).
    dtype: the static loop samples with a copy of the weights in this dtype (bf16 / fp16: what a mixed-precision
    run computes in; fp32 master weights would make every decode step a full-precision one); the hf backend runs
    under autocast to it instead."""
    device = next(model.parameters()).device
    chosen = resolve_backend(model, backend)
    was_training = model.training
    model.eval()
    parts = []
    try:
        for start in range(0, len(prompts), batch_size):
            ids, mask = encode_prompts(tokenizer, prompts[start : start + batch_size])
            ids, mask = ids.to(device), mask.to(device)
            decoding = Decoding(max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, temperature, top_p,
                                top_k)
            if chosen == "static":
                try:
                    response, lp, flp = generate_static(model, ids, mask, decoding, compile=compile, dtype=dtype)
                except RuntimeError as exc:
                    # a forward patched to run under its own autocast (Accelerate's prepared models) writes keys
                    # and values of different dtypes into the one-dtype static cache: such a model samples
                    # through transformers' generate instead
                    if "dtype" not in str(exc):
                        raise
                    log.warning("static-cache sampling failed (%s); using transformers' generate for this model",
                                str(exc).splitlines()[0])
                    chosen = "hf"
            if chosen != "static":
                low = dtype is not None and dtype != next(model.parameters()).dtype
                with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=low):
                    response, lp, flp = generate_hf(model, ids, mask, decoding)
            parts.append((ids.cpu(), mask.cpu(), response.cpu(), lp.cpu(), flp.cpu()))
    finally:
        model.train(was_training)
    P = max(p[0].shape[1] for p in parts)
    R = max(max(p[2].shape[1] for p in parts), 1)
    pad = tokenizer.pad_token_id
    prompt_ids = torch.cat([torch.nn.functional.pad(p[0], (P - p[0].shape[1], 0), value=pad) for p in parts])
    prompt_mask = torch.cat([torch.nn.functional.pad(p[1], (P - p[1].shape[1], 0), value=0) for p in parts])
    response_ids = torch.cat([torch.nn.functional.pad(p[2], (0, R - p[2].shape[1]), value=pad) for p in parts])
    logprobs = torch.cat([torch.nn.functional.pad(p[3], (0, R - p[3].shape[1])) for p in parts])  # (B, R)
    filtered = torch.cat([torch.nn.functional.pad(p[4], (0, R - p[4].shape[1])) for p in parts])  # (B, R)
    is_eos = response_ids == tokenizer.eos_token_id  # (B, R)
    ended = is_eos.any(-1)
    first_eos = torch.where(ended, is_eos.float().argmax(-1), torch.full_like(ended, R, dtype=torch.long))
    positions = torch.arange(R)[None, :]
    response_mask = (positions <= first_eos[:, None]).long()  # (B, R), EOS itself counts
    response_ids = torch.where(response_mask.bool(), response_ids, torch.full_like(response_ids, pad))
    padding = ~response_mask.bool()
    logprobs, filtered = logprobs.masked_fill(padding, 0.0), filtered.masked_fill(padding, 0.0)
    texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, ended, [t.strip() for t in texts],
                   logprobs, filtered)


# ------------------------------------------------------------------------------------------------- streaming
@dataclass
class TokenStep:
    token_id: int
    logprob: float
    """Log-prob of the token under the model's own (untempered, untruncated) distribution: what an
    OpenAI-compatible API reports, whatever the sampling settings."""
    top: list[tuple[int, float]]
    """The `top_logprobs` most likely (token id, log-prob) pairs under the same distribution, most likely first."""


def stream(
    model: Any,
    prompt_ids: Sequence[int],
    decoding: Decoding,
    top_logprobs: int = 0,
    generator: torch.Generator | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[TokenStep]:
    """Sample up to max_new_tokens tokens after one prompt's ids, yielding each as it is chosen and stopping
    after EOS: one forward pass per token over the model's dynamic KV cache (any architecture). The token is
    picked by `choose_tokens`, as in batched sampling. `should_stop` is asked before every forward pass; once it
    returns True the stream ends early (a server whose client has gone)."""
    device = next(model.parameters()).device
    cache_kw = _cache_kwarg(model) or "past_key_values"
    past = None
    cur = torch.tensor([list(prompt_ids)], device=device)  # (1, P), then (1, 1)
    for _ in range(decoding.max_new_tokens):
        if should_stop is not None and should_stop():
            return
        # grad mode is per thread and a generator may resume on another one: set it for each step, never
        # across a yield
        with torch.inference_mode():
            out = model(input_ids=cur, use_cache=True, **{cache_kw: past})
            past = getattr(out, cache_kw, None)
            logits = out.logits[:, -1].float()  # (1, V)
            # shifted to max 0, so a tiny temperature divides into -inf at worst, never inf - inf
            logits = logits - logits.max()
            tokens, _, _ = choose_tokens(logits, decoding.temperature, decoding.top_k, decoding.top_p, generator)
            token = int(tokens[0])
            logp = torch.log_softmax(logits[0], dim=-1)  # (V,)
            top: list[tuple[int, float]] = []
            if top_logprobs > 0:
                values, idx = logp.topk(top_logprobs)
                top = [(int(i), float(v)) for v, i in zip(values, idx)]
            step = TokenStep(token, float(logp[token]), top)
        yield step
        if token == decoding.eos_token_id:
            return
        cur = torch.tensor([[token]], device=device)
