"""CPU roofline: the machine's limits, the micro-kernel alone, and attnfast vs torch SDPA as shares of them.

1. Limits, measured here (not assumed from a clock):
   - FMA peak: 12 independent vector FMA chains per thread (attnfast._C.cpu_probe kind 0), for each
     instruction-set path this CPU runs (AVX2 and, where present, AVX-512), on 1 thread and on all;
   - sgemm rate: torch.mm of N x N float32 (and bfloat16) matrices, all threads;
   - stream bandwidth: torch.sum over a buffer larger than the last-level cache (and one of 16 MiB).
2. The micro-kernel alone, one thread, per path: the score product (192 x E) (E x 128) and the P V
   product (192 x 128) (128 x E) as the forward runs them, GFLOP/s and share of the 1-thread FMA peak.
3. The grid: torch SDPA time / attnfast time (> 1: attnfast faster), per case the median, min and max
   over N alternated pairs (A B A B ...), and each peer's GFLOP/s as a share of the all-thread FMA peak
   of the path (decode rows: GB/s of K and V read, as a share of the stream bandwidth).  The grid runs
   in a child process per path: the best path of this CPU, and, on an AVX-512 CPU, the AVX2 path
   with torch held to AVX2 as well (ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2,
   ONEDNN_MAX_CPU_ISA=AVX2), which is how both run on an AVX2-only machine.

Writes roofline.json and roofline.md: `python -m attnfast bench roofline [--quick | --smoke]`.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from .common import (Call, cpu_backend_ready, fmt_num, md_table, module_argv, subprocess_env, time_interleaved)

TORCH_AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@dataclass(frozen=True)
class GridCase:
    name: str
    group: str                 # dense, fwdbwd, gqa, masks, window, decode, tiny
    dtype: str = "float32"
    B: int = 1
    H: int = 8
    Hkv: Optional[int] = None
    Lq: int = 1024
    Lk: Optional[int] = None
    D: int = 64
    causal: bool = False
    mode: str = "fwd"          # fwd | fwdbwd
    mask: Optional[str] = None  # None | keypad | tril
    window: Optional[int] = None   # left window size (right 0): torch gets the band as a bool mask
    target: float = 1.0        # the ratio target for this case

    @property
    def keys(self):
        return self.Lk or self.Lq


@dataclass(frozen=True)
class Plan:
    L: int                     # dense forward length
    Lfb: int                   # forward+backward and GQA length
    Lmask: int
    Lwin: int
    win: int
    Ldec: int                  # decode key length
    tiny: int
    pairs: int
    fma_iters: int
    mk_iters: int
    mm_N: int
    stream_mib: int


FULL = Plan(L=2048, Lfb=1024, Lmask=2048, Lwin=4096, win=256, Ldec=4096, tiny=64, pairs=7,
            fma_iters=20_000_000, mk_iters=400, mm_N=2048, stream_mib=1024)
QUICK = Plan(L=512, Lfb=256, Lmask=512, Lwin=1024, win=64, Ldec=1024, tiny=64, pairs=3,
             fma_iters=5_000_000, mk_iters=100, mm_N=1024, stream_mib=256)
SMOKE = Plan(L=128, Lfb=64, Lmask=128, Lwin=256, win=32, Ldec=256, tiny=32, pairs=2,
             fma_iters=200_000, mk_iters=5, mm_N=256, stream_mib=32)
PLANS = {"full": FULL, "quick": QUICK, "smoke": SMOKE}


def grid(plan: Plan) -> List[GridCase]:
    L, Lfb = plan.L, plan.Lfb
    cases = []
    for dt, tgt_f, tgt_fb in (("float32", 1.3, 1.25), ("bfloat16", 1.3, 2.0)):
        short = "fp32" if dt == "float32" else "bf16"
        for D in (64, 128):
            for causal in (False, True):
                cases.append(GridCase(f"{short} fwd D{D}{' causal' if causal else ''}", "dense", dt, Lq=L, D=D,
                                      causal=causal, target=tgt_f))
            cases.append(GridCase(f"{short} fwd+bwd D{D}", "fwdbwd", dt, Lq=Lfb, D=D, mode="fwdbwd",
                                  target=tgt_fb))
        cases.append(GridCase(f"{short} fwd+bwd D64 causal", "fwdbwd", dt, Lq=Lfb, causal=True, mode="fwdbwd",
                              target=tgt_fb))
    for H, Hkv in ((8, 2), (4, 1)):
        for mode in ("fwd", "fwdbwd"):
            cases.append(GridCase(f"GQA {H}/{Hkv} B1 {mode}", "gqa", H=H, Hkv=Hkv, Lq=Lfb, mode=mode,
                                  target=1.2 if (Hkv == 1 and mode == "fwdbwd") else 1.0))
    cases.append(GridCase("key padding 50% (bool)", "masks", B=2, Lq=plan.Lmask, mask="keypad", target=2.0))
    cases.append(GridCase("causal-shaped bool mask", "masks", Lq=plan.Lmask, mask="tril", target=2.0))
    cases.append(GridCase(f"window ({plan.win}, 0) vs band mask", "window", Lq=plan.Lwin, window=plan.win))
    for dt, D, H, Hkv in (("float32", 64, 8, None), ("float32", 128, 8, None), ("bfloat16", 64, 8, None),
                          ("float32", 128, 32, 8)):
        short = "fp32" if dt == "float32" else "bf16"
        gq = f" GQA {H}/{Hkv}" if Hkv else ""
        cases.append(GridCase(f"decode {short} D{D}{gq}", "decode", dt, H=H, Hkv=Hkv, Lq=1, Lk=plan.Ldec, D=D,
                              target=1.5))
    for mode in ("fwd", "fwdbwd"):
        cases.append(GridCase(f"tiny B1 H8 L{plan.tiny} {mode}", "tiny", Lq=plan.tiny, mode=mode))
    return cases


def case_flops(c: GridCase):
    f = 4.0 * c.B * c.H * c.Lq * c.keys * c.D
    if c.causal or c.mask == "tril":
        f /= 2
    if c.window is not None:
        f = 4.0 * c.B * c.H * c.Lq * min(c.keys, c.window + 1) * c.D
    return f * (3.5 if c.mode == "fwdbwd" else 1.0)


def case_bytes(c: GridCase):
    """Bytes of K and V a decode call must read."""
    return 2.0 * c.B * (c.Hkv or c.H) * c.keys * c.D * torch.finfo(getattr(torch, c.dtype)).bits / 8


# ---------------------------------------------------------------------------
# Child: the grid on one path (run as `python -m attnfast.bench.roofline --child PLAN`)
# ---------------------------------------------------------------------------
def _inputs(c: GridCase, seed):
    import attnfast

    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, c.dtype)
    Hkv = c.Hkv or c.H
    q = torch.randn(c.B, c.H, c.Lq, c.D, generator=g).to(dt)
    k = torch.randn(c.B, Hkv, c.keys, c.D, generator=g).to(dt)
    v = torch.randn(c.B, Hkv, c.keys, c.D, generator=g).to(dt)
    mask = None
    if c.mask == "keypad":
        mask = torch.ones(c.B, 1, 1, c.keys, dtype=torch.bool)
        mask[..., c.keys // 2:] = False
    elif c.mask == "tril":
        mask = torch.ones(c.Lq, c.keys, dtype=torch.bool).tril()
    band = None
    if c.window is not None:
        i = torch.arange(c.Lq)[:, None]
        j = torch.arange(c.keys)[None, :]
        band = (j <= i) & (j >= i - c.window)
    gqa = Hkv != c.H

    def af(q, k, v):
        if c.window is not None:
            return attnfast.attention(q, k, v, window=(c.window, 0), backend="cpu")
        return attnfast.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=c.causal, enable_gqa=gqa)

    def sd(q, k, v):
        m = band if c.window is not None else mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=c.causal, enable_gqa=gqa)

    return q, k, v, af, sd


def _calls(c: GridCase, seed):
    q, k, v, af, sd = _inputs(c, seed)
    if c.mode == "fwd":
        return {"attnfast": Call(lambda: af(q, k, v)), "torch": Call(lambda: sd(q, k, v))}
    for t in (q, k, v):
        t.requires_grad_(True)
    g = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)

    def prep():
        q.grad = k.grad = v.grad = None

    return {"attnfast": Call(lambda: af(q, k, v).backward(g), prep),
            "torch": Call(lambda: sd(q, k, v).backward(g), prep)}


def _sgemm(N, dtype):
    a = torch.randn(N, N).to(dtype)
    b = torch.randn(N, N).to(dtype)
    torch.mm(a, b)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    return 2.0 * N ** 3 / min(ts) / 1e9


def child(plan_name, seed):
    """The grid on this process's path; one JSON line per record on stdout."""
    import attnfast

    plan = PLANS[plan_name]
    out = {"isa": attnfast._C.cpu_isa(), "torch_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(),
           "sgemm_fp32_gflops": _sgemm(plan.mm_N, torch.float32),
           "sgemm_bf16_gflops": _sgemm(plan.mm_N, torch.bfloat16)}
    print(json.dumps({"info": out}), flush=True)
    for c in grid(plan):
        calls = _calls(c, seed)
        times = time_interleaved(calls, plan.pairs, warmup=1)
        ta, tb = times["attnfast"], times["torch"]
        ratios = [b / a for a, b in zip(ta, tb)]
        rec = dict(asdict(c), times_attnfast_s=ta, times_torch_s=tb, ratio_median=statistics.median(ratios),
                   ratio_min=min(ratios), ratio_max=max(ratios), flops=case_flops(c),
                   kv_bytes=case_bytes(c) if c.group == "decode" else None)
        print(json.dumps({"record": rec}), flush=True)


