"""python -m attnfast bench SUITE [options]: the one front door of the benchmarks.

Plans: the default one ("full"; `all` about 7 minutes on a 2-core CPU), --quick
(`all` about 1.5 minutes), --smoke (seconds; for tests) where the suite has it.
Every JSON result carries the conditions (machine, CPU ISA path, GPU, threads,
dtype, versions, time).
"""
from __future__ import annotations

import argparse
import sys
import time

from . import SUITES, load


def _add_option(p, name, suite):
    from .common import DTYPES, default_out_help

    if name == "device":
        p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                       help="default: cuda when available, else cpu")
    elif name == "dtype":
        p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="kernels dtype (default: float32 on cpu, bfloat16 on cuda); encoders run in float32")
    elif name == "out":
        p.add_argument("--out", default=None, metavar="DIR",
                       help=f"result directory (default: {default_out_help()})")
    elif name == "threads":
        p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    elif name == "seed":
        p.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the inputs (default 0)")
    elif name == "no-progress":
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
    else:
        raise KeyError(name)


def parser():
    p = argparse.ArgumentParser(prog="python -m attnfast bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    sub = p.add_subparsers(dest="suite", metavar="SUITE", title="suites (SUITE --help: its options)")
    for name, s in SUITES.items():
        sp = sub.add_parser(name, help=s.description, description=s.description)
        plans = sp.add_mutually_exclusive_group()
        if "quick" in s.plans:
            plans.add_argument("--quick", action="store_true", help="the short plan")
        if "smoke" in s.plans:
            plans.add_argument("--smoke", action="store_true", help="tiny shapes, seconds (tests)")
        for opt in s.options:
            _add_option(sp, opt, s)
    return p


def list_suites():
    w = max(map(len, SUITES))
    lines = []
    for name, s in SUITES.items():
        extra = f" [{' + '.join(s.parts)}]" if s.parts else ""
        lines.append(f"{name:<{w}}  {s.description}{extra}")
    return "\n".join(lines)


def main(argv=None):
    p = parser()
    try:
        a = p.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:      # --help, or a usage error (argparse has printed it)
        return e.code
    if a.list:
        print(list_suites())
        return 0
    if a.suite is None:
        p.print_usage(sys.stderr)
        print("a SUITE is needed; --list shows them", file=sys.stderr)
        return 2

    import torch

    from .common import Context

    device = getattr(a, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    dtype = getattr(a, "dtype", None) or ("float32" if device == "cpu" else "bfloat16")
    plan = "smoke" if getattr(a, "smoke", False) else "quick" if getattr(a, "quick", False) else "full"
    ctx = Context.create(plan=plan, out=a.out, threads=getattr(a, "threads", None), seed=getattr(a, "seed", 0),
                         device=device, dtype=dtype, progress=not getattr(a, "no_progress", False))
    print(ctx.header())
    names = SUITES[a.suite].parts or (a.suite,)
    failed = []
    t_all = time.perf_counter()
    for name in names:
        s = SUITES[name]
        labels = [plan] + ([device] if "device" in s.options else []) + ([dtype] if "dtype" in s.options else [])
        print(f"\n=== {name} ({', '.join(labels)}): {s.description} ===", flush=True)
        t0 = time.perf_counter()
        ok = bool(load(name)(ctx))
        ctx.timings[name] = time.perf_counter() - t0
        print(f"--- {name}: {'ok' if ok else 'FAILED'} in {ctx.timings[name]:.1f} s", flush=True)
        if not ok:
            failed.append(name)
    print(f"\ndone in {time.perf_counter() - t_all:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in ctx.timings.items())
          + f"; results in {ctx.out_display()}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
