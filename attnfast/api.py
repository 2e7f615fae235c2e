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
