"""Helpers for tests: rebuild the dropout mask a kernel used.

All backends draw dropout from one counter-based RNG (Philox4x32-10, see
csrc/cpu/philox.h): element (bh, i, j) of a call keyed by (seed, offset) is
kept iff (philox(seed; i*Lk + j, bh, offset)[0] >> 8) * 2**-24 >= p.
"""
from __future__ import annotations

import math

import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def draw_rng(device="cpu", generator=None):
    """The (seed, offset) int64 pair a dropout call draws from torch's generator."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, generator=generator)
    return torch.cat([seed, torch.zeros(1, dtype=torch.int64)]).to(device)


def _mulhilo(a, m):
    # a: int64 tensor of 32-bit values; m: 32-bit constant.  Exact 64-bit
    # product split in 16-bit halves so no int64 overflow occurs.
    a_lo, a_hi = a & 0xFFFF, a >> 16
    t = a_lo * m
    u = a_hi * m
    hi = (u + (t >> 16)) >> 16
    lo = (((u & 0xFFFF) << 16) + t) & _U32
    return hi & _U32, lo


def philox_first_word(c0, c1, c2, c3, k0, k1):
    """First output word of Philox4x32-10 for int64 tensors of 32-bit values."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _U32
        k1 = (k1 + _W1) & _U32
    return c0


def dropout_mask(shape, dropout_p, rng=None, device="cpu"):
    """Multipliers (0 or 1/(1-p)) of shape (..., Hq, Lq, Lk), float32.

    `rng` is the (seed, offset) pair of the call; None draws it from torch's
    default generator exactly as `attnfast.attention` does, so
    `torch.manual_seed(s); attention(..., dropout_p=p)` and
    `torch.manual_seed(s); dropout_mask(shape, p)` agree.
    """
    if rng is None:
        rng = draw_rng()
    seed, offset = (int(x) for x in rng.cpu().tolist())
    *lead, Lq, Lk = shape
    BH = 1
    for d in lead:
        BH *= d
    bh = torch.arange(BH, dtype=torch.int64).view(BH, 1, 1)
    n = (torch.arange(Lq, dtype=torch.int64).view(1, Lq, 1) * Lk
         + torch.arange(Lk, dtype=torch.int64).view(1, 1, Lk))
    c0 = (n & _U32).expand(BH, Lq, Lk)
    c1 = (n >> 32).expand(BH, Lq, Lk)
    c2 = (bh & _U32).expand(BH, Lq, Lk)
    c3 = torch.full((BH, Lq, Lk), offset & _U32, dtype=torch.int64)
    k0 = torch.tensor(seed & _U32, dtype=torch.int64)
    k1 = torch.tensor((seed >> 32) & _U32, dtype=torch.int64)
    word = philox_first_word(c0, c1, c2, c3, k0, k1)
    keep = (word >> 8).to(torch.float32) * (1.0 / 16777216.0) >= dropout_p
    mult = keep.to(torch.float32) / (1.0 - dropout_p)
    return mult.reshape(tuple(shape)).to(device)


# ---------------------------------------------------------------------------
# The parity rule (tests and `make bench` both use it)
# ---------------------------------------------------------------------------
# A kernel matches the reference when, for every output and gradient,
#     max|kernel - truth| <= 2 * max|same_precision_ref - truth| + floor,
#     floor = 2 * eps(dtype) * max|truth|  (two ulps at the largest value)
# where truth is the float64 reference and same_precision_ref is the naive
# reference computed in the kernel's own dtype (for float64, with the ops
# reordered, since upcasting changes nothing there).
# For lse the floor takes the larger of max|truth| and the scores' rounding scale,
# max over pairs of |scale| * sum_d |q_d k_d| (+ max|float mask|): a score, and so
# an lse, is a dot product whose rounding error scales with its terms, not with its
# possibly cancelling sum (a 1 x 1 problem's lse is a single score; there the naive
# reference's own error is a lucky draw ~5% of the time).
# For float64 inputs there is no more precise truth: the float64 truth itself
# carries the rounding noise of its length-n reductions, ~sqrt(n)·eps, and
# the floor admits that noise: floor += sqrt(n) * eps * max|truth| with n the
# longest reduction (max of Lq, Lk and the head dims).

PARITY_FACTOR = 2.0
FLOOR_ULPS = 2.0


class ParityResult:
    __slots__ = ("name", "err", "ref_err", "tol", "ok")

    def __init__(self, name, err, ref_err, tol):
        self.name, self.err, self.ref_err, self.tol = name, err, ref_err, tol
        self.ok = bool(err <= tol)

    def __repr__(self):
        return (f"{self.name}: err {self.err:.3g} <= tol {self.tol:.3g} "
                f"(same-precision ref err {self.ref_err:.3g}): {'ok' if self.ok else 'FAIL'}")


