"""`BaseDataModule`: the one dataloader factory every DataModule uses, and the `plot` hook for figures.

A DataModule says what differs per split (`dataset`, `batch_size`, `collate_fn`, `drop_last`); the base builds
the loaders with the shared training sampler of `mamba2d.data.sampling` (a shuffle that depends only on the seed
and the epoch, split across ranks) and exactly-once evaluation across ranks. Figures are built with matplotlib's
Figure API, never through pyplot's global state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, Dataset
from torchvision.utils import draw_segmentation_masks

from .sampling import loader_sampling

__all__ = [
    "BaseDataModule", "SPLITS", "class_palette", "image_grid_figure", "overlay_labels", "panels_figure",
    "predicted_labels", "to_uint8_image",
]

SPLITS = ("train", "val", "test", "predict")


class BaseDataModule(LightningDataModule):
    """Base of the mamba2d DataModules (torchgeo's `BaseDataModule` pattern).

    The loader settings come from the subclass's saved hyperparameters: `batch_size` (training),
    `eval_batch_size` (validation, test and predict; default `batch_size`), `num_workers` (default 0) and
    `pin_memory` (default False). A subclass builds its datasets in `setup` as `train_set`, `val_set`,
    `test_set` and `predict_set` (or overrides `dataset`), and overrides `collate_fn`, `drop_last` or `batch_size`
    where a split needs it.
    """

    def dataset(self, split: str) -> Dataset:
        """The dataset of `split` (default: the attribute `<split>_set` made by `setup`).

        Args:
            split: One of train, val, test, predict.

        Raises:
            ValueError: `setup` made no dataset for `split`.
        """
        dataset = getattr(self, f"{split}_set", None)
        if dataset is None:
            raise ValueError(f"{type(self).__name__}: no {split} dataset (setup made none for this stage)")
        return dataset

    def batch_size(self, split: str) -> int:
        """Batch size of `split`: `batch_size` for training, `eval_batch_size` (default `batch_size`) otherwise.

        Args:
            split: One of train, val, test, predict.
        """
        hp = self.hparams
        if split == "train":
            return hp.batch_size
        return hp.get("eval_batch_size") or hp.batch_size

    def collate_fn(self, split: str) -> Callable | None:
        """The loader's collate function for `split` (None: PyTorch's default).

        Args:
            split: One of train, val, test, predict.
        """
        return None

    def drop_last(self, split: str, dataset: Dataset) -> bool:
        """Whether the loader of `split` drops the last incomplete batch (default: never).

        Args:
            split: One of train, val, test, predict.
            dataset: That split's dataset.
        """
        return False

    def dataloader(self, split: str) -> DataLoader:
        """The DataLoader of `split`: shuffled by the shared training sampler for train, in order (split across
        ranks without repeats) otherwise.

        Args:
            split: One of train, val, test, predict.
        """
        if split not in SPLITS:
            raise ValueError(f"{type(self).__name__}: split must be one of {SPLITS}, got {split!r}")
        dataset = self.dataset(split)
        workers = self.hparams.get("num_workers", 0)
        return DataLoader(
            dataset, batch_size=self.batch_size(split), collate_fn=self.collate_fn(split),
            drop_last=self.drop_last(split, dataset), num_workers=workers, persistent_workers=workers > 0,
            pin_memory=self.hparams.get("pin_memory", False), **loader_sampling(self, dataset, split == "train"),
        )

    def train_dataloader(self) -> DataLoader:
        """The training loader."""
        return self.dataloader("train")

    def val_dataloader(self) -> DataLoader:
        """The validation loader."""
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        """The test loader."""
        return self.dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        """The predict loader."""
        return self.dataloader("predict")

    def plot(self, sample, prediction=None) -> Figure:
        """A figure of one batch as this DataModule's loader yields it, with the model's predictions if given.

        Args:
            sample: A batch of this DataModule.
            prediction: The task's predictions for that batch (see the subclass), or None.

        Raises:
            NotImplementedError: This DataModule draws no figures.
        """
        raise NotImplementedError(f"{type(self).__name__} does not plot its samples")


def _displayable(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) float in any range -> (H, W, 3) in [0, 1]: min-max scaled, grey images repeated to RGB."""
    image = image.detach().float().cpu()
    low, high = image.min(), image.max()
    image = (image - low) / (high - low) if high > low else torch.zeros_like(image)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image[:3].permute(1, 2, 0).clamp(0, 1)


