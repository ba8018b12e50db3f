"""Checkpoints trained here and published in zoo/: they load (sha256-verified, strict) and reproduce the test
metric recorded in the manifest, from mamba2d.zoo and through timm."""

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from sklearn.datasets import load_digits

import mamba2d  # noqa: F401
import mamba2d.zoo as zoo
from mamba2d.data.digits import DigitsDataModule, digit_images
from mamba2d.data.slides import SlideBagDataModule
from mamba2d.data.spatial_bags import BENCHMARK_BAGS, BENCHMARK_SPLITS, write_spatial_bags
from mamba2d.models import input_normalization
from mamba2d.tasks.classification import ImageClassifier
from mamba2d.tasks.mil import SlideMIL

TRAINED = [n for n in zoo.list() if zoo.get(n).provenance == "trained here"]
DIGITS = [n for n in TRAINED if n.endswith(".digits")]
SPATIAL_MIL = [n for n in TRAINED if n.endswith(".spatial_mil")]


def test_trained_checkpoints_are_published_and_verified():
    assert set(DIGITS) == {"vmamba2d_nano.digits", "vmamba_nano.digits"}
    assert set(SPATIAL_MIL) == {"mamba_mil_2d.spatial_mil", "abmil.spatial_mil"}
    for name in TRAINED:
        assert zoo.verify(name).ok, zoo.verify(name).describe()


@pytest.mark.parametrize("name", DIGITS)
def test_digits_checkpoint_reproduces_recorded_accuracy(name):
    entry = zoo.get(name)
    model = zoo.load(name)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in input_normalization(model))
    data = DigitsDataModule(batch_size=128, image_size=entry.input["size"])
    data.setup("test")
    correct = total = 0
    with torch.no_grad():
        for images, labels in data.test_dataloader():
            images = (images - mean) / std  # [0, 1] batches, normalised as the tag's cfg says
            correct += int((model(images).argmax(dim=1) == labels).sum())
            total += len(labels)
    assert (correct, total) == (entry.metrics["test_correct"], entry.metrics["test_images"])
    assert correct / total == pytest.approx(entry.metrics["test_acc1"], abs=5e-5)

    via_timm = timm.create_model(entry.arch, pretrained=True).eval()
    assert via_timm.num_classes == 10 and via_timm.pretrained_cfg["tag"] == "digits"
    with torch.no_grad():
        torch.testing.assert_close(via_timm(images), model(images))


@pytest.mark.parametrize("name", DIGITS)
def test_digits_classifier_sees_the_training_input_bit_for_bit(name, tmp_path):
    """The checkpoints were trained on digits normalised to [-1, 1] inside the data; now the data yields [0, 1]
    and the classifier normalises by the tag's cfg. The network input must be the same tensor, and the task must
    reproduce the recorded test metric."""
    entry = zoo.get(name)
    size = entry.input["size"]
    raw = torch.from_numpy(load_digits().images).float().div(16.0).unsqueeze(1)
    trained_on = F.interpolate(raw, size=(size, size), mode="bilinear", align_corners=False).sub(0.5).div(0.5)
    trained_on = trained_on.expand(-1, 3, -1, -1)

    task = ImageClassifier(backbone=name, num_classes=10, pretrained=True)
    data = DigitsDataModule(batch_size=128, image_size=size)
    data.setup("test")
    assert torch.equal(task.normalize(digit_images(size)[0]), trained_on)

    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        (metrics,) = trainer.test(task, datamodule=data, verbose=False)
    assert metrics["test/acc1"] == pytest.approx(entry.metrics["test_acc1"], abs=5e-5)


@pytest.fixture(scope="module")
def spatial_bags(tmp_path_factory):
    """The benchmark's seed-0 bags, regenerated: the test split the spatial_mil checkpoints were measured on."""
    out = tmp_path_factory.mktemp("spatial")
    write_spatial_bags(out, BENCHMARK_SPLITS, seed=0, config=BENCHMARK_BAGS)
    return out


@pytest.mark.parametrize("name", SPATIAL_MIL)
def test_spatial_mil_checkpoint_reproduces_recorded_metrics(name, spatial_bags, tmp_path):
    entry = zoo.get(name)
    kwargs = dict(entry.kwargs)
    in_dim, num_classes = kwargs.pop("in_dim"), kwargs.pop("num_outputs")
    task = SlideMIL(entry.arch, in_dim=in_dim, num_classes=num_classes, model_args=kwargs, weights=name)
    data = SlideBagDataModule(str(spatial_bags), str(spatial_bags / "labels.csv"))
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        (metrics,) = trainer.test(task, datamodule=data, verbose=False)
    assert metrics["test/acc"] == pytest.approx(entry.metrics["test_acc"], abs=5e-5)
    assert metrics["test/auroc"] == pytest.approx(entry.metrics["test_auroc"], abs=5e-5)

    bag = next(iter(data.test_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(zoo.load(name)(bag["features"], bag["positions"]).logits,
                                   task.eval()(bag).logits)
