# mamba2d: `make demo` installs everything and trains 2DVMamba-nano on real digits (CPU, ~2 min);
# `make test` installs everything and runs the test suite (GPU tests skip without CUDA).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build to install; on the project's machines these files lie on disk.
TORCH ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= dev,wsi,dense
DEMO_CONFIG := configs/classification/digits_vmamba2d_nano.yaml

.PHONY: install demo test test-fast gpu-test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e ".[$(EXTRAS)]"
	touch $@

demo: install
	$(BIN)/mamba2d fit --config $(DEMO_CONFIG)
	$(BIN)/mamba2d test --config $(DEMO_CONFIG) \
		--ckpt_path "$$(ls -td runs/digits_vmamba2d_nano/version_*/ | head -n 1)checkpoints/best.ckpt"

test: install
	$(BIN)/python -m pytest -m "not gpu" -p no:cacheprovider --durations=15

test-fast: install
	$(BIN)/python -m pytest -m "not gpu and not slow" -p no:cacheprovider

lint: install
	$(BIN)/ruff check src tests tools

gpu-test: install
	$(BIN)/python -m pytest -m gpu

clean:
	rm -rf runs build dist src/*.egg-info
