"""Online (iterative) DPO (`rlhfkit online-dpo`): rounds of sample -> label -> DPO.

Each round samples two responses per prompt from the current policy, a labeller says which is better, and a
DPO run trains on those fresh on-policy pairs with the round's starting policy as the reference (iterative DPO
as in Xu et al. 2023, "Some things are more CRINGE than others", and Yuan et al. 2024's self-rewarding loop).
Offline DPO learns from pairs some other policy wrote; here the pairs follow the policy as it moves.

Layout: OUTPUT/round-R/ holds that round's pairs.jsonl and its DPO run; OUTPUT/ gets the last round's model
and summary.json. A finished round (its summary.json exists) is reused, so a rerun resumes at the next round."""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from rlhfkit.config import save_config
from rlhfkit.data.readers import read_prompts
from rlhfkit.errors import ConfigError
from rlhfkit.policy.dpo import DPOConfig
from rlhfkit.policy.dpo import main as dpo_main
from rlhfkit.policy.reference import REF_CACHE

log = logging.getLogger(__name__)

# labeller(prompts, responses_a, responses_b) -> per pair: 1 (a better), -1 (b better) or 0 (no preference)
Labeller = Callable[[Sequence[Any], Sequence[str], Sequence[str]], Sequence[int]]


@dataclass
class OnlineDPOConfig(DPOConfig):
    """Iterative DPO: --data is a prompts file; the preference pairs are sampled and labelled every round."""

    data: str = ""
    """Prompts file (rows with "prompt" or "text", or a conversation): each round samples two responses to some
    of them. Not preference pairs, as in `rlhfkit dpo`: online DPO writes its own pairs every round."""
    rounds: int = 3
    """Sample -> label -> train rounds."""
    prompts_per_round: int = 256
    """Prompts drawn (without replacement, reshuffled each round) for one round's pairs."""
    reward_model: str = ""
    """Reward model (or ensemble) directory that labels the pairs (the better-scored response is chosen)."""
    min_score_gap: float = 0.0
    """Pairs whose reward-model scores differ by this much or less are left out as too close to call."""
    temperature: float = 1.0
    """Sampling temperature of the two responses."""
    max_new_tokens: int = 48
    """Longest sampled response."""

    def validate(self) -> None:
        super().validate()
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}.")
        if self.prompts_per_round < 1:
            raise ConfigError(f"prompts_per_round must be at least 1, got {self.prompts_per_round}.")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive to sample two different responses, got "
                              f"{self.temperature}.")
        if self.min_score_gap < 0:
            raise ConfigError(f"min_score_gap must be 0 or more, got {self.min_score_gap}.")
        if self.loss == "kto":
            raise ConfigError("online DPO writes paired data; use a paired loss (dpo, cdpo, ipo, simpo, orpo).")
        # options that read a preference file: here there is none to read (the rounds write their own pairs)
        for name, default in (("eval_data", ""), ("preference_ties", "error"), ("margin_from_scores", False)):
            if getattr(self, name) != default:
                raise ConfigError(f"--{name.replace('_', '-')} applies to preference files, and online DPO reads "
                                  "prompts (--data) and writes its own pairs every round; drop it.")


def reward_model_labeller(reward_dir: str, gap: float = 0.0) -> Labeller:
    """Prefer the response the reward model scores higher; |difference| <= gap is no preference."""
    from rlhfkit.reward.model import load_reward_ensemble, score_texts

    ensemble = load_reward_ensemble(reward_dir)

    def label(prompts: Sequence[Any], a: Sequence[str], b: Sequence[str]) -> list[int]:
        sa, _ = score_texts(ensemble, list(prompts), list(a))
        sb, _ = score_texts(ensemble, list(prompts), list(b))
        return [0 if abs(x - y) <= gap else (1 if x > y else -1) for x, y in zip(sa, sb)]

    return label


