"""Kaplan-Meier and log-rank against lifelines (a dev dependency) and the risk-group figure."""

import numpy as np
import pytest
from PIL import Image

from mamba2d.tasks.survival_curves import kaplan_meier, logrank_test, risk_group_figure, risk_groups

lifelines = pytest.importorskip("lifelines")
from lifelines.statistics import multivariate_logrank_test  # noqa: E402


def cohort(n=120, seed=0):
    rng = np.random.default_rng(seed)
    risk = rng.standard_normal(n)
    times = np.round(rng.exponential(np.exp(-risk)) * 24, 0) + 1  # rounded: tied times, as in real follow-up
    censor = rng.uniform(0, 60, n)
    events = times <= censor
    return risk, np.minimum(times, np.round(censor) + 1), events


def test_kaplan_meier_equals_lifelines():
    _, times, events = cohort()
    steps, survival = kaplan_meier(times, events)
    fitter = lifelines.KaplanMeierFitter().fit(times, events)
    reference = fitter.survival_function_at_times(steps).to_numpy()
    np.testing.assert_allclose(survival, reference, rtol=1e-12)


@pytest.mark.parametrize("num_groups", [2, 3])
def test_logrank_equals_lifelines(num_groups):
    risk, times, events = cohort(seed=num_groups)
    groups = risk_groups(risk, num_groups)
    assert sorted(np.unique(groups)) == list(range(num_groups))
    statistic, p = logrank_test(times, events, groups)
    reference = multivariate_logrank_test(times, groups, events)
    assert statistic == pytest.approx(reference.test_statistic, rel=1e-9)
    assert p == pytest.approx(reference.p_value, rel=1e-9)
    assert p < 0.05  # the cohort's risk really orders the times


def test_risk_group_figure_is_a_picture_with_the_p_value(tmp_path):
    risk, times, events = cohort()
    figure = risk_group_figure(risk, times, events)
    assert "log-rank p = " in figure.axes[0].get_title()
    figure.savefig(tmp_path / "km.png", dpi=60)
    pixels = np.asarray(Image.open(tmp_path / "km.png").convert("RGB"))
    assert pixels.shape[:2] == (round(3.8 * 60), 5 * 60) and pixels.std() > 10


def test_bad_lengths_are_named():
    with pytest.raises(ValueError, match="times and events"):
        kaplan_meier(np.ones(3), np.ones(4))
