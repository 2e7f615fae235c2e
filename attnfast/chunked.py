"""The reference backend's additive and top-k attention: exact, in torch, in row chunks.

The queries are taken in chunks of rows sized to a fixed budget, and each chunk is
recomputed in the backward (activation checkpointing), so memory is O(chunk)
instead of O(Lq·Lk·Da) (additive) or O(Lq·Lk) (top-k).  A float mask that
requires grad gets its gradient here (the fused kernels give it none).  The
arithmetic runs in float32 for half types.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ._validate import compute_dtype
from .reference import _apply_mask, _softmax_attend, additive_scores, topk_select

# Elements of the largest intermediate of one chunk (the (rows, Lk, Da) tanh argument for
# additive attention, the (rows, Lk) scores for top-k), summed over the batch and heads.
CHUNK_ELEMENTS = 1 << 22


def _rows_per_chunk(per_row, Lq):
    return max(1, min(Lq, CHUNK_ELEMENTS // max(1, per_row)))


def _causal_rows(i0, rows, Lk, device):
    """Top-left causal visibility of query rows i0..i0+rows-1: (rows, Lk) bool."""
    return torch.arange(Lk, device=device).unsqueeze(0) <= torch.arange(i0, i0 + rows, device=device).unsqueeze(1)


def _run_chunks(rows_fn, Lq, rows, *tensors):
    """(out, lse) of every query chunk, concatenated; each chunk recomputed in the
    backward when gradients are needed (rows_fn(i0, n, *tensors) -> (out, lse))."""
    outs, lses = [], []
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    for i0 in range(0, Lq, rows):
        n = min(rows, Lq - i0)
        if grad:
            o, l = checkpoint(rows_fn, i0, n, *tensors, use_reentrant=False)
        else:
            o, l = rows_fn(i0, n, *tensors)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, -2), torch.cat(lses, -1)


def _mask_rows(mask, i0, n):
    return None if mask is None else mask.narrow(-2, i0, n)


def additive_chunked(plan):
    """(out, lse) of an AdditivePlan, both in the compute dtype."""
    qp, kp, va, v = plan.projections()
    B, H, Lq, Da = qp.shape
    Lk = kp.shape[2]

    def rows_fn(i0, n, qp, kp, va, v, mask):
        s = additive_scores(qp.narrow(-2, i0, n), kp, va)
        vis = _causal_rows(i0, n, Lk, qp.device) if plan.is_causal else None
        return _softmax_attend(_apply_mask(s, _mask_rows(mask, i0, n), vis), v)

    return _run_chunks(rows_fn, Lq, _rows_per_chunk(B * H * Lk * Da, Lq), qp, kp, va, v, plan.mask)


def topk_chunked(plan):
    """(out, lse) of a TopkPlan, both in the compute dtype."""
    cd = compute_dtype(plan.q.dtype)
    B, Hq, Lq, _ = plan.q.shape
    Hkv, Lk = plan.k.shape[1], plan.k.shape[2]
    rep = Hq // Hkv

    def rows_fn(i0, n, q, k, v, mask):
        kr, vr = (k, v) if rep == 1 else (k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3))
        s = torch.matmul(q.narrow(-2, i0, n), kr.transpose(-1, -2)) * plan.scale
        vis = _causal_rows(i0, n, Lk, q.device) if plan.is_causal else None
        s = _apply_mask(s, _mask_rows(mask, i0, n), vis)
        with torch.no_grad():
            keep = topk_select(s, plan.top_k)
        return _softmax_attend(s.masked_fill(~keep, float("-inf")), vr)

    return _run_chunks(rows_fn, Lq, _rows_per_chunk(B * Hq * Lk, Lq), plan.q.to(cd), plan.k.to(cd),
                       plan.v.to(cd), plan.mask)
