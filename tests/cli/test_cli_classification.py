"""The `mamba2d` CLI in-process on every classification config that runs on CPU, and its error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mamba2d.cli.lightning import build_cli, main
from mamba2d.data.images import ImageFolderDataModule

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
        "--trainer.precision", "32", "--model.init_args.num_classes", "3", f"--data.init_args.root={root}",
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0", "--data.init_args.input_size", "32",
        "--data.init_args.pin_memory", "false",
    ])
    assert cli.trainer.state.finished
    assert cli.model.ema is not None and cli.model.mixup is not None
    # DDP requires every trainable parameter to get a gradient: only the trained network may be trainable, not EMA
    trainable = {name for name, p in cli.model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.{name}" for name, _ in cli.model.model.named_parameters()}


def test_fit_then_test_best_checkpoint_and_saved_config(in_tmp):
    config = str(CONFIGS / "digits_vmamba2d_nano.yaml")
    overrides = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2"]
    main(["fit", "--config", config, *overrides])
    run = in_tmp / "runs" / "digits_vmamba2d_nano" / "version_0"
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    best = run / "checkpoints" / "best.ckpt"
    assert best.is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    cli = build_cli(["test", "--config", config, "--ckpt_path", str(best), "--trainer.limit_test_batches", "2"])
    assert 0.0 <= float(cli.trainer.callback_metrics["test/acc1"]) <= 1.0


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
    with pytest.raises(ValueError, match="num_classes=7 but the data"):
        main(["fit", "--config", str(CONFIGS / "digits_vmamba2d_nano.yaml"), "--model.init_args.num_classes", "7",
              "--trainer.fast_dev_run", "1"])


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
