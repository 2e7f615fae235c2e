"""FlashAttention-2 in Triton: forward, and backward with a delta preprocess.

Layers (as in the rest of attnfast): `@triton.jit` kernels, plain launchers
(`attention_fwd`, `attention_bwd`: shapes, grid, block sizes), and the op
registration in attnfast/triton_ops.py.  Tensors are 4-D:
q (B, Hq, Lq, E), k (B, Hkv, Lk, E), v (B, Hkv, Lk, Ev), mask expanded to
(B, Hq, Lq, Lk) with stride 0 where it broadcasts.  Visibility of key j for
query i: d = i + diag; (window_left < 0 or j >= d - window_left) and
(window_right < 0 or j <= d + window_right); causal is window_right = 0.
"""
import triton
import triton.language as tl

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2
# How tl.dot runs: native (tf32 for float32 on GPUs is not used: see below),
# IEEE float32, or upcast to float32 first.  float32 inputs use IEEE (no tf32:
# the parity rule is derived for true float32).  Under TRITON_INTERPRET=1 the
# interpreter's bf16 dot is wrong (a 16x16 bf16 dot came out ~1e10 off in
# triton 3.9), so there bf16 operands are upcast; GPU runs keep bf16 dots.
DOT_NATIVE, DOT_IEEE, DOT_UPCAST = 0, 1, 2


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    if DOT == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT == 1:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


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
def _visible(offs_m, offs_n, Lk, diag, wl, wr, WINDOWED: tl.constexpr):
    ok = offs_n[None, :] < Lk
    if WINDOWED:
        d = offs_m[:, None] + diag
        j = offs_n[None, :]
        ok = ok & ((wl < 0) | (j >= d - wl)) & ((wr < 0) | (j <= d + wr))
    return ok


