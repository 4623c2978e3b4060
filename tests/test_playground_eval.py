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
