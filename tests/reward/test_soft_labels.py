"""Soft preference labels end to end: the `confidence` column read, validated, written back and batched; the
reward model and the DPO family training on it (all-1 confidence is no column at all, bit for bit), learning
through reversed rows that say they are reversed, and the losses without a soft target refusing the column."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from helpers import preference_rows, ranking_rows, write_jsonl
from policy.test_dpo import assert_same_run, sum_pairs
from policy.test_dpo import cfg as dpo_cfg
from rlhfkit.data.collate import collate_pairs
from rlhfkit.data.preference import parse_preference, read_preferences, write_preferences
from rlhfkit.data.preference_tokens import tokenize_pair
from rlhfkit.errors import DataError, UserError
from rlhfkit.models import load_tokenizer
from rlhfkit.policy import dpo
from rlhfkit.reward import train as rtrain
from rlhfkit.train import read_metrics


def with_confidence(rows, values):
    """The rows, each given the confidence at its index (None: no column on that row)."""
    return [dict(r, confidence=c) if c is not None else dict(r) for r, c in zip(rows, values)]


def reversed_marked(rows):
    """Every second row reversed (chosen and rejected swapped) and marked confidence 0.0: the row says it is
    probably wrong, as a Dawid-Skene posterior says of an adversarial annotator's label."""
    out = []
    for i, r in enumerate(rows):
        if i % 2:
            out.append(dict(r, chosen=r["rejected"], rejected=r["chosen"], confidence=0.0))
        else:
            out.append(dict(r))
    return out


# -------------------------------------------------------------------------------------------------------- data
def test_confidence_is_read_written_back_and_batched_with_one_where_a_row_has_none(tmp_path, tiny_model):
    rows = with_confidence(preference_rows(3), [0.25, None, 1])
    recs = read_preferences(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert [r.confidence for r in recs] == [0.25, None, 1.0] and isinstance(recs[2].confidence, float)
    back = read_preferences(str(write_preferences(recs, tmp_path / "back.jsonl")))
    assert back == recs
    assert "confidence" not in json.loads((tmp_path / "back.jsonl").read_text().splitlines()[1])
    tok = load_tokenizer(str(tiny_model))
    items = [tokenize_pair(tok, r, 64) for r in recs]
    assert [i.confidence for i in items] == [0.25, None, 1.0]
    batch = collate_pairs(items, tok.pad_token_id)
    assert batch["confidence"].dtype == torch.float32 and batch["confidence"].tolist() == [0.25, 1.0, 1.0]


@pytest.mark.parametrize("value,reason", [
    ("high", "must be a number"), (True, "must be a number"), (1.5, r"must be a probability in \[0, 1\]"),
    (-0.1, "must be a probability"), (float("nan"), "must be a probability"), (float("inf"), "must be a probability"),
])
def test_a_bad_confidence_is_a_data_error_naming_file_row_and_field(value, reason):
    row = {"prompt": "hi", "chosen": "a", "rejected": "b", "confidence": value}
    with pytest.raises(DataError, match=r"prefs.jsonl, row 7, field 'confidence': " + reason):
        parse_preference(row, "prefs.jsonl", 7)


def test_a_ranking_row_refuses_confidence():
    row = dict(ranking_rows(1)[0], confidence=0.9)
    with pytest.raises(DataError, match="row 3, field 'confidence': is not supported on a ranking row"):
        parse_preference(row, "k.jsonl", 3)


# ------------------------------------------------------------------------------------------------ reward model
def reward_cfg(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), output_dir=str(out), max_steps=4, batch_size=8,
                learning_rate=2e-3, report_to=["jsonl"], progress=False, eval_fraction=0.2, seed=3)
    base.update(kw)
    return rtrain.RewardConfig(**base)


