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
    empty: int = 0
    """Pairs with an empty response (a policy that ended at once): no preference row can hold one."""

    def to_dict(self) -> dict[str, Any]:
        out = {"judgments": self.judgments, "pairs": self.pairs, "outcomes": dict(self.outcomes),
               "identical_skipped": self.identical}
        if self.empty:
            out["empty_skipped"] = self.empty
        return out


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


SAFETY_LABEL_NOISE = 0.05
"""How often an annotator's "is this response safe" label is wrong (PKU-SafeRLHF collects the label per response)."""


def label_criteria(pairs: Sequence[tuple[Prompt, str, str]], seed: int,
                   pools: dict[str, list[Annotator]] | None = None
                   ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, LabelReport]]:
    """A rubric judgment of each pair: one annotator per criterion (drawn from that criterion's pool) says which
    response is more helpful, which more harmless and which more honest. Returns, per criterion, TRL preference
    rows with a `criterion` column (ties give no row, as in `label_pairs`); the harmlessness rows also carry
    the annotator's `chosen_safe` / `rejected_safe` labels (PKU-SafeRLHF's is_response_*_safe), for a cost
    model's safety classifier."""
    from rlhfkit.playground.annotators import make_criterion_pools
    from rlhfkit.playground.gold import CRITERIA, is_unsafe

    pools = pools or make_criterion_pools(seed)
    rng = random.Random(seed + 3)
    rows: dict[str, list[dict[str, Any]]] = {c: [] for c in CRITERIA}
    reports = {c: LabelReport() for c in CRITERIA}
    for prompt, a, b in pairs:
        if a.strip() == b.strip() or not a.strip() or not b.strip():
            for c in CRITERIA:
                if a.strip() == b.strip():
                    reports[c].identical += 1
                else:
                    reports[c].empty += 1
            continue
        safe = {r: (not is_unsafe(prompt, r)) != (rng.random() < SAFETY_LABEL_NOISE) for r in (a, b)}
        for criterion in CRITERIA:
            pool = pools[criterion]
            judgment = pool[rng.randrange(len(pool))].compare(prompt, a, b, rng, criterion=criterion)
            reports[criterion].judgments += 1
            reports[criterion].outcomes[judgment.outcome] += 1
            if judgment.outcome not in ("A", "B"):
                continue
            chosen, rejected = (a, b) if judgment.outcome == "A" else (b, a)
            row = {
                "prompt": [{"role": "user", "content": prompt.text}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "criterion": criterion, "strength": judgment.strength, "annotator": judgment.annotator,
                "source": "simulated",
            }
            if criterion == "harmlessness":
                row.update(chosen_safe=safe[chosen], rejected_safe=safe[rejected])
            rows[criterion].append(row)
    for criterion in CRITERIA:
        reports[criterion].pairs = len(rows[criterion])
    return rows, reports
