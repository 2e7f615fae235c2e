"""torch.library registration of the Triton hard (top-k) attention kernels.

    out, lse = triton_topk_attention(q, k, v, top_k, mask=None, causal=False)

`attnfast::triton_topk_fwd` / `attnfast::triton_topk_bwd` are `triton_op`s
(the body launches the kernels of triton_kernels/topk.py through
`wrap_triton`, so torch.compile sees inside them and the body doubles as the
fake kernel); autograd links the two.  Semantics are those of
`attnfast.reference.topk_attention_ref`: each query keeps its top_k highest
visible scores (ties to the lower key index), softmax over those, and the
backward is straight-through (the choice held fixed).
"""
from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from .triton_kernels.topk import topk_bwd, topk_fwd

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(q, k, v, mask, top_k):
    """Clear errors for what the kernels cannot take (4-D tensors only)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, E), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{name} ({t.dtype}, {t.device}) must match q ({q.dtype}, {q.device})")
    B, Hq, Lq, E = q.shape
    if k.shape[0] != B or k.shape[3] != E or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k must be (B, Hkv, Lk, E) = ({B}, Hkv, Lk, {E}) and v (B, Hkv, Lk, Ev) with k's "
                         f"first three dims; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= Lk:
        raise ValueError(f"top_k must be an int in [1, Lk] = [1, {Lk}], got {top_k!r}")
    if mask is not None:
        if tuple(mask.shape) != (B, Hq, Lq, Lk):
            raise ValueError(f"mask must be expanded to (B, Hq, Lq, Lk) = {(B, Hq, Lq, Lk)}, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool and mask.dtype != q.dtype:
            raise TypeError(f"mask must be bool or q's dtype {q.dtype}, got {mask.dtype}")
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device} but q is on {q.device}")


class _NoLaunch:
    """A launcher that runs nothing (kernel[grid](...) is a no-op)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _launch(q):
    """wrap_triton, or under TRITON_INTERPRET=1 with fake/meta tensors (the op body
    serving as its own fake kernel) a launcher that runs nothing: the interpreter
    would run the kernel on the fake tensors' missing data, while wrap_triton only
    turns compiled kernels into traceable calls."""
    from .triton_kernels.topk import _interpreting

    if _interpreting() and (q.device.type == "meta" or is_fake(q)):
        return lambda kernel: _NoLaunch()
    return wrap_triton


@triton_op("attnfast::triton_topk_fwd", mutates_args=())
def triton_topk_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    causal: bool, scale: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, Hq, Lq, Ev) in q's dtype, lse (B, Hq, Lq) float32, idx (B, Hq, Lq, top_k)
    int32: the chosen keys, best first, -1 in the slots past a row's visible keys)."""
    _check(q, k, v, mask, top_k)
    return topk_fwd(q, k, v, mask, causal, scale, top_k, launch=_launch(q))


@triton_op("attnfast::triton_topk_bwd", mutates_args=())
def triton_topk_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None, scale: float, out: torch.Tensor, lse: torch.Tensor,
                    idx: torch.Tensor, dlse: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the forward with the choice `idx` held fixed; dlse, when given,
    is the gradient of lse."""
    return topk_bwd(dout, q, k, v, mask, scale, out, lse, idx, dlse, launch=_launch(q))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, causal, scale, top_k = inputs
    out, lse, idx = output
    ctx.save_for_backward(q, k, v, mask, out, lse, idx)
    ctx.scale = scale


def _backward(ctx, dout, dlse, _didx):
    q, k, v, mask, out, lse, idx = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.attnfast.triton_topk_bwd(dout, q, k, v, mask, ctx.scale, out, lse, idx, dlse)
    return dq, dk, dv, None, None, None, None


triton_topk_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_topk_attention(q, k, v, top_k, mask=None, causal=False, scale=None):
    """(out, lse) of hard top-k attention on 4-D tensors through the Triton ops.

    q (B, Hq, Lq, E), k (B, Hkv, Lk, E), v (B, Hkv, Lk, Ev), Hq a multiple of
    Hkv; mask bool (True takes part) or float of q's dtype (added to the
    scores), broadcastable to (B, Hq, Lq, Lk) (expanded without a copy);
    causal: key j visible from query i iff j <= i; scale default 1/sqrt(E).
    Differentiable in q, k, v (and through lse)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, L, E), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    B, Hq, Lq = q.shape[:3]
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        try:
            mask = mask.expand(B, Hq, Lq, k.shape[-2])
        except RuntimeError as e:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to "
                             f"(B, Hq, Lq, Lk) = {(B, Hq, Lq, k.shape[-2])}") from e
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    out, lse, _ = torch.ops.attnfast.triton_topk_fwd(q, k, v, mask, bool(causal), float(scale), top_k)
    return out, lse
