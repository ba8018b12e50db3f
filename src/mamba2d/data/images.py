"""ImageNet-style image folders (`root/{train,val}/<class>/<image>`) with timm's train and eval transforms."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from .base import BaseDataModule, image_grid_figure, predicted_labels


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB; an unreadable file raises an error that names it.

    Args:
        path: The image file.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise OSError(f"cannot read image file {path}: {err}") from err


def image_folder(root: Path, transform) -> ImageFolder:
    """torchvision's ImageFolder over `root/<class>/<image>`, with errors that name the folder.

    Args:
        root: The split's folder.
        transform: The image transform (None: PIL images).
    """
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (expected {root}/<class>/<image>)")
    try:
        return ImageFolder(str(root), transform=transform, loader=load_rgb)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image folder {root}: {err} (expected {root}/<class>/<image>)") from err


class ImageFolderDataModule(BaseDataModule):
    """Train/val (optionally test) ImageFolders. Training uses timm's RandAugment pipeline.

    `predict` runs on the test folder (default: the validation folder). Batches are (images in [0, 1], labels): the
    classifier normalises them with its backbone's mean and std and applies random erasing after that (timm's
    prefetcher order), so this module need not know the backbone.

    Args:
        root: Folder holding the split folders.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes.
        input_size: Side of the square network input.
        crop_pct: Evaluation centre-crop fraction (timm's crop_pct).
        interpolation: Resize interpolation.
        auto_augment: timm auto-augment policy of training (None: off).
        color_jitter: Colour-jitter strength of training.
        train_dir: Training folder under `root`.
        val_dir: Validation folder under `root`.
        test_dir: Test folder under `root` (None: the validation folder).
        pin_memory: Pin loader memory (faster host-to-GPU copies).
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 128,
        num_workers: int = 8,
        input_size: int = 224,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        color_jitter: float = 0.4,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = None,
        pin_memory: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self._num_classes: int | None = None

    @property
    def num_classes(self) -> int:
        """Class folders of the training split (read from disk on first use)."""
        if self._num_classes is None:
            self._num_classes = len(image_folder(Path(self.hparams.root) / self.hparams.train_dir, None).classes)
        return self._num_classes

    def _transform(self, training: bool):
        hp = self.hparams
        # normalize=False: uint8 tensors, no normalisation (the classifier's). timm's `mean` left at its default
        # serves only as RandAugment's fill colour: ImageNet's mean pixel, as in VMamba's recipe.
        pipeline = create_transform(
            hp.input_size, is_training=training, auto_augment=hp.auto_augment if training else None,
            color_jitter=hp.color_jitter, interpolation=hp.interpolation, crop_pct=hp.crop_pct, normalize=False,
        )
        return transforms.Compose([pipeline, transforms.ConvertImageDtype(torch.float32)])

    def setup(self, stage: str | None = None) -> None:
        root = Path(self.hparams.root)
        self.train_set = image_folder(root / self.hparams.train_dir, self._transform(True))
        self.val_set = image_folder(root / self.hparams.val_dir, self._transform(False))
        if self.val_set.classes != self.train_set.classes:
            raise ValueError(
                f"class folders differ between {root / self.hparams.train_dir} ({len(self.train_set.classes)}) "
                f"and {root / self.hparams.val_dir} ({len(self.val_set.classes)})"
            )
        self._num_classes = len(self.train_set.classes)
        test_dir = self.hparams.test_dir
        self.test_set = image_folder(root / test_dir, self._transform(False)) if test_dir else self.val_set

    def dataset(self, split: str) -> Dataset:
        """The split's ImageFolder; predict uses the test folder.

        Args:
            split: One of train, val, test, predict.
        """
        return {"train": self.train_set, "val": self.val_set}.get(split, self.test_set)

    def drop_last(self, split: str, dataset: Dataset) -> bool:
        """Training drops the last incomplete batch: mixup/cutmix need even, equal batches.

        Args:
            split: One of train, val, test, predict.
            dataset: That split's dataset.
        """
        return split == "train"

    def plot(self, sample, prediction=None) -> Figure:
        """Grid of the batch's images titled with the true and (if given) predicted class folder.

        Args:
            sample: A batch (images, labels).
            prediction: Predicted labels (B,), logits (B, K), or the classifier's predict output (a dict with
                "label"); None for none.
        """
        images, labels = sample
        classes = getattr(getattr(self, "train_set", None), "classes", None)
        return image_grid_figure(images, labels, predicted_labels(prediction), classes)
