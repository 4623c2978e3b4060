"""rlhfkit and TRL measured side by side, in the same run, on the same model, tokenizer, data and settings.

    python benchmarks/vs_trl.py [--quick] [--device cpu|cuda] [--model-size playground|tiny|0.4b]

Each side of each workload runs in its own process (benchmarks/sides.py) and the repetitions are interleaved
(ours, TRL, TRL, ours, ...), so slow drift of a shared machine hits both sides alike; the table reports medians
over repetitions and the median of the per-repetition ratios. Only optimizer steps after a warm-up are timed, on
both sides. Writes benchmarks/results/latest.json (or --out) and prints the table."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT / "src") not in sys.path:  # run from a checkout without installing (gpu.sh uses PYTHONPATH)
    sys.path.insert(0, str(ROOT / "src"))

# Model and data shapes. playground: the word-level playground tokenizer and its prompts, demonstrations and
# simulated-annotator preferences, on a small Llama. 0.4b: a Llama config 896 x 24 (14 heads / 2 KV heads, MLP
# 4864, vocab 32,000) on random-word sequences of 512 tokens. tiny: the 0.4b path shrunk to test it on a CPU.
SIZES: dict[str, dict[str, Any]] = {
    "playground": dict(data="playground", hidden=256, layers=4, heads=4, kv_heads=4, mlp=1024, max_positions=256,
                       rm_hidden=128, rm_layers=2),
    "tiny": dict(data="synthetic", vocab=1000, hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, max_positions=128,
                 rm_hidden=32, rm_layers=1, prompt=16, completion=16, rl_prompt=8, rl_completion=8),
    # a real model's vocabulary (Qwen2's 151,936 tokens) on a small Llama, 1,024-token sequences: the logits, not
    # the model, set peak memory (run with --workloads dpo,grpo; the memory rows of RESULTS.md)
    "vocab152k": dict(data="synthetic", vocab=151936, hidden=128, layers=2, heads=4, kv_heads=2, mlp=256,
                      max_positions=1100, rm_hidden=32, rm_layers=1, prompt=512, completion=512, rl_prompt=512,
                      rl_completion=512),
    "0.4b": dict(data="synthetic", vocab=32000, hidden=896, layers=24, heads=14, kv_heads=2, mlp=4864,
                 max_positions=1024, rm_hidden=256, rm_layers=2, prompt=256, completion=256, rl_prompt=128,
                 rl_completion=128),
}

# Per-workload settings: batch (pairs, examples or prompts), steps, warm-up steps excluded from the timing.
# RL: `batch` prompts x `k` samples each = completions per step, one optimizer step per batch on both sides.
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "playground": {
        "sft": dict(batch=8, steps=30, warmup=5, lr=1e-4),
        "rm": dict(batch=8, steps=30, warmup=5, lr=5e-5),
        "dpo": dict(batch=8, steps=30, warmup=5, lr=1e-5, beta=0.1),
        "rl": dict(batch=4, k=4, steps=6, warmup=2, lr=1e-5, beta=0.04, temperature=1.0, max_new_tokens=32),
    },
    "0.4b": {
        "sft": dict(batch=8, steps=10, warmup=3, lr=1e-5),
        "rm": dict(batch=8, steps=10, warmup=3, lr=1e-5),
        "dpo": dict(batch=8, steps=10, warmup=3, lr=1e-6, beta=0.1),
        "rl": dict(batch=16, k=4, steps=3, warmup=1, lr=1e-6, beta=0.04, temperature=1.0, eval_max_new_tokens=32),
    },
    "vocab152k": {
        "sft": dict(batch=2, steps=3, warmup=1, lr=1e-5),
        "rm": dict(batch=2, steps=3, warmup=1, lr=1e-5),
        "dpo": dict(batch=2, steps=3, warmup=1, lr=1e-6, beta=0.1),
        "rl": dict(batch=2, k=4, steps=2, warmup=1, lr=1e-6, beta=0.04, temperature=1.0, eval_max_new_tokens=16),
    },
    "tiny": {
        "sft": dict(batch=4, steps=6, warmup=2, lr=1e-4),
        "rm": dict(batch=4, steps=6, warmup=2, lr=1e-4),
        "dpo": dict(batch=4, steps=6, warmup=2, lr=1e-4, beta=0.1),
        "rl": dict(batch=2, k=2, steps=3, warmup=1, lr=1e-5, beta=0.04, temperature=1.0),
    },
}
QUICK = {"sft": dict(steps=12, warmup=2), "rm": dict(steps=12, warmup=2), "dpo": dict(steps=12, warmup=2),
         "rl": dict(steps=3, warmup=1)}
RL = ("grpo", "rloo", "ppo")
UNITS = {"sft": "tokens", "rm": "pairs", "dpo": "pairs", "grpo": "completions", "rloo": "completions",
         "ppo": "completions"}
TRL_NAME = {"sft": "SFTTrainer", "rm": "RewardTrainer", "dpo": "DPOTrainer", "grpo": "GRPOTrainer",
            "rloo": "RLOOTrainer", "ppo": "GRPOTrainer"}
OURS_NAME = {"sft": "rlhfkit sft", "rm": "rlhfkit reward", "dpo": "rlhfkit dpo", "grpo": "rlhfkit ppo (grpo)",
             "rloo": "rlhfkit ppo (rloo)", "ppo": "rlhfkit ppo (gae)"}
QUALITY = {"sft": "training loss, mean of the last {n} steps", "rm": "training loss, mean of the last {n} steps",
           "dpo": "training loss, mean of the last {n} steps",
           "rl": "mean reward-model score of the trained policy's samples on the first batch of prompts, sampled "
                 "and scored identically for both sides (train_reward: the trainer's own logged reward)"}
ALL_WORKLOADS = ["sft", "rm", "dpo", "grpo", "ppo", "rloo"]
TARGETS = {"cpu": {"sft": 1.3, "rm": 1.3, "dpo": 1.3, "grpo": 1.5, "rloo": 1.5, "ppo": 1.5},
           "cuda": {"dpo": 2.5, "grpo": 7.0, "rloo": 7.0, "ppo": 7.0, "sft": 1.5, "rm": 1.5}}
"""Throughput targets (rlhfkit / TRL); DPO's is judged counting rlhfkit's one-off reference pass over the one epoch
of data. Peak memory at most TRL's is judged beside them (memory_le_trl)."""
MEMORY_TARGETS = {"vocab152k": 0.5}
"""Peak-memory targets (rlhfkit / TRL) by model size: with a real vocabulary the log-prob path sets the peak."""
BUDGET_WEIGHT = {"sft": 0.8, "rm": 0.8, "dpo": 1.0, "grpo": 2.2, "rloo": 2.2, "ppo": 2.2}
"""Relative time each workload group needs (RL steps generate, so they take longest)."""


