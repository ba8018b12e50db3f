"""ADE20K (SceneParsing, `ADEChallengeData2016`) semantic segmentation: dataset, transforms and DataModule.

Layout: `<root>/images/{training,validation}/<name>.jpg` and `<root>/annotations/{training,validation}/<name>.png`
(one-channel PNG, 0 = "other", 1..150 = classes). With `reduce_zero_label` (the ADE20K convention) 0 becomes the
ignore value 255 and 1..150 become 0..149.

Training pipeline (mmsegmentation's ADE20K recipe): random resize to `ratio in [0.5, 2.0]` times the scale 2048x512
keeping the aspect ratio, random 512x512 crop in which no class covers more than 75 % of the pixels (up to 10 tries),
horizontal flip, photometric distortion, pad to the crop size (image 0, label 255). Evaluation: the image is resized
to fit 2048x512 (aspect kept) and the prediction is compared with the full-resolution annotation.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .base import BaseDataModule, class_palette, overlay_labels, panels_figure

__all__ = ["ADE20KDataset", "ADE20KDataModule", "SegmentationTrainTransform", "FitScale", "IMAGE_SUFFIXES"]

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLIT_DIRS = {"train": "training", "val": "validation"}


def _fit_scale_factor(height: int, width: int, scale: Sequence[int]) -> float:
    """Factor that makes the long side <= max(scale) and the short side <= min(scale), one of them equal."""
    long_target, short_target = max(scale), min(scale)
    return min(long_target / max(height, width), short_target / min(height, width))


def _resize(image: tv_tensors.Image, mask: tv_tensors.Mask | None, factor: float):
    height, width = image.shape[-2:]
    size = [max(1, round(height * factor)), max(1, round(width * factor))]
    image = TF.resize(image, size, antialias=True)  # bilinear
    mask = TF.resize(mask, size) if mask is not None else None  # tv_tensors.Mask: nearest
    return image, mask


class FitScale:
    """Resize an image (and its mask) so it fits `scale` (long, short) with the aspect ratio kept.

    Args:
        scale: (long, short) side bounds.
    """

    def __init__(self, scale: Sequence[int] = (2048, 512)):
        self.scale = tuple(scale)

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask | None = None):
        return _resize(image, mask, _fit_scale_factor(*image.shape[-2:], self.scale))


class SegmentationTrainTransform:
    """Random resize, category-balanced random crop, flip, photometric distortion, pad to the crop size.

    Args:
        scale: (long, short) side bounds before the random ratio.
        ratio_range: Range of the random resize ratio.
        crop_size: Side of the square crop.
        cat_max_ratio: No class may cover more than this share of the crop (up to 10 tries).
        flip_prob: Horizontal flip probability.
        photometric: Apply mmseg's photometric distortion.
    """

    def __init__(
        self,
        scale: Sequence[int] = (2048, 512),
        ratio_range: Sequence[float] = (0.5, 2.0),
        crop_size: int = 512,
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
    ):
        self.scale, self.ratio_range, self.crop_size = tuple(scale), tuple(ratio_range), int(crop_size)
        self.cat_max_ratio = cat_max_ratio
        self.flip = v2.RandomHorizontalFlip(flip_prob)
        # mmseg's PhotoMetricDistortion applies each of brightness (+-32), contrast (0.5-1.5), saturation (0.5-1.5)
        # and hue (+-18 of OpenCV's 180) with probability 0.5; torchvision's colour jitter is the closest real op.
        self.photometric = (
            v2.Compose([
                v2.RandomApply([v2.ColorJitter(brightness=32 / 255)], p=0.5),
                v2.RandomApply([v2.ColorJitter(contrast=0.5)], p=0.5),
                v2.RandomApply([v2.ColorJitter(saturation=0.5)], p=0.5),
                v2.RandomApply([v2.ColorJitter(hue=18 / 180)], p=0.5),
            ])
            if photometric
            else None
        )

    def _crop_box(self, mask: torch.Tensor) -> tuple[int, int, int, int]:
        height, width = mask.shape[-2:]
        crop_h, crop_w = min(self.crop_size, height), min(self.crop_size, width)

        def draw() -> tuple[int, int, int, int]:
            return random.randint(0, height - crop_h), random.randint(0, width - crop_w), crop_h, crop_w

        box = draw()
        if self.cat_max_ratio >= 1.0:
            return box
        for _ in range(10):  # retry crops dominated by one class, as mmseg does
            top, left, h, w = box
            labels = mask[..., top : top + h, left : left + w].flatten()
            counts = torch.bincount(labels[labels != IGNORE_INDEX].long())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                break
            box = draw()
        return box

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask):
        ratio = random.uniform(*self.ratio_range)
        factor = _fit_scale_factor(*image.shape[-2:], [s * ratio for s in self.scale])
        image, mask = _resize(image, mask, factor)
        top, left, h, w = self._crop_box(mask)
        image, mask = TF.crop(image, top, left, h, w), TF.crop(mask, top, left, h, w)
        image, mask = self.flip(image, mask)
        if self.photometric is not None:
            image = self.photometric(image)
        pad = [0, 0, self.crop_size - w, self.crop_size - h]  # left, top, right, bottom
        if pad[2] or pad[3]:
            image, mask = TF.pad(image, pad, fill=0), TF.pad(mask, pad, fill=IGNORE_INDEX)
        return image, mask


def read_label_png(path: Path, num_classes: int, reduce_zero_label: bool) -> torch.Tensor:
    """Read a one-channel annotation PNG as (H, W) int64 training labels; reject values outside the label set.

    Args:
        path: The annotation PNG.
        num_classes: Classes after `reduce_zero_label`.
        reduce_zero_label: Map 0 to 255 (ignore) and 1..K to 0..K-1.
    """
    with Image.open(path) as png:
        if png.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"{path}: annotation must be a one-channel PNG of class indices, got mode {png.mode!r}")
        raw = np.array(png).astype(np.int64)
    highest = num_classes if reduce_zero_label else num_classes - 1
    out_of_range = raw > highest
    if not reduce_zero_label:  # labels are already 0-based; 255 is the ignore value
        out_of_range &= raw != IGNORE_INDEX
    if out_of_range.any():
        bad = np.unique(raw[out_of_range]).tolist()
        raise ValueError(
            f"{path}: annotation holds label(s) {bad[:10]} above {highest}; expected 0..{highest} "
            f"(num_classes={num_classes}, reduce_zero_label={reduce_zero_label})"
        )
    if reduce_zero_label:
        raw = np.where(raw == 0, IGNORE_INDEX, raw - 1)
    return torch.from_numpy(raw)


def list_images(folder: Path) -> list[Path]:
    """The image files of `folder`, sorted; an error names a missing folder.

    Args:
        folder: The folder.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(path: Path) -> tv_tensors.Image:
    """An image file as a uint8 (3, H, W) RGB `tv_tensors.Image`.

    Args:
        path: The image file.
    """
    with Image.open(path) as img:
        return tv_tensors.Image(torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1))


