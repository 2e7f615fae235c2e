"""Additive (Bahdanau) and top-k attention: time and peak memory, fused vs naive.

    python -m attnfast bench variants [--quick | --smoke]      (writes variants.json, variants.md)

additive: attnfast.additive_attention on the fused CPU kernel ("fused") vs the naive
          form (attnfast.reference.additive_attention_ref in float32, which holds
          the (B, H, Lq, Lk, Da) tanh tensor) over L; forward and forward+backward
          time (medians, peers alternated per repeat) and the peak-RSS increase of
          one forward+backward in a fresh process capped at MEM_CAP_GIB of address
          space (measured as bench/memprobe.py does): a peer that cannot allocate
          is reported as "does not fit".
topk:     attnfast.topk_attention on the fused CPU kernel ("fused") and on the
          row-chunked reference path ("chunked") vs dense attnfast.attention at one L
          for k = 8 ... 256: forward and forward+backward time, peers alternated.
Shapes: B=1, H=4, E=Ev=Da=64, float32, non-causal.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time

import torch

B, H, E, DA = 1, 4, 64, 64
MEM_CAP_GIB = 20
# probe_L: lengths where only the naive form's memory is probed (to find where it stops fitting).
PLANS = {"smoke": dict(L=(64,), probe_L=(128,), reps=1, topk_L=96, ks=(8, 96)),
         "quick": dict(L=(256, 512, 1024, 2048), probe_L=(4096,), reps=2, topk_L=1024, ks=(8, 32, 128)),
         "full": dict(L=(256, 512, 1024, 2048, 4096), probe_L=(8192,), reps=3, topk_L=2048,
                      ks=(8, 16, 32, 64, 128, 256))}


def _inputs(L, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, E, generator=g) for _ in range(3))
    w_q, w_k = (torch.randn(DA, E, generator=g) / E ** 0.5 for _ in range(2))
    v_a = torch.randn(DA, generator=g)
    return q, k, v, w_q, w_k, v_a


def _additive(peer, ins, backward):
    import attnfast
    from attnfast.reference import additive_attention_ref

    ins = [t.detach().requires_grad_(backward) for t in ins]
    if peer == "fused":
        out = attnfast.additive_attention(*ins, backend="cpu")
    else:
        out, _ = additive_attention_ref(*ins, upcast=False)
    if backward:
        out.sum().backward()
    return out


def _probe(peer, L):
    """Peak-RSS increase (MiB) of one forward+backward in a fresh process, or an error string."""
    from .common import PACKAGE, subprocess_env

    code = (f"import resource, torch; resource.setrlimit(resource.RLIMIT_AS, ({MEM_CAP_GIB} << 30, {MEM_CAP_GIB} << 30));"
            f"from {PACKAGE}.memprobe import _peak_mib, _reset_peak; from {PACKAGE}.variants import _inputs, _additive;"
            f"_additive({peer!r}, _inputs(16), True); ins = _inputs({L}); _reset_peak(); p0 = _peak_mib()[0];"
            f"_additive({peer!r}, ins, True);"
            f"print('PEAK', _peak_mib()[0] - p0)")
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                           env=subprocess_env())
    except subprocess.TimeoutExpired:
        return None, "timed out"
    for line in p.stdout.splitlines():
        if line.startswith("PEAK"):
            return float(line.split()[1]), None
    err = (p.stderr.strip().splitlines() or ["?"])[-1]
    return None, "does not fit" if "alloc" in err.lower() or "memory" in err.lower() else err[:120]


def _alternate(peers, reps):
    """{f"{name}_fwd_ms", f"{name}_fwdbwd_ms": median} of peers {name: fn(bwd)}: one warm-up
    round, then `reps` rounds in which the peers alternate (A B A B ...), forward and then
    forward+backward."""
    rec = {}
    for mode, bwd in (("fwd", False), ("fwdbwd", True)):
        times = {p: [] for p in peers}
        for r in range(reps + 1):
            for name, fn in peers.items():
                t0 = time.perf_counter()
                with torch.set_grad_enabled(bwd):
                    fn(bwd)
                if r:
                    times[name].append(time.perf_counter() - t0)
        rec.update({f"{name}_{mode}_ms": statistics.median(times[name]) * 1e3 for name in peers})
    return rec


def run(ctx):
    from .common import fmt_num, md_table

    plan = PLANS[ctx.plan]
    reps = plan["reps"]
    records = []
    for L in plan["L"]:
        ins = _inputs(L)
        rec = dict(L=L)
        for peer in ("fused", "naive"):
            mem, err = _probe(peer, L)
            rec[f"{peer}_peak_mib"], rec[f"{peer}_error"] = mem, err
        # Time only what fits; peers alternate within each repeat (A B A B ...).
        peers = {p: (lambda bwd, p=p: _additive(p, ins, bwd)) for p in ("fused", "naive")
                 if rec[f"{p}_error"] is None}
        rec.update(_alternate(peers, reps))
        records.append(rec)
        print(rec, flush=True)
    for L in plan["probe_L"]:
        mem, err = _probe("naive", L)
        records.append(dict(L=L, naive_peak_mib=mem, naive_error=err, fused_peak_mib=None, fused_error="not run"))
        print(records[-1], flush=True)

    import attnfast

    L = plan["topk_L"]
    q, k, v = (torch.randn(B, H, L, E) for _ in range(3))
    topk = []
    fns = {"dense": lambda kk, *t: attnfast.attention(*t),
           "fused": lambda kk, *t: attnfast.topk_attention(*t, kk, backend="cpu"),
           "chunked": lambda kk, *t: attnfast.topk_attention(*t, kk, backend="reference")}

    def call(fn, kk, bwd):
        out = fn(kk, *[t.detach().requires_grad_(bwd) for t in (q, k, v)])
        if bwd:
            out.sum().backward()

    for kk in plan["ks"]:
        rec = dict(L=L, k=kk)
        rec.update(_alternate({name: (lambda bwd, fn=fn: call(fn, kk, bwd)) for name, fn in fns.items()}, reps))
        topk.append(rec)
        print(rec, flush=True)

    def cell(r, p, key):
        return r[f"{p}_error"] or fmt_num(r.get(f"{p}_{key}"))

    rows = [[r["L"], cell(r, "fused", "fwd_ms"), cell(r, "naive", "fwd_ms"), cell(r, "fused", "fwdbwd_ms"),
             cell(r, "naive", "fwdbwd_ms"), cell(r, "fused", "peak_mib"), cell(r, "naive", "peak_mib")]
            for r in records]
    no_fit = [r["L"] for r in records if r["naive_error"] == "does not fit"]
    md = [f"Additive attention, CPU float32, B={B}, H={H}, E=Ev=Da={DA}, non-causal; median of {reps} "
          f"(peers alternated); peak RSS of one forward+backward in a fresh process capped at {MEM_CAP_GIB} GiB.", "",
          md_table(["L", "fused fwd ms", "naive fwd ms", "fused fwd+bwd ms", "naive fwd+bwd ms",
                    "fused peak MiB", "naive peak MiB"], rows), "",
          (f"The naive form no longer fits from L = {no_fit[0]} (its (B, H, L, L, Da) float32 tensors: "
           f"{B * H * no_fit[0] ** 2 * DA * 4 / 2 ** 30:.0f} GiB each)." if no_fit else
           "The naive form fitted at every L of this plan."), "",
          f"Top-k attention vs dense attnfast.attention (CPU kernel), L = {L}, median of {reps} (peers "
          "alternated): the fused kernel and the row-chunked torch path, forward and forward+backward.", "",
          md_table(["k", "fused fwd ms", "chunked fwd ms", "dense fwd ms", "fused fwd+bwd ms", "chunked fwd+bwd ms",
                    "dense fwd+bwd ms", "fused / dense fwd+bwd"],
                   [[t["k"], fmt_num(t["fused_fwd_ms"]), fmt_num(t["chunked_fwd_ms"]), fmt_num(t["dense_fwd_ms"]),
                     fmt_num(t["fused_fwdbwd_ms"]), fmt_num(t["chunked_fwdbwd_ms"]), fmt_num(t["dense_fwdbwd_ms"]),
                     f"{t['fused_fwdbwd_ms'] / t['dense_fwdbwd_ms']:.2f}"] for t in topk]), ""]
    ctx.write_text("variants.md", "\n".join(md))
    ctx.write_json("variants.json", dict(conditions=ctx.machine, shape=dict(B=B, H=H, E=E, Da=DA, dtype="float32"),
                                         additive=records, topk=topk))
    print("\n".join(md))
    return True
