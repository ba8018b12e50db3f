"""Discrete survival times: bins from quantiles of uncensored patients' times (training split only).

`censorship` follows CLAM: 1 = censored (alive at last follow-up), 0 = event observed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def fit_time_bins(times: Sequence[float], censorship: Sequence[int], num_bins: int = 4) -> np.ndarray:
    """Inner bin edges (num_bins - 1,) = quantiles of the uncensored times. Pass training patients only.

    Args:
        times: Survival or censoring times.
        censorship: 1 = censored, 0 = event observed.
        num_bins: Number of bins.
    """
    times, censorship = np.asarray(times, dtype=float), np.asarray(censorship)
    events = times[censorship == 0]
    if events.size < num_bins:
        raise ValueError(f"survival bins: need at least {num_bins} uncensored training patients, got {events.size}")
    edges = np.quantile(events, np.linspace(0, 1, num_bins + 1)[1:-1])
    if np.any(np.diff(edges) <= 0):
        raise ValueError(f"survival bins: quantile edges {edges.tolist()} are not increasing (too many tied times)")
    return edges


def assign_time_bins(times: Sequence[float] | torch.Tensor, edges: np.ndarray) -> np.ndarray:
    """Bin index in 0..len(edges) of each time; times outside the training range fall into the first/last bin.

    Args:
        times: Times to bin.
        edges: Inner bin edges from `fit_time_bins`.
    """
    return np.searchsorted(edges, np.asarray(times, dtype=float), side="right")
