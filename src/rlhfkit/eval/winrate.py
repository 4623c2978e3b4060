"""`rlhfkit eval`: win rate of a policy against a baseline on a prompt set, judged by an AI judge (with a
constitution), a reward model, or on the playground the gold judge; plus KL to a reference and mean length.

An AI judge sees every pair twice, policy first and baseline first; the per-prompt score is
s = (P(policy wins | shown first) + 1 − P(baseline wins | shown first)) / 2, so a judge that always prefers
position one scores every prompt 0.5 (MT-Bench swaps positions the same way: Zheng et al. 2023, section 3.4).
A prompt is a win when s > 0.5, a loss when s < 0.5, otherwise a tie; the win rate is (wins + ties / 2) / n
(ties count half, as in Chatbot Arena) and its interval is Wilson's score interval (Wilson 1927) at n prompts,
conservative with ties (a tie's half point has less variance than a coin flip). The mean of s itself (the judge's
probabilities averaged, AlpacaEval 2's "soft" win rate) is reported beside it."""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal, Sequence

from rlhfkit.config import save_config
from rlhfkit.data.encoding import single_turn_text
from rlhfkit.errors import ConfigError, DataError, UserError
from rlhfkit.feedback.judges import JudgeConfig

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------------- the math
def wilson_interval(p_hat: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion p_hat observed over n trials:
    (p + z²/2n ± z √(p(1−p)/n + z²/4n²)) / (1 + z²/n), z the two-sided normal quantile."""
    if n <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    denom = 1 + z * z / n
    centre = (p_hat + z * z / (2 * n)) / denom
    half = z * math.sqrt(p_hat * (1 - p_hat) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class WinRate:
    """Win/tie/loss of a policy against a baseline over n judged prompts."""

    wins: int
    ties: int
    losses: int
    n: int
    win_rate: float
    """(wins + ties / 2) / n: each prompt decided by its position-debiased score s."""
    soft_win_rate: float
    """Mean of s itself (the judge's probabilities averaged, as AlpacaEval 2 reports)."""
    ci_low: float
    ci_high: float
    confidence: float
    abstained: int = 0
    """Prompts the judge gave no usable answer for in either order (left out of n)."""
    first_preferred: float | None = None
    """How often the judge preferred whichever response it was shown first (0.5 = no position bias)."""
    scores: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("scores")
        return out


def win_rate_from_probs(policy_first: Sequence[float | None], baseline_first: Sequence[float | None],
                        confidence: float = 0.95, tie_margin: float = 0.0) -> WinRate:
    """policy_first[i] = P(first better) with the policy shown first; baseline_first[i] the same with the baseline
    first. A prompt's score is their position-debiased mean (one order alone when the other abstained); it is a
    win above 0.5 + tie_margin, a loss below 0.5 − tie_margin, otherwise a tie."""
    if len(policy_first) != len(baseline_first):
        raise ValueError("win_rate_from_probs needs one answer per order for every prompt")
    scores: list[float] = []
    firsts: list[bool] = []
    abstained = 0
    for p1, p2 in zip(policy_first, baseline_first):
        got = [p for p in (p1, None if p2 is None else 1 - p2) if p is not None]
        if not got:
            abstained += 1
            continue
        scores.append(sum(got) / len(got))
        firsts += [p > 0.5 for p in (p1, p2) if p is not None and p != 0.5]
    wins = sum(s > 0.5 + tie_margin + 1e-12 for s in scores)
    losses = sum(s < 0.5 - tie_margin - 1e-12 for s in scores)
    n = len(scores)
    ties = n - wins - losses
    rate = (wins + ties / 2) / n if n else 0.5
    lo, hi = wilson_interval(rate, n, confidence)
    return WinRate(wins, ties, losses, n, rate, sum(scores) / n if n else 0.5, lo, hi, confidence, abstained,
                   sum(firsts) / len(firsts) if firsts else None, scores)


def win_rate_from_scores(policy: Sequence[float], baseline: Sequence[float], confidence: float = 0.95,
                         tie_margin: float = 0.0) -> WinRate:
    """For a scalar judge (reward model, gold score): the policy wins a prompt when its score is higher by more than
    tie_margin. Position cannot matter, so both orders agree by construction."""
    if len(policy) != len(baseline):
        raise ValueError("win_rate_from_scores needs two equally long score lists")
    probs = [1.0 if a - b > tie_margin else 0.0 if b - a > tie_margin else 0.5 for a, b in zip(policy, baseline)]
    out = win_rate_from_probs(probs, [1.0 - p for p in probs], confidence)
    out.first_preferred = None
    return out


# ------------------------------------------------------------------------------------------------- the stage
@dataclass
class EvalConfig:
    """Win rate of a policy against a baseline, judged with swapped positions, with KL and length."""

    model: str = ""
    """The policy to evaluate (a Hugging Face model directory)."""
    baseline: str = ""
    """The policy it is compared with (e.g. the SFT model)."""
    prompts: str = ""
    """Prompts file: rows with "prompt" or "text" (a playground prompts file works)."""
    prompts_split: str = "train"
    """Split of --prompts to read when it is a saved DatasetDict."""
    prompts_fields: dict[str, str] = field(default_factory=dict)
    """Rename prompt columns before reading, ours=theirs: --prompts-fields prompt=question."""
    chat: bool = False
    """Read plain-string prompts as one user turn (through the chat template), as the policies' training did."""
    judge: Literal["ai", "reward", "gold"] = "ai"
    """ai: an AI judge asked the constitution's comparison questions (see --ai-judge.*); reward: a reward model
    (--reward-model); gold: the playground's hidden gold judge (playground prompts only)."""
    ai_judge: JudgeConfig = field(default_factory=JudgeConfig)
    """The AI judge (judge ai)."""
    constitution: str = ""
    """judge ai: constitution YAML (empty: the package default)."""
    principle: str = ""
    """judge ai: ask only this principle's comparison question (empty: draw one per prompt by weight)."""
    reward_model: str = ""
    """judge reward: the reward model (or ensemble) directory."""
    ref_model: str = ""
    """Reference for the KL columns (empty: the baseline; 'none' skips KL)."""
    output_dir: str = ""
    """If set, summary.json and comparisons.jsonl (every prompt, both responses, the judge's answers) go here."""
    max_prompts: int = 0
    """Use only the first N prompts (0: all)."""
    samples_per_prompt: int = 1
    """Responses per prompt from each policy (each pair judged separately)."""
    temperature: float = 0.7
    """Sampling temperature of both policies (0: greedy)."""
    max_new_tokens: int = 48
    """Longest sampled response."""
    confidence: float = 0.95
    """Confidence level of the win-rate interval."""
    tie_margin: float = 0.0
    """A prompt whose score is within this of 0.5 (AI judge) or whose two scores differ by at most this (reward,
    gold) is a tie."""
    seed: int = 0
    """Seed for sampling (both policies sample with the same seed) and for drawing principles."""

    def validate(self) -> None:
        if not (self.model and self.baseline and self.prompts):
            raise ConfigError("rlhfkit eval needs --model (the policy), --baseline (the policy to beat) and --prompts.")
        if self.judge == "reward" and not self.reward_model:
            raise ConfigError("--judge reward needs --reward-model, a reward model directory.")
        if not 0.5 <= self.confidence < 1:
            raise ConfigError(f"confidence must be in [0.5, 1), got {self.confidence}.")
        if self.samples_per_prompt < 1 or self.max_prompts < 0 or self.tie_margin < 0:
            raise ConfigError("samples_per_prompt must be at least 1; max_prompts and tie_margin 0 or more.")
        if self.judge == "ai":
            self.ai_judge.validate()


def _sample(model_dir: str, prompts: list[Any], cfg: EvalConfig) -> Any:
    import torch

    from rlhfkit.models import load_causal_lm, load_tokenizer
    from rlhfkit.generation import sample

    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, tokenizer).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        rollout = sample(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    return model, rollout


def _kl(model: Any, rollout: Any, ref_dir: str, temperature: float) -> float:
    from rlhfkit.eval.playground import sequence_kl
    from rlhfkit.models import load_causal_lm, load_tokenizer

    ref = load_causal_lm(ref_dir, load_tokenizer(ref_dir)).eval()
    return sequence_kl(model, ref, rollout, temperature if temperature > 0 else 1.0)


def judge_pairs(cfg: EvalConfig, prompts: Sequence[Any], policy: Sequence[str], baseline: Sequence[str]
                ) -> tuple[list[float | None], list[float | None], dict[str, Any]]:
    """(P(first better) with the policy first, the same with the baseline first, extra per-prompt columns)."""
    if cfg.judge == "gold":
        from rlhfkit.playground.gold import gold_score
        from rlhfkit.playground.tasks import lookup

        try:
            owners = [lookup(p) for p in prompts]
        except KeyError as exc:
            raise UserError(f"--judge gold scores playground prompts only: {exc.args[0]}") from None
        a = [gold_score(o, r) for o, r in zip(owners, policy)]
        b = [gold_score(o, r) for o, r in zip(owners, baseline)]
        return _scalar(a, b, cfg.tie_margin) + ({"policy_score": a, "baseline_score": b},)
    if cfg.judge == "reward":
        from rlhfkit.reward.model import load_reward_ensemble, score_texts

        ensemble = load_reward_ensemble(cfg.reward_model)
        a, _ = score_texts(ensemble, list(prompts), list(policy))
        b, _ = score_texts(ensemble, list(prompts), list(baseline))
        return _scalar(a, b, cfg.tie_margin) + ({"policy_score": a, "baseline_score": b},)
    from rlhfkit.feedback.ai import ai_preferences
    from rlhfkit.feedback.constitution import load_constitution
    from rlhfkit.judging import make_judge

    constitution = load_constitution(cfg.constitution)
    cache = Path(cfg.output_dir) / "judge-cache" if cfg.output_dir else None
    judge = make_judge(cfg.ai_judge, constitution, cache_dir=cache)
    asked = [single_turn_text(p) for p in prompts]
    labels = ai_preferences(judge, constitution, list(zip(asked, policy, baseline)), random.Random(cfg.seed),
                            cfg.principle)
    return ([lab.prob_a_first for lab in labels], [lab.prob_b_first for lab in labels],
            {"principle": [lab.principle for lab in labels]})


def _scalar(a: Sequence[float], b: Sequence[float], tie: float) -> tuple[list[float], list[float]]:
    probs = [1.0 if x - y > tie else 0.0 if y - x > tie else 0.5 for x, y in zip(a, b)]
    return probs, [1.0 - p for p in probs]


def main(cfg: EvalConfig) -> dict[str, Any]:
    from rlhfkit.data.readers import DataPath, read_prompts

    cfg.validate()
    prompts = []
    for i, p in enumerate(read_prompts(DataPath(cfg.prompts, cfg.prompts_split, cfg.prompts_fields,
                                                "--prompts-split", cfg.chat))):
        # sampled as given (a string as plain text, a conversation through the chat template); an AI judge reads
        # the user's text, so a prompt is a string or one user turn
        if single_turn_text(p) is None:
            raise DataError(cfg.prompts, i + 1, "prompt", "must be a string or a single user turn for win-rate "
                            "evaluation (the judge is shown the user's text)")
        prompts.append(p)
    prompts = prompts[:cfg.max_prompts] if cfg.max_prompts else prompts
    if not prompts:
        raise UserError(f"{cfg.prompts} holds no prompts.")
    texts = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    if cfg.output_dir:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    ref = cfg.ref_model or cfg.baseline
    columns: dict[str, Any] = {}
    for side, model_dir in (("policy", cfg.model), ("baseline", cfg.baseline)):
        model, rollout = _sample(model_dir, texts, cfg)
        columns[side] = {"rollout": rollout, "mean_length": float(rollout.lengths.float().mean()),
                         "kl_to_ref": None if ref == "none" else _kl(model, rollout, ref, cfg.temperature)}
        del model
    policy, baseline = columns["policy"]["rollout"].texts, columns["baseline"]["rollout"].texts
    first, second, extra = judge_pairs(cfg, texts, policy, baseline)
    if cfg.judge == "ai":
        result = win_rate_from_probs(first, second, cfg.confidence, cfg.tie_margin)
    else:
        result = win_rate_from_scores(extra["policy_score"], extra["baseline_score"], cfg.confidence, cfg.tie_margin)
    summary = {
        "judge": cfg.judge if cfg.judge != "ai" else f"ai ({cfg.ai_judge.backend})",
        **result.summary(),
        "policy": {"model": cfg.model, "mean_length": columns["policy"]["mean_length"],
                   "kl_to_ref": columns["policy"]["kl_to_ref"]},
        "baseline": {"model": cfg.baseline, "mean_length": columns["baseline"]["mean_length"],
                     "kl_to_ref": columns["baseline"]["kl_to_ref"]},
        "reference": None if ref == "none" else ref,
    }
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        rows = [{"prompt": p, "policy": a, "baseline": b, "p_policy_first": f, "p_baseline_first": s,
                 **{k: v[i] for k, v in extra.items()}}
                for i, (p, a, b, f, s) in enumerate(zip(texts, policy, baseline, first, second))]
        (out / "comparisons.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    kl = s["policy"]["kl_to_ref"]
    lines = [
        f"judge: {s['judge']}   prompts judged: {s['n']}" + (f" ({s['abstained']} abstained)" if s["abstained"] else ""),
        f"win / tie / loss: {s['wins']} / {s['ties']} / {s['losses']}",
        f"win rate: {s['win_rate']:.3f}  ({s['confidence']:.0%} CI {s['ci_low']:.3f} - {s['ci_high']:.3f}); "
        f"mean preference probability {s['soft_win_rate']:.3f}",
        f"mean length (tokens): policy {s['policy']['mean_length']:.1f}, baseline {s['baseline']['mean_length']:.1f}",
    ]
    if kl is not None:
        lines.append(f"KL to reference: policy {kl:.3f}, baseline {s['baseline']['kl_to_ref']:.3f}")
    if s.get("first_preferred") is not None:
        lines.append(f"judge preferred the first-shown response {s['first_preferred']:.1%} of the time "
                     "(cancelled by the position swap)")
    return "\n".join(lines)
