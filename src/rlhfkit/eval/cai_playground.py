"""The playground's Constitutional-AI experiment: does feedback from the simulated constitutional judge (not the
gold judge, not people) make a helpful-only assistant better and safer?

    python -m rlhfkit.eval.cai_playground [--base runs/demo/base --data runs/demo/data --output-dir runs/cai-playground]

Like the CAI paper (Bai et al. 2022), it starts from a helpful-only assistant: SFT from the playground's base model
on demonstrations that comply with most harmful requests. Then
  SL-CAI   the assistant's samples are critiqued and revised by the judge (`critique_revision_chains`) and the
           assistant is fine-tuned on the revisions;
  RLAIF    pairs of responses (the assistant's samples and the world's generator pairs) are labelled by the judge
           in both orders (`ai_preferences`); a reward model (used for best-of-n) and DPO (from the helpful-only
           model, and from the SL-CAI model: the paper's SL then RL pipeline) are trained on those AI labels only.
Every policy is scored on held-out test prompts by the hidden gold judge: gold score, unsafe-compliance rate,
win rate against the helpful-only SFT, KL to it. The AI labels' agreement with gold is reported beside the
simulated human annotators' agreement on the same pairs. Reads the demo's base model and data read-only."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rlhfkit.config import parse_args, save_config, to_dict

log = logging.getLogger(__name__)


@dataclass
class CAIExperimentConfig:
    """Sizes of the playground CAI experiment."""

    base: str = "runs/demo/base"
    """The pretrained playground base model (from `rlhfkit demo`), read only."""
    data: str = "runs/demo/data"
    """The playground data directory (prompts_{train,val,test}.jsonl), read only."""
    output_dir: str = "runs/cai-playground"
    """Where every model, the labels and summary.json go."""
    seed: int = 0
    """Seed of every stage."""
    refuse_rate: float = 0.2
    """How often the helpful-only demonstrations refuse a harmful request (the rest comply)."""
    sft_steps: int = 200
    """Steps of helpful-only SFT from the base model."""
    sl_cai_steps: int = 100
    """Steps of SFT on the judge's revisions (from the helpful-only model)."""
    revision_rounds: int = 2
    """Critique -> revision rounds per SL-CAI response."""
    policy_rounds: int = 2
    """Pairs of the assistant's own samples per training prompt."""
    generator_rounds: int = 4
    """Generator pairs (varied quality) per training prompt."""
    reward_steps: int = 300
    """Reward-model steps on the AI labels."""
    dpo_steps: int = 300
    """DPO steps on the AI labels."""
    dpo_learning_rate: float = 2e-4
    """DPO learning rate."""
    best_of_n: int = 16
    """Candidates per prompt for best-of-n with the AI-label reward model."""
    eval_prompts: int = 200
    """Held-out test prompts scored by the gold judge."""
    temperature: float = 0.7
    """Sampling temperature of evaluation."""
    progress: bool = False
    """Show training progress bars."""


def helpful_only_demos(prompts: Sequence[Any], seed: int, n: int, refuse_rate: float) -> list[dict[str, Any]]:
    """Demonstrations of a helpful-only assistant: good answers to harmless prompts, compliance with most harmful
    ones (a refusal with probability refuse_rate). Conversational rows, as the playground's SFT data."""
    from rlhfkit.playground.responses import Axes, compose

    rng = random.Random(seed)
    rows, order = [], []
    while len(rows) < n:
        if not order:
            order = list(prompts)
            rng.shuffle(order)
        p = order.pop()
        axes = Axes(refuse=rng.random() < refuse_rate) if p.harmful else Axes()
        rows.append({"prompt": [{"role": "user", "content": p.text}],
                     "completion": [{"role": "assistant", "content": compose(p, axes, rng)}]})
    return rows


def gold_agreement(rows: Sequence[dict[str, Any]], min_gap: float = 0.0) -> dict[str, float]:
    """Share of labelled pairs whose chosen response the gold judge also scores higher (pairs the gold judge
    scores within min_gap are left out as ties)."""
    from rlhfkit.playground.gold import gold_score
    from rlhfkit.playground.tasks import lookup

    def text(x: Any) -> str:
        return x if isinstance(x, str) else x[-1]["content"]

    agree = n = 0
    for row in rows:
        prompt = lookup(text(row["prompt"]))
        gap = gold_score(prompt, text(row["chosen"])) - gold_score(prompt, text(row["rejected"]))
        if abs(gap) <= min_gap:
            continue
        n += 1
        agree += gap > 0
    return {"agreement": agree / max(1, n), "pairs": n}


