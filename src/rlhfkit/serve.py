"""`rlhfkit serve --model DIR`: an OpenAI-compatible HTTP server for any saved policy (or any causal LM directory),
so ordinary clients (the official `openai` package, curl, LangChain) can use a trained model, and another run can
use it as a judge (`--judge.backend openai`).

Endpoints: GET /v1/models, POST /v1/completions (prompt string or list; n; stop; logprobs with top alternatives
and text offsets; echo, which scores the prompt), POST /v1/chat/completions (the model's own chat template;
logprobs/top_logprobs), both with `stream: true` as server-sent events ending in `data: [DONE]`.

Reported log-probabilities are the model's own next-token log-softmax (temperature 1, no top-p), whatever the
sampling settings: exactly what `models.logprobs_of` computes on prompt + completion, so they can be checked
against training-side scoring. Binds 127.0.0.1 by default; set --api-key-env to require a bearer key."""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) at run time
import inspect
import json
import logging
import os
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from rlhfkit.errors import ConfigError, UserError

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit for chat; completions allows 5, we allow 20 for both


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
    api_key_env: str = ""
    """Name of an environment variable holding the API key clients must send as `Authorization: Bearer KEY`
    (empty: no key required, fine on 127.0.0.1)."""
    seed: int = 0
    """Seed of the server's sampling generator (a request's own `seed` overrides it for that request)."""

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("--model is required: the model directory to serve.")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}.")
        if self.max_tokens_limit < 1:
            raise ConfigError(f"max_tokens_limit must be at least 1, got {self.max_tokens_limit}.")


class APIError(Exception):
    """An error answered in the OpenAI error format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


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

    def encode_text(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of a plain prompt (with the tokenizer's BOS) and each token's character offset in `text`."""
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        return enc["input_ids"], [start for start, _ in enc["offset_mapping"]]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError(400, f"model {self.name!r} has no chat template, so /v1/chat/completions cannot format "
                                "messages; use /v1/completions with a plain prompt.", "messages")
        from rlhfkit.data.encoding import encode_prompt

        # the same ids a training stage gives this conversation (the template writes its own BOS)
        return encode_prompt(self.tokenizer, messages)

    def _top(self, logp: Any, k: int) -> list[tuple[int, float]]:
        if k <= 0:
            return []
        values, idx = logp.topk(k)
        return [(int(i), float(v)) for v, i in zip(values, idx)]

    # -- scoring and sampling
    def prompt_logprobs(self, ids: list[int], top: int) -> list[Step | None]:
        """Log-prob of each prompt token given the ones before it (None for the first)."""
        import torch

        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float()  # (T, V)
        logp = torch.log_softmax(logits, dim=-1)  # (T, V)
        out: list[Step | None] = [None]
        for t in range(1, len(ids)):
            out.append(Step(ids[t], float(logp[t - 1, ids[t]]), self._top(logp[t - 1], top)))
        return out

    def generate(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, top: int,
                 generator: Any) -> Iterator[Step]:
        """Sample up to max_tokens tokens after `ids` (KV cache, one token per forward pass), stopping after EOS."""
        import torch

        # transformers 5.2x renamed the cache argument and output from past_key_values to cache
        params = inspect.signature(self.model.forward).parameters
        key = "cache" if "cache" in params else "past_key_values"
        past = None
        cur = torch.tensor([ids], device=self.device)  # (1, P), then (1, 1)
        eos = self.tokenizer.eos_token_id
        with torch.no_grad():
            for _ in range(max_tokens):
                out = self.model(input_ids=cur, use_cache=True, **{key: past})
                past = getattr(out, key, None)
                logits = out.logits[0, -1].float()  # (V,)
                logp = torch.log_softmax(logits, dim=-1)  # (V,): what is reported
                if temperature <= 0:
                    token = int(logits.argmax())
                else:
                    scaled = logits / temperature
                    if top_p < 1.0:  # nucleus sampling (Holtzman et al. 2020): keep the smallest set with mass >= p
                        sorted_logits, order = scaled.sort(descending=True)
                        mass = torch.softmax(sorted_logits, -1).cumsum(-1)
                        drop = mass - torch.softmax(sorted_logits, -1) >= top_p  # mass before this token already >= p
                        scaled = scaled.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
                    probs = torch.softmax(scaled, dim=-1).cpu()
                    token = int(torch.multinomial(probs, 1, generator=generator))
                yield Step(token, float(logp[token]), self._top(logp, top))
                if token == eos:
                    return
                cur = torch.tensor([[token]], device=self.device)


