"""The 2D selective scan contract (docs/scan.md): direction names and input checks shared by every backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

CORNERS = ("tl", "tr", "bl", "br")
ORDERS = ("hv", "vh")
DIRECTIONS = tuple(f"{corner}_{order}" for corner in CORNERS for order in ORDERS)

FLOAT_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PARAM_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class ScanShape:
    """The sizes of one scan call, read from `delta` (batch, dim, H, W) and `B` (batch, G, N, H, W).

    Args:
        batch: Batch size.
        dim: Channels of `delta` and of the output.
        height: Rows H of the map.
        width: Columns W of the map.
        groups: B/C groups G (channel d uses group `d // (dim // G)`).
        d_state: States N per channel.
        u_blocks: Blocks of dim / G maps in `u` that the groups share, group g reading block `g % u_blocks` (1: one
            u of dim / G channels read by every group); 0 where u has one map per channel (dim channels).
        delta_rank: R of a low-rank `delta` (batch, G, R, H, W) given with `delta_proj`; 0 for a full delta.
    """

    batch: int
    dim: int
    height: int
    width: int
    groups: int
    d_state: int
    u_blocks: int = 0
    delta_rank: int = 0


def summed_channels(u_channels: int, dim: int, groups: int) -> int:
    """The channels of y summed over its groups (`sum_groups`): u's where the groups share u's maps (each block's
    groups summed), else dim / G (all G groups summed).

    Args:
        u_channels: u.shape[1].
        dim: Channels of delta and of the unsummed y.
        groups: B/C groups G.
    """
    return u_channels if u_channels < dim else dim // groups


def direction_transform(direction: str) -> tuple[bool, bool, bool]:
    """Return (flip_rows, flip_cols, transpose) that turn `direction` into `tl_hv`.

    The flips are applied first, then the transpose; undo in the opposite order.

    Args:
        direction: One of `DIRECTIONS` (`{tl,tr,bl,br}_{hv,vh}`).
    """
    corner, order = direction.split("_")
    return corner[0] == "b", corner[1] == "r", order == "vh"


def parse_directions(direction: str | Sequence[str], groups: int) -> tuple[str, ...]:
    """One direction name per B/C group, checked against `DIRECTIONS`.

    Args:
        direction: One name for every group, or exactly one name per group.
        groups: The number of groups G (B.shape[1]).

    Returns:
        `groups` direction names.

    Raises:
        ValueError: When the count is not `groups` or a name is unknown.
    """
    names = (direction,) * groups if isinstance(direction, str) else tuple(direction)
    if len(names) != groups:
        raise ValueError(
            f"selective_scan_2d: direction has {len(names)} entries but B/C have G={groups} groups; "
            "give one direction name or exactly one per group"
        )
    for name in names:
        if name not in DIRECTIONS:
            raise ValueError(f"selective_scan_2d: unknown direction {name!r}; expected one of {', '.join(DIRECTIONS)}")
    return names


def _type_name(value: object) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def check_argument_types(tensors: dict[str, object], out_dtype: object = None) -> None:
    """Raise a TypeError naming the argument when one of `tensors` is not a torch.Tensor or `out_dtype` is neither
    None nor a torch.dtype.

    Runs before any backend is chosen, so a numpy array or a list is named as such instead of failing inside a
    backend.

    Args:
        tensors: Argument name -> value (None allowed: an optional argument left out).
        out_dtype: The requested output dtype, or None.

    Raises:
        TypeError: Naming the first argument of the wrong type.
    """
    for name, value in tensors.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"selective_scan_2d: {name} must be a torch.Tensor, got {_type_name(value)}")
    if out_dtype is not None and not isinstance(out_dtype, torch.dtype):
        raise TypeError(f"selective_scan_2d: out_dtype must be None or a torch.dtype, got {_type_name(out_dtype)}")


def _expect_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"selective_scan_2d: {name} must have shape {meaning} = {expected}, got {tuple(tensor.shape)}")


def check_scan_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    out_dtype: torch.dtype | None,
    delta_proj: torch.Tensor | None = None,
) -> ScanShape:
    """Validate the shapes, dtypes and devices of a scan call (the contract: docs/scan.md).

    Errors name the argument, the expected and the actual value.

    Args:
        u: Input, (batch, dim, H, W) in float32, float16, bfloat16 or float64, or (batch, P * dim / G, H, W) with
            P dividing G: P blocks of one map per channel of a group, group g reading block `g % P` (P = 1: one
            block read by all G groups); the gradient of a block is summed over the groups that read it.
        delta: Step sizes before softplus, (batch, dim, H, W) in u's dtype, or (batch, G, R, H, W) in u's dtype
            with `delta_proj` (the low-rank form, `full_delta`).
        A: State matrix, (dim, N) in float32 or float64.
        B: Input projection, (batch, G, N, H, W) in u's dtype, with dim divisible by G.
        C: Output projection, (batch, G, N, H, W) in u's dtype.
        D: Skip weights, (dim,) in float32 or float64, or None.
        z: Gate, (batch, dim, H, W) in u's dtype, or None.
        delta_bias: Added to delta before softplus, (dim,) in float32 or float64, or None.
        out_dtype: None, torch.float32 or u's dtype.
        delta_proj: Per-group projection of a low-rank delta, (G, dim / G, R) in a float dtype, or None.

    Returns:
        The sizes of the call.

    Raises:
        TypeError: A missing tensor, a non-tensor argument or a dtype outside the contract.
        ValueError: A shape outside the contract, an empty input or tensors on different devices.
    """
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias,
             "delta_proj": delta_proj}
    for name in ("u", "delta", "A", "B", "C"):
        if named[name] is None:
            raise TypeError(f"selective_scan_2d: {name} must be a torch.Tensor, got None")
    check_argument_types(named, out_dtype)
    if u.dim() != 4:
        raise ValueError(f"selective_scan_2d: u must be 4-D (batch, dim, H, W), got {u.dim()}-D shape {tuple(u.shape)}")
    if u.dtype not in FLOAT_INPUT_DTYPES:
        raise TypeError(f"selective_scan_2d: u has unsupported dtype {u.dtype}; expected one of "
                        f"{', '.join(map(str, FLOAT_INPUT_DTYPES))}")
    batch, dim, height, width = u.shape
    if B.dim() != 5:
        raise ValueError(f"selective_scan_2d: B must be 5-D (batch, G, N, H, W), got shape {tuple(B.shape)}")
    groups, d_state = B.shape[1], B.shape[2]
    maps, rank = tuple(delta.shape), 0  # the full delta's shape (batch, dim, H, W), as far as the inputs tell
    if delta_proj is not None:
        if delta_proj.dim() != 3:
            raise ValueError(f"selective_scan_2d: delta_proj must be 3-D (G, dim / G, R), got shape "
                             f"{tuple(delta_proj.shape)}")
        if delta.dim() != 5:
            raise ValueError(f"selective_scan_2d: delta must be 5-D (batch, G, R, H, W) when delta_proj is given, "
                             f"got shape {tuple(delta.shape)}")
        rank = delta_proj.shape[2]
        maps = (delta.shape[0], delta_proj.shape[0] * delta_proj.shape[1], *delta.shape[3:])
    u_blocks = 0
    per_group = maps[1] // groups if len(maps) == 4 and groups > 0 else 0
    if (groups > 1 and per_group > 0 and maps[0] == batch and tuple(maps[2:]) == (height, width) and maps[1] != dim
            and per_group * groups == maps[1] and dim % per_group == 0 and groups % (dim // per_group) == 0):
        u_blocks, dim = dim // per_group, maps[1]
    if A.dim() != 2:
        raise ValueError(f"selective_scan_2d: A must be 2-D (dim, N), got shape {tuple(A.shape)}")
    if groups < 1 or dim % groups != 0:
        if len(maps) == 4 and maps[1] != dim and groups > 0 and maps[1] % groups == 0:
            raise ValueError(f"selective_scan_2d: u has {dim} channels (u.shape[1]), neither delta's dim={maps[1]} nor "
                             f"P * dim / G = P * {maps[1] // groups} for groups sharing u's P blocks (P dividing "
                             f"G={groups}, B.shape[1])")
        raise ValueError(f"selective_scan_2d: dim={dim} (u.shape[1]) must be divisible by G={groups} (B.shape[1])")
    if min(batch, dim, height, width, d_state) < 1 or (delta_proj is not None and rank < 1):
        raise ValueError(f"selective_scan_2d: empty input: u {tuple(u.shape)}, B {tuple(B.shape)}"
                         + ("" if delta_proj is None else f", delta_proj {tuple(delta_proj.shape)}"))
    full = (batch, dim, height, width)
    if delta_proj is None:
        _expect_shape("delta", delta, full, "(batch, dim, H, W) like u, or (batch, G / P * u.shape[1], H, W) when the "
                      "G groups share u's P blocks (P dividing G)")
    else:
        _expect_shape("delta_proj", delta_proj, (groups, dim // groups, rank), "(G, dim / G, R) with G = B.shape[1] "
                      "and dim = u.shape[1], or G / P * u.shape[1] when the G groups share u's P blocks,")
        _expect_shape("delta", delta, (batch, groups, rank, height, width), "(batch, G, R, H, W) with R = "
                      "delta_proj.shape[2]")
    _expect_shape("A", A, (dim, d_state), "(dim, N)")
    _expect_shape("B", B, (batch, groups, d_state, height, width), "(batch, G, N, H, W)")
    _expect_shape("C", C, (batch, groups, d_state, height, width), "(batch, G, N, H, W) like B")
    if z is not None:
        _expect_shape("z", z, full, "(batch, dim, H, W) like delta")
    for name in ("D", "delta_bias"):
        if named[name] is not None:
            _expect_shape(name, named[name], (dim,), "(dim,)")
    for name in ("delta", "B", "C", "z"):
        tensor = named[name]
        if tensor is not None and tensor.dtype != u.dtype:
            raise TypeError(f"selective_scan_2d: {name} has dtype {tensor.dtype} but u has {u.dtype}; they must match")
    if delta_proj is not None and delta_proj.dtype not in FLOAT_INPUT_DTYPES:
        raise TypeError(f"selective_scan_2d: delta_proj has unsupported dtype {delta_proj.dtype}; expected one of "
                        f"{', '.join(map(str, FLOAT_INPUT_DTYPES))}")
    for name in ("A", "D", "delta_bias"):
        tensor = named[name]
        if tensor is not None and tensor.dtype not in PARAM_DTYPES:
            raise TypeError(f"selective_scan_2d: {name} must be {' or '.join(map(str, PARAM_DTYPES))}, "
                            f"got {tensor.dtype}")
    if out_dtype is not None and out_dtype not in (torch.float32, u.dtype):
        raise TypeError(
            f"selective_scan_2d: out_dtype must be None, torch.float32 or u.dtype ({u.dtype}), got {out_dtype}")
    for name, tensor in named.items():
        if tensor is not None and tensor.device != u.device:
            raise ValueError(
                f"selective_scan_2d: {name} is on {tensor.device} but u is on {u.device}; move them together")
    return ScanShape(batch, dim, height, width, groups, d_state, u_blocks, rank)


def share_u(u: torch.Tensor, shape: ScanShape) -> torch.Tensor:
    """u with one map per channel: a shared u's blocks (`ScanShape.u_blocks`) repeated for every group, as a
    differentiable copy (a block's gradient is the sum over the groups that read it); any other u unchanged.

    Args:
        u: The scan's input.
        shape: The call's sizes (`check_scan_inputs`).
    """
    if not shape.u_blocks:
        return u
    repeats = shape.groups // shape.u_blocks
    return u.unsqueeze(1).expand(-1, repeats, -1, -1, -1).reshape(shape.batch, shape.dim, shape.height, shape.width)


def full_delta(delta: torch.Tensor, delta_proj: torch.Tensor | None) -> torch.Tensor:
    """The scan's delta, one map per channel: `delta` itself, or a low-rank delta through its projection.

    The low-rank form is `einsum("gdr,bgrhw->bgdhw", delta_proj, delta)` flattened to (batch, dim, H, W), computed
    in delta's dtype (the weight cast to it) as one GEMM batched over (image, group): its output is the contiguous
    (batch, dim, H, W) the kernels read. A GEMM per group over all the pixels instead would leave a GPU nearly idle
    at the 2D mixer's small R. Differentiable.

    Args:
        delta: (batch, dim, H, W), or (batch, G, R, H, W) with `delta_proj` (may be a strided view).
        delta_proj: (G, dim / G, R), or None for a full delta.

    Returns:
        (batch, dim, H, W).
    """
    if delta_proj is None:
        return delta
    weight, low_rank = batched_delta_factors(delta, delta_proj)
    batch, _, _, height, width = delta.shape
    return torch.bmm(weight, low_rank).view(batch, -1, height, width)


def batched_delta_factors(delta: torch.Tensor, delta_proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of a low-rank delta as `torch.bmm` batches over (image, group), in delta's dtype: the
    weight (batch * G, dim / G, R) and the low-rank maps (batch * G, R, H * W).

    The weight is the transposed view of a contiguous (batch * G, R, dim / G): its rows are then dim / G apart, where
    rows R apart (6 in the tiny models) would leave cuBLAS only its kernels for 2-byte-aligned operands, which use
    the tensor cores poorly or not at all.

    Args:
        delta: (batch, G, R, H, W).
        delta_proj: (G, dim / G, R).
    """
    batch, groups, rank, height, width = delta.shape
    weight = delta_proj.to(delta.dtype).transpose(1, 2).expand(batch, -1, -1, -1).reshape(batch * groups, rank, -1)
    return weight.transpose(1, 2), delta.reshape(batch * groups, rank, height * width)
