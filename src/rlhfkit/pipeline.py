"""`rlhfkit demo`: the built-in playground pipeline, end to end on a CPU.

base model (pretrained on mostly mediocre "web text") -> SFT on good demonstrations -> evaluation with the
hidden gold judge. Every stage runs through its own public `main(cfg)`, writes its config to
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
    from rlhfkit.eval.playground import evaluate_policy, win_rate
    from rlhfkit.playground.world import WorldSpec, build_initial_model, read_prompts, write_world
    from rlhfkit.policy import sft

    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    pretrain_steps = min(cfg.pretrain_steps, 300) if cfg.quick else cfg.pretrain_steps
    sft_steps = min(cfg.sft_steps, 100) if cfg.quick else cfg.sft_steps
    n_eval = min(cfg.eval_prompts, 100) if cfg.quick else cfg.eval_prompts
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
    run_stage("pretrain", pretrain, sft.main, root, cfg.rebuild, wall)
    sft_cfg = sft.SFTConfig(
        model=str(root / "base"), data=str(data / "sft.jsonl"), output_dir=str(root / "sft"),
        max_steps=sft_steps, batch_size=32, learning_rate=1e-3, warmup_steps=10, max_length=128,
        eval_fraction=0.05, eval_every=max(1, sft_steps // 4), **common)
    run_stage("sft", sft_cfg, sft.main, root, cfg.rebuild, wall)

    test_prompts = read_prompts(data / "prompts_test.jsonl")[:n_eval]
    start = time.time()
    evals = {}
    for name in ("base", "sft"):
        evals[name] = evaluate_policy(str(root / name), test_prompts, seed=cfg.seed, ref_dir=str(root / "sft"),
                                      keep_samples=12)
    wall["eval"] = round(time.time() - start, 1)
    policies = {}
    for name, ev in evals.items():
        policies[name] = {**ev.summary(), "kl_to_sft": ev.kl_to_ref,
                          "win_rate_vs_sft": win_rate(ev.scores, evals["sft"].scores)}
    summary = {
        "policies": policies,
        "wall_seconds": {**wall, "total": round(time.time() - t0, 1)},
        "samples": {name: ev.samples for name, ev in evals.items()},
        "config": to_dict(cfg),
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_table(policies))
    print(f"\nsummary: {root / 'summary.json'}; stage configs: {root / 'configs'}")
    return summary


def format_table(policies: dict[str, dict[str, Any]]) -> str:
    head = f"{'policy':<10} {'gold score':>16} {'win vs sft':>10} {'KL to sft':>10} {'length':>7} {'unsafe':>7}"
    lines = [head, "-" * len(head)]
    for name, p in policies.items():
        gold = f"{p['gold_score']:+.3f} ± {p['gold_se']:.3f}"
        kl = "-" if p["kl_to_sft"] is None else f"{p['kl_to_sft']:.2f}"
        lines.append(f"{name:<10} {gold:>16} {p['win_rate_vs_sft']:>10.2f} {kl:>10} {p['mean_length']:>7.1f} "
                     f"{p['unsafe_rate']:>7.2f}")
    return "\n".join(lines)
