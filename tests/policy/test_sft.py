"""End-to-end SFT on a tiny locally built model: artefacts, learning, equivalences, exact resume."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import interrupt_after, write_jsonl
from rlhfkit.config import LoraConfig, load_config
from rlhfkit.errors import UserError
from rlhfkit.policy import sft
from rlhfkit.train import read_metrics
from rlhfkit.train.run import KILL_ENV, Run


def cfg(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), output_dir=str(out), max_steps=6, batch_size=4,
                learning_rate=3e-3, report_to=["jsonl"], progress=False, seed=1)
    base.update(kw)
    return sft.SFTConfig(**base)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def assert_same_run(a: Path, b: Path, exact: bool = True) -> None:
    """Per-step losses and final weights of two runs; bitwise when exact."""
    la = [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(a / "metrics.jsonl")]
    lb = [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(b / "metrics.jsonl")]
    assert [s for s, *_ in la] == [s for s, *_ in lb], "different logged steps"
    if exact:
        assert la == lb, "per-step losses differ"
    else:
        flat_a = [v for x in la for v in x[1:]]
        flat_b = [v for x in lb for v in x[1:]]
        assert flat_a == pytest.approx(flat_b, rel=1e-4, abs=1e-5), "per-step losses differ"
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        if exact:
            assert torch.equal(wa[key], wb[key]), f"weights differ at {key}"
        else:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)


def test_sft_writes_the_run_directory_and_learns(tmp_path, tiny_model, sft_file):
    out = tmp_path / "run"
    summary = sft.main(cfg(tiny_model, sft_file, out, max_steps=30, save_every=10, eval_every=10,
                           report_to=["jsonl", "tensorboard"]))
    assert (out / "config.yaml").exists() and load_config(sft.SFTConfig, out / "config.yaml").max_steps == 30
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert [m["step"] for m in metrics if "eval/loss" in m] == [10, 20, 30]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5  # it learns
    assert metrics[-1]["eval/loss"] < metrics[9]["eval/loss"]
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-20", "step-30"]  # keep 2
    assert any((out / "tensorboard").iterdir())
    assert summary["held_out_rows"] == 3 and summary["train_rows"] == 45
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size >= 10


def test_existing_run_is_not_overwritten_without_a_flag(tmp_path, tiny_model, sft_file):
    out = tmp_path / "run"
    sft.main(cfg(tiny_model, sft_file, out, max_steps=1))
    with pytest.raises(UserError, match="already holds a sft run; pass --resume"):
        sft.main(cfg(tiny_model, sft_file, out, max_steps=1))
    sft.main(cfg(tiny_model, sft_file, out, max_steps=2, overwrite=True))
    assert len(read_metrics(out / "metrics.jsonl")) == 2


def test_resume_refuses_a_changed_config(tmp_path, tiny_model, sft_file):
    out = tmp_path / "run"
    sft.main(cfg(tiny_model, sft_file, out, max_steps=2, save_every=2))
    with pytest.raises(UserError, match=r"learning_rate: 0.003 -> 0.1"):
        sft.main(cfg(tiny_model, sft_file, out, max_steps=4, resume=True, learning_rate=0.1))


def test_gradient_accumulation_1x8_equals_8x1(tmp_path, tiny_model, sft_file):
    one = tmp_path / "1x8"
    eight = tmp_path / "8x1"
    sft.main(cfg(tiny_model, sft_file, one, batch_size=8, grad_accum=1, max_steps=4))
    sft.main(cfg(tiny_model, sft_file, eight, batch_size=1, grad_accum=8, max_steps=4))
    assert_same_run(one, eight, exact=False)


def test_packing_trains_on_the_same_tokens(tmp_path, tiny_model, sft_file):
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    sft.main(cfg(tiny_model, sft_file, plain, max_steps=1, batch_size=48, eval_fraction=0.0))
    sft.main(cfg(tiny_model, sft_file, packed, max_steps=1, batch_size=1, packing=True, max_length=2048,
                 eval_fraction=0.0))
    a, b = read_metrics(plain / "metrics.jsonl")[0], read_metrics(packed / "metrics.jsonl")[0]
    assert a["tokens"] == b["tokens"]  # every example in one packed row: the same loss tokens
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_padding_free_micro_batches_take_the_padded_steps(tmp_path, tiny_model, sft_file):
    """Each micro-batch packed into rows as wide as its longest example: the same batches, losses and weights as
    right padding, up to float rounding."""
    from rlhfkit.data.sft import read_sft_examples
    from rlhfkit.models import load_tokenizer

    from helpers import sft_rows

    # answers of very different lengths, so that short examples share rows
    rows = [dict(r, completion=" ".join([r["completion"]] * (1 + i % 4))) for i, r in enumerate(sft_rows(48))]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    examples, _ = read_sft_examples(str(data), load_tokenizer(str(tiny_model)), 512)
    batch = sft.collate_padding_free(examples[:8], 0)
    assert batch["attention_mask"].dim() == 4 and batch["input_ids"].shape[0] < 8  # rows were saved
    padded, packed = tmp_path / "padded", tmp_path / "packed"
    sft.main(cfg(tiny_model, data, padded, max_steps=4, batch_size=8, padding_free=False, eval_fraction=0.0))
    sft.main(cfg(tiny_model, data, packed, max_steps=4, batch_size=8, padding_free=True, eval_fraction=0.0))
    a, b = read_metrics(padded / "metrics.jsonl"), read_metrics(packed / "metrics.jsonl")
    assert [m["tokens"] for m in a] == [m["tokens"] for m in b]
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], rel=1e-5)
    wa, wb = weights(padded), weights(packed)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4  # Adam at lr 3e-3: rounding-level


def test_lora_sft_trains_only_the_adapter_and_saves_a_plain_model(tmp_path, tiny_model, sft_file):
    out = tmp_path / "lora"
    sft.main(cfg(tiny_model, sft_file, out, max_steps=3, save_every=3, lora=LoraConfig(enabled=True, r=4)))
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "checkpoints" / "step-3" / "model" / "adapter_model.safetensors").exists()
    base = load_file(str(tiny_model / "model.safetensors"))
    merged = weights(out)
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("proj" in k for k in changed)  # only adapted projections moved after merging


def _cli(args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "rlhfkit", "sft", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def _resume_args(model, data, out):
    return ["--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", "8",
            "--save-every", "3", "--batch-size", "4", "--learning-rate", "3e-3", "--seed", "1",
            "--dropout-off", "false", "--report-to", "jsonl", "--progress", "false"]


def test_resume_after_sigkill_is_exact(tmp_path, tiny_dropout_model, sft_file):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _cli(_resume_args(tiny_dropout_model, sft_file, full)).returncode == 0
    # SIGKILL right after step 7: the newest complete checkpoint is step 6, step 7 is lost work
    proc = _cli(_resume_args(tiny_dropout_model, sft_file, killed), {KILL_ENV: "7"})
    assert proc.returncode == -9, proc.stderr
    assert [p.name for p in sorted((killed / "checkpoints").iterdir())] == ["step-3", "step-6"]
    assert max(m["step"] for m in read_metrics(killed / "metrics.jsonl")) == 7
    proc = _cli(_resume_args(tiny_dropout_model, sft_file, killed) + ["--resume"])
    assert proc.returncode == 0, proc.stderr
    assert_same_run(full, killed, exact=True)


def test_the_resume_check_catches_a_resume_that_forgets_the_rng(tmp_path, tiny_dropout_model, sft_file, monkeypatch):
    """Same procedure in-process, but the resume does not restore RNG state: dropout masks then differ
    after the checkpoint, and assert_same_run must notice."""
    full, broken = tmp_path / "full", tmp_path / "broken"
    kw = dict(max_steps=8, save_every=3, dropout_off=False)
    sft.main(cfg(tiny_dropout_model, sft_file, full, **kw))

    interrupt_after(sft.main, cfg(tiny_dropout_model, sft_file, broken, **kw), step=7)
    original_resume = Run.resume
    monkeypatch.setattr(Run, "resume", lambda self, m, o, s, restore_rng=True: original_resume(self, m, o, s, False))
    sft.main(cfg(tiny_dropout_model, sft_file, broken, resume=True, **kw))
    with pytest.raises(AssertionError, match="per-step losses differ"):
        assert_same_run(full, broken, exact=True)
    # and with the RNG restored the very same procedure passes
    monkeypatch.setattr(Run, "resume", original_resume)
    fixed = tmp_path / "fixed"
    interrupt_after(sft.main, cfg(tiny_dropout_model, sft_file, fixed, **kw), step=7)
    sft.main(cfg(tiny_dropout_model, sft_file, fixed, resume=True, **kw))
    assert_same_run(full, fixed, exact=True)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_model, sft_file):
    """accelerate launch with 2 CPU processes (gloo) and the same global batch reproduces the 1-process curve."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate's launcher is installed with the package"
    common = ["--model", str(tiny_model), "--data", str(sft_file), "--max-steps", "5", "--learning-rate", "3e-3",
              "--seed", "1", "--report-to", "jsonl", "--progress", "false", "--save-every", "5"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert _cli(common + ["--output-dir", str(one), "--batch-size", "8"]).returncode == 0
    proc = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlhfkit", "sft", *common,
         "--output-dir", str(two), "--batch-size", "4"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = two / "checkpoints" / "step-5"
    assert (ckpt / "rng-rank0.pt").exists() and (ckpt / "rng-rank1.pt").exists()  # really two processes
    assert_same_run(one, two, exact=False)


def test_nan_stops_the_run_naming_step_and_metric_before_corrupting_weights(tmp_path, tiny_model, sft_file):
    import shutil

    from safetensors.torch import save_file

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    state = load_file(str(broken / "model.safetensors"))
    key = next(k for k in state if "layers.1.mlp.down_proj" in k)
    state[key] = torch.full_like(state[key], float("inf"))  # one poisoned layer: the loss becomes NaN
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    proc = _cli(["--model", str(broken), "--data", str(sft_file), "--output-dir", str(tmp_path / "run"),
                 "--max-steps", "3", "--progress", "false", "--report-to", "jsonl"])
    assert proc.returncode == 2
    assert "step 1: metric 'loss' is nan" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()  # no final model written from a broken run


@pytest.mark.slow
def test_compile_takes_the_same_steps_and_saves_the_same_checkpoint_format(tmp_path, tiny_model, sft_file):
    """TrainConfig.compile: torch.compile of the forward changes the kernels, not the step, the weights' names or
    the saved format."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    sft.main(cfg(tiny_model, sft_file, eager, max_steps=3, eval_fraction=0.0))
    sft.main(cfg(tiny_model, sft_file, compiled, max_steps=3, eval_fraction=0.0, compile=True, save_every=3))
    la, lb = read_metrics(eager / "metrics.jsonl"), read_metrics(compiled / "metrics.jsonl")
    assert [m["loss"] for m in la] == pytest.approx([m["loss"] for m in lb], rel=1e-5)
    wa, wb = weights(eager), weights(compiled)
    assert wa.keys() == wb.keys()
    # Adam turns rounding-level gradient differences into weight differences far below one step (lr 3e-3)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
    assert (compiled / "checkpoints" / "step-3").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(compiled)  # no "_orig_mod." prefixes
