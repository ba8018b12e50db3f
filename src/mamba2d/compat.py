"""The private parts of timm, Lightning and torch.nn that mamba2d relies on, each wrapped once here, with a check that
they are still there.

A release that moves one of them fails here, at first use, with a message naming the version we were tested with,
instead of deep inside a model or a checkpoint. `pyproject.toml` bounds timm and Lightning to the releases tested.
(The CUDA launcher's private CuPy and torch calls are guarded the same way in `mamba2d.ops.cuda_launch`.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from importlib import import_module
from typing import Any

import timm
import torch
from timm.models import DefaultCfg, PretrainedCfg

__all__ = ["LIGHTNING_TESTED", "TIMM_TESTED", "TORCH_TESTED", "collect_rng_states", "feature_take_indices",
           "plain_module_call", "register_timm_pretrained", "set_rng_states"]

#: The timm releases whose private APIs below were checked (tests/test_compat.py checks them again).
TIMM_TESTED = "1.0"
#: The Lightning release whose private RNG-state helpers below were checked.
LIGHTNING_TESTED = "2.6"
#: The torch release whose nn.Module hook registries below were checked.
TORCH_TESTED = "2.14"


def _private(module: str, name: str) -> Any:
    package = module.split(".")[0]
    try:
        return getattr(import_module(module), name)
    except (ImportError, AttributeError) as exc:
        tested = {"timm": TIMM_TESTED, "torch": TORCH_TESTED}.get(package, LIGHTNING_TESTED)
        version = getattr(import_module(package), "__version__", "?")
        raise ImportError(f"mamba2d needs {module}.{name}, which {package} {version} lacks; mamba2d was tested "
                          f"with {package} {tested}.x (see the bounds in pyproject.toml)") from exc


def collect_rng_states() -> dict[str, Any]:
    """Lightning's `_collect_rng_states(include_cuda=True)`: the Python, NumPy, torch and CUDA RNG states."""
    return _private("lightning.fabric.utilities.seed", "_collect_rng_states")(include_cuda=True)


def set_rng_states(states: dict[str, Any]) -> None:
    """Lightning's `_set_rng_states`: restore what `collect_rng_states` returned.

    Args:
        states: The states, as `collect_rng_states` returns them.
    """
    _private("lightning.fabric.utilities.seed", "_set_rng_states")(states)


def feature_take_indices(num_features: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's `feature_take_indices`: which stages `forward_intermediates` returns, and the last one needed.

    Args:
        num_features: Number of stages.
        indices: None (all), an int (the last n) or explicit indices (negative counted from the end).
    """
    return _private("timm.models._features", "feature_take_indices")(num_features, indices)


def register_timm_pretrained(arch: str, cfgs: Sequence[PretrainedCfg]) -> None:
    """Make `cfgs` the pretrained tags of the registered model `arch`, the first one its default.

    What `timm.models.register_model` does with a module's `default_cfgs`, for tags known only after the model was
    registered (the zoo's manifest): afterwards `timm.list_pretrained()` lists `arch.tag` for each cfg and
    `timm.create_model(arch[.tag], pretrained=True)` loads from the cfg's source. Replaces the arch's earlier tags.

    Args:
        arch: A registered model name.
        cfgs: Pretrained cfgs with distinct non-empty `tag`s and a weight source (`file`, `url`, ...).
    """
    tables = [_private("timm.models._registry", name) for name in (
        "_model_pretrained_cfgs", "_model_has_pretrained", "_model_with_tags", "_model_default_cfgs")]
    pretrained_cfgs, has_pretrained, with_tags, default_cfgs = tables
    if not timm.is_model(arch):
        raise ValueError(f"register_timm_pretrained: {arch!r} is not a registered timm model")
    for name in with_tags.pop(arch, []):
        pretrained_cfgs.pop(name, None)
        has_pretrained.discard(name)
    has_pretrained.discard(arch)
    for index, cfg in enumerate(cfgs):
        cfg = replace(cfg, architecture=arch)
        name = f"{arch}.{cfg.tag}"
        pretrained_cfgs[name] = cfg
        with_tags[arch].append(name)
        if cfg.has_weights:
            has_pretrained.add(name)
        if index == 0:
            pretrained_cfgs[arch] = cfg
            if cfg.has_weights:
                has_pretrained.add(arch)
    default_cfgs[arch] = DefaultCfg(tags=deque(cfg.tag for cfg in cfgs), cfgs={cfg.tag: cfg for cfg in cfgs})


#: nn.Module's hook registries, per module and global: where any is non-empty, calling a module runs more than its
#: forward (torch.nn.Module._call_impl's own test for its fast path).
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _module_hook_registries() -> tuple:
    """The global registries themselves (dicts that registering mutates in place), looked up once, and a check that
    a module has its own; at import, so that torch.compile traces `plain_module_call` without an import inside."""
    registries = tuple(_private("torch.nn.modules.module", name) for name in _GLOBAL_HOOKS)
    missing = [name for name in (*_MODULE_HOOKS, "_compiled_call_impl") if not hasattr(torch.nn.Module(), name)]
    if missing:
        raise ImportError(f"mamba2d needs torch.nn.Module.{', '.join(missing)}, which torch {torch.__version__} "
                          f"lacks; mamba2d was tested with torch {TORCH_TESTED}.x")
    return registries


_GLOBAL_HOOK_REGISTRIES = _module_hook_registries()


def plain_module_call(module: torch.nn.Module) -> bool:
    """Whether calling `module` runs its forward and nothing else: no hook of its own or global (forward, forward
    pre-, backward or backward pre-hooks) and no `module.compile()`. A caller may then run the module's computation
    another way (a method of its own) without anyone missing a call.

    Args:
        module: The module.
    """
    if any(_GLOBAL_HOOK_REGISTRIES) or any(getattr(module, name) for name in _MODULE_HOOKS):
        return False
    return module._compiled_call_impl is None
