"""`rlhfkit demo`: the built-in playground pipeline, end to end on a CPU.

base model (pretrained on mostly mediocre "web text") -> SFT on contractor demonstrations -> simulated annotators
label through the feedback store -> reward-model ensemble -> PPO, GRPO, DPO (opt-in: RLOO, a beta sweep), best-of-n ->
over-optimisation sweeps and the KL-leash-cut demonstration -> evaluation with the hidden gold judge -> claims
checked, summary.json and report.html. Every stage runs through its own public `main(cfg)`, writes its config to
DIR/configs/<stage>.yaml (so `rlhfkit <stage> --config DIR/configs/<stage>.yaml` reruns it alone), and is
reused on a rerun when its finished run directory holds the same config."""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from rlhfkit.config import from_dict, load_yaml, save_config, to_dict
from rlhfkit.errors import ConfigError
from rlhfkit.jobs import Done, Job, Result, default_workers, run_jobs

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
    """Optimizer steps of base-model pretraining on the web-text corpus (quick: 200)."""
    sft_steps: int = 300
    """Optimizer steps of SFT on demonstrations (quick: 60)."""
    reward_steps: int = 600
    """Optimizer steps of reward-model training, batch 32: about one epoch of the full demo's labels
    (quick: 60)."""
    policy_label_rounds: int = 4
    """Rounds of SFT samples ranked for training: each round, 4 samples per training prompt, ranked by one
    annotator (quick: 1)."""
    generator_label_rounds: int = 36
    """Rounds of training pairs from the world's response generator, one pair per training prompt each (quick:
    2). Fresh labels are the reward model's main lever: at 6 rounds (and 2 policy rounds, 300 steps) it agreed
    with the gold judge on 0.69 of held-out pairs, at 18 (and 4) on 0.73-0.76 over three seeds, at 36 (600
    reward steps, members on all labels) on 0.758, 0.766 and 0.751 (+- 0.016) with label seeds 0, 1 and 2."""
    heldout_label_rounds: int = 3
    """Rounds of held-out pairs, each one SFT pair and two generator pairs per validation prompt (~230 pairs a
    round after ties and "both bad"); the reward model's gold accuracy is measured on them (quick: 1)."""
    annotators_per_item: int = 1
    """Annotators judging each training item, their judgments merged by majority vote (pairs) or Borda count
    (rankings). At a fixed number of judgments, fresh items helped the reward model more than overlap did."""
    dpo_steps: int = 400
    """Optimizer steps of DPO from the SFT model, 32 pairs each (configs/demo.yaml; quick: 30). With 16 pairs a
    step, at 200 steps seeds 0, 1 and 2 gained +0.25, +0.34 and +0.29 gold over SFT (3 s.e. about 0.25), at 400
    +0.35, +0.46 and +0.31 -- and, on another machine's worlds, +0.49, +0.22 and +0.42; at 800 there +0.37, +0.45
    and +0.10 (longer answers), and twice the learning rate at 400 lost gold on seed 1. With 32 pairs, 400 steps
    gained +0.52, +0.40 and +0.38 there. It runs beside PPO."""
    dpo_beta: float = 0.1
    """DPO's KL coefficient beta."""
    dpo_beta_sweep: list[float] = field(default_factory=list)
    """betas of a DPO sweep (e.g. 0.03,0.1,0.3,1.0): the trade-off between KL to SFT and gold
    score, one more DPO run and evaluation per beta (about 60 s of one core's work each). It backs no claim, so it
    is not part of the default run."""
    reward_ensemble: int = 2
    """Reward-model ensemble members (different seeds, each on all the labels: bootstrap resamples, which leave
    out a third of the labels per member, scored 0.73 where full-data members scored 0.75 on the same seed's
    held-out pairs); PPO penalises their disagreement. Two members agreed with the gold judge as often as three
    on demo seeds 0, 1 and 2 (0.775, 0.727, 0.712 against 0.774, 0.729, 0.707), and a third costs a member's
    training (about 3 minutes of one core) in the middle of the demo."""
    ppo_steps: int = 60
    """PPO rollout steps from the SFT model, 64 prompts each (quick: 10). PPO's one sample per prompt needs the
    larger batch: at 16 prompts per step its advantage estimates were too noisy to move the policy."""
    rl_steps: int = 120
    """GRPO / RLOO steps, 4 prompts x 4 samples each (quick: 24)."""
    ppo_learning_rate: float = 1e-4
    """PPO's peak learning rate (GRPO and RLOO keep 5e-5, configs/demo.yaml). On the same reward model, PPO seeds 0,
    1 and 2 gained +0.63, +0.28 and +0.29 gold over SFT at 1e-4 (s.e. about 0.06 each), and +0.22, -0.04 and +0.55
    at 5e-5 (both with the earlier KL coefficient 0.05)."""
    ppo_kl_coef: float = 0.1
    """KL coefficient of the leashed PPO and GRPO runs (the leash to the SFT model). At 0.05, seed 1's PPO found an
    evasion the reward model likes (filler sentences instead of a refusal to harmful requests) and drifted to KL 4
    nats, its gold 0.10 below SFT's while its proxy rose; at 0.1 PPO gained +0.72, +0.60 and +0.75 on seeds 0, 1
    and 2 (KL 1.3-1.8) and GRPO +0.84, +0.64 and +0.75 (at 0.05: PPO +0.26, -0.10, +0.70; GRPO +0.80, +0.68,
    +0.63)."""
    rl_variants: list[str] = field(default_factory=list)
    """Critic-free estimators trained and evaluated beside PPO and GRPO (rloo, reinforce; about
    110 s of one core's work each). They back no claim, so they are not part of the default run."""
    kl_cut_coef: float = 0.0
    """KL coefficient of the reward-hacking demonstration run (the leash cut)."""
    kl_cut_steps: int = 160
    """GRPO steps of the reward-hacking demonstration run (quick: rl_steps)."""
    kl_cut_learning_rate: float = 3e-4
    """Peak learning rate of the reward-hacking demonstration run (6x the leashed runs'), so that without the leash
    it walks far from SFT within kl_cut_steps. At the leashed runs' rate the unleashed run drifted back to SFT's
    gold score (300 steps: proxy +0.41, gold -0.00). At 1.5e-4, seeds 0, 1 and 2 ended 0.56, 0.09 and 0.21
    below SFT's gold (KL 109, 51 and 20 nats), and seed 0 with a two-member ensemble 0.20 *above* it (KL 31); at
    3e-4 that run ended 0.52 below (proxy +0.74, KL 140), and seed 1's 0.11 below (proxy +1.09, KL 99)."""
    monitor_samples: int = 200
    """Answers to the 100 validation prompts (each asked in turn) at every evaluation of the PPO/GRPO runs, judged
    by the gold judge for the over-optimisation monitor (quick: 32)."""
    sweep_n: int = 64
    """Largest n of the best-of-n over-optimisation sweep (quick: 16)."""
    best_of_n: int = 16
    """Candidates per prompt for the best-of-n policy (SFT samples, reward model picks)."""
    eval_prompts: int = 200
    """Held-out test prompts scored by the gold judge (quick: 60)."""
    eval_samples: int = 4
    """Responses sampled per test prompt for each policy's gold score (more samples, smaller standard error;
    quick: 2)."""
    hhh: bool = False
    """Also run the helpful-harmless-honest experiment (its own world; configs/demo.yaml's hhh sections): a reward
    model per criterion and five policies trained on helpfulness only, harmlessness only, their sum, Llama 2's
    safety gating and Safe RLHF's Lagrangian, each scored per criterion by the gold judge. About 14 minutes of one
    core's work at full size (3 with --quick), so it is not part of the default run."""
    hhh_rl_steps: int = 160
    """GRPO steps of each of the five HHH policies, 8 prompts x 4 samples each (quick: 20)."""
    workers: int = 0
    """Stages run side by side, each in its own process on its share of the cores (0: one per core, at most
    4). Tiny models gain little from a second thread, so two stages at once on a 2-core machine finish sooner
    than one after the other; with 1 every stage runs in this process, one at a time."""
    rounds: bool = False
    """Also run the human-in-the-loop experiment (`rlhfkit rounds` on this world, configs/demo.yaml's rounds
    sections): an active labelling queue against a random one over seeds, three rounds against one shot, and
    reliability-weighted labels from a crowd with random clickers and an adversary. About 48 minutes of one
    core's work at full size (it trains over 80 reward models; 3 minutes with --quick), so it is not part of the
    default run."""
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