def assert_same_reward_run(a, b):
    """Per-step metrics (held-out ones included) and final weights, bit for bit."""
    def metrics(run):
        return [{k: v for k, v in m.items() if k != "elapsed_s"} for m in read_metrics(run / "metrics.jsonl")]

    assert metrics(a) == metrics(b)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reward_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("soft-rm")
    rows = preference_rows(40) + ranking_rows(8, seed=1)
    plain = write_jsonl(d / "plain.jsonl", rows)
    ones = write_jsonl(d / "ones.jsonl", with_confidence(rows, [1.0] * 40 + [None] * 8))  # rankings take none
    held = write_jsonl(d / "held.jsonl", with_confidence(preference_rows(12, seed=5), [0.0] * 12))
    return plain, ones, held


def test_reward_all_one_confidence_trains_exactly_as_no_column(tmp_path, tiny_model, reward_files):
    plain, ones, held = reward_files
    rtrain.main(reward_cfg(tiny_model, plain, tmp_path / "plain", eval_data=str(held), eval_every=2))
    summary = rtrain.main(reward_cfg(tiny_model, ones, tmp_path / "ones", eval_data=str(held), eval_every=2))
    assert summary["confidence_pairs"] == 40
    assert "heldout_accuracy" in summary  # the held-out metrics ran (and matched, below)
    assert_same_reward_run(tmp_path / "plain", tmp_path / "ones")


def test_reward_use_confidence_off_trains_every_row_as_certain(tmp_path, tiny_model, reward_files):
    plain, _, _ = reward_files
    rows = [json.loads(line) for line in plain.read_text().splitlines()]
    unsure = write_jsonl(tmp_path / "unsure.jsonl", with_confidence(rows, [0.1, 0.7] * 20 + [None] * 8))
    rtrain.main(reward_cfg(tiny_model, plain, tmp_path / "plain", max_steps=2))
    summary = rtrain.main(reward_cfg(tiny_model, unsure, tmp_path / "off", max_steps=2, use_confidence=False))
    assert "confidence_pairs" not in summary
    assert_same_reward_run(tmp_path / "plain", tmp_path / "off")
    rtrain.main(reward_cfg(tiny_model, unsure, tmp_path / "on", max_steps=2))  # and on, it trains differently
    assert read_metrics(tmp_path / "on" / "metrics.jsonl")[0]["loss"] != \
        read_metrics(tmp_path / "plain" / "metrics.jsonl")[0]["loss"]


def test_soft_labels_learn_the_right_direction_through_rows_marked_reversed(tmp_path, tiny_model):
    """Half the rows reversed: as hard labels they contradict the other half and the model learns no direction;
    marked confidence 0.0 they say "the other one is better", and the soft model learns from every row."""
    data = write_jsonl(tmp_path / "noisy.jsonl", reversed_marked(preference_rows(48)))
    held = write_jsonl(tmp_path / "held.jsonl", preference_rows(40, seed=17))  # clean labels
    common = dict(max_steps=12, eval_data=str(held))
    soft = rtrain.main(reward_cfg(tiny_model, data, tmp_path / "soft", **common))
    hard = rtrain.main(reward_cfg(tiny_model, data, tmp_path / "hard", use_confidence=False, **common))
    assert soft["heldout_accuracy"] >= 0.9
    assert soft["heldout_accuracy"] >= hard["heldout_accuracy"] + 0.3, (soft["heldout_accuracy"],
                                                                         hard["heldout_accuracy"])


# ---------------------------------------------------------------------------------------------------- DPO family
@pytest.fixture(scope="module")
def dpo_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("soft-dpo")
    rows = sum_pairs(24)
    return (write_jsonl(d / "plain.jsonl", rows), write_jsonl(d / "ones.jsonl", with_confidence(rows, [1.0] * 24)),
            write_jsonl(d / "unsure.jsonl", with_confidence(rows, [0.2, 0.9, None] * 8)))


@pytest.mark.parametrize("loss", ["dpo", "cdpo"])
def test_dpo_all_one_confidence_trains_exactly_as_no_column(tmp_path, tiny_model, dpo_files, loss):
    plain, ones, _ = dpo_files
    dpo.main(dpo_cfg(tiny_model, plain, tmp_path / "plain", loss=loss, max_steps=3, eval_every=1))
    summary = dpo.main(dpo_cfg(tiny_model, ones, tmp_path / "ones", loss=loss, max_steps=3, eval_every=1))
    assert summary["confidence_rows"] == 24
    assert_same_run(tmp_path / "plain", tmp_path / "ones", exact=True)


