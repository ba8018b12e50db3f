"""Optimiser and learning-rate schedule shared by the tasks: AdamW without decay on norms, biases and 1-D params,
per-step linear warm-up followed by cosine, polynomial or step decay."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.optim import param_groups_weight_decay


def adamw_no_decay_on_1d(
    module: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW whose weight decay skips 1-D parameters (norms, biases) and those a model lists in no_weight_decay().

    Args:
        module: The trained network.
        lr: Learning rate.
        weight_decay: Decoupled weight decay of the other parameters.
        betas: AdamW betas.
    """
    skip = set()
    for name, sub in module.named_modules():
        if hasattr(sub, "no_weight_decay"):
            skip |= {f"{name}.{p}" if name else p for p in sub.no_weight_decay()}
    groups = param_groups_weight_decay(module, weight_decay, no_weight_decay_list=skip)
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def warmup_then_decay(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    decay: str = "cosine",
    min_lr_ratio: float = 0.0,
    poly_power: float = 1.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_start_ratio: float = 1e-3,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up to the base lr, then `cosine`, `poly`, `step` or `constant`.

    Args:
        optimizer: The optimiser whose learning rates are scaled.
        total_steps: Length of the schedule in steps (the decay ends there).
        warmup_steps: Linear warm-up length in steps.
        decay: "cosine", "poly", "step" or "constant" after the warm-up.
        min_lr_ratio: Cosine and poly decay end at this fraction of the base lr.
        poly_power: Power of the poly decay.
        milestones: Steps at which the step decay multiplies the lr by `gamma`.
        gamma: The step decay factor.
        warmup_start_ratio: The warm-up starts at this fraction of the base lr.
    """
    if decay not in ("cosine", "poly", "step", "constant"):
        raise ValueError(f"warmup_then_decay: decay must be cosine, poly, step or constant, got {decay!r}")
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(int(warmup_steps), total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_start_ratio + (1 - warmup_start_ratio) * step / warmup_steps
        if decay == "step":
            return gamma ** sum(step >= m for m in milestones)
        if decay == "constant":
            return 1.0
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else (1 - progress) ** poly_power
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
