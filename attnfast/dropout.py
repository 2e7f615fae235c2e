"""The dropout RNG every backend shares, and the mask it gives.

All backends draw dropout from one counter-based RNG (Philox4x32-10, see
csrc/cpu/philox.h and triton_kernels/attention.py): element (bh, i, j) of a
call keyed by (seed, offset) is kept iff
(philox(seed; i*Lk + j, bh, offset)[0] >> 8) * 2**-24 >= p.
`draw_rng` takes a call's (seed, offset) from torch's generator; `dropout_mask`
rebuilds the multipliers of a call (the reference backend applies them, and
tests use them to check the kernels).
"""
from __future__ import annotations

import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def draw_rng(device="cpu", generator=None):
    """The (seed, offset) int64 pair a dropout call draws from torch's generator."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, generator=generator)
    return torch.cat([seed, torch.zeros(1, dtype=torch.int64)]).to(device)


def _mulhilo(a, m):
    # a: int64 tensor of 32-bit values; m: 32-bit constant.  Exact 64-bit
    # product split in 16-bit halves so no int64 overflow occurs.
    a_lo, a_hi = a & 0xFFFF, a >> 16
    t = a_lo * m
    u = a_hi * m
    hi = (u + (t >> 16)) >> 16
    lo = (((u & 0xFFFF) << 16) + t) & _U32
    return hi & _U32, lo


def philox_first_word(c0, c1, c2, c3, k0, k1):
    """First output word of Philox4x32-10 for int64 tensors of 32-bit values."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _U32
        k1 = (k1 + _W1) & _U32
    return c0


def dropout_mask(shape, dropout_p, rng=None, device="cpu"):
    """Multipliers (0 or 1/(1-p)) of shape (..., Hq, Lq, Lk), float32.

    `rng` is the (seed, offset) pair of the call; None draws it from torch's
    default generator exactly as `attnfast.attention` does, so
    `torch.manual_seed(s); attention(..., dropout_p=p)` and
    `torch.manual_seed(s); dropout_mask(shape, p)` agree.
    """
    if rng is None:
        rng = draw_rng()
    seed, offset = (int(x) for x in rng.cpu().tolist())
    *lead, Lq, Lk = shape
    BH = 1
    for d in lead:
        BH *= d
    bh = torch.arange(BH, dtype=torch.int64).view(BH, 1, 1)
    n = (torch.arange(Lq, dtype=torch.int64).view(1, Lq, 1) * Lk
         + torch.arange(Lk, dtype=torch.int64).view(1, 1, Lk))
    c0 = (n & _U32).expand(BH, Lq, Lk)
    c1 = (n >> 32).expand(BH, Lq, Lk)
    c2 = (bh & _U32).expand(BH, Lq, Lk)
    c3 = torch.full((BH, Lq, Lk), offset & _U32, dtype=torch.int64)
    k0 = torch.tensor(seed & _U32, dtype=torch.int64)
    k1 = torch.tensor((seed >> 32) & _U32, dtype=torch.int64)
    word = philox_first_word(c0, c1, c2, c3, k0, k1)
    keep = (word >> 8).to(torch.float32) * (1.0 / 16777216.0) >= dropout_p
    mult = keep.to(torch.float32) / (1.0 - dropout_p)
    return mult.reshape(tuple(shape)).to(device)
