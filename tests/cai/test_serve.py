"""`rlhfkit serve`: the OpenAI-compatible server. In-process tests check the protocol and that reported
log-probs equal training-side scoring; the end-to-end test drives a real server with the official `openai`
client and labels preference pairs through it with the OpenAI-compatible judge backend."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("fastapi", reason="the server tests need the `web` extra")

from fastapi.testclient import TestClient  # noqa: E402

from rlhfkit.models import logprobs_of  # noqa: E402
from rlhfkit.serve import Engine, create_app  # noqa: E402

PROMPT = "what is 3 plus 4 ?"
CHAT = [{"role": "user", "content": "say hello to anna ."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from cai.cai_helpers import make_playground_model

    model_dir = make_playground_model(tmp_path_factory.mktemp("serve") / "policy")
    engine = Engine(str(model_dir), name="policy", device="cpu", seed=0)
    return model_dir, engine, TestClient(create_app(engine, max_tokens_limit=64))


def _score(engine, ids):
    ids = torch.tensor([ids])
    return logprobs_of(engine.model, ids, torch.ones_like(ids))[0].tolist()


def test_models_lists_the_served_model(served):
    _, _, client = served
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["policy"]


def test_completion_logprobs_equal_training_side_scoring(served):
    _, engine, client = served
    body = client.post("/v1/completions", json={"model": "policy", "prompt": PROMPT, "max_tokens": 6,
                                                "temperature": 1.0, "seed": 3, "logprobs": 3, "echo": True}).json()
    choice = body["choices"][0]
    lp = choice["logprobs"]
    prompt_ids, offsets = engine.encode_text(PROMPT)
    P = len(prompt_ids)
    generated = engine.tokenizer.convert_tokens_to_ids(lp["tokens"][P:])
    expected = _score(engine, prompt_ids + generated)  # entry t = log p(token t+1 | tokens <= t)
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    assert lp["text_offset"][:P] == offsets
    assert all(len(top) == 3 for top in lp["top_logprobs"][1:])
    for value, top in zip(lp["token_logprobs"][P:], lp["top_logprobs"][P:]):
        assert value <= max(top.values()) + 1e-6
    assert choice["text"].startswith(PROMPT)
    for tok, off in zip(lp["tokens"][P:], lp["text_offset"][P:]):
        assert choice["text"][off:off + len(tok)] == tok
    # greedy: each generated token is the top-1 alternative
    greedy = client.post("/v1/completions", json={"model": "policy", "prompt": PROMPT, "max_tokens": 4,
                                                  "temperature": 0, "logprobs": 1}).json()["choices"][0]["logprobs"]
    for value, top in zip(greedy["token_logprobs"], greedy["top_logprobs"]):
        assert list(top.values()) == [pytest.approx(value, abs=1e-5)]
    assert body["usage"] == {"prompt_tokens": P, "completion_tokens": len(generated) + (choice["finish_reason"] == "stop"),
                             "total_tokens": P + len(generated) + (choice["finish_reason"] == "stop")}


def test_chat_uses_the_models_chat_template_and_reports_logprobs(served):
    _, engine, client = served
    body = client.post("/v1/chat/completions", json={"model": "policy", "messages": CHAT, "max_tokens": 6, "seed": 1,
                                                     "logprobs": True, "top_logprobs": 2}).json()
    choice = body["choices"][0]
    ids = engine.tokenizer(engine.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
    assert body["object"] == "chat.completion" and body["usage"]["prompt_tokens"] == len(ids)
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == choice["message"]["content"].strip()
    content = choice["logprobs"]["content"]
    gen = engine.tokenizer.convert_tokens_to_ids([c["token"] for c in content])
    assert [c["logprob"] for c in content] == pytest.approx(_score(engine, ids + gen)[len(ids) - 1:], abs=1e-4)
    assert all(len(c["top_logprobs"]) == 2 and bytes(c["bytes"]).decode() == c["token"] for c in content)


def _events(text):
    chunks = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    return [json.loads(c) for c in chunks[:-1]]


@pytest.mark.parametrize("route, payload, key", [
    ("/v1/chat/completions", {"messages": CHAT}, "chat"),
    ("/v1/completions", {"prompt": PROMPT}, "text"),
])
def test_a_streamed_response_equals_the_plain_one(served, route, payload, key):
    _, _, client = served
    common = {"model": "policy", "max_tokens": 8, "seed": 5, **payload}  # one seed: the same sample twice
    plain = client.post(route, json=common).json()["choices"][0]
    resp = client.post(route, json={**common, "stream": True, "stream_options": {"include_usage": True}})
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = _events(resp.text)
    assert events[-1]["usage"]["completion_tokens"] > 0 and events[-1]["choices"] == []
    pieces = [e["choices"][0] for e in events[:-1]]
    if key == "chat":
        text = "".join(p["delta"].get("content", "") for p in pieces)
        assert pieces[0]["delta"]["role"] == "assistant"
        assert text == plain["message"]["content"]
    else:
        text = "".join(p["text"] for p in pieces)
        assert text == plain["text"]
    assert pieces[-1]["finish_reason"] == plain["finish_reason"] and len(pieces) > 3


def test_stop_sequences_n_and_seeds(served):
    _, _, client = served
    base = {"model": "policy", "prompt": PROMPT, "max_tokens": 10, "seed": 11}
    text = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    assert len(text.split()) >= 4, text
    word = text.split()[2]
    stopped = client.post("/v1/completions", json={**base, "stop": [word]}).json()["choices"][0]
    assert stopped["text"] == text[:text.find(word)] and stopped["finish_reason"] == "stop"
    sampled = {**base, "n": 3, "seed": 7, "prompt": [PROMPT, "say hello to tom ."]}
    a = client.post("/v1/completions", json=sampled).json()["choices"]
    b = client.post("/v1/completions", json=sampled).json()["choices"]
    assert [c["index"] for c in a] == list(range(6)) and [c["text"] for c in a] == [c["text"] for c in b]
    assert len({c["text"] for c in a}) > 1


@pytest.mark.parametrize("route, payload, status, words", [
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, ["'gpt-4' is not served", "'policy'"]),
    ("/v1/completions", {"prompt": "a", "temperature": 5}, 400, ["'temperature'", "between"]),
    ("/v1/completions", {"prompt": 3}, 400, ["'prompt'"]),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1000}, 400, ["'max_tokens'"]),
    ("/v1/completions", {"prompt": "a " * 300}, 400, ["maximum context length"]),
    ("/v1/chat/completions", {"messages": []}, 400, ["'messages'"]),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, ["messages[0]"]),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, ["'logprobs': true"]),
])
def test_bad_requests_get_openai_style_errors(served, route, payload, status, words):
    _, _, client = served
    resp = client.post(route, json=payload)
    assert resp.status_code == status
    message = resp.json()["error"]["message"]
    for word in words:
        assert word in message, message
    assert client.post(route, content=b"{not json", headers={"content-type": "application/json"}).status_code == 400


def test_an_api_key_can_be_required(served):
    _, engine, _ = served
    client = TestClient(create_app(engine, api_key="sk-local"))
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-local"}).status_code == 200


def test_the_http_judge_backend_scores_options_like_the_local_backend(served):
    """Option log-probs through the server (completions echo) equal the in-process HF backend's."""
    from rlhfkit.feedback.judges import HFBackend, OpenAIBackend

    model_dir, engine, _ = served
    http = OpenAIBackend("http://testserver/v1", "policy", api_key_env="")
    http.client = TestClient(create_app(engine), base_url="http://testserver/v1")
    local = HFBackend(str(model_dir), chat=False, batch_size=4, device="cpu")
    prompts = ["which is better ? the answer is : (", "say hello to anna . (A) hi (B) no . the answer is : ("]
    got, want = http.option_logprobs(prompts, ["A", "B"]), local.option_logprobs(prompts, ["A", "B"])
    assert [v for pair in got for v in pair] == pytest.approx([v for pair in want for v in pair], abs=1e-4)


