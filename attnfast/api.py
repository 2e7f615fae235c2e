"""Public entry points: the SDPA drop-in and the richer `attention`."""
from __future__ import annotations

import torch

from . import dispatch, ops
from ._validate import prepare

# The plain CPU call's checks and op call in C++ (csrc/cpu/binding.cpp, plain_sdpa): None
# when the CPU kernels are not the default choice here (what dispatch.choose would say).
_PLAIN_SDPA = ops._C.plain_sdpa if ops._C is not None and dispatch._CPU_FIRST else None


def _run(plan, backend, return_lse):
    """Run a validated Plan on the chosen Backend; output (and lse) in the caller's layout."""
    out, lse = backend.attention_forward(plan)
    Lq, Ev = plan.q.shape[2], plan.v.shape[3]
    if len(plan.lead) != 2:  # 4-D inputs: out is (B, Hq, Lq, Ev) already
        out = out.reshape(plan.lead + (Lq, Ev))
    if return_lse:
        return out, lse.to(dispatch.public_lse_dtype(plan.q.dtype)).reshape(plan.lead + (Lq,))
    return out


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention.

    Same signature and semantics; rows with no visible key give 0 (not NaN).
    `attn_mask` may be bool (True = take part), float (added to the scores),
    or a torch.nn.attention.bias.CausalBias.
    """
    if _PLAIN_SDPA is not None and not torch.compiler.is_compiling():
        out = _PLAIN_SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if out is not None:
            return out
    plan = prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return _run(plan, dispatch.choose(plan), False)


def attention(q, k, v, *, attn_mask=None, is_causal=False, causal_alignment="top_left", window=None,
              scale=None, enable_gqa=False, dropout_p=0.0, return_lse=False, backend=None):
    """Fused attention with the extras FlashAttention users expect.

    causal_alignment: "top_left" (torch's is_causal) or "bottom_right" (the
    last query row sees the last key; FlashAttention, decoding).
    window: (left, right) sliding window around that diagonal; -1/None is
    unbounded on that side.
    return_lse: also return the logsumexp (natural log) of shape (..., Hq, Lq),
    float32 (float64 for float64 inputs); -inf for rows with no visible key.
    backend: "cpu", "triton", "cuda" or "reference"; default chooses.
    """
    plan = prepare(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_alignment, window)
    return _run(plan, dispatch.choose(plan, backend), return_lse)


def _check_cu(name, cu, total, n_other=None):
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be a 1-D int32/int64 tensor of cumulative sequence lengths")
    if cu.numel() < 1 or (n_other is not None and cu.numel() != n_other):
        raise ValueError(f"{name} must have batch+1 entries (got {cu.numel()}, expected {n_other})")
    vals = cu.tolist()
    if vals[0] != 0 or vals[-1] != total or any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name} must start at 0, never decrease and end at the packed length {total}: {vals}")
    return vals


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, is_causal=False,
                     causal_alignment="top_left", window=None, scale=None, dropout_p=0.0, return_lse=False,
                     backend=None):
    """Attention over a batch of sequences of different lengths, packed without padding.

    q: (total_q, Hq, E), k: (total_k, Hkv, E), v: (total_k, Hkv, Ev); sequence
    i is rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and cu_seqlens_k[i]:
    cu_seqlens_k[i+1] of k and v.  Hq may be a multiple of Hkv (GQA/MQA).
    Returns out (total_q, Hq, Ev) and, with return_lse, lse (Hq, total_q).
    Each sequence runs as its own kernel call on views (no copies, no padding).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a packed (total_tokens, heads, head_dim) tensor, "
                             f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v must have the same number of tokens: {k.shape[0]} vs {v.shape[0]}")
    cq = _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    ck = _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0], len(cq))
    lens_q = [b - a for a, b in zip(cq, cq[1:])]
    lens_k = [b - a for a, b in zip(ck, ck[1:])]
    if max(lens_q, default=0) > max_seqlen_q or max(lens_k, default=0) > max_seqlen_k:
        raise ValueError(f"max_seqlen_q/max_seqlen_k ({max_seqlen_q}, {max_seqlen_k}) are below the longest "
                         f"sequences ({max(lens_q, default=0)}, {max(lens_k, default=0)})")
    outs, lses = [], []
    for i in range(len(cq) - 1):
        qi = q[cq[i]:cq[i + 1]].transpose(0, 1)  # (Hq, Lq_i, E): a view
        ki = k[ck[i]:ck[i + 1]].transpose(0, 1)
        vi = v[ck[i]:ck[i + 1]].transpose(0, 1)
        o, l = attention(qi, ki, vi, is_causal=is_causal, causal_alignment=causal_alignment, window=window,
                         scale=scale, enable_gqa=True, dropout_p=dropout_p, return_lse=True, backend=backend)
        outs.append(o.transpose(0, 1))
        lses.append(l)
    out = torch.cat(outs, 0) if outs else q.new_empty((0, q.shape[1], v.shape[2]))
    if return_lse:
        lse = torch.cat(lses, 1) if lses else q.new_empty((q.shape[1], 0), dtype=torch.float32)
        return out, lse
    return out
