"""The calls of training and serving: packed batches, decoding, the KV cache (CPU).

varlen   one varlen_attention call vs the per-sequence loop (one attention call per
         sequence, the old varlen) vs padded dense torch SDPA with a key-padding and
         causal mask; 1 to 4096 causal sequences of log-uniform lengths, forward and
         forward+backward.
decode   Lq = 1 over Lk keys, GQA 32/8 and MQA 8/1, D = 128: the short-query kernel with
         split-KV (splits chosen from the shape) vs the same kernel with one split vs
         torch SDPA; K/V bytes read per second as a share of the stream bandwidth.
kvcache  attention_with_kvcache decode steps (append one token, attend), contiguous cache
         vs paged (pages of 16 and 256 keys): tokens/s.

Every row's peers are timed round-robin (A B C A B C ...) in one process; ratios are
medians of per-round ratios.  Results: serving_<suite>.json and .md under --out.
"""
from __future__ import annotations

import math
import statistics

import torch

import attnfast
from attnfast import dispatch

from .common import Call, cpu_backend_ready, fmt_num, md_table, time_interleaved
from .roofline import read_bandwidth


def _ratio(ts_slow, ts_fast):
    return statistics.median(a / b for a, b in zip(ts_slow, ts_fast))


def _ms(ts):
    return statistics.median(ts) * 1e3


def _save(ctx, suite, md, recs):
    """serving_<suite>.md (the table, printed too) and .json (the records, with the conditions)."""
    ctx.write_text(f"serving_{suite}.md", "\n".join(md))
    ctx.write_json(f"serving_{suite}.json", dict(records=recs, plan=ctx.plan))
    ctx.stamp(f"serving_{suite}.json")
    print("\n".join(md))


def loguniform_lengths(n, total, gen):
    """n lengths >= 1 summing to `total`, drawn log-uniform on [1, hi] with hi chosen so that
    their mean is total / n (then scaled to the exact total)."""
    if n == 1:
        return [total]
    mean = total / n

    def mean_of(hi):  # mean of exp(U(0, log hi))
        return (hi - 1) / math.log(hi) if hi > 1 else 1.0

    lo, hi = 1.0 + 1e-9, float(total)
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if mean_of(mid) < mean else (lo, mid)
    x = torch.exp(torch.rand(n, generator=gen, dtype=torch.float64) * math.log(hi))
    share = x * (total - n) / x.sum()  # each length is 1 + its share of the rest, rounded so the sum stays exact
    lens = share.floor().long() + 1
    short = total - int(lens.sum())
    lens[torch.argsort(share - share.floor(), descending=True)[:short]] += 1
    return lens.tolist()


# ---------------------------------------------------------------------------
# varlen
# ---------------------------------------------------------------------------
VARLEN_PLANS = {
    # (sequences, total tokens) cases, heads, head dim, rounds; padded dense only up to pad_flops
    "full": dict(cases=[(1, 4096), (16, 16384), (256, 65536), (2000, 65536), (4096, 65536)], H=8, D=64, reps=5,
                 pad_flops=1e12),
    "quick": dict(cases=[(1, 2048), (16, 8192), (256, 8192), (2000, 16384)], H=8, D=64, reps=3, pad_flops=5e11),
    "smoke": dict(cases=[(3, 96), (40, 320)], H=2, D=16, reps=2, pad_flops=1e9),
}


# The per-sequence loop's forward+backward runs up to this many sequences (at 256 it took ~30 s a
# call: every sequence's slice gradient is a zero-filled full-size tensor).
LOOP_BACKWARD_MAX = 256


def _padded(q, k, v, lens, H, D):
    """The batch padded to its longest sequence: (n, H, Lmax, D) tensors and the bool mask
    (n, 1, Lmax, Lmax): causal within each sequence, padding keys hidden."""
    n, Lmax = len(lens), max(lens)
    qp = q.new_zeros(n, Lmax, H, D)
    kp, vp = qp.clone(), qp.clone()
    valid = torch.arange(Lmax)[None, :] < torch.tensor(lens)[:, None]
    qp[valid], kp[valid], vp[valid] = q, k, v
    causal = torch.ones(Lmax, Lmax, dtype=torch.bool).tril()
    mask = (causal[None] & valid[:, None, :])[:, None]
    return qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), mask


