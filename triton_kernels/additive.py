"""Additive (Bahdanau) attention in Triton: forward, and backward by recomputation.

On projected queries and keys (float32, the compute dtype):
    s[i, j] = sum_d va[d] * tanh(qp[i, d] + kp[j, d])  (+ mask bias),
    p = softmax over the keys j visible from i,  out[i] = sum_j p[i, j] v[j].
The same maths as the fused CPU kernel (csrc/cpu/additive_kernel.h, op
attnfast::additive_fwd).

Layers: `@triton.jit` kernels, plain launchers `additive_fwd` / `additive_bwd`
(checks, shapes, grid, tile sizes), and the torch ops (the end of this file).  Tensors: qp (B, H, Lq, Da), kp (B, H, Lk, Da),
va (H, Da), v (B, H, Lk, Ev), mask None or a float bias (-inf hides; a bool
mask, True = visible, is accepted too) broadcastable to (B, H, Lq, Lk) and
read through its expanded (stride 0) view; causal: key j visible from query i
iff j <= i.

Tiles.  The cost is Lq * Lk * Da tanh evaluations (x3 in the backward, which
recomputes them for delta, dq and dk); nothing is a matrix product, so tiles
are 3-D register tensors (BLOCK_M queries, BLOCK_N keys, BLOCK_D = Da padded to
a power of two) reduced with tl.sum.  Holding the whole (M, N, D) tile lets the
backward compute the scores, P, dS and then the tanh-derivative terms from one
tanh evaluation per element.  The tile is sized to ~8K elements per 3-D tensor
(see `tiles`), so BLOCK_M * BLOCK_N shrinks as Da grows.

Precision.  The parity rule asks for at most twice the error of the naive
float32 reference, whose own errors partly cancel: a kernel that merely
matches its accuracy step for step fails now and then (a float32 emulation of
this algorithm with float32 sums failed ~1 seed in 40 per shape).  So:
  * tanh is ~0.8 ulp (torch's CPU tanh is 0.5): `_tanh_r`;
  * the backward's 1 - t^2 comes from x (r (2 - r), r = 2 / (exp(2|x|) + 1)),
    not from the rounded t: for |x| >~ 1 the rounding of t costs 1 - t*t
    many ulps, and the reference pays them;
  * per (query, key) quantities are float64: the score's sum over d (float32
    products of t and va are exact in float64), max, P, lse (returned as
    float64, as the CPU op does), delta and dS; each costs O(Da) float64 work
    per pair against O(Da) tanh evaluations, so ~2x fewer flops than the tanh;
  * sums over keys or queries of (M, N, D) or (M, N, Ev) terms stay float32
    (trees within a tile, running sums across tiles): float64 there did not
    change the error measurably.
With these, 150 seeds per shape of the emulation stayed below 0.75 of the tolerance.

Never stored: the (Lq, Lk, Da) tanh tensor or the (Lq, Lk) scores.  Memory is
O(L * (Da + Ev)) plus a (B, H, key blocks, Da) partial of dva.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .common import INTERPRETING, launcher, load_rows, mask_args, masked_scores, program_block, visible

# tanh(x) = x + x^3 P(x^2) on |x| < 0.625: the degree-5 fit of (tanh(x) - x) / x^3
# that csrc/cpu/additive_kernel.h uses (0.8 ulp there).  Above 0.625 the exp form;
# below it 1 - 2 / (exp(2|x|) + 1) would lose relative accuracy (1 - r cancels).


@triton.jit
def _tanh_r(x):
    """(tanh(x), r) in float32: tanh to ~0.8 ulp with a correctly rounded exp
    (1.2 with numpy's), and r = 2 / (exp(2|x|) + 1), from which 1 - tanh^2 =
    r (2 - r) (`_tanh_sech2`).

    |x| < 0.625: x + x^3 P(x^2).  Above: tanh = 1 - r, with the rounding errors
    of e + 1, of the division and of 1 - r carried to the one final rounding
    (error-free transformations: Fast2Sum and an FMA residual); done plainly,
    1 - 2 / (e + 1) errs up to 1.3 ulp.  |x| is clamped at 15 (tanh is 1.0 in
    float32 from ~9.1 on) so e never overflows; NaN stays NaN.  No product
    feeds a sum in the error terms, so FMA contraction cannot spoil them."""
    ax = tl.abs(x)
    z = x * x
    y = z * 2.2252146154642105e-3 - 8.268703706562519e-3
    y = y * z + 2.1738363429903984e-2
    y = y * z - 5.395381152629852e-2
    y = y * z + 1.3333263993263245e-1
    y = y * z - 3.333333134651184e-1
    small = x + x * (z * y)
    e = tl.exp(2.0 * tl.minimum(ax, 15.0, propagate_nan=tl.PropagateNan.ALL))  # >= 1
    w = e + 1.0
    w_lo = 1.0 - (w - e)  # e + 1 = w + w_lo exactly (Fast2Sum, e >= 1)
    r = 2.0 / w
    rem = tl.fma(-r, w, 2.0)  # 2 - r w, exact
    r_lo = (rem - r * w_lo) * (0.5 * r)  # 2 / (w + w_lo) = r + r_lo to first order
    hi = 1.0 - r
    big = hi + (((1.0 - hi) - r) - r_lo)  # 1 - r = hi + ((1 - hi) - r) exactly
    t = tl.where(ax < 0.625, small, tl.where(x < 0, -big, big))
    return t, r


@triton.jit
def _tanh(x):
    t, _ = _tanh_r(x)
    return t


@triton.jit
def _tanh_sech2(x):
    """(tanh(x), 1 - tanh(x)^2), the second to a few ulps relative: r (2 - r)
    above 0.625 (= 4e / (e + 1)^2); below, t^2 < 0.31 and 1 - t*t loses nothing.
    1 - t*t from the rounded t would lose ~log2(1 / (1 - t^2)) bits."""
    t, r = _tanh_r(x)
    return t, tl.where(tl.abs(x) < 0.625, 1.0 - t * t, r * (2.0 - r))


@triton.jit
def _scores(q, k, va64):
    """s[i, j] = sum_d va[d] tanh(q[i, d] + k[j, d]) (M, N) in float64, from
    q (M, D), k (N, D) and va64 (D,) float64 (products of float32s are exact there)."""
    t = _tanh(q[:, None, :] + k[None, :, :])
    return tl.sum(t.to(tl.float64) * va64[None, None, :], 2)


@triton.jit
def _scores_grad(q, k, va64):
    """(s, t, 1 - t^2): the scores as `_scores` and the (M, N, D) tanh terms the
    gradients need."""
    t, sech2 = _tanh_sech2(q[:, None, :] + k[None, :, :])
    return tl.sum(t.to(tl.float64) * va64[None, None, :], 2), t, sech2


@triton.jit
def _row_max(s):
    """Row max that propagates NaN (tl.max drops it): a NaN score makes its row
    NaN instead of looking like a row with no visible key.  (A tl.reduce with a
    NaN-propagating combine does the same, ~10x slower under the interpreter.)"""
    nan = tl.sum((s != s).to(tl.int32), 1) > 0
    return tl.where(nan, float("nan"), tl.max(s, 1))


@triton.jit
def _mask_scores(s, offs_m, offs_n, Mask, mask_base, smm, smn, Lq, Lk,
                 MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr):
    """Scores (float64) with keys past Lk, causally hidden keys (j > i) and
    bool-masked keys at -inf; a float mask added (its -inf entries hide)."""
    inb = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    return masked_scores(s, visible(offs_m, offs_n, Lk, 0, -1, 0, CAUSAL), offs_m, offs_n, Mask, mask_base,
                         smm, smn, inb, MASK_KIND)


@triton.jit
def _fwd_kernel(QP, KP, VA, V, Mask, Out, Lse,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, sah, sad, svb, svh, svn, svd,
                smb, smh, smm, smn,
                H, Lq, Lk,
                Da: tl.constexpr, Ev: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASK_KIND: tl.constexpr,
                CAUSAL: tl.constexpr):
    # One program per (query block, batch * head); online softmax over key tiles.
    bh, b, h, _, start_m, offs_m = program_block(H, 1, BLOCK_M)
    bh, b, h = bh.to(tl.int64), b.to(tl.int64), h.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # q and va stay in registers throughout; padded d columns are 0 in both, so
    # they add tanh(0) * 0 = 0 to every score.
    q = load_rows(QP, b * sqb + h * sqh, offs_m, sqm, sqd, Lq, BLOCK_D, Da)  # (M, D)
    va = tl.load(VA + h * sah + offs_d * sad, mask=offs_d < Da, other=0.0).to(tl.float64)
    k_base = b * skb + h * skh
    v_base = b * svb + h * svh
    mask_base = b * smb + h * smh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float64)
    l_i = tl.zeros([BLOCK_M], tl.float64)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float64)
    hi = Lk
    if CAUSAL:  # keys past the block's last row are hidden from all of it
        hi = tl.minimum(Lk, start_m + BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(KP, k_base, offs_n, skn, skd, Lk, BLOCK_D, Da)  # (N, D)
        s = _scores(q, k, va)  # (M, N) float64
        s = _mask_scores(s, offs_m, offs_n, Mask, mask_base, smm, smn, Lq, Lk, MASK_KIND, CAUSAL)
        m_new = tl.maximum(m_i, _row_max(s), propagate_nan=tl.PropagateNan.ALL)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_rows(V, v_base, offs_n, svn, svd, Lk, BLOCK_DV, Ev)  # (N, DV)
        pv = tl.sum(p.to(tl.float32)[:, :, None] * v[None, :, :], 1)  # (M, DV), float32 within the tile
        acc = acc * alpha[:, None] + pv.to(tl.float64)
        m_i = m_new
    dead = l_i == 0.0  # no visible key: out 0, lse -inf
    out = acc / tl.where(dead, 1.0, l_i)[:, None]
    lse = tl.where(dead, float("-inf"), m_i + tl.log(tl.where(dead, 1.0, l_i)))
    row = bh * Lq + offs_m
    tl.store(Out + row[:, None] * Ev + offs_dv[None, :], out.to(tl.float32),
             mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < Ev))
    tl.store(Lse + row, lse, mask=offs_m < Lq)


@triton.jit
def _bwd_rows_kernel(QP, KP, VA, V, Mask, DO, Lse, DLse, Delta, DQ,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, sah, sad, svb, svh, svn, svd,
                     smb, smh, smm, smn, sdb, sdh, sdm, sdd,
                     H, Lq, Lk,
                     Da: tl.constexpr, Ev: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASK_KIND: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_DLSE: tl.constexpr):
    # One program per (query block, batch * head), two sweeps over the key tiles:
    #   1. delta = rowsum(P * dP) - dlse  (from the same P and dP that dS uses,
    #      as the CPU kernel does: rowsum(dO * O) broke the parity rule there);
    #   2. dS = P (dP - delta),  dqp[i, d] = va[d] * sum_j dS[i, j] (1 - t[i, j, d]^2).
    # delta is stored for the key-block kernel, which runs after this one.
    bh, b, h, _, start_m, offs_m = program_block(H, 1, BLOCK_M)
    bh, b, h = bh.to(tl.int64), b.to(tl.int64), h.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(QP, b * sqb + h * sqh, offs_m, sqm, sqd, Lq, BLOCK_D, Da)  # (M, D)
    do = load_rows(DO, b * sdb + h * sdh, offs_m, sdm, sdd, Lq, BLOCK_DV, Ev)  # (M, DV)
    va = tl.load(VA + h * sah + offs_d * sad, mask=offs_d < Da, other=0.0)
    va64 = va.to(tl.float64)
    row = bh * Lq + offs_m
    lse = tl.load(Lse + row, mask=offs_m < Lq, other=float("inf"))
    # Rows with no visible key (lse -inf) and rows past Lq: lse +inf, so P = 0.
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    k_base = b * skb + h * skh
    v_base = b * svb + h * svh
    mask_base = b * smb + h * smh
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, start_m + BLOCK_M)
    delta = tl.zeros([BLOCK_M], tl.float64)
    if HAS_DLSE:
        delta = -tl.load(DLse + row, mask=offs_m < Lq, other=0.0).to(tl.float64)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(KP, k_base, offs_n, skn, skd, Lk, BLOCK_D, Da)
        v = load_rows(V, v_base, offs_n, svn, svd, Lk, BLOCK_DV, Ev)
        s = _scores(q, k, va64)
        s = _mask_scores(s, offs_m, offs_n, Mask, mask_base, smm, smn, Lq, Lk, MASK_KIND, CAUSAL)
        p = tl.exp(s - lse[:, None])  # (M, N) float64
        dp = tl.sum(do[:, None, :] * v[None, :, :], 2)  # (M, N)
        delta += tl.sum(p * dp.to(tl.float64), 1)
    tl.store(Delta + row, delta, mask=offs_m < Lq)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(KP, k_base, offs_n, skn, skd, Lk, BLOCK_D, Da)
        v = load_rows(V, v_base, offs_n, svn, svd, Lk, BLOCK_DV, Ev)
        s, t, sech2 = _scores_grad(q, k, va64)  # t, sech2: (M, N, D)
        s = _mask_scores(s, offs_m, offs_n, Mask, mask_base, smm, smn, Lq, Lk, MASK_KIND, CAUSAL)
        p = tl.exp(s - lse[:, None])
        dp = tl.sum(do[:, None, :] * v[None, :, :], 2)
        ds = (p * (dp.to(tl.float64) - delta[:, None])).to(tl.float32)  # 0 where p is
        dq += tl.sum(ds[:, :, None] * sech2, 1)
    dq = dq * va[None, :]
    tl.store(DQ + row[:, None] * Da + offs_d[None, :], dq,
             mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < Da))


@triton.jit
def _bwd_keys_kernel(QP, KP, VA, V, Mask, DO, Lse, Delta, DK, DV, DVAPart,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, sah, sad, svb, svh, svn, svd,
                     smb, smh, smm, smn, sdb, sdh, sdm, sdd,
                     H, Lq, Lk,
                     Da: tl.constexpr, Ev: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASK_KIND: tl.constexpr,
                     CAUSAL: tl.constexpr):
    # One program per (key block, batch * head): it owns that dkp/dv block and
    # writes its partial of dva (summed over programs by the launcher):
    #   dv += P^T dO,  dkp[j, d] = va[d] * sum_i dS (1 - t^2),  dva[d] += sum_ij dS t.
    bh, b, h, _, start_n, offs_n = program_block(H, 1, BLOCK_N)
    bh, b, h = bh.to(tl.int64), b.to(tl.int64), h.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = load_rows(KP, b * skb + h * skh, offs_n, skn, skd, Lk, BLOCK_D, Da)  # (N, D)
    v = load_rows(V, b * svb + h * svh, offs_n, svn, svd, Lk, BLOCK_DV, Ev)  # (N, DV)
    va = tl.load(VA + h * sah + offs_d * sad, mask=offs_d < Da, other=0.0)
    va64 = va.to(tl.float64)
    q_base = b * sqb + h * sqh
    do_base = b * sdb + h * sdh
    mask_base = b * smb + h * smh
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    dva = tl.zeros([BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # query rows before the block's first key see none of it
        lo = (start_n // BLOCK_M) * BLOCK_M
    for start_m in range(lo, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row = bh * Lq + offs_m
        q = load_rows(QP, q_base, offs_m, sqm, sqd, Lq, BLOCK_D, Da)  # (M, D)
        do = load_rows(DO, do_base, offs_m, sdm, sdd, Lq, BLOCK_DV, Ev)  # (M, DV)
        lse = tl.load(Lse + row, mask=offs_m < Lq, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # dead rows and rows past Lq: P = 0
        delta = tl.load(Delta + row, mask=offs_m < Lq, other=0.0)
        s, t, sech2 = _scores_grad(q, k, va64)
        s = _mask_scores(s, offs_m, offs_n, Mask, mask_base, smm, smn, Lq, Lk, MASK_KIND, CAUSAL)
        p = tl.exp(s - lse[:, None])  # (M, N) float64
        dv += tl.sum(p.to(tl.float32)[:, :, None] * do[:, None, :], 0)
        dp = tl.sum(do[:, None, :] * v[None, :, :], 2)
        ds = (p * (dp.to(tl.float64) - delta[:, None])).to(tl.float32)
        dk += tl.sum(ds[:, :, None] * sech2, 0)
        dva += tl.sum(tl.sum(ds[:, :, None] * t, 0), 0)
    dk = dk * va[None, :]
    col = bh * Lk + offs_n
    tl.store(DK + col[:, None] * Da + offs_d[None, :], dk,
             mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < Da))
    tl.store(DV + col[:, None] * Ev + offs_dv[None, :], dv,
             mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < Ev))
    tl.store(DVAPart + (bh * tl.num_programs(0) + tl.program_id(0)) * Da + offs_d, dva, mask=offs_d < Da)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
MAX_HEAD = 256  # Da and Ev; a (M, N, 256) tile is already down to 32 (query, key) pairs

# Elements of one (BLOCK_M, BLOCK_N, max(BLOCK_D, BLOCK_DV)) register tile.  The
# kernels hold a few such tensors at once (x, t, 1 - t^2, their float64 products
# with va), and ptxas takes up to 255 registers a thread whatever the tile:
# compiled for sm90 (triton 3.9, float mask, causal), 8K-element tiles spilled
# 200-870 bytes a thread in the backward kernels and at Da >= 128 in the forward;
# 4K-element tiles (4 warps forward, 8 backward) compile for Da = Ev = 16..256
# with at most 24 bytes of spills (dq kernel at Da = 16; 8 in the forward at
# Da = 128).  Not yet timed on a GPU: no autotuning.
TILE_ELEMENTS = 4096
NUM_WARPS = {"fwd": 4, "bwd": 8}
# Under TRITON_INTERPRET=1 registers do not matter; small tiles there make the
# test shapes span several query and key tiles.
INTERP_TILE = (16, 8)


def tiles(block_d, block_dv):
    """(BLOCK_M, BLOCK_N) for padded head dims: BLOCK_M * BLOCK_N * max(D, DV)
    = TILE_ELEMENTS (at least 4 x 4 and at most 64 x 32), BLOCK_M >= BLOCK_N."""
    pairs = max(16, min(2048, TILE_ELEMENTS // max(block_d, block_dv)))
    bn = 1 << ((pairs.bit_length() - 1) // 2)
    return pairs // bn, bn


def _check(qp, kp, va, v, mask, causal):
    """(B, H, Lq, Lk, Da, Ev, mask expanded to (B, H, Lq, Lk) or None); raises on bad input."""
    names = ("qp", "kp", "va", "v")
    for name, t in zip(names, (qp, kp, va, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (the compute dtype), got {t.dtype}")
        if t.device != qp.device:
            raise ValueError(f"{name} is on {t.device} but qp is on {qp.device}")
    if qp.dim() != 4 or kp.dim() != 4 or v.dim() != 4 or va.dim() != 2:
        raise ValueError(f"expected qp (B, H, Lq, Da), kp (B, H, Lk, Da), va (H, Da), v (B, H, Lk, Ev); got "
                         f"{tuple(qp.shape)}, {tuple(kp.shape)}, {tuple(va.shape)}, {tuple(v.shape)}")
    B, H, Lq, Da = qp.shape
    Lk, Ev = kp.shape[2], v.shape[3]
    if kp.shape != (B, H, Lk, Da) or va.shape != (H, Da) or v.shape[:3] != (B, H, Lk):
        raise ValueError(f"shapes disagree: qp {tuple(qp.shape)}, kp {tuple(kp.shape)}, va {tuple(va.shape)}, "
                         f"v {tuple(v.shape)} (expected kp (B, H, Lk, Da), va (H, Da), v (B, H, Lk, Ev))")
    if Da > MAX_HEAD or Ev > MAX_HEAD:
        raise ValueError(f"Da and Ev must be at most {MAX_HEAD}, got Da={Da}, Ev={Ev}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if not (mask.dtype.is_floating_point or mask.dtype == torch.bool):
            raise TypeError(f"mask must be a float bias or a bool mask, got {mask.dtype}")
        if mask.device != qp.device:
            raise ValueError(f"mask is on {mask.device} but qp is on {qp.device}")
        full = (B, H, Lq, Lk)
        if mask.dim() > 4 or any(m not in (1, f) for m, f in zip(mask.shape[::-1], full[::-1])):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to (B, H, Lq, Lk) = {full}")
        mask = mask.expand(full)
    return B, H, Lq, Lk, Da, Ev, mask


class _Launch:
    """Arguments every kernel takes: strides, sizes, and the compile-time meta."""

    def __init__(self, qp, kp, va, v, mask, causal, tile):
        self.B, self.H, self.Lq, self.Lk, Da, Ev, mask = _check(qp, kp, va, v, mask, causal)
        self.mask, self.mask_strides, kind = mask_args(qp, mask)
        block_d, block_dv = max(2, triton.next_power_of_2(Da)), max(2, triton.next_power_of_2(Ev))
        if tile is None:
            tile = INTERP_TILE if INTERPRETING else tiles(block_d, block_dv)
        self.block_m, self.block_n = tile
        self.strides = (*qp.stride(), *kp.stride(), *va.stride(), *v.stride(), *self.mask_strides)
        self.meta = dict(Da=Da, Ev=Ev, BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_D=block_d,
                         BLOCK_DV=block_dv, MASK_KIND=kind, CAUSAL=causal)
        self.empty = self.B * self.H * self.Lq == 0


def additive_fwd(qp, kp, va, v, mask, causal, launch=None, tile=None):
    """(out, lse): out (B, H, Lq, Ev) float32 contiguous, lse (B, H, Lq) float64
    (-inf, with out 0, for rows that see no key; float64 because the backward
    recomputes P = exp(s - lse) from it, as the CPU op's lse).  launch: wraps each kernel
    before its launch (torch.library.wrap_triton in the op); tile: (BLOCK_M,
    BLOCK_N) in place of the default."""
    wrap = launch or (lambda kern: kern)
    L = _Launch(qp, kp, va, v, mask, causal, tile)
    out = torch.empty((L.B, L.H, L.Lq, v.shape[3]), dtype=torch.float32, device=qp.device)
    lse = torch.empty((L.B, L.H, L.Lq), dtype=torch.float64, device=qp.device)
    if L.empty:
        return out, lse
    grid = (triton.cdiv(L.Lq, L.block_m), L.B * L.H)
    wrap(_fwd_kernel)[grid](qp, kp, va, v, L.mask, out, lse, *L.strides, L.H, L.Lq, L.Lk, **L.meta,
                            num_warps=NUM_WARPS["fwd"], num_stages=1)
    return out, lse


def additive_bwd(dout, qp, kp, va, v, mask, causal, out, lse, dlse=None, launch=None, tile=None):
    """(dqp, dkp, dva, dv), float32 contiguous, shaped like qp, kp, va (H, Da) and v.

    dout (B, H, Lq, Ev); lse (B, H, Lq) as the forward returned it; dlse None or
    (B, H, Lq) (a loss on lse: d lse / d s = P, so it shifts delta by -dlse).
    out is not read (delta is rowsum(P * dP), recomputed)."""
    wrap = launch or (lambda kern: kern)
    L = _Launch(qp, kp, va, v, mask, causal, tile)
    B, H, Lq, Lk = L.B, L.H, L.Lq, L.Lk
    Da, Ev = L.meta["Da"], L.meta["Ev"]
    dev = qp.device
    if dout is None:
        dout = torch.zeros((B, H, Lq, Ev), dtype=torch.float32, device=dev)
    if tuple(dout.shape) != (B, H, Lq, Ev) or tuple(lse.shape) != (B, H, Lq):
        raise ValueError(f"dout {tuple(dout.shape)} must be (B, H, Lq, Ev) = {(B, H, Lq, Ev)} and lse "
                         f"{tuple(lse.shape)} (B, H, Lq)")
    if dlse is not None and tuple(dlse.shape) != (B, H, Lq):
        raise ValueError(f"dlse {tuple(dlse.shape)} must be (B, H, Lq) = {(B, H, Lq)}")
    dqp = torch.empty((B, H, Lq, Da), dtype=torch.float32, device=dev)
    dkp = torch.empty((B, H, Lk, Da), dtype=torch.float32, device=dev)
    dv = torch.empty((B, H, Lk, Ev), dtype=torch.float32, device=dev)
    nkb = triton.cdiv(Lk, L.block_n)
    if B * H * Lk == 0 or Lq == 0:  # nothing attends: every gradient is 0
        return dqp.zero_(), dkp.zero_(), torch.zeros((H, Da), dtype=torch.float32, device=dev), dv.zero_()
    dout = dout.to(torch.float32)
    lse = lse.to(torch.float64).contiguous()  # the kernels index it as (B * H, Lq)
    dlse_arg = dlse.to(torch.float64).contiguous() if dlse is not None else lse
    delta = torch.empty((B, H, Lq), dtype=torch.float64, device=dev)
    dva_part = torch.empty((B, H, nkb, Da), dtype=torch.float32, device=dev)
    common = (*L.strides, *dout.stride(), H, Lq, Lk)
    wrap(_bwd_rows_kernel)[(triton.cdiv(Lq, L.block_m), B * H)](
        qp, kp, va, v, L.mask, dout, lse, dlse_arg, delta, dqp, *common, **L.meta,
        HAS_DLSE=dlse is not None, num_warps=NUM_WARPS["bwd"], num_stages=1)
    wrap(_bwd_keys_kernel)[(nkb, B * H)](
        qp, kp, va, v, L.mask, dout, lse, delta, dkp, dv, dva_part, *common, **L.meta,
        num_warps=NUM_WARPS["bwd"], num_stages=1)
    return dqp, dkp, dva_part.sum((0, 2)), dv


# ---------------------------------------------------------------------------
# The torch ops
# ---------------------------------------------------------------------------
#     out, lse = torch.ops.attnfast.triton_additive_fwd(qp, kp, va, v, mask, causal)
#     dqp, dkp, dva, dv = torch.ops.attnfast.triton_additive_bwd(dout, qp, kp, va, v, mask, causal,
#                                                                 out, lse, dlse)
# The same semantics as the fused CPU op attnfast::additive_fwd/additive_bwd
# (attnfast/ops.py), on float32 tensors shaped as the launchers take them; the
# backward returns dva as (H, Da) (summed over the batch), the shape of va.
# `triton_op`s: the body launches the kernels through `wrap_triton`
# (common.launcher), so torch.compile sees inside them and the body doubles as
# the fake kernel.  Autograd on the forward gives gradients for qp, kp, va and v
# (none for the mask), lse's included.
@triton_op("attnfast::triton_additive_fwd", mutates_args=())
def triton_additive_fwd(qp: torch.Tensor, kp: torch.Tensor, va: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return additive_fwd(qp, kp, va, v, mask, causal, launch=launcher(qp))


@triton_op("attnfast::triton_additive_bwd", mutates_args=())
def triton_additive_bwd(dout: torch.Tensor, qp: torch.Tensor, kp: torch.Tensor, va: torch.Tensor,
                        v: torch.Tensor, mask: torch.Tensor | None, causal: bool, out: torch.Tensor,
                        lse: torch.Tensor, dlse: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return additive_bwd(dout, qp, kp, va, v, mask, causal, out, lse, dlse, launch=launcher(qp))


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
