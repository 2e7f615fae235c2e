"""Hard (top-k) attention in Triton: selection, forward, straight-through backward.

Each query keeps its `top_k` highest visible scores s = scale * q_i . k_j
(+ float mask; bool-masked, causally hidden (top-left: j > i) and -inf
entries are never kept; ties at the k-th score go to the lower key index)
and takes a softmax over those.  No kernel holds the (Lq, Lk) score matrix:

  _select_kernel  (top_k <= 256) per block of query rows, walks the key
                  tiles and keeps each row's best W >= top_k candidates in
                  registers, merging tile after tile with a bitonic network;
  _threshold_select_kernel  (larger top_k) a radix select of each row's
                  top_k-th score in ten passes over the keys;
                  both write idx (B, Hq, Lq, top_k) int32: the chosen key
                  indices (best first / in key order), -1 in the slots of a
                  row with fewer visible keys than top_k.
  _fwd_kernel     per block of rows, gathers the chosen k/v rows chunk by
                  chunk with an online softmax: out (B, Hq, Lq, Ev) in the
                  input dtype, lse (B, Hq, Lq) float64 for float32 inputs, else
                  float32 (common.row_lse).
  _bwd_kernel     recomputes P of the chosen entries (the choice held fixed):
                  delta = rowsum(P * dP) - dlse in a first pass over the
                  chunks, then dS = P (dP - delta); dq in registers, dk and dv
                  scattered with atomic adds into float32 buffers.

Memory is O(Lq * top_k) (idx) besides the inputs and outputs.  Layers as in
triton_kernels/attention.py: jit kernels, plain launchers (`topk_fwd`,
`topk_bwd`), and the torch ops with their autograd (the end of this file).  Tensors are
4-D: q (B, Hq, Lq, E), k (B, Hkv, Lk, E), v (B, Hkv, Lk, Ev) (query head h
reads key/value head h // (Hq // Hkv)), the mask (B, Hq, Lq, Lk) with
stride 0 where it broadcasts.  All arithmetic is float32: the selection's
scores are tl.dot products (IEEE for float32 inputs, float32 accumulation
of exact half products otherwise), the gather kernels upcast on load.
"""
import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ..ops import lse_dtype

from .common import (INTERPRETING, MASK_FLOAT, dot, dot_mode, launcher, load_rows, lse_parts, mask_args,
                     masked_scores, program_block, row_lse, visible)

# Sort key of a hidden or padded entry: below every visible key (whose high
# word is at least ordered(-FLT_MAX) = -2139095040), and all equal.
HIDDEN = tl.constexpr(-(2 ** 63))


@triton.jit
def _sort_keys(s, offs_n):
    """(M, N) float32 scores -> int64 keys whose integer order is (score desc, key
    index asc) when sorted descending: the high word is the score's bits mapped to
    an order-preserving int32, the low word 0xffffffff - j.  -inf -> HIDDEN."""
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 ties with +0.0 (a compare, not `+ 0.0`, which may be folded)
    bits = s.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip all but the sign bit
    ordered = tl.where(s != s, 0x7FFFFFFF, ordered)  # NaN above +inf, as torch's descending sort
    low = (~offs_n).to(tl.uint32, bitcast=True).to(tl.int64)  # 0xffffffff - j, zero-extended
    keys = (ordered.to(tl.int64) << 32) | low[None, :]
    return tl.where(s == float("-inf"), HIDDEN, keys)


# The kernels below call jit helpers at most once per key tile, never inside
# the sorting network or per chunk: under TRITON_INTERPRET=1 every call of a
# jit function re-patches triton.language (~7 ms a call), which made a 37 x 53
# selection take 6 s; on GPUs it changes nothing (helpers are inlined).  The
# sorting network is spelled out rather than tl.sort, whose xor_sum reduction
# the interpreter runs element by element in Python (~1 s per 32 x 32 sort).


