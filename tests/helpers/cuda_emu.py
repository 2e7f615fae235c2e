"""The CUDA C++ kernels run on the CPU through the host emulator (csrc/cuda/tools/emu.h).

`attention(q, k, v, attn_mask, ...)` takes CPU float16/bfloat16 tensors, fills the
kernels' params the way csrc/cuda/binding_cuda.cpp does, and runs the forward and
(under autograd) backward kernels' own source, so the tests can hold them to the
parity rule without a GPU.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import subprocess
from ctypes import POINTER, Structure, c_float, c_int, c_int64, c_longlong, c_void_p
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
LIB = ROOT / "build" / "libattnfast_emu.so"


def _compile_check():
    """csrc/cuda/tools/compile_check.py, which knows where the CUDA headers are."""
    spec = importlib.util.spec_from_file_location("compile_check", CUDA_DIR / "tools" / "compile_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cuda_include():
    return _compile_check().cuda_include()


def build():
    """Compile the emulator library if a kernel source is newer than it; its path."""
    inc = cuda_include()
    if inc is None:
        raise RuntimeError("CUDA headers (cuda_bf16.h) not found: set CUDA_HOME")
    sources = list(CUDA_DIR.glob("*.h")) + list(CUDA_DIR.glob("*.cuh")) + list((CUDA_DIR / "tools").glob("emu.*"))
    if LIB.exists() and LIB.stat().st_mtime >= max(s.stat().st_mtime for s in sources):
        return LIB
    LIB.parent.mkdir(parents=True, exist_ok=True)
    tmp = LIB.with_suffix(f".{os.getpid()}.tmp")
    cmd = ["g++", "-std=c++17", "-O2", "-shared", "-fPIC", "-DATTNFAST_CUDA_EMULATION", f"-I{CUDA_DIR}",
           f"-I{inc}", str(CUDA_DIR / "tools" / "emu.cpp"), "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("emulator build failed:\n" + r.stderr[-4000:])
    os.replace(tmp, LIB)
    return LIB


class Strides3(Structure):
    _fields_ = [("b", c_int64), ("h", c_int64), ("r", c_int64)]


class AttnParams(Structure):
    _fields_ = [("elem", c_int), ("B", c_int), ("Hq", c_int), ("Hkv", c_int), ("Lq", c_int), ("Lk", c_int),
                ("D", c_int), ("q", c_void_p), ("k", c_void_p), ("v", c_void_p), ("q_st", Strides3),
                ("k_st", Strides3), ("v_st", Strides3), ("mask_kind", c_int), ("mask", c_void_p),
                ("mask_st", c_int64 * 4), ("scale", c_float), ("scale_log2", c_float), ("diag_offset", c_int),
                ("window_left", c_int), ("window_right", c_int), ("cu_q", c_void_p), ("cu_k", c_void_p),
                ("used_k", c_void_p), ("bottom_right", c_int), ("total_q", c_int), ("total_k", c_int)]


class FwdParams(Structure):
    _fields_ = [("a", AttnParams), ("out", c_void_p), ("out_st", Strides3), ("lse", c_void_p)]


class BwdParams(Structure):
    _fields_ = [("a", AttnParams), ("out", c_void_p), ("out_st", Strides3), ("dout", c_void_p),
                ("dout_st", Strides3), ("lse", c_void_p), ("dlse", c_void_p), ("delta", c_void_p),
                ("dq_accum", c_void_p), ("dq", c_void_p), ("dk", c_void_p), ("dv", c_void_p), ("dmask", c_void_p),
                ("delta_in", c_void_p), ("dq_st", Strides3), ("dk_st", Strides3), ("dv_st", Strides3)]


_lib = None


def lib():
    global _lib
    if _lib is None:
        _lib = ctypes.CDLL(str(build()))
        _lib.attnfast_emu_fwd.argtypes = [POINTER(FwdParams)]
        _lib.attnfast_emu_bwd.argtypes = [POINTER(BwdParams)]
        layout = (c_longlong * 10)()
        _lib.attnfast_emu_layout(layout)
        mine = [ctypes.sizeof(AttnParams), ctypes.sizeof(FwdParams), ctypes.sizeof(BwdParams),
                AttnParams.mask_st.offset, AttnParams.window_right.offset, FwdParams.lse.offset,
                BwdParams.dmask.offset, BwdParams.delta_in.offset, AttnParams.total_q.offset,
                BwdParams.dv_st.offset]
        assert list(layout) == mine, f"ctypes mirror of flash.h is stale: C {list(layout)} vs ctypes {mine}"
    return _lib


def _aligned(t):
    """What the binding's aligned() does: 16-byte rows or a contiguous copy."""
    ok = t.stride(3) == 1 and all(s % 8 == 0 for s in t.stride()[:3]) and t.data_ptr() % 16 == 0
    return t if ok else t.contiguous()


def _st(t):
    return Strides3(*t.stride()[:3])


