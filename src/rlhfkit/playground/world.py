"""Materialise the playground on disk: prompt splits, the pretraining corpus, SFT demonstrations, the word-level
tokenizer and a freshly initialised Llama-architecture model, all in Hugging Face / JSONL formats.

Imports no gold judge: what this writes is what a training stage may see."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhfkit.playground.responses import (
    DEMONSTRATION, HHH_DEMONSTRATION, lexicon, pretraining_corpus, sft_demonstrations,
)
from rlhfkit.playground.tasks import HHH_KIND_WEIGHTS, Prompt, make_prompts


@dataclass(frozen=True)
class WorldSpec:
    """Sizes of the generated world and the base model. Changing any field rebuilds the cache."""

    seed: int = 0
    n_train: int = 600
    n_val: int = 100
    n_test: int = 200
    pretrain_docs: int = 20_000
    sft_demos: int = 2_000
    demonstrations: str = "contractors"
    """"contractors": the mixed-quality DEMONSTRATION mixture; "ideal": the best response every time."""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 128
    hhh: bool = False
    """The helpful-harmless-honest world: harmful, borderline (benign but worded like harmful) and unknowable
    prompts beside facts and messages (HHH_KIND_WEIGHTS), demonstrations from HHH_DEMONSTRATION, and a tokenizer
    over the larger lexicon."""


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    return [Prompt.from_dict(json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]


def write_world(data_dir: Path, spec: WorldSpec) -> dict[str, Path]:
    """Prompt splits, corpus and demonstrations as JSONL. Test prompts never reach training files."""
    data_dir.mkdir(parents=True, exist_ok=True)
    splits = make_prompts(spec.seed, spec.n_train, spec.n_val, spec.n_test, HHH_KIND_WEIGHTS if spec.hhh else None)
    paths = {}
    for name, prompts in splits.items():
        paths[f"prompts_{name}"] = data_dir / f"prompts_{name}.jsonl"
        _write_jsonl(paths[f"prompts_{name}"], [p.to_dict() for p in prompts])
    corpus = pretraining_corpus(splits["train"], spec.seed, spec.pretrain_docs)
    paths["pretrain"] = data_dir / "pretrain.jsonl"
    _write_jsonl(paths["pretrain"], [{"text": doc} for doc in corpus])
    if spec.demonstrations not in ("contractors", "ideal"):
        raise ValueError(f"unknown demonstrations {spec.demonstrations!r}; use 'contractors' or 'ideal'")
    mixture = (HHH_DEMONSTRATION if spec.hhh else DEMONSTRATION) if spec.demonstrations == "contractors" else None
    demos = sft_demonstrations(splits["train"], spec.seed + 1, spec.sft_demos, mixture)
    paths["sft"] = data_dir / "sft.jsonl"
    # conversational rows, so SFT trains on exactly the string the chat template renders at generation time
    _write_jsonl(paths["sft"], [
        {"prompt": [{"role": "user", "content": d["prompt"]}], "completion": [{"role": "assistant", "content": d["completion"]}]}
        for d in demos
    ])
    (data_dir / "world.json").write_text(json.dumps(asdict(spec), indent=2))
    return paths


def build_initial_model(out_dir: Path, spec: WorldSpec) -> Path:
    """Word-level tokenizer over the world's lexicon and a randomly initialised Llama, saved in HF format."""
    from rlhfkit.models import build_llama, save_pretrained, train_word_tokenizer

    tokenizer = train_word_tokenizer([" ".join(lexicon(spec.hhh))])
    model = build_llama(tokenizer, hidden_size=spec.hidden_size, num_layers=spec.num_layers,
                        num_heads=spec.num_heads, max_positions=spec.max_positions, seed=spec.seed)
    save_pretrained(model, tokenizer, out_dir)
    return out_dir