def run_grid(ctx, plan_name, path):
    """The grid in a child process on `path` ("best" or "avx2") -> (info, records, error)."""
    env = subprocess_env()
    if path == "avx2":
        env.update(TORCH_AVX2_ENV, ATTNFAST_CPU_ISA="avx2")
    argv = [sys.executable, *module_argv("roofline", "--child", plan_name, "--seed", ctx.seed,
                                         "--threads", torch.get_num_threads())]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600)
    info, recs = None, []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            if "info" in d:
                info = d["info"]
            else:
                recs.append(d["record"])
    err = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]
    return info, recs, err


# ---------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------
def paths_here():
    import attnfast

    best = attnfast._C.cpu_isa_best()
    return {"avx512": ["avx512", "avx2"], "avx2": ["avx2"]}.get(best, ["default"])


def fma_peaks(plan, threads):
    from attnfast import _C

    # Best of three probes: a peak is what the core can do; a neighbour's burst during one
    # probe had put it below the micro-kernel's own rate (a table with the micro-kernel at 105-112%).
    def rate(isa, n):
        return max(f / s for s, f in (_C.cpu_probe(0, isa, plan.fma_iters, n) for _ in range(3))) / 1e9

    peaks = {}
    for isa in paths_here():
        peaks[isa] = {"1": rate(isa, 1), str(threads): rate(isa, threads)}
    return peaks


