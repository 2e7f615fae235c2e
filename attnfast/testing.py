"""The parity rule and the oracle's helpers, for attnfast's tests and other projects' CI.

`check_attention(fn)` runs any attention function over a sweep of awkward cases and checks
it by the rule (attnfast/harness.py); `Case`, `default_cases`, `Report` come with it, and the
pytest plugin (`attention_case` fixture, `attention_cases` marker) is attnfast_pytest.py.

The dropout RNG lives in attnfast/dropout.py; its functions are re-exported
here (`dropout_mask`, `draw_rng`, `philox_first_word`) for tests that rebuild a
call's dropout mask.
"""
from __future__ import annotations

import math

import torch

from .dropout import draw_rng, dropout_mask, philox_first_word  # noqa: F401  (re-exported)


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


class ParityFailure(AssertionError):
    """Some check of one draw broke the parity rule (raised by `assert_parity`)."""


def assert_parity(results, context=""):
    """Raise ParityFailure naming every result that breaks the rule (none: return)."""
    bad = [r for r in results if not r.ok]
    if bad:
        raise ParityFailure((f"{context}: " if context else "") + "; ".join(map(repr, bad)))


# Callables given every ParityResult `parity` makes (tools/parity_sweep.py records
# the err / tol of each check over many draws with them).
observers = []


def parity(name, actual, same_precision, truth, n=1, magnitude=0.0):
    """Apply the parity rule to one tensor (see the comment above); `magnitude`
    raises the floor's scale (lse: the scores' rounding scale)."""
    result = _parity(name, actual, same_precision, truth, n, magnitude)
    for observe in observers:
        observe(result)
    return result


def _parity(name, actual, same_precision, truth, n, magnitude):
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


def _float_mask_magnitude(attn_mask):
    """max|finite value| of a float mask (added to the scores); 0 for none or a bool mask."""
    if attn_mask is None or not attn_mask.is_floating_point() or not attn_mask.numel():
        return 0.0
    m = attn_mask.detach().double()
    m = m[torch.isfinite(m)]
    return m.abs().max().item() if m.numel() else 0.0


def score_scale(q, k, attn_mask, scale):
    """max over (query, key) pairs of |scale| * sum_d |q_d k_d| (+ max|finite float mask|)."""
    if q.numel() == 0 or k.numel() == 0:
        return 0.0
    E = q.shape[-1]
    scale = (1.0 / math.sqrt(E) if E > 0 else 1.0) if scale is None else float(scale)
    qa, ka = q.detach().abs().double(), k.detach().abs().double()
    if q.dim() >= 3 and ka.shape[-3] != qa.shape[-3]:  # GQA: each key head serves a group of query heads
        ka = ka.repeat_interleave(qa.shape[-3] // ka.shape[-3], dim=-3)
    mag = (qa @ ka.transpose(-1, -2)).nan_to_num(posinf=0.0).max().item() * abs(scale)
    return mag + _float_mask_magnitude(attn_mask)


def additive_score_scale(q, k, v, w_q, w_k, v_a, attn_mask=None):
    """The rounding scale of additive (Bahdanau) scores s = v_aᵀ tanh(W_q q + W_k k):
    max over (query, key) pairs of sum_d |v_a[d]| (1 + (|W_q||q|)[d] + (|W_k||k|)[d])
    (+ max|finite float mask|).  Each projection is a dot product whose rounding error
    scales with its terms, tanh passes it on with a slope of at most 1, and each term of
    the sum over d is at most |v_a[d]|: the lse floor for additive attention, as
    `score_scale` is for dot-product scores.  Arguments as `additive_attention`'s
    (v is not used)."""
    if q.numel() == 0 or k.numel() == 0:
        return 0.0
    qa, ka = q.detach().abs().double(), k.detach().abs().double()
    wq, wk, va = (t.detach().abs().double() for t in (w_q, w_k, v_a))
    va = va.unsqueeze(-2)  # (Da,) -> (1, Da); (H, Da) -> (H, 1, Da): broadcasts over rows
    sq = ((qa @ wq.transpose(-1, -2)) * va).sum(-1)  # (..., H, Lq)
    sk = ((ka @ wk.transpose(-1, -2)) * va).sum(-1)  # (..., H, Lk)
    mag = (sq.amax(-1) + sk.amax(-1) + va.sum(-1).squeeze(-1)).max().item()
    return mag + _float_mask_magnitude(attn_mask)


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
               parity("lse", lse, r_lse, t_lse, n, score_scale(q, k, attn_mask, ref_kwargs.get("scale")))]
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


