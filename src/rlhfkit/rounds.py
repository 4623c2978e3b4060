"""Human-in-the-loop rounds (`rlhfkit rounds`): sample -> label queue -> reward refit -> policy -> evaluation, again.

InstructGPT, Anthropic's HH work and Llama 2 collected their preferences in rounds: responses of the current
policy go to people, the reward model is refitted on every label so far, the policy trains on against it, and the
next round's responses come from the improved policy, so the labels follow the policy to where the reward model
is now being used. One round here:

1. sample: K responses per prompt from the current policy (the SFT model in round 1) on the round's own prompts;
2. items: every distinct pair of a prompt's responses becomes an item of the round's feedback project
   (`run`/`round` in the store), ordered by the queue: at random, or by the previous round's reward ensemble
   (disagreement, or BALD: `reward.acquisition`), with a random share interleaved; a share of items asks for
   several annotators (overlap, for reliability), and gold items (known answers) go to everyone;
3. labels: wait until the round holds its label budget: people in the browser (`rlhfkit label serve` on the
   same database; the admin page shows the round and its progress), the playground's simulated annotators, an AI
   judge, or a mix. The queue is reordered every `reprioritise_every` labels, the ensemble's members reweighted by
   how well they predicted the labels so far;
4. export: every label of every round so far, each row carrying the Dawid-Skene posterior that its chosen response
   is truly better (`confidence`) when `reliability` is on, so random clickers count for nothing and
   adversaries are turned round;
5. reward: the reward ensemble refitted on all of it, from the SFT model;
6. policy: PPO (or GRPO / RLOO / REINFORCE through ppo.advantage) continues from the last round's policy against
   the new reward model, with the SFT model as the reference; or online DPO, labelled by the new reward model;
7. eval: the policy's proxy reward and KL to the SFT model on held-out prompts (and, on the playground, its gold
   score).

Killed at any point and rerun with the same config, the loop resumes where it was: finished steps are recorded in
`state.json` and never repeated, the labels live in the store (nothing is lost; the simulated annotators draw each
judgment from who judges and how many tasks they have finished, so the rerun labels exactly as an uninterrupted
run would), and the reward and policy stages resume from their own checkpoints."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal

from rlhfkit.config import load_yaml, save_config, to_dict
from rlhfkit.errors import ConfigError, UserError
from rlhfkit.feedback.judges import JudgeConfig
from rlhfkit.policy.online_dpo import OnlineDPOConfig
from rlhfkit.policy.ppo import PPOConfig
from rlhfkit.reward.acquisition import STRATEGIES
from rlhfkit.reward.train import RewardConfig

log = logging.getLogger(__name__)

STEPS = ("sample", "items", "labels", "export", "reward", "policy", "eval")
LABELLERS = ("people", "simulated", "ai")
STATE_FILE = "state.json"


def _ppo_defaults() -> PPOConfig:
    return PPOConfig(advantage="grpo", samples_per_prompt=4, batch_size=4, minibatches=1, whiten=True)


@dataclass
class RoundsConfig:
    """Human-in-the-loop RLHF in rounds: sample from the policy, label the most useful pairs, refit the reward
    model, train the policy on, repeat."""

    output_dir: str = ""
    """Run directory: state.json, config.yaml, summary.json, report.html, feedback.db and round-N/ (candidates,
    queue, preferences, reliability, reward/, policy/, eval.json)."""
    sft_model: str = ""
    """The SFT model: the first round's policy, the reference of every round, and the start of every reward fit."""
    prompts: str = ""
    """Prompts file (rows with "prompt" or "text"; a playground prompts file works). Round r takes the next
    prompts_per_round of them, starting over (with fresh samples) when they run out; the policy trains on all."""
    eval_prompts: str = ""
    """Held-out prompts for each round's evaluation (proxy reward and KL to the SFT model); empty skips it."""
    rounds: int = 3
    """How many rounds to run."""
    prompts_per_round: int = 100
    """Prompts sampled per round."""
    samples_per_prompt: int = 4
    """K responses per prompt from the current policy; each distinct pair of them is a candidate item."""
    labels_per_round: int = 300
    """The round's label budget: A/B/tie/both-bad answers on non-gold items (skips do not count)."""
    queue: Literal["random", "disagreement", "bald"] = "bald"
    """Order of a round's items: random; the previous round's reward ensemble's disagreement Var_m σ(r_m(A) -
    r_m(B)); or BALD, the expected information about the reward. Round 1 (no reward model yet) is random."""
    random_share: float = 0.2
    """Share of the queue ordered at random, interleaved through the active order."""
    reprioritise_every: int = 50
    """Reorder the queue after this many labels of the round (members reweighted by the labels so far); 0 never."""
    overlap_share: float = 0.1
    """Share of items judged by overlap_annotators people instead of one (agreement and reliability need overlap)."""
    overlap_annotators: int = 3
    """Annotators per overlapping item."""
    gold: str = ""
    """Gold items added to every round (rows {"prompt", "responses": [a, b], "answer": "A" | "B"}); every
    annotator sees them once, and they anchor the reliability estimate."""
    gold_every: int = 5
    """Every gold_every-th task of an annotator is a gold item until they have answered them all, so a round's
    budget anchors every annotator's reliability however few tasks each takes."""
    labellers: list[str] = field(default_factory=lambda: ["people"])
    """Who labels: people (the loop waits while they label in the browser), simulated (the playground's
    annotators; playground prompts only), ai (the judge below). Several split each round's budget in order."""
    simulated_annotators: int = 20
    """labellers simulated: the pool's size."""
    simulated_random_share: float = 0.0
    """labellers simulated: share of the pool who click at random."""
    simulated_adversarial_share: float = 0.0
    """labellers simulated: share of the pool who answer the opposite of what they think."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """labellers ai: the judge (backend playground, hf or openai)."""
    db: str = ""
    """The feedback database (default output_dir/feedback.db): give people `rlhfkit label serve --db` on it."""
    run: str = ""
    """The run's name in the store (default: the output directory's name)."""
    conversational: bool = True
    """Prompts are user turns of a chat: sampled through the chat template and exported as messages (the
    trainers then template them the same way). Off: plain text throughout."""
    reliability: bool = True
    """Export each label with its Dawid-Skene posterior as `confidence` (soft Bradley-Terry targets): unreliable
    annotators' rows count for less, adversaries' are turned round. Off: every label trains as certain."""
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(ensemble_size=3, bootstrap=True))
    """The reward fit (model, data and output_dir are filled in each round); ensemble_size >= 2 for an active
    queue."""
    reward_epochs: float = 3.0
    """Reward steps = reward_epochs x labels so far / batch size (at least 20); 0 uses reward.max_steps."""
    policy: Literal["ppo", "online-dpo", "none"] = "ppo"
    """The policy stage of each round: ppo (with ppo.advantage gae, grpo, rloo, ...), online-dpo, or none
    (labels and reward models only)."""
    policy_steps: int = 40
    """Policy optimizer steps per round (online-dpo: per round of its own, online_dpo.rounds of them)."""
    ppo: PPOConfig = field(default_factory=_ppo_defaults)
    """policy ppo: the settings (model, ref_model, reward_model, data and output_dir are filled in)."""
    online_dpo: OnlineDPOConfig = field(default_factory=OnlineDPOConfig)
    """policy online-dpo: the settings (model, reward_model, data and output_dir are filled in). Online DPO's own
    rounds each take a KL step from the policy they start from, which is their reference (not the SFT model)."""
    eval_samples: int = 2
    """Responses per held-out prompt in each round's evaluation."""
    gold_eval: bool = False
    """Also score the evaluation with the playground's hidden gold judge (playground prompts only)."""
    max_new_tokens: int = 48
    """Longest sampled response."""
    temperature: float = 1.0
    """Sampling temperature of the round's candidates."""
    poll_seconds: float = 5.0
    """labellers people: how often the loop checks the store for new labels."""
    max_wait_s: float = 0.0
    """labellers people: stop with an error after this many seconds without a new label (rerun to go on waiting);
    0 waits as long as it takes."""
    seed: int = 0
    """Seed of sampling, queue order, simulated annotators and training."""

    def validate(self) -> None:
        for name in ("output_dir", "sft_model", "prompts"):
            if not getattr(self, name):
                raise ConfigError(f"rounds needs --{name.replace('_', '-')}.")
        for name in ("rounds", "prompts_per_round", "labels_per_round", "simulated_annotators", "eval_samples",
                     "overlap_annotators", "gold_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt must be at least 2 (items are pairs), got {self.samples_per_prompt}.")
        if self.queue not in STRATEGIES:
            raise ConfigError(f"queue must be one of {', '.join(STRATEGIES)}, got {self.queue!r}.")
        if self.queue != "random" and self.reward.ensemble_size < 2:
            raise ConfigError(f"queue {self.queue} orders items by the reward ensemble's members; set "
                              "--reward.ensemble-size 2 or more, or use --queue random.")
        for name in ("random_share", "overlap_share", "simulated_random_share", "simulated_adversarial_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.reprioritise_every < 0 or self.reward_epochs < 0 or self.poll_seconds <= 0 or self.max_wait_s < 0:
            raise ConfigError("reprioritise_every, reward_epochs and max_wait_s must be 0 or more and poll_seconds "
                              "positive.")
        if not self.labellers or any(lab not in LABELLERS for lab in self.labellers):
            raise ConfigError(f"labellers must name one or more of {', '.join(LABELLERS)}, got {self.labellers}.")
        if len(set(self.labellers)) != len(self.labellers):
            raise ConfigError(f"labellers names one twice: {self.labellers}.")

    def run_name(self) -> str:
        return self.run or Path(self.output_dir).resolve().name

    def db_path(self) -> str:
        return self.db or str(Path(self.output_dir) / "feedback.db")


# ------------------------------------------------------------------------------------------------ state
def _write_json(path: Path, data: Any) -> None:
    """Atomic: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class State:
    """Which steps of which rounds are finished (state.json), written after each step."""

    def __init__(self, root: Path):
        self.path = root / STATE_FILE
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {"done": {}}

    def done(self, r: int, step: str) -> bool:
        return step in self.data["done"].get(str(r), [])

    def finish(self, r: int, step: str) -> None:
        self.data["done"].setdefault(str(r), []).append(step)
        _write_json(self.path, self.data)


COMPARED = ("sft_model", "prompts", "prompts_per_round", "samples_per_prompt", "labels_per_round", "queue",
            "random_share", "reprioritise_every", "overlap_share", "overlap_annotators", "gold", "gold_every", "labellers",
            "reliability", "seed", "policy", "policy_steps", "reward_epochs")


def _check_same_run(cfg: RoundsConfig, root: Path) -> None:
    """A rerun continues the run only with the settings it was started with (more rounds are fine)."""
    saved_path = root / "config.yaml"
    if not saved_path.exists():
        return
    saved, now = load_yaml(saved_path), to_dict(cfg)
    changed = [k for k in COMPARED if k in saved and saved[k] != now[k]]
    if changed:
        raise ConfigError(f"{root} holds a rounds run started with other {', '.join(changed)}; rerun with the same "
                          "settings to resume it (only --rounds may grow), or choose another --output-dir.")


# ------------------------------------------------------------------------------------------------ steps
def _prompt_text(prompt: Any) -> str:
    """The text a round's item shows: the prompt itself, or the one user turn of a conversation (main checks every
    prompt of the file before anything runs, so this cannot fail)."""
    return prompt if isinstance(prompt, str) else prompt[0]["content"]


def check_prompts(cfg: RoundsConfig) -> list[Any]:
    """Every prompt of cfg.prompts, checked before the first round samples: a string, or a conversation of one
    user turn (what a labelling item shows); a conversation needs conversational on. Errors name file and row."""
    from rlhfkit.data.readers import read_prompts, read_rows
    from rlhfkit.errors import DataError
    from rlhfkit.feedback.commands import _prompt_text as item_text

    for lineno, row in read_rows(cfg.prompts):
        value = row.get("prompt", row.get("text"))
        item_text(value, cfg.prompts, lineno)  # one user turn at most: longer conversations are refused here
        if isinstance(value, list) and not cfg.conversational:
            raise DataError(cfg.prompts, lineno, "prompt", "is a conversation, but --conversational is off, so the "
                            "exported labels would hold plain text the policy never saw; turn --conversational on "
                            "or give the prompts as strings")
    return read_prompts(cfg.prompts)


def round_prompts(prompts: list[Any], r: int, n: int) -> list[Any]:
    """Round r's prompts (1-based): the next n, wrapping around the file."""
    start = (r - 1) * n
    return [prompts[(start + i) % len(prompts)] for i in range(n)]


