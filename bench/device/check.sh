#!/usr/bin/env bash
# The GPU check: one command for a machine with an NVIDIA GPU and no network.
#   bash bench/device/check.sh [OUT_DIR]      (default: $OUT, else bench/out/device)
# Builds the package from this working tree with what the machine has (pip
# --no-build-isolation --no-deps; wheels carried in .whl/ are installed first),
# runs the test suite (CUDA tests included), then the GPU benchmarks. Carry the
# CUTLASS headers as a wheel (the build needs them and that machine has no network):
#   python3 -m pip download --no-deps -d .whl nvidia-cutlass==4.2.0.0   (then carry ".whl")
# Logs,
# nvidia-smi output and JSON land in OUT_DIR. MOEPP_CHECK_STEPS picks steps
# (default "build test bench"; a first try on a new machine: "build test";
# add "sanitize" for compute-sanitizer's memcheck over the CUDA tests of the router,
# plan, FFN pointwise ops and combine, and racecheck over those of the router, plan and
# combine; add "tune" to measure the Triton tile configs, a few minutes more).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT_DIR=${1:-${OUT:-$ROOT/bench/out/device}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
STEPS=${MOEPP_CHECK_STEPS:-build test bench}
SITE=${MOEPP_SITE:-/tmp/moepp-site}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} MOEPP_CUDA=${MOEPP_CUDA:-1} MOEPP_CUDA_ARCHS=${MOEPP_CUDA_ARCHS:-90a}
# The CUTLASS families the build must have produced (a test fails otherwise, rather than the
# CUTLASS tests skipping when the headers were not found): 90a;80 -> 90,80.
MOEPP_EXPECT_CUTLASS=${MOEPP_EXPECT_CUTLASS:-$(tr ';' '\n' <<< "$MOEPP_CUDA_ARCHS" | sed 's/a$//' |
  grep -xE '90|80' | sort -u | paste -sd, -)}
export MOEPP_EXPECT_CUTLASS
exec > >(tee -a "$OUT_DIR/check.log") 2>&1
step() { echo "=== [$(date -u +%FT%TZ)] $*"; }
failed=""

step "environment"
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed"
nvidia-smi -q -d CLOCK,POWER,TEMPERATURE,PERFORMANCE >> "$OUT_DIR/nvidia-smi.txt" 2>&1
python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU VISIBLE')"
echo "commit $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
git -C "$ROOT" status --short 2>/dev/null | head -20

if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
  step "carried wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$ROOT"/.whl/*.whl || failed+=" wheels"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"  # the build finds cutlass_library here

if [[ $STEPS == *build* ]]; then
  step "build (MAX_JOBS=$MAX_JOBS, MOEPP_CUDA_ARCHS=$MOEPP_CUDA_ARCHS)"
  if ! python3 -m pip install --no-build-isolation --no-deps --no-index --upgrade --target "$SITE" "$ROOT"; then
    step "build FAILED"
    exit 1
  fi
fi
cd "$OUT_DIR"  # import the built package, never the source tree (it has no _C)

if [[ $STEPS == *test* ]]; then
  step "tests"
  python3 -m pytest "$ROOT/tests" -q -ra -p no:cacheprovider --junitxml="$OUT_DIR/tests.xml" || failed+=" tests"
fi

if [[ $STEPS == *sanitize* ]]; then
  # torch's caching allocator would hide accesses past a tensor inside its pool: off here.
  sanitize() {  # tool, then test files
    local tool=$1; shift
    step "compute-sanitizer --tool $tool"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
      python3 -m pytest "$@" -q -p no:cacheprovider -k cuda > "$OUT_DIR/sanitize_$tool.txt" 2>&1
    local rc=$?
    tail -n 30 "$OUT_DIR/sanitize_$tool.txt"
    [[ $rc -eq 0 ]] || failed+=" sanitize-$tool"
  }
  sanitize memcheck "$ROOT/tests/test_router.py" "$ROOT/tests/test_plan.py" "$ROOT/tests/test_expert_ops.py"
  sanitize racecheck "$ROOT/tests/test_router.py" "$ROOT/tests/test_plan.py" "$ROOT/tests/test_expert_ops.py" \
    -k "cuda and (router or plan or combine)"
fi

if [[ $STEPS == *bench* ]]; then
  step "GPU benchmarks"
  python3 -m pytest "$ROOT/bench" -q -p no:cacheprovider -o python_files='bench_*.py' -o python_functions='bench_*' \
    -k cuda --benchmark-enable --benchmark-json="$OUT_DIR/benchmark.json" --moepp-summary="$OUT_DIR/summary.json" \
    || failed+=" bench"
  if [[ -f $OUT_DIR/summary.json ]]; then
    step "report"
    python3 "$ROOT/bench/report.py" "$OUT_DIR" || failed+=" report"
  else
    step "no benchmark results (no GPU visible?)"
    failed+=" bench"
  fi
fi

if [[ $STEPS == *tune* ]]; then
  step "Triton tile configs"
  python3 "$ROOT/bench/tune_triton.py" > "$OUT_DIR/triton_configs.txt" || failed+=" tune"
fi

step "done${failed:+ (failed:$failed)}"
[[ -z $failed ]]
