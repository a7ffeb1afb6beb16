# make bench : set up (venv, torch, this package) then run the benchmarks
# make test  : set up then run ruff and the whole test suite
# make test-sanitize : the CPU suite on a CPU-only build under ASan + UBSan (CI runs it too)
# Knobs: TORCH (pip requirement for torch, default: the newest the index allows),
#        PYTHON (interpreter for the venv), BENCH_OUT (default bench/results/<device>),
#        BENCH_ARGS (e.g. --quick),
#        MAX_JOBS, MOEPP_CUDA, MOEPP_CUDA_ARCHS (see README).
SHELL := /bin/bash
PYTHON ?= python3
TORCH ?= torch
BENCH_OUT ?=
BENCH_ARGS ?=

ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := $(CURDIR)/.venv
endif
BIN := $(VENV)/bin

.PHONY: setup test test-sanitize bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Installed once per torch requirement and source state (a stamp in the venv), so make test
# followed by make bench builds once.
SOURCES := $(shell git ls-files csrc moepp_kernels setup.py pyproject.toml CMakeLists.txt 2>/dev/null)
STAMP := $(VENV)/.moepp-installed-$(shell printf '%s' "$(TORCH) $(MOEPP_CUDA) $(MOEPP_CUDA_ARCHS)" | cksum | cut -d' ' -f1)

# pip's default build isolation: the build sees only pyproject's build requirements (no torch).
$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install ".[test,bench]"
	@touch $@

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check .

# pytest exits 5 when it collected nothing: that is a failure here, said plainly.
test: lint
	@set +e; $(BIN)/pytest tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The package again, CPU-only and instrumented with ASan + UBSan (its own build directory), into
# a directory of its own, its CPU experts' bf16 pairs route emulating AVX512-BF16 (so that the
# route's tests run on every AVX-512 CPU, not only on those with the instruction); the CPU suite
# then runs on it with the sanitizer runtimes preloaded
# (python itself is not instrumented). Any report aborts the run. Leaks are not checked: the
# interpreter keeps its own allocations to exit. The kernel-resource gate compiles CUDA sources
# and needs no module, so it runs only in `make test`.
SANITIZE_SITE := $(CURDIR)/build/sanitize-site
SANITIZE_RUNTIMES = $(shell gcc -print-file-name=libasan.so):$(shell gcc -print-file-name=libubsan.so)
test-sanitize: setup
	rm -rf $(SANITIZE_SITE)
	MOEPP_CUDA=0 MOEPP_SANITIZE=address,undefined MOEPP_EMULATE_BF16_PAIRS=1 $(BIN)/python -m pip install -q --no-deps --target $(SANITIZE_SITE) .
	@set +e; MOEPP_EXPECT_CUTLASS= ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
		UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		LD_PRELOAD="$(SANITIZE_RUNTIMES)" PYTHONPATH=$(SANITIZE_SITE) \
		$(BIN)/pytest tests -q -p no:cacheprovider --ignore=tests/test_kernel_resources.py; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-sanitize: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# Results go to bench/results/<device-name>/ (BENCH_OUT overrides): pytest-benchmark's JSON,
# summary.json (side-by-side ratios and telemetry), report.md and speedup_vs_tau.png.
bench: setup
	@set +e; out="$(BENCH_OUT)"; [ -n "$$out" ] || out="bench/results/$$($(BIN)/python bench/report.py --device-name)"; \
	mkdir -p "$$out"; \
	$(BIN)/pytest bench -o python_files='bench_*.py' -o python_functions='bench_*' --benchmark-enable \
		--benchmark-json="$$out/benchmark.json" --moepp-summary="$$out/summary.json" $(BENCH_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "make bench: no benchmarks collected" >&2; exit 1; fi; \
	[ $$rc -eq 0 ] || exit $$rc; $(BIN)/python bench/report.py "$$out"

clean:
	rm -rf build *.egg-info $(BENCH_OUT)
