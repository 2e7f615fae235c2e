"""What the Triton kernels of every family share: the interpreter check, the mask
kinds and mask scoring, tile loads, the dot helper, and the launcher the ops use.

Masks reach the kernels as a pointer with (B, H, Lq, Lk) strides (stride 0 where
they broadcast) and a compile-time MASK_KIND: MASK_BOOL (True = the key takes
part) or MASK_FLOAT (added to the scores; -inf hides).  Visibility is a band
around the diagonal d = i + diag: key j is visible from query i iff j < Lk and,
when BANDED, (wl < 0 or j >= d - wl) and (wr < 0 or j <= d + wr); top-left
causal is diag = 0, wl = -1, wr = 0.
"""
import os

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from ..facts import FACTS

# TRITON_INTERPRET=1: the kernels run on CPU tensors, in Python (read once, as Triton does).
INTERPRETING = FACTS.triton_interpreting

MASK_NONE = tl.constexpr(0)
MASK_BOOL = tl.constexpr(1)
MASK_FLOAT = tl.constexpr(2)

# How tl.dot runs: native (tf32 for float32 on GPUs is not used: see below),
# IEEE float32, or upcast to float32 first.  float32 inputs use IEEE (no tf32:
# the parity rule is derived for true float32).  Under TRITON_INTERPRET=1 the
# interpreter's bf16 dot is wrong (a 16x16 bf16 dot came out ~1e10 off in
# triton 3.9), so there bf16 operands are upcast; GPU runs keep bf16 dots.
DOT_NATIVE, DOT_IEEE, DOT_UPCAST = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


def mask_kind(mask):
    """The MASK_KIND (an int) of a mask tensor or None."""
    if mask is None:
        return MASK_NONE.value
    return (MASK_FLOAT if mask.dtype.is_floating_point else MASK_BOOL).value


def mask_args(q, mask):
    """(tensor, strides, kind) of a kernel's mask arguments; q stands in (never read) without one."""
    if mask is None:
        return q, (0, 0, 0, 0), MASK_NONE.value
    return mask, tuple(mask.stride()), mask_kind(mask)


def dot_mode(dtype):
    """The DOT of a kernel whose operands have `dtype`."""
    if dtype == torch.float32:
        return DOT_IEEE.value
    if dtype == torch.bfloat16 and INTERPRETING:
        return DOT_UPCAST.value
    return DOT_NATIVE.value


@triton.jit
def dot(a, b, DOT: tl.constexpr):
    if DOT == DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT == DOT_IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


# The saved lse of float32 inputs is float64 (the CPU op's convention): the
# backward rebuilds P = exp(s - lse), and a float32 lse puts its own rounding,
# half an ulp of |lse| ~ log Lk, on every P as a relative error: 1.2x a naive
# float32 softmax's error at the median and up to 3x in the tail (measured),
# which the parity rule catches on some draws.  The float64 lse is built with
# float64 adds, multiplies and one divide only (no float64 log on the device, and
# no platform float32 log, whose error differs between GPUs and numpy).
#
# exp2 in the kernels of attention.py: scores are kept in log2 units, s2 = q.k * (scale * log2 e),
# so that each score costs one exp2 (the GPU's ex2) and no multiply by log2 e.  The lse they save
# stays natural (the op's convention); the float64 conversions between the two take two-part
# constants, each part exact in float32 (a kernel's float literal is a float32 constant).
LOG2E = tl.constexpr(1.4426950408889634)        # for float32 arithmetic (a mask's values)
LOG2E_HI = tl.constexpr(1.4426950216293335)     # float32(log2 e)
LOG2E_LO = tl.constexpr(1.92596298909109e-08)   # log2 e - LOG2E_HI
LN2_HI = tl.constexpr(0.693145751953125)        # 15 significant bits
LN2_LO = tl.constexpr(1.4286068202862268e-06)   # ln 2 - LN2_HI


