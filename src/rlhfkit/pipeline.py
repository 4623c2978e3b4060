"""`rlhfkit demo`: the built-in playground pipeline, end to end on a CPU.

base model (pretrained on mostly mediocre "web text") -> SFT on good demonstrations -> simulated annotators judge
pairs of responses -> reward model -> DPO -> evaluation with the hidden gold judge. Every stage runs through its own public `main(cfg)`, writes its config to
DIR/configs/<stage>.yaml (so `rlhfkit <stage> --config DIR/configs/<stage>.yaml` reruns it alone), and is
reused on a rerun when its finished run directory holds the same config."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from rlhfkit.config import load_yaml, save_config, to_dict

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """The built-in pipeline on the playground world."""

    output_dir: str = "runs/demo"
    """Where every stage's run directory, the data, summary.json and the report go."""
    quick: bool = False
    """A smaller, faster run (fewer pretraining/SFT steps and evaluation prompts) for smoke tests."""
    seed: int = 0
    """Seed for the world, every stage and evaluation."""
    pretrain_steps: int = 1000
    """Optimizer steps of base-model pretraining on the web-text corpus (quick: 300)."""
    sft_steps: int = 300
    """Optimizer steps of SFT on demonstrations (quick: 100)."""
    reward_steps: int = 300
    """Optimizer steps of reward-model training (quick: 100)."""
    dpo_steps: int = 150
    """Optimizer steps of DPO from the SFT model (quick: 60)."""
    dpo_beta: float = 0.1
    """DPO's KL coefficient beta."""
    best_of_n: int = 16
    """Candidates per prompt for the best-of-n policy (SFT samples, reward model picks)."""
    eval_prompts: int = 200
    """Held-out test prompts scored by the gold judge (quick: 100)."""
    rebuild: bool = False
    """Ignore cached stages and run everything again."""
    progress: bool = True
    """Show progress bars."""


def _finished_with(run_dir: Path, cfg: Any) -> bool:
    """A finished run (summary.json is written last) whose config matches, run-control flags aside."""
    if not ((run_dir / "summary.json").exists() and (run_dir / "config.yaml").exists()):
        return False
    ignore = ("overwrite", "resume", "progress")
    saved = {k: v for k, v in load_yaml(run_dir / "config.yaml").items() if k not in ignore}
    return saved == {k: v for k, v in to_dict(cfg).items() if k not in ignore}


def run_stage(name: str, cfg: Any, main: Callable[[Any], Any], root: Path, rebuild: bool,
              wall: dict[str, float]) -> None:
    """Write the stage's config for standalone reruns; run it unless an identical finished run exists."""
    save_config(cfg, root / "configs" / f"{name}.yaml")
    out = Path(cfg.output_dir)
    if not rebuild and _finished_with(out, cfg):
        log.info("%s: reusing the finished run in %s", name, out)
        return
    start = time.time()
    main(replace(cfg, overwrite=True))
    wall[name] = round(time.time() - start, 1)