def run_varlen(ctx):
    if not cpu_backend_ready():
        return False
    plan = VARLEN_PLANS[ctx.plan]
    H, D, reps = plan["H"], plan["D"], plan["reps"]
    gen = torch.Generator().manual_seed(ctx.seed)
    cpu = dispatch.get("cpu")
    rows, recs, ok = [], [], True
    for n, total in plan["cases"]:
        lens = loguniform_lengths(n, total, gen)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        Lmax = max(lens)
        q, k, v = (torch.randn(total, H, D, generator=gen) for _ in range(3))
        dout = torch.randn(total, H, D, generator=gen)
        plan_v = attnfast.varlen.prepare_varlen(q, k, v, cu, cu, Lmax, Lmax, None, True, "top_left", None, None, 0.0)
        calls = {
            "varlen": lambda g: attnfast.varlen_attention(g[0], g[1], g[2], cu, cu, Lmax, Lmax, is_causal=True),
            "loop": lambda g: dispatch.Backend.varlen_forward(cpu, attnfast.varlen.VarlenPlan(
                g[0], g[1], g[2], plan_v.cu_q, plan_v.cu_k, None, Lmax, Lmax, plan_v.scale, -1, 0, False, 0.0))[0],
        }
        pad_flops = 4.0 * n * H * Lmax * Lmax * D  # forward; the backward adds twice that
        padded = pad_flops <= plan["pad_flops"]
        if padded:
            qp, kp, vp, mask = _padded(q, k, v, lens, H, D)
            calls["padded_sdpa"] = lambda g: torch.nn.functional.scaled_dot_product_attention(
                g[0], g[1], g[2], attn_mask=mask)
            pad_ins = (qp, kp, vp)
        # Correctness of the rows compared: the varlen output against the loop's.
        a, b = calls["varlen"]((q, k, v)), calls["loop"]((q, k, v))
        ok &= bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5))
        for mode in ("fwd", "fwd+bwd"):
            grad = mode == "fwd+bwd"
            timed = {}
            for name, fn in calls.items():
                if name == "padded_sdpa" and grad and 3 * pad_flops > plan["pad_flops"]:
                    continue
                if name == "loop" and grad and n > LOOP_BACKWARD_MAX:
                    continue
                ins = pad_ins if name == "padded_sdpa" else (q, k, v)
                leaves = [t.detach().clone().requires_grad_(grad) for t in ins]
                g_out = (dout.view(total, H, D) if name != "padded_sdpa" else
                         torch.zeros(n, H, Lmax, D)) if grad else None

                def run(fn=fn, leaves=leaves, g_out=g_out):
                    out = fn(leaves)
                    if g_out is not None:
                        out.backward(g_out)

                timed[name] = Call(run, (lambda leaves=leaves: [setattr(t, "grad", None) for t in leaves]))
            # The loop's backward costs seconds per call past a few sequences (each sequence's
            # gradient lands in a zero-filled full-size tensor): fewer rounds there.
            rounds = reps if not grad or n <= 16 else 2
            with torch.inference_mode(False):
                times = time_interleaved(timed, reps=rounds, warmup=1 if rounds == reps else 0)
            rec = dict(sequences=n, tokens=total, longest=Lmax, mode=mode, heads=H, head_dim=D, rounds=rounds,
                       median_ms={k: _ms(t) for k, t in times.items()},
                       speedup_vs_loop=_ratio(times["loop"], times["varlen"]) if "loop" in times else None,
                       speedup_vs_padded=_ratio(times["padded_sdpa"], times["varlen"]) if "padded_sdpa" in times
                       else None,
                       times_s=times)
            recs.append(rec)
            pad_cell = (fmt_num(rec["median_ms"]["padded_sdpa"]) if "padded_sdpa" in times else
                        f"not run ({(3 if grad else 1) * pad_flops / 1e12:.1f} TFLOP)")
            loop_cell = (fmt_num(rec["median_ms"]["loop"]) if "loop" in times else
                         f"not run (> {LOOP_BACKWARD_MAX} seqs)")
            rows.append([str(n), str(total), str(Lmax), mode, str(rounds), fmt_num(rec["median_ms"]["varlen"]),
                         loop_cell, pad_cell, fmt_num(rec["speedup_vs_loop"]) if "loop" in times else "-",
                         fmt_num(rec["speedup_vs_padded"]) if "padded_sdpa" in times else "-"])
            print(f"  n={n:5d} tokens={total} longest={Lmax:5d} {mode:8s} varlen {rec['median_ms']['varlen']:.2f} ms "
                  f"loop x{rec['speedup_vs_loop'] or float('nan'):.2f} "
                  f"padded x{rec['speedup_vs_padded'] or float('nan'):.2f}",
                  flush=True)
    md = ["# varlen: one call vs the per-sequence loop vs padded dense SDPA (CPU, float32, causal)", "",
          f"H = {H}, D = {D}, {torch.get_num_threads()} threads; lengths log-uniform, seed {ctx.seed}; "
          "medians of the rounds shown (peers alternated; the loop's forward+backward takes seconds past 16 "
          "sequences: 2 rounds there).  speedup = peer time / varlen time.  Padded SDPA runs where its work "
          f"is below {plan['pad_flops'] / 1e12:g} TFLOP.", "",
          md_table(["sequences", "tokens", "longest", "mode", "rounds", "varlen ms", "loop ms", "padded SDPA ms",
                    "speedup vs loop", "speedup vs padded"], rows), ""]
    _save(ctx, "varlen", md, recs)
    return ok


