"""Inference and training throughput (images/s) and peak memory per precision, following VMamba's protocol.

Protocol: `warmup` untimed iterations (default 50), then `iters` timed iterations (default 30) on a random batch,
with the device synchronised before and after the timed loop; throughput = iters * batch / seconds. Inference runs
the forward pass under `torch.inference_mode`; training runs forward, cross-entropy and backward (no optimiser
step, as VMamba's train throughput excludes the optimiser). Precisions: `fp32` (float32; TF32 matmuls and
convolutions only with `--tf32`, as VMamba's protocol), `fp16` (float16 autocast, what upstream calls AMP) and
`bf16` (bfloat16 autocast). Peak memory is printed in GB (10^9 bytes): `torch.cuda.max_memory_allocated` on CUDA;
on CPU the process's peak resident set size (`ru_maxrss`), a whole-process upper bound, labelled so.

    mamba2d throughput --models '[vmamba2d_tiny, vmamba_tiny]' --batch 128 --size 224 --tf32 true \\
        --precisions '[fp32, fp16, bf16]'
"""

from __future__ import annotations

import gc
import resource
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("inference", "training")
#: Name -> autocast dtype (None: no autocast).
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_PRECISIONS = ("fp32", "fp16")


@dataclass
class Measurement:
    """One (model, mode, precision) result.

    Args:
        model: timm name.
        mode: "inference" or "training".
        precision: A key of PRECISIONS.
        batch: Images per step.
        size: Image side in pixels.
        images_per_s: Throughput.
        peak_memory_gb: Peak memory in GB (10^9 bytes).
        memory_kind: "cuda allocated" or "process peak RSS".
    """

    model: str
    mode: str
    precision: str
    batch: int
    size: int
    images_per_s: float
    peak_memory_gb: float
    memory_kind: str

    def row(self) -> str:
        """One table row under HEADER: images/s, then peak memory in GB (10^9 bytes) and how it was measured."""
        return (f"{self.model:<20}{self.mode:<11}{self.precision:<6}{self.batch:>6}{self.size:>6}"
                f"{self.images_per_s:>12.1f}{self.peak_memory_gb:>10.2f}  {self.memory_kind}")


HEADER = f"{'model':<20}{'mode':<11}{'prec':<6}{'batch':>6}{'size':>6}{'images/s':>12}{'peak GB':>10}  memory"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str, cache_enabled: bool = True):
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)


def _peak_memory_gb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "cuda allocated"
    # ru_maxrss is in KiB on Linux and bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9, "process peak RSS"


def measure(model: nn.Module, name: str, mode: str, precision: str, batch: int, size: int,
            device: torch.device, warmup: int = 50, iters: int = 30, in_chans: int = 3,
            cuda_graph: bool = False) -> Measurement:
    """Images/s and peak memory of `model` for one (mode, precision) setting.

    Args:
        model: The model (moved to `device`).
        name: Its name in the result.
        mode: "inference" or "training".
        precision: "fp32", "fp16" or "bf16".
        batch: Images per step.
        size: Image side in pixels.
        device: Where to run.
        warmup: Untimed steps.
        iters: Timed steps.
        in_chans: Image channels.
        cuda_graph: Training only, on CUDA: run the model's forward and backward as CUDA graphs
            (`torch.cuda.make_graphed_callables`, which replaces the forward of `model` itself, for this precision
            and shape), so that the host enqueues two graph launches a step instead of every kernel; where the host
            cannot keep up with the GPU, this measures the GPU's pace. The loss and its backward stay eager.

    Raises:
        ValueError: An unknown mode or precision, or `cuda_graph` outside training on CUDA.
    """
    if mode not in MODES or precision not in PRECISIONS:
        raise ValueError(f"measure: mode must be one of {MODES} and precision one of {tuple(PRECISIONS)}, "
                         f"got {mode!r}, {precision!r}")
    if cuda_graph and (mode != "training" or device.type != "cuda"):
        raise ValueError(f"measure: cuda_graph needs mode 'training' on a CUDA device, got {mode!r} on {device}")
    model = model.to(device)
    x = torch.randn(batch, in_chans, size, size, device=device)
    num_classes = getattr(model, "num_classes", 0)
    target = torch.randint(0, max(num_classes, 1), (batch,), device=device)
    model.train(mode == "training")
    if device.type == "cuda":
        # a graphed model measured before holds its graphs' memory pools in reference cycles (the callables that
        # replace its forward): collected here, not whenever Python's collector next runs, or the pools pile up
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if cuda_graph:
        # captured under the precision it will replay with; autocast's cast cache must be off while capturing
        with _autocast(device, precision, cache_enabled=False):
            model = torch.cuda.make_graphed_callables(model, (x,))

    def step() -> None:
        if mode == "inference":
            with torch.inference_mode(), _autocast(device, precision):
                model(x)
            return
        with _autocast(device, precision, cache_enabled=not cuda_graph):
            out = model(x)
            loss = F.cross_entropy(out.float(), target) if num_classes else out.float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    seconds = time.perf_counter() - start
    memory, kind = _peak_memory_gb(device)
    return Measurement(name, mode, precision, batch, size, iters * batch / seconds, memory, kind)


