"""Shared benchmark machinery: run context, machine info, where results go,
subprocesses of this package, interleaved timing, peak-memory probes (fresh
subprocesses), inputs, and result writing."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

PACKAGE = __package__                  # "attnfast.bench" (the folder bench/ of the source tree, installed)
BENCH_DIR = Path(__file__).resolve().parent
# The source checkout this folder is part of (bench/ next to setup.py and attnfast/), or None when
# the package is installed (site-packages/attnfast/bench).
SOURCE_ROOT = (BENCH_DIR.parent if (BENCH_DIR.parent / "setup.py").is_file()
               and (BENCH_DIR.parent / "attnfast" / "__init__.py").is_file() else None)
INSTALLED_OUT = "attnfast-bench-results"   # the default result folder, in the current directory, when installed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
MODES = {"fwd": "forward", "bwd": "backward", "fwdbwd": "fwd+bwd"}


def default_out():
    """bench/results in a source checkout; ./attnfast-bench-results when installed."""
    return SOURCE_ROOT / "bench" / "results" if SOURCE_ROOT is not None else Path.cwd() / INSTALLED_OUT


def default_out_help():
    return "bench/results" if SOURCE_ROOT is not None else f"./{INSTALLED_OUT}"


# ---------------------------------------------------------------------------
# Subprocesses that run a module of this package (probes, ring ranks)
# ---------------------------------------------------------------------------
def module_argv(module, *args):
    """`-m <this package>.<module> args...`, to follow sys.executable."""
    return ["-m", f"{PACKAGE}.{module}", *map(str, args)]


def subprocess_env(**extra):
    """The environment for such a subprocess: unless attnfast is installed in a site directory
    (which the child reads anyway), the folder that holds the attnfast package this process
    imported (a source checkout) goes first on PYTHONPATH, so that the child imports the same
    attnfast, and its bench, from any working directory."""
    import site

    import attnfast

    root = Path(attnfast.__file__).resolve().parent.parent
    env = dict(os.environ, **extra)
    site_dirs = {Path(d).resolve() for d in site.getsitepackages() + [site.getusersitepackages()]}
    if root not in site_dirs:
        env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


# ---------------------------------------------------------------------------
# Context and machine info
# ---------------------------------------------------------------------------
def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_rev():
    if SOURCE_ROOT is None:        # installed: no checkout to describe
        return None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=SOURCE_ROOT, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=SOURCE_ROOT,
                               capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def machine_info():
    import attnfast
    from attnfast import ops

    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_isa": ops._C.cpu_isa() if getattr(ops, "_C", None) is not None else None,
        "torch": torch.__version__,
        "attnfast": attnfast.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": _git_rev(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class Context:
    """What one run of the front door asked for, shared by the suites it runs."""
    plan: str                    # "full", "quick" or "smoke"
    out: Path
    threads: Optional[int]       # what --threads asked (None: torch's default)
    seed: int
    device: str = "cpu"          # what --device chose (suites that take it)
    dtype: str = "float32"       # what --dtype chose (the kernel sweep)
    progress: bool = True        # progress bars (--no-progress: off)
    machine: Dict = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)   # seconds per suite run so far

    @classmethod
    def create(cls, plan="full", out=None, threads=None, seed=0, device="cpu", dtype="float32", progress=True):
        if threads is not None:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        out = Path(out) if out is not None else default_out()
        out.mkdir(parents=True, exist_ok=True)
        return cls(plan=plan, out=out, threads=threads, seed=seed, device=device, dtype=dtype, progress=progress,
                   machine=machine_info())

    @property
    def quick(self):
        """Any plan but the full one (the suites with two plans take their short one)."""
        return self.plan != "full"

    def header(self):
        m = self.machine
        return (f"attnfast {m['attnfast']} (git {m['git']}), torch {m['torch']}, python {m['python']}\n"
                f"cpu: {m['cpu_model']}, {m['logical_cpus']} logical cpus, {m['threads']} torch threads, "
                f"attnfast ISA path {m['cpu_isa']}\n"
                f"plan: {self.plan}, seed {self.seed}, {m['timestamp']}")

    def conditions(self, dtype=None):
        """The machine, the device and dtype of the run, the GPU and the triton version."""
        c = dict(self.machine, device=self.device, dtype=dtype or self.dtype)
        if self.device == "cuda":
            props = torch.cuda.get_device_properties(0)
            c["gpu"] = f"{props.name} (sm{props.major}{props.minor})"
            c["cuda"] = torch.version.cuda
        try:
            import triton

            c["triton"] = triton.__version__
        except ImportError:
            c["triton"] = None
        return c

    def stamp(self, name, dtype=None):
        """Add the conditions to the JSON result file `name`."""
        path = self.out / name
        data = json.loads(path.read_text())
        data["conditions"] = self.conditions(dtype)
        path.write_text(json.dumps(data, indent=1, default=str) + "\n")

    def out_display(self):
        try:
            return str(self.out.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(self.out)

    def write_json(self, name, payload):
        path = self.out / name
        path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        return path

    def write_text(self, name, text):
        path = self.out / name
        path.write_text(text)
        return path


def cpu_backend_ready():
    """True when attnfast's CPU backend can run; else says why and returns False."""
    import attnfast

    st = attnfast.backends()["cpu"]
    if not st.available:
        print(f"attnfast cpu backend unavailable: {st.reason}")
    return st.available


