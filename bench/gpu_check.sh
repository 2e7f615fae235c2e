#!/usr/bin/env bash
# GPU check of attnfast: build, GPU tests, GPU benchmark (the gpu_kernels table of bench/kernels.py,
# through `python -m attnfast bench gpu_kernels`).
#
#   bash bench/gpu_check.sh [OUT_DIR]        (default OUT_DIR: bench/results/gpu)
#
# For a machine with an NVIDIA GPU and a CUDA build of torch, where triton, pytest,
# setuptools and ninja are already installed: nothing is downloaded.
# Writes OUT_DIR/{build,info,harness,tests,bench}.txt and the benchmark's gpu_kernels.{json,md}.
#
# Environment:
#   PYTHON                      interpreter (default python3)
#   MAX_JOBS                    parallel compile jobs (default: number of cores)
#   GPU_CHECK_SECONDS           time budget of the whole script (default 470 s, under 8 minutes)
#   ATTNFAST_GPU_BENCH_SECONDS  benchmark deadline (default 330 s; lowered to fit the budget)
#   HARNESS_SM                  SM version the CUDA harness is built for (default 90)
#
# Test failures do not stop the script; their exit codes are printed at the end.
# Exit status: non-zero when the build failed, else 0.
set -euo pipefail

OUT=${1:-bench/results/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)                      # absolute, so the cd below does not move it
cd "$(dirname "${BASH_SOURCE[0]}")/.."       # repository root

PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_SECONDS:-470}
TEST_SECONDS=150
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1

SUMMARY=()
RC=0

# step NAME SECONDS LOG CMD...: run CMD under `timeout`, tee'd to LOG; sets RC, adds a summary line.
step() {
    local name=$1 secs=$2 log=$3 t0=$SECONDS note=""
    shift 3
    echo "=== $name (timeout ${secs} s): $*" | tee -a "$log"
    set +e
    timeout -k 10 "$secs" "$@" 2>&1 | tee -a "$log"
    RC=${PIPESTATUS[0]}
    set -e
    if [[ $RC -eq 124 || $RC -eq 137 ]]; then note=" (timed out)"; fi
    echo "=== $name: exit code $RC$note after $((SECONDS - t0)) s" | tee -a "$log"
    SUMMARY+=("$(printf '%-26s exit %3s  %4s s%s' "$name" "$RC" "$((SECONDS - t0))" "$note")")
}

summary() {
    echo
    echo "=== summary (total $SECONDS s, budget $BUDGET s; results in $OUT)"
    printf '  %s\n' "${SUMMARY[@]}"
    echo "  (pytest exit 5 = no tests collected)"
}

: >"$OUT/build.txt"
: >"$OUT/tests.txt"
: >"$OUT/bench.txt"

# (a) build: editable install (maps attnfast.bench to bench/), compiles attnfast._C (CPU, and CUDA when
#     nvcc and csrc/cuda/*.cu are there)
step "build (pip install -e .)" 300 "$OUT/build.txt" \
    "$PY" -m pip install --no-build-isolation --no-deps -e .
if [[ $RC -ne 0 ]]; then
    echo "BUILD FAILED (see $OUT/build.txt); skipping the tests and the benchmark"
    summary
    exit 1
fi

# (b) versions, GPU, backends
: >"$OUT/info.txt"
step "info" 60 "$OUT/info.txt" "$PY" -m attnfast info

# (b2) the CUDA C++ kernels alone: the standalone harness (nvcc only) against its CPU reference, then its timing
: >"$OUT/harness.txt"
mkdir -p build
step "harness build" 180 "$OUT/harness.txt" nvcc -O3 -std=c++17 \
    "-gencode=arch=compute_${HARNESS_SM:-90},code=sm_${HARNESS_SM:-90}" -Icsrc/cuda \
    csrc/cuda/tools/harness.cu csrc/cuda/flash_fwd.cu csrc/cuda/flash_bwd.cu -o build/attnfast_harness
if [[ $RC -eq 0 ]]; then
    step "harness (parity)" 120 "$OUT/harness.txt" build/attnfast_harness
    step "harness --bench" 60 "$OUT/harness.txt" build/attnfast_harness --bench
fi

# (c) GPU tests (Triton and CUDA C++ backends), then the Triton parity tests (on CUDA tensors when a GPU is present); 150 s for both
tests_end=$((SECONDS + TEST_SECONDS))
step "tests: -m gpu" "$TEST_SECONDS" "$OUT/tests.txt" "$PY" -m pytest -q -m gpu tests
GPU_TESTS_RC=$RC
left=$((tests_end - SECONDS))
if ((left < 30)); then left=30; fi
step "tests: parity triton" "$left" "$OUT/tests.txt" "$PY" -m pytest -q tests/triton/test_triton_parity.py
PARITY_RC=$RC

# (d) benchmark: its own deadline, lowered so that the script stays within the budget
bench_s=${ATTNFAST_GPU_BENCH_SECONDS:-330}
bench_s=${bench_s%.*}
left=$((BUDGET - SECONDS - 45))
if ((left < bench_s)); then bench_s=$left; fi
if ((bench_s < 30)); then bench_s=30; fi
export ATTNFAST_GPU_BENCH_SECONDS=$bench_s
echo "benchmark deadline: $bench_s s" | tee -a "$OUT/bench.txt"
step "bench gpu_kernels" $((bench_s + 45)) "$OUT/bench.txt" "$PY" -m attnfast bench gpu_kernels --out "$OUT"
BENCH_RC=$RC

summary
echo "  tests: -m gpu exit $GPU_TESTS_RC, parity triton exit $PARITY_RC; bench exit $BENCH_RC"
exit 0
