"""ImageNet-style image folders (`root/{train,val}/<class>/<image>`) with timm's train and eval transforms."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningDataModule
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from .sampling import loader_sampling


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB; an unreadable file raises an error that names it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise OSError(f"cannot read image file {path}: {err}") from err


def image_folder(root: Path, transform) -> ImageFolder:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (expected {root}/<class>/<image>)")
    try:
        return ImageFolder(str(root), transform=transform, loader=load_rgb)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image folder {root}: {err} (expected {root}/<class>/<image>)") from err


class ImageFolderDataModule(LightningDataModule):
    """Train/val (optionally test) ImageFolders. Training uses timm's RandAugment/random-erasing pipeline."""

    def __init__(
        self,
        root: str,
        batch_size: int = 128,
        num_workers: int = 8,
        input_size: int = 224,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
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
        if self._num_classes is None:
            self._num_classes = len(image_folder(Path(self.hparams.root) / self.hparams.train_dir, None).classes)
        return self._num_classes

    def _transform(self, training: bool):
        hp = self.hparams
        return create_transform(
            hp.input_size, is_training=training, auto_augment=hp.auto_augment if training else None,
            re_prob=hp.re_prob if training else 0.0, color_jitter=hp.color_jitter,
            interpolation=hp.interpolation, crop_pct=hp.crop_pct,
        )

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

    def _loader(self, dataset, training: bool) -> DataLoader:
        hp = self.hparams
        # Training drops the last incomplete batch: mixup/cutmix need even, equal batches.
        sampling = loader_sampling(self, dataset, training)
        return DataLoader(
            dataset, batch_size=hp.batch_size, drop_last=training, num_workers=hp.num_workers, **sampling,
            pin_memory=hp.pin_memory, persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)
