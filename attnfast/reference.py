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
    q, k, v, scale = _prepare_qkv(q, k, v, scale, enable_gqa, upcast)
    Lq, Lk = q.size(-2), k.size(-2)
    if reorder_ops:
        s = torch.matmul(q * scale, k.transpose(-2, -1))
    else:
        s = torch.matmul(q, k.transpose(-2, -1)) * scale
    vis = visible_mask(
        Lq, Lk, is_causal=is_causal, causal_alignment=causal_alignment, window=window, device=q.device
    )
    return _softmax_attend(_apply_mask(s, attn_mask, vis), v, dropout_mask, reorder_ops)


def _prepare_qkv(q, k, v, scale, enable_gqa, upcast):
    """q, k, v in the computing dtype (float64 with upcast), key/value heads repeated
    to the query heads (GQA), and the default scale 1/sqrt(E)."""
    dtype = torch.float64 if upcast else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    if q.dim() >= 3 and k.size(-3) != q.size(-3):
        if not enable_gqa:
            raise ValueError("key/value heads differ from query heads; pass enable_gqa=True")
        rep = q.size(-3) // k.size(-3)
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    return q, k, v, scale


def _apply_mask(s, attn_mask, vis):
    """Scores with a float mask added and hidden entries (bool mask False, vis False) at -inf."""
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            vis = attn_mask if vis is None else (vis & attn_mask)
        else:
            s = s + attn_mask.to(s.dtype)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    return s


def _softmax_attend(s, v, dropout_mask=None, reorder_ops=False):
    """(out, lse) from masked scores s (..., Lq, Lk) and values v (..., Lk, Ev) of s's dtype."""
    dtype, Lk = s.dtype, v.size(-2)
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


def additive_scores(qp, kp, v_a, reorder_ops=False):
    """Bahdanau scores s[..., i, j] = sum_d v_a[d] tanh(qp[..., i, d] + kp[..., j, d]).

    qp (..., H, Lq, Da), kp (..., H, Lk, Da): the projected queries and keys;
    v_a (Da,) or (H, Da).  Materialises the (..., H, Lq, Lk, Da) tensor.
    reorder_ops: the sum over d as a matrix product (another rounding order)."""
    t = torch.tanh(qp.unsqueeze(-2) + kp.unsqueeze(-3))
    if reorder_ops:
        va = v_a.unsqueeze(-1) if v_a.dim() == 1 else v_a.unsqueeze(-2).unsqueeze(-1)  # (H, 1, Da, 1)
        return torch.matmul(t, va).squeeze(-1)
    va = v_a if v_a.dim() == 1 else v_a.unsqueeze(-2).unsqueeze(-2)  # (H, 1, 1, Da)
    return (t * va).sum(-1)


def additive_attention_ref(q, k, v, w_q, w_k, v_a, attn_mask=None, is_causal=False, upcast=True,
                           reorder_ops=False):
    """Naive additive (Bahdanau) attention returning `(out, lse)`.

    q (..., H, Lq, Eq), k (..., H, Lk, Ek), v (..., H, Lk, Ev); w_q (Da, Eq) or
    (H, Da, Eq), w_k (Da, Ek) or (H, Da, Ek), v_a (Da,) or (H, Da) (shared by
    every head, or one per head).  s[i, j] = v_aᵀ tanh(W_q q_i + W_k k_j),
    masked like `attention_ref` (bool: True takes part; float: added; causal:
    top-left), softmax over j, out = Σ_j p[i, j] v_j.  Fully masked rows give
    out 0 and lse -inf.  reorder_ops: the same maths in another rounding order
    (the float64 same-precision yardstick, as in `attention_ref`).
    """
    dtype = torch.float64 if upcast else q.dtype
    q, k, v, w_q, w_k, v_a = (t.to(dtype) for t in (q, k, v, w_q, w_k, v_a))
    if reorder_ops:  # (W qᵀ)ᵀ
        qp = torch.matmul(w_q, q.transpose(-1, -2)).transpose(-1, -2)
        kp = torch.matmul(w_k, k.transpose(-1, -2)).transpose(-1, -2)
    else:
        qp = torch.matmul(q, w_q.transpose(-1, -2))  # (..., H, Lq, Da)
        kp = torch.matmul(k, w_k.transpose(-1, -2))  # (..., H, Lk, Da)
    s = additive_scores(qp, kp, v_a, reorder_ops)
    vis = visible_mask(q.size(-2), k.size(-2), is_causal=is_causal, device=q.device)
    return _softmax_attend(_apply_mask(s, attn_mask, vis), v, reorder_ops=reorder_ops)


def topk_select(s, top_k):
    """Bool mask of each row's `top_k` highest finite scores; ties go to the lower key
    index (a stable descending sort keeps equal scores in index order).  Rows with
    fewer than `top_k` visible keys keep all of them."""
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :top_k]
    sel = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, order, True)
    return sel & ~torch.isneginf(s)


def topk_attention_ref(q, k, v, top_k, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                       upcast=True, reorder_ops=False):
    """Naive hard (top-k) attention returning `(out, lse)`.

    Scores as `attention_ref` (scaled q·k, float mask added, bool/causal
    entries hidden); each query keeps its `top_k` highest visible scores (ties
    to the lower key index, see `topk_select`), softmax over those.  The
    selection is made without gradient: the backward is the straight-through
    one of softmax attention over the selected entries.  reorder_ops as in
    `attention_ref`.
    """
    q, k, v, scale = _prepare_qkv(q, k, v, scale, enable_gqa, upcast)
    s = torch.matmul(q * scale, k.transpose(-2, -1)) if reorder_ops else torch.matmul(q, k.transpose(-2, -1)) * scale
    vis = visible_mask(q.size(-2), k.size(-2), is_causal=is_causal, device=q.device)
    s = _apply_mask(s, attn_mask, vis)
    with torch.no_grad():
        sel = topk_select(s, top_k)
    return _softmax_attend(s.masked_fill(~sel, float("-inf")), v, reorder_ops=reorder_ops)


