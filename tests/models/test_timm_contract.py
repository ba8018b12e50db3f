"""timm's generic model checks over every registered `vmamba*` model: pretrained cfg, head, features, intermediates."""

from __future__ import annotations

import pytest
import timm
import torch

import mamba2d  # noqa: F401  (registers the backbones)

MODELS = timm.list_models("vmamba*")


def test_every_size_and_scan_is_registered():
    assert MODELS == sorted(f"{arch}_{size}" for arch in ("vmamba", "vmamba2d")
                            for size in ("base", "nano", "small", "tiny"))


@pytest.mark.parametrize("name", MODELS)
def test_timm_model_contract(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.0).eval()
    cfg = model.pretrained_cfg
    for key in ("input_size", "mean", "std", "first_conv", "classifier", "num_classes"):
        assert key in cfg, key
    modules = dict(model.named_modules())
    assert cfg["first_conv"] in modules and cfg["classifier"] in modules
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        final, stages = model.forward_intermediates(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert features.shape == (2, model.num_features, 2, 3) and pooled.shape == (2, model.num_features)
    torch.testing.assert_close(final, features)
    assert [s.shape[1] for s in stages] == [info["num_chs"] for info in model.feature_info]
    assert [64 // s.shape[2] for s in stages] == [info["reduction"] for info in model.feature_info]
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", ["vmamba2d_nano", "vmamba_nano", "vmamba2d_tiny"])
def test_features_only_contract(name):
    model = timm.create_model(name, features_only=True, out_indices=(1, 2, 3)).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == model.feature_info.channels()
    assert [64 // m.shape[-1] for m in maps] == model.feature_info.reduction() == [8, 16, 32]
