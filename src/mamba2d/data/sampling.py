"""Sampling shared by the DataModules: per-epoch reproducible shuffling split across ranks, and exactly-once
evaluation across ranks."""

from __future__ import annotations

import os

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, DistributedSampler, Sampler


def loader_sampling(datamodule: LightningDataModule, dataset: Dataset, training: bool) -> dict:
    """DataLoader arguments (sampler, generator) for a training or an evaluation loader of `datamodule`.

    Args:
        datamodule: The DataModule (its trainer gives the ranks).
        dataset: The loader's dataset.
        training: Shuffled training loader instead of an evaluation loader.
    """
    if training:
        return training_loader_kwargs(datamodule, dataset)
    return {"sampler": evaluation_sampler(datamodule, dataset)}


def training_loader_kwargs(datamodule: LightningDataModule, dataset: Dataset, seed: int | None = None) -> dict:
    """DataLoader arguments for training: a shuffle that depends only on (seed, epoch), split across ranks.

    The seed defaults to the one given to `seed_everything` (the config's `seed_everything`), else 0.

    A DistributedSampler (Lightning leaves it in place and calls `set_epoch`) with one replica outside DDP. Every
    rank permutes with the same seed and takes every world_size-th index, so a global batch under DDP holds
    exactly the samples of the single-device batch with the same global size. Nothing is drawn from the global
    RNG when a loader starts (the private generator seeds the workers), so a resumed run sees the data order and
    random stream of the uninterrupted one.

    Args:
        datamodule: The DataModule (its trainer gives the ranks).
        dataset: The training dataset.
        seed: Shuffle seed (None: the `seed_everything` seed, else 0).
    """
    if seed is None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    trainer = datamodule.trainer
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    return {"sampler": sampler, "generator": torch.Generator().manual_seed(seed)}


def evaluation_sampler(datamodule: LightningDataModule, dataset: Dataset) -> Sampler | None:
    """Split `dataset` across ranks without the padding (repeated samples) of Lightning's default sampler.

    Lightning leaves a DistributedSampler it is given in place, so validation and test metrics, synced by
    torchmetrics, count every sample once. Returns None (plain sequential order) outside distributed runs.

    Args:
        datamodule: The DataModule (its trainer gives the ranks).
        dataset: The evaluation dataset.
    """
    trainer = datamodule.trainer
    if trainer is None or trainer.world_size <= 1:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                        shuffle=False)