# ------------------------------------------------------------------------------------------------ the assets
def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def synthetic_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer whose vocabulary is exactly `vocab` tokens (7 specials + words w0, w1, ...), with
    no chat template: both sides then see plain prompt/completion strings."""
    from rlhfkit.models import train_word_tokenizer

    tokenizer = train_word_tokenizer([" ".join(f"w{i}" for i in range(vocab - 7))])
    tokenizer.chat_template = None
    assert len(tokenizer) == vocab, len(tokenizer)
    return tokenizer


def synthetic_data(size: dict[str, Any], rows: dict[str, int], seed: int) -> dict[str, list[dict[str, Any]]]:
    """Random-word texts of fixed lengths: prompt + completion tokens = size['prompt'] + size['completion']
    (BOS and EOS included), RL prompts of size['rl_prompt'] tokens."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(size["vocab"] - 7)]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    P, R = size["prompt"] - 1, size["completion"] - 1  # BOS before the prompt, EOS after the completion
    return {
        "sft": [{"prompt": text(P), "completion": text(R)} for _ in range(rows["sft"])],
        "prefs": [{"prompt": text(P), "chosen": text(R), "rejected": text(R)} for _ in range(rows["prefs"])],
        "prompts": [{"prompt": text(size["rl_prompt"] - 1)} for _ in range(rows["prompts"])],
    }