def run(names: Sequence[str], batch: int, size: int, device: torch.device, modes: Sequence[str] = MODES,
        precisions: Sequence[str] = DEFAULT_PRECISIONS, warmup: int = 50, iters: int = 30,
        cuda_graph: bool = False) -> list[Measurement]:
    """Measure every model (timm names, random weights: speed does not depend on them) in every setting.

    Args:
        names: timm model names.
        batch: Images per step.
        size: Image side in pixels.
        device: Where to run.
        modes: Subset of MODES.
        precisions: Keys of PRECISIONS.
        warmup: Untimed steps per setting.
        iters: Timed steps per setting.
        cuda_graph: Training as CUDA graphs (see `measure`), one freshly built model per precision.
    """
    import timm

    from .. import zoo  # noqa: F401  (registers the backbones and the zoo's pretrained tags with timm)

    results = []
    for name in names:
        model = timm.create_model(name)
        for mode in modes:
            for precision in precisions:
                graphed = cuda_graph and mode == "training"
                results.append(measure(timm.create_model(name) if graphed else model, name, mode, precision, batch,
                                       size, device, warmup, iters, cuda_graph=graphed))
    return results


def allow_tf32() -> None:
    """Let float32 matmuls and convolutions run on TF32 tensor cores, process-wide, as VMamba's throughput protocol
    does (its fp32 figures, and so every fp32 figure compared with them)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def throughput(models: list[str], batch: int = 128, size: int = 224, device: str = "auto",
               modes: Sequence[str] = MODES, precisions: Sequence[str] = DEFAULT_PRECISIONS, tf32: bool = False,
               warmup: int = 50, iters: int = 30, cuda_graph: bool = False) -> list[Measurement]:
    """Inference and training (forward + backward) images/s and peak memory (GB = 10^9 bytes) per precision, with
    VMamba's protocol (50 warm-up, 30 timed iterations); prints the device, the precision and the units.

    Args:
        models: timm model names, e.g. vmamba2d_tiny.
        batch: Images per step.
        size: Image side in pixels.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        modes: "inference" and/or "training".
        precisions: fp32 (float32), fp16 (float16 autocast: upstream's AMP figures), bf16 (bfloat16 autocast).
        tf32: Allow TF32 matmuls and convolutions in fp32 (VMamba's protocol runs with TF32 on).
        warmup: Untimed steps per setting.
        iters: Timed steps per setting.
        cuda_graph: Run training steps as CUDA graphs (CUDA only; see `measure`): the GPU's pace where the host
            falls behind. Inference stays eager.
    """
    unknown = sorted(set(modes) - set(MODES)) + sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        raise ValueError(f"throughput: unknown mode/precision {unknown}; modes {MODES}, precisions {tuple(PRECISIONS)}")
    resolved = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if tf32:
        allow_tf32()
    if cuda_graph and resolved.type != "cuda":
        raise ValueError(f"throughput: cuda_graph needs a CUDA device, got {resolved}")
    results = run(models, batch, size, resolved, modes, precisions, warmup, iters, cuda_graph)
    label = torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else "CPU"
    print(f"device: {label}; warm-up {warmup}, timed {iters} iterations"
          f"{'; training as CUDA graphs' if cuda_graph else ''}; precision: fp32 = float32 "
          f"(TF32 {'on' if tf32 else 'off'}), fp16 / bf16 = float16 / bfloat16 autocast; images/s = images per "
          "second; peak GB = 10^9 bytes")
    print(HEADER)
    for r in results:
        print(r.row())
    return results