def compare_varlen_with_reference(run, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k=None, grads=True,
                                  dropout_masks=None, **ref_kwargs):
    """The parity rule for packed sequences: `run(q, k, v) -> (out (total_q, Hq, Ev), lse (Hq, total_q))`
    against `varlen_attention_ref` (is_causal, causal_alignment, window, scale as its keywords),
    over the whole batch at once.  Returns a list of ParityResult."""
    from .reference import varlen_attention_ref

    def leaves():
        return [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]

    ins, ref_ins, tru_ins = leaves(), leaves(), leaves()
    out, lse = run(*ins)
    refs = dict(ref_kwargs, seqused_k=seqused_k, dropout_masks=dropout_masks)
    r_out, r_lse = varlen_attention_ref(*ref_ins, cu_seqlens_q, cu_seqlens_k, upcast=False,
                                        reorder_ops=q.dtype == torch.float64, **refs)
    t_out, t_lse = varlen_attention_ref(*tru_ins, cu_seqlens_q, cu_seqlens_k, upcast=True, **refs)
    lens = lambda cu: (cu[1:] - cu[:-1]).max().item() if cu.numel() > 1 else 0  # noqa: E731
    n = max(lens(cu_seqlens_q), lens(cu_seqlens_k), q.shape[-1], v.shape[-1])
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    used = [b - a for a, b in zip(ck, ck[1:])] if seqused_k is None else seqused_k.tolist()
    magnitude = max((score_scale(q[cq[i]:cq[i + 1]].transpose(0, 1), k[ck[i]:ck[i] + used[i]].transpose(0, 1),
                                 None, ref_kwargs.get("scale")) for i in range(len(cq) - 1)), default=0.0)
    results = [parity("out", out, r_out, t_out, n), parity("lse", lse, r_lse, t_lse, n, magnitude)]
    if grads and out.numel():
        dout = torch.randn_like(t_out).to(q.dtype)
        g = torch.autograd.grad(out, ins, dout, allow_unused=True)
        rg = torch.autograd.grad(r_out, ref_ins, dout.to(r_out.dtype), allow_unused=True)
        tg = torch.autograd.grad(t_out, tru_ins, dout.to(t_out.dtype), allow_unused=True)
        for name, a, r, t, x in zip(("dq", "dk", "dv"), g, rg, tg, ins):
            zero = torch.zeros_like(x)
            results.append(parity(name, zero if a is None else a, zero if r is None else r,
                                  zero if t is None else t, n))
    return results


def compare_kvcache_with_reference(out, lse, q, k_cache, v_cache, seqlens_k, block_table=None,
                                   cache_batch_idx=None, **ref_kwargs):
    """The parity rule for attention over a KV cache (after any append): out (B, Lq, Hq, Ev), lse
    (B, Hq, Lq) against `attention_with_kvcache_ref` (is_causal, window, scale as its keywords).
    Returns a list of ParityResult."""
    from .reference import attention_with_kvcache_ref, kvcache_keys

    args = (q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx)
    r_out, r_lse = attention_with_kvcache_ref(*args, upcast=False, reorder_ops=q.dtype == torch.float64,
                                              **ref_kwargs)
    t_out, t_lse = attention_with_kvcache_ref(*args, upcast=True, **ref_kwargs)
    n = max(q.shape[1], int(seqlens_k.max()) if seqlens_k.numel() else 0, q.shape[-1], v_cache.shape[-1])
    scale = ref_kwargs.get("scale")
    lens = seqlens_k.tolist()
    magnitude = max((score_scale(q[b].transpose(0, 1), kvcache_keys(k_cache, v_cache, b, lens[b], block_table,
                                                                    cache_batch_idx)[0].transpose(0, 1), None, scale)
                     for b in range(q.shape[0])), default=0.0)
    return [parity("out", out, r_out, t_out, n), parity("lse", lse, r_lse, t_lse, n, magnitude)]


# The harness for other people's attention functions (harness.py, on the rule above), reached
# from here: `from attnfast.testing import check_attention` (loaded on first use: harness.py
# imports this module).
_HARNESS = ("Case", "CaseResult", "CaseRun", "Report", "check_attention", "default_cases", "run_case", "sweep")


def __getattr__(name):
    if name in _HARNESS:
        from . import harness

        return getattr(harness, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
