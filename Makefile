# The two commands of the README, and the targets behind them.
#   make demo   the main job: every strategy trained on 2 CPU Gloo workers, compared
#   make test   the whole test suite (CPU; GPU tests skip without a GPU)
# Both create .venv, install torch, pyowt (compiling its extension) and the extras first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MAX_JOBS ?= 2
export MAX_JOBS
# The dev/CI build compiles the CUDA sources for one architecture (it only has to prove they
# compile, and nvcc dominates the 2-core build): sm_90a, Hopper's own instruction set, so
# the conv's wgmma code is compiled and its SASS checked too; `pip install .` builds
# setup.py's default, sm_80 and sm_90a. Override: make test TORCH_CUDA_ARCH_LIST="8.0;9.0".
TORCH_CUDA_ARCH_LIST ?= 9.0a
export TORCH_CUDA_ARCH_LIST
# Builds are serialized: two builds into one tree would tear the extension.
LOCK := flock $(CURDIR)/build/.lock

CSRC := $(shell find csrc -type f 2>/dev/null) setup.py
STAMP := $(VENV)/.pyowt-installed

.PHONY: demo test build gpu-check bench bench-strategies clean

$(VENV)/.deps-installed:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	# torch first: the extension is compiled against it (no build isolation below).
	$(PIP) install --quiet torch torchvision
	$(PIP) install --quiet pybind11 ninja pytest pytest-benchmark pytest-timeout scikit-learn matplotlib
	touch $@

# Installs pyowt in editable mode, compiling the extension once; editing csrc/ or the
# packaging metadata reinstalls (a full compile). For quick incremental rebuilds while
# developing, use `make build`.
$(STAMP): $(VENV)/.deps-installed pyproject.toml $(CSRC)
	mkdir -p build
	$(LOCK) $(PIP) install --quiet --no-build-isolation -e '.[test]'
	touch $@

# Recompile the extension in place (incremental, ninja) after editing csrc/.
build: $(STAMP)
	mkdir -p build
	$(LOCK) $(PY) setup.py --quiet build_ext --inplace
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pyowt compare

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pytest benchmarks -q --benchmark-enable --benchmark-only

# Strategies vs the single process and DDP (torchvision AlexNet, 2 Gloo workers).
bench-strategies: $(STAMP)
	$(PY) -m benchmarks.strategies

# On a machine with an NVIDIA GPU, torch, Triton and ninja (no network needed):
#   make gpu-check OUT=<folder>
OUT ?= results/gpu
gpu-check:
	bash benchmarks/gpu_check.sh $(OUT)

clean:
	rm -rf build pyowt/_C*.so pyowt/_build_info.json