def _write(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(cfg: CAIExperimentConfig) -> dict[str, Any]:
    from dataclasses import replace

    from rlhfkit.eval.playground import evaluate_best_of_n, evaluate_policy, reward_gold_accuracy, win_rate
    from rlhfkit.feedback.ai import ai_preferences, critique_revision_chains, label_rows
    from rlhfkit.feedback.constitution import load_constitution
    from rlhfkit.playground.ai_judge import PlaygroundJudge
    from rlhfkit.playground.preferences import generator_pairs, label_pairs, policy_pairs
    from rlhfkit.playground.world import read_prompts
    from rlhfkit.policy import dpo, sft
    from rlhfkit.reward import train as rtrain

    root, data = Path(cfg.output_dir), Path(cfg.data)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "experiment.yaml")
    wall: dict[str, float] = {}
    t0 = time.time()
    splits = {s: read_prompts(data / f"prompts_{s}.jsonl") for s in ("train", "val", "test")}
    common = dict(seed=cfg.seed, progress=cfg.progress, report_to=["jsonl"], log_every=10, overwrite=True)

    def timed(name: str, fn: Any, *args: Any) -> Any:
        start = time.time()
        out = fn(*args)
        wall[name] = round(time.time() - start, 1)
        log.info("%s: %.1f s", name, wall[name])
        return out

    # 1. the helpful-only assistant
    ho_data = _write(root / "data" / "sft_helpful_only.jsonl",
                     helpful_only_demos(splits["train"], cfg.seed + 1, 2000, cfg.refuse_rate))
    sft_dir = root / "sft-helpful-only"
    timed("sft_helpful_only", sft.main, sft.SFTConfig(
        model=cfg.base, data=str(ho_data), output_dir=str(sft_dir), max_steps=cfg.sft_steps, batch_size=32,
        learning_rate=1e-3, warmup_steps=min(10, cfg.sft_steps), max_length=128, eval_fraction=0.05, **common))

    # 2. SL-CAI: critique -> revision of the assistant's samples, then SFT on the revisions
    constitution = load_constitution()
    judge = PlaygroundJudge(constitution)
    start = time.time()
    samples = policy_pairs(str(sft_dir), splits["train"], seed=cfg.seed + 3)
    prompts = [p.text for p, a, b in samples for _ in (a, b)]
    initial = [r for _, a, b in samples for r in (a, b)]
    chains = critique_revision_chains(judge, constitution, prompts, initial, cfg.revision_rounds,
                                      random.Random(cfg.seed + 4))
    _write(root / "data" / "sl_cai_chains.jsonl", chains)
    revised = _write(root / "data" / "sl_cai_sft.jsonl", [
        {"prompt": [{"role": "user", "content": c["prompt"]}], "completion": [{"role": "assistant", "content": c["final"]}]}
        for c in chains if c["final"].strip()])
    wall["sl_cai_revisions"] = round(time.time() - start, 1)
    sl_dir = root / "sl-cai"
    timed("sl_cai_sft", sft.main, sft.SFTConfig(
        model=str(sft_dir), data=str(revised), output_dir=str(sl_dir), max_steps=cfg.sl_cai_steps, batch_size=32,
        learning_rate=5e-4, warmup_steps=min(5, cfg.sl_cai_steps), max_length=128, eval_fraction=0.05, **common))

    # 3. RLAIF labels: the judge compares pairs in both orders; the simulated annotators label the same pairs
    start = time.time()
    label_report: dict[str, Any] = {}
    for split, (prounds, grounds) in {"train": (cfg.policy_rounds, cfg.generator_rounds), "val": (1, 1)}.items():
        pairs = [pr for r in range(prounds) for pr in policy_pairs(str(sft_dir), splits[split], seed=cfg.seed + 30 + r)]
        pairs += [pr for r in range(grounds) for pr in generator_pairs(splits[split], seed=cfg.seed + 40 + r)]
        pairs = [(p, a, b) for p, a, b in pairs if a.strip() != b.strip()]
        labels = ai_preferences(judge, constitution, [(p.text, a, b) for p, a, b in pairs],
                                random.Random(cfg.seed + 5))
        rows, counts = label_rows(labels, judge.name)
        _write(data_out := root / "data" / f"preferences_ai_{split}.jsonl", rows)
        human_rows, _ = label_pairs(pairs, seed=cfg.seed + 6)
        biases = [lab.position_bias for lab in labels if lab.position_bias is not None]
        label_report[split] = {
            "pairs": len(pairs), "rows": len(rows), "ties": counts["ties"], "file": str(data_out),
            "ai_vs_gold": gold_agreement(rows), "ai_vs_gold_gap_0.5": gold_agreement(rows, 0.5),
            "annotators_vs_gold": gold_agreement(human_rows),
            "mean_position_bias": sum(biases) / max(1, len(biases)),
        }
    wall["ai_labels"] = round(time.time() - start, 1)

    # 4. a reward model and DPO on the AI labels only
    train_rows, val_rows = (str(root / "data" / f"preferences_ai_{s}.jsonl") for s in ("train", "val"))
    rm_dir, dpo_dir = root / "reward-ai", root / "dpo-ai"
    timed("reward_ai", rtrain.main, rtrain.RewardConfig(
        model=str(sft_dir), data=train_rows, eval_data=val_rows, output_dir=str(rm_dir), max_steps=cfg.reward_steps,
        batch_size=32, learning_rate=1e-4, weight_decay=0.1, max_length=128,
        normalize_prompts=str(data / "prompts_train.jsonl"), normalize_samples=256, **common))
    timed("dpo_ai", dpo.main, dpo.DPOConfig(
        model=str(sft_dir), data=train_rows, eval_data=val_rows, output_dir=str(dpo_dir), max_steps=cfg.dpo_steps,
        batch_size=16, learning_rate=cfg.dpo_learning_rate, beta=0.1, max_length=128, **common))
    # the paper's whole pipeline: RL from AI feedback starting at the SL-CAI model (DPO stands in for PPO)
    sl_dpo_dir = root / "sl-cai-dpo-ai"
    timed("sl_cai_dpo_ai", dpo.main, dpo.DPOConfig(
        model=str(sl_dir), data=train_rows, eval_data=val_rows, output_dir=str(sl_dpo_dir),
        max_steps=cfg.dpo_steps, batch_size=16, learning_rate=cfg.dpo_learning_rate, beta=0.1, max_length=128,
        **common))

    # 5. the gold judge scores every policy on held-out prompts
    start = time.time()
    test = splits["test"][:cfg.eval_prompts]
    evals = {name: evaluate_policy(str(d), test, temperature=cfg.temperature, seed=cfg.seed, ref_dir=str(sft_dir))
             for name, d in (("sft_helpful_only", sft_dir), ("sl_cai", sl_dir), ("dpo_ai_labels", dpo_dir),
                             ("sl_cai_then_dpo_ai", sl_dpo_dir))}
    evals[f"best_of_{cfg.best_of_n}_ai_rm"] = evaluate_best_of_n(str(sft_dir), str(rm_dir), test, cfg.best_of_n,
                                                                 temperature=cfg.temperature, seed=cfg.seed)
    wall["eval"] = round(time.time() - start, 1)
    base = evals["sft_helpful_only"].scores
    policies = {name: {**ev.summary(), "win_rate_vs_sft": win_rate(ev.scores, base)} for name, ev in evals.items()}
    val = [json.loads(line) for line in Path(val_rows).read_text().splitlines() if line]
    summary = {
        "labels": label_report,
        "reward_model_on_ai_labels": reward_gold_accuracy(str(rm_dir), val),
        "policies": policies,
        "wall_seconds": {**wall, "total": round(time.time() - t0, 1)},
        "config": to_dict(replace(cfg)),
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_report(summary))
    return summary


