"""Training runs under faults and bad input: restarting a run stopped before its first checkpoint, damaged
checkpoints (checksums, fallback), resume that would silently do the wrong thing, config values checked where
they are read. Each test failed before its fix."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import sft_rows, write_jsonl
from policy.test_sft import cfg, weights

from rlhfkit.config import parse_args
from rlhfkit.errors import ConfigError, DataError, UserError
from rlhfkit.policy import sft
from rlhfkit.train import read_metrics
from rlhfkit.train.checkpoint import MANIFEST, checkpoint_problem


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ item 8: early deaths
def test_a_run_stopped_by_a_data_error_restarts_with_or_without_resume(tmp_path, tiny_model, sft_file):
    """The run directory is written before the data is read: a bad file left a run that neither --resume
    ("start again without --resume") nor a plain rerun ("pass --resume") would start."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi"}])
    out = tmp_path / "run"
    with pytest.raises(DataError):
        sft.main(cfg(tiny_model, bad, out))
    assert (out / "config.yaml").exists()
    sft.main(cfg(tiny_model, sft_file, out, max_steps=2))  # fixed data, no flag
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2]
    other = tmp_path / "run2"
    with pytest.raises(DataError):
        sft.main(cfg(tiny_model, bad, other))
    sft.main(cfg(tiny_model, sft_file, other, max_steps=2, resume=True))  # or with --resume
    assert same_weights(weights(out), weights(other))


def test_a_finished_run_is_still_protected(tmp_path, tiny_model, sft_file):
    out = tmp_path / "run"
    sft.main(cfg(tiny_model, sft_file, out, max_steps=1))
    with pytest.raises(UserError, match="already holds a sft run"):
        sft.main(cfg(tiny_model, sft_file, out, max_steps=1))
    with pytest.raises(UserError, match="finished run with no checkpoint"):
        sft.main(cfg(tiny_model, sft_file, out, max_steps=2, resume=True))


# ------------------------------------------------------------------------------- item 9: damaged checkpoints
@pytest.fixture()
def checkpointed(tmp_path, tiny_model, sft_file):
    """A 6-step run with checkpoints at 2, 4 and 6, and a copy of its final weights."""
    out = tmp_path / "run"
    sft.main(cfg(tiny_model, sft_file, out, save_every=2, keep_checkpoints=3))
    return out, weights(out)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_intact_one(checkpointed, tiny_model, sft_file,
                                                                           damage, caplog):
    out, final = checkpointed
    target = out / "checkpoints" / "step-6" / "model" / "model.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "flip":  # one bit in the weights: loaded silently before
        data[-7] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        target.unlink()
    assert checkpoint_problem(target.parents[1]) is not None
    with caplog.at_level("WARNING"):
        sft.main(cfg(tiny_model, sft_file, out, save_every=2, keep_checkpoints=3, resume=True))
    assert "skipping damaged checkpoint" in caplog.text and "step-6" in caplog.text
    assert same_weights(weights(out), final)  # resumed from step 4 and redid 5 and 6: the same weights


