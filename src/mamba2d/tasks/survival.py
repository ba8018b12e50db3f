"""Discrete-time survival: the negative log-likelihood over time bins, risk scores and Harrell's C-index.

`censorship` follows CLAM: 1 = censored, 0 = event observed. With hazards h_k = sigmoid(logit_k) and survival
S_k = prod_{j<=k} (1 - h_j) (S_{-1} = 1), a patient whose time falls in bin y contributes
    event:     -log S_{y-1} - log h_y          (survived bins before y, died in bin y)
    censored:  -log S_y                         (survived through bin y)
The risk score is -sum_k S_k (higher = earlier death).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def survival_curve(logits: torch.Tensor) -> torch.Tensor:
    """(..., K) hazard logits -> S (..., K) = cumprod(1 - sigmoid(logits)).

    Args:
        logits: Hazard logits per time bin.
    """
    return torch.cumprod(1 - torch.sigmoid(logits), dim=-1)


def risk_score(logits: torch.Tensor) -> torch.Tensor:
    """Risk = -sum_k S_k (higher = earlier death).

    Args:
        logits: (..., K) hazard logits.
    """
    return -survival_curve(logits).sum(dim=-1)


def discrete_time_nll(logits: torch.Tensor, bins: torch.Tensor, censorship: torch.Tensor,
                      alpha: float = 0.0) -> torch.Tensor:
    """Mean NLL over a batch; logits (B, K), bins (B,) in 0..K-1, censorship (B,) 0/1.

    `alpha` up-weights the uncensored term: (1 - alpha) * nll + alpha * nll_uncensored (0 = plain likelihood).
    Computed with log-sigmoids for stability: log h = logsigmoid(l), log(1 - h) = logsigmoid(-l).

    Args:
        logits: (B, K) hazard logits.
        bins: (B,) time bin of each patient, in 0..K-1.
        censorship: (B,) 1 = censored, 0 = event observed.
        alpha: Up-weighting of the uncensored term.
    """
    if logits.dim() != 2 or bins.shape != logits.shape[:1] or censorship.shape != logits.shape[:1]:
        raise ValueError(f"discrete_time_nll: logits (B, K), bins (B,), censorship (B,); got {tuple(logits.shape)}, "
                         f"{tuple(bins.shape)}, {tuple(censorship.shape)}")
    if bins.min() < 0 or bins.max() >= logits.shape[1]:
        raise ValueError(f"discrete_time_nll: bins must lie in 0..{logits.shape[1] - 1}, got {bins.tolist()}")
    log_survive = F.logsigmoid(-logits).cumsum(dim=-1)  # log S_k
    log_survive = torch.cat([torch.zeros_like(log_survive[:, :1]), log_survive], dim=1)  # log S_{k-1}, S_{-1} = 1
    bins = bins.long().unsqueeze(1)
    c = censorship.to(logits.dtype)
    uncensored = -(1 - c) * (log_survive.gather(1, bins) + F.logsigmoid(logits).gather(1, bins)).squeeze(1)
    censored = -c * log_survive.gather(1, bins + 1).squeeze(1)
    return ((1 - alpha) * (censored + uncensored) + alpha * uncensored).mean()


def concordance_index(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Harrell's C-index: over comparable pairs (i, j), the fraction where risk_i > risk_j (ties in risk count 1/2).
    (i, j) is comparable when i had the event and time_i < time_j, or time_i == time_j and j is censored (j was
    still alive at time_i). Two events at the same time are not comparable. O(n^2) in chunks of rows.

    Args:
        risk: (n,) risk scores.
        time: (n,) survival or censoring times.
        event: (n,) 1 = event observed, 0 = censored.
        chunk: Rows compared at a time (bounds the memory to chunk x n).
    """
    risk, time, event = risk.double(), time.double(), event.bool()
    concordant = torch.zeros((), dtype=torch.float64, device=risk.device)
    comparable = torch.zeros((), dtype=torch.float64, device=risk.device)
    for start in range(0, risk.numel(), chunk):
        r, t, e = risk[start:start + chunk, None], time[start:start + chunk, None], event[start:start + chunk, None]
        valid = e & ((t < time[None, :]) | ((t == time[None, :]) & ~event[None, :]))
        comparable += valid.sum()
        concordant += (valid & (r > risk[None, :])).sum() + 0.5 * (valid & (r == risk[None, :])).sum()
    if comparable == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return concordant / comparable


class ConcordanceIndex(Metric):
    """Harrell's C-index as a torchmetrics Metric: update(risk, time, event) with event = 1 - censorship.

    Args:
        **kwargs: torchmetrics `Metric` options (e.g. `dist_sync_on_step`).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("risk", default=[], dist_reduce_fx="cat")
        self.add_state("time", default=[], dist_reduce_fx="cat")
        self.add_state("event", default=[], dist_reduce_fx="cat")

    def update(self, risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> None:
        """Add patients.

        Args:
            risk: Risk scores.
            time: Survival or censoring times.
            event: 1 = event observed, 0 = censored.
        """
        self.risk.append(risk.detach().reshape(-1).float())
        self.time.append(time.detach().reshape(-1).float())
        self.event.append(event.detach().reshape(-1).bool())

    def compute(self) -> torch.Tensor:
        """The C-index over every patient added (NaN without a comparable pair)."""
        return concordance_index(dim_zero_cat(self.risk), dim_zero_cat(self.time), dim_zero_cat(self.event)).float()
