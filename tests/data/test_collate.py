"""Batch layouts: one first-fit rule packs both SFT's packed rows and padding-free batches (giving the bins the two
former packers gave), and a packed batch holds exactly the padded batch's sequences, each seeing only itself."""

import random

import pytest
import torch

from rlhfkit.data.collate import (
    PackedRow, collate_packed, collate_sft, first_fit, pack_examples, pack_rows, packed_batch, padded_batch,
    sequence_batch,
)
from rlhfkit.data.sft import SFTExample


def test_first_fit_fills_the_first_row_with_room_in_data_order():
    # width 10: 6 opens row 0 (room 4); 5 opens row 1 (room 5); 4 fits row 0 (room 0); 3 fits row 1 (room 2);
    # 2 fits row 1 (room 0); 7 opens row 2 (room 3); 1 fits row 2 (room 2)
    assert first_fit([6, 5, 4, 3, 2, 7, 1], 10) == [[0, 2], [1, 3, 4], [5, 6]]
    assert first_fit([12, 3], 10) == [[0], [1]]  # too long for any row: a row of its own, which nothing joins


def test_pack_rows_is_first_fit_longest_first_within_the_longest_length():
    # longest first: 9 (index 1), 6 (3), 4 (2), 3 (0), 2 (4) into rows of 9: 9 fills row 0; 6 opens row 1
    # (room 3); 4 opens row 2 (room 5); 3 fits row 1; 2 fits row 2
    assert pack_rows([3, 9, 4, 6, 2]) == [[1], [3, 0], [2, 4]]
    assert pack_rows([2, 4, 2, 2]) == [[1], [0, 2], [3]]  # equal lengths are taken in data order


def _former_pack_rows(lengths):
    """data.packing.pack_rows before the data layer had one packer (padding-free batches), verbatim."""
    width = max(lengths)
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def _former_pack_examples(lengths, max_length):
    """data.sft.pack_examples before (SFT packing), verbatim but on lengths: the rows as lists of indices."""
    rows = []
    for i, n in enumerate(lengths):
        for row in rows:
            if sum(lengths[j] for j in row) + n <= max_length:
                row.append(i)
                break
        else:
            rows.append([i])
    return rows


@pytest.mark.parametrize("seed", range(4))
def test_the_one_packer_gives_the_bins_both_former_packers_gave(seed):
    """Merging the two packers must not move any example to another row: the SFT and DPO batches the demo trains
    on stay the same."""
    rng = random.Random(seed)
    for _ in range(300):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 24))]
        assert pack_rows(lengths) == _former_pack_rows(lengths)
        max_length = rng.randint(max(lengths), 120)
        examples = [SFTExample([7] * n, [1] * n, row=i) for i, n in enumerate(lengths)]
        packed = [[e.row for e in r.examples] for r in pack_examples(examples, max_length)]
        assert packed == _former_pack_examples(lengths, max_length)


IDS = [[5, 6, 7], [8], [9, 10], [11, 12, 13]]
MASKS = [[0, 1, 1], [1], [0, 1], [0, 0, 1]]


