"""One side of one benchmark workload, run in its own process: rlhfkit's real stage `main(cfg)` or the matching
TRL trainer, timed per optimizer step. Started by vs_trl.py; not meant to be run by hand.

    python benchmarks/sides.py SPEC.json {ours,trl} WORKLOAD

reads repetition numbers from stdin, one per line, and for each writes WORKDIR/result-WORKLOAD-SIDE-REP.json.
Only the optimizer steps after the warm-up are timed (imports, model loading, tokenisation and rlhfkit's one-off
reference pass are not; the reference pass is reported on its own as ref_pass_s)."""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

# ------------------------------------------------------------------------------------------------ timing hooks
CUDA = False


def now() -> float:
    """A timestamp after the device has finished the work queued so far (asynchronous CUDA kernels)."""
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter()


class Clock:
    """Step-end timestamps and generate() intervals of one repetition."""

    def __init__(self) -> None:
        self.step_ends: list[float] = []
        self.generate: list[tuple[float, float]] = []
        self.ref_pass_s: float | None = None

    def timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        clock = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = now()
            try:
                return fn(*args, **kwargs)
            finally:
                clock.generate.append((start, now()))

        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapper

    def summary(self, warmup: int, items_per_step: float) -> dict[str, Any]:
        """Throughput over the steps after `warmup` (the step-end timestamp of step `warmup` starts the clock)."""
        ends = self.step_ends
        if len(ends) <= warmup or warmup < 1:
            raise RuntimeError(f"only {len(ends)} steps were timed; need more than warmup={warmup}")
        t0, t1 = ends[warmup - 1], ends[-1]
        steps = len(ends) - warmup
        gen = sum(b - a for a, b in self.generate if a >= t0)
        return {"timed_steps": steps, "seconds": t1 - t0, "items_per_s": steps * items_per_step / (t1 - t0),
                "step_s": (t1 - t0) / steps, "gen_fraction": gen / (t1 - t0) if self.generate else None,
                "ref_pass_s": self.ref_pass_s}


def peak_mb() -> float:
    if CUDA:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's peak RSS


def mean_last(values: list[float], n: int) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values[-n:]) / len(values[-n:]) if values else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_json(path: str) -> Any:
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------------------------------- rlhfkit
def run_ours(spec: dict[str, Any], workload: str, out: Path, clock: Clock) -> dict[str, Any]:
    """rlhfkit's stage main(cfg), with Run.end_step wrapped to timestamp every optimizer step."""
    from rlhfkit.train import run as run_module

    original_end_step = run_module.Run.end_step

    def end_step(self: Any, step: int, *args: Any, **kwargs: Any) -> None:
        clock.step_ends.append(now())
        original_end_step(self, step, *args, **kwargs)

    run_module.Run.end_step = end_step  # type: ignore[method-assign]
    original_finish = run_module.Run.finish
    final: dict[str, Any] = {}

    def finish(self: Any, model: Any, *args: Any, **kwargs: Any) -> None:
        final["model"] = self.accelerator.unwrap_model(model)
        original_finish(self, model, *args, **kwargs)

    run_module.Run.finish = finish  # type: ignore[method-assign]
    w = spec["workloads"][workload]
    common = dict(model=spec["model_dir"], output_dir=str(out), max_steps=w["steps"], seed=spec["seed"],
                  overwrite=True, batch_size=w["batch"], learning_rate=w["lr"], lr_schedule="linear",
                  precision="bf16" if CUDA else "fp32", cpu=not CUDA, report_to=["jsonl"], progress=False)
    if spec.get("compile"):
        common["compile"] = True
    try:
        if workload == "sft":
            from rlhfkit.policy.sft import SFTConfig, main

            main(SFTConfig(**common, data=spec["data"]["sft"], eval_fraction=0.0, max_length=w["max_length"]))
            metric = "loss"
        elif workload == "rm":
            from rlhfkit.reward.train import RewardConfig, main

            main(RewardConfig(**common, data=spec["data"]["prefs"], eval_fraction=0.0, max_length=w["max_length"],
                              use_margin=False))
            metric = "loss"
        elif workload == "dpo":
            from rlhfkit.policy import dpo, offline

            original_prepare = offline.prepare_reference

            def prepare_reference(*args: Any, **kwargs: Any) -> str:
                start = now()
                try:
                    return original_prepare(*args, **kwargs)
                finally:
                    clock.ref_pass_s = now() - start

            offline.prepare_reference = prepare_reference  # what offline.start calls
            dpo.main(dpo.DPOConfig(**common, data=spec["data"]["prefs"], eval_fraction=0.0,
                                   max_length=w["max_length"], beta=w["beta"], loss="dpo"))
            metric = "loss"
        else:  # online RL: grpo, rloo, ppo (GAE with a value head)
            from rlhfkit.policy import ppo

            ppo.sample = clock.timed(ppo.sample)
            cfg = ppo.PPOConfig(**common, data=spec["data"]["prompts"], reward_model=spec["reward_dir"],
                                advantage={"ppo": "gae"}.get(workload, workload), samples_per_prompt=w["k"],
                                max_new_tokens=w["max_new_tokens"], temperature=w["temperature"],
                                kl_coef=w["beta"], ppo_epochs=1, minibatches=1, **spec.get("ours_ppo", {}))
            ppo.main(cfg)
            metric = "reward/score"
    finally:
        run_module.Run.end_step = original_end_step  # type: ignore[method-assign]
        run_module.Run.finish = original_finish  # type: ignore[method-assign]
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if metric in r]
    result = {"quality": mean_last([r[metric] for r in rows], spec["quality_last"])}
    if workload in ("grpo", "rloo", "ppo"):
        from rlhfkit.models import load_tokenizer

        lengths = [r["response_length"] for r in rows]
        result.update(train_reward=result["quality"], mean_completion_length=mean_last(lengths, len(lengths)),
                      quality=rl_eval(spec, w, final["model"].policy, load_tokenizer(spec["model_dir"])))
    return result


