"""Score a policy on the playground's held-out prompts with the hidden gold judge.

Evaluation is the only place the gold judge is imported (tests/test_import_rules.py enforces it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import torch

from rlhfkit.models import load_causal_lm, load_tokenizer, logprobs_of
from rlhfkit.playground.gold import gold_breakdown, gold_score, is_unsafe, mean_se
from rlhfkit.playground.tasks import Prompt
from rlhfkit.generation import Rollout, sample


@dataclass
class PolicyEval:
    gold_score: float
    gold_se: float
    mean_length: float
    unsafe_rate: float
    eos_rate: float
    n: int
    kl_to_ref: float | None = None
    proxy_score: float | None = None
    """Mean reward-model score of the samples (when a reward model was given): the proxy the optimiser saw."""
    by_kind: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    """Gold score of every sample, in prompt order (for paired comparisons such as win rates)."""
    other_proxy_scores: dict[str, float] = field(default_factory=dict)
    """The same samples' mean score under each of `evaluate_policy`'s other_reward_dirs, by directory."""

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("samples")
        out.pop("scores")
        out.pop("other_proxy_scores")
        return out

    def scored_by(self, reward_dir: str) -> "PolicyEval":
        """This evaluation with the proxy of one of its other reward models (`other_proxy_scores`)."""
        if reward_dir not in self.other_proxy_scores:
            raise KeyError(f"{reward_dir}: not one of this evaluation's reward models "
                           f"({sorted(self.other_proxy_scores)})")
        return replace(self, proxy_score=self.other_proxy_scores[reward_dir], other_proxy_scores={})


def win_rate(scores: Sequence[float], baseline: Sequence[float], prompts: int | None = None) -> float:
    """Probability that the policy's answer beats the baseline's answer to the same prompt by gold score (ties
    count half). Scores are in prompt order, k consecutive samples per prompt; with `prompts` given, the two
    sides may have different k (best-of-n's one pick against SFT's several samples): every pair of samples of a
    prompt is compared, then prompts are averaged."""
    if not scores or not baseline:
        raise ValueError("win_rate needs two non-empty score lists from the same prompts")
    if prompts is None:  # one sample per prompt on each side
        prompts = len(scores) if len(scores) == len(baseline) else 0
    if not prompts or len(scores) % prompts or len(baseline) % prompts:
        raise ValueError(f"win_rate got {len(scores)} and {len(baseline)} scores, which do not split evenly over "
                         f"{prompts} prompts; pass prompts= the number of prompts both were sampled on")
    ka, kb = len(scores) // prompts, len(baseline) // prompts
    total = 0.0
    for i in range(prompts):
        mine, theirs = scores[i * ka : (i + 1) * ka], baseline[i * kb : (i + 1) * kb]
        total += sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in mine for b in theirs) / (ka * kb)
    return total / prompts


@torch.no_grad()
def sequence_kl(policy: Any, ref: Any, rollout: Rollout, temperature: float = 1.0) -> float:
    """Monte-Carlo KL(π || π_ref) per sequence: mean over samples of Σ_t log π(y_t) − log π_ref(y_t)
    (the k1 estimator, summed over the response). The samples come from π at `temperature`, so both
    log-probs are taken at that temperature: the KL between the distributions actually sampled."""
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1)  # (B, P+R)
    mask = torch.cat([rollout.prompt_mask, rollout.response_mask], dim=1)  # (B, P+R)
    P = rollout.prompt_ids.shape[1]
    lp = logprobs_of(policy, ids, mask, temperature, start=P - 1)  # (B, R): log-probs of the response tokens
    lp_ref = logprobs_of(ref, ids, mask, temperature, start=P - 1)
    return float(((lp - lp_ref) * rollout.response_mask).sum(-1).mean())


def evaluate_policy(
    model_dir: str,
    prompts: Sequence[Prompt],
    samples_per_prompt: int = 1,
    temperature: float = 0.7,
    max_new_tokens: int = 48,
    seed: int = 0,
    ref_dir: str | None = None,
    keep_samples: int = 0,
    reward_dir: str | None = None,
    tokenizer_dir: str | None = None,
    other_reward_dirs: Sequence[str] = (),
) -> PolicyEval:
    """Sample responses to `prompts`, score them with the gold judge; KL to ref_dir and the proxy reward of
    reward_dir when given. tokenizer_dir: where the tokenizer is when model_dir has none (a checkpoint).
    other_reward_dirs: more reward models to score the same samples with (`PolicyEval.scored_by`)."""
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    model = load_causal_lm(model_dir, tokenizer).eval()
    texts = [p.messages for p in prompts for _ in range(samples_per_prompt)]
    owners = [p for p in prompts for _ in range(samples_per_prompt)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rollout = sample(model, tokenizer, texts, max_new_tokens=max_new_tokens, temperature=temperature)
    parts = [gold_breakdown(p, r) for p, r in zip(owners, rollout.texts)]
    stats = mean_se([b.total for b in parts])
    harmful = [(p, r) for p, r in zip(owners, rollout.texts) if p.harmful]
    by_kind: dict[str, list[float]] = {}
    for p, b in zip(owners, parts):
        by_kind.setdefault(p.kind, []).append(b.total)
    kl = None
    if ref_dir is not None:
        ref = load_causal_lm(ref_dir, load_tokenizer(ref_dir)).eval()
        kl = sequence_kl(model, ref, rollout, temperature if temperature > 0 else 1.0)
    from rlhfkit.reward.model import load_reward_ensemble, score_texts

    proxy = None
    if reward_dir is not None:
        proxy_scores, _ = score_texts(load_reward_ensemble(reward_dir), texts, rollout.texts)
        proxy = sum(proxy_scores) / len(proxy_scores)
    others = {}
    for other in other_reward_dirs:
        other_scores, _ = score_texts(load_reward_ensemble(other), texts, rollout.texts)
        others[other] = sum(other_scores) / len(other_scores)
    return PolicyEval(
        gold_score=stats.mean,
        gold_se=stats.se,
        mean_length=float(rollout.lengths.float().mean()),
        unsafe_rate=sum(is_unsafe(p, r) for p, r in harmful) / max(1, len(harmful)),
        eos_rate=float(rollout.ended.float().mean()),
        n=len(texts),
        kl_to_ref=kl,
        proxy_score=proxy,
        by_kind={k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        samples=[{"prompt": p.text, "response": r, "gold": b.total}
                 for p, r, b in list(zip(owners, rollout.texts, parts))[::samples_per_prompt][:keep_samples]],
        scores=[b.total for b in parts],
        other_proxy_scores=others,
    )


def reward_gold_accuracy(reward_dir: str, rows: Sequence[dict[str, Any]], min_gap: float = 0.0) -> dict[str, float]:
    """How often the reward model orders a pair the way the gold judge does (pairs the judge scores within
    min_gap of each other are skipped as ties), with its binomial standard error. Also reports the labels' own
    agreement with gold on those pairs, where a reward model trained on such labels starts from."""
    from rlhfkit.playground.gold import gold_score
    from rlhfkit.playground.tasks import lookup
    from rlhfkit.reward.model import load_reward_ensemble, score_texts

    def text(x: Any) -> str:
        return x if isinstance(x, str) else x[-1]["content"]

    ensemble = load_reward_ensemble(reward_dir)
    prompts = [r["prompt"] for r in rows]
    # one call for both sides: batched together, and a response in several pairs is scored once
    both, _ = score_texts(ensemble, prompts + prompts, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    chosen, rejected = both[: len(rows)], both[len(rows) :]
    agree = labels = n = 0
    for row, c, r in zip(rows, chosen, rejected):
        prompt = lookup(text(row["prompt"]))
        gap = gold_score(prompt, text(row["chosen"])) - gold_score(prompt, text(row["rejected"]))
        if abs(gap) <= min_gap:
            continue
        n += 1
        agree += (c - r > 0) == (gap > 0)
        labels += gap > 0
    accuracy = agree / max(1, n)
    return {"gold_accuracy": accuracy, "gold_accuracy_se": (accuracy * (1 - accuracy) / max(1, n)) ** 0.5,
            "label_gold_accuracy": labels / max(1, n), "pairs": n}


def _scored_samples(policy_dir: str, reward_dir: str, prompts: Sequence[Prompt], n: int, temperature: float,
                    max_new_tokens: int, seed: int) -> tuple[Rollout, list[float]]:
    """n samples per prompt (prompt-major) from policy_dir under a seeded, forked RNG, and their proxy scores."""
    from rlhfkit.reward.model import load_reward_ensemble, score_texts

    tokenizer = load_tokenizer(policy_dir)
    model = load_causal_lm(policy_dir, tokenizer).eval()
    texts = [p.messages for p in prompts for _ in range(n)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rollout = sample(model, tokenizer, texts, max_new_tokens=max_new_tokens, temperature=temperature)
    proxy, _ = score_texts(load_reward_ensemble(reward_dir), texts, rollout.texts)
    return rollout, proxy


def evaluate_best_of_n(policy_dir: str, reward_dir: str, prompts: Sequence[Prompt], n: int,
                       temperature: float = 0.7, max_new_tokens: int = 48, seed: int = 0) -> PolicyEval:
    """Best-of-n as a policy: n samples per prompt from policy_dir, the reward model's favourite kept, then
    scored by the gold judge. Its KL to the sampling policy is the analytic bound log n - (n - 1)/n."""
    from rlhfkit.policy.best_of_n import best_of_n_kl

    rollout, proxy = _scored_samples(policy_dir, reward_dir, prompts, n, temperature, max_new_tokens, seed)
    picked = [max(range(i * n, (i + 1) * n), key=lambda j: proxy[j]) for i in range(len(prompts))]
    responses = [rollout.texts[j] for j in picked]
    parts = [gold_breakdown(p, r) for p, r in zip(prompts, responses)]
    stats = mean_se([b.total for b in parts])
    harmful = [(p, r) for p, r in zip(prompts, responses) if p.harmful]
    by_kind: dict[str, list[float]] = {}
    for p, b in zip(prompts, parts):
        by_kind.setdefault(p.kind, []).append(b.total)
    return PolicyEval(
        gold_score=stats.mean, gold_se=stats.se,
        mean_length=float(rollout.lengths[picked].float().mean()),
        unsafe_rate=sum(is_unsafe(p, r) for p, r in harmful) / max(1, len(harmful)),
        eos_rate=float(rollout.ended[picked].float().mean()), n=len(prompts), kl_to_ref=best_of_n_kl(n),
        by_kind={k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        samples=[{"prompt": p.text, "response": r, "gold": b.total} for p, r, b in list(zip(prompts, responses, parts))[:12]],
        scores=[b.total for b in parts],
    )


def best_of_n_sweep(policy_dir: str, reward_dir: str, prompts: Sequence[Prompt], max_n: int = 64,
                    temperature: float = 0.7, max_new_tokens: int = 48, seed: int = 0) -> list[dict[str, float]]:
    """Proxy and gold score of best-of-n for n = 1, 2, 4, ..., max_n from one set of max_n samples per prompt
    (the unbiased subset estimator of Gao et al. App. I), with KL = log n − (n−1)/n and d = sqrt(KL)."""
    import math

    from rlhfkit.eval.overopt import best_of_n_expectation
    from rlhfkit.policy.best_of_n import best_of_n_kl

    rollout, scores = _scored_samples(policy_dir, reward_dir, prompts, max_n, temperature, max_new_tokens, seed)
    proxy = torch.tensor(scores).view(-1, max_n)  # (B, max_n)
    owners = [p for p in prompts for _ in range(max_n)]
    gold = torch.tensor([gold_breakdown(p, r).total for p, r in zip(owners, rollout.texts)]).view(-1, max_n)
    points = []
    n = 1
    while n <= max_n:
        kl = best_of_n_kl(n)
        points.append({"n": n, "kl": kl, "d": math.sqrt(kl),
                       "proxy": float(best_of_n_expectation(proxy, proxy, n)),
                       "gold": float(best_of_n_expectation(proxy, gold, n))})
        n *= 2
    return points


def gold_scores(prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
    """The hidden gold judge as PPO's held-out watcher (logged and monitored, never optimised): a training stage is
    handed this function by the pipeline and never imports the judge itself."""
    from rlhfkit.playground.tasks import lookup

    return [gold_score(lookup(p), r) for p, r in zip(prompts, responses)]
