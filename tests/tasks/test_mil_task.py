"""SlideMIL through the `mamba2d` CLI: every configs/wsi config, model selection on val, k-fold command."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from mil_helpers import classification_folder, survival_folder

import mamba2d.zoo as zoo
from mamba2d.cli import main as mamba2d_main
from mamba2d.cli.lightning import build_cli as main
from mamba2d.data.slides import SlideBagDataModule
from mamba2d.tasks.mil import SlideMIL
from mamba2d.wsi.heatmap import model_scores

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "wsi"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.fixture
def bags(tmp_path, monkeypatch) -> Path:
    """An empty folder for bags; the test runs in tmp_path (runs/ lands there)."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "bags"
    folder.mkdir()
    return folder


def data_args(folder: Path, csv: Path) -> list[str]:
    return ["--data.init_args.features_dir", str(folder), "--data.init_args.csv_path", str(csv),
            "--data.init_args.split_dir", "null", "--model.init_args.in_dim", "8"]


def test_configs_cover_every_model_for_both_tasks():
    names = {p.stem for p in CONFIGS}
    for task in ("classification", "survival"):
        for model in ("mamba_mil_2d", "mamba_mil_1d", "abmil", "transmil", "mean", "max"):
            assert f"{task}_{model}" in names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_trains_validates_and_tests(config, bags):
    survival = config.stem.startswith("survival")
    csv = survival_folder(bags) if survival else classification_folder(bags)
    cli = main(["fit", "--config", str(config), *data_args(bags, csv), "--trainer.fast_dev_run", "1",
                "--trainer.accelerator", "cpu"])
    assert cli.model.model.head.out_features == (4 if survival else 2)  # survival: exactly 4 hazard logits
    metrics = cli.trainer.callback_metrics
    assert "train/loss" in metrics and np.isfinite(float(metrics["train/loss"]))
    assert ("val/cindex" if survival else "val/auroc") in metrics


def test_best_checkpoint_is_chosen_on_val_and_test_uses_it(bags):
    csv = classification_folder(bags, n=16)
    config = CONFIG_DIR / "classification_abmil.yaml"
    cli = main(["fit", "--config", str(config), *data_args(bags, csv), "--trainer.max_epochs", "3",
                "--trainer.accelerator", "cpu", "--model.init_args.lr", "1e-2",
                "--model.init_args.model_args", "{dim: 16, attn_dim: 8}"])
    checkpoint = cli.trainer.checkpoint_callback
    assert checkpoint.monitor == "val/auroc" and Path(checkpoint.best_model_path).name == "best.ckpt"
    assert float(checkpoint.best_model_score) == max(float(s) for s in checkpoint.best_k_models.values())
    (reported,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
    # The same numbers by hand from the best checkpoint on the test split.
    best = SlideMIL.load_from_checkpoint(checkpoint.best_model_path).eval()
    data = SlideBagDataModule(str(bags), str(csv))
    data.setup("test")
    with torch.no_grad():
        probs = torch.stack([best(bag).logits.softmax(-1) for bag in data.test_dataloader()])
    labels = torch.tensor([r.label for r in data.records["test"]])
    assert reported["test/acc"] == pytest.approx(float((probs.argmax(1) == labels).float().mean()), abs=1e-6)


def test_weights_start_a_model_from_a_checkpoint_or_fail_loudly(bags, tmp_path):
    csv = classification_folder(bags)
    config = CONFIG_DIR / "classification_abmil.yaml"
    model_args = ["--model.init_args.model_args", "{dim: 16, attn_dim: 8}"]
    first = main(["fit", "--config", str(config), *data_args(bags, csv), "--trainer.max_epochs", "1",
                  "--trainer.accelerator", "cpu", *model_args])
    (last,) = tmp_path.rglob("last.ckpt")
    started = SlideMIL("abmil", in_dim=8, model_args={"dim": 16, "attn_dim": 8}, weights=str(last))
    for name, value in first.model.model.state_dict().items():
        torch.testing.assert_close(started.model.state_dict()[name], value, rtol=0, atol=0)
    with pytest.raises(zoo.CheckpointMismatch, match="shape mismatches"):
        SlideMIL("abmil", in_dim=8, model_args={"dim": 32, "attn_dim": 8}, weights=str(last))
    with pytest.raises(zoo.ZooError, match="neither a zoo entry"):
        SlideMIL("abmil", in_dim=8, weights="no_such_model.tag")

    # A run started from a weights file: its checkpoint still serves heatmaps once that file is gone.
    start = tmp_path / "start.ckpt"
    start.write_bytes(last.read_bytes())
    main(["fit", "--config", str(config), *data_args(bags, csv), "--trainer.max_epochs", "1",
         "--trainer.accelerator", "cpu", *model_args, "--model.init_args.weights", str(start)])
    start.unlink()
    (second_last,) = set(tmp_path.rglob("last.ckpt")) - {last}
    _, scores, _, logits = model_scores(second_last, next(bags.glob("*.h5")))
    assert np.isfinite(scores).all() and logits.shape == (2,)


def test_task_and_outputs_come_from_the_data(bags):
    """The survival configs name neither task nor num_bins for the model: the data's are linked to it."""
    csv = survival_folder(bags)
    config = CONFIG_DIR / "survival_mean.yaml"
    model_args = yaml.safe_load(config.read_text())["model"]["init_args"]
    assert "task" not in model_args and "num_bins" not in model_args
    cli = main(["--config", str(config), *data_args(bags, csv), "--data.init_args.num_bins", "3",
                "--trainer.logger", "false"], run=False)
    assert (cli.model.hparams.task, cli.model.hparams.num_bins, cli.model.model.head.out_features) == ("survival", 3, 3)


def test_task_and_output_mismatches_fail_early(bags):
    """A task built in Python for other data stops before training, naming both sides."""
    csv = classification_folder(bags)
    data = SlideBagDataModule(str(bags), str(csv))
    trainer = Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="num_classes=3 but the data .* has num_classes=2"):
        trainer.fit(SlideMIL("mean", in_dim=8, num_classes=3), datamodule=data)
    with pytest.raises(ValueError, match="task='survival' but the data .* has task='classification'"):
        trainer.fit(SlideMIL("mean", in_dim=8, task="survival"), datamodule=data)


def test_kfold_command_prints_mean_and_std_over_folds(bags, tmp_path, capsys):
    csv = survival_folder(bags, cases=24)
    assert mamba2d_main(["wsi", "splits", "--csv", str(csv), "--task", "survival", "--folds", "3", "--out",
                     str(tmp_path / "splits")]) == 0
    config = CONFIG_DIR / "survival_mean.yaml"
    code = mamba2d_main(["kfold", str(config), "--folds", "2", "--out_dir", str(tmp_path / "kfold"),
                     "--", "--data.init_args.features_dir", str(bags), "--data.init_args.csv_path", str(csv),
                     "--data.init_args.split_dir", str(tmp_path / "splits"), "--model.init_args.in_dim", "8",
                     "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert "fold 0: best checkpoint" in out and "fold 1: best checkpoint" in out
    row = next(line for line in out.splitlines() if line.startswith("| test/cindex |"))
    mean_std, per_fold = row.split("|")[2], row.split("|")[3]
    assert "±" in mean_std and len(per_fold.split(",")) == 2
    assert all((tmp_path / "kfold" / name).is_file() for name in ("kfold.json", "kfold_summary.csv",
                                                                  "kfold_summary.png"))
