"""Checkpoints a run writes: the best on validation, the latest, and the random state for exact resumption.

They are trainer callbacks, listed in the shipped configs (`trainer.callbacks`), so a user's own `ModelCheckpoint`
replaces them; `default_callbacks()` gives the same set to a `Trainer` built in Python.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from ..compat import collect_rng_states, set_rng_states


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
        states = collect_rng_states()
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
            set_rng_states(self._pending)
            self._pending = None


class _RestoredOnlyForFit(ModelCheckpoint):
    """A `ModelCheckpoint` whose bookkeeping (best score, paths) is restored from a checkpoint only by `fit`.

    `validate`, `test` and `predict` write no checkpoint, and they log beside the run (not into its `checkpoints/`
    folder), so restoring would only warn that the folder changed.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._stage = stage
        super().setup(trainer, pl_module, stage)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if getattr(self, "_stage", "fit") == "fit":
            super().load_state_dict(state_dict)


class BestCheckpoint(_RestoredOnlyForFit):
    """`best.ckpt`: the checkpoint of the best validation epoch, ties broken by a second metric.

    A metric that saturates (a validation AUROC of 1.0 reached early and kept) would otherwise leave the first epoch
    that reached it as "best", however much the model improved afterwards. Here an epoch that equals the best
    value of `monitor` replaces it when its `tie_breaker` is better; without the tie breaker (not logged), the
    earlier epoch stays, as with a plain `ModelCheckpoint`.

    Args:
        monitor: The validation metric that selects the checkpoint; None takes the task's `monitor` attribute.
        mode: "max" or "min" for `monitor`; None takes the task's `mode` attribute.
        tie_breaker: The metric compared between epochs with equal `monitor` values.
        tie_breaker_mode: "min" or "max" for `tie_breaker`.
        filename: Checkpoint file name without the `.ckpt` suffix.
        dirpath: Folder of the checkpoint; None: `checkpoints/` in the run's log folder.
    """

    def __init__(self, monitor: str | None = None, mode: str | None = None, tie_breaker: str | None = "val/loss",
                 tie_breaker_mode: str = "min", filename: str = "best", dirpath: str | None = None) -> None:
        if tie_breaker_mode not in ("min", "max"):
            raise ValueError(f"BestCheckpoint: tie_breaker_mode must be 'min' or 'max', got {tie_breaker_mode!r}")
        super().__init__(dirpath=dirpath, monitor=monitor, mode=mode or "max", filename=filename, save_top_k=1,
                         enable_version_counter=False)
        self._mode_given = mode is not None
        self.tie_breaker, self.tie_breaker_mode = tie_breaker, tie_breaker_mode
        self.best_tie_value: float | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.monitor is None:
            self.monitor = getattr(pl_module, "monitor", None)
            if self.monitor is None:
                raise ValueError(f"BestCheckpoint: give `monitor`; {type(pl_module).__name__} has no `monitor`")
        if not self._mode_given:
            mode = getattr(pl_module, "mode", "max")
            if mode not in ("min", "max"):
                raise ValueError(f"BestCheckpoint: {type(pl_module).__name__}.mode must be 'min' or 'max', "
                                 f"got {mode!r}")
            self.mode = mode
            self.kth_value = torch.tensor(torch.inf if mode == "min" else -torch.inf)
        super().setup(trainer, pl_module, stage)

    def check_monitor_top_k(self, trainer: Trainer, current: torch.Tensor | None = None) -> bool:
        """Whether this epoch becomes `best.ckpt`: a better `monitor`, or an equal one with a better tie breaker.

        Args:
            trainer: The running trainer (its `callback_metrics` hold the tie breaker).
            current: This epoch's value of `monitor`.
        """
        if current is None:
            return False
        tie = trainer.callback_metrics.get(self.tie_breaker) if self.tie_breaker else None
        tie = None if tie is None else float(tie)
        if self.best_k_models and tie is not None and self.best_tie_value is not None:
            best = self.best_k_models[self.kth_best_model_path]
            if bool(torch.eq(current.to(best.device), best)):
                better = tie < self.best_tie_value if self.tie_breaker_mode == "min" else tie > self.best_tie_value
                decision = trainer.strategy.reduce_boolean_decision(better)
                if decision:
                    self.best_tie_value = tie
                return decision
        decision = super().check_monitor_top_k(trainer, current)
        if decision:
            self.best_tie_value = tie
        return decision

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_tie_value": self.best_tie_value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_tie_value = state_dict.get("best_tie_value")


class LastCheckpoint(_RestoredOnlyForFit):
    """`last.ckpt` rewritten after every epoch (Lightning's own `save_last` only writes when a new best is saved).

    Args:
        filename: Checkpoint file name without the `.ckpt` suffix.
        dirpath: Folder of the checkpoint; None: `checkpoints/` in the run's log folder.
    """

    def __init__(self, filename: str = "last", dirpath: str | None = None) -> None:
        super().__init__(dirpath=dirpath, filename=filename, save_top_k=1, enable_version_counter=False)


def default_callbacks() -> list[Callback]:
    """The callbacks the shipped configs list, for a `Trainer` built in Python: `best.ckpt` (selected on the task's
    validation metric, ties broken on the validation loss), `last.ckpt` and the RNG state for exact resumption."""
    return [BestCheckpoint(), LastCheckpoint(), ResumeRandomState()]
