"""Modules: `attnfast.nn.MultiheadAttention`, a drop-in for `torch.nn.MultiheadAttention`, and
`attnfast.nn.AdditiveAttention` (Bahdanau attention for seq2seq decoders, described in its class).

MultiheadAttention has torch's constructor, forward signature, defaults and parameter names, so a
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
from .reference import _apply_mask, additive_scores, visible_mask
from .variants import additive_attention

__all__ = ["MultiheadAttention", "AdditiveAttention"]


def _check_types(query, key, value, key_padding_mask, attn_mask):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if m is not None and not isinstance(m, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(m).__name__}")


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
        _check_types(query, key, value, key_padding_mask, attn_mask)
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


class AdditiveAttention(Module):
    """Additive (Bahdanau) attention of decoder states over encoder outputs, run by attnfast.

    For each head h, query step i and key j:

        s[h, i, j] = v_a[h] · tanh(w_q[h] q_i,h + w_k[h] k_j,h + proj_bias[h])
        p[h, i, :] = softmax_j(s[h, i, :])   (masked keys excluded)
        context_i,h = Σ_j p[h, i, j] v_j,h

    and the heads' contexts are concatenated (then `out_proj` with out_proj=True).
    Heads split the feature dims as torch.nn.MultiheadAttention's do: head h
    reads query features [h*query_dim/H, (h+1)*query_dim/H), likewise key and
    value features, and scores in its own attn_dim/H-dim attention space.

    Args:
      query_dim: features of the query (the decoder state).
      key_dim: features of the key (the encoder outputs); default query_dim.
      value_dim: features of the value; default key_dim.
      attn_dim: size of the attention space summed over heads (each head gets
        attn_dim // num_heads); default query_dim.
      num_heads: heads; query_dim, key_dim, value_dim and attn_dim must all be
        divisible by it.  Default 1 (classic Bahdanau attention).
      batch_first: inputs and context are (B, L, features) (default True);
        False: (L, B, features), as torch.nn.MultiheadAttention's default.
      out_proj: add a Linear(value_dim, value_dim) after the concatenated
        heads (default False: the context is the plain weighted sum of values,
        as in Bahdanau et al.).
      bias: learn `proj_bias` inside the tanh, and a bias in out_proj
        (default True).
      device, dtype: factory kwargs of the parameters.

    Parameters (shapes fixed for any num_heads; with num_heads=1, w_q[0] is the
    usual (attn_dim, query_dim) matrix):
      w_q (H, attn_dim/H, query_dim/H), w_k (H, attn_dim/H, key_dim/H),
      v_a (H, attn_dim/H), proj_bias (H, attn_dim/H) or None,
      out_proj (Linear) or None.
    reset_parameters(): w_q, w_k Xavier-uniform per head (fan_in = head
    features, fan_out = attn_dim/H); v_a uniform(±1/sqrt(attn_dim/H)), as a
    Linear(attn_dim/H, 1) would be; proj_bias zero; out_proj Xavier-uniform
    weight, zero bias.

    forward(query, key, value=None, key_padding_mask=None, attn_mask=None,
    is_causal=False, need_weights=False) -> (context, weights):
      query (B, Lq, query_dim), key (B, Lk, key_dim), value (B, Lk, value_dim)
      (value defaults to key); (L, B, .) with batch_first=False; unbatched
      (Lq, query_dim), (Lk, key_dim), (Lk, value_dim).  Every input must have
      the parameters' dtype and device.
      key_padding_mask (B, Lk), or (Lk,) unbatched: as in torch's MHA, bool
        True = padding (ignored), or a float mask added to the scores.
      attn_mask (Lq, Lk), or (B*H, Lq, Lk) ((H, Lq, Lk) unbatched): as in
        torch's MHA, bool True = not allowed, or float added to the scores.
      is_causal: query step i sees keys j <= i (top-left), applied by the
        kernel; unlike torch's MHA it needs no attn_mask, and any attn_mask
        given applies as well.
      Query steps that see no key get a zero context (and zero weights).
      context: (B, Lq, value_dim) ((Lq, B, .) with batch_first=False,
        (Lq, value_dim) unbatched).
      weights: None, or with need_weights=True the attention probabilities
        (B, H, Lq, Lk) ((H, Lq, Lk) unbatched).  They are computed by the naive
        path: the (B, H, Lq, Lk, attn_dim/H) tanh argument is materialised, so
        ask for them only when you need them.  The context is the fused
        kernel's either way: need_weights does not change it.

    The context comes from `attnfast.additive_attention` with its default
    backend (on CPU float32/bfloat16/float16 tensors the fused C++ kernel,
    O(L·attn_dim) memory, never the (Lq, Lk, attn_dim) tensor), differentiable
    in every input and parameter.  proj_bias reaches it folded into the query
    projection ([q, 1] · [w_q, proj_bias]ᵀ), as that function takes no bias.
    Each query step attends independently, so a decoder may call the module one
    step at a time (query (B, 1, query_dim)) and get what one call on all steps
    gives (without is_causal).  Each call projects the keys again
    (B·Lk·attn_dim·key_dim/H multiply-adds), small next to the tanh scores'
    B·Lq·Lk·attn_dim.
    """

    __constants__ = ["batch_first"]

    def __init__(self, query_dim, key_dim=None, value_dim=None, attn_dim=None, num_heads=1, batch_first=True,
                 out_proj=False, bias=True, device=None, dtype=None):
        key_dim = query_dim if key_dim is None else key_dim
        value_dim = key_dim if value_dim is None else value_dim
        attn_dim = query_dim if attn_dim is None else attn_dim
        dims = (("query_dim", query_dim), ("key_dim", key_dim), ("value_dim", value_dim), ("attn_dim", attn_dim),
                ("num_heads", num_heads))
        for name, d in dims:
            if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
                raise ValueError(f"{name} must be a positive int, got {d!r}")
        for name, d in dims[:-1]:
            if d % num_heads:
                raise ValueError(f"{name}={d} must be divisible by num_heads={num_heads}")
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.query_dim, self.key_dim, self.value_dim, self.attn_dim = query_dim, key_dim, value_dim, attn_dim
        self.num_heads = H = num_heads
        self.batch_first = bool(batch_first)
        self.head_attn_dim = Da = attn_dim // H
        self.w_q = Parameter(torch.empty((H, Da, query_dim // H), **factory))
        self.w_k = Parameter(torch.empty((H, Da, key_dim // H), **factory))
        self.v_a = Parameter(torch.empty((H, Da), **factory))
        if bias:
            self.proj_bias = Parameter(torch.empty((H, Da), **factory))
        else:
            self.register_parameter("proj_bias", None)
        self.out_proj = Linear(value_dim, value_dim, bias=bias, **factory) if out_proj else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        Da = self.head_attn_dim
        for w in (self.w_q, self.w_k):
            # Xavier-uniform of each head's (Da, E/H) matrix (init.xavier_uniform_ on the
            # 3-D tensor would count the heads into the fans).
            w.uniform_(-1.0, 1.0).mul_(math.sqrt(6.0 / (w.shape[-1] + Da)))
        self.v_a.uniform_(-1.0, 1.0).mul_(1.0 / math.sqrt(Da))
        if self.proj_bias is not None:
            self.proj_bias.zero_()
        if self.out_proj is not None:
            torch.nn.init.xavier_uniform_(self.out_proj.weight)
            if self.out_proj.bias is not None:
                self.out_proj.bias.zero_()

    def extra_repr(self):
        return (f"query_dim={self.query_dim}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
                f"attn_dim={self.attn_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"bias={self.proj_bias is not None}")

    # -- argument checks ---------------------------------------------------------------------

    def _check(self, query, key, value, key_padding_mask, attn_mask, is_causal, need_weights):
        _check_types(query, key, value, key_padding_mask, attn_mask)
        for name, f in (("is_causal", is_causal), ("need_weights", need_weights)):
            if not isinstance(f, bool):
                raise TypeError(f"{name} must be a Python bool, got {type(f).__name__}")
        layout = "(B, L, features)" if self.batch_first else "(L, B, features)"
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be batched 3-D {layout} or unbatched 2-D (L, features), got shape "
                             f"{tuple(query.shape)}")
        batched = query.dim() == 3
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                raise ValueError(f"{name} must be {query.dim()}-D like query "
                                 f"({layout if batched else '(L, features)'}), got shape {tuple(t.shape)}")
        for name, t, d in (("query", query, self.query_dim), ("key", key, self.key_dim),
                           ("value", value, self.value_dim)):
            if t.shape[-1] != d:
                raise ValueError(f"{name} must have {name}_dim={d} features in its last dim, got shape "
                                 f"{tuple(t.shape)}")
        p = self.w_q
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dtype != p.dtype:
                raise TypeError(f"{name} dtype {t.dtype} must match the module's parameter dtype {p.dtype} "
                                f"(convert the inputs or the module with .to())")
            if t.device != p.device:
                raise ValueError(f"{name} is on {t.device} but the module's parameters are on {p.device}")
        ldim = (1 if self.batch_first else 0) if batched else 0
        if key.shape[ldim] != value.shape[ldim]:
            raise ValueError(f"key and value must have the same length: key {tuple(key.shape)}, "
                             f"value {tuple(value.shape)} (batch_first={self.batch_first})")
        if batched:
            bdim = 0 if self.batch_first else 1
            for name, t in (("key", key), ("value", value)):
                if t.shape[bdim] != query.shape[bdim]:
                    raise ValueError(f"{name} batch size {t.shape[bdim]} must equal query batch size "
                                     f"{query.shape[bdim]} (batch_first={self.batch_first}): query "
                                     f"{tuple(query.shape)}, {name} {tuple(t.shape)}")
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None and m.device != query.device:
                raise ValueError(f"{name} is on {m.device} but query is on {query.device}")

    # -- forward -----------------------------------------------------------------------------

    def _masks(self, key_padding_mask, attn_mask, B, Lq, Lk, batched, dtype):
        """Both torch-convention masks -> one attnfast-convention mask broadcastable to
        (B, H, Lq, Lk) (a padding mask as (B, 1, 1, Lk), never expanded), or None."""
        H = self.num_heads
        kpm = _as_keep(key_padding_mask, "key_padding_mask", dtype)
        am = _as_keep(attn_mask, "attn_mask", dtype)
        if kpm is not None:
            want = (B, Lk) if batched else (Lk,)
            if tuple(kpm.shape) != want:
                raise ValueError(f"key_padding_mask must be {'(B, Lk)' if batched else '(Lk,)'} = {want}, "
                                 f"got {tuple(kpm.shape)}")
            kpm = kpm.reshape(B, 1, 1, Lk)
        if am is not None:
            if am.dim() == 2:
                if tuple(am.shape) != (Lq, Lk):
                    raise ValueError(f"2-D attn_mask must be (Lq, Lk) = {(Lq, Lk)}, got {tuple(am.shape)}")
                am = am.view(1, 1, Lq, Lk)
            elif am.dim() == 3:
                if tuple(am.shape) != (B * H, Lq, Lk):
                    what = "(B*num_heads, Lq, Lk)" if batched else "(num_heads, Lq, Lk)"
                    raise ValueError(f"3-D attn_mask must be {what} = {(B * H, Lq, Lk)}, got {tuple(am.shape)}")
                am = am.reshape(B, H, Lq, Lk)
            else:
                raise ValueError(f"attn_mask must be 2-D (Lq, Lk) or 3-D "
                                 f"({'B*num_heads' if batched else 'num_heads'}, Lq, Lk), got {am.dim()}-D "
                                 f"shape {tuple(am.shape)}")
        return _combine(am, kpm, dtype)

    def _heads(self, t, batched):
        """(B, L, F) / (L, B, F) / (L, F) -> (B, H, L, F/H), a view."""
        if not batched:
            t = t.unsqueeze(0)
        elif not self.batch_first:
            t = t.transpose(0, 1)
        return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor | None = None,
                key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        if value is None:
            value = key
        self._check(query, key, value, key_padding_mask, attn_mask, is_causal, need_weights)
        batched = query.dim() == 3
        q, k, v = self._heads(query, batched), self._heads(key, batched), self._heads(value, batched)
        B, H, Lq, _ = q.shape
        Lk = k.shape[2]
        dtype = query.dtype
        mask = self._masks(key_padding_mask, attn_mask, B, Lq, Lk, batched, dtype)

        w_q = self.w_q
        if self.proj_bias is not None:
            # Fold the bias into the query projection: [q, 1] · [w_q, b]ᵀ = w_q q + b.  The
            # query side, because a decoder's query is short (often one step) while the
            # encoder's keys are long, so the appended column copies the smaller tensor.
            q = torch.cat([q, q.new_ones(q.shape[:-1] + (1,))], dim=-1)  # (B, H, Lq, Eq/H + 1)
            w_q = torch.cat([w_q, self.proj_bias.unsqueeze(-1)], dim=-1)  # (H, Da, Eq/H + 1)

        ctx = additive_attention(q, k, v, w_q, self.w_k, self.v_a, attn_mask=mask,
                                 is_causal=is_causal)  # (B, H, Lq, value_dim/H)
        weights = None
        if need_weights:
            weights = self._weights(q, k, w_q, mask, is_causal).to(dtype)
            if not batched:
                weights = weights.squeeze(0)

        ctx = ctx.transpose(1, 2).flatten(2)  # (B, Lq, value_dim)
        if self.out_proj is not None:
            ctx = self.out_proj(ctx)
        if not batched:
            ctx = ctx.squeeze(0)
        elif not self.batch_first:
            ctx = ctx.transpose(0, 1)
        return ctx, weights

    def _weights(self, q, k, w_q, mask, is_causal):
        """The naive path: the (B, H, Lq, Lk) probabilities from the scores in full (in
        float32 for half types).  Self-contained rather than exp(s - lse) with the fused
        call's lse: mixing the two paths adds their rounding errors in the gradient."""
        cd = torch.float64 if q.dtype == torch.float64 else torch.float32
        qp = torch.matmul(q.to(cd), w_q.to(cd).transpose(-1, -2))  # (B, H, Lq, Da)
        kp = torch.matmul(k.to(cd), self.w_k.to(cd).transpose(-1, -2))  # (B, H, Lk, Da)
        s = additive_scores(qp, kp, self.v_a.to(cd))  # materialises the (B, H, Lq, Lk, Da) tanh argument
        Lq, Lk = s.shape[-2:]
        vis = visible_mask(Lq, Lk, is_causal=True, device=s.device) if is_causal else None
        s = _apply_mask(s, mask, vis)
        # Rows with no visible key would be 0/0 = NaN in the softmax: weights 0 instead.
        dead = torch.isneginf(s).all(dim=-1, keepdim=True)  # (B, H, Lq, 1)
        return torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
