# dino-platform — the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export AWS_EC2_METADATA_DISABLED := true
export PYTHONUNBUFFERED := 1

.PHONY: venv test test-fast demo bench cuda-compile-check clean

venv: $(STAMP)

# torch/torchvision are installed first and explicitly: the CPU-only torch 2.13.0 wheel on local
# disk cannot host any torchvision build that timm needs (see README, "Stack").
# The project is installed without build isolation so the optional C++/CUDA extension builds
# against the venv's torch instead of downloading a second copy into a throwaway build env.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" "setuptools>=68" wheel
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

test: venv
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not gpu and not slow" $(PYTEST_ARGS)

demo: venv
	$(PY) pipelines/o365_pretrain_coco_ft.py --preset smoke

bench: venv
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf build *.egg-info .pytest_cache