def test_packed_layout_holds_each_padded_sequence_and_attends_within_it():
    rows = pack_rows([len(s) for s in IDS])
    assert rows == [[0], [3], [2, 1]]
    packed = packed_batch(IDS, rows, 0, response_mask=MASKS)
    assert packed["input_ids"].tolist() == [[5, 6, 7], [11, 12, 13], [9, 10, 8]]
    assert packed["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2], [0, 1, 0]]
    assert packed["response_mask"].tolist() == [[0, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert packed["segment"].tolist() == [[0, 0, 0], [3, 3, 3], [2, 2, 1]]
    assert packed["row_index"].tolist() == [0, 2, 2, 1] and packed["last_index"].tolist() == [2, 2, 1, 2]
    padded = padded_batch(IDS, 0, response_mask=MASKS)
    assert padded["last_index"].tolist() == [2, 0, 1, 2]
    for n, seq in enumerate(IDS):  # sequence n sits in its row, ending at last_index, as it is padded
        r, end = packed["row_index"][n], packed["last_index"][n] + 1
        assert packed["input_ids"][r, end - len(seq) : end].tolist() == padded["input_ids"][n, : len(seq)].tolist()
    allowed = packed["attention_mask"][2, 0] == 0  # (T, T) row 2: [9, 10 | 8]
    assert allowed.tolist() == [[True, False, False], [True, True, False], [False, False, True]]


def test_padding_free_falls_back_to_padding_when_packing_saves_no_row():
    batch = sequence_batch([[1, 2], [3, 4], [5]], 0, padding_free=True, response_mask=[[1, 1], [1, 1], [1]])
    assert batch["attention_mask"].dim() == 2 and batch["input_ids"].tolist() == [[1, 2], [3, 4], [5, 0]]
    packed = sequence_batch(IDS, 0, padding_free=True, response_mask=MASKS)
    assert packed["attention_mask"].shape == (3, 1, 3, 3)


def test_sft_batches_keep_their_per_token_keys():
    examples = [SFTExample(ids, mask, row=i + 1) for i, (ids, mask) in enumerate(zip(IDS, MASKS))]
    padded = collate_sft(examples, 0)
    assert list(padded) == ["input_ids", "attention_mask", "loss_mask"]
    assert padded["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    # padding-free: the layout of collate_packed on the rows pack_rows picks
    free = collate_sft(examples, 0, padding_free=True)
    rows = [PackedRow([examples[i] for i in r]) for r in pack_rows([len(s) for s in IDS])]
    expected = collate_packed(rows, 0)
    assert list(free) == list(expected) == ["input_ids", "attention_mask", "position_ids", "loss_mask"]
    for key in expected:
        assert torch.equal(free[key], expected[key]), key
    assert free["loss_mask"].tolist() == [[0, 1, 1], [0, 0, 1], [0, 1, 1]]


def _pairs(prompt_len: int, response_len: int, n: int) -> list:
    from rlhfkit.data.preference_tokens import TokenizedPair

    prompt = list(range(1, prompt_len + 1))
    out = []
    for i in range(n):
        chosen, rejected = [100 + i] * response_len, [200 + i] * response_len
        out.append(TokenizedPair(prompt, prompt + chosen, [1] * (prompt_len + response_len),
                                 [0] * prompt_len + [1] * response_len, prompt + rejected,
                                 [1] * (prompt_len + response_len), [0] * prompt_len + [1] * response_len))
    return out


def test_a_pairs_prompt_is_shared_unless_the_wider_rows_cost_clearly_more():
    from rlhfkit.data.collate import collate_pairs, shared_prefix_pays

    def ids_groups(pairs):
        return ([p.chosen_input_ids for p in pairs] + [p.rejected_input_ids for p in pairs],
                [[i, len(pairs) + i] for i in range(len(pairs))])

    # a long prompt, short answers: one copy of the prompt saves more than the wider rows cost, at any model size
    long_prompt = _pairs(20, 3, 4)
    assert all(shared_prefix_pays(*ids_groups(long_prompt), w) for w in (1.0, 16.0, 1e5))
    # a one-token prompt, 40-token answers: the shared rows are 81 wide against 41, 4 of them against 8 padded
    # ones: 4 * 81 * (16 + 81) = 31,428 against 8 * 41 * (16 + 41) = 18,696 on a small model (1.68x dearer) ...
    short_prompt = _pairs(1, 40, 4)
    assert not shared_prefix_pays(*ids_groups(short_prompt), 16.0)
    # ... but the same (0.99x) where the linear layers outweigh attention, and always without an estimate
    assert shared_prefix_pays(*ids_groups(short_prompt), 1e5) and shared_prefix_pays(*ids_groups(short_prompt), None)
    # the collate function follows: the packed layout, with per-token response masks, instead of target_* entries
    plain = collate_pairs(short_prompt, 0, padding_free=True, share_prompt=True, token_weight=16.0)
    assert "response_mask" in plain and "target_owner" not in plain
    shared = collate_pairs(short_prompt, 0, padding_free=True, share_prompt=True, token_weight=1e5)
    assert "target_owner" in shared and shared["input_ids"].shape == (4, 81)


def test_the_attention_token_weight_reads_the_decoder_config_under_wrappers():
    from transformers import LlamaConfig

    from rlhfkit.models import attention_token_weight

    class Model:
        config = LlamaConfig(hidden_size=64, intermediate_size=128)

    class Wrapper:  # DDP and DeepSpeed keep the model under .module
        module = Model()

    assert attention_token_weight(Model()) == 2 * 64 + 1.5 * 128
    assert attention_token_weight(Wrapper()) == 320.0
    assert attention_token_weight(object()) is None
