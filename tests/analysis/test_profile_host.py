"""The host-time tools: tools/profile_host.py's groups sort real cProfile entries by where they live, and it refuses
to run off a GPU; tools/bench_latency.py times each configuration in a process of its own."""

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


def test_bench_latency_runs_each_configuration_in_a_process_of_its_own(monkeypatch, capsys):
    """tools/bench_latency.py hands every (batch, precision) to a fresh process of itself, with the shared settings,
    and prints the card's header once (the children print their line only)."""
    tool = load_tool("bench_latency")
    calls = []
    monkeypatch.setattr(tool.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tool.torch.cuda, "get_device_name", lambda *args: "a card")
    monkeypatch.setattr(tool.subprocess, "run", lambda command, check: calls.append(command))
    assert tool.main(["vmamba2d_tiny", "--training", "--batches", "4", "128", "--precisions", "fp32", "fp16",
                      "--iters", "7"]) == 0
    assert [(c[c.index("--batches") + 1], c[c.index("--precisions") + 1]) for c in calls] == [
        ("4", "fp32"), ("4", "fp16"), ("128", "fp32"), ("128", "fp16")]
    assert all(c[1].endswith("bench_latency.py") and c[2] == "vmamba2d_tiny" and "--no-header" in c
               and "--training" in c and "--iters=7" in c for c in calls)
    assert capsys.readouterr().out.count("card: a card") == 1


def test_bench_latency_times_synchronised_and_back_to_back_calls(monkeypatch):
    """latency_ms gives (wall, host) of a synchronised call and (host, wall) per call back to back, run here on the
    CPU (the synchronise a no-op): a training step leaves no gradient behind, as the throughput protocol."""
    import timm

    import mamba2d  # noqa: F401  (registers the models)

    tool = load_tool("bench_latency")
    monkeypatch.setattr(tool.torch.cuda, "synchronize", lambda: None)
    model = timm.create_model("vmamba2d_nano", scan_backend="reference").train()
    times = tool.latency_ms(model, torch.randn(1, 3, 32, 32), "fp32", True, 1, 2)
    assert len(times) == 4 and all(t > 0 for t in times)
    wall, host, host_b2b, wall_b2b = times
    assert host <= wall and host_b2b <= wall_b2b
    assert all(p.grad is None for p in model.parameters())
