"""The `mamba2d` CLI in-process on every classification config that runs on CPU, and its error messages."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
    TQDMProgressBar,
)
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mamba2d.checkpoints import CheckpointError
from mamba2d.cli.lightning import build_cli, main
from mamba2d.data.digits import DigitsDataModule
from mamba2d.data.images import ImageFolderDataModule
from mamba2d.tasks.checkpointing import BestCheckpoint, LastCheckpoint
from mamba2d.tasks.classification import ImageClassifier

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "classification"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def make_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class=4, size=48) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("config", ["digits_vmamba2d_nano.yaml", "digits_vmamba_nano.yaml"])
def test_digits_configs_fast_dev_run(in_tmp, config):
    cli = build_cli(["fit", "--config", str(CONFIGS / config), "--trainer.fast_dev_run", "2"])
    assert cli.trainer.state.finished
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("arch", ["vmamba2d", "vmamba"])
def test_imagenet_recipe_configs_fast_dev_run_on_cpu(in_tmp, arch):
    root = make_image_folder(in_tmp / "imagenet")
    cli = build_cli([
        "fit", "--config", str(CONFIGS / f"imagenet_{arch}_tiny.yaml"), "--trainer.fast_dev_run", "1",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.precision", "32", f"--data.init_args.root={root}",
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0", "--data.init_args.input_size", "32",
        "--data.init_args.pin_memory", "false",
    ])
    assert cli.trainer.state.finished
    assert cli.model.ema is not None and cli.model.mixup is not None
    # DDP requires every trainable parameter to get a gradient: only the trained network may be trainable, not EMA
    trainable = {name for name, p in cli.model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.{name}" for name, _ in cli.model.model.named_parameters()}


def test_fit_then_test_best_checkpoint_and_saved_config(in_tmp, recwarn):
    config = str(CONFIGS / "digits_vmamba2d_nano.yaml")
    overrides = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2"]
    main(["fit", "--config", config, *overrides])
    run = in_tmp / "runs" / "digits_vmamba2d_nano" / "version_0"
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    best = run / "checkpoints" / "best.ckpt"
    assert best.is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    cli = build_cli(["test", "--config", config, "--ckpt_path", str(best), "--trainer.limit_test_batches", "2"])
    assert 0.0 <= float(cli.trainer.callback_metrics["test/acc1"]) <= 1.0
    # test and predict write beside the checkpoint's run, not into a new version_N; a second test does not overwrite
    assert (run / "test" / "metrics.csv").is_file() and list((run / "test").glob("events.out.tfevents.*"))
    assert (run / "test" / "config.yaml").is_file()
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]  # no fit bookkeeping restored
    build_cli(["test", "--config", config, "--ckpt_path", str(best), "--trainer.limit_test_batches", "1"])
    assert (run / "test_1" / "metrics.csv").is_file()
    cli = build_cli(["predict", "--config", config, "--ckpt_path", str(best), "--trainer.limit_predict_batches", "1"])
    assert cli.trainer.log_dir == str(run / "predict") and (run / "predict" / "config.yaml").is_file()
    assert [p.name for p in run.parent.iterdir()] == ["version_0"]
    # the README's demo picks the newest run with `ls -td version_*/`: a later fit's, even after testing an older run
    main(["fit", "--config", config, *overrides])
    build_cli(["test", "--config", config, "--ckpt_path", str(best), "--trainer.limit_test_batches", "1"])
    main(["fit", "--config", config, *overrides])
    newest = max(run.parent.glob("version_*"), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == "version_2"


def corrupt_copies(best: Path) -> list[Path]:
    """A checkpoint truncated to half its size and a file of garbage bytes, both named *.ckpt."""
    truncated = best.parent / "truncated.ckpt"
    truncated.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    garbage = best.parent / "garbage.ckpt"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return [truncated, garbage]


def test_corrupt_checkpoint_is_named_and_leaves_no_run_folder(in_tmp, capsys):
    config = str(CONFIGS / "digits_vmamba2d_nano.yaml")
    main(["fit", "--config", config, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
          "--trainer.limit_val_batches", "1"])
    run = in_tmp / "runs" / "digits_vmamba2d_nano" / "version_0"
    for bad in corrupt_copies(run / "checkpoints" / "best.ckpt"):
        for subcommand in ("fit", "validate", "test", "predict"):
            with pytest.raises(CheckpointError, match=rf"{bad}.*corrupt or not a checkpoint") as error:
                main([subcommand, "--config", config, "--ckpt_path", str(bad)])
            assert "weights_only" not in str(error.value)
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoints"]


def test_failed_command_leaves_no_half_empty_run_folder(in_tmp):
    # AdamW rejects the lr in configure_optimizers: after the run folder got its config.yaml, before any result
    with pytest.raises(ValueError, match="learning rate"):
        main(["fit", "--config", str(CONFIGS / "digits_vmamba2d_nano.yaml"), "--model.init_args.lr", "-1"])
    assert not (in_tmp / "runs").exists()


def test_start_up_is_quiet_but_keeps_lightnings_useful_lines(in_tmp, caplog):
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    build_cli(["fit", "--config", str(CONFIGS / "digits_vmamba2d_nano.yaml"), "--trainer.fast_dev_run", "1",
               "--trainer.enable_progress_bar", "false"])
    text = "\n".join(caplog.messages)
    assert "Tip:" not in text and "litlogger" not in text and "litmodels" not in text
    assert "GPU available" in text  # Lightning's other start-up lines still come through


def test_help_and_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "fit" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "digits_vmamba2d_nano.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    assert "mamba2d.tasks.classification.ImageClassifier" in capsys.readouterr().out


def test_unknown_config_key_is_named(in_tmp, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "digits_vmamba2d_nano.yaml"), "--model.init_args.lerning_rate", "1"])
    assert "lerning_rate" in capsys.readouterr().err


def test_class_count_mismatch_is_named(in_tmp):
    """Under the CLI the data sets num_classes (see test_num_classes_comes_from_the_data); a task built in Python
    for other data is still stopped before training, with both config keys named."""
    model = ImageClassifier(backbone="vmamba2d_nano", num_classes=7, backbone_kwargs={"dims": 16})
    trainer = Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="num_classes=7 but the data"):
        trainer.fit(model, DigitsDataModule(batch_size=4))


def test_num_classes_comes_from_the_data_and_short_names_resolve(in_tmp):
    config = yaml.safe_load((CONFIGS / "digits_vmamba2d_nano.yaml").read_text())
    assert "num_classes" not in config["model"]["init_args"]  # written once: the data knows it
    assert config["model"]["class_path"] == "ImageClassifier" and config["data"]["class_path"] == "DigitsDataModule"
    cli = build_cli(["--model", "ImageClassifier", "--data", "DigitsDataModule", "--model.init_args.backbone_kwargs",
                     "{dims: 16}", "--trainer.logger", "false"], run=False)
    assert isinstance(cli.model, ImageClassifier) and isinstance(cli.datamodule, DigitsDataModule)
    assert cli.model.hparams.num_classes == 10 and cli.model.model.num_classes == 10


def test_model_help_explains_each_key(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "ImageClassifier"])
    out = capsys.readouterr().out
    assert "Peak learning rate of AdamW" in out and "Decay of an EMA copy of the weights" in out


def test_default_callbacks_come_through_the_public_hook_and_a_users_own_are_kept(in_tmp):
    config = str(CONFIGS / "digits_vmamba2d_nano.yaml")
    cli = build_cli(["--config", config], run=False)
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert RichProgressBar in kinds and LearningRateMonitor in kinds
    assert [type(c) for c in cli.trainer.checkpoint_callbacks] == [BestCheckpoint, LastCheckpoint]
    cli = build_cli(["--config", config, "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"],
                    run=False)
    assert not {RichProgressBar, LearningRateMonitor} & {type(c) for c in cli.trainer.callbacks}
    # A user's own callbacks replace the config's list: their ModelCheckpoint and progress bar are the only ones.
    cli = build_cli(["--config", config, "--trainer.callbacks", "TQDMProgressBar",
                     "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor", "val/loss"], run=False)
    (checkpoint,) = cli.trainer.checkpoint_callbacks
    assert type(checkpoint) is ModelCheckpoint and checkpoint.monitor == "val/loss"
    assert [type(c) for c in cli.trainer.callbacks if isinstance(c, ProgressBar)] == [TQDMProgressBar]


def test_logs_follow_default_root_dir_with_tensorboard_beside_csv(in_tmp):
    config = str(CONFIGS / "digits_vmamba2d_nano.yaml")
    build_cli(["fit", "--config", config, "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "2",
               "--trainer.default_root_dir", str(in_tmp / "elsewhere")])
    assert not (in_tmp / "runs").exists()
    (run,) = (in_tmp / "elsewhere" / "digits_vmamba2d_nano").iterdir()
    assert run.name == "version_0" and list(run.glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "best.ckpt").is_file()
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert any(row.get("train/loss") for row in rows)  # the demo's short run logs its training loss
    assert any(row.get("train/lr/pg1") for row in rows)  # logged by LearningRateMonitor
    events = EventAccumulator(str(run))
    events.Reload()
    assert events.Tags()["images"] == ["val/samples"]  # the DataModule's plot() of the first validation batch


def test_image_folder_without_class_folders_is_named(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    dm = ImageFolderDataModule(str(tmp_path), num_workers=0)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train")):
        dm.setup("fit")


def test_unreadable_image_is_named(tmp_path):
    root = make_image_folder(tmp_path, per_class=1)
    broken = root / "train" / "cat" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    dm = ImageFolderDataModule(str(root), num_workers=0, input_size=32, pin_memory=False)
    dm.setup("fit")
    index = [i for i, (path, _) in enumerate(dm.train_set.samples) if path.endswith("broken.jpg")][0]
    with pytest.raises(OSError, match="broken.jpg"):
        dm.train_set[index]


def test_a_model_key_linked_from_the_data_is_not_silently_replaced(in_tmp):
    with pytest.raises(ValueError, match="--model.init_args.num_classes on the command line.*from the DataModule"):
        main(["fit", "--config", str(CONFIGS / "digits_vmamba2d_nano.yaml"), "--model.init_args.num_classes", "7"])
    config = yaml.safe_load((CONFIGS / "digits_vmamba2d_nano.yaml").read_text())
    config["model"]["init_args"]["num_classes"] = 7
    path = in_tmp / "seven.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=f"model.init_args.num_classes in {path}"):
        main(["fit", "--config", str(path)])
    assert not (in_tmp / "runs").exists()
