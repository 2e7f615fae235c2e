"""Public entry points: the SDPA drop-in and the richer `attention`."""
from __future__ import annotations

import torch

from . import dispatch, ops
from ._validate import prepare
from .reference import attention_ref
from .testing import draw_rng


def _run(plan, backend, return_lse):
    name = dispatch.choose(plan, backend)
    # The (seed, offset) pair: on the host for Triton (kernel scalars), on the
    # inputs' device for the C++ kernels.
    rng = draw_rng("cpu" if name == "triton" else plan.q.device) if plan.dropout_p > 0.0 else None
    if name == "reference":
        dmask = None
        if rng is not None:
            from .testing import dropout_mask

            dmask = dropout_mask(tuple(plan.q.shape[:3]) + (plan.k.shape[2],), plan.dropout_p, rng,
                                 plan.q.device)
        out, lse = attention_ref(
            plan.q, plan.k, plan.v, plan.mask,
            window=(plan.window_left, plan.window_right),
            causal_alignment="bottom_right" if plan.bottom_right else "top_left",
            scale=plan.scale, enable_gqa=True, dropout_mask=dmask, upcast=False,
        )
    elif name == "triton":
        from . import triton_ops  # noqa: F401  (registers the ops; imports triton)

        seed, offset = (0, 0) if rng is None else (int(x) for x in rng.cpu().tolist())
        out, lse = torch.ops.attnfast.triton_fwd(
            plan.q, plan.k, plan.v, plan.mask, plan.scale, plan.window_left, plan.window_right,
            plan.bottom_right, plan.dropout_p, seed, offset)
    else:
        out, lse = torch.ops.attnfast.fwd(
            plan.q, plan.k, plan.v, plan.mask, plan.scale, plan.window_left, plan.window_right,
            plan.bottom_right, plan.dropout_p, rng,
        )
    Lq, Ev = plan.q.shape[2], plan.v.shape[3]
    out = out.reshape(plan.lead + (Lq, Ev))
    if return_lse:
        return out, lse.to(ops.public_lse_dtype(plan.q.dtype)).reshape(plan.lead + (Lq,))
    return out


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention.

    Same signature and semantics; rows with no visible key give 0 (not NaN).
    `attn_mask` may be bool (True = take part), float (added to the scores),
    or a torch.nn.attention.bias.CausalBias.
    """
    plan = prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return _run(plan, None, False)


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
    return _run(plan, backend, return_lse)