@triton.jit
def _mask_scores(s, offs_m, offs_n, Mask, mask_base, smm, smn, Lq, Lk, diag, wl, wr,
                 MASK_KIND: tl.constexpr, WINDOWED: tl.constexpr):
    """Scores with everything a query may not see set to -inf: keys past Lk,
    outside the causal/window band, or hidden by the mask; a float mask is
    added.  Mask tiles are read with the mask's own (broadcast) strides."""
    ok = _visible(offs_m, offs_n, Lk, diag, wl, wr, WINDOWED)
    mptr = Mask + mask_base + offs_m[:, None] * smm + offs_n[None, :] * smn
    inb = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    if MASK_KIND == 1:
        ok = ok & (tl.load(mptr, mask=inb, other=0) != 0)
    if MASK_KIND == 2:
        s = s + tl.load(mptr, mask=inb, other=0.0).to(tl.float32)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _kv_range(start_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Lk, diag, wl, wr,
              WINDOWED: tl.constexpr):
    # Key tiles that any row of the query block can see; the first one is
    # aligned down to BLOCK_N, its columns left of the band are masked.
    lo = 0
    hi = Lk
    if WINDOWED:
        if wl >= 0:
            lo = tl.maximum(start_m + diag - wl, 0)
            lo = (lo // BLOCK_N) * BLOCK_N
        if wr >= 0:
            hi = tl.minimum(start_m + BLOCK_M - 1 + diag + wr + 1, Lk)
    return lo, hi


@triton.jit
def _fwd_kernel(Q, K, V, Mask, Out, Lse,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                smb, smh, smm, smn, sob, soh, som, sod,
                Hq, Lq, Lk, group, scale, diag, wl, wr, seed_lo, seed_hi, rng_offset, p_drop,
                E: tl.constexpr, Ev: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASK_KIND: tl.constexpr,
                WINDOWED: tl.constexpr, DOT: tl.constexpr, DROPOUT: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // group
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # load q: it stays in registers/SRAM throughout
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < E), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo, hi = _kv_range(start_m, BLOCK_M, BLOCK_N, Lk, diag, wl, wr, WINDOWED)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = tl.load(K + b * skb + hk * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < E), other=0.0)  # (D, N)
        s = _dot(q, kt, DOT) * scale
        s = _mask_scores(s, offs_m, offs_n, Mask, b * smb + h * smh, smm, smn, Lq, Lk, diag, wl, wr,
                         MASK_KIND, WINDOWED)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # l sums the kept and the dropped; the output takes the kept
            p = p * _dropout_scale(offs_m, offs_n, Lk, pid_bh, seed_lo, seed_hi, rng_offset, p_drop)
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < Ev), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT)
        m_i = m_new
    alive = l_i > 0
    out = acc / tl.where(alive, l_i, 1.0)[:, None]  # fully masked rows: 0
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < Ev))
    lse = tl.where(alive, m_i + tl.log(tl.where(alive, l_i, 1.0)), float("-inf"))
    tl.store(Lse + pid_bh * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _bwd_rows_kernel(Q, K, V, Mask, DO, Lse, DLse, Delta, DQ,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     smb, smh, smm, smn, sdb, sdh, sdm, sdd,
                     Hq, Lq, Lk, group, scale, diag, wl, wr, seed_lo, seed_hi, rng_offset, p_drop,
                     E: tl.constexpr, Ev: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASK_KIND: tl.constexpr,
                     WINDOWED: tl.constexpr, DOT: tl.constexpr, HAS_DLSE: tl.constexpr,
                     DROPOUT: tl.constexpr, DELTA_PASS: tl.constexpr):
    # One program per (query block, batch * q head), launched twice:
    #   DELTA_PASS: delta = rowsum(P * dP) - dlse;
    #   else:       dQ = scale * sum_tiles (P * (dP - delta)) K.
    # delta comes from the same P and dP tiles the dQ pass and the dK/dV kernel
    # recompute (this very code, the same dots), not from FlashAttention-2's
    # rowsum(dO * O): that uses the stored, rounded O, and the two then do not
    # cancel where they should (one visible key: the exact dQ, dK are 0), which
    # the parity rule sees.  It costs two extra tile products per (q, k) tile.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // group
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < E), other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
                 mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < Ev), other=0.0)
    lse = tl.load(Lse + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # dead rows: P = 0
    if DELTA_PASS:
        delta = tl.zeros([BLOCK_M], tl.float32)
    else:
        delta = tl.load(Delta + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _kv_range(start_m, BLOCK_M, BLOCK_N, Lk, diag, wl, wr, WINDOWED)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < E), other=0.0)
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < Ev), other=0.0)
        s = _dot(q, tl.trans(k), DOT) * scale
        s = _mask_scores(s, offs_m, offs_n, Mask, b * smb + h * smh, smm, smn, Lq, Lk, diag, wl, wr,
                         MASK_KIND, WINDOWED)
        p = tl.exp(s - lse[:, None])  # masked: exp(-inf) = 0; dead rows have lse = +inf
        dp = _dot(do, tl.trans(v), DOT)
        if DROPOUT:
            dp = dp * _dropout_scale(offs_m, offs_n, Lk, pid_bh, seed_lo, seed_hi, rng_offset, p_drop)
        if DELTA_PASS:
            delta += tl.sum(p * dp, 1)
        else:
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, DOT)
    if DELTA_PASS:
        if HAS_DLSE:  # d lse / d s = P: a gradient on lse only shifts delta
            delta -= tl.load(DLse + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        tl.store(Delta + pid_bh * Lq + offs_m, delta, mask=offs_m < Lq)
    else:
        dq = dq * scale
        tl.store(DQ + (pid_bh * Lq + offs_m[:, None]) * E + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < E))


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, Mask, DO, Lse, Delta, DK, DV, DMask,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     smb, smh, smm, smn, sdb, sdh, sdm, sdd,
                     Hq, Hkv, Lq, Lk, group, scale, diag, wl, wr, seed_lo, seed_hi, rng_offset, p_drop,
                     E: tl.constexpr, Ev: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MASK_KIND: tl.constexpr,
                     WINDOWED: tl.constexpr, MASK_GRAD: tl.constexpr, DOT: tl.constexpr,
                     DROPOUT: tl.constexpr):
    # One program per (key block, batch * kv head): it owns that dK/dV block and
    # walks the query blocks of every q head of its GQA group.
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    b = pid_bhk // Hkv
    hk = pid_bhk % Hkv
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < E), other=0.0)  # (N, D)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < Ev), other=0.0)  # (N, DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # Query rows that can see this key block.
    lo = 0
    hi = Lq
    if WINDOWED:
        if wr >= 0:
            lo = tl.maximum(start_n - diag - wr, 0)
            lo = (lo // BLOCK_M) * BLOCK_M
        if wl >= 0:
            hi = tl.minimum(start_n + BLOCK_N - 1 - diag + wl + 1, Lq)
    for g in range(0, group):
        h = hk * group + g
        bh = b * Hq + h
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                        mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < E), other=0.0)
            do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
                         mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < Ev), other=0.0)
            lse = tl.load(Lse + bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # dead rows: P = 0
            delta = tl.load(Delta + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
            s = _dot(q, tl.trans(k), DOT) * scale
            s = _mask_scores(s, offs_m, offs_n, Mask, b * smb + h * smh, smm, smn, Lq, Lk, diag, wl, wr,
                             MASK_KIND, WINDOWED)
            p = tl.exp(s - lse[:, None])  # (M, N); rows past Lq have lse = +inf: p = 0
            if DROPOUT:
                z = _dropout_scale(offs_m, offs_n, Lk, bh, seed_lo, seed_hi, rng_offset, p_drop)
                dv += _dot(tl.trans(p * z).to(do.dtype), do, DOT)
                dp = _dot(do, tl.trans(v), DOT) * z
            else:
                dv += _dot(tl.trans(p).to(do.dtype), do, DOT)
                dp = _dot(do, tl.trans(v), DOT)
            ds = p * (dp - delta[:, None])
            if MASK_GRAD:
                tl.store(DMask + bh * Lq * Lk + offs_m[:, None] * Lk + offs_n[None, :], ds,
                         mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))
            dk += _dot(tl.trans(ds).to(q.dtype), q, DOT)
    dk = dk * scale
    base = (b * Hkv + hk) * Lk
    tl.store(DK + (base + offs_n[:, None]) * E + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < E))
    tl.store(DV + (base + offs_n[:, None]) * Ev + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < Ev))


