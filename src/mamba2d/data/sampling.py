"""Sampling shared by the DataModules: per-epoch reproducible shuffling and exactly-once evaluation across ranks."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, Sampler


class EpochShuffleSampler(Sampler[int]):
    """A random permutation that depends only on (seed, epoch); Lightning calls `set_epoch` before every epoch.

    Unlike RandomSampler it draws nothing from the global RNG, so the data order of a resumed run equals the
    uninterrupted run's, and the global RNG is left to the model (drop path, mixup). Under DDP Lightning wraps it
    in a DistributedSamplerWrapper that splits each epoch's order across ranks.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def training_loader_kwargs(dataset: Dataset, seed: int = 0) -> dict:
    """DataLoader arguments for training: reproducible shuffling and a private generator for worker seeds, so that
    creating the loader's iterator draws nothing from the global RNG either."""
    return {"sampler": EpochShuffleSampler(len(dataset), seed), "generator": torch.Generator().manual_seed(seed)}


def evaluation_sampler(datamodule: LightningDataModule, dataset: Dataset) -> Sampler | None:
    """Split `dataset` across ranks without the padding (repeated samples) of Lightning's default sampler.

    Lightning leaves a DistributedSampler it is given in place, so validation and test metrics, synced by
    torchmetrics, count every sample once. Returns None (plain sequential order) outside distributed runs.
    """
    trainer = datamodule.trainer
    if trainer is None or trainer.world_size <= 1:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                        shuffle=False)
