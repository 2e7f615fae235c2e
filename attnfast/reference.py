"""The one naive reference: matmul, mask to -inf, softmax, matmul.

Every backend, test and benchmark is checked against `attention_ref`.  With
`upcast=True` it computes in float64 (the truth); with `upcast=False` it
computes in the input dtype, which gives the error a same-precision naive
implementation makes (the yardstick the parity rule compares kernels with).
"""
from __future__ import annotations

import math

import torch

ALIGNMENTS = ("top_left", "bottom_right")


def visible_mask(Lq, Lk, *, is_causal=False, causal_alignment="top_left", window=None, device=None):
    """Bool (Lq, Lk): True where query i may see key j under causal/window rules.

    The diagonal is j = i (top_left, torch's `is_causal`) or j = i + Lk - Lq
    (bottom_right, FlashAttention's convention).  `window=(left, right)` keeps
    keys with diag - left <= j <= diag + right; -1 or None is unbounded.
    Returns None when every key is visible.
    """
    left, right = window if window is not None else (-1, -1)
    left = -1 if left is None else int(left)
    right = -1 if right is None else int(right)
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    if left < 0 and right < 0:
        return None
    diag = Lk - Lq if causal_alignment == "bottom_right" else 0
    i = torch.arange(Lq, device=device).unsqueeze(-1) + diag
    j = torch.arange(Lk, device=device).unsqueeze(0)
    vis = torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    if left >= 0:
        vis &= j >= i - left
    if right >= 0:
        vis &= j <= i + right
    return vis


def attention_ref(
    q,
    k,
    v,
    attn_mask=None,
    is_causal=False,
    causal_alignment="top_left",
    window=None,
    scale=None,
    enable_gqa=False,
    dropout_mask=None,
    upcast=True,
    reorder_ops=False,
):
    """Naive attention returning `(out, lse)`.

    q: (..., Hq, Lq, E), k: (..., Hkv, Lk, E), v: (..., Hkv, Lk, Ev).
    attn_mask: bool (True = take part) or float (added to the scores),
    broadcastable to (..., Hq, Lq, Lk).  dropout_mask: per-element multipliers
    of the probabilities (0 for dropped, 1/(1-p) for kept), as built by
    `attnfast.testing.dropout_mask`.  Fully masked rows give out 0, lse -inf.
    `lse` is the natural-log logsumexp of the masked, scaled scores.
    `reorder_ops=True` computes the same maths in another order (q scaled
    before the product, probabilities by max-shifted softmax, out = (vᵀpᵀ)ᵀ),
    so it rounds differently: the same-precision yardstick for float64, where
    upcasting changes nothing.
    """
    dtype = torch.float64 if upcast else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    if q.dim() >= 3 and k.size(-3) != q.size(-3):
        if not enable_gqa:
            raise ValueError("key/value heads differ from query heads; pass enable_gqa=True")
        rep = q.size(-3) // k.size(-3)
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    Lq, Lk = q.size(-2), k.size(-2)
    if reorder_ops:
        s = torch.matmul(q * scale, k.transpose(-2, -1))
    else:
        s = torch.matmul(q, k.transpose(-2, -1)) * scale
    vis = visible_mask(
        Lq, Lk, is_causal=is_causal, causal_alignment=causal_alignment, window=window, device=q.device
    )
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            vis = attn_mask if vis is None else (vis & attn_mask)
        else:
            s = s + attn_mask.to(dtype)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    if Lk == 0:
        s = s.new_full(s.shape[:-1] + (1,), float("-inf"))
    # Rows with no visible key: lse -inf, p 0, and no NaN in any gradient (the
    # logsumexp of such a row is taken over zeros and then replaced).
    dead = torch.isneginf(s.amax(dim=-1))
    lse = torch.logsumexp(torch.where(dead.unsqueeze(-1), torch.zeros_like(s), s), dim=-1)
    lse = lse.masked_fill(dead, float("-inf"))
    if reorder_ops:
        p = torch.softmax(torch.where(dead.unsqueeze(-1), torch.zeros_like(s), s), dim=-1)
        p = p.masked_fill(dead.unsqueeze(-1), 0.0)
    else:
        p = torch.exp(s - lse.masked_fill(dead, 0.0).unsqueeze(-1))
    if Lk == 0:
        p = p[..., :0]
    if dropout_mask is not None:
        p = p * dropout_mask.to(dtype)
    if reorder_ops:
        out = torch.matmul(v.transpose(-2, -1), p.transpose(-2, -1)).transpose(-2, -1)
    else:
        out = torch.matmul(p, v)
    return out, lse