@triton.jit
def _select_kernel(Q, K, Mask, Idx,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, smb, smh, smm, smn,
                   Hq, Lq, Lk, group, scale, top_k,
                   E: tl.constexpr, BLOCK_M: tl.constexpr, LOG_W: tl.constexpr, BLOCK_D: tl.constexpr,
                   MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DOT: tl.constexpr):
    # One program per (query block, batch * q head).  `top` (BLOCK_M, W) holds
    # each row's best W keys so far, sorted descending (W = 2**LOG_W >= top_k).
    # A tile of W keys is merged in with one bitonic step: the tile sorted
    # ascending (bitonic sort), its elementwise max with `top` holds the W
    # largest of the union (the keys are distinct, so "largest" is exact) as a
    # bitonic sequence, which one bitonic merge sorts descending.  A
    # compare-and-swap step at distance d pairs column c with c ^ d (tl.gather).
    W: tl.constexpr = 2 ** LOG_W
    pid_bh, b, h, hk, start_m, offs_m = program_block(Hq, group, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, W)[None, :]
    # load q: it stays in registers throughout
    q = load_rows(Q, b * sqb + h * sqh, offs_m, sqm, sqd, Lq, BLOCK_D, E)
    top = tl.full([BLOCK_M, W], HIDDEN, tl.int64)
    k_base = b * skb + hk * skh
    mask_base = b * smb + h * smh
    hi = Lk
    if CAUSAL:  # keys past the block's last row are hidden from all its rows
        hi = tl.minimum(Lk, start_m + BLOCK_M)
    for start_n in range(0, hi, W):
        offs_n = start_n + tl.arange(0, W)
        kt = tl.load(K + k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < E), other=0.0)  # (D, W)
        s = dot(q, kt, DOT) * scale  # (M, W) float32
        inb = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
        s = masked_scores(s, visible(offs_m, offs_n, Lk, 0, -1, 0, CAUSAL), offs_m, offs_n, Mask, mask_base, smm,
                          smn, inb, MASK_KIND)
        keys = _sort_keys(s, offs_n)
        # bitonic sort of the tile, ascending: at stage st, runs of 2**st columns
        # are sorted, ascending where bit st of the column is 0 (the last: all).
        # Runtime loops, not static_range: unrolled, the 64-wide network
        # spilled 1.7 KB on sm90 and a 1024-wide one compiled for minutes.
        for st in range(1, LOG_W + 1):
            run_desc = ((cols >> st) & 1) != 0
            for i in range(st):
                d = 1 << (st - 1 - i)
                partner = tl.gather(keys, tl.broadcast_to(cols ^ d, [BLOCK_M, W]), 1)
                take_max = ((cols & d) != 0) != run_desc
                keys = tl.where(take_max, tl.maximum(keys, partner), tl.minimum(keys, partner))
        top = tl.maximum(top, keys)
        # bitonic merge, descending: the lower column of each pair takes the max
        for i in range(LOG_W):
            d = 1 << (LOG_W - 1 - i)
            partner = tl.gather(top, tl.broadcast_to(cols ^ d, [BLOCK_M, W]), 1)
            top = tl.where((cols & d) == 0, tl.maximum(top, partner), tl.minimum(top, partner))
    j = ~(top.to(tl.int32))  # the low word is ~j
    j = tl.where(top == HIDDEN, -1, j)
    rows = pid_bh.to(tl.int64) * Lq + offs_m
    tl.store(Idx + rows[:, None] * top_k + cols, j, mask=(offs_m[:, None] < Lq) & (cols < top_k))


