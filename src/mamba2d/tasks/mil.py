"""Whole-slide multiple-instance learning: slide classification or survival with 2DMambaMIL or a baseline.

One bag per step (a `SlideBagDataModule` batch is one bag dict). Classification: cross-entropy; accuracy (micro),
balanced accuracy, macro F1 and macro one-vs-rest AUROC. Survival: discrete-time NLL over exactly `num_bins`
outputs; risk = -sum(S); Harrell's C-index. The best checkpoint is chosen on the validation split only
(`monitor`); `mamba2d test --ckpt_path .../best.ckpt` or `mamba2d kfold` report the held-out test split; a
survival test also writes the Kaplan-Meier curves by predicted risk group (`test_km_risk_groups.png`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score
from torchmetrics.utilities import dim_zero_cat

from ..data.bags import check_feature_dim
from ..models.mil import MIL_MODELS, MILOutput, create_mil_model
from ..zoo import load_weights
from .base import BaseTask
from .survival import ConcordanceIndex, discrete_time_nll, risk_score
from .survival_curves import risk_group_figure

MIL_TASKS = ("classification", "survival")


class SlideMIL(BaseTask):
    """Slide classification or survival with a MIL model over a bag of patch features.

    The model has `num_classes` outputs (classification) or `num_bins` hazard logits (survival). Under the CLI,
    `task`, `num_classes` and `num_bins` come from the data.

    Args:
        model: A name in `mamba2d.models.mil.MIL_MODELS` (mamba_mil_2d, mamba_mil_1d, abmil, transmil, mean, max).
        in_dim: Feature size of the bags' patch features.
        task: "classification" or "survival".
        num_classes: Classes (classification).
        num_bins: Time bins (survival).
        model_args: Further arguments of the MIL model's constructor (e.g. dim, num_layers, dropout).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to norms, biases and 1-D parameters).
        warmup_epochs: Linear warm-up length in epochs (fractions allowed), counted in optimiser steps.
        min_lr_ratio: The cosine decay ends at this fraction of `lr`.
        survival_alpha: Up-weighting of the uncensored term of the survival likelihood (0: plain likelihood).
        monitor: The validation metric that selects `best.ckpt` (None: val/auroc or val/cindex).
        weights: Start the model from a zoo entry (e.g. `mamba_mil_2d.spatial_mil`) or a checkpoint file
            (safetensors, state dict, or a SlideMIL Lightning checkpoint), loaded strictly; not stored in the
            checkpoints, which hold the trained weights.
    """

    def __init__(
        self,
        model: str = "mamba_mil_2d",
        in_dim: int = 1024,
        task: str = "classification",
        num_classes: int = 2,
        num_bins: int = 4,
        model_args: dict[str, Any] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
        survival_alpha: float = 0.0,
        monitor: str | None = None,
        weights: str | None = None,
    ):
        if task not in MIL_TASKS:
            raise ValueError(f"SlideMIL: task must be one of {MIL_TASKS}, got {task!r}")
        if model not in MIL_MODELS:
            raise ValueError(f"SlideMIL: unknown model {model!r}; choose one of {', '.join(MIL_MODELS)}")
        self.weights = weights
        super().__init__()
        # The test split's (risk, time, event), gathered across processes for the Kaplan-Meier figure.
        self.test_outcomes = ConcordanceIndex() if task == "survival" else None

    @property
    def num_outputs(self) -> int:
        """Outputs of the model: `num_classes` (classification) or `num_bins` (survival)."""
        return self.hparams.num_classes if self.hparams.task == "classification" else self.hparams.num_bins

    def configure_models(self) -> None:
        """The MIL model, started from `weights` when given."""
        hp = self.hparams
        self.model = create_mil_model(hp.model, hp.in_dim, self.num_outputs, **(hp.model_args or {}))
        if self.weights:
            load_weights(self.model, self.weights)

    def metrics(self) -> MetricCollection:
        """Classification: accuracy, balanced accuracy, macro F1 and macro one-vs-rest AUROC; survival: C-index."""
        if self.hparams.task == "classification":
            k = self.hparams.num_classes
            return MetricCollection({
                "acc": MulticlassAccuracy(k, average="micro"),
                "balanced_acc": MulticlassAccuracy(k, average="macro"),
                "f1": MulticlassF1Score(k, average="macro"),
                "auroc": MulticlassAUROC(k, average="macro"),
            })
        return MetricCollection({"cindex": ConcordanceIndex()})

    @property
    def monitor(self) -> str:
        """The metric that selects `best.ckpt`: the `monitor` hyperparameter, else val/auroc or val/cindex."""
        return self.hparams.monitor or ("val/auroc" if self.hparams.task == "classification" else "val/cindex")

    @property
    def mode(self) -> str:
        """"min" for a monitored loss, else "max"."""
        return "min" if "loss" in self.monitor else "max"

    def data_checks(self) -> dict[str, Any]:
        """The task, and the class count (classification) or the bin count (survival), must match the data."""
        key = "num_classes" if self.hparams.task == "classification" else "num_bins"
        return {"task": self.hparams.task, key: self.hparams[key]}

    def setup(self, stage: str) -> None:
        """Fail before the first step when the task, the output count or a bag's feature size disagree with the
        data (feature sizes read from the h5 shapes of every bag).

        Args:
            stage: The Lightning stage (fit, validate, test, predict).
        """
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "bag_paths"):
            check_feature_dim(datamodule.bag_paths(), self.hparams.in_dim)

    def forward(self, bag: dict) -> MILOutput:
        """The model's output for one bag dict (features, positions, optional segments)."""
        return self.model(bag["features"], bag["positions"], bag.get("segments"))

    def _loss(self, logits: torch.Tensor, bag: dict) -> torch.Tensor:
        if self.hparams.task == "classification":
            return F.cross_entropy(logits[None], bag["label"].reshape(1))
        return discrete_time_nll(logits[None], bag["label"].reshape(1), bag["censorship"].reshape(1),
                                 self.hparams.survival_alpha)

    def training_step(self, bag: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(self(bag).logits, bag)
        self.log("train/loss", loss, prog_bar=True, batch_size=1, on_step=True, on_epoch=True)
        return loss

    def _evaluate(self, bag: dict, metrics: MetricCollection, prefix: str) -> MILOutput:
        output = self(bag)
        logits = output.logits
        self.log(f"{prefix}/loss", self._loss(logits, bag), batch_size=1)
        if self.hparams.task == "classification":
            metrics.update(logits.softmax(-1)[None], bag["label"].reshape(1))
        else:
            metrics.update(risk_score(logits)[None], bag["time"].reshape(1), (1 - bag["censorship"]).reshape(1))
        self.log_dict(metrics, batch_size=1, prog_bar=True)
        return output

    def validation_step(self, bag: dict, batch_idx: int) -> None:
        output = self._evaluate(bag, self.val_metrics, "val")
        prediction = {"scores": output.scores}
        if self.hparams.task == "classification":
            prediction["probs"] = output.logits.softmax(-1)
        self.log_figure(bag, prediction, batch_idx)

    def test_step(self, bag: dict, batch_idx: int) -> None:
        output = self._evaluate(bag, self.test_metrics, "test")
        if self.test_outcomes is not None:
            self.test_outcomes.update(risk_score(output.logits)[None], bag["time"].reshape(1),
                                      (1 - bag["censorship"]).reshape(1))

    def on_test_epoch_start(self) -> None:
        if self.test_outcomes is not None:
            self.test_outcomes.reset()

    def on_test_epoch_end(self) -> None:
        """Survival: save the Kaplan-Meier curves of the test cases split at the median predicted risk, with the
        log-rank p-value, as `test_km_risk_groups.png` in the run's log folder and to TensorBoard."""
        if self.test_outcomes is None or not self.test_outcomes.risk:
            return
        with self.test_outcomes.sync_context():
            risk, time, event = (dim_zero_cat(getattr(self.test_outcomes, key)).float().cpu().numpy()
                                 for key in ("risk", "time", "event"))
        self.save_figure(risk_group_figure(risk, time, event), "test/km_risk_groups")
        self.test_outcomes.reset()

    def predict_step(self, bag: dict, batch_idx: int) -> dict:
        out = self(bag)
        pred = {"bag_id": bag["bag_id"], "logits": out.logits, "scores": out.scores, "coords": bag["coords"]}
        if self.hparams.task == "survival":
            pred["risk"] = risk_score(out.logits)
        else:
            pred["probs"] = out.logits.softmax(-1)
        return pred

