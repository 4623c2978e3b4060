"""AI judges: the backends that answer a feedback model's prompts (a local Hugging Face causal LM, or any
OpenAI-compatible HTTP endpoint), an on-disk cache in front of them, and `LMJudge`, which puts a constitution's
critique, revision and comparison prompts to a backend.

A comparison's answer is P(first response better). With log-probabilities it is the softmax of the judge's
log-probs of the two answer options after "The answer is: (" (Bai et al. 2022, arXiv 2212.08073, section 4.1);
where a backend gives none (a chat endpoint whose top log-probs miss the options) the answer is parsed from
generated text and counts as 1, 0, or abstained."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from rlhfkit.errors import ConfigError, UserError
from rlhfkit.feedback.constitution import Constitution, Principle
from rlhfkit.feedback.protocols import Comparison, Verdict

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- the config
@dataclass
class JudgeConfig:
    """Which model judges, and how it is reached."""

    backend: Literal["playground", "hf", "openai"] = "playground"
    """playground: the simulated constitutional judge of the built-in world (CPU, no model); hf: a local Hugging
    Face causal LM directory (`model`); openai: any OpenAI-compatible HTTP endpoint (`base_url`, `model`)."""
    model: str = ""
    """hf: the model directory; openai: the model name the endpoint serves."""
    base_url: str = ""
    """openai: the API root, e.g. http://127.0.0.1:8000/v1 (an `rlhfkit serve` server) or a hosted API."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: name of the environment variable holding the API key (never the key itself: command lines are
    visible to every local user). Unset is fine for a local server."""
    endpoint: Literal["completions", "chat"] = "completions"
    """openai: completions scores the answer options exactly (echo + logprobs) and batches prompts in one request;
    chat uses the first token's top log-probs and falls back to parsing the text."""
    options: list[str] = field(default_factory=lambda: ["A", "B"])
    """The two answer options whose log-probs decide a comparison (default A, B: the template ends with '(')."""
    chat: bool = True
    """hf: wrap each judge prompt in the model's chat template as one user turn (when it has one)."""
    max_new_tokens: int = 64
    """Longest critique or revision the judge writes (comparisons parsed from text use 8)."""
    temperature: float = 0.0
    """Sampling temperature of critiques and revisions (0: greedy)."""
    batch_size: int = 8
    """Prompts per request (completions) or concurrent requests (chat); hf: prompts per forward pass."""
    timeout_s: float = 60.0
    """openai: seconds before a request is abandoned and retried."""
    max_retries: int = 4
    """openai: retries of a failed request (connection error, timeout, 429 or 5xx) with exponential back-off."""
    backoff_s: float = 1.0
    """openai: first back-off delay; it doubles on each retry (a Retry-After header wins when larger)."""
    cache_dir: str = ""
    """Directory of the on-disk cache of judge answers (empty: the run's output_dir/judge-cache); a rerun with
    the same prompts costs nothing. 'none' turns the cache off."""
    device: str = "auto"
    """hf: cpu, cuda, or auto."""

    def validate(self) -> None:
        if self.backend == "hf" and not self.model:
            raise ConfigError("judge.backend hf needs --judge.model, a Hugging Face model directory.")
        if self.backend == "openai" and not (self.base_url and self.model):
            raise ConfigError("judge.backend openai needs --judge.base-url (e.g. http://127.0.0.1:8000/v1) and "
                              "--judge.model (the served model's name).")
        if len(self.options) != 2 or len(set(self.options)) != 2 or not all(o.strip() for o in self.options):
            raise ConfigError(f"judge.options must be two different non-empty strings, got {self.options}.")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"judge.{name} must be at least 1, got {getattr(self, name)}.")
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0:
            raise ConfigError("judge.timeout_s must be positive and judge.max_retries / judge.backoff_s 0 or more.")


