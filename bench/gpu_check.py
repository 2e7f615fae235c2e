#!/usr/bin/env python3
"""The GPU check: one command that builds, tests and benchmarks attnfast on a GPU machine and always
reports, within a hard time budget.  Run through `bash bench/gpu_check.sh OUT`.

Steps, in order of value (each one gets a share of what is left of the budget and is killed at the
end of it; OUT/summary.json is rewritten after every step, so it is there even when the whole
command is killed from outside):

  versions       python, torch (and its CUDA), triton, numpy, nvcc; the GPU's name and SM count
  install        the editable install of the Python package, only where it is missing
  build          attnfast._C with the CUDA C++ kernels (CUDA_HOME resolved to a toolkit that has
                 include/cuda_runtime.h); if that fails, again without them
  harness        the CUDA C++ kernels' standalone harness (nvcc only), only when the build above
                 had to drop them
  smoke          one small forward + backward of every backend against the reference
  cuda parity    the CUDA C++ backend's parity tests
  triton parity  the Triton backend's parity tests, autotuning off (the first config of each table)
  bench          `python -m attnfast bench gpu_kernels`: the headline cases first (bf16, D 128 and
                 64, L 1k-16k, causal or not, fwd and fwd+bwd, against torch's flash, cuDNN and
                 efficient SDPA), then the rest of the plan until its deadline

OUT/summary.json: {steps: [{name, status, seconds, ...}], tests: {passed, failed, skipped},
bench: [rows of gpu_kernels.json], versions, gpu, backends, budget_s, mode}.  OUT also holds log.txt
(every step's output) and the benchmark's gpu_kernels.{json,md}.

GPU_CHECK_DRY_RUN=1 runs the same steps on a CPU machine: the Triton kernels under the
interpreter, the CUDA C++ kernels' arithmetic through their emulator, the benchmark's interpreter
smoke test; CI runs it so that this script cannot rot.

Exit status: 0 when every step that ran passed; 1 when a test failed, the build failed without a
fallback, or a test step was cut short by its time share; 2 for bad arguments.

Environment: GPU_CHECK_SECONDS (budget, default 540), GPU_CHECK_DRY_RUN, PYTHON (the interpreter
of the steps, default this one), MAX_JOBS (compile jobs, default the core count).
"""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET = 540
END_RESERVE = 10          # seconds kept for the summary after the last step

# Test selections.  GPU: the -m gpu tests on CUDA tensors at real sizes.  Dry run: the same
# kernels on CPU (interpreter, emulator), a few cases each so that CI pays about a minute.
SMOKE_TESTS = ["tests/api/test_smoke_backends.py"]
CUDA_GPU = ["tests/cuda/test_gpu.py", "-k", "cuda_cpp or (varlen and not triton)"]
TRITON_GPU = ["tests/cuda/test_gpu.py", "tests/triton/test_triton_parity.py", "-k",
              "not cuda_cpp and not (varlen and not triton)"]
CUDA_DRY = ["tests/cuda/test_cuda_emu.py", "-k", "bf16 and (E64 or head_dim_256) or fully_masked"]
TRITON_DRY = ["tests/triton/test_triton_parity.py", "-k", "(test_parity and bf16 and (tl or keypad)) or opcheck"]

