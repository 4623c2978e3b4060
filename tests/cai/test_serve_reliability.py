"""`rlhfkit serve` under bad input and unlucky clients: clients that leave mid-stream, oversized and malformed
requests, bad keys, a full waiting line, and SIGTERM. Most tests drive a real uvicorn server in a thread of this
process (real HTTP, real disconnects, and the engine in reach for hooks); the 50-client test runs `rlhfkit serve`
in a subprocess so it can be stopped with SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("fastapi", reason="the server tests need the `web` extra")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from rlhfkit.serve import Engine, ServeConfig, create_app  # noqa: E402

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from cai.cai_helpers import make_playground_model

    return make_playground_model(tmp_path_factory.mktemp("serve-reliability") / "policy")


class Hooks:
    """Forward hooks on the engine's model: count passes, slow each one down, hold the first one at a gate, keep
    EOS from being sampled (so a generation runs to max_tokens), and record each prompt's length as its job
    starts (the order jobs are served in)."""

    def __init__(self, engine: Engine):
        self.engine, self.passes, self.started, self.grad = engine, 0, [], []
        self.delay, self.no_eos = 0.0, False
        self.gate: threading.Event | None = None
        self.at_gate = threading.Event()
        engine.model.register_forward_hook(self._hook, with_kwargs=True)

    def reset(self) -> None:
        self.passes, self.started, self.grad = 0, [], []
        self.delay, self.no_eos, self.gate = 0.0, False, None
        self.at_gate.clear()

    def _hook(self, _module, _args, kwargs, output):
        self.passes += 1
        self.grad.append(torch.is_grad_enabled())
        length = kwargs["input_ids"].shape[1]
        if length > 1:  # a job's first pass reads its whole prompt; later ones one token each
            self.started.append(length)
            if self.gate is not None:
                self.at_gate.set()
                assert self.gate.wait(60), "the test never opened the gate"
                self.gate = None
        if self.no_eos:
            output.logits[..., self.engine.tokenizer.eos_token_id] = float("-inf")
        if self.delay:
            time.sleep(self.delay)
        return output


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = Engine(str(model_dir), name="policy", device="cpu", seed=0)
    eng.hooks = Hooks(eng)
    return eng


@contextmanager
def live_server(app):
    """uvicorn serving `app` in a thread of this process on a free port; yields the base URL."""
    import uvicorn

    from cai.cai_helpers import free_port

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                          timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(15)


@contextmanager
def _live(engine, app):
    engine.hooks.reset()
    try:
        with live_server(app) as base:
            yield base, app, engine.hooks
    finally:
        engine.hooks.reset()


@pytest.fixture
def live(engine):
    """A live server with default limits (max_tokens up to 200) and an API key; hooks reset around each test."""
    with _live(engine, create_app(engine, max_tokens_limit=200, api_key=KEY)) as served:
        yield served


@pytest.fixture
def live_short_line(engine):
    """The same with at most 3 requests waiting."""
    with _live(engine, create_app(engine, ServeConfig(max_tokens_limit=200, max_queue=3), api_key=KEY)) as served:
        yield served


def _post(base, path, payload, timeout=30.0, **kw):
    return httpx.post(base + path, json=payload, headers=AUTH, timeout=timeout, **kw)


def _settle(hooks, quiet=0.5, limit=10.0) -> int:
    """Wait until no forward pass has run for `quiet` seconds; return the pass count."""
    deadline = time.time() + limit
    seen = hooks.passes
    while time.time() < deadline:
        time.sleep(quiet)
        if hooks.passes == seen:
            return seen
        seen = hooks.passes
    raise AssertionError("the model kept running")


def _wait_for(predicate, limit=10.0):
    deadline = time.time() + limit
    while not predicate():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.01)


# ------------------------------------------------------------------------------ 1. clients that leave
@pytest.mark.parametrize("route, payload", [
    ("/v1/completions", {"prompt": "say hello to anna ."}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "say hello to anna ."}]}),
])
def test_a_client_leaving_mid_stream_frees_the_server_and_its_generation_stops(live, route, payload):
    base, _, hooks = live
    hooks.no_eos, hooks.delay = True, 0.01  # unabandoned, this stream would run 200 passes (2 s or more)
    with httpx.Client(base_url=base, headers=AUTH, timeout=30) as client:
        with client.stream("POST", route, json={**payload, "max_tokens": 200, "stream": True}) as resp:
            assert resp.status_code == 200
            events = 0
            for line in resp.iter_lines():
                events += line.startswith("data: ")
                if events == 3:
                    break
    # the connection is closed: the job stops at its next token instead of running to 200
    passes = _settle(hooks)
    assert 2 <= passes < 100, passes
    hooks.no_eos, hooks.delay = False, 0.0
    answer = _post(base, "/v1/completions", {"prompt": "what is 3 plus 4 ?", "max_tokens": 3}, timeout=10)
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"]


def test_a_client_that_times_out_on_a_plain_request_is_abandoned(live):
    base, _, hooks = live
    hooks.no_eos, hooks.delay = True, 0.02  # 200 passes would take 4 s or more
    with pytest.raises(httpx.ReadTimeout):
        _post(base, "/v1/completions", {"prompt": "say hello to tom .", "max_tokens": 200}, timeout=0.5)
    passes = _settle(hooks)
    assert passes < 150, passes
    hooks.no_eos, hooks.delay = False, 0.0
    assert _post(base, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, timeout=10).status_code == 200


# ---------------------------------------------------------------------------- 2. bounded work per request
@pytest.fixture(scope="module")
def small(engine):
    """An in-process client with small limits."""
    cfg = ServeConfig(max_tokens_limit=64, max_prompts=4, max_sampled_tokens=100, max_body_bytes=16 * 1024)
    return TestClient(create_app(engine, cfg))


@pytest.mark.parametrize("payload, param, words", [
    ({"prompt": ["a"] * 2000, "max_tokens": 1}, "prompt", ["2,000 prompts", "limit of 4", "--max-prompts"]),
    ({"prompt": ["a", "b"], "n": 4, "max_tokens": 13}, "max_tokens",
     ["104 tokens", "2 prompt(s) × n 4 × max_tokens 13", "limit of 100", "--max-sampled-tokens"]),
])
def test_work_per_request_is_bounded(small, payload, param, words):
    resp = small.post("/v1/completions", json=payload)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"], error["message"]
    ok = small.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 25})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 4


def test_a_chat_asking_too_many_tokens_is_refused(small):
    resp = small.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 2})
    assert resp.status_code == 400 and "--max-sampled-tokens" in resp.json()["error"]["message"]


@pytest.fixture(scope="module")
def plain(engine):
    """An in-process client with default limits."""
    return TestClient(create_app(engine, max_tokens_limit=64))


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_is_refused_with_413(small, chunked):
    body = json.dumps({"prompt": "a " * 10_000}).encode()
    content = iter([body[:1000], body[1000:]]) if chunked else body  # a generator goes out chunked, unsized
    resp = small.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert resp.status_code == 413
    error = resp.json()["error"]
    assert "16,384 bytes" in error["message"] and "--max-body-bytes" in error["message"]
    assert small.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200


class SpyTokenizer:
    """The engine's tokenizer, recording the length of every text it is asked to tokenise."""

    def __init__(self, tokenizer):
        self.__dict__["_inner"], self.__dict__["lengths"] = tokenizer, []

    def __call__(self, text, *args, **kwargs):
        self.lengths.append(len(text))
        return self._inner(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.mark.parametrize("route, payload", [
    ("/v1/completions", lambda text: {"prompt": text}),
    ("/v1/chat/completions", lambda text: {"messages": [{"role": "user", "content": text}]}),
])
def test_a_20mb_prompt_is_refused_after_tokenising_a_prefix(engine, monkeypatch, route, payload):
    spy = SpyTokenizer(engine.tokenizer)
    monkeypatch.setattr(engine, "tokenizer", spy)
    client = TestClient(create_app(engine, ServeConfig(max_body_bytes=32 * 1024 * 1024)))
    text = "say hello to anna . " * 1_000_000  # 20 MB
    resp = client.post(route, json={**payload(text), "max_tokens": 1})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "context_length_exceeded" and "maximum context length" in error["message"]
    # the context is 256 tokens: nothing near the whole text was tokenised
    assert spy.lengths and max(spy.lengths) <= 8 * 256 * 4, spy.lengths


# ---------------------------------------------------------------------- 3. 400 not 500; keys before bodies
@pytest.mark.parametrize("raw, param", [
    (b'{"prompt": "a", "temperature": NaN}', None),
    (b'{"prompt": "a", "temperature": 1e-40}', "temperature"),
    (b'{"prompt": "a", "temperature": 1e-300}', "temperature"),
    (b'{"prompt": "a", "top_p": 0}', "top_p"),
    (b'{"prompt": "a", "seed": 1180591620717411303424}', "seed"),  # 2**70
    (b'{"prompt": "a", "max_tokens": 1e999}', None),  # overflows to infinity
    (b'{"prompt": "a", "n": ' + b"9" * 400 + b"}", "n"),  # float() of it overflows
    (b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}", None),
    (b'{"prompt": "a \\ud800 b"}', "prompt"),
])
def test_bad_numbers_and_deep_nesting_get_400(plain, raw, param):
    resp = plain.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_a_non_ascii_authorization_header_is_refused_with_401(engine):
    client = TestClient(create_app(engine, api_key=KEY))
    resp = client.post("/v1/completions", json={"prompt": "a"}, headers={"Authorization": b"Bearer \xff\xfe"})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"


def test_the_api_key_guards_openapi_and_is_checked_before_the_body(engine):
    client = TestClient(create_app(engine, api_key=KEY))
    assert client.get("/openapi.json").status_code == 401
    assert client.get("/openapi.json", headers=AUTH).status_code == 200
    # a wrong key with a body that would fail to parse: the key is what is answered
    wrong = client.post("/v1/completions", content=b"{not json", headers={"Authorization": "Bearer no"})
    assert wrong.status_code == 401


def test_the_key_is_checked_before_the_body_is_read(live):
    """Headers announce 10 bytes of body that never come: with a wrong key the answer is 401 at once; a server
    that read the body first would wait for it."""
    base, _, _ = live
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer no\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 10\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 401")


def test_streaming_runs_every_forward_pass_with_autograd_off_on_whatever_thread_resumes_it(engine):
    """Grad mode is per thread, and a streaming response's generator can be resumed on a different thread at
    each step (Starlette iterates a sync stream in its thread pool): drive it from a new thread every time."""
    engine.hooks.reset()
    ids, _ = engine.encode_text("say hello to anna .")
    steps = engine.generate(ids, 6, 1.0, 1.0, 0, torch.Generator().manual_seed(0))
    engine.hooks.no_eos = True  # six steps, all of them
    taken: list = []

    def step() -> None:
        taken.append(next(steps, None))

    while not taken or taken[-1] is not None:
        thread = threading.Thread(target=step)
        thread.start()
        thread.join()
    grad = engine.hooks.grad
    engine.hooks.reset()
    assert len(taken) == 7 and len(grad) == 6 and not any(grad), grad


# ------------------------------------------------------------------------------------ 4. the waiting line
def test_requests_are_served_in_arrival_order_and_a_full_line_gets_503(live_short_line):
    base, app, hooks = live_short_line
    worker = app.state.worker
    hooks.gate = threading.Event()  # the first job holds the model until the line has formed
    results: dict[int, httpx.Response | Exception] = {}

    def send(words: int, timeout: float = 30.0) -> None:
        try:
            results[words] = _post(base, "/v1/completions", {"prompt": " ".join(["hello"] * words),
                                                             "max_tokens": 2}, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - recorded and asserted on below
            results[words] = exc

    threads = [threading.Thread(target=send, args=(1,))]
    threads[0].start()
    assert hooks.at_gate.wait(10)
    # three wait (max_queue = 3); the second of them gives up after 2 s, while still waiting
    for n, words in enumerate([2, 3, 4], start=1):
        threads.append(threading.Thread(target=send, args=(words, 2.0 if words == 3 else 30.0)))
        threads[-1].start()
        _wait_for(lambda n=n: worker.waiting() == n)
    full = _post(base, "/v1/completions", {"prompt": "hello", "max_tokens": 1})
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert "3 requests are already waiting" in full.json()["error"]["message"]
    assert "--max-queue" in full.json()["error"]["message"]
    threads[2].join()  # gave up: taken out of the line
    _wait_for(lambda: worker.waiting() == 2)
    threads.append(threading.Thread(target=send, args=(5,)))
    threads[-1].start()
    _wait_for(lambda: worker.waiting() == 3)
    hooks.gate.set()
    for thread in threads:
        thread.join(30)
    assert isinstance(results[3], httpx.TimeoutException)
    assert all(results[w].status_code == 200 for w in (1, 2, 4, 5))
    # prompt length = words + BOS: served in arrival order, and the request that left never ran
    assert hooks.started == [2, 3, 5, 6]


# ------------------------------------------------------------------------------ the malformed-request corpus
def _nested(depth: int, inner: bytes = b"1") -> bytes:
    return b'{"prompt": ' + b"[" * depth + inner + b"]" * depth + b"}"


ANSWERED = 6


def _corpus() -> list[tuple[str, str, dict, bytes]]:
    """(method, path, headers, body): each is wrong in one way, and none may get a 5xx."""
    j = {"content-type": "application/json"}
    c, chat = "/v1/completions", "/v1/chat/completions"

    def comp(extra: str) -> tuple[str, str, dict, bytes]:
        return "POST", c, {**j, **AUTH}, ('{"prompt": "say hello", "max_tokens": 2, ' + extra + "}").encode()

    def msgs(value: str, extra: str = "") -> tuple[str, str, dict, bytes]:
        return "POST", chat, {**j, **AUTH}, ('{"max_tokens": 2, "messages": ' + value + extra + "}").encode()

    def raw(body: bytes, headers: dict | None = None, path: str = c) -> tuple[str, str, dict, bytes]:
        return "POST", path, {**j, **AUTH, **(headers or {})}, body

    return [
        # not JSON, or not an object
        raw(b"{not json"), raw(b""), raw(b"[]"), raw(b'"prompt"'), raw(b"null"), raw(b"123"), raw(b"\xff\xfe{}"),
        raw(b'{"prompt": "a"} trailing'), raw(b'{"prompt": "a", "prompt": 5}'),
        # wrong types
        comp('"x": 1, "prompt": 3'), comp('"x": 1, "prompt": null'), comp('"x": 1, "prompt": []'),
        comp('"x": 1, "prompt": [1, 2, 3]'), comp('"x": 1, "prompt": [["a"]]'), comp('"x": 1, "prompt": {"a": 1}'),
        comp('"prompt2": 1, "max_tokens": "5"'), comp('"model": 123'), comp('"model": {"id": "policy"}'),
        comp('"model": "gpt-4"'), comp('"stream": "yes", "logprobs": "3"'),
        # odd but answerable (ANSWERED of them): an empty prompt is BOS alone, a non-object stream_options is
        # ignored, a truthy echo echoes, a denormal top_p keeps the top token, JSON sent as text/plain or UTF-16
        comp('"x": 1, "prompt": ""'), comp('"stream_options": "usage"'),
        comp('"echo": [1], "logprobs": 1, "max_tokens": 0'), comp('"top_p": 1e-320'),
        # NaN, infinities, overflow, out of range
        comp('"temperature": NaN'), comp('"temperature": Infinity'), comp('"temperature": -Infinity'),
        comp('"temperature": 1e-40'), comp('"temperature": 1e-300'), comp('"temperature": -1'),
        comp('"temperature": "hot"'), comp('"temperature": 1e999'), comp('"top_p": 0'), comp('"top_p": -0.5'),
        comp('"top_p": NaN'), comp('"seed": 1180591620717411303424'),
        comp('"seed": -1180591620717411303424'), comp('"seed": 1.5'), comp('"seed": "abc"'), comp('"n": 0'),
        comp('"n": 1000000'), comp('"n": ' + "9" * 4000), comp('"max_tokens": -1'), comp('"max_tokens": 1.5'),
        comp('"max_tokens": true'), comp('"max_tokens": 1e308'), comp('"logprobs": 100'), comp('"logprobs": -1'),
        comp('"stop": 5'), comp('"stop": ["", "x"]'), comp('"stop": ["a", "b", "c", "d", "e"]'),
        comp('"stop": [null]'),
        # text that is not text, prompts too long or too many
        raw(b'{"prompt": "a \\ud800 b"}'), raw(b'{"prompt": "' + b"hello " * 400 + b'"}'),
        raw(json.dumps({"prompt": ["a"] * 500}).encode()),
        raw(json.dumps({"prompt": ["a"] * 32, "n": 16, "max_tokens": 200}).encode()),
        # deep nesting, huge bodies
        raw(_nested(1000)), raw(_nested(100_000)), raw(b'{"a": ' * 5000 + b"1" + b"}" * 5000),
        raw(json.dumps({"prompt": "word " * 20_000}).encode()), raw(b" " * 200_000 + b"{}"),
        raw(json.dumps({"prompt": "word " * 600_000}).encode()),
        # chat
        msgs('"hi"'), msgs("[]"), msgs('[{"role": "user"}]'), msgs('[{"role": "user", "content": 5}]'),
        msgs('[{"role": "user", "content": [{"type": "text", "text": 5}]}]'),
        msgs('[{"role": ["user"], "content": "x"}]'), msgs('[{"role": "robot", "content": "x"}]'),
        msgs('[{"role": "user", "content": "x"}]', ', "top_logprobs": 50, "logprobs": true'),
        msgs('[{"role": "user", "content": "x"}]', ', "top_logprobs": 2'),
        msgs('[{"role": "user", "content": "x"}]', ', "max_completion_tokens": -5'),
        msgs('[{"role": "user", "content": "\\udfff"}]'),
        msgs('[' + '{"role": "user", "content": "hi"},' * 300 + '{}]'),
        # content types
        raw(b'{"prompt": "a", "max_tokens": 1}', {"content-type": "text/plain"}),  # answered
        raw(b"prompt=a&max_tokens=1", {"content-type": "application/x-www-form-urlencoded"}),
        raw(b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na\r\n--b--\r\n',
            {"content-type": "multipart/form-data; boundary=b"}),
        raw('{"prompt": "a", "max_tokens": 1}'.encode("utf-16"), {"content-type": "application/json; charset=utf-16"}),
        # (answered)
        raw(b"\x1f\x8b\x08\x00garbage", {"content-encoding": "gzip"}),
        raw(b"<xml/>", {"content-type": "application/xml"}),
        # methods and paths
        ("GET", c, AUTH, b""), ("PUT", chat, {**j, **AUTH}, b"{}"), ("POST", "/v1/models", AUTH, b"{}"),
        ("GET", "/v1/../etc/passwd", AUTH, b""), ("GET", "/nope", AUTH, b""), ("DELETE", "/v1/models", AUTH, b""),
        # bad auth
        ("GET", "/openapi.json", {}, b""), ("GET", "/v1/models", {}, b""),
        ("POST", c, {**j, "Authorization": "Bearer wrong"}, b'{"prompt": "a"}'),
        ("POST", c, {**j, "Authorization": "Basic c2s6dGVzdA=="}, b'{"prompt": "a"}'),
        ("POST", c, {**j, "Authorization": b"Bearer \xff\xfe\xfd"}, b'{"prompt": "a"}'),
        ("POST", c, {**j, "Authorization": f"Bearer  {KEY}"}, b'{"prompt": "a"}'),
        ("POST", c, {**j, "Authorization": "Bearer"}, b'{"prompt": "a"}'),
        ("POST", c, {**j, "Authorization": "Bearer " + "k" * 8000}, b'{"prompt": "a"}'),
        ("POST", c, {**j, "Authorization": f"bearer {KEY}"}, b'{"prompt": "a"}'),
    ]


RAW_CORPUS = [  # malformed at the HTTP level, sent on a socket as they are
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
    + b"\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
    + b"\r\nContent-Length: 99999999999\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
    + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"10000\r\n" + b"a" * 0x10000 + b"\r\n") * 48 + b"0\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
    + b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GARBAGE\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \r\nContent-Length: 2\r\n\r\n{}",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
    + b" \x00\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xc3\xa9\xff\r\nContent-Length: 2\r\n\r\n{}",
]


def _raw_status(port: int, request: bytes) -> int | None:
    """The status line's code of the answer to `request`, or None when the server closed without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(request)
        except OSError:
            pass
        try:
            head = sock.recv(64)
        except ConnectionResetError:
            return None
    return int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None


def test_a_corpus_of_malformed_requests_gets_no_5xx_and_the_server_still_serves(live):
    base, _, _ = live
    port = int(base.rsplit(":", 1)[1])
    corpus = _corpus()
    assert len(corpus) + len(RAW_CORPUS) >= 40
    statuses = []
    with httpx.Client(base_url=base, timeout=30) as client:
        for method, path, headers, body in corpus:
            resp = client.request(method, path, headers=headers, content=body)
            statuses.append((resp.status_code, method, path, body[:60]))
            assert resp.status_code < 500, (resp.status_code, resp.text, method, path, body[:200])
            if resp.status_code >= 400:  # every refusal in the OpenAI error shape
                assert set(resp.json()["error"]) == {"message", "type", "param", "code"}, resp.text
    for request in RAW_CORPUS:
        status = _raw_status(port, request)
        statuses.append((status, "raw", request[:40]))
        assert status is None or status < 500, (status, request[:200])
    answered = [s for s in statuses if s[0] is not None and s[0] < 400]
    assert len(answered) == ANSWERED, answered
    ok = _post(base, "/v1/completions", {"prompt": "say hello to anna .", "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"]
    streamed = _post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                                   "stream": True})
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    print(f"\nmalformed requests: {len(statuses)}, 5xx: 0")


# ---------------------------------------------------------------------- 50 clients leave, then SIGTERM
@pytest.mark.slow
def test_fifty_clients_leaving_mid_stream_then_the_server_answers_and_stops_on_sigterm(model_dir, tmp_path):
    from cai.cai_helpers import free_port, wait_until_serving

    port = free_port()
    log = (tmp_path / "server.log").open("wb")  # a file, not a pipe nobody drains while the server runs
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit", "serve", "--model", str(model_dir), "--port", str(port),
                             "--model-name", "policy"], env=env, stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, proc)
        outcomes: list[str] = []

        def leave(i: int) -> None:
            """Half read two events and hang up; the other half hang up while still waiting in line."""
            payload = {"prompt": "say hello to anna .", "max_tokens": 200, "stream": True, "seed": i}
            route = "/v1/completions" if i % 2 else "/v1/chat/completions"
            if route.endswith("chat/completions"):
                payload = {**{k: v for k, v in payload.items() if k != "prompt"},
                           "messages": [{"role": "user", "content": "say hello to anna ."}]}
            try:
                with httpx.stream("POST", base + route, json=payload, timeout=httpx.Timeout(30, read=0.3 if i >= 25
                                                                                            else 30)) as resp:
                    assert resp.status_code == 200
                    events = 0
                    for line in resp.iter_lines():
                        events += line.startswith("data: ")
                        if events == 2:
                            break
                    outcomes.append("read")
            except httpx.ReadTimeout:
                outcomes.append("left waiting")

        clients = [threading.Thread(target=leave, args=(i,)) for i in range(50)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(120)
        assert len(outcomes) == 50
        start = time.perf_counter()
        answer = httpx.post(base + "/v1/completions", json={"prompt": "what is 3 plus 4 ?", "max_tokens": 4},
                            timeout=10)
        answered_s = time.perf_counter() - start
        assert answer.status_code == 200 and answered_s < 1.0, answered_s
        # SIGTERM while one client is mid-stream (16 × 250 tokens to go) and another waits in line
        waiting: list[httpx.Response] = []
        with httpx.stream("POST", base + "/v1/completions", json={"prompt": "hi", "max_tokens": 250, "n": 16,
                                                                  "stream": True}, timeout=30) as resp:
            lines = resp.iter_lines()  # held: a dropped iterator would close the connection
            next(lines)
            queued = threading.Thread(target=lambda: waiting.append(httpx.post(
                base + "/v1/completions", json={"prompt": "hi", "max_tokens": 8}, timeout=30)))
            queued.start()
            time.sleep(0.3)
            start = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            stopped_s = time.perf_counter() - start
            rest = [line for line in lines if line.startswith("data: ")]
        queued.join(10)
        # both were told: the stream ends with an error event, the waiting request gets 503
        assert json.loads(rest[-1][len("data: "):])["error"]["code"] == "abandoned"
        assert waiting[0].status_code == 503 and waiting[0].json()["error"]["code"] == "abandoned"
        assert stopped_s < 5.0, stopped_s
        log.close()
        stderr = (tmp_path / "server.log").read_text()
        assert "Traceback" not in stderr, stderr
        print(f"\nclients disconnected: 50 ({outcomes.count('read')} mid-stream, {outcomes.count('left waiting')} "
              f"while waiting); answered after {answered_s:.3f} s; stopped {stopped_s:.2f} s after SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
