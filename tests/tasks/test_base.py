"""BaseTask and the checkpoint callbacks: start weights stay out of checkpoints; best means best."""

from __future__ import annotations

import lightning
import pytest
import timm
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from mamba2d.tasks.checkpointing import BestCheckpoint
from mamba2d.tasks.classification import ImageClassifier
from mamba2d.tasks.optim import warmup_then_decay


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


class StepRecorder(Callback):
    """The first parameter group's learning rate and the training loss of every step."""

    def __init__(self):
        self.lrs, self.losses = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def tiny_classifier(**kwargs) -> ImageClassifier:
    return ImageClassifier(backbone="vmamba2d_nano", num_classes=10,
                           backbone_kwargs={"dims": 16, "depths": (1, 1, 1, 1)}, **kwargs)


def fit_steps(task: ImageClassifier, loader: DataLoader, steps: int, tmp_path, accelerator: str = "cpu",
              val_loader: DataLoader | None = None) -> StepRecorder:
    """`steps` optimiser steps on `accelerator`, no logging or checkpoints; validation only on `val_loader`."""
    recorder = StepRecorder()
    recorder.trainer = Trainer(max_steps=steps, accelerator=accelerator, devices=1, logger=False,
                               enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                               limit_val_batches=0 if val_loader is None else None, num_sanity_val_steps=0,
                               default_root_dir=str(tmp_path), callbacks=[recorder])
    recorder.trainer.fit(task, loader, val_loader)
    return recorder


def random_digits() -> DataLoader:
    """12 random 32x32 images in 3 batches."""
    return DataLoader(TensorDataset(torch.rand(12, 3, 32, 32), torch.randint(0, 10, (12,))), batch_size=4)


def test_warmup_in_epochs_under_max_steps(tmp_path):
    """With only max_steps given, Lightning's step estimate loads no data; the warm-up in epochs still counts the
    epoch's batches (3 here): the schedule is warmup_then_decay's over 5 steps with 3 of warm-up."""
    recorder = fit_steps(tiny_classifier(warmup_epochs=1.0, lr=1e-3), random_digits(), 5, tmp_path)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = warmup_then_decay(optimizer, 5, warmup_steps=3)
    want = []
    for _ in range(5):
        want.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert recorder.lrs == pytest.approx(want, rel=1e-12)


class Endless(IterableDataset):
    def __iter__(self):
        while True:
            yield torch.rand(3, 32, 32), torch.tensor(0)


def test_warmup_in_epochs_needs_sized_data(tmp_path):
    with pytest.raises(ValueError, match="ImageClassifier: the training data has no length.*warmup_epochs"):
        fit_steps(tiny_classifier(warmup_epochs=1.0), DataLoader(Endless(), batch_size=4), 2, tmp_path)


@pytest.mark.slow
def test_torch_compile_trains_as_eager(tmp_path):
    """`torch_compile=True` runs the network compiled (a hook inside it sees `torch.compiler.is_compiling()`), gives
    eager's training losses over three optimiser steps (drop path on) and leaves the checkpoint's keys as they are."""
    loader = random_digits()

    def fit(torch_compile: bool) -> tuple[ImageClassifier, list[float], list[bool]]:
        lightning.seed_everything(0)
        task = tiny_classifier(torch_compile=torch_compile)
        traced = []
        task.model.get_classifier().register_forward_pre_hook(
            lambda module, args: traced.append(torch.compiler.is_compiling()))
        return task, fit_steps(task, loader, 3, tmp_path).losses, traced

    eager, eager_losses, eager_traced = fit(False)
    compiled, compiled_losses, compiled_traced = fit(True)
    assert not any(eager_traced) and len(compiled_traced) == 3 and all(compiled_traced)
    assert len(eager_losses) == 3
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-4, atol=0)
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_compile_mode_is_checked_by_name():
    with pytest.raises(ValueError, match="ImageClassifier: compile_mode='reduce-overhead' needs torch_compile=True"):
        tiny_classifier(compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="ImageClassifier: compile_mode='reduce-overhed': .*reduce-overhead"):
        tiny_classifier(torch_compile=True, compile_mode="reduce-overhed")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reduce_overhead_fit_trains_and_validates_as_eager(tmp_path):
    """`compile_mode="reduce-overhead"` (torch.compile's CUDA graphs) through Lightning's fit on a GPU: the training
    losses of four optimiser steps (the graphs recorded, then replayed) and the validation loss and accuracy (the
    eval network's graphs) are eager's. Drop path off: Inductor's random numbers are not eager's."""
    images, labels = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    train = DataLoader(TensorDataset(images, labels), batch_size=4, drop_last=True)
    val = DataLoader(TensorDataset(images[:8], labels[:8]), batch_size=4)

    def fit(**compile_args) -> tuple[list[float], dict[str, float]]:
        lightning.seed_everything(0)
        task = ImageClassifier(backbone="vmamba2d_nano", num_classes=10, **compile_args,
                               backbone_kwargs={"dims": 16, "depths": (1, 1, 1, 1), "drop_path_rate": 0.0})
        recorder = fit_steps(task, train, 4, tmp_path, accelerator="gpu", val_loader=val)
        metrics = {k: v.item() for k, v in recorder.trainer.callback_metrics.items() if k.startswith("val/")}
        return recorder.losses, metrics

    torch._dynamo.reset()
    eager_losses, eager_metrics = fit()
    graph_losses, graph_metrics = fit(torch_compile=True, compile_mode="reduce-overhead")
    torch._dynamo.reset()
    assert len(graph_losses) == 4 and set(graph_metrics) == set(eager_metrics) >= {"val/loss", "val/acc1"}
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-4, atol=0)
    for name, value in eager_metrics.items():
        assert graph_metrics[name] == pytest.approx(value, rel=1e-4), name
