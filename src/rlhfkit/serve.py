"""`rlhfkit serve --model DIR`: an OpenAI-compatible HTTP server for any saved policy (or any causal LM directory),
so ordinary clients (the official `openai` package, curl, LangChain) can use a trained model, and another run can
use it as a judge (`--judge.backend openai`).

Endpoints: GET /v1/models, POST /v1/completions (prompt string or list; n; stop; logprobs with top alternatives
and text offsets; echo, which scores the prompt), POST /v1/chat/completions (the model's own chat template;
logprobs/top_logprobs), both with `stream: true` as server-sent events ending in `data: [DONE]`.

Reported log-probabilities are the model's own next-token log-softmax (temperature 1, no top-p), whatever the
sampling settings: exactly what `models.logprobs_of` computes on prompt + completion, so they can be checked
against training-side scoring. Binds 127.0.0.1 by default; set --api-key-env to require a bearer key.

One worker thread runs the model, one request at a time, in the order requests arrived; at most --max-queue wait
(503 beyond). A request whose client has gone is abandoned at its next token. Each request's work is bounded
(--max-body-bytes, --max-prompts, --max-sampled-tokens) before it waits in line."""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) at run time
import asyncio
import collections
import hmac
import json
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from rlhfkit.errors import ConfigError, UserError

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit for chat; completions allows 5, we allow 20 for both
MAX_N = 16  # most choices (`n`) per prompt
# Below this a temperature is refused rather than sampled: its limit is greedy decoding (send 0 for that), and
# a temperature like 1e-300 is 0 in float32, so dividing the logits by it gives NaN probabilities.
MIN_TEMPERATURE = 1e-3
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
# A prompt longer than this many characters per token of context is first tokenised a prefix at a time, so a
# huge prompt is refused after reading about as many tokens as the model's context (English runs ~4 per token).
CHARS_PER_TOKEN_PROBE = 8


@dataclass
class ServeConfig:
    """Serve a causal LM directory over an OpenAI-compatible HTTP API."""

    model: str = ""
    """The Hugging Face model directory to serve (a policy saved by any rlhfkit stage)."""
    model_name: str = ""
    """The model id clients pass as `model` (default: the directory's name)."""
    host: str = "127.0.0.1"
    """Interface to bind; the default serves this machine only. Put a TLS proxy in front before binding to a
    public interface."""
    port: int = 8000
    """TCP port."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    max_tokens_limit: int = 1024
    """Most new tokens one request may ask for."""
    max_prompts: int = 32
    """Most prompts one /v1/completions request may carry as a list (the judge backend sends --judge.batch-size
    of them, 8 by default); more is refused with 400."""
    max_sampled_tokens: int = 16384
    """Most tokens one request may ask to sample in all, prompts × n × max_tokens; more is refused with 400.
    The default lets one prompt use n = 16 at the default max_tokens_limit."""
    max_body_bytes: int = 2 * 1024 * 1024
    """Most bytes a request body may have; a larger one is refused with 413 before it is parsed (by its
    Content-Length, or counted as it arrives)."""
    max_queue: int = 64
    """Most requests that may wait while the model serves another; one more is refused with 503 and Retry-After
    (the OpenAI client and the judge backend retry)."""
    shutdown_grace_s: int = 2
    """SIGTERM abandons the generation in progress and every waiting request at once (answered 503; a stream
    ends with an error event); this many seconds more are given to responses still being sent to slow readers."""
    api_key_env: str = ""
    """Name of an environment variable holding the API key clients must send as `Authorization: Bearer KEY`
    (empty: no key required, fine on 127.0.0.1). With a key, every path needs it, /openapi.json included, and it
    is checked before the body is read."""
    seed: int = 0
    """Seed of the server's sampling generator (a request's own `seed` overrides it for that request)."""

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("--model is required: the model directory to serve.")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}.")
        self.validate_limits()

    def validate_limits(self) -> None:
        for name in ("max_tokens_limit", "max_prompts", "max_sampled_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}.")
        for name in ("max_queue", "shutdown_grace_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_flag(name)} must be 0 or more, got {getattr(self, name)}.")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class APIError(Exception):
    """An error answered in the OpenAI error format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Abandoned(Exception):
    """The request's client has gone, or the server is stopping: stop generating for it."""


def _show(value: Any, width: int = 40) -> str:
    """repr for an error message, cut short (a client may send megabytes where a number belongs)."""
    text = repr(value)
    return text if len(text) <= width else text[:width] + "…"


