"""Argument checking and canonical form, shared by every entry point.

Every public call goes through one `prepare*` function, which raises a clear
Python error naming the argument before any kernel runs, and returns the plan of
its attention family, which attnfast.dispatch hands to a backend:
  `prepare` -> `Plan` (softmax attention): 4-D views q (B, Hq, Lq, E),
      k (B, Hkv, Lk, E), v (B, Hkv, Lk, Ev), the mask expanded to (B, Hq, Lq, Lk)
      without copying (stride 0 where it broadcasts), and the causal/window rule
      as (window_left, window_right, bottom_right);
  `prepare_additive` -> `AdditivePlan`, `prepare_topk` -> `TopkPlan`: the same
      4-D form for the additive (Bahdanau) and hard top-k families.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from .reference import ALIGNMENTS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ArgumentError(ValueError, RuntimeError):
    """A bad shape, device or value of an argument.  Also a RuntimeError: torch's own SDPA
    raises RuntimeError for these, and code written for it catches that."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype (or layout).  Also a RuntimeError, as torch's
    mixed-dtype checks raise."""


@dataclass
class Plan:
    family: ClassVar[str] = "attention"
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


def _check_tensor(name, t, ref=None, min_dim=2):
    """A dense floating-point tensor; with `ref` (the query), of its dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < min_dim:
        raise ArgumentError(f"{name} must have shape (..., L, E) with at least 2 dims, got {_shape(t)}")
    if t.layout != torch.strided:
        raise ArgumentTypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in FLOAT_DTYPES:
        raise ArgumentTypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if ref is not None:
        if t.dtype != ref.dtype:
            raise ArgumentTypeError(f"{name} dtype {t.dtype} must match query dtype {ref.dtype}")
        if t.device != ref.device:
            raise ArgumentError(f"{name} is on {t.device} but query is on {ref.device}")


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
        raise ArgumentError(f"window must be None or a pair (left, right), got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        if w is None:
            w = -1
        if isinstance(w, bool) or not isinstance(w, int):
            raise ArgumentError(f"window {side} must be an int >= 0, or -1/None for unbounded, got {w!r}")
        if w < -1:
            raise ArgumentError(f"window {side} must be >= 0, or -1/None for unbounded, got {w}")
        if w >= 2**63:
            raise ArgumentError(f"window {side} must be < 2**63 (use -1 or None for unbounded), got {w}")
        out.append(int(w))
    return tuple(out)


def check_mask(attn_mask, query, target, what="(..., Hq, Lq, Lk)", what_types="a torch.Tensor, a CausalBias"):
    """A bool or float mask that broadcasts to `target`, float masks in query's dtype
    (converted before any expansion, so only the mask's own size is copied)."""
    if not isinstance(attn_mask, torch.Tensor):
        raise ArgumentTypeError(f"attn_mask must be {what_types} or None, got {type(attn_mask).__name__}")
    if attn_mask.layout != torch.strided:
        raise ArgumentTypeError(f"attn_mask must be a dense (strided) tensor, got layout {attn_mask.layout}")
    if attn_mask.device != query.device:
        raise ArgumentError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ArgumentTypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
    try:
        ok = torch.broadcast_shapes(tuple(attn_mask.shape), target) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ArgumentError(f"attn_mask of shape {_shape(attn_mask)} does not broadcast to {what} = {target}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
        return attn_mask.to(query.dtype)
    return attn_mask


_FLOATS = frozenset(FLOAT_DTYPES)


def _default_scale(E):
    return 1.0 / math.sqrt(E) if E > 0 else 1.0


def _plain_plan(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_alignment, window):
    """The Plan of the most common call, or None to take the general path: three plain
    4-D tensors of one floating dtype and device, no mask, no window, the default
    arguments' types.  It accepts only what `prepare` would accept (and gives the
    same Plan); any doubt goes to the general path, which explains a refusal."""
    T = torch.Tensor
    if (attn_mask is not None or window is not None or type(q) is not T or type(k) is not T or type(v) is not T
            or type(is_causal) is not bool or type(dropout_p) is not float or not 0.0 <= dropout_p < 1.0
            or causal_alignment not in ALIGNMENTS or q.dim() != 4 or k.dim() != 4 or v.dim() != 4):
        return None
    dtype = q.dtype
    if (dtype not in _FLOATS or k.dtype != dtype or v.dtype != dtype or q.layout != torch.strided
            or k.layout != torch.strided or v.layout != torch.strided or k.device != q.device
            or v.device != q.device):
        return None
    B, Hq, Lq, E = q.shape
    Bk, Hkv, Lk, Ek = k.shape
    Bv, Hv, Lv, _ = v.shape
    if Bk != B or Bv != B or Hv != Hkv or Lv != Lk or Ek != E:
        return None
    if Hq != Hkv and (not enable_gqa or Hkv == 0 or Hq % Hkv != 0):
        return None
    if scale is None:
        scale = _default_scale(E)
    elif type(scale) is not float or not math.isfinite(scale):
        return None
    return Plan(q=q, k=k, v=v, mask=None, scale=scale, window_left=-1, window_right=0 if is_causal else -1,
                bottom_right=causal_alignment == "bottom_right", dropout_p=dropout_p, lead=(B, Hq))


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
    """Checks the arguments of softmax attention (raising a clear error naming the
    argument) and returns their Plan."""
    plan = _plain_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_alignment,
                       window)
    if plan is not None:
        return plan
    return _prepare_general(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                            causal_alignment, window)


def _scale_arg(scale, E):
    """The softmax scale: 1/sqrt(E) for None, else a finite float."""
    if scale is None:
        return _default_scale(E)
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ArgumentTypeError(f"scale must be a float or None, got {type(scale).__name__}")
    try:
        scale = float(scale)
    except OverflowError:
        raise ArgumentError(f"scale must be finite, got an int of {scale.bit_length()} bits") from None
    if not math.isfinite(scale):
        raise ArgumentError(f"scale must be finite, got {scale}")
    return scale


def _dropout_arg(dropout_p):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise ArgumentTypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ArgumentError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def _broadcast_leading(query, key, value, enable_gqa):
    """query, key and value with their leading dims broadcast together, as torch's SDPA does
    (its math path multiplies with matmul broadcasting): a key/value batch of 1 serves every
    query batch, 3-D and 4-D inputs mix.  With enable_gqa and a query head count that is a
    multiple of the key/value heads' (dim -3), each key/value head serves its group of query
    heads instead (the kernels' GQA; key and value head counts that differ are both repeated to
    their lcm, a copy), and only the dims before the heads broadcast.  Views (stride 0 where a
    dim is broadcast); _as4d then merges more than 4 dims, copying a broadcast input."""
    def lead(t, n):
        return tuple(t.shape[:-n]) if t.dim() > n else ()

    q_dims, k_dims = query.dim(), key.dim()
    gqa = enable_gqa and min(q_dims, k_dims, value.dim()) >= 3 and not (
        query.shape[-3] == key.shape[-3] == value.shape[-3])
    if gqa:
        Hq, Hk, Hv = query.shape[-3], key.shape[-3], value.shape[-3]
        for name, h in (("key", Hk), ("value", Hv)):
            if h == 0 or Hq % h != 0:
                raise ArgumentError(f"enable_gqa needs query heads ({Hq}) to be a multiple of {name} heads ({h})")
        if Hk != Hv:  # torch repeats each to Hq; here both to their lcm, which divides Hq (a copy)
            H = math.lcm(Hk, Hv)
            key, value = key.repeat_interleave(H // Hk, dim=-3), value.repeat_interleave(H // Hv, dim=-3)
    n = 3 if gqa else 2
    try:
        target = torch.broadcast_shapes(lead(query, n), lead(key, n), lead(value, n))
    except RuntimeError:
        if q_dims >= 3 and k_dims >= 3 and not enable_gqa and query.shape[-3] != key.shape[-3] \
                and key.shape[-3] != 1 and lead(query, 3) == lead(key, 3):
            raise ArgumentError(f"key has {key.shape[-3]} heads but query has {query.shape[-3]}: equal head counts "
                                "expected (pass enable_gqa=True for grouped-query attention)") from None
        raise ArgumentError(f"the leading dims of query {_shape(query)}, key {_shape(key)} and value "
                            f"{_shape(value)} do not broadcast together") from None

    def expand(t):
        want = target + tuple(t.shape[-n:])
        return t if tuple(t.shape) == want else t.expand(want)

    return expand(query), expand(key), expand(value)


def _prepare_general(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_alignment,
                     window) -> Plan:
    _check_tensor("query", query)
    _check_tensor("key", key)
    _check_tensor("value", value)
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise ArgumentTypeError(f"{name} dtype {t.dtype} must match query dtype {query.dtype}")
        if t.device != query.device:
            raise ArgumentError(f"{name} is on {t.device} but query is on {query.device}; all must share one device")
    if causal_alignment not in ALIGNMENTS:
        raise ArgumentError(f"causal_alignment must be one of {ALIGNMENTS}, got {causal_alignment!r}")
    bias_alignment = _causal_bias(attn_mask)
    if bias_alignment is not None:
        if is_causal:  # as torch: the bias already says which keys each query sees
            raise ArgumentError("CausalBias should not be used with causal=True")
        is_causal, causal_alignment, attn_mask = True, bias_alignment, None
    if not isinstance(is_causal, bool):
        kind = type(is_causal)
        raise ArgumentTypeError(f"is_causal must be a Python bool, got {kind.__module__}.{kind.__qualname__}")

    Lq, E = query.shape[-2:]
    Lk = key.shape[-2]
    if key.shape[-1] != E:
        raise ArgumentError(f"key head dim must equal query head dim {E}: key shape {_shape(key)}")
    if value.shape[-2] != Lk:
        raise ArgumentError(f"value length must equal key length {Lk}: value shape {_shape(value)}")
    query, key, value = _broadcast_leading(query, key, value, enable_gqa)

    scale = _scale_arg(scale, E)
    _dropout_arg(dropout_p)

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


# ---------------------------------------------------------------------------
# The other families: additive (Bahdanau) and hard top-k attention
# ---------------------------------------------------------------------------

def compute_dtype(dtype):
    """The arithmetic's dtype in the additive and top-k families: float32 for half inputs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_variant_qkv(q, k, v, same_head_dim):
    _check_tensor("query", q, min_dim=0)
    for name, t in (("key", k), ("value", v)):
        _check_tensor(name, t, q, min_dim=0)
    if q.dim() < 3 or k.dim() != q.dim() or v.dim() != q.dim():
        raise ArgumentError(f"query, key and value must be (..., H, L, E) with the same number of dims (>= 3), got "
                            f"{_shape(q)}, {_shape(k)}, {_shape(v)}")
    if k.shape[:-3] != q.shape[:-3] or v.shape[:-1] != k.shape[:-1]:
        raise ArgumentError(f"key {_shape(k)} and value {_shape(v)} must share query's batch dims "
                            f"{tuple(q.shape[:-3])}, and each other's heads and length")
    if same_head_dim and k.shape[-1] != q.shape[-1]:
        raise ArgumentError(f"key head dim must equal query head dim {q.shape[-1]}: key shape {_shape(k)}")


def _check_is_causal(is_causal):
    if not isinstance(is_causal, bool):
        raise ArgumentTypeError(f"is_causal must be a Python bool, got {type(is_causal).__name__}")


def _variant_mask(attn_mask, q, Lk, what):
    """The mask checked against (..., H, Lq, Lk) and expanded to (B, H, Lq, Lk) without a copy."""
    if attn_mask is None:
        return None
    target = tuple(q.shape[:-1]) + (Lk,)
    m = check_mask(attn_mask, q, target, what, "a torch.Tensor").expand(target)
    return m.reshape((math.prod(q.shape[:-3]), q.shape[-3], q.shape[-2], Lk))


@dataclass
class AdditivePlan:
    """Additive attention in canonical form: q (B, H, Lq, Eq), k (B, H, Lk, Ek),
    v (B, H, Lk, Ev) in the input dtype; w_q (Da, Eq) or (H, Da, Eq), w_k likewise,
    v_a (Da,) or (H, Da); mask (B, H, Lq, Lk) or None."""
    family: ClassVar[str] = "additive"
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    w_q: torch.Tensor
    w_k: torch.Tensor
    v_a: torch.Tensor
    mask: Optional[torch.Tensor]
    is_causal: bool
    lead: tuple  # query's leading dims (..., H): output is (*lead, Lq, Ev)

    def projections(self):
        """(qp (B, H, Lq, Da), kp (B, H, Lk, Da), v_a, v) in the compute dtype: the projections
        once, as ordinary matmuls under autograd."""
        cd = compute_dtype(self.q.dtype)
        qp = torch.matmul(self.q.to(cd), self.w_q.to(cd).transpose(-1, -2))
        kp = torch.matmul(self.k.to(cd), self.w_k.to(cd).transpose(-1, -2))
        return qp, kp, self.v_a.to(cd), self.v.to(cd)


def prepare_additive(q, k, v, w_q, w_k, v_a, attn_mask=None, is_causal=False) -> AdditivePlan:
    _check_variant_qkv(q, k, v, same_head_dim=False)
    H, Lq, Eq = q.shape[-3:]
    Lk, Ek = k.shape[-2:]
    for name, w, e in (("w_q", w_q, Eq), ("w_k", w_k, Ek)):
        _check_tensor(name, w, q, min_dim=0)
        if w.dim() not in (2, 3) or w.shape[-1] != e or (w.dim() == 3 and w.shape[0] != H):
            raise ArgumentError(f"{name} must be (Da, {e}) or ({H}, Da, {e}) (heads, attention dim, "
                                f"{'query' if name == 'w_q' else 'key'} head dim), got {_shape(w)}")
    Da = w_q.shape[-2]
    if w_k.shape[-2] != Da:
        raise ArgumentError(f"w_q and w_k must project to the same attention dim: {Da} vs {w_k.shape[-2]}")
    _check_tensor("v_a", v_a, q, min_dim=0)
    if v_a.shape not in ((Da,), (H, Da)):
        raise ArgumentError(f"v_a must be ({Da},) or ({H}, {Da}), got {_shape(v_a)}")
    _check_is_causal(is_causal)
    mask = _variant_mask(attn_mask, q, Lk, "(..., H, Lq, Lk)")
    return AdditivePlan(q=_as4d(q), k=_as4d(k), v=_as4d(v), w_q=w_q, w_k=w_k, v_a=v_a, mask=mask,
                        is_causal=is_causal, lead=tuple(q.shape[:-2]))


@dataclass
class TopkPlan:
    """Hard top-k attention in canonical form: q (B, Hq, Lq, E), k (B, Hkv, Lk, E),
    v (B, Hkv, Lk, Ev); mask (B, Hq, Lq, Lk) or None; scale resolved."""
    family: ClassVar[str] = "topk"
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]
    is_causal: bool
    scale: float
    top_k: int
    lead: tuple


def prepare_topk(q, k, v, top_k, attn_mask=None, is_causal=False, scale=None, enable_gqa=False) -> TopkPlan:
    _check_variant_qkv(q, k, v, same_head_dim=True)
    Hq, Lq, E = q.shape[-3:]
    Hkv, Lk = k.shape[-3], k.shape[-2]
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise ArgumentTypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= Lk:
        raise ArgumentError(f"top_k must be in [1, Lk] = [1, {Lk}], got {top_k}")
    if Hq != Hkv:
        if not enable_gqa:
            raise ArgumentError(f"key has {Hkv} heads but query has {Hq}: pass enable_gqa=True for grouped-query "
                                "attention")
        if Hq % Hkv:
            raise ArgumentError(f"enable_gqa needs query heads ({Hq}) to be a multiple of key/value heads ({Hkv})")
    _check_is_causal(is_causal)
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ArgumentError(f"scale must be a finite float or None, got {scale!r}")
    mask = _variant_mask(attn_mask, q, Lk, "(..., Hq, Lq, Lk)")
    return TopkPlan(q=_as4d(q), k=_as4d(k), v=_as4d(v), mask=mask, is_causal=is_causal, scale=float(scale),
                    top_k=top_k, lead=tuple(q.shape[:-2]))
