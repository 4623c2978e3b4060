"""Random SIGKILL loops for every trainer: each run is killed at least 10 times -- right after steps, in the middle
of writing a checkpoint, and at random moments -- and resumed with --resume until it finishes; its final weights
and per-step metrics must be bit-identical to the uninterrupted run's (CPU)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import preference_rows, tiny_reward_world, write_jsonl
from rlhfkit.train import read_metrics
from rlhfkit.train.checkpoint import KILL_IN_CHECKPOINT_ENV
from rlhfkit.train.run import KILL_ENV

pytestmark = pytest.mark.slow
MAX_STEPS, SAVE_EVERY = 12, 2


def stage_args(stage: str, model: Path, data: Path, out: Path, extra: list[str]) -> list[str]:
    return [stage, "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps",
            str(MAX_STEPS), "--save-every", str(SAVE_EVERY), "--keep-checkpoints", "2", "--seed", "3",
            "--report-to", "jsonl", "--progress", "false", *extra]


def run(args: list[str], env_extra: dict[str, str] | None = None, kill_after_s: float | None = None
        ) -> subprocess.CompletedProcess | int:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if kill_after_s is not None:
        try:
            proc.wait(timeout=kill_after_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def torture(stage: str, model: Path, data: Path, tmp: Path, extra: list[str]) -> int:
    full, killed = tmp / f"{stage}-full", tmp / f"{stage}-killed"
    done = run(stage_args(stage, model, data, full, extra))
    assert done.returncode == 0, done.stderr[-2000:]
    rng = random.Random(stage)
    # ten scripted kills in the order the run reaches them (right after odd steps, inside even steps' checkpoint
    # writes: each lands, since a kill costs at most the steps since the last checkpoint), then random moments
    plan: list[tuple[dict[str, str], float | None]] = []
    for s in range(1, 11):
        plan.append(({KILL_ENV: str(s)} if s % 2 else {KILL_IN_CHECKPOINT_ENV: str(s)}, None))
    plan += [({}, rng.uniform(2.0, 8.0)) for _ in range(3)]
    kills = 0
    for env, after in plan:
        args = stage_args(stage, model, data, killed, extra) + (["--resume"] if killed.exists() else [])
        proc = run(args, env, after)
        if proc.returncode == -9:
            kills += 1
        else:
            assert proc.returncode == 0, proc.stderr[-2000:]
    args = stage_args(stage, model, data, killed, extra) + ["--resume"]
    last = run(args)
    if last.returncode != 0 and "finished run" not in last.stderr:
        raise AssertionError(last.stderr[-2000:])
    if not (killed / "summary.json").exists():
        last = run(args)
        assert last.returncode == 0, last.stderr[-2000:]
    key = lambda m: {k: v for k, v in m.items() if not k.endswith("_s") and "per_s" not in k}  # noqa: E731
    assert [key(m) for m in read_metrics(killed / "metrics.jsonl")] == \
        [key(m) for m in read_metrics(full / "metrics.jsonl")]
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa), "final weights differ"
    return kills


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    return tiny_reward_world(tmp_path_factory.mktemp("torture"), tiny_model, prompts=16, reward_steps=5)


@pytest.mark.parametrize("stage,extra", [
    ("sft", ["--batch-size", "4", "--learning-rate", "3e-3"]),
    ("reward", ["--batch-size", "4", "--learning-rate", "1e-3"]),
    ("dpo", ["--batch-size", "4", "--learning-rate", "1e-3"]),
    ("dpo-kto", ["--loss", "kto", "--batch-size", "4", "--learning-rate", "1e-3"]),
    ("ppo", ["--batch-size", "4", "--max-new-tokens", "6", "--learning-rate", "1e-3"]),
    ("ppo-grpo", ["--advantage", "grpo", "--samples-per-prompt", "2", "--batch-size", "2", "--max-new-tokens", "6",
                  "--learning-rate", "1e-3"]),
])
def test_every_trainer_survives_ten_sigkills_bit_identically(tmp_path, tiny_model, sft_file, world, stage, extra):
    d, prompts = world
    name = stage.split("-")[0]
    data = {"sft": sft_file, "reward": None, "dpo": None, "ppo": prompts}[name]
    if data is None:
        data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(40))
    if name == "ppo":
        extra = extra + ["--reward-model", str(d / "rm")]
    kills = torture(name, tiny_model, data, tmp_path / stage, extra)
    assert kills >= 10, kills
