"""torch.library registration of the C++ ops (attnfast._C): fake kernels and autograd.

attnfast::fwd's autograd is in C++ (csrc/autograd.cpp: a Python autograd kernel
costs more per call than a small attention); the additive and top-k ops' is here.

The schemas and the CPU kernels are registered in C++ (csrc/cpu/binding.cpp), the
CUDA kernels of attnfast::fwd/bwd in csrc/cuda/binding_cuda.cpp when the extension
is built with CUDA; this module adds what torch.compile and autograd need.  The
Triton ops register themselves in triton_kernels/ (attention.py, additive.py,
topk.py).
Ops:
  attnfast::fwd(q, k, v, attn_mask, scale, window_left, window_right,
                bottom_right, dropout_p, rng) -> (out, lse)
  attnfast::bwd(dout, q, k, v, out, lse, dlse, attn_mask, scale, window_left,
                window_right, bottom_right, dropout_p, rng, mask_grad, delta=None)
                -> (dq, dk, dv, dmask)
Shapes: q (B, Hq, Lq, E), k (B, Hkv, Lk, E), v (B, Hkv, Lk, Ev); out
(B, Hq, Lq, Ev) contiguous; lse (B, Hq, Lq) float64 for float32/float64
inputs (the backward recomputes P from it, and a float32 lse would cost
float32 gradients several ulps), float32 for half types; dmask (B, Hq, Lq, Lk)
in the accumulation dtype (float64 for float64, else float32) when mask_grad,
else empty.  delta (B, Hq, Lq), lse's dtype: the caller's rowsum(dout * out), used
in place of the kernels' own row sums (ring attention passes it: there one call's
keys are only some of a row's).  The public API returns lse as float32 (float64 for
float64: dispatch.public_lse_dtype).
"""
from __future__ import annotations

import torch

_LOAD_ERROR = None
try:
    from . import _C  # noqa: F401  (registers the schemas and kernels)
except ImportError as e:  # extension not built: only the reference backend works
    _C = None
    _LOAD_ERROR = str(e)


def loaded():
    return _C is not None


def load_error():
    return _LOAD_ERROR


