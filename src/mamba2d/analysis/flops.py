"""Parameters and FLOPs of a model, counted by `torch.utils.flop_counter` with the scan as one registered op.

Convention: one multiply-add = one FLOP (VMamba's tables). `vmamba_tiny` at 224 x 224 gives 4.906 G (VMamba reports
4.906 G, counted with fvcore) and 30.25 M parameters.

While counting, every module of the model that has a `scan_backend` option (the models' documented scan setting)
scans with `backend="shape_only"`: the scan is then one dispatched op, `mamba2d_flops::selective_scan_2d`, whose
formula `mamba2d.ops.flops` registers with `torch.utils.flop_counter`, and the count needs no scan to run. Besides
torch's own formulas (convolutions, matmuls, linears, attention), layer norms and average pooling (adaptive pooling
and means) are counted as fvcore counts them, which is how VMamba's figures were made. Element-wise ops (GELU,
SiLU, additions) are not counted, as in those tables. fvcore, when installed (`pip install 'mamba2d[fvcore]'`),
gives an independent cross-check (`fvcore=True`); the two agree exactly on the VMamba models.

The count runs on a CPU copy of the model with zero weights (FLOPs depend on shapes alone): there the layer norms
run as PyTorch's operators, which the counter sees, where on a GPU the package's own kernels would run outside its
view.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ..ops.flops import COUNTED_OP_NAME, SHAPE_ONLY, scan_flops_from_shapes

aten = torch.ops.aten
SCAN_OP = torch.ops.mamba2d_flops.selective_scan_2d


def _layer_norm_flops(input_shape, normalized_shape, weight_shape=None, *args, **kwargs) -> int:
    """fvcore's layer-norm count (5 per element with an affine weight, else 4), as two FLOPs per multiply-add."""
    return 2 * math.prod(input_shape) * (5 if weight_shape is not None else 4)


def _pool_flops(input_shape, *args, **kwargs) -> int:
    """fvcore's adaptive-average-pooling count (one per input element), as two FLOPs per multiply-add.

    A global average pool reaches the dispatcher as `aten.mean` (ATen lowers a 1 x 1 adaptive pool to a mean).
    """
    return 2 * math.prod(input_shape)


#: Formulas `torch.utils.flop_counter` lacks, in fvcore's convention (the one of VMamba's tables).
EXTRA_FORMULAS = {
    aten.native_layer_norm: _layer_norm_flops,
    aten._adaptive_avg_pool2d: _pool_flops,
    aten.mean: _pool_flops,
}
#: Report groups of the counted ops (the rest keep their aten names).
GROUPS = {aten.convolution: "conv", aten._convolution: "conv", aten.addmm: "linear", SCAN_OP: "scan",
          aten.native_layer_norm: "layer_norm", aten._adaptive_avg_pool2d: "avg_pool", aten.mean: "avg_pool"}


