"""Detection and instance segmentation: torchvision Mask R-CNN over any timm backbone + FPN, COCO box/mask mAP;
COCO-format result JSON and overlay PNGs from `mamba2d predict`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torchmetrics.detection import MeanAveragePrecision

from .. import zoo  # noqa: F401  (registers the backbones and the zoo's pretrained tags with timm)
from ..models.detection import build_mask_rcnn
from .base import BaseTask
from .optim import warmup_then_decay

__all__ = ["InstanceDetector", "COCOPredictionWriter"]

# torchmetrics' result keys that are logged, as "<stage>/<iou type>_<key>" (e.g. val/bbox_map_50).
LOGGED_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")


class InstanceDetector(BaseTask):
    """Mask R-CNN (torchvision) on `backbone` + a 5-level FPN. Batches are (list of [0, 1] images, list of target
    dicts) as `mamba2d.data.coco.COCODataModule` gives them; `num_classes` counts object classes (no background).
    `maskrcnn_kwargs` go to torchvision's `MaskRCNN` (e.g. rpn_post_nms_top_n_train, box_batch_size_per_image).

    Schedule (mmdetection's 1x): linear warm-up over `warmup_steps` iterations, then the lr is multiplied by `gamma`
    at each epoch in `lr_milestones` (converted to steps from the trainer's epoch length). `best.ckpt` is chosen on
    `val/bbox_map`.

    Args:
        backbone: A timm backbone with `features_only` support, e.g. `vmamba2d_tiny`.
        num_classes: Object classes without the background (from the data under the CLI).
        pretrained: Start from the backbone's pretrained weights (not stored in checkpoints).
        backbone_kwargs: Further `timm.create_model` arguments (e.g. `drop_path_rate`).
        fpn_channels: Channels of the FPN.
        min_size: Shorter image side after Mask R-CNN's resize.
        max_size: Upper bound of the longer side after the resize.
        anchor_sizes: Anchor size of each FPN level.
        box_score_thresh: Detections scored below this are dropped.
        box_detections_per_img: Most detections kept per image.
        mask_threshold: Mask probability above which a pixel belongs to the instance.
        maskrcnn_kwargs: Further torchvision `MaskRCNN` arguments.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to norms, biases and 1-D parameters).
        betas: AdamW betas.
        warmup_steps: Linear warm-up length in optimiser steps.
        warmup_start_ratio: The warm-up starts at this fraction of `lr`.
        lr_milestones: Epochs at which the lr is multiplied by `gamma`.
        gamma: The step decay factor.
    """

    monitor = "val/bbox_map"
    mode = "max"

    def __init__(
        self,
        backbone: str = "vmamba2d_tiny",
        num_classes: int = 80,
        pretrained: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        fpn_channels: int = 256,
        min_size: int = 800,
        max_size: int = 1333,
        anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
        box_score_thresh: float = 0.05,
        box_detections_per_img: int = 100,
        mask_threshold: float = 0.5,
        maskrcnn_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 500,
        warmup_start_ratio: float = 1e-3,
        lr_milestones: tuple[int, ...] = (8, 11),
        gamma: float = 0.1,
    ):
        self.pretrained = pretrained
        super().__init__()

    def configure_models(self) -> None:
        """torchvision's Mask R-CNN on the backbone and an FPN."""
        hp = self.hparams
        self.model = build_mask_rcnn(
            hp.backbone, hp.num_classes, self.pretrained, hp.backbone_kwargs, hp.fpn_channels, hp.min_size,
            hp.max_size, hp.anchor_sizes, box_score_thresh=hp.box_score_thresh,
            box_detections_per_img=hp.box_detections_per_img, **(hp.maskrcnn_kwargs or {}),
        )

    def metrics(self) -> MeanAveragePrecision:
        """COCO box and mask mAP."""
        return MeanAveragePrecision(iou_type=("bbox", "segm"))

    def forward(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections per image: boxes (XYXY, input pixels), labels (1..K), scores, masks (N, H, W) bool."""
        detections = self.model(list(images))
        threshold = self.hparams.mask_threshold
        return [{**d, "masks": d["masks"][:, 0] > threshold} for d in detections]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        targets = [{k: v for k, v in t.items() if k in ("boxes", "labels", "masks")} for t in targets]
        losses = self.model(images, targets)
        loss = sum(losses.values())
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def _evaluate(self, batch, metric: MeanAveragePrecision) -> list[dict[str, torch.Tensor]]:
        images, targets = batch
        detections = self(images)
        metric.update(
            [{k: d[k] for k in ("boxes", "scores", "labels", "masks")} for d in detections],
            [{"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"], "masks": t["masks"].bool(),
              "iscrowd": t["iscrowd"]} for t in targets],
        )
        return detections

    def _log_map(self, metric: MeanAveragePrecision, stage: str) -> None:
        results = metric.compute()
        for iou_type in ("bbox", "segm"):
            for key in LOGGED_KEYS:
                self.log(f"{stage}/{iou_type}_{key}", results[f"{iou_type}_{key}"].float(),
                         prog_bar=key == "map" and iou_type == "bbox")
        metric.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self.log_figure(batch, self._evaluate(batch, self.val_metrics), batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_metrics, "test")

    def predict_step(self, batch, batch_idx: int) -> dict:
        images, targets = batch
        return {"detections": self(images), "image_ids": [int(t["image_id"]) for t in targets]}

    def schedule(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """mmdetection's 1x: linear warm-up over `warmup_steps`, then `gamma` at each epoch of `lr_milestones`.

        Args:
            optimizer: The optimiser built by `configure_optimizers`.
        """
        hp = self.hparams
        total = self.trainer.estimated_stepping_batches
        steps_per_epoch = self.steps_per_epoch() if hp.lr_milestones else 0
        return warmup_then_decay(
            optimizer, total, warmup_steps=hp.warmup_steps, decay="step", gamma=hp.gamma,
            milestones=[int(epoch * steps_per_epoch) for epoch in hp.lr_milestones],
            warmup_start_ratio=hp.warmup_start_ratio,
        )

    def configure_callbacks(self) -> list:
        """A `COCOPredictionWriter` for `predict`, unless the trainer already has one (a user's wins)."""
        if any(isinstance(cb, COCOPredictionWriter) for cb in self.trainer.callbacks):
            return []
        return [COCOPredictionWriter()]


def _mask_to_rle(mask: torch.Tensor) -> dict:
    from pycocotools import mask as mask_utils  # the `dense` extra; imported only when masks are written

    rle = mask_utils.encode(np.asfortranarray(mask.cpu().numpy().astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


class COCOPredictionWriter(BasePredictionWriter):
    """Collects `predict` detections and writes one COCO results JSON (the format of COCO's evaluation server and
    of `pycocotools.COCO.loadRes`): a list of {image_id, category_id, bbox [x, y, w, h], score, segmentation RLE}.
    Labels are mapped back to the COCO category ids of the DataModule. Default file: `<log dir>/predictions.json`.

    Beside the JSON, `overlays/<image_id>.png` shows each image with its detections scored `overlay_threshold` or
    more (masks and labelled boxes, drawn by the DataModule's `draw_instances` with torchvision's utilities).

    Args:
        output_file: The JSON file (None: `predictions.json` in the run's log folder).
        overlays: Write the overlay PNGs.
        overlay_threshold: Detections scored below this are not drawn.
    """

    def __init__(self, output_file: str | None = None, overlays: bool = True, overlay_threshold: float = 0.5):
        super().__init__(write_interval="batch_and_epoch")
        self.output_file = output_file
        self.overlays = overlays
        self.overlay_threshold = overlay_threshold

    def _json_path(self, trainer: Trainer) -> Path:
        return Path(self.output_file or Path(trainer.log_dir or trainer.default_root_dir) / "predictions.json")

    def write_on_batch_end(self, trainer: Trainer, pl_module, prediction, batch_indices, batch, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        """Write the overlay PNG of each image of the batch (Lightning's `BasePredictionWriter` hook).

        Args:
            trainer: The running trainer (its DataModule draws the instances).
            pl_module: The `InstanceDetector`.
            prediction: Its predict output for the batch ("detections", "image_ids").
            batch_indices: Indices of the batch's samples.
            batch: The batch (list of images, list of target dicts).
            batch_idx: Index of the batch.
            dataloader_idx: Index of the dataloader.
        """
        if not self.overlays:
            return
        draw = getattr(trainer.datamodule, "draw_instances", None)
        if draw is None:
            raise ValueError("COCOPredictionWriter: overlays need the DataModule's `draw_instances(image, "
                             "instances)`; set overlays: false for a DataModule without it")
        folder = self._json_path(trainer).parent / "overlays"
        folder.mkdir(parents=True, exist_ok=True)
        for image, image_id, det in zip(batch[0], prediction["image_ids"], prediction["detections"]):
            picture = draw(image, det, score_threshold=self.overlay_threshold)
            Image.fromarray(picture.permute(1, 2, 0).cpu().numpy()).save(folder / f"{image_id}.png")

    def write_on_epoch_end(self, trainer: Trainer, pl_module, predictions, batch_indices) -> None:
        """Write every detection of the predict epoch (Lightning's `BasePredictionWriter` hook).

        Args:
            trainer: The running trainer (its DataModule gives the category ids).
            pl_module: The `InstanceDetector`.
            predictions: Its predict outputs ("detections", "image_ids" per batch).
            batch_indices: Indices of each batch's samples.
        """
        category_ids = getattr(trainer.datamodule, "category_ids", None)
        if category_ids is None:
            raise ValueError("COCOPredictionWriter: the DataModule must provide `category_ids` (COCO id per label)")
        results = []
        for batch in predictions:
            for image_id, det in zip(batch["image_ids"], batch["detections"]):
                for box, score, label, mask in zip(det["boxes"].tolist(), det["scores"].tolist(),
                                                   det["labels"].tolist(), det["masks"]):
                    x1, y1, x2, y2 = box
                    results.append({
                        "image_id": image_id, "category_id": category_ids[label - 1],
                        "bbox": [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)], "score": round(score, 4),
                        "segmentation": _mask_to_rle(mask),
                    })
        path = self._json_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results))