# ----------------------------------------------------------------------------------------------- the cache
class CachedBackend:
    """A backend with an append-only JSONL cache: each answer is stored under a hash of (backend name, method,
    arguments), so a rerun asks the backend only what it has not answered before. Sampled answers are cached
    too (a rerun returns the same text)."""

    def __init__(self, backend: Any, directory: str | Path):
        self.backend = backend
        self.name = backend.name
        self.path = Path(directory) / "cache.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._store: dict[str, Any] = {}
        self.hits = self.misses = 0
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a torn last line from an interrupted run: ignore it
                    continue
                self._store[entry["key"]] = entry["value"]

    def _key(self, method: str, *args: Any) -> str:
        blob = json.dumps([self.name, method, *args], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _cached(self, method: str, prompts: Sequence[str], extra: list[Any],
                call: Callable[[list[str]], list[Any]]) -> list[Any]:
        keys = [self._key(method, p, *extra) for p in prompts]
        todo = [i for i, k in enumerate(keys) if k not in self._store]
        self.hits += len(prompts) - len(todo)
        self.misses += len(todo)
        if todo:
            answers = call([prompts[i] for i in todo])
            with self._lock, self.path.open("a", encoding="utf-8") as fh:
                for i, value in zip(todo, answers):
                    self._store[keys[i]] = value
                    fh.write(json.dumps({"key": keys[i], "value": value}, ensure_ascii=False) + "\n")
        return [self._store[k] for k in keys]

    def generate(self, prompts: Sequence[str], max_tokens: int, temperature: float) -> list[str]:
        return self._cached("generate", prompts, [max_tokens, temperature],
                            lambda todo: self.backend.generate(todo, max_tokens, temperature))

    def option_logprobs(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float] | None]:
        return self._cached("option_logprobs", prompts, [list(options)],
                            lambda todo: self.backend.option_logprobs(todo, options))


# ------------------------------------------------------------------------------------- local HF causal LM
class HFBackend:
    """A local causal LM directory. Generation goes through the same sampler as PPO; option log-probs are the
    summed log-probs of the option's tokens after the prompt, from one forward pass per batch."""

    def __init__(self, model_dir: str, chat: bool = True, batch_size: int = 8, device: str = "auto"):
        import torch

        from rlhfkit.models import load_causal_lm, load_tokenizer

        self.tokenizer = load_tokenizer(model_dir)
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.model = load_causal_lm(model_dir, self.tokenizer).eval().to(dev)
        self.chat = chat and getattr(self.tokenizer, "chat_template", None) is not None
        self.batch_size = batch_size
        stamp = Path(model_dir) / "config.json"
        self.name = f"hf:{Path(model_dir).resolve()}:{stamp.stat().st_mtime_ns}:chat={self.chat}"

    def generate(self, prompts: Sequence[str], max_tokens: int, temperature: float) -> list[str]:
        from rlhfkit.generation import sample

        return sample(self.model, self.tokenizer, [self._as_prompt(p) for p in prompts], max_new_tokens=max_tokens,
                      temperature=temperature, batch_size=self.batch_size).texts

    def _as_prompt(self, prompt: str) -> Any:
        """chat: the judge prompt as a user turn through the model's template; else plain text."""
        from rlhfkit.data.encoding import user_turn

        return user_turn(prompt) if self.chat else prompt

    def _prompt_ids(self, prompt: str) -> list[int]:
        from rlhfkit.data.encoding import encode_prompt

        return encode_prompt(self.tokenizer, self._as_prompt(prompt))

    def option_logprobs(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float] | None]:
        import torch

        from rlhfkit.models import logprobs_of

        option_ids = [self.tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
        if any(not ids for ids in option_ids):
            raise UserError(f"judge option(s) {list(options)} tokenize to nothing; choose visible option strings.")
        seqs = [(self._prompt_ids(p), oi) for p in prompts for oi in option_ids]  # prompt-major
        out: list[float] = []
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start:start + self.batch_size]
            T = max(len(p) + len(o) for p, o in chunk)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)  # (B, T) right-padded
            mask = torch.zeros((len(chunk), T), dtype=torch.long)  # 1 = real token
            answer = torch.zeros((len(chunk), T - 1))  # 1 where log-prob entry t scores an option token
            for b, (p, o) in enumerate(chunk):
                ids[b, :len(p) + len(o)] = torch.tensor(p + o)
                mask[b, :len(p) + len(o)] = 1
                answer[b, len(p) - 1:len(p) - 1 + len(o)] = 1
            with torch.no_grad():
                lp = logprobs_of(self.model, ids.to(device), mask.to(device)).cpu()  # (B, T-1)
            out += (lp * answer).sum(-1).tolist()
        k = len(options)
        return [out[i * k:(i + 1) * k] for i in range(len(prompts))]


