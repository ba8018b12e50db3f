"""LightningModules, one per task. Models know nothing of Lightning; tasks know nothing of CUDA."""
