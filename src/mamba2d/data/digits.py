"""scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes) as a CPU-sized image task."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, TensorDataset

from .base import BaseDataModule, image_grid_figure, predicted_labels

DIGITS_MAX = 16.0  # pixel values of load_digits() run 0..16


def digit_images(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as (n, 3, size, size) float images in [0, 1], and their labels.

    The classifier normalises them with its backbone's pretrained cfg: the zoo's `*.digits` tags (and the nano
    sizes) say mean = std = 0.5, so the network sees exactly the [-1, 1] input those checkpoints were trained on.

    Args:
        size: Side of the upsampled square images.
    """
    data = load_digits()
    images = torch.from_numpy(data.images).float().div(DIGITS_MAX).unsqueeze(1)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(data.target).long()


class DigitsDataModule(BaseDataModule):
    """Fixed stratified train/val/test split (70/15/15 by default) of the digits, upsampled to `image_size`.

    The split depends only on `split_seed`, so every run and every model sees the same held-out images; `predict`
    runs on the test split. Batches are (images (B, 3, S, S) in [0, 1], labels (B,)).

    Args:
        batch_size: Images per batch.
        image_size: Side of the upsampled square images.
        val_fraction: Share of the digits in the validation split.
        test_fraction: Share of the digits in the test split.
        split_seed: Seed of the stratified split.
        num_workers: DataLoader worker processes.
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 32,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"DigitsDataModule: val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) "
                "and sum to less than 1"
            )
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        images, labels = digit_images(hp.image_size)
        index = torch.arange(len(labels)).numpy()
        train_val, test = train_test_split(
            index, test_size=hp.test_fraction, stratify=labels.numpy(), random_state=hp.split_seed
        )
        train, val = train_test_split(
            train_val, test_size=hp.val_fraction / (1 - hp.test_fraction), stratify=labels.numpy()[train_val],
            random_state=hp.split_seed,
        )
        self.splits = {
            name: TensorDataset(images[torch.from_numpy(idx)], labels[torch.from_numpy(idx)])
            for name, idx in (("train", train), ("val", val), ("test", test))
        }

    def dataset(self, split: str) -> Dataset:
        """The split's images; predict uses the test split.

        Args:
            split: One of train, val, test, predict.
        """
        return self.splits["test" if split == "predict" else split]

    def plot(self, sample, prediction=None) -> Figure:
        """Grid of the batch's digits titled with the true and (if given) predicted digit.

        Args:
            sample: A batch (images, labels).
            prediction: Predicted labels (B,), logits (B, 10), or the classifier's predict output (a dict with
                "label"); None for none.
        """
        images, labels = sample
        return image_grid_figure(images, labels, predicted_labels(prediction))