@dataclass
class FlopReport:
    """FLOPs (multiply-adds) of one forward pass at `input_shape`, split by operator group.

    Args:
        model_name: Name shown in the table.
        input_shape: (batch, C, H, W) counted.
        params: Number of parameters.
        flops: Total multiply-adds counted by `torch.utils.flop_counter`.
        by_operator: Multiply-adds per operator group ("conv", "mm", "bmm", "linear", "scan", "layer_norm",
            "avg_pool", ...).
        fvcore_flops: fvcore's total for the same pass, when the cross-check ran.
    """

    model_name: str
    input_shape: tuple[int, ...]
    params: int
    flops: int
    by_operator: dict[str, int]
    fvcore_flops: int | None = None

    def table(self) -> str:
        """The report as aligned text lines: params in M, FLOPs in G (10^9 multiply-adds)."""
        lines = [
            f"model            {self.model_name}",
            f"input            {'x'.join(map(str, self.input_shape))}",
            f"params           {self.params / 1e6:.2f} M",
            f"FLOPs            {self.flops / 1e9:.3f} G   (multiply-add = 1 FLOP; torch.utils.flop_counter)",
        ]
        for op, value in sorted(self.by_operator.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {op:<21}{value / 1e9:.4f} G")
        if self.fvcore_flops is not None:
            lines.append(f"cross-check      fvcore {self.fvcore_flops / 1e9:.4f} G")
        lines.append("not counted      element-wise ops (activations, additions), as in VMamba's tables")
        return "\n".join(lines)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of `model`.

    Args:
        model: Any module.
    """
    return sum(p.numel() for p in model.parameters())


@contextmanager
def shape_only_scans(model: nn.Module) -> Iterator[None]:
    """While active, every submodule of `model` with a `scan_backend` option scans with `backend="shape_only"`.

    Args:
        model: The model to count; its options are restored on exit.
    """
    saved = [(m, m.scan_backend) for m in model.modules() if hasattr(m, "scan_backend")]
    try:
        for m, _ in saved:
            m.scan_backend = SHAPE_ONLY
        yield
    finally:
        for m, backend in saved:
            m.scan_backend = backend


def _fvcore_total(model: nn.Module, x: torch.Tensor) -> int:
    """fvcore's total with a handle for the counted scan op and exact einsums (optional dependency)."""
    try:
        from fvcore.nn import FlopCountAnalysis
        from fvcore.nn.jit_handles import get_shape
    except ImportError as exc:
        raise ImportError("count_flops(fvcore=True) needs fvcore: pip install 'mamba2d[fvcore]'") from exc

    def scan_handle(inputs, outputs) -> int:
        return scan_flops_from_shapes(get_shape(inputs[1]), get_shape(inputs[3]),
                                      with_D=get_shape(inputs[5]) is not None, with_z=get_shape(inputs[6]) is not None,
                                      A_shape=get_shape(inputs[2]))

    def einsum_handle(inputs, outputs) -> int:
        # fvcore's own einsum handle reads numpy's printed estimate, rounded to four digits.
        equation = inputs[0].toIValue().replace(" ", "")
        shapes = [get_shape(v) for v in inputs[1].node().inputs()]
        sizes = {}
        for letters, shape in zip(equation.split("->")[0].split(","), shapes):
            sizes.update(zip(letters, shape))
        return math.prod(sizes.values())

    analysis = FlopCountAnalysis(model, (x,))
    analysis.set_op_handle(COUNTED_OP_NAME, scan_handle)
    analysis.set_op_handle("aten::einsum", einsum_handle)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return int(analysis.total())


def count_flops(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 224, 224), model_name: str = "",
                fvcore: bool = False) -> FlopReport:
    """Count params and forward FLOPs of `model` on a zero input of `input_shape` (batch, C, H, W).

    The model is counted in eval mode, as a CPU copy with zero weights, with shape-only scans
    (`shape_only_scans`), and left as it was (fvcore's cross-check runs on the model itself, on its device).

    Args:
        model: The model.
        input_shape: Input shape (batch, C, H, W).
        model_name: Name shown in the report (default: the class name).
        fvcore: Also count with fvcore as a cross-check (needs the `fvcore` extra).
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with shape_only_scans(model), torch.no_grad():
            with FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter:
                _cpu_copy(model)(torch.zeros(input_shape))
            fvcore_total = _fvcore_total(model, torch.zeros(input_shape, device=device)) if fvcore else None
    finally:
        model.train(was_training)
    by_operator: dict[str, int] = {}
    for op, value in counter.get_flop_counts()["Global"].items():
        group = GROUPS.get(op, getattr(op, "__name__", str(op)))
        by_operator[group] = by_operator.get(group, 0) + value // 2
    return FlopReport(
        model_name=model_name or type(model).__name__,
        input_shape=tuple(input_shape),
        params=count_parameters(model),
        flops=sum(by_operator.values()),
        by_operator=by_operator,
        fvcore_flops=fvcore_total,
    )


def _cpu_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` on the CPU whose parameters and buffers are zeros of the same shapes and dtypes (the
    weights themselves are not copied off the GPU)."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        zeros = torch.zeros(t.shape, dtype=t.dtype)
        memo[id(t)] = nn.Parameter(zeros, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else zeros
    return copy.deepcopy(model, memo)


def build_for_counting(name: str, num_classes: int | None = None) -> nn.Module:
    """A randomly initialised model with the architecture of `name` (timm model or zoo entry): FLOPs need no weights.

    Args:
        name: A timm model name (e.g. vmamba_tiny) or a zoo entry (arch.tag).
        num_classes: Classifier classes (default: the model's own).
    """
    import timm

    from .. import zoo

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if zoo.is_entry(name):
        entry = zoo.get(name)
        return timm.create_model(entry.arch, **{**entry.kwargs, **kwargs})
    return timm.create_model(name, **kwargs)


def flops(models: Sequence[str], size: int = 224, batch: int = 1, in_chans: int = 3, num_classes: int | None = None,
          fvcore: bool = False) -> list[FlopReport]:
    """Print the parameters and GFLOPs (multiply-add convention, as VMamba's tables) of each model; return reports.

    Args:
        models: timm model names (e.g. vmamba_tiny) or zoo names (arch.tag).
        size: Input height and width.
        batch: Batch size.
        in_chans: Input channels.
        num_classes: Classifier classes (default: the model's own, 1000 for the timm builders).
        fvcore: Cross-check each total with fvcore (needs `pip install 'mamba2d[fvcore]'`).
    """
    reports = []
    for i, name in enumerate(models):
        model = build_for_counting(name, num_classes)
        reports.append(count_flops(model, (batch, in_chans, size, size), model_name=name, fvcore=fvcore))
        print(("\n" if i else "") + reports[-1].table())
    return reports
