"""The `mamba2d` command: one front door over training (LightningCLI) and the tools."""

from .lightning import main

__all__ = ["main"]
