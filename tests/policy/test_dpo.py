"""End-to-end DPO family on a tiny locally built model: artefacts, learning, the reference cache, equivalences,
exact resume, LoRA with the adapter as reference, every loss variant (KTO through `dpo --loss kto`, which
policy/kto.py trains), and the name -> loss table against hand arithmetic."""

import math
import os
import random
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhfkit.config import LoraConfig, load_config
from rlhfkit.errors import ConfigError, DataError, UserError
from rlhfkit.policy import dpo, kto, reference
from rlhfkit.train import read_metrics
from rlhfkit.train.run import KILL_ENV
from helpers import interrupt_after, write_jsonl

LOG2 = math.log(2.0)


def sum_pairs(n: int, seed: int = 0) -> list[dict]:
    """Learnable preferences: the chosen response states the right sum, the rejected one a wrong sum."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        wrong = (a + b + rng.randint(1, 5)) % 19
        rows.append({"prompt": f"what is {a} plus {b} ?", "chosen": f"{a} plus {b} is {a + b} .",
                     "rejected": f"{a} plus {b} is {wrong} ."})
    return rows


def kto_rows(n: int, seed: int = 0) -> list[dict]:
    """Unpaired thumbs-up/down: right sums are desirable, wrong ones undesirable (4 of 7 desirable)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        good = i % 7 < 4
        answer = a + b if good else a + b + 1
        rows.append({"prompt": f"what is {a} plus {b} ?", "completion": f"{a} plus {b} is {answer} .", "label": good})
    return rows


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("dpo-data") / "pairs.jsonl", sum_pairs(40))


@pytest.fixture(scope="module")
def held_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("dpo-data") / "held.jsonl", sum_pairs(16, seed=99))


@pytest.fixture(scope="module")
def kto_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("dpo-data") / "kto.jsonl", kto_rows(28))


def cfg(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), output_dir=str(out), max_steps=4, batch_size=4,
                learning_rate=3e-3, report_to=["jsonl"], progress=False, seed=1)
    base.update(kw)
    return dpo.DPOConfig(**base)


