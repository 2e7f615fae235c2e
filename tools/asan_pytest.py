"""pytest for tools/asan_test.sh, with a check that the run tests the sanitized build.

attnfast.ops turns a failed import of attnfast._C into "extension not built" and the tests would
then skip, and another attnfast (the in-place build, the editable install) could shadow the
sanitized one: so before any test, attnfast._C must be loaded from $ATTNFAST_ASAN_LIB and the
sanitizer runtimes must be in the process, or the run stops with an error.
"""
import os
import sys

import pytest


def pytest_sessionstart(session):
    from attnfast import ops

    if not ops.loaded():
        raise pytest.UsageError(f"attnfast._C did not load: {ops.load_error()}")
    want = os.path.realpath(os.environ["ATTNFAST_ASAN_LIB"]) + os.sep
    got = os.path.realpath(ops._C.__file__)
    if not got.startswith(want):
        raise pytest.UsageError(f"attnfast._C is {got}, not the sanitized build under {want}")
    with open("/proc/self/maps") as f:
        maps = f.read()
    missing = [lib for lib in ("libasan", "libubsan") if lib not in maps]
    if missing:
        raise pytest.UsageError(f"sanitizer runtime not loaded: {', '.join(missing)}")
    print(f"asan: testing {got}", flush=True)


if __name__ == "__main__":
    sys.exit(pytest.main(sys.argv[1:], plugins=[sys.modules[__name__]]))
