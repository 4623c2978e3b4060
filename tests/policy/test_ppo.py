"""PPO end to end on a tiny model and reward model: artefacts, learning signal, estimators, exact resume."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import interrupt_after, preference_rows, tiny_reward_world, write_jsonl
from rlhfkit.errors import ConfigError, DataError, UserError
from rlhfkit.policy import ppo
from rlhfkit.train import read_metrics


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("ppo")
    return tiny_reward_world(d, tiny_model, prompts=24, reward_steps=10)


def cfg(tiny_model, world, out, **kw):
    d, prompts = world
    base = dict(model=str(tiny_model), data=str(prompts), reward_model=str(d / "rm"), output_dir=str(out),
                max_steps=4, batch_size=4, learning_rate=1e-3, max_new_tokens=8, ppo_epochs=2, minibatches=2,
                report_to=["jsonl"], progress=False, seed=2)
    base.update(kw)
    return ppo.PPOConfig(**base)


def test_ppo_runs_logs_the_standard_metrics_and_saves_a_plain_policy(tmp_path, tiny_model, world):
    out = tmp_path / "ppo"
    ppo.main(cfg(tiny_model, world, out, save_every=2))
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for key in ("reward/score", "kl", "kl_coef", "policy_loss", "value_loss", "clip_frac", "approx_kl",
                "explained_var", "entropy", "response_length", "eos_fraction"):
        assert key in metrics[0], key
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy starts equal to the reference
    assert all(abs(m["kl"]) > 1e-3 for m in metrics[1:])  # and leaves it with its first update
    assert (out / "value_head.safetensors").exists()
    assert (out / "checkpoints" / "step-4" / "model" / "value_head.safetensors").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no value head needed


# ------------------------------------------------------------------------------ learning signal on a toy reward
NUMBER_WORDS = [str(i) for i in range(20)]


def number_reward_model(tiny_model: Path, out: Path) -> Path:
    """A reward model set by hand, so the reward is easy to learn and known exactly: the more of a sequence's
    tokens are number words ("0" .. "19"), the higher its score.

    One Llama layer of width 4. Embeddings are one-hot: dim 1 for a number word, dim 0 for any other token, so the
    first RMSNorm scales every token by 2. Queries and keys are zero, so attention is uniform over the real tokens
    so far; values copy dim 1, the output projection writes it to dim 2, and the MLP is zero. At the last real
    token the residual is then e_last + 2f e_2, f the fraction of number words among the sequence's tokens
    (prompt, response and EOS), and after the final RMSNorm the score head (dim 2) reads 4f / sqrt(1 + 4f^2)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhfkit.models import load_tokenizer, save_pretrained

    tok = load_tokenizer(str(tiny_model))
    numbers = tok.convert_tokens_to_ids(NUMBER_WORDS)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=4, intermediate_size=4, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=4, num_labels=1,
                         max_position_embeddings=128, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, architectures=["LlamaForSequenceClassification"])
    model = LlamaForSequenceClassification(config)
    layer = model.model.layers[0]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        embed = model.model.embed_tokens.weight  # (V, 4)
        embed[:, 0] = 1.0
        embed[numbers, 0], embed[numbers, 1] = 0.0, 1.0
        layer.self_attn.v_proj.weight[0, 1] = 1.0
        layer.self_attn.o_proj.weight[2, 0] = 1.0
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm):
            norm.weight.fill_(1.0)
        model.score.weight[0, 2] = 1.0
    save_pretrained(model, tok, out)
    return out