def playground_data(rows: dict[str, int], seed: int) -> dict[str, list[dict[str, Any]]]:
    """The playground's prompts, SFT demonstrations and simulated-annotator preference pairs."""
    from rlhfkit.playground.preferences import generator_pairs, label_pairs
    from rlhfkit.playground.responses import sft_demonstrations
    from rlhfkit.playground.tasks import make_prompts

    prompts = make_prompts(seed, 600, 10, 10)["train"]
    demos = sft_demonstrations(prompts, seed + 1, rows["sft"])
    prefs: list[dict[str, Any]] = []
    r = 0
    while len(prefs) < rows["prefs"]:
        got, _ = label_pairs(generator_pairs(prompts, seed=seed + 20 + r), seed=seed + 13 + r)
        prefs += [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in got]
        r += 1
    return {
        "sft": [{"prompt": [{"role": "user", "content": d["prompt"]}],
                 "completion": [{"role": "assistant", "content": d["completion"]}]} for d in demos],
        "prefs": prefs[: rows["prefs"]],
        "prompts": [{"prompt": [{"role": "user", "content": p.text}]}
                    for p in (prompts * (rows["prompts"] // len(prompts) + 1))[: rows["prompts"]]],
    }


def prepare(workdir: Path, size_name: str, settings: dict[str, dict[str, Any]], seed: int) -> dict[str, Any]:
    """Policy and reward-model directories (save_pretrained, with the tokenizer) and the data files; reused when
    the same shapes were prepared before in workdir."""
    import torch

    from rlhfkit.models import build_llama, save_pretrained, train_word_tokenizer

    size = SIZES[size_name]
    rows = {"sft": settings["sft"]["batch"] * settings["sft"]["steps"],
            "prefs": max(settings[w]["batch"] * settings[w]["steps"] for w in ("rm", "dpo")),
            "prompts": settings["rl"]["batch"] * settings["rl"]["steps"]}
    key = json.dumps({"size": size, "rows": rows, "seed": seed, "version": 1}, sort_keys=True)
    marker = workdir / "assets.json"
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        return json.loads(marker.read_text())["assets"]
    workdir.mkdir(parents=True, exist_ok=True)
    if size["data"] == "playground":
        from rlhfkit.playground.responses import lexicon

        tokenizer = train_word_tokenizer([" ".join(lexicon())])
        data = playground_data(rows, seed)
    else:
        tokenizer = synthetic_tokenizer(size["vocab"])
        data = synthetic_data(size, rows, seed)
    model = build_llama(tokenizer, hidden_size=size["hidden"], num_layers=size["layers"], num_heads=size["heads"],
                        num_kv_heads=size["kv_heads"], intermediate_size=size["mlp"],
                        max_positions=size["max_positions"], seed=seed)
    save_pretrained(model, tokenizer, workdir / "model")
    n_params = sum(p.numel() for p in model.parameters())
    del model
    # the reward model: a small randomly initialised Llama with a score head, saved as
    # AutoModelForSequenceClassification (what `rlhfkit reward` writes and what TRL's reward_funcs= loads)
    from rlhfkit.reward.model import load_reward_model

    base = build_llama(tokenizer, hidden_size=size["rm_hidden"], num_layers=size["rm_layers"], num_heads=4,
                       max_positions=size["max_positions"], seed=seed + 1)
    save_pretrained(base, tokenizer, workdir / "rm-base")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        reward = load_reward_model(str(workdir / "rm-base"), tokenizer)
    save_pretrained(reward, tokenizer, workdir / "reward")
    paths = {name: write_jsonl(workdir / f"{name}.jsonl", data[name]) for name in data}
    # SFT throughput in tokens: examples/s x mean tokens per example (prompt + completion as rlhfkit tokenises it;
    # both sides train on the same rows)
    from rlhfkit.data.sft import read_sft_examples

    examples, _ = read_sft_examples(paths["sft"], tokenizer, 4096, "truncate")
    assets = {"model_dir": str(workdir / "model"), "reward_dir": str(workdir / "reward"), "data": paths,
              "params": n_params, "sft_mean_tokens": sum(len(e.input_ids) for e in examples) / len(examples)}
    marker.write_text(json.dumps({"key": key, "assets": assets}))
    return assets


def build_spec(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    settings = {w: dict(s) for w, s in SETTINGS[args.model_size].items()}
    if args.quick:
        for w, override in QUICK.items():
            settings[w].update(override)
    assets = prepare(workdir, args.model_size, settings, args.seed)
    size = SIZES[args.model_size]
    if size["data"] == "playground":
        max_length = size["max_positions"]
        settings["rl"].setdefault("max_new_tokens", 32)
    else:
        max_length = size["prompt"] + size["completion"] + 8
        settings["rl"].setdefault("max_new_tokens", size["rl_completion"])
    settings["rl"].setdefault("eval_max_new_tokens", settings["rl"]["max_new_tokens"])
    workloads: dict[str, dict[str, Any]] = {}
    for w in ALL_WORKLOADS:
        s = dict(settings["rl" if w in RL else w])
        s["max_length"] = max_length
        s["items_per_step"] = {"sft": s["batch"] * assets["sft_mean_tokens"]}.get(w, s["batch"] * s.get("k", 1))
        workloads[w] = s
    return {"device": args.device, "seed": args.seed, "workdir": str(workdir), "compile": args.compile,
            "model_size": args.model_size,
            "quality_last": 5 if not args.quick else 2, **assets, "workloads": workloads}


# ---------------------------------------------------------------------------------------------- the workers
LIVE: set[Worker] = set()


def stop_workers(signum: int, frame: Any) -> None:
    """On SIGTERM (gpu.sh's `timeout`): kill the worker process groups, so nothing keeps the GPU after the run.
    The rows of the workloads already finished are on disk."""
    for worker in list(LIVE):
        worker.kill()
    sys.exit(128 + signum)


class Worker:
    """A sides.py process for one arm (side, workload); it runs the repetitions it is sent on stdin."""

    def __init__(self, spec_path: Path, workdir: Path, side: str, workload: str):
        self.side, self.workload, self.workdir = side, workload, workdir
        self.log = workdir / f"log-{workload}-{side}.txt"
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                   HF_DATASETS_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error",
                   PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        with self.log.open("a") as fh:
            self.proc = subprocess.Popen([sys.executable, str(HERE / "sides.py"), str(spec_path), side, workload],
                                         stdin=subprocess.PIPE, stdout=fh, stderr=subprocess.STDOUT, text=True,
                                         env=env, cwd=str(ROOT), start_new_session=True)
        LIVE.add(self)

    def run(self, rep: int, deadline: float, last: bool) -> dict[str, Any]:
        path = self.workdir / f"result-{self.workload}-{self.side}-{rep}.json"
        path.unlink(missing_ok=True)
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(f"{rep}\n")
            self.proc.stdin.flush()
            if last:
                self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        while True:
            if path.exists():
                return json.loads(path.read_text())
            if self.proc.poll() is not None:
                return {"error": f"worker exited with code {self.proc.returncode}; see {self.log}:\n" + self.tail()}
            if time.time() > deadline:
                self.kill()
                return {"error": f"timed out; see {self.log}"}
            time.sleep(0.1)

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text()[-n:]
        except OSError:
            return ""

    def kill(self) -> None:
        LIVE.discard(self)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def close(self) -> None:
        LIVE.discard(self)
        try:
            if self.proc.stdin and not self.proc.stdin.closed:
                self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, OSError):
            self.kill()


def arms_of(group: str, workloads: list[str]) -> list[tuple[str, str]]:
    """The processes interleaved in one group: ours and TRL, plus ours-PPO beside GRPO (TRL has no PPO, so PPO is
    compared with the same GRPOTrainer runs)."""
    if group == "ppo":
        return [("ours", "ppo"), ("trl", "grpo")]
    arms = [("ours", group), ("trl", group)]
    if group == "grpo" and "ppo" in workloads:
        arms.append(("ours", "ppo"))
    return arms


def run_group(spec_path: Path, spec: dict[str, Any], group: str, workloads: list[str], reps: int,
              budget_s: float | None, persistent: bool, hard_end: float | None = None
              ) -> dict[tuple[str, str], list[dict[str, Any]]]:
    workdir = Path(spec["workdir"])
    arms = arms_of(group, workloads)
    start = time.time()
    soft = start + budget_s if budget_s else float("inf")  # no new repetition is started past it
    deadline = start + 1.5 * budget_s if budget_s else start + 3600  # a run still going then is killed
    if hard_end is not None:
        deadline = min(deadline, hard_end)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {arm: [] for arm in arms}
    workers: dict[tuple[str, str], Worker] = {}
    if persistent:  # all imports of the group overlap; every repetition then reuses the warm processes
        workers = {arm: Worker(spec_path, workdir, *arm) for arm in arms}
    try:
        for rep in range(reps):
            rep_start = time.time()
            order = arms if rep % 2 == 0 else arms[::-1]  # ABBA: a drift during the run hits both sides alike
            for arm in order:
                worker = workers.get(arm) or Worker(spec_path, workdir, *arm)
                result = worker.run(rep, deadline, last=not persistent)
                if not persistent:
                    worker.close()
                results[arm].append(result)
                status = "error" if "error" in result else f"{result['items_per_s']:.4g}/s"
                print(f"  {group} rep {rep}: {arm[0]:4s} {arm[1]:5s} {status}", flush=True)
                if "error" in result:
                    print("    " + result["error"].strip().splitlines()[-1][:300], flush=True)
            took = time.time() - rep_start
            if rep + 1 < reps and time.time() + 1.1 * took > soft:
                print(f"  {group}: stopping after {rep + 1} repetition(s) to stay inside its time budget", flush=True)
                break
    finally:
        for worker in workers.values():
            worker.close()
    return results


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def rows_of(group: str, results: dict[tuple[str, str], list[dict[str, Any]]], spec: dict[str, Any],
            device: str) -> list[dict[str, Any]]:
    rows = []
    trl_arm = next(arm for arm in results if arm[0] == "trl")
    trl_runs = results[trl_arm]
    for arm, runs in results.items():
        if arm[0] != "ours":
            continue
        w = arm[1]
        ok_ours = [r for r in runs if "error" not in r]
        ok_trl = [r for r in trl_runs if "error" not in r]
        ratios = [o["items_per_s"] / t["items_per_s"] for o, t in zip(runs, trl_runs)
                  if "error" not in o and "error" not in t]
        s = spec["workloads"][w]
        row: dict[str, Any] = {
            "workload": w if w != "ppo" else "ppo-gae",
            "unit": UNITS[w],
            "ours_per_s": median([r["items_per_s"] for r in ok_ours]),
            "trl_per_s": median([r["items_per_s"] for r in ok_trl]),
            "ratio": median(ratios),
            "ours_peak_mb": median([r["peak_mb"] for r in ok_ours]),
            "trl_peak_mb": median([r["peak_mb"] for r in ok_trl]),
            "ours_quality": median([r["quality"] for r in ok_ours]),
            "trl_quality": median([r["quality"] for r in ok_trl]),
            "device": device,
            # what the numbers mean and how they were taken
            "ours": OURS_NAME[w], "trl": TRL_NAME[w],
            "quality_metric": QUALITY["rl" if w in RL else w].format(n=spec["quality_last"]),
            "ratios": ratios, "ours_runs": [r.get("items_per_s") for r in runs],
            "trl_runs": [r.get("items_per_s") for r in trl_runs],
            "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None,
            "reps": len(ratios), "steps": s["steps"], "warmup_steps": s["warmup"], "batch": s["batch"],
            "errors": [r["error"] for r in runs + trl_runs if "error" in r],
            "target_ratio": TARGETS[spec["device"]].get(w),
        }
        # the throughput target and the memory target are judged (and printed) separately
        row["target_met"] = (None if row["target_ratio"] is None or row["ratio"] is None else
                             row["ratio"] >= row["target_ratio"])
        row["memory_le_trl"] = (None if row["ours_peak_mb"] is None or row["trl_peak_mb"] is None else
                                row["ours_peak_mb"] <= row["trl_peak_mb"])
        row["memory_ratio"] = (row["ours_peak_mb"] / row["trl_peak_mb"] if row["memory_le_trl"] is not None
                               else None)
        row["memory_target"] = MEMORY_TARGETS.get(spec.get("model_size", ""))
        if row["memory_target"] is not None:
            row["memory_target_met"] = (None if row["memory_ratio"] is None else
                                        row["memory_ratio"] <= row["memory_target"])
        if spec["device"] == "cuda":  # memory a repetition left allocated in its (persistent) worker
            row["leftover_mb"] = max([r.get("leftover_mb", 0.0) for r in runs + trl_runs] or [0.0])
        if w in RL:
            row.update(samples_per_prompt=s["k"], max_new_tokens=s["max_new_tokens"], beta=s["beta"],
                       ours_gen_fraction=median([r["gen_fraction"] for r in ok_ours]),
                       trl_gen_fraction=median([r["gen_fraction"] for r in ok_trl]),
                       ours_train_reward=median([r["train_reward"] for r in ok_ours]),
                       trl_train_reward=median([r["train_reward"] for r in ok_trl]),
                       ours_completion_length=median([r["mean_completion_length"] for r in ok_ours]),
                       trl_completion_length=median([r["mean_completion_length"] for r in ok_trl]))
        if w == "dpo":
            # rlhfkit scores the reference once before training (cached); TRL runs the reference model inside
            # every step. The data is exactly one epoch, so the rate including that pass is comparable too.
            ref = median([r["ref_pass_s"] for r in ok_ours])
            row["ours_ref_pass_s"] = ref
            if ref is not None and row["ours_per_s"]:
                pairs = s["batch"] * s["steps"]
                row["ours_per_s_incl_ref"] = pairs / (pairs / row["ours_per_s"] + ref)
                row["ratio_incl_ref"] = (row["ours_per_s_incl_ref"] / row["trl_per_s"]) if row["trl_per_s"] else None
            if row.get("ratio_incl_ref") is not None and row["target_ratio"] is not None:
                row["target_met"] = row["ratio_incl_ref"] >= row["target_ratio"]
        if w == "sft":
            row["tokens_per_example"] = spec["sft_mean_tokens"]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ reporting
def fmt(value: Any, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = ["workload", "unit/s", "rlhfkit", "TRL", "ratio (min-max)", "peak MB ours/TRL", "quality ours/TRL",
            "gen frac ours/TRL", "reps", "target"]
    lines = [head]
    for r in rows:
        lines.append([
            f"{r['workload']} vs {r['trl']}", r["unit"], fmt(r["ours_per_s"], ".4g"), fmt(r["trl_per_s"], ".4g"),
            f"{fmt(r['ratio'], '.2f')}x ({fmt(r['ratio_min'], '.2f')}-{fmt(r['ratio_max'], '.2f')})",
            f"{fmt(r['ours_peak_mb'], '.0f')}/{fmt(r['trl_peak_mb'], '.0f')}",
            f"{fmt(r['ours_quality'], '.4g')}/{fmt(r['trl_quality'], '.4g')}",
            f"{fmt(r.get('ours_gen_fraction'), '.0%')}/{fmt(r.get('trl_gen_fraction'), '.0%')}"
            if "ours_gen_fraction" in r else "",
            str(r["reps"]),
            ("" if r.get("target_met") is None else
             f"{r['target_ratio']}x{' incl. ref pass' if r.get('ratio_incl_ref') is not None else ''}: "
             f"{'met' if r['target_met'] else 'MISSED'}")
            + ("" if r.get("memory_le_trl") in (None, True) else "; memory > TRL")
            + ("" if r.get("memory_target_met") is None else
               f"{'; ' if r.get('target_met') is not None else ''}memory {fmt(r['memory_ratio'], '.2f')}x "
               f"(≤ {r['memory_target']}x): {'met' if r['memory_target_met'] else 'MISSED'}"),
        ])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(wd) for c, wd in zip(row, widths)) + " |" for row in lines]
    out.insert(1, "|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
    notes = []
    for r in rows:
        if "ours_per_s_incl_ref" in r:
            notes.append(f"dpo: rlhfkit's one-off reference pass took {r['ours_ref_pass_s']:.2f} s; including it, "
                         f"{r['ours_per_s_incl_ref']:.4g} pairs/s = {fmt(r.get('ratio_incl_ref'), '.2f')}x TRL "
                         "(TRL runs its reference model inside each step).")
        if r["errors"]:
            notes.append(f"{r['workload']}: {len(r['errors'])} failed run(s): " +
                         r["errors"][0].strip().splitlines()[-1][:200])
    return "\n".join(out + [""] + notes)


def device_name(device: str) -> str:
    if device == "cuda":
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            gpu = "unknown GPU"
        return f"cuda: {gpu}"
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))
    return f"cpu: {cpu}, {threads} threads"


def write_results(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any], text: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=2))
    os.replace(tmp, out)
    out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2))
    out.with_suffix(".txt").write_text(text + "\n")
    target = os.environ.get("OUT")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for path in (out, out.with_suffix(".meta.json"), out.with_suffix(".txt")):
            (Path(target) / path.name).write_text(path.read_text())


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (still --reps repetitions)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model-size", choices=sorted(SIZES), default=None,
                   help="default: playground on cpu, 0.4b on cuda")
    p.add_argument("--workloads", default=",".join(ALL_WORKLOADS),
                   help=f"comma-separated subset of {','.join(ALL_WORKLOADS)}")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--total-budget-s", type=float, default=None,
                   help="wall-clock budget of the whole run, preparation included, shared out by BUDGET_WEIGHT (time a "
                        "group leaves unused passes to the next); repetitions stop early (after the first) to keep "
                        "it, and a run still going at its group's end is killed and reported as failed")
    p.add_argument("--ours-ppo", action="append", default=[], metavar="KEY=VALUE",
                   help="extra PPOConfig field for the rlhfkit RL runs (e.g. a sampler option), repeatable")
    p.add_argument("--persistent", action=argparse.BooleanOptionalAction, default=None,
                   help="one process per side for all repetitions (default on cuda: saves start-up time); "
                        "otherwise a fresh process per repetition (fair peak RSS on cpu)")
    p.add_argument("--compile", action="store_true", help="rlhfkit side: torch.compile the policy (TrainConfig.compile)")
    p.add_argument("--workdir", default=None, help="models, data and logs (default: benchmarks/results/work-SIZE-DEVICE)")
    p.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, stop_workers)
    args.model_size = args.model_size or ("0.4b" if args.device == "cuda" else "playground")
    persistent = args.persistent if args.persistent is not None else args.device == "cuda"
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(workloads) - set(ALL_WORKLOADS))
    if unknown:
        p.error(f"unknown workload(s) {unknown}; choose from {','.join(ALL_WORKLOADS)}")
    workdir = Path(args.workdir or HERE / "results" / f"work-{args.model_size}-{args.device}").resolve()
    t0 = time.time()
    spec = build_spec(args, workdir)
    if args.ours_ppo:  # imported only when used: a broken RL module must not stop the other workloads
        from rlhfkit.config import coerce
        from rlhfkit.policy.ppo import PPOConfig

        hints = __import__("typing").get_type_hints(PPOConfig)
    for item in args.ours_ppo:
        key, _, value = item.partition("=")
        if key not in hints:
            p.error(f"--ours-ppo {item}: PPOConfig has no field {key!r}")
        spec.setdefault("ours_ppo", {})[key] = coerce(value, hints[key], key, "--ours-ppo")
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    device = device_name(args.device)
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": device,
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "model_size": args.model_size,
            "params": spec["params"], "quick": args.quick, "reps": args.reps, "persistent_workers": persistent,
            "timing": "optimizer steps after the warm-up steps only (imports, model loading and tokenisation "
                      "excluded on both sides)", "prepare_s": round(time.time() - t0, 1)}
    print(f"# {device}; model {args.model_size} ({spec['params'] / 1e6:.1f}M params); prepared in "
          f"{meta['prepare_s']} s; workers {'persistent' if persistent else 'fresh per repetition'}", flush=True)
    groups = [w for w in workloads if not (w == "ppo" and "grpo" in workloads)]
    rows: list[dict[str, Any]] = []
    end = t0 + args.total_budget_s if args.total_budget_s else None
    for i, group in enumerate(groups):
        budget = None
        if end is not None:
            weights = [BUDGET_WEIGHT[g] * (1.5 if g == "grpo" and "ppo" in workloads else 1) for g in groups[i:]]
            budget = max(10.0, (end - time.time()) * weights[0] / sum(weights))
            print(f"# {group}: {budget:.0f} s budget", flush=True)
        results = run_group(spec_path, spec, group, workloads, args.reps, budget, persistent, end)
        rows += rows_of(group, results, spec, device)
        text = table(rows)
        write_results(Path(args.out), rows, meta, text)
        print(text, flush=True)
    meta["total_s"] = round(time.time() - t0, 1)
    write_results(Path(args.out), rows, meta, table(rows))
    return rows


if __name__ == "__main__":
    main()
