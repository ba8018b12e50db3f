"""Discrete-time survival loss, risk and the C-index Metric (checked against lifelines); the survival test's
Kaplan-Meier figure."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mil_helpers import survival_folder
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mamba2d.cli.lightning import build_cli
from mamba2d.tasks.survival import ConcordanceIndex, concordance_index, discrete_time_nll, risk_score, survival_curve


def test_nll_matches_the_likelihood_written_out():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    bins = torch.tensor([0, 1, 3, 2, 0, 3])
    censorship = torch.tensor([0, 1, 0, 1, 1, 0])
    hazards = torch.sigmoid(logits)
    expected = []
    for h, y, c in zip(hazards, bins.tolist(), censorship.tolist()):
        survive_before = math.prod(1 - h[j].item() for j in range(y))
        if c == 0:  # died in bin y
            expected.append(-math.log(survive_before * h[y].item()))
        else:  # alive through bin y
            expected.append(-math.log(survive_before * (1 - h[y].item())))
    torch.testing.assert_close(discrete_time_nll(logits, bins, censorship), torch.tensor(np.mean(expected)).float())


def test_nll_alpha_weights_the_uncensored_term_and_rejects_bad_bins():
    logits, bins, cens = torch.randn(4, 4), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 1])
    plain = discrete_time_nll(logits, bins, cens)
    uncensored_only = discrete_time_nll(logits[[0, 2]], bins[[0, 2]], cens[[0, 2]]) * 2 / 4
    torch.testing.assert_close(discrete_time_nll(logits, bins, cens, alpha=1.0), uncensored_only)
    torch.testing.assert_close(discrete_time_nll(logits, bins, cens, alpha=0.0), plain)
    with pytest.raises(ValueError, match="bins must lie in 0..3"):
        discrete_time_nll(logits, torch.tensor([0, 1, 2, 4]), cens)


def test_risk_is_minus_the_sum_of_the_survival_curve():
    logits = torch.tensor([[-3.0, -3.0, -3.0, -3.0], [3.0, 3.0, 3.0, 3.0]])
    s = survival_curve(logits)
    assert torch.all(s[:, 1:] <= s[:, :-1])
    torch.testing.assert_close(risk_score(logits), -s.sum(-1))
    assert risk_score(logits)[1] > risk_score(logits)[0]  # high hazards = high risk


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cindex_metric_matches_lifelines_with_ties(seed):
    # lifelines is a dev dependency; the GPU machine lacks it, and the rest of this file must still run there
    lifelines_cindex = pytest.importorskip("lifelines.utils").concordance_index
    rng = np.random.default_rng(seed)
    n = 150
    time = rng.integers(1, 25, n).astype(float)  # many tied times
    event = rng.integers(0, 2, n)
    risk = np.round(rng.normal(size=n) - 0.05 * time, 1)  # some tied risks
    metric = ConcordanceIndex()
    for chunk in np.array_split(np.arange(n), 7):  # accumulated over batches
        metric.update(torch.tensor(risk[chunk]), torch.tensor(time[chunk]), torch.tensor(event[chunk]))
    expected = lifelines_cindex(time, -risk, event)  # lifelines scores are "higher = longer survival"
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-6)
    assert float(concordance_index(torch.tensor(risk), torch.tensor(time), torch.tensor(event), chunk=13)) == \
        pytest.approx(expected, abs=1e-12)


def test_cindex_extremes():
    time = torch.tensor([1.0, 2.0, 3.0, 4.0])
    event = torch.ones(4)
    assert concordance_index(-time, time, event) == 1.0
    assert concordance_index(time, time, event) == 0.0
    assert math.isnan(concordance_index(time, time, torch.zeros(4)))  # no comparable pair


def test_survival_test_writes_kaplan_meier_curves_beside_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bags = tmp_path / "bags"
    bags.mkdir()
    csv = survival_folder(bags, cases=24)
    config = str(Path(__file__).resolve().parents[2] / "configs" / "wsi" / "survival_mean.yaml")
    args = ["--config", config, "--data.init_args.features_dir", str(bags), "--data.init_args.csv_path", str(csv),
            "--data.init_args.split_dir", "null", "--model.init_args.in_dim", "8", "--trainer.accelerator", "cpu"]
    build_cli(["fit", *args, "--trainer.max_epochs", "1"])
    run = tmp_path / "runs" / "wsi_survival_mean" / "version_0"
    build_cli(["test", *args, "--ckpt_path", str(run / "checkpoints" / "best.ckpt")])
    png = run / "test" / "test_km_risk_groups.png"
    with Image.open(png) as image:
        assert image.size == (500, 380)  # risk_group_figure's 5 x 3.8 inches at 100 dpi
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # curves, axes and text, not a blank page
    events = EventAccumulator(str(run / "test"))
    events.Reload()
    assert "test/km_risk_groups" in events.Tags()["images"]