def _common(q, k, v, mask, scale, wl, wr, bottom_right):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    a = AttnParams()
    a.elem = 1 if q.dtype == torch.bfloat16 else 0
    a.B, a.Hq, a.Hkv, a.Lq, a.Lk, a.D = B, Hq, Hkv, Lq, Lk, D
    a.q, a.k, a.v = q.data_ptr(), k.data_ptr(), v.data_ptr()
    a.q_st, a.k_st, a.v_st = _st(q), _st(k), _st(v)
    a.mask_kind, a.mask = 0, None
    if mask is not None:
        assert mask.shape == (B, Hq, Lq, Lk)
        a.mask_kind = 1 if mask.dtype == torch.bool else 2
        a.mask = mask.data_ptr()
        for i in range(4):
            a.mask_st[i] = mask.stride(i)
    a.scale = scale
    a.scale_log2 = scale * 1.4426950408889634
    far = max(Lq, Lk) + 1
    a.diag_offset = Lk - Lq if bottom_right else 0
    a.window_left = -1 if wl < 0 else min(wl, far)
    a.window_right = -1 if wr < 0 else min(wr, far)
    return a


def fwd(q, k, v, mask, scale, wl, wr, bottom_right):
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    p = FwdParams()
    p.a = _common(q, k, v, mask, scale, wl, wr, bottom_right)
    B, Hq, Lq, D = q.shape
    out = torch.full((B, Hq, Lq, D), float("nan"), dtype=q.dtype)
    lse = torch.full((B, Hq, Lq), float("nan"), dtype=torch.float32)
    p.out, p.out_st, p.lse = out.data_ptr(), _st(out), lse.data_ptr()
    rc = lib().attnfast_emu_fwd(ctypes.byref(p))
    assert rc == 0, f"forward launch failed: {rc}"
    return out, lse


def bwd(dout, q, k, v, out, lse, dlse, mask, scale, wl, wr, bottom_right, mask_grad, delta_in=None):
    q, k, v, dout, out = (_aligned(t) for t in (q, k, v, dout, out))
    p = BwdParams()
    p.a = _common(q, k, v, mask, scale, wl, wr, bottom_right)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    nan = float("nan")
    lse = lse.contiguous()
    dlse = None if dlse is None else dlse.contiguous().float()
    delta = torch.full((B, Hq, Lq), nan)
    dq_accum = torch.full((B, Hq, Lq, D), nan)  # the preprocess kernel must zero it
    dq = torch.full((B, Hq, Lq, D), nan, dtype=q.dtype)
    dk = torch.full((B, Hkv, Lk, D), nan, dtype=q.dtype)
    dv = torch.full((B, Hkv, Lk, D), nan, dtype=q.dtype)
    dmask = torch.zeros((B, Hq, Lq, Lk)) if mask_grad else None
    p.out, p.out_st, p.dout, p.dout_st = out.data_ptr(), _st(out), dout.data_ptr(), _st(dout)
    p.lse, p.dlse = lse.data_ptr(), None if dlse is None else dlse.data_ptr()
    p.delta, p.dq_accum = delta.data_ptr(), dq_accum.data_ptr()
    p.dq, p.dk, p.dv = dq.data_ptr(), dk.data_ptr(), dv.data_ptr()
    p.dq_st, p.dk_st, p.dv_st = _st(dq), _st(dk), _st(dv)
    p.dmask = None if dmask is None else dmask.data_ptr()
    delta_in = None if delta_in is None else delta_in.float().contiguous()
    p.delta_in = None if delta_in is None else delta_in.data_ptr()
    rc = lib().attnfast_emu_bwd(ctypes.byref(p))
    assert rc == 0, f"backward launch failed: {rc}"
    return dq, dk, dv, dmask


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, wl, wr, bottom_right):
        out, lse = fwd(q, k, v, mask, scale, wl, wr, bottom_right)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.args = (scale, wl, wr, bottom_right)
        ctx.mask_grad = mask is not None and mask.requires_grad
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        dq, dk, dv, dmask = bwd(dout.to(q.dtype), q, k, v, out, lse, dlse, mask, *ctx.args, ctx.mask_grad)
        if dmask is not None:
            dmask = dmask.to(mask.dtype)
        return dq, dk, dv, dmask, None, None, None, None


def set_schedule(order):
    """Warps run greedily in ascending (0) or descending (1) order."""
    lib().attnfast_emu_schedule(order)


def attention(q, k, v, attn_mask=None, is_causal=False, scale=None, window=None,
              causal_alignment="top_left", enable_gqa=True):
    """attnfast.attention's arguments, run by the emulated CUDA kernels; (out, lse)."""
    from attnfast._validate import prepare

    plan = prepare(q, k, v, attn_mask, 0.0, is_causal, scale, enable_gqa, causal_alignment, window)
    mask = plan.mask
    out, lse = _Attention.apply(plan.q, plan.k, plan.v, mask, plan.scale, plan.window_left, plan.window_right,
                                plan.bottom_right)
    return out.reshape(plan.lead + out.shape[2:]), lse.reshape(plan.lead + lse.shape[2:])


