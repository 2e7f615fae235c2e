"""CPU kernel table: attnfast's fused C++ kernel vs torch SDPA vs the naive
reference, forward and forward+backward, self-attention (Lq = Lk = L).

Timing: within each shape the peers run interleaved (A B C A B C ...), so the
noise of a shared machine hits them alike; the figure is the median of the
timed rounds.  Peak memory: one fresh subprocess per probe (bench/memprobe.py).
Writes cpu_kernels.json, cpu_kernels.md and cpu_kernels.png.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .common import (DTYPE_SHORT, DTYPES, MODES, Call, fmt_num, md_table, median_ms, progress,
                     run_memprobes, time_interleaved)
from .peers import CPU_PEERS, make_inputs

DESCRIPTION = "CPU kernel table: attnfast cpu vs torch SDPA vs naive reference (time, GFLOP/s, peak memory)"

FLOP_NOTE = ("GFLOP/s = FLOPs / median time, FLOPs: forward = 4*B*H*Lq*Lk*D (halved when causal), "
             "backward = 2.5x forward, fwd+bwd = 3.5x forward")
SPEEDUP_NOTE = "speedup = SDPA ms / attnfast ms (> 1: attnfast is faster)"
MODE_FACTOR = {"fwd": 1.0, "fwdbwd": 3.5}


@dataclass(frozen=True)
class SkipRule:
    """Leave `peer` out for `dtype`, L >= from_L, these modes (causal and not)."""
    peer: str
    dtype: str
    from_L: int
    modes: Tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Plan:
    B: int
    H: int
    D: int
    sizes: Dict[str, Tuple[int, ...]]          # dtype -> sequence lengths
    causal: Tuple[bool, ...] = (False, True)
    modes: Tuple[str, ...] = ("fwd", "fwdbwd")
    warmup: int = 1                             # untimed rounds per shape, for L < nowarm_from ...
    nowarm_from: Optional[int] = None           # (the first L of each dtype/causal/mode always gets one;
                                                #  after it the code path is warm)
    reps: int = 3                               # timed rounds, for L < large_from ...
    large_from: Optional[int] = None
    large_reps: int = 3                         # ... and for L >= large_from
    skip: Tuple[SkipRule, ...] = ()
    mem_L: Tuple[int, ...] = ()                 # per-peer forward probes (float32, non-causal)
    mem_peers: Optional[Tuple[str, ...]] = None #   ... of these peers (None: all)
    mem_long: Optional[Tuple[int, Tuple[str, ...]]] = None   # (L, peers): the long-sequence comparison
    mem_jobs: int = 1                           # concurrent probes (>1 only where cores are idle)

    def rounds(self, L, first):
        warm = self.warmup if self.nowarm_from is None or L < self.nowarm_from else 0
        reps = self.large_reps if self.large_from is not None and L >= self.large_from else self.reps
        return (max(warm, 1) if first else warm), reps

    def skip_reason(self, peer, dtype, L, mode):
        for r in self.skip:
            if (r.peer, r.dtype) == (peer, dtype) and L >= r.from_L and mode in r.modes:
                return r.reason
        return None


FULL = Plan(
    B=1, H=8, D=64,
    sizes={"float32": (512, 1024, 2048, 4096), "bfloat16": (512, 1024)},
    warmup=1, nowarm_from=1024, reps=3, large_from=2048, large_reps=2,   # keeps `make bench` near 3 min
    skip=(   # the naive reference is O(L^2) in memory and slow on CPU; these keep the run near 3 min
        SkipRule("naive", "float32", 4096, ("fwd",), "time budget: ~5 s per call"),
        SkipRule("naive", "float32", 2048, ("fwdbwd",), "time budget: ~3 s per call at L=2048, ~14 s at 4096"),
        SkipRule("naive", "bfloat16", 1024, ("fwd", "fwdbwd"),
                 "time budget: CPU bf16 matmul, ~1.2 s per forward, ~2.7 s per fwd+bwd call at L=1024"),
    ),
    mem_L=(4096,), mem_long=(8192, ("attnfast", "naive")), mem_jobs=1,
)

QUICK = Plan(                                    # smoke test: every code path, tiny and few
    B=1, H=4, D=64,
    sizes={"float32": (128, 256), "bfloat16": (128,)},
    warmup=1, reps=2,
    mem_L=(512,), mem_peers=("naive",),         # one probe: a subprocess costs ~3-5 s here
)


def fwd_flops(B, H, Lq, Lk, D, causal):
    f = 4.0 * B * H * Lq * Lk * D
    return f / 2 if causal else f


def _calls(peers, dtype, plan, L, causal, mode):
    grad = mode == "fwdbwd"
    q, k, v, g = make_inputs(plan.B, plan.H, L, plan.D, DTYPES[dtype], requires_grad=grad)
    calls = {}
    for p in peers:
        if grad:
            def run(fn=p.fn):
                fn(q, k, v, causal).backward(g)

            def prepare():
                q.grad = k.grad = v.grad = None
        else:
            def run(fn=p.fn):
                fn(q, k, v, causal)

            prepare = None
        calls[p.name] = Call(run, prepare)
    return calls


def measure(plan, peers):
    """Timing records and the list of skipped (peer, shape) with reasons."""
    records, skipped = [], []
    configs = [(dt, c, m) for dt in plan.sizes for c in plan.causal for m in plan.modes]
    shapes = [(dt, c, m, L, i == 0) for dt, c, m in configs for i, L in enumerate(plan.sizes[dt])]
    for dtype, causal, mode, L, first in progress(shapes, desc="cpu kernels", unit="shape"):
        active = []
        for p in peers:
            why = plan.skip_reason(p.name, dtype, L, mode)
            if why:
                skipped.append(dict(peer=p.name, dtype=dtype, L=L, causal=causal, mode=mode, reason=why))
            else:
                active.append(p)
        warmup, reps = plan.rounds(L, first)
        with torch.inference_mode(mode == "fwd"):
            times = time_interleaved(_calls(active, dtype, plan, L, causal, mode), reps=reps, warmup=warmup)
        flops = fwd_flops(plan.B, plan.H, L, L, plan.D, causal) * MODE_FACTOR[mode]
        for name, ts in times.items():
            ms = median_ms(ts)
            records.append(dict(peer=name, dtype=dtype, B=plan.B, H=plan.H, Lq=L, Lk=L, D=plan.D,
                                causal=causal, mode=mode, warmup=warmup, reps=len(ts),
                                times_ms=[round(t * 1e3, 3) for t in ts], median_ms=round(ms, 3),
                                gflops=round(flops / (ms * 1e-3) / 1e9, 3), flops=flops, peak_mib=None))
    return records, skipped


def memory(plan, peers, threads):
    probes = [dict(peer=p.name, dtype="float32", L=L, B=plan.B, H=plan.H, D=plan.D)
              for L in plan.mem_L for p in peers if plan.mem_peers is None or p.name in plan.mem_peers]
    if plan.mem_long is not None:
        L, names = plan.mem_long
        probes += [dict(peer=n, dtype="float32", L=L, B=plan.B, H=plan.H, D=plan.D)
                   for n in names if n in {p.name for p in peers}]
    order = {p.name: i for i, p in enumerate(peers)}
    probes.sort(key=lambda p: (-p["L"], order[p["peer"]]))   # longest first: the pool finishes together
    mem = run_memprobes(probes, threads=threads, jobs=plan.mem_jobs)
    return sorted(mem, key=lambda m: (m["L"], order[m["peer"]]))


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
def _key(r):
    return (r["dtype"], r["causal"], r["mode"], r["Lq"])


def kernel_table(records, peer_names):
    by = {}
    for r in records:
        by.setdefault(_key(r), {})[r["peer"]] = r
    header = (["dtype", "causal", "mode", "L"] + [f"{n} ms" for n in peer_names]
              + [f"{n} GFLOP/s" for n in peer_names] + ["speedup vs SDPA"])
    rows = []
    for (dtype, causal, mode, L), cell in by.items():
        ms = [fmt_num(cell[n]["median_ms"]) if n in cell else "skip" for n in peer_names]
        gf = [fmt_num(cell[n]["gflops"]) if n in cell else "skip" for n in peer_names]
        sp = (f"{cell['sdpa']['median_ms'] / cell['attnfast']['median_ms']:.2f}x"
              if "sdpa" in cell and "attnfast" in cell else "-")
        rows.append([DTYPE_SHORT[dtype], "yes" if causal else "no", MODES[mode], L] + ms + gf + [sp])
    return md_table(header, rows, align=["l", "l", "l"] + ["r"] * (len(header) - 3))


def memory_table(mem):
    rows = []
    for m in mem:
        peak = "error: " + m.get("error", "?") if m.get("peak_mib") is None else fmt_num(m["peak_mib"])
        rows.append([m["peer"], DTYPE_SHORT[m["dtype"]], f"B{m['B']} H{m['H']} D{m['D']}", m["L"],
                     "yes" if m["causal"] else "no", MODES[m["mode"]], peak])
    return md_table(["peer", "dtype", "shape", "L", "causal", "mode", "peak MiB (RSS increase)"], rows,
                    align=["l", "l", "l", "r", "l", "l", "r"])


def long_line(plan, mem):
    if plan.mem_long is None:
        return None
    L, names = plan.mem_long
    got = {m["peer"]: m.get("peak_mib") for m in mem if m["L"] == L}
    if not all(got.get(n) is not None for n in names):
        return f"L={L}: memory probe failed for " + ", ".join(n for n in names if got.get(n) is None)
    parts = [f"{n} {fmt_num(got[n])} MiB" for n in names]
    line = f"peak memory at L={L}, fp32 forward, B{plan.B} H{plan.H} D{plan.D}: " + " vs ".join(parts)
    if len(names) == 2 and got[names[0]] > 0:
        line += f" ({names[1]}/{names[0]} = {got[names[1]] / got[names[0]]:.0f}x)"
    return line


def skipped_lines(skipped):
    groups = {}
    for s in skipped:
        g = groups.setdefault((s["peer"], s["dtype"], s["reason"]), (set(), {}))
        g[0].add(s["L"])
        g[1][MODES[s["mode"]]] = None
    return [f"skipped {peer} {DTYPE_SHORT[dtype]} {' and '.join(modes)} at L={','.join(map(str, sorted(Ls)))} "
            f"(causal and not): {why}" for (peer, dtype, why), (Ls, modes) in groups.items()]


def conditions(ctx, plan, peers):
    m = ctx.machine
    lines = [
        f"machine: {m['cpu_model']}, {m['logical_cpus']} logical cpus, {m['threads']} torch threads; "
        f"torch {m['torch']}, attnfast {m['attnfast']} (git {m['git']}, ISA path {m['cpu_isa']}); {m['timestamp']}",
        f"shapes: B={plan.B}, H={plan.H}, D={plan.D}, Lq=Lk=L; inputs N(0,1), contiguous (B, H, L, D)",
        f"timing: peers interleaved per shape (A B C A B C ...); median of {plan.reps} timed rounds"
        + (f" ({plan.large_reps} for L >= {plan.large_from})" if plan.large_from else "")
        + f" after {plan.warmup} untimed warm-up round"
        + (f" (none for L >= {plan.nowarm_from}: the smaller L run just before warmed the code path)"
           if plan.nowarm_from else "")
        + "; forward under torch.inference_mode; fwd+bwd: out = f(q, k, v); out.backward(g), with the "
          "grads set to None (untimed) between calls",
        FLOP_NOTE,
        SPEEDUP_NOTE,
        "peers: " + "; ".join(f"{p.name} = {p.label}" for p in peers),
        "peak memory: fresh subprocess per probe (bench/memprobe.py): increase of the peak RSS (VmHWM, reset "
        "via /proc/self/clear_refs; ru_maxrss would carry the parent's size) over the baseline taken after "
        "the inputs exist and one tiny L=16 call warmed the code path; includes the output",
    ]
    return lines


def plot(path, records, plan, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(dt, c) for dt in plan.sizes for c in plan.causal]
    fig, axes = plt.subplots(len(panels), len(plan.modes), figsize=(5.2 * len(plan.modes), 3.2 * len(panels)),
                             squeeze=False)
    markers = itertools.cycle("osd^v<>")
    style = {}
    for (dtype, causal), row in zip(panels, axes):
        for mode, ax in zip(plan.modes, row):
            for peer in dict.fromkeys(r["peer"] for r in records):
                pts = sorted((r["Lq"], r["gflops"]) for r in records
                             if (r["peer"], r["dtype"], r["causal"], r["mode"]) == (peer, dtype, causal, mode))
                if not pts:
                    continue
                if peer not in style:
                    style[peer] = next(markers)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=style[peer], label=peer)
            ax.set_xscale("log", base=2)
            ax.set_xticks(plan.sizes[dtype])
            ax.set_xticklabels([str(L) for L in plan.sizes[dtype]])
            ax.set_title(f"{DTYPE_SHORT[dtype]}, {'causal' if causal else 'non-causal'}, {MODES[mode]}",
                         fontsize=10)
            ax.set_xlabel("L (Lq = Lk)")
            ax.set_ylabel("GFLOP/s")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.003, "missing points: skipped (see cpu_kernels.md).  " + FLOP_NOTE, ha="center",
             va="bottom", fontsize=6.5)
    fig.tight_layout(rect=(0, 0.015, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ctx):
    plan = QUICK if ctx.quick else FULL
    peers = []
    for p in CPU_PEERS:
        why = p.unavailable()
        if why:
            print(f"peer {p.name} unavailable: {why}")
        else:
            peers.append(p)
    if not peers:
        return False
    names = [p.name for p in peers]
    t0 = time.perf_counter()
    records, skipped = measure(plan, peers)
    t1 = time.perf_counter()
    mem = memory(plan, peers, ctx.threads)
    t2 = time.perf_counter()
    for probe in mem:                               # attach probes to their table rows
        for r in records:
            if (r["peer"], r["dtype"], r["Lq"], r["causal"], r["mode"]) == \
                    (probe["peer"], probe["dtype"], probe["L"], probe["causal"], probe["mode"]):
                r["peak_mib"] = probe.get("peak_mib")

    cond = conditions(ctx, plan, peers)
    table = kernel_table(records, names)
    mtable = memory_table(mem)
    longl = long_line(plan, mem)
    skips = skipped_lines(skipped)
    print("\n".join(cond[1:]))                      # cond[0], the machine, is in the run's header
    print()
    print(table)
    for s in skips:
        print(s)
    print()
    print(mtable)
    if longl:
        print(longl)

    ctx.write_json("cpu_kernels.json", dict(
        machine=ctx.machine, quick=ctx.quick, seed=ctx.seed, conditions=cond, plan=dict(
            B=plan.B, H=plan.H, D=plan.D, sizes=plan.sizes, causal=plan.causal, modes=plan.modes),
        records=records, memory=mem, skipped=skipped))
    md = ["# CPU attention kernels", "", *[f"- {c}" for c in cond], "", "## Time and throughput", "", table, ""]
    md += [f"- {s}" for s in skips] + ["", "## Peak memory", "", mtable, ""]
    if longl:
        md += [longl, ""]
    ctx.write_text("cpu_kernels.md", "\n".join(md))
    m = ctx.machine
    plot(ctx.out / "cpu_kernels.png", records, plan,
         f"attention on CPU: {m['cpu_model']}, {m['threads']} threads, torch {m['torch']}, "
         f"B={plan.B} H={plan.H} D={plan.D}")
    procs = f"{len(mem)} subprocess" + ("es" if len(mem) != 1 else "")
    print(f"timing {t1 - t0:.0f} s, memory probes {t2 - t1:.0f} s ({procs}); "
          "wrote cpu_kernels.json, cpu_kernels.md, cpu_kernels.png")
    ok = all(probe.get("peak_mib") is not None for probe in mem)
    if not ok:
        print("a memory probe failed")
    return ok
