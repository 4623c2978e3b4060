"""A tiny playground-vocabulary model and prompt file for the AI-feedback, win-rate and server tests."""

from __future__ import annotations

import json
from pathlib import Path

from rlhfkit.models import build_llama, save_pretrained, train_word_tokenizer
from rlhfkit.playground.responses import lexicon
from rlhfkit.playground.tasks import make_prompts


def make_playground_model(out: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama over the playground's lexicon (chat template included)."""
    tok = train_word_tokenizer([" ".join(lexicon())])
    model = build_llama(tok, hidden_size=32, num_layers=2, num_heads=4, max_positions=256, seed=seed)
    save_pretrained(model, tok, out)
    return out


def write_prompts(path: Path, n: int = 12, split: str = "test") -> Path:
    prompts = make_prompts(0, 60, 20, 40)[split][:n]
    path.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in prompts))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(base: str, server, seconds: float = 120) -> None:
    """Poll base/v1/models until the server answers 200; fail if it exits or takes longer than `seconds`
    (the same shape as tests/feedback/web_helpers.wait_until_serving, for the OpenAI-compatible server)."""
    import time

    import httpx

    deadline = time.time() + seconds
    while True:
        try:
            if httpx.get(base + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline and server.poll() is None, "the server did not start"
        time.sleep(0.2)