@triton.jit
def _ln_f64(l):
    """log(l) in float64 for float32 sums l >= 1: l = 2^e f with f in [sqrt(1/2), sqrt(2)); e ln 2
    from the two-part ln 2 (e * LN2_HI is exact in float32); log f = 2 atanh(u),
    u = (f - 1) / (f + 1), |u| < 0.172, by its series to u^17 (the rest < 2e-16)."""
    bits = l.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    f = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # [1, 2)
    big = f > 1.4142135
    f = tl.where(big, f * 0.5, f).to(tl.float64)
    e = tl.where(big, e + 1, e).to(tl.float32)
    u = (f - 1.0) / (f + 1.0)
    u2 = u * u
    series = u2 * (2.0 / 3.0 + u2 * (2.0 / 5.0 + u2 * (2.0 / 7.0 + u2 * (2.0 / 9.0 + u2 * (
        2.0 / 11.0 + u2 * (2.0 / 13.0 + u2 * (2.0 / 15.0 + u2 * (2.0 / 17.0))))))))
    return (e * LN2_HI).to(tl.float64) + (e * LN2_LO).to(tl.float64) + (2.0 * u + u * series)


@triton.jit
def row_lse2(m2, l):
    """The natural lse, m2 ln 2 + log(l), in float64, of float32 row maxima m2 in log2 units and
    sums l >= 1 (m2 * LN2_HI is exact in float64)."""
    return nat_f64(m2) + _ln_f64(l)


@triton.jit
def nat_f64(x2):
    """x2 ln 2 in float64 for float32 x2 (log2 units): x2 * LN2_HI is exact in float64, so the FMA
    and a plain multiply-add round alike (split_fwd's float64 merge forms it the same way)."""
    x = x2.to(tl.float64)
    return tl.fma(x, LN2_HI, x * LN2_LO)


@triton.jit
def saved_lse_parts(lse, NATURAL: tl.constexpr):
    """(hi, lo) of a saved lse for the backward's P: in log2 units (lse2_parts) for a float64 lse
    (float32 inputs), natural (lse_parts) for a float32 one (half inputs; see p_of_scores)."""
    if NATURAL:
        return lse_parts(lse)
    return lse2_parts(lse)


@triton.jit
def p_of_scores(s2, hi, lo, NATURAL: tl.constexpr):
    """The backward's P of scores s2 in log2 units.  A half input's lse is float32: times log2 e it
    need not round back to a lone visible key's score, which must get P = 1 exactly (dS = 0); in
    natural units the score rounds as the forward's lse did (nat_f64 to float32), so s - lse = 0."""
    if NATURAL:
        return tl.exp((nat_f64(s2).to(tl.float32) - hi[:, None]) - lo[:, None])
    return tl.exp2((s2 - hi[:, None]) - lo[:, None])


@triton.jit
def lse2_parts(lse):
    """lse_parts of a saved (natural) lse in log2 units, for P = exp2((s2 - hi) - lo): the lse
    times log2 e in float64 (a row of one visible key then gets hi = its score exactly, P = 1)."""
    x = lse.to(tl.float64)
    return lse_parts(x * LOG2E_HI + x * LOG2E_LO)


@triton.jit
def row_lse(m, l):
    """m + log(l) in float64 for float32 row maxima m and sums l >= 1 (every row that
    sees a key has l >= 1)."""
    return m.to(tl.float64) + _ln_f64(l)


@triton.jit
def lse_parts(lse):
    """(hi, lo): float32 parts of saved lse values (float64, or float32 for half
    inputs, where lo = 0) with hi + lo = lse to 48 bits; P = exp((s - hi) - lo) rounds
    like a naive softmax's exp(s - max) (s - hi is exact where P is large).  Rows
    that see no key (-inf) and rows past Lq (+inf) get hi = +inf, lo = 0: P = 0."""
    none = (lse == float("-inf")) | (lse == float("inf"))
    x = tl.where(none, 0.0, lse)
    hi = x.to(tl.float32)
    return tl.where(none, float("inf"), hi), (x - hi.to(x.dtype)).to(tl.float32)


