"""Parity summary: representative cases through the CPU kernel, checked against
the reference with the rule of attnfast.testing (for out, lse, dq, dk, dv):

    max|kernel - fp64 truth| <= 2 * max|same-precision naive - truth| + 2 ulp * max|truth|
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

@dataclass(frozen=True)
class ParityCase:
    name: str
    dtype: str = "float32"
    B: int = 1
    Hq: int = 4
    Hkv: Optional[int] = None
    Lq: int = 128
    Lk: Optional[int] = None
    E: int = 64
    causal: bool = False
    align: str = "top_left"
    bool_mask: bool = False

    def inputs(self):
        from .common import DTYPES

        dt = DTYPES[self.dtype]
        Hkv, Lk = self.Hkv or self.Hq, self.Lk or self.Lq
        q = torch.randn(self.B, self.Hq, self.Lq, self.E, dtype=dt)
        k = torch.randn(self.B, Hkv, Lk, self.E, dtype=dt)
        v = torch.randn(self.B, Hkv, Lk, self.E, dtype=dt)
        mask = None
        if self.bool_mask:
            mask = torch.rand(self.B, 1, self.Lq, Lk) < 0.8   # broadcast over heads
            mask[:, :, :3] = False                               # a few rows see no key
        return q, k, v, mask

    def kwargs(self):
        return dict(is_causal=self.causal, causal_alignment=self.align,
                    enable_gqa=(self.Hkv or self.Hq) != self.Hq)


CASES = [
    ParityCase("fp32 dense", "float32", B=2, Hq=4, Lq=128),
    ParityCase("bf16 dense", "bfloat16", B=2, Hq=4, Lq=128),
    ParityCase("bf16 causal", "bfloat16", B=2, Hq=4, Lq=256, causal=True),
    ParityCase("fp32 bool mask", "float32", B=2, Hq=4, Lq=96, Lk=160, bool_mask=True),
    ParityCase("fp32 GQA causal", "float32", B=1, Hq=8, Hkv=2, Lq=192, causal=True),
    ParityCase("fp32 causal bottom-right", "float32", B=1, Hq=4, Lq=64, Lk=200, causal=True,
               align="bottom_right"),
    ParityCase("fp32 E=59 L=203 causal", "float32", B=1, Hq=3, Lq=203, E=59, causal=True),
    ParityCase("bf16 E=59 L=203", "bfloat16", B=1, Hq=3, Lq=203, E=59),
]

QUICK_CASES = [c for c in CASES if c.name in ("bf16 dense", "fp32 E=59 L=203 causal")]


def describe(c):
    Hkv, Lk = c.Hkv or c.Hq, c.Lk or c.Lq
    heads = f"H{c.Hq}" + (f"/kv{Hkv}" if Hkv != c.Hq else "")
    L = f"L{c.Lq}" if Lk == c.Lq else f"L{c.Lq}x{Lk}"
    return f"B{c.B} {heads} {L} E{c.E}"


def check(case):
    import attnfast
    from attnfast.testing import compare_with_reference

    q, k, v, mask = case.inputs()
    kw = case.kwargs()

    def run(q, k, v, m):
        return attnfast.attention(q, k, v, attn_mask=m, return_lse=True, backend="cpu", **kw)

    return compare_with_reference(run, q, k, v, mask, grads=True, **kw)


def run(ctx):
    from .common import cpu_backend_ready

    if not cpu_backend_ready():
        return False
    cases = QUICK_CASES if ctx.quick else CASES
    records, n_ok = [], 0
    w = max(len(c.name) for c in cases)
    wd = max(len(describe(c)) for c in cases)
    print("per tensor: max err / tol")
    for c in cases:
        results = check(c)
        ok = all(r.ok for r in results)
        n_ok += ok
        cols = "  ".join(f"{r.name} {r.err:.1e}/{r.tol:.1e}" + ("" if r.ok else " FAIL") for r in results)
        print(f"[{'ok' if ok else 'FAIL':>4}] {c.name:<{w}}  {describe(c):<{wd}}  {cols}", flush=True)
        records.append(dict(case=c.name, shape=describe(c), dtype=c.dtype, causal=c.causal, align=c.align,
                            bool_mask=c.bool_mask, ok=ok,
                            results=[dict(name=r.name, err=r.err, ref_err=r.ref_err, tol=r.tol, ok=r.ok)
                                     for r in results]))
    print(f"{n_ok}/{len(cases)} cases within the rule")
    ctx.write_json("parity.json", dict(machine=ctx.machine, quick=ctx.quick, seed=ctx.seed, rule=__doc__.strip(),
                                       cases_ok=n_ok, cases=len(cases), records=records))
    return n_ok == len(cases)
