"""Training speed and memory of a real `fit` run, measured from the loop itself."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


def _batch_size(batch) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(first.shape[0])


class TrainingSpeed(Callback):
    """Training samples/s over all ranks (after `warmup_steps` optimiser steps) and peak GPU memory per rank.

    The clock runs over the training batches and the data loading between them, from the first timed batch to the
    end of fit; it stops when a validation pass starts and restarts at the next training batch, so the validation
    passes between epochs do not count.

    Printed at the end of fit and written to `<log_dir or default_root_dir>/training_speed.json`.

    Args:
        warmup_steps: Optimiser steps left out of the timing (compilation, allocator warm-up).
    """

    def __init__(self, warmup_steps: int = 20):
        self.warmup_steps = warmup_steps
        self._start: float | None = None
        self._seconds = 0.0  # timed training seconds before the latest pause
        self._samples = 0
        self._steps = 0

    def _sync(self, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if self._start is None and trainer.global_step >= self.warmup_steps:
            self._sync(pl_module)
            self._start = time.perf_counter()

    def _pause(self, pl_module: LightningModule) -> None:
        if self._start is not None:
            self._sync(pl_module)
            self._seconds += time.perf_counter() - self._start
            self._start = None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pause(pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._start is not None:
            self._samples += _batch_size(batch) * trainer.world_size
            self._steps += 1

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pause(pl_module)
        if self._steps == 0:
            rank_zero_info(f"TrainingSpeed: fewer than {self.warmup_steps} warm-up steps ran; nothing measured")
            return
        seconds = self._seconds
        peak_gb = torch.cuda.max_memory_allocated(pl_module.device) / 1e9 if pl_module.device.type == "cuda" else 0.0
        result = {
            "samples_per_s": self._samples / seconds, "timed_steps": self._steps, "timed_seconds": seconds,
            "world_size": trainer.world_size,
            "peak_memory_gb_rank0": peak_gb, "device": torch.cuda.get_device_name(pl_module.device)
            if pl_module.device.type == "cuda" else "cpu",
        }
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if trainer.is_global_zero:
            out = Path(log_dir or trainer.default_root_dir) / "training_speed.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2))
            rank_zero_info(f"TrainingSpeed: {json.dumps(result)}")
