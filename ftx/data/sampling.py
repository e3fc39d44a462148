"""Batch order that survives restarts and scales out: one seeded permutation per
epoch, split across ranks, resumable mid-epoch.

The permutation is ``torch.randperm(n)`` seeded with ``seed + epoch`` and each rank
takes every ``world``-th index of it (the list padded to a multiple of the world
size), exactly as ``torch.utils.data.DistributedSampler`` does; so one process with
batch 4 sees, step for step, the same examples as two DDP ranks with batch 2. ftx
gives Lightning this sampler itself (``use_distributed_sampler=False``): it is the
same in both settings, and it can skip what a resumed run already trained on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSampler(Sampler[int]):
    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, samples of this rank to skip)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before every epoch."""
        self.epoch = epoch

    def resume(self, epoch: int, skip: int) -> None:
        """The next pass over ``epoch`` starts after its first ``skip`` samples (of this rank)."""
        self._resume = (epoch, skip)

    def __len__(self) -> int:
        """A full epoch's share, also when resuming: Lightning counts batches of the
        epoch from the restored position, and the iterator simply ends sooner."""
        return math.ceil(self.size / _world()[1])

    def __iter__(self) -> Iterator[int]:
        rank, world = _world()
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        order += order[: (-len(order)) % world]
        mine = order[rank::world]
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = self._resume[1]
        self._resume = None
        return iter(mine[skip:])


def _world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def batches(dataset: Any, batch_size: int, shuffle: bool, collate_fn: Callable, seed: int, workers: int) -> DataLoader:
    """A DataLoader over ``dataset``: in :class:`EpochSampler` order when ``shuffle``,
    in order otherwise. Its own generator keeps iterator creation off the global RNG
    stream (dropout's), so a resumed run draws the same dropout masks."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed) if shuffle else None,
        collate_fn=collate_fn,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
    )
