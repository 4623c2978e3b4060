"""Paired gold win rates on the playground, including policies sampled a different number of times per prompt."""

import pytest

from rlhfkit.eval.playground import win_rate


def test_win_rate_pairs_samples_of_the_same_prompt():
    assert win_rate([1.0, 0.0, 2.0], [0.0, 0.0, 3.0]) == pytest.approx((1 + 0.5 + 0) / 3)


def test_win_rate_with_one_pick_against_several_samples_per_prompt():
    # prompt 0: pick 1.0 vs SFT [0, 2] -> 1/2; prompt 1: pick 5.0 vs SFT [5, 4] -> (0.5 + 1)/2 = 0.75
    assert win_rate([1.0, 5.0], [0.0, 2.0, 5.0, 4.0], prompts=2) == pytest.approx((0.5 + 0.75) / 2)
    assert win_rate([0.0, 2.0, 5.0, 4.0], [0.0, 2.0, 5.0, 4.0], prompts=2) == pytest.approx(0.5)  # against itself


def test_win_rate_refuses_lists_that_do_not_split_over_the_prompts():
    with pytest.raises(ValueError, match="do not split evenly over 3 prompts"):
        win_rate([1.0, 2.0], [1.0, 2.0, 3.0], prompts=3)
    with pytest.raises(ValueError, match="pass prompts="):
        win_rate([1.0, 2.0], [1.0, 2.0, 3.0, 4.0])


def test_one_evaluation_scored_by_a_second_reward_model_equals_evaluating_with_it(tmp_path):
    """The demo scores SFT's evaluation samples with the KL-cut run's reward too (other_reward_dirs) instead of
    sampling them again: the proxy is the one a separate evaluation with that reward model reports."""
    from rlhfkit.eval.playground import evaluate_policy
    from rlhfkit.playground.tasks import make_prompts
    from rlhfkit.playground.world import WorldSpec, build_initial_model
    from rlhfkit.reward import train as rtrain
    from tests.helpers import preference_rows, write_jsonl

    policy = tmp_path / "sft"
    build_initial_model(policy, WorldSpec(hidden_size=32, num_layers=1, num_heads=2))
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(16))
    rewards = []
    for seed in (0, 1):
        out = tmp_path / f"rm{seed}"
        rtrain.main(rtrain.RewardConfig(model=str(policy), data=str(prefs), output_dir=str(out), max_steps=2,
                                        batch_size=8, seed=seed, report_to=["jsonl"], progress=False,
                                        eval_fraction=0.0))
        rewards.append(str(out))
    prompts = make_prompts(seed=0, n_train=1, n_val=1, n_test=6)["test"]
    both = evaluate_policy(str(policy), prompts, samples_per_prompt=2, max_new_tokens=8, reward_dir=rewards[0],
                           other_reward_dirs=[rewards[1]], keep_samples=2)
    alone = evaluate_policy(str(policy), prompts, samples_per_prompt=2, max_new_tokens=8, reward_dir=rewards[1],
                            keep_samples=2)
    assert both.proxy_score != alone.proxy_score  # two different reward models
    assert both.scored_by(rewards[1]) == alone
    assert "other_proxy_scores" not in both.summary()
    with pytest.raises(KeyError, match="rm0: not one of this evaluation's reward models"):
        alone.scored_by(rewards[0])
