"""Checkpoints every task writes: the best on validation, the latest, and the random state for exact resumption."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class ResumeRandomState(Callback):
    """Stores the Python, NumPy, torch (and CUDA) RNG states in every checkpoint and restores them when the resumed
    training epoch starts. Together with the DataModules' training sampler (data order a function of the epoch,
    no global draws when a loader starts) the model then sees the same random stream as in an uninterrupted run.

    Lightning restores weights, optimiser, scheduler, step counters and callbacks but not the RNG states, so
    without this a resumed run shuffles, augments and drops paths differently from an uninterrupted one.
    Checkpoints are taken at epoch ends (ModelCheckpoint's last.ckpt), where no random draw is pending.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        states = _collect_rng_states(include_cuda=True)
        # NumPy's key array becomes a tensor so that checkpoints still load with torch.load(weights_only=True).
        kind, key, *rest = states["numpy"]
        states["numpy"] = (kind, torch.from_numpy(key.astype(np.int64)), *rest)
        return {"rng": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = dict(state_dict["rng"])
        kind, key, *rest = states["numpy"]
        states["numpy"] = (kind, np.asarray(key, dtype=np.uint32), *rest)
        self._pending = states

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None


def checkpoint_callbacks(monitor: str, mode: str) -> list[Callback]:
    """`best.ckpt` (model selection on the validation metric `monitor`), `last.ckpt` rewritten after every epoch
    (Lightning's own save_last only writes when a new best is saved), and the RNG state for exact resumption."""
    return [
        ModelCheckpoint(monitor=monitor, mode=mode, filename="best", save_top_k=1, enable_version_counter=False),
        ModelCheckpoint(filename="last", save_top_k=1, enable_version_counter=False),
        ResumeRandomState(),
    ]