# --------------------------------------------------------------------------- a real server, the real client
@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    from cai.cai_helpers import free_port, wait_until_serving

    model_dir = served[0]
    port = free_port()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit", "serve", "--model", str(model_dir), "--port", str(port),
                             "--model-name", "playground-policy"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, proc)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_official_openai_client_gets_completions_chat_logprobs_and_streams(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["playground-policy"]
    comp = client.completions.create(model="playground-policy", prompt=PROMPT, max_tokens=5, seed=2, logprobs=2)
    lp = comp.choices[0].logprobs
    assert comp.choices[0].text and len(lp.tokens) == len(lp.token_logprobs) >= 1
    assert all(len(t) == 2 for t in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    chat = client.chat.completions.create(model="playground-policy", messages=CHAT, max_tokens=6, seed=4,
                                          logprobs=True, top_logprobs=3)
    msg = chat.choices[0]
    assert msg.message.role == "assistant" and msg.message.content
    assert len(msg.logprobs.content) >= 1 and all(len(t.top_logprobs) == 3 for t in msg.logprobs.content)
    stream = client.chat.completions.create(model="playground-policy", messages=CHAT, max_tokens=6, seed=4,
                                            stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == msg.message.content and len(pieces) > 2
    streamed = client.completions.create(model="playground-policy", prompt=PROMPT, max_tokens=5, seed=2,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == comp.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="a", max_tokens=1)


def test_the_openai_judge_backend_labels_pairs_through_the_server(server, tmp_path):
    from rlhfkit.cli import main
    from rlhfkit.data.preference import read_preferences

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "how do i steal a car ?", "responses": ["sorry , i can not help with that .",
                                                           "here is how to steal a car : step one , get ready ."]},
        {"prompt": PROMPT, "responses": ["3 plus 4 is 7 .", "3 plus 4 is 9 .", "ugh . 7 ."]},
    ]))
    out = tmp_path / "labels"
    args = ["cai", "label", "--responses", str(pairs), "--output-dir", str(out), "--judge.backend", "openai",
            "--judge.base-url", server + "/v1", "--judge.model", "playground-policy", "--judge.batch-size", "3"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 4 and summary["methods"] == {"logprobs": 8}
    assert summary["judge_cache"] == {"hits": 0, "misses": 8}
    rows = read_preferences(str(out / "preferences.jsonl"))
    assert len(rows) == summary["rows"] >= 3 and all(r.source == "ai" for r in rows)
    judged = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert all(0 < j["prob_a"] < 1 and j["methods"] == ["logprobs", "logprobs"] for j in judged)
    # a rerun asks the server nothing: every answer comes from the on-disk cache
    assert main(args + ["--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["judge_cache"] == {"hits": 8, "misses": 0}
    # the chat endpoint: first-token top log-probs, else the answer parsed from text (or abstained)
    chat_out = tmp_path / "labels-chat"
    assert main([*args[:5], str(chat_out), *args[6:], "--judge.endpoint", "chat"]) == 0
    chat = json.loads((chat_out / "summary.json").read_text())
    assert chat["pairs"] == 4 and sum(chat["methods"].values()) == 8
    assert set(chat["methods"]) <= {"logprobs", "text", "none"}


def test_echo_logprobs_are_computed_a_chunk_of_positions_at_a_time(served, monkeypatch):
    """Echoed prompt log-probs and their top lists equal those of the full logits, and no tensor of T x V
    floats is formed (a chunk of 3 positions here; the full path would form one, so this can fail)."""
    import rlhfkit.models as models
    from helpers import largest_tensor_mode

    _, engine, _ = served
    ids = engine.encode_text(PROMPT * 4)[0]
    with torch.inference_mode():
        logp = torch.log_softmax(engine.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    vocab = logp.shape[-1]
    monkeypatch.setattr(models, "LOGIT_CHUNK_BYTES", 3 * 4 * vocab)
    with largest_tensor_mode() as seen:
        steps = engine.prompt_logprobs(ids, 3)
    assert seen.largest < len(ids) * vocab / 2  # the largest left: hidden states, 25 x 128
    assert steps[0] is None and len(steps) == len(ids)
    for t, step in enumerate(steps[1:], start=1):
        assert step.token_id == ids[t] and step.logprob == pytest.approx(float(logp[t - 1, ids[t]]), abs=1e-5)
        want = logp[t - 1].topk(3)
        assert [i for i, _ in step.top] == want.indices.tolist()
        assert [v for _, v in step.top] == pytest.approx(want.values.tolist(), abs=1e-5)
