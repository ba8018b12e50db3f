"""Model-zoo manifest and small checkpoints (shipped as package data)."""