def main(cfg: DemoConfig) -> dict[str, Any]:
    from rlhfkit.eval.report import write_report
    from rlhfkit.eval.playground import evaluate_best_of_n, evaluate_policy, reward_gold_accuracy, win_rate
    from rlhfkit.playground.world import WorldSpec, build_initial_model, read_prompts, write_world
    from rlhfkit.policy import dpo, sft
    from rlhfkit.reward import train as rtrain

    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    pretrain_steps = min(cfg.pretrain_steps, 300) if cfg.quick else cfg.pretrain_steps
    sft_steps = min(cfg.sft_steps, 100) if cfg.quick else cfg.sft_steps
    n_eval = min(cfg.eval_prompts, 100) if cfg.quick else cfg.eval_prompts
    reward_steps = min(cfg.reward_steps, 100) if cfg.quick else cfg.reward_steps
    dpo_steps = min(cfg.dpo_steps, 60) if cfg.quick else cfg.dpo_steps
    wall: dict[str, float] = {}
    t0 = time.time()

    spec = WorldSpec(seed=cfg.seed)
    data = root / "data"
    if cfg.rebuild or not (data / "world.json").exists() or json.loads((data / "world.json").read_text()) != spec.__dict__:
        write_world(data, spec)
        build_initial_model(root / "init", spec)
        wall["world"] = round(time.time() - t0, 1)

    common = dict(seed=cfg.seed, progress=cfg.progress, report_to=["jsonl", "tensorboard"], log_every=10)
    pretrain = sft.SFTConfig(
        model=str(root / "init"), data=str(data / "pretrain.jsonl"), output_dir=str(root / "base"),
        max_steps=pretrain_steps, batch_size=32, learning_rate=3e-3, warmup_steps=50, lr_schedule="cosine",
        max_length=128, eval_fraction=0.01, eval_every=max(1, pretrain_steps // 4), save_every=0, **common)
    run_stage("pretrain", pretrain, sft.main, root, cfg.rebuild or "world" in wall, wall)
    sft_cfg = sft.SFTConfig(
        model=str(root / "base"), data=str(data / "sft.jsonl"), output_dir=str(root / "sft"),
        max_steps=sft_steps, batch_size=32, learning_rate=1e-3, warmup_steps=10, max_length=128,
        eval_fraction=0.05, eval_every=max(1, sft_steps // 4), **common)
    # a stage downstream of one that just ran must run again even when its own config is unchanged
    run_stage("sft", sft_cfg, sft.main, root, cfg.rebuild or "pretrain" in wall, wall)

    # people (here: the simulated annotator pool) compare responses; only their labels reach training
    labels = collect_labels(root, cfg.seed, quick=cfg.quick, redo=cfg.rebuild or "sft" in wall)
    if labels is not None:
        wall["label"] = labels
    reward_cfg = rtrain.RewardConfig(
        model=str(root / "sft"), data=str(data / "preferences_train.jsonl"),
        eval_data=str(data / "preferences_val.jsonl"), output_dir=str(root / "reward"), max_steps=reward_steps,
        batch_size=32, learning_rate=1e-4, weight_decay=0.1, max_length=128,
        normalize_prompts=str(data / "prompts_train.jsonl"), normalize_samples=256,
        eval_every=max(1, reward_steps // 3), **common)
    run_stage("reward", reward_cfg, rtrain.main, root, cfg.rebuild or "label" in wall, wall)
    dpo_cfg = dpo.DPOConfig(
        model=str(root / "sft"), data=str(data / "preferences_train.jsonl"),
        eval_data=str(data / "preferences_val.jsonl"), output_dir=str(root / "dpo"), max_steps=dpo_steps,
        batch_size=16, learning_rate=5e-5, beta=cfg.dpo_beta, max_length=128,
        eval_every=max(1, dpo_steps // 3), **common)
    run_stage("dpo", dpo_cfg, dpo.main, root, cfg.rebuild or "label" in wall, wall)

    test_prompts = read_prompts(data / "prompts_test.jsonl")[:n_eval]
    start = time.time()
    evals = {}
    for name in ("base", "sft", "dpo"):
        evals[name] = evaluate_policy(str(root / name), test_prompts, seed=cfg.seed, ref_dir=str(root / "sft"),
                                      keep_samples=12)
    evals["best_of_n"] = evaluate_best_of_n(str(root / "sft"), str(root / "reward"), test_prompts,
                                            n=cfg.best_of_n, seed=cfg.seed)
    wall["eval"] = round(time.time() - start, 1)
    policies = {}
    for name, ev in evals.items():
        policies[name] = {**ev.summary(), "kl_to_sft": ev.kl_to_ref,
                          "win_rate_vs_sft": win_rate(ev.scores, evals["sft"].scores)}
    val_rows = [json.loads(line) for line in (data / "preferences_val.jsonl").read_text().splitlines() if line]
    reward_summary = json.loads((root / "reward" / "summary.json").read_text())
    reward_model = {
        **reward_gold_accuracy(str(root / "reward"), val_rows),
        "heldout_accuracy": reward_summary.get("heldout_accuracy"),
        "ece": reward_summary.get("heldout_ece"),
        "length_correlation": reward_summary.get("heldout_length_correlation"),
    }
    summary = {
        "policies": policies,
        "reward_model": reward_model,
        "wall_seconds": {**wall, "total": round(time.time() - t0, 1)},
        "samples": {name: ev.samples for name, ev in evals.items()},
        "config": to_dict(cfg),
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    report = write_report(root, summary)
    print(format_table(policies))
    print(f"\nreward model: {reward_model['gold_accuracy']:.3f} agreement with the gold judge on "
          f"{reward_model['pairs']} held-out pairs (the annotators' labels: {reward_model['label_gold_accuracy']:.3f}); "
          f"held-out label accuracy {reward_model['heldout_accuracy']:.3f}, ECE {reward_model['ece']:.3f}, "
          f"score-length correlation {reward_model['length_correlation']:+.3f}")
    print(f"\nsummary: {root / 'summary.json'}; report: {report}; stage configs: {root / 'configs'}")
    return summary


def collect_labels(root: Path, seed: int, quick: bool, redo: bool) -> float | None:
    """Simulated annotators judge response pairs for the train and validation prompts: K samples from the SFT
    policy ranked (InstructGPT-style), plus generator pairs of varied quality judged pairwise.
    Returns the seconds spent, or None when the finished labels were reused."""
    from rlhfkit.playground.preferences import generator_pairs, label_pairs, policy_groups, rank_groups
    from rlhfkit.playground.world import read_prompts

    data = root / "data"
    stamp = data / "labels.json"
    if not redo and stamp.exists() and json.loads(stamp.read_text()).get("quick") == quick:
        return None
    start = time.time()
    report: dict[str, Any] = {"quick": quick}
    # split -> (samples per prompt, policy rounds, generator rounds). Held-out pairs stay pairs (K = 2).
    plan = {"train": (4, 1 if quick else 2, 2 if quick else 6), "val": (2, 1, 2)}
    for split, (k, policy_rounds, generator_rounds) in plan.items():
        prompts = read_prompts(data / f"prompts_{split}.jsonl")
        rows: list[dict[str, Any]] = []
        for r in range(policy_rounds):
            groups = policy_groups(str(root / "sft"), prompts, k, seed=seed + 11 + r)
            if k == 2:
                got, rep = label_pairs([(p, g[0], g[1]) for p, g in groups if len(g) == 2], seed=seed + 12 + r)
            else:
                got, rep = rank_groups(groups, seed=seed + 12 + r)
            rows += got
            report[f"{split}_policy_{r}"] = rep.to_dict()
        pairs = [pair for r in range(generator_rounds) for pair in generator_pairs(prompts, seed=seed + 20 + r)]
        got, rep = label_pairs(pairs, seed=seed + 13)
        rows += got
        report[f"{split}_generator"] = rep.to_dict()
        report[f"{split}_rows"] = len(rows)
        (data / f"preferences_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stamp.write_text(json.dumps(report, indent=2))
    return round(time.time() - start, 1)


def format_table(policies: dict[str, dict[str, Any]]) -> str:
    head = f"{'policy':<10} {'gold score':>16} {'win vs sft':>10} {'KL to sft':>10} {'length':>7} {'unsafe':>7}"
    lines = [head, "-" * len(head)]
    for name, p in policies.items():
        gold = f"{p['gold_score']:+.3f} ± {p['gold_se']:.3f}"
        kl = "-" if p["kl_to_sft"] is None else f"{p['kl_to_sft']:.2f}"
        lines.append(f"{name:<10} {gold:>16} {p['win_rate_vs_sft']:>10.2f} {kl:>10} {p['mean_length']:>7.1f} "
                     f"{p['unsafe_rate']:>7.2f}")
    return "\n".join(lines)
