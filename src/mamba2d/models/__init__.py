from . import vmamba  # noqa: F401
from .normalization import input_normalization

__all__ = ["input_normalization"]
