"""Modules: `attnfast.nn.MultiheadAttention`, a drop-in for `torch.nn.MultiheadAttention`.

Same constructor, forward signature, defaults and parameter names, so a
state_dict loads across the two classes in either direction:

    in_proj_weight (3E, E)                      when kdim == vdim == embed_dim
    q_proj_weight (E, E), k_proj_weight (E, kdim), v_proj_weight (E, vdim)   otherwise
    in_proj_bias (3E,), out_proj.weight (E, E), out_proj.bias (E,)          with bias=True
    bias_k, bias_v (1, 1, E)                    with add_bias_kv=True

With need_weights=False the attention runs in attnfast's fused kernel
(`attnfast.scaled_dot_product_attention`): no (L, S) score matrix is stored,
and key_padding_mask / attn_mask reach the kernel as broadcast views, e.g. a
(N, S) padding mask as (N, 1, 1, S), never as an (N, heads, L, S) tensor.
need_weights=True (torch's default) must return the (N, [heads,] L, S)
probabilities, so it takes an unfused path: scores, softmax and the weighted
sum as separate ops, O(N*heads*L*S) memory, as slow as torch's own path.
Pass need_weights=False for speed.

The projections run on torch's internal (L, N, E) layout whatever batch_first
is, so they round exactly as torch's module does and the attention kernel is
the only numerical difference between the two (batch_first output is then a
transposed view, as torch's is).

Differences from torch, on purpose:
  * rows with no visible key give 0 (attnfast's rule), not NaN, in both paths;
  * training-mode dropout draws from attnfast's counter-based generator, so
    the dropped positions differ from torch's for the same seed;
  * there is no C++ inference fast path: eval mode runs the same fused kernel;
  * shape and dtype errors are ValueError/TypeError (torch raises
    AssertionError) with torch's wording.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Linear, Module, Parameter

from .api import scaled_dot_product_attention

__all__ = ["MultiheadAttention"]


def _as_keep(mask, name, dtype):
    """A torch-convention mask (bool True = masked out; float = added) in attnfast's
    convention (bool True = takes part; float = added), checked for dtype."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise TypeError(f"only bool and floating types of {name} are supported, got {mask.dtype}")
    return mask if mask.dtype == dtype else mask.to(dtype)


def _additive(keep, dtype):
    """attnfast-convention mask -> float mask added to the scores (0 / -inf for bool)."""
    if keep.dtype != torch.bool:
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))


def _combine(a, b, dtype):
    """Both masks must hold: logical and for two bool masks, else the sum of the
    additive forms.  Broadcasting keeps the result at the larger of the shapes
    (a (1,1,L,S) attn_mask and an (N,1,1,S) padding mask give (N,1,L,S))."""
    if a is None:
        return b
    if b is None:
        return a
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    return _additive(a, dtype) + _additive(b, dtype)


def _pad_visible(mask, n):
    """Append n key columns that every query may see (the bias_k / zero-attention keys)."""
    if mask is None or n == 0:
        return mask
    shape = tuple(mask.shape[:-1]) + (n,)
    if mask.dtype == torch.bool:
        extra = torch.ones(shape, dtype=torch.bool, device=mask.device)
    else:
        extra = torch.zeros(shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([mask, extra], dim=-1)


def _attention_with_weights(q, k, v, mask, dropout_p):
    """Unfused attention returning (out, probabilities): what need_weights=True needs.

    q (N, H, L, D), k/v (N, H, S, D); mask in attnfast's convention, broadcastable
    to (N, H, L, S).  Rows with no visible key give out 0 and weights 0.
    """
    scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-2, -1))  # (N, H, L, S)
    dead = None
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
        # Rows with every score -inf would give 0/0 = NaN in the softmax.
        dead = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (N, H, L, 1)
        scores = scores.masked_fill(dead, 0.0)
    weights = torch.softmax(scores, dim=-1)
    if dead is not None:
        weights = weights.masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v), weights