def test_dpo_trains_on_confidence_and_use_confidence_off_ignores_it(tmp_path, tiny_model, dpo_files):
    plain, _, unsure = dpo_files
    dpo.main(dpo_cfg(tiny_model, plain, tmp_path / "plain", max_steps=2))
    dpo.main(dpo_cfg(tiny_model, unsure, tmp_path / "off", max_steps=2, use_confidence=False))
    assert_same_run(tmp_path / "plain", tmp_path / "off", exact=True)
    dpo.main(dpo_cfg(tiny_model, unsure, tmp_path / "on", max_steps=2))
    plain_m, on_m = read_metrics(tmp_path / "plain" / "metrics.jsonl"), read_metrics(tmp_path / "on" / "metrics.jsonl")
    # step 1 starts at the reference (h = 0), where every soft target gives log 2 too; step 2 differs
    assert on_m[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert on_m[1]["loss"] != plain_m[1]["loss"]


@pytest.mark.parametrize("loss", ["ipo", "simpo", "orpo", "kto"])
def test_losses_without_a_soft_target_refuse_a_confidence_column(tmp_path, tiny_model, dpo_files, loss):
    _, _, unsure = dpo_files
    with pytest.raises(UserError, match=rf"unsure.jsonl, row 1: 16 rows have a confidence .* --loss {loss} has no "
                                        r"soft target .* --use-confidence false"):
        dpo.main(dpo_cfg(tiny_model, unsure, tmp_path / "run", loss=loss))


def test_ipo_trains_every_row_as_certain_when_use_confidence_is_off(tmp_path, tiny_model, dpo_files):
    plain, _, unsure = dpo_files
    dpo.main(dpo_cfg(tiny_model, plain, tmp_path / "plain", loss="ipo", max_steps=2))
    dpo.main(dpo_cfg(tiny_model, unsure, tmp_path / "off", loss="ipo", max_steps=2, use_confidence=False))
    assert_same_run(tmp_path / "plain", tmp_path / "off", exact=True)


def one_pair(confidence):
    # log-ratios +5 and −5: h = 10, so βh = 1 with the default β = 0.1
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return dpo.PairLogps(chosen=t(-5.0), rejected=t(-15.0), chosen_lengths=t(2.0), rejected_lengths=t(5.0),
                         ref_chosen=t(-10.0), ref_rejected=t(-10.0), confidence=confidence)


def test_the_loss_table_turns_confidence_into_a_per_pair_flip_probability():
    c = torch.tensor([0.25])
    # dpo, c = 1/4: −0.25 log σ(1) − 0.75 log σ(−1) = 0.25·0.313262 + 0.75·1.313262 = 1.063262
    loss, _ = dpo.pair_loss(dpo.DPOConfig(loss="dpo"))(one_pair(c))
    expected = 0.25 * math.log1p(math.exp(-1.0)) + 0.75 * math.log1p(math.exp(1.0))
    assert expected == pytest.approx(1.063262, abs=1e-6) and loss.item() == pytest.approx(expected, rel=1e-6)
    # cdpo, ε₀ = 0.1: the label is right with probability 0.25·0.9 + 0.75·0.1 = 0.3, so ε = 0.7:
    # 0.3·0.313262 + 0.7·1.313262 = 1.013262
    loss, _ = dpo.pair_loss(dpo.DPOConfig(loss="cdpo"))(one_pair(c))
    expected = 0.3 * math.log1p(math.exp(-1.0)) + 0.7 * math.log1p(math.exp(1.0))
    assert expected == pytest.approx(1.013262, abs=1e-6) and loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="loss ipo has no soft target"):
        dpo.pair_loss(dpo.DPOConfig(loss="ipo"))(one_pair(c))
