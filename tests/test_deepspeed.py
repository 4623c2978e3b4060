"""DeepSpeed ZeRO-2 and ZeRO-3 for every stage, launched the way users launch it: `accelerate launch --config_file
examples/accelerate/zero2.yaml` (or zero3.yaml) with 2 CPU processes (gloo; DeepSpeed's CPU accelerator).

- sft (also with LoRA and with gradient checkpointing), reward, dpo, kto, and ZeRO-Offload: the 2-process ZeRO run
  equals one process at the same global batch (losses and grad norms within 1e-4 relative, final weights), and
  the final model loads with plain transformers; online DPO too, round by round;
- ppo (gae, grpo, rloo; the frozen networks partitioned or replicated; the KL early stop): compared with the
  replicated (DDP) run of the same 2 processes (each process samples from its own random stream), the held-out
  evaluation included (ZeRO-3 gathers the policy for sampling and the reward models for text scoring);
- resume after SIGKILL reproduces the uninterrupted run exactly, falls back past a damaged partition, and a
  DeepSpeed checkpoint is not resumed by another layout;
- what this integration does not do is refused with one error naming the alternative."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit.train import read_metrics
from test_fsdp import (  # noqa: F401  (world: the fixture)
    COMMON, OFFLINE, RESUMABLE, assert_same, assert_same_rl_metrics, launch, ok, online_dpo_against_one_process,
    ppo_args, reference, world,
)

pytest.importorskip("deepspeed")


def assert_zero_checkpoint(run: Path, step: int, stage: int) -> None:
    ckpt = run / "checkpoints" / f"step-{step}"
    files = sorted(p.name for p in (ckpt / "deepspeed" / "state").iterdir())
    # each process wrote its optimizer partition (and, under ZeRO-3, its weight partition)
    optim = ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    model = (["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
             if stage == 3 else ["mp_rank_00_model_states.pt"])
    assert files == sorted(model + optim), files
    assert not (ckpt / "optimizer.pt").exists() and not (ckpt / "model").exists()
    assert "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt" in \
        json.loads((ckpt / "manifest.json").read_text())["files"]


CASES = {**OFFLINE, "sft-checkpointing": ("sft", lambda w: [*OFFLINE["sft"][1](w), "--gradient-checkpointing",
                                                             "true"], "loss", "causal")}
ZERO_OFFLINE = [("zero3", "sft"), ("zero3", "sft-lora"), ("zero3", "sft-checkpointing"),
                # ZeRO-Offload: the optimizer (and under ZeRO-3 the weights) on the CPU, DeepSpeed's CPU AdamW
                ("zero2-offload", "sft"), ("zero3-offload", "dpo"), ("zero3", "reward"), ("zero3", "dpo"), ("zero3", "kto"),
                ("zero2", "sft"), ("zero2", "reward"), ("zero2", "dpo")]


@pytest.mark.slow
@pytest.mark.parametrize("config,case", ZERO_OFFLINE)
def test_zero_two_processes_match_one(tmp_path, tmp_path_factory, world, config, case):
    stage, args, loss, kind = CASES[case]
    common = [*args(world), *COMMON, "--max-steps", "4", "--save-every", "4"]
    two = tmp_path / "two"
    one = reference(tmp_path_factory, "single", stage, [*common, "--batch-size", "8"])
    zero_stage = int(config[4])
    if config.endswith("-offload"):  # the shipped config with its offload devices set to the CPU
        from test_fsdp import CONFIGS

        text = (CONFIGS / f"zero{zero_stage}.yaml").read_text().replace("offload_optimizer_device: none",
                                                                        "offload_optimizer_device: cpu")
        if zero_stage == 3:
            text = text.replace("offload_param_device: none", "offload_param_device: cpu")
        (tmp_path / "offload.yaml").write_text(text)
        config = str(tmp_path / "offload")
    proc = launch(config, stage, [*common, "--output-dir", str(two), "--batch-size", "4"])
    ok(proc)
    assert f"DeepSpeed ZeRO-{zero_stage} over 2 processes" in proc.stderr
    assert_zero_checkpoint(two, 4, zero_stage)
    assert_same(one, two, loss)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    loader = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    loader.from_pretrained(two)  # full weights, no rlhfkit or DeepSpeed needed
    if case == "sft-lora":
        assert (two / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("config,advantage,extra,frozen", [
    ("zero3", "gae", [], []),  # the frozen networks partitioned (auto)
    ("zero2", "grpo", [], []),  # replicated (auto)
    ("zero2", "rloo", [], ["--frozen-models", "shard"]),
    ("zero3", "grpo", [], ["--frozen-models", "replicate"]),
    # PPO's KL early stop discards a minibatch's gradients (already reduced into the partitions) unapplied
    ("zero2", "gae", ["--ppo-epochs", "3", "--target-kl", "1e-6"], []),
])
def test_zero_ppo_matches_replicated(tmp_path, tmp_path_factory, world, config, advantage, extra, frozen):
    """The held-out evaluation (scored from texts, so partitioned reward models are gathered for it) every
    step."""
    common = [*extra, *ppo_args(world, advantage)]
    zero = tmp_path / "zero"
    ddp = reference(tmp_path_factory, "ddp", "ppo", common)
    proc = launch(config, "ppo", [*common, "--output-dir", str(zero), *frozen])
    ok(proc)
    # the reference and reward models partitioned (ZeRO-3 inference) under ZeRO-3 by default, or when asked
    partitioned = "frozen networks (reference, reward models) partitioned over 2 processes" in proc.stderr
    asked = frozen[1:] or ["auto"]
    assert partitioned == (asked == ["shard"] or (config == "zero3" and asked == ["auto"]))
    assert_zero_checkpoint(zero, 3, int(config[-1]))
    assert_same(ddp, zero, "policy_loss")
    assert_same_rl_metrics(ddp, zero, advantage)
    if extra:
        assert all(m["early_stopped"] == 1.0 for m in read_metrics(zero / "metrics.jsonl"))


@pytest.mark.slow
def test_zero3_online_dpo_matches_one_process(tmp_path, tmp_path_factory, world):
    _, proc = online_dpo_against_one_process(tmp_path, tmp_path_factory, world, "zero3")
    assert proc.stderr.count("DeepSpeed ZeRO-3 over 2 processes") == 2  # every round's run, not only the first


@pytest.mark.slow
@pytest.mark.parametrize("config,case", [("zero3", "sft"), ("zero2", "dpo"), ("zero3", "grpo")])
def test_zero_resume_after_sigkill_reproduces_the_run(tmp_path, world, config, case):
    stage, args, loss = RESUMABLE[case]
    common = [*args(world), *COMMON, "--max-steps", "6", "--save-every", "2", "--batch-size", "4"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    ok(launch(config, stage, [*common, "--output-dir", str(full)]))
    proc = launch(config, stage, [*common, "--output-dir", str(killed)], env={"RLHFKIT_KILL_AFTER_STEP": "5"})
    assert proc.returncode != 0 and not (killed / "model.safetensors").exists()
    assert sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step-")) == \
        ["step-2", "step-4"]
    if case == "sft":
        # process 1's partition of the newest checkpoint damaged: its checksum fails, resume falls back to step 2
        part = killed / "checkpoints" / "step-4" / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        data = bytearray(part.read_bytes())
        data[len(data) // 2] ^= 0xFF
        part.write_bytes(bytes(data))
        # a DeepSpeed checkpoint is not resumed by an FSDP run: one error, naming the fix
        refused = launch("fsdp", stage, [*common, "--output-dir", str(killed), "--resume"])
        assert refused.returncode != 0 and "failed (exitcode: 2)" in refused.stderr
        assert "was written by a DeepSpeed ZeRO run and this run is sharded (FSDP); resume with the same " \
               "--sharding" in refused.stderr
        assert "rlhfkit/train" not in refused.stderr
    resumed = launch(config, stage, [*common, "--output-dir", str(killed), "--resume"])
    ok(resumed)
    if case == "sft":
        assert "skipping damaged checkpoint" in resumed.stderr and "optim_states.pt does not match its checksum" \
            in resumed.stderr and "step-2 (step 2)" in resumed.stderr
    assert_same(full, killed, loss, exact=True)


# ------------------------------------------------------------------------------------------ refusals (quick)
def _sft(world: dict[str, Path], out: Path, **kwargs):
    from rlhfkit.policy import sft

    return sft.main(sft.SFTConfig(model=str(world["model"]), data=str(world["sft"]), output_dir=str(out),
                                  max_steps=1, report_to=["jsonl"], progress=False, **kwargs))


@pytest.mark.parametrize("kwargs,message", [
    (dict(precision="fp16"), "--precision fp16 is not supported under DeepSpeed"),
    (dict(compile=True), "--compile is not supported under DeepSpeed ZeRO"),
    (dict(sharding="fsdp"), "--sharding fsdp contradicts the launch config"),
])
def test_what_zero_does_not_do_is_refused_before_training(tmp_path, world, monkeypatch, kwargs, message):
    from rlhfkit.errors import UserError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` exports for zero3.yaml
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(UserError, match=message):
        _sft(world, tmp_path / "r", **kwargs)
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_zero_stage_1_and_a_missing_deepspeed_are_refused_naming_the_fix(tmp_path, world, monkeypatch):
    import sys

    from rlhfkit.errors import UserError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    with pytest.raises(UserError, match="rlhfkit runs stages 2 and 3.*For stage 0/1 use examples/accelerate/ddp"):
        _sft(world, tmp_path / "a")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed now raises ImportError
    with pytest.raises(UserError, match=r"deepspeed is not installed; pip install 'rlhfkit\[deepspeed\]'"):
        _sft(world, tmp_path / "b")


def test_a_deepspeed_json_config_gives_its_zero_section(tmp_path, monkeypatch):
    from rlhfkit.train import zero

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu"}, "stage3_prefetch_bucket_size": 1000}}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    assert zero.stage_wanted("auto") == 3
    section = zero.zero_section_from_launcher()
    assert section["offload_optimizer"] == {"device": "cpu"} and section["stage3_prefetch_bucket_size"] == 1000

    class Cfg:
        max_grad_norm = 0.5

    config = zero.engine_config(Cfg(), 3, section)
    # rlhfkit's own loop: one backward per micro-batch, step() is the boundary, clipping from --max-grad-norm
    assert config["managed_gradient_accumulation"] is False and config["gradient_accumulation_steps"] == 1
    assert config["gradient_clipping"] == 0.5 and config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    path.write_text("{not json")
    from rlhfkit.errors import UserError

    with pytest.raises(UserError, match="deepspeed_config_file .* could not be read as JSON"):
        zero.zero_section_from_launcher()
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    assert zero.zero_section_from_launcher() == {"stage": 2, "offload_optimizer": {"device": "cpu"}}


def test_zero_in_one_process_trains_unsharded(tmp_path, world):
    common = dict(batch_size=4, seed=1, save_every=1)
    _sft(world, tmp_path / "plain", **common)
    _sft(world, tmp_path / "zero", sharding="zero3", **common)
    assert_same(tmp_path / "plain", tmp_path / "zero", "loss", exact=True)
    assert (tmp_path / "zero" / "checkpoints" / "step-1" / "optimizer.pt").exists()  # nothing to partition over
