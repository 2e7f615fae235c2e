#!/usr/bin/env bash
# The GPU check of attnfast: build, smoke test, CUDA C++ and Triton parity, benchmark, within a
# hard time budget, always writing OUT/summary.json (the steps are in bench/gpu_check.py).
#
#   bash bench/gpu_check.sh OUT                        on a machine with an NVIDIA GPU
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh OUT    the same steps on a CPU machine (CI runs it)
#
# Needs python3 with torch, triton, pytest, setuptools and ninja installed; downloads nothing.
# Environment: PYTHON (default python3), GPU_CHECK_SECONDS (total budget, default 540),
# MAX_JOBS (compile jobs, default the core count).
# Exit status: 0 when every step passed, 1 when a test failed, the build failed, or a test step ran
# out of its time share, 2 for bad arguments.
set -uo pipefail
OUT=${1:-bench/results/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)   # absolute: the steps run from the repository root
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
exec "${PYTHON:-python3}" bench/gpu_check.py "$OUT"
