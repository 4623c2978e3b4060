"""Best-of-n (`rlhfkit best-of-n`): sample n responses per prompt, keep the one the reward model scores highest.

The cheap baseline every RL method should beat, and the cleanest way to trace proxy-versus-gold
over-optimisation: its KL from the sampling policy is at most log n - (n - 1)/n (Stiennon et al. 2020,
appendix; Gao et al. 2022 use it as the x-axis, d = sqrt(KL))."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhfkit.config import save_config
from rlhfkit.data.readers import DataPath, read_prompts
from rlhfkit.errors import ConfigError, UserError
from rlhfkit.models import load_causal_lm, load_tokenizer
from rlhfkit.generation import sample
from rlhfkit.reward.combine import CombineConfig, load_reward_set, read_risky_flags
from rlhfkit.reward.model import load_reward_ensemble, score_texts


@dataclass
class BestOfNConfig(CombineConfig):
    """Best-of-n sampling against a reward model (or ensemble), or several combined (--rewards, --combine: every
    candidate of the run is scored at once, so running and batch normalisation agree, and the Lagrangian
    multiplier stays at --lagrange-init)."""

    model: str = ""
    """Policy directory to sample from."""
    reward_model: str = ""
    """Reward model (or ensemble) directory written by `rlhfkit reward`."""
    data: str = ""
    """Prompts file ({"prompt": ...} or {"text": ...} rows)."""
    data_split: str = "train"
    """Split of --data to read when it is a saved DatasetDict."""
    data_fields: dict[str, str] = field(default_factory=dict)
    """Rename prompt columns before reading, ours=theirs: --data-fields prompt=question."""
    chat: bool = False
    """Read plain-string prompts as one user turn (through the chat template), as the policy's training did."""
    output_dir: str = ""
    """Where samples.jsonl (the chosen response per prompt, with every candidate's score) and summary.json go."""
    n: int = 16
    """Candidates per prompt."""
    temperature: float = 1.0
    """Sampling temperature of the candidates."""
    max_new_tokens: int = 48
    """Longest candidate."""
    ensemble_penalty: float = 0.0
    """Select by mean - lambda * std over the ensemble's members (Coste et al. 2023)."""
    batch_size: int = 64
    """Sequences per generation batch."""
    seed: int = 0
    """Seed of the sampler."""
    overwrite: bool = False
    """Replace an existing samples.jsonl in output_dir."""

    def validate(self) -> None:
        for name in ("model", "data", "output_dir"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required.")
        if bool(self.reward_model) == bool(self.rewards):
            raise ConfigError("pass --reward-model (a directory written by `rlhfkit reward`) or --rewards "
                              "name=directory,... (one reward model per criterion), exactly one of the two.")
        if self.rewards:
            self.check_combination(list(self.rewards))
        if self.n < 1:
            raise ConfigError(f"n must be at least 1, got {self.n}.")
        if self.temperature <= 0:
            raise ConfigError("temperature must be positive: greedy decoding gives n identical candidates.")


def best_of_n_kl(n: int) -> float:
    """Analytic upper bound on KL(best-of-n || base) in nats: log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


def select(scores: torch.Tensor) -> torch.Tensor:
    """Index of the best candidate per prompt; scores (P, n). Ties go to the first sampled. Returns (P,)."""
    return scores.argmax(-1)


def main(cfg: BestOfNConfig) -> dict[str, Any]:
    cfg.validate()
    out = Path(cfg.output_dir)
    if (out / "samples.jsonl").exists() and not cfg.overwrite:
        raise UserError(f"{out} already holds best-of-n samples; pass --overwrite or choose another --output-dir.")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    prompts = read_prompts(DataPath(cfg.data, cfg.data_split, cfg.data_fields, chat=cfg.chat))
    tokenizer = load_tokenizer(cfg.model)
    policy = load_causal_lm(cfg.model, tokenizer)
    expanded = [p for p in prompts for _ in range(cfg.n)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        texts = sample(policy, tokenizer, expanded, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                       batch_size=cfg.batch_size).texts
    named: dict[str, list[float]] = {}
    if cfg.rewards:
        rewards = load_reward_set(cfg, tokenizer)
        risky = None
        if cfg.combine == "gated":
            flags = read_risky_flags(DataPath(cfg.data, cfg.data_split, cfg.data_fields, chat=cfg.chat), cfg.gate_field)
            risky = [f for f in flags for _ in range(cfg.n)]
        mean, named = rewards.score_texts(expanded, texts, risky, update=True)
        scores = torch.tensor(mean).view(len(prompts), cfg.n)  # (P, n)
    else:
        reward = load_reward_ensemble(cfg.reward_model)
        mean, std = score_texts(reward, expanded, texts)
        scores = (torch.tensor(mean) - cfg.ensemble_penalty * torch.tensor(std)).view(len(prompts), cfg.n)  # (P, n)
    best = select(scores)
    rows = []
    for i, prompt in enumerate(prompts):
        j = int(best[i])
        row = {"prompt": prompt, "response": texts[i * cfg.n + j], "score": float(scores[i, j]),
               "candidates": texts[i * cfg.n : (i + 1) * cfg.n], "scores": scores[i].tolist()}
        if named:  # each reward model's score of every candidate
            row["scores_by_reward"] = {n: v[i * cfg.n : (i + 1) * cfg.n] for n, v in named.items()}
        rows.append(row)
    tmp = out / "samples.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out / "samples.jsonl")
    summary = {"stage": "best-of-n", "n": cfg.n, "prompts": len(prompts), "kl_bound": best_of_n_kl(cfg.n),
               "mean_best_score": float(scores.max(-1).values.mean()), "mean_score": float(scores.mean())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
