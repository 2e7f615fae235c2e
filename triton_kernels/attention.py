"""FlashAttention-2 in Triton: forward, and backward with a delta preprocess.

Layers: `@triton.jit` kernels, plain launchers (`attention_fwd`, `attention_bwd`:
shapes, grid, block sizes), and the torch ops `attnfast::triton_fwd` /
`attnfast::triton_bwd` with their autograd (the end of this file; registered
when this module is imported).  Tensors are 4-D:
q (B, Hq, Lq, E), k (B, Hkv, Lk, E), v (B, Hkv, Lk, Ev), mask expanded to
(B, Hq, Lq, Lk) with stride 0 where it broadcasts.  Visibility of key j for
query i: d = i + diag; (window_left < 0 or j >= d - window_left) and
(window_right < 0 or j <= d + window_right); causal is window_right = 0.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ..ops import lse_dtype

from .common import (DOT_IEEE, INTERPRETING, LN2_HI, LN2_LO, LOG2E, LOG2E_HI, LOG2E_LO, MASK_NONE, dot, dot_mode,
                     launcher, load_rows, load_tile, mask_args, masked_scores, p_of_scores, program_block, row_lse2,
                     row_source, saved_lse_parts, use_descriptors, visible)


@triton.jit
def _dropout_scale(offs_m, offs_n, Lk, bh, seed_lo, seed_hi, offset, p_drop):
    """0 or 1/(1-p) for elements (offs_m, offs_n) of head bh: Philox4x32-10 with
    counter (lo32(n), hi32(n), bh, offset), n = i*Lk + j, key (seed_lo,
    seed_hi); keep iff (word >> 8) * 2^-24 >= p.  The same stream as the CPU
    kernel (csrc/cpu/philox.h) and attnfast.testing.dropout_mask."""
    n = offs_m[:, None].to(tl.int64) * Lk + offs_n[None, :]
    c0 = (n & 0xFFFFFFFF).to(tl.uint32)
    c1 = (n >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + bh.to(tl.uint32)
    c3 = tl.zeros_like(c0) + offset.to(tl.uint32)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
        c1 = _c2 * 0xCD9E8D57
        c3 = _c0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    u = (c0 >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return tl.where(u >= p_drop, 1.0 / (1.0 - p_drop), 0.0)


@triton.jit
def _mask_scores(s, offs_m, offs_n, Mask, mask_base, smm, smn, Lq, Lk, diag, wl, wr, need,
                 MASK_KIND: tl.constexpr, WINDOWED: tl.constexpr):
    """Scores (log2 units) with everything a query may not see set to -inf: keys
    past Lk, outside the causal/window band, or hidden by the mask; a float mask
    is added (times log2 e).  The mask is read only where `need` (a tile the
    lists mark fully visible reads nothing)."""
    ok = visible(offs_m, offs_n, Lk, diag, wl, wr, WINDOWED)
    inb = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    inb = inb & (tl.zeros_like(inb) | need)  # (broadcast spelled out for the interpreter)
    return masked_scores(s, ok, offs_m, offs_n, Mask, mask_base, smm, smn, inb, MASK_KIND, True)


@triton.jit
def _band_range(start, BLOCK: tl.constexpr, BLOCK_OTHER: tl.constexpr, L_other, diag, wl, wr,
                WINDOWED: tl.constexpr):
    """[lo, hi) of the other side's positions that some row of the block [start,
    start + BLOCK) sees in the band (key j visible from query i iff -wl <= j - (i + diag)
    <= wr); lo aligned down to BLOCK_OTHER (its positions left of the band are masked).
    Key tiles of a query block: (start_m, BLOCK_M, BLOCK_N, Lk, diag, wl, wr); query
    tiles of a key block, the band seen from the keys: (start_n, BLOCK_N, BLOCK_M, Lq,
    -diag, wr, wl)."""
    lo = 0
    hi = L_other
    if WINDOWED:
        if wl >= 0:
            lo = tl.maximum(start + diag - wl, 0)
            lo = (lo // BLOCK_OTHER) * BLOCK_OTHER
        if wr >= 0:
            hi = tl.minimum(start + BLOCK - 1 + diag + wr + 1, L_other)
    return lo, hi


@triton.jit
def _whole_range(start, BLOCK: tl.constexpr, BLOCK_OTHER: tl.constexpr, lo, hi, L_other, diag, wl, wr,
                 WINDOWED: tl.constexpr):
    """[a, b): the tiles of the band range [lo, hi) (tiles of BLOCK_OTHER from lo) that every
    row of the block [start, start + BLOCK) sees whole: inside L_other and inside each row's
    band.  They need no masking; the tiles of [lo, a) and [b, hi) do.  Arguments as
    _band_range's (an empty band, hi <= lo: a = z = lo)."""
    hi = tl.maximum(hi, lo)
    a = lo
    end = L_other
    if WINDOWED:
        if wl >= 0:  # the block's last row sees from start + BLOCK - 1 + diag - wl on
            a = lo + tl.cdiv(tl.maximum(start + BLOCK - 1 + diag - wl - lo, 0), BLOCK_OTHER) * BLOCK_OTHER
        if wr >= 0:  # its first row up to start + diag + wr
            end = tl.minimum(end, start + diag + wr + 1)
    a = tl.minimum(a, hi)
    b = lo + (tl.maximum(end - lo, 0) // BLOCK_OTHER) * BLOCK_OTHER
    return a, tl.maximum(tl.minimum(b, hi), a)


@triton.jit
def _edge_count(lo, a, b, hi, BLOCK_OTHER: tl.constexpr):
    """How many tiles need masking: those of [lo, a) and of [b, hi) (<= 0: none)."""
    return tl.cdiv(a - lo, BLOCK_OTHER) + tl.cdiv(hi - b, BLOCK_OTHER)


@triton.jit
def _edge_tile(t, lo, a, b, BLOCK_OTHER: tl.constexpr):
    """First position of the t-th tile that needs masking: those of [lo, a), then of [b, hi)."""
    n_left = tl.cdiv(a - lo, BLOCK_OTHER)  # (a is on the grid, or hi)
    return tl.where(t < n_left, lo + t * BLOCK_OTHER, b + (t - n_left) * BLOCK_OTHER)


# A mask tensor comes with its block lists (built by `mask_block_lists`): for
# each (batch, head, row of SUM_M queries) an int32 record [n, e_0 .. e_{n-1}]
# of the SUM_N-wide key columns to visit, e = 2 * column + need, where need
# says the mask must be read there (the cell mixes visible and hidden, or holds
# nonzero float values); a cell the mask leaves fully visible is computed
# without reading it.  Cells it hides entirely, or that lie outside the
# causal/window band, are not listed: never visited.  The dK/dV kernel reads
# the transposed lists (per key column, rows of queries).  A kernel tile lies in
# one cell (BLOCK_M <= SUM_M, BLOCK_N <= SUM_N); a cell is walked in tiles.


@triton.jit
def _listed_tile(rec, t, CELL: tl.constexpr, BLOCK: tl.constexpr):
    """(first position, need) of the t-th kernel tile of a block-list record: cells of
    CELL positions walked in tiles of BLOCK."""
    e = tl.load(rec + 1 + t // (CELL // BLOCK))
    return (e >> 1) * CELL + (t % (CELL // BLOCK)) * BLOCK, (e & 1) != 0


@triton.jit
def _seq(CuQ, CuK, UsedK, b, Lq, Lk, diag, br, VARLEN: tl.constexpr, USED_K: tl.constexpr):
    """(first query row, Lq, first key row, Lk, diag) of batch entry b: the call's own for a
    dense call; sequence b's for packed sequences (VARLEN: rows cu[b]:cu[b+1] of the packed
    tensors, only the first UsedK[b] keys with USED_K, the diagonal bottom-right when br)."""
    if VARLEN:
        q0 = tl.load(CuQ + b)
        k0 = tl.load(CuK + b)
        Lq = tl.load(CuQ + b + 1) - q0
        Lk = tl.load(CuK + b + 1) - k0
        if USED_K:
            Lk = tl.load(UsedK + b)
        diag = tl.where(br != 0, Lk - Lq, 0)
        return q0, Lq, k0, Lk, diag
    return 0, Lq, 0, Lk, diag


@triton.jit
def _drop_stream(b, h, bh, rng_offset, VARLEN: tl.constexpr):
    """(counter word bh, offset) of head (b, h)'s dropout: sequence b of packed sequences
    draws as a one-sequence call with offset + b."""
    if VARLEN:
        return h, rng_offset + b
    return bh, rng_offset


@triton.jit
def _nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _scores_log2(qk, hi, lo):
    """Scores in log2 units, qk * (hi + lo) rounded once (an FMA: the product by hi is exact
    inside it).  The forward and both backward kernels form every score by this one
    expression, so the backward's P = exp2(s - lse) rebuilds the forward's very scores."""
    return tl.fma(qk, hi, qk * lo)


@triton.jit
def _scale_log2(scale):
    """(hi, lo): scale * log2 e as two float32 values whose sum holds it to ~2^-48, so that the
    scores in log2 units, qk * hi + qk * lo, carry no rounding of the folded constant (one
    float32 constant would put up to 6e-8 of relative error on every exponent's distance from
    the row max; at D 64 the natural scale 0.125 has none)."""
    s32 = tl.cast(scale, tl.float32)  # (the kernel argument's float32 value, under the interpreter too)
    hi = s32 * LOG2E
    x = s32.to(tl.float64)
    lo = ((x * LOG2E_HI + x * LOG2E_LO) - hi.to(tl.float64)).to(tl.float32)
    return hi, lo


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, start_n, need, offs_m, K, V, Mask, k_base, v_base, mask_base,
              skn, skd, svn, svd, smm, smn, Lq, Lk, qk_scale, qk_lo, diag, wl, wr, bh, seed_lo, seed_hi,
              rng_offset, p_drop, E: tl.constexpr, Ev: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASK_KIND: tl.constexpr,
              WINDOWED: tl.constexpr, DOT: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr,
              DESC: tl.constexpr):
    """One key tile of the online softmax: (acc, m, l) updated, m in log2 units (qk_scale +
    qk_lo = scale * log2 e, _scale_log2).  Not MASKED: a tile that every row sees whole (no
    band, bounds or mask work).  K, V: row_source's (tensor descriptors with DESC)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    # The scores as the backward kernels form them, dot(q, trans(k)) on the same
    # tiles: the backward's P = exp2(s - lse) then rebuilds the forward's very
    # scores, and a row's largest P keeps the cancellation a naive softmax has
    # (s - max = 0).  (k loaded as a (D, N) tile instead rounds differently
    # under the interpreter: P of 5-10 ulps off, dV 4x a naive error.)
    k = load_tile(K, k_base, start_n, BLOCK_N, skn, skd, Lk, BLOCK_D, E, not MASKED, DESC)
    qk = dot(q, tl.trans(k), DOT)
    s = _scores_log2(qk, qk_scale, qk_lo)
    if MASKED:
        s = _mask_scores(s, offs_m, offs_n, Mask, mask_base, smm, smn, Lq, Lk, diag, wl, wr, need,
                         MASK_KIND, WINDOWED)
    # NaN-propagating max (tl.max drops NaN): a NaN score must make its row NaN, not
    # look like a row with no visible key.
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _nan_max), propagate_nan=tl.PropagateNan.ALL)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:  # l sums the kept and the dropped; the output takes the kept
        p = p * _dropout_scale(offs_m, offs_n, Lk, bh, seed_lo, seed_hi, rng_offset, p_drop)
    v = load_tile(V, v_base, start_n, BLOCK_N, svn, svd, Lk, BLOCK_DV, Ev, not MASKED, DESC)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(Q, K, V, Mask, Blocks, Out, Lse, CuQ, CuK, UsedK,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                smb, smh, smm, smn, sbb, sbh, sbr, sob, soh, som, sod, slb, slh,
                Hq, Lq, Lk, group, scale, diag, br, wl, wr, seed_lo, seed_hi, rng_offset, p_drop,
                ARCH, LQ_KEY, LK_KEY,
                E: tl.constexpr, Ev: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SUM_M: tl.constexpr,
                SUM_N: tl.constexpr, MASK_KIND: tl.constexpr, WINDOWED: tl.constexpr,
                DOT: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr, USED_K: tl.constexpr,
                DESC: tl.constexpr):
    # One program per (query block, batch * q head): with VARLEN, batch entry b is
    # packed sequence b (_seq).  ARCH, LQ_KEY, LK_KEY only key the autotuner.  DESC > 0: K and V
    # tiles through tensor descriptors (common.use_descriptors: TMA on sm90) in configs whose
    # products have at least DESC rows (DESC_ROWS: wgmma tiles; with descriptors, ptxas for sm90
    # spilled 12-19 KiB on the 32-row mma.sync tiles of D 256 where pointers spilled 1-2).
    TMA: tl.constexpr = (DESC > 0) & (BLOCK_M >= DESC)
    pid_bh, b, h, hk, start_m, offs_m = program_block(Hq, group, BLOCK_M)
    q0, Lq, k0, Lk, diag = _seq(CuQ, CuK, UsedK, b, Lq, Lk, diag, br, VARLEN, USED_K)
    drop_bh, rng_offset = _drop_stream(b, h, pid_bh, rng_offset, VARLEN)
    offs_dv = tl.arange(0, BLOCK_DV)
    # load q: it stays in registers/SRAM throughout
    q = load_rows(Q, b * sqb + h * sqh + q0 * sqm, offs_m, sqm, sqd, Lq, BLOCK_D, E)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    k_base = b * skb + hk * skh + k0 * skn
    v_base = b * svb + hk * svh + k0 * svn
    K = row_source(K, k_base, Lk, skn, E, BLOCK_N, BLOCK_D, TMA)
    V = row_source(V, v_base, Lk, svn, Ev, BLOCK_N, BLOCK_DV, TMA)
    mask_base = b * smb + h * smh
    qk_scale, qk_lo = _scale_log2(scale)
    if MASK_KIND == MASK_NONE:
        # Two stages: the tiles every row sees whole, unmasked; then the band's edges and the
        # last partial tile, masked.
        lo, hi = _band_range(start_m, BLOCK_M, BLOCK_N, Lk, diag, wl, wr, WINDOWED)
        a, z = _whole_range(start_m, BLOCK_M, BLOCK_N, lo, hi, Lk, diag, wl, wr, WINDOWED)
        for start_n in range(a, z, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(
                acc, m_i, l_i, q, start_n, False, offs_m, K, V, Mask, k_base, v_base, mask_base,
                skn, skd, svn, svd, smm, smn, Lq, Lk, qk_scale, qk_lo, diag, wl, wr, drop_bh, seed_lo, seed_hi,
                rng_offset, p_drop, E, Ev, BLOCK_N, BLOCK_D, BLOCK_DV, 0, WINDOWED, DOT, DROPOUT, False, TMA)
        for t in range(0, _edge_count(lo, a, z, hi, BLOCK_N)):
            acc, m_i, l_i = _fwd_tile(
                acc, m_i, l_i, q, _edge_tile(t, lo, a, z, BLOCK_N), False, offs_m, K, V, Mask, k_base, v_base,
                mask_base, skn, skd, svn, svd, smm, smn, Lq, Lk, qk_scale, qk_lo, diag, wl, wr, drop_bh, seed_lo,
                seed_hi, rng_offset, p_drop, E, Ev, BLOCK_N, BLOCK_D, BLOCK_DV, 0, WINDOWED, DOT, DROPOUT, True, TMA)
    else:
        rec = Blocks + b * sbb + h * sbh + (start_m // SUM_M) * sbr
        # one loop over kernel tiles (not a nested one: one copy of the tile
        # code, one set of pipeline buffers)
        for t in range(0, tl.load(rec) * (SUM_N // BLOCK_N)):
            start_n, need = _listed_tile(rec, t, SUM_N, BLOCK_N)
            acc, m_i, l_i = _fwd_tile(
                acc, m_i, l_i, q, start_n, need, offs_m, K, V, Mask, k_base, v_base, mask_base,
                skn, skd, svn, svd, smm, smn, Lq, Lk, qk_scale, qk_lo, diag, wl, wr, drop_bh, seed_lo, seed_hi,
                rng_offset, p_drop, E, Ev, BLOCK_N, BLOCK_D, BLOCK_DV, MASK_KIND, WINDOWED, DOT, DROPOUT, True, TMA)
    alive = l_i > 0
    out = acc / tl.where(alive, l_i, 1.0)[:, None]  # fully masked rows: 0
    tl.store(Out + b * sob + h * soh + (q0 + offs_m[:, None]) * som + offs_dv[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < Ev))
    lse = tl.where(alive, row_lse2(m_i, tl.where(alive, l_i, 1.0)),
                   tl.where(l_i != l_i, l_i, float("-inf")).to(tl.float64))  # NaN rows keep NaN
    tl.store(Lse + b * slb + h * slh + q0 + offs_m, lse.to(Lse.dtype.element_ty), mask=offs_m < Lq)


@triton.jit
def _split_fwd_kernel(Q, K, V, Lens, Bidx, Table, Acc, Mrow, Lrow,
                      sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, stb,
                      Hq, Lq, group, nsplit, chunk, scale, wl, wr, page,
                      E: tl.constexpr, Ev: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, WINDOWED: tl.constexpr,
                      DOT: tl.constexpr, HAS_BIDX: tl.constexpr, PAGED: tl.constexpr):
    # Split-KV forward (flash-decoding): one program per (key split, batch * q head, query
    # block) over keys [split * chunk, (split + 1) * chunk) of batch entry b's first Lens[b]
    # (its cache entry Bidx[b] with HAS_BIDX), seen by the block's BLOCK_M query rows (short
    # queries: all of them, one block), the diagonal bottom-right; the unnormalised output and
    # the row max (log2 units) and sum go to Acc (B * Hq, nsplit, Lq, Ev), Mrow, Lrow
    # (B * Hq, nsplit, Lq), merged by split_fwd.
    # PAGED (1 or 2): K and V are page pools (pages, Hkv, page, E) by strides; key j of entry b
    # is row j % page of page Table[b, j // page] (table row stride stb), read in place.  1: each
    # key tile lies in one page (page a multiple of BLOCK_N), one base a tile, as a contiguous
    # cache; 2: any page size, each key row's own base (a gather: more registers, 16-key tiles).
    sp = tl.program_id(0)
    bh = tl.program_id(1)
    start_m = tl.program_id(2) * BLOCK_M
    h = bh % Hq
    b = bh // Hq
    hk = h // group
    if HAS_BIDX:
        kb = tl.load(Bidx + b)
    else:
        kb = b
    Lk = tl.load(Lens + b)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_rows(Q, b * sqb + h * sqh, offs_m, sqm, sqd, Lq, BLOCK_D, E)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # The split's keys, less those outside the block's band (aligned to BLOCK_N, as the split is).
    band_lo, band_hi = _band_range(start_m, BLOCK_M, BLOCK_N, Lk, Lk - Lq, wl, wr, WINDOWED)
    lo = tl.maximum(sp * chunk, band_lo)
    hi = tl.minimum(tl.minimum(sp * chunk + chunk, Lk), band_hi)
    qk_scale, qk_lo = _scale_log2(scale)
    for start_n in range(lo, hi, BLOCK_N):
        if PAGED == 1:  # the tile's page, less the tile's logical offset (load_rows adds it)
            pg = tl.load(Table + b * stb + start_n // page).to(tl.int64)
            k_base = pg * skb + hk * skh + (start_n % page - start_n) * skn
            v_base = pg * svb + hk * svh + (start_n % page - start_n) * svn
        elif PAGED == 2:  # the same per key row
            offs_n = start_n + tl.arange(0, BLOCK_N)
            pg = tl.load(Table + b * stb + offs_n // page, mask=offs_n < hi, other=0).to(tl.int64)
            shift = offs_n % page - offs_n
            k_base = (pg * skb + hk * skh + shift * skn)[:, None]
            v_base = (pg * svb + hk * svh + shift * svn)[:, None]
        else:
            k_base = kb * skb + hk * skh
            v_base = kb * svb + hk * svh
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, start_n, False, offs_m, K, V, K, k_base, v_base, 0,
            skn, skd, svn, svd, 0, 0, Lq, hi, qk_scale, qk_lo, Lk - Lq, wl, wr, bh, 0, 0, 0, 0.0, E, Ev, BLOCK_N,
            BLOCK_D, BLOCK_DV, 0, WINDOWED, DOT, False, True, False)
    row = (bh * nsplit + sp) * Lq + offs_m
    tl.store(Acc + row[:, None] * Ev + offs_dv[None, :], acc, mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < Ev))
    tl.store(Mrow + row, m_i, mask=offs_m < Lq)
    tl.store(Lrow + row, l_i, mask=offs_m < Lq)


@triton.jit
def _rows_tile(dq, delta_acc, q, do, lse_hi, lse_lo, delta, start_n, need, offs_m, K, V, Mask, k_base, v_base,
               mask_base, skn, skd, svn, svd, smm, smn, Lq, Lk, qk_scale, qk_lo, diag, wl, wr, bh,
               seed_lo, seed_hi, rng_offset, p_drop, E: tl.constexpr, Ev: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               MASK_KIND: tl.constexpr, WINDOWED: tl.constexpr, DOT: tl.constexpr,
               DROPOUT: tl.constexpr, DELTA_PASS: tl.constexpr, MASKED: tl.constexpr, NAT_LSE: tl.constexpr,
               DESC: tl.constexpr):
    """One key tile of the row-wise backward: delta_acc (DELTA_PASS) or dq updated; scores in
    log2 units as the forward's, (lse_hi, lse_lo) from lse2_parts; not MASKED as there.  K, V:
    row_source's."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = load_tile(K, k_base, start_n, BLOCK_N, skn, skd, Lk, BLOCK_D, E, False, DESC)
    v = load_tile(V, v_base, start_n, BLOCK_N, svn, svd, Lk, BLOCK_DV, Ev, False, DESC)
    s = _scores_log2(dot(q, tl.trans(k), DOT), qk_scale, qk_lo)
    if MASKED:
        s = _mask_scores(s, offs_m, offs_n, Mask, mask_base, smm, smn, Lq, Lk, diag, wl, wr, need,
                         MASK_KIND, WINDOWED)
    p = p_of_scores(s, lse_hi, lse_lo, NAT_LSE)  # masked: 2^-inf = 0; dead rows: hi = +inf
    dp = dot(do, tl.trans(v), DOT)
    if DROPOUT:
        dp = dp * _dropout_scale(offs_m, offs_n, Lk, bh, seed_lo, seed_hi, rng_offset, p_drop)
    if DELTA_PASS:
        delta_acc += tl.sum(p * dp, 1)
    else:
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(k.dtype), k, DOT)
    return dq, delta_acc


@triton.jit
def _bwd_rows_kernel(Q, K, V, Mask, Blocks, DO, Lse, DLse, Delta, DQ, CuQ, CuK, UsedK,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     smb, smh, smm, smn, sbb, sbh, sbr, sdb, sdh, sdm, sdd, slb, slh, sgb, sgh, sgm,
                     Hq, Lq, Lk, group, scale, diag, br, wl, wr, seed_lo, seed_hi, rng_offset, p_drop,
                     ARCH, LQ_KEY, LK_KEY,
                     E: tl.constexpr, Ev: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SUM_M: tl.constexpr,
                     SUM_N: tl.constexpr, MASK_KIND: tl.constexpr, WINDOWED: tl.constexpr,
                     DOT: tl.constexpr, HAS_DLSE: tl.constexpr, DROPOUT: tl.constexpr,
                     DELTA_PASS: tl.constexpr, VARLEN: tl.constexpr, USED_K: tl.constexpr, DESC: tl.constexpr):
    # One program per (query block, batch * q head), launched twice:
    #   DELTA_PASS: delta = rowsum(P * dP) - dlse;
    #   else:       dQ = scale * sum_tiles (P * (dP - delta)) K.
    # delta comes from the same P and dP tiles the dQ pass and the dK/dV kernel
    # recompute (this very code, the same dots), not from FlashAttention-2's
    # rowsum(dO * O): that uses the stored, rounded O, and the two then do not
    # cancel where they should (one visible key: the exact dQ, dK are 0), which
    # the parity rule sees.  It costs two extra tile products per (q, k) tile.
    TMA: tl.constexpr = (DESC > 0) & (BLOCK_M >= DESC)  # DESC: as the forward's
    pid_bh, b, h, hk, start_m, offs_m = program_block(Hq, group, BLOCK_M)
    q0, Lq, k0, Lk, diag = _seq(CuQ, CuK, UsedK, b, Lq, Lk, diag, br, VARLEN, USED_K)
    drop_bh, rng_offset = _drop_stream(b, h, pid_bh, rng_offset, VARLEN)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(Q, b * sqb + h * sqh + q0 * sqm, offs_m, sqm, sqd, Lq, BLOCK_D, E)
    do = load_rows(DO, b * sdb + h * sdh + q0 * sdm, offs_m, sdm, sdd, Lq, BLOCK_DV, Ev)
    row = b * slb + h * slh + q0  # this head's lse, dlse and delta
    NAT_LSE: tl.constexpr = Lse.dtype.element_ty == tl.float32
    lse_hi, lse_lo = saved_lse_parts(tl.load(Lse + row + offs_m, mask=offs_m < Lq, other=float("inf")), NAT_LSE)
    if DELTA_PASS:
        delta = tl.zeros([BLOCK_M], tl.float32)
    else:
        delta = tl.load(Delta + row + offs_m, mask=offs_m < Lq, other=0.0)
    delta_acc = tl.zeros([BLOCK_M], tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = b * skb + hk * skh + k0 * skn
    v_base = b * svb + hk * svh + k0 * svn
    K = row_source(K, k_base, Lk, skn, E, BLOCK_N, BLOCK_D, TMA)
    V = row_source(V, v_base, Lk, svn, Ev, BLOCK_N, BLOCK_DV, TMA)
    mask_base = b * smb + h * smh
    qk_scale, qk_lo = _scale_log2(scale)
    if MASK_KIND == MASK_NONE:  # the forward's two stages
        lo, hi = _band_range(start_m, BLOCK_M, BLOCK_N, Lk, diag, wl, wr, WINDOWED)
        a, z = _whole_range(start_m, BLOCK_M, BLOCK_N, lo, hi, Lk, diag, wl, wr, WINDOWED)
        for start_n in range(a, z, BLOCK_N):
            dq, delta_acc = _rows_tile(
                dq, delta_acc, q, do, lse_hi, lse_lo, delta, start_n, False, offs_m, K, V, Mask, k_base, v_base,
                mask_base, skn, skd, svn, svd, smm, smn, Lq, Lk, qk_scale, qk_lo, diag, wl, wr, drop_bh,
                seed_lo, seed_hi, rng_offset, p_drop, E, Ev, BLOCK_N, BLOCK_D, BLOCK_DV, 0,
                WINDOWED, DOT, DROPOUT, DELTA_PASS, False, NAT_LSE, TMA)
        for t in range(0, _edge_count(lo, a, z, hi, BLOCK_N)):
            dq, delta_acc = _rows_tile(
                dq, delta_acc, q, do, lse_hi, lse_lo, delta, _edge_tile(t, lo, a, z, BLOCK_N), False, offs_m, K, V,
                Mask, k_base, v_base, mask_base, skn, skd, svn, svd, smm, smn, Lq, Lk, qk_scale, qk_lo, diag, wl, wr,
                drop_bh, seed_lo, seed_hi, rng_offset, p_drop, E, Ev, BLOCK_N, BLOCK_D, BLOCK_DV, 0,
                WINDOWED, DOT, DROPOUT, DELTA_PASS, True, NAT_LSE, TMA)
    else:
        rec = Blocks + b * sbb + h * sbh + (start_m // SUM_M) * sbr
        for t in range(0, tl.load(rec) * (SUM_N // BLOCK_N)):
            start_n, need = _listed_tile(rec, t, SUM_N, BLOCK_N)
            dq, delta_acc = _rows_tile(
                dq, delta_acc, q, do, lse_hi, lse_lo, delta, start_n, need, offs_m, K, V, Mask, k_base,
                v_base, mask_base, skn, skd, svn, svd, smm, smn, Lq, Lk, qk_scale, qk_lo, diag, wl, wr, drop_bh,
                seed_lo, seed_hi, rng_offset, p_drop, E, Ev, BLOCK_N, BLOCK_D, BLOCK_DV, MASK_KIND,
                WINDOWED, DOT, DROPOUT, DELTA_PASS, True, NAT_LSE, TMA)
    if DELTA_PASS:
        if HAS_DLSE:  # d lse / d s = P: a gradient on lse only shifts delta
            delta_acc -= tl.load(DLse + row + offs_m, mask=offs_m < Lq, other=0.0).to(tl.float32)
        tl.store(Delta + row + offs_m, delta_acc, mask=offs_m < Lq)
    else:
        dq = dq * scale
        tl.store(DQ + b * sgb + h * sgh + (q0 + offs_m[:, None]) * sgm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < E))


@triton.jit
def _dkdv_tile(dk, dv, k, v, start_m, need, offs_n, h, bh, b, Q, DO, Lse, Delta, Mask, DMask,
               sqb, sqh, sqm, sqd, sdb, sdh, sdm, sdd, smb, smh, smm, smn, row, q0, drop_bh,
               Lq, Lk, qk_scale, qk_lo, diag, wl, wr, seed_lo, seed_hi, rng_offset, p_drop,
               E: tl.constexpr, Ev: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr, MASK_KIND: tl.constexpr, WINDOWED: tl.constexpr,
               MASK_GRAD: tl.constexpr, DOT: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr,
               DESC: tl.constexpr):
    """One query tile of head h against the program's key block: (dk, dv) updated;
    the float-mask gradient dS of the tile is stored.  Scores in log2 units; not MASKED: a
    tile whose rows all see the block's keys whole.  Q, DO: head h's row_source."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = load_tile(Q, b * sqb + h * sqh + q0 * sqm, start_m, BLOCK_M, sqm, sqd, Lq, BLOCK_D, E, False, DESC)
    do = load_tile(DO, b * sdb + h * sdh + q0 * sdm, start_m, BLOCK_M, sdm, sdd, Lq, BLOCK_DV, Ev, False, DESC)
    NAT_LSE: tl.constexpr = Lse.dtype.element_ty == tl.float32
    lse_hi, lse_lo = saved_lse_parts(tl.load(Lse + row + offs_m, mask=offs_m < Lq, other=float("inf")), NAT_LSE)
    delta = tl.load(Delta + row + offs_m, mask=offs_m < Lq, other=0.0)
    s = _scores_log2(dot(q, tl.trans(k), DOT), qk_scale, qk_lo)
    if MASKED:
        s = _mask_scores(s, offs_m, offs_n, Mask, b * smb + h * smh, smm, smn, Lq, Lk, diag, wl, wr,
                         need, MASK_KIND, WINDOWED)
    p = p_of_scores(s, lse_hi, lse_lo, NAT_LSE)  # (M, N); dead rows, rows past Lq: p = 0
    if DROPOUT:
        z = _dropout_scale(offs_m, offs_n, Lk, drop_bh, seed_lo, seed_hi, rng_offset, p_drop)
        dv += dot(tl.trans(p * z).to(do.dtype), do, DOT)
        dp = dot(do, tl.trans(v), DOT) * z
    else:
        dv += dot(tl.trans(p).to(do.dtype), do, DOT)
        dp = dot(do, tl.trans(v), DOT)
    ds = p * (dp - delta[:, None])
    if MASK_GRAD:
        tl.store(DMask + bh * Lq * Lk + offs_m[:, None] * Lk + offs_n[None, :], ds,
                 mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))
    dk += dot(tl.trans(ds).to(q.dtype), q, DOT)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, Mask, BlocksT, DO, Lse, Delta, DK, DV, DMask, CuQ, CuK, UsedK,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     smb, smh, smm, smn, sbb, sbh, sbr, sdb, sdh, sdm, sdd, slb, slh,
                     sgkb, sgkh, sgkn, sgvb, sgvh, sgvn,
                     Hq, Hkv, Lq, Lk, group, scale, diag, br, wl, wr, seed_lo, seed_hi, rng_offset, p_drop,
                     ARCH, LQ_KEY, LK_KEY,
                     E: tl.constexpr, Ev: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SUM_M: tl.constexpr,
                     SUM_N: tl.constexpr, MASK_KIND: tl.constexpr, WINDOWED: tl.constexpr,
                     MASK_GRAD: tl.constexpr, DOT: tl.constexpr, DROPOUT: tl.constexpr,
                     VARLEN: tl.constexpr, USED_K: tl.constexpr, DESC: tl.constexpr):
    # One program per (key block, batch * kv head): it owns that dK/dV block and
    # walks the query blocks of every q head of its GQA group.
    TMA: tl.constexpr = (DESC > 0) & (BLOCK_M >= DESC) & (BLOCK_N >= DESC)  # products of BLOCK_M, BLOCK_N rows
    _, b, hk, _, start_n, offs_n = program_block(Hkv, 1, BLOCK_N)
    q0, Lq, k0, Lk, diag = _seq(CuQ, CuK, UsedK, b, Lq, Lk, diag, br, VARLEN, USED_K)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = load_rows(K, b * skb + hk * skh + k0 * skn, offs_n, skn, skd, Lk, BLOCK_D, E)  # (N, D)
    v = load_rows(V, b * svb + hk * svh + k0 * svn, offs_n, svn, svd, Lk, BLOCK_DV, Ev)  # (N, DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo, hi = _band_range(start_n, BLOCK_N, BLOCK_M, Lq, -diag, wr, wl, WINDOWED)
    # The forward's two stages, from the keys' side: query tiles every key of the block sees whole
    # (rows past Lq have lse = +inf there: P = 0), then the edges.
    a, z = _whole_range(start_n, BLOCK_N, BLOCK_M, lo, hi, Lq, -diag, wr, wl, WINDOWED)
    qk_scale, qk_lo = _scale_log2(scale)
    for g in range(0, group):
        h = hk * group + g
        bh = b * Hq + h
        row = b * slb + h * slh + q0  # head h's lse and delta
        drop_bh, drop_offset = _drop_stream(b, h, bh, rng_offset, VARLEN)
        Qh = row_source(Q, b * sqb + h * sqh + q0 * sqm, Lq, sqm, E, BLOCK_M, BLOCK_D, TMA)
        DOh = row_source(DO, b * sdb + h * sdh + q0 * sdm, Lq, sdm, Ev, BLOCK_M, BLOCK_DV, TMA)
        if MASK_KIND == MASK_NONE:
            for start_m in range(a, z, BLOCK_M):
                dk, dv = _dkdv_tile(
                    dk, dv, k, v, start_m, False, offs_n, h, bh, b, Qh, DOh, Lse, Delta, Mask, DMask,
                    sqb, sqh, sqm, sqd, sdb, sdh, sdm, sdd, smb, smh, smm, smn, row, q0, drop_bh, Lq, Lk,
                    qk_scale, qk_lo, diag, wl, wr, seed_lo, seed_hi, drop_offset, p_drop, E, Ev, BLOCK_M, BLOCK_D,
                    BLOCK_DV, 0, WINDOWED, MASK_GRAD, DOT, DROPOUT, False, TMA)
            for t in range(0, _edge_count(lo, a, z, hi, BLOCK_M)):
                dk, dv = _dkdv_tile(
                    dk, dv, k, v, _edge_tile(t, lo, a, z, BLOCK_M), False, offs_n, h, bh, b, Qh, DOh, Lse, Delta,
                    Mask, DMask, sqb, sqh, sqm, sqd, sdb, sdh, sdm, sdd, smb, smh, smm, smn, row, q0, drop_bh,
                    Lq, Lk, qk_scale, qk_lo, diag, wl, wr, seed_lo, seed_hi, drop_offset, p_drop, E, Ev, BLOCK_M,
                    BLOCK_D, BLOCK_DV, 0, WINDOWED, MASK_GRAD, DOT, DROPOUT, True, TMA)
        else:
            rec = BlocksT + b * sbb + h * sbh + (start_n // SUM_N) * sbr
            for t in range(0, tl.load(rec) * (SUM_M // BLOCK_M)):
                start_m, need = _listed_tile(rec, t, SUM_M, BLOCK_M)
                dk, dv = _dkdv_tile(
                    dk, dv, k, v, start_m, need, offs_n, h, bh, b, Qh, DOh, Lse, Delta, Mask, DMask,
                    sqb, sqh, sqm, sqd, sdb, sdh, sdm, sdd, smb, smh, smm, smn, row, q0, drop_bh, Lq, Lk,
                    qk_scale, qk_lo, diag, wl, wr, seed_lo, seed_hi, drop_offset, p_drop, E, Ev, BLOCK_M, BLOCK_D,
                    BLOCK_DV, MASK_KIND, WINDOWED, MASK_GRAD, DOT, DROPOUT, True, TMA)
    dk = dk * scale
    tl.store(DK + b * sgkb + hk * sgkh + (k0 + offs_n[:, None]) * sgkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < E))
    tl.store(DV + b * sgvb + hk * sgvh + (k0 + offs_n[:, None]) * sgvn + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < Ev))


# ---------------------------------------------------------------------------
# Block lists of a mask (see the comment above _fwd_tile).
# ---------------------------------------------------------------------------
def _cells_any(x, cm, cn):
    """x (Bm, Hm, R, C) bool -> any() over cm x cn cells, ragged edges included.
    A dimension of size 1 stands for a broadcast one and gets one cell."""
    Bm, Hm, R, C = x.shape
    cm = 1 if R == 1 else cm
    cn = 1 if C == 1 else cn
    nr, nc = triton.cdiv(R, cm), triton.cdiv(C, cn)
    x = x.to(torch.uint8)
    if nr * cm != R or nc * cn != C:
        x = torch.nn.functional.pad(x, (0, nc * cn - C, 0, nr * cm - R))
    return x.view(Bm, Hm, nr, cm, nc, cn).amax(dim=(3, 5)) != 0


def _band_cells(nr, nc, cm, cn, Lq, Lk, diag, wl, wr, device):
    """(nr, nc) bool: cell (r, c) has some (i, j), i < Lq, j < Lk, with
    -wl <= j - (i + diag) <= wr (a negative bound is no bound)."""
    r0 = torch.arange(nr, device=device) * cm
    c0 = torch.arange(nc, device=device) * cn
    r1 = torch.clamp(r0 + cm - 1, max=Lq - 1)
    c1 = torch.clamp(c0 + cn - 1, max=Lk - 1)
    ok = torch.ones((nr, nc), dtype=torch.bool, device=device)
    if wl >= 0:  # the largest j - i in the cell reaches the band's left edge
        ok &= (c1[None, :] - r0[:, None]) >= diag - wl
    if wr >= 0:
        ok &= (c0[None, :] - r1[:, None]) <= diag + wr
    return ok


def _records(vis, need):
    """(..., n) bool -> (..., n + 1) int32 records [count, 2 * index + need ...]
    of the visible cells, in index order."""
    count = vis.sum(-1, dtype=torch.int32)
    code = torch.arange(vis.shape[-1], device=vis.device, dtype=torch.int32) * 2 + need.to(torch.int32)
    order = torch.argsort((~vis).to(torch.uint8), dim=-1, stable=True)
    return torch.cat([count[..., None], torch.gather(code.expand_as(order), -1, order)], dim=-1)


def mask_block_lists(mask, cm, cn, diag=0, window_left=-1, window_right=-1, transposed=True):
    """Block lists of `mask` (B, H, Lq, Lk), a bool or float mask, expanded with
    stride 0 where it broadcasts, for cells of cm queries x cn keys: returns
    (lists, lists_t), int32 of shapes (B, H, R, C + 1) and (B, H, C, R + 1)
    (lists_t None unless `transposed`, which only the backward needs) with
    R = cdiv(Lq, cm), C = cdiv(Lk, cn), stride 0 over broadcast batch/heads.
    lists[b, h, r] = [n, 2 * c + need ...] over the key columns c that row r
    visits, need = 1 where the mask must be read (the cell has a hidden element
    or, for a float mask, a nonzero one); lists_t the same per key column over
    query rows.  Cells the mask hides entirely (bool all False, float all -inf)
    or that do not meet the causal/window band are not listed.  The mask is read
    once, at its own (unexpanded) extent."""
    B, H, Lq, Lk = mask.shape
    own = mask[tuple(slice(0, 1) if st == 0 else slice(None) for st in mask.stride())]
    if mask.dtype == torch.bool:
        vis, need = own, ~own
    else:
        vis, need = own != float("-inf"), own != 0
    nr, nc = triton.cdiv(Lq, cm), triton.cdiv(Lk, cn)
    Bm, Hm = own.shape[:2]
    vis = _cells_any(vis, cm, cn).expand(Bm, Hm, nr, nc)
    need = _cells_any(need, cm, cn).expand(Bm, Hm, nr, nc)
    if window_left >= 0 or window_right >= 0:
        vis = vis & _band_cells(nr, nc, cm, cn, Lq, Lk, diag, window_left, window_right, mask.device)
    lists = _records(vis, need)
    if not transposed:  # the forward reads only the row lists
        return lists.expand(B, H, -1, -1), None
    lists_t = _records(vis.transpose(-1, -2), need.transpose(-1, -2))
    return lists.expand(B, H, -1, -1), lists_t.expand(B, H, -1, -1)


# ---------------------------------------------------------------------------
# Tile shapes: fixed under the interpreter, autotuned on GPUs.
# ---------------------------------------------------------------------------
# Cells of the mask block lists: every kernel tile fits in one (BLOCK_M <= SUM_M,
# BLOCK_N <= SUM_N, powers of two).  The interpreter uses small cells so that
# the CI shapes span several; with a mask it walks them in 32 x 32 sub-tiles,
# without one it takes 64 x 64 tiles (its cost grows with the number of tiles).
GPU_CELL = (128, 128)
INTERP_CELL = (64, 64)
INTERP_TILE = {False: (64, 64), True: (32, 32)}  # masked -> tile

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, GPU class and head-dim
# class (the padded max(E, Ev)).  BLOCK_M is the query tile and BLOCK_N the key
# tile in all three kernels.  "sm90": H100/H200/B200 (227 KiB shared memory);
# "sm80": A100 (163 KiB); "small": everything else (~100 KiB: sm86/89/120).
# Every entry is compile-checked by triton_kernels/compile_check.py for sm80,
# sm90 and sm86 ("small"), masked and not: each fits the device's shared memory
# where it is listed first (the config taken without autotuning), and ptxas's
# register spills are recorded in bench/results/triton_compile.json; the first
# entries were picked among the spill-free ones where any was found.
# The sm90 forward follows the Triton tutorial's Hopper table (128 x 128 tiles on 8 warps,
# 128 x 64 on 4, 2-4 stages; 8 warps only for 128 x 128; 64 x 64 for short queries), its
# favourite tile first (at D 128 on 2 stages: with 3, a mask's lists take it past 227 KiB;
# it spills 32-48 bytes there, the spill-free 128 x 64 on 8 warps follows),
# plus at D 128 the 128 x 64 tile on 8 warps that the tutorial prunes: with pointer loads
# (not TMA) 128 x 64 on 4 warps spills 0.6-1 KiB a thread, on 8 none (the SASS counts of
# bench/results/triton_sass_sm90.md).  The sm90 dK/dV table starts, at D 64, with 64-row
# query tiles, the smallest whose products all run on wgmma (32-row ones take mma.sync);
# at D 128 every such tile spills (>= 0.9 KiB), so 32-row tiles stay first there.
TUNING = {
    "fwd": {
        "sm90": {64: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 4), (128, 64, 4, 4), (64, 64, 4, 3)],
                 128: [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)],
                 256: [(64, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 2)]},
        "sm80": {64: [(128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)],
                 128: [(128, 64, 8, 3), (128, 32, 4, 3)],
                 256: [(64, 32, 4, 2), (128, 32, 8, 2)]},
        "small": {64: [(64, 64, 4, 2), (128, 64, 4, 2)],
                  128: [(64, 64, 4, 2), (128, 32, 4, 2)],
                  256: [(64, 32, 4, 1), (32, 32, 4, 1)]},
    },
    "rows": {
        "sm90": {64: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
                 128: [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
                 256: [(64, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2)]},
        "sm80": {64: [(128, 64, 8, 2), (64, 64, 4, 3)],
                 128: [(64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 4, 2)],
                 256: [(32, 64, 4, 2), (64, 32, 4, 2)]},
        "small": {64: [(64, 64, 4, 2)], 128: [(64, 32, 4, 2)], 256: [(32, 32, 4, 1)]},
    },
    "dkdv": {
        "sm90": {64: [(64, 64, 8, 3), (32, 64, 8, 3), (32, 64, 4, 2), (32, 128, 4, 3)],
                 128: [(32, 64, 8, 3), (64, 64, 8, 2), (64, 64, 4, 3)],
                 256: [(32, 32, 4, 2), (64, 64, 8, 2)]},
        "sm80": {64: [(32, 64, 8, 3), (32, 64, 4, 2), (64, 64, 4, 3)],
                 128: [(32, 64, 8, 3), (64, 64, 8, 2), (64, 64, 4, 2)],
                 256: [(32, 32, 4, 2)]},
        "small": {64: [(32, 64, 4, 2)], 128: [(32, 64, 4, 2)], 256: [(32, 32, 4, 1)]},
    },
}
# float32 inputs (IEEE float32 dots: no tensor cores, the products' operands in registers)
# take small tiles on every GPU class: with the tables above their first entries need more
# shared memory than the device has (sm90 D 128: 256 KiB) and spill tens of KiB.  Each entry
# here fits sm86's ~100 KiB (compile check, --dtype fp32).
TUNING_FP32 = {
    "fwd": {64: [(32, 32, 4, 2), (64, 32, 4, 2)], 128: [(32, 32, 4, 2)], 256: [(16, 16, 4, 1), (16, 32, 4, 1)]},
    "rows": {64: [(32, 32, 4, 2)], 128: [(32, 32, 4, 2)], 256: [(16, 16, 4, 1)]},
    "dkdv": {64: [(32, 32, 4, 2)], 128: [(32, 32, 4, 2)], 256: [(16, 16, 4, 1)]},
}


def tuning_table(kind, arch, head, fp32):
    """The (BLOCK_M, BLOCK_N, warps, stages) entries the autotuner tries for a kernel kind on a
    GPU (compute capability as major * 10 + minor), head-dim class and input precision."""
    return TUNING_FP32[kind][head] if fp32 else TUNING[kind][gpu_class(arch)][head]


AUTOTUNE_ENV = "ATTNFAST_TRITON_AUTOTUNE"  # "0": take the first fitting config, no timing


def gpu_class(arch):
    """Tuning class of a compute capability given as major * 10 + minor."""
    if arch in (90, 100, 103):
        return "sm90"
    if arch in (80, 87):
        return "sm80"
    return "small"


def head_class(block_d, block_dv):
    d = max(block_d, block_dv)
    return 64 if d <= 64 else 128 if d <= 128 else 256


def _config_tuple(c):
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


def select_configs(kind, configs, args):
    """The autotuner's early prune: the configs of this GPU class and head-dim
    class, without tiles longer than the padded sequence where a shorter one is
    listed; with ATTNFAST_TRITON_AUTOTUNE=0 only the first."""
    import os

    table = tuning_table(kind, args["ARCH"], head_class(args["BLOCK_D"], args["BLOCK_DV"]),
                         args["DOT"] == DOT_IEEE.value)
    keep = [c for c in configs if _config_tuple(c) in table]
    keep.sort(key=lambda c: table.index(_config_tuple(c)))
    lq, lk = triton.next_power_of_2(args["Lq"]), triton.next_power_of_2(args["Lk"])
    short = [c for c in keep if c.kwargs["BLOCK_M"] <= max(lq, 32) and c.kwargs["BLOCK_N"] <= max(lk, 32)]
    keep = short or keep
    if os.environ.get(AUTOTUNE_ENV, "1") == "0":
        keep = keep[:1]
    return keep


def _prune_fwd(configs, named_args, **kwargs):
    return select_configs("fwd", configs, {**named_args, **kwargs})


def _prune_rows(configs, named_args, **kwargs):
    return select_configs("rows", configs, {**named_args, **kwargs})


def _prune_dkdv(configs, named_args, **kwargs):
    return select_configs("dkdv", configs, {**named_args, **kwargs})


def _all_configs(kind):
    seen = sorted({t for per_gpu in TUNING[kind].values() for per_d in per_gpu.values() for t in per_d}
                  | {t for per_d in TUNING_FP32[kind].values() for t in per_d})
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in seen]


_KEY = ["ARCH", "LQ_KEY", "LK_KEY", "group", "E", "Ev", "MASK_KIND", "WINDOWED", "DOT", "DROPOUT", "DESC"]
_fwd_tuned = triton.autotune(_all_configs("fwd"), key=_KEY,
                             prune_configs_by={"early_config_prune": _prune_fwd})(_fwd_kernel)
_rows_tuned = triton.autotune(_all_configs("rows"), key=_KEY + ["HAS_DLSE", "DELTA_PASS"],
                              prune_configs_by={"early_config_prune": _prune_rows})(_bwd_rows_kernel)
_dkdv_tuned = triton.autotune(_all_configs("dkdv"), key=_KEY + ["MASK_GRAD"],
                              prune_configs_by={"early_config_prune": _prune_dkdv})(_bwd_dkdv_kernel)


def _length_key(n):
    return min(triton.next_power_of_2(max(n, 1)), 1 << 16)


# The least rows of a tile that takes tensor descriptors (the kernels' DESC): the wgmma tiles on
# sm90; under the interpreter every tile, so that its small tiles run the descriptor path.
DESC_ROWS = 1 if INTERPRETING else 64


class _Launch:
    """Kernel choice and the arguments every kernel takes: autotuned kernels and
    cell (128, 128) on GPUs, fixed tiles and small cells under the interpreter."""

    def __init__(self, q, k, v, mask, window_left, window_right, bottom_right, dropout_p, seed, offset,
                 backward):
        self.B, self.Hq, self.Lq, E = q.shape
        self.Hkv, self.Lk, Ev = k.shape[1], k.shape[2], v.shape[3]
        self.diag = self.Lk - self.Lq if bottom_right else 0
        self.interp = INTERPRETING
        self.cell = INTERP_CELL if self.interp else GPU_CELL
        if self.interp or q.device.type != "cuda":
            arch = 0
        else:
            major, minor = torch.cuda.get_device_capability(q.device)
            arch = major * 10 + minor
        self.keys = (arch, _length_key(self.Lq), _length_key(self.Lk))
        self.mask, self.mask_strides, kind = mask_args(q, mask)
        if mask is None:
            empty = torch.zeros((1,), dtype=torch.int32, device=q.device)  # not read
            self.lists = self.lists_t = empty
            self.list_strides = self.list_t_strides = (0, 0, 0)
        else:
            self.lists, self.lists_t = mask_block_lists(mask, *self.cell, self.diag, window_left, window_right,
                                                        transposed=backward)
            self.list_strides = tuple(self.lists.stride()[:3])
            self.list_t_strides = tuple(self.lists_t.stride()[:3]) if backward else None
        self.rng = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, offset & 0xFFFFFFFF, float(dropout_p))
        self.meta = dict(E=E, Ev=Ev, BLOCK_D=max(16, triton.next_power_of_2(E)),
                         BLOCK_DV=max(16, triton.next_power_of_2(Ev)), SUM_M=self.cell[0], SUM_N=self.cell[1],
                         MASK_KIND=kind, WINDOWED=window_left >= 0 or window_right >= 0,
                         DOT=dot_mode(q.dtype), DROPOUT=dropout_p > 0)
        self.window = (window_left, window_right)
        self.seqs = (torch.zeros((1,), dtype=torch.int32, device=q.device),) * 3  # CuQ, CuK, UsedK: not read
        self.meta.update(VARLEN=False, USED_K=False)
        self.bottom_right = bottom_right
        self.br = 0  # the diagonal is self.diag (a ragged call's kernels take it per sequence from br)
        self.arch = arch

    def ragged(self, cu_q, cu_k, used_k, max_q, max_k):
        """Packed sequences (q, k, v given as (1, H, total, D) views): per-sequence offsets."""
        self.B, self.Lq, self.Lk = cu_q.numel() - 1, max_q, max_k
        self.keys = (self.keys[0], _length_key(max_q), _length_key(max_k))
        self.seqs = (cu_q, cu_k, cu_k if used_k is None else used_k)
        self.meta.update(VARLEN=True, USED_K=used_k is not None)
        self.diag, self.br = 0, int(self.bottom_right)

    def descriptors(self, *tensors):
        """A kernel's DESC meta-parameter: whether the tensors whose row tiles it loads in its
        loop (the forward's and dQ pass's k, v; the dK/dV kernel's q, dout) go through
        tensor descriptors (common.use_descriptors)."""
        return dict(DESC=DESC_ROWS if use_descriptors(self.arch, *tensors) else 0)

    def kernel(self, plain, tuned):
        """(kernel, extra meta): the fixed-tile kernel under the interpreter."""
        if self.interp:
            bm, bn = INTERP_TILE[self.meta["MASK_KIND"] != MASK_NONE.value]
            return plain, dict(BLOCK_M=bm, BLOCK_N=bn)
        return tuned, {}


def attention_fwd(q, k, v, mask, scale, window_left, window_right, bottom_right, dropout_p=0.0, seed=0,
                  offset=0, launch=None):
    """(out, lse): out (B, Hq, Lq, Ev) contiguous, lse (B, Hq, Lq) float64 for float32
    inputs, else float32 (common.row_lse)."""
    wrap = launch or (lambda kern: kern)
    B, Hq, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    aligned = bottom_right or (window_left < 0 and window_right < 0)  # the split kernel's diagonal: bottom-right
    if mask is None and dropout_p == 0.0 and aligned and 0 < Lq <= SPLIT_MAX_ROWS and Lk > 0:
        nsplit = split_count(B * Hq, Lk, q.device)
        if nsplit > 1:  # flash-decoding: the keys split across the idle SMs
            lens = torch.full((B,), Lk, dtype=torch.int32, device=q.device)
            return split_fwd(q, k, v, lens, None, scale, window_left, window_right, nsplit, launch)
    L = _Launch(q, k, v, mask, window_left, window_right, bottom_right, dropout_p, seed, offset, False)
    out = torch.empty((L.B, L.Hq, L.Lq, v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.empty((L.B, L.Hq, L.Lq), dtype=lse_dtype(q.dtype), device=q.device)
    kern, extra = L.kernel(_fwd_kernel, _fwd_tuned)
    grid = lambda meta: (triton.cdiv(L.Lq, meta["BLOCK_M"]), L.B * L.Hq)  # noqa: E731
    wrap(kern)[grid](
        q, k, v, L.mask, L.lists, out, lse, *L.seqs, *q.stride(), *k.stride(), *v.stride(), *L.mask_strides,
        *L.list_strides, *out.stride(), L.Hq * L.Lq, L.Lq, L.Hq, L.Lq, L.Lk, L.Hq // L.Hkv, scale, L.diag, L.br,
        *L.window, *L.rng, *L.keys, **L.meta, **extra, **L.descriptors(k, v))
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, dlse, mask, scale, window_left, window_right, bottom_right,
                  mask_grad, dropout_p=0.0, seed=0, offset=0, launch=None, delta=None):
    """(dq, dk, dv, dmask): contiguous; dmask (B, Hq, Lq, Lk) float32 or empty.

    delta: the caller's rowsum(dout * out), float32 (B, Hq, Lq), in place of the
    kernels' rowsum(P * dP) (ring attention: P covers only some of a row's keys)."""
    wrap = launch or (lambda kern: kern)
    L = _Launch(q, k, v, mask, window_left, window_right, bottom_right, dropout_p, seed, offset, True)
    B, Hq, Hkv, Lq, Lk = L.B, L.Hq, L.Hkv, L.Lq, L.Lk
    given = delta
    delta = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if given is not None:
        delta.copy_(given if dlse is None else given - dlse)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty((B, Hkv, Lk, k.shape[3]), dtype=q.dtype, device=q.device)
    dv = torch.empty((B, Hkv, Lk, v.shape[3]), dtype=q.dtype, device=q.device)
    dmask = (torch.zeros((B, Hq, Lq, Lk), dtype=torch.float32, device=q.device) if mask_grad
             else torch.empty((0,), dtype=torch.float32, device=q.device))
    lse = lse.contiguous()  # the kernels index it as (B * Hq, Lq)

    _backward_passes(L, wrap, q, k, v, dout, lse, dlse, delta, given, dq, dk, dv, dmask, mask_grad, scale,
                     (Hq * Lq, Lq), dq.stride()[:3], dk.stride()[:3], dv.stride()[:3], dout.stride())
    return dq, dk, dv, dmask


def _backward_passes(L, wrap, q, k, v, dout, lse, dlse, delta, given, dq, dk, dv, dmask, mask_grad, scale,
                     lse_strides, dq_strides, dk_strides, dv_strides, dout_strides):
    """The backward's kernels: the delta pass (unless given), dK/dV, then dQ.  q, k, v, dout
    as (B, H, L, D) strided views; lse, dlse and delta indexed by lse_strides (batch, head)."""
    B, Hq, Hkv, Lq, Lk = L.B, L.Hq, L.Hkv, L.Lq, L.Lk
    dlse_arg = dlse.contiguous() if dlse is not None else lse
    common = (*q.stride(), *k.stride(), *v.stride(), *L.mask_strides)
    rows, rows_extra = L.kernel(_bwd_rows_kernel, _rows_tuned)
    rows_grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)  # noqa: E731

    def rows_pass(delta_pass):
        wrap(rows)[rows_grid](
            q, k, v, L.mask, L.lists, dout, lse, dlse_arg, delta, dq, *L.seqs, *common, *L.list_strides,
            *dout_strides, *lse_strides, *dq_strides, Hq, Lq, Lk, Hq // Hkv, scale, L.diag, L.br, *L.window,
            *L.rng, *L.keys, **L.meta, **rows_extra, **L.descriptors(k, v), HAS_DLSE=dlse is not None,
            DELTA_PASS=delta_pass)

    if given is None:
        rows_pass(True)
    dkdv, dkdv_extra = L.kernel(_bwd_dkdv_kernel, _dkdv_tuned)
    wrap(dkdv)[lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * Hkv)](
        q, k, v, L.mask, L.lists_t, dout, lse, delta, dk, dv, dmask if mask_grad else delta, *L.seqs, *common,
        *L.list_t_strides, *dout_strides, *lse_strides, *dk_strides, *dv_strides, Hq, Hkv, Lq, Lk, Hq // Hkv,
        scale, L.diag, L.br, *L.window, *L.rng, *L.keys, **L.meta, **dkdv_extra, **L.descriptors(q, dout),
        MASK_GRAD=mask_grad)
    rows_pass(False)


# Split-KV (flash-decoding) for short queries: when the (batch, head) programs of a query
# block are fewer than the GPU's SMs, the keys are split so that every SM has work.
SPLIT_MAX_ROWS = 16      # query rows (Lq) served by one split program
# Query rows of a program when there are more (a paged cache's prefill); under the
# interpreter 16, so that its tests see several query blocks.
SPLIT_BLOCK_M = 16 if INTERPRETING else 64
SPLIT_MIN_KEYS = 256     # keys a split holds, at least
SPLIT_MAX = 128
INTERP_SMS = 4           # the SM count assumed under the interpreter (so the tests run the split path)


def split_count(programs, Lk, device):
    """Key splits for `programs` (batch * q heads) over Lk keys: enough programs for twice the
    SMs, at least SPLIT_MIN_KEYS keys a split (FlashAttention's heuristic, simplified); 1 = none."""
    if INTERPRETING or device.type != "cuda":
        sms = INTERP_SMS
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(SPLIT_MAX, -(-2 * sms // max(programs, 1)), Lk // SPLIT_MIN_KEYS))


def split_block_m(Lq, dtype):
    """Query rows of a split-KV program: all Lq of short queries, else blocks of SPLIT_BLOCK_M
    (16 for float32: its IEEE dot spills registers with 64 rows on sm90)."""
    return min(max(16, triton.next_power_of_2(Lq)), 16 if dtype == torch.float32 else SPLIT_BLOCK_M)


def split_fwd(q, k, v, lens, bidx, scale, window_left, window_right, nsplit, launch=None, block_table=None):
    """(out (B, Hq, Lq, Ev) in q's dtype, lse (B, Hq, Lq) in lse_dtype) of queries q (B, Hq, Lq, E)
    over the first lens[b] keys of k, v (B_k, Hkv, S, E) (entry bidx[b], or b), bottom-right, in
    nsplit key splits merged by logsumexp in float64.  With block_table (int32 (B, max_pages)),
    k and v are page pools (pages, Hkv, page, E), read in place.  Made for short queries (Lq <=
    SPLIT_MAX_ROWS: one query block); longer ones (a paged cache's prefill) take blocks of
    SPLIT_BLOCK_M rows, a program each."""
    wrap = launch or (lambda kern: kern)
    B, Hq, Lq, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    page, paged = S, 0
    block_n = 32 if INTERPRETING else 64
    if block_table is not None:
        S = page * block_table.shape[1]
        while block_n > 16 and page % block_n:
            block_n //= 2  # key tiles that divide the page (16 keys at least)
        paged = 1 if page % block_n == 0 else 2  # else a page of no multiple of 16 keys: a gather
    chunk = triton.cdiv(triton.cdiv(S, nsplit), block_n) * block_n
    nsplit = max(1, -(-S // chunk))
    acc = torch.empty((B * Hq, nsplit, Lq, Ev), dtype=torch.float32, device=q.device)
    m = torch.empty((B * Hq, nsplit, Lq), dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    block_m = split_block_m(Lq, q.dtype)
    wrap(_split_fwd_kernel)[(nsplit, B * Hq, triton.cdiv(Lq, block_m))](
        q, k, v, lens, bidx if bidx is not None else lens, block_table if block_table is not None else lens, acc, m,
        lsum, *q.stride(), *k.stride(), *v.stride(), block_table.stride(0) if block_table is not None else 0,
        Hq, Lq, Hq // Hkv, nsplit, chunk, scale, window_left, window_right, page, E=E, Ev=Ev,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(E)),
        BLOCK_DV=max(16, triton.next_power_of_2(Ev)), WINDOWED=window_left >= 0 or window_right >= 0,
        DOT=dot_mode(q.dtype), HAS_BIDX=bidx is not None, PAGED=paged)
    # The kernel's row maxima are in log2 units: to natural ones as common.nat_f64 does (a half
    # input's float32 lse then rounds as the backward's scores do).
    m64, l64 = m.double(), lsum.double()
    m64 = m64 * LN2_HI.value + m64 * LN2_LO.value
    top = m64.amax(1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.where(l64 > 0, torch.exp(m64 - top), torch.zeros_like(m64))
    total = (l64 * w).sum(1)
    seen = total > 0  # rows with a visible key
    safe = torch.where(seen, total, torch.ones_like(total))
    o = (acc.double() * w.unsqueeze(-1)).sum(1) / safe.unsqueeze(-1)
    lse = torch.where(seen, top.squeeze(1) + torch.log(safe), torch.full_like(total, float("-inf")))
    nan = torch.isnan(m64).any(1) | torch.isnan(l64).any(1)  # a NaN score makes its row NaN
    lse = torch.where(nan, torch.full_like(lse, float("nan")), lse)
    return o.view(B, Hq, Lq, Ev).to(q.dtype), lse.view(B, Hq, Lq).to(lse_dtype(q.dtype))


def _packed4(t):
    """A packed (total, H, D) tensor as the (1, H, total, D) view the kernels index, batch stride 0
    (a ragged launch's batch entry b is a sequence, found from the offsets, not a stride)."""
    return t.as_strided((1, t.shape[1], t.shape[0], t.shape[2]), (0, t.stride(1), t.stride(0), t.stride(2)))


def _packed_strides(t):
    """(batch, head, row) strides of a packed (total, H, D) tensor for a ragged launch (batch 0)."""
    return 0, t.stride(1), t.stride(0)


def varlen_fwd(q, k, v, cu_q, cu_k, used_k, max_q, max_k, scale, window_left, window_right, bottom_right,
               dropout_p=0.0, seed=0, offset=0, launch=None):
    """(out (total_q, Hq, Ev), lse (Hq, total_q)) of packed sequences: one launch; sequence i draws
    its dropout with offset + i (as the CPU kernels)."""
    wrap = launch or (lambda kern: kern)
    L = _Launch(_packed4(q), _packed4(k), _packed4(v), None, window_left, window_right, bottom_right, dropout_p,
                seed, offset, False)
    L.ragged(cu_q, cu_k, used_k, max_q, max_k)
    T, Hq = q.shape[0], q.shape[1]
    out = torch.empty((T, Hq, v.shape[2]), dtype=q.dtype, device=q.device)
    lse = torch.empty((Hq, T), dtype=lse_dtype(q.dtype), device=q.device)
    if L.B == 0 or max_q == 0 or T == 0:
        return out, lse
    kern, extra = L.kernel(_fwd_kernel, _fwd_tuned)
    grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), L.B * L.Hq)  # noqa: E731
    qs, ks, vs, os_ = (_packed_strides(t) + (t.stride(2),) for t in (q, k, v, out))
    wrap(kern)[grid](
        q, k, v, L.mask, L.lists, out, lse, *L.seqs, *qs, *ks, *vs, *L.mask_strides, *L.list_strides, *os_, 0, T,
        L.Hq, L.Lq, L.Lk, L.Hq // L.Hkv, scale, L.diag, L.br, *L.window, *L.rng, *L.keys, **L.meta, **extra,
        **L.descriptors(_packed4(k), _packed4(v)))  # (the views the kernel indexes: rows along dim -2)
    return out, lse


def varlen_bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, used_k, max_q, max_k, scale, window_left, window_right,
               bottom_right, dropout_p=0.0, seed=0, offset=0, launch=None):
    """(dq, dk, dv) of packed sequences, like q, k, v (keys past used_k get zeros)."""
    wrap = launch or (lambda kern: kern)
    L = _Launch(_packed4(q), _packed4(k), _packed4(v), None, window_left, window_right, bottom_right, dropout_p,
                seed, offset, True)
    L.ragged(cu_q, cu_k, used_k, max_q, max_k)
    T, Hq = q.shape[0], q.shape[1]
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    if L.B == 0 or max_q == 0 or T == 0:
        return dq, dk, dv
    lse = lse.contiguous()
    delta = torch.empty((Hq, T), dtype=torch.float32, device=q.device)
    dout4 = _packed4(dout)
    _backward_passes(L, wrap, _packed4(q), _packed4(k), _packed4(v), dout4, lse, dlse, delta, None, dq, dk, dv,
                     delta, False, scale, (0, T), _packed_strides(dq), _packed_strides(dk), _packed_strides(dv),
                     _packed_strides(dout) + (dout.stride(2),))
    return dq, dk, dv


# ---------------------------------------------------------------------------
# The torch ops.  `triton_op`s: the body launches the kernels through
# `wrap_triton` (common.launcher), so torch.compile sees inside them and the
# body doubles as the fake kernel.  Autograd links the two.
# ---------------------------------------------------------------------------
@triton_op("attnfast::triton_fwd", mutates_args=())
def triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
               scale: float, window_left: int, window_right: int, bottom_right: bool,
               dropout_p: float, seed: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_fwd(q, k, v, attn_mask, scale, window_left, window_right, bottom_right,
                         dropout_p, seed, offset, launch=launcher(q))


@triton_op("attnfast::triton_bwd", mutates_args=())
def triton_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, dlse: torch.Tensor | None, attn_mask: torch.Tensor | None,
               scale: float, window_left: int,
               window_right: int, bottom_right: bool, mask_grad: bool, dropout_p: float, seed: int,
               offset: int, delta: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd(dout, q, k, v, out, lse, dlse, attn_mask, scale, window_left, window_right,
                         bottom_right, mask_grad, dropout_p, seed, offset, launch=launcher(q), delta=delta)


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


@triton_op("attnfast::triton_varlen_fwd", mutates_args=())
def triton_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, seqused_k: torch.Tensor | None, max_seqlen_q: int,
                      max_seqlen_k: int, scale: float, window_left: int, window_right: int, bottom_right: bool,
                      dropout_p: float, seed: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    return varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, scale,
                      window_left, window_right, bottom_right, dropout_p, seed, offset, launch=launcher(q))


@triton_op("attnfast::triton_varlen_bwd", mutates_args=())
def triton_varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, dlse: torch.Tensor | None, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, seqused_k: torch.Tensor | None, max_seqlen_q: int,
                      max_seqlen_k: int, scale: float, window_left: int, window_right: int, bottom_right: bool,
                      dropout_p: float, seed: int, offset: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return varlen_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                      max_seqlen_k, scale, window_left, window_right, bottom_right, dropout_p, seed, offset,
                      launch=launcher(q))


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, used, *args = inputs
    ctx.save_for_backward(q, k, v, *output, cu_q, cu_k, used)
    ctx.args = args


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, used = ctx.saved_tensors
    dq, dk, dv = torch.ops.attnfast.triton_varlen_bwd(dout.contiguous(), q, k, v, out, lse, dlse, cu_q, cu_k, used,
                                                      *ctx.args)
    return (dq, dk, dv) + (None,) * 12


triton_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup)
