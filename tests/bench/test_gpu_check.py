"""The GPU check (bench/gpu_check.sh -> bench/gpu_check.py): its dry run on this CPU machine, and the
parts that must work the first time on a GPU machine (time budget, test counts, CUDA_HOME)."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnfast.bench import gpu_check

REPO_ROOT = Path(__file__).resolve().parents[2]
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")


@needs_bash
def test_script_syntax():
    script = REPO_ROOT / "bench" / "gpu_check.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "bench/gpu_check.py" in script.read_text()


@needs_bash
@pytest.mark.skipif(not __import__("attnfast").backends()["triton"].available, reason="triton is not installed")
def test_dry_run_reports_every_step(tmp_path):
    """GPU_CHECK_DRY_RUN=1: every step of the GPU run on CPU, the same summary.json, exit 0."""
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable)
    for var in ("TRITON_INTERPRET", "ATTNFAST_BACKEND", "GPU_CHECK_SECONDS"):
        env.pop(var, None)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert {"steps", "tests", "bench", "versions", "gpu"} <= s.keys()
    steps = {st["name"]: st for st in s["steps"]}
    assert {"versions", "build", "smoke", "cuda parity", "triton parity", "bench"} <= steps.keys(), steps
    assert all(st["status"] == "ok" and st["seconds"] >= 0 for st in s["steps"]), s["steps"]
    for name in ("smoke", "cuda parity", "triton parity"):
        assert steps[name]["passed"] > 0 and steps[name]["failed"] == 0, steps[name]
    assert s["tests"]["failed"] == 0 and s["tests"]["passed"] == sum(steps[n]["passed"] for n in steps
                                                                      if "passed" in steps[n])
    assert s["bench"] and all(r["status"] == "ok" and r["ms"] > 0 for r in s["bench"]), s["bench"]
    assert s["versions"]["torch"] and s["backends"]["cpu"]["available"]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_kernels.json", "gpu_kernels.md", "log.txt", "summary.json"], files


def _check(tmp_path, budget):
    return gpu_check.Check(tmp_path, budget, dry=True)


def test_a_step_is_killed_at_its_share_and_the_summary_kept(tmp_path):
    c = _check(tmp_path, budget=60)
    t = time.monotonic()
    status, secs, rc = c.run("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"], cap=6)
    c.record("sleeper", status, secs)
    assert status == "timeout" and rc is None and time.monotonic() - t < 30
    assert json.loads((tmp_path / "summary.json").read_text())["steps"][0]["status"] == "timeout"


def test_a_step_without_time_left_is_skipped_and_a_skipped_test_step_fails(tmp_path):
    c = _check(tmp_path, budget=20)
    status, _, _ = c.run("late", [sys.executable, "-c", "pass"], cap=100, later=15)
    assert status == "skipped" and not c.failed
    assert c.pytest("late tests", ["tests/api/test_smoke_backends.py"], cap=100, later=15) == "skipped"
    step = json.loads((tmp_path / "summary.json").read_text())["steps"][-1]
    assert step["name"] == "late tests" and step["status"] == "skipped" and c.failed


def test_failing_tests_are_counted_and_fail_the_check(tmp_path):
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_x.py").write_text("def test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2\n")
    c = _check(tmp_path, budget=120)
    assert c.pytest("demo", [str(tests / "test_x.py")], cap=100) == "failed"
    assert c.summary["tests"] == dict(passed=1, failed=1, skipped=0)
    assert c.failed and json.loads((tmp_path / "summary.json").read_text())["exit_status"] == 1
    assert not list(tmp_path.glob(".junit-*"))


def test_counts_from_the_log_when_a_step_is_cut_short(tmp_path):
    c = _check(tmp_path, budget=10)
    c.log.write_text("collected 4 items\n"
                     "tests/a.py::test_one[x] PASSED                  [ 25%]\n"
                     "[gw1] [ 50%] PASSED tests/a.py::test_two\n"
                     "tests/a.py::test_three FAILED                    [ 75%]\n"
                     "[gw0] [100%] SKIPPED tests/a.py::test_four\n"
                     "FAILED tests/a.py::test_three - assert 1 == 2\n")   # the -rfE recap: not counted again
    assert c.log_counts(0) == dict(passed=2, failed=1, skipped=1)


def test_find_cuda_home_skips_a_wrapper_without_headers(tmp_path, monkeypatch):
    wrapper, real = tmp_path / "wrapper", tmp_path / "toolkit"
    for d in (wrapper / "bin", real / "bin", real / "include"):
        d.mkdir(parents=True)
    (real / "include" / "cuda_runtime.h").write_text("")
    (real / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (real / "bin" / "nvcc").chmod(0o755)
    (wrapper / "bin" / "nvcc").symlink_to(real / "bin" / "nvcc")
    monkeypatch.setenv("CUDA_HOME", str(wrapper))      # set, but without include/
    monkeypatch.setenv("PATH", f"{wrapper / 'bin'}:{os.environ['PATH']}")
    home, why = gpu_check.find_cuda_home()
    assert home == str(real) and why is None


def test_find_cuda_home_prefers_the_toolkit_of_torchs_cuda(tmp_path, monkeypatch):
    homes = {}
    for ver in ("12.4", "13.0"):
        home = tmp_path / f"cuda-{ver}"
        (home / "bin").mkdir(parents=True)
        (home / "include").mkdir()
        (home / "include" / "cuda_runtime.h").write_text("")
        (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
        (home / "bin" / "nvcc").chmod(0o755)
        (home / "version.json").write_text(json.dumps({"cuda": {"version": f"{ver}.1"}}))
        homes[ver] = str(home)
    monkeypatch.setenv("CUDA_HOME", homes["12.4"])                # found first, but CUDA 12
    monkeypatch.setenv("PATH", f"{homes['13.0']}/bin:{os.environ['PATH']}")
    assert gpu_check.find_cuda_home("13.0") == (homes["13.0"], None)
    assert gpu_check.find_cuda_home("12.4") == (homes["12.4"], None)
    assert gpu_check.find_cuda_home(None) == (homes["12.4"], None)  # no preference: the first found


def test_a_missing_program_fails_the_step_not_the_check(tmp_path):
    c = _check(tmp_path, budget=60)
    status, _, rc = c.run("ghost", [str(tmp_path / "no-such-program")], cap=30)
    assert status == "failed" and rc is None and c.failed
