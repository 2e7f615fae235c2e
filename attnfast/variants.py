"""The other attention families: additive (Bahdanau) and hard (top-k) attention.

    out = attnfast.additive_attention(q, k, v, w_q, w_k, v_a, is_causal=False)
    out = attnfast.topk_attention(q, k, v, top_k=32, is_causal=True)

Both are exact (they match `attention_ref`-style references in
attnfast/reference.py by the parity rule) and never hold the whole score
tensor.  Validation is attnfast/_validate.py's, the choice attnfast/dispatch.py's,
with the backend names of every family:
  "cpu"        fused C++ kernels (csrc/cpu/additive_kernel.h: projections once,
               then tanh scores block by block with an online softmax, O(L·Da)
               memory; csrc/cpu/topk_kernel.h: per-row top-k candidate lists over
               streamed score tiles, then softmax over the kept keys);
  "triton"     the same two designs in Triton (triton_kernels/additive.py,
               triton_kernels/topk.py), for CUDA tensors;
  "reference"  queries in row chunks sized to a fixed budget, each chunk
               recomputed in the backward (attnfast/chunked.py): memory O(chunk)
               instead of O(Lq·Lk·Da) (additive) or O(Lq·Lk) (top-k).
The default is the fused kernel of the tensors' device where it serves (not for
a float mask that requires grad), else "reference".  The arithmetic runs in
float32 for half types.
"""
from __future__ import annotations

import warnings

from . import dispatch
from ._validate import prepare_additive, prepare_topk


def _backend_name(backend):
    if backend == "torch":  # the name of the reference path before the backends shared one vocabulary
        warnings.warn('backend="torch" is now backend="reference"', DeprecationWarning, stacklevel=3)
        return "reference"
    return backend


def _finish(plan, out, lse, return_lse):
    """Output (and lse) in the caller's layout and dtypes."""
    Lq, Ev = plan.q.shape[2], plan.v.shape[3]
    out = out.reshape(plan.lead + (Lq, Ev)).to(plan.q.dtype)
    if return_lse:
        return out, lse.reshape(plan.lead + (Lq,)).to(dispatch.public_lse_dtype(plan.q.dtype))
    return out


def additive_attention(q, k, v, w_q, w_k, v_a, *, attn_mask=None, is_causal=False, return_lse=False,
                       backend=None):
    """Additive (Bahdanau) attention: s[i, j] = v_aᵀ tanh(W_q q_i + W_k k_j), softmax over j,
    out_i = Σ_j p[i, j] v_j.

    q (..., H, Lq, Eq), k (..., H, Lk, Ek), v (..., H, Lk, Ev); w_q (Da, Eq) or
    (H, Da, Eq), w_k (Da, Ek) or (H, Da, Ek), v_a (Da,) or (H, Da) (one set
    shared by every head, or one per head).  attn_mask: bool (True takes part)
    or float (added to the scores), broadcastable to (..., H, Lq, Lk);
    is_causal: key j visible from query i iff j <= i.  Fully masked rows give 0.
    Returns out (..., H, Lq, Ev), and lse (..., H, Lq) (float32; float64 for
    float64) with return_lse.  Differentiable in q, k, v, w_q, w_k and v_a (not
    in a float mask).  backend: "cpu" or "triton" (the fused kernels) or
    "reference" (row chunks); default: the fused kernel of the tensors' device
    where it serves, else "reference".
    """
    plan = prepare_additive(q, k, v, w_q, w_k, v_a, attn_mask, is_causal)
    out, lse = dispatch.choose(plan, _backend_name(backend)).additive_forward(plan)
    return _finish(plan, out, lse, return_lse)


def topk_attention(q, k, v, top_k, *, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                   return_lse=False, backend=None):
    """Hard attention: each query attends to its `top_k` highest-scoring visible keys only.

    Scores are scaled dot products (scale default 1/sqrt(E)) plus a float mask;
    bool-masked and causally hidden keys (top-left, j <= i) are never chosen.
    Ties at the k-th score go to the lower key index; a row with fewer than
    top_k visible keys attends to all of them, a row with none gives 0.
    Softmax over the chosen keys; the backward is straight-through (the choice
    is held fixed: gradients reach q and k through the chosen scores only).
    q (..., Hq, Lq, E), k (..., Hkv, Lk, E), v (..., Hkv, Lk, Ev); enable_gqa
    as in scaled_dot_product_attention.  1 <= top_k <= Lk.  backend: "cpu"
    (fused C++ kernel), "triton" (fused Triton kernels; not float64): a first
    pass keeps each row's top_k keys (O(Lq * top_k) memory), then softmax and
    P V over those only; or "reference" (row chunks).  Default: the fused kernel of
    the tensors' device where it serves (not for a float mask that requires
    grad), else "reference".
    """
    plan = prepare_topk(q, k, v, top_k, attn_mask, is_causal, scale, enable_gqa)
    out, lse = dispatch.choose(plan, _backend_name(backend)).topk_forward(plan)
    return _finish(plan, out, lse, return_lse)