def make_inputs(B, H, L, D, dtype, requires_grad=False, Lk=None):
    """q, k, v (B, H, L, D) ~ N(0, 1) (and the output gradient when requires_grad)."""
    Lk = L if Lk is None else Lk
    q = torch.randn(B, H, L, D, dtype=dtype)
    k = torch.randn(B, H, Lk, D, dtype=dtype)
    v = torch.randn(B, H, Lk, D, dtype=dtype)
    if not requires_grad:
        return q, k, v, None
    for t in (q, k, v):
        t.requires_grad_(True)
    return q, k, v, torch.randn(B, H, L, D, dtype=dtype)


def progress(iterable, **kw):
    """tqdm on stderr when stderr is a terminal; the plain iterable otherwise."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, file=sys.stderr, disable=None, leave=False, **kw)


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------
@dataclass
class Call:
    """One timed callable; `prepare` (untimed) runs before each call, e.g. to drop grads."""
    run: Callable[[], object]
    prepare: Optional[Callable[[], None]] = None


def time_interleaved(calls: Dict[str, Call], reps: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Seconds per call of each entry, measured round-robin (A B C A B C ...).

    The machine's noise then hits every peer of a shape alike.  The first
    `warmup` rounds are run but not recorded.
    """
    times = {name: [] for name in calls}
    for r in range(warmup + reps):
        for name, call in calls.items():
            if call.prepare is not None:
                call.prepare()
            t0 = time.perf_counter()
            call.run()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def median_ms(seconds):
    return statistics.median(seconds) * 1e3


# ---------------------------------------------------------------------------
# Peak memory (fresh subprocess per probe, see bench/memprobe.py)
# ---------------------------------------------------------------------------
def run_memprobe(peer, dtype, L, mode="fwd", causal=False, B=1, H=8, D=64, threads=None, timeout=600):
    """Peak RSS increase (MiB) of one call, measured in a fresh interpreter."""
    args = ["--peer", peer, "--dtype", dtype, "--L", L, "--mode", mode, "--B", B, "--H", H, "--D", D]
    if causal:
        args.append("--causal")
    args += ["--threads", threads if threads is not None else torch.get_num_threads()]
    base = dict(peer=peer, dtype=dtype, B=B, H=H, L=L, D=D, causal=causal, mode=mode)
    try:
        proc = subprocess.run([sys.executable, *module_argv("memprobe", *args)], env=subprocess_env(),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(base, peak_mib=None, error=f"timed out after {timeout} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return dict(base, peak_mib=None, error=(proc.stderr.strip().splitlines() or ["?"])[-1])
    return dict(base, **json.loads(lines[-1]))


def run_memprobes(probes, threads=None, jobs=1):
    """Run probes (dicts of run_memprobe kwargs), `jobs` subprocesses at a time.

    Only peak RSS is read from a probe, and each process has its own, so
    probes may overlap (this hides the interpreter start-up); they must not
    overlap with timing runs.
    """
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        futs = [ex.submit(run_memprobe, threads=threads, **p) for p in probes]
        return [f.result() for f in futs]


# ---------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------
def md_table(header, rows, align=None):
    """Markdown table; `align` per column: 'l' or 'r' (default: first left, rest right)."""
    align = align or (["l"] + ["r"] * (len(header) - 1))
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def fmt(r):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                 for c, w, a in zip(r, widths, align)) + " |"

    sep = "|" + "|".join((":" + "-" * (w + 1)) if a == "l" else ("-" * (w + 1) + ":")
                         for w, a in zip(widths, align)) + "|"
    return "\n".join([fmt(cells[0]), sep] + [fmt(r) for r in cells[1:]])


def fmt_num(x, digits=3):
    """Compact number: 3 significant digits, no exponent for everyday sizes."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 0.01:
        return f"{x:.{max(0, digits - 1 - int(f'{ax:e}'.split('e')[1]))}f}"
    return f"{x:.2g}"