def test_every_checkpoint_damaged_is_one_clear_error(checkpointed, tiny_model, sft_file):
    out, _ = checkpointed
    for ckpt in (out / "checkpoints").iterdir():
        (ckpt / "optimizer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="no intact checkpoint.*--overwrite"):
        sft.main(cfg(tiny_model, sft_file, out, save_every=2, resume=True))


def test_the_manifest_lists_every_file_with_its_checksum(checkpointed):
    out, _ = checkpointed
    ckpt = out / "checkpoints" / "step-4"
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert set(files) == on_disk and all(len(v["sha256"]) == 64 for v in files.values())
    assert checkpoint_problem(ckpt) is None


# ---------------------------------------------------------------------------------- item 10: silent resumes
def test_max_steps_below_the_checkpoint_is_refused(checkpointed, tiny_model, sft_file):
    out, final = checkpointed
    with pytest.raises(UserError, match="step 6, past --max-steps 3"):
        sft.main(cfg(tiny_model, sft_file, out, max_steps=3, save_every=2, resume=True))
    assert same_weights(weights(out), final)  # the longer run's model was not saved as the shorter run


def test_the_same_directory_relative_or_absolute_resumes(tmp_path, tiny_model, sft_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sft.main(cfg(tiny_model, sft_file, "./r1", max_steps=2, save_every=2))
    sft.main(cfg(tiny_model, sft_file, str(tmp_path / "r1"), max_steps=4, save_every=2, resume=True))
    assert [m["step"] for m in read_metrics(tmp_path / "r1" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_extending_max_steps_follows_the_longer_runs_schedule(tmp_path, tiny_model, sft_file):
    """Raising --max-steps on resume: from the resumed step on, the learning rate is the one a run started with
    the new max_steps has (before: the old schedule's end, lr 0, for one step)."""
    short, long_ = tmp_path / "short", tmp_path / "long"
    sft.main(cfg(tiny_model, sft_file, short, max_steps=4, save_every=4))
    sft.main(cfg(tiny_model, sft_file, short, max_steps=8, save_every=4, resume=True))
    sft.main(cfg(tiny_model, sft_file, long_, max_steps=8))
    lr_short = [m["lr"] for m in read_metrics(short / "metrics.jsonl")]
    lr_long = [m["lr"] for m in read_metrics(long_ / "metrics.jsonl")]
    assert lr_short[4:] == pytest.approx(lr_long[4:])
    assert lr_short[4] > 0


# ---------------------------------------------------------------------------- item 11: values where read
@pytest.mark.parametrize("flags,words", [
    (["--learning-rate", "nan"], "finite"),
    (["--learning-rate", "inf"], "finite"),
    (["--learning-rate", "-1e-3"], "learning_rate must be a positive"),
    (["--adam-beta1", "1.0"], "adam_beta1 must be in"),
    (["--adam-beta2", "-0.1"], "adam_beta2 must be in"),
    (["--adam-eps", "-1e-8"], "adam_eps must be 0 or more"),
    (["--weight-decay", "-0.1"], "weight_decay must be 0 or more"),
    (["--lora.r", "0"], "lora.r must be at least 1"),
    (["--lora.dropout", "2"], "lora.dropout must be in"),
    (["--seed", str(2**70)], "seed must be in"),
    (["--warmup-steps", "50", "--max-steps", "10"], "warmup_steps"),
    (["--resume", "--overwrite"], "contradict"),
])
def test_bad_training_values_are_one_line_naming_the_flag(flags, words):
    base = ["--model", "m", "--data", "d.jsonl", "--output-dir", "o"]
    with pytest.raises(ConfigError, match=words):
        parse_args(sft.SFTConfig, base + flags, prog="rlhfkit sft").validate()


def test_stage_values_checked_where_read():
    from rlhfkit.policy.dpo import DPOConfig
    from rlhfkit.reward.train import RewardConfig

    base = ["--model", "m", "--data", "d.jsonl", "--output-dir", "o"]
    with pytest.raises(ConfigError, match="finite"):
        parse_args(DPOConfig, base + ["--beta", "nan"], prog="rlhfkit dpo")
    with pytest.raises(ConfigError, match="finite"):
        parse_args(RewardConfig, base + ["--center-eta", "nan"], prog="rlhfkit reward")
    with pytest.raises(ConfigError, match="--normalize-prompts"):
        parse_args(RewardConfig, base + ["--normalize-policy", "p"], prog="rlhfkit reward").validate()


def test_output_dir_that_is_a_file(tmp_path, tiny_model, sft_file):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        sft.main(cfg(tiny_model, sft_file, tmp_path / "file"))


def test_unreadable_data_files_are_named(tmp_path, tiny_model):
    from rlhfkit.data.readers import read_rows

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_rows(str(latin))
    broken = tmp_path / "broken.parquet"
    write_jsonl(tmp_path / "rows.jsonl", sft_rows(4))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(sft_rows(4)), broken)
    broken.write_bytes(broken.read_bytes()[:40])  # a download cut short
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_rows(str(broken))
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match="too deeply"):
        read_rows(str(deep))


def test_missing_tokenizer_files_name_what_to_save(tmp_path, tiny_model):
    from rlhfkit.models import load_tokenizer

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    for f in bare.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            f.unlink()
    with pytest.raises(UserError, match="holds no tokenizer.*save_pretrained"):
        load_tokenizer(str(bare))
