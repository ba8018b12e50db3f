"""The one `mamba2d` command: every subcommand listed, per-key help from docstrings, --config round trips,
abbreviated options rejected, and the pictures of `curves` and `kfold`."""

from __future__ import annotations

import csv
import inspect

import numpy as np
import pytest
from PIL import Image

from mamba2d.analysis.kfold import write_summary
from mamba2d.cli import TRAINING, commands, main


def _leaves(tree, prefix=()):
    for name, command in tree.items():
        if command.subcommands:
            yield from _leaves(command.subcommands, (*prefix, name))
        else:
            yield (*prefix, name)


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in (*TRAINING, "zoo", "erf", "flops", "throughput", "curves", "wsi", "kfold"):
        assert f"    {name} " in out, name


@pytest.mark.parametrize("path", list(_leaves(commands())), ids=" ".join)
def test_subcommand_help_lists_its_keys_with_docstring_text(path, capsys):
    with pytest.raises(SystemExit):
        main([*path, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--config" in out and "--print_config" in out
    parser = commands()
    for part in path:
        parser = parser[part].subcommands or parser[part]
    # every key appears with its text from the function's Args: (jsonargparse leaves help empty without it)
    actions = [a for a in parser.parser._actions if a.dest not in ("help", "config", "print_config")]
    assert actions
    for action in actions:
        assert action.help, f"mamba2d {' '.join(path)}: {action.dest} has no docstring text"
        assert action.dest.split(".")[-1] in out and " ".join(action.help.split()[:4]) in out


def test_flops_help_has_the_args_text(capsys):
    from mamba2d.analysis.flops import flops

    with pytest.raises(SystemExit):
        main(["flops", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    doc = inspect.getdoc(flops)
    assert "timm model names (e.g. vmamba_tiny) or zoo names (arch.tag)." in out and "models:" in doc


def test_config_yaml_round_trips(tmp_path, capsys):
    args = ["wsi", "splits", "--csv", "labels.csv", "--out", "splits", "--folds", "3", "--task", "survival"]
    with pytest.raises(SystemExit):
        main([*args, "--print_config"])
    printed = capsys.readouterr().out
    assert "folds: 3" in printed and "task: survival" in printed
    config = tmp_path / "splits.yaml"
    config.write_text(printed)
    with pytest.raises(SystemExit):
        main(["wsi", "splits", "--config", str(config), "--print_config"])
    assert capsys.readouterr().out == printed


@pytest.mark.parametrize("args", [
    ["flops", "--model", "[vmamba_nano]"],  # a prefix of --models
    ["wsi", "splits", "--csv", "a.csv", "--out", "o", "--fold", "3"],  # a prefix of --folds
    ["zoo", "list", "--patt", "x"],  # a prefix of --pattern
    ["fit", "--model", "lightning.pytorch.demos.boring_classes.BoringModel", "--trainer.max_epoch", "1"],
])
def test_abbreviated_options_are_rejected(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code != 0
    assert "max_epoch" in capsys.readouterr().err if "fit" in args else True


def test_unexpected_pass_through_is_rejected():
    with pytest.raises(SystemExit, match="unexpected arguments after --"):
        main(["zoo", "list", "--", "--trainer.max_epochs", "1"])


def _check_png(path, min_side=200):
    assert path.is_file()
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"))
    assert min(pixels.shape) >= min_side
    assert pixels.std() > 5  # not blank


def test_curves_turn_a_run_directory_into_pngs(tmp_path, capsys):
    run = tmp_path / "runs" / "mamba2d" / "version_0"
    run.mkdir(parents=True)
    with (run / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "lr-AdamW", "step", "train/loss", "val/acc", "val/loss"])
        for step in range(20):
            writer.writerow([step // 5, 1e-3 * (1 - step / 20), step, 2.0 / (step + 1), "", ""])
            if step % 5 == 4:
                writer.writerow([step // 5, "", step, "", 0.5 + step / 50, 1.0 / (step + 1)])
    assert main(["curves", str(tmp_path / "runs")]) == 0
    written = {p.name for p in (run / "curves").iterdir()}
    assert written == {"loss.png", "lr.png", "val_acc.png"}
    for name in written:
        _check_png(run / "curves" / name)


def test_curves_name_the_folder_without_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        main(["curves", str(tmp_path)])


def test_kfold_summary_csv_and_figure(tmp_path):
    table, figure = write_summary({"test/auroc": [0.8, 0.9, 1.0], "test/acc": [0.5, 0.7, 0.6]}, tmp_path)
    rows = list(csv.DictReader(table.open()))
    assert [r["metric"] for r in rows] == ["test/acc", "test/auroc"]
    assert float(rows[1]["mean"]) == pytest.approx(0.9) and float(rows[1]["std"]) == pytest.approx(np.std([.8, .9, 1]))
    _check_png(figure)


@pytest.mark.parametrize("command", ["benchmark", "sweep"])
def test_spatial_benchmark_and_sweep_write_their_report(tmp_path, command, capsys):
    small = ["--models", "[mean]", "--seeds", "[0]", "--val", "4", "--test", "4", "--epochs", "1",
             "--bags.grid_min", "6", "--bags.grid_max", "7", "--bags.positive_min", "3", "--bags.positive_max", "4",
             "--bags.feature_dim", "8", "--threads", "1"]
    if command == "sweep":
        args = ["wsi", "sweep", str(tmp_path), *small, "--amplitudes", "[1.0, 3.0]", "--train_sizes", "[4]"]
    else:
        args = ["wsi", "benchmark", *small, "--train", "4", "--out", str(tmp_path)]
    main(args)
    for name in (f"{command}.json", f"{command}.md", f"{command}.png", "examples.png"):
        assert (tmp_path / name).is_file(), name
    _check_png(tmp_path / f"{command}.png")
    _check_png(tmp_path / "examples.png")
    assert "| mean |" in (tmp_path / f"{command}.md").read_text()