def _sample(policy_dir: str, prompts: list[Any], k: int, cfg: RoundsConfig, seed: int) -> list[list[str]]:
    """k samples per prompt from the policy, distinct and non-empty, in sample order."""
    import torch

    from rlhfkit.generation import sample
    from rlhfkit.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(policy_dir)
    model = load_causal_lm(policy_dir, tokenizer).eval()
    texts = [_chat(p, cfg) for p in prompts for _ in range(k)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = sample(model, tokenizer, texts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature).texts
    return [distinct_responses(out[i * k:(i + 1) * k]) for i in range(len(prompts))]


def distinct_responses(texts: list[str]) -> list[str]:
    """The non-empty responses, distinct by their stripped text but kept exactly as sampled (a plain-text prompt's
    response " 42" is the tokens the policy makes; "42" would teach the reward model other ones)."""
    kept: dict[str, str] = {}
    for t in texts:
        if t.strip():
            kept.setdefault(t.strip(), t)
    return list(kept.values())


def _chat(prompt: Any, cfg: RoundsConfig) -> Any:
    if isinstance(prompt, str) and cfg.conversational:
        return [{"role": "user", "content": prompt}]
    return prompt


def candidate_pairs(candidates: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(prompt text, a, b) for every distinct pair of each prompt's responses, prompt by prompt."""
    return [(c["prompt"], a, b) for c in candidates for a, b in itertools.combinations(c["responses"], 2)]


def member_probabilities(reward_dir: str, pairs: list[tuple[str, str, str]], conversational: bool) -> Any:
    """(M, N) P(A beats B) under each member of the reward ensemble in reward_dir."""
    from rlhfkit.reward.acquisition import pair_probabilities
    from rlhfkit.reward.model import load_reward_ensemble, score_texts_all_heads

    ensemble = load_reward_ensemble(reward_dir)
    prompts = [[{"role": "user", "content": p}] if conversational else p for p, _, _ in pairs]
    head = ensemble.head or 0
    both = score_texts_all_heads(ensemble, prompts + prompts, [x for _, x, _ in pairs] + [x for _, _, x in pairs])
    a, b = both[:, : len(pairs), head], both[:, len(pairs) :, head]
    return pair_probabilities(a, b)


def _read_gold(path: str) -> list[Any]:
    from rlhfkit.data.readers import read_rows
    from rlhfkit.errors import DataError
    from rlhfkit.feedback.service import ItemSpec

    items = []
    for lineno, row in read_rows(path):
        responses, answer = row.get("responses"), row.get("answer")
        if not (isinstance(responses, list) and len(responses) == 2 and all(isinstance(x, str) for x in responses)):
            raise DataError(path, lineno, "responses", "a gold item for a rounds run is a pair: two strings")
        if answer not in ("A", "B"):
            raise DataError(path, lineno, "answer", f"must be A or B (which response is better), got {answer!r}")
        items.append(ItemSpec(_prompt_text(row.get("prompt")), responses, ["gold", "gold"], gold_outcome=answer))
    return items


class Queue:
    """A round's queue order: the previous ensemble's member probabilities on the round's items, reweighted by
    the labels so far; priorities are recomputed from the first floor(labels / every) x every labels (by
    judgment order), so a rerun reorders exactly as an uninterrupted run did."""

    def __init__(self, cfg: RoundsConfig, r: int, item_ids: list[int], probs: Any):
        self.cfg, self.r, self.item_ids, self.probs = cfg, r, item_ids, probs
        self.index = {i: n for n, i in enumerate(item_ids)}
        self.applied = -1
        self.history: list[dict[str, Any]] = []

    def priorities(self, winners: list[tuple[int, int]]) -> list[float]:
        import torch

        from rlhfkit.reward.acquisition import acquisition_scores, labelled_loglik, queue_priorities, tempered_weights

        if self.probs is None or self.cfg.queue == "random":
            return queue_priorities(None, len(self.item_ids), 1.0, self.cfg.seed * 1000 + self.r)
        weights, tau = None, 1.0
        if winners:
            cols = torch.tensor([self.index[i] for i, _ in winners])
            weights, tau = tempered_weights(labelled_loglik(self.probs[:, cols], [w for _, w in winners]))
        scores = acquisition_scores(self.probs, self.cfg.queue, weights)
        self.history.append({"labels": len(winners), "tau": tau,
                             "weights": None if weights is None else [round(float(w), 4) for w in weights],
                             "mean_score": float(scores.mean())})
        return queue_priorities(scores, len(self.item_ids), self.cfg.random_share,
                                self.cfg.seed * 1000 + self.r + len(winners))

    def update(self, svc: Any, project_id: int, labels: int) -> None:
        every = self.cfg.reprioritise_every
        if self.probs is None or self.cfg.queue == "random" or every == 0:
            return
        upto = labels // every * every
        if upto == self.applied or upto == 0:
            return
        judged = sorted((j for j in svc.judged_items(project_id) if not j["gold"] and j["outcome"] in ("A", "B")),
                        key=lambda j: j["judgment_id"])[:upto]
        winners = [(j["item_id"], 0 if j["outcome"] == "A" else 1) for j in judged if j["item_id"] in self.index]
        prio = self.priorities(winners)
        svc.set_priorities(project_id, dict(zip(self.item_ids, prio)))
        self.applied = upto


def round_project_name(cfg: RoundsConfig, r: int) -> str:
    """The feedback project of round r: RUN-round-r."""
    return f"{cfg.run_name()}-round-{r}"


def _items(cfg: RoundsConfig, svc: Any, root: Path, r: int, prev_reward: str | None) -> dict[str, Any]:
    """Create round r's project with its candidate pairs (ordered by the queue), overlap and gold items."""
    import torch

    from rlhfkit.feedback.service import Conflict, ItemSpec

    rdir = root / f"round-{r}"
    candidates = [json.loads(line) for line in (rdir / "candidates.jsonl").read_text().splitlines()]
    pairs = candidate_pairs(candidates)
    if not pairs:
        raise UserError(f"round {r}: the policy gave no two different responses to any prompt, so there is nothing "
                        "to compare; raise --temperature or --samples-per-prompt.")
    probs = None
    if cfg.queue != "random" and prev_reward is not None:
        probs = member_probabilities(prev_reward, pairs, cfg.conversational)
        torch.save(probs, rdir / "queue.pt")
    queue = Queue(cfg, r, list(range(len(pairs))), probs)
    prio = queue.priorities([])
    rng = random.Random(cfg.seed * 7919 + r)
    overlap = set(rng.sample(range(len(pairs)), round(cfg.overlap_share * len(pairs))))
    specs = [ItemSpec(p, [a, b], [f"round-{r}", f"round-{r}"], priority=prio[n],
                      annotators=cfg.overlap_annotators if n in overlap else 1) for n, (p, a, b) in enumerate(pairs)]
    gold = _read_gold(cfg.gold) if cfg.gold else []
    name = round_project_name(cfg, r)
    try:
        project = svc.create_project(name, "pairwise", "Which response is better? Helpful, correct, kind, safe.",
                                     run=cfg.run_name(), round=r, gold_every=cfg.gold_every if gold else None)
    except Conflict:
        project = svc.project(name)
    if not svc.item_prompts(project.id):  # add_items is one transaction: all items or none
        svc.add_items(project.id, specs + gold)
    return {"project": name, "items": len(pairs), "gold_items": len(gold), "overlap_items": len(overlap),
            "prompts": len(candidates)}


def _round_queue(cfg: RoundsConfig, svc: Any, root: Path, r: int) -> tuple[Any, Queue]:
    import torch

    project = svc.project(round_project_name(cfg, r))
    gold = svc.gold_item_ids(project.id)
    ids = [i for i, _ in svc.item_prompts(project.id) if i not in gold]
    path = root / f"round-{r}" / "queue.pt"
    probs = torch.load(path) if path.exists() else None
    return project, Queue(cfg, r, ids, probs)


def _labels(cfg: RoundsConfig, svc: Any, root: Path, r: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """Wait until round r holds its label budget, running the automatic labellers for their shares."""
    project, queue = _round_queue(cfg, svc, root, r)
    budget = cfg.labels_per_round
    start_labels = svc.progress(project.id).labels
    queue.update(svc, project.id, start_labels)
    shares = [budget * (k + 1) // len(cfg.labellers) for k in range(len(cfg.labellers))]
    for labeller, target in zip(cfg.labellers, shares):
        if labeller == "simulated":
            from rlhfkit.playground.annotators import make_mixed_pool

            pool = make_mixed_pool(cfg.seed, cfg.simulated_annotators, cfg.simulated_random_share,
                                   cfg.simulated_adversarial_share)
            from rlhfkit.playground.simulate import label_until

            label_until(svc, project.id, pool, cfg.seed * 1000 + r, target,
                        after_label=lambda n: queue.update(svc, project.id, n))
        elif labeller == "ai":
            _ai_labels(cfg, svc, project, target, queue)
        else:
            last, since = -1, time.monotonic()
            while (n := svc.progress(project.id).labels) < target:
                if n != last:
                    progress(f"round {r}: {n}/{budget} labels in {cfg.db_path()} (project {project.name}); waiting "
                             "for people to label (rlhfkit label serve)")
                    last, since = n, time.monotonic()
                elif cfg.max_wait_s and time.monotonic() - since > cfg.max_wait_s:
                    raise UserError(f"round {r}: no new label in {cfg.max_wait_s:g} s ({n}/{budget} so far, project "
                                    f"{project.name} in {cfg.db_path()}); rerun the same command to go on waiting.")
                queue.update(svc, project.id, n)
                if not _open_work(svc, project.id):
                    break
                time.sleep(cfg.poll_seconds)
    got = svc.progress(project.id)
    if got.labels < budget:
        log.warning("round %d: the queue ran out at %d of %d labels; continuing with those.", r, got.labels, budget)
    agreement = svc.agreement(project.id, min_shared=5)
    return {"labels": got.labels, "skips": got.skips, "gold_labels": got.gold_labels, "outcomes": got.outcomes,
            "agreement": {"units": agreement.units, "percent": agreement.percent, "alpha": agreement.alpha},
            "queue_updates": queue.history}


def _open_work(svc: Any, project_id: int) -> bool:
    got = svc.progress(project_id)
    return got.labels + got.skips < got.slots or got.slots == 0


def _ai_labels(cfg: RoundsConfig, svc: Any, project: Any, target: int, queue: Queue) -> None:
    from rlhfkit.feedback.ai import AIAnnotator, label_store_project
    from rlhfkit.feedback.constitution import load_constitution
    from rlhfkit.judging import make_judge

    judge = make_judge(cfg.judge, load_constitution(None), cache_dir=Path(cfg.output_dir) / "judge-cache")
    annotator = AIAnnotator(judge, load_constitution(None), user=f"ai-{judge.name}")
    while (n := svc.progress(project.id).labels) < target:
        got = label_store_project(svc, project.name, annotator, random.Random(cfg.seed + n), limit=min(
            target - n, cfg.reprioritise_every or target))
        queue.update(svc, project.id, svc.progress(project.id).labels)
        if not sum(got["stored"].values()):
            break


def _export(cfg: RoundsConfig, svc: Any, root: Path, r: int) -> dict[str, Any]:
    from rlhfkit.feedback.export import add_reliability_columns, export_run_rows, reliability_reports, write_export

    run = cfg.run_name()
    projects = [p for p in svc.round_projects(run) if p.round <= r]
    rows, report = export_run_rows(svc, run, conversational=cfg.conversational)
    rows = [row for row in rows if row["round"] <= r]
    # fitted after the export: people may still be labelling, and the fit must cover every exported judgment
    reports = reliability_reports(svc, projects)
    if cfg.reliability:
        add_reliability_columns(rows, reports)
    rdir = root / f"round-{r}"
    write_export(rdir / "preferences.jsonl", rows)
    fit = reports[None]
    _write_json(rdir / "reliability.json", fit.to_dict())
    flags: dict[str, int] = {}
    for a in fit.annotators:
        flags[a.flag] = flags.get(a.flag, 0) + 1
    return {"rows": len(rows), "left_out": report.skipped, "annotator_flags": flags,
            "flagged": [a.name for a in fit.annotators if a.flag in ("random", "adversarial")]}


def _reward(cfg: RoundsConfig, root: Path, r: int, policy_dir: str) -> dict[str, Any]:
    from rlhfkit.reward import train as rtrain

    rdir = root / f"round-{r}"
    rows = sum(1 for _ in (rdir / "preferences.jsonl").open())
    steps = cfg.reward.max_steps
    if cfg.reward_epochs > 0:
        steps = max(20, math.ceil(cfg.reward_epochs * rows / (cfg.reward.batch_size * cfg.reward.grad_accum)))
    out = rdir / "reward"
    if (out / "summary.json").exists():  # finished before a kill that came ahead of state.json's update
        summary = json.loads((out / "summary.json").read_text())
        return {k: summary[k] for k in ("heldout_accuracy", "heldout_ece", "heldout_loss") if k in summary} | {
            "steps": steps, "rows": rows}
    rcfg = replace(cfg.reward, model=cfg.sft_model, data=str(rdir / "preferences.jsonl"), output_dir=str(out),
                   max_steps=steps, seed=cfg.seed * 100 + r, resume=(out / "config.yaml").exists(),
                   chat=cfg.conversational or cfg.reward.chat,
                   normalize_prompts=cfg.reward.normalize_prompts or cfg.prompts,
                   normalize_policy=cfg.reward.normalize_policy or policy_dir)
    summary = rtrain.main(rcfg)
    return {k: summary[k] for k in ("heldout_accuracy", "heldout_ece", "heldout_loss") if k in summary} | {
        "steps": steps, "rows": rows}


def _policy(cfg: RoundsConfig, root: Path, r: int, policy_dir: str) -> dict[str, Any]:
    rdir = root / f"round-{r}"
    out = rdir / "policy"
    if (out / "summary.json").exists():  # finished before a kill that came ahead of state.json's update
        summary = json.loads((out / "summary.json").read_text())
        return {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
    common = dict(model=policy_dir, ref_model=cfg.sft_model, reward_model=str(rdir / "reward"), data=cfg.prompts,
                  output_dir=str(out), seed=cfg.seed * 100 + r, resume=(out / "config.yaml").exists(),
                  chat=cfg.conversational)
    if cfg.policy == "ppo":
        from rlhfkit.policy import ppo

        summary = ppo.main(replace(cfg.ppo, max_steps=cfg.policy_steps, **common))
    else:
        from rlhfkit.policy import online_dpo

        summary = online_dpo.main(replace(cfg.online_dpo, max_steps=cfg.policy_steps, **common))
    return {k: v for k, v in (summary or {}).items() if isinstance(v, (int, float, str))}


def evaluate(cfg: RoundsConfig, policy_dir: str, reward_dir: str | None, r: int) -> dict[str, Any]:
    """The policy's mean proxy reward (this round's ensemble) and KL to the SFT model on the held-out prompts,
    with standard errors; the gold score too when gold_eval."""
    import torch

    from rlhfkit.data.readers import read_prompts
    from rlhfkit.eval.playground import sequence_kl
    from rlhfkit.generation import sample
    from rlhfkit.models import load_causal_lm, load_tokenizer
    from rlhfkit.reward.model import load_reward_ensemble, score_texts

    prompts = read_prompts(cfg.eval_prompts)
    tokenizer = load_tokenizer(policy_dir)
    policy = load_causal_lm(policy_dir, tokenizer).eval()
    texts = [_chat(p, cfg) for p in prompts for _ in range(cfg.eval_samples)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 31 + 5)  # the same draws every round: rounds differ by their policy only
        rollout = sample(policy, tokenizer, texts, max_new_tokens=cfg.max_new_tokens, temperature=1.0)
    out: dict[str, Any] = {"round": r, "samples": len(texts)}
    if policy_dir != cfg.sft_model:
        ref = load_causal_lm(cfg.sft_model, tokenizer).eval()
        with torch.no_grad():
            out["kl"] = sequence_kl(policy, ref, rollout)
    else:
        out["kl"] = 0.0
    if reward_dir is not None:
        proxy, _ = score_texts(load_reward_ensemble(reward_dir), texts, rollout.texts)
        out.update(_mean_se("proxy", proxy))
    if cfg.gold_eval:
        from rlhfkit.eval.playground import gold_scores

        out.update(_mean_se("gold_score", gold_scores(texts, rollout.texts), per=cfg.eval_samples))
    return out


def _mean_se(name: str, values: list[float], per: int = 1) -> dict[str, float]:
    """Mean and its standard error; with `per` samples per prompt the s.e. is over prompt means (samples of one
    prompt are not independent)."""
    from rlhfkit.eval.overopt import mean_se

    groups = [values[i:i + per] for i in range(0, len(values), per)]
    mean, se = mean_se([sum(g) / len(g) for g in groups])
    return {name: mean, f"{name}_se": se}


# ------------------------------------------------------------------------------------------------ main
def main(cfg: RoundsConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the rounds; returns summary.json's content ({"rounds": [...]} and the settings)."""
    from rlhfkit.feedback.service import FeedbackService
    from rlhfkit.feedback.store import open_store

    cfg.validate()
    say = progress or (lambda msg: log.info(msg))
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    _check_same_run(cfg, root)
    save_config(cfg, root / "config.yaml")
    state = State(root)
    svc = FeedbackService(open_store(cfg.db_path()), rng=random.Random(cfg.seed))
    prompts = check_prompts(cfg)
    results: dict[str, Any] = json.loads((root / "summary.json").read_text()) if (root / "summary.json").exists() \
        else {}
    per_round: dict[str, Any] = {str(x["round"]): x for x in results.get("rounds", [])}
    policy_dir, reward_dir = cfg.sft_model, None
    for r in range(1, cfg.rounds + 1):
        rdir = root / f"round-{r}"
        rdir.mkdir(exist_ok=True)
        record = per_round.setdefault(str(r), {"round": r})

        def step(name: str, fn: Callable[[], Any]) -> None:
            if state.done(r, name):
                return
            say(f"round {r}/{cfg.rounds}: {name}")
            t0 = time.time()
            value = fn()
            if value is not None:
                record[name] = value
            record.setdefault("wall_seconds", {})[name] = round(time.time() - t0, 1)
            _write_json(root / "summary.json", _summary(cfg, per_round))
            state.finish(r, name)

        def sample_step() -> dict[str, Any]:
            chosen = round_prompts(prompts, r, cfg.prompts_per_round)
            groups = _sample(policy_dir, chosen, cfg.samples_per_prompt, cfg, cfg.seed * 1000 + r)
            rows = [{"prompt": _prompt_text(p), "responses": g} for p, g in zip(chosen, groups) if len(g) >= 2]
            tmp = rdir / "candidates.jsonl.tmp"
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
            os.replace(tmp, rdir / "candidates.jsonl")
            return {"policy": policy_dir, "prompts": len(chosen), "prompts_with_pairs": len(rows)}

        step("sample", sample_step)
        step("items", lambda: _items(cfg, svc, root, r, reward_dir))
        step("labels", lambda: _labels(cfg, svc, root, r, say))
        step("export", lambda: _export(cfg, svc, root, r))
        step("reward", lambda: _reward(cfg, root, r, policy_dir))
        reward_dir = str(rdir / "reward")
        if cfg.policy != "none":
            step("policy", lambda: _policy(cfg, root, r, policy_dir))
            policy_dir = str(rdir / "policy")
        if cfg.eval_prompts:
            step("eval", lambda: evaluate(cfg, policy_dir, reward_dir, r))
    summary = _summary(cfg, per_round)
    _write_json(root / "summary.json", summary)
    from rlhfkit.eval.report import write_rounds_report

    report = write_rounds_report(root, summary)
    say(f"rounds finished: {root / 'summary.json'}; report: {report}")
    return summary


def _summary(cfg: RoundsConfig, per_round: dict[str, Any]) -> dict[str, Any]:
    return {"run": cfg.run_name(), "db": cfg.db_path(), "queue": cfg.queue, "policy": cfg.policy,
            "rounds": [per_round[k] for k in sorted(per_round, key=int) if int(k) <= cfg.rounds]}
