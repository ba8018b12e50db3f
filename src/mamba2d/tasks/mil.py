"""Whole-slide multiple-instance learning: slide classification or survival with 2DMambaMIL or a baseline.

One bag per step (a `SlideBagDataModule` batch is one bag dict). Classification: cross-entropy; accuracy (micro),
balanced accuracy, macro F1 and macro one-vs-rest AUROC. Survival: discrete-time NLL over exactly `num_bins`
outputs; risk = -sum(S); Harrell's C-index. The best checkpoint is chosen on the validation split only
(`monitor`); `mamba2d test --ckpt_path .../best.ckpt` or `mamba2d-wsi kfold` report the held-out test split.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

from ..data.bags import check_feature_dim
from ..models.mil import MIL_MODELS, MILOutput, create_mil_model
from ..zoo import load_weights
from .checkpointing import checkpoint_callbacks
from .optim import adamw_no_decay_on_1d, warmup_then_decay
from .survival import ConcordanceIndex, discrete_time_nll, risk_score

MIL_TASKS = ("classification", "survival")


class SlideMIL(LightningModule):
    """`model` is a name in `mamba2d.models.mil.MIL_MODELS` (mamba_mil_2d, mamba_mil_1d, abmil, transmil, mean, max);
    `model_args` go to its constructor. The model has `num_classes` outputs (classification) or `num_bins`
    hazard logits (survival). `weights` starts the model from a zoo entry (e.g. `mamba_mil_2d.spatial_mil`) or a
    checkpoint file (safetensors, state dict, or a SlideMIL Lightning checkpoint), loaded strictly."""

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
        super().__init__()
        if task not in MIL_TASKS:
            raise ValueError(f"SlideMIL: task must be one of {MIL_TASKS}, got {task!r}")
        if model not in MIL_MODELS:
            raise ValueError(f"SlideMIL: unknown model {model!r}; choose one of {', '.join(MIL_MODELS)}")
        self.save_hyperparameters()
        self.configure_models()
        self.configure_metrics()

    @property
    def num_outputs(self) -> int:
        return self.hparams.num_classes if self.hparams.task == "classification" else self.hparams.num_bins

    def configure_models(self) -> None:
        hp = self.hparams
        self.model = create_mil_model(hp.model, hp.in_dim, self.num_outputs, **(hp.model_args or {}))
        if hp.weights:
            load_weights(self.model, hp.weights)

    def configure_metrics(self) -> None:
        if self.hparams.task == "classification":
            k = self.hparams.num_classes
            metrics = MetricCollection({
                "acc": MulticlassAccuracy(k, average="micro"),
                "balanced_acc": MulticlassAccuracy(k, average="macro"),
                "f1": MulticlassF1Score(k, average="macro"),
                "auroc": MulticlassAUROC(k, average="macro"),
            })
        else:
            metrics = MetricCollection({"cindex": ConcordanceIndex()})
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    @property
    def monitor(self) -> str:
        return self.hparams.monitor or ("val/auroc" if self.hparams.task == "classification" else "val/cindex")

    def setup(self, stage: str) -> None:
        """Fail early when the config's task or output count disagrees with the data."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        hp = self.hparams
        data_task = getattr(datamodule, "task", hp.task)
        if data_task != hp.task:
            raise ValueError(f"model.init_args.task={hp.task!r} but data.init_args.task={data_task!r}")
        key = "num_classes" if hp.task == "classification" else "num_bins"
        value = getattr(datamodule, key, None) or getattr(datamodule, "hparams", {}).get(key)
        if value and value != hp[key]:
            raise ValueError(f"model.init_args.{key}={hp[key]} but the data ({type(datamodule).__name__}) has {value}")
        if hasattr(datamodule, "bag_paths"):  # every bag's feature size, from the h5 shapes, before the first step
            check_feature_dim(datamodule.bag_paths(), hp.in_dim)

    def forward(self, bag: dict) -> MILOutput:
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

    def _evaluate(self, bag: dict, metrics: MetricCollection, prefix: str) -> None:
        logits = self(bag).logits
        self.log(f"{prefix}/loss", self._loss(logits, bag), batch_size=1)
        if self.hparams.task == "classification":
            metrics.update(logits.softmax(-1)[None], bag["label"].reshape(1))
        else:
            metrics.update(risk_score(logits)[None], bag["time"].reshape(1), (1 - bag["censorship"]).reshape(1))
        self.log_dict(metrics, batch_size=1, prog_bar=True)

    def validation_step(self, bag: dict, batch_idx: int) -> None:
        self._evaluate(bag, self.val_metrics, "val")

    def test_step(self, bag: dict, batch_idx: int) -> None:
        self._evaluate(bag, self.test_metrics, "test")

    def predict_step(self, bag: dict, batch_idx: int) -> dict:
        out = self(bag)
        pred = {"bag_id": bag["bag_id"], "logits": out.logits, "scores": out.scores, "coords": bag["coords"]}
        if self.hparams.task == "survival":
            pred["risk"] = risk_score(out.logits)
        else:
            pred["probs"] = out.logits.softmax(-1)
        return pred

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = adamw_no_decay_on_1d(self.model, hp.lr, hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        steps_per_epoch = max(self.trainer.num_training_batches // self.trainer.accumulate_grad_batches, 1)
        scheduler = warmup_then_decay(optimizer, total, warmup_steps=int(hp.warmup_epochs * steps_per_epoch),
                                      min_lr_ratio=hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self) -> list:
        return checkpoint_callbacks(monitor=self.monitor, mode="min" if "loss" in self.monitor else "max")
