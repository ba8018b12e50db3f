"""Semantic segmentation: UperNet over any timm backbone, ADE20K recipe, mIoU and pixel accuracy; PNG predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from .. import zoo  # noqa: F401  (registers the backbones and the zoo's pretrained tags with timm)
from ..data.base import class_palette
from ..models import input_normalization
from ..models.upernet import UperNet
from .base import BaseTask
from .optim import warmup_then_decay

__all__ = ["SemanticSegmenter", "SegmentationPredictionWriter", "class_palette"]

IGNORE_INDEX = 255


class SemanticSegmenter(BaseTask):
    """UperNet segmenter. Batches are dicts with "image" float in [0, 1] (normalised here) and "mask" int64 labels
    (255 = ignore): training batches are stacked tensors, evaluation batches are lists of differently sized images
    whose logits are resized to their full-resolution masks before scoring.

    `inference="whole"` segments each image in one pass; `"slide"` averages overlapping `slide_crop` windows
    (stride `slide_stride`). Schedule: per-step linear warm-up over `warmup_steps`, then polynomial decay to 0 over
    `total_steps` (default: the trainer's estimate from max_steps / max_epochs). `best.ckpt` is chosen on `val/mIoU`.

    Args:
        backbone: A timm backbone with `features_only` support, e.g. `vmamba2d_tiny`.
        num_classes: Segmentation classes (from the data under the CLI).
        pretrained: Start from the backbone's pretrained weights (not stored in checkpoints).
        backbone_kwargs: Further `timm.create_model` arguments (e.g. `drop_path_rate`).
        decoder_channels: Channels of the UperNet decoder.
        pool_scales: Pyramid pooling scales of the PPM.
        dropout: Dropout before the classifiers.
        aux_weight: Weight of the auxiliary FCN head's loss (0: no auxiliary head).
        aux_channels: Channels of the auxiliary head.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to norms, biases and 1-D parameters).
        betas: AdamW betas.
        warmup_steps: Linear warm-up length in optimiser steps.
        warmup_start_ratio: The warm-up starts at this fraction of `lr`.
        poly_power: Power of the polynomial decay.
        total_steps: Length of the decay in steps (None: the trainer's estimate).
        inference: "whole" (one pass per image) or "slide" (averaged overlapping windows).
        slide_crop: Window size of sliding inference.
        slide_stride: Window stride of sliding inference.
    """

    monitor = "val/mIoU"
    mode = "max"

    def __init__(
        self,
        backbone: str = "vmamba2d_tiny",
        num_classes: int = 150,
        pretrained: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        decoder_channels: int = 512,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
        aux_weight: float = 0.4,
        aux_channels: int = 256,
        lr: float = 6e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 1500,
        warmup_start_ratio: float = 1e-6,
        poly_power: float = 1.0,
        total_steps: int | None = None,
        inference: str = "whole",
        slide_crop: int = 512,
        slide_stride: int = 341,
    ):
        if inference not in ("whole", "slide"):
            raise ValueError(f"SemanticSegmenter: inference must be 'whole' or 'slide', got {inference!r}")
        self.pretrained = pretrained
        super().__init__()

    def configure_models(self) -> None:
        """UperNet on the backbone, and the input normalisation of the backbone's pretrained cfg."""
        hp = self.hparams
        self.model = UperNet(
            hp.backbone, hp.num_classes, self.pretrained, hp.backbone_kwargs, hp.decoder_channels, hp.pool_scales,
            hp.dropout, hp.aux_channels, aux_index=2 if hp.aux_weight > 0 else None,
        )
        mean, std = input_normalization(self.model.backbone)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def metrics(self) -> MetricCollection:
        """Mean IoU over classes and pixel accuracy, ignoring label 255."""
        n = self.hparams.num_classes
        return MetricCollection({
            "mIoU": MulticlassJaccardIndex(n, average="macro", ignore_index=IGNORE_INDEX),
            "pixel_acc": MulticlassAccuracy(n, average="micro", ignore_index=IGNORE_INDEX),
        })

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes, H, W) for [0, 1] images (B, 3, H, W), by whole-image or sliding inference."""
        images = (images - self.mean) / self.std
        if self.hparams.inference == "slide":
            return self._slide(images)
        return self.model(images)["out"]

    def _slide(self, images: torch.Tensor) -> torch.Tensor:
        crop, stride = self.hparams.slide_crop, self.hparams.slide_stride
        batch, _, height, width = images.shape
        logits = images.new_zeros(batch, self.hparams.num_classes, height, width)
        counts = images.new_zeros(1, 1, height, width)
        rows = max(height - crop + stride - 1, 0) // stride + 1
        cols = max(width - crop + stride - 1, 0) // stride + 1
        for r in range(rows):
            for c in range(cols):
                bottom, right = min(r * stride + crop, height), min(c * stride + crop, width)
                top, left = max(bottom - crop, 0), max(right - crop, 0)
                logits[..., top:bottom, left:right] += self.model(images[..., top:bottom, left:right])["out"]
                counts[..., top:bottom, left:right] += 1
        return logits / counts

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, masks = batch["image"], batch["mask"]
        out = self.model((images - self.mean) / self.std)
        loss = F.cross_entropy(out["out"], masks, ignore_index=IGNORE_INDEX)
        if "aux" in out:
            aux = F.cross_entropy(out["aux"], masks, ignore_index=IGNORE_INDEX)
            self.log("train/aux_loss", aux, batch_size=images.shape[0])
            loss = loss + self.hparams.aux_weight * aux
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def predict_labels(self, images: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Per image: (H, W) int64 labels at `size` (logits resized bilinearly before the argmax).

        Args:
            images: [0, 1] images (3, h, w), possibly of different sizes.
            sizes: The (H, W) of each image's label map.
        """
        labels = []
        for image, size in zip(images, sizes):
            logits = self(image.unsqueeze(0))
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
            labels.append(logits.argmax(dim=1)[0])
        return labels

    def _evaluate(self, batch: dict, metrics: MetricCollection) -> list[torch.Tensor]:
        preds = self.predict_labels(batch["image"], [m.shape[-2:] for m in batch["mask"]])
        for pred, mask in zip(preds, batch["mask"]):
            metrics.update(pred.unsqueeze(0), mask.unsqueeze(0))
        self.log_dict(metrics, prog_bar=True, batch_size=len(preds))
        return preds

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log_figure(batch, self._evaluate(batch, self.val_metrics), batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"labels": self.predict_labels(batch["image"], batch["orig_size"]), "path": batch["path"]}

    def schedule(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """mmseg's schedule: linear warm-up over `warmup_steps`, then polynomial decay to 0 at `total_steps`.

        Args:
            optimizer: The optimiser built by `configure_optimizers`.
        """
        hp = self.hparams
        total = hp.total_steps or self.trainer.estimated_stepping_batches
        return warmup_then_decay(optimizer, total, warmup_steps=hp.warmup_steps, decay="poly",
                                 poly_power=hp.poly_power, warmup_start_ratio=hp.warmup_start_ratio)

    def configure_callbacks(self) -> list:
        """A `SegmentationPredictionWriter` for `predict`, unless the trainer already has one (a user's wins)."""
        if any(isinstance(cb, SegmentationPredictionWriter) for cb in self.trainer.callbacks):
            return []
        return [SegmentationPredictionWriter()]


class SegmentationPredictionWriter(BasePredictionWriter):
    """Writes one palette PNG per image during `predict`: pixel value = predicted class (0-based), colour from
    `class_palette`, so the file is both a picture and an exact label map. Files go to `output_dir`
    (default: `<log dir>/predictions`) under the image's file stem.

    Args:
        output_dir: Folder of the PNGs (None: `predictions/` in the run's log folder).
    """

    def __init__(self, output_dir: str | None = None):
        super().__init__(write_interval="batch")
        self.output_dir = output_dir

    def _folder(self, trainer: Trainer) -> Path:
        folder = Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "predictions")
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        """Write the batch's label maps (Lightning's `BasePredictionWriter` hook).

        Args:
            trainer: The running trainer.
            pl_module: The `SemanticSegmenter`.
            prediction: Its predict output for the batch ("labels", "path").
            batch_indices: Indices of the batch's samples.
            batch: The batch.
            batch_idx: Index of the batch.
            dataloader_idx: Index of the loader.
        """
        folder = self._folder(trainer)
        num_classes = pl_module.hparams.num_classes
        if num_classes > 256:
            raise ValueError(
                f"SegmentationPredictionWriter: a palette PNG holds at most 256 classes, got {num_classes}")
        palette = class_palette(num_classes).flatten().tolist()
        for labels, path in zip(prediction["labels"], prediction["path"]):
            png = Image.fromarray(labels.to(torch.uint8).cpu().numpy())
            png.putpalette(palette)  # turns the one-channel image into a palette ("P") image
            png.save(folder / f"{Path(path).stem}.png")