@triton.jit
def _threshold_select_kernel(Q, K, Mask, Idx,
                             sqb, sqh, sqm, sqd, skb, skh, skn, skd, smb, smh, smm, smn,
                             Hq, Lq, Lk, group, scale, top_k,
                             E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                             DOT: tl.constexpr):
    # The selection for large top_k, whose candidate buffer would not fit in
    # registers.  Per row, the top_k-th largest score T is found as a radix
    # select on u, the score's order-preserving image in [0, 2**32): eight
    # passes over the keys each fix 4 bits of T, counting the visible keys
    # with u >= prefix + d * 2**shift for the 16 digits d (the new digit is the
    # largest d whose count still reaches top_k); a ninth pass counts the keys
    # strictly above T, which leaves `quota` ties at T to keep (the lowest
    # indices); the tenth writes the kept indices in key order.  (A row with
    # fewer than top_k visible keys ends with T = 0 and keeps them all.)  Ten
    # passes of scores, O(BLOCK_M * 16) state; one flat loop over (pass, tile)
    # keeps one copy of the score code.
    pid_bh, b, h, hk, start_m, offs_m = program_block(Hq, group, BLOCK_M)
    row_ok = offs_m < Lq
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(Q, b * sqb + h * sqh, offs_m, sqm, sqd, Lq, BLOCK_D, E)
    k_base = b * skb + hk * skh
    mask_base = b * smb + h * smh
    rows = pid_bh.to(tl.int64) * Lq + offs_m
    hi_n = Lk
    if CAUSAL:
        hi_n = tl.minimum(Lk, start_m + BLOCK_M)
    n_tiles = tl.cdiv(hi_n, BLOCK_N)
    digits = tl.arange(0, 16).to(tl.int64)[None, :]  # (1, 16)
    thr = tl.zeros([BLOCK_M], tl.int64)  # T's bits found so far
    counts = tl.zeros([BLOCK_M, 16], tl.int32)
    above = tl.zeros([BLOCK_M], tl.int32)
    quota = tl.zeros([BLOCK_M], tl.int32)
    kept = tl.zeros([BLOCK_M], tl.int32)
    ties = tl.zeros([BLOCK_M], tl.int32)
    for t in range(0, 10 * n_tiles):
        pss = t // n_tiles
        offs_n = (t % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        kt = tl.load(K + k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < E), other=0.0)  # (D, N)
        s = dot(q, kt, DOT) * scale
        vis = row_ok[:, None] & visible(offs_m, offs_n, Lk, 0, -1, 0, CAUSAL)
        s = masked_scores(s, vis, offs_m, offs_n, Mask, mask_base, smm, smn, vis, MASK_KIND)
        vis = s != float("-inf")
        # the order-preserving image of _sort_keys, shifted to [0, 2**32)
        s = tl.where(s == 0.0, 0.0, s)
        bits = s.to(tl.int32, bitcast=True)
        ordered = tl.where(s != s, 0x7FFFFFFF, bits ^ ((bits >> 31) & 0x7FFFFFFF))
        u = ordered.to(tl.int64) + 2147483648
        if pss < 8:
            # candidates back in the signed domain (each < 2**32 in u's), compared in int32
            cand = (thr[:, None] + (digits << (28 - 4 * pss)) - 2147483648).to(tl.int32)  # (M, 16)
            counts += tl.sum(((ordered[:, None, :] >= cand[:, :, None]) & vis[:, None, :]).to(tl.int32), 2)
        elif pss == 8:
            above += tl.sum((vis & (u > thr[:, None])).to(tl.int32), 1)
        else:
            tie = vis & (u == thr[:, None])
            tie_rank = ties[:, None] + tl.cumsum(tie.to(tl.int32), 1) - 1
            keep = vis & ((u > thr[:, None]) | (tie & (tie_rank < quota[:, None])))
            pos = kept[:, None] + tl.cumsum(keep.to(tl.int32), 1) - 1
            tl.store(Idx + rows[:, None] * top_k + pos, offs_n[None, :] + tl.zeros_like(pos), mask=keep)
            kept += tl.sum(keep.to(tl.int32), 1)
            ties += tl.sum(tie.to(tl.int32), 1)
        if t % n_tiles == n_tiles - 1:  # the end of a pass
            if pss < 8:
                digit = tl.sum(((counts >= top_k) & (digits > 0)).to(tl.int64), 1)
                thr = thr + (digit << (28 - 4 * pss))
                counts = tl.zeros([BLOCK_M, 16], tl.int32)
            elif pss == 8:
                quota = top_k - above
    for c0 in range(0, top_k, BLOCK_N):  # slots past a row's visible keys
        offs_c = c0 + tl.arange(0, BLOCK_N)
        tl.store(Idx + rows[:, None] * top_k + offs_c[None, :], tl.full([BLOCK_M, BLOCK_N], -1, tl.int32),
                 mask=row_ok[:, None] & (offs_c[None, :] >= kept[:, None]) & (offs_c[None, :] < top_k))


