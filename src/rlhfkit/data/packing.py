"""Padding-free batches: which sequences share a row. The layouts themselves (block-diagonal masks, positions
restarting per sequence) are built by the collate functions of `data.sft` and `data.preference`."""

from __future__ import annotations

import torch


def pack_rows(lengths: list[int]) -> list[list[int]]:
    """First-fit-decreasing packing of sequences (by index) into rows no wider than the longest one; each row's
    indices are in the order they are laid out. Rows are as wide as padding would make them, so attention costs
    what it costs padded while the padding's share of the linear layers is mostly gone."""
    width = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
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


def block_diagonal_mask(segment: torch.Tensor) -> torch.Tensor:
    """Additive attention mask (R, 1, T, T) for packed rows: 0 where query t may attend key s (same sequence,
    s <= t), the float32 minimum elsewhere. segment: (R, T) index of the sequence at each position, -1 = padding.

    Additive, not boolean: transformers hands a 4-D mask to the attention kernel as it is, and eager attention
    *adds* it to the scores, so a boolean mask there adds 1 / 0 and lets packed sequences see each other (sdpa
    reads a boolean mask as "may attend"; an additive float mask means the same thing to both). Padding attends
    to itself, so no softmax row is fully masked."""
    T = segment.shape[1]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=segment.device))  # (T, T)
    allowed = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0) & causal  # (R, T, T)
    allowed |= torch.eye(T, dtype=torch.bool, device=segment.device)
    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=segment.device)
    return mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None]  # (R, 1, T, T)
