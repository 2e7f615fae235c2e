"""python -m attnfast bench {kernels,encoders,all} [--device cpu|cuda] [--dtype D] [--quick] [--out DIR]

  kernels   attnfast backends vs torch SDPA (each backend) vs naive (vs flash-attn, xformers)
  encoders  attention encoders vs RNN/LSTM/GRU encoders: speed, memory, long-range recall
  all       parity summary, kernels, encoders, then REPORT.md with the tables and plots

Plans: default ("full"; `all` about 7 minutes on a 2-core CPU), `--quick` (about 1.5 minutes),
`--smoke` (seconds; for tests).  Results: OUT/{kernels,encoders}.{json,md,png...}, OUT/REPORT.md;
every JSON carries the conditions (machine, CPU ISA path, GPU, threads, dtype, versions, time).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .common import DEFAULT_OUT, DTYPES, Context


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m attnfast bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("kernels", "encoders", "all"))
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="kernels dtype (default: float32 on cpu, bfloat16 on cuda); encoders run in float32")
    plan = p.add_mutually_exclusive_group()
    plan.add_argument("--quick", action="store_true", help="the short plan (about 1.5 minutes for all)")
    plan.add_argument("--smoke", action="store_true", help="tiny shapes, seconds (tests)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result directory (default: bench/results)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def conditions(ctx, device, dtype):
    c = dict(ctx.machine, device=device, dtype=dtype)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        c["gpu"] = f"{props.name} (sm{props.major}{props.minor})"
        c["cuda"] = torch.version.cuda
    try:
        import triton

        c["triton"] = triton.__version__
    except ImportError:
        c["triton"] = None
    return c


def _stamp(out, name, cond):
    """Add the conditions to a JSON result file."""
    path = out / name
    data = json.loads(path.read_text())
    data["conditions"] = cond
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    dtype = a.dtype or ("float32" if device == "cpu" else "bfloat16")
    plan = "smoke" if a.smoke else "quick" if a.quick else "full"
    ctx = Context.create(quick=plan != "full", out=a.out, threads=a.threads)
    cond = conditions(ctx, device, dtype)
    print(ctx.header())
    timings, ok = {}, True
    t_all = time.perf_counter()

    if a.what == "all":
        from . import parity

        t0 = time.perf_counter()
        print("\n=== parity: the CPU kernel against the reference ===", flush=True)
        ok &= bool(parity.run(ctx))
        timings["parity"] = time.perf_counter() - t0
    if a.what in ("kernels", "all"):
        from .kernels import markdown, run_kernels

        t0 = time.perf_counter()
        print(f"\n=== kernels ({plan}, {device}, {dtype}) ===", flush=True)
        payload = run_kernels(plan, device=device, dtype=dtype, out=a.out, threads=a.threads,
                              progress_bar=not a.no_progress)
        _stamp(a.out, "kernels.json", cond)
        print(markdown(payload))
        timings["kernels"] = time.perf_counter() - t0
    if a.what in ("encoders", "all"):
        from .encoders import run_encoders

        t0 = time.perf_counter()
        print(f"\n=== encoders ({plan}, {device}) ===", flush=True)
        run_encoders(plan, a.out, device=device, dtype=torch.float32, progress=not a.no_progress)
        _stamp(a.out, "encoders.json", dict(cond, dtype="float32"))
        print((a.out / "encoders.md").read_text())
        timings["encoders"] = time.perf_counter() - t0
    if a.what == "all":
        from .report import write_report

        path = write_report(a.out, cond, plan, timings)
        print(f"report: {path}")
    print(f"done in {time.perf_counter() - t_all:.0f} s: " +
          ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
