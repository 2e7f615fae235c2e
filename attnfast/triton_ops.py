"""torch.library registration of the Triton kernels (attnfast.triton_kernels).

`attnfast::triton_fwd` / `attnfast::triton_bwd` are `triton_op`s: the op body
launches the kernels through `wrap_triton`, so torch.compile sees inside them
and the body doubles as the fake kernel.  Autograd links the two.
"""
from __future__ import annotations

import os

import torch
from torch.library import triton_op, wrap_triton

from .triton_kernels.attention import attention_bwd, attention_fwd


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton_op("attnfast::triton_fwd", mutates_args=())
def triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
               scale: float, window_left: int, window_right: int, bottom_right: bool,
               dropout_p: float, seed: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_fwd(q, k, v, attn_mask, scale, window_left, window_right, bottom_right,
                         dropout_p, seed, offset, launch=wrap_triton)


@triton_op("attnfast::triton_bwd", mutates_args=())
def triton_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, dlse: torch.Tensor | None, attn_mask: torch.Tensor | None,
               scale: float, window_left: int,
               window_right: int, bottom_right: bool, mask_grad: bool, dropout_p: float, seed: int,
               offset: int, delta: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd(dout, q, k, v, out, lse, dlse, attn_mask, scale, window_left, window_right,
                         bottom_right, mask_grad, dropout_p, seed, offset, launch=wrap_triton, delta=delta)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, scale, wl, wr, br, dropout_p, seed, offset = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, attn_mask, out, lse)
    ctx.args = (scale, wl, wr, br, dropout_p, seed, offset)


def _backward(ctx, dout, dlse):
    q, k, v, attn_mask, out, lse = ctx.saved_tensors
    scale, wl, wr, br, dropout_p, seed, offset = ctx.args
    mask_grad = attn_mask is not None and attn_mask.is_floating_point() and ctx.needs_input_grad[3]
    dq, dk, dv, dmask = torch.ops.attnfast.triton_bwd(
        dout, q, k, v, out, lse, dlse, attn_mask, scale, wl, wr, br, mask_grad, dropout_p, seed, offset)
    return (dq, dk, dv, (dmask.to(attn_mask.dtype) if mask_grad else None)) + (None,) * 7


triton_fwd.register_autograd(_backward, setup_context=_setup_context)
