import math

import pytest
import torch

from rlhfkit.losses.reward import (
    batched_ranking_loss,
    beats_from_ranking,
    best_of_k_loss,
    bradley_terry_loss,
    centering_penalty,
    ranking_loss,
)

LOG2 = math.log(2)


def neg_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


def test_bradley_terry_hand_values():
    chosen = torch.tensor([1.0, 3.0, 0.0])
    rejected = torch.tensor([1.0, 1.0, 2.0])
    loss, stats = bradley_terry_loss(chosen, rejected)
    # gaps [0, 2, -2]: -log σ(0) = log 2; -log σ(2) = log(1 + e^-2); -log σ(-2) = log(1 + e^2)
    expected = (LOG2 + math.log1p(math.exp(-2)) + math.log1p(math.exp(2))) / 3
    assert loss.item() == pytest.approx(expected)
    assert stats.accuracy.item() == pytest.approx(1 / 3)  # only the gap-2 pair; a zero gap is not a win
    assert stats.margin.item() == pytest.approx(0.0)  # (0 + 2 - 2) / 3
    assert stats.chosen_reward.item() == pytest.approx(4 / 3)
    assert stats.rejected_reward.item() == pytest.approx(4 / 3)
    assert stats.num_pairs.item() == 3


def test_equal_rewards_give_log2_and_margin_shifts_the_logit():
    zero, _ = bradley_terry_loss(torch.tensor([0.5]), torch.tensor([0.5]))
    assert zero.item() == pytest.approx(LOG2)  # σ(0) = 1/2
    # a gap of 1 with margin 1 is logit 0 again: log 2
    gap_one, _ = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=torch.tensor([1.0]))
    assert gap_one.item() == pytest.approx(LOG2)
    # per-pair margins [0, 3] on gaps [1, 1]: logits [1, -2]
    loss, stats = bradley_terry_loss(torch.tensor([1.0, 1.0]), torch.zeros(2), margin=torch.tensor([0.0, 3.0]))
    assert loss.item() == pytest.approx((neg_log_sigmoid(1) + neg_log_sigmoid(-2)) / 2)
    assert stats.accuracy.item() == 1.0  # accuracy is about the reward gap, not the margin
    # a float margin broadcasts
    flt, _ = bradley_terry_loss(torch.tensor([1.0, 1.0]), torch.zeros(2), margin=1.0)
    assert flt.item() == pytest.approx(LOG2)


def test_bradley_terry_is_stable_for_huge_gaps():
    chosen = torch.tensor([100.0, -100.0], requires_grad=True)
    rejected = torch.tensor([-100.0, 100.0])
    loss, _ = bradley_terry_loss(chosen, rejected)
    # gap +200 costs ~0; gap -200 costs ~200: mean 100
    assert torch.isfinite(loss) and loss.item() == pytest.approx(100.0)
    loss.backward()
    # d/dr_c of -log σ(Δ) / B = -σ(-Δ) / 2: ~0 for Δ = 200, -1/2 for Δ = -200
    torch.testing.assert_close(chosen.grad, torch.tensor([0.0, -0.5]))


def test_bradley_terry_gradient_matches_hand_derivative():
    chosen = torch.tensor([0.3, -0.2], requires_grad=True)
    rejected = torch.tensor([0.1, 0.4], requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.5, 0.0]))
    loss.backward()
    logits = torch.tensor([0.3 - 0.1 - 0.5, -0.2 - 0.4])
    # ∂L/∂r_c = -σ(-logit) / B, ∂L/∂r_r = +σ(-logit) / B
    torch.testing.assert_close(chosen.grad, -torch.sigmoid(-logits) / 2)
    torch.testing.assert_close(rejected.grad, torch.sigmoid(-logits) / 2)


def test_bradley_terry_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))


