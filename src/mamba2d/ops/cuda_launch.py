"""Compiling and launching the NVRTC kernels of cuda_ops/ through CuPy (the scan's and the layer norm's).

CuPy is imported lazily, on the first CUDA call (never at import or model construction). A launch packs its
arguments into one buffer (`KernelArgs`) and goes through CuPy's binding of the driver's `cuLaunchKernel`, on
PyTorch's current stream of the tensors' device. CuPy's own `RawKernel.__call__` converts every argument to a CuPy
scalar object first: with the scan kernels' 50-70 arguments that took 35-90 us of host time per launch on the
device machine, more than some of the kernels themselves (bench shape b's forward runs 0.23 ms).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Sequence

import torch

from . import cuda_build

INSTALL_HINT = "pip install 'mamba2d[cuda12]' (CUDA 12) or 'mamba2d[cuda13]' (CUDA 13)"

_cupy = None
_cupy_error: BaseException | None = None
compile_lock = threading.Lock()


def _import_cupy():
    global _cupy, _cupy_error
    if _cupy is None and _cupy_error is None:
        try:
            import cupy

            _cupy = cupy
        except Exception as exc:  # ImportError, or CuPy failing to find its CUDA libraries
            _cupy_error = exc
    return _cupy


@torch.compiler.assume_constant_result
def cupy_importable() -> bool:
    return _import_cupy() is not None


def require_cupy():
    cupy = _import_cupy()
    if cupy is None:
        raise RuntimeError(
            "selective_scan_2d(backend='cuda') needs CuPy, which could not be imported "
            f"({type(_cupy_error).__name__}: {_cupy_error}). Install the extra for your CUDA version: {INSTALL_HINT}"
        )
    return cupy


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def compiled_kernels(cache: dict, key: tuple, index: int, source: str, names: Callable[[], Sequence[str]],
                     options: tuple[str, ...] = cuda_build.COMPILE_OPTIONS) -> tuple:
    """The kernels `names()` of cuda_ops/`source` on device `index`, compiled by NVRTC once per `key` of `cache`
    (CuPy caches the binaries on disk)."""
    fns = cache.get(key)
    if fns is None:
        cupy = require_cupy()
        with compile_lock:
            fns = cache.get(key)
            if fns is None:
                wanted = list(names())
                with cupy.cuda.Device(index):
                    module = cupy.RawModule(code=cuda_build.kernel_source(source), options=options,
                                            name_expressions=wanted)
                    fns = tuple(module.get_function(name) for name in wanted)
                cache[key] = fns
    return fns


class KernelArgs:
    """A kernel's arguments in declaration order, each with its C type: device pointers (a tensor's address, 0 for
    None), 64- and 32-bit integers and floats, for cuLaunchKernel's `kernelParams` (one pointer per argument)."""

    __slots__ = ("_codes", "_values")

    def __init__(self) -> None:
        self._codes: list[str] = []
        self._values: list = []

    def pointers(self, *tensors: torch.Tensor | None) -> None:
        self._codes.append("Q" * len(tensors))
        self._values += [0 if t is None else t.data_ptr() for t in tensors]

    def int32(self, *values: int) -> None:
        self._codes.append("i" * len(values))
        self._values += values

    def int64(self, *values: int) -> None:
        self._codes.append("q" * len(values))
        self._values += values

    def float32(self, *values: float) -> None:
        self._codes.append("f" * len(values))
        self._values += values

    def strides(self, t: torch.Tensor | None, ndim: int) -> None:
        """Stride arguments of a tensor: the leading two (batch, channel/group) 64-bit, the in-map ones 32-bit."""
        self._codes.append(_STRIDE_CODES[ndim])
        self._values += (0,) * ndim if t is None else t.stride()

    @property
    def format(self) -> str:
        return "".join(self._codes)

    def packed(self) -> tuple[object, int]:
        """(buffer, address of kernelParams): the values packed with natural alignment into this thread's buffer
        for this argument list, and the address of the array of pointers to each one. Valid until the thread packs
        the same list again (the driver copies the values at launch). An integer out of its C type's range raises
        struct.error instead of wrapping around."""
        fmt = self.format
        buffers = _buffers.__dict__
        entry = buffers.get(fmt)
        if entry is None:
            entry = buffers[fmt] = _argument_buffer(fmt)
        entry[0].pack_into(entry[1], 0, *self._values)
        return entry[1], entry[3]


_STRIDE_CODES = {ndim: "qq" + "i" * (ndim - 2) for ndim in (2, 3, 4, 5, 6)}
_buffers = threading.local()  # argument format -> (Struct, buffer, its pointer array, that array's address)


def _argument_buffer(fmt: str) -> tuple:
    """A buffer for arguments `fmt` (struct's native '@' layout: natural alignment) and the array of pointers to
    each argument in it."""
    import ctypes

    layout = struct.Struct("@" + fmt)
    buffer = (ctypes.c_char * max(layout.size, 1))()
    base = ctypes.addressof(buffer)
    offsets = [struct.calcsize("@" + fmt[: i + 1]) - struct.calcsize(code) for i, code in enumerate(fmt)]
    params = (ctypes.c_void_p * max(len(fmt), 1))(*(base + offset for offset in offsets))
    return layout, buffer, params, ctypes.addressof(params)


_functions: dict[tuple[int, int], tuple[int, int]] = {}  # (device, id(kernel)) -> (CUfunction, smem limit set)


def _function_pointer(fn, index: int, smem: int) -> int:
    """The CUfunction of CuPy kernel `fn` on device `index` (current), its dynamic shared memory limit raised to
    `smem` bytes first where that is over the default 48 KB."""
    key = (index, id(fn))
    entry = _functions.get(key)
    if entry is None or entry[1] < smem:
        limit = max(smem, entry[1] if entry else 0)
        if limit > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = limit
        entry = _functions[key] = (fn.kernel.ptr, limit)
    return entry[0]


def _current_stream(index: int) -> int:
    # PyTorch's raw handle getter takes ~0.3 us where torch.cuda.current_stream(...).cuda_stream builds a Stream
    # object (~6 us per launch); Triton's launcher reads it the same way.
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(index) if raw is not None else torch.cuda.current_stream(index).cuda_stream


_api = None  # (driver, runtime) of cupy_backends, imported by the first launch


def _cuda_api():
    global _api
    if _api is None:
        require_cupy()
        from cupy_backends.cuda.api import driver, runtime

        _api = driver, runtime
    return _api


def launch_kernel(fn, device: torch.device, blocks: tuple[int, int], threads: int, smem: int,
                  args: KernelArgs) -> None:
    """Launch CuPy kernel `fn` on a (blocks[0], blocks[1]) grid of `threads`-thread blocks with `smem` bytes of
    dynamic shared memory, on PyTorch's current stream of `device`."""
    driver, runtime = _cuda_api()
    index = device_index(device)
    previous = runtime.getDevice()
    # Always set, even where already the current device: that also makes the device's primary context current for
    # the driver call on a thread that has none yet (autograd's backward threads start without one).
    runtime.setDevice(index)
    try:
        ptr = _function_pointer(fn, index, smem)
        _, params = args.packed()
        driver.launchKernel(ptr, blocks[0], blocks[1], 1, threads, 1, 1, smem, _current_stream(index), params, 0)
    finally:
        if previous != index:
            runtime.setDevice(previous)