# ------------------------------------------------------------------------------------------- request logic
def _number(body: dict[str, Any], key: str, default: Any, kind: type, low: float | None = None,
            high: float | None = None) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise APIError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}.", key)
    value = kind(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise APIError(400, f"'{key}' must be between {low} and {high}, got {value}.", key)
    return value


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
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
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"'seed' must be an integer, got {seed!r}.", "seed")
    generator = torch.Generator().manual_seed(seed) if seed is not None else engine.generator
    options = body.get("stream_options") or {}
    return Sampling(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
                    top_p=_number(body, "top_p", 1.0, float, 0.0, 1.0), n=_number(body, "n", 1, int, 1, 16),
                    stops=_stops(body), top=top, logprobs=logprobs, stream=bool(body.get("stream") or False),
                    include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
                    generator=generator)


@dataclass
class Completion:
    """One finished (or streamed) choice."""

    text: str = ""
    steps: list[Step] = field(default_factory=list)
    finish_reason: str = "length"


def _run(engine: Engine, ids: list[int], s: Sampling, budget: int,
         chat: bool = False) -> Iterator[tuple[str, Step | None, Completion]]:
    """Yield (new text, step, state) as tokens arrive; text is held back while it could still become a stop
    sequence. The final yield carries the finish reason. A chat reply starts at its first character; a
    completion keeps the space that joins it to the prompt."""
    done = Completion()
    generated: list[int] = []
    sent = ""
    hold = max((len(x) for x in s.stops), default=1) - 1
    eos = engine.tokenizer.eos_token_id
    for step in engine.generate(ids, budget, s.temperature, s.top_p, s.top, s.generator):
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
        new = ready[len(sent):] if ready.startswith(sent) else ""
        sent = sent + new
        done.text = full
        yield new, step, done
    full = engine.decode_after(ids, generated)
    full = full.lstrip() if chat else full
    done.text = full
    yield (full[len(sent):] if full.startswith(sent) else ""), None, done


def _budget(engine: Engine, ids: list[int], s: Sampling) -> int:
    room = engine.max_positions - len(ids)
    if room <= 0:
        raise APIError(400, f"the prompt has {len(ids)} tokens, which is at least this model's maximum context "
                            f"length of {engine.max_positions} tokens; shorten the prompt.", "prompt",
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
    """Character offset of each generated token in prompt + completion text (the legacy API's convention),
    pointing past the space that joins it to the text before."""
    out, ids = [], []
    for st in steps:
        before = engine.decode_after(context, ids)
        piece = engine.decode_after(context, ids + [st.token_id])[len(before):]
        out.append(start + len(before) + len(piece) - len(piece.lstrip()))
        ids.append(st.token_id)
    return out


def _chat_logprobs(engine: Engine, steps: Sequence[Step]) -> dict[str, Any]:
    def entry(token_id: int, lp: float) -> dict[str, Any]:
        text = engine.token_text(token_id)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(st.token_id, st.logprob), "top_logprobs": [entry(i, v) for i, v in st.top]}
                        for st in steps], "refusal": None}


