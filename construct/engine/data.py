"""Resumable, reproducible data order for training.

The sampler yields ``(epoch, index)`` pairs in an order fixed by (seed, epoch) and can start
mid-epoch; the dataset wrapper seeds each sample's augmentation from (seed, epoch, index).
Together they make a resumed run see exactly the batches an uninterrupted run would, whatever
the number of DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from construct.data.datasets import TrainDataset
from construct.data.transforms import flip_rotate


class ResumableSampler(Sampler):
    """Shuffled indices of one epoch for one rank, optionally skipping the first batches."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per rank per epoch (the last, incomplete batch is dropped)."""
        return self.size // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        used = self.batches_per_epoch * self.batch_size * self.world_size
        mine = order[:used][self.rank :: self.world_size]
        for index in mine[self.start_batch * self.batch_size :]:
            yield self.epoch, index

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class SeededAugmentation(Dataset):
    """Applies the training flips/rotations with a generator seeded per (seed, epoch, index), to the
    item's image and, when it has one, identically to its mask."""

    def __init__(self, dataset: TrainDataset | Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        item = self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            item["image"], mask = flip_rotate(item["image"], item.get("mask"))
        if mask is not None:
            item["mask"] = mask
        return item
