"""Compiling and launching the NVRTC kernels of cuda_ops/ through CuPy (the scan's and the layer norm's).

CuPy is imported lazily, on the first CUDA call (never at import or model construction). A kernel takes one struct
by value (cuda_ops/scan2d_params.cuh), mirrored here by a `ctypes.Structure` with the same named fields and filled by
name. A launch goes through CuPy's binding of the driver's `cuLaunchKernel`, on PyTorch's current stream of the
tensors' device: CuPy's own `RawKernel.__call__` converts every argument to a CuPy scalar object first, host time
that would count against the shortest kernels. Those two private entry points (CuPy's driver binding, PyTorch's raw
stream getter) are each reached through one guarded function here.
"""

from __future__ import annotations

import ctypes
import operator
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
    """Whether CuPy imports here (tried once; never at import of this module)."""
    return _import_cupy() is not None


def require_cupy():
    """The cupy module, or a RuntimeError naming the extra to install."""
    cupy = _import_cupy()
    if cupy is None:
        raise RuntimeError(
            "selective_scan_2d(backend='cuda') needs CuPy, which could not be imported "
            f"({type(_cupy_error).__name__}: {_cupy_error}). Install the extra for your CUDA version: {INSTALL_HINT}"
        )
    return cupy


def device_index(device: torch.device) -> int:
    """The CUDA ordinal of `device` (the current device where it has none).

    Args:
        device: A CUDA device.
    """
    return device.index if device.index is not None else torch.cuda.current_device()


def compiled_kernels(cache: dict, key: tuple, index: int, source: str, names: Callable[[], Sequence[str]],
                     options: tuple[str, ...] = cuda_build.COMPILE_OPTIONS) -> tuple:
    """The kernels `names()` of cuda_ops/`source` on device `index`, compiled by NVRTC once per `key` of `cache`
    (CuPy caches the binaries on disk).

    Args:
        cache: The caller's memo of compiled kernels, key -> functions.
        key: What identifies this compilation in `cache` (device, variant, options).
        index: The CUDA ordinal to compile for.
        source: A kernel source file of cuda_ops/ (`cuda_build.kernel_source` splices its includes).
        names: Returns the kernels' name expressions; called only on a cache miss.
        options: NVRTC's compile options.

    Returns:
        The CuPy functions, in the order of `names()`.
    """
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


# ----------------------------------------------------------------------------------------------------------------
# Kernel parameters: ctypes mirrors of the structs in cuda_ops/scan2d_params.cuh (same fields, same order).

_PTR, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class ScanParams(ctypes.Structure):
    """`M2DScanParams`: the parameters of the four scan kernels (see scan2d_params.cuh for each field)."""

    _fields_ = [
        *((name, _PTR) for name in (
            "u", "delta", "z", "dout", "Bm", "Cm", "A", "Dv", "dbias", "dirs",
            "y", "ckv", "ckh", "dck", "tops", "ck", "bot", "du", "ddelta", "dz", "dBp", "dCp", "dAp", "dDp", "dbp")),
        *((name, _I64) for name in (
            "su_b", "su_d", "sd_b", "sd_d", "sz_b", "sz_d", "so_b", "so_d", "sB_b", "sB_g", "sC_b", "sC_g", "su_g",
            "so_g", "nmaps", "dir_codes")),
        *((name, _I32) for name in (
            "dim", "H", "W", "G", "N", "softplus",
            "su_h", "su_w", "sd_h", "sd_w", "sz_h", "sz_w", "so_h", "so_w", "sB_n", "sB_h", "sB_w", "sC_n", "sC_h",
            "sC_w", "S", "WPM", "CH", "ntiles", "nbands", "NP", "vec", "keep_tops", "ck_chunks", "dir_period",
            "u_period", "o_period")),
    ]


class LayerNormParams(ctypes.Structure):
    """`M2DLayerNormParams`: the parameters of the layer-norm forward (see scan2d_params.cuh)."""

    _fields_ = [
        *((name, _PTR) for name in ("x", "weight", "bias", "y", "mean_out", "rstd_out", "dev_low", "branch", "scale",
                                    "x_out")),
        ("rows", _I64),
        ("rows_per_sample", _I64),
        ("C", _I32),
        ("eps", _F32),
    ]


class LayerNormBwdParams(ctypes.Structure):
    """`M2DLayerNormBwdParams`: the parameters of the layer-norm backward (see scan2d_params.cuh)."""

    _fields_ = [
        *((name, _PTR) for name in ("x", "dy", "weight", "mean", "rstd", "dx", "dw_part", "db_part", "dres",
                                    "dbranch", "scale")),
        ("rows", _I64),
        ("rows_per_sample", _I64),
        ("C", _I32),
    ]