def _prompts(body: dict[str, Any]) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise APIError(400, "'prompt' must be a string or a non-empty list of strings (token-id prompts are not "
                            "supported).", "prompt")
    return prompts


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
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts.",
                           f"messages[{i}].content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def completions(engine: Engine, body: dict[str, Any], limit: int) -> dict[str, Any] | Iterator[str]:
    s = _sampling(engine, body, limit, chat=False)
    prompts = _prompts(body)
    echo = bool(body.get("echo") or False)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    encoded = [engine.encode_text(p) for p in prompts]
    budgets = [_budget(engine, ids, s) for ids, _ in encoded]

    def base(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": engine.name, "choices": choices}

    if s.stream:
        def events() -> Iterator[str]:
            usage = [0, 0]
            with engine.lock:
                for pi, ((ids, _), budget) in enumerate(zip(encoded, budgets)):
                    for k in range(s.n):
                        index = pi * s.n + k
                        if echo:
                            yield _sse(base([{"index": index, "text": prompts[pi], "logprobs": None,
                                              "finish_reason": None}]))
                        for new, step, done in _run(engine, ids, s, budget):
                            lp = _completion_logprobs(engine, [step], [0]) if s.logprobs and step else None
                            if new or lp:
                                yield _sse(base([{"index": index, "text": new, "logprobs": lp, "finish_reason": None}]))
                        yield _sse(base([{"index": index, "text": "", "logprobs": None,
                                          "finish_reason": done.finish_reason}]))
                        usage[0] += len(ids)
                        usage[1] += len(done.steps)
            if s.include_usage:
                yield _sse({**base([]), "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                                  "total_tokens": sum(usage)}})
            yield _sse("[DONE]")
        return events()

    choices, prompt_tokens, completion_tokens = [], 0, 0
    with engine.lock:
        for pi, ((ids, offsets), budget) in enumerate(zip(encoded, budgets)):
            scored = engine.prompt_logprobs(ids, s.top) if echo and s.logprobs else []
            for k in range(s.n):
                done = Completion()
                if budget and s.max_tokens > 0:
                    for _new, _step, done in _run(engine, ids, s, budget):
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


def chat_completions(engine: Engine, body: dict[str, Any], limit: int) -> dict[str, Any] | Iterator[str]:
    s = _sampling(engine, body, limit, chat=True)
    ids = engine.encode_chat(_messages(body))
    budget = _budget(engine, ids, s)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def base(choices: list[dict[str, Any]], kind: str) -> dict[str, Any]:
        return {"id": rid, "object": kind, "created": created, "model": engine.name, "system_fingerprint": None,
                "choices": choices}

    if s.stream:
        def events() -> Iterator[str]:
            completion_tokens = 0
            with engine.lock:
                for k in range(s.n):
                    yield _sse(base([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}], "chat.completion.chunk"))
                    for new, step, done in _run(engine, ids, s, budget, chat=True):
                        lp = _chat_logprobs(engine, [step]) if s.logprobs and step else None
                        if new or lp:
                            yield _sse(base([{"index": k, "delta": {"content": new}, "logprobs": lp,
                                              "finish_reason": None}], "chat.completion.chunk"))
                    yield _sse(base([{"index": k, "delta": {}, "logprobs": None, "finish_reason": done.finish_reason}],
                                    "chat.completion.chunk"))
                    completion_tokens += len(done.steps)
            if s.include_usage:
                yield _sse({**base([], "chat.completion.chunk"),
                            "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                                      "total_tokens": len(ids) + completion_tokens}})
            yield _sse("[DONE]")
        return events()

    choices, completion_tokens = [], 0
    with engine.lock:
        for k in range(s.n):
            done = Completion()
            if budget and s.max_tokens > 0:
                for _new, _step, done in _run(engine, ids, s, budget, chat=True):
                    pass
            gen_steps = [st for st in done.steps if st.token_id != engine.tokenizer.eos_token_id]
            choices.append({"index": k, "message": {"role": "assistant", "content": done.text, "refusal": None},
                            "logprobs": _chat_logprobs(engine, gen_steps) if s.logprobs else None,
                            "finish_reason": done.finish_reason})
            completion_tokens += len(done.steps)
    return {**base(choices, "chat.completion"),
            "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                      "total_tokens": len(ids) + completion_tokens}}


# ------------------------------------------------------------------------------------------------- the app
def create_app(engine: Engine, max_tokens_limit: int = 1024, api_key: str = "") -> Any:
    """The FastAPI app serving `engine`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="rlhfkit serve", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    def check(request: Request, body: Any) -> dict[str, Any]:
        if api_key:
            sent = request.headers.get("authorization", "")
            if not secrets.compare_digest(sent, f"Bearer {api_key}"):
                raise APIError(401, "missing or wrong API key; send it as 'Authorization: Bearer KEY'.", None,
                               "invalid_api_key", "authentication_error")
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object.")
        model = body.get("model")
        if model is not None and model != engine.name:
            raise APIError(404, f"the model {model!r} is not served here; this server serves {engine.name!r}.",
                           "model", "model_not_found")
        return body

    async def read(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise APIError(400, "the request body is not valid JSON.") from None

    def answer(result: dict[str, Any] | Iterator[str]) -> Any:
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models")
    def models(request: Request) -> dict[str, Any]:
        check(request, {})
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": engine.created,
                                            "owned_by": "rlhfkit"}]}

    @app.post("/v1/completions")
    async def post_completions(request: Request) -> Any:
        from starlette.concurrency import run_in_threadpool

        body = check(request, await read(request))
        return answer(await run_in_threadpool(completions, engine, body, max_tokens_limit))

    @app.post("/v1/chat/completions")
    async def post_chat(request: Request) -> Any:
        from starlette.concurrency import run_in_threadpool

        body = check(request, await read(request))
        return answer(await run_in_threadpool(chat_completions, engine, body, max_tokens_limit))

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
    log.info("serving %s as %r on http://%s:%d/v1", cfg.model, engine.name, cfg.host, cfg.port)
    uvicorn.run(create_app(engine, cfg.max_tokens_limit, api_key), host=cfg.host, port=cfg.port, log_level="warning")
