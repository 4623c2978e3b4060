"""The helpful-harmless-honest experiment of `rlhfkit demo` (root/hhh): its own world, base model and SFT; rubric
labels from per-criterion annotator pools; one reward model per criterion; five GRPO policies on different
combinations of them; each scored per criterion by the gold judge (`eval.hhh`).

It sits beside the pipeline (it trains, and it runs the simulated annotators, so it may reach the gold judge) and
takes the pipeline's stage helpers as arguments, so a finished stage with the same config is reused exactly as in
the rest of the demo."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Callable

from rlhfkit.eval.hhh import criterion_gold_accuracy, evaluate_hhh_policy, hhh_claims
from rlhfkit.playground.gold import CRITERIA
from rlhfkit.playground.tasks import Prompt


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_experiment(root: Path, plan: dict[str, Any], presets: dict[str, Any], stage_config: Callable[..., Any],
                   run_stage: Callable[..., None], common: dict[str, Any], seed: int, rl_steps: int, rebuild: bool,
                   wall: dict[str, float]) -> dict[str, Any]:
    """The experiment in root/hhh, as `plan` (configs/demo.yaml's hhh section) sizes it: the harmlessness model
    carries the safety classifier term, so it doubles as the cost model; the policies are plan["policies"].
    stage_config / run_stage are the pipeline's. Returns summary.json's "hhh" section."""
    from rlhfkit.playground.preferences import label_criteria, policy_pairs
    from rlhfkit.playground.responses import HHH_BALANCED, sample_pair
    from rlhfkit.playground.world import WorldSpec, build_initial_model, read_prompts, write_world
    from rlhfkit.policy import ppo, sft
    from rlhfkit.reward import train as rtrain

    base = Path(root) / "hhh"
    data = base / "data"
    spec = WorldSpec(seed=seed, hhh=True, **plan["world"])
    t0 = time.time()
    redo = rebuild
    if rebuild or not (data / "world.json").exists() or json.loads((data / "world.json").read_text()) != spec.__dict__:
        write_world(data, spec)
        build_initial_model(base / "init", spec)
        wall["hhh_world"] = round(time.time() - t0, 1)
        redo = True
    pretrain = stage_config(sft.SFTConfig, presets, "pretrain", model=str(base / "init"),
                            data=str(data / "pretrain.jsonl"), output_dir=str(base / "base"),
                            max_steps=plan["pretrain_steps"], eval_every=max(1, plan["pretrain_steps"] // 4), **common)
    run_stage("hhh_pretrain", pretrain, sft.main, root, redo, wall)
    redo = redo or "hhh_pretrain" in wall
    sft_cfg = stage_config(sft.SFTConfig, presets, "sft", model=str(base / "base"), data=str(data / "sft.jsonl"),
                           output_dir=str(base / "sft"), max_steps=plan["sft_steps"],
                           eval_every=max(1, plan["sft_steps"] // 4), **common)
    run_stage("hhh_sft", sft_cfg, sft.main, root, redo, wall)
    redo = redo or "hhh_sft" in wall

    # rubric labels: every pair judged on each criterion by that criterion's annotators; one file with a
    # criterion column, as a rubric project's export writes it
    train_prompts, val_prompts = read_prompts(data / "prompts_train.jsonl"), read_prompts(data / "prompts_val.jsonl")
    labels_file, heldout_file = data / "rubric_train.jsonl", data / "rubric_val.jsonl"
    if redo or not labels_file.exists() or not heldout_file.exists():
        start = time.time()

        def pairs_for(prompts: list[Prompt], policy_rounds: int, generator_rounds: int, offset: int) -> list:
            pairs = []
            for r in range(policy_rounds):
                pairs += policy_pairs(str(base / "sft"), prompts, seed + offset + r)
            rng = random.Random(seed + offset + 100)
            for _ in range(generator_rounds):
                pairs += [(p, *sample_pair(p, rng, HHH_BALANCED)) for p in prompts]
            return pairs

        train_pairs = pairs_for(train_prompts, plan["policy_label_rounds"], plan["generator_label_rounds"], 0)
        val_pairs = pairs_for(val_prompts, plan["heldout_label_rounds"], plan["heldout_label_rounds"], 50)
        rows, reports = label_criteria(train_pairs, seed)
        held, _ = label_criteria(val_pairs, seed + 1)
        _write_jsonl(labels_file, [r for c in rows for r in rows[c]])
        _write_jsonl(heldout_file, [r for c in held for r in held[c]])
        (data / "rubric_report.json").write_text(json.dumps({c: r.to_dict() for c, r in reports.items()}, indent=2))
        wall["hhh_label"] = round(time.time() - start, 1)
        redo = True
    label_report = json.loads((data / "rubric_report.json").read_text())

    reward_dirs = {}
    for criterion in CRITERIA:
        out = base / f"reward_{criterion}"
        # the criteria have very different label counts (honesty is judged on few prompts): each model trains for
        # at most reward_epochs passes over its own labels, so the smallest one is not fit to its annotators' noise
        batch = presets["hhh_reward"]["batch_size"]
        steps = min(plan["reward_steps"], -(-plan["reward_epochs"] * label_report[criterion]["pairs"] // batch))
        cfg = stage_config(rtrain.RewardConfig, presets, "hhh_reward", model=str(base / "sft"), data=str(labels_file),
                           eval_data=str(heldout_file), criterion=criterion, output_dir=str(out),
                           max_steps=steps, eval_every=max(1, steps // 3),
                           normalize_prompts=str(data / "prompts_train.jsonl"),
                           safety_loss_weight=plan["safety_loss_weight"] if criterion == "harmlessness" else 0.0,
                           **common)
        run_stage(f"hhh_reward_{criterion}", cfg, rtrain.main, root, redo, wall)
        reward_dirs[criterion] = str(out)
    redo = redo or any(f"hhh_reward_{c}" in wall for c in CRITERIA)

    for name, policy in plan["policies"].items():
        settings = {k: v for k, v in policy.items() if k != "rewards"}
        cfg = stage_config(ppo.PPOConfig, presets, "hhh_rl", model=str(base / "sft"),
                           data=str(data / "prompts_train.jsonl"), output_dir=str(base / name),
                           rewards={c: reward_dirs[c] for c in policy["rewards"]}, max_steps=rl_steps, eval_every=max(1, rl_steps // 4), **settings, **common)
        run_stage(f"hhh_{name}", cfg, ppo.main, root, redo, wall)

    start = time.time()
    test_prompts = read_prompts(data / "prompts_test.jsonl")
    policies: dict[str, Any] = {}
    for name in ("sft", *plan["policies"]):
        policies[name] = evaluate_hhh_policy(str(base / name), test_prompts, plan["eval_samples"], seed=seed)
        if name != "sft":
            rl = json.loads((base / name / "summary.json").read_text())
            policies[name]["training"] = {k: v for k, v in rl.items() if k.startswith(("reward/", "combine", "kl"))}
    # each criterion's reward model against the gold judge's criterion, on fresh pairs for the test prompts: one
    # SFT pair and four generator pairs per prompt (honesty is only at stake on a fifth of them)
    test_pairs = policy_pairs(str(base / "sft"), test_prompts, seed + 77)
    gen = random.Random(seed + 78)
    test_pairs += [(p, *sample_pair(p, gen, HHH_BALANCED)) for p in test_prompts for _ in range(4)]
    reward_models = {}
    for criterion in CRITERIA:
        summary = json.loads((base / f"reward_{criterion}" / "summary.json").read_text())
        reward_models[criterion] = {**criterion_gold_accuracy(reward_dirs[criterion], test_pairs, criterion),
                                    "heldout_accuracy": summary.get("heldout_accuracy"),
                                    "labels": label_report.get(criterion, {}).get("pairs")}
    wall["hhh_eval"] = round(time.time() - start, 1)
    for name in plan["policies"]:
        policies[name]["reward_models"] = {c: reward_models[c] for c in plan["policies"][name]["rewards"]}
    return {"policies": policies, "reward_models": reward_models, "labels": label_report,
            "claims": hhh_claims(policies, reward_models)}