def microkernel(plan):
    from attnfast import _C

    rows = []
    for isa in paths_here():
        for E in (64, 128):
            for kind, shape, label in ((1, (192, E, 128), "score S = Q K^T"), (2, (192, 128, E), "P V + rescale")):
                s, f = _C.cpu_probe(kind, isa, plan.mk_iters, 1, *shape)
                rows.append(dict(isa=isa, E=E, product=label, shape=list(shape), gflops=f / s / 1e9))
    return rows


def read_bandwidth(nbytes):
    """GB/s of torch.sum over a float32 buffer of `nbytes` (all threads; best of 5 after a warm-up):
    what a kernel that reads that much data, from wherever it lives, can hope for."""
    x = torch.ones(max(1, int(nbytes) // 4))
    x.sum()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t0)
    return x.numel() * 4 / min(ts) / 1e9


def stream_bandwidth(plan):
    return {f"{mib} MiB": read_bandwidth(mib * 1024 * 1024) for mib in (16, plan.stream_mib)}


def _pct(x, peak):
    return None if not peak or x is None else 100.0 * x / peak


def grid_table(recs, peak, bw):
    """bw: {kv_bytes: GB/s of a read of that many bytes} for the decode rows."""
    header = ["case", "ratio median (min-max)", "target", "met", "attnfast GFLOP/s (% peak)",
              "torch GFLOP/s (% peak)", "decode GB/s attnfast / torch (% of a read that size)"]
    rows = []
    for r in recs:
        ta, tb = statistics.median(r["times_attnfast_s"]), statistics.median(r["times_torch_s"])
        ga, gb = r["flops"] / ta / 1e9, r["flops"] / tb / 1e9
        dec = "-"
        met = r["ratio_median"] >= r["target"]
        if r["kv_bytes"]:
            ba, bb, roof = r["kv_bytes"] / ta / 1e9, r["kv_bytes"] / tb / 1e9, bw.get(r["kv_bytes"])
            dec = f"{fmt_num(ba)} / {fmt_num(bb)} ({fmt_num(_pct(ba, roof))}% / {fmt_num(_pct(bb, roof))}%)"
            met = met or (_pct(ba, roof) or 0) >= 80
        rows.append([r["name"], f"{r['ratio_median']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})",
                     f"{r['target']:.2f}", "yes" if met else "no",
                     f"{fmt_num(ga)} ({fmt_num(_pct(ga, peak))}%)", f"{fmt_num(gb)} ({fmt_num(_pct(gb, peak))}%)", dec])
    return md_table(header, rows)


def run(ctx):
    if not cpu_backend_ready():
        return False
    plan_name = ctx.plan if ctx.plan in PLANS else "full"
    plan = PLANS[plan_name]
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    peaks = fma_peaks(plan, threads)
    mk = microkernel(plan)
    bw = stream_bandwidth(plan)
    limits = dict(fma_peak_gflops=peaks, stream_gbs=bw)
    md = ["# CPU roofline: limits, the micro-kernel alone, attnfast vs torch SDPA", "",
          f"- machine: {ctx.machine.get('cpu_model', '?')}, {threads} threads, plan {plan_name}",
          "- FMA peak (GFLOP/s, 12 independent FMA chains per thread): " +
          "; ".join(f"{isa}: {fmt_num(p['1'])} on 1 thread, {fmt_num(p[str(threads)])} on {threads}"
                    for isa, p in peaks.items()),
          "- stream bandwidth (torch.sum, GB/s): " + ", ".join(f"{k}: {fmt_num(v)}" for k, v in bw.items()), ""]
    md += ["## The micro-kernel alone (one thread)", "",
           md_table(["path", "E", "product", "(m, d, n)", "GFLOP/s", "% of 1-thread FMA peak"],
                    [[r["isa"], r["E"], r["product"], tuple(r["shape"]), fmt_num(r["gflops"]),
                      fmt_num(_pct(r["gflops"], peaks[r["isa"]]["1"]))] for r in mk]), ""]
    print("\n".join(md), flush=True)
    # The decode rows' roofline: a read of as many bytes as the call's K and V (the same working set,
    # so the same level of the memory hierarchy).
    dec_bw = {b: read_bandwidth(b) for b in sorted({case_bytes(c) for c in grid(plan) if c.group == "decode"})}
    limits["decode_read_gbs"] = {str(int(b)): v for b, v in dec_bw.items()}
    ok = True
    grids = {}
    for path in (["best", "avx2"] if "avx512" in peaks else ["best"]):
        info, recs, err = run_grid(ctx, plan_name, path)
        isa = (info or {}).get("isa", "?")
        peak = peaks.get(isa, {}).get(str(threads))
        title = (f"## Grid, {isa} path (torch: {(info or {}).get('torch_capability', '?')})" +
                 (" — torch held to AVX2 too, as on an AVX2-only CPU" if path == "avx2" else ""))
        sec = [title, ""]
        if info:
            sec.append(f"- sgemm (torch.mm {plan.mm_N}^3, {threads} threads): fp32 "
                       f"{fmt_num(info['sgemm_fp32_gflops'])} GFLOP/s ({fmt_num(_pct(info['sgemm_fp32_gflops'], peak))}% "
                       f"of the FMA peak), bf16 {fmt_num(info['sgemm_bf16_gflops'])} GFLOP/s")
        sec.append(f"- % peak: of the {threads}-thread FMA peak of the {isa} path; decode: GB/s of K and V read, and "
                   "% of the rate of a plain read (torch.sum) of as many bytes; met: ratio >= target (decode: or "
                   ">= 80% of that read rate)")
        sec.append("")
        if err or not recs:
            sec.append(f"grid failed: {err}")
            ok = False
        else:
            sec.append(grid_table(recs, peak, dec_bw))
            ok &= all(math.isfinite(r["ratio_median"]) and r["ratio_median"] > 0 for r in recs)
        sec.append("")
        print("\n".join(sec), flush=True)
        md += sec
        grids[path] = dict(info=info, records=recs, error=err)
    ctx.write_json("roofline.json", dict(machine=ctx.machine, plan=plan_name, plan_sizes=asdict(plan),
                                         limits=limits, microkernel=mk, grids=grids,
                                         wall_s=round(time.perf_counter() - t0, 1)))
    ctx.write_text("roofline.md", "\n".join(md) + "\n")
    print(f"wrote roofline.json, roofline.md in {time.perf_counter() - t0:.0f} s")
    return ok


def _main(argv=None):
    p = argparse.ArgumentParser(description="the roofline grid on this process's path (a child of the suite)")
    p.add_argument("--child", choices=sorted(PLANS), required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    child(a.child, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
