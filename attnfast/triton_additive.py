"""torch.library registration of the Triton additive-attention kernels
(attnfast.triton_kernels.additive).

    out, lse = torch.ops.attnfast.triton_additive_fwd(qp, kp, va, v, mask, causal)
    dqp, dkp, dva, dv = torch.ops.attnfast.triton_additive_bwd(dout, qp, kp, va, v, mask, causal,
                                                                out, lse, dlse)

The same semantics as the fused CPU op attnfast::additive_fwd/additive_bwd
(attnfast/ops.py), on float32 tensors: qp (B, H, Lq, Da), kp (B, H, Lk, Da),
va (H, Da), v (B, H, Lk, Ev); mask None or a float bias (-inf hides; bool, True
= visible, also taken) broadcastable to (B, H, Lq, Lk); causal: key j visible
from query i iff j <= i.  out (B, H, Lq, Ev) and lse (B, H, Lq) are float32
(lse -inf and out 0 for rows that see no key).  The backward returns dva as
(H, Da) (summed over the batch), the shape of va.  Both are `triton_op`s: the
body launches the kernels through `wrap_triton`, so torch.compile sees inside
them and the body doubles as the fake kernel.  Autograd on the forward gives
gradients for qp, kp, va and v (none for the mask), lse's included.
"""
from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from .triton_kernels.additive import additive_bwd, additive_fwd


@triton_op("attnfast::triton_additive_fwd", mutates_args=())
def triton_additive_fwd(qp: torch.Tensor, kp: torch.Tensor, va: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return additive_fwd(qp, kp, va, v, mask, causal, launch=wrap_triton)


@triton_op("attnfast::triton_additive_bwd", mutates_args=())
def triton_additive_bwd(dout: torch.Tensor, qp: torch.Tensor, kp: torch.Tensor, va: torch.Tensor,
                        v: torch.Tensor, mask: torch.Tensor | None, causal: bool, out: torch.Tensor,
                        lse: torch.Tensor, dlse: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return additive_bwd(dout, qp, kp, va, v, mask, causal, out, lse, dlse, launch=wrap_triton)


def _setup_context(ctx, inputs, output):
    qp, kp, va, v, mask, causal = inputs
    out, lse = output
    ctx.save_for_backward(qp, kp, va, v, mask, out, lse)
    ctx.causal = causal


def _backward(ctx, dout, dlse):
    qp, kp, va, v, mask, out, lse = ctx.saved_tensors
    if dout is None:  # only lse reached the loss
        dout = torch.zeros_like(out)
    dqp, dkp, dva, dv = torch.ops.attnfast.triton_additive_bwd(dout, qp, kp, va, v, mask, ctx.causal, out, lse,
                                                                dlse)
    return dqp, dkp, dva, dv, None, None


triton_additive_fwd.register_autograd(_backward, setup_context=_setup_context)
