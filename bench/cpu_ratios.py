"""CPU kernel speed targets as ratios, measured side by side in one run.

Per case the two peers alternate A B A B ... (A = attnfast.attention(...,
backend="cpu"), B = torch.nn.functional.scaled_dot_product_attention, unless
the group says otherwise): one untimed warm-up pair, then N timed pairs.  The
ratio of a pair is tB / tA (> 1: attnfast is faster); a case reports the
median, min and max of its per-pair ratios, the median time of each peer and
their GFLOP/s.  Groups:

  dense     forward, fp32/bf16, causal or not, D=64/128, B*H=8 over L, one
            B*H=32 shape, and one long fp32 shape
  fwdbwd    forward+backward, fp32/bf16, D=64, causal or not
  masks     explicit boolean masks (a causal-shaped (L, L) mask, broadcast; a
            (B, 1, 1, L) key-padding mask, half the keys padded), fp32
  window    sliding window (left, 0): attnfast window vs SDPA with the same
            band as a boolean mask, and vs attnfast dense (window/dense time)
  roofline  attnfast fp32 forward GFLOP/s as a percentage of a fp32 matmul's
  threads   attnfast fwd+bwd on 1 vs 2 threads (2-thread speedup)

Writes cpu_ratios.json (every per-pair time included) and cpu_ratios.md:
`python -m attnfast bench cpu_ratios [--quick]`.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import attnfast

from .common import (DTYPE_SHORT, DTYPES, Call, cpu_backend_ready, fmt_num, make_inputs, md_table, progress,
                     time_interleaved)

MODE_FACTOR = {"fwd": 1.0, "fwdbwd": 3.5}
GROUPS = ("dense", "fwdbwd", "masks", "window", "roofline", "threads")
GROUP_TITLES = {
    "dense": "Dense forward",
    "fwdbwd": "Forward + backward",
    "masks": "Explicit boolean masks (forward)",
    "window": "Sliding window (forward)",
    "roofline": "Matmul roofline",
    "threads": "Thread scaling (attnfast, forward + backward)",
}


@dataclass(frozen=True)
class Plan:
    # 1. dense forward: B*H = dense_BH[0]*dense_BH[1] over dense_L, plus the `dense_big` (B, H, L) shape,
    #    for every dtype x causal x D; plus `dense_long` L for fp32 D=64 non-causal only
    dense_L: Tuple[int, ...]
    dense_D: Tuple[int, ...]
    dense_BH: Tuple[int, int]
    dense_big: Tuple[int, int, int]
    dense_long: int
    # 2. forward + backward, D=64
    fb_L: Tuple[int, ...]
    # 3. masks, fp32, D=64
    mask_L: int
    # 4. sliding window (left, 0), fp32, D=64
    window_L: int
    window: Tuple[int, int]
    # 5. roofline: N x N x N fp32 matmul vs attnfast fp32 forward at roof_L (D=64, non-causal)
    mm_N: int
    roof_L: int
    # 6. thread scaling: B=1, H=thr_H, D=64, fp32 fwd+bwd at thr_L, threads thr_threads
    thr_L: int
    thr_H: int
    thr_threads: Tuple[int, int]
    # pairs (rounds) per case
    warmup: int
    pairs: int
    large_pairs: int              # for shapes at least `large_from` long (seconds per pair)
    large_from: Optional[int]
    thr_pairs: int
    dtypes: Tuple[str, ...] = ("float32", "bfloat16")
    causal: Tuple[bool, ...] = (False, True)
    D: int = 64                   # head dim of every group but `dense`'s D sweep

    def n_pairs(self, L):
        return self.large_pairs if self.large_from is not None and L >= self.large_from else self.pairs


# Sized to keep the full run near 5 minutes on a 2-core AVX2 machine (the heaviest parts: the L=4096 dense
# forward shapes, L=8192 at ~6 s per pair, bf16 fwd+bwd at L=2048 where SDPA takes ~3 s per call).
FULL = Plan(
    dense_L=(1024, 2048, 4096), dense_D=(64, 128), dense_BH=(1, 8), dense_big=(4, 8, 1024), dense_long=8192,
    fb_L=(1024, 2048), mask_L=2048, window_L=4096, window=(256, 0), mm_N=2048, roof_L=4096,
    thr_L=2048, thr_H=2, thr_threads=(1, 2),
    warmup=1, pairs=7, large_pairs=5, large_from=4096, thr_pairs=9,
)

QUICK = Plan(                      # smoke test: every code path, tiny
    dense_L=(128,), dense_D=(64, 128), dense_BH=(1, 8), dense_big=(2, 8, 128), dense_long=512,
    fb_L=(128,), mask_L=256, window_L=512, window=(64, 0), mm_N=256, roof_L=256,
    thr_L=256, thr_H=2, thr_threads=(1, 2),
    warmup=1, pairs=5, large_pairs=5, large_from=None, thr_pairs=5,
)


def fwd_flops(B, H, Lq, Lk, D, causal):
    f = 4.0 * B * H * Lq * Lk * D
    return f / 2 if causal else f


# ---------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------
def _attnfast(q, k, v, causal=False, mask=None, window=None):
    return attnfast.attention(q, k, v, attn_mask=mask, is_causal=causal, window=window, backend="cpu")


def _sdpa(q, k, v, causal=False, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def _call(fn, q, k, v, g, prepare=None):
    """A Call: forward only (g None) or out.backward(g), with grads dropped (untimed) before each call."""
    if g is None:
        return Call(lambda: fn(q, k, v), prepare)

    def prep():
        q.grad = k.grad = v.grad = None
        if prepare is not None:
            prepare()

    return Call(lambda: fn(q, k, v).backward(g), prep)


# ---------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------
def _stats(xs):
    return dict(median=statistics.median(xs), min=min(xs), max=max(xs))


def _ms(ts):
    return [round(t * 1e3, 4) for t in ts]


def pair_record(group, case, a, b, times, flops_a, flops_b, ratio="b/a", **params):
    """Record of one A/B case: raw per-pair times, per-pair ratio, medians, GFLOP/s.

    ratio "b/a" = tB / tA per pair; "a/b" = tA / tB.
    """
    ta, tb = times[a], times[b]
    ratios = [(y / x) if ratio == "b/a" else (x / y) for x, y in zip(ta, tb)]
    st = _stats(ratios)
    ma, mb = statistics.median(ta), statistics.median(tb)
    return dict(group=group, case=case, a=a, b=b, ratio_def=f"t_{b} / t_{a}" if ratio == "b/a" else
                f"t_{a} / t_{b}", pairs=len(ta), threads=torch.get_num_threads(), **params,
                times_a_ms=_ms(ta), times_b_ms=_ms(tb), ratios=[round(r, 5) for r in ratios],
                ratio_median=st["median"], ratio_min=st["min"], ratio_max=st["max"],
                median_ms_a=ma * 1e3, median_ms_b=mb * 1e3, flops_a=flops_a, flops_b=flops_b,
                gflops_a=flops_a / ma / 1e9 if flops_a else None, gflops_b=flops_b / mb / 1e9 if flops_b else None)


def run_pairs(calls: Dict[str, Call], pairs, warmup, grad):
    with torch.inference_mode(not grad):
        return time_interleaved(calls, reps=pairs, warmup=warmup)


def dense_cases(plan):
    """(dtype, causal, D, B, H, L) for group 1, in run order."""
    B, H = plan.dense_BH
    bB, bH, bL = plan.dense_big
    out = []
    for dtype in plan.dtypes:
        for causal in plan.causal:
            for D in plan.dense_D:
                out += [(dtype, causal, D, B, H, L) for L in plan.dense_L]
                out.append((dtype, causal, D, bB, bH, bL))
    out.append(("float32", False, 64, B, H, plan.dense_long))
    return out


def measure_dense(plan, records):
    for dtype, causal, D, B, H, L in progress(dense_cases(plan), desc="dense fwd", unit="case"):
        q, k, v, _ = make_inputs(B, H, L, D, DTYPES[dtype])
        calls = {"attnfast": _call(lambda q, k, v: _attnfast(q, k, v, causal), q, k, v, None),
                 "sdpa": _call(lambda q, k, v: _sdpa(q, k, v, causal), q, k, v, None)}
        times = run_pairs(calls, plan.n_pairs(L), plan.warmup, grad=False)
        f = fwd_flops(B, H, L, L, D, causal)
        records.append(pair_record("dense", f"{DTYPE_SHORT[dtype]} {'causal' if causal else 'full'} D{D} "
                                            f"B{B}H{H} L{L}", "attnfast", "sdpa", times, f, f,
                                   dtype=dtype, causal=causal, mode="fwd", B=B, H=H, L=L, D=D))


def measure_fwdbwd(plan, records):
    cases = [(dt, c, L) for dt in plan.dtypes for c in plan.causal for L in plan.fb_L]
    B, H, D = 1, 8, plan.D
    for dtype, causal, L in progress(cases, desc="fwd+bwd", unit="case"):
        q, k, v, g = make_inputs(B, H, L, D, DTYPES[dtype], requires_grad=True)
        calls = {"attnfast": _call(lambda q, k, v: _attnfast(q, k, v, causal), q, k, v, g),
                 "sdpa": _call(lambda q, k, v: _sdpa(q, k, v, causal), q, k, v, g)}
        times = run_pairs(calls, plan.n_pairs(L), plan.warmup, grad=True)
        f = fwd_flops(B, H, L, L, D, causal) * MODE_FACTOR["fwdbwd"]
        records.append(pair_record("fwdbwd", f"{DTYPE_SHORT[dtype]} {'causal' if causal else 'full'} L{L}",
                                   "attnfast", "sdpa", times, f, f, dtype=dtype, causal=causal, mode="fwdbwd",
                                   B=B, H=H, L=L, D=D))


def measure_masks(plan, records):
    B, H, D, L = 1, 8, plan.D, plan.mask_L
    kp = torch.zeros(B, 1, 1, L, dtype=torch.bool)
    kp[..., : L // 2] = True
    masks = [("causal-shaped (L, L) bool mask, tril, broadcast", "tril", torch.ones(L, L, dtype=torch.bool).tril()),
             ("key padding (B, 1, 1, L) bool mask, first L/2 keys kept", "keypad", kp)]
    q, k, v, _ = make_inputs(B, H, L, D, torch.float32)
    for label, short, mask in progress(masks, desc="masks", unit="case"):
        calls = {"attnfast": _call(lambda q, k, v: _attnfast(q, k, v, mask=mask), q, k, v, None),
                 "sdpa": _call(lambda q, k, v: _sdpa(q, k, v, mask=mask), q, k, v, None)}
        times = run_pairs(calls, plan.n_pairs(L), plan.warmup, grad=False)
        f = fwd_flops(B, H, L, L, D, False)          # full dense FLOPs, whatever the mask hides
        records.append(pair_record("masks", label, "attnfast", "sdpa", times, f, f, dtype="float32",
                                   causal=False, mode="fwd", B=B, H=H, L=L, D=D, mask=short,
                                   mask_shape=list(mask.shape), visible_fraction=mask.float().mean().item(),
                                   flops_note="full dense FLOPs (4*B*H*L*L*D) for both peers"))


def measure_window(plan, records):
    from attnfast.reference import visible_mask

    B, H, D, L = 1, 8, plan.D, plan.window_L
    w = tuple(plan.window)
    band = visible_mask(L, L, window=w)               # built once, (L, L) bool, broadcast
    frac = band.float().mean().item()
    q, k, v, _ = make_inputs(B, H, L, D, torch.float32)
    calls = {"attnfast_window": _call(lambda q, k, v: _attnfast(q, k, v, window=w), q, k, v, None),
             "sdpa_band_mask": _call(lambda q, k, v: _sdpa(q, k, v, mask=band), q, k, v, None),
             "attnfast_dense": _call(lambda q, k, v: _attnfast(q, k, v), q, k, v, None)}
    for _ in progress(range(1), desc="window", unit="case"):
        times = run_pairs(calls, plan.n_pairs(L), plan.warmup, grad=False)
    f = fwd_flops(B, H, L, L, D, False)
    common = dict(dtype="float32", causal=False, mode="fwd", B=B, H=H, L=L, D=D, window=list(w),
                  visible_fraction=frac, flops_note="full dense FLOPs (4*B*H*L*L*D) for every peer")
    records.append(pair_record("window", f"SDPA band mask / attnfast window {w}", "attnfast_window",
                               "sdpa_band_mask", times, f, f, **common))
    records.append(pair_record("window", f"attnfast window {w} / attnfast dense", "attnfast_window",
                               "attnfast_dense", times, f, f, ratio="a/b", **common))


def measure_roofline(plan, records):
    N = plan.mm_N
    a = torch.randn(N, N)
    b = torch.randn(N, N)
    B, H, D, L = 1, 8, plan.D, plan.roof_L
    q, k, v, _ = make_inputs(B, H, L, D, torch.float32)
    calls = {"attnfast": Call(lambda: _attnfast(q, k, v)), "matmul": Call(lambda: torch.matmul(a, b)),
             "sdpa": Call(lambda: _sdpa(q, k, v))}
    for _ in progress(range(1), desc="roofline", unit="case"):
        times = run_pairs(calls, plan.n_pairs(L), plan.warmup, grad=False)
    f_att = fwd_flops(B, H, L, L, D, False)
    f_mm = 2.0 * N ** 3
    common = dict(dtype="float32", causal=False, mode="fwd", B=B, H=H, L=L, D=D, mm_N=N)
    # percentage of the matmul's GFLOP/s per round: (f_att / t_att) / (f_mm / t_mm)
    for peer in ("attnfast", "sdpa"):
        rec = pair_record("roofline", f"{peer} fp32 forward L{L} vs matmul {N}^3", peer, "matmul", times, f_att,
                          f_mm, **common)
        pct = [100.0 * (f_att / ta) / (f_mm / tm) for ta, tm in zip(times[peer], times["matmul"])]
        st = _stats(pct)
        rec.update(ratio_def=f"GFLOP/s({peer}) / GFLOP/s(matmul), %", ratios=[round(p, 4) for p in pct],
                   ratio_median=st["median"], ratio_min=st["min"], ratio_max=st["max"])
        records.append(rec)


def measure_threads(plan, records):
    B, H, D, L = 1, plan.thr_H, plan.D, plan.thr_L
    n1, n2 = plan.thr_threads
    q, k, v, g = make_inputs(B, H, L, D, torch.float32, requires_grad=True)
    before = torch.get_num_threads()
    fn = lambda q, k, v: _attnfast(q, k, v)     # noqa: E731
    calls = {f"{n1}_thread": _call(fn, q, k, v, g, prepare=lambda: torch.set_num_threads(n1)),
             f"{n2}_threads": _call(fn, q, k, v, g, prepare=lambda: torch.set_num_threads(n2))}
    try:
        for _ in progress(range(1), desc="threads", unit="case"):
            times = run_pairs(calls, plan.thr_pairs, plan.warmup, grad=True)
    finally:
        torch.set_num_threads(before)
    f = fwd_flops(B, H, L, L, D, False) * MODE_FACTOR["fwdbwd"]
    records.append(pair_record("threads", f"attnfast fp32 fwd+bwd B{B}H{H} L{L}: {n2} vs {n1} thread(s)",
                               f"{n2}_threads", f"{n1}_thread", times, f, f, dtype="float32", causal=False,
                               mode="fwdbwd", B=B, H=H, L=L, D=D, thread_counts=[n1, n2]))


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
def _r(x):
    return f"{x:.2f}"


def _ratio_cells(r):
    return [_r(r["ratio_median"]), _r(r["ratio_min"]), _r(r["ratio_max"])]


def table(group, recs):
    if group in ("dense", "fwdbwd"):
        header = ["dtype", "causal", "D", "B x H", "L", "pairs", "attnfast ms", "SDPA ms", "attnfast GFLOP/s",
                  "SDPA GFLOP/s", "SDPA/attnfast median", "min", "max"]
        rows = [[DTYPE_SHORT[r["dtype"]], "yes" if r["causal"] else "no", r["D"], f"{r['B']} x {r['H']}", r["L"],
                 r["pairs"], fmt_num(r["median_ms_a"]), fmt_num(r["median_ms_b"]), fmt_num(r["gflops_a"]),
                 fmt_num(r["gflops_b"])] + _ratio_cells(r) for r in recs]
        return md_table(header, rows, align=["l", "l"] + ["r"] * (len(header) - 2))
    if group == "masks":
        header = ["mask", "shape", "visible", "L", "pairs", "attnfast ms", "SDPA ms", "attnfast GFLOP/s*",
                  "SDPA GFLOP/s*", "SDPA/attnfast median", "min", "max"]
        rows = [[r["case"], "x".join(map(str, r["mask_shape"])), f"{100 * r['visible_fraction']:.1f}%", r["L"],
                 r["pairs"], fmt_num(r["median_ms_a"]), fmt_num(r["median_ms_b"]), fmt_num(r["gflops_a"]),
                 fmt_num(r["gflops_b"])] + _ratio_cells(r) for r in recs]
        return md_table(header, rows, align=["l", "l"] + ["r"] * (len(header) - 2))
    if group == "window":
        header = ["ratio", "L", "visible", "pairs", "A", "A ms", "B", "B ms", "A GFLOP/s*", "B GFLOP/s*",
                  "median", "min", "max"]
        rows = [[r["ratio_def"], r["L"], f"{100 * r['visible_fraction']:.1f}%", r["pairs"], r["a"],
                 fmt_num(r["median_ms_a"]), r["b"], fmt_num(r["median_ms_b"]), fmt_num(r["gflops_a"]),
                 fmt_num(r["gflops_b"])] + _ratio_cells(r) for r in recs]
        return md_table(header, rows, align=["l"] + ["r"] * 3 + ["l", "r", "l"] + ["r"] * 6)
    if group == "roofline":
        header = ["peer", "shape", "pairs", "peer ms", "matmul ms", "peer GFLOP/s", "matmul GFLOP/s",
                  "% of matmul median", "min", "max"]
        rows = [[r["a"], f"fp32 fwd B{r['B']} H{r['H']} L{r['L']} D{r['D']}; matmul {r['mm_N']}^3", r["pairs"],
                 fmt_num(r["median_ms_a"]), fmt_num(r["median_ms_b"]), fmt_num(r["gflops_a"]),
                 fmt_num(r["gflops_b"]), f"{r['ratio_median']:.1f}%", f"{r['ratio_min']:.1f}%",
                 f"{r['ratio_max']:.1f}%"] for r in recs]
        return md_table(header, rows, align=["l", "l"] + ["r"] * (len(header) - 2))
    if group == "threads":
        header = ["case", "pairs", f"{recs[0]['thread_counts'][0]} thread ms",
                  f"{recs[0]['thread_counts'][1]} threads ms", "GFLOP/s (1)", "GFLOP/s (2)", "speedup median",
                  "min", "max"]
        rows = [[r["case"], r["pairs"], fmt_num(r["median_ms_b"]), fmt_num(r["median_ms_a"]), fmt_num(r["gflops_b"]),
                 fmt_num(r["gflops_a"])] + _ratio_cells(r) for r in recs]
        return md_table(header, rows, align=["l"] + ["r"] * (len(header) - 1))
    raise KeyError(group)


def group_notes(group, plan):
    if group == "dense":
        return [f"A = attnfast.attention(backend='cpu'), B = torch SDPA; ratio per pair = t_SDPA / t_attnfast "
                f"(> 1: attnfast faster); L={plan.dense_long} only for fp32 D=64 non-causal"]
    if group == "fwdbwd":
        return ["out = f(q, k, v); out.backward(g), grads set to None (untimed) before each call; "
                "FLOPs = 3.5x forward; ratio = t_SDPA / t_attnfast"]
    if group == "masks":
        return ["* GFLOP/s from the full dense FLOPs 4*B*H*L*L*D, whatever the mask hides; both peers get the "
                "same attn_mask tensor; ratio = t_SDPA / t_attnfast"]
    if group == "window":
        return [f"attnfast.attention(q, k, v, window={tuple(plan.window)}) vs SDPA with the equivalent boolean "
                "band mask (attnfast.reference.visible_mask, built once) vs attnfast dense, the three interleaved",
                "* GFLOP/s from the full dense FLOPs; 'visible' = fraction of the L x L scores the window keeps "
                "(the target for window/dense: cost proportional to the window)"]
    if group == "roofline":
        return [f"fp32 torch.matmul {plan.mm_N}x{plan.mm_N}x{plan.mm_N} (2*N^3 FLOPs) interleaved with attnfast "
                "and SDPA fp32 forward; % = GFLOP/s(peer) / GFLOP/s(matmul) per round"]
    if group == "threads":
        return ["torch.set_num_threads(1) / (2) (untimed) before each call, alternating; speedup = t(1 thread) / "
                "t(2 threads) per pair; thread count restored afterwards"]
    return []


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def conditions(ctx, plan, load=None):
    m = ctx.machine
    return [
        f"machine: {m['cpu_model']}, {m['logical_cpus']} logical cpus, {m['threads']} torch threads; "
        f"torch {m['torch']}, attnfast {m['attnfast']} (git {m['git']}, ISA path {m['cpu_isa']}); {m['timestamp']}",
        f"timing: per case the peers alternate A B A B ...; {plan.warmup} untimed warm-up pair, then {plan.pairs} "
        f"timed pairs ("
        + (f"{plan.large_pairs} for L >= {plan.large_from}; " if plan.large_from is not None else "")
        + f"thread scaling {plan.thr_pairs}); "
        "forward under torch.inference_mode; inputs N(0,1), contiguous (B, H, L, D), Lq = Lk = L",
        "FLOPs: forward = 4*B*H*Lq*Lk*D (halved when causal), fwd+bwd = 3.5x forward; GFLOP/s = FLOPs / median time",
        "ratio: per pair, then median / min / max over the pairs",
        f"load average (1, 5, 15 min) at start: {load} (other processes on the machine share its cores)",
    ]


def chosen(plan):
    bB, bH, bL = plan.dense_big
    B, H = plan.dense_BH
    return [
        f"dense fwd: {'/'.join(DTYPE_SHORT[d] for d in plan.dtypes)} x causal/not x D={plan.dense_D}: "
        f"B{B} H{H} L={plan.dense_L} + B{bB} H{bH} L={bL}; fp32 D64 non-causal B{B} H{H} L={plan.dense_long}",
        f"fwd+bwd: B1 H8 D{plan.D}, L={plan.fb_L}",
        f"masks: fp32 B1 H8 D{plan.D} L={plan.mask_L}",
        f"window: fp32 B1 H8 D{plan.D} L={plan.window_L} window={tuple(plan.window)}",
        f"roofline: matmul {plan.mm_N}^3 fp32; attnfast/SDPA fp32 fwd B1 H8 D{plan.D} L={plan.roof_L}",
        f"threads: fp32 fwd+bwd B1 H{plan.thr_H} D{plan.D} L={plan.thr_L}, threads {plan.thr_threads}",
    ]


def _finite_ok(r):
    times = r["times_a_ms"] + r["times_b_ms"]
    return bool(times) and all(t > 0 for t in times) and math.isfinite(r["ratio_median"])


def run(ctx):
    if not cpu_backend_ready():
        return False
    plan = QUICK if ctx.quick else FULL
    print("sizes chosen (" + ("quick" if ctx.quick else "full") + "):")
    for line in chosen(plan):
        print("  " + line)
    print(flush=True)

    records: List[dict] = []
    walls = {}
    steps = [("dense", measure_dense), ("fwdbwd", measure_fwdbwd), ("masks", measure_masks),
             ("window", measure_window), ("roofline", measure_roofline), ("threads", measure_threads)]
    load0 = _loadavg()
    cond = conditions(ctx, plan, load0)
    print("\n".join(cond[1:]), flush=True)          # cond[0], the machine, is in the run's header
    sections = []
    for group, fn in steps:
        t0 = time.perf_counter()
        n0 = len(records)
        fn(plan, records)
        walls[group] = time.perf_counter() - t0
        recs = records[n0:]
        tbl = table(group, recs)
        notes = group_notes(group, plan)
        print(f"\n## {GROUP_TITLES[group]} ({walls[group]:.0f} s)\n")
        print(tbl)
        for n in notes:
            print(n)
        print(flush=True)
        sections += [f"## {GROUP_TITLES[group]}", "", tbl, "", *[f"- {n}" for n in notes], ""]

    load1 = _loadavg()
    cond.append(f"load average (1, 5, 15 min) at the end: {load1}")
    print(cond[-1])
    md = ["# CPU kernel speed: ratios vs torch SDPA", "", *[f"- {c}" for c in cond], "",
          "Sizes:", "", *[f"- {c}" for c in chosen(plan)], "", *sections]
    ctx.write_json("cpu_ratios.json", dict(
        machine=ctx.machine, quick=ctx.quick, seed=ctx.seed, conditions=cond, sizes=chosen(plan),
        plan=asdict(plan), group_wall_s={g: round(s, 2) for g, s in walls.items()}, records=records))
    ctx.write_text("cpu_ratios.md", "\n".join(md))
    bad = [r["case"] for r in records if not _finite_ok(r)]
    missing = [g for g in GROUPS if not any(r["group"] == g for r in records)]
    print(f"timing {sum(walls.values()):.0f} s; wrote cpu_ratios.json, cpu_ratios.md")
    if bad or missing:
        print("bad records: " + ", ".join(bad) + ("; missing groups: " + ", ".join(missing) if missing else ""))
    return not bad and not missing