def left_out(cfg: DemoConfig) -> list[dict[str, str]]:
    """The opt-in parts this run left out, each with the flag that adds it and what it costs (printed at the end
    and listed in the report)."""
    parts = [("--hhh", cfg.hhh, "the helpful-harmless-honest experiment, about 14 more minutes of one core's work"),
             ("--rounds", cfg.rounds, "the human-in-the-loop rounds, about 48 more"),
             ("--dpo-beta-sweep 0.03,0.1,0.3,1.0", bool(cfg.dpo_beta_sweep), "DPO's beta sweep, about 3 more"),
             ("--rl-variants rloo", bool(cfg.rl_variants), "RLOO beside PPO and GRPO, about 2 more")]
    return [{"flag": flag, "what": what} for flag, on, what in parts if not on]


PRESETS = "configs/demo.yaml"
"""The demo's stage settings, shipped inside the package (rlhfkit/configs/demo.yaml)."""


def demo_presets() -> dict[str, dict[str, Any]]:
    """configs/demo.yaml: per stage, the fields its config dataclass is built with; `quick`, the --quick caps."""
    from importlib import resources

    return check_presets(yaml.safe_load(resources.files("rlhfkit").joinpath(PRESETS).read_text()))


def check_presets(data: dict[str, Any]) -> dict[str, Any]:
    """The presets, refused when `quick` caps something that is not a demo setting or `quick_stages` replaces
    settings of a section the file does not have (the stage fields themselves are checked by each stage's
    config when it is built)."""
    unknown = set(data.get("quick", {})) - set(DemoConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"{PRESETS}: quick caps {sorted(unknown)} are not settings of rlhfkit demo.")
    unknown = set(data.get("quick_stages", {})) - (set(data) - {"quick", "quick_stages"})
    if unknown:
        raise ConfigError(f"{PRESETS}: quick_stages names {sorted(unknown)}, which are not stage sections of the "
                          "file; give a section's name, e.g. reward.")
    return data