@pytest.fixture(scope="module")
def number_world(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("ppo-numbers")
    prompts = write_jsonl(d / "prompts.jsonl", [{"prompt": r["prompt"]} for r in preference_rows(24, seed=5)])
    return number_reward_model(tiny_model, d / "rm"), prompts


def test_the_toy_reward_model_scores_the_fraction_of_number_words(number_world):
    from rlhfkit.reward.model import load_reward_ensemble, score_texts

    rm, _ = number_world
    means, _ = score_texts(load_reward_ensemble(str(rm)), ["what is 3 plus 4 ?"] * 3, ["7", "hi bo", "1 2 3 4"])
    # "<s> what is 3 plus 4 ?" is 7 tokens, 2 of them numbers; the response and its EOS follow:
    # 3 of 9 tokens, 2 of 10 and 6 of 12 are number words
    f = torch.tensor([3 / 9, 2 / 10, 6 / 12])
    torch.testing.assert_close(torch.tensor(means), 4 * f / (1 + 4 * f**2).sqrt())


# what "learned" means below: over 30 steps the mean of the last 5 steps' rewards beats the first 5's by these
LEARNED_PENALISED_GAIN = 0.5  # the reward trained on: the score, -1 for a response that never emitted EOS
LEARNED_SCORE_GAIN = 0.05  # the reward model's score alone: more number words


def learning_run(tiny_model, number_world, out, **kw):
    rm, prompts = number_world
    base = dict(model=str(tiny_model), data=str(prompts), reward_model=str(rm), output_dir=str(out), max_steps=30,
                batch_size=8, samples_per_prompt=4, learning_rate=1e-2, max_new_tokens=8, ppo_epochs=2,
                minibatches=2, report_to=["jsonl"], progress=False, seed=0)
    base.update(kw)
    ppo.main(ppo.PPOConfig(**base))
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 31))

    def gain(key):
        return sum(m[key] for m in metrics[-5:]) / 5 - sum(m[key] for m in metrics[:5]) / 5

    return metrics, gain("reward/penalised"), gain("reward/score")


@pytest.mark.parametrize("advantage", ["gae", "grpo", "rloo", "reinforce"])
def test_each_estimator_raises_a_toy_reward_within_thirty_steps(tmp_path, tiny_model, number_world, advantage):
    """The untrained tiny policy rarely ends a response within 8 tokens (an unended one scores -1) and says a number
    word about a third of the time. Each estimator learns to end its responses (penalised reward about -0.8 ->
    +1.1 on this seed) and to say more number words (score about 1.0 -> 1.1..1.3)."""
    metrics, penalised, score = learning_run(tiny_model, number_world, tmp_path / advantage, advantage=advantage)
    assert ("value_loss" in metrics[0]) == (advantage == "gae")  # only PPO trains a value head
    assert penalised > LEARNED_PENALISED_GAIN, (penalised, score)
    assert score > LEARNED_SCORE_GAIN, (penalised, score)


def test_without_updates_the_toy_reward_stays_within_sampling_noise(tmp_path, tiny_model, number_world):
    """The control for the test above: the same run at a learning rate of 1e-12 (the policy does not move) draws
    fresh rollouts every step, and their rewards must not reach the margins that count as learning."""
    _, penalised, score = learning_run(tiny_model, number_world, tmp_path / "frozen", advantage="grpo",
                                       learning_rate=1e-12)
    assert abs(penalised) < LEARNED_PENALISED_GAIN, penalised  # 0.04 on this seed
    assert abs(score) < LEARNED_SCORE_GAIN, score  # -0.02 on this seed


@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_without_groups_are_a_config_error(advantage):
    with pytest.raises(ConfigError, match=f"advantage {advantage} compares the samples of a prompt: set "
                                          "samples_per_prompt to 2"):
        ppo.PPOConfig(model="m", data="d", output_dir="o", reward_model="r", advantage=advantage).validate()