def test_three_response_ranking_by_hand():
    rewards = torch.tensor([1.0, 0.0, 2.0])
    # ranking best first: 2 ≻ 0 ≻ 1 -> pairs (2,0) gap 1, (2,1) gap 2, (0,1) gap 1; C(3,2) = 3
    loss, stats = ranking_loss(rewards, [2, 0, 1])
    expected = (neg_log_sigmoid(1) + neg_log_sigmoid(2) + neg_log_sigmoid(1)) / 3
    assert loss.item() == pytest.approx(expected)
    assert stats.accuracy.item() == 1.0 and stats.num_pairs.item() == 3
    assert stats.margin.item() == pytest.approx(4 / 3)
    # winners r_2, r_2, r_0 = 2, 2, 1; losers r_0, r_1, r_1 = 1, 0, 0
    assert stats.chosen_reward.item() == pytest.approx(5 / 3)
    assert stats.rejected_reward.item() == pytest.approx(1 / 3)
    # the reversed ranking is worse
    worse, _ = ranking_loss(rewards, [1, 0, 2])
    assert worse.item() > loss.item()


def test_ranking_with_ties_skips_tied_pairs_and_normalises_by_the_rest():
    rewards = torch.tensor([3.0, 1.0, 1.5, 0.0])
    # [[0], [2, 1], [3]]: 0 ≻ {2, 1} ≻ 3; pairs (0,2) 1.5, (0,1) 2, (0,3) 3, (2,3) 1.5, (1,3) 1; 5 of C(4,2) = 6
    loss, stats = ranking_loss(rewards, [[0], [2, 1], [3]])
    expected = sum(neg_log_sigmoid(g) for g in (1.5, 2.0, 3.0, 1.5, 1.0)) / 5
    assert loss.item() == pytest.approx(expected)
    assert stats.num_pairs.item() == 5
    # swapping the two tied responses' rewards leaves the loss unchanged: the tie carries no preference
    # (an implementation that read [2, 1] as 2 ≻ 1 would change here)
    swapped, _ = ranking_loss(torch.tensor([3.0, 1.5, 1.0, 0.0]), [[0], [2, 1], [3]])
    assert swapped.item() == pytest.approx(loss.item())


def test_ranking_accepts_a_beats_matrix_and_a_two_way_ranking_is_bradley_terry():
    rewards = torch.tensor([0.2, 1.4])
    beats = torch.tensor([[False, False], [True, False]])  # 1 beats 0
    from_matrix, _ = ranking_loss(rewards, beats)
    from_list, _ = ranking_loss(rewards, [1, 0])
    bt, _ = bradley_terry_loss(rewards[1:], rewards[:1])
    assert from_matrix.item() == pytest.approx(from_list.item()) == pytest.approx(bt.item())


def test_ranking_gradient_flows_once_per_response():
    rewards = torch.tensor([0.0, 0.0, 0.0], requires_grad=True)
    loss, _ = ranking_loss(rewards, [0, 1, 2])
    assert loss.item() == pytest.approx(LOG2)  # every gap 0
    loss.backward()
    # each pair's gradient at gap 0 is ∓σ(0)/3 = ∓1/6;
    # response 0 wins twice, 1 wins once and loses once, 2 loses twice
    torch.testing.assert_close(rewards.grad, torch.tensor([-2 / 6, 0.0, 2 / 6]))


def test_beats_from_ranking_validates_permutation():
    expected = torch.tensor([[False, True, True], [False, False, False], [False, False, False]])
    assert torch.equal(beats_from_ranking([0, [1, 2]], 3), expected)
    for bad in ([0, 1], [0, 1, 1], [0, 1, 3]):
        with pytest.raises(ValueError, match="not a permutation"):
            beats_from_ranking(bad, 3)


def test_ranking_rejects_contradictory_matrix_and_all_tied():
    with pytest.raises(ValueError, match="both i beats j and j beats i"):
        ranking_loss(torch.zeros(2), torch.tensor([[False, True], [True, False]]))
    with pytest.raises(ValueError, match="at least one ordered"):
        ranking_loss(torch.zeros(2), [[0, 1]])


