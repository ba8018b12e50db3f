"""An independent, obviously correct 2D selective scan for the tests: a plain loop over pixels, per docs/scan.md.

Directions are walked with explicit row/column orders (not with the flips/transposes the library uses).
Vectorised only over (batch, channel, state). Lists of tensors keep autograd happy without in-place writes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _orders(direction: str, height: int, width: int):
    corner, order = direction.split("_")
    rows = list(range(height))[:: -1 if corner[0] == "b" else 1]
    cols = list(range(width))[:: -1 if corner[1] == "r" else 1]
    return rows, cols, order


def loop_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, direction="tl_hv"):
    batch, dim, height, width = u.shape
    groups = B.shape[1]
    directions = [direction] * groups if isinstance(direction, str) else list(direction)
    per_group = dim // groups
    f64 = torch.float64
    u, delta, A, B, C = (t.to(f64) for t in (u, delta, A, B, C))
    dt = delta + (delta_bias.to(f64)[None, :, None, None] if delta_bias is not None else 0)
    dt = F.softplus(dt) if delta_softplus else dt
    group_of = torch.arange(dim) // per_group
    Bc, Cc = B[:, group_of], C[:, group_of]  # (b, dim, N, H, W)
    abar = torch.exp(dt[:, :, None] * A[None, :, :, None, None])
    x = dt[:, :, None] * Bc * u[:, :, None]
    out_channels = []
    for d in range(dim):
        rows, cols, order = _orders(directions[group_of[d]], height, width)
        first = {}
        if order == "hv":  # along each row first, then down each column
            for i in rows:
                prev = None
                for j in cols:
                    first[i, j] = x[:, d, :, i, j] + (abar[:, d, :, i, j] * prev if prev is not None else 0)
                    prev = first[i, j]
            second = {}
            for j in cols:
                prev = None
                for i in rows:
                    second[i, j] = first[i, j] + (abar[:, d, :, i, j] * prev if prev is not None else 0)
                    prev = second[i, j]
        else:  # down each column first, then along each row
            for j in cols:
                prev = None
                for i in rows:
                    first[i, j] = x[:, d, :, i, j] + (abar[:, d, :, i, j] * prev if prev is not None else 0)
                    prev = first[i, j]
            second = {}
            for i in rows:
                prev = None
                for j in cols:
                    second[i, j] = first[i, j] + (abar[:, d, :, i, j] * prev if prev is not None else 0)
                    prev = second[i, j]
        rows_out = []
        for i in range(height):
            rows_out.append(torch.stack([(Cc[:, d, :, i, j] * second[i, j]).sum(-1) for j in range(width)], -1))
        out_channels.append(torch.stack(rows_out, -2))
    y = torch.stack(out_channels, 1)
    if D is not None:
        y = y + D.to(f64)[None, :, None, None] * u
    if z is not None:
        y = y * F.silu(z.to(f64))
    return y
