"""tools/bench_depthwise_conv.py: its maps are vmamba2d_tiny's SS2D convolutions, and it refuses to run off a GPU."""

from __future__ import annotations

import torch
from repo_tools import load_tool

from mamba2d.models.vmamba import MODEL_SIZES


def test_maps_are_the_tiny_models_convolutions():
    tool = load_tool("bench_depthwise_conv")
    tiny = MODEL_SIZES["tiny"]
    expected = tuple((128, tiny["dims"] * 2**i, 56 // 2**i, depth) for i, depth in enumerate(tiny["depths"]))
    assert tool.SHAPES == expected
    if not torch.cuda.is_available():
        assert tool.main([]) == 2