class SwapParams(ctypes.Structure):
    """`M2DSwapParams`: the parameters of the layout copy (see scan2d_params.cuh)."""

    _fields_ = [
        *((name, _PTR) for name in ("src", "dst")),
        *((name, _I64) for name in ("batch", "rows", "mid", "cols", "dst_batch")),
    ]


class GroupSumParams(ctypes.Structure):
    """`M2DGroupSumParams`: the parameters of the groups' sum written channels_last (see scan2d_params.cuh)."""

    _fields_ = [
        *((name, _PTR) for name in ("src", "dst")),
        *((name, _I64) for name in ("batch", "channels", "pixels")),
    ]


class SiluParams(ctypes.Structure):
    """`M2DSiluParams`: the parameters of the SiLU in both layouts, forward and backward (see scan2d_params.cuh)."""

    _fields_ = [
        *((name, _PTR) for name in ("x", "y", "u", "dy", "du", "dx")),
        *((name, _I64) for name in ("batch", "pixels", "channels")),
    ]


#: The C struct each ctypes mirror stands for.
PARAM_STRUCTS = {"M2DScanParams": ScanParams, "M2DLayerNormParams": LayerNormParams,
                 "M2DLayerNormBwdParams": LayerNormBwdParams, "M2DSwapParams": SwapParams,
                 "M2DGroupSumParams": GroupSumParams, "M2DSiluParams": SiluParams}

_STRUCT_CODES = {_PTR: "P", _I64: "q", _I32: "i", _F32: "f"}
_layouts: dict[type, tuple] = {}


def struct_layout(kind: type[ctypes.Structure]) -> struct.Struct:
    """The `struct` module's native layout of `kind`'s fields in order (equal to ctypes' own: both follow the C
    compiler's natural alignment); packing into it range-checks every value in C.

    Args:
        kind: A parameter struct (`ScanParams` or `LayerNormParams`).
    """
    return _layout(kind)[0]


def _layout(kind: type[ctypes.Structure]) -> tuple:
    """(packing layout, every field zero by name, a getter of the fields' values in order, indices of the pointer
    fields) of `kind`."""
    entry = _layouts.get(kind)
    if entry is None:
        names = tuple(name for name, _ in kind._fields_)
        fmt = "@" + "".join(_STRUCT_CODES[ctype] for _, ctype in kind._fields_)
        pointers = tuple(i for i, (_, ctype) in enumerate(kind._fields_) if ctype is _PTR)
        entry = _layouts[kind] = (struct.Struct(fmt), dict.fromkeys(names, 0), operator.itemgetter(*names), pointers)
    return entry


def make_params(kind: type[ctypes.Structure], **values) -> ctypes.Structure:
    """A `kind` struct with the named fields set (a tensor as its device address, None as null) and every other
    field zero.

    Args:
        kind: The parameter struct (`ScanParams` or `LayerNormParams`).
        **values: Field name -> value: an int or float, a tensor (its device address) or None (null) for a pointer
            field, or an int address.

    Raises:
        TypeError: a name that is not a field of `kind`.
        OverflowError: a value out of its field's C range (ctypes alone would silently wrap it around).
    """
    layout, zeros, in_order, pointers = _layout(kind)
    merged = zeros | values
    if len(merged) != len(zeros):
        raise TypeError(f"{kind.__name__} has no field {', '.join(sorted(values.keys() - zeros.keys()))}")
    ordered = list(in_order(merged))
    for i in pointers:  # a tensor as its address, None as null
        value = ordered[i]
        ordered[i] = 0 if value is None else (value if type(value) is int else value.data_ptr())
    params = kind()
    try:
        layout.pack_into(params, 0, *ordered)
    except struct.error as exc:
        for (name, ctype), value in zip(kind._fields_, ordered):
            try:
                struct.pack("@" + _STRUCT_CODES[ctype], value)
            except struct.error:
                raise OverflowError(f"{kind.__name__}.{name} = {value!r} does not fit its C type "
                                    f"{ctype.__name__}") from exc
        raise
    return params