# -------------------------------------------------------------------------------------------------- engine
@dataclass
class Step:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Engine:
    """The model, its tokenizer and a lock: one generation at a time (a CPU or one GPU has nothing to gain from
    interleaving requests of a small model, and the KV cache is per request)."""

    def __init__(self, model_dir: str, name: str = "", device: str = "auto", seed: int = 0):
        import torch

        from rlhfkit.models import load_causal_lm, load_tokenizer

        self.tokenizer = load_tokenizer(model_dir)
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.model = load_causal_lm(model_dir, self.tokenizer).eval().to(dev)
        self.device = dev
        self.name = name or Path(model_dir).resolve().name
        self.lock = threading.Lock()
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.created = int(time.time())

    # -- text <-> tokens
    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def decode_after(self, context: Sequence[int], ids: Sequence[int]) -> str:
        """The text `ids` add after `context`, spacing included (a word-level or SentencePiece tokenizer puts the
        separating space on the join, which decoding `ids` alone would lose)."""
        if not ids:
            return ""
        tail = list(context[-8:])  # a little context decides the join; decoding the whole prompt is wasted work
        before = self.decode(tail)
        full = self.decode(tail + list(ids))
        return full[len(before):] if full.startswith(before) else self.decode(ids)

    def refuse_if_too_long(self, text: str, special_tokens: bool, param: str) -> None:
        """Raise context_length_exceeded when a prefix of `text` already fills the context. Prefixes double from
        CHARS_PER_TOKEN_PROBE characters per context token: ordinary text is refused after the first, and only
        text packing more characters into each token is read further (the body limit bounds that)."""
        window = CHARS_PER_TOKEN_PROBE * self.max_positions
        while window < len(text):
            head = text[:window]
            cut = head.rfind(" ")  # end the prefix at a space: its tokens are then a prefix of the text's
            head = head[:cut] if cut > 0 else head
            if len(self.tokenizer(head, add_special_tokens=special_tokens)["input_ids"]) >= self.max_positions:
                raise APIError(400, f"the prompt has more tokens than this model's maximum context length of "
                                    f"{self.max_positions} tokens (its first {len(head):,} characters already fill "
                                    "it); shorten the prompt.", param, "context_length_exceeded")
            window *= 2

    def encode_text(self, text: str, param: str | None = None) -> tuple[list[int], list[int]]:
        """Token ids of a plain prompt (with the tokenizer's BOS) and each token's character offset in `text`.
        With `param` (the request field it came from), a text longer than the context is refused first."""
        if param is not None:
            self.refuse_if_too_long(text, True, param)
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        return enc["input_ids"], [start for start, _ in enc["offset_mapping"]]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError(400, f"model {self.name!r} has no chat template, so /v1/chat/completions cannot format "
                                "messages; use /v1/completions with a plain prompt.", "messages")
        from rlhfkit.data.encoding import encode_prompt, render_prompt

        try:
            self.refuse_if_too_long(render_prompt(self.tokenizer, messages), False, "messages")
            # the same ids a training stage gives this conversation (the template writes its own BOS)
            return encode_prompt(self.tokenizer, messages)
        except APIError:
            raise
        except Exception as exc:  # the template refused the conversation (jinja's raise_exception, a bad role)
            raise APIError(400, f"the model's chat template cannot format these messages: {exc}",
                           "messages") from None

    def _top(self, logp: Any, k: int) -> list[tuple[int, float]]:
        if k <= 0:
            return []
        values, idx = logp.topk(k)
        return [(int(i), float(v)) for v, i in zip(values, idx)]

    # -- scoring and sampling
    def prompt_logprobs(self, ids: list[int], top: int) -> list[Step | None]:
        """Log-prob of each prompt token given the ones before it (None for the first). The LM head runs on a
        chunk of positions at a time (`models.final_hidden`): a long prompt's (T, V) logits, 1.2 GB in float32
        for 2,000 tokens of a 152k vocabulary, never exist at once."""
        import torch

        from rlhfkit.models import final_hidden, position_ids_from_mask, rows_per_chunk

        with torch.inference_mode():
            x = torch.tensor([ids], device=self.device)
            mask = torch.ones_like(x)
            got = final_hidden(self.model, x, mask, position_ids_from_mask(mask))
            if got is None:  # logits that are more than the head's linear map (soft-capping...): the full logits
                logits = self.model(input_ids=x).logits[0]

                def rows(s: int, e: int) -> Any:
                    return logits[s:e].float()
                vocab = logits.shape[-1]
            else:
                hidden, head = got[0][0], got[1]

                def rows(s: int, e: int) -> Any:
                    return torch.nn.functional.linear(hidden[s:e], head.weight, head.bias).float()
                vocab = head.weight.shape[0]
            out: list[Step | None] = [None]
            size = rows_per_chunk(vocab)
            for s in range(0, len(ids) - 1, size):
                e = min(s + size, len(ids) - 1)
                logp = torch.log_softmax(rows(s, e), dim=-1)  # (chunk, V): position t predicts token t + 1
                for t in range(s, e):
                    out.append(Step(ids[t + 1], float(logp[t - s, ids[t + 1]]), self._top(logp[t - s], top)))
        return out

    def generate(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, top: int,
                 generator: Any, cancelled: threading.Event | None = None) -> Iterator[Step]:
        """Sample up to max_tokens tokens after `ids` (`generation.stream`: KV cache, one token per forward pass),
        stopping after EOS. Raises Abandoned before the next forward pass once `cancelled` is set."""
        from rlhfkit.generation import Decoding, stream

        eos = self.tokenizer.eos_token_id
        gone = cancelled.is_set if cancelled is not None else None
        made, finished = 0, False
        decoding = Decoding(max_tokens, eos, self.tokenizer.pad_token_id, temperature, top_p)
        for step in stream(self.model, ids, decoding, top_logprobs=top, generator=generator, should_stop=gone):
            made, finished = made + 1, step.token_id == eos
            yield Step(step.token_id, step.logprob, step.top)
        if not finished and made < max_tokens and gone is not None and gone():
            raise Abandoned()  # the stream stopped early: the client has gone


