"""The prompt cursor: which prompt the controller admits next.

Each epoch visits every prompt once, in an order shuffled from (seed, epoch), so a run and its resume
walk the same order. Prompts given back (a group dropped as too stale, a failed group, groups that were
in flight at a checkpoint) come before new ones. ``epochs=None`` cycles over the data forever.
"""

from __future__ import annotations

import random
from collections import deque


class PromptCursor:
    def __init__(self, num_prompts: int, *, shuffle: bool = True, seed: int = 0, epochs: int | None = None):
        if num_prompts < 1:
            raise ValueError("no prompts to roll out")
        self.num_prompts, self.shuffle, self.seed, self.epochs = num_prompts, shuffle, seed, epochs
        self.epoch, self.pos = 0, 0
        self.given_back: deque[int] = deque()
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_prompts))
        if self.shuffle:
            random.Random(self.seed * 100003 + epoch).shuffle(order)
        return order

    def next(self) -> int | None:
        """The next prompt index; None once the last epoch is done and nothing was given back."""
        if self.given_back:
            return self.given_back.popleft()
        if self.epochs is not None and self.epoch >= self.epochs:
            return None
        idx = self._order[self.pos]
        self.pos += 1
        if self.pos == len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        return idx

    def give_back(self, idx: int, *, first: bool = False) -> None:
        """Hand a prompt back to be admitted again (``first``: before every other prompt given back)."""
        (self.given_back.appendleft if first else self.given_back.append)(idx)

    def exhausted(self) -> bool:
        return not self.given_back and self.epochs is not None and self.epoch >= self.epochs

    def state_dict(self, pending: list[int]) -> dict:
        """The position, with ``pending`` (prompts admitted but not delivered, in admission order) ahead of
        the prompts given back: the order in which an uninterrupted run would have delivered them."""
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "shuffle": self.shuffle,
                "num_prompts": self.num_prompts, "pending": list(pending) + list(self.given_back)}

    def load_state_dict(self, sd: dict) -> None:
        if sd["num_prompts"] != self.num_prompts:
            raise ValueError(f"rollout state is for a dataset of {sd['num_prompts']} prompts, this one has "
                             f"{self.num_prompts}")
        self.seed, self.shuffle = sd["seed"], sd["shuffle"]
        self.epoch, self.pos = sd["epoch"], sd["pos"]
        self._order = self._epoch_order(self.epoch)
        self.given_back = deque(sd["pending"])
