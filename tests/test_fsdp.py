"""Sharded training (FSDP2) for every stage, launched the way users launch it: `accelerate launch --config_file
examples/accelerate/fsdp.yaml` with 2 CPU processes (gloo).

- sft, reward, dpo, kto (and LoRA): the 2-process sharded run equals one process at the same global batch
  (losses and grad norms within 1e-4 relative, final weights);
- ppo (gae, grpo, rloo): each process samples its own prompts from its own random stream, so one process would
  draw other samples; the sharded run is compared with the replicated (DDP) run of the same 2 processes instead;
- online-dpo: every process samples the round's pairs alike, so it is compared with one process;
- resume after SIGKILL reproduces the uninterrupted sharded run exactly (sft, dpo, grpo), and a sharded
  checkpoint is not resumed by an unsharded run;
- the final model is full Hugging Face weights that plain transformers loads.
Gradient checkpointing, the other memory lever, is checked here too (in process: same losses and gradients)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import REFERENCE_RUNS
from rlhfkit.train import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate"
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
COMMON = ["--seed", "1", "--report-to", "jsonl", "--progress", "false", "--learning-rate", "3e-3"]


@pytest.fixture
def world(sharding_world) -> dict[str, Path]:
    return sharding_world


def launch(config: str, stage: str, args: list[str], env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate's launcher is installed with the package"
    return subprocess.run([accelerate, "launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
                           "--num_processes", "2", "-m", "rlhfkit", stage, *args],
                          capture_output=True, text=True, timeout=600, env={**ENV, **(env or {})})


def single(stage: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhfkit", stage, *args], capture_output=True, text=True,
                          timeout=600, env=ENV)


def reference(tmp_path_factory, how: str, stage: str, args: list[str]) -> Path:
    """The run of `stage` with `args`, one process (`how="single"`) or launched with the `how` config; run once a
    session and shared by every test that compares with it."""
    key = (how, stage, tuple(args))
    if key not in REFERENCE_RUNS:
        out = tmp_path_factory.mktemp(f"reference-{how}-{stage}")
        ok(single(stage, [*args, "--output-dir", str(out)]) if how == "single"
           else launch(how, stage, [*args, "--output-dir", str(out)]))
        REFERENCE_RUNS[key] = out
    return REFERENCE_RUNS[key]


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


def curve(run: Path, loss: str) -> list[tuple[int, float, float]]:
    return [(m["step"], m[loss], m["grad_norm"]) for m in read_metrics(run / "metrics.jsonl")]


LR = float(COMMON[COMMON.index("--learning-rate") + 1])


def assert_close_weights(wa: torch.Tensor, wb: torch.Tensor, key: str) -> None:
    """The same weights up to float noise. Adam divides each gradient by its own running magnitude, so a coordinate
    whose gradient is itself rounding noise (near zero, made of cancelling terms) takes a step of a different
    direction when the sums are reduced in another order: one such coordinate in thousands can differ by a small
    fraction of a step. A real layout fault (a lost shard, a gradient scaled or dropped) moves whole tensors by
    whole steps. So: 99.9% of the coordinates within 1e-4 relative, and every one within 2% of one Adam step."""
    close = (wa - wb).abs() <= 1e-5 + 1e-4 * wb.abs()
    assert close.float().mean().item() >= 0.999, f"{key}: {int((~close).sum())} of {close.numel()} differ"
    torch.testing.assert_close(wa, wb, rtol=0, atol=0.02 * LR, msg=key)


def assert_same(a: Path, b: Path, loss: str, exact: bool = False) -> None:
    ca, cb = curve(a, loss), curve(b, loss)
    assert [s for s, *_ in ca] == [s for s, *_ in cb]
    if exact:
        assert ca == cb
    else:
        assert [v for _, *vs in ca for v in vs] == pytest.approx([v for _, *vs in cb for v in vs], rel=1e-4)
    for name in ("model.safetensors", "value_head.safetensors"):
        if not (a / name).exists():
            continue
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        for key in wa:
            if exact:
                assert torch.equal(wa[key], wb[key]), key
            else:
                assert_close_weights(wa[key], wb[key], key)


def assert_sharded_checkpoint(run: Path, step: int) -> None:
    ckpt = run / "checkpoints" / f"step-{step}"
    files = sorted(p.name for p in (ckpt / "sharded").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"], files  # each process wrote its shard
    assert not (ckpt / "optimizer.pt").exists() and not (ckpt / "model").exists()
    assert "sharded/__1_0.distcp" in json.loads((ckpt / "manifest.json").read_text())["files"]


OFFLINE = {
    # stage, its arguments, the metric that is its loss, how plain transformers loads the result
    "sft": ("sft", lambda w: ["--model", str(w["model"]), "--data", str(w["sft"])], "loss", "causal"),
    "sft-lora": ("sft", lambda w: ["--model", str(w["model"]), "--data", str(w["sft"]), "--lora.enabled", "true",
                                   "--lora.r", "4"], "loss", "causal"),
    "reward": ("reward", lambda w: ["--model", str(w["model"]), "--data", str(w["pairs"])], "loss", "classifier"),
    "dpo": ("dpo", lambda w: ["--model", str(w["model"]), "--data", str(w["pairs"])], "loss", "causal"),
    "kto": ("dpo", lambda w: ["--model", str(w["model"]), "--data", str(w["pairs"]), "--loss", "kto"], "loss",
            "causal"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(OFFLINE))
def test_sharded_two_processes_match_one(tmp_path, tmp_path_factory, world, case):
    stage, args, loss, kind = OFFLINE[case]
    common = [*args(world), *COMMON, "--max-steps", "4", "--save-every", "4"]
    two = tmp_path / "two"
    one = reference(tmp_path_factory, "single", stage, [*common, "--batch-size", "8"])
    ok(launch("fsdp", stage, [*common, "--output-dir", str(two), "--batch-size", "4"]))
    assert_sharded_checkpoint(two, 4)
    assert_same(one, two, loss)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    loader = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    loader.from_pretrained(two)  # full weights, no rlhfkit needed
    if case == "sft-lora":
        assert (two / "adapter" / "adapter_model.safetensors").exists()


def ppo_args(world: dict[str, Path], advantage: str) -> list[str]:
    """3 PPO steps on 2 processes' worth of prompts, checkpointed at the end, with the held-out evaluation (scored
    from texts) every step."""
    return ["--model", str(world["model"]), "--reward-model", str(world["rm"]), "--data", str(world["prompts"]),
            "--advantage", advantage, "--samples-per-prompt", "1" if advantage == "gae" else "2",
            "--max-new-tokens", "8", "--batch-size", "4", *COMMON, "--max-steps", "3", "--save-every", "3",
            "--judge-reward-model", str(world["rm"]), "--eval-prompts", str(world["prompts"]),
            "--eval-samples", "6", "--eval-every", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("advantage,frozen", [("gae", "auto"), ("grpo", "replicate"), ("rloo", "shard")])
def test_sharded_ppo_matches_replicated(tmp_path, tmp_path_factory, world, advantage, frozen):
    """The policy sharded, and the reference and reward model sharded too (auto, shard) or replicated; the
    held-out evaluation (scored from texts, so the sharded reward model is gathered for it) every step."""
    common = ppo_args(world, advantage)
    fsdp = tmp_path / "fsdp"
    ddp = reference(tmp_path_factory, "ddp", "ppo", common)
    proc = launch("fsdp", "ppo", [*common, "--output-dir", str(fsdp), "--frozen-models", frozen])
    ok(proc)
    sharded_frozen = "frozen networks (reference, reward models) sharded over 2 processes" in proc.stderr
    assert sharded_frozen == (frozen != "replicate")
    assert_sharded_checkpoint(fsdp, 3)
    assert_same(ddp, fsdp, "policy_loss")
    assert_same_rl_metrics(ddp, fsdp, advantage)


def assert_same_rl_metrics(a: Path, b: Path, advantage: str) -> None:
    """Reward, KL, the held-out judge and proxy (and the value loss) equal step by step."""
    for key in ("reward/score", "kl", "judge/score", "eval/proxy", *(("value_loss",) if advantage == "gae" else ())):
        va = [m[key] for m in read_metrics(a / "metrics.jsonl")]
        vb = [m[key] for m in read_metrics(b / "metrics.jsonl")]
        assert va == pytest.approx(vb, rel=1e-4, abs=1e-6), key


def online_dpo_against_one_process(tmp_path: Path, tmp_path_factory, world: dict[str, Path], config: str
                                   ) -> tuple[Path, subprocess.CompletedProcess]:
    """Online DPO, 2 rounds, launched with `config` on 2 processes and run in one: the same pairs every round (the
    second round's sampled from the first round's distributed-trained policy), losses and final weights."""
    common = ["--model", str(world["model"]), "--reward-model", str(world["rm"]), "--data", str(world["prompts"]),
              "--rounds", "2", "--prompts-per-round", "16", "--max-new-tokens", "8", "--temperature", "1.5",
              "--min-score-gap", "0", *COMMON, "--max-steps", "2"]
    two = tmp_path / "two"
    one = reference(tmp_path_factory, "single", "online-dpo", [*common, "--batch-size", "8"])
    proc = launch(config, "online-dpo", [*common, "--output-dir", str(two), "--batch-size", "4"])
    ok(proc)
    for r in (1, 2):
        assert (one / f"round-{r}" / "pairs.jsonl").read_text() == (two / f"round-{r}" / "pairs.jsonl").read_text()
        assert_same(one / f"round-{r}", two / f"round-{r}", "loss")
    wa, wb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert_close_weights(wa[key], wb[key], key)
    return two, proc


@pytest.mark.slow
def test_sharded_online_dpo_matches_one_process(tmp_path, tmp_path_factory, world):
    two, _ = online_dpo_against_one_process(tmp_path, tmp_path_factory, world, "fsdp")
    for r in (1, 2):
        if (two / f"round-{r}" / "checkpoints").exists():
            assert_sharded_checkpoint(two / f"round-{r}", 2)


RESUMABLE = {  # the other RL estimators and online-dpo share these code paths (Run, checkpoint, sharding)
    "sft": ("sft", lambda w: ["--model", str(w["model"]), "--data", str(w["sft"]), "--dropout-off", "false"],
            "loss"),
    "reward": ("reward", lambda w: ["--model", str(w["model"]), "--data", str(w["pairs"])], "loss"),
    "dpo": ("dpo", lambda w: ["--model", str(w["model"]), "--data", str(w["pairs"])], "loss"),
    "kto": ("dpo", lambda w: ["--model", str(w["model"]), "--data", str(w["pairs"]), "--loss", "kto"], "loss"),
    "grpo": ("ppo", lambda w: ["--model", str(w["model"]), "--reward-model", str(w["rm"]), "--data",
                               str(w["prompts"]), "--advantage", "grpo", "--samples-per-prompt", "2",
                               "--max-new-tokens", "8"], "policy_loss"),
}


@pytest.mark.slow
# kto is dpo's stage with another loss (the same Run, checkpoint and shards): sft, reward, dpo and grpo cover them
@pytest.mark.parametrize("case", ["sft", "reward", "dpo", "grpo"])
def test_sharded_resume_after_sigkill_reproduces_the_run(tmp_path, world, case):
    stage, args, loss = RESUMABLE[case]
    common = [*args(world), *COMMON, "--max-steps", "6", "--save-every", "2", "--batch-size", "4"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    ok(launch("fsdp", stage, [*common, "--output-dir", str(full)]))
    proc = launch("fsdp", stage, [*common, "--output-dir", str(killed)], env={"RLHFKIT_KILL_AFTER_STEP": "5"})
    assert proc.returncode != 0 and not (killed / "model.safetensors").exists()
    assert sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step-")) == \
        ["step-2", "step-4"]
    if case == "sft":
        # a damaged shard (process 1's, of the newest checkpoint) fails its checksum: resume falls back to step 2
        shard = killed / "checkpoints" / "step-4" / "sharded" / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        # a sharded checkpoint is not resumed by a replicated run: one error, naming the fix
        refused = launch("ddp", stage, [*common, "--output-dir", str(killed), "--resume"])
        assert refused.returncode != 0 and "failed (exitcode: 2)" in refused.stderr  # our error's exit status
        assert "was written by a sharded (FSDP) run and this run is unsharded; resume with the same --sharding" \
            in refused.stderr
        assert "rlhfkit/train" not in refused.stderr  # no traceback of ours (the launcher prints its own)
    resumed = launch("fsdp", stage, [*common, "--output-dir", str(killed), "--resume"])
    ok(resumed)
    if case == "sft":
        assert "skipping damaged checkpoint" in resumed.stderr and "__1_0.distcp does not match its checksum" \
            in resumed.stderr and "resumed from" in resumed.stderr and "step-2 (step 2)" in resumed.stderr
    assert_same(full, killed, loss, exact=True)


# ------------------------------------------------------------------------------------- gradient checkpointing
def _in_process(stage: str, world: dict[str, Path], out: Path, checkpointing: bool) -> Path:
    common = dict(output_dir=str(out), max_steps=3, batch_size=4, learning_rate=3e-3, seed=1, report_to=["jsonl"],
                  progress=False, gradient_checkpointing=checkpointing)
    if stage == "sft":
        from rlhfkit.policy import sft

        sft.main(sft.SFTConfig(model=str(world["model"]), data=str(world["sft"]), **common))
    elif stage == "reward":
        from rlhfkit.reward import train

        train.main(train.RewardConfig(model=str(world["model"]), data=str(world["pairs"]), **common))
    elif stage == "dpo":
        from rlhfkit.policy import dpo

        dpo.main(dpo.DPOConfig(model=str(world["model"]), data=str(world["pairs"]), **common))
    else:
        from rlhfkit.policy import ppo

        ppo.main(ppo.PPOConfig(model=str(world["model"]), reward_model=str(world["rm"]), data=str(world["prompts"]),
                               advantage=stage, max_new_tokens=8, **common))
    return out


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "gae"])
def test_gradient_checkpointing_takes_the_same_steps(tmp_path, world, stage, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaMLP

    calls = {"n": 0}  # the MLP inside each layer (the layer's own forward carries the checkpointing wrapper)
    forward = LlamaMLP.forward

    def counted(self, *args, **kwargs):
        calls["n"] += self.training and torch.is_grad_enabled()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaMLP, "forward", counted)
    plain = _in_process(stage, world, tmp_path / "plain", False)
    plain_calls, calls["n"] = calls["n"], 0
    ckpt = _in_process(stage, world, tmp_path / "ckpt", True)
    # each layer's forward runs again in backward: the activations were recomputed, not stored
    assert calls["n"] == 2 * plain_calls > 0
    assert_same(plain, ckpt, "policy_loss" if stage == "gae" else "loss")
    from rlhfkit.config import load_yaml

    assert load_yaml(ckpt / "config.yaml")["gradient_checkpointing"] is True


def test_sharding_fsdp_in_one_process_trains_unsharded(tmp_path, world):
    from rlhfkit.policy import sft

    common = dict(model=str(world["model"]), data=str(world["sft"]), max_steps=2, batch_size=4, seed=1,
                  report_to=["jsonl"], progress=False, save_every=2)
    sft.main(sft.SFTConfig(output_dir=str(tmp_path / "plain"), **common))
    sft.main(sft.SFTConfig(output_dir=str(tmp_path / "fsdp"), sharding="fsdp", **common))
    assert_same(tmp_path / "plain", tmp_path / "fsdp", "loss", exact=True)
    assert (tmp_path / "fsdp" / "checkpoints" / "step-2" / "optimizer.pt").exists()  # nothing to shard over