def lse_dtype(dtype):
    """dtype of the lse these ops save: float64 for float32/float64 inputs, else float32."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def acc_dtype(dtype):
    """Accumulation dtype (a float mask's gradient; torch-side sums): float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


if _C is not None:

    @torch.library.register_fake("attnfast::fwd")
    def _fwd_fake(q, k, v, attn_mask, scale, window_left, window_right, bottom_right, dropout_p, rng):
        B, Hq, Lq, _ = q.shape
        out = q.new_empty((B, Hq, Lq, v.shape[-1]))
        lse = q.new_empty((B, Hq, Lq), dtype=lse_dtype(q.dtype))
        return out, lse

    @torch.library.register_fake("attnfast::bwd")
    def _bwd_fake(dout, q, k, v, out, lse, dlse, attn_mask, scale, window_left, window_right,
                  bottom_right, dropout_p, rng, mask_grad, delta=None):
        B, Hq, Lq, _ = q.shape
        Lk = k.shape[2]
        dq = q.new_empty(q.shape)  # contiguous, like the kernel's outputs
        dk = k.new_empty(k.shape)
        dv = v.new_empty(v.shape)
        dmask = q.new_empty((B, Hq, Lq, Lk) if mask_grad else (0,), dtype=acc_dtype(q.dtype))
        return dq, dk, dv, dmask

    # Additive attention (csrc/cpu/additive_kernel.h): float32 qp, kp, va, v; lse float64.
    @torch.library.register_fake("attnfast::additive_fwd")
    def _additive_fwd_fake(qp, kp, va, v, mask, causal):
        B, H, Lq, _ = qp.shape
        return qp.new_empty((B, H, Lq, v.shape[-1])), qp.new_empty((B, H, Lq), dtype=torch.float64)

    @torch.library.register_fake("attnfast::additive_bwd")
    def _additive_bwd_fake(dout, qp, kp, va, v, mask, causal, out, lse, dlse):
        return (qp.new_empty(qp.shape), kp.new_empty(kp.shape), qp.new_empty(qp.shape[:2] + qp.shape[3:]),
                v.new_empty(v.shape))

    def _additive_setup(ctx, inputs, output):
        qp, kp, va, v, mask, causal = inputs
        ctx.save_for_backward(qp, kp, va, v, mask, *output)
        ctx.causal = causal

    def _additive_backward(ctx, dout, dlse):
        qp, kp, va, v, mask, out, lse = ctx.saved_tensors
        dqp, dkp, dva, dv = torch.ops.attnfast.additive_bwd(dout, qp, kp, va, v, mask, ctx.causal, out, lse, dlse)
        return dqp, dkp, dva.sum(0), dv, None, None  # dva per (batch, head) -> per head

    torch.library.register_autograd("attnfast::additive_fwd", _additive_backward, setup_context=_additive_setup)

    # Hard (top-k) attention (csrc/cpu/topk_kernel.h): lse as fwd's; idx int32 (B, Hq, Lq, top_k).
    @torch.library.register_fake("attnfast::topk_fwd")
    def _topk_fwd_fake(q, k, v, attn_mask, causal, scale, top_k):
        B, Hq, Lq, _ = q.shape
        return (q.new_empty((B, Hq, Lq, v.shape[-1])), q.new_empty((B, Hq, Lq), dtype=lse_dtype(q.dtype)),
                q.new_empty((B, Hq, Lq, top_k), dtype=torch.int32))

    @torch.library.register_fake("attnfast::topk_bwd")
    def _topk_bwd_fake(dout, q, k, v, attn_mask, scale, lse, idx, dlse):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _topk_setup(ctx, inputs, output):
        q, k, v, attn_mask, causal, scale, top_k = inputs
        _, lse, idx = output
        ctx.save_for_backward(q, k, v, attn_mask, lse, idx)
        ctx.scale = scale
        ctx.mark_non_differentiable(idx)

    def _topk_backward(ctx, dout, dlse, _didx):
        q, k, v, attn_mask, lse, idx = ctx.saved_tensors
        dq, dk, dv = torch.ops.attnfast.topk_bwd(dout, q, k, v, attn_mask, ctx.scale, lse, idx, dlse)
        return dq, dk, dv, None, None, None, None

    torch.library.register_autograd("attnfast::topk_fwd", _topk_backward, setup_context=_topk_setup)

    # Packed variable-length sequences (csrc/cpu/seqs.h): q (total_q, Hq, E) -> out (total_q, Hq, Ev),
    # lse (Hq, total_q) in lse_dtype.
    @torch.library.register_fake("attnfast::varlen_fwd")
    def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, scale,
                         window_left, window_right, bottom_right, dropout_p, rng):
        return (q.new_empty((q.shape[0], q.shape[1], v.shape[-1])),
                q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype(q.dtype)))

    @torch.library.register_fake("attnfast::varlen_bwd")
    def _varlen_bwd_fake(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                         max_seqlen_k, scale, window_left, window_right, bottom_right, dropout_p, rng):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _varlen_setup(ctx, inputs, output):
        q, k, v, cu_q, cu_k, used, max_q, max_k, scale, wl, wr, br, p, rng = inputs
        ctx.save_for_backward(q, k, v, *output, cu_q, cu_k, used, rng)
        ctx.args = (max_q, max_k, scale, wl, wr, br, p)

    def _varlen_backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k, used, rng = ctx.saved_tensors
        max_q, max_k, scale, wl, wr, br, p = ctx.args
        dq, dk, dv = torch.ops.attnfast.varlen_bwd(dout.contiguous(), q, k, v, out, lse, dlse, cu_q, cu_k, used,
                                                   max_q, max_k, scale, wl, wr, br, p, rng)
        return (dq, dk, dv) + (None,) * 11

    torch.library.register_autograd("attnfast::varlen_fwd", _varlen_backward, setup_context=_varlen_setup)

    # New keys and values written into a KV cache in place (mutates k_cache, v_cache; returns nothing).
    @torch.library.register_fake("attnfast::kvcache_append")
    def _kvcache_append_fake(k_cache, v_cache, k, v, seqlens, cache_batch_idx, block_table):
        return None

    # Attention over a KV cache, forward only: q (B, Lq, Hq, E) -> out (B, Lq, Hq, Ev), lse (B, Hq, Lq).
    @torch.library.register_fake("attnfast::kvcache_fwd")
    def _kvcache_fwd_fake(q, k_cache, v_cache, seqlens_k, cache_batch_idx, block_table, scale, window_left,
                          window_right, num_splits):
        B, Lq, Hq, _ = q.shape
        return q.new_empty((B, Lq, Hq, v_cache.shape[-1])), q.new_empty((B, Hq, Lq), dtype=lse_dtype(q.dtype))
