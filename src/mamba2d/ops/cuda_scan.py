"""CUDA backend of the 2D selective scan (CuPy + NVRTC). Placeholder until the CUDA issue lands."""

from __future__ import annotations


def is_available() -> bool:
    return False


def selective_scan_2d_cuda(*args, **kwargs):
    raise RuntimeError("selective_scan_2d: the CUDA backend is not built yet; use backend='reference'")
