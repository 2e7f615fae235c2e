"""The awkward-case sweep shared by the parity tests of every backend."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class Case:
    B: int = 2
    Hq: int = 2
    Hkv: int = 2
    Lq: int = 17
    Lk: int = 17
    E: int = 64
    Ev: Optional[int] = None
    mask: Optional[str] = None      # None, "bool", "float", "float_grad"
    mask_bcast: str = "full"        # "full", "batch" (1,H,..), "heads" (B,1,..), "2d" (Lq,Lk), "row" (1,1,1,Lk),
                                    # "keypad" (B,1,1,Lk: second half of the keys hidden), "tril" (Lq,Lk causal),
                                    # "docs" (B,1,Lq,Lk: block-diagonal documents; a float mask is 0 inside
                                    # all but the first document)
    dead_rows: bool = False         # some query rows see no key at all
    causal: bool = False
    align: str = "top_left"
    window: Optional[Tuple[int, int]] = None
    noncontig: bool = False         # (B, L, H, D) storage transposed to (B, H, L, D)

    @property
    def gqa(self):
        return self.Hq != self.Hkv

    def ref_kwargs(self):
        return dict(is_causal=self.causal, causal_alignment=self.align, window=self.window,
                    enable_gqa=self.gqa)

    def attention_kwargs(self):
        return dict(is_causal=self.causal, causal_alignment=self.align, window=self.window,
                    enable_gqa=self.gqa)

    def id(self):
        parts = [f"B{self.B}", f"H{self.Hq}" + (f"kv{self.Hkv}" if self.gqa else ""),
                 f"L{self.Lq}x{self.Lk}", f"E{self.E}" + (f"v{self.Ev}" if self.Ev else "")]
        if self.mask:
            parts.append(f"{self.mask}-{self.mask_bcast}")
        if self.dead_rows:
            parts.append("dead")
        if self.causal:
            parts.append("causal-" + ("tl" if self.align == "top_left" else "br"))
        elif self.align != "top_left":
            parts.append("br")
        if self.window:
            parts.append(f"win{self.window[0]}_{self.window[1]}")
        if self.noncontig:
            parts.append("strided")
        return "-".join(parts)


def _qkv(B, H, L, D, dtype, noncontig):
    if noncontig:
        return torch.randn(B, L, H, D, dtype=dtype).transpose(1, 2)
    return torch.randn(B, H, L, D, dtype=dtype)


def _documents(B, Lq, Lk):
    """Document ids of query and key positions: 2-4 documents per batch with
    random boundaries, the same fractions of Lq and of Lk."""
    ids_q, ids_k = [], []
    for _ in range(B):
        n = int(torch.randint(2, 5, ()))
        cuts = torch.sort(torch.rand(n - 1)).values
        ids_q.append(torch.bucketize(torch.arange(Lq) / Lq, cuts, right=True))
        ids_k.append(torch.bucketize(torch.arange(Lk) / Lk, cuts, right=True))
    return torch.stack(ids_q), torch.stack(ids_k)


def make_inputs(c: Case, dtype):
    """q, k, v and the mask (or None) for a case, fresh random data."""
    Ev = c.Ev or c.E
    q = _qkv(c.B, c.Hq, c.Lq, c.E, dtype, c.noncontig)
    k = _qkv(c.B, c.Hkv, c.Lk, c.E, dtype, c.noncontig)
    v = _qkv(c.B, c.Hkv, c.Lk, Ev, dtype, c.noncontig)
    if c.mask is None:
        return q, k, v, None
    shape = {
        "full": (c.B, c.Hq, c.Lq, c.Lk),
        "batch": (1, c.Hq, c.Lq, c.Lk),
        "heads": (c.B, 1, c.Lq, c.Lk),
        "2d": (c.Lq, c.Lk),
        "row": (1, 1, 1, c.Lk),
        "keypad": (c.B, 1, 1, c.Lk),
        "tril": (c.Lq, c.Lk),
        "docs": (c.B, 1, c.Lq, c.Lk),
    }[c.mask_bcast]
    keep = torch.rand(shape) > 0.3
    if c.mask_bcast == "keypad":  # whole key tiles hidden: exercises tile skipping
        keep = torch.ones(shape, dtype=torch.bool)
        keep[..., c.Lk // 2:] = False
    elif c.mask_bcast == "tril":
        keep = torch.ones(shape, dtype=torch.bool).tril()
    elif c.mask_bcast == "docs":
        doc_q, doc_k = _documents(c.B, c.Lq, c.Lk)
        keep = (doc_q[:, :, None] == doc_k[:, None, :])[:, None]
    if c.dead_rows and len(shape) >= 2 and shape[-2] > 1:
        keep[..., ::3, :] = False  # every third query row sees nothing
    if c.mask == "bool":
        return q, k, v, keep
    m = torch.randn(shape, dtype=dtype)
    if c.mask_bcast == "docs":  # whole cells of zeros: the kernels need not read them
        m = m * (doc_q == 0)[:, None, :, None]
    m = m.masked_fill(~keep, float("-inf"))
    if c.mask == "float_grad":
        m.requires_grad_()
    return q, k, v, m


BASE = Case()
SWEEP = [
    BASE,
    Case(B=1, Hq=1, Hkv=1, Lq=1, Lk=1, E=40),
    Case(Lq=1, Lk=203, E=59),
    Case(Lq=203, Lk=1, E=59),
    Case(Lq=113, Lk=203, E=96, Ev=40),
    Case(Lq=203, Lk=113, E=111, Ev=64),
    Case(B=1, Hq=1, Hkv=1, Lq=1023, Lk=1025, E=64),
    Case(B=1, Hq=1, Hkv=1, Lq=1025, Lk=1023, E=40, causal=True),
    Case(Hq=4, Hkv=2, Lq=113, Lk=113, E=64),
    Case(Hq=6, Hkv=1, Lq=17, Lk=203, E=40),
    Case(Hq=8, Hkv=2, Lq=113, Lk=203, E=59, causal=True, align="bottom_right"),
    Case(Lq=113, Lk=203, E=64, causal=True),
    Case(Lq=203, Lk=113, E=64, causal=True),
    Case(Lq=113, Lk=203, E=64, causal=True, align="bottom_right"),
    Case(Lq=203, Lk=113, E=64, causal=True, align="bottom_right"),
    Case(Lq=203, Lk=203, E=64, window=(17, 17)),
    Case(Lq=203, Lk=203, E=40, window=(64, 0)),
    Case(Lq=113, Lk=203, E=64, window=(-1, 5), align="bottom_right"),
    Case(Lq=203, Lk=113, E=64, window=(3, 1), align="bottom_right", causal=True),
    Case(Lq=113, Lk=203, E=59, mask="bool"),
    Case(Lq=113, Lk=203, E=59, mask="bool", mask_bcast="batch"),
    Case(Lq=113, Lk=203, E=59, mask="bool", mask_bcast="heads", dead_rows=True),
    Case(Lq=113, Lk=203, E=59, mask="float", mask_bcast="2d"),
    Case(Lq=113, Lk=203, E=59, mask="float_grad"),
    Case(Hq=4, Hkv=2, Lq=113, Lk=203, E=40, mask="float_grad", mask_bcast="batch", dead_rows=True),
    Case(Lq=203, Lk=113, E=96, mask="float_grad", mask_bcast="row"),
    Case(Lq=113, Lk=113, E=64, mask="bool", causal=True, dead_rows=True),
    Case(Lq=113, Lk=203, E=111, mask="float", mask_bcast="heads", window=(31, 7)),
    Case(Lq=113, Lk=203, E=64, noncontig=True),
    Case(Hq=4, Hkv=2, Lq=203, Lk=113, E=59, noncontig=True, mask="bool", causal=True),
    Case(B=1, Hq=2, Hkv=2, Lq=64, Lk=64, E=256, Ev=256),
    Case(B=1, Hq=2, Hkv=2, Lq=129, Lk=257, E=8, Ev=3),
    Case(B=2, Hq=2, Hkv=1, Lq=300, Lk=520, E=40, mask="bool", mask_bcast="keypad"),
    Case(B=1, Hq=2, Hkv=2, Lq=520, Lk=300, E=64, mask="bool", mask_bcast="tril"),
    Case(B=1, Hq=2, Hkv=2, Lq=300, Lk=300, E=32, mask="float_grad", mask_bcast="tril"),
    Case(B=2, Hq=2, Hkv=2, Lq=200, Lk=400, E=32, mask="float", mask_bcast="keypad", causal=True,
         align="bottom_right"),
    Case(B=2, Hq=2, Hkv=1, Lq=300, Lk=520, E=64, mask="bool", mask_bcast="docs"),
    Case(B=2, Hq=2, Hkv=2, Lq=520, Lk=300, E=40, mask="float_grad", mask_bcast="docs", window=(150, 40)),
]

# Short queries over long keys (the CPU's decode path: query rows per kv head
# group * Lq <= 16; keys cut into splits merged by logsumexp when B * Hkv is small).
DECODE = [
    Case(B=1, Hq=1, Hkv=1, Lq=1, Lk=1500, E=64),
    Case(B=1, Hq=8, Hkv=1, Lq=2, Lk=2100, E=64, causal=True, align="bottom_right"),
    Case(B=2, Hq=4, Hkv=2, Lq=3, Lk=1100, E=59, Ev=40, mask="bool", mask_bcast="keypad"),
    Case(B=1, Hq=2, Hkv=2, Lq=5, Lk=1300, E=40, mask="float_grad", dead_rows=True),
    Case(B=1, Hq=2, Hkv=1, Lq=4, Lk=1200, E=64, window=(300, 0), align="bottom_right", noncontig=True),
    Case(B=3, Hq=2, Hkv=2, Lq=1, Lk=77, E=128, mask="float", mask_bcast="row"),
]

# A smaller subset for the slower dtypes / paths.
SUBSET = [SWEEP[i] for i in (0, 4, 5, 9, 10, 13, 17, 21, 23, 24, 29)]


def with_(c, **kw):
    return replace(c, **kw)


def check_parity(run, ref, inputs, lse_weight=None, score_scale=0.0):
    """Parity (attnfast.testing.parity) of run(*inputs) -> (out, lse) and of the gradient of
    every floating input, against ref(*inputs, upcast=...) -> (out, lse): the same-precision
    reference (for float64 inputs, ref(..., reorder_ops=True): the same maths in another
    rounding order) and the float64 truth.  The loss is out . dout (random), plus
    lse . lse_weight over the rows that see some key when lse_weight is given.  score_scale:
    the scores' rounding scale, the lse floor's magnitude when above max|lse| (a score's
    rounding error scales with its terms, not with its possibly cancelling sum)."""
    from attnfast.testing import assert_parity, parity

    leaves = lambda: [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]  # noqa: E731
    a_in, r_in, t_in = leaves(), leaves(), leaves()
    out, lse = run(*a_in)
    r_out, r_lse = ref(*r_in, upcast=False, **({"reorder_ops": True} if inputs[0].dtype == torch.float64 else {}))
    t_out, t_lse = ref(*t_in, upcast=True)
    n = max(max(t.shape) for t in inputs)
    res = [parity("out", out, r_out, t_out, n),
           parity("lse", lse, r_lse.float() if lse.dtype == torch.float32 else r_lse, t_lse, n,
                  magnitude=max(t_lse.abs().max().item(), score_scale))]
    dout = torch.randn_like(t_out)

    def loss(o, l):
        total = (o * dout.to(o.dtype)).sum()
        if lse_weight is not None:
            total = total + torch.where(torch.isfinite(l), l * lse_weight.to(l.dtype), torch.zeros_like(l)).sum()
        return total

    grads = [i for i, t in enumerate(inputs) if t.is_floating_point()]
    g, rg, tg = (torch.autograd.grad(loss(o, l), [x[i] for i in grads], allow_unused=True)
                 for o, l, x in ((out, lse, a_in), (r_out, r_lse, r_in), (t_out, t_lse, t_in)))
    for i, a, r, t in zip(grads, g, rg, tg):
        if a is None and t is None:
            continue
        assert a is not None and torch.isfinite(a).all(), f"grad[{i}] missing or not finite"
        res.append(parity(f"grad[{i}]", a, r, t, n))
    assert_parity(res)
