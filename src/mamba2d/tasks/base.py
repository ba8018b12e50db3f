"""`BaseTask`: what every task shares, so that a task file holds only its model, loss and steps.

The base saves the hyperparameters (without the start weights), builds the network (`configure_models`) and one
metric set per stage (`configure_metrics` from `metrics()`), checks the task against its data, and gives AdamW
without decay on norms, biases and 1-D parameters with a per-step warm-up schedule (`configure_optimizers`, the
schedule from `schedule()`). Checkpoints and the learning-rate log are trainer callbacks (`tasks.checkpointing`,
Lightning's `LearningRateMonitor`), never returned from `configure_callbacks`, so a user's own callbacks are kept.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchmetrics import Metric, MetricCollection

from .optim import adamw_no_decay_on_1d, warmup_then_decay

__all__ = ["BaseTask", "render_figure"]


def render_figure(figure: Figure) -> np.ndarray:
    """The figure's pixels, rendered with the Agg canvas (no pyplot, no global backend).

    Args:
        figure: A matplotlib Figure.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]


class BaseTask(LightningModule):
    """Base class of the mamba2d tasks (torchgeo's `BaseTask` pattern).

    A subclass stores its start-weight arguments (`pretrained`, `weights`) as attributes, then calls
    `super().__init__()`, which saves every other `__init__` argument as hyperparameters and calls
    `configure_models()` and `configure_metrics()`. The start weights are left out of the hyperparameters, so
    `load_from_checkpoint` builds the network without them and never reads or downloads them again: the
    checkpoint holds the trained weights.

    A subclass defines `configure_models` (the trained network is `self.model`), `metrics` (or sets
    `metric_stages = ()`), its steps, and optionally `schedule`, `data_checks` and the class attributes below.

    Attributes:
        ignore: `__init__` arguments kept out of the hyperparameters (start weights).
        monitor: The validation metric that selects `best.ckpt` (read by `BestCheckpoint`).
        mode: "max" or "min" for `monitor`.
        metric_stages: Stages that get a metric set: `train_metrics`, `val_metrics`, `test_metrics`.
    """

    ignore: ClassVar[tuple[str, ...]] = ("pretrained", "weights")
    monitor: str = "val/loss"
    mode: str = "min"
    metric_stages: ClassVar[tuple[str, ...]] = ("val", "test")

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=list(self.ignore))
        self.configure_models()
        self.configure_metrics()

    def configure_models(self) -> None:
        """Build the network as `self.model` (and any companion modules) from `self.hparams`."""
        raise NotImplementedError(f"{type(self).__name__} must define configure_models()")

    def metrics(self) -> Metric | MetricCollection:
        """The metric set of one stage; `configure_metrics` clones it for each of `metric_stages`."""
        raise NotImplementedError(f"{type(self).__name__} must define metrics() or set metric_stages = ()")

    def configure_metrics(self) -> None:
        """`<stage>_metrics` for each stage of `metric_stages`, each a copy of `metrics()` whose MetricCollection
        keys are prefixed with `<stage>/`."""
        if not self.metric_stages:
            return
        metrics = self.metrics()
        for stage in self.metric_stages:
            clone = metrics.clone(prefix=f"{stage}/") if isinstance(metrics, MetricCollection) else metrics.clone()
            setattr(self, f"{stage}_metrics", clone)

    def data_checks(self) -> dict[str, Any]:
        """The hyperparameters that must equal the DataModule's attribute of the same name (default:
        `num_classes`). The CLI links them from the data; this check catches a task built in Python for other
        data."""
        return {"num_classes": self.hparams.num_classes}

    def setup(self, stage: str) -> None:
        """Fail before training when the task's `data_checks()` disagree with the trainer's DataModule.

        Args:
            stage: The Lightning stage (fit, validate, test, predict).

        Raises:
            ValueError: A value differs; the message names the config key of each side.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        for key, value in self.data_checks().items():
            data_value = getattr(datamodule, key, None)
            if data_value is not None and data_value != value:
                raise ValueError(f"model.init_args.{key}={value!r} but the data ({type(datamodule).__name__}) has "
                                 f"{key}={data_value!r}")

    def log_figure(self, batch: Any, prediction: Any, batch_idx: int) -> None:
        """Draw the first validation batch of each epoch with the DataModule's `plot(batch, prediction)` and add it
        to every TensorBoard logger as the image `val/samples` (rank 0 only; not during the sanity check).

        Args:
            batch: The validation batch.
            prediction: What the DataModule's `plot` takes as the task's prediction for that batch.
            batch_idx: Index of the batch in the epoch.
        """
        if batch_idx != 0 or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        writers = [logger.experiment for logger in self.loggers if isinstance(logger, TensorBoardLogger)]
        plot = getattr(getattr(self.trainer, "datamodule", None), "plot", None)
        if not writers or plot is None:
            return
        try:
            figure = plot(batch, prediction)
        except NotImplementedError:
            return
        image = render_figure(figure)
        for writer in writers:
            writer.add_image("val/samples", image, global_step=self.global_step, dataformats="HWC")

    def save_figure(self, figure: Figure, name: str) -> Path:
        """Write `figure` as `<name>.png` (a "/" becomes "_") in the run's log folder and add it to every TensorBoard
        logger as the image `name` (rank 0 only).

        Args:
            figure: A matplotlib Figure (built with the Figure API).
            name: The TensorBoard tag, e.g. "test/km_risk_groups".

        Returns:
            The PNG's path.
        """
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        path = folder / f"{name.replace('/', '_')}.png"
        if self.trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            figure.savefig(path)
            image = render_figure(figure)
            for logger in self.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(name, image, global_step=self.global_step, dataformats="HWC")
        return path

    def steps_per_epoch(self) -> int:
        """Optimiser steps in one training epoch (at least 1).

        Raises:
            ValueError: The training data has no length (an iterable dataset), so an epoch has no known number of
                steps.
        """
        trainer = self.trainer
        if math.isinf(trainer.num_training_batches):
            # not loaded yet where the trainer stops at max_steps: `estimated_stepping_batches` needs no data then
            trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
        if math.isinf(batches):
            raise ValueError(f"{type(self).__name__}: the training data has no length, so its epochs cannot be "
                             "counted in optimiser steps; give the schedule's epoch-valued options (warmup_epochs, "
                             "lr_milestones) as 0 or use a dataset with a length")
        return max(int(batches) // trainer.accumulate_grad_batches, 1)

    def schedule(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """The per-step learning-rate schedule: linear warm-up over `warmup_epochs`, then cosine decay to
        `min_lr_ratio` times the base lr at the end of training. Tasks with another recipe override this.

        Args:
            optimizer: The optimiser built by `configure_optimizers`.
        """
        total = self.trainer.estimated_stepping_batches
        warmup = int(self.hparams.warmup_epochs * self.steps_per_epoch()) if self.hparams.warmup_epochs else 0
        return warmup_then_decay(optimizer, total, warmup_steps=warmup, min_lr_ratio=self.hparams.min_lr_ratio)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on `self.model` (`lr`, `weight_decay`, `betas` hyperparameters; no decay on norms, biases and
        1-D parameters) with `schedule()` stepped every optimiser step. `LearningRateMonitor` logs it as
        `train/lr` (`train/lr/pg1`, `train/lr/pg2`, ... for the parameter groups)."""
        hp = self.hparams
        optimizer = adamw_no_decay_on_1d(self.model, hp.lr, hp.weight_decay, tuple(hp.get("betas", (0.9, 0.999))))
        scheduler = self.schedule(optimizer)
        schedule = {"scheduler": scheduler, "interval": "step", "name": "train/lr"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