def parity(name, actual, same_precision, truth, n=1, magnitude=0.0):
    """Apply the parity rule to one tensor (see the comment above); `magnitude`
    raises the floor's scale (lse: the scores' rounding scale)."""
    truth = truth.detach().to(torch.float64)
    a = actual.detach().to(torch.float64)
    r = same_precision.detach().to(torch.float64)
    finite = torch.isfinite(truth)
    # -inf lse of fully masked rows must be matched exactly.
    if not torch.equal(torch.isfinite(a), finite) or not torch.equal(a[~finite], truth[~finite]):
        return ParityResult(name, float("inf"), 0.0, 0.0)
    if truth.numel() == 0 or not finite.any():
        return ParityResult(name, 0.0, 0.0, 0.0)
    a, r, t = a[finite], r[finite], truth[finite]
    err = (a - t).abs().max().item()
    ref_err = (r - t).abs().nan_to_num(posinf=0.0).max().item()
    eps = torch.finfo(actual.dtype).eps
    floor_ulps = FLOOR_ULPS + (math.sqrt(n) if actual.dtype == torch.float64 else 0.0)
    tol = PARITY_FACTOR * ref_err + floor_ulps * eps * max(t.abs().max().item(), magnitude)
    return ParityResult(name, err, ref_err, tol)


def _score_scale(q, k, attn_mask, scale):
    """max over (query, key) pairs of |scale| * sum_d |q_d k_d| (+ max|finite float mask|)."""
    if q.numel() == 0 or k.numel() == 0:
        return 0.0
    E = q.shape[-1]
    scale = (1.0 / math.sqrt(E) if E > 0 else 1.0) if scale is None else float(scale)
    qa, ka = q.detach().abs().double(), k.detach().abs().double()
    if q.dim() >= 3 and ka.shape[-3] != qa.shape[-3]:  # GQA: each key head serves a group of query heads
        ka = ka.repeat_interleave(qa.shape[-3] // ka.shape[-3], dim=-3)
    mag = (qa @ ka.transpose(-1, -2)).nan_to_num(posinf=0.0).max().item() * abs(scale)
    if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.numel():
        m = attn_mask.detach().double()
        m = m[torch.isfinite(m)]
        mag += m.abs().max().item() if m.numel() else 0.0
    return mag


def compare_with_reference(run, q, k, v, attn_mask=None, grads=True, **ref_kwargs):
    """Run `run(q, k, v, attn_mask) -> (out, lse)` and the reference; apply the rule.

    `ref_kwargs` are the attention_ref keyword arguments that describe the
    same call (is_causal, causal_alignment, window, scale, enable_gqa,
    dropout_mask).  Gradients (dq, dk, dv and a float mask's) are checked
    when `grads`; a float mask gets a gradient when it requires grad.
    Returns a list of ParityResult.
    """
    from .reference import attention_ref

    def leaf(t, want):
        return None if t is None else t.detach().clone().requires_grad_(want)

    mask_grad = grads and attn_mask is not None and attn_mask.is_floating_point() and attn_mask.requires_grad
    ins = [leaf(t, grads) for t in (q, k, v)] + [leaf(attn_mask, mask_grad)]
    out, lse = run(*ins)
    low_dtype = q.dtype
    reorder = low_dtype == torch.float64
    ref_ins = [leaf(t, grads) for t in (q, k, v)] + [leaf(attn_mask, mask_grad)]
    tru_ins = [leaf(t, grads) for t in (q, k, v)] + [leaf(attn_mask, mask_grad)]
    r_out, r_lse = attention_ref(*ref_ins, upcast=False, reorder_ops=reorder, **ref_kwargs)
    t_out, t_lse = attention_ref(*tru_ins, upcast=True, **ref_kwargs)
    n = max(q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1])
    results = [parity("out", out, r_out, t_out, n),
               parity("lse", lse, r_lse, t_lse, n, _score_scale(q, k, attn_mask, ref_kwargs.get("scale")))]
    if grads:
        dout = torch.randn_like(t_out).to(q.dtype)
        wrt = [0, 1, 2] + ([3] if mask_grad else [])
        names = ["dq", "dk", "dv", "dmask"]
        g = torch.autograd.grad(out, [ins[i] for i in wrt], dout)
        rg = torch.autograd.grad(r_out, [ref_ins[i] for i in wrt], dout.to(r_out.dtype))
        tg = torch.autograd.grad(t_out, [tru_ins[i] for i in wrt], dout.to(t_out.dtype))
        for i, a, r, t in zip(wrt, g, rg, tg):
            results.append(parity(names[i], a, r, t, n))
    return results
