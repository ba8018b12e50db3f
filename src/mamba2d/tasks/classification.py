"""Image classification: any timm backbone (2DVMamba / VMamba included) with the ImageNet training recipe pieces."""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from .. import zoo  # noqa: F401  (registers the backbones and the zoo's pretrained tags with timm)
from ..models import input_normalization
from .base import BaseTask


class ImageClassifier(BaseTask):
    """Classifier over `timm.create_model(backbone, num_classes=..., **backbone_kwargs)`.

    Batches are (images in [0, 1], labels); the images are normalised here, on the device, with the mean and std of
    the backbone's pretrained cfg (`input_normalization`), as timm's training script does with its prefetcher, so
    the DataModule need not know the backbone. Training then applies timm's random erasing (`re_prob`) to the
    normalised images and mixup/cutmix.

    Label smoothing, timm mixup/cutmix, optional EMA weights (used for validation and test when `ema_eval`), AdamW
    without decay on norms/biases/1-D params, per-step linear warm-up then cosine decay, top-1/top-5 accuracy
    (micro average, i.e. plain accuracy); `best.ckpt` is chosen on `val/acc1`.

    Args:
        backbone: A timm model name, e.g. `vmamba2d_nano` or a pretrained tag such as `vmamba2d_nano.digits`.
        num_classes: Output classes (from the data under the CLI).
        backbone_kwargs: Further `timm.create_model` arguments (e.g. `drop_path_rate`).
        pretrained: Start from the backbone's pretrained weights (not stored in checkpoints).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to norms, biases and 1-D parameters).
        betas: AdamW betas.
        warmup_epochs: Linear warm-up length in epochs (fractions allowed), counted in optimiser steps.
        min_lr_ratio: The cosine decay ends at this fraction of `lr`.
        label_smoothing: Label smoothing of the training loss.
        re_prob: Probability of timm's random erasing (one constant-filled box, in normalised space) per training
            image (0: off).
        mixup_alpha: timm Mixup's mixup alpha (0: off).
        cutmix_alpha: timm Mixup's cutmix alpha (0: off).
        mixup_prob: Probability of applying mixup or cutmix to a batch.
        mixup_switch_prob: Probability of cutmix instead of mixup when both are on.
        ema_decay: Decay of an EMA copy of the weights (None: no EMA).
        ema_eval: Validate and test with the EMA weights when there are some.
        torch_compile: Run the network (and its EMA copy) under `torch.compile` (`nn.Module.compile`: in place, so
            checkpoints keep their keys). The first batches of training and of evaluation compile; after that a
            step runs fewer, fused kernels, which matters where the host cannot launch an eager step as fast as the
            GPU runs it (docs/performance.md).
        compile_mode: `torch.compile`'s mode with `torch_compile`: "default", "reduce-overhead" (its CUDA graphs
            replay each step's kernels without the host's launches; one graph per input shape, so keep the batch
            shape fixed, e.g. with the loader's `drop_last`), "max-autotune", "max-autotune-no-cudagraphs", or
            another mode the installed torch knows.

    Raises:
        ValueError: A `compile_mode` other than "default" without `torch_compile`.
    """

    monitor = "val/acc1"
    mode = "max"
    metric_stages = ("train", "val", "test")

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
        re_prob: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        ema_decay: float | None = None,
        ema_eval: bool = True,
        torch_compile: bool = False,
        compile_mode: str = "default",
    ):
        if compile_mode != "default" and not torch_compile:
            raise ValueError(f"ImageClassifier: compile_mode={compile_mode!r} needs torch_compile=True")
        self.pretrained = pretrained
        super().__init__()

    def configure_models(self) -> None:
        """The timm network, its input normalisation, its optional EMA copy, mixup/cutmix and the losses."""
        hp = self.hparams
        self.model = timm.create_model(
            hp.backbone, pretrained=self.pretrained, num_classes=hp.num_classes, **(hp.backbone_kwargs or {})
        )
        mean, std = input_normalization(self.model)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
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
        if hp.torch_compile:
            for network in [self.model] + ([] if self.ema is None else [self.ema.module]):
                try:
                    network.compile(mode=hp.compile_mode)  # in place: the checkpoint keeps its keys
                except RuntimeError as error:  # torch checks the mode here, before tracing anything
                    raise ValueError(f"ImageClassifier: compile_mode={hp.compile_mode!r}: {error}") from error

    def metrics(self) -> MetricCollection:
        """Top-1 (and top-5 with at least 5 classes) accuracy."""
        ks = [k for k in (1, 5) if k <= self.hparams.num_classes]
        return MetricCollection(
            {f"acc{k}": MulticlassAccuracy(self.hparams.num_classes, top_k=k, average="micro") for k in ks}
        )

    @property
    def eval_model(self) -> nn.Module:
        """The network that validates, tests and predicts: the EMA copy when there is one and `ema_eval`."""
        return self.ema.module if self.ema is not None and self.hparams.ema_eval else self.model

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """The network's input for [0, 1] images (B, C, H, W): normalised by the backbone's mean and std.

        Args:
            images: Images in [0, 1].
        """
        return (images - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of the trained network for [0, 1] images (B, C, H, W)."""
        return self.model(self.normalize(x))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        images = self.normalize(images)
        if self.hparams.re_prob > 0:
            # timm's erasing draws boxes per image in place; timm's prefetcher also erases after normalising
            images = RandomErasing(self.hparams.re_prob, mode="const", device=images.device)(images)
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        logits = self.model(images)
        loss = self.train_loss(logits, targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0], sync_dist=True)
        if self.mixup is None:  # mixed images have no single true label to score
            self.train_metrics(logits.detach(), labels)
            self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=images.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def _evaluate(self, batch, metrics: MetricCollection, prefix: str) -> torch.Tensor:
        images, targets = batch
        logits = self.eval_model(self.normalize(images))
        self.log(f"{prefix}/loss", self.eval_loss(logits, targets), batch_size=images.shape[0], sync_dist=True)
        metrics.update(logits, targets)
        self.log_dict(metrics, prog_bar=True, batch_size=images.shape[0])
        return logits

    def validation_step(self, batch, batch_idx: int) -> None:
        logits = self._evaluate(batch, self.val_metrics, "val")
        self.log_figure(batch, logits.argmax(dim=-1), batch_idx)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = self.eval_model(self.normalize(images)).softmax(dim=-1)
        return {"probs": probs, "label": probs.argmax(dim=-1)}