@triton.jit
def program_block(H, group, BLOCK: tl.constexpr):
    """This program's block of rows (queries or keys) for the kernels launched on a grid
    (blocks, batch * heads): (bh, b, h, h // group, first row, row offsets); with H the
    query heads and `group` the GQA group size, h // group is the key/value head."""
    bh = tl.program_id(1)
    h = bh % H
    start = tl.program_id(0) * BLOCK
    return bh, bh // H, h, h // group, start, start + tl.arange(0, BLOCK)


@triton.jit
def load_rows(Ptr, base, offs, sr, sc, n_rows, COLS: tl.constexpr, n_cols, ROWS_IN: tl.constexpr = False):
    """(len(offs), COLS) tile of a strided matrix at Ptr + base, zero past n_rows / n_cols.
    ROWS_IN: the caller knows every row is below n_rows (no row mask; none at all when
    n_cols == COLS)."""
    offs_c = tl.arange(0, COLS)
    ptr = Ptr + base + offs[:, None] * sr + offs_c[None, :] * sc
    if ROWS_IN:
        if n_cols == COLS:
            return tl.load(ptr)
        return tl.load(ptr, mask=offs_c[None, :] < n_cols, other=0.0)
    return tl.load(ptr, mask=(offs[:, None] < n_rows) & (offs_c[None, :] < n_cols), other=0.0)


@triton.jit
def row_source(Ptr, base, n_rows, sr, n_cols, ROWS: tl.constexpr, COLS: tl.constexpr, DESC: tl.constexpr):
    """What load_tile reads (ROWS, COLS) tiles of a matrix at Ptr + base from: with DESC a tensor
    descriptor of shape (n_rows, n_cols), row stride sr, unit column stride (TMA on sm90: the
    hardware walks the addresses and zero-fills past the shape; elsewhere Triton lowers it to
    masked loads); else Ptr itself."""
    if DESC:
        return tl.make_tensor_descriptor(Ptr + base, [n_rows, n_cols], [sr, 1], [ROWS, COLS])
    else:
        return Ptr


@triton.jit
def load_tile(src, base, start, ROWS: tl.constexpr, sr, sc, n_rows, COLS: tl.constexpr, n_cols,
              ROWS_IN: tl.constexpr, DESC: tl.constexpr):
    """Rows start .. start + ROWS of a row_source (base as given to it), zero past n_rows / n_cols."""
    if DESC:
        return src.load([start, 0])
    else:
        return load_rows(src, base, start + tl.arange(0, ROWS), sr, sc, n_rows, COLS, n_cols, ROWS_IN)


DESC_ENV = "ATTNFAST_TRITON_TMA"  # "0": K/V tiles through pointer loads everywhere


def _address(t):
    """t's first element's byte address modulo 16 as far as it is known: the data pointer of a
    real tensor; of a fake (traced) one, its storage offset (storages start 16-byte aligned)."""
    if t.device.type == "meta" or is_fake(t):
        return t.storage_offset() * t.element_size()
    return t.data_ptr()


def descriptor_ok(*tensors):
    """True when a TMA descriptor can address each tensor's rows: unit last stride, every other
    stride and the first element's address a multiple of 16 bytes (the hardware's rule)."""
    for t in tensors:
        if t.dim() < 2:
            return False
        size = t.element_size()
        # the row stride goes into the descriptor whatever the row count; the dims before it only
        # move its start (a size-1 dim's stride is never used)
        outer = [st for n, st in zip(t.shape[:-2], t.stride()[:-2]) if n > 1] + [t.stride(-2)]
        if (t.stride(-1) != 1 and t.shape[-1] > 1) or _address(t) % 16 or any(st * size % 16 for st in outer):
            return False
        if t.shape[-2] > 1 and t.stride(-2) <= 0:  # rows of one address: not for TMA
            return False
    return True


