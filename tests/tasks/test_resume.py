"""Stopping a run and resuming from last.ckpt gives exactly the uninterrupted run (steps, lr, EMA, data order)."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback

from mamba2d.cli.lightning import build_cli

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "classification" / "digits_vmamba2d_nano.yaml")
COMMON = [
    "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "3", "--trainer.logger", "false",
    "--model.init_args.ema_decay", "0.9", "--data.init_args.batch_size", "16",
]


class InterruptAfterEpoch(Callback):
    """Stands in for a killed job: the run stops after `epoch` while its config still asks for more epochs."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def fit(workdir: Path, monkeypatch, epochs: int, *extra: str):
    monkeypatch.chdir(workdir)
    return build_cli(["fit", "--config", CONFIG, *COMMON, "--trainer.max_epochs", str(epochs),
                      "--trainer.default_root_dir", str(workdir), *extra])


def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    (tmp_path / "whole").mkdir()
    (tmp_path / "split").mkdir()
    whole = fit(tmp_path / "whole", monkeypatch, 3)
    fit(tmp_path / "split", monkeypatch, 3, "--trainer.callbacks+=test_resume.InterruptAfterEpoch",
        "--trainer.callbacks.epoch=1")
    last = tmp_path / "split" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 8
    resumed = fit(tmp_path / "split", monkeypatch, 3, "--ckpt_path", str(last))

    assert resumed.trainer.global_step == whole.trainer.global_step == 12
    lr = lambda cli: cli.trainer.optimizers[0].param_groups[0]["lr"]  # noqa: E731
    assert lr(resumed) == lr(whole)
    expected = whole.model.state_dict()
    different = [n for n, v in resumed.model.state_dict().items() if not torch.equal(v, expected[n])]
    assert not different, different  # includes the EMA weights (ema.module.*)
    assert any(name.startswith("ema.") for name in expected)
    for key in ("val/acc1", "val/loss"):
        assert torch.equal(resumed.trainer.callback_metrics[key], whole.trainer.callback_metrics[key]), key
