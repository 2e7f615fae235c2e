"""Argument checking and canonical form, shared by every entry point.

Every public call goes through `prepare`, which raises a clear Python error
naming the argument before any kernel runs, and returns a `Plan`: 4-D views
q (B, Hq, Lq, E), k (B, Hkv, Lk, E), v (B, Hkv, Lk, Ev), the mask expanded to
(B, Hq, Lq, Lk) without copying (stride 0 where it broadcasts), and the
causal/window rule as (window_left, window_right, bottom_right).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .reference import ALIGNMENTS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Plan:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]
    scale: float
    window_left: int
    window_right: int
    bottom_right: bool
    dropout_p: float
    lead: tuple  # query's leading dims (..., Hq): output is (*lead, Lq, Ev)

    @property
    def mask_kind(self):
        if self.mask is None:
            return "none"
        return "bool" if self.mask.dtype == torch.bool else "float"


def _shape(t):
    return tuple(t.shape)


def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape (..., L, E) with at least 2 dims, got {_shape(t)}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _as4d(t):
    """(..., H, L, D) -> (B, H, L, D) as a view where possible."""
    if t.dim() == 2:
        return t.unsqueeze(0).unsqueeze(0)
    if t.dim() == 3:
        return t.unsqueeze(0)
    if t.dim() == 4:
        return t
    # Explicit batch size: reshape cannot infer -1 when a dim is 0.
    return t.reshape((math.prod(t.shape[:-3]),) + tuple(t.shape[-3:]))


def _causal_bias(attn_mask):
    """torch.nn.attention.bias.CausalBias -> alignment, or None if not one."""
    # Plain tensors and None first: importing torch.nn.attention.bias pulls in
    # torch._dynamo (~900 modules, ~2 s), which no ordinary call should pay.
    if attn_mask is None or type(attn_mask) is torch.Tensor or type(attn_mask).__name__ != "CausalBias":
        return None
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:  # pragma: no cover - older torch
        return None
    if not isinstance(attn_mask, CausalBias):
        return None
    return "top_left" if attn_mask.variant == CausalVariant.UPPER_LEFT else "bottom_right"


def _window(window):
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be None or a pair (left, right), got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        if w is None:
            w = -1
        if isinstance(w, bool) or not isinstance(w, int):
            raise ValueError(f"window {side} must be an int >= 0, or -1/None for unbounded, got {w!r}")
        if w < -1:
            raise ValueError(f"window {side} must be >= 0, or -1/None for unbounded, got {w}")
        if w >= 2**63:
            raise ValueError(f"window {side} must be < 2**63 (use -1 or None for unbounded), got {w}")
        out.append(int(w))
    return tuple(out)


def check_mask(attn_mask, query, target, what="(..., Hq, Lq, Lk)", what_types="a torch.Tensor, a CausalBias"):
    """A bool or float mask that broadcasts to `target`, float masks in query's dtype
    (converted before any expansion, so only the mask's own size is copied)."""
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be {what_types} or None, got {type(attn_mask).__name__}")
    if attn_mask.layout != torch.strided:
        raise TypeError(f"attn_mask must be a dense (strided) tensor, got layout {attn_mask.layout}")
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
    try:
        ok = torch.broadcast_shapes(tuple(attn_mask.shape), target) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"attn_mask of shape {_shape(attn_mask)} does not broadcast to {what} = {target}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
        return attn_mask.to(query.dtype)
    return attn_mask


def prepare(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    causal_alignment="top_left",
    window=None,
) -> Plan:
    _check_tensor("query", query)
    _check_tensor("key", key)
    _check_tensor("value", value)
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must match query dtype {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}; all must share one device")
        if t.dim() != query.dim():
            raise ValueError(
                f"{name} must have the same number of dims as query ({query.dim()}), got shape {_shape(t)}"
            )
    if causal_alignment not in ALIGNMENTS:
        raise ValueError(f"causal_alignment must be one of {ALIGNMENTS}, got {causal_alignment!r}")
    bias_alignment = _causal_bias(attn_mask)
    if bias_alignment is not None:
        is_causal, causal_alignment, attn_mask = True, bias_alignment, None
    if not isinstance(is_causal, bool):
        kind = type(is_causal)
        raise TypeError(f"is_causal must be a Python bool, got {kind.__module__}.{kind.__qualname__}")

    Lq, E = query.shape[-2:]
    Lk = key.shape[-2]
    Ev = value.shape[-1]
    if key.shape[-1] != E:
        raise ValueError(f"key head dim must equal query head dim {E}: key shape {_shape(key)}")
    if value.shape[-2] != Lk:
        raise ValueError(f"value length must equal key length {Lk}: value shape {_shape(value)}")
    if key.shape[:-2] != value.shape[:-2]:
        raise ValueError(f"key and value leading dims differ: key {_shape(key)}, value {_shape(value)}")
    if query.dim() >= 3:
        if key.shape[:-3] != query.shape[:-3]:
            raise ValueError(
                f"key batch dims {tuple(key.shape[:-3])} must equal query batch dims {tuple(query.shape[:-3])}"
            )
        Hq, Hkv = query.shape[-3], key.shape[-3]
        if Hq != Hkv:
            if not enable_gqa:
                raise ValueError(
                    f"key has {Hkv} heads but query has {Hq}: equal head counts expected "
                    "(pass enable_gqa=True for grouped-query attention)"
                )
            if Hkv == 0 or Hq % Hkv != 0:
                raise ValueError(
                    f"enable_gqa needs query heads ({Hq}) to be a multiple of key/value heads ({Hkv})"
                )

    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
    else:
        if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        try:
            scale = float(scale)
        except OverflowError:
            raise ValueError(f"scale must be finite, got an int of {scale.bit_length()} bits") from None
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")

    left, right = _window(window)
    if is_causal:
        right = 0 if right < 0 else min(right, 0)

    q4, k4, v4 = _as4d(query), _as4d(key), _as4d(value)
    mask4 = None
    if attn_mask is not None:
        target = tuple(query.shape[:-2]) + (Lq, Lk)
        mask4 = check_mask(attn_mask, query, target).expand(target)
        mask4 = mask4.reshape(q4.shape[:2] + (Lq, Lk))
    return Plan(
        q=q4,
        k=k4,
        v=v4,
        mask=mask4,
        scale=scale,
        window_left=left,
        window_right=right,
        bottom_right=causal_alignment == "bottom_right",
        dropout_p=float(dropout_p),
        lead=tuple(query.shape[:-2]),
    )