@triton.jit
def _fwd_kernel(Q, K, V, Mask, Idx, Out, Lse,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                smb, smh, smm, smn, sob, soh, som, sod,
                Hq, Lq, group, scale, top_k,
                E: tl.constexpr, Ev: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASK_KIND: tl.constexpr):
    # One program per (query block, batch * q head); the chosen keys are walked
    # in chunks of BLOCK_C with an online softmax.  Each row gathers its own
    # keys, so the products are elementwise float32 (no shared tile for tl.dot).
    pid_bh, b, h, hk, _, offs_m = program_block(Hq, group, BLOCK_M)
    row_ok = offs_m < Lq
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_rows(Q, b * sqb + h * sqh, offs_m, sqm, sqd, Lq, BLOCK_D, E).to(tl.float32)
    k_base = b * skb + hk * skh
    v_base = b * svb + hk * svh
    mask_base = b * smb + h * smh
    rows = pid_bh.to(tl.int64) * Lq + offs_m
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for c0 in range(0, top_k, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        j = tl.load(Idx + rows[:, None] * top_k + offs_c[None, :],
                    mask=row_ok[:, None] & (offs_c[None, :] < top_k), other=-1)  # (M, C)
        ok = j >= 0
        jn = j.to(tl.int64)[:, :, None]
        k3 = tl.load(K + k_base + jn * skn + offs_d[None, None, :] * skd,
                     mask=ok[:, :, None] & (offs_d[None, None, :] < E), other=0.0).to(tl.float32)  # (M, C, D)
        s = tl.sum(q[:, None, :] * k3, 2) * scale
        if MASK_KIND == MASK_FLOAT:  # the choice already excludes every hidden key
            s = s + tl.load(Mask + mask_base + offs_m[:, None] * smm + j.to(tl.int64) * smn,
                            mask=ok, other=0.0).to(tl.float32)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing kept yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v3 = tl.load(V + v_base + jn * svn + offs_dv[None, None, :] * svd,
                     mask=ok[:, :, None] & (offs_dv[None, None, :] < Ev), other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v3, 1)
        m_i = m_new
    alive = l_i > 0
    out = acc / tl.where(alive, l_i, 1.0)[:, None]  # rows with no visible key: 0
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < Ev))
    lse = tl.where(alive, row_lse(m_i, tl.where(alive, l_i, 1.0)),
                   tl.where(l_i != l_i, l_i, float("-inf")).to(tl.float64))  # NaN rows keep NaN
    tl.store(Lse + rows, lse.to(Lse.dtype.element_ty), mask=row_ok)


