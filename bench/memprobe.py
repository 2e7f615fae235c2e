"""Peak memory of one attention call, measured in this (fresh) process: the probe
the kernel tables start once per measurement (common.run_memprobe), not a front door.

    python -m attnfast.bench.memprobe --peer attnfast --dtype float32 --L 4096 [--mode fwd|fwdbwd] [--causal]

CPU torch has no allocator peak counter, so this reads the process's peak
resident set size: baseline after the inputs are allocated and filled, then
one call, then the peak again; prints the increase as one JSON line.

- Before the baseline the peer runs once on a tiny problem (L=16), so that
  one-time costs (lazy imports, the thread pool) are not charged to the op.
- The peak is reset to the current RSS first (/proc/self/clear_refs "5"), so
  a transient peak of the start-up does not hide a smaller op.
- The peak is read from VmHWM in /proc/self/status, not from
  getrusage(RUSAGE_SELF).ru_maxrss: Linux carries the *parent's* RSS at fork
  time into the child's ru_maxrss across exec, so a probe started by a big
  benchmark process would report nothing below the parent's size.  ru_maxrss
  is the fallback where /proc is missing.
- The increase counts everything the call holds at its peak, its output (and
  for fwd+bwd the gradients) included.  Memory that the allocator recycles
  from pages already resident (small tensors) does not show: at small sizes
  the figure can be 0.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time


def _status_mib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mib():
    return _status_mib("VmRSS")


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mib():
    hwm = _status_mib("VmHWM")
    if hwm is not None:
        return hwm, "VmHWM"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss"  # KiB on Linux


def main(argv=None):
    p = argparse.ArgumentParser(prog=f"python -m {__package__}.memprobe")
    p.add_argument("--peer", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--L", type=int, required=True)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--mode", choices=["fwd", "fwdbwd"], default="fwd")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    import torch

    from .common import DTYPES, make_inputs
    from .kernels import PROBE_PEERS

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peer = PROBE_PEERS[args.peer]
    dtype = DTYPES[args.dtype]
    grad = args.mode == "fwdbwd"

    def call(q, k, v, g):
        out = peer.call(q, k, v, dict(is_causal=args.causal))
        if grad:
            out.backward(g)
        return out

    call(*make_inputs(1, 1, 16, args.D, dtype, grad))       # warm the code path, not the op's size
    q, k, v, g = make_inputs(args.B, args.H, args.L, args.D, dtype, grad)
    gc.collect()
    reset = _reset_peak()
    base_rss, (base_peak, source) = _rss_mib(), _peak_mib()
    t0 = time.perf_counter()
    out = call(q, k, v, g)
    dt = time.perf_counter() - t0
    peak, _ = _peak_mib()
    del out
    print(json.dumps({
        "peak_mib": round(peak - base_peak, 1),   # increase of the peak RSS caused by the call
        "baseline_rss_mib": None if base_rss is None else round(base_rss, 1),
        "baseline_peak_mib": round(base_peak, 1),  # if >> baseline_rss the delta is a lower bound
        "peak_reset": reset,
        "peak_source": source,
        "inputs_mib": round(sum(t.numel() * t.element_size() for t in (q, k, v)) / 2**20, 1),
        "call_ms": round(dt * 1e3, 1),             # a single call: not a benchmark figure
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