# ------------------------------------------------------------------------------------------- request logic
def _number(body: dict[str, Any], key: str, default: Any, kind: type, low: float, high: float,
            above_low: bool = False) -> Any:
    """body[key] as `kind`, within [low, high] ((low, high] with above_low); 400 naming the field otherwise."""
    value = body.get(key, default)
    if value is None:
        return default
    whole = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (whole or kind is float):
        raise APIError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {_show(value)}.", key)
    # ints compare exactly with the bounds, however large; NaN fails every comparison and is refused here
    if not ((low < value if above_low else low <= value) and value <= high):
        lo, hi = (f"{x:g}" if isinstance(x, float) else str(x) for x in (low, high))
        interval = f"above {lo} and at most {hi}" if above_low else f"between {lo} and {hi}"
        raise APIError(400, f"'{key}' must be {interval}, got {_show(value)}.", key)
    return kind(value)


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 of them.", "stop")
    return stops


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stops: list[str]
    top: int
    logprobs: bool
    stream: bool
    include_usage: bool
    generator: Any


def _sampling(engine: Engine, body: dict[str, Any], limit: int, chat: bool) -> Sampling:
    import torch

    max_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, max_key, 16 if not chat else limit, int, 0, limit)
    if chat:
        logprobs = bool(body.get("logprobs") or False)
        top = _number(body, "top_logprobs", 0, int, 0, MAX_TOP_LOGPROBS)
        if top and not logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true.", "top_logprobs")
    else:
        raw = body.get("logprobs")
        logprobs = raw is not None
        top = _number(body, "logprobs", 0, int, 0, MAX_TOP_LOGPROBS) if logprobs else 0
    temperature = _number(body, "temperature", 1.0, float, 0.0, 2.0)
    if 0 < temperature < MIN_TEMPERATURE:
        raise APIError(400, f"'temperature' must be 0 (greedy decoding) or between {MIN_TEMPERATURE:g} and 2, got "
                            f"{temperature!r}.", "temperature")
    seed = _number(body, "seed", None, int, *SEED_RANGE)
    generator = torch.Generator().manual_seed(seed) if seed is not None else engine.generator
    options = body.get("stream_options") or {}
    return Sampling(max_tokens=max_tokens, temperature=temperature,
                    top_p=_number(body, "top_p", 1.0, float, 0.0, 1.0, above_low=True),
                    n=_number(body, "n", 1, int, 1, MAX_N), stops=_stops(body), top=top, logprobs=logprobs,
                    stream=bool(body.get("stream") or False),
                    include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
                    generator=generator)


