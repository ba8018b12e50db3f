"""Pure-PyTorch 2D selective scan: the oracle for the CUDA kernels and the CPU backend.

Differentiable through autograd, vectorised over batch, channels and states. Each pass is a Hillis-Steele parallel
scan (log2(length) tensor steps), so long rows (H = 1 bags of 10^5 patches) cost no Python loop over pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .contract import check_scan_inputs, direction_transform, full_delta, parse_directions, share_u, summed_channels


def linear_recurrence(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Inclusive scan h[j] = a[j] * h[j-1] + x[j] along the last dimension, h[-1] = 0.

    Args:
        a: Decay per step, broadcast-compatible with `x` (same size along the last dimension).
        x: Input per step.

    Returns:
        h, shaped like `x`.
    """
    length = x.shape[-1]
    if length == 1:  # h = a * h[-1] + x with h[-1] = 0, written out so `a` gets a zero gradient rather than none
        return torch.addcmul(x, a, torch.zeros_like(x))
    step = 1
    while step < length:
        x = torch.cat((x[..., :step], torch.addcmul(x[..., step:], a[..., step:], x[..., :-step])), dim=-1)
        if 2 * step < length:
            a = torch.cat((a[..., :step], a[..., step:] * a[..., :-step]), dim=-1)
        step *= 2
    return x


def _orient(t: torch.Tensor, direction: str) -> torch.Tensor:
    flip_rows, flip_cols, transpose = direction_transform(direction)
    dims = [d for d, flip in ((-2, flip_rows), (-1, flip_cols)) if flip]
    if dims:
        t = t.flip(dims)
    return t.transpose(-1, -2) if transpose else t


def _unorient(t: torch.Tensor, direction: str) -> torch.Tensor:
    flip_rows, flip_cols, transpose = direction_transform(direction)
    if transpose:
        t = t.transpose(-1, -2)
    dims = [d for d, flip in ((-2, flip_rows), (-1, flip_cols)) if flip]
    return t.flip(dims) if dims else t


def _scan_tl_hv(dt, A, B, C, u):
    """dt, u: (b, g, dg, H, W); A: (g, dg, N); B, C: (b, g, N, H, W) -> sum_n C*h as (b, g, dg, H, W)."""
    abar = torch.exp(dt.unsqueeze(3) * A[None, :, :, :, None, None])
    x = (dt * u).unsqueeze(3) * B.unsqueeze(2)
    g = linear_recurrence(abar, x)
    h = linear_recurrence(abar.transpose(-1, -2), g.transpose(-1, -2)).transpose(-1, -2)
    return torch.einsum("bgnhw,bgdnhw->bgdhw", C, h)