@triton.jit
def _bwd_kernel(Q, K, V, Mask, Idx, DO, Lse, DLse, DQ, DK, DV,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                smb, smh, smm, smn, sdb, sdh, sdm, sdd,
                Hq, Hkv, Lq, Lk, group, scale, top_k,
                E: tl.constexpr, Ev: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASK_KIND: tl.constexpr,
                HAS_DLSE: tl.constexpr):
    # One program per (query block, batch * q head), two passes over the chosen
    # keys: delta = rowsum(P * dP) - dlse, then dS = P * (dP - delta) and
    #   dq_i  = scale * sum_j dS_ij k_j                  (registers)
    #   dk_j += scale * dS_ij q_i,  dv_j += P_ij dO_i    (atomic adds, float32)
    # Rows of a block (and the q heads of a GQA group) share keys: the atomic
    # adds take the duplicates.  delta is not rowsum(dO * O): the stored O is
    # rounded, and with one kept key (exact dq = dk = 0) the two terms would not
    # cancel (see attention.py).
    pid_bh, b, h, hk, _, offs_m = program_block(Hq, group, BLOCK_M)
    row_ok = offs_m < Lq
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_rows(Q, b * sqb + h * sqh, offs_m, sqm, sqd, Lq, BLOCK_D, E).to(tl.float32)
    do = load_rows(DO, b * sdb + h * sdh, offs_m, sdm, sdd, Lq, BLOCK_DV, Ev).to(tl.float32)
    rows = pid_bh.to(tl.int64) * Lq + offs_m
    lse_hi, lse_lo = lse_parts(tl.load(Lse + rows, mask=row_ok, other=float("inf")))  # no visible key: P = 0
    k_base = b * skb + hk * skh
    v_base = b * svb + hk * svh
    mask_base = b * smb + h * smh
    kv_row0 = (b * Hkv + hk).to(tl.int64) * Lk  # dk/dv buffers: contiguous (B, Hkv, Lk, E|Ev)
    delta = tl.zeros([BLOCK_M], tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for grad_pass in tl.static_range(2):  # 0: delta, 1: the gradients
        for c0 in range(0, top_k, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            j = tl.load(Idx + rows[:, None] * top_k + offs_c[None, :],
                        mask=row_ok[:, None] & (offs_c[None, :] < top_k), other=-1)  # (M, C)
            ok = (j >= 0) & (j < Lk)  # a caller's idx out of range reads and writes nothing
            jn = j.to(tl.int64)[:, :, None]
            k3 = tl.load(K + k_base + jn * skn + offs_d[None, None, :] * skd,
                         mask=ok[:, :, None] & (offs_d[None, None, :] < E), other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k3, 2) * scale
            if MASK_KIND == MASK_FLOAT:
                s = s + tl.load(Mask + mask_base + offs_m[:, None] * smm + j.to(tl.int64) * smn,
                                mask=ok, other=0.0).to(tl.float32)
            p = tl.exp((tl.where(ok, s, float("-inf")) - lse_hi[:, None]) - lse_lo[:, None])
            v3 = tl.load(V + v_base + jn * svn + offs_dv[None, None, :] * svd,
                         mask=ok[:, :, None] & (offs_dv[None, None, :] < Ev), other=0.0).to(tl.float32)
            dp = tl.sum(do[:, None, :] * v3, 2)
            if grad_pass == 0:
                delta += tl.sum(p * dp, 1)
            else:
                ds = p * (dp - delta[:, None])
                dq += tl.sum(ds[:, :, None] * k3, 1)
                kv = kv_row0 + jn
                tl.atomic_add(DK + kv * E + offs_d[None, None, :], (ds * scale)[:, :, None] * q[:, None, :],
                              mask=ok[:, :, None] & (offs_d[None, None, :] < E), sem="relaxed")
                tl.atomic_add(DV + kv * Ev + offs_dv[None, None, :], p[:, :, None] * do[:, None, :],
                              mask=ok[:, :, None] & (offs_dv[None, None, :] < Ev), sem="relaxed")
        if grad_pass == 0:
            if HAS_DLSE:  # d lse / d s = P: a gradient on lse only shifts delta
                delta -= tl.load(DLse + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(DQ + rows[:, None] * E + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < E))


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
# Selection: top_k <= BITONIC_MAX_K takes the candidate buffer (one pass over
# the keys, best first), larger top_k the threshold search (10 passes, key
# order): a buffer of W int64 per row stops fitting in registers (a 16 x 1024
# buffer spilled 170 KB and took ptxas two minutes; 16 x 256 compiles in
# seconds).  A key tile of the buffer path (W x BLOCK_D dot operand) must also
# stay within SELECT_TILE_BYTES of shared memory (float32 with E = 128 and
# W = 256 took 136 KB, more than sm86's 99 KB): beyond, the threshold search.
# Tile shapes, picked from sm90 compiles (ptxas spills; no GPU timing yet):
#   buffer path: W = max(next_pow2(top_k), SELECT_MIN_W) keys per tile, 16
#   query rows (a tl.dot operand: >= 16), 4 warps (8 from W = 256);
#   threshold path: THRESHOLD_TILE (rows, keys);
#   gather kernels: BLOCK_C chosen keys per chunk and as many rows as keep the
#   (M, C, D) gathers at GATHER_ELEMENTS (8192 spilled in the backward).
# The interpreter's cost grows with the number of programs and ops, hardly
# with their width, so there a program takes up to 128 rows.
BITONIC_MAX_K = 256
SELECT_TILE_BYTES = 64 * 1024
SELECT_MIN_W = 64
SELECT_ROWS = 16
THRESHOLD_TILE = (16, 32)  # 64 keys spilled 10 KB (the (rows, 16, keys) digit counts)
GATHER_BLOCK_C = {False: 16, True: 32}  # interpreting -> chunk
GATHER_ELEMENTS = {False: 4096, True: 1 << 18}
INTERP_ROWS = 128


def _select_tiles(Lq, top_k, interp):
    """(BLOCK_M, W) of the buffer path."""
    W = max(triton.next_power_of_2(top_k), SELECT_MIN_W)
    if interp:
        return min(max(triton.next_power_of_2(Lq), 16), INTERP_ROWS), W
    return SELECT_ROWS, W


def _buffer_path(top_k, block_d, dtype):
    """Whether the selection takes the candidate buffer (else the threshold search)."""
    W = max(triton.next_power_of_2(top_k), SELECT_MIN_W)
    return top_k <= BITONIC_MAX_K and W * block_d * (4 if dtype == torch.float32 else 2) <= SELECT_TILE_BYTES


def _gather_tiles(Lq, top_k, block_d, block_dv, interp):
    """(BLOCK_M, BLOCK_C) of the forward and backward kernels."""
    block_c = min(triton.next_power_of_2(top_k), GATHER_BLOCK_C[interp])
    block_m = GATHER_ELEMENTS[interp] // (block_c * max(block_d, block_dv))
    cap = min(triton.next_power_of_2(Lq), INTERP_ROWS) if interp else 16
    return max(1, min(cap, block_m)), block_c


def select_topk(q, k, mask, causal, scale, top_k, launch=None):
    """idx (B, Hq, Lq, top_k) int32: each row's chosen key indices (best first up to
    BITONIC_MAX_K, in key order above), -1 in the slots past a row's visible keys."""
    wrap = launch or (lambda kern: kern)
    B, Hq, Lq, E = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    idx = torch.empty((B, Hq, Lq, top_k), dtype=torch.int32, device=q.device)
    if idx.numel() == 0:
        return idx
    interp = INTERPRETING
    m, mstrides, kind = mask_args(q, mask)
    block_d = max(16, triton.next_power_of_2(E))
    common = (q, k, m, idx, *q.stride(), *k.stride(), *mstrides, Hq, Lq, Lk, Hq // Hkv, scale, top_k)
    meta = dict(E=E, BLOCK_D=block_d, MASK_KIND=kind, CAUSAL=bool(causal), DOT=dot_mode(q.dtype))
    if _buffer_path(top_k, block_d, q.dtype):
        block_m, W = _select_tiles(Lq, top_k, interp)
        wrap(_select_kernel)[(triton.cdiv(Lq, block_m), B * Hq)](
            *common, BLOCK_M=block_m, LOG_W=W.bit_length() - 1, **meta, num_warps=4 if W <= 128 else 8)
    else:
        block_m, block_n = THRESHOLD_TILE
        if interp:
            block_m, block_n = min(max(triton.next_power_of_2(Lq), 16), INTERP_ROWS), 64
        wrap(_threshold_select_kernel)[(triton.cdiv(Lq, block_m), B * Hq)](
            *common, BLOCK_M=block_m, BLOCK_N=block_n, **meta, num_warps=4)
    return idx


def topk_fwd(q, k, v, mask, causal, scale, top_k, launch=None):
    """(out, lse, idx): out (B, Hq, Lq, Ev) contiguous in q's dtype, lse (B, Hq, Lq)
    float64 for float32 inputs, else float32 (-inf for rows with no visible key), idx
    as `select_topk`."""
    wrap = launch or (lambda kern: kern)
    B, Hq, Lq, E = q.shape
    Hkv, Ev = k.shape[1], v.shape[3]
    idx = select_topk(q, k, mask, causal, scale, top_k, launch)
    out = torch.empty((B, Hq, Lq, Ev), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=lse_dtype(q.dtype), device=q.device)
    if lse.numel() == 0:
        return out, lse, idx
    m, mstrides, kind = mask_args(q, mask)
    block_d, block_dv = max(16, triton.next_power_of_2(E)), max(16, triton.next_power_of_2(Ev))
    block_m, block_c = _gather_tiles(Lq, top_k, block_d, block_dv, INTERPRETING)
    wrap(_fwd_kernel)[(triton.cdiv(Lq, block_m), B * Hq)](
        q, k, v, m, idx, out, lse, *q.stride(), *k.stride(), *v.stride(), *mstrides, *out.stride(),
        Hq, Lq, Hq // Hkv, scale, top_k, E=E, Ev=Ev, BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_D=block_d,
        BLOCK_DV=block_dv, MASK_KIND=kind, num_warps=4)
    return out, lse, idx


def topk_bwd(dout, q, k, v, mask, scale, out, lse, idx, dlse=None, launch=None):
    """(dq, dk, dv), contiguous in q's dtype: the straight-through backward of
    `topk_fwd` (idx held fixed).  `out` is not read (delta comes from P and dP);
    dlse, when given, is the gradient of lse."""
    wrap = launch or (lambda kern: kern)
    B, Hq, Lq, E = q.shape
    Hkv, Lk, Ev = k.shape[1], k.shape[2], v.shape[3]
    top_k = idx.shape[3]
    dq = torch.empty((B, Hq, Lq, E), dtype=q.dtype, device=q.device)
    # float32 accumulators of the atomic adds (the outputs themselves for float32)
    dk = torch.zeros((B, Hkv, Lk, E), dtype=torch.float32, device=q.device)
    dv = torch.zeros((B, Hkv, Lk, Ev), dtype=torch.float32, device=q.device)
    if B * Hq * Lq > 0:
        m, mstrides, kind = mask_args(q, mask)
        block_d, block_dv = max(16, triton.next_power_of_2(E)), max(16, triton.next_power_of_2(Ev))
        block_m, block_c = _gather_tiles(Lq, top_k, block_d, block_dv, INTERPRETING)
        idx = idx.contiguous()  # idx, lse, dlse are indexed as (B * Hq, Lq, ...)
        lse = lse.contiguous()
        dlse_arg = dlse.contiguous() if dlse is not None else lse
        wrap(_bwd_kernel)[(triton.cdiv(Lq, block_m), B * Hq)](
            q, k, v, m, idx, dout, lse, dlse_arg, dq, dk, dv, *q.stride(), *k.stride(), *v.stride(),
            *mstrides, *dout.stride(), Hq, Hkv, Lq, Lk, Hq // Hkv, scale, top_k, E=E, Ev=Ev,
            BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_D=block_d, BLOCK_DV=block_dv, MASK_KIND=kind,
            HAS_DLSE=dlse is not None, num_warps=4)
    return dq, dk.to(q.dtype), dv.to(q.dtype)


# ---------------------------------------------------------------------------
# The torch ops: `attnfast::triton_topk_fwd` / `attnfast::triton_topk_bwd` are
# `triton_op`s (the body launches the kernels through `wrap_triton`, see
# common.launcher, so torch.compile sees inside them and the body doubles as
# the fake kernel); autograd links the two.  Semantics are those of
# `attnfast.reference.topk_attention_ref`.
# ---------------------------------------------------------------------------
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


@triton_op("attnfast::triton_topk_fwd", mutates_args=())
def triton_topk_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    causal: bool, scale: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, Hq, Lq, Ev) in q's dtype, lse (B, Hq, Lq) float32, idx (B, Hq, Lq, top_k)
    int32: the chosen keys, best first, -1 in the slots past a row's visible keys)."""
    _check(q, k, v, mask, top_k)
    return topk_fwd(q, k, v, mask, causal, scale, top_k, launch=launcher(q))


@triton_op("attnfast::triton_topk_bwd", mutates_args=())
def triton_topk_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None, scale: float, out: torch.Tensor, lse: torch.Tensor,
                    idx: torch.Tensor, dlse: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the forward with the choice `idx` held fixed; dlse, when given,
    is the gradient of lse."""
    return topk_bwd(dout, q, k, v, mask, scale, out, lse, idx, dlse, launch=launcher(q))


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
