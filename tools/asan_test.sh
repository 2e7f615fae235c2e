#!/usr/bin/env bash
# attnfast._C built with AddressSanitizer + UndefinedBehaviorSanitizer into build/asan/, then the
# CPU tests run against that build.  The in-place build (attnfast/_C*.so, used by `make test`) and
# its objects are left alone: the sanitized one has its own build-temp and build-lib.
#   tools/asan_test.sh [PYTHON] [pytest options...]
#   ASAN_TESTS="tests/x.py ..." runs those instead of the default selection (below).
# Any sanitizer report ends its pytest process with a non-zero status, so the script fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
shift || true
OUT=build/asan

# CPU only: the tests under it are CPU tests, and the CUDA runtime would need more ASan options.
ATTNFAST_SANITIZE=1 ATTNFAST_NO_CUDA=1 "$PY" setup.py -q build_ext \
    --build-temp "$OUT/temp" --build-lib "$OUT/lib"

# build-lib holds attnfast/_C*.so; link the Python sources next to it so that this folder is a
# complete attnfast package (relinked each run: files may have come or gone).
pkg=$OUT/lib/attnfast
find "$pkg" -maxdepth 1 -type l -delete
for f in attnfast/*; do
    case $f in attnfast/_C*.so | attnfast/__pycache__) continue ;; esac
    ln -s "$PWD/$f" "$pkg/"
done
ln -s "$PWD/triton_kernels" "$pkg/triton_kernels"  # setup.py's package_dir mapping

# Python is not instrumented, so the ASan runtime must be loaded before everything else (else ASan
# refuses to start); the UBSan one is preloaded too so both runtimes come from the same compiler.
CXX=${CXX:-c++}
asan=$("$CXX" -print-file-name=libasan.so)
ubsan=$("$CXX" -print-file-name=libubsan.so)
[[ -f $asan && -f $ubsan ]] || { echo "asan_test: $CXX has no libasan/libubsan" >&2; exit 2; }
export LD_PRELOAD="$asan $ubsan${LD_PRELOAD:+ $LD_PRELOAD}"
# detect_leaks=0: CPython and torch keep objects alive until exit by design; LeakSanitizer
#   would report those, not leaks of the extension.
export ASAN_OPTIONS=detect_leaks=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}
# halt_on_error: the first undefined behaviour ends the run (with -fno-sanitize-recover it would
#   anyway); print_stacktrace: say where it happened.
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}
export PYTHONPATH=$PWD/$OUT/lib ATTNFAST_ASAN_LIB=$PWD/$OUT/lib

# Run as a script, not `-m pytest`: sys.path[0] is then tools/, not the working directory (whose
# attnfast/ is the normal build); asan_pytest.py checks that the sanitized _C is the one loaded.
# --capture=sys: pytest's default captures file descriptor 2 into a temporary file, and a report
# written there by a process that the sanitizer then ends would be lost.
run() { "$PY" tools/asan_pytest.py -q -p no:cacheprovider --capture=sys "$@"; }

if [[ -n ${ASAN_TESTS:-} ]]; then
    read -ra tests <<<"$ASAN_TESTS"
    run "${tests[@]}" "$@"
    exit
fi

# The tests that reach the C++ kernels, in two processes side by side: most of their time is
# single-threaded Python and reference maths.  The parity sweep is one, the rest the other.
rest=(tests/api/test_errors.py tests/api/test_fast_path.py tests/api/test_varlen.py tests/api/test_kvcache.py
      tests/cpu/test_cpu_ops.py tests/variants/test_variants.py)
[[ -f tests/api/test_fuzz.py ]] && rest+=(tests/api/test_fuzz.py)
run tests/cpu/test_cpu_parity.py "$@" >"$OUT/parity.log" 2>&1 &
parity=$!
run "${rest[@]}" "$@" >"$OUT/rest.log" 2>&1 &
rest_pid=$!
trap 'kill "$parity" "$rest_pid" 2>/dev/null || true' EXIT  # an interrupted run leaves none behind
status=0
wait "$parity" || status=1
wait "$rest_pid" || status=1
trap - EXIT
for log in parity rest; do
    echo "=== $OUT/$log.log"
    cat "$OUT/$log.log"
done
exit $status