# -------------------------------------------------------------------------------- OpenAI-compatible HTTP API
class OpenAIBackend:
    """Any OpenAI-compatible endpoint (`rlhfkit serve`, vLLM, a hosted API), reached with httpx: prompts batched
    (one completions request holds `batch_size` prompts; chat requests run `batch_size` at a time), every request
    retried with exponential back-off on connection errors, timeouts, 429 and 5xx."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 endpoint: str = "completions", batch_size: int = 8, timeout_s: float = 60.0, max_retries: int = 4,
                 backoff_s: float = 1.0, sleep: Callable[[float], None] = time.sleep, transport: Any = None):
        import httpx

        key = os.environ.get(api_key_env, "") if api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.base_url, self.api_key_env = base_url.rstrip("/"), api_key_env
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s, transport=transport)
        self.model, self.endpoint, self.batch_size = model, endpoint, batch_size
        self.max_retries, self.backoff_s, self.sleep = max_retries, backoff_s, sleep
        self.name = f"openai:{self.base_url}:{model}:{endpoint}"
        self.requests = 0

    # -- one request, retried
    def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        import httpx

        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = self.backoff_s * 2 ** (attempt - 1)
                self.sleep(max(delay, getattr(self, "_retry_after", 0.0)))
            self._retry_after = 0.0
            self.requests += 1
            try:
                resp = self.client.post(path, json=payload)
            except httpx.TransportError as exc:  # connection refused/reset, timeouts
                last = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                try:
                    self._retry_after = float(resp.headers.get("retry-after", 0))
                except ValueError:
                    self._retry_after = 0.0
                continue
            if resp.status_code >= 400:
                raise UserError(f"the judge endpoint {self.base_url}{path} refused the request (HTTP "
                                f"{resp.status_code}: {_error_message(resp)}); check judge.model, judge.base_url and "
                                f"the API key in ${self.api_key_env}.")
            return resp.json()
        raise UserError(f"the judge endpoint {self.base_url}{path} did not answer after {self.max_retries + 1} tries "
                        f"(last error: {last}); check that the server is running and judge.base_url is right.")

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if len(items) <= 1 or self.batch_size == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=self.batch_size) as pool:
            return list(pool.map(fn, items))

    def _batches(self, items: Sequence[Any]) -> list[list[Any]]:
        return [list(items[i:i + self.batch_size]) for i in range(0, len(items), self.batch_size)]

    # -- the Backend protocol
    def generate(self, prompts: Sequence[str], max_tokens: int, temperature: float) -> list[str]:
        if self.endpoint == "chat":
            def one(prompt: str) -> str:
                out = self.post("/chat/completions", {"model": self.model, "max_tokens": max_tokens,
                                                       "temperature": temperature,
                                                       "messages": [{"role": "user", "content": prompt}]})
                return out["choices"][0]["message"]["content"] or ""
            return self._map(one, prompts)
        texts: list[str] = []
        for batch in self._batches(prompts):
            out = self.post("/completions", {"model": self.model, "prompt": batch, "max_tokens": max_tokens,
                                             "temperature": temperature})
            by_index = sorted(out["choices"], key=lambda c: c["index"])
            texts += [c["text"] for c in by_index]
        return texts

    def option_logprobs(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float] | None]:
        if self.endpoint == "chat":
            return self._map(lambda p: self._chat_option_logprobs(p, options), prompts)
        # completions: score prompt + option exactly with echo (the legacy OpenAI way, also vLLM's): the log-probs
        # of the echoed tokens at or after the option's first character belong to the option
        jobs = [(p, o) for p in prompts for o in options]
        scores: list[float | None] = []
        for batch in self._batches(jobs):
            out = self.post("/completions", {"model": self.model, "prompt": [p + o for p, o in batch],
                                             "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 0})
            for choice, (p, o) in zip(sorted(out["choices"], key=lambda c: c["index"]), batch):
                lp = choice.get("logprobs") or {}
                offsets, values = lp.get("text_offset"), lp.get("token_logprobs")
                if not offsets or not values:
                    scores.append(None)
                    continue
                end = len(p) + len(o)
                picked = [v for off, v in zip(offsets, values) if len(p) <= off < end and v is not None]
                scores.append(sum(picked) if picked else None)
        k = len(options)
        grouped = [scores[i * k:(i + 1) * k] for i in range(len(prompts))]
        return [None if any(s is None for s in g) else [float(s) for s in g] for g in grouped]

    def _chat_option_logprobs(self, prompt: str, options: Sequence[str]) -> list[float] | None:
        out = self.post("/chat/completions", {"model": self.model, "max_tokens": 1, "temperature": 0,
                                               "logprobs": True, "top_logprobs": 20,
                                               "messages": [{"role": "user", "content": prompt}]})
        content = ((out["choices"][0].get("logprobs") or {}).get("content")) or []
        if not content:
            return None
        top = {t["token"].strip(): t["logprob"] for t in content[0].get("top_logprobs", [])}
        found = [top.get(o.strip()) for o in options]
        return None if any(v is None for v in found) else [float(v) for v in found]


def _error_message(resp: Any) -> str:
    try:
        body = resp.json()
        return str(body.get("error", {}).get("message") or body)[:300]
    except ValueError:
        return resp.text[:300]


# ------------------------------------------------------------------------------------------ the LM judge
_ANSWER_RE = re.compile(r"^\W*(?:\(|response\s+|option\s+)?([ab])\b", re.I)


def parse_choice(text: str, options: Sequence[str] = ("A", "B")) -> float | None:
    """P(first better) from a judge's generated answer: 1.0 when it starts with option one ('A', '(A)',
    'Response A'), 0.0 for option two, None when neither can be read."""
    if list(options) == ["A", "B"]:
        m = _ANSWER_RE.match(text.strip())
        return None if m is None else (1.0 if m.group(1).upper() == "A" else 0.0)
    head = text.strip().lower()
    first, second = (o.strip().lower() for o in options)
    if head.startswith(first) and not head.startswith(second):
        return 1.0
    if head.startswith(second) and not head.startswith(first):
        return 0.0
    return None


def prob_from_logprobs(logprobs: Sequence[float]) -> float:
    """P(option one) from the two options' log-probs: softmax restricted to the two options,
    σ(lp_A − lp_B) (Bai et al. 2022, section 4.1: normalised probabilities of (A) and (B))."""
    a, b = logprobs
    d = a - b
    return 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))


class LMJudge:
    """A constitution put to a text backend with the CAI prompt templates."""

    def __init__(self, backend: Any, constitution: Constitution, options: Sequence[str] = ("A", "B"),
                 max_new_tokens: int = 64, temperature: float = 0.0):
        self.backend, self.constitution = backend, constitution
        self.options = list(options)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.name = backend.name

    def comparison_text(self, c: Comparison) -> str:
        return self.constitution.templates["comparison"].format(prompt=c.prompt, question=c.principle.comparison,
                                                                first=c.first, second=c.second)

    def compare(self, items: Sequence[Comparison]) -> list[Verdict]:
        texts = [self.comparison_text(c) for c in items]
        logprobs = self.backend.option_logprobs(texts, self.options) if texts else []
        verdicts: list[Verdict | None] = [None if lp is None else Verdict(prob_from_logprobs(lp), "logprobs")
                                          for lp in logprobs]
        missing = [i for i, v in enumerate(verdicts) if v is None]
        if missing:
            answers = self.backend.generate([texts[i] for i in missing], 8, 0.0)
            for i, text in zip(missing, answers):
                p = parse_choice(text, self.options)
                verdicts[i] = Verdict(p, "text" if p is not None else "none", text)
        return [v for v in verdicts if v is not None]

    def critique(self, prompts: Sequence[str], responses: Sequence[str], principles: Sequence[Principle]) -> list[str]:
        t = self.constitution.templates["critique"]
        texts = [t.format(prompt=p, response=r, critique=pr.critique) for p, r, pr in zip(prompts, responses, principles)]
        return [x.strip() for x in self.backend.generate(texts, self.max_new_tokens, self.temperature)]

    def revise(self, prompts: Sequence[str], responses: Sequence[str], principles: Sequence[Principle],
               critiques: Sequence[str]) -> list[str]:
        t = self.constitution.templates["revision"]
        texts = [t.format(prompt=p, response=r, critique=pr.critique, critique_text=c, revision=pr.revision)
                 for p, r, pr, c in zip(prompts, responses, principles, critiques)]
        out = [x.strip() for x in self.backend.generate(texts, self.max_new_tokens, self.temperature)]
        # an empty revision would erase the response; keep the original then (counted by the caller)
        return [x if x else r for x, r in zip(out, responses)]