def selective_scan_2d_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    direction: str | Sequence[str] = "tl_hv",
    out_dtype: torch.dtype | None = None,
    *,
    delta_proj: torch.Tensor | None = None,
    sum_groups: bool = False,
    channels_last: bool = False,
) -> torch.Tensor:
    """2D selective scan in pure PyTorch (the contract: docs/scan.md), differentiable by autograd.

    Per channel d, state n and pixel (i, j): `dt = softplus(delta + delta_bias)`, `Abar = exp(dt * A)`, a row scan
    `g[i,j] = Abar g[i,j-1] + dt B u`, a column scan `h[i,j] = Abar h[i-1,j] + g[i,j]`, `y = sum_n C h + D u`, gated
    by `silu(z)`; channel d uses the B/C group `d // (dim // G)`. Arithmetic runs in float32 (float64 for float64
    inputs). It materialises (batch, dim, N, H, W) tensors, so it suits CPUs, tests and small maps.

    Args:
        u: Input, (batch, dim, H, W) in float32, float16, bfloat16 or float64, or (batch, P * dim / G, H, W): P
            blocks (P dividing G) of one map per channel of a group, group g reading block `g % P`.
        delta: Step sizes, (batch, dim, H, W) in u's dtype, or (batch, G, R, H, W) with `delta_proj`.
        A: State matrix, (dim, N) in float32 (float64 allowed), negative for a decaying state.
        B: Input projection, (batch, G, N, H, W) in u's dtype; dim must be divisible by G.
        C: Output projection, (batch, G, N, H, W) in u's dtype.
        D: Skip weights added as `D * u`, (dim,) in float32, or None.
        z: Gate applied as `y * silu(z)`, (batch, dim, H, W) in u's dtype, or None.
        delta_bias: Added to delta before softplus, (dim,) in float32, or None.
        delta_softplus: Whether dt is `softplus(delta + delta_bias)` (else `delta + delta_bias`).
        direction: Origin corner and pass order, one of `DIRECTIONS` (`{tl,tr,bl,br}_{hv,vh}`) or one name per
            group.
        out_dtype: The output's dtype: None (u's dtype) or torch.float32.
        delta_proj: Per-group projection (G, dim / G, R) of a low-rank delta, or None: the full delta is
            `einsum("gdr,bgrhw->bgdhw", delta_proj, delta)` in delta's dtype (`contract.full_delta`), and autograd
            differentiates through it.
        sum_groups: Return y summed over the G groups (channel c of the sum adds channel c of each group); where
            u holds P blocks that the groups share, over the groups of each block: (batch, P * dim / G, H, W).
        channels_last: Return y channels_last.

    Returns:
        y, (batch, dim, H, W) in `out_dtype`, or with `sum_groups` (batch, dim / G, H, W) (u's shape where the
        groups share u's blocks).

    Raises:
        TypeError: An argument of the wrong type or dtype (`contract.check_scan_inputs`).
        ValueError: A shape, direction or device outside the contract.
    """
    shape = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, out_dtype, delta_proj)
    directions = parse_directions(direction, shape.groups)
    u_channels = u.shape[1]  # before share_u: the channels y is summed to
    u = share_u(u, shape)
    delta = full_delta(delta, delta_proj)
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, dim, height, width = u.shape
    groups, per_group = shape.groups, dim // shape.groups

    def grouped(t: torch.Tensor) -> torch.Tensor:
        return t.to(compute).reshape(batch, groups, per_group, height, width)

    u_c = grouped(u)
    dt = grouped(delta)
    if delta_bias is not None:
        dt = dt + delta_bias.to(compute).reshape(1, groups, per_group, 1, 1)
    if delta_softplus:
        dt = F.softplus(dt)
    A_c = A.to(compute).reshape(groups, per_group, -1)
    B_c, C_c = B.to(compute), C.to(compute)

    outputs = []
    for name in dict.fromkeys(directions):
        idx = [g for g, d in enumerate(directions) if d == name]
        # a contiguous run of groups is a view; otherwise gather the groups that share this direction
        contiguous = idx == list(range(idx[0], idx[-1] + 1))
        sel = slice(idx[0], idx[-1] + 1) if contiguous else torch.tensor(idx, device=u.device)
        out = _scan_tl_hv(
            _orient(dt[:, sel], name), A_c[sel], _orient(B_c[:, sel], name), _orient(C_c[:, sel], name),
            _orient(u_c[:, sel], name),
        )
        outputs.append((idx, _unorient(out, name)))
    if len(outputs) == 1:
        y = outputs[0][1]
    else:
        order = torch.tensor([g for idx, _ in outputs for g in idx], device=u.device)
        y = torch.cat([out for _, out in outputs], dim=1)[:, torch.argsort(order)]
    y = y.reshape(batch, dim, height, width)
    if D is not None:
        y = y + D.to(compute).reshape(1, dim, 1, 1) * u_c.reshape(batch, dim, height, width)
    if z is not None:
        y = y * F.silu(z.to(compute))
    if sum_groups:
        summed = summed_channels(u_channels, dim, groups)
        y = y.reshape(batch, dim // summed, summed, height, width).sum(dim=1)
    y = y.to(out_dtype or u.dtype)
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y