def _bound_work(prompts: int, s: Sampling, cfg: ServeConfig) -> None:
    """Refuse a request that asks for more sampled tokens in all than the server allows."""
    asked = prompts * s.n * s.max_tokens
    if asked > cfg.max_sampled_tokens:
        raise APIError(400, f"this request asks to sample up to {asked:,} tokens ({prompts} prompt(s) × n {s.n} × "
                            f"max_tokens {s.max_tokens}), more than this server's limit of {cfg.max_sampled_tokens:,} "
                            f"per request ({_flag('max_sampled_tokens')}); lower max_tokens or n, or split the "
                            "prompts across requests.", "max_tokens", "request_too_large")


@dataclass
class Completion:
    """One finished (or streamed) choice."""

    text: str = ""
    steps: list[Step] = field(default_factory=list)
    finish_reason: str = "length"


def _run(engine: Engine, ids: list[int], s: Sampling, budget: int, chat: bool = False,
         cancelled: threading.Event | None = None) -> Iterator[tuple[str, Step | None, Completion]]:
    """Yield (new text, step, state) as tokens arrive; text is held back while it could still become a stop
    sequence. The final yield carries the finish reason. A chat reply starts at its first character; a
    completion keeps the space that joins it to the prompt."""
    done = Completion()
    generated: list[int] = []
    sent = ""
    hold = max((len(x) for x in s.stops), default=1) - 1
    eos = engine.tokenizer.eos_token_id
    for step in engine.generate(ids, budget, s.temperature, s.top_p, s.top, s.generator, cancelled):
        if step.token_id == eos:
            done.steps.append(step)
            done.finish_reason = "stop"
            break
        generated.append(step.token_id)
        done.steps.append(step)
        full = engine.decode_after(ids, generated)
        full = full.lstrip() if chat else full
        cut = min((full.find(x) for x in s.stops if x in full), default=-1)
        if cut >= 0:
            done.finish_reason = "stop"
            full = full[:cut]
            new = full[len(sent):] if full.startswith(sent) else ""
            sent = full
            done.text = full
            yield new, step, done
            return
        ready = full[: max(len(sent), len(full) - hold)]
        # a byte-level token can be one byte of a multi-byte character, which decodes alone as U+FFFD: hold it
        # back until the character is complete, or the text sent so far would stop being a prefix of the reply
        while len(ready) > len(sent) and ready.endswith("\ufffd"):
            ready = ready[:-1]
        new = ready[len(sent):] if ready.startswith(sent) else ""
        sent = sent + new
        done.text = full
        yield new, step, done
    full = engine.decode_after(ids, generated)
    full = full.lstrip() if chat else full
    done.text = full
    yield (full[len(sent):] if full.startswith(sent) else ""), None, done


def _budget(engine: Engine, ids: list[int], s: Sampling, param: str) -> int:
    if not ids:
        raise APIError(400, f"'{param}' holds an empty prompt, which gives the model no token to start from.", param)
    room = engine.max_positions - len(ids)
    if room <= 0:
        raise APIError(400, f"the prompt has {len(ids)} tokens, which is at least this model's maximum context "
                            f"length of {engine.max_positions} tokens; shorten the prompt.", param,
                       "context_length_exceeded")
    return min(s.max_tokens, room)


def _completion_logprobs(engine: Engine, steps: Sequence[Step | None], offsets: Sequence[int]) -> dict[str, Any]:
    return {
        "tokens": [engine.token_text(st.token_id) if st else "" for st in steps],
        "token_logprobs": [st.logprob if st else None for st in steps],
        "top_logprobs": [({engine.token_text(i): v for i, v in st.top} if st and st.top else None) for st in steps],
        "text_offset": list(offsets),
    }


def _generated_offsets(engine: Engine, context: list[int], steps: Sequence[Step], start: int) -> list[int]:
    """Character offset of each generated token in prompt + completion text (the legacy API's convention:
    text[offset:offset + len(token)] is the token). A byte-level BPE token carries its leading space, so it starts
    at the space; a word-level or SentencePiece token does not, so it starts past the space that joins it."""
    out, ids = [], []
    for st in steps:
        before = engine.decode_after(context, ids)
        piece = engine.decode_after(context, ids + [st.token_id])[len(before):]
        token, lead = engine.token_text(st.token_id), len(piece) - len(piece.lstrip())
        skip = 0 if piece.startswith(token) or not piece[lead:].startswith(token) else lead
        out.append(start + len(before) + skip)
        ids.append(st.token_id)
    return out