def sample_pairs(policy_dir: str, prompts: Sequence[Any], labeller: Labeller, temperature: float,
                 max_new_tokens: int, seed: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Two samples per prompt from the policy, labelled; TRL rows for the pairs with a winner, in the prompt's own
    format (the same ids the policy was sampled on)."""
    import torch

    from rlhfkit.models import load_causal_lm, load_tokenizer
    from rlhfkit.generation import sample

    tokenizer = load_tokenizer(policy_dir)
    model = load_causal_lm(policy_dir, tokenizer).eval()
    doubled = [p for p in prompts for _ in range(2)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        texts = sample(model, tokenizer, doubled, max_new_tokens=max_new_tokens, temperature=temperature).texts
    a, b = texts[0::2], texts[1::2]
    counts = {"prompts": len(prompts), "identical": 0, "no_preference": 0, "empty": 0, "pairs": 0}
    keep = [i for i in range(len(prompts)) if a[i].strip() and b[i].strip() and a[i].strip() != b[i].strip()]
    counts["identical"] = sum(1 for i in range(len(prompts)) if a[i].strip() and a[i].strip() == b[i].strip())
    counts["empty"] = len(prompts) - len(keep) - counts["identical"]
    verdicts = labeller([prompts[i] for i in keep], [a[i] for i in keep], [b[i] for i in keep]) if keep else []
    rows = []
    for i, v in zip(keep, verdicts):
        if v == 0:
            counts["no_preference"] += 1
            continue
        chosen, rejected = (a[i], b[i]) if v > 0 else (b[i], a[i])
        # the pair keeps the prompt as it was sampled: a string stays plain text (the DPO round then trains on
        # the ids the policy answered), a conversation stays messages with the response as the assistant's turn
        if isinstance(prompts[i], str):
            rows.append({"prompt": prompts[i], "chosen": chosen, "rejected": rejected, "source": "online"})
        else:
            rows.append({"prompt": list(prompts[i]), "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}], "source": "online"})
    counts["pairs"] = len(rows)
    return rows, counts


def main(cfg: OnlineDPOConfig, labeller: Labeller | None = None) -> dict[str, Any]:
    """labeller: optional callable (simulated annotators, an AI judge); default: cfg.reward_model."""
    cfg.validate()
    prompts = read_prompts(cfg.data_source())  # a missing or malformed prompts file fails before any model loads
    if labeller is None:
        if not cfg.reward_model:
            raise ConfigError("--reward-model is required to label the pairs (a directory written by "
                              "`rlhfkit reward`).")
        labeller = reward_model_labeller(cfg.reward_model, cfg.min_score_gap)
    out = Path(cfg.output_dir)
    if (out / "summary.json").exists() and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"{out} already holds a finished online-DPO run; pass --overwrite to replace it or "
                          "--resume to continue it.")
    if cfg.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    rng = random.Random(cfg.seed)
    policy = cfg.model
    rounds = []
    for r in range(1, cfg.rounds + 1):
        round_dir = out / f"round-{r}"
        order = list(range(len(prompts)))
        rng.shuffle(order)  # drawn every round, finished or not, so a resumed run picks the same prompts
        chosen = [prompts[i] for i in order[: cfg.prompts_per_round]]
        if (round_dir / "summary.json").exists():
            log.info("online-dpo: round %d finished earlier; reusing %s", r, round_dir)
            rounds.append(json.loads((round_dir / "round.json").read_text()))
            policy = str(round_dir)
            continue
        round_dir.mkdir(parents=True, exist_ok=True)
        rows, counts = sample_pairs(policy, chosen, labeller, cfg.temperature, cfg.max_new_tokens, cfg.seed + r)
        if not rows:
            raise ConfigError(f"round {r}: no pair had a preferred response ({counts}); raise the temperature or "
                              "lower min_score_gap.")
        pairs = round_dir / "pairs.jsonl"
        pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
        log.info("online-dpo round %d: %s", r, counts)
        # the round's starting policy is its reference: each round is a KL-regularised step from the last one
        round_cfg = replace(cfg, model=policy, ref_model="", data=str(pairs), output_dir=str(round_dir),
                            overwrite=True, resume=False, seed=cfg.seed + r, data_fields={})  # our own rows
        result = dpo_main(DPOConfig(**{k: getattr(round_cfg, k) for k in DPOConfig.__dataclass_fields__}))
        info = {"round": r, **counts, "final_loss": result.get("final_loss")}
        (round_dir / "round.json").write_text(json.dumps(info, indent=2))
        rounds.append(info)
        policy = str(round_dir)
    for f in Path(policy).iterdir():  # the last round's model, as a plain Hugging Face directory at OUTPUT/
        if f.is_file() and f.name not in ("summary.json", "config.yaml", "metrics.jsonl", REF_CACHE):
            shutil.copy2(f, out / f.name)
    summary = {"stage": "online-dpo", "rounds": rounds, "final_policy": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
