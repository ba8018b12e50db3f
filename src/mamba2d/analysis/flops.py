"""Parameters and FLOPs of a model: fvcore with a handle for the scan, cross-checked by torch.utils.flop_counter.

Convention: one multiply-add = one FLOP (fvcore's and VMamba's tables). `vmamba_tiny` at 224 x 224 gives 4.91 G
(VMamba reports 4.906 G) and 30.25 M parameters.

fvcore traces the model with torch.jit and counts each node with a handle; `torch.utils.flop_counter` intercepts
dispatched ops. Neither understands the scan written as many small tensor ops, so while counting, the backbone's
scan goes through `mamba2d.ops.flops.counted_selective_scan_2d`, one opaque op with the scan's formula
(`scan_as_one_op`). What fvcore does not count (element-wise ops such as GELU, SiLU, additions) is listed in the
report, never hidden. The two counters agree on everything both count: convolutions, matmuls/einsums, linears and
the scan; fvcore alone adds normalisation and pooling.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import einsum_flop_jit, get_shape
from torch.utils.flop_counter import FlopCounterMode

from ..ops import selective_scan_2d
from ..ops.flops import COUNTED_OP_NAME, SHAPE_ONLY, counted_scan_call, flop_counter_formula, scan_flops_from_shapes

SCAN_OPERATOR = COUNTED_OP_NAME.split("::")[-1]  # fvcore names an operator group by the op name after "::"
# fvcore operator groups that torch.utils.flop_counter also counts (the rest, norms and pooling, it does not).
SHARED_OPERATORS = ("conv", "einsum", "linear", "matmul", "bmm", "addmm", "mm", "scan")


@contextmanager
def scan_as_one_op(shape_only: bool = False) -> Iterator[None]:
    """While active, every `mamba2d` model module calls the opaque counted scan instead of `selective_scan_2d`.

    Model modules import the public op by name (`from ..ops import selective_scan_2d`), so the swap replaces that
    name in each loaded `mamba2d.models.*` module and restores it on exit. Results are unchanged (same backends),
    unless `shape_only`, where every scan returns zeros of the right shape: enough for counting, and free.
    """

    def shape_only_scan(*args, **kwargs) -> torch.Tensor:
        return counted_scan_call(*args, **{**kwargs, "backend": SHAPE_ONLY})

    replacement = shape_only_scan if shape_only else counted_scan_call
    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("mamba2d.models") and getattr(module, "selective_scan_2d", None) is selective_scan_2d:
            module.selective_scan_2d = replacement
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            module.selective_scan_2d = selective_scan_2d


def _fvcore_scan_handle(inputs, outputs) -> int:
    """fvcore handle for the counted scan node: inputs are (u, delta, A, B, C, D, z, ...) jit values."""
    u_shape, B_shape = get_shape(inputs[0]), get_shape(inputs[3])
    return scan_flops_from_shapes(u_shape, B_shape, with_D=get_shape(inputs[5]) is not None,
                                  with_z=get_shape(inputs[6]) is not None)


def _fvcore_einsum_handle(inputs, outputs) -> int:
    """Exact multiply-adds of a two-operand einsum: the product of the sizes of all its indices.

    fvcore's own einsum handle reads numpy's printed FLOP estimate, which is rounded to four digits; exact counts
    let the cross-check against torch.utils.flop_counter compare equal numbers.
    """
    equation = inputs[0].toIValue().replace(" ", "")
    shapes = [get_shape(v) for v in inputs[1].node().inputs()]
    operands = equation.split("->")[0].split(",")
    if len(operands) != 2 or "." in equation or any(s is None for s in shapes):
        return einsum_flop_jit(inputs, outputs)
    sizes = {}
    for letters, shape in zip(operands, shapes):
        sizes.update(zip(letters, shape))
    return math.prod(sizes.values())


@dataclass
class FlopReport:
    """FLOPs (multiply-adds) of one forward pass at `input_shape`, split by operator group."""

    model_name: str
    input_shape: tuple[int, ...]
    params: int
    flops: int  # fvcore total
    by_operator: dict[str, int]
    flop_counter_flops: int  # torch.utils.flop_counter total, converted to multiply-adds
    uncounted_ops: dict[str, int] = field(default_factory=dict)  # op name -> occurrences fvcore skipped

    @property
    def shared_flops(self) -> int:
        """fvcore's count restricted to the operator groups torch.utils.flop_counter also counts."""
        return sum(v for k, v in self.by_operator.items() if k in SHARED_OPERATORS)

    def table(self) -> str:
        lines = [
            f"model            {self.model_name}",
            f"input            {'x'.join(map(str, self.input_shape))}",
            f"params           {self.params / 1e6:.2f} M",
            f"FLOPs (fvcore)   {self.flops / 1e9:.3f} G   (multiply-add = 1 FLOP)",
        ]
        for op, value in sorted(self.by_operator.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {op:<21}{value / 1e9:.4f} G")
        lines.append(
            f"cross-check      torch.utils.flop_counter {self.flop_counter_flops / 1e9:.4f} G vs fvcore "
            f"{self.shared_flops / 1e9:.4f} G on {', '.join(k for k in self.by_operator if k in SHARED_OPERATORS)}"
        )
        if self.uncounted_ops:
            skipped = ", ".join(f"{k} x{v}" for k, v in sorted(self.uncounted_ops.items()))
            lines.append(f"not counted      {skipped}")
        return "\n".join(lines)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 224, 224), model_name: str = "") -> FlopReport:
    """Count params and forward FLOPs of `model` on a zero input of `input_shape` (batch, C, H, W).

    The model is counted in eval mode on its own device. The scan runs shape-only (zeros), so a CPU count of a
    224-pixel model costs a few convolution passes, not the reference scan.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(input_shape, device=device)
    was_training = model.training
    model.eval()
    try:
        with scan_as_one_op(shape_only=True), torch.no_grad():
            analysis = FlopCountAnalysis(model, (x,))
            analysis.set_op_handle(COUNTED_OP_NAME, _fvcore_scan_handle)
            analysis.set_op_handle("aten::einsum", _fvcore_einsum_handle)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            by_operator = {("scan" if k == SCAN_OPERATOR else k): int(v) for k, v in analysis.by_operator().items()}
            total = int(analysis.total())
            uncounted = dict(Counter(analysis.unsupported_ops()))
            counter = FlopCounterMode(display=False, custom_mapping={
                torch.ops.mamba2d_flops.selective_scan_2d: flop_counter_formula
            })
            with counter:
                model(x)
    finally:
        model.train(was_training)
    return FlopReport(
        model_name=model_name or type(model).__name__,
        input_shape=tuple(input_shape),
        params=count_parameters(model),
        flops=total,
        by_operator=by_operator,
        flop_counter_flops=counter.get_total_flops() // 2,
        uncounted_ops=uncounted,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mamba2d-flops",
        description="Parameters and GFLOPs (multiply-add convention, as VMamba's tables) of timm models or zoo "
        "entries, counted by fvcore with the scan as one node and cross-checked by torch.utils.flop_counter.",
    )
    parser.add_argument("models", nargs="+", help="timm model names (e.g. vmamba_tiny) or zoo names (arch.tag)")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--in-chans", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier classes (default: the model's own, 1000 for the timm builders)")
    return parser


def build_for_counting(name: str, num_classes: int | None = None) -> nn.Module:
    """A randomly initialised model with the architecture of `name` (timm model or zoo entry): FLOPs need no weights.

    It is built on the CPU: fvcore's torch.jit tracing does not run on the meta device.
    """
    import timm

    from .. import zoo

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if zoo.is_entry(name):
        entry = zoo.get(name)
        return timm.create_model(entry.arch, **{**entry.kwargs, **kwargs})
    return timm.create_model(name, **kwargs)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for i, name in enumerate(args.models):
        model = build_for_counting(name, args.num_classes)
        report = count_flops(model, (args.batch, args.in_chans, args.size, args.size), model_name=name)
        print(("\n" if i else "") + report.table())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