def attention_bwd_ref(dout, q, k, v, lse, delta, attn_mask=None, scale=None, window=None, bottom_right=False):
    """(dq, dk, dv) of softmax attention from the forward's lse and delta = rowsum(dout * out),
    both of the whole rows, naively: P = exp(S - lse), dS = P * (dP - delta).

    q (B, Hq, Lq, E), k (B, Hkv, Lk, E), v (B, Hkv, Lk, Ev) (Hq a multiple of Hkv);
    attn_mask, window and the alignment as `attention_ref`.  Given the lse and delta of
    whole rows, it also gives one block of keys' share of the gradients (ring attention).
    Arithmetic in float32 (float64 for float64); gradients in q's dtype."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    g = Hq // Hkv if Hkv else 1
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    qa, ka, va, do = (t.to(acc) for t in (q, k, v, dout))
    kr, vr = ka.repeat_interleave(g, 1), va.repeat_interleave(g, 1)
    s = (qa @ kr.transpose(-1, -2)) * scale
    vis = visible_mask(Lq, Lk, causal_alignment="bottom_right" if bottom_right else "top_left", window=window,
                       device=q.device)
    s = _apply_mask(s, attn_mask, vis)
    lse = lse.to(acc).unsqueeze(-1)
    p = torch.where(torch.isneginf(lse), torch.zeros_like(s), torch.exp(s - lse))
    dp = do @ vr.transpose(-1, -2)
    ds = p * (dp - delta.to(acc).unsqueeze(-1))
    dq = (ds @ kr) * scale
    dk = ((ds.transpose(-1, -2) @ qa) * scale).view(B, Hkv, g, Lk, -1).sum(2)
    dv = (p.transpose(-1, -2) @ do).view(B, Hkv, g, Lk, -1).sum(2)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


def kvcache_keys(k_cache, v_cache, b, n, block_table=None, cache_batch_idx=None):
    """The first n keys and values of batch entry b of a KV cache: (n, Hkv, E), (n, Hkv, Ev).

    k_cache, v_cache: (B_cache, S, Hkv, D), entry cache_batch_idx[b] (else b); or
    page pools (pages, page_size, Hkv, D) with block_table (B, max_pages)."""
    if block_table is not None:
        page = k_cache.shape[1]
        pages = block_table[b, :(n + page - 1) // page].long()
        k = k_cache[pages].reshape((-1,) + tuple(k_cache.shape[2:]))[:n]
        v = v_cache[pages].reshape((-1,) + tuple(v_cache.shape[2:]))[:n]
        return k, v
    row = int(cache_batch_idx[b]) if cache_batch_idx is not None else b
    return k_cache[row, :n], v_cache[row, :n]


def attention_with_kvcache_ref(q, k_cache, v_cache, seqlens_k, block_table=None, cache_batch_idx=None,
                               is_causal=False, window=None, scale=None, upcast=True, reorder_ops=False):
    """Naive attention over a KV cache (nothing appended here): entry b of q (B, Lq, Hq, E)
    attends to the first seqlens_k[b] keys of its cache entry, bottom-right aligned.
    Returns (out (B, Lq, Hq, Ev), lse (B, Hq, Lq))."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        k, v = kvcache_keys(k_cache, v_cache, b, int(seqlens_k[b]), block_table, cache_batch_idx)
        o, l = attention_ref(q[b].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=is_causal,
                             causal_alignment="bottom_right", window=window, scale=scale, enable_gqa=True,
                             upcast=upcast, reorder_ops=reorder_ops)
        outs.append(o.transpose(0, 1))
        lses.append(l)
    if not outs:  # an empty batch
        dtype = torch.float64 if upcast else q.dtype
        return (q.new_empty(q.shape[:3] + v_cache.shape[3:], dtype=dtype),
                q.new_empty((0, q.shape[2], q.shape[1]), dtype=dtype))
    return torch.stack(outs), torch.stack(lses)


def varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k=None, is_causal=False,
                         causal_alignment="top_left", window=None, scale=None, dropout_masks=None, upcast=True,
                         reorder_ops=False):
    """Naive attention of packed sequences, one at a time: q (total_q, Hq, E), k (total_k, Hkv, E),
    v (total_k, Hkv, Ev); dropout_masks: one (Hq, Lq_i, Lk_i) multiplier tensor per sequence, or None.
    Returns (out (total_q, Hq, Ev), lse (Hq, total_q))."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for i in range(len(cq) - 1):
        n = ck[i + 1] - ck[i] if seqused_k is None else int(seqused_k[i])
        o, l = attention_ref(q[cq[i]:cq[i + 1]].transpose(0, 1), k[ck[i]:ck[i] + n].transpose(0, 1),
                             v[ck[i]:ck[i] + n].transpose(0, 1), is_causal=is_causal,
                             causal_alignment=causal_alignment, window=window, scale=scale, enable_gqa=True,
                             dropout_mask=None if dropout_masks is None else dropout_masks[i], upcast=upcast,
                             reorder_ops=reorder_ops)
        outs.append(o.transpose(0, 1))
        lses.append(l)
    if not outs:
        return q.new_empty((0, q.shape[1], v.shape[2])), q.new_empty((q.shape[1], 0))
    return torch.cat(outs, 0), torch.cat(lses, 1)
