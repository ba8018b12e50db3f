"""Data side of multi-process training on CPU (gloo, 2 processes): every sample seen once, metrics synced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import timm
import torch
from ddp_digits_check import image_keys

from mamba2d.data.digits import DigitsDataModule
from mamba2d.data.spatial_bags import SpatialBagConfig, write_spatial_bags
from mamba2d.models import input_normalization

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    script = Path(__file__).resolve().parents[1] / "ddp_digits_check.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parent), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(script), str(out)], check=True, env=env, cwd=out, timeout=600)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def split_keys(split: str) -> Counter:
    dm = DigitsDataModule()
    dm.setup()
    return Counter(image_keys(dm.splits[split].tensors[0]))


def test_every_validation_sample_is_evaluated_exactly_once(ddp_run):
    _, ranks = ddp_run
    seen = Counter(ranks[0]["seen"]["val"]) + Counter(ranks[1]["seen"]["val"])
    assert seen == split_keys("val")


def test_every_training_sample_is_seen_in_an_epoch(ddp_run):
    _, ranks = ddp_run
    seen = Counter(ranks[0]["seen"]["train"]) + Counter(ranks[1]["seen"]["train"])
    expected = split_keys("train")
    assert set(seen) == set(expected)
    assert len(ranks[0]["seen"]["train"]) == len(ranks[1]["seen"]["train"])  # equal steps on every rank
    # DistributedSampler pads the epoch to a multiple of the world size with at most world_size - 1 repeats
    assert sum((seen - expected).values()) <= 1


def test_validation_metrics_are_synced_over_all_samples(ddp_run):
    out, ranks = ddp_run
    assert ranks[0]["metrics"]["val/acc1"] == ranks[1]["metrics"]["val/acc1"]
    model = timm.create_model("vmamba2d_nano", num_classes=10)
    model.load_state_dict(torch.load(out / "weights.pt", weights_only=True))
    dm = DigitsDataModule()
    dm.setup()
    images, labels = dm.splits["val"].tensors
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in input_normalization(model))
    with torch.no_grad():
        accuracy = (model.eval()((images - mean) / std).argmax(-1) == labels).float().mean().item()
    assert ranks[0]["metrics"]["val/acc1"] == pytest.approx(accuracy, abs=1e-6)


REPO = Path(__file__).resolve().parents[2]


def fit_on_cpu(workdir: Path, config: str, *overrides: str, ranks: int = 2) -> Path:
    """`mamba2d fit` of a repository config on CPU, under DDP (gloo) when `ranks` > 1, no logger; the run's
    last.ckpt."""
    parallel = ["--trainer.devices", str(ranks), "--trainer.strategy", "ddp"] if ranks > 1 else []
    cli = [sys.executable, "-m", "mamba2d", "fit", "--config", str(REPO / "configs" / config),
           "--trainer.accelerator", "cpu", *parallel, "--trainer.enable_progress_bar", "false",
           "--trainer.logger", "false", *overrides]
    run = subprocess.run(cli, cwd=workdir, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (last,) = workdir.rglob("last.ckpt")
    return last


def test_imagenet_recipe_trains_under_ddp(tmp_path):
    """The full recipe (EMA, mixup/cutmix, drop path, grad clipping) under DDP: every trainable parameter must get a
    gradient on every rank, or DDP stops at the second step."""
    data = tmp_path / "imagenet"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_synthetic_imagefolder.py"), str(data), "--classes", "3",
                    "--train-per-class", "8", "--val-per-class", "2", "--size", "48", "--workers", "1"], check=True)
    last = fit_on_cpu(
        tmp_path, "classification/imagenet_vmamba2d_tiny.yaml", "--trainer.precision", "32",
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
        "--model.init_args.backbone", "vmamba2d_nano",
        f"--data.init_args.root={data}", "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
        "--data.init_args.input_size", "32", "--data.init_args.pin_memory", "false")
    assert torch.load(last, weights_only=False)["global_step"] == 3


def test_mil_under_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    """2DMambaMIL under DDP, one bag per rank and step, ends with the weights of one process that accumulates the
    same two bags per step (same seed, no dropout): the samplers split each global batch across ranks and DDP
    averages the two bags' gradients as accumulation does."""
    bags = tmp_path / "bags"
    write_spatial_bags(bags, {"train": 8, "val": 5, "test": 2}, seed=0, config=SpatialBagConfig(grid_max=10))
    common = ("wsi/classification_mamba_mil_2d.yaml", "--trainer.max_epochs", "1", "--model.init_args.in_dim", "16",
              "--model.init_args.model_args", "{dim: 16, dropout: 0.0}", f"--data.init_args.features_dir={bags}",
              f"--data.init_args.csv_path={bags / 'labels.csv'}", "--data.init_args.split_dir", "null")
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    ddp = torch.load(fit_on_cpu(tmp_path / "ddp", *common), weights_only=False)
    one = torch.load(fit_on_cpu(tmp_path / "one", *common, "--trainer.accumulate_grad_batches", "2", ranks=1),
                     weights_only=False)
    assert ddp["global_step"] == one["global_step"] == 4  # 8 training bags, two per optimizer step
    # Control: one bag per optimizer step (another global batch) ends elsewhere, so the comparison can fail.
    (tmp_path / "single").mkdir()
    single = torch.load(fit_on_cpu(tmp_path / "single", *common, ranks=1), weights_only=False)
    assert single["global_step"] == 8
    # Whole-model relative distance: Adam turns the rounding noise of gradients that are zero in exact arithmetic
    # (the attention score's bias under softmax) into lr-sized steps, so single elements are not compared.
    assert relative_distance(ddp["state_dict"], one["state_dict"]) < 1e-8  # measured 9e-13
    assert relative_distance(ddp["state_dict"], single["state_dict"]) > 1e-5  # measured 1.4e-4


def relative_distance(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    diff = sum((a[k].double() - b[k].double()).square().sum() for k in a)
    return float((diff / sum(a[k].double().square().sum() for k in a)).sqrt())