class ADE20KDataset(Dataset):
    """Image/annotation pairs of one split, matched by file stem. Any unpaired file is an error.

    Items are dicts: "image" float (3, H, W) in [0, 1] after `transform`, "mask" int64 (H, W) with 255 = ignore,
    "path" the image path.

    Args:
        root: The `ADEChallengeData2016` folder.
        split: "train" or "val".
        num_classes: Classes after `reduce_zero_label`.
        reduce_zero_label: Map 0 to 255 (ignore) and 1..K to 0..K-1.
        transform: Joint (image, mask) transform, or None.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        num_classes: int = 150,
        reduce_zero_label: bool = True,
        transform=None,
    ):
        if split not in SPLIT_DIRS:
            raise ValueError(f"ADE20KDataset: split must be one of {sorted(SPLIT_DIRS)}, got {split!r}")
        self.root = Path(root)
        image_dir = self.root / "images" / SPLIT_DIRS[split]
        label_dir = self.root / "annotations" / SPLIT_DIRS[split]
        images = list_images(image_dir)
        if not label_dir.is_dir():
            raise FileNotFoundError(f"annotation folder not found: {label_dir}")
        labels = {p.stem: p for p in label_dir.glob("*.png")}
        image_stems = {p.stem for p in images}
        missing_labels = sorted(image_stems - labels.keys())
        missing_images = sorted(labels.keys() - image_stems)
        if missing_labels or missing_images:
            raise ValueError(
                f"ADE20K {split}: {len(images)} images in {image_dir} but {len(labels)} annotations in {label_dir}; "
                f"images without annotation: {missing_labels[:5]}{' ...' if len(missing_labels) > 5 else ''}; "
                f"annotations without image: {missing_images[:5]}{' ...' if len(missing_images) > 5 else ''}"
            )
        if not images:
            raise ValueError(f"ADE20K {split}: no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
        self.samples = [(p, labels[p.stem]) for p in images]
        self.num_classes, self.reduce_zero_label, self.transform = num_classes, reduce_zero_label, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        image_path, label_path = self.samples[index]
        image = read_image(image_path)
        mask = tv_tensors.Mask(read_label_png(label_path, self.num_classes, self.reduce_zero_label))
        if mask.shape != image.shape[-2:]:
            raise ValueError(
                f"{label_path}: annotation size {tuple(mask.shape)} differs from image {image_path} "
                f"size {tuple(image.shape[-2:])}"
            )
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return {"image": TF.to_dtype(image, torch.float32, scale=True), "mask": mask.as_subclass(torch.Tensor).long(),
                "path": str(image_path)}


class ImageFolderDataset(Dataset):
    """Images of one folder for prediction: items are {"image", "path"} resized by `transform`.

    Args:
        folder: The image folder.
        transform: Image transform (called as `transform(image)`), or None.
    """

    def __init__(self, folder: str | Path, transform=None):
        self.paths = list_images(Path(folder))
        if not self.paths:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        image = read_image(self.paths[index])
        orig_size = tuple(image.shape[-2:])
        if self.transform is not None:
            image, _ = self.transform(image)
        return {"image": TF.to_dtype(image, torch.float32, scale=True), "path": str(self.paths[index]),
                "orig_size": orig_size}


def collate_train(batch: list[dict]) -> dict:
    """Training crops share one size: stacked images and masks, and the list of paths.

    Args:
        batch: Training items.
    """
    return {"image": torch.stack([b["image"] for b in batch]), "mask": torch.stack([b["mask"] for b in batch]),
            "path": [b["path"] for b in batch]}


def collate_lists(batch: list[dict]) -> dict:
    """Evaluation images differ in size: keep them as lists.

    Args:
        batch: Evaluation or predict items.
    """
    return {key: [b[key] for b in batch] for key in batch[0]}


class EvalTransform:
    """Fit the image to `scale`; keep the annotation at full resolution (metrics are computed there).

    Args:
        scale: (long, short) side bounds of the image.
    """

    def __init__(self, scale: Sequence[int]):
        self.fit = FitScale(scale)

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask | None = None):
        image, _ = self.fit(image)
        return image, mask


class ADE20KDataModule(BaseDataModule):
    """ADE20K SceneParsing from `root` (= the `ADEChallengeData2016` folder).

    `predict_images` (a folder) is what `mamba2d predict` segments; by default the validation images. Test runs on
    the validation split (ADE20K's test annotations are not public).

    Args:
        root: The `ADEChallengeData2016` folder.
        num_classes: Classes in the annotations (after `reduce_zero_label`).
        reduce_zero_label: Label 0 ("other") becomes ignore (255) and 1..K become 0..K-1.
        scale: (long, short) side bounds of the resize, before the training ratio.
        ratio_range: Random resize ratio range of training.
        crop_size: Side of the square training crop.
        cat_max_ratio: No class may cover more than this share of a training crop (up to 10 tries).
        flip_prob: Horizontal flip probability of training.
        photometric: Apply mmseg's photometric distortion in training.
        batch_size: Training images per batch.
        eval_batch_size: Validation, test and predict images per batch.
        num_workers: DataLoader worker processes.
        predict_images: Folder of images that `predict` segments (None: the validation images).
    """

    def __init__(
        self,
        root: str = "data/ADEChallengeData2016",
        num_classes: int = 150,
        reduce_zero_label: bool = True,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        crop_size: int = 512,
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        batch_size: int = 16,
        eval_batch_size: int = 1,
        num_workers: int = 4,
        predict_images: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)

    def _dataset(self, split: str, transform) -> ADE20KDataset:
        return ADE20KDataset(self.root, split, self.hparams.num_classes, self.hparams.reduce_zero_label, transform)

    def setup(self, stage: str) -> None:
        hp = self.hparams
        eval_transform = EvalTransform(hp.scale)
        if stage == "fit":
            self.train_set = self._dataset("train", SegmentationTrainTransform(
                hp.scale, hp.ratio_range, hp.crop_size, hp.cat_max_ratio, hp.flip_prob, hp.photometric))
        if stage in ("fit", "validate", "test"):
            self.val_set = self._dataset("val", eval_transform)
        if stage == "predict":
            folder = hp.predict_images or self.root / "images" / SPLIT_DIRS["val"]
            self.predict_set = ImageFolderDataset(folder, FitScale(hp.scale))

    @property
    def num_classes(self) -> int:
        """Segmentation classes (the `num_classes` argument)."""
        return self.hparams.num_classes

    def dataset(self, split: str) -> Dataset:
        """The split's dataset; test uses the validation split.

        Args:
            split: One of train, val, test, predict.
        """
        return super().dataset("val" if split == "test" else split)

    def collate_fn(self, split: str):
        """Stacked training crops; lists of differently sized evaluation images.

        Args:
            split: One of train, val, test, predict.
        """
        return collate_train if split == "train" else collate_lists

    def drop_last(self, split: str, dataset: Dataset) -> bool:
        """Training drops the last incomplete batch when there is a full one.

        Args:
            split: One of train, val, test, predict.
            dataset: That split's dataset.
        """
        return split == "train" and len(dataset) >= self.hparams.batch_size

    def plot(self, sample: dict, prediction=None, max_images: int = 4) -> Figure:
        """One row per image: the image, its annotation over it (if the batch has masks) and the prediction over it
        (if given), coloured by `class_palette`; ignored pixels (255) are left uncoloured.

        Args:
            sample: A batch dict with "image" (stacked or a list) and, except for predict batches, "mask".
            prediction: Predicted label maps (one (H, W) tensor per image, e.g. `SemanticSegmenter.predict_labels`
                or the "labels" of its predict output), or None.
            max_images: At most this many images are drawn.
        """
        if isinstance(prediction, dict):
            prediction = prediction["labels"]
        palette = class_palette(self.hparams.num_classes)
        rows = []
        for index, image in enumerate(list(sample["image"])[:max_images]):
            row = [(Path(sample["path"][index]).name if "path" in sample else "image",
                    overlay_labels(image, torch.full(image.shape[-2:], IGNORE_INDEX), palette))]
            if "mask" in sample:
                row.append(("annotation", overlay_labels(image, sample["mask"][index], palette)))
            if prediction is not None:
                row.append(("prediction", overlay_labels(image, prediction[index], palette)))
            rows.append([(title, picture.permute(1, 2, 0).numpy()) for title, picture in row])
        return panels_figure(rows)
