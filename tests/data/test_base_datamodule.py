"""BaseDataModule: one loader factory for every split, and figures through `plot` (matplotlib's Figure API)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch.utils.data import DistributedSampler

from mamba2d.data.base import BaseDataModule, image_grid_figure
from mamba2d.data.digits import DigitsDataModule


def test_loaders_come_from_one_factory():
    data = DigitsDataModule(batch_size=8)
    data.setup("fit")
    train, val, predict = data.train_dataloader(), data.val_dataloader(), data.predict_dataloader()
    assert isinstance(train.sampler, DistributedSampler) and train.batch_size == 8
    assert not isinstance(val.sampler, DistributedSampler)
    assert len(predict.dataset) == len(data.test_dataloader().dataset)
    with pytest.raises(ValueError, match="split must be one of"):
        data.dataloader("holdout")
    with pytest.raises(ValueError, match="no train dataset"):
        BaseDataModule().dataset("train")


def test_digits_plot_shows_true_and_predicted_labels(tmp_path):
    data = DigitsDataModule(batch_size=6)
    data.setup("fit")
    images, labels = next(iter(data.val_dataloader()))
    predictions = labels.clone()
    predictions[0] = (labels[0] + 1) % 10
    figure = data.plot((images, labels), {"label": predictions})
    assert isinstance(figure, Figure)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert len(titles) == 6 and titles[0] == f"true {int(labels[0])}\npred {int(predictions[0])}"
    colours = [ax.title.get_color() for ax in figure.axes if ax.get_title()]
    assert colours[0] == "tab:red" and set(colours[1:]) == {"tab:green"}
    path = tmp_path / "grid.png"
    figure.savefig(path)
    pixels = np.asarray(Image.open(path).convert("L"))
    assert pixels.shape[0] > 100 and pixels.std() > 10  # drawn, not blank


def test_image_grid_without_predictions_and_with_names():
    figure = image_grid_figure(torch.rand(3, 3, 8, 8), [0, 1, 0], class_names=["cat", "dog"], columns=2)
    assert [ax.get_title() for ax in figure.axes if ax.get_title()] == ["true cat", "true dog", "true cat"]
    with pytest.raises(ValueError, match="no images"):
        image_grid_figure(torch.rand(0, 3, 8, 8), [])
