"""The private timm APIs mamba2d relies on (mamba2d.compat) still exist and do what we use them for."""

from __future__ import annotations

import sys

import pytest
import timm
import torch
from timm.models import PretrainedCfg, build_model_with_cfg, register_model

from mamba2d import compat


def test_feature_take_indices():
    assert compat.feature_take_indices(4, None) == ([0, 1, 2, 3], 3)
    assert compat.feature_take_indices(4, 2) == ([2, 3], 3)
    assert compat.feature_take_indices(4, [0, -1]) == ([0, 3], 3)


class _Tiny(torch.nn.Module):
    def __init__(self, num_classes: int = 1000, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.fc = torch.nn.Linear(2, num_classes)


def compat_test_tiny(pretrained: bool = False, **kwargs):
    return build_model_with_cfg(_Tiny, "compat_test_tiny", pretrained, **kwargs)


def test_register_timm_pretrained_makes_tags_timm_sees(tmp_path):
    sys.modules[__name__].default_cfgs = {}
    register_model(compat_test_tiny)
    weights = _Tiny(num_classes=3).state_dict()
    torch.save(weights, tmp_path / "tiny.pth")
    cfgs = [PretrainedCfg(tag="first", file=str(tmp_path / "tiny.pth"), num_classes=3, classifier="fc"),
            PretrainedCfg(tag="second", url="https://example.org/never-downloaded.pth", num_classes=5)]
    compat.register_timm_pretrained("compat_test_tiny", cfgs)
    assert timm.list_pretrained("compat_test_tiny*") == ["compat_test_tiny.first", "compat_test_tiny.second"]
    assert timm.models.get_pretrained_cfg("compat_test_tiny").tag == "first"  # the first tag is the default
    model = timm.create_model("compat_test_tiny", pretrained=True)
    torch.testing.assert_close(model.fc.weight, weights["fc.weight"])
    compat.register_timm_pretrained("compat_test_tiny", cfgs[1:])  # replaces the tags
    assert timm.list_pretrained("compat_test_tiny*") == ["compat_test_tiny.second"]
    with pytest.raises(ValueError, match="not a registered timm model"):
        compat.register_timm_pretrained("no_such_model", cfgs)


def test_lightning_rng_states_round_trip_and_a_missing_api_names_the_version():
    import random

    from mamba2d.compat import _private, collect_rng_states, set_rng_states

    states = collect_rng_states()
    first = (random.random(), torch.rand(1).item())
    set_rng_states(states)
    assert (random.random(), torch.rand(1).item()) == first
    with pytest.raises(ImportError, match=r"lightning\.fabric\.utilities\.seed\._gone.*tested with lightning 2\.6"):
        _private("lightning.fabric.utilities.seed", "_gone")


def test_plain_module_call_sees_every_kind_of_hook_and_compile():
    module = torch.nn.Linear(2, 2)
    assert compat.plain_module_call(module)
    registrations = [
        lambda: module.register_forward_hook(lambda *args: None),
        lambda: module.register_forward_pre_hook(lambda *args: None),
        lambda: module.register_full_backward_hook(lambda *args: None),
        lambda: module.register_full_backward_pre_hook(lambda *args: None),
        lambda: torch.nn.modules.module.register_module_forward_hook(lambda *args: None),
        lambda: torch.nn.modules.module.register_module_forward_pre_hook(lambda *args: None),
        lambda: torch.nn.modules.module.register_module_full_backward_hook(lambda *args: None),
        lambda: torch.nn.modules.module.register_module_full_backward_pre_hook(lambda *args: None),
    ]
    for register in registrations:
        handle = register()
        assert not compat.plain_module_call(module)
        handle.remove()
        assert compat.plain_module_call(module)
    module.compile()
    assert not compat.plain_module_call(module)
