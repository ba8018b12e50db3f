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


def test_trained_checkpoints_are_published_and_verified():
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