# ------------------------------------------------------------------------------------------------------- TRL
def trl_dataset(path: str):
    from datasets import Dataset

    return Dataset.from_list(read_jsonl(Path(path)))


def run_trl(spec: dict[str, Any], workload: str, out: Path, clock: Clock) -> dict[str, Any]:
    """The TRL trainer with the same model directory, data, batch, lengths, learning rate, precision and steps."""
    import trl
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.generation.utils import GenerationMixin

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.step_ends.append(now())

    w = spec["workloads"][workload]
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    common = dict(output_dir=str(out), per_device_train_batch_size=w["batch"], gradient_accumulation_steps=1,
                  learning_rate=w["lr"], lr_scheduler_type="linear", warmup_steps=0, max_steps=w["steps"],
                  logging_steps=1, save_strategy="no", report_to="none", seed=spec["seed"], disable_tqdm=True,
                  dataloader_num_workers=0, gradient_checkpointing=False, bf16=CUDA, use_cpu=not CUDA,
                  model_init_kwargs={"dtype": "float32"})  # fp32 weights on both sides; bf16 autocast on CUDA
    callbacks = [StepClock()]
    original_generate = GenerationMixin.generate
    try:
        if workload == "sft":
            args = trl.SFTConfig(**common, max_length=w["max_length"], packing=False)
            trainer = trl.SFTTrainer(model=spec["model_dir"], args=args, train_dataset=trl_dataset(spec["data"]["sft"]),
                                     processing_class=tokenizer, callbacks=callbacks)
        elif workload == "rm":
            args = trl.RewardConfig(**common, max_length=w["max_length"])
            trainer = trl.RewardTrainer(model=spec["model_dir"], args=args,
                                        train_dataset=trl_dataset(spec["data"]["prefs"]), processing_class=tokenizer,
                                        callbacks=callbacks)
        elif workload == "dpo":
            args = trl.DPOConfig(**common, max_length=w["max_length"], beta=w["beta"])
            trainer = trl.DPOTrainer(model=spec["model_dir"], args=args, train_dataset=trl_dataset(spec["data"]["prefs"]),
                                     processing_class=tokenizer, callbacks=callbacks)
        else:  # grpo, rloo (TRL 1.16 has no PPO: ours-ppo is compared with GRPOTrainer)
            rl = {"rloo": (trl.RLOOConfig, trl.RLOOTrainer)}.get(workload, (trl.GRPOConfig, trl.GRPOTrainer))
            common["per_device_train_batch_size"] = w["batch"] * w["k"]  # TRL counts completions
            args = rl[0](**common, num_generations=w["k"], max_completion_length=w["max_new_tokens"],
                         temperature=w["temperature"], beta=w["beta"], num_iterations=1, steps_per_generation=1,
                         log_completions=False)
            GenerationMixin.generate = clock.timed(original_generate)  # type: ignore[method-assign]
            trainer = rl[1](model=spec["model_dir"], reward_funcs=spec["reward_dir"], args=args,
                            train_dataset=trl_dataset(spec["data"]["prompts"]), processing_class=tokenizer,
                            callbacks=callbacks)
        trainer.train()
    finally:
        GenerationMixin.generate = original_generate  # type: ignore[method-assign]
    history = trainer.state.log_history
    metric = "reward" if workload in ("grpo", "rloo", "ppo") else "loss"
    result = {"quality": mean_last([h[metric] for h in history if metric in h], spec["quality_last"])}
    if workload in ("grpo", "rloo", "ppo"):
        from rlhfkit.models import load_tokenizer

        lengths = [h["completions/mean_length"] for h in history if "completions/mean_length" in h]
        result.update(train_reward=result["quality"], mean_completion_length=mean_last(lengths, len(lengths)),
                      quality=rl_eval(spec, w, trainer.accelerator.unwrap_model(trainer.model),
                                      load_tokenizer(spec["model_dir"])))
    del trainer
    return result