def metrics_of(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl")


def assert_same_run(a: Path, b: Path, exact: bool = True) -> None:
    """Per-step losses, gradient norms and final weights of two runs; bitwise when exact."""
    la = [(m["step"], m["loss"], m["grad_norm"]) for m in metrics_of(a)]
    lb = [(m["step"], m["loss"], m["grad_norm"]) for m in metrics_of(b)]
    assert [s for s, *_ in la] == [s for s, *_ in lb], "different logged steps"
    if exact:
        assert la == lb, "per-step losses differ"
    else:
        assert [v for x in la for v in x[1:]] == pytest.approx([v for x in lb for v in x[1:]], rel=1e-4, abs=1e-6)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        if exact:
            assert torch.equal(wa[key], wb[key]), f"weights differ at {key}"
        else:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------- end to end
def test_dpo_writes_the_run_directory_starts_at_log2_and_learns(tmp_path, tiny_model, pairs_file, held_file):
    out = tmp_path / "run"
    summary = dpo.main(cfg(tiny_model, pairs_file, out, max_steps=20, batch_size=8, save_every=10, eval_every=10,
                           eval_data=str(held_file)))
    assert load_config(dpo.DPOConfig, out / "config.yaml").loss == "dpo"
    metrics = metrics_of(out)
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert [m["step"] for m in metrics if "eval/loss" in m] == [10, 20]
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-10", "step-20"]
    assert (out / dpo.REF_CACHE).exists() and summary["ref_cache"] == "computed"
    first = metrics[0]
    # before the first update the policy is the reference: every log-ratio is 0, so the loss is exactly log 2;
    # a cached reference that disagreed with the policy's own forward pass would show up here
    assert first["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-6) and first["rewards/accuracy"] == 0.0
    for key in ("rewards/rejected", "logps/chosen", "logps/rejected", "grad_norm", "lr", "pairs"):
        assert key in first
    last5 = metrics[-5:]
    assert sum(m["rewards/accuracy"] for m in last5) / 5 >= 0.75
    assert sum(m["rewards/margin"] for m in last5) / 5 > 0.1
    assert sum(m["loss"] for m in last5) / 5 < LOG2 - 0.05
    end = metrics[-1]
    assert end["eval/rewards/margin"] > 0 and end["eval/rewards/accuracy"] > 0.5 and end["eval/loss"] < LOG2
    assert summary["train_pairs"] == 40 and summary["held_out_pairs"] == 16
    assert summary["eval_reward_accuracy"] == end["eval/rewards/accuracy"]
    import json

    assert json.loads((out / "summary.json").read_text())["final_loss"] == end["loss"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    start = load_file(str(tiny_model / "model.safetensors"))
    moved = {k: v for k, v in model.state_dict().items() if k in start and not torch.equal(v, start[k])}
    assert moved  # the saved model is the trained one


def test_rankings_are_expanded_into_pairs(tmp_path, tiny_model, pairs_file):
    data = write_jsonl(tmp_path / "mixed.jsonl", sum_pairs(6) + [
        {"prompt": "what is 2 plus 3 ?", "responses": ["2 plus 3 is 5 .", "2 plus 3 is 6 .", "2 plus 3 is 9 ."],
         "ranking": [0, 1, 2]},
        {"prompt": "what is 1 plus 1 ?", "responses": ["1 plus 1 is 2 .", "1 plus 1 is 3 .", "1 plus 1 is 4 ."],
         "ranking": [0, [1, 2]]},
    ])
    summary = dpo.main(cfg(tiny_model, data, tmp_path / "run", max_steps=1, eval_fraction=0.0))
    assert summary["train_rows"] == 8 and summary["train_pairs"] == 6 + 3 + 2  # C(3,2) = 3; a tie forms no pair


def test_bad_row_is_a_data_error_naming_row_and_field(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "bad.jsonl", sum_pairs(2) + [{"prompt": "what is 1 plus 1 ?", "chosen": "2"}])
    with pytest.raises(DataError, match=r"bad.jsonl, row 3, field 'rejected': missing"):
        dpo.main(cfg(tiny_model, data, tmp_path / "run"))


def test_config_errors_name_the_field(tmp_path, tiny_model, pairs_file):
    with pytest.raises(ConfigError, match="reference: adapter needs lora.enabled"):
        dpo.main(cfg(tiny_model, pairs_file, tmp_path / "a", reference="adapter"))
    with pytest.raises(ConfigError, match="label_smoothing must be in"):
        dpo.main(cfg(tiny_model, pairs_file, tmp_path / "b", loss="cdpo", label_smoothing=0.5))


# -------------------------------------------------------------------------------------------- reference cache
def test_reference_cache_is_reused_and_a_stale_one_is_recomputed(tmp_path, tiny_model, pairs_file, monkeypatch):
    out = tmp_path / "run"
    assert dpo.main(cfg(tiny_model, pairs_file, out, max_steps=1))["ref_cache"] == "computed"
    cache = out / dpo.REF_CACHE
    tables = load_file(str(cache))
    assert tables["train"].shape == (38, 2) and tables["eval"].shape == (2, 2)  # 5% of 40 rows held out

    # the rerun reads the file: shift every cached rejected log π_ref by +10 (same fingerprint), so h = 10 for
    # every pair at step 1 and the loss is −log σ(0.1 · 10) instead of log 2
    from safetensors import safe_open

    with safe_open(str(cache), framework="pt") as fh:
        metadata = fh.metadata()
    shifted = {k: v + torch.tensor([0.0, 10.0]) for k, v in tables.items()}
    save_file(shifted, str(cache), metadata=metadata)
    monkeypatch.setattr(reference, "compute_reference_logps", lambda *a, **k: pytest.fail("cache was not reused"))
    assert dpo.main(cfg(tiny_model, pairs_file, out, max_steps=1, overwrite=True))["ref_cache"] == "reused"
    assert metrics_of(out)[0]["loss"] == pytest.approx(-math.log(torch.sigmoid(torch.tensor(1.0)).item()), abs=1e-5)
    monkeypatch.undo()

    # other data (one row changed) gives another fingerprint: the cache is recomputed, and the run starts at log 2
    rows = sum_pairs(40)
    rows[5]["chosen"] = rows[5]["chosen"].replace(" .", " , ada .")
    other = write_jsonl(tmp_path / "other.jsonl", rows)
    assert dpo.main(cfg(tiny_model, other, out, max_steps=1, overwrite=True))["ref_cache"] == "computed"
    assert metrics_of(out)[0]["loss"] == pytest.approx(LOG2, abs=1e-6)  # the shifted numbers are gone
    with safe_open(str(cache), framework="pt") as fh:
        assert fh.metadata()["fingerprint"] != metadata["fingerprint"]


def test_reference_pass_scores_the_items_the_run_reads_batched_by_length_as_if_alone(tmp_path, tiny_model):
    """The reference pass scores only the training items max_steps will draw (the rest of the cache is NaN), sorts
    them by length into batches and puts the results back in item order: each row is what scoring that item
    alone gives. A longer run on the same cache extends it with the rows it lacks, leaving the others as they
    were."""
    rows = sum_pairs(30, seed=3)
    for i, row in enumerate(rows):  # lengths that differ a lot, in no particular order
        row["chosen"] = row["chosen"].replace(" .", " ." * (1 + (7 * i) % 11))
    data = write_jsonl(tmp_path / "varied.jsonl", rows)
    out = tmp_path / "ref"
    assert dpo.main(cfg(tiny_model, data, out, max_steps=2, ref_batch_size=3))["ref_cache"] == "computed"
    short = load_file(str(out / dpo.REF_CACHE))
    from rlhfkit.models import load_causal_lm, load_tokenizer
    from rlhfkit.train.sampler import EpochSampler

    tok = load_tokenizer(str(tiny_model))
    train, held, _ = dpo.load_data(cfg(tiny_model, data, out), tok)
    # the two steps' 8 items, drawn as the trainer draws them (batch 4, seed 1)
    read = sorted(EpochSampler(len(train), 1).next_indices(8))
    assert len(train) == 28 and len(read) == 8
    assert torch.isfinite(short["train"]).all(dim=1).nonzero().flatten().tolist() == read
    assert torch.isfinite(short["eval"]).all()  # held-out items: always every one
    assert dpo.main(cfg(tiny_model, data, out, max_steps=8, ref_batch_size=7, overwrite=True))["ref_cache"] == "extended"
    tables = load_file(str(out / dpo.REF_CACHE))
    assert torch.equal(tables["train"][read], short["train"][read]) and torch.isfinite(tables["train"]).all()
    model = load_causal_lm(str(tiny_model), tok).eval()
    for name, split in (("train", train), ("eval", held)):
        assert len({len(split.items[i].chosen_input_ids) for i in range(len(split))}) > 3 or name == "eval"
        with torch.no_grad():
            alone = torch.stack([reference.sequence_logprobs(model, split.collate_both([i], tok.pad_token_id))[0]
                                 for i in range(len(split))])  # (N, 2)
        torch.testing.assert_close(tables[name], alone, rtol=1e-5, atol=1e-5)
    # a row the cache lacks is never handed to a loss
    run = type("R", (), {"accelerator": type("A", (), {"device": torch.device("cpu")})()})()
    train.ref = short["train"]
    missing = next(i for i in range(len(train)) if i not in read)
    with pytest.raises(RuntimeError, match=rf"items \[{missing}\] were not computed"):
        reference.Reference("cached", run, tok.pad_token_id).logps(model, train, [read[0], missing])


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_padding_free_pairs_take_the_padded_steps(tmp_path, tiny_model, loss, monkeypatch):
    """Chosen and rejected sequences packed into shared rows, each pair's prompt laid out once for both
    (share_prompt, the default) or once per sequence: the same reference cache, per-step losses, gradient norms,
    eval metrics and weights as right padding, up to float rounding (simpo reads the response lengths)."""
    from rlhfkit.models import load_tokenizer

    # every batch in the shared layout, whatever it would cost on this model (when it is chosen: test_collate)
    monkeypatch.setattr("rlhfkit.data.collate.shared_prefix_pays", lambda *args: True)
    rows = sum_pairs(48, seed=5)
    for i, row in enumerate(rows):  # responses of very different lengths, so short sequences share rows
        row["rejected"] = row["rejected"].replace(" .", " ." * (1 + (5 * i) % 23))
    data = write_jsonl(tmp_path / "varied.jsonl", rows)
    split, _, _ = dpo.load_data(cfg(tiny_model, data, tmp_path / "x", padding_free=True), load_tokenizer(str(tiny_model)))
    batch = split.collate(list(range(8)), 0)
    assert batch["attention_mask"].dim() == 4 and batch["input_ids"].shape[0] < 16  # rows were saved
    # each pair's prompt once: fewer real tokens than its two sequences, one score per response token
    items = [split.items[i] for i in range(8)]
    full = sum(len(p.chosen_input_ids) + len(p.rejected_input_ids) for p in items)
    assert int((batch["input_ids"] != 0).sum()) <= full - sum(len(p.prompt_ids) for p in items)
    assert len(batch["target_owner"]) == sum(sum(p.chosen_response_mask[1:]) + sum(p.rejected_response_mask[1:])
                                             for p in items)
    padded, packed = tmp_path / "padded", tmp_path / "packed"
    assert_padding_free_takes_the_padded_steps(tiny_model, data, padded, packed, loss, ("loss", "grad_norm"),
                                               cached_reference=loss == "dpo")
    unshared = tmp_path / "unshared"
    dpo.main(cfg(tiny_model, data, unshared, max_steps=4, batch_size=8, padding_free=True, share_prompt=False,
                 loss=loss, eval_every=2))
    la = [v for m in metrics_of(packed) if "loss" in m for v in (m["loss"], m["grad_norm"])]
    assert len(la) == 8 and la == pytest.approx(
        [v for m in metrics_of(unshared) if "loss" in m for v in (m["loss"], m["grad_norm"])], rel=1e-4, abs=1e-6)
    wa, wb = load_file(str(packed / "model.safetensors")), load_file(str(unshared / "model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4  # Adam at lr 3e-3: rounding-level


def assert_padding_free_takes_the_padded_steps(model, data, padded, packed, loss, keys, cached_reference):
    """Train 4 steps padded and packed; the logged `keys` per step, the eval losses, the weights and (with a
    cached reference) the reference cache agree up to float rounding."""
    for out, free in ((padded, False), (packed, True)):
        dpo.main(cfg(model, data, out, max_steps=4, batch_size=8, padding_free=free, loss=loss, eval_every=2))
    la = [(m["step"], *(m[k] for k in keys)) for m in metrics_of(padded) if "loss" in m]
    lb = [(m["step"], *(m[k] for k in keys)) for m in metrics_of(packed) if "loss" in m]
    assert [x[0] for x in la] == [x[0] for x in lb] and len(la) == 4
    assert [v for x in la for v in x[1:]] == pytest.approx([v for x in lb for v in x[1:]], rel=1e-4, abs=1e-6)
    wa, wb = load_file(str(padded / "model.safetensors")), load_file(str(packed / "model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4  # Adam at lr 3e-3: rounding-level
    ea = [m for m in metrics_of(padded) if "eval/loss" in m]
    eb = [m for m in metrics_of(packed) if "eval/loss" in m]
    assert ea and [m["eval/loss"] for m in ea] == pytest.approx([m["eval/loss"] for m in eb], rel=1e-4)
    if cached_reference:
        ra, rb = load_file(str(padded / dpo.REF_CACHE)), load_file(str(packed / dpo.REF_CACHE))
        for name in ra:
            # rows the run never reads are NaN in both
            torch.testing.assert_close(rb[name], ra[name], rtol=1e-5, atol=1e-5, equal_nan=True)


def test_resume_refuses_a_reference_cache_for_other_inputs(tmp_path, tiny_model, pairs_file):
    out = tmp_path / "run"
    dpo.main(cfg(tiny_model, pairs_file, out, max_steps=2, save_every=2))
    cache = out / dpo.REF_CACHE
    save_file(load_file(str(cache)), str(cache), metadata={"fingerprint": "made-for-something-else"})
    with pytest.raises(UserError, match="computed for other data or another reference model"):
        dpo.main(cfg(tiny_model, pairs_file, out, max_steps=4, save_every=2, resume=True))


def test_a_separate_reference_model_is_used_and_fingerprinted(tmp_path, tiny_model, pairs_file):
    from helpers import make_tiny_model

    other = make_tiny_model(tmp_path / "other-model", hidden=32, layers=1)  # same tokenizer, other network
    out = tmp_path / "run"
    dpo.main(cfg(tiny_model, pairs_file, out, max_steps=1, ref_model=str(other)))
    assert metrics_of(out)[0]["loss"] != pytest.approx(LOG2, abs=1e-3)  # π ≠ π_ref at the start
    separate = load_file(str(out / dpo.REF_CACHE))["train"]
    dpo.main(cfg(tiny_model, pairs_file, out, max_steps=1, overwrite=True))  # back to --model as reference
    assert not torch.equal(load_file(str(out / dpo.REF_CACHE))["train"], separate)
    assert metrics_of(out)[0]["loss"] == pytest.approx(LOG2, abs=1e-6)


# -------------------------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_gradient_accumulation_1x8_equals_8x1(tmp_path, tiny_model, pairs_file, kto_file, loss):
    data = kto_file if loss == "kto" else pairs_file
    one, eight = tmp_path / "1x8", tmp_path / "8x1"
    dpo.main(cfg(tiny_model, data, one, loss=loss, batch_size=8, grad_accum=1))
    dpo.main(cfg(tiny_model, data, eight, loss=loss, batch_size=1, grad_accum=8))
    assert_same_run(one, eight, exact=False)
    assert metrics_of(one)[-1]["loss"] != metrics_of(one)[0]["loss"]  # it trained, so the match means something
    if loss == "kto":  # z₀ is estimated over the whole step, not per micro-batch
        assert [m["kl"] for m in metrics_of(one)] == pytest.approx([m["kl"] for m in metrics_of(eight)], abs=1e-6)


_RUN = ("import sys; from rlhfkit.config import parse_args; from rlhfkit.policy import dpo; "
        "dpo.main(parse_args(dpo.DPOConfig, sys.argv[1:]))")


def _subprocess(args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", _RUN, *args], capture_output=True, text=True, env=env, timeout=600)


def test_resume_after_sigkill_is_exact_and_reuses_the_reference_cache(tmp_path, tiny_dropout_model, pairs_file):
    def args(out):
        return ["--model", str(tiny_dropout_model), "--data", str(pairs_file), "--output-dir", str(out),
                "--max-steps", "8", "--save-every", "3", "--batch-size", "4", "--learning-rate", "3e-3",
                "--seed", "1", "--dropout-off", "false", "--report-to", "jsonl", "--progress", "false"]

    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = _subprocess(args(full))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _subprocess(args(killed), {KILL_ENV: "7"})  # SIGKILL after step 7: step 6 is the newest checkpoint
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert [p.name for p in sorted((killed / "checkpoints").iterdir())] == ["step-3", "step-6"]
    cache_time = (killed / dpo.REF_CACHE).stat().st_mtime_ns
    proc = _subprocess(args(killed) + ["--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (killed / dpo.REF_CACHE).stat().st_mtime_ns == cache_time
    import json

    assert json.loads((killed / "summary.json").read_text())["ref_cache"] == "reused"
    assert_same_run(full, killed, exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_two_processes_match_one(tmp_path, tiny_model, pairs_file, loss):
    """accelerate launch with 2 CPU processes (gloo): the reference cache is scored in two shares and gathered,
    KTO's z₀ is summed over both, and the curve matches one process with the same global batch."""
    import shutil

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate's launcher is installed with the package"
    script = tmp_path / "run_dpo.py"
    script.write_text(_RUN.replace("; ", "\n"))
    common = ["--model", str(tiny_model), "--data", str(pairs_file), "--max-steps", "4", "--learning-rate", "3e-3",
              "--seed", "1", "--report-to", "jsonl", "--progress", "false", "--save-every", "4", "--loss", loss]
    one, two = tmp_path / "one", tmp_path / "two"
    proc = _subprocess(common + ["--output-dir", str(one), "--batch-size", "8"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *common,
         "--output-dir", str(two), "--batch-size", "4"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (two / "checkpoints" / "step-4" / "rng-rank1.pt").exists()  # really two processes
    # the same rows scored (the items 4 steps of 8 draw; NaN where neither run reads), with the same values
    torch.testing.assert_close(load_file(str(two / dpo.REF_CACHE)), load_file(str(one / dpo.REF_CACHE)),
                               equal_nan=True)
    assert_same_run(one, two, exact=False)


def test_kto_padding_free_takes_the_padded_steps(tmp_path, tiny_model):
    """KTO's completions and mismatched pairs packed into shared rows: the same reference cache, reference point
    z0 (kl), per-step losses, gradient norms, eval metrics and weights as right padding, up to float rounding."""
    from rlhfkit.models import load_tokenizer
    from rlhfkit.policy import kto

    rows = sum_pairs(48, seed=5)
    for i, row in enumerate(rows):  # responses of very different lengths, so short sequences share rows
        row["rejected"] = row["rejected"].replace(" .", " ." * (1 + (5 * i) % 23))
    data = write_jsonl(tmp_path / "varied.jsonl", rows)
    split, _, _ = kto.load_data(cfg(tiny_model, data, tmp_path / "x", loss="kto", padding_free=True),
                                load_tokenizer(str(tiny_model)))
    assert split.padding_free
    for batch in (split.collate(list(range(8)), 0), split.collate_both(list(range(8)), 0)):
        assert batch["attention_mask"].dim() == 4 and batch["input_ids"].shape[0] < len(batch["desirable"])
    assert_padding_free_takes_the_padded_steps(tiny_model, data, tmp_path / "padded", tmp_path / "packed", "kto",
                                               ("loss", "grad_norm", "kl"), cached_reference=True)


def test_kto_resume_in_process_is_exact(tmp_path, tiny_dropout_model, kto_file, monkeypatch):
    full, broken = tmp_path / "full", tmp_path / "broken"
    kw = dict(loss="kto", max_steps=6, save_every=2, dropout_off=False)
    dpo.main(cfg(tiny_dropout_model, kto_file, full, **kw))
    interrupt_after(dpo.main, cfg(tiny_dropout_model, kto_file, broken, **kw), step=5)
    dpo.main(cfg(tiny_dropout_model, kto_file, broken, resume=True, **kw))
    assert_same_run(full, broken, exact=True)
    assert [m["kl"] for m in metrics_of(full)] == [m["kl"] for m in metrics_of(broken)]


# ---------------------------------------------------------------------------------------------------------- LoRA
def test_lora_with_the_adapter_as_reference_matches_a_cached_base_reference(tmp_path, tiny_model, pairs_file):
    lora = LoraConfig(enabled=True, r=4)
    adapter, cached = tmp_path / "adapter", tmp_path / "cached"
    summary = dpo.main(cfg(tiny_model, pairs_file, adapter, max_steps=3, lora=lora, reference="adapter"))
    assert summary["reference"] == "adapter" and not (adapter / dpo.REF_CACHE).exists()
    assert metrics_of(adapter)[0]["loss"] == pytest.approx(LOG2, abs=1e-6)  # adapter starts at zero: π = π_ref
    assert (adapter / "adapter" / "adapter_model.safetensors").exists()
    # the base network with the adapter off is the same reference a cache of --model holds
    dpo.main(cfg(tiny_model, pairs_file, cached, max_steps=3, lora=lora, reference="cached"))
    assert_same_run(adapter, cached, exact=False)
    assert metrics_of(adapter)[-1]["rewards/margin"] != 0.0
    base = load_file(str(tiny_model / "model.safetensors"))
    merged = load_file(str(adapter / "model.safetensors"))
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("proj" in k for k in changed)  # only adapted projections moved


# ------------------------------------------------------------------------------------------------------ variants
def one_pair() -> "dpo.PairLogps":
    # chosen log π = -5 over 2 tokens, rejected -15 over 5 tokens, log π_ref = -10 for both:
    # log-ratios +5 and -5, so the DPO gap h = 10; per-token means -2.5 and -3
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return dpo.PairLogps(chosen=t(-5.0), rejected=t(-15.0), chosen_lengths=t(2.0), rejected_lengths=t(5.0),
                         ref_chosen=t(-10.0), ref_rejected=t(-10.0))


# each with the config's defaults: beta 0.1 (2.0 for simpo), label_smoothing 0.1, tau 0.1, simpo_gamma 0.5,
# orpo_lambda 0.1; −log σ(x) = log(1 + e^−x)
HAND_VALUES = {
    "dpo": math.log1p(math.exp(-1.0)),  # −log σ(0.1 · 10) = 0.313262
    "cdpo": 0.9 * math.log1p(math.exp(-1.0)) + 0.1 * math.log1p(math.exp(1.0)),  # 0.9·0.313262 + 0.1·1.313262
    "ipo": 25.0,  # (h − 1/(2τ))² = (10 − 5)²
    "simpo": math.log1p(math.exp(-0.5)),  # rewards 2·(−5/2) = −5 and 2·(−15/5) = −6: −log σ(1 − 0.5) = 0.474077
    # log odds m − log(1 − e^m) of the per-token means: −2.5 → −2.414350, −3 → −2.948931, ratio 0.534581;
    # L_SFT = 5/2, so 2.5 + 0.1 · log(1 + e^−0.534581) = 2.5 + 0.1 · 0.461161
    "orpo": 2.5 + 0.1 * 0.46116125012238607,
}


def test_the_loss_name_picks_its_function_with_the_configs_hyperparameters():
    paired = set(typing.get_args(typing.get_type_hints(dpo.DPOConfig)["loss"])) - {"kto"}
    assert set(HAND_VALUES) == paired  # every paired name the CLI accepts has a hand value here
    for name, expected in HAND_VALUES.items():
        loss, stats = dpo.pair_loss(dpo.DPOConfig(loss=name))(one_pair())
        assert loss.item() == pytest.approx(expected, rel=1e-9), name
        assert stats.losses.tolist() == pytest.approx([expected], rel=1e-9), name
    # the config's hyperparameters reach the function: β = 0.2 doubles the DPO logit, −log σ(2) = 0.126928
    loss, _ = dpo.pair_loss(dpo.DPOConfig(loss="dpo", beta=0.2))(one_pair())
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-9)


@pytest.mark.parametrize("loss,first_loss", [
    ("dpo", LOG2),
    ("cdpo", LOG2),  # −(1−ε) log σ(0) − ε log σ(0) = log 2 for any ε
    ("ipo", (1 / (2 * 0.1)) ** 2),  # h = 0 at the start: (0 − 1/(2τ))² with τ = 0.1
])
def test_each_loss_with_a_reference_starts_at_its_hand_value(tmp_path, tiny_model, pairs_file, loss, first_loss):
    out = tmp_path / loss
    summary = dpo.main(cfg(tiny_model, pairs_file, out, loss=loss, max_steps=2))
    m = metrics_of(out)
    assert [x["step"] for x in m] == [1, 2] and m[0]["loss"] != m[1]["loss"]
    assert m[0]["loss"] == pytest.approx(first_loss, rel=1e-6)
    assert summary["reference"] == "cached" and (out / dpo.REF_CACHE).exists()


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_each_reference_free_loss_learns_the_training_pairs(tmp_path, tiny_model, pairs_file, loss):
    """No reference, so no known starting value: instead, the pairs scored after every step (the training file
    itself as eval data) must separate: the reward margin and accuracy rise and the loss falls."""
    out = tmp_path / loss
    summary = dpo.main(cfg(tiny_model, pairs_file, out, loss=loss, max_steps=8, batch_size=8, eval_every=1,
                           eval_data=str(pairs_file)))
    assert summary["reference"] == "none" and not (out / dpo.REF_CACHE).exists()
    m = metrics_of(out)
    first, last = m[0], m[-1]
    assert first["rewards/chosen"] != 0.0  # the rewards are the policy's own
    assert last["eval/loss"] < first["eval/loss"] - 0.05
    assert last["eval/rewards/margin"] > first["eval/rewards/margin"]
    assert last["eval/rewards/accuracy"] > first["eval/rewards/accuracy"] + 0.1


def test_loss_kto_is_handed_to_the_kto_trainer(tmp_path, tiny_model, kto_file, monkeypatch):
    seen = []
    monkeypatch.setattr(kto, "main", lambda c: seen.append(c) or {"trained_by": "kto"})
    kto_cfg = cfg(tiny_model, kto_file, tmp_path / "kto", loss="kto")
    assert dpo.main(kto_cfg) == {"trained_by": "kto"} and seen == [kto_cfg]
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="loss: kto"):
        kto.main(cfg(tiny_model, kto_file, tmp_path / "dpo", loss="dpo"))


def test_kto_on_unpaired_rows_starts_at_its_hand_value_and_learns(tmp_path, tiny_model, kto_file):
    out = tmp_path / "kto"
    # the training file is also the eval data, scored after every step: a fixed yardstick for learning
    summary = dpo.main(cfg(tiny_model, kto_file, out, loss="kto", max_steps=8, batch_size=8, eval_fraction=0.0,
                           kto_desirable_weight=1.0, kto_undesirable_weight=1.5, eval_data=str(kto_file),
                           eval_every=1))
    assert (summary["desirable"], summary["undesirable"]) == (16, 12)
    m = metrics_of(out)
    # at the start r = 0 and z₀ = 0, so each example loses λ_y·σ(0) = λ_y/2: the step-1 loss is half the mean
    # weight of the 8 examples the sampler drew
    from rlhfkit.train import EpochSampler

    labels = [r["label"] for r in kto_rows(28)]
    drawn = EpochSampler(28, seed=1).next_indices(8)
    expected = sum(0.5 * (1.0 if labels[i] else 1.5) for i in drawn) / 8
    assert m[0]["loss"] == pytest.approx(expected, abs=1e-6) and m[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert m[0]["examples"] == 8 and m[1]["loss"] != m[0]["loss"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen", "kl"} <= m[0].keys()
    assert summary["reference"] == "cached" and load_file(str(out / dpo.REF_CACHE))["train"].shape == (28, 2)
    # desirable completions gain implicit reward over undesirable ones, and the loss on the scored file falls
    assert m[-1]["eval/rewards/margin"] > m[0]["eval/rewards/margin"] + 0.02
    assert m[-1]["eval/loss"] < m[0]["eval/loss"]
    assert all("eval/kl" in x for x in m)


def test_kto_on_paired_rows_unpairs_them(tmp_path, tiny_model, pairs_file):
    out = tmp_path / "kto"
    summary = dpo.main(cfg(tiny_model, pairs_file, out, loss="kto", max_steps=2, batch_size=8, eval_fraction=0.0))
    assert (summary["train_examples"], summary["desirable"], summary["undesirable"]) == (80, 40, 40)
    first = metrics_of(out)[0]
    assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["kl"] == pytest.approx(0.0, abs=1e-6)


def test_a_run_weighs_sharing_each_batchs_prompt_with_its_policys_size(tmp_path, tiny_model, monkeypatch):
    """`rlhfkit dpo` hands every batch's layout choice (reference pass, training, held-out evaluation) the loaded
    policy's attention_token_weight, so a batch whose shared rows would cost clearly more is laid out unshared."""
    from rlhfkit.data import collate
    from rlhfkit.models import attention_token_weight, load_causal_lm, load_tokenizer

    seen = []
    real = collate.shared_prefix_pays
    monkeypatch.setattr(collate, "shared_prefix_pays", lambda ids, groups, w: seen.append(w) or real(ids, groups, w))
    data = write_jsonl(tmp_path / "pairs.jsonl", sum_pairs(24, seed=3))
    dpo.main(cfg(tiny_model, data, tmp_path / "run", max_steps=2, batch_size=4, padding_free=True, eval_every=2))
    expected = attention_token_weight(load_causal_lm(str(tiny_model), load_tokenizer(str(tiny_model))))
    assert expected is not None and len(seen) >= 3 and set(seen) == {expected}
