import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_tiny_model, preference_rows, sft_rows, tiny_reward_world, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama with a word-level tokenizer, built from a config and saved locally."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_dropout_model(tmp_path_factory) -> Path:
    """Same, with attention dropout 0.2, so training consumes the torch RNG (resume must restore it)."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-dropout", dropout=0.2)


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", sft_rows(48))


@pytest.fixture(scope="session")
def sharding_world(tmp_path_factory) -> dict[str, Path]:
    """The model, data and reward model the sharded-training tests (FSDP, DeepSpeed) share, built once a session so
    that their reference runs (one process, or DDP) are shared too."""
    d = tmp_path_factory.mktemp("sharding")
    model = make_tiny_model(d / "model")
    _, prompts = tiny_reward_world(d, model)
    return {"model": model, "sft": write_jsonl(d / "sft.jsonl", sft_rows(48)),
            "pairs": write_jsonl(d / "pairs.jsonl", preference_rows(48)), "rm": d / "rm", "prompts": prompts}
