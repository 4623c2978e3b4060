"""Padding-free batches: which sequences share a row. The layouts themselves (block-diagonal masks, positions
restarting per sequence) are built by the collate functions of `data.sft` and `data.preference`."""

from __future__ import annotations


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
