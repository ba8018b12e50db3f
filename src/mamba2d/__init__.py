"""mamba2d: 2DMamba as software: the 2D selective scan, 2DVMamba backbones, Lightning tasks and tools."""

from importlib.metadata import PackageNotFoundError, version

from . import models, zoo  # noqa: F401  (register the backbones and the zoo's pretrained tags with timm)

try:
    __version__ = version("mamba2d")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"