def format_report(summary: dict[str, Any]) -> str:
    lines = ["AI labels (simulated constitutional judge) vs the gold judge:"]
    for split, rep in summary["labels"].items():
        lines.append(f"  {split}: {rep['rows']} rows from {rep['pairs']} pairs; agreement with gold "
                     f"{rep['ai_vs_gold']['agreement']:.3f} on {rep['ai_vs_gold']['pairs']} pairs "
                     f"({rep['ai_vs_gold_gap_0.5']['agreement']:.3f} where gold differs by > 0.5); simulated "
                     f"annotators on the same pairs {rep['annotators_vs_gold']['agreement']:.3f}; "
                     f"judge position bias {rep['mean_position_bias']:+.3f}")
    rm = summary["reward_model_on_ai_labels"]
    lines.append(f"reward model on AI labels: gold accuracy {rm['gold_accuracy']:.3f} on {rm['pairs']} val pairs")
    head = f"{'policy':<22} {'gold score':>16} {'unsafe':>7} {'win vs sft':>10} {'KL to sft':>10} {'length':>7}"
    lines += ["", head, "-" * len(head)]
    for name, p in summary["policies"].items():
        kl = "-" if p["kl_to_ref"] is None else f"{p['kl_to_ref']:.2f}"
        lines.append(f"{name:<22} {p['gold_score']:+.3f} ± {p['gold_se']:.3f} {p['unsafe_rate']:>7.3f} "
                     f"{p['win_rate_vs_sft']:>10.3f} {kl:>10} {p['mean_length']:>7.1f}")
    lines.append("")
    lines.append("wall seconds: " + ", ".join(f"{k} {v}" for k, v in summary["wall_seconds"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(parse_args(CAIExperimentConfig, sys.argv[1:], prog="python -m rlhfkit.eval.cai_playground"))