def stage_config(cls: type, presets: dict[str, dict[str, Any]], stage: str, base: Any = None,
                 **fields: Any) -> Any:
    """The stage's config: `base` (or the dataclass defaults), then the preset's common and stage settings, then
    `fields` (paths, steps, values derived from them). A preset's warm-up is capped at the run's length."""
    preset = dict(presets.get(stage, {})) if base is not None else {**presets["common"], **presets.get(stage, {})}
    if "warmup_steps" in preset and "max_steps" in fields:
        preset["warmup_steps"] = min(preset["warmup_steps"], fields["max_steps"])
    return from_dict(cls, {**preset, **fields}, f"{PRESETS} ({stage})", base=base)


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
    from rlhfkit.policy import dpo, ppo, sft
    from rlhfkit.reward import train as rtrain

    if cfg.workers < 0:
        raise ConfigError(f"--workers {cfg.workers}: give 0 (one worker per core, at most 4) or a positive number.")
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    presets = demo_presets()
    caps = presets["quick"] if cfg.quick else {}
    if cfg.quick:
        for name, fields in presets.get("quick_stages", {}).items():
            presets[name] = {**presets[name], **fields}

    def setting(name: str) -> Any:
        return min(getattr(cfg, name), caps[name]) if name in caps else getattr(cfg, name)

    pretrain_steps, sft_steps, n_eval = setting("pretrain_steps"), setting("sft_steps"), setting("eval_prompts")
    reward_steps, dpo_steps, ppo_steps = setting("reward_steps"), setting("dpo_steps"), setting("ppo_steps")
    rl_steps, ensemble, sweep_n = setting("rl_steps"), setting("reward_ensemble"), setting("sweep_n")
    monitor_samples, eval_samples = setting("monitor_samples"), setting("eval_samples")
    wall: dict[str, float] = {}
    t0 = time.time()

    spec = WorldSpec(seed=cfg.seed)
    data = root / "data"
    if cfg.rebuild or not (data / "world.json").exists() or json.loads((data / "world.json").read_text()) != spec.__dict__:
        write_world(data, spec)
        build_initial_model(root / "init", spec)
        wall["world"] = round(time.time() - t0, 1)

    workers = cfg.workers or default_workers()
    # with several workers the stages' own progress bars would interleave: each writes to DIR/logs/<stage>.log,
    # and one bar counts the stages
    common = dict(seed=cfg.seed, progress=cfg.progress and workers == 1)
    pretrain = stage_config(
        sft.SFTConfig, presets, "pretrain", model=str(root / "init"), data=str(data / "pretrain.jsonl"),
        output_dir=str(root / "base"), max_steps=pretrain_steps, eval_every=max(1, pretrain_steps // 4), **common)
    sft_cfg = stage_config(
        sft.SFTConfig, presets, "sft", model=str(root / "base"), data=str(data / "sft.jsonl"),
        output_dir=str(root / "sft"), max_steps=sft_steps, eval_every=max(1, sft_steps // 4), **common)
    # people (here: the simulated annotator pool) compare responses; only their labels reach training
    # split -> (samples per prompt, policy rounds, generator rounds); held-out pairs stay pairs (K = 2)
    policy_rounds = setting("policy_label_rounds")
    generator_rounds = setting("generator_label_rounds")
    heldout_rounds = setting("heldout_label_rounds")
    plan = {"train": (4, policy_rounds, generator_rounds), "val": (2, heldout_rounds, 2 * heldout_rounds)}
    reward_cfg = stage_config(
        rtrain.RewardConfig, presets, "reward", model=str(root / "sft"), data=str(data / "preferences_train.jsonl"),
        eval_data=str(data / "preferences_val.jsonl"), output_dir=str(root / "reward"), max_steps=reward_steps,
        normalize_prompts=str(data / "prompts_train.jsonl"), ensemble_size=ensemble,
        eval_every=max(1, reward_steps // 3), **common)
    dpo_cfg = stage_config(
        dpo.DPOConfig, presets, "dpo", model=str(root / "sft"), data=str(data / "preferences_train.jsonl"),
        eval_data=str(data / "preferences_val.jsonl"), output_dir=str(root / "dpo"), max_steps=dpo_steps,
        beta=cfg.dpo_beta, eval_every=max(1, dpo_steps // 3), **common)
    # the beta sweep (opt-in): the same DPO run at other KL strengths
    betas = [b for b in cfg.dpo_beta_sweep if b != cfg.dpo_beta]
    # PPO against the reward-model ensemble, KL-leashed to SFT; the gold judge only watches (judge/score on 64
    # validation prompts, feeding the over-optimisation monitor), it never shapes the reward
    ppo_cfg = stage_config(
        ppo.PPOConfig, presets, "ppo", model=str(root / "sft"), reward_model=str(root / "reward"),
        data=str(data / "prompts_train.jsonl"), output_dir=str(root / "ppo"), max_steps=ppo_steps,
        learning_rate=cfg.ppo_learning_rate, kl_coef=cfg.ppo_kl_coef, eval_every=max(1, ppo_steps // 12),
        eval_prompts=str(data / "prompts_val.jsonl"), eval_samples=monitor_samples, **common)
    if ensemble == 1:  # nothing to disagree
        ppo_cfg = replace(ppo_cfg, ensemble_penalty=0.0)
    from rlhfkit.eval.playground import gold_scores

    rl_main = functools.partial(ppo.main, judge=gold_scores)
    # GRPO in the same loop (4 samples per prompt, 4 prompts per step), with
    # checkpoints along the way for the RL over-optimisation curve
    grpo_cfg = stage_config(ppo.PPOConfig, presets, "grpo", base=ppo_cfg, output_dir=str(root / "grpo"),
                            max_steps=rl_steps, eval_every=max(1, rl_steps // 12), save_every=max(1, rl_steps // 6))
    # the reward-hacking demonstration: the same GRPO run with the KL leash cut and no ensemble penalty, run for
    # longer (kl_cut_steps) so the policy walks far enough from SFT to find what the reward model gets wrong
    cut_steps = rl_steps if cfg.quick else cfg.kl_cut_steps
    # A reward model with a likelihood term pulls toward its own language model as the KL leash pulls toward SFT
    # (on seed 1, 160 unleashed steps against it reached KL 10 and gold -0.09; against its heads alone, KL 360
    # and gold -4), so the demonstration cuts that pull too: it optimises the heads alone (reward_job writes them
    # to reward_head), and its proxy is measured with them
    cut_term = reward_cfg.likelihood_term
    cut_reward = str(root / "reward_head") if cut_term else str(root / "reward")
    cut_cfg = stage_config(ppo.PPOConfig, presets, "grpo_klcut", base=grpo_cfg, output_dir=str(root / "grpo_klcut"),
                           kl_coef=cfg.kl_cut_coef, max_steps=cut_steps, save_every=max(1, cut_steps // 6),
                           learning_rate=cfg.kl_cut_learning_rate, reward_model=cut_reward)
    # the other critic-free estimators (opt-in)
    variants = [v for v in cfg.rl_variants if v != "grpo"]

    sample_parts = sampling_parts(plan, {"train": spec.n_train, "val": spec.n_val}, workers)

    # the stages as jobs, the longest chain and the longest jobs first (a free worker takes the first ready one)
    def stage(name: str, stage_cfg: Any, fn: Callable[[Any], Any], needs: tuple[str, ...]) -> Job:
        return Job(name, stage_job, (name, stage_cfg, fn, root), needs=needs, redo=True)

    jobs = [stage("pretrain", pretrain, sft.main, ()),
            # the generator pairs need no model: labelled beside pretraining
            Job("label_generator", label_generator_job, (root, cfg.seed, plan, cfg.annotators_per_item), redo=True),
            stage("sft", sft_cfg, sft.main, ("pretrain",)),
            # the SFT samples to be labelled, a share of the (split, round) draws per job, side by side: the
            # sampling was most of the labelling stage, on the critical path to the reward model
            *[Job(f"label_samples_{i}", label_samples_job, (root, cfg.seed, cfg.quick, plan, cfg.annotators_per_item,
                                                            part), needs=("sft", "label_generator"), redo=True)
              for i, part in enumerate(sample_parts)],
            Job("label", label_job, (root, cfg.seed, cfg.quick, plan, cfg.annotators_per_item),
                {"samples": [Result(f"label_samples_{i}") for i in range(len(sample_parts))]},
                needs=("sft", "label_generator"), redo=True),
            # the SFT samples every member normalises its scores on (the same for all of them), drawn once beside
            # the labelling instead of by each member on the critical path
            *([Job("reward_samples", reward_samples_job, (reward_cfg,), needs=("sft",), redo=True)]
              if reward_cfg.ensemble_size > 1 and reward_cfg.normalize_prompts else []),
            # the ensemble's members side by side, one job each; "reward" then gathers them (and is what the
            # later stages wait for)
            *[Job(f"reward_member_{i}", reward_member_job, (reward_cfg, i),
                  {"samples": Result("reward_samples")} if reward_cfg.normalize_prompts else {},
                  needs=("label",), redo=True)
              for i in range(reward_cfg.ensemble_size if reward_cfg.ensemble_size > 1 else 0)],
            Job("reward", reward_job, ("reward", reward_cfg, root), redo=True,
                needs=tuple(f"reward_member_{i}" for i in range(reward_cfg.ensemble_size))
                if reward_cfg.ensemble_size > 1 else ("label",)),
            # the longest job after the reward model first: PPO, then the KL-cut run (a chain through its sweep)
            stage("ppo", ppo_cfg, rl_main, ("reward",)),
            stage("grpo_klcut", cut_cfg, rl_main, ("reward",))]
    if cfg.hhh:  # helpful, harmless, honest: per-criterion reward models and five ways to combine them
        hhh_plan = {**presets["hhh"], **(presets["hhh_quick"] if cfg.quick else {})}
        jobs.append(Job("hhh", hhh_job, (root, hhh_plan, presets, common, cfg.seed, setting("hhh_rl_steps"),
                                         cfg.rebuild)))
    if cfg.rounds:  # human-in-the-loop rounds: the queue, rounds against one shot, annotator reliability
        rounds_plan, rounds_base = rounds_settings(presets, cfg, workers)
        jobs.append(Job("rounds_setup", rounds_setup_job, (root, rounds_plan, rounds_base, cfg.seed), needs=("sft",),
                        redo=True))
        # the queue study one job per seed: its six runs were the demo's longest job
        queue_seeds = list(rounds_plan["label_efficiency"]["seeds"])
        for study in ("iterative", "reliability", *(f"queue_{s}" for s in queue_seeds)):
            jobs.append(Job(f"rounds_{study}", rounds_study_job, (study, root, rounds_plan, rounds_base, cfg.seed),
                            needs=("rounds_setup",)))
    jobs += [stage("grpo", grpo_cfg, rl_main, ("reward",)),
             stage("dpo", dpo_cfg, dpo.main, ("label",))]
    # the reference log-probs do not depend on beta: each sweep run starts from the main run's cache
    jobs += [Job(f"dpo_beta_{beta:g}", dpo_sweep_job, (f"dpo_beta_{beta:g}", replace(
        dpo_cfg, output_dir=str(root / f"dpo_beta_{beta:g}"), beta=beta), root), needs=("dpo",), redo=True)
        for beta in betas]
    jobs += [stage(advantage, replace(grpo_cfg, output_dir=str(root / advantage), advantage=advantage, save_every=0),
                   rl_main, ("reward",)) for advantage in variants]

    test_prompts = read_prompts(data / "prompts_test.jsonl")[:n_eval]
    reward_dir = str(root / "reward")
    evaluate = functools.partial(evaluate_policy, prompts=test_prompts, seed=cfg.seed, ref_dir=str(root / "sft"),
                                 reward_dir=reward_dir, samples_per_prompt=eval_samples)
    # the two longest evaluation jobs first (best-of-n samples n candidates per answer), so that no long job is
    # left to run alone at the end: Gao et al.'s best-of-n curve from the SFT model, and the best-of-n policy
    jobs.append(Job("overopt_best_of_n", best_of_n_curve, (root, test_prompts, sweep_n, cfg.seed),
                    needs=("sft", "reward")))
    jobs.append(Job("eval_best_of_n", evaluate_best_of_n, (str(root / "sft"), reward_dir, test_prompts),
                    {"n": cfg.best_of_n, "seed": cfg.seed}, needs=("reward", "sft")))
    names = ("base", "sft", "ppo", "grpo", *variants, "dpo")
    # SFT's samples are also scored by the KL-cut run's reward (its heads alone), for that run's comparison
    jobs += [Job(f"eval_{name}", evaluate, (str(root / name),),
                 {"keep_samples": 12, **({"other_reward_dirs": [cut_reward]} if name == "sft" and cut_term else {})},
                 needs=("reward",) if name == "base" else (name, "reward"))
             for name in names]
    jobs += [Job(f"eval_dpo_beta_{beta:g}", evaluate, (str(root / f"dpo_beta_{beta:g}"),),
                 needs=(f"dpo_beta_{beta:g}", "reward")) for beta in betas]
    jobs.append(Job("eval_grpo_klcut", evaluate, (str(root / "grpo_klcut"),), {"reward_dir": cut_reward},
                    needs=("grpo_klcut",)))
    cut_sft = "eval_sft"  # SFT's evaluation the cut run is compared with: the same samples, scored by its reward
    if cut_term:
        cut_sft = "eval_sft_head"
        jobs.append(Job(cut_sft, scored_by_job, (Result("eval_sft"), cut_reward)))
    # Gao et al.'s curves: the GRPO runs' checkpoints, each a job of its own
    jobs += [Job(f"overopt_{run}", rl_checkpoint_points, (root, run, test_prompts, Result(sft_eval), cfg.seed, scorer),
                 needs=(run, "reward")) for run, sft_eval, scorer in (("grpo", "eval_sft", reward_dir),
                                                                      ("grpo_klcut", cut_sft, cut_reward))]
    jobs.append(Job("overoptimisation", overoptimisation_sweeps,
                    (root, Result("overopt_best_of_n"), [Result("overopt_grpo"), Result("overopt_grpo_klcut")],
                     Result(cut_sft), Result("eval_grpo_klcut"), cfg, cut_term), needs=("grpo", "grpo_klcut")))
    # a new world retrains everything built on it (every job below the world needs pretraining, the HHH
    # experiment aside, which has its own world)
    results, job_wall = run_jobs(jobs, workers=workers, log_dir=root / "logs", rebuild=cfg.rebuild or "world" in wall,
                                 progress=cfg.progress and workers > 1)
    wall.update(job_wall)
    # evaluation, summed over its jobs (with several workers they overlap each other and training)
    wall["eval"] = round(sum(v for k, v in job_wall.items() if k.startswith(("eval_", "overopt"))), 1)

    evals = {name: results[f"eval_{name}"] for name in (*names, "best_of_n")}
    beta_sweep = []
    for beta in sorted({cfg.dpo_beta, *betas}) if betas else []:
        ev = evals["dpo"] if beta == cfg.dpo_beta else results[f"eval_dpo_beta_{beta:g}"]
        beta_sweep.append({"beta": beta, "gold_score": ev.gold_score, "gold_se": ev.gold_se, "kl_to_sft": ev.kl_to_ref,
                           "proxy_score": ev.proxy_score, "unsafe_rate": ev.unsafe_rate})
    overoptimization = results["overoptimisation"]
    hhh = results.get("hhh")
    rounds = None
    if cfg.rounds:
        from rlhfkit.demo_rounds import combine

        rounds = combine(rounds_plan, results["rounds_setup"], [results[f"rounds_queue_{s}"] for s in queue_seeds],
                         results["rounds_iterative"], results["rounds_reliability"])
    policies = {}
    for name, ev in evals.items():
        policies[name] = {**ev.summary(), "kl_to_sft": ev.kl_to_ref,
                          "win_rate_vs_sft": win_rate(ev.scores, evals["sft"].scores, prompts=len(test_prompts))}
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
        "overoptimization": overoptimization,
        "dpo_beta_sweep": beta_sweep,
        **({"hhh": hhh} if hhh is not None else {}),
        **({"rounds": rounds} if rounds is not None else {}),
        "wall_seconds": {**wall, "total": round(time.time() - t0, 1)},
        "workers": workers,
        "samples": {name: ev.samples for name, ev in evals.items()},
        "config": to_dict(cfg),
        "left_out": left_out(cfg),
    }
    summary["claims"] = (check_claims(summary) + (hhh["claims"] if hhh is not None else [])
                         + (rounds["claims"] if rounds is not None else []))
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    report = write_report(root, summary)
    print(format_table(policies))
    print(f"\nreward model: {reward_model['gold_accuracy']:.3f} ± {reward_model['gold_accuracy_se']:.3f} agreement "
          f"with the gold judge on {reward_model['pairs']} held-out pairs "
          f"(the annotators' labels: {reward_model['label_gold_accuracy']:.3f}); "
          f"held-out label accuracy {reward_model['heldout_accuracy']:.3f}, ECE {reward_model['ece']:.3f}, "
          f"score-length correlation {reward_model['length_correlation']:+.3f}")
    print("\nclaims:")
    for c in summary["claims"]:
        print(f"  [{'ok' if c['ok'] else 'NOT MET'}] {c['claim']}: {c['value']}")
    if hhh is not None:
        print("\n" + format_hhh_table(hhh))
    if rounds is not None:
        from rlhfkit.demo_rounds import format_rounds_table

        print("\n" + format_rounds_table(rounds))
    if summary["left_out"]:
        print("\nopt-in, not in this run: " + "; ".join(f"{p['what']} ({p['flag']})" for p in summary["left_out"]))
    fits = [f"{k} R² {overoptimization[k]['r2']:.2f}" for k in ("best_of_n", "rl") if overoptimization.get(k)]
    cut = overoptimization["kl_cut"]
    print(f"over-optimisation fits: {', '.join(fits)}; KL leash cut: proxy {cut['proxy_delta']:+.3f}, "
          f"gold {cut['gold_delta']:+.3f} (monitor {'flagged it' if cut['monitor_flagged'] else 'silent'})")
    print(f"\nsummary: {root / 'summary.json'}; report: {report}; stage configs: {root / 'configs'}")
    return summary


def stage_job(name: str, cfg: Any, main: Callable[[Any], Any], root: Path, redo: bool = False) -> Done:
    """run_stage as a job: ran=False when a finished run with the same config was reused."""
    wall: dict[str, float] = {}
    run_stage(name, cfg, main, root, redo, wall)
    return Done(ran=name in wall)


def reward_samples_job(cfg: Any, redo: bool = False) -> Done:
    """The reference policy's samples the reward ensemble's members normalise on (`rtrain.reference_samples`,
    the same for every member, as `rtrain.main` draws them once); None when every member is finished with its
    config and nothing they depend on ran again. ran=redo: the samples follow from the SFT model and the seed
    alone, so unless the SFT model changed they are the ones the finished members were normalised on, and a
    member left unfinished (an interrupted run) does not make the finished ones train again."""
    from rlhfkit.reward import train as rtrain

    members = [rtrain.member_config(cfg, i) for i in range(cfg.ensemble_size)]
    if not redo and all(_finished_with(Path(m.output_dir), m) for m in members):
        return Done(None, ran=False)
    start = time.time()
    samples = rtrain.reference_samples(cfg)
    return Done(samples, ran=redo, wall={"reward_samples": round(time.time() - start, 1)})


def reward_member_job(cfg: Any, i: int, samples: tuple[list[Any], list[str]] | None = None, redo: bool = False
                      ) -> Done:
    """Member i of the reward ensemble, trained exactly as the ensemble run trains it (`rtrain.main` then finds
    it finished and takes it as it is); reused when a finished member has the same config. samples: the
    normalisation samples from reward_samples_job (drawn here when it had none to give)."""
    from rlhfkit.reward import train as rtrain

    member = rtrain.member_config(cfg, i)
    if not redo and _finished_with(Path(member.output_dir), member):
        return Done(ran=False)
    if samples is None:
        samples = rtrain.reference_samples(cfg)
    rtrain.train_member(replace(member, overwrite=True), samples, rtrain.bootstrap_seed(cfg, i))
    return Done()


def reward_job(name: str, cfg: Any, root: Path, redo: bool = False) -> Done:
    """The reward stage: with an ensemble, its members (trained by reward_member_job) gathered into the run --
    ensemble.json and the summary -- by `rtrain.main`, which takes finished members as they are. A model with a
    likelihood term is also written with its heads alone to root/reward_head (the KL-cut run's reward)."""
    from rlhfkit.reward.model import save_head_only

    done = _reward_stage(name, cfg, root, redo)
    if cfg.likelihood_term:
        save_head_only(cfg.output_dir, root / "reward_head")
    return done


def _reward_stage(name: str, cfg: Any, root: Path, redo: bool) -> Done:
    from rlhfkit.reward import train as rtrain
    from rlhfkit.reward.model import ENSEMBLE_FILE

    if cfg.ensemble_size == 1:
        return stage_job(name, cfg, rtrain.main, root, redo)
    save_config(cfg, root / "configs" / f"{name}.yaml")
    out = Path(cfg.output_dir)
    if not redo and _finished_with(out, cfg):
        return Done(ran=False)
    for old in ("config.yaml", "summary.json", ENSEMBLE_FILE):  # an older run's; its members were just retrained
        (out / old).unlink(missing_ok=True)
    rtrain.main(replace(cfg, resume=True, overwrite=False))
    return Done()


def dpo_sweep_job(name: str, cfg: Any, root: Path, redo: bool = False) -> Done:
    """One run of the DPO beta sweep, handed the main DPO run's reference log-probs (DPO checks their fingerprint
    against the data and reference model, and recomputes them if anything differs)."""
    from rlhfkit.policy import dpo

    cache = root / "dpo" / dpo.REF_CACHE
    if cache.exists():
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cache, Path(cfg.output_dir) / dpo.REF_CACHE)
    return stage_job(name, cfg, dpo.main, root, redo)


def label_generator_job(root: Path, seed: int, plan: dict[str, tuple[int, int, int]], overlap: int,
                        redo: bool = False) -> Done:
    return Done(ran=collect_generator_labels(root, seed, redo, plan, overlap) is not None)


def label_job(root: Path, seed: int, quick: bool, plan: dict[str, tuple[int, int, int]], overlap: int,
              samples: Sequence[dict[tuple[str, int], Any] | None] = (), redo: bool = False) -> Done:
    """collect_labels, with the SFT samples drawn by the label_samples jobs (None from one that found the labels
    up to date)."""
    groups = {unit: g for part in samples if part is not None for unit, g in part.items()}
    return Done(ran=collect_labels(root, seed, quick=quick, redo=redo, plan=plan, overlap=overlap,
                                   groups=groups) is not None)


def sampling_parts(plan: dict[str, tuple[int, int, int]], prompts: dict[str, int], parts: int
                   ) -> list[list[tuple[str, int]]]:
    """The (split, round) draws of SFT samples that collect_labels labels, shared out over at most `parts` jobs
    by their number of samples (K x prompts), the largest first onto the least loaded job. Each draw keeps its
    own seed, so the samples are the same however the draws are shared out."""
    units = sorted(((split, r) for split, (_, rounds, _) in plan.items() for r in range(rounds)),
                   key=lambda u: -plan[u[0]][0] * prompts[u[0]])
    shares: list[list[tuple[str, int]]] = [[] for _ in range(max(1, min(parts, len(units))))]
    load = [0] * len(shares)
    for split, r in units:
        i = load.index(min(load))
        shares[i].append((split, r))
        load[i] += plan[split][0] * prompts[split]
    return [s for s in shares if s]


def sft_samples(root: Path, seed: int, split: str, k: int, r: int) -> list[tuple[Any, list[str]]]:
    """Round r of the SFT samples labelled for `split`: k per prompt (duplicates removed), seeded per round."""
    from rlhfkit.playground.preferences import policy_groups
    from rlhfkit.playground.world import read_prompts

    prompts = read_prompts(root / "data" / f"prompts_{split}.jsonl")
    return policy_groups(str(root / "sft"), prompts, k, seed=seed + POLICY_SAMPLES_SEED + r)


def label_samples_job(root: Path, seed: int, quick: bool, plan: dict[str, tuple[int, int, int]], overlap: int,
                      units: list[tuple[str, int]], redo: bool = False) -> Done:
    """The SFT samples of the (split, round) draws `units`, for the label job; nothing (ran=False) when the labels
    from the same plan are there and nothing they depend on ran again."""
    if not redo and _labels_fresh(root, quick, plan, overlap):
        return Done(None, ran=False)
    return Done({(split, r): sft_samples(root, seed, split, plan[split][0], r) for split, r in units})


def hhh_job(root: Path, plan: dict[str, Any], presets: dict[str, Any], common: dict[str, Any], seed: int,
            rl_steps: int, rebuild: bool) -> Done:
    """The helpful-harmless-honest experiment (demo_hhh), its own world from start to end: one job."""
    from rlhfkit.demo_hhh import run_experiment

    wall: dict[str, float] = {}
    result = run_experiment(root, plan, presets, stage_config, run_stage, common, seed, rl_steps, rebuild, wall)
    return Done(result, ran=any(k != "hhh_eval" for k in wall), wall=wall)


def rounds_settings(presets: dict[str, Any], cfg: DemoConfig, workers: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rounds experiment's plan and the RoundsConfig fields every run shares, from configs/demo.yaml."""
    section = presets["rounds"]
    quick = dict(presets["rounds_quick"]) if cfg.quick else {}
    lighter = quick.pop("base", {})
    plan = {**section["plan"], **quick}
    base = {**section["base"], **lighter}
    for nested in ("reward", "ppo"):
        base[nested] = {**section["base"].get(nested, {}), **lighter.get(nested, {}),
                        "progress": cfg.progress and workers == 1}
    return plan, base


def rounds_setup_job(root: Path, plan: dict[str, Any], base: dict[str, Any], seed: int, redo: bool = False) -> int:
    """root/rounds for the experiment (demo_rounds): its runs resume where they stopped; they start again when the
    SFT model or the plan changed. Returns the number of held-out pairs."""
    from rlhfkit.demo_rounds import prepare

    stamp = root / "rounds" / "plan.json"
    # progress bars change nothing in the runs (they are off with several workers): not part of the recipe
    quiet = {k: ({kk: vv for kk, vv in v.items() if kk != "progress"} if isinstance(v, dict) else v)
             for k, v in base.items() if k != "progress"}
    recipe = {"plan": plan, "base": quiet, "seed": seed}
    if (root / "rounds").exists() and (redo or not stamp.exists() or json.loads(stamp.read_text()) != recipe):
        shutil.rmtree(root / "rounds")
    (root / "rounds").mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(recipe, indent=2))
    return prepare(root, plan, seed)


def rounds_study_job(study: str, root: Path, plan: dict[str, Any], base: dict[str, Any], seed: int) -> Any:
    """One study of the rounds experiment: iterative, reliability, or queue_<s> (the queue study's seed s)."""
    from rlhfkit import demo_rounds

    if study.startswith("queue_"):
        return demo_rounds.queue_study(root, plan, base, seed, seeds=[int(study.removeprefix("queue_"))])
    fn = {"iterative": demo_rounds.iterative_study, "reliability": demo_rounds.reliability_study}[study]
    return fn(root, plan, base, seed)


def check_claims(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The demo's headline claims, each checked against the numbers it just measured: printed ([ok] or [NOT MET]),
    written to summary.json and the report. They are measurements, not assertions: the demo exits 0 either way."""
    pol = summary["policies"]
    claims = []

    def beats(a: str, b: str) -> None:
        if a not in pol or b not in pol:
            return
        gap = pol[a]["gold_score"] - pol[b]["gold_score"]
        se = (pol[a]["gold_se"] ** 2 + pol[b]["gold_se"] ** 2) ** 0.5
        claims.append({"claim": f"{a} beats {b} on gold score by more than 3 standard errors",
                       "ok": gap > 3 * se, "value": f"{gap:+.3f} (3 s.e. = {3 * se:.3f})"})

    beats("sft", "base")
    beats("ppo", "sft")
    beats("grpo", "sft")
    beats("dpo", "sft")
    over = summary.get("overoptimization", {})
    if "r2" in over.get("best_of_n", {}):
        r2 = over["best_of_n"]["r2"]
        claims.append({"claim": "best-of-n over-optimisation fit d(α − βd) has R² ≥ 0.9", "ok": r2 >= 0.9,
                       "value": f"{r2:.3f}"})
    cut = over.get("kl_cut")
    if cut:
        se = cut.get("gold_delta_se", 0.0)
        leash = ("the KL leash (and the reward model's likelihood term)" if cut.get("likelihood_term_cut")
                 else "the KL leash")
        claims.append({"claim": f"with {leash} cut, the proxy reward rises above SFT's while the gold score falls "
                                "below SFT's by more than 2 standard errors",
                       "ok": cut["proxy_delta"] > 0 and cut["gold_delta"] < -2 * se,
                       "value": f"proxy {cut['proxy_delta']:+.3f}, gold {cut['gold_delta']:+.3f} (2 s.e. = {2 * se:.3f})"})
        claims.append({"claim": "the over-optimisation monitor flags the KL-cut run and not the default one",
                       "ok": cut["monitor_flagged"] and not cut["default_monitor_flagged"],
                       "value": f"cut {cut['monitor_flagged']}, default {cut['default_monitor_flagged']}"})
    rm = summary.get("reward_model", {})
    if "gold_accuracy" in rm:
        se = f" ± {rm['gold_accuracy_se']:.3f}" if "gold_accuracy_se" in rm else ""
        claims.append({"claim": "the reward model agrees with the gold judge on ≥ 75% of held-out pairs",
                       "ok": rm["gold_accuracy"] >= 0.75,
                       "value": f"{rm['gold_accuracy']:.3f}{se} on {rm.get('pairs', '?')} pairs"})
    return claims


def best_of_n_curve(root: Path, prompts: list[Any], sweep_n: int, seed: int) -> list[dict[str, Any]]:
    """Gao et al.'s best-of-n points for n = 1..sweep_n on half the test prompts (at least 50): gold and proxy as
    the change from n = 1 (the SFT policy itself), against d = sqrt(KL)."""
    from rlhfkit.eval.playground import best_of_n_sweep

    bon = best_of_n_sweep(str(root / "sft"), str(root / "reward"), prompts[: max(50, len(prompts) // 2)],
                          max_n=sweep_n, seed=seed)
    base_proxy, base_gold = bon[0]["proxy"], bon[0]["gold"]  # n = 1 is the SFT policy itself
    for p in bon:
        p.update(proxy_delta=p["proxy"] - base_proxy, gold_delta=p["gold"] - base_gold)
    return bon


def scored_by_job(evaluation: Any, reward_dir: str) -> Any:
    """An evaluation with the proxy of another reward model it scored the same samples with (PolicyEval.scored_by)."""
    return evaluation.scored_by(reward_dir)


def rl_checkpoint_points(root: Path, run: str, prompts: list[Any], sft_eval: Any, seed: int, reward_dir: str
                         ) -> list[dict[str, Any]]:
    """Each saved checkpoint of an RL run: gold and proxy (the reward model in reward_dir, which sft_eval was scored
    with) as the change from SFT, against d = sqrt(KL to SFT)."""
    import math

    from rlhfkit.eval.playground import evaluate_policy
    from rlhfkit.train.checkpoint import checkpoint_dirs

    points = []
    for ckpt in checkpoint_dirs(root / run):
        ev = evaluate_policy(str(ckpt / "model"), prompts, seed=seed, ref_dir=str(root / "sft"),
                             reward_dir=reward_dir, tokenizer_dir=str(root / "sft"))
        kl = max(ev.kl_to_ref or 0.0, 1e-6)  # a Monte-Carlo KL can dip below 0 near the start
        points.append({"run": run, "step": int(ckpt.name.split("-")[1]), "kl": kl, "d": math.sqrt(kl),
                       "proxy_delta": ev.proxy_score - sft_eval.proxy_score,
                       "gold_delta": ev.gold_score - sft_eval.gold_score})
    return points


def overoptimisation_sweeps(root: Path, bon: list[dict[str, Any]], rl_runs: list[list[dict[str, Any]]],
                            sft_eval: Any, klcut_eval: Any, cfg: DemoConfig, term_cut: bool = False) -> dict[str, Any]:
    """Gao et al.'s curves with the paper's forms fitted -- best-of-n (best_of_n_curve) and the GRPO runs'
    checkpoints (rl_checkpoint_points, one list per run) -- and the KL-cut demonstration's deltas (sft_eval: SFT
    scored by the reward the cut run optimised; term_cut: that was the reward model's heads alone)."""
    from rlhfkit.eval.overopt import fit_best_of_n, fit_rl
    from rlhfkit.reward.model import has_likelihood_term

    out: dict[str, Any] = {"best_of_n": {**fit_best_of_n([p["d"] for p in bon], [p["gold_delta"] for p in bon])
                                         .to_dict(), "points": bon}}
    rl = sorted((p for points in rl_runs for p in points), key=lambda p: p["d"])
    out["rl"] = {**(fit_rl([p["d"] for p in rl], [p["gold_delta"] for p in rl]).to_dict() if len(rl) >= 3 else {}),
                 "points": rl}
    summaries = {run: json.loads((root / run / "summary.json").read_text()) for run in ("grpo", "grpo_klcut")}
    out["kl_cut"] = {
        "proxy_delta": klcut_eval.proxy_score - sft_eval.proxy_score,
        "gold_delta": klcut_eval.gold_score - sft_eval.gold_score,
        "gold_delta_se": (klcut_eval.gold_se ** 2 + sft_eval.gold_se ** 2) ** 0.5,
        "steps": summaries["grpo_klcut"].get("steps"),
        "kl": klcut_eval.kl_to_ref, "kl_coef": cfg.kl_cut_coef, "default_kl_coef": cfg.ppo_kl_coef,
        "monitor_flagged": bool(summaries["grpo_klcut"].get("overoptimisation_flagged")),
        "likelihood_term_cut": term_cut and has_likelihood_term(root / "reward"),  # the fit may have dropped it
        "default_monitor_flagged": bool(summaries["grpo"].get("overoptimisation_flagged")),
        "runs": {"default": "grpo", "cut": "grpo_klcut"},
        "unsafe_rate": klcut_eval.unsafe_rate, "mean_length": klcut_eval.mean_length,
    }
    return out


# Seed offsets of the labelling draws (added to the demo's seed, plus the round): each draw has its own random
# stream, so more rounds of one leave the other's samples as they were.
POLICY_SAMPLES_SEED = 11
GENERATOR_PAIRS_SEED = 20


def annotator_seed(seed: int, rows_before: int) -> int:
    """The simulated annotators' seed for one project: the demo's seed offset by the rows the projects before it
    exported, so every project draws its own judgments (the generator pairs are labelled first, then the SFT
    samples)."""
    return seed + rows_before


def _label_project(svc: Any, db: Path, name: str, mode: str, k: int, items: list[Any], per_item: int, seed: int,
                   as_pairs: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One project of simulated labels in the feedback store: created, judged by the simulated annotators
    (`rlhfkit label simulate`) and exported as preference rows (majority-voted with overlap)."""
    from rlhfkit.feedback.commands import LabelConfig
    from rlhfkit.feedback.export import export_rows, majority_rows
    from rlhfkit.playground.simulate import simulate

    project = svc.create_project(name, mode, "Which response is better? Helpful, correct, kind, safe.",
                                 responses_per_item=k if mode == "ranking" else 2, annotators_per_item=per_item)
    svc.add_items(project.id, items)
    simulate(LabelConfig(command="simulate", db=str(db), project=name, seed=seed))
    export = majority_rows if per_item > 1 else export_rows
    rows, rep = export(svc, name, rankings_as="pairs" if as_pairs else "ranking", conversational=True)
    return rows, {"items": len(items), "judgments": rep.judgments, "rows": rep.rows, "left_out": rep.skipped}


def collect_generator_labels(root: Path, seed: int, redo: bool, plan: dict[str, tuple[int, int, int]],
                             overlap: int = 1) -> float | None:
    """The first half of collect_labels, which needs no model: pairs from the world's response generator, of
    varied quality, judged by the simulated annotators in a fresh DIR/feedback.db (projects {split}-generator),
    their rows in data/generator_{split}.jsonl. The demo runs it beside pretraining. Returns the seconds spent,
    or None when labels from the same plan were reused."""
    from rlhfkit.feedback.service import FeedbackService, ItemSpec
    from rlhfkit.feedback.store import open_store
    from rlhfkit.playground.preferences import generator_pairs
    from rlhfkit.playground.world import read_prompts

    data = root / "data"
    stamp = data / "generator_labels.json"
    recipe = {"plan": {split: rounds for split, (_, _, rounds) in plan.items()}, "overlap": overlap}
    if not redo and stamp.exists() and {k: json.loads(stamp.read_text()).get(k) for k in recipe} == recipe:
        return None
    start = time.time()
    (data / "labels.json").unlink(missing_ok=True)  # the SFT samples' labels lived in the store replaced here
    db = root / "feedback.db"
    for leftover in root.glob("feedback.db*"):  # a fresh store for fresh labels (also -wal / -shm files)
        leftover.unlink()
    svc = FeedbackService(open_store(str(db)))
    report: dict[str, Any] = {**recipe, "db": str(db)}
    for split, (_, _, generator_rounds) in plan.items():
        prompts = read_prompts(data / f"prompts_{split}.jsonl")
        items = [ItemSpec(p.text, [a, b], ["generator", "generator"]) for r in range(generator_rounds)
                 for p, a, b in generator_pairs(prompts, seed=seed + GENERATOR_PAIRS_SEED + r) if a.strip() != b.strip()]
        # overlap on training items only: held-out pairs keep one judgment each, so the evaluation set is drawn
        # exactly as before (pairs one annotator found a strict preference in), not filtered by votes
        rows, report[f"{split}-generator"] = _label_project(
            svc, db, f"{split}-generator", "pairwise", 2, items, overlap if split == "train" else 1,
            annotator_seed(seed, 0), as_pairs=True)
        (data / f"generator_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stamp.write_text(json.dumps(report, indent=2))
    return round(time.time() - start, 1)


def _labels_fresh(root: Path, quick: bool, plan: dict[str, tuple[int, int, int]], overlap: int) -> bool:
    """Whether data/labels.json records labels from this plan (collect_generator_labels removes it when it makes
    new generator labels)."""
    stamp = root / "data" / "labels.json"
    recipe = {"quick": quick, "plan": {k: list(v) for k, v in plan.items()}, "overlap": overlap}
    return stamp.exists() and {k: json.loads(stamp.read_text()).get(k) for k in recipe} == recipe


def collect_labels(root: Path, seed: int, quick: bool, redo: bool, plan: dict[str, tuple[int, int, int]],
                   overlap: int = 1, groups: dict[tuple[str, int], Any] | None = None) -> float | None:
    """Simulated people label responses through the feedback store, exactly as humans using `rlhfkit label serve`
    would: projects are created in DIR/feedback.db, each simulated annotator takes tasks from the queue and
    submits through the service, and the judgments are exported as preference rows. plan maps a split (train,
    val) to (K, policy rounds, generator rounds): K samples of the SFT policy per prompt and round, ranked
    (InstructGPT-style) when K > 2, plus generator pairs of varied quality (collect_generator_labels, reused when
    the demo ran it already). overlap annotators judge each training item, merged by majority vote. groups: the
    SFT samples of some (split, round) draws, drawn beforehand (`sft_samples`, the demo's label_samples jobs); the
    others are drawn here. Returns the seconds spent, or None when labels from the same plan were reused."""
    from rlhfkit.feedback.service import FeedbackService, ItemSpec
    from rlhfkit.feedback.store import open_store

    data = root / "data"
    stamp = data / "labels.json"
    recipe = {"quick": quick, "plan": {k: list(v) for k, v in plan.items()}, "overlap": overlap}
    start = time.time()
    collect_generator_labels(root, seed, False, plan, overlap)  # removes labels.json when it makes new ones
    if not redo and _labels_fresh(root, quick, plan, overlap):
        return None
    groups = groups or {}
    db = root / "feedback.db"
    svc = FeedbackService(open_store(str(db)))
    if any(p.name.endswith("-sft") for p in svc.projects()):  # an earlier SFT model's labels: start a fresh store
        collect_generator_labels(root, seed, True, plan, overlap)
        svc = FeedbackService(open_store(str(db)))
    generator = json.loads((data / "generator_labels.json").read_text())
    report: dict[str, Any] = {**recipe, "db": str(db)}
    for split, (k, policy_rounds, _) in plan.items():
        items = [ItemSpec(p.text, g[:k], [f"sft-{r}"] * len(g[:k]))
                 for r in range(policy_rounds)
                 for p, g in (groups[split, r] if (split, r) in groups else sft_samples(root, seed, split, k, r))
                 if len(g) >= 2]
        pairs = [json.loads(line) for line in (data / f"generator_{split}.jsonl").read_text().splitlines()]
        # held-out rankings become pairs: one accuracy per comparison
        rows, report[f"{split}-sft"] = _label_project(
            svc, db, f"{split}-sft", "ranking" if k > 2 else "pairwise", k, items, overlap if split == "train" else 1,
            annotator_seed(seed, len(pairs)), as_pairs=split != "train")
        report[f"{split}-generator"] = generator[f"{split}-generator"]
        rows += pairs
        report[f"{split}_rows"] = len(rows)
        (data / f"preferences_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stamp.write_text(json.dumps(report, indent=2))
    return round(time.time() - start, 1)


def format_hhh_table(hhh: dict[str, Any]) -> str:
    """The HHH experiment's policies, one row each: gold helpfulness, harmlessness and honesty (each on the prompts
    that test it) and the unsafe-compliance and over-refusal rates, with standard errors."""
    head = (f"{'HHH policy':<14} {'helpfulness':>15} {'harmlessness':>15} {'honesty':>15} {'unsafe':>13} "
            f"{'over-refusal':>13}")
    lines = [head, "-" * len(head)]
    for name, p in hhh["policies"].items():
        lines.append(f"{name:<14} " + " ".join(f"{p[k]:>+8.3f} ± {p[k + '_se']:.3f}"
                                               for k in ("helpfulness", "harmlessness", "honesty"))
                     + " " + " ".join(f"{p[k]:>6.3f} ± {p[k + '_se']:.3f}"
                                      for k in ("unsafe_rate", "over_refusal_rate")))
    rms = ", ".join(f"{c} {r['gold_accuracy']:.3f} ± {r['gold_accuracy_se']:.3f}"
                    for c, r in hhh["reward_models"].items())
    return "\n".join(lines) + f"\nper-criterion reward models' agreement with the gold judge: {rms}"


def format_table(policies: dict[str, dict[str, Any]]) -> str:
    head = f"{'policy':<10} {'gold score':>16} {'win vs sft':>10} {'KL to sft':>10} {'length':>7} {'unsafe':>7}"
    lines = [head, "-" * len(head)]
    for name, p in policies.items():
        gold = f"{p['gold_score']:+.3f} ± {p['gold_se']:.3f}"
        kl = "-" if p["kl_to_sft"] is None else f"{p['kl_to_sft']:.2f}"
        lines.append(f"{name:<10} {gold:>16} {p['win_rate_vs_sft']:>10.2f} {kl:>10} {p['mean_length']:>7.1f} "
                     f"{p['unsafe_rate']:>7.2f}")
    return "\n".join(lines)
