"""Packed variable-length batches and the KV cache: `varlen_attention`, `attention_with_kvcache`.

Both take FlashAttention's layouts (tokens before heads) and run as one kernel
call on the CPU backend (attnfast::varlen_fwd / varlen_bwd / kvcache_fwd), the
CUDA C++ backend (the same varlen ops) and the Triton backend
(attnfast::triton_varlen_fwd / triton_varlen_bwd; the KV cache by the split-KV
kernel for short queries, else one varlen launch over the cache rows); the
reference backend runs them one sequence at a time
(dispatch.Backend.varlen_forward / kvcache_forward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from . import dispatch, ops
from ._validate import _check_tensor, _dropout_arg, _scale_arg, _shape, _window
from .reference import ALIGNMENTS

_INT_DTYPES = (torch.int32, torch.int64)


@dataclass
class VarlenPlan:
    """A validated varlen call: q (total_q, Hq, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev);
    cu_q, cu_k int32 (batch + 1) offsets, seqused_k int32 (batch) or None."""

    family: ClassVar[str] = "varlen"
    mask: ClassVar[None] = None
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    seqused_k: Optional[torch.Tensor]
    max_q: int
    max_k: int
    scale: float
    window_left: int
    window_right: int
    bottom_right: bool
    dropout_p: float


@dataclass
class KvcachePlan:
    """A validated KV-cache call (after the append): q (B, Lq, Hq, E); k_cache, v_cache
    (B_cache, S, Hkv, E / Ev) or page pools (pages, page_size, Hkv, E / Ev) with block_table
    int32 (B, max_pages); entry b attends to the first seqlens_k[b] keys of its cache entry
    (cache_batch_idx[b], else b), bottom-right diagonal."""

    family: ClassVar[str] = "kvcache"
    mask: ClassVar[None] = None
    dropout_p: ClassVar[float] = 0.0
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    seqlens_k: torch.Tensor
    cache_batch_idx: Optional[torch.Tensor]
    block_table: Optional[torch.Tensor]
    scale: float
    window_left: int
    window_right: int
    num_splits: int


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _int_vector(name, t, n, device, what):
    """A 1-D int32/int64 tensor of n entries on `device`, as int32."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D int32 tensor of {what}, got {type(t).__name__}")
    if t.dim() != 1 or t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be a 1-D int32 tensor of {what}, got {t.dtype} of shape {_shape(t)}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} must have {n} entries ({what}), got {t.numel()}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    return t if t.dtype == torch.int32 else t.to(torch.int32)


def _check_inputs(named, ndim, what):
    """Floating tensors of the first one's dtype and device, each `ndim`-D (`what`)."""
    first = named[0][1]
    for i, (name, t) in enumerate(named):
        _check_tensor(name, t, first if i else None, min_dim=0)
    for name, t in named:
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {what}, got {_shape(t)}")


def _causal_window(is_causal, window):
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a Python bool, got {type(is_causal).__name__}")
    left, right = _window(window)
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def _eager_cpu(t):
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_offsets(name, cu, total):
    """Values of cumulative offsets, checked where that costs no device sync (CPU tensors, eager;
    the CPU op checks them again)."""
    if not _eager_cpu(cu):
        return
    if cu.numel() == 0 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        vals = cu.tolist()
        raise ValueError(f"{name} must start at 0, never decrease and end at the packed length {total}: "
                         f"{vals if len(vals) <= 16 else vals[:8] + ['...'] + vals[-4:]}")


def prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, is_causal,
                   causal_alignment, window, scale, dropout_p) -> VarlenPlan:
    _check_inputs((("q", q), ("k", k), ("v", v)), 3, "a packed (total_tokens, heads, head_dim) tensor")
    if k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same tokens and heads: k {_shape(k)}, v {_shape(v)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k's head dim must equal q's ({q.shape[2]}): k {_shape(k)}")
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of k's and v's ({Hkv})")
    cu_q = _int_vector("cu_seqlens_q", cu_seqlens_q, None, q.device, "cumulative sequence lengths")
    if cu_q.numel() < 1:
        raise ValueError("cu_seqlens_q must have batch + 1 >= 1 entries")
    B = cu_q.numel() - 1
    cu_k = _int_vector("cu_seqlens_k", cu_seqlens_k, B + 1, q.device, "cumulative sequence lengths, batch + 1")
    used = None
    if seqused_k is not None:
        used = _int_vector("seqused_k", seqused_k, B, q.device, "keys used, one per sequence")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not _is_int(m) or m < 0:
            raise TypeError(f"{name} must be an int >= 0, got {m!r}")
    _check_offsets("cu_seqlens_q", cu_q, q.shape[0])
    _check_offsets("cu_seqlens_k", cu_k, k.shape[0])
    if _eager_cpu(q):
        lq, lk = (cu_q[1:] - cu_q[:-1]), (cu_k[1:] - cu_k[:-1])
        if B and (int(lq.max()) > max_seqlen_q or int(lk.max()) > max_seqlen_k):
            raise ValueError(f"max_seqlen_q/max_seqlen_k ({max_seqlen_q}, {max_seqlen_k}) are below the longest "
                             f"sequences ({int(lq.max())}, {int(lk.max())})")
        if used is not None and B and bool(((used < 0) | (used > lk)).any()):
            raise ValueError(f"seqused_k must be in [0, that sequence's key count]: {used.tolist()[:16]} vs "
                             f"{lk.tolist()[:16]}")
    if causal_alignment not in ALIGNMENTS:
        raise ValueError(f"causal_alignment must be one of {ALIGNMENTS}, got {causal_alignment!r}")
    left, right = _causal_window(is_causal, window)
    return VarlenPlan(q, k, v, cu_q, cu_k, used, int(max_seqlen_q), int(max_seqlen_k), _scale_arg(scale, q.shape[2]),
                      left, right, causal_alignment == "bottom_right", _dropout_arg(dropout_p))


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, seqused_k=None,
                     is_causal=False, causal_alignment="top_left", window=None, scale=None, dropout_p=0.0,
                     return_lse=False, backend=None):
    """Attention over a batch of sequences of different lengths, packed without padding.

    q: (total_q, Hq, E), k: (total_k, Hkv, E), v: (total_k, Hkv, Ev); sequence
    i is rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and cu_seqlens_k[i]:
    cu_seqlens_k[i+1] of k and v (int32, batch + 1 entries, from 0 to the
    packed length).  Hq may be a multiple of Hkv (GQA/MQA).  max_seqlen_q /
    max_seqlen_k bound the sequences' lengths.  seqused_k (int32, batch): use
    only the first seqused_k[i] keys of sequence i.  is_causal, causal_alignment
    and window apply within each sequence; with dropout, sequence i draws with
    the call's (seed, offset + i) (attnfast.dropout).
    Returns out (total_q, Hq, Ev) and, with return_lse, lse (Hq, total_q)
    (float32; float64 for float64 inputs).  Differentiable in q, k, v.
    One kernel call on the CPU, CUDA and Triton backends; the reference backend
    runs the sequences one by one.
    """
    plan = prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, is_causal,
                          causal_alignment, window, scale, dropout_p)
    out, lse = dispatch.choose(plan, backend).varlen_forward(plan)
    if return_lse:
        return out, lse.to(dispatch.public_lse_dtype(q.dtype))
    return out


def _append_kv(k_cache, v_cache, k, v, seqlens, cache_batch_idx, block_table):
    """Writes k, v (B, s_new, H, D) into the caches at positions seqlens[b] + (0 .. s_new), in place
    (the call was checked by prepare_kvcache)."""
    if _eager_cpu(k_cache) and ops.loaded():
        torch.ops.attnfast.kvcache_append(k_cache, v_cache, k, v, seqlens, cache_batch_idx, block_table)
        return
    positions = seqlens.unsqueeze(1) + torch.arange(k.shape[1], device=k.device, dtype=torch.int32)
    rows = cache_batch_idx if cache_batch_idx is not None else torch.arange(k.shape[0], device=k.device,
                                                                             dtype=torch.int32)
    _append(k_cache, k, positions, rows, block_table)
    _append(v_cache, v, positions, rows, block_table)