def test_batched_ranking_with_different_k_equals_the_mean_of_single_prompt_losses():
    r_a = torch.tensor([1.0, -1.0, 0.5, 0.0])  # K = 4
    r_b = torch.tensor([0.3, 0.9])  # K = 2, padded to 4 with a non-finite value that must not leak
    rewards = torch.stack([r_a, torch.tensor([0.3, 0.9, float("nan"), float("inf")])])  # (G, K) = (2, 4)
    beats = torch.zeros(2, 4, 4, dtype=torch.bool)
    beats[0] = beats_from_ranking([2, 0, 3, 1], 4)
    beats[1, :2, :2] = beats_from_ranking([1, 0], 2)
    loss, stats = batched_ranking_loss(rewards, beats)
    la, _ = ranking_loss(r_a, [2, 0, 3, 1])
    lb, _ = ranking_loss(r_b, [1, 0])
    # each prompt is one batch element: (L_a + L_b) / 2, not weighted by its 6 vs 1 pairs
    assert loss.item() == pytest.approx((la.item() + lb.item()) / 2)
    assert stats.num_pairs.item() == 7 and torch.isfinite(stats.margin)


def test_best_of_k_is_softmax_cross_entropy():
    rewards = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    best = torch.tensor([0, 2])
    loss, stats = best_of_k_loss(rewards, best)
    # row 0: -log(e^2 / (e^2 + 2)); row 1: -log(1 / (2 + e))
    expected = (-math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(1 / (2 + math.e))) / 2
    assert loss.item() == pytest.approx(expected)
    assert stats.accuracy.item() == 0.5  # argmax right for row 0 only
    # (best, other) pairs: row 0 gaps 2, 2; row 1 gaps -1, 0
    assert stats.margin.item() == pytest.approx(3 / 4) and stats.num_pairs.item() == 4
    assert stats.chosen_reward.item() == pytest.approx(1.0)  # (2 + 0) / 2


def test_best_of_k_mask_ignores_padding_slots():
    rewards = torch.tensor([[1.0, 0.0, 50.0]])
    loss, stats = best_of_k_loss(rewards, torch.tensor([0]), mask=torch.tensor([[1, 1, 0]]))
    # only two real responses: -log σ(1 - 0) as in Bradley-Terry
    assert loss.item() == pytest.approx(neg_log_sigmoid(1.0))
    assert stats.accuracy.item() == 1.0 and stats.num_pairs.item() == 1


def test_centering_penalty_by_hand_and_its_gradient():
    chosen = torch.tensor([1.0, -2.0], requires_grad=True)
    rejected = torch.tensor([1.0, 0.0])
    penalty = centering_penalty(chosen, rejected, eta=0.01)
    # sums [2, -2] -> squares [4, 4] -> mean 4 -> 0.04
    assert penalty.item() == pytest.approx(0.04)
    penalty.backward()
    # ∂/∂r_c = η · 2 (r_c + r_r) / B = 0.01 · [4, -4] / 2
    torch.testing.assert_close(chosen.grad, torch.tensor([0.02, -0.02]))
    # shifting both rewards by the same constant leaves BT unchanged but the penalty sees it
    assert centering_penalty(torch.tensor([0.5]), torch.tensor([-0.5])).item() == 0.0


def test_stats_carry_the_sums_a_step_of_several_micro_batches_needs():
    # gaps 1, -1, 2: margin sum 2, chosen 1 + 2 + 3 = 6, rejected 0 + 3 + 1 = 4; one of three pairs misordered
    _, stats = bradley_terry_loss(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 3.0, 1.0]))
    assert (float(stats.margin_sum), float(stats.chosen_sum), float(stats.rejected_sum)) == (2.0, 6.0, 4.0)
    assert float(stats.accuracy) == pytest.approx(2 / 3) and int(stats.num_pairs) == 3