def _scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def use_descriptors(arch, *tensors):
    """Whether a kernel's row tiles go through tensor descriptors (DESC): for 16-bit inputs on sm90
    and later, where they are TMA loads feeding wgmma, and under the interpreter (so that CPU
    tests run that path), unless ATTNFAST_TRITON_TMA=0 or a tensor's layout does not allow it.
    float32 keeps pointer loads: its IEEE products run on FMA units, which the descriptor's
    shared-memory layout does not suit (ptxas: 32 registers and 38 KiB of spills at D 128).  On
    a GPU a device-side descriptor lives in scratch memory that Triton asks an allocator for:
    unless one is set (torch.compile sets its own), torch's caching allocator serves it."""
    gpu = INTERPRETING or (arch >= 90 and torch.version.hip is None)  # (ROCm's capability numbers differ)
    if (os.environ.get(DESC_ENV, "1") == "0" or not gpu or any(t.element_size() != 2 for t in tensors)
            or not descriptor_ok(*tensors)):
        return False
    if not INTERPRETING:
        try:
            from triton.runtime import _allocation
        except ImportError:  # a triton without the allocator hook: no device-side descriptors
            return False
        if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            triton.set_allocator(_scratch)
    return True


@triton.jit
def visible(offs_m, offs_n, Lk, diag, wl, wr, BANDED: tl.constexpr):
    """(M, N) bool: key offs_n visible from query offs_m (keys past Lk never are)."""
    ok = offs_n[None, :] < Lk
    if BANDED:
        d = offs_m[:, None] + diag
        j = offs_n[None, :]
        ok = ok & ((wl < 0) | (j >= d - wl)) & ((wr < 0) | (j <= d + wr))
    return ok


@triton.jit
def masked_scores(s, ok, offs_m, offs_n, Mask, mask_base, smm, smn, read, MASK_KIND: tl.constexpr,
                  LOG2: tl.constexpr = False):
    """Scores s (M, N) with every entry not `ok` or hidden by a bool mask at -inf, and a
    float mask added (in s's dtype; times log2 e for scores in log2 units, LOG2).  The mask
    tile is read with the mask's own (broadcast) strides, only where `read` (elsewhere a
    bool mask counts as True)."""
    mptr = Mask + mask_base + offs_m[:, None] * smm + offs_n[None, :] * smn
    if MASK_KIND == MASK_BOOL:
        ok = ok & (tl.load(mptr, mask=read, other=1) != 0)
    if MASK_KIND == MASK_FLOAT:
        add = tl.load(mptr, mask=read, other=0.0).to(s.dtype)
        if LOG2:
            add = add * LOG2E
        s = s + add
    return tl.where(ok, s, float("-inf"))


class _NoLaunch:
    """A launcher that runs nothing (kernel[grid](...) is a no-op)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _OnDevice:
    """A kernel whose launches make `device` the current GPU for their duration: Triton launches
    on the current device (and takes a descriptor's scratch memory there), not on its tensors'."""

    def __init__(self, kernel, device):
        self.kernel, self.device = kernel, device

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            with torch.cuda.device(self.device):
                return launch(*args, **kwargs)
        return run


def launcher(q):
    """How an op body launches its kernels: torch.library.wrap_triton (torch.compile sees
    inside).  Under TRITON_INTERPRET=1: the kernel itself (torch 2.11's wrap_triton rejects
    the interpreter's kernels: "wrap_triton only works on functions annotated with
    triton.jit"), and with fake/meta tensors (the body serving as its own fake kernel) a
    launcher that runs nothing: the interpreter would run the kernel on the fake tensors'
    missing data.  Tensors on a GPU other than the current one: launched with theirs made
    current (eagerly; a compiled graph sets its device itself)."""
    from torch.library import wrap_triton

    if INTERPRETING:
        if q.device.type == "meta" or is_fake(q):
            return lambda kernel: _NoLaunch()
        wrap = lambda kernel: kernel  # noqa: E731
    else:
        wrap = wrap_triton
    if (q.device.type == "cuda" and q.device.index is not None and not torch.compiler.is_compiling()
            and not is_fake(q) and q.device.index != torch.cuda.current_device()):
        return lambda kernel: _OnDevice(wrap(kernel), q.device)
    return wrap