def test_ppo_resume_is_exact(tmp_path, tiny_model, world, monkeypatch):
    full, broken = tmp_path / "full", tmp_path / "resumed"
    kw = dict(max_steps=5, save_every=2, adaptive_kl=True, kl_target=0.01, kl_horizon=10)
    ppo.main(cfg(tiny_model, world, full, **kw))
    interrupt_after(ppo.main, cfg(tiny_model, world, broken, **kw), step=3)
    state = json.loads((broken / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["kl_controller"]["value"] != 0.05  # the adaptive controller moved and is checkpointed
    ppo.main(cfg(tiny_model, world, broken, resume=True, **kw))
    a = [(m["step"], m["reward/score"], m["kl"], m["kl_coef"], m["policy_loss"]) for m in read_metrics(full / "metrics.jsonl")]
    b = [(m["step"], m["reward/score"], m["kl"], m["kl_coef"], m["policy_loss"]) for m in read_metrics(broken / "metrics.jsonl")]
    assert a == b
    for name in ("model.safetensors", "value_head.safetensors"):
        wa, wb = load_file(str(full / name)), load_file(str(broken / name))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_best_of_n_picks_the_top_score_and_reports_the_kl_bound(tmp_path, tiny_model, world):
    from rlhfkit.policy import best_of_n

    d, prompts = world
    assert best_of_n.best_of_n_kl(1) == 0.0
    assert best_of_n.best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    out = tmp_path / "bon"
    summary = best_of_n.main(best_of_n.BestOfNConfig(model=str(tiny_model), reward_model=str(d / "rm"),
                                                     data=str(prompts), output_dir=str(out), n=4, max_new_tokens=6))
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(len(r["candidates"]) == 4 for r in rows)
    for r in rows:
        assert r["score"] == max(r["scores"]) and r["response"] == r["candidates"][r["scores"].index(r["score"])]
    # the scores are the reward model's for those candidates, and the summary averages what samples.jsonl holds
    from rlhfkit.reward.model import load_reward_ensemble, score_texts

    rescored, _ = score_texts(load_reward_ensemble(str(d / "rm")), [rows[0]["prompt"]] * 4, rows[0]["candidates"])
    assert rows[0]["scores"] == pytest.approx(rescored, abs=1e-5)
    assert summary["mean_best_score"] == pytest.approx(sum(r["score"] for r in rows) / 24, abs=1e-6)
    assert summary["mean_score"] == pytest.approx(sum(sum(r["scores"]) for r in rows) / 96, abs=1e-6)
    assert summary["kl_bound"] == pytest.approx(math.log(4) - 0.75)
    with pytest.raises(UserError, match="already holds best-of-n samples; pass --overwrite"):
        best_of_n.main(best_of_n.BestOfNConfig(model=str(tiny_model), reward_model=str(d / "rm"),
                                               data=str(prompts), output_dir=str(out), n=4))


def test_monitor_with_a_falling_judge_stops_the_run(tmp_path, tiny_model, world, monkeypatch):
    calls = []

    def falling_judge(prompts, responses):  # a held-out judge that likes every step less
        calls.append(1)
        return [-float(len(calls))] * len(responses)

    # and a proxy that rises every step whatever the tiny policy does (what reward hacking looks like)
    real_load = ppo.load_reward_ensemble

    def rising_proxy(*args, **kwargs):
        ensemble = real_load(*args, **kwargs)
        real_mean_std, scored = ensemble.mean_std, []

        def mean_std(ids, mask, response_mask=None):
            scored.append(1)
            mean, std = real_mean_std(ids, mask, response_mask)
            return mean * 0.01 + len(scored), std

        ensemble.mean_std = mean_std
        return ensemble

    monkeypatch.setattr(ppo, "load_reward_ensemble", rising_proxy)

    out = tmp_path / "monitored"
    summary = ppo.main(cfg(tiny_model, world, out, max_steps=8, eval_every=1, monitor_window=1,
                           stop_on_overoptimisation=True), judge=falling_judge)
    metrics = read_metrics(out / "metrics.jsonl")
    assert all("judge/score" in m for m in metrics)
    flagged = [m["step"] for m in metrics if m.get("monitor/overoptimising")]
    # with a judge that falls every step (and no spread), the run stops at the first step whose proxy rose above
    # the proxy at the judge's peak (step 1): step 2
    proxy = [m["reward/score"] for m in metrics]
    first_rise = next(i for i in range(1, len(proxy)) if proxy[i] > proxy[0]) + 1
    assert first_rise == 2
    assert flagged == [first_rise] and metrics[-1]["step"] == first_rise and summary["steps"] == first_rise
    assert summary["overoptimisation_flagged"] is True


def test_monitor_warns_when_it_starts_firing_not_at_every_evaluation(tmp_path, tiny_model, world, caplog,
                                                                      monkeypatch):
    pattern = iter([False, True, True, False, True, True, True, False])
    monkeypatch.setattr(ppo.OveroptimisationMonitor, "update", lambda self, *a, **k: next(pattern))
    out = tmp_path / "warned"
    with caplog.at_level("INFO", logger="rlhfkit.policy.ppo"):
        summary = ppo.main(cfg(tiny_model, world, out, max_steps=8, eval_every=1),
                           judge=lambda ps, rs: [0.0] * len(rs))
    flagged = [m["step"] for m in read_metrics(out / "metrics.jsonl") if m.get("monitor/overoptimising")]
    assert flagged == [2, 3, 5, 6, 7] and summary["overoptimisation_flagged"] is True
    warned = [r.message for r in caplog.records if r.levelname == "WARNING" and "over-optimisation" in r.message]
    assert [w.split(":")[0] for w in warned] == ["step 2", "step 5"]  # once per episode, not per evaluation
    assert any("step 4: the over-optimisation monitor no longer fires" in r.message for r in caplog.records)


def test_bf16_scores_reference_and_policy_in_the_same_precision(tmp_path, tiny_model, world):
    """With precision bf16 the reference log-probs run under the same autocast as the policy's, so the KL of the
    first step (policy == reference) is zero, not bf16 rounding noise (and on a GPU the reference and reward
    passes run in bf16 instead of fp32)."""
    out = tmp_path / "bf16"
    ppo.main(cfg(tiny_model, world, out, precision="bf16", cpu=True, max_steps=1, ppo_epochs=1, minibatches=1))
    assert read_metrics(out / "metrics.jsonl")[0]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_held_out_monitor_prompts_are_judged_without_touching_the_training_stream(tmp_path, tiny_model, world):
    d, prompts = world
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"held out question {i} ?"} for i in range(5)])
    seen = []

    def judge(ps, rs):
        seen.append(list(ps))
        return [float(len(r)) for r in rs]

    plain = tmp_path / "plain"
    ppo.main(cfg(tiny_model, world, plain, eval_every=2), judge=lambda ps, rs: [0.0] * len(rs))
    held_run = tmp_path / "held"
    ppo.main(cfg(tiny_model, world, held_run, eval_every=2, eval_prompts=str(held), eval_samples=3), judge=judge)
    # the judge saw the first 3 held-out prompts at steps 2 and 4, never the training rollouts
    assert seen == [[f"held out question {i} ?" for i in range(3)]] * 2
    a, b = read_metrics(plain / "metrics.jsonl"), read_metrics(held_run / "metrics.jsonl")
    assert [m["reward/score"] for m in a] == [m["reward/score"] for m in b]  # same rollouts, same updates
    assert [m["step"] for m in b if "eval/proxy" in m] == [2, 4]
    # more answers than prompts: the prompts are asked in turn (the monitor then pairs them prompt by prompt)
    seen.clear()
    few = write_jsonl(tmp_path / "few.jsonl", [{"prompt": f"held out question {i} ?"} for i in range(3)])
    ppo.main(cfg(tiny_model, world, tmp_path / "cycled", eval_every=4, eval_prompts=str(few), eval_samples=7,
                 save_every=4),
             judge=judge)
    assert seen == [[f"held out question {i % 3} ?" for i in range(7)]]
    state = json.loads(next((tmp_path / "cycled" / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert len(state["monitor"]["per_prompt"][0]) == 3


def test_target_kl_stops_the_epochs_early_and_the_schedule_still_anneals(tmp_path, tiny_model, world):
    base = tmp_path / "plain"
    ppo.main(cfg(tiny_model, world, base))
    stopped = tmp_path / "stopped"
    ppo.main(cfg(tiny_model, world, stopped, target_kl=1e-9))  # any drift at all stops the step's updates
    a, b = read_metrics(base / "metrics.jsonl"), read_metrics(stopped / "metrics.jsonl")
    assert all(m["early_stopped"] == 0.0 for m in a) and all(m["early_stopped"] == 1.0 for m in b)
    assert [m["lr"] for m in a] == [m["lr"] for m in b]  # annealed once per rollout step either way
    # the stopped run took one Adam step per rollout step (its first minibatch, before any drift), the plain
    # run four (2 epochs x 2 minibatches): its weights moved about a quarter as far from the start
    start = load_file(str(tiny_model / "model.safetensors"))

    def moved(run):
        weights = load_file(str(run / "model.safetensors"))
        return max(float((weights[k] - start[k]).abs().max()) for k in start)

    assert 0 < moved(stopped) < moved(base) / 2, (moved(stopped), moved(base))


@pytest.mark.parametrize("advantage", ["grpo", "gae"])
def test_one_epoch_one_minibatch_reuses_the_training_forward_and_takes_the_same_steps(
        tmp_path, tiny_model, world, monkeypatch, advantage):
    """At ppo_epochs = minibatches = 1 the old log-probs and values come from the training forward (no extra
    no-grad pass); the steps taken must equal those of the separate-pass path, up to float rounding (Adam turns
    rounding-level gradient differences into weight differences of a few 1e-6 at lr 1e-3, on a few coordinates
    up to a few 1e-5)."""
    # policy_loss, approx_kl and clip_frac are not compared: with one epoch over one minibatch the ratio is 1 on
    # both paths, so they are 0 (the loss -mean(A), A whitened) whichever path ran. The gradient norm is what each
    # path computes; the rewards and KL of steps 2 and 3 follow from the weights each path's steps left.
    kw = dict(advantage=advantage, samples_per_prompt=2, ppo_epochs=1, minibatches=1, max_steps=3, whiten=True)
    calls = {"n": 0}
    real = ppo.response_forward

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(ppo, "response_forward", counting)
    ppo.main(cfg(tiny_model, world, tmp_path / "fused", **kw))
    fused_calls, calls["n"] = calls["n"], 0
    monkeypatch.setattr(ppo, "FUSE_SINGLE_PASS", False)
    ppo.main(cfg(tiny_model, world, tmp_path / "separate", **kw))
    assert (fused_calls, calls["n"]) == (3, 6)
    a, b = read_metrics(tmp_path / "fused" / "metrics.jsonl"), read_metrics(tmp_path / "separate" / "metrics.jsonl")
    for key in ("reward/score", "kl", "grad_norm", "entropy"):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], abs=1e-5), key
    assert all(m["grad_norm"] > 0.1 for m in a)  # a real gradient on both paths, not two zeros
    wa, wb = load_file(str(tmp_path / "fused" / "model.safetensors")), load_file(str(tmp_path / "separate" / "model.safetensors"))
    # a coordinate whose gradient is itself rounding noise can take a step of another direction (Adam normalises
    # it): a handful in the whole model may differ by a few % of one step; a wrong path moves whole tensors
    diffs = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert float((diffs > 1e-5).float().mean()) < 1e-3, int((diffs > 1e-5).sum())
    assert float(diffs.max()) < 5e-5, float(diffs.max())  # 5% of one step at lr 1e-3


def test_best_of_n_reads_a_datasetdict_split_through_a_column_mapping(tmp_path, tiny_model, world):
    """Prompts as a public data set ships them: a DatasetDict whose split is not train, the prompt in `question`."""
    from datasets import Dataset, DatasetDict

    from rlhfkit.policy import best_of_n

    d, prompts = world
    rows = [{"question": json.loads(line)["prompt"], "id": i}
            for i, line in enumerate(prompts.read_text().splitlines()[:3])]
    DatasetDict({"test_gen": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    base = dict(model=str(tiny_model), reward_model=str(d / "rm"), data=str(tmp_path / "ds"), n=2,
                max_new_tokens=4)
    with pytest.raises(DataError, match="--data-fields prompt=question"):  # no prompt column: names the mapping
        best_of_n.main(best_of_n.BestOfNConfig(**base, output_dir=str(tmp_path / "a"), data_split="test_gen"))
    with pytest.raises(UserError, match=r"has splits \['test_gen'\] but not 'train'"):  # the split list is named
        best_of_n.main(best_of_n.BestOfNConfig(**base, output_dir=str(tmp_path / "b"),
                                               data_fields={"prompt": "question"}))
    best_of_n.main(best_of_n.BestOfNConfig(**base, output_dir=str(tmp_path / "c"), data_split="test_gen",
                                           data_fields={"prompt": "question"}))
    got = [json.loads(line)["prompt"] for line in (tmp_path / "c" / "samples.jsonl").read_text().splitlines()]
    assert got == [r["question"] for r in rows]


def test_a_response_without_eos_never_scores_above_the_reward_models_verdict(tmp_path, tiny_model, world,
                                                                              monkeypatch):
    # a reward model that finds every answer poor (-5, below missing_eos_penalty = -1): running out of tokens must
    # not lift an answer to -1 -- under such scores that teaches the policy never to stop (a reward model whose
    # likelihood term falls with every token scores long finished answers this way)
    real_load = ppo.load_reward_ensemble

    def poor_scores(*args, **kwargs):
        ensemble = real_load(*args, **kwargs)
        ensemble.mean_std = lambda ids, mask, response_mask=None: (torch.full((ids.shape[0],), -5.0),
                                                                    torch.zeros(ids.shape[0]))
        return ensemble

    monkeypatch.setattr(ppo, "load_reward_ensemble", poor_scores)
    out = tmp_path / "poor"
    ppo.main(cfg(tiny_model, world, out, max_steps=3, max_new_tokens=3, missing_eos_penalty=-1.0))
    metrics = read_metrics(out / "metrics.jsonl")
    assert any(m["eos_fraction"] < 1.0 for m in metrics)  # some answers ran out of tokens
    assert all(m["reward/penalised"] == pytest.approx(-5.0) for m in metrics)


def test_eos_penalised_caps_unended_scores_and_leaves_ended_ones():
    score = torch.tensor([-3.0, 0.5, 2.0, -5.0])
    ended = torch.tensor([True, True, False, False])
    assert ppo.eos_penalised(score, ended, -1.0).tolist() == [-3.0, 0.5, -1.0, -5.0]