# ------------------------------------------------------------------------------------ the shared RL quality check
def rl_eval(spec: dict[str, Any], w: dict[str, Any], model: Any, tokenizer: Any) -> float:
    """Mean reward of the trained policy on the first batch of prompts, sampled and scored the same way for both
    sides (rlhfkit's sampler, the reward model read at the last real token of the policy's own tokens), so the
    number does not depend on how each trainer re-encodes text for its reward model."""
    from rlhfkit.data.readers import read_prompts
    from rlhfkit.generation import sample
    from rlhfkit.reward.model import load_reward_ensemble

    n = w["batch"] * w["k"]
    prompts = read_prompts(spec["data"]["prompts"])[:n]
    device = next(model.parameters()).device
    reward = load_reward_ensemble(spec["reward_dir"], device=device)
    with torch.random.fork_rng(devices=[device.index or 0] if CUDA else []):
        torch.manual_seed(spec["seed"] + 99)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=CUDA):
            rollout = sample(model, tokenizer, prompts, max_new_tokens=w["eval_max_new_tokens"],
                             temperature=w["temperature"], batch_size=n)
            ids = torch.cat([rollout.prompt_ids, rollout.response_ids], 1).to(device)  # (B, P+R)
            mask = torch.cat([rollout.prompt_mask, rollout.response_mask], 1).to(device)  # (B, P+R)
            mean, _ = reward.mean_std(ids, mask)
    return float(mean.float().mean())


# ------------------------------------------------------------------------------------------------------ main
def run_once(spec: dict[str, Any], side: str, workload: str, rep: int) -> dict[str, Any]:
    w = spec["workloads"][workload]
    out = Path(spec["workdir"]) / "runs" / f"{workload}-{side}-{rep}"
    # a directory left by a killed earlier run would hand rlhfkit's DPO a finished reference cache (a pass not
    # timed); every repetition starts from nothing
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    clock = Clock()
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result: dict[str, Any] = {"side": side, "workload": workload, "rep": rep}
    try:
        result.update((run_ours if side == "ours" else run_trl)(spec, workload, out, clock))
        result.update(clock.summary(w["warmup"], w["items_per_step"]))
        result["peak_mb"] = peak_mb()
    except Exception:  # reported in the table, not fatal for the other workloads
        result["error"] = traceback.format_exc()[-3000:]
    finally:
        # the run directory holds a full model copy per repetition (1.5 GB at 0.4B); keep the disk bounded
        shutil.rmtree(out, ignore_errors=True)
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
            # what this repetition left allocated (a persistent worker's next repetition starts on top of it)
            result["leftover_mb"] = torch.cuda.memory_allocated() / 2**20
    return result


def main(argv: list[str]) -> None:
    global CUDA
    spec_path, side, workload = argv
    spec = read_json(spec_path)
    CUDA = spec["device"] == "cuda"
    torch.manual_seed(spec["seed"])
    # the imports are paid here, before the first repetition is requested, so no side times them
    if side == "trl":
        import trl  # noqa: F401
    else:
        import importlib

        importlib.import_module({"sft": "rlhfkit.policy.sft", "rm": "rlhfkit.reward.train",
                                 "dpo": "rlhfkit.policy.dpo"}.get(workload, "rlhfkit.policy.ppo"))
    for line in sys.stdin:
        if not line.strip():
            continue
        rep = int(line)
        result = run_once(spec, side, workload, rep)
        path = Path(spec["workdir"]) / f"result-{workload}-{side}-{rep}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, path)


if __name__ == "__main__":
    main(sys.argv[1:])