def _append(cache, new, positions, batch_rows, block_table):
    """Writes new (B, s_new, H, D) into cache at token positions (B, s_new), in place."""
    if block_table is None:
        cache[batch_rows.unsqueeze(1).long(), positions.long()] = new
    else:
        page = cache.shape[1]
        pages = torch.gather(block_table, 1, (positions // page).long())
        cache[pages.long(), (positions % page).long()] = new


def _any_outside(x, add, hi):
    """Whether some x[i] < 0 or x[i] + add > hi, for a 1-D int tensor x (on the host for CPU tensors:
    a few torch ops cost ~10 us a decode step; on a device, a sync)."""
    if _eager_cpu(x):
        return any(n < 0 or n + add > hi for n in x.tolist())
    return bool(((x < 0) | (x + add > hi)).any())


def prepare_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, is_causal, window,
                    scale, num_splits):
    """Checks a KV-cache call; returns (KvcachePlan, the append (k, v, cache_seqlens, cache_batch_idx)
    or None)."""
    _check_inputs((("q", q), ("k_cache", k_cache), ("v_cache", v_cache)), 4, "4-D (batch, seqlen, heads, head_dim)")
    B, Lq, Hq, E = q.shape
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache {_shape(k_cache)} and v_cache {_shape(v_cache)} must agree but for the head dim")
    if k_cache.shape[3] != E:
        raise ValueError(f"k_cache's head dim must equal q's ({E}), got {_shape(k_cache)}")
    Hkv = k_cache.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of the cache's ({Hkv})")
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    seqlens = _int_vector("cache_seqlens", cache_seqlens, B, q.device,
                          "tokens already in the cache, one per batch entry")
    page = None
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx and block_table exclude each other")
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.dtype != torch.int32:
            raise TypeError(f"block_table must be an int32 (batch, max_blocks) tensor, got "
                            f"{getattr(block_table, 'dtype', type(block_table).__name__)} "
                            f"{_shape(block_table) if isinstance(block_table, torch.Tensor) else ''}")
        if block_table.shape[0] != B or block_table.device != q.device:
            raise ValueError(f"block_table must be (batch={B}, max_blocks) on {q.device}, got {_shape(block_table)} "
                             f"on {block_table.device}")
        page = k_cache.shape[1]
        capacity = page * block_table.shape[1]
        rows = None
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is not None:
            rows = _int_vector("cache_batch_idx", cache_batch_idx, B, q.device, "cache entries, one per batch entry")
            if _any_outside(rows, 0, k_cache.shape[0] - 1):
                raise ValueError(f"cache_batch_idx entries must be in [0, {k_cache.shape[0]}) (the cache's entries), "
                                 f"got {rows.tolist()[:16]}")
        else:
            if k_cache.shape[0] != B:
                raise ValueError(f"k_cache has {k_cache.shape[0]} entries for a batch of {B} (pass cache_batch_idx)")
            rows = None
    new = 0
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if k is not None:
        _check_tensor("k", k, q, min_dim=0)
        _check_tensor("v", v, q, min_dim=0)
        if k.dim() != 4 or k.shape[0] != B or k.shape[2:] != k_cache.shape[2:] or v.shape[:3] != k.shape[:3] or \
                v.shape[3] != v_cache.shape[3]:
            raise ValueError(f"k and v must be (batch={B}, seqlen_new, {Hkv}, head_dim) like the cache, got "
                             f"{_shape(k)} and {_shape(v)}")
        new = k.shape[1]
    if B and _any_outside(seqlens, new, capacity):
        raise ValueError(f"cache_seqlens + seqlen_new must be in [0, {capacity}] (the cache's capacity per batch "
                         f"entry): cache_seqlens {seqlens.tolist()[:16]}, seqlen_new {new}")
    if page is not None and B:
        used_pages = (seqlens + new + page - 1) // page
        live = torch.arange(block_table.shape[1], device=q.device).unsqueeze(0) < used_pages.unsqueeze(1)
        if bool((live & ((block_table < 0) | (block_table >= k_cache.shape[0]))).any()):
            raise ValueError(f"block_table entries in use must be pages of the pool [0, {k_cache.shape[0]})")
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 chooses), got {num_splits!r}")
    left, right = _causal_window(is_causal, window)
    plan = KvcachePlan(q, k_cache, v_cache, seqlens + new if new else seqlens, rows, block_table, _scale_arg(scale, E),
                       left, right, num_splits)
    return plan, (None if k is None else (k, v, seqlens, rows))


# The plain CPU decode step's checks and op calls in C++ (csrc/cpu/binding.cpp, plain_kvcache): None
# for anything else, which then takes the path below.
_PLAIN_KVCACHE = ops._C.plain_kvcache if ops._C is not None and dispatch._CPU_FIRST else None


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None,
                           cache_batch_idx=None, is_causal=False, window=None, scale=None, return_lse=False,
                           num_splits=0, backend=None):
    """Attention of new queries over a KV cache, appending new keys and values first (in place).

    FlashAttention's `flash_attn_with_kvcache` layout: q (batch, seqlen_q, nheads, headdim);
    k_cache, v_cache (batch_cache, seqlen_cache, nheads_k, headdim), or, with block_table
    (int32 (batch, max_blocks)), a paged pool (num_blocks, block_size, nheads_k, headdim);
    k, v (batch, seqlen_new, nheads_k, headdim) or None; cache_seqlens int32 (batch,) or an
    int: the tokens already in each entry's cache; cache_batch_idx int32 (batch,): the cache
    entry of each batch entry (default: entry b).
    k and v are written into the cache at positions cache_seqlens .. cache_seqlens + seqlen_new
    (the caller then advances cache_seqlens), then q attends to the first cache_seqlens +
    seqlen_new keys, with is_causal and window aligned bottom-right (the last query sees the
    last key).  num_splits: key splits of the CPU decode kernel (0: chosen from the shape,
    1: none).  Returns out (batch, seqlen_q, nheads, headdim_v) and, with return_lse, lse
    (batch, nheads, seqlen_q) float32.  Forward only (no autograd).
    """
    if _PLAIN_KVCACHE is not None and backend is None and window is None and not return_lse and \
            not torch.compiler.is_compiling():
        out = _PLAIN_KVCACHE(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, is_causal,
                             scale, num_splits)
        if out is not None:
            return out
    plan, append = prepare_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx,
                                   is_causal, window, scale, num_splits)
    chosen = dispatch.choose(plan, backend)
    with torch.no_grad():
        if append is not None:
            _append_kv(k_cache, v_cache, *append, block_table)
        out, lse = chosen.kvcache_forward(plan)
    if return_lse:
        return out, lse.to(dispatch.public_lse_dtype(q.dtype))
    return out