# ---------------------------------------------------------------------------
# Launchers: shapes, grids, block sizes.
# ---------------------------------------------------------------------------
def _blocks(E, Ev):
    bd = max(16, triton.next_power_of_2(E))
    bdv = max(16, triton.next_power_of_2(Ev))
    bm = 64
    bn = 64 if max(bd, bdv) <= 128 else 32
    return bm, bn, bd, bdv


def _dot_mode(dtype):
    import os

    import torch

    if dtype == torch.float32:
        return DOT_IEEE
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return DOT_UPCAST
    return DOT_NATIVE


def _mask_args(mask, q):
    if mask is None:
        return q, (0, 0, 0, 0), MASK_NONE
    kind = MASK_BOOL if mask.dtype.is_floating_point is False else MASK_FLOAT
    return mask, tuple(mask.stride()), kind


def _common(q, k, v, window_left, window_right, bottom_right):
    B, Hq, Lq, E = q.shape
    Hkv, Lk, Ev = k.shape[1], k.shape[2], v.shape[3]
    diag = Lk - Lq if bottom_right else 0
    windowed = window_left >= 0 or window_right >= 0
    return B, Hq, Hkv, Lq, Lk, E, Ev, diag, windowed


def _rng_args(dropout_p, seed, offset):
    return (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, offset & 0xFFFFFFFF, float(dropout_p))


def attention_fwd(q, k, v, mask, scale, window_left, window_right, bottom_right, dropout_p=0.0, seed=0,
                  offset=0, launch=None):
    """(out, lse): out (B, Hq, Lq, Ev) contiguous, lse (B, Hq, Lq) float32."""
    import torch

    launch = launch or (lambda kern: kern)
    B, Hq, Hkv, Lq, Lk, E, Ev, diag, windowed = _common(q, k, v, window_left, window_right, bottom_right)
    out = torch.empty((B, Hq, Lq, Ev), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    bm, bn, bd, bdv = _blocks(E, Ev)
    m, mst, kind = _mask_args(mask, q)
    grid = (triton.cdiv(Lq, bm), B * Hq)
    launch(_fwd_kernel)[grid](
        q, k, v, m, out, lse, *q.stride(), *k.stride(), *v.stride(), *mst, *out.stride(),
        Hq, Lq, Lk, Hq // Hkv, scale, diag, window_left, window_right, *_rng_args(dropout_p, seed, offset),
        E=E, Ev=Ev, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, MASK_KIND=kind,
        WINDOWED=windowed, DOT=_dot_mode(q.dtype), DROPOUT=dropout_p > 0)
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, dlse, mask, scale, window_left, window_right, bottom_right,
                  mask_grad, dropout_p=0.0, seed=0, offset=0, launch=None):
    """(dq, dk, dv, dmask): contiguous; dmask (B, Hq, Lq, Lk) float32 or empty."""
    import torch

    launch = launch or (lambda kern: kern)
    B, Hq, Hkv, Lq, Lk, E, Ev, diag, windowed = _common(q, k, v, window_left, window_right, bottom_right)
    bm, bn, bd, bdv = _blocks(E, Ev)
    m, mst, kind = _mask_args(mask, q)
    delta = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    dot = _dot_mode(q.dtype)
    rng = _rng_args(dropout_p, seed, offset)
    dq = torch.empty((B, Hq, Lq, E), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Lk, E), dtype=q.dtype, device=q.device)
    dv = torch.empty((B, Hkv, Lk, Ev), dtype=q.dtype, device=q.device)
    dmask = (torch.zeros((B, Hq, Lq, Lk), dtype=torch.float32, device=q.device) if mask_grad
             else torch.empty((0,), dtype=torch.float32, device=q.device))
    dlse_arg = dlse.contiguous() if dlse is not None else lse

    def rows_pass(delta_pass):
        launch(_bwd_rows_kernel)[(triton.cdiv(Lq, bm), B * Hq)](
            q, k, v, m, dout, lse, dlse_arg, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *mst, *dout.stride(),
            Hq, Lq, Lk, Hq // Hkv, scale, diag, window_left, window_right, *rng,
            E=E, Ev=Ev, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, MASK_KIND=kind,
            WINDOWED=windowed, DOT=dot, HAS_DLSE=dlse is not None, DROPOUT=dropout_p > 0,
            DELTA_PASS=delta_pass)

    rows_pass(True)
    launch(_bwd_dkdv_kernel)[(triton.cdiv(Lk, bn), B * Hkv)](
        q, k, v, m, dout, lse, delta, dk, dv, dmask if mask_grad else delta,
        *q.stride(), *k.stride(), *v.stride(), *mst, *dout.stride(),
        Hq, Hkv, Lq, Lk, Hq // Hkv, scale, diag, window_left, window_right, *rng,
        E=E, Ev=Ev, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, MASK_KIND=kind,
        WINDOWED=windowed, MASK_GRAD=mask_grad, DOT=dot, DROPOUT=dropout_p > 0)
    rows_pass(False)
    return dq, dk, dv, dmask
