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

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    script = Path(__file__).with_name("ddp_digits_check.py")
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
    with torch.no_grad():
        accuracy = (model.eval()(images).argmax(-1) == labels).float().mean().item()
    assert ranks[0]["metrics"]["val/acc1"] == pytest.approx(accuracy, abs=1e-6)
