"""Batch samplers: a shuffled order or identity-balanced (P x K) batches, sharded by rank.

Each epoch's order is a pure function of (seed, epoch), so every process agrees on the
global batch and a resumed run can skip the batches it already trained on. Rank r of W
takes rows [r*B, (r+1)*B) of each global batch of W*B items: the union over ranks is
exactly the batch one process would see with batch size W*B.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np


def shuffled_order(n: int, rng: np.random.Generator) -> list[int]:
    return rng.permutation(n).tolist()


def identity_balanced_order(pids: Sequence[int], p: int, k: int, rng: np.random.Generator) -> list[int]:
    """Consecutive groups of P identities x K items; identities with fewer than K items are
    sampled with replacement. Every identity appears once per epoch."""
    by_pid: dict[int, list[int]] = defaultdict(list)
    for i, pid in enumerate(pids):
        by_pid[pid].append(i)
    ids = list(by_pid)
    rng.shuffle(ids)
    order: list[int] = []
    for pid in ids:
        items = by_pid[pid]
        pick = rng.choice(items, size=k, replace=len(items) < k)
        order.extend(int(i) for i in pick)
    return order


class GlobalBatchSampler:
    """Yields this rank's index lists; ``len`` is the number of batches per epoch."""

    def __init__(
        self,
        pids: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        identity_k: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        """``batch_size`` is per process; ``identity_k`` > 0 selects P x K batches
        (P = global batch / K)."""
        self.pids = list(pids)
        self.batch_size, self.seed, self.k = batch_size, seed, identity_k
        self.rank, self.world = rank, world_size
        self.global_batch = batch_size * world_size
        if identity_k and self.global_batch % identity_k:
            raise ValueError(f"global batch {self.global_batch} is not a multiple of K={identity_k}")
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; skip its first ``start_batch`` batches (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _order(self) -> list[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.k:
            return identity_balanced_order(self.pids, self.global_batch // self.k, self.k, rng)
        return shuffled_order(len(self.pids), rng)

    def num_batches(self) -> int:
        n = len(set(self.pids)) * self.k if self.k else len(self.pids)
        return n // self.global_batch

    def __len__(self) -> int:
        return self.num_batches() - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        for b in range(self.start_batch, self.num_batches()):
            start = b * self.global_batch + self.rank * self.batch_size
            yield order[start : start + self.batch_size]
