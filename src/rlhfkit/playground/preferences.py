"""The playground's labelling stage: response pairs (from a policy and from the world's response generator)
judged by the simulated annotator pool, written as TRL-format preference rows.

It stands in for people, so it may use the annotators (which read the gold judge); training code only ever sees
the rows it writes."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from rlhfkit.playground.annotators import Annotator, make_pool
from rlhfkit.playground.responses import BALANCED, sample_pair
from rlhfkit.playground.tasks import Prompt


@dataclass
class LabelReport:
    """What the annotators said, including the judgments that yield no training pair."""

    judgments: int = 0
    pairs: int = 0
    outcomes: Counter = field(default_factory=Counter)
    identical: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"judgments": self.judgments, "pairs": self.pairs, "outcomes": dict(self.outcomes),
                "identical_skipped": self.identical}


def policy_pairs(policy_dir: str, prompts: Sequence[Prompt], seed: int, temperature: float = 1.0,
                 max_new_tokens: int = 48) -> list[tuple[Prompt, str, str]]:
    """Two samples per prompt from a policy (on-policy pairs, what the reward model must judge during PPO)."""
    import torch

    from rlhfkit.models import load_causal_lm, load_tokenizer
    from rlhfkit.generation import sample

    tokenizer = load_tokenizer(policy_dir)
    model = load_causal_lm(policy_dir, tokenizer)
    texts = [p.messages for p in prompts for _ in range(2)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rollout = sample(model, tokenizer, texts, max_new_tokens=max_new_tokens, temperature=temperature)
    out = rollout.texts
    return [(p, out[2 * i], out[2 * i + 1]) for i, p in enumerate(prompts)]


def generator_pairs(prompts: Sequence[Prompt], seed: int) -> list[tuple[Prompt, str, str]]:
    """Pairs from the world's response generator (varied quality along every axis)."""
    rng = random.Random(seed)
    return [(p, *sample_pair(p, rng, BALANCED)) for p in prompts]


def label_pairs(pairs: Sequence[tuple[Prompt, str, str]], seed: int, pool: list[Annotator] | None = None
                ) -> tuple[list[dict[str, Any]], LabelReport]:
    """Each pair judged by one annotator drawn from the pool; A/B judgments become conversational TRL rows with
    strength, annotator and source. Ties and "both bad" give no pair (counted in the report)."""
    pool = pool or make_pool(seed)
    rng = random.Random(seed + 1)
    rows: list[dict[str, Any]] = []
    report = LabelReport()
    for prompt, a, b in pairs:
        if a.strip() == b.strip():
            report.identical += 1  # nothing to compare (and a zero-gradient pair if kept)
            continue
        annotator = pool[rng.randrange(len(pool))]
        judgment = annotator.compare(prompt, a, b, rng)
        report.judgments += 1
        report.outcomes[judgment.outcome] += 1
        if judgment.outcome not in ("A", "B"):
            continue
        chosen, rejected = (a, b) if judgment.outcome == "A" else (b, a)
        rows.append({
            "prompt": [{"role": "user", "content": prompt.text}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "strength": judgment.strength,
            "annotator": judgment.annotator,
            "source": "simulated",
        })
    report.pairs = len(rows)
    return rows, report


def policy_groups(policy_dir: str, prompts: Sequence[Prompt], k: int, seed: int, temperature: float = 1.0,
                  max_new_tokens: int = 48) -> list[tuple[Prompt, list[str]]]:
    """k samples per prompt from a policy, duplicates removed (a ranking of identical texts teaches nothing)."""
    import torch

    from rlhfkit.models import load_causal_lm, load_tokenizer
    from rlhfkit.generation import sample

    tokenizer = load_tokenizer(policy_dir)
    model = load_causal_lm(policy_dir, tokenizer)
    texts = [p.messages for p in prompts for _ in range(k)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = sample(model, tokenizer, texts, max_new_tokens=max_new_tokens, temperature=temperature).texts
    groups = []
    for i, p in enumerate(prompts):
        unique = list(dict.fromkeys(t.strip() for t in out[i * k : (i + 1) * k] if t.strip()))
        groups.append((p, unique))
    return groups


def rank_groups(groups: Sequence[tuple[Prompt, list[str]]], seed: int, pool: list[Annotator] | None = None
                ) -> tuple[list[dict[str, Any]], LabelReport]:
    """InstructGPT-style K-way rankings by one annotator each (Plackett-Luce), as our ranking rows."""
    pool = pool or make_pool(seed)
    rng = random.Random(seed + 2)
    rows: list[dict[str, Any]] = []
    report = LabelReport()
    for prompt, responses in groups:
        if len(responses) < 2:
            report.identical += 1
            continue
        annotator = pool[rng.randrange(len(pool))]
        judgment = annotator.rank(prompt, responses, rng)
        report.judgments += 1
        report.outcomes[f"K={len(responses)}"] += 1
        rows.append({
            "prompt": [{"role": "user", "content": prompt.text}],
            "responses": [[{"role": "assistant", "content": r}] for r in responses],
            "ranking": list(judgment.ranking),
            "annotator": judgment.annotator,
            "source": "simulated",
        })
    report.pairs = len(rows)
    return rows, report
