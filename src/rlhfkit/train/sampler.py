"""Deterministic data order with a resumable cursor.

The order of epoch e is a permutation drawn from its own generator seeded with (seed, e), independent of the
global RNG, so the cursor (epoch, position) alone restores it exactly after a crash."""

from __future__ import annotations

import torch


class EpochSampler:
    def __init__(self, num_items: int, seed: int, shuffle: bool = True):
        if num_items < 1:
            raise ValueError("EpochSampler needs at least one item")
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._make_order(0)

    def _make_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_items, generator=gen).tolist()

    def next_indices(self, n: int) -> list[int]:
        """The next n item indices, crossing epoch boundaries (a new permutation each epoch)."""
        out: list[int] = []
        while len(out) < n:
            if self.position >= self.num_items:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._make_order(self.epoch)
            take = min(n - len(out), self.num_items - self.position)
            out.extend(self._order[self.position : self.position + take])
            self.position += take
        return out

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.position / self.num_items

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_items": self.num_items, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_items"] != self.num_items:
            raise ValueError(
                f"the checkpoint was made with {state['num_items']} training items but the data now has "
                f"{self.num_items}; resume with the same data file"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._make_order(self.epoch)