# ---------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------
DECODE_PLANS = {
    # (B, Hq, Hkv, Lk) cases, D, rounds
    "full": dict(cases=[(1, 8, 1, L) for L in (4096, 16384, 32768)] +
                 [(B, 32, 8, L) for B in (1, 8) for L in (1024, 4096, 16384, 32768)] +
                 [(64, 32, 8, L) for L in (1024, 4096)], D=128, reps=15),
    "quick": dict(cases=[(1, 8, 1, 4096), (1, 8, 1, 32768), (1, 32, 8, 4096), (8, 32, 8, 4096),
                         (64, 32, 8, 1024)], D=128, reps=9),
    "smoke": dict(cases=[(1, 4, 1, 600), (2, 4, 2, 1100)], D=32, reps=3),
}


def run_decode(ctx):
    if not cpu_backend_ready():
        return False
    plan = DECODE_PLANS[ctx.plan]
    D, reps = plan["D"], plan["reps"]
    gen = torch.Generator().manual_seed(ctx.seed)
    rows, recs, ok = [], [], True
    bw_cache = {}
    for B, Hq, Hkv, L in plan["cases"]:
        q = torch.randn(B, 1, Hq, D, generator=gen)
        kc, vc = torch.randn(B, L, Hkv, D, generator=gen), torch.randn(B, L, Hkv, D, generator=gen)
        lens = torch.full((B,), L, dtype=torch.int32)
        qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
        calls = {
            "split": Call(lambda: attnfast.attention_with_kvcache(q, kc, vc, cache_seqlens=lens)),
            "no_split": Call(lambda: attnfast.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, num_splits=1)),
            "torch_sdpa": Call(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)),
        }
        a = calls["split"].run()
        ok &= bool(torch.allclose(a, calls["no_split"].run(), rtol=1e-4, atol=1e-5))
        ok &= bool(torch.allclose(a, calls["torch_sdpa"].run().transpose(1, 2), rtol=1e-4, atol=1e-5))
        with torch.inference_mode():
            times = time_interleaved(calls, reps=reps, warmup=2)
        nbytes = (kc.numel() + vc.numel()) * 4
        if nbytes not in bw_cache:
            bw_cache[nbytes] = read_bandwidth(nbytes)
        bw = bw_cache[nbytes]
        gbs = {k: nbytes / statistics.median(t) / 1e9 for k, t in times.items()}
        rec = dict(B=B, Hq=Hq, Hkv=Hkv, Lk=L, D=D, kv_bytes=nbytes, read_gbs=bw,
                   median_ms={k: _ms(t) for k, t in times.items()}, gbs=gbs,
                   split_vs_no_split=_ratio(times["no_split"], times["split"]),
                   split_vs_torch=_ratio(times["torch_sdpa"], times["split"]), times_s=times)
        recs.append(rec)
        rows.append([f"{B}", f"{Hq}/{Hkv}", f"{L}", "yes" if B * Hkv < torch.get_num_threads() else "no",
                     fmt_num(rec["median_ms"]["split"]), fmt_num(rec["median_ms"]["no_split"]),
                     fmt_num(rec["median_ms"]["torch_sdpa"]), fmt_num(rec["split_vs_no_split"]),
                     fmt_num(rec["split_vs_torch"]),
                     f"{fmt_num(gbs['split'])} ({100 * gbs['split'] / bw:.0f}%) / "
                     f"{fmt_num(gbs['torch_sdpa'])} ({100 * gbs['torch_sdpa'] / bw:.0f}%)"])
        print(f"  B={B:3d} H={Hq}/{Hkv} Lk={L:6d}: split {rec['median_ms']['split']:.3f} ms, "
              f"x{rec['split_vs_no_split']:.2f} vs no split, x{rec['split_vs_torch']:.2f} vs torch", flush=True)
    md = ["# decode: split-KV vs no split vs torch SDPA (CPU, float32, Lq = 1)", "",
          f"D = {D}, {torch.get_num_threads()} threads; medians of {reps} rounds (peers alternated).  "
          "speedup = peer time / split time; GB/s = K and V bytes / time, % of a torch.sum read of "
          "that many bytes.  'B·Hkv < threads': fewer kv heads than threads (where split-KV is for).", "",
          md_table(["B", "Hq/Hkv", "Lk", "B·Hkv < threads", "split ms", "no split ms", "torch ms",
                    "split vs no split", "split vs torch", "GB/s split / torch (% of read)"], rows), ""]
    _save(ctx, "decode", md, recs)
    return ok