def _packed4(t):
    """A packed (total, H, D) tensor as the (1, H, total, D) view the kernels index (batch stride 0)."""
    return t.as_strided((1, t.shape[1], t.shape[0], t.shape[2]), (0, t.stride(1), t.stride(0), t.stride(2)))


def _varlen_common(q, k, v, cu_q, cu_k, used_k, max_q, max_k, scale, wl, wr, bottom_right):
    """AttnParams of a packed batch, as the binding's varlen ops fill them."""
    a = _common(_packed4(q), _packed4(k), _packed4(v), None, scale, wl, wr, bottom_right)
    a.B, a.Lq, a.Lk = cu_q.numel() - 1, max_q, max_k
    far = max(max_q, max_k) + 1
    a.window_left = -1 if wl < 0 else min(wl, far)
    a.window_right = -1 if wr < 0 else min(wr, far)
    a.diag_offset = 0
    a.cu_q, a.cu_k = cu_q.data_ptr(), cu_k.data_ptr()
    a.used_k = None if used_k is None else used_k.data_ptr()
    a.bottom_right, a.total_q, a.total_k = int(bottom_right), q.shape[0], k.shape[0]
    return a


def varlen_fwd(q, k, v, cu_q, cu_k, used_k, max_q, max_k, scale, wl, wr, bottom_right):
    """(out (total_q, Hq, D), lse (Hq, total_q)) of packed sequences, one emulated launch."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    p = FwdParams()
    p.a = _varlen_common(q, k, v, cu_q, cu_k, used_k, max_q, max_k, scale, wl, wr, bottom_right)
    out = torch.full(q.shape[:2] + (v.shape[2],), float("nan"), dtype=q.dtype)
    lse = torch.full((q.shape[1], q.shape[0]), float("nan"), dtype=torch.float32)
    p.out, p.out_st, p.lse = out.data_ptr(), _st(_packed4(out)), lse.data_ptr()
    if p.a.B and max_q:
        rc = lib().attnfast_emu_fwd(ctypes.byref(p))
        assert rc == 0, f"forward launch failed: {rc}"
    return out, lse


def varlen_bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, used_k, max_q, max_k, scale, wl, wr, bottom_right):
    q, k, v, dout, out = (t.contiguous() for t in (q, k, v, dout, out))
    p = BwdParams()
    p.a = _varlen_common(q, k, v, cu_q, cu_k, used_k, max_q, max_k, scale, wl, wr, bottom_right)
    T, Hq, D = q.shape
    nan = float("nan")
    lse = lse.contiguous()
    dlse = None if dlse is None else dlse.contiguous().float()
    delta = torch.full((Hq, T), nan)
    dq_accum = torch.full((Hq, T, D), nan)  # the preprocess kernel must zero it
    dq = torch.full(q.shape, nan, dtype=q.dtype)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)  # keys past seqused_k get no gradient
    p.out, p.out_st, p.dout, p.dout_st = out.data_ptr(), _st(_packed4(out)), dout.data_ptr(), _st(_packed4(dout))
    p.lse, p.dlse = lse.data_ptr(), None if dlse is None else dlse.data_ptr()
    p.delta, p.dq_accum = delta.data_ptr(), dq_accum.data_ptr()
    p.dq, p.dk, p.dv = dq.data_ptr(), dk.data_ptr(), dv.data_ptr()
    p.dq_st, p.dk_st, p.dv_st = _st(_packed4(dq)), _st(_packed4(dk)), _st(_packed4(dv))
    p.dmask, p.delta_in = None, None
    if p.a.B and max_q and max_k:
        rc = lib().attnfast_emu_bwd(ctypes.byref(p))
        assert rc == 0, f"backward launch failed: {rc}"
    else:
        dq.zero_()
    return dq, dk, dv


class _Varlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, *args):
        out, lse = varlen_fwd(q, k, v, *args)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = args
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = varlen_bwd(dout.to(q.dtype), q, k, v, out, lse, dlse, *ctx.args)
        return (dq, dk, dv) + (None,) * len(ctx.args)


def varlen_attention(q, k, v, cu_q, cu_k, seqused_k=None, is_causal=False, causal_alignment="top_left",
                     window=None, scale=None):
    """attnfast.varlen_attention's arguments, run by the emulated CUDA kernels; (out, lse)."""
    from attnfast.varlen import prepare_varlen

    lens = lambda cu: int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0  # noqa: E731
    plan = prepare_varlen(q, k, v, cu_q, cu_k, lens(cu_q), lens(cu_k), seqused_k, is_causal, causal_alignment,
                          window, scale, 0.0)
    return _Varlen.apply(plan.q, plan.k, plan.v, plan.cu_q, plan.cu_k, plan.seqused_k, plan.max_q, plan.max_k,
                         plan.scale, plan.window_left, plan.window_right, plan.bottom_right)
