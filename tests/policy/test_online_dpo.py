"""Online (iterative) DPO: each round samples from the policy the previous round produced, the labeller's
verdicts decide chosen and rejected, and a finished round is reused on a rerun."""

import json

import pytest

from helpers import tiny_reward_world
from rlhfkit.errors import ConfigError
from rlhfkit.models import load_causal_lm, load_tokenizer
from rlhfkit.policy import online_dpo
from rlhfkit.reward.model import load_reward_ensemble, score_texts


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("online")
    return tiny_reward_world(d, tiny_model, prompts=12, reward_steps=5)


def make_cfg(tiny_model, setup, out, **kw):
    d, prompts = setup
    base = dict(model=str(tiny_model), data=str(prompts), reward_model=str(d / "rm"), output_dir=str(out),
                rounds=2, prompts_per_round=8, max_steps=2, batch_size=4, learning_rate=1e-3, max_new_tokens=8,
                max_length=64, eval_fraction=0.0, report_to=["jsonl"], progress=False, seed=1)
    base.update(kw)
    return online_dpo.OnlineDPOConfig(**base)


def test_rounds_chain_policies_and_the_reward_model_picks_chosen(tmp_path, tiny_model, setup):
    d, _ = setup
    out = tmp_path / "run"
    summary = online_dpo.main(make_cfg(tiny_model, setup, out))
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    # round 2 starts from (and is leashed to) round 1's policy, not the original model
    import yaml

    second = yaml.safe_load((out / "round-2" / "config.yaml").read_text())
    assert second["model"] == str(out / "round-1") and second["ref_model"] == ""
    assert yaml.safe_load((out / "round-1" / "config.yaml").read_text())["model"] == str(tiny_model)
    # every written pair is ordered by the reward model
    ens = load_reward_ensemble(str(d / "rm"))
    rows = [json.loads(l) for l in (out / "round-1" / "pairs.jsonl").read_text().splitlines()]
    assert rows and len(rows) == summary["rounds"][0]["pairs"] <= 8
    prompts = [r["prompt"] for r in rows]
    assert all(isinstance(p, str) for p in prompts)  # plain-text prompts stay plain text: the ids it was sampled on
    c, _ = score_texts(ens, prompts, [r["chosen"] for r in rows])
    r_, _ = score_texts(ens, prompts, [r["rejected"] for r in rows])
    assert all(x > y for x, y in zip(c, r_))
    # the final policy is a plain Hugging Face directory
    tok = load_tokenizer(str(out))
    assert load_causal_lm(str(out), tok) is not None


def test_a_custom_labeller_decides_and_finished_rounds_are_reused(tmp_path, tiny_model, setup):
    out = tmp_path / "run"
    calls = []

    def shorter_wins(prompts, a, b):  # a labeller with a visible taste: the shorter response
        calls.append(len(a))
        return [0 if len(x) == len(y) else (1 if len(x) < len(y) else -1) for x, y in zip(a, b)]

    online_dpo.main(make_cfg(tiny_model, setup, out, rounds=1), labeller=shorter_wins)
    rows = [json.loads(l) for l in (out / "round-1" / "pairs.jsonl").read_text().splitlines()]
    assert rows and all(len(r["chosen"]) < len(r["rejected"]) for r in rows)
    # a rerun with more rounds resumes: round 1 is not sampled or labelled again
    calls.clear()
    summary = online_dpo.main(make_cfg(tiny_model, setup, out, rounds=2, resume=True), labeller=shorter_wins)
    assert len(calls) == 1 and [r["round"] for r in summary["rounds"]] == [1, 2]
    with pytest.raises(ConfigError, match="already holds a finished online-DPO run"):
        online_dpo.main(make_cfg(tiny_model, setup, out), labeller=shorter_wins)


def test_online_dpo_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="paired loss"):
        online_dpo.OnlineDPOConfig(model="m", data="d", output_dir="o", loss="kto").validate()
    with pytest.raises(ConfigError, match="temperature must be positive"):
        online_dpo.OnlineDPOConfig(model="m", data="d", output_dir="o", temperature=0).validate()


def test_data_is_documented_as_prompts_and_preference_file_options_are_refused():
    from rlhfkit.config import field_docs
    from rlhfkit.errors import ConfigError
    from rlhfkit.policy.online_dpo import OnlineDPOConfig

    assert "Prompts file" in field_docs(OnlineDPOConfig)["data"]
    for name, value in (("eval_data", "pairs.jsonl"), ("preference_ties", "drop"), ("margin_from_scores", True)):
        cfg = OnlineDPOConfig(model="m", data="p.jsonl", output_dir="o", reward_model="r", **{name: value})
        with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')} applies to preference files"):
            cfg.validate()
