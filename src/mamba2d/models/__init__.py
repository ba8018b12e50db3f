from . import vmamba  # noqa: F401
