"""Several reward models, one training signal: the combinations PPO, GRPO, RLOO and best-of-n optimise when a
run has a reward model per criterion (helpfulness, harmlessness, honesty, ...).

Three named combinations, each documented with its hyperparameters (all logged per step):
  sum         R = sum_i w_i * n_i(r_i), where n_i normalises reward i (see `Normaliser`) so that no reward wins by
              its scale alone.
  gated       Llama 2's safety gating (Touvron et al. 2023, section 3.2.2): the safety reward s decides when the
              prompt is flagged risky or s < gate_threshold, the others' weighted sum otherwise:
                  R = n_s(s) if risky(prompt) or s < threshold else sum_{i != s} w_i n_i(r_i),
              then whitened over the batch, as the paper whitens the combined score.
  lagrangian  Safe RLHF's constrained objective (Dai et al. 2024): maximise the other rewards' weighted sum h
              subject to E[cost] <= cost_limit, where cost = -s (cost > 0 means unsafe when the safety model was
              trained with safety labels, whose zero it then keeps). The policy sees
                  R = (h - lambda * cost) / (1 + lambda),
              and the multiplier follows the constraint's violation by gradient ascent on log lambda:
                  log lambda <- log lambda + lagrange_lr * (mean cost - cost_limit).
The state (running normalisers, log lambda) is saved with every checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rlhfkit.errors import ConfigError

COMBINATIONS = ("sum", "gated", "lagrangian")
Normalisation = Literal["running", "batch", "none"]


@dataclass
class CombineConfig:
    """How several reward models' scores become the one reward the policy is trained on (the fields PPO and
    best-of-n share)."""

    rewards: dict[str, str] = field(default_factory=dict)
    """Named reward models, one per criterion, instead of --reward-model: name=directory,... (e.g.
    helpfulness=runs/rm_help,harmlessness=runs/rm_safe), combined as --combine says. A head of a model trained with
    --criteria or --attributes is directory#head (helpfulness=runs/rm#helpfulness,harmlessness=runs/rm#harmlessness);
    the heads of one model are scored together, one forward pass per batch."""
    combine: Literal["sum", "gated", "lagrangian"] = "sum"
    """sum (weighted, each reward normalised), gated (Llama 2: the safety reward on risky prompts or unsafe-looking
    responses, the rest elsewhere) or lagrangian (Safe RLHF: the rest, subject to the expected cost staying under
    cost_limit)."""
    reward_weights: dict[str, float] = field(default_factory=dict)
    """Weight of each named reward (default 1 each)."""
    reward_normalization: Normalisation = "running"
    """Per-reward normalisation before combining: running (mean and std over every batch so far), batch (this
    batch's mean and std) or none."""
    safety_reward: str = "harmlessness"
    """gated and lagrangian: the name of the safety reward (its negative is the cost)."""
    gate_threshold: float = 0.0
    """gated: a safety score below this counts as unsafe, and the safety reward decides the sample. 0 is the
    boundary a safety model trained with safety labels keeps."""
    gate_field: str = "risky"
    """gated: the prompt-file column (true / false) that flags a prompt as risky; prompts without it are not."""
    cost_limit: float = 0.0
    """lagrangian: the limit d of E[cost] <= d."""
    lagrange_init: float = 1.0
    """lagrangian: the multiplier's initial value."""
    lagrange_lr: float = 0.05
    """lagrangian: step size of the ascent on log lambda, per rollout step."""
    lagrange_max: float = 100.0
    """lagrangian: the multiplier's ceiling (keeps exp(log lambda) finite when the limit cannot be met)."""

    def check_combination(self, names: list[str]) -> None:
        """Raise ConfigError unless the settings fit the named reward models."""
        unknown = sorted(set(self.reward_weights) - set(names))
        if unknown:
            raise ConfigError(f"--reward-weights names {unknown}, which are not among --rewards ({', '.join(names)}).")
        if any(not math.isfinite(w) for w in self.reward_weights.values()):
            raise ConfigError("--reward-weights must be finite numbers.")
        if self.combine in ("gated", "lagrangian"):
            if self.safety_reward not in names:
                raise ConfigError(f"--combine {self.combine} needs the safety reward --safety-reward "
                                  f"{self.safety_reward!r} among --rewards ({', '.join(names)}); name it with "
                                  "--safety-reward NAME.")
            if len(names) < 2:
                raise ConfigError(f"--combine {self.combine} needs a safety reward and at least one other reward.")
        if self.lagrange_init <= 0 or self.lagrange_max <= 0:
            raise ConfigError("--lagrange-init and --lagrange-max must be > 0 (the multiplier lives in log space).")
        if self.lagrange_lr < 0:
            raise ConfigError("--lagrange-lr must be >= 0.")


class Normaliser:
    """Per-reward running mean and variance (Chan et al.'s parallel update), or the batch's own, or nothing."""

    def __init__(self, mode: Normalisation):
        self.mode = mode
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def __call__(self, x: torch.Tensor, update: bool = True) -> torch.Tensor:
        """x normalised; with update False (evaluation) the running statistics are read, not moved (before any
        update they are this batch's own)."""
        if self.mode == "none":
            return x
        if self.mode == "batch" or (not update and self.count < 2):
            std = x.std() if x.numel() > 1 else x.new_tensor(0.0)
            return (x - x.mean()) / (std + 1e-6)
        if not update:
            return (x - self.mean) / (math.sqrt(self.m2 / (self.count - 1)) + 1e-6)
        n, mean = float(x.numel()), float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        std = math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0
        return (x - self.mean) / (std + 1e-6)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


class RewardCombiner:
    """Turns {name: (B,) scores} (and per-sample risky flags) into the (B,) reward the policy is trained on, and
    the metrics that say how it did so."""

    def __init__(self, cfg: CombineConfig, names: list[str]):
        cfg.check_combination(names)
        self.cfg = cfg
        self.names = list(names)
        self.normalisers = {n: Normaliser(cfg.reward_normalization) for n in names}
        self.log_lambda = math.log(cfg.lagrange_init)

    @property
    def multiplier(self) -> float:
        return math.exp(self.log_lambda)

    def weight(self, name: str) -> float:
        return float(self.cfg.reward_weights.get(name, 1.0))

    def _weighted(self, normed: dict[str, torch.Tensor], skip: str | None = None) -> torch.Tensor:
        parts = [self.weight(n) * normed[n] for n in self.names if n != skip]
        return torch.stack(parts).sum(0)

    def __call__(self, scores: dict[str, torch.Tensor], risky: torch.Tensor | None = None, update: bool = True
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        """scores: each reward model's (B,) score; risky: (B,) bool, the prompt's flag (gated only; None = none
        flagged). Returns the combined (B,) reward and this step's metrics. update False (evaluation) leaves the
        normalisers and the multiplier where they are."""
        missing = set(self.names) - set(scores)
        if missing:
            raise ValueError(f"scores for {sorted(missing)} are missing")
        metrics = {f"reward/{n}": float(scores[n].float().mean()) for n in self.names}
        normed = {n: self.normalisers[n](scores[n].float(), update) for n in self.names}
        kind = self.cfg.combine
        if kind == "sum":
            return self._weighted(normed), metrics
        safety = scores[self.cfg.safety_reward].float()
        if kind == "gated":
            flagged = torch.zeros_like(safety, dtype=torch.bool) if risky is None else risky.to(safety.device)
            use_safety = flagged | (safety < self.cfg.gate_threshold)
            safety_name = self.cfg.safety_reward
            combined = torch.where(use_safety, normed[safety_name], self._weighted(normed, safety_name))
            if combined.numel() > 1:
                combined = (combined - combined.mean()) / (combined.std() + 1e-6)
            metrics["combine/safety_fraction"] = float(use_safety.float().mean())
            metrics["combine/risky_fraction"] = float(flagged.float().mean())
            return combined, metrics
        # lagrangian: the multiplier used for this batch is the one before the update (it reacts to this batch)
        cost = -safety
        lam = self.multiplier
        combined = (self._weighted(normed, self.cfg.safety_reward) - lam * cost) / (1.0 + lam)
        mean_cost = float(cost.mean())
        if update:
            self.log_lambda = min(math.log(self.cfg.lagrange_max),
                                  self.log_lambda + self.cfg.lagrange_lr * (mean_cost - self.cfg.cost_limit))
        metrics.update({"combine/lambda": lam, "combine/cost": mean_cost,
                        "combine/violation": mean_cost - self.cfg.cost_limit})
        return combined, metrics

    def state_dict(self) -> dict[str, Any]:
        return {"log_lambda": self.log_lambda, "normalisers": {n: z.state_dict() for n, z in self.normalisers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_lambda = float(state["log_lambda"])
        for name, z in self.normalisers.items():
            z.load_state_dict(state["normalisers"][name])


def read_risky_flags(path: str, field_name: str) -> list[bool]:
    """The gate flag of each row of a prompts file (aligned with `read_prompts`): the column's true / false,
    absent = not risky. Anything else is an error (a flag written as the string "no" must not silently count as
    risky)."""
    from rlhfkit.data.readers import read_rows
    from rlhfkit.errors import DataError

    flags = []
    for lineno, row in read_rows(path):
        value = row.get(field_name, False)
        if value is None:
            value = False
        if not isinstance(value, bool):
            raise DataError(path, lineno, field_name, f"must be true or false (the gate flag of --gate-field), "
                            f"got {value!r}")
        flags.append(value)
    return flags


# -------------------------------------------------------------------------------------------------- loading
@dataclass
class RewardSet:
    """The named reward models of a run and the combiner over them. Names that are heads of one model
    (DIR#head) hold ensembles sharing its members, and are scored with one forward pass per member."""

    ensembles: dict[str, Any]  # name -> RewardEnsemble
    combiner: RewardCombiner
    same_vocab: dict[str, bool]  # name -> reads the policy's token ids directly (else re-tokenises the texts)

    def shared(self) -> list[list[str]]:
        """The names grouped by the model they read (heads of one model together), in name order."""
        groups: dict[int, list[str]] = {}
        for name, ensemble in self.ensembles.items():
            groups.setdefault(id(ensemble.members[0]), []).append(name)
        return list(groups.values())

    def named_scores(self, ids: torch.Tensor | None, mask: torch.Tensor | None, prompts: list[Any],
                     texts: list[str], ensemble_penalty: float = 0.0, response_mask: torch.Tensor | None = None
                     ) -> dict[str, torch.Tensor]:
        """Each reward's (B,) score (its ensemble's mean minus ensemble_penalty x their std): from the policy's
        token ids where the vocabularies match and ids are given (response_mask (B, T) marking their response
        tokens, for a reward model with a likelihood term), else from the texts."""
        from rlhfkit.reward.model import score_texts, score_texts_all_heads

        out = {}
        for names in self.shared():
            ensemble = self.ensembles[names[0]]
            if len(names) == 1:
                if ids is not None and self.same_vocab[names[0]]:
                    mean, std = ensemble.mean_std(ids, mask, response_mask)
                else:
                    mu, sd = score_texts(ensemble, prompts, texts)
                    mean, std = torch.tensor(mu), torch.tensor(sd)
                    if ids is not None:
                        mean, std = mean.to(ids.device), std.to(ids.device)
                out[names[0]] = mean.float() - ensemble_penalty * std.float()
                continue
            # several heads of one model: every head from one forward pass per member, then each name's column
            if ids is not None and self.same_vocab[names[0]]:
                every = ensemble.head_scores(ids, mask, response_mask)  # (N members, B, K)
            else:
                every = score_texts_all_heads(ensemble, prompts, texts)  # (N members, B, K)
                if ids is not None:
                    every = every.to(ids.device)
            for name in names:
                head = self.ensembles[name].head
                s = every[:, :, 0 if head is None else head]  # (N members, B)
                std = s.std(0, unbiased=True) if s.shape[0] > 1 else torch.zeros_like(s[0])
                out[name] = s.mean(0).float() - ensemble_penalty * std.float()
        return {name: out[name] for name in self.ensembles}

    def score_texts(self, prompts: list[Any], texts: list[str], risky: list[bool] | None = None,
                    update: bool = False) -> tuple[list[float], dict[str, list[float]]]:
        """The combined score of (prompt, response) pairs and each reward's own (evaluation and best-of-n:
        the combiner's state is read, not moved, unless update)."""
        named = self.named_scores(None, None, prompts, texts)
        flags = None if risky is None else torch.tensor(risky, dtype=torch.bool)
        combined, _ = self.combiner(named, flags, update=update)
        return combined.tolist(), {n: v.tolist() for n, v in named.items()}


def load_reward_set(cfg: CombineConfig, tokenizer: Any, device: Any = "cpu") -> RewardSet:
    """The reward models named in cfg.rewards, loaded for scoring the policy's samples: each directory once,
    however many of its heads are named (DIR#head)."""
    from pathlib import Path

    from rlhfkit.reward.model import load_members, split_head

    loaded: dict[Path, Any] = {}
    ensembles = {}
    for name, spec in cfg.rewards.items():
        directory, head = split_head(spec)
        key = Path(directory).resolve()
        if key not in loaded:
            loaded[key] = load_members(directory, device=device)
        ensembles[name] = loaded[key].with_head(head, spec)
    vocab = tokenizer.get_vocab()
    same = {name: e.tokenizer.get_vocab() == vocab for name, e in ensembles.items()}
    return RewardSet(ensembles, RewardCombiner(cfg, list(ensembles)), same)
