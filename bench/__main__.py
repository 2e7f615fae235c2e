"""python -m bench [--quick] [--suite NAME ...] [--out DIR] [--threads N] [--list]"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import SUITES, default_suites, load_suite


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and few repeats (smoke test, ~20 s)")
    p.add_argument("--suite", action="append", metavar="NAME",
                   help=f"suite to run (repeatable or comma-separated); default: {','.join(default_suites())}")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for the result files (default: bench/results)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the inputs")
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        for name, s in SUITES.items():
            print(f"{name:<14} {'(default) ' if s.default else ''}{s.description}")
        return 0
    names = []
    for item in args.suite or default_suites():
        names += [n.strip() for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"unknown suite(s): {', '.join(unknown)}; known: {', '.join(SUITES)}", file=sys.stderr)
        return 2

    from .common import Context

    ctx = Context.create(quick=args.quick, out=args.out, threads=args.threads, seed=args.seed)
    print(ctx.header())
    t_all = time.perf_counter()
    failed = []
    for name in names:
        suite = load_suite(name)
        print(f"\n=== {name}: {suite.DESCRIPTION} ===", flush=True)
        t0 = time.perf_counter()
        ok = bool(suite.run(ctx))
        print(f"--- {name}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - t0:.1f} s", flush=True)
        if not ok:
            failed.append(name)
    print(f"\nresults in {ctx.out_display()}; total {time.perf_counter() - t_all:.1f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
