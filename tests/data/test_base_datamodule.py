"""BaseDataModule: one loader factory for every split, and figures through `plot` (matplotlib's Figure API)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dense_data import make_ade20k, make_coco
from matplotlib.figure import Figure
from mil_helpers import classification_folder
from PIL import Image
from torch.utils.data import DistributedSampler

from mamba2d.data.ade20k import ADE20KDataModule
from mamba2d.data.base import BaseDataModule, image_grid_figure, to_uint8_image
from mamba2d.data.coco import COCODataModule
from mamba2d.data.digits import DigitsDataModule
from mamba2d.data.slides import SlideBagDataModule


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


def is_drawn(figure: Figure, path) -> bool:
    figure.savefig(path)
    pixels = np.asarray(Image.open(path).convert("L"))
    return pixels.shape[0] > 100 and pixels.std() > 10


def test_segmentation_plot_overlays_annotation_and_prediction(tmp_path):
    root = make_ade20k(tmp_path, n_train=1, n_val=2, size=64)
    data = ADE20KDataModule(str(root), num_classes=3, scale=(128, 64), eval_batch_size=2, num_workers=0)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    figure = data.plot(batch, {"labels": batch["mask"]})
    assert [ax.get_title() for ax in figure.axes if ax.get_title()][1:3] == ["annotation", "prediction"]
    assert len([ax for ax in figure.axes if ax.images]) == 6
    assert is_drawn(figure, tmp_path / "seg.png")


def test_detection_plot_draws_boxes_of_annotations_and_detections(tmp_path):
    root = tmp_path / "coco"
    make_coco(root, "val2017", n_images=2, seed=1)
    data = COCODataModule(str(root), eval_batch_size=2, num_workers=0)
    data.setup("validate")
    images, targets = next(iter(data.val_dataloader()))
    detections = [{**{k: t[k] for k in ("boxes", "labels", "masks")}, "scores": torch.ones(len(t["labels"]))}
                  for t in targets]
    detections[0]["scores"][:] = 0.1  # below the drawing threshold: the image is drawn bare
    figure = data.plot((images, targets), detections)
    panels = [ax.images[0].get_array() for ax in figure.axes if ax.images]
    assert len(panels) == 4
    assert np.array_equal(panels[1], to_uint8_image(images[0]).permute(1, 2, 0).numpy())  # nothing drawn
    assert not np.array_equal(panels[0], panels[1])  # the annotation's boxes and masks are
    assert is_drawn(figure, tmp_path / "det.png")


def test_mil_plot_puts_attention_on_the_slide_grid(tmp_path):
    csv = classification_folder(tmp_path)
    data = SlideBagDataModule(str(tmp_path), str(csv))
    data.setup("fit")
    bag = next(iter(data.val_dataloader()))
    scores = torch.arange(len(bag["positions"]), dtype=torch.float32)
    figure = data.plot(bag, {"scores": scores, "probs": torch.tensor([0.25, 0.75])})
    grid = np.ma.filled(figure.axes[0].images[0].get_array(), np.nan)
    rows, cols = bag["positions"][-1].tolist()
    assert grid[rows, cols] == scores[-1] and np.isnan(grid).sum() == grid.size - len(scores)
    assert "predicted 1 (p=0.75)" in figure._suptitle.get_text()
    assert is_drawn(figure, tmp_path / "mil.png")
