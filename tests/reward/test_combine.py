"""The reward combinations (sum, Llama 2 gating, Safe RLHF's Lagrangian) against hand-computed values, their
normalisers, state and errors."""

import json
import math

import pytest
import torch

from rlhfkit.errors import ConfigError, DataError
from rlhfkit.reward.combine import CombineConfig, Normaliser, RewardCombiner, read_risky_flags


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_sum_weights_raw_rewards_without_normalisation():
    cfg = CombineConfig(reward_weights={"help": 2.0}, reward_normalization="none")
    combined, metrics = RewardCombiner(cfg, ["help", "safe"])({"help": t(1.0, -1.0), "safe": t(0.5, 3.0)})
    assert combined.tolist() == pytest.approx([2 * 1.0 + 0.5, 2 * -1.0 + 3.0])
    assert metrics == {"reward/help": pytest.approx(0.0), "reward/safe": pytest.approx(1.75)}


def test_batch_normalisation_puts_each_reward_on_the_same_scale():
    cfg = CombineConfig(reward_normalization="batch")
    # "safe" is 100x larger: without normalisation it would decide alone
    combined, _ = RewardCombiner(cfg, ["help", "safe"])({"help": t(1.0, 3.0), "safe": t(200.0, 100.0)})
    # each reward becomes (x - mean) / std: help (-1, 1) / sqrt(2), safe (1, -1) / sqrt(2): they cancel
    assert combined.tolist() == pytest.approx([0.0, 0.0], abs=1e-5)


def test_running_normaliser_equals_the_statistics_of_everything_seen():
    z = Normaliser("running")
    a, b = t(1.0, 2.0, 4.0), t(-3.0, 0.5)
    z(a)
    out = z(b)
    everything = torch.cat([a, b]).double()
    mean, std = float(everything.mean()), float(everything.std())
    assert z.mean == pytest.approx(mean) and z.count == 5
    assert out.tolist() == pytest.approx(((b.double() - mean) / (std + 1e-6)).tolist(), rel=1e-5)
    # evaluation reads the statistics without moving them
    state = dict(z.state_dict())
    z(t(100.0, 200.0), update=False)
    assert z.state_dict() == state


def test_gated_uses_the_safety_reward_on_risky_prompts_and_unsafe_responses():
    cfg = CombineConfig(combine="gated", safety_reward="safe", gate_threshold=0.0, reward_normalization="none")
    comb = RewardCombiner(cfg, ["help", "safe"])
    help_, safe = t(5.0, 5.0, 5.0, 1.0), t(2.0, -1.0, 0.5, 0.7)
    risky = torch.tensor([True, False, False, False])
    combined, metrics = comb({"help": help_, "safe": safe}, risky)
    # sample 0: flagged -> safety 2.0; 1: safety -1.0 < 0 -> safety; 2, 3: helpfulness 5.0, 1.0; then whitened
    picked = t(2.0, -1.0, 5.0, 1.0)
    expected = (picked - picked.mean()) / (picked.std() + 1e-6)
    assert combined.tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert metrics["combine/safety_fraction"] == 0.5 and metrics["combine/risky_fraction"] == 0.25


def test_lagrangian_combines_with_the_multiplier_then_updates_it():
    cfg = CombineConfig(combine="lagrangian", safety_reward="safe", reward_normalization="none", cost_limit=-1.0,
                        lagrange_init=2.0, lagrange_lr=0.5)
    comb = RewardCombiner(cfg, ["help", "safe"])
    help_, safe = t(1.0, 3.0), t(0.5, -1.5)  # cost = -safe = (-0.5, 1.5), mean 0.5: violates the limit by 1.5
    combined, metrics = comb({"help": help_, "safe": safe})
    lam = 2.0
    assert combined.tolist() == pytest.approx([(1.0 - lam * -0.5) / (1 + lam), (3.0 - lam * 1.5) / (1 + lam)])
    assert metrics["combine/lambda"] == pytest.approx(2.0)
    assert metrics["combine/cost"] == pytest.approx(0.5) and metrics["combine/violation"] == pytest.approx(1.5)
    assert comb.multiplier == pytest.approx(2.0 * math.exp(0.5 * 1.5))  # log lambda += lr * violation
    # a satisfied constraint lowers it; the ceiling holds it finite
    comb({"help": help_, "safe": t(3.0, 3.0)})
    assert comb.multiplier == pytest.approx(2.0 * math.exp(0.5 * 1.5 + 0.5 * (-3.0 + 1.0)))
    capped = RewardCombiner(CombineConfig(combine="lagrangian", safety_reward="safe", lagrange_lr=100.0,
                                          lagrange_max=10.0), ["help", "safe"])
    capped({"help": help_, "safe": t(-5.0, -5.0)})
    assert capped.multiplier == pytest.approx(10.0)


def test_evaluation_moves_neither_the_multiplier_nor_the_normalisers_and_state_round_trips():
    cfg = CombineConfig(combine="lagrangian", safety_reward="safe", lagrange_lr=0.3)
    comb = RewardCombiner(cfg, ["help", "safe"])
    comb({"help": t(1.0, 2.0, 0.0), "safe": t(-1.0, 0.0, 2.0)})
    state = json.loads(json.dumps(comb.state_dict()))  # as a checkpoint stores it
    before = comb({"help": t(0.3, 0.1), "safe": t(1.0, -2.0)}, update=False)[0]
    assert json.loads(json.dumps(comb.state_dict())) == state
    fresh = RewardCombiner(cfg, ["help", "safe"])
    fresh.load_state_dict(state)
    after = fresh({"help": t(0.3, 0.1), "safe": t(1.0, -2.0)}, update=False)[0]
    assert torch.equal(before, after)


@pytest.mark.parametrize("cfg, names, match", [
    (CombineConfig(reward_weights={"helful": 1.0}), ["helpful", "harmless"], "helful"),
    (CombineConfig(combine="gated"), ["helpfulness", "honesty"], "--safety-reward 'harmlessness'"),
    (CombineConfig(combine="lagrangian", safety_reward="safe"), ["safe"], "at least one other"),
    (CombineConfig(combine="lagrangian", safety_reward="safe", lagrange_init=0.0), ["safe", "help"], "lagrange-init"),
])
def test_settings_that_do_not_fit_the_rewards_are_refused(cfg, names, match):
    with pytest.raises(ConfigError, match=match):
        RewardCombiner(cfg, names)


def test_risky_flags_are_booleans_or_absent(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a", "risky": true}\n{"prompt": "b"}\n{"prompt": "c", "risky": false}\n')
    assert read_risky_flags(str(path), "risky") == [True, False, False]
    path.write_text('{"prompt": "a", "risky": true}\n{"prompt": "b", "risky": "no"}\n')
    with pytest.raises(DataError, match="risky"):
        read_risky_flags(str(path), "risky")
