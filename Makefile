# make bench : set up (venv, torch, this package) then run the benchmarks
# make test  : set up then run ruff and the whole test suite
# Knobs: TORCH (pip requirement for torch, default: the newest the index allows),
#        PYTHON (interpreter for the venv), BENCH_OUT, BENCH_ARGS (e.g. --quick),
#        MAX_JOBS, MOEPP_CUDA, MOEPP_CUDA_ARCHS (see README).
SHELL := /bin/bash
PYTHON ?= python3
TORCH ?= torch
BENCH_OUT ?= bench/out
BENCH_ARGS ?=

ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := $(CURDIR)/.venv
endif
BIN := $(VENV)/bin

.PHONY: setup test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pip's default build isolation: the build sees only pyproject's build requirements (no torch).
setup: $(BIN)/python
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install ".[test,bench]"

lint: setup
	$(BIN)/ruff check .

# pytest exits 5 when it collected nothing: that is a failure here, said plainly.
test: lint
	@set +e; $(BIN)/pytest tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: setup
	@mkdir -p $(BENCH_OUT)
	@set +e; $(BIN)/pytest bench -o python_files='bench_*.py' -o python_functions='bench_*' --benchmark-enable \
		--benchmark-json=$(BENCH_OUT)/benchmark.json --moepp-summary=$(BENCH_OUT)/summary.json $(BENCH_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "make bench: no benchmarks collected" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf build *.egg-info $(BENCH_OUT)
