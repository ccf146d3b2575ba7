# Two commands for a newcomer: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.pairuni-installed
# torch is pinned and installed first, alone, so no other package can pull a different build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test bench setup cuda-build lint clean wheels gpu-session-dry-run

setup: $(STAMP)

$(STAMP): setup.py $(wildcard csrc/*.cpp csrc/*.cu csrc/*.cuh csrc/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel ninja
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[dev,train,test-integrations]"
	touch $(STAMP)

# A demo run replaces the previous demo's files (only once its first step has succeeded).
demo: $(STAMP)
	$(BIN)/pairuni train train.on_existing=overwrite

# verl's own source (no dependencies: verl pins another transformers and pulls ray), so the verl drop-in's tests
# compare with verl's core_algos.py itself, not only with our re-statements of it
VERL_VERSION ?= 0.9.1
VERL_SRC     := $(VENV)/verl-$(VERL_VERSION)
$(VERL_SRC)/.done: | $(STAMP)
	rm -rf $(VERL_SRC) && $(BIN)/python -m pip install -q --no-deps --target $(VERL_SRC) verl==$(VERL_VERSION)
	touch $@

test: $(STAMP) cuda-build $(VERL_SRC)/.done
	PAIRUNI_VERL_SOURCE=$(abspath $(VERL_SRC)) $(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# The GPU user's install, proven without a GPU: in a venv outside the checkout (reused between runs) with
# the GPU machine's versions (csrc/check/gpu_machine.txt), FORCE_CUDA=1 pip install of this package for
# sm_80 and sm_90, then the import, the CPU and CUDA kernels of pairuni::cfg_sample, the sampler tests,
# the Triton 3.6 compile check and the GPU session's dry run. Skipped in one line without nvcc.
cuda-build:
	$(PYTHON) csrc/check/cuda_build.py

# bitsandbytes (and TRL) for the GPU machine (no network there; Python 3.12, x86-64): carried as wheels/, git-ignored.
# Pinned: the GPU session installs the one wheel it finds (its needs, torch, numpy, packaging, are there).
BNB_VERSION ?= 0.50.2
wheels:
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		-d wheels bitsandbytes==$(BNB_VERSION)
	# TRL 1.16 (pure Python) for the GPU session's side-by-side benchmark against TRL's fused head
	$(BIN)/python -m pip download -q --no-deps -d wheels trl==1.16.0

gpu-session-dry-run: $(STAMP)
	$(BIN)/python benchmarks/gpu_session.py --dry-run --work /tmp/pairuni_session_dry --out /tmp/pairuni_out_dry

lint: $(STAMP)
	$(BIN)/ruff check pairuni_kernels engine tests benchmarks studies

clean:
	rm -rf build *.egg-info pairuni_kernels/_C*.so .pytest_cache