class MultiheadAttention(Module):
    """Multi-head attention with torch.nn.MultiheadAttention's interface, run by attnfast.

    Args (as torch's): embed_dim, num_heads, dropout=0.0 (on the attention
    probabilities, training mode only), bias=True, add_bias_kv=False,
    add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
    dtype=None.

    forward(query, key, value, key_padding_mask=None, need_weights=True,
    attn_mask=None, average_attn_weights=True, is_causal=False) -> (out, weights):
      query (L, N, E) or (N, L, E) with batch_first, or (L, E) unbatched;
      key (S, N, kdim), value (S, N, vdim) likewise;
      key_padding_mask (N, S) or (S,): bool True = ignore that key, or float added;
      attn_mask (L, S) or (N*num_heads, L, S): bool True = not allowed, or float added;
      is_causal: a hint that attn_mask is the causal mask (attn_mask is still
      required, as in torch); the kernel then applies the causal rule itself
      and does not read attn_mask.
      weights: None unless need_weights; then (N, L, S) averaged over heads, or
      (N, num_heads, L, S) with average_attn_weights=False.

    need_weights=True (the default, as in torch) takes the unfused path; pass
    need_weights=False for the fused kernel.
    """

    __constants__ = ["batch_first"]

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None):
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0, "
                             f"got embed_dim={embed_dim} and num_heads={num_heads} instead")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim} "
                             f"and num_heads={num_heads}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.add_zero_attn = add_zero_attn

        if self._qkv_same_embed_dim:
            self.in_proj_weight = Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.register_parameter("in_proj_weight", None)
            self.q_proj_weight = Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = Parameter(torch.empty((embed_dim, self.vdim), **factory))
        if bias:
            self.in_proj_bias = Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self):
        # The same initialisation scheme as torch's module: Xavier-uniform
        # projections, zero biases, Xavier-normal bias_k/bias_v.
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                torch.nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            torch.nn.init.zeros_(self.in_proj_bias)
            torch.nn.init.zeros_(self.out_proj.bias)
        for b in (self.bias_k, self.bias_v):
            if b is not None:
                torch.nn.init.xavier_normal_(b)

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")

    # -- argument checks, in torch's words -------------------------------------------------

    def _check(self, query, key, value, key_padding_mask, attn_mask):
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None and not isinstance(m, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(m).__name__}")
        if query.dim() not in (2, 3):
            raise ValueError(f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D "
                             "query tensor")
        batched = query.dim() == 3
        kind = "batched (3-D)" if batched else "unbatched (2-D)"
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"For {kind} `query`, expected `key` and `value` to be {query.dim()}-D but found "
                             f"{key.dim()}-D and {value.dim()}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
            raise ValueError(f"For {kind} `query`, expected `key_padding_mask` to be `None` or "
                             f"{query.dim() - 1}-D but found {key_padding_mask.dim()}-D tensor instead")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise ValueError(f"For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D but found "
                             f"{attn_mask.dim()}-D tensor instead")
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"was expecting embedding dimension of {self.embed_dim}, but got {query.shape[-1]} "
                             f"(query shape {tuple(query.shape)})")
        if key.shape[-1] != self.kdim:
            raise ValueError(f"key must have kdim={self.kdim} features in its last dim, got shape {tuple(key.shape)}")
        if value.shape[-1] != self.vdim:
            raise ValueError(f"value must have vdim={self.vdim} features in its last dim, "
                             f"got shape {tuple(value.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key's sequence and batch dims {tuple(key.shape[:-1])} do not match value's "
                             f"{tuple(value.shape[:-1])}")
        for name, t in (("key", key), ("value", value)):
            if t.dtype != query.dtype:
                raise TypeError(f"{name} dtype {t.dtype} must match query dtype {query.dtype}")
        if batched:
            bdim = 0 if self.batch_first else 1
            if key.shape[bdim] != query.shape[bdim]:
                raise ValueError(f"key batch size {key.shape[bdim]} must equal query batch size "
                                 f"{query.shape[bdim]} (batch_first={self.batch_first})")

    # -- forward ---------------------------------------------------------------------------

    def _project(self, query, key, value):
        """In-projections on (L, N, *) inputs -> q (L, N, E), k (S, N, E), v (S, N, E)."""
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.split(E)
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if query is key and key is value:  # self-attention: one (3E, E) product
                return F.linear(query, w, b).split(E, dim=-1)
            wq, wkv = w.split([E, 2 * E])
            q = F.linear(query, wq, bq)
            if key is value:
                k, v = F.linear(key, wkv, None if b is None else b[E:]).split(E, dim=-1)
                return q, k, v
            wk, wv = wkv.split(E)
            return q, F.linear(key, wk, bk), F.linear(value, wv, bv)
        return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                F.linear(value, self.v_proj_weight, bv))

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        self._check(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        dtype = query.dtype
        kpm = _as_keep(key_padding_mask, "key_padding_mask", dtype)
        am = _as_keep(attn_mask, "attn_mask", dtype)

        batched = query.dim() == 3
        # Work in the (L, N, features) layout, as torch's module does: views of the
        # caller's tensors, and the projections then run on the same layout as
        # torch's, so they round identically and the attention kernel is the only
        # numerical difference between the two modules.
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if kpm is not None:
                kpm = kpm.unsqueeze(0)
        elif self.batch_first:
            same_kv = key is value
            same_qk = query is key
            query = query.transpose(0, 1)
            key = query if same_qk else key.transpose(0, 1)
            value = key if same_kv else value.transpose(0, 1)
        L, N, _ = query.shape
        S = key.shape[0]
        H, D = self.num_heads, self.head_dim

        if am is not None:
            if am.dim() == 2:
                if tuple(am.shape) != (L, S):
                    raise ValueError(f"The shape of the 2D attn_mask is {tuple(am.shape)}, but should be {(L, S)}.")
                am = am.view(1, 1, L, S)
            else:
                if tuple(am.shape) != (N * H, L, S):
                    what = "(num_heads, L, S)" if not batched else "(bsz * num_heads, L, S)"
                    raise ValueError(f"The shape of the 3D attn_mask is {tuple(am.shape)}, but should be "
                                     f"{(N * H, L, S)} = {what}.")
                am = am.view(N, H, L, S)
        if kpm is not None:
            if tuple(kpm.shape) != (N, S):
                raise ValueError(f"expecting key_padding_mask shape of {(N, S) if batched else (S,)}, but got "
                                 f"{tuple(kpm.shape) if batched else tuple(kpm.shape[1:])}")
            kpm = kpm.view(N, 1, 1, S)

        q, k, v = self._project(query, key, value)  # (L, N, E), (S, N, E), (S, N, E)
        extra = 0
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, N, self.embed_dim)])
            v = torch.cat([v, self.bias_v.expand(1, N, self.embed_dim)])
            extra += 1
        q = q.unflatten(-1, (H, D)).permute(1, 2, 0, 3)  # (N, H, L, D), a view
        k = k.unflatten(-1, (H, D)).permute(1, 2, 0, 3)  # (N, H, S', D)
        v = v.unflatten(-1, (H, D)).permute(1, 2, 0, 3)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros((N, H, 1, D))], dim=2)
            v = torch.cat([v, v.new_zeros((N, H, 1, D))], dim=2)
            extra += 1
        kpm, am = _pad_visible(kpm, extra), _pad_visible(am, extra)

        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            out, weights = _attention_with_weights(q, k, v, _combine(am, kpm, dtype), dropout_p)
        else:
            weights = None
            # The hint: the kernel applies the causal rule and attn_mask is not
            # read (as torch's SDPA path does).  Not when extra keys were
            # appended, which every query must see: then the mask decides.
            use_causal = bool(is_causal) and extra == 0
            mask = _combine(None if use_causal else am, kpm, dtype)
            out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=use_causal)

        # (N, H, L, D) -> (L*N, E) rows, the out-projection, then the caller's layout.
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(L * N, self.embed_dim)).view(L, N, self.embed_dim)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)  # a view, as torch's module returns
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights
