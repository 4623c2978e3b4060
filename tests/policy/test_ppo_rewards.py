"""PPO / GRPO and best-of-n on several reward models (--rewards) combined: one reward through the combiner takes
exactly the steps of --reward-model, the gate reads the prompt file's flags, the Lagrangian multiplier follows
the constraint and resumes exactly, and bad settings are refused."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import interrupt_after, write_jsonl
from rlhfkit.errors import ConfigError
from rlhfkit.policy import best_of_n, ppo
from rlhfkit.train import read_metrics
from .test_ppo import number_reward_model, number_world  # noqa: F401 (a fixture)


def negated(rm: Path, out: Path) -> Path:
    """The toy number-word reward model with its score head negated: fewer number words score higher (a "safety"
    reward that conflicts with the other, so a cost = the number reward)."""
    from rlhfkit.models import load_tokenizer, save_pretrained
    from rlhfkit.reward.model import load_reward_model

    tok = load_tokenizer(str(rm))
    model = load_reward_model(str(rm), tok)
    with torch.no_grad():
        model.score.weight.neg_()
    save_pretrained(model, tok, out)
    return out


@pytest.fixture(scope="module")
def two_rewards(tmp_path_factory, tiny_model, number_world):  # noqa: F811
    rm, prompts = number_world
    d = tmp_path_factory.mktemp("two-rewards")
    rows = [json.loads(line) for line in Path(prompts).read_text().splitlines()]
    flagged = write_jsonl(d / "flagged.jsonl", [{**r, "risky": i % 2 == 0} for i, r in enumerate(rows)])
    return {"numbers": str(rm), "fewer": str(negated(Path(rm), d / "fewer"))}, prompts, flagged


def run(tiny_model, prompts, out, **kw):
    base = dict(model=str(tiny_model), data=str(prompts), output_dir=str(out), max_steps=4, batch_size=4,
                samples_per_prompt=2, advantage="grpo", learning_rate=1e-2, max_new_tokens=8, ppo_epochs=1,
                minibatches=1, report_to=["jsonl"], progress=False, seed=1)
    base.update(kw)
    ppo.main(ppo.PPOConfig(**base))
    return read_metrics(Path(out) / "metrics.jsonl")


def test_one_reward_through_the_combiner_takes_the_same_steps_as_reward_model(tmp_path, tiny_model, two_rewards):
    rewards, prompts, _ = two_rewards
    plain = run(tiny_model, prompts, tmp_path / "plain", reward_model=rewards["numbers"])
    combined = run(tiny_model, prompts, tmp_path / "combined", rewards={"numbers": rewards["numbers"]},
                   reward_normalization="none")
    keys = ("reward/score", "reward/penalised", "kl", "policy_loss", "grad_norm")
    assert [[m[k] for k in keys] for m in plain] == [[m[k] for k in keys] for m in combined]
    assert all(m["reward/numbers"] == pytest.approx(m["reward/score"], abs=1e-6) for m in combined)
    wa = load_file(str(tmp_path / "plain" / "model.safetensors"))
    wb = load_file(str(tmp_path / "combined" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_gate_reads_the_prompt_flags_and_the_safety_threshold(tmp_path, tiny_model, two_rewards):
    rewards, _, flagged = two_rewards
    metrics = run(tiny_model, flagged, tmp_path / "gated", rewards=rewards, combine="gated", safety_reward="fewer",
                  gate_threshold=-1e9)
    # every sampled prompt's flag reaches the combiner: half the prompts are flagged, so the fraction is k/4
    assert all(m["combine/safety_fraction"] == m["combine/risky_fraction"] for m in metrics)
    assert {m["combine/risky_fraction"] * 4 % 1 for m in metrics} == {0.0}
    assert 0 < sum(m["combine/risky_fraction"] for m in metrics) < len(metrics)
    # a threshold above every safety score sends every sample to the safety reward
    always = run(tiny_model, flagged, tmp_path / "always", rewards=rewards, combine="gated", safety_reward="fewer",
                 gate_threshold=1e9)
    assert all(m["combine/safety_fraction"] == 1.0 for m in always)


def test_the_lagrange_multiplier_rises_while_the_cost_is_over_its_limit_and_resumes_exactly(tmp_path, tiny_model,
                                                                                           two_rewards):
    rewards, prompts, _ = two_rewards
    kw = dict(rewards=rewards, combine="lagrangian", safety_reward="fewer", cost_limit=-2.0, lagrange_lr=0.1,
              max_steps=5, save_every=2)
    full = run(tiny_model, prompts, tmp_path / "full", **kw)
    lam = [m["combine/lambda"] for m in full]
    # cost = -(fewer) = the number score, always above -2: every step raises log lambda by 0.1 x violation
    for m, nxt in zip(full, lam[1:]):
        assert nxt == pytest.approx(m["combine/lambda"] * torch.tensor(0.1 * m["combine/violation"]).exp().item(),
                                    rel=1e-5)
    assert lam == sorted(lam) and lam[-1] > lam[0]
    assert json.loads((tmp_path / "full" / "summary.json").read_text())["combine"] == "lagrangian"
    interrupt_after(ppo.main, ppo.PPOConfig(**{**dict(model=str(tiny_model), data=str(prompts),
                                                      output_dir=str(tmp_path / "broken"), batch_size=4,
                                                      samples_per_prompt=2, advantage="grpo", learning_rate=1e-2,
                                                      max_new_tokens=8, ppo_epochs=1, minibatches=1,
                                                      report_to=["jsonl"], progress=False, seed=1), **kw}), step=3)
    resumed = run(tiny_model, prompts, tmp_path / "broken", resume=True, **kw)
    keys = ("reward/score", "combine/lambda", "combine/cost", "policy_loss", "reward/numbers")
    assert [[m[k] for k in keys] for m in full] == [[m[k] for k in keys] for m in resumed]


@pytest.mark.parametrize("kw, match", [
    (dict(reward_model="x", rewards={"a": "y"}), "exactly one of the two"),
    (dict(rewards={"a": "x", "b": "y"}, combine="gated"), "--safety-reward 'harmlessness'"),
    (dict(rewards={"a": "x"}, reward_weights={"b": 2.0}), "not among --rewards"),
])
def test_reward_settings_that_cannot_work_are_refused(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        ppo.PPOConfig(model="m", data="d", output_dir=str(tmp_path), **kw).validate()


def test_best_of_n_picks_by_the_combination_and_keeps_each_rewards_scores(tmp_path, tiny_model, two_rewards):
    rewards, prompts, _ = two_rewards
    out = tmp_path / "bon"
    best_of_n.main(best_of_n.BestOfNConfig(model=str(tiny_model), data=str(prompts), output_dir=str(out), n=4,
                                           max_new_tokens=6, rewards=rewards, reward_weights={"fewer": 0.0},
                                           reward_normalization="none"))
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for r in rows:
        numbers, fewer = r["scores_by_reward"]["numbers"], r["scores_by_reward"]["fewer"]
        assert r["scores"] == pytest.approx(numbers, abs=1e-6)  # weight 0 on "fewer"
        assert fewer == pytest.approx([-x for x in numbers], abs=1e-5)
        assert r["response"] == r["candidates"][numbers.index(max(numbers))]


_GLOBAL = '''
import json, sys
import torch
from accelerate import Accelerator
from rlhfkit.policy.ppo import combine_global
from rlhfkit.reward.combine import CombineConfig, RewardCombiner, RewardSet

acc = Accelerator(cpu=True)
run = type("R", (), {"world": acc.num_processes, "accelerator": acc})()
cfg = CombineConfig(combine=sys.argv[1], safety_reward="safe", lagrange_lr=0.3, cost_limit=-0.5)
rewards = RewardSet({}, RewardCombiner(cfg, ["help", "safe"]), {})
g = torch.Generator().manual_seed(0)
out = []
for step in range(3):  # the same global batches as the one-process run: 8 per step, process k holds rows 4k..4k+3
    help_, safe = torch.randn(8, generator=g), torch.randn(8, generator=g)
    risky = torch.arange(8) % 3 == 0
    share = slice(4 * acc.process_index, 4 * acc.process_index + 4) if acc.num_processes == 2 else slice(0, 8)
    combined, metrics = combine_global(run, rewards, {"help": help_[share], "safe": safe[share]}, risky[share])
    out.append({"combined": combined.tolist(), "metrics": metrics})
# one file per process: two processes printing to one pipe can interleave their lines
with open(f"{sys.argv[2]}.rank{acc.process_index}.json", "w") as fh:
    json.dump({"rank": acc.process_index, "steps": out}, fh)
acc.wait_for_everyone()
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
'''


@pytest.mark.slow
@pytest.mark.parametrize("combine", ["gated", "lagrangian"])
def test_two_processes_combine_over_the_global_batch_as_one_does(tmp_path, combine):
    """accelerate launch with 2 CPU processes (gloo): each process's scores are gathered before combining, so the
    normalisers, the gate's whitening and the Lagrange multiplier see the global batch, stay identical on both
    processes, and each process gets its share of what one process computes."""
    import os
    import shutil
    import subprocess
    import sys

    script = tmp_path / "combine_global.py"
    script.write_text(_GLOBAL)
    one = subprocess.run([sys.executable, str(script), combine, str(tmp_path / "one")], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    two = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", str(script), combine, str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert two.returncode == 0, two.stderr[-3000:]

    def results(stem):
        return [json.loads(p.read_text()) for p in sorted(tmp_path.glob(f"{stem}.rank*.json"))]

    (single,) = results("one")
    ranks = sorted(results("two"), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    for step, want in enumerate(single["steps"]):
        got = ranks[0]["steps"][step]["combined"] + ranks[1]["steps"][step]["combined"]
        assert got == pytest.approx(want["combined"], abs=1e-5)
        for r in ranks:  # the multiplier and the gate's fractions are global, the same on both processes
            assert r["steps"][step]["metrics"] == pytest.approx(want["metrics"], abs=1e-6)
