"""The other attention families: additive (Bahdanau) and hard (top-k) attention.

    out = attnfast.additive_attention(q, k, v, w_q, w_k, v_a, is_causal=False)
    out = attnfast.topk_attention(q, k, v, top_k=32, is_causal=True)

Both are exact (they match `attention_ref`-style references in
attnfast/reference.py by the parity rule) and never hold the whole score
tensor.  Each has three backends:
  "cpu"    fused C++ kernels (csrc/cpu/additive_kernel.h: projections once,
           then tanh scores block by block with an online softmax, O(L·Da)
           memory; csrc/cpu/topk_kernel.h: per-row top-k candidate lists over
           streamed score tiles, then softmax over the kept keys);
  "triton" the same two designs in Triton (triton_kernels/additive.py,
           triton_kernels/topk.py), for CUDA tensors;
  "torch"  queries in row chunks sized to a fixed budget, each chunk
           recomputed in the backward (activation checkpointing): memory
           O(chunk) instead of O(Lq·Lk·Da) (additive) or O(Lq·Lk) (top-k).
The default is the fused kernel of the tensors' device.  The arithmetic runs
in float32 for half types.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from . import ops
from ._validate import FLOAT_DTYPES, check_mask
from .reference import _apply_mask, _softmax_attend, additive_scores, topk_select

# Elements of the largest intermediate of one chunk (the (rows, Lk, Da) tanh argument for
# additive attention, the (rows, Lk) scores for top-k), summed over the batch and heads.
CHUNK_ELEMENTS = 1 << 22


def _check_tensor(name, t, ref=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if ref is not None:
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must match query dtype {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but query is on {ref.device}")


def _check_qkv(q, k, v, same_head_dim):
    _check_tensor("query", q)
    for name, t in (("key", k), ("value", v)):
        _check_tensor(name, t, q)
    if q.dim() < 3 or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"query, key and value must be (..., H, L, E) with the same number of dims (>= 3), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:-3] != q.shape[:-3] or v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"key {tuple(k.shape)} and value {tuple(v.shape)} must share query's batch dims "
                         f"{tuple(q.shape[:-3])}, and each other's heads and length")
    if same_head_dim and k.shape[-1] != q.shape[-1]:
        raise ValueError(f"key head dim must equal query head dim {q.shape[-1]}: key shape {tuple(k.shape)}")


def _compute_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


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


BACKENDS = ("cpu", "triton", "torch")


def _triton_refuses(q, mask):
    """None if the Triton kernels can take q (and mask), else why not."""
    from .dispatch import _AVAILABLE

    ok, reason = _AVAILABLE["triton"]
    if not ok:
        return reason
    dev = q.device.type
    if dev != "cuda" and not (dev == "cpu" and reason.startswith("Triton kernels under the interpreter")):
        return f"it serves CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {dev} tensors"
    if q.dtype == torch.float64:
        return "float64 is not supported by the Triton kernels"
    if mask is not None and mask.requires_grad:
        return "the fused kernels give no gradient to a float attn_mask"
    return None


def _choose(backend, q, refusals):
    """The backend to run: `backend` if given (it must serve the call), else the fused kernel
    for q's device (CPU: "cpu", CUDA: "triton") where it serves, else "torch".  refusals:
    {name: None if it serves the call, else why not}."""
    if backend is None:
        fused = {"cpu": "cpu", "cuda": "triton"}.get(q.device.type)
        return fused if fused is not None and refusals[fused] is None else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if refusals.get(backend) is not None:
        from .dispatch import BackendUnavailableError

        raise BackendUnavailableError(f"backend={backend!r} cannot serve this call: {refusals[backend]}")
    return backend


def _cpu_refuses(q, mask, dtypes, what):
    if q.device.type != "cpu":
        return f"it serves CPU tensors, got {q.device.type} tensors"
    if not ops.loaded():
        return "the extension attnfast._C is not built"
    if q.dtype not in dtypes:
        return f"the fused {what} kernel takes " + ", ".join(str(d).split(".")[-1] for d in dtypes)
    if mask is not None and mask.requires_grad:
        return "the fused kernels give no gradient to a float attn_mask"
    return None


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
    in a float mask).  backend: "cpu" (the fused kernel) or "torch" (row
    chunks); default: "cpu" where it serves.
    """
    _check_qkv(q, k, v, same_head_dim=False)
    H, Lq, Eq = q.shape[-3:]
    Lk, Ek = k.shape[-2:]
    for name, w, e in (("w_q", w_q, Eq), ("w_k", w_k, Ek)):
        _check_tensor(name, w, q)
        if w.dim() not in (2, 3) or w.shape[-1] != e or (w.dim() == 3 and w.shape[0] != H):
            raise ValueError(f"{name} must be (Da, {e}) or ({H}, Da, {e}) (heads, attention dim, "
                             f"{'query' if name == 'w_q' else 'key'} head dim), got {tuple(w.shape)}")
    Da = w_q.shape[-2]
    if w_k.shape[-2] != Da:
        raise ValueError(f"w_q and w_k must project to the same attention dim: {Da} vs {w_k.shape[-2]}")
    _check_tensor("v_a", v_a, q)
    if v_a.shape not in ((Da,), (H, Da)):
        raise ValueError(f"v_a must be ({Da},) or ({H}, {Da}), got {tuple(v_a.shape)}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a Python bool, got {type(is_causal).__name__}")
    mask = None
    if attn_mask is not None:
        mask = check_mask(attn_mask, q, tuple(q.shape[:-1]) + (Lk,), "(..., H, Lq, Lk)", "a torch.Tensor")
    name = _choose(backend, q, {"cpu": _cpu_refuses(q, mask, (torch.float32, torch.bfloat16, torch.float16),
                                                    "additive"),
                                "triton": _triton_refuses(q, mask), "torch": None})
    cd = _compute_dtype(q.dtype)
    # Project once: (..., H, L, Da).  The projections are ordinary matmuls under autograd.
    qp = torch.matmul(q.to(cd), w_q.to(cd).transpose(-1, -2))
    kp = torch.matmul(k.to(cd), w_k.to(cd).transpose(-1, -2))
    lead = math.prod(q.shape[:-2])
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if name != "torch":
        B = lead // H if H else 0
        bias = None
        if mask is not None:
            m = mask.detach()
            m = torch.zeros((), dtype=cd, device=q.device).masked_fill(~m, float("-inf")) \
                if m.dtype == torch.bool else m.to(cd)
            bias = m.expand(tuple(q.shape[:-1]) + (Lk,)).reshape(B, H, Lq, Lk)
        if name == "triton":
            from . import triton_additive  # noqa: F401  (registers the ops; imports triton)
        op = torch.ops.attnfast.additive_fwd if name == "cpu" else torch.ops.attnfast.triton_additive_fwd
        out, lse = op(qp.reshape(B, H, Lq, Da), kp.reshape(B, H, Lk, Da), v_a.to(cd).expand(H, Da),
                      v.to(cd).reshape(B, H, Lk, v.shape[-1]), bias, is_causal)
        out = out.reshape(q.shape[:-1] + (v.shape[-1],)).to(q.dtype)
        return (out, lse.reshape(q.shape[:-1]).to(lse_dtype)) if return_lse else out

    def rows_fn(i0, n, qp, kp, va, v, mask):
        s = additive_scores(qp.narrow(-2, i0, n), kp, va)
        vis = _causal_rows(i0, n, Lk, q.device) if is_causal else None
        m = None if mask is None else mask.expand(tuple(q.shape[:-1]) + (Lk,)).narrow(-2, i0, n)
        return _softmax_attend(_apply_mask(s, m, vis), v)

    rows = _rows_per_chunk(lead * Lk * Da, Lq)
    out, lse = _run_chunks(rows_fn, Lq, rows, qp, kp, v_a.to(cd), v.to(cd), mask)
    out = out.to(q.dtype)
    return (out, lse.to(lse_dtype)) if return_lse else out


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
    P V over those only; or "torch" (row chunks).  Default: the fused kernel of
    the tensors' device where it serves (not for a float mask that requires
    grad), else "torch".
    """
    _check_qkv(q, k, v, same_head_dim=True)
    Hq, Lq, E = q.shape[-3:]
    Hkv, Lk = k.shape[-3], k.shape[-2]
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= Lk:
        raise ValueError(f"top_k must be in [1, Lk] = [1, {Lk}], got {top_k}")
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError(f"key has {Hkv} heads but query has {Hq}: pass enable_gqa=True for grouped-query "
                             "attention")
        if Hq % Hkv:
            raise ValueError(f"enable_gqa needs query heads ({Hq}) to be a multiple of key/value heads ({Hkv})")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a Python bool, got {type(is_causal).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    mask = None
    if attn_mask is not None:
        mask = check_mask(attn_mask, q, tuple(q.shape[:-1]) + (Lk,), "(..., Hq, Lq, Lk)", "a torch.Tensor")
    name = _choose(backend, q, {"cpu": _cpu_refuses(q, mask, FLOAT_DTYPES, "top-k"),
                                "triton": _triton_refuses(q, mask), "torch": None})
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if name != "torch":
        B = math.prod(q.shape[:-3])
        m = None if mask is None else mask.detach().expand(tuple(q.shape[:-1]) + (Lk,)).reshape(B, Hq, Lq, Lk)
        if name == "triton":
            from . import triton_topk  # noqa: F401  (registers the ops; imports triton)
        op = torch.ops.attnfast.topk_fwd if name == "cpu" else torch.ops.attnfast.triton_topk_fwd
        out, lse, _ = op(q.reshape(B, Hq, Lq, E), k.reshape(B, Hkv, Lk, E), v.reshape(B, Hkv, Lk, v.shape[-1]), m,
                         is_causal, float(scale), top_k)
        out = out.reshape(q.shape[:-1] + (v.shape[-1],))
        return (out, lse.reshape(q.shape[:-1]).to(lse_dtype)) if return_lse else out
    cd = _compute_dtype(q.dtype)
    rep = Hq // Hkv

    def rows_fn(i0, n, q, k, v, mask):
        kr, vr = (k, v) if rep == 1 else (k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3))
        s = torch.matmul(q.narrow(-2, i0, n), kr.transpose(-1, -2)) * scale
        vis = _causal_rows(i0, n, Lk, q.device) if is_causal else None
        m = None if mask is None else mask.expand(tuple(q.shape[:-1]) + (Lk,)).narrow(-2, i0, n)
        s = _apply_mask(s, m, vis)
        with torch.no_grad():
            keep = topk_select(s, top_k)
        return _softmax_attend(s.masked_fill(~keep, float("-inf")), vr)

    rows = _rows_per_chunk(math.prod(q.shape[:-2]) * Lk, Lq)
    out, lse = _run_chunks(rows_fn, Lq, rows, q.to(cd), k.to(cd), v.to(cd), mask)
    out = out.to(q.dtype)
    return (out, lse.to(lse_dtype)) if return_lse else out