def _chat_logprobs(engine: Engine, steps: Sequence[Step]) -> dict[str, Any]:
    def entry(token_id: int, lp: float) -> dict[str, Any]:
        text = engine.token_text(token_id)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(st.token_id, st.logprob), "top_logprobs": [entry(i, v) for i, v in st.top]}
                        for st in steps], "refusal": None}


def _unicode(text: str, param: str) -> str:
    """`text`, refused when JSON escapes made it a lone surrogate half, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"'{param}' holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is "
                            "not text.", param) from None
    return text


def _prompts(body: dict[str, Any], cfg: ServeConfig) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if isinstance(prompts, list) and len(prompts) > cfg.max_prompts:  # counted before anything looks inside
        raise APIError(400, f"'prompt' holds {len(prompts):,} prompts, more than this server's limit of "
                            f"{cfg.max_prompts} per request ({_flag('max_prompts')}); split them across requests.",
                       "prompt", "request_too_large")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise APIError(400, "'prompt' must be a string or a non-empty list of strings (token-id prompts are not "
                            "supported).", "prompt")
    return [_unicode(p, "prompt") for p in prompts]


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects.", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise APIError(400, f"messages[{i}] needs a role of system, user or assistant.", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            content = "".join(texts) if all(isinstance(t, str) for t in texts) else None
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts.",
                           f"messages[{i}].content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"],
                    "content": _unicode(content, f"messages[{i}].content")})
    return out


def _sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


Result = dict[str, Any] | Iterator[str]


@dataclass
class Work:
    """A checked request. `run(cancelled)` tokenises and generates (on the server's worker thread) and returns
    the response body, or the server-sent events of a stream; it raises Abandoned once `cancelled` is set."""

    run: Callable[[threading.Event], Result]


def completions(engine: Engine, body: dict[str, Any], cfg: ServeConfig) -> Work:
    """Check a /v1/completions body (cheap: nothing is tokenised) and return the work it asks for."""
    s = _sampling(engine, body, cfg.max_tokens_limit, chat=False)
    prompts = _prompts(body, cfg)
    _bound_work(len(prompts), s, cfg)
    echo = bool(body.get("echo") or False)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def base(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": engine.name, "choices": choices}

    def run(cancelled: threading.Event) -> Result:
        encoded = [engine.encode_text(p, "prompt") for p in prompts]
        budgets = [_budget(engine, ids, s, "prompt") for ids, _ in encoded]
        return events(cancelled, encoded, budgets) if s.stream else whole(cancelled, encoded, budgets)

    def events(cancelled: threading.Event, encoded: list[tuple[list[int], list[int]]],
               budgets: list[int]) -> Iterator[str]:
        usage = [0, 0]
        for pi, ((ids, _), budget) in enumerate(zip(encoded, budgets)):
            for k in range(s.n):
                index = pi * s.n + k
                if echo:
                    yield _sse(base([{"index": index, "text": prompts[pi], "logprobs": None, "finish_reason": None}]))
                for new, step, done in _run(engine, ids, s, budget, cancelled=cancelled):
                    lp = _completion_logprobs(engine, [step], [0]) if s.logprobs and step else None
                    if new or lp:
                        yield _sse(base([{"index": index, "text": new, "logprobs": lp, "finish_reason": None}]))
                yield _sse(base([{"index": index, "text": "", "logprobs": None, "finish_reason": done.finish_reason}]))
                usage[0] += len(ids)
                usage[1] += len(done.steps)
        if s.include_usage:
            yield _sse({**base([]), "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                              "total_tokens": sum(usage)}})
        yield _sse("[DONE]")

    def whole(cancelled: threading.Event, encoded: list[tuple[list[int], list[int]]],
              budgets: list[int]) -> dict[str, Any]:
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for pi, ((ids, offsets), budget) in enumerate(zip(encoded, budgets)):
            if cancelled.is_set():
                raise Abandoned()
            scored = engine.prompt_logprobs(ids, s.top) if echo and s.logprobs else []
            for k in range(s.n):
                done = Completion()
                if budget and s.max_tokens > 0:
                    for _new, _step, done in _run(engine, ids, s, budget, cancelled=cancelled):
                        pass
                text = (prompts[pi] if echo else "") + done.text
                lp = None
                if s.logprobs:
                    start = len(prompts[pi])
                    gen_steps = [st for st in done.steps if st.token_id != engine.tokenizer.eos_token_id]
                    gen = _completion_logprobs(engine, gen_steps, _generated_offsets(engine, ids, gen_steps, start))
                    if echo:
                        head = _completion_logprobs(engine, scored, offsets)
                        lp = {key: head[key] + gen[key] for key in head}
                    else:
                        lp = gen
                choices.append({"index": pi * s.n + k, "text": text, "logprobs": lp,
                                "finish_reason": done.finish_reason})
                completion_tokens += len(done.steps)
            prompt_tokens += len(ids)
        return {**base(choices), "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                           "total_tokens": prompt_tokens + completion_tokens}}

    return Work(run)


def chat_completions(engine: Engine, body: dict[str, Any], cfg: ServeConfig) -> Work:
    """Check a /v1/chat/completions body and return the work it asks for."""
    s = _sampling(engine, body, cfg.max_tokens_limit, chat=True)
    messages = _messages(body)
    _bound_work(1, s, cfg)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def base(choices: list[dict[str, Any]], kind: str) -> dict[str, Any]:
        return {"id": rid, "object": kind, "created": created, "model": engine.name, "system_fingerprint": None,
                "choices": choices}

    def run(cancelled: threading.Event) -> Result:
        ids = engine.encode_chat(messages)
        budget = _budget(engine, ids, s, "messages")
        return events(cancelled, ids, budget) if s.stream else whole(cancelled, ids, budget)

    def events(cancelled: threading.Event, ids: list[int], budget: int) -> Iterator[str]:
        completion_tokens = 0
        for k in range(s.n):
            yield _sse(base([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}], "chat.completion.chunk"))
            for new, step, done in _run(engine, ids, s, budget, chat=True, cancelled=cancelled):
                lp = _chat_logprobs(engine, [step]) if s.logprobs and step else None
                if new or lp:
                    yield _sse(base([{"index": k, "delta": {"content": new}, "logprobs": lp, "finish_reason": None}],
                                    "chat.completion.chunk"))
            yield _sse(base([{"index": k, "delta": {}, "logprobs": None, "finish_reason": done.finish_reason}],
                            "chat.completion.chunk"))
            completion_tokens += len(done.steps)
        if s.include_usage:
            yield _sse({**base([], "chat.completion.chunk"),
                        "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                                  "total_tokens": len(ids) + completion_tokens}})
        yield _sse("[DONE]")

    def whole(cancelled: threading.Event, ids: list[int], budget: int) -> dict[str, Any]:
        choices, completion_tokens = [], 0
        for k in range(s.n):
            done = Completion()
            if budget and s.max_tokens > 0:
                for _new, _step, done in _run(engine, ids, s, budget, chat=True, cancelled=cancelled):
                    pass
            gen_steps = [st for st in done.steps if st.token_id != engine.tokenizer.eos_token_id]
            choices.append({"index": k, "message": {"role": "assistant", "content": done.text, "refusal": None},
                            "logprobs": _chat_logprobs(engine, gen_steps) if s.logprobs else None,
                            "finish_reason": done.finish_reason})
            completion_tokens += len(done.steps)
        return {**base(choices, "chat.completion"),
                "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                          "total_tokens": len(ids) + completion_tokens}}

    return Work(run)


# ---------------------------------------------------------------------------------------- the waiting line
class _Job:
    """One request's work, and the channel its results travel back on, from the worker thread to the event
    loop the request waits in."""

    def __init__(self, work: Work) -> None:
        self.work = work
        self.cancelled = threading.Event()
        self.loop = asyncio.get_running_loop()
        self.results: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(self, kind: str, value: Any = None) -> None:
        """Hand the request a result (body | start | event | end | error | gone); safe from any thread."""
        try:
            self.loop.call_soon_threadsafe(self.results.put_nowait, (kind, value))
        except RuntimeError:  # the request's loop has closed: nobody is waiting
            pass


class Worker:
    """Runs requests' work on one thread, one at a time and in the order they arrived, with at most `max_queue`
    waiting. Cancelling a job takes it out of the line, or stops it at its next token."""

    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine, self.max_queue = engine, max_queue
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._running: _Job | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def waiting(self) -> int:
        with self._cv:
            return len(self._waiting)

    def submit(self, job: _Job) -> None:
        with self._cv:
            if self._closed:
                raise APIError(503, "the server is stopping; retry against a running server.", None,
                               "server_stopping", "server_error")
            busy = self._running is not None or self._waiting
            if busy and len(self._waiting) >= self.max_queue:
                raise APIError(503, f"the server is busy: {len(self._waiting)} requests are already waiting, this "
                                    f"server's limit ({_flag('max_queue')}); retry shortly.", None, "server_busy",
                               "server_error", {"Retry-After": "1"})
            self._waiting.append(job)
            if self._thread is None:  # started on first use: an app that never serves starts no thread
                self._thread = threading.Thread(target=self._loop, name="rlhfkit-serve-worker", daemon=True)
                self._thread.start()
            self._cv.notify()

    def cancel(self, job: _Job) -> None:
        """Abandon `job` (a no-op once it has finished)."""
        job.cancelled.set()
        with self._cv:
            if job in self._waiting:
                self._waiting.remove(job)
                job.put("gone")

    def close(self) -> None:
        """Refuse new work and abandon what is waiting or running."""
        with self._cv:
            self._closed = True
            for job in [*self._waiting, *([self._running] if self._running else [])]:
                job.cancelled.set()
            for job in self._waiting:
                job.put("gone")
            self._waiting.clear()
            self._cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                job = self._running = self._waiting.popleft()
            try:
                with self.engine.lock:  # apps sharing one engine (tests) still take turns
                    self._execute(job)
            finally:
                with self._cv:
                    self._running = None

    @staticmethod
    def _execute(job: _Job) -> None:
        try:
            if job.cancelled.is_set():
                raise Abandoned()
            result = job.work.run(job.cancelled)
            if isinstance(result, dict):
                job.put("body", result)
                return
            job.put("start")
            try:
                for event in result:
                    job.put("event", event)
            finally:
                result.close()  # type: ignore[attr-defined]
            job.put("end")
        except Abandoned:
            job.put("gone")
        except APIError as exc:
            job.put("error", exc)
        except Exception:
            log.exception("a request failed on the server")
            job.put("error", APIError(500, "the server failed while generating; its log has the details.", None,
                                      None, "server_error"))


async def _cancel_when_gone(receive: Callable[[], Any], worker: Worker, job: _Job) -> None:
    """Once the request's body has been read, the next ASGI message is http.disconnect: the client has gone (or
    the response is complete), so the job is abandoned."""
    while (await receive())["type"] != "http.disconnect":
        pass
    worker.cancel(job)


# ------------------------------------------------------------------------------------------------- the app
def _json_error(exc: APIError) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class _Guard:
    """ASGI middleware in front of every path: the API key is checked (401) and the body is bounded (413, by its
    Content-Length or counted as it arrives) before any endpoint reads or parses a byte of the body."""

    def __init__(self, app: Any, api_key: str, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]  # raw bytes: a non-ASCII header is compared, never decoded
        if self.expected is not None:
            sent = [v for k, v in headers if k == b"authorization"]
            if len(sent) != 1 or not hmac.compare_digest(sent[0], self.expected):
                error = APIError(401, "missing or wrong API key; send it as 'Authorization: Bearer KEY'.", None,
                                 "invalid_api_key", "authentication_error")
                await _json_error(error)(scope, receive, send)
                return
        length = [v for k, v in headers if k == b"content-length"]
        if length and length[0].isdigit() and int(length[0]) > self.max_body_bytes:
            await _json_error(self._too_large())(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise self._too_large()  # answered by the app's APIError handler
            return message

        await self.app(scope, counted, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of {self.max_body_bytes:,} "
                             f"bytes ({_flag('max_body_bytes')}).", None, "request_too_large")


def _event_stream(job: _Job, done: Callable[[], None]) -> Any:
    """The server-sent events of a streamed job, sent as the worker makes them. However the response ends
    (finished, client gone, server stopping), `done` runs, so the job never outlives its request."""
    from starlette.responses import StreamingResponse

    class EventStream(StreamingResponse):
        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            try:
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                while True:
                    kind, value = await job.results.get()
                    if kind == "event":
                        await send({"type": "http.response.body", "body": value.encode(), "more_body": True})
                        continue
                    if kind in ("error", "gone"):  # after the 200 went out an error can only be an event
                        error = value if kind == "error" else _abandoned()
                        await send({"type": "http.response.body", "body": _sse(error.body()).encode(),
                                    "more_body": True})
                    break
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                done()

    return EventStream(iter(()), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _abandoned() -> APIError:
    return APIError(503, "the request was abandoned: the server is stopping (or the client left).", None,
                    "abandoned", "server_error")


def _parse(raw: bytes) -> Any:
    """JSON as the OpenAI API takes it: NaN, Infinity and numbers that overflow to infinity are not numbers."""
    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"the number {text[:40]} is out of range")
        return value

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(raw, parse_float=finite, parse_constant=constant)
    except RecursionError:
        raise APIError(400, "the request body nests too deeply to parse.") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise APIError(400, f"the request body is not valid JSON ({_show(str(exc), 120)}).") from None


def create_app(engine: Engine, cfg: ServeConfig | None = None, api_key: str = "",
               max_tokens_limit: int | None = None) -> Any:
    """The FastAPI app serving `engine` with `cfg`'s limits (defaults: ServeConfig's); `max_tokens_limit`
    overrides cfg's."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse

    cfg = cfg or ServeConfig()
    if max_tokens_limit is not None:
        cfg = replace(cfg, max_tokens_limit=max_tokens_limit)
    cfg.validate_limits()
    worker = Worker(engine, cfg.max_queue)

    @asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        yield
        worker.close()  # stopping: what still waits or runs is abandoned

    app = FastAPI(title="rlhfkit serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.worker = worker
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=cfg.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> Any:
        return _json_error(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> Any:  # 404, 405 in the same shape
        return _json_error(APIError(exc.status_code, str(exc.detail), headers=exc.headers))

    def check(body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object.")
        model = body.get("model")
        if model is not None and model != engine.name:
            raise APIError(404, f"the model {_show(model)} is not served here; this server serves {engine.name!r}.",
                           "model", "model_not_found")
        return body

    async def read(request: Request) -> dict[str, Any]:
        try:
            raw = await request.body()
        except ClientDisconnect:  # nobody will read the answer; this one only keeps the log quiet
            raise APIError(400, "the client left before sending the whole body.") from None
        return check(_parse(raw))

    async def serve(request: Request, work: Work) -> Any:
        job = _Job(work)
        worker.submit(job)  # 503 when the line is full
        watch = asyncio.ensure_future(_cancel_when_gone(request.receive, worker, job))

        def done() -> None:
            watch.cancel()
            worker.cancel(job)

        streaming = False
        try:
            kind, value = await job.results.get()
            if kind == "body":
                return JSONResponse(value)
            if kind == "error":
                raise value
            if kind == "gone":
                raise _abandoned()
            streaming = True
            return _event_stream(job, done)
        finally:
            if not streaming:
                done()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": engine.created,
                                            "owned_by": "rlhfkit"}]}

    @app.post("/v1/completions")
    async def post_completions(request: Request) -> Any:
        return await serve(request, completions(engine, await read(request), cfg))

    @app.post("/v1/chat/completions")
    async def post_chat(request: Request) -> Any:
        return await serve(request, chat_completions(engine, await read(request), cfg))

    return app


def main(cfg: ServeConfig) -> None:
    cfg.validate()
    try:
        import uvicorn
    except ImportError:
        raise UserError("serving needs the web extra; install it with pip install 'rlhfkit[web]'.") from None
    api_key = ""
    if cfg.api_key_env:
        api_key = os.environ.get(cfg.api_key_env, "")
        if not api_key:
            raise UserError(f"--api-key-env names {cfg.api_key_env}, which is not set; export it or leave "
                            "--api-key-env empty.")
    engine = Engine(cfg.model, cfg.model_name, cfg.device, cfg.seed)
    app = create_app(engine, cfg, api_key)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # SIGTERM / Ctrl-C: abandon what waits or runs at once (each request is answered 503, a stream ends
            # with an error event), so open requests finish and uvicorn stops without waiting out the grace
            # period. From a thread: a signal handler must not take the worker's lock the main thread may hold.
            threading.Thread(target=app.state.worker.close, daemon=True).start()

    log.info("serving %s as %r on http://%s:%d/v1", cfg.model, engine.name, cfg.host, cfg.port)
    # shutdown_grace_s bounds how long responses still being sent (to a client that reads slowly) hold the exit
    Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                          timeout_graceful_shutdown=cfg.shutdown_grace_s)).run()
