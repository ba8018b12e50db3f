"""Checkpoints trained here and published in zoo/: they load (sha256-verified, strict) and reproduce the test
metric recorded in the manifest, from mamba2d.zoo and through timm."""

import pytest
import timm
import torch

import mamba2d  # noqa: F401
import mamba2d.zoo as zoo
from mamba2d.data.digits import DigitsDataModule

TRAINED = [n for n in zoo.list() if zoo.get(n).provenance == "trained here"]
DIGITS = [n for n in TRAINED if n.endswith(".digits")]
SPATIAL = [n for n in TRAINED if n.endswith(".spatial")]


def test_digits_and_mil_checkpoints_are_published():
    assert set(DIGITS) == {"vmamba2d_nano.digits", "vmamba_nano.digits"}
    for name in TRAINED:
        assert zoo.verify(name).ok, zoo.verify(name).describe()


@pytest.mark.parametrize("name", DIGITS)
def test_digits_checkpoint_reproduces_recorded_accuracy(name):
    entry = zoo.get(name)
    model = zoo.load(name)
    data = DigitsDataModule(batch_size=128, image_size=entry.input["size"])
    data.setup("test")
    correct = total = 0
    with torch.no_grad():
        for images, labels in data.test_dataloader():
            correct += int((model(images).argmax(dim=1) == labels).sum())
            total += len(labels)
    assert (correct, total) == (entry.metrics["test_correct"], entry.metrics["test_images"])
    assert correct / total == pytest.approx(entry.metrics["test_acc1"], abs=5e-5)

    via_timm = timm.create_model(entry.arch, pretrained=True).eval()
    assert via_timm.num_classes == 10 and via_timm.pretrained_cfg["tag"] == "digits"
    with torch.no_grad():
        torch.testing.assert_close(via_timm(images), model(images))


@pytest.mark.parametrize("name", SPATIAL)
def test_mil_checkpoint_reproduces_recorded_accuracy(name, tmp_path):
    from mamba2d.data.slides import SlideBagDataModule
    from mamba2d.data.spatial_bags import write_spatial_bags

    entry = zoo.get(name)
    splits = entry.metrics["splits"]
    write_spatial_bags(tmp_path, splits, seed=entry.metrics["seed"])
    data = SlideBagDataModule(str(tmp_path), str(tmp_path / "labels.csv"))
    data.setup("test")
    model = zoo.load(name)
    correct = total = 0
    with torch.no_grad():
        for bag in data.test_dataloader():
            logits = model(bag["features"], bag["positions"], bag.get("segments")).logits
            correct += int(logits.argmax() == bag["label"])
            total += 1
    assert (correct, total) == (entry.metrics["test_correct"], entry.metrics["test_bags"])