def image_grid_figure(images: torch.Tensor | Sequence[torch.Tensor], labels: Sequence[int] | torch.Tensor,
                      predictions: Sequence[int] | torch.Tensor | None = None,
                      class_names: Sequence[str] | None = None, max_images: int = 16, columns: int = 4) -> Figure:
    """A grid of images titled with their true class, and the predicted one in green (right) or red (wrong).

    Args:
        images: (B, C, H, W) or a list of (C, H, W) tensors, in any value range (each is min-max scaled).
        labels: The true class index of each image.
        predictions: The predicted class index of each image, or None.
        class_names: Names of the class indices; None: the indices themselves.
        max_images: At most this many images are drawn.
        columns: Images per row.
    """
    count = min(len(images), max_images)
    if count == 0:
        raise ValueError("image_grid_figure: no images to draw")
    columns = min(columns, count)
    rows = -(-count // columns)
    figure = Figure(figsize=(2.2 * columns, 2.4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    name = (lambda i: class_names[i]) if class_names is not None else str
    for index, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if index >= count:
            continue
        ax.imshow(_displayable(images[index]).numpy())
        true = int(labels[index])
        title, colour = f"true {name(true)}", "black"
        if predictions is not None:
            predicted = int(predictions[index])
            title += f"\npred {name(predicted)}"
            colour = "tab:green" if predicted == true else "tab:red"
        ax.set_title(title, fontsize=9, color=colour)
    return figure


def predicted_labels(prediction) -> torch.Tensor | None:
    """Class indices from labels (B,), scores (B, K) or a predict output dict with "label"; None stays None.

    Args:
        prediction: What a classifier returned for a batch.
    """
    if prediction is None:
        return None
    if isinstance(prediction, dict):
        prediction = prediction["label"]
    prediction = torch.as_tensor(prediction)
    return prediction.argmax(dim=-1) if prediction.dim() == 2 else prediction


def class_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, distinct for neighbouring indices: the bits of (class + 1) are spread over
    the high bits of R, G and B (the PASCAL VOC scheme); the +1 keeps black for no class.

    Args:
        num_classes: Number of colours.
    """
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        value, colour = index + 1, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                colour[channel] |= ((value >> (3 * bit + channel)) & 1) << (7 - bit)
        palette[index] = colour
    return palette


def to_uint8_image(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) float image in [0, 1] (or any range: min-max scaled) -> (3, H, W) uint8 for torchvision's drawing.

    Args:
        image: The image.
    """
    return (_displayable(image) * 255).round().to(torch.uint8).permute(2, 0, 1).contiguous()


def overlay_labels(image: torch.Tensor, labels: torch.Tensor, palette: np.ndarray, ignore_index: int = 255,
                   alpha: float = 0.5) -> torch.Tensor:
    """An image with a label map drawn over it (torchvision's `draw_segmentation_masks`), one colour per class.

    Args:
        image: (C, H, W) float image.
        labels: (h, w) integer labels, resized (nearest) to the image; `ignore_index` is left undrawn.
        palette: (K, 3) uint8 colours of the classes.
        ignore_index: The label that is not drawn.
        alpha: Opacity of the colours.

    Returns:
        (3, H, W) uint8.
    """
    canvas = to_uint8_image(image)
    labels = torch.nn.functional.interpolate(labels[None, None].float(), size=canvas.shape[-2:], mode="nearest")
    labels = labels[0, 0].long()
    classes = [int(k) for k in labels.unique() if int(k) != ignore_index and 0 <= int(k) < len(palette)]
    if not classes:
        return canvas
    masks = torch.stack([labels == k for k in classes])
    return draw_segmentation_masks(canvas, masks, alpha=alpha, colors=[tuple(int(c) for c in palette[k])
                                                                          for k in classes])


def panels_figure(rows: list[list[tuple[str, np.ndarray]]], panel_size: float = 3.0) -> Figure:
    """A figure of titled image panels, one list of (title, (H, W, 3) or (H, W) array) per row.

    Args:
        rows: The panels of each row (rows may differ in length).
        panel_size: Width and height of one panel in inches.
    """
    if not rows or not any(rows):
        raise ValueError("panels_figure: no panels to draw")
    columns = max(len(row) for row in rows)
    figure = Figure(figsize=(panel_size * columns, panel_size * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for r, row in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.set_axis_off()
            if c < len(row):
                title, picture = row[c]
                ax.imshow(picture)
                ax.set_title(title, fontsize=9)
    return figure
