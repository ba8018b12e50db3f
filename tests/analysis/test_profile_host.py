"""tools/profile_host.py: its groups sort real cProfile entries by where they live, and it refuses to run off a
GPU."""

from __future__ import annotations

import cProfile
import pstats

import torch
from repo_tools import load_tool

from mamba2d.ops.reference import selective_scan_2d_ref


def test_groups_of_a_profiled_scan():
    tool = load_tool("profile_host")
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 2, 3, 5, generator=g)
    B = torch.randn(1, 1, 1, 3, 5, generator=g)
    profiler = cProfile.Profile()
    profiler.enable()
    selective_scan_2d_ref(u, u.clone(), -torch.ones(2, 1), B, B.clone())
    profiler.disable()
    groups = {}
    for file, _, name in pstats.Stats(profiler).stats:
        groups.setdefault(tool.entry_group(file, name), set()).add(name)
    assert "selective_scan_2d_ref" in groups["mamba2d (our Python)"]
    assert any("exp" in name for name in groups["torch C++ entry points (ops)"])
    assert "CuPy" not in groups
    assert tool.entry_group("~", "<built-in method launchKernel>") == "CuPy"
    assert tool.entry_group("/usr/lib/python3.11/enum.py", "__call__") == "other"


def test_refuses_without_a_gpu():
    if not torch.cuda.is_available():
        assert load_tool("profile_host").main(["--scan", "b"]) == 2