# ---------------------------------------------------------------------------
# kvcache
# ---------------------------------------------------------------------------
KVCACHE_PLANS = {
    "full": dict(cases=[(1, 4096), (8, 4096), (1, 32768), (32, 2048)], H=(32, 8), D=128, pages=(16, 256), reps=15),
    "quick": dict(cases=[(1, 4096), (8, 4096)], H=(32, 8), D=128, pages=(16, 256), reps=7),
    "smoke": dict(cases=[(2, 320)], H=(4, 2), D=32, pages=(16,), reps=3),
}


def run_kvcache(ctx):
    if not cpu_backend_ready():
        return False
    plan = KVCACHE_PLANS[ctx.plan]
    (Hq, Hkv), D, reps = plan["H"], plan["D"], plan["reps"]
    gen = torch.Generator().manual_seed(ctx.seed)
    rows, recs, ok = [], [], True
    for B, L in plan["cases"]:
        q = torch.randn(B, 1, Hq, D, generator=gen)
        kn, vn = torch.randn(B, 1, Hkv, D, generator=gen), torch.randn(B, 1, Hkv, D, generator=gen)
        kc, vc = torch.randn(B, L, Hkv, D, generator=gen), torch.randn(B, L, Hkv, D, generator=gen)
        lens = torch.full((B,), L - 1, dtype=torch.int32)  # each step writes the last slot again
        calls = {"contiguous": Call(lambda: attnfast.attention_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens,
                                                                             is_causal=True))}
        for page in plan["pages"]:
            nblk = L // page
            perm = torch.randperm(B * nblk, generator=gen)
            table = perm.view(B, nblk).to(torch.int32)
            pk = torch.empty(B * nblk, page, Hkv, D)
            pv = torch.empty_like(pk)
            pk[perm] = kc.reshape(B * nblk, page, Hkv, D)
            pv[perm] = vc.reshape(B * nblk, page, Hkv, D)
            calls[f"paged_{page}"] = Call(lambda pk=pk, pv=pv, table=table: attnfast.attention_with_kvcache(
                q, pk, pv, kn, vn, cache_seqlens=lens, block_table=table, is_causal=True))
        outs = {k: c.run() for k, c in calls.items()}
        ok &= all(bool(torch.allclose(outs["contiguous"], o, rtol=1e-4, atol=1e-5)) for o in outs.values())
        with torch.inference_mode():
            times = time_interleaved(calls, reps=reps, warmup=2)
        tps = {k: B / statistics.median(t) for k, t in times.items()}
        recs.append(dict(B=B, cache_len=L, Hq=Hq, Hkv=Hkv, D=D, tokens_per_s=tps,
                         median_ms={k: _ms(t) for k, t in times.items()}, times_s=times))
        rows.append([str(B), str(L)] + [fmt_num(tps[k]) for k in calls] +
                    [fmt_num(_ratio(times["contiguous"], times[k])) for k in calls if k != "contiguous"])
        print(f"  B={B} L={L}: " + ", ".join(f"{k} {fmt_num(v)} tok/s" for k, v in tps.items()), flush=True)
    names = ["contiguous"] + [f"paged_{p}" for p in plan["pages"]]
    md = ["# attention_with_kvcache: decode steps, contiguous vs paged (CPU, float32)", "",
          f"Hq/Hkv = {Hq}/{Hkv}, D = {D}, {torch.get_num_threads()} threads; one step = append one token per "
          f"sequence + attend over the cache (causal); tokens/s = B / median step time ({reps} rounds, "
          "alternated).  paged/contiguous = contiguous time / paged time.", "",
          md_table(["B", "cache length"] + [f"{n} tok/s" for n in names] +
                   [f"{n} / contiguous" for n in names[1:]], rows), ""]
    _save(ctx, "kvcache", md, recs)
    return ok
