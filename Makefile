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

.PHONY: venv ext test test-fast demo demo-compare bench bench-msda cuda-compile-check clean

venv: $(STAMP)

# torch/torchvision are installed first and explicitly: the CPU-only torch 2.13.0 wheel on local
# disk cannot host any torchvision build that timm needs (see README, "Stack").
# The project is installed without build isolation so the optional C++/CUDA extension builds
# against the venv's torch instead of downloading a second copy into a throwaway build env.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" "setuptools>=68" wheel
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q --no-build-isolation -e ".[test,export]"
	touch $(STAMP)

# The MSDeformAttn extension (dino_core._C), rebuilt in place when csrc/ or setup.py is newer than it.
# A failed compile only warns (the PyTorch reference is then used); DINO_BUILD_EXT=0 skips it.
EXT_SOURCES := setup.py csrc/build.py $(wildcard csrc/*.h csrc/*.cpp csrc/*.cu)
ext: venv
	@so=$$(ls dino_core/_C*.so 2>/dev/null | head -n1); \
	if [ -n "$$so" ] && [ -z "$$(find $(EXT_SOURCES) -newer "$$so")" ]; then echo "dino_core._C is up to date"; \
	else $(PY) setup.py -q build_ext --inplace; fi

test: venv ext
	$(PY) -m pytest -m "not gpu" --durations=30 $(PYTEST_ARGS)

test-fast: venv ext
	$(PY) -m pytest -m "not gpu and not slow" $(PYTEST_ARGS)

demo: venv
	$(PY) pipelines/o365_pretrain_coco_ft.py --preset smoke

# the same fine-tune from the backbone's initialisation instead of the Objects365 class-map
# transfer; after `make demo` only finetune..predict re-run, and the registry keeps the better model
demo-compare: venv
	$(PY) pipelines/o365_pretrain_coco_ft.py --preset smoke --set stages.finetune.init=null

bench: venv
	$(PY) benchmarks/bench_model.py

bench-msda: ext
	$(PY) benchmarks/bench_msda.py --device cpu $(BENCH_ARGS)

# Compiles the CUDA build of csrc/ into a temporary directory and imports it; needs no GPU.
# nvcc and CCCL come from the package index, matching torch's CUDA 13.0, into their own folder.
CUDA_TOOLKIT := $(VENV)/cuda-toolkit
CUDA_CHECK_HOME := $(CURDIR)/$(CUDA_TOOLKIT)/nvidia/cu13
cuda-compile-check: venv
	test -x $(CUDA_CHECK_HOME)/bin/nvcc || $(PIP) install -q --target $(CUDA_TOOLKIT) "cuda-toolkit[nvcc,cccl]==13.0.3"
	ln -sf libcudart.so.13 $(CUDA_CHECK_HOME)/lib/libcudart.so
	CUDA_HOME=$(CUDA_CHECK_HOME) MAX_JOBS=2 \
		$(PY) csrc/cuda_compile_check.py

clean:
	rm -rf build *.egg-info .pytest_cache dino_core/_C*.so
