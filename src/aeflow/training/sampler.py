"""Batches that mix the normal training images with a few labelled anomalies (semi-supervised training)."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from aeflow.training.distributed import rank_and_world, shard_batches


def anomalies_per_batch(batch_size: int, n_labelled: int) -> int:
    """How many labelled anomalies each batch holds: one per 8 images (2 in a batch of 16), at least one, at
    most all of them, and never the whole batch."""
    return max(1, min(batch_size // 8, n_labelled, batch_size - 1))


class LabelledBatchSampler(Sampler[list[int]]):
    """Indices into ConcatDataset([normal training images, labelled anomalies]).

    An epoch visits every normal image once, shuffled, in batches of `batch_size - a` normals plus `a` labelled
    anomalies (`anomalies_per_batch`). The anomalies are drawn without replacement from a reshuffled list,
    cycling when it runs out, so with K anomalies each is seen about as often as the others: a handful of
    labels is oversampled, not drowned by a thousand normals, and every batch holds at least one. Shuffles
    depend on (seed, epoch) only, so a resumed run sees the same batches (lightning calls `set_epoch`).

    Under DDP every rank draws the same epoch of batches and keeps its share (batches rank, rank + W, ...;
    aeflow.training.distributed.shard_batches), so each normal image is seen once per epoch over all ranks and
    every rank's batch holds its `per_batch` anomalies. The rank is read when an epoch starts.
    """

    def __init__(self, n_normal: int, n_labelled: int, batch_size: int, seed: int = 0):
        if n_normal < 1 or n_labelled < 1:
            raise ValueError(f"need normal and labelled images, got {n_normal} and {n_labelled}")
        self.n_normal, self.n_labelled = n_normal, n_labelled
        self.per_batch = anomalies_per_batch(batch_size, n_labelled)
        self.normals_per_batch = batch_size - self.per_batch
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.epoch_batches() // rank_and_world()[1])

    def epoch_batches(self) -> int:
        """Batches in one epoch over all ranks together."""
        return -(-self.n_normal // self.normals_per_batch)

    def all_batches(self) -> list[list[int]]:
        """The epoch's batches of all ranks together (what one process trains on)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        normals = torch.randperm(self.n_normal, generator=generator).tolist()
        count = self.epoch_batches()
        rounds = -(-count * self.per_batch // self.n_labelled)
        anomalies = [self.n_normal + i for _ in range(rounds)
                     for i in torch.randperm(self.n_labelled, generator=generator).tolist()]
        return [normals[b * self.normals_per_batch:(b + 1) * self.normals_per_batch]
                + anomalies[b * self.per_batch:(b + 1) * self.per_batch] for b in range(count)]

    def __iter__(self):
        yield from shard_batches(self.all_batches(), *rank_and_world())