def stride_fields(*tensors: tuple[str, torch.Tensor | None, str]) -> dict[str, int]:
    """The stride fields of (prefix, tensor, names) triples: `prefix`_`name` for each letter of `names` (e.g.
    ("su", u, "bdhw") gives su_b, su_d, su_h, su_w), zeros for a None tensor.

    Args:
        *tensors: (prefix, tensor or None, one letter per dimension of the tensor) triples.
    """
    keys = _stride_keys.get(tuple((prefix, names) for prefix, _, names in tensors))
    if keys is None:
        keys = _stride_keys[tuple((prefix, names) for prefix, _, names in tensors)] = tuple(
            f"{prefix}_{name}" for prefix, _, names in tensors for name in names)
    strides = ()
    for _, t, names in tensors:
        strides += (0,) * len(names) if t is None else t.stride()
    return dict(zip(keys, strides))


_stride_keys: dict[tuple, tuple[str, ...]] = {}


# ----------------------------------------------------------------------------------------------------------------
# Private APIs of CuPy and PyTorch, each reached through one guarded function.

#: The attributes of CuPy's low-level bindings the launcher calls: cupy_backends.cuda.api.driver.launchKernel (the
#: driver's cuLaunchKernel) and cupy_backends.cuda.api.runtime.getDevice / setDevice.
CUPY_DRIVER_ATTRS = ("launchKernel",)
CUPY_RUNTIME_ATTRS = ("getDevice", "setDevice")
#: PyTorch's raw stream getter: the handle of a device's current stream without building a Stream object.
TORCH_RAW_STREAM_ATTR = "_cuda_getCurrentRawStream"


def check_private_api(module, attrs: Sequence[str], what: str, version: str) -> None:
    """Raise a RuntimeError naming `what` (a package at `version`) when `module` lacks any of `attrs`.

    Args:
        module: The module holding the private entry points.
        attrs: The attribute names the launcher calls.
        what: The package the module belongs to (e.g. "cupy").
        version: The installed version of that package.
    """
    missing = [name for name in attrs if not hasattr(module, name)]
    if missing:
        raise RuntimeError(
            f"mamba2d's CUDA launcher needs {module.__name__}.{', '.join(missing)} of {what}, which this installed "
            f"version ({version}) does not have; install a {what} version that has it (see pyproject.toml)"
        )


_api = None  # (driver, runtime) of cupy_backends, imported and checked by the first launch


def cupy_driver_api():
    """CuPy's bindings (driver, runtime) of the CUDA driver and runtime APIs, checked to have what the launcher
    calls."""
    global _api
    if _api is None:
        cupy = require_cupy()
        from cupy_backends.cuda.api import driver, runtime

        check_private_api(driver, CUPY_DRIVER_ATTRS, "cupy", cupy.__version__)
        check_private_api(runtime, CUPY_RUNTIME_ATTRS, "cupy", cupy.__version__)
        _api = driver, runtime
    return _api


_raw_stream = None


def current_raw_stream(index: int) -> int:
    """The handle of PyTorch's current stream of device `index`: torch._C's raw getter, which skips building a
    torch.cuda.Stream object per launch (Triton's launcher reads it the same way).

    Args:
        index: The CUDA ordinal.
    """
    global _raw_stream
    if _raw_stream is None:
        check_private_api(torch._C, (TORCH_RAW_STREAM_ATTR,), "torch", torch.__version__)
        _raw_stream = getattr(torch._C, TORCH_RAW_STREAM_ATTR)
    return _raw_stream(index)


# ----------------------------------------------------------------------------------------------------------------
# Launch

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


def launch_kernel(fn, device: torch.device, blocks: tuple[int, int], threads: int, smem: int,
                  params: ctypes.Structure) -> None:
    """Launch CuPy kernel `fn` with its parameter struct `params` on a (blocks[0], blocks[1]) grid of
    `threads`-thread blocks with `smem` bytes of dynamic shared memory, on PyTorch's current stream of `device`.

    Args:
        fn: A CuPy kernel function (`compiled_kernels`).
        device: The tensors' CUDA device.
        blocks: Grid (x, y) in blocks.
        threads: Threads per block.
        smem: Bytes of dynamic shared memory per block.
        params: The kernel's parameter struct (`make_params`).
    """
    driver, runtime = cupy_driver_api()
    index = device_index(device)
    previous = runtime.getDevice()
    # Always set, even where already the current device: that also makes the device's primary context current for
    # the driver call on a thread that has none yet (autograd's backward threads start without one).
    runtime.setDevice(index)
    try:
        ptr = _function_pointer(fn, index, smem)
        # kernelParams: one pointer per kernel parameter, here the one struct (the driver copies it at launch)
        kernel_params = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        driver.launchKernel(ptr, blocks[0], blocks[1], 1, threads, 1, 1, smem, current_raw_stream(index),
                            ctypes.addressof(kernel_params), 0)
    finally:
        if previous != index:
            runtime.setDevice(previous)