RESULT_RE = re.compile(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def tree_ok(path: Path):
    return (path / "bin" / "nvcc").exists() and (path / "include" / "cuda_runtime.h").exists()


def _toolkit_version(path):
    """(major, minor) of a toolkit directory from its version.json or its name, else None."""
    try:
        v = json.loads((Path(path) / "version.json").read_text())["cuda"]["version"]
    except (OSError, ValueError, KeyError, TypeError):
        m = re.search(r"(\d+)\.(\d+)", os.path.basename(os.path.realpath(path)))
        return (int(m.group(1)), int(m.group(2))) if m else None
    major, minor = v.split(".")[:2]
    return int(major), int(minor)


def find_cuda_home(torch_cuda=None):
    """A CUDA toolkit with both nvcc and its headers, or (None, why): where several are found,
    the first whose major version is torch's CUDA major (torch's extension builder refuses a
    mismatch), else the first.  torch takes CUDA_HOME from the nvcc on PATH, which can be a
    wrapper whose directory has no include/."""
    cands = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    versioned = sorted(glob.glob("/usr/local/cuda-*"), key=lambda p: _toolkit_version(p) or (0, 0), reverse=True)
    cands += ["/usr/local/cuda", *versioned, "/opt/cuda"]
    try:  # NVIDIA's pip wheels of the toolkit (nvidia/cu13, nvidia/cuda_nvcc, ...)
        import nvidia
        for base in nvidia.__path__:
            cands += sorted(glob.glob(os.path.join(base, "*")))
    except ImportError:
        pass
    seen, ok = [], []
    for c in cands:
        if c and c not in seen:
            seen.append(c)
            if tree_ok(Path(c)):
                ok.append(c)
    if not ok:
        return None, "no CUDA toolkit with bin/nvcc and include/cuda_runtime.h among " + ", ".join(seen)
    want = int(str(torch_cuda).split(".")[0]) if torch_cuda else None
    same = [c for c in ok if want is not None and (_toolkit_version(c) or (None,))[0] == want]
    return (same or ok)[0], None


class Check:
    def __init__(self, out: Path, budget: float, dry: bool):
        self.out, self.budget, self.dry = out, budget, dry
        self.t0 = time.monotonic()
        self.py = os.environ.get("PYTHON", sys.executable)
        self.log = out / "log.txt"
        self.log.write_text("")
        self.child = None
        self.failed = False
        self.xdist = None          # pytest-xdist importable by the steps' interpreter
        self.summary = dict(mode="dry run (CPU)" if dry else "gpu", budget_s=budget, steps=[],
                            tests=dict(passed=0, failed=0, skipped=0), bench=[], versions={}, gpu={},
                            backends={}, build={})
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
        # Parity with the first config of each tuning table: autotuning on a cold cache costs a dozen
        # compiles per kernel (the benchmark turns it back on).
        self.env["ATTNFAST_TRITON_AUTOTUNE"] = "0"
        if dry:
            self.env["TRITON_INTERPRET"] = "1"
        else:
            self.env.pop("TRITON_INTERPRET", None)
        self.env.pop("ATTNFAST_BACKEND", None)

    # -- bookkeeping -------------------------------------------------------------------------
    def left(self):
        return self.budget - (time.monotonic() - self.t0)

    def write(self):
        self.summary["seconds"] = round(time.monotonic() - self.t0, 1)
        self.summary["exit_status"] = 1 if self.failed else 0
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1, default=str) + "\n")
        tmp.replace(self.out / "summary.json")

    def say(self, text):
        line = f"[{time.monotonic() - self.t0:6.1f} s] {text}"
        print(line, flush=True)
        with self.log.open("a") as f:
            f.write(line + "\n")

    def record(self, name, status, seconds, **extra):
        self.summary["steps"].append(dict(name=name, status=status, seconds=round(seconds, 1), **extra))
        self.say(f"=== {name}: {status} after {seconds:.0f} s" + (f" {extra}" if extra else ""))
        self.write()

    # -- running a step ----------------------------------------------------------------------
    def run(self, name, cmd, cap, later=0.0, env=None, fail_on_error=True):
        """Run `cmd` for at most min(cap, what is left less `later` s kept for the steps after it).
        Returns (status, seconds, rc): status ok, failed, timeout or skipped."""
        allowed = min(cap, self.left() - later - END_RESERVE)
        if allowed < 5:
            self.say(f"=== {name}: skipped, no time left ({self.left():.0f} s of the budget)")
            return "skipped", 0.0, None
        self.say(f"=== {name} (at most {allowed:.0f} s): {' '.join(map(str, cmd))}")
        t = time.monotonic()
        with self.log.open("ab") as logf:
            try:
                self.child = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env or self.env, stdout=logf,
                                              stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:  # no such program: the step fails, the check goes on
                self.say(f"--- {name} could not start: {e}")
                if fail_on_error:
                    self.failed = True
                return "failed", time.monotonic() - t, None
            try:
                rc = self.child.wait(timeout=allowed)
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                self.kill_child()
                rc, status = None, "timeout"
            self.child = None
        secs = time.monotonic() - t
        if status == "failed" and fail_on_error:
            self.failed = True
        if status != "ok":
            self.say(f"--- last lines of {name}:\n" + "\n".join(self.tail(30)))
        return status, secs, rc

    def kill_child(self):
        if self.child is None or self.child.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.child.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.child.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def tail(self, n):
        try:
            return self.log.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return []

    def pytest(self, name, args, cap, later=0.0, env=None):
        """A pytest step: counts from its junit XML, or (cut short) from its -v lines in the log."""
        junit = self.out / f".junit-{re.sub(r'[^a-z0-9]+', '-', name)}.xml"
        junit.unlink(missing_ok=True)
        start = self.log.stat().st_size
        if self.xdist is None:  # probed once, by the first test step
            self.xdist = not self.dry and self.has_module("xdist")
        xdist = ["-n", str(min(8, os.cpu_count() or 1))] if self.xdist else []
        cmd = [self.py, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}",
               *xdist, *args]
        status, secs, rc = self.run(name, cmd, cap, later, env, fail_on_error=False)
        counts = self.junit_counts(junit) if junit.exists() else self.log_counts(start)
        junit.unlink(missing_ok=True)
        if status == "skipped":   # a test step that got no time: its tests did not run
            self.failed = True
            self.record(name, status, 0.0, passed=0, failed=0, skipped=0, note="no time left")
            return status
        if rc == 5 or (status == "ok" and counts["passed"] == 0):
            status = "failed"     # nothing collected, or all skipped: the selection is wrong
            counts["note"] = "no test passed"
        if status == "failed" and counts["failed"] == 0:
            counts["failed"] = 1  # a crash or a collection error counts as a failure
        if status in ("failed", "timeout") or counts["failed"]:
            self.failed = True
        for k in ("passed", "failed", "skipped"):
            self.summary["tests"][k] += counts[k]
        self.record(name, status, secs, **counts)
        return status

    @staticmethod
    def junit_counts(path):
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError:
            return dict(passed=0, failed=1, skipped=0)
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        failed = tot["failures"] + tot["errors"]
        return dict(passed=tot["tests"] - failed - tot["skipped"], failed=failed, skipped=tot["skipped"])

    def log_counts(self, start):
        with self.log.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        c = dict(passed=0, failed=0, skipped=0)
        for line in text.splitlines():
            if "::" not in line or line.startswith(("FAILED ", "ERROR ", "SKIPPED ")):
                continue          # not a test's line, or the -rfE recap of one already counted
            m = RESULT_RE.search(line)
            if m:
                w = m.group(1)
                c["passed" if w in ("PASSED", "XFAIL", "XPASS") else "skipped" if w == "SKIPPED" else "failed"] += 1
        return c

    def has_module(self, mod):
        try:
            p = subprocess.run([self.py, "-c", f"import {mod}"], capture_output=True, env=self.env, cwd=ROOT,
                               timeout=60)
        except subprocess.TimeoutExpired:
            return False
        return p.returncode == 0

    def probe(self, code, timeout=120):
        """JSON printed by a snippet run with the steps' interpreter (None on failure)."""
        try:
            p = subprocess.run([self.py, "-c", code], capture_output=True, text=True, env=self.env, cwd=ROOT,
                               timeout=min(timeout, max(5, self.left() - END_RESERVE)))
            return json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else dict(
                error=(p.stderr.strip().splitlines() or ["?"])[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
            return dict(error=f"{type(e).__name__}: {e}")

    # -- the steps ---------------------------------------------------------------------------
    def versions(self):
        t = time.monotonic()
        info = self.probe(VERSIONS_SNIPPET)
        gpu = info.pop("gpu", None) if isinstance(info, dict) else None
        nvcc = shutil.which("nvcc")
        if nvcc:
            try:
                out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
                info["nvcc"] = next((ln for ln in out.splitlines() if "release" in ln), out.strip()[-80:])
            except (OSError, subprocess.TimeoutExpired) as e:
                info["nvcc"] = f"error: {e}"
        else:
            info["nvcc"] = None
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        info["commit"] = git.stdout.strip() if git.returncode == 0 else None
        self.summary["versions"] = info
        self.summary["gpu"] = gpu or dict(name=None, note="dry run: no GPU used" if self.dry else "no CUDA device")
        status = "ok" if "error" not in info and (self.dry or gpu) else "failed"
        if status == "failed":
            self.failed = True
        self.record("versions", status, time.monotonic() - t)

    def build(self):
        ready = self.has_module("attnfast.triton_kernels, attnfast.bench")
        if not ready:
            st, secs, _ = self.run("install", [self.py, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                                               "-e", "."], 120, later=190,
                                   env=dict(self.env, ATTNFAST_SKIP_EXT="1"))
            self.record("install", st, secs)
        cuda_home, why = find_cuda_home(self.summary["versions"].get("torch_cuda"))
        build = dict(cuda_home=cuda_home, cuda_home_note=why,
                     cuda_version=".".join(map(str, _toolkit_version(cuda_home) or ())) if cuda_home else None)
        env = dict(self.env)
        if cuda_home:
            env["CUDA_HOME"] = cuda_home
            env["PATH"] = f"{cuda_home}/bin:{env.get('PATH', '')}"
        cap = self.summary["gpu"].get("capability")
        env.setdefault("ATTNFAST_CUDA_ARCH_LIST", str(cap) if cap else "90")
        if not cuda_home:
            env["ATTNFAST_NO_CUDA"] = "1"
        cmd = [self.py, "setup.py", "build_ext", "--inplace"]
        st, secs, _ = self.run("build", cmd, 240, later=190, env=env, fail_on_error=False)
        build["with_cuda"] = bool(cuda_home) and st == "ok"
        self.record("build", st, secs, cuda_home=cuda_home, arch=env["ATTNFAST_CUDA_ARCH_LIST"])
        if st != "ok" and cuda_home:
            env["ATTNFAST_NO_CUDA"] = "1"
            st, secs, _ = self.run("build without CUDA", cmd, 200, later=190, env=env, fail_on_error=False)
            self.record("build without CUDA", st, secs)
            build["cuda_dropped"] = True
        if st != "ok":
            self.failed = True
        self.summary["build"] = build
        self.summary["backends"] = self.probe(BACKENDS_SNIPPET) or {}
        self.write()
        return build

    def harness(self, cuda_home, cap):
        """The CUDA C++ kernels' standalone harness (parity against its CPU reference, then timing):
        what is left of them when the extension had to be built without them."""
        arch = self.summary["gpu"].get("capability") or "90"
        exe = ROOT / "build" / "attnfast_harness"
        exe.parent.mkdir(exist_ok=True)
        st, secs, _ = self.run("harness build", [f"{cuda_home}/bin/nvcc", "-O3", "-std=c++17",
                                                 f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Icsrc/cuda",
                                                 "csrc/cuda/tools/harness.cu", "csrc/cuda/flash_fwd.cu",
                                                 "csrc/cuda/flash_bwd.cu", "-o", exe], cap, later=190)
        self.record("harness build", st, secs)
        if st == "ok":
            st, secs, _ = self.run("harness", [exe], 60, later=190)
            self.record("harness", st, secs)

    def bench(self):
        """The benchmark's own deadline stops it between cases; the step's limit is a backstop."""
        allowed = self.left() - END_RESERVE
        args = [self.py, "-m", "attnfast", "bench", "gpu_kernels", "--out", self.out]
        if self.dry:
            args.append("--quick")     # under TRITON_INTERPRET=1: the suite's tiny CPU smoke test
        env = dict(self.env, ATTNFAST_GPU_BENCH_SECONDS=str(max(10, int(allowed - 60))))
        env.pop("ATTNFAST_TRITON_AUTOTUNE")
        st, secs, _ = self.run("bench", args, allowed, env=env)
        path = self.out / "gpu_kernels.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):    # not written, or cut mid-write
            data = {}
        keep = ("case", "peer", "status", "ms", "tflops", "max_abs_diff", "check_ok", "reason")
        rows = [{k: r.get(k) for k in keep} for r in data.get("records", [])]
        partial = data.get("partial")
        self.summary["bench"] = rows
        if st == "timeout" and rows:
            st = "cut"            # killed by the step's limit after some cases: rows kept
        self.record("bench", st, secs, rows=len(rows), partial=partial)

    def main(self):
        self.versions()
        build = self.build()
        if not self.dry and build.get("cuda_dropped") and build.get("cuda_home"):
            self.harness(build["cuda_home"], cap=90)
        # `later`: seconds kept for the steps after one (at least 30 for the smoke test, 40 and 60
        # for the parity steps, 60 for the benchmark), so that a slow step squeezes, not drops, them.
        self.pytest("smoke", SMOKE_TESTS, 90, later=160)
        self.pytest("cuda parity", CUDA_DRY if self.dry else CUDA_GPU, 100, later=120)
        self.pytest("triton parity", TRITON_DRY if self.dry else TRITON_GPU, 150, later=60)
        self.bench()
        t = self.summary["tests"]
        self.say(f"=== summary: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped; "
                 f"{len(self.summary['bench'])} benchmark rows; " + ", ".join(
                     f"{s['name']} {s['status']}" for s in self.summary["steps"]))
        self.write()
        return 1 if self.failed else 0


VERSIONS_SNIPPET = r"""
import json, platform, sys
info = dict(python=platform.python_version())
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = dict(name=p.name, capability=f"{p.major}{p.minor}", sm_count=p.multi_processor_count,
                           memory_gib=round(p.total_memory / 2**30, 1), count=torch.cuda.device_count())
except Exception as e:
    info["error"] = f"torch: {type(e).__name__}: {e}"
for mod in ("triton", "numpy"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as e:
        info[mod] = f"not importable: {type(e).__name__}"
print(json.dumps(info))
"""

BACKENDS_SNIPPET = r"""
import json, attnfast
print(json.dumps({n: dict(available=s.available, reason=s.reason) for n, s in attnfast.backends().items()}))
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0] in ("-h", "--help")):
        print(__doc__)
        return 2
    out = Path(argv[0] if argv else "bench/results/gpu").resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        budget = float(os.environ.get("GPU_CHECK_SECONDS", DEFAULT_BUDGET))
    except ValueError:
        print(f"GPU_CHECK_SECONDS must be a number of seconds, got {os.environ['GPU_CHECK_SECONDS']!r}")
        return 2
    dry = os.environ.get("GPU_CHECK_DRY_RUN", "0") not in ("", "0")
    check = Check(out, budget, dry)

    def on_signal(signum, frame):       # killed from outside: stop the step, keep the summary
        check.kill_child()
        check.record("interrupted", "killed", 0.0, signal=signum)
        check.failed = True
        check.write()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    check.write()
    return check.main()


if __name__ == "__main__":
    sys.exit(main())
