"""BaseTask and the checkpoint callbacks: start weights stay out of checkpoints; best means best."""

from __future__ import annotations

import lightning
import pytest
import timm
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from mamba2d.tasks.checkpointing import BestCheckpoint
from mamba2d.tasks.classification import ImageClassifier


def test_load_from_checkpoint_never_reloads_the_start_weights(tmp_path, monkeypatch):
    calls = []
    create_model = timm.create_model

    def recording_create_model(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        return create_model(name, pretrained=False, **kwargs)  # stands in for the download of the start weights

    monkeypatch.setattr(timm, "create_model", recording_create_model)
    task = ImageClassifier(backbone="vmamba2d_nano", num_classes=10, backbone_kwargs={"dims": 16}, pretrained=True)
    assert calls == [True] and "pretrained" not in task.hparams
    path = tmp_path / "task.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    restored = ImageClassifier.load_from_checkpoint(path)
    assert calls == [True, False]
    for name, value in task.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[name], value, rtol=0, atol=0)


class SaturatedAUROC(LightningModule):
    """Validation AUROC 1.0 from the first epoch on while the validation loss keeps falling."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/auroc", 1.0)
        self.log("val/loss", 1.0 / (self.current_epoch + 1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_saturated(tmp_path, checkpoint: ModelCheckpoint) -> int:
    loader = DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=1)
    trainer = Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                      callbacks=[checkpoint])
    trainer.fit(SaturatedAUROC(), loader, loader)
    return torch.load(checkpoint.best_model_path, weights_only=True)["epoch"]


def test_best_checkpoint_breaks_ties_on_the_validation_loss(tmp_path):
    assert fit_saturated(tmp_path / "plain", ModelCheckpoint(monitor="val/auroc", mode="max", filename="best")) == 0
    best = BestCheckpoint(monitor="val/auroc", mode="max")
    assert fit_saturated(tmp_path / "ties", best) == 2  # a plain ModelCheckpoint keeps epoch 0 (above)
    assert best.best_tie_value == pytest.approx(1.0 / 3)


def test_best_checkpoint_takes_monitor_and_mode_from_the_task(tmp_path):
    task = ImageClassifier(backbone="vmamba2d_nano", num_classes=10, backbone_kwargs={"dims": 16})
    best = BestCheckpoint()
    trainer = Trainer(accelerator="cpu", logger=False, default_root_dir=str(tmp_path), callbacks=[best])
    best.setup(trainer, task, "fit")
    assert (best.monitor, best.mode) == ("val/acc1", "max")
    assert set(task.metric_stages) == {"train", "val", "test"}
    assert list(task.train_metrics.keys()) == ["train/acc1", "train/acc5"]
