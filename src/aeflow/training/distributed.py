"""What training needs to know about the other processes of a multi-process (DDP) run, and how they share data.

Lightning runs the training loop and DDP (`aeflow.training.run`); this module holds the few pieces it does not:

- `launched_rank()`: this process's global rank as its launcher (torchrun, SLURM's srun, lightning's own `ddp`
  launcher) announces it in the environment, before any process group exists, so that only rank 0 writes the
  run folder's config.json, splits.json and train.log.
- `rank_and_world()`: (rank, world size) of the process group once it exists, (0, 1) without one.
- `ShardSampler`: training indices shuffled by (seed, epoch) and dealt out over the ranks, resolved when an epoch
  starts (under `ddp_spawn` the ranks exist only then). Global batch k of W ranks with per-rank batch B holds the
  same images as batch k of one process with batch W * B: what makes a DDP run comparable to one process.
- `WholeSplitSampler`: every index on every rank (validation is not sharded: see `aeflow.training.module`).
- `shard_batches`: one rank's share of an epoch's batches (aeflow.training.sampler.LabelledBatchSampler).

The memory-bank models fit on shards with torch.distributed themselves (PaDiM all-reduces its sums, PatchCore
gathers per-rank coresets) when a process group exists; `aeflow.training.run` starts one for them under "ddp".
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

#: Strategies `aeflow train --strategy` accepts: lightning's names.
STRATEGIES = ("auto", "ddp", "ddp_spawn")
# Environment variables launchers set to a process's rank: torchrun (RANK, LOCAL_RANK, GROUP_RANK), lightning's
# ddp launcher for the processes it starts (LOCAL_RANK, NODE_RANK), SLURM (SLURM_PROCID).
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def launched_rank() -> int:
    """0 for the process that writes the run folder, > 0 for the others, read from the launcher's environment.

    Any non-zero rank variable makes the process a non-zero rank: e.g. lightning's ddp launcher gives the
    processes it starts LOCAL_RANK = 1, 2, ...; torchrun gives every process its RANK."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "0")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardSampler(DistributedSampler):
    """torch's DistributedSampler (shuffle by seed + epoch, pad the order to a multiple of the world size by
    repeating its start, rank r takes positions r, r + W, ...), with the rank and world size taken from the
    process group when iterated rather than when built. `pad=False` gives ranks shards of unequal length and never
    repeats an index: for one-pass fits whose statistics are sums (PaDiM), where a repeat would count twice.

    A DistributedSampler subclass, so lightning keeps it as it is instead of replacing it by its own."""

    def __init__(self, dataset, *, shuffle: bool = True, seed: int = 0, pad: bool = True):
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=seed, drop_last=False)
        self.pad = pad

    def _order(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        return list(range(n))

    def __iter__(self) -> Iterator[int]:
        rank, world = rank_and_world()
        order = self._order()
        if self.pad and len(order) % world:
            extra = world - len(order) % world
            order += (order * (extra // len(order) + 1))[:extra]
        return iter(order[rank::world])

    def __len__(self) -> int:
        rank, world = rank_and_world()
        n = len(self.dataset)
        return -(-n // world) if self.pad else len(range(rank, n, world))


class WholeSplitSampler(DistributedSampler):
    """Every index, in order, on every rank (a DistributedSampler only so that lightning does not shard it)."""

    def __init__(self, dataset):
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.dataset)))

    def __len__(self) -> int:
        return len(self.dataset)


def shard_batches(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """Rank `rank`'s share of one epoch's `batches`: batches rank, rank + W, ...; every rank gets the same number
    (DDP steps all ranks together), so when the count does not divide, the first batches are dealt again."""
    per_rank = -(-len(batches) // world)
    return [batches[(rank + world * k) % len(batches)] for k in range(per_rank)]


__all__ = ["STRATEGIES", "ShardSampler", "WholeSplitSampler", "launched_rank", "rank_and_world", "shard_batches"]
