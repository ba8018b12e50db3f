"""Image classification: any timm backbone (2DVMamba / VMamba included) with the ImageNet training recipe pieces."""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn as nn
from lightning.pytorch import LightningModule
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from .. import zoo  # noqa: F401  (registers the backbones and the zoo's pretrained tags with timm)
from .checkpointing import checkpoint_callbacks
from .optim import adamw_no_decay_on_1d, warmup_then_decay


class ImageClassifier(LightningModule):
    """Classifier over `timm.create_model(backbone, num_classes=..., **backbone_kwargs)`.

    Label smoothing, timm mixup/cutmix, optional EMA weights (used for validation and test when `ema_eval`), AdamW
    without decay on norms/biases/1-D params, per-step linear warm-up then cosine decay, top-1/top-5 accuracy
    (micro average, i.e. plain accuracy).
    """

    def __init__(
        self,
        backbone: str = "vmamba2d_nano",
        num_classes: int = 1000,
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        ema_decay: float | None = None,
        ema_eval: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.configure_models()
        self.configure_metrics()

    def configure_models(self) -> None:
        hp = self.hparams
        self.model = timm.create_model(
            hp.backbone, pretrained=hp.pretrained, num_classes=hp.num_classes, **(hp.backbone_kwargs or {})
        )
        self.ema = None
        if hp.ema_decay:
            # timm leaves the copy trainable; DDP would then wait forever for gradients of the EMA weights
            self.ema = ModelEmaV3(self.model, decay=hp.ema_decay).requires_grad_(False)
        self.mixup = None
        if hp.mixup_alpha > 0 or hp.cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=hp.mixup_alpha, cutmix_alpha=hp.cutmix_alpha, prob=hp.mixup_prob,
                switch_prob=hp.mixup_switch_prob, label_smoothing=hp.label_smoothing, num_classes=hp.num_classes,
            )
        self.train_loss = SoftTargetCrossEntropy() if self.mixup else nn.CrossEntropyLoss(
            label_smoothing=hp.label_smoothing
        )
        self.eval_loss = nn.CrossEntropyLoss()

    def configure_metrics(self) -> None:
        ks = [k for k in (1, 5) if k <= self.hparams.num_classes]
        metrics = MetricCollection(
            {f"acc{k}": MulticlassAccuracy(self.hparams.num_classes, top_k=k, average="micro") for k in ks}
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None and self.hparams.ema_eval else self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        classes = getattr(datamodule, "num_classes", None)
        if classes is not None and classes != self.hparams.num_classes:
            raise ValueError(
                f"model.init_args.num_classes={self.hparams.num_classes} but the data "
                f"({type(datamodule).__name__}) has {classes} classes"
            )

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        loss = self.train_loss(self.model(images), targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0], sync_dist=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=images.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def _evaluate(self, batch, metrics: MetricCollection, prefix: str) -> None:
        images, targets = batch
        logits = self.eval_model(images)
        self.log(f"{prefix}/loss", self.eval_loss(logits, targets), batch_size=images.shape[0], sync_dist=True)
        metrics.update(logits, targets)
        self.log_dict(metrics, prog_bar=True, batch_size=images.shape[0])

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = self.eval_model(images).softmax(dim=-1)
        return {"probs": probs, "label": probs.argmax(dim=-1)}

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = adamw_no_decay_on_1d(self.model, hp.lr, hp.weight_decay, tuple(hp.betas))
        total = self.trainer.estimated_stepping_batches  # also sets up the training data
        steps_per_epoch = max(self.trainer.num_training_batches // self.trainer.accumulate_grad_batches, 1)
        scheduler = warmup_then_decay(
            optimizer, total, warmup_steps=int(hp.warmup_epochs * steps_per_epoch), min_lr_ratio=hp.min_lr_ratio
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self) -> list:
        return checkpoint_callbacks(monitor="val/acc1", mode="max")
