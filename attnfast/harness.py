"""Test any attention function against attnfast's float64 oracle, by the parity rule.

    from attnfast.testing import check_attention
    report = check_attention(my_attention)            # signature="sdpa": F.scaled_dot_product_attention's
    assert report.passed, report                      # the table names each failing case and its numbers

`check_attention` runs a sweep of awkward cases (`default_cases()`): odd head dims, a value
head dim that differs, Lq != Lk, GQA and MQA, broadcast bool and float masks, key padding,
fully masked rows, non-contiguous inputs, sliding windows, causal in both alignments, an
explicit scale, a single key, and dropout through a mask hook.  For each case and dtype it
calls the function, differentiates it, and checks the output and dq, dk, dv by the parity
rule (attnfast.testing: error against the float64 truth at most twice the error of the naive
reference computed in the same precision, plus two ulps of the largest value; a gradient's
floor adds two float32 ulps of sqrt(n) times the scale of the terms it sums, n the longest
reduction: _grad_scales).

Signatures: "sdpa" calls fn(q, k, v, attn_mask=..., dropout_p=..., is_causal=..., scale=...,
enable_gqa=...) on (B, H, L, E) tensors; "flash" calls fn(q, k, v, dropout_p=...,
softmax_scale=..., causal=..., window_size=(left, right)) on (B, L, H, E) tensors, causal
aligned bottom-right (FlashAttention's flash_attn_func).  Only the keywords a case needs are
passed.  A function that raises NotImplementedError skips the case.

Dropout cases run only with a `dropout_mask` hook: hook(seed, dropout_p, shape, device)
returns the keep mask (bool, or the 0 / 1/(1-p) multipliers) of shape (B, Hq, Lq, Lk) that fn
draws when it is called right after torch.manual_seed(seed).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .reference import _apply_mask, _prepare_qkv, attention_ref, visible_mask
from .testing import FLOOR_ULPS, ParityFailure, ParityResult, parity

SIGNATURES = ("sdpa", "flash")


@dataclass(frozen=True)
class Case:
    """One problem of the sweep.  mask: None or one of MASKS (built per case, seeded);
    causal with `alignment` ("top_left": torch's is_causal; "bottom_right": FlashAttention's);
    window (left, right) around that diagonal (-1: unbounded); strided: non-contiguous inputs."""
    name: str
    B: int = 2
    Hq: int = 4
    Hkv: int = 4
    Lq: int = 16
    Lk: int = 16
    E: int = 32
    Ev: Optional[int] = None
    mask: Optional[str] = None
    causal: bool = False
    alignment: str = "top_left"
    window: Optional[tuple] = None
    scale: Optional[float] = None
    dropout_p: float = 0.0
    strided: bool = False

    @property
    def head_dim_v(self):
        return self.E if self.Ev is None else self.Ev

    def serves(self, signature):
        """Whether the signature can express this case."""
        if signature == "sdpa":  # bottom-right causal and windows go in as bool masks
            return True
        # flash_attn_func: no mask argument; its causal and windows are aligned bottom-right
        banded = self.causal or self.window is not None
        return self.mask is None and (not banded or self.alignment == "bottom_right" or self.Lq == self.Lk)


# Masks a case may carry: how each is built (bool: True = the key takes part; float: added).
MASKS = {
    "bool": "bool (Lq, Lk), broadcast over batch and heads, ~30% of keys hidden",
    "float": "float (1, Hq, Lq, Lk), a random additive bias, broadcast over batch",
    "key_padding": "float (B, 1, 1, Lk), 0 or -inf: the last keys of each batch entry padded",
    "dead_rows": "bool (B, 1, Lq, Lk) with some rows hiding every key (output 0, gradients 0)",
}


def default_cases():
    """The sweep of awkward cases check_attention runs by default."""
    C = Case
    return [
        C("plain"),
        C("odd_head_dim", E=24, Lq=13, Lk=13),
        C("value_head_dim_differs", E=32, Ev=48),
        C("lq_ne_lk", Lq=7, Lk=37),
        C("gqa", Hq=8, Hkv=2, Lq=12, Lk=20),
        C("mqa", Hq=4, Hkv=1, Lq=9, Lk=33),
        C("bool_mask_broadcast", Lq=11, Lk=67, mask="bool"),
        C("float_mask_per_head", Lq=12, Lk=40, mask="float"),
        C("key_padding", Lq=10, Lk=50, mask="key_padding"),
        C("fully_masked_rows", Lq=12, Lk=24, mask="dead_rows"),
        C("strided_inputs", Lq=15, Lk=21, strided=True),
        C("causal_top_left", Lq=12, Lk=30, causal=True),
        C("causal_bottom_right", Lq=12, Lk=30, causal=True, alignment="bottom_right"),
        C("causal_square", Lq=33, Lk=33, causal=True),
        C("sliding_window", Lq=40, Lk=40, window=(8, 0), alignment="bottom_right"),
        C("explicit_scale", Lq=10, Lk=18, scale=0.3),
        C("single_key", Lq=6, Lk=1),
        C("dropout", Lq=16, Lk=24, dropout_p=0.3),
    ]


@dataclass
class CaseResult:
    """One case at one dtype and device: its checks (ParityResult per output and gradient), or the
    error fn raised, or the reason it was skipped."""
    case: Case
    dtype: torch.dtype
    device: str
    signature: str
    checks: list = field(default_factory=list)
    error: Optional[str] = None
    skipped: Optional[str] = None

    @property
    def id(self):
        return _run_id(self.case, self.dtype, self.device)

    @property
    def passed(self):
        return self.skipped is not None or (self.error is None and all(c.ok for c in self.checks))

    @property
    def worst(self):
        """The check with the largest err / tol (None without checks)."""
        return max(self.checks, key=_ratio, default=None)

    def describe(self):
        if self.skipped is not None:
            return f"{self.id}: skipped ({self.skipped})"
        if self.error is not None:
            return f"{self.id}: FAIL, raised {self.error}"
        return f"{self.id}: " + "; ".join(map(repr, self.checks))


def _run_id(case, dtype, device):
    return f"{case.name}-{str(dtype).replace('torch.', '')}-{device}"


def _ratio(check):
    if check.tol > 0:
        return check.err / check.tol
    return 0.0 if check.err == 0 else math.inf


@dataclass
class Report:
    """What check_attention found: `passed`, the `failures` (CaseResults), every result, and
    `table()`: each case's worst check with its error, the same-precision baseline's error, their
    ratio and the tolerance."""
    results: list

    @property
    def passed(self):
        """Every case that ran passed, and at least one ran (a function that skips them all has
        not been tested)."""
        return all(r.passed for r in self.results) and any(r.skipped is None for r in self.results)

    @property
    def failures(self):
        return [r for r in self.results if not r.passed]

    @property
    def worst(self):
        """The checked case whose worst check has the largest err / tol."""
        ran = [r for r in self.results if r.checks]
        return max(ran, key=lambda r: _ratio(r.worst), default=None)

    def table(self):
        head = f"{'case':<44} {'check':<6} {'error':>10} {'baseline':>10} {'ratio':>7} {'tol':>10}  result"
        lines = [head, "-" * len(head)]
        for r in self.results:
            if r.skipped is not None or r.error is not None:
                what = "skipped: " + r.skipped if r.skipped is not None else "FAIL: raised " + r.error
                lines.append(f"{r.id:<44} {what}")
                continue
            w = r.worst
            ratio = w.err / w.ref_err if w.ref_err > 0 else (0.0 if w.err == 0 else math.inf)
            lines.append(f"{r.id:<44} {w.name:<6} {w.err:>10.3g} {w.ref_err:>10.3g} {ratio:>7.2f} {w.tol:>10.3g}  "
                         + ("ok" if r.passed else "FAIL"))
        worst = self.worst
        n_fail = len(self.failures)
        lines.append(f"{len(self.results)} runs, {n_fail} failed"
                     + (f"; worst: {worst.id} {worst.worst!r}" if worst is not None else ""))
        return "\n".join(lines)

    def __str__(self):
        return self.table()


def _seed_of(case, dtype, seed):
    return (zlib.crc32(f"{case.name}/{dtype}".encode()) + 7919 * seed) % (2**31)


def _mask(case, g, device):
    """The case's attn_mask (before any causal/window rule), or None."""
    B, H, Lq, Lk = case.B, case.Hq, case.Lq, case.Lk
    if case.mask is None:
        return None
    if case.mask == "bool":
        m = torch.rand(Lq, Lk, generator=g) > 0.3
        m[:, 0] = True  # no row without keys here (dead_rows tests those)
    elif case.mask == "float":
        m = torch.randn(1, H, Lq, Lk, generator=g, dtype=torch.float64)
    elif case.mask == "key_padding":
        lens = torch.randint(Lk // 2, Lk + 1, (B,), generator=g)
        m = torch.zeros(B, 1, 1, Lk, dtype=torch.float64)
        for b, n in enumerate(lens.tolist()):
            m[b, ..., n:] = float("-inf")
    elif case.mask == "dead_rows":
        m = torch.rand(B, 1, Lq, Lk, generator=g) > 0.4
        m[:, :, ::3] = False  # every third row hides every key
    else:
        raise ValueError(f"unknown mask {case.mask!r}; known: {sorted(MASKS)}")
    return m.to(device)


def _band(case, device):
    """The causal / window rule as a bool (Lq, Lk) mask, or None when every key is visible."""
    return visible_mask(case.Lq, case.Lk, is_causal=case.causal, causal_alignment=case.alignment,
                        window=case.window, device=device)


def _inputs(case, dtype, device, g):
    """q (B, Hq, Lq, E), k, v (B, Hkv, Lk, .): drawn in float64 and rounded to dtype; strided: views
    of (B, L, H, E) tensors (non-contiguous)."""
    shapes = ((case.B, case.Hq, case.Lq, case.E), (case.B, case.Hkv, case.Lk, case.E),
              (case.B, case.Hkv, case.Lk, case.head_dim_v))
    out = []
    for s in shapes:
        t = torch.randn(s[0], s[2], s[1], s[3], generator=g, dtype=torch.float64).to(dtype).to(device)
        out.append(t.transpose(1, 2) if case.strided else t.transpose(1, 2).contiguous())
    return out


def _call(fn, signature, case, q, k, v, attn_mask, seed):
    """fn on the case's arguments in its signature's layout; out as (B, Hq, Lq, Ev)."""
    torch.manual_seed(seed)
    if signature == "sdpa":
        kw = {}
        band = _band(case, q.device) if case.alignment == "bottom_right" or case.window is not None else None
        if band is not None:  # bottom-right causal and windows as a bool mask
            attn_mask = band if attn_mask is None else _and_mask(attn_mask, band)
        elif case.causal:
            kw["is_causal"] = True
        if attn_mask is not None:
            kw["attn_mask"] = attn_mask
        if case.dropout_p:
            kw["dropout_p"] = case.dropout_p
        if case.scale is not None:
            kw["scale"] = case.scale
        if case.Hq != case.Hkv:
            kw["enable_gqa"] = True
        out = fn(q, k, v, **kw)
    elif signature == "flash":
        kw = {}
        if case.causal:
            kw["causal"] = True
        if case.window is not None:
            kw["window_size"] = tuple(case.window)
        if case.dropout_p:
            kw["dropout_p"] = case.dropout_p
        if case.scale is not None:
            kw["softmax_scale"] = case.scale
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)
    else:
        raise ValueError(f"signature must be one of {SIGNATURES}, got {signature!r}")
    if isinstance(out, (tuple, list)):  # (out, lse, ...)
        out = out[0]
    return out.transpose(1, 2) if signature == "flash" else out


def _and_mask(mask, band):
    if mask.dtype == torch.bool:
        return mask & band
    return mask.masked_fill(~band, float("-inf"))


def _grad_scales(case, q, k, v, attn_mask, dropout, dout):
    """The rounding scale of each gradient (dq, dk, dv): the same products as the backward with
    every term's magnitude, |scale| |dS| |K| for dq, |scale| |dS|^T |Q| for dk, (P Z)^T |dO| for
    dv, where |dS| = P (|dP| + |delta|), |dP| = |dO| |V|^T (Z: the dropout multipliers), and
    delta = rowsum(P dP).  A gradient that is exactly 0 by cancellation (one visible key:
    dS = P (dP - delta) = 0) is rounding-level at that scale in a kernel that forms delta
    otherwise, as rowsum(dO * O) (FlashAttention-2 and torch's kernels do), and a kernel that
    sums the terms in another order (blocks, GQA groups) rounds each sum to about sqrt(n) ulps
    of that scale; the rule's floor adds two float32 ulps (the kernels' accumulators) of sqrt(n)
    times the scale.  Bugs are errors of the terms themselves (a wrong scale, a hidden key, P
    rounded early, a GQA group's gradient lost: relative errors of 1e-3 and more), far above."""
    rep = case.Hq // case.Hkv
    q, k, v, scale = _prepare_qkv(q.detach(), k.detach(), v.detach(), case.scale, rep > 1, upcast=True)
    dout = dout.detach().double()
    s = _apply_mask(scale * q @ k.transpose(-1, -2), attn_mask, _band(case, q.device))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # rows with no visible key: 0
    pz = p if dropout is None else p * dropout.double()
    dp = dout.abs() @ v.abs().transpose(-1, -2)
    if dropout is not None:
        dp = dp * dropout.double()
    delta = (p * dp).sum(-1, keepdim=True)
    ds = p * (dp + delta)
    dq = abs(scale) * ds @ k.abs()
    dk = abs(scale) * ds.transpose(-1, -2) @ q.abs()
    dv = pz.transpose(-1, -2) @ dout.abs()
    group = lambda t: t.unflatten(1, (case.Hkv, rep)).sum(2)  # noqa: E731 - GQA: a key head's group
    # A sum of n terms rounds to about sqrt(n) ulps of its terms' scale (the float64 rule's noise
    # floor, for the kernel's own sums): n the longest reduction of the backward.
    grow = math.sqrt(max(case.Lq * rep, case.Lk, case.E, case.head_dim_v))
    return {"dq": grow * dq.abs().max().item(), "dk": grow * group(dk).max().item(),
            "dv": grow * group(dv).max().item()}


def _reference(case, q, k, v, attn_mask, dropout, upcast):
    kw = dict(scale=case.scale, enable_gqa=case.Hq != case.Hkv, dropout_mask=dropout, upcast=upcast,
              reorder_ops=not upcast and q.dtype == torch.float64)
    if case.causal or case.window is not None:
        kw.update(is_causal=case.causal, causal_alignment=case.alignment, window=case.window)
    out, _ = attention_ref(q, k, v, attn_mask=attn_mask, **kw)
    return out


def run_case(fn, case, dtype=torch.float32, device="cpu", signature="sdpa", grads=True, seed=0,
             dropout_mask: Optional[Callable] = None) -> CaseResult:
    """Check fn on one case at one dtype and device (see check_attention)."""
    result = CaseResult(case, dtype, str(device), signature)
    if not case.serves(signature):
        result.skipped = f"the {signature} signature cannot express it"
        return result
    if case.dropout_p and dropout_mask is None:
        result.skipped = "dropout needs a dropout_mask hook"
        return result
    s = _seed_of(case, dtype, seed)
    g = torch.Generator().manual_seed(s)
    q, k, v = _inputs(case, dtype, device, g)
    attn_mask = _mask(case, g, device)
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.to(dtype)
    leaves = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    try:
        out = _call(fn, signature, case, *leaves, attn_mask, s)
    except NotImplementedError as e:
        result.skipped = f"fn raised NotImplementedError: {e}"
        return result
    except Exception as e:  # noqa: BLE001 - reported, not raised: the report names the case
        result.error = f"{type(e).__name__}: {e}"
        return result
    want_shape = (case.B, case.Hq, case.Lq, case.head_dim_v)
    if tuple(out.shape) != want_shape or out.dtype != dtype:
        result.error = f"output {tuple(out.shape)} {out.dtype}, expected {want_shape} {dtype}"
        return result
    drop = None
    if case.dropout_p:
        keep = dropout_mask(s, case.dropout_p, (case.B, case.Hq, case.Lq, case.Lk), device)
        drop = keep.to(torch.float64) / (1.0 - case.dropout_p) if keep.dtype == torch.bool else keep.double()
    refs = [[t.detach().clone().requires_grad_(grads) for t in (q, k, v)] for _ in range(2)]
    r_out = _reference(case, *refs[0], attn_mask, None if drop is None else drop.to(dtype), upcast=False)
    t_out = _reference(case, *refs[1], attn_mask, drop, upcast=True)
    n = max(case.Lq, case.Lk, case.E, case.head_dim_v)
    result.checks.append(parity("out", out, r_out, t_out, n))
    if grads:
        dout = torch.randn(want_shape, generator=g, dtype=torch.float64).to(dtype).to(device)
        try:
            got = torch.autograd.grad(out, leaves, dout, allow_unused=True)
        except Exception as e:  # noqa: BLE001
            result.error = f"backward raised {type(e).__name__}: {e}"
            return result
        rg = torch.autograd.grad(r_out, refs[0], dout.to(r_out.dtype))
        tg = torch.autograd.grad(t_out, refs[1], dout.to(t_out.dtype))
        scales = _grad_scales(case, q, k, v, attn_mask, drop, dout)
        eps32 = torch.finfo(torch.float32).eps  # the kernels' sums run in float32
        for name, a, r, t, x in zip(("dq", "dk", "dv"), got, rg, tg, leaves):
            if a is None:
                result.error = f"{name}: the output does not depend on {name[1]} (no gradient)"
                return result
            base = parity(name, a, r, t, n)
            result.checks.append(ParityResult(name, base.err, base.ref_err,
                                              base.tol + FLOOR_ULPS * eps32 * scales[name]))
    return result


def _default_devices():
    return ("cuda",) if torch.cuda.is_available() else ("cpu",)


def sweep(signature="sdpa", dtypes=None, devices=None, cases=None, grads=True, seed=None, dropout_mask=None):
    """The runs check_attention makes: a list of CaseRun, one per (case, dtype, device), for the
    cases the signature can express."""
    dtypes = tuple(dtypes) if dtypes is not None else (torch.float32, torch.bfloat16, torch.float16)
    devices = tuple(devices) if devices is not None else _default_devices()
    cases = list(cases) if cases is not None else default_cases()
    if signature not in SIGNATURES:
        raise ValueError(f"signature must be one of {SIGNATURES}, got {signature!r}")
    for c in cases:
        if not isinstance(c, Case):
            raise TypeError(f"cases must hold attnfast.testing.Case objects, got {type(c).__name__}")
    return [CaseRun(c, dt, str(dev), signature, grads, 0 if seed is None else seed, dropout_mask)
            for c in cases if c.serves(signature) for dt in dtypes for dev in devices]


@dataclass(frozen=True)
class CaseRun:
    """One (case, dtype, device) of a sweep, as the pytest plugin's `attention_case` fixture gives it:
    `run(fn)` returns its CaseResult, `check(fn)` raises ParityFailure (an AssertionError) with the
    numbers when fn breaks the rule, and skips the test where the case does not apply."""
    case: Case
    dtype: torch.dtype
    device: str
    signature: str = "sdpa"
    grads: bool = True
    seed: int = 0
    dropout_mask: Optional[Callable] = None

    @property
    def id(self):
        return _run_id(self.case, self.dtype, self.device)

    def run(self, fn):
        return run_case(fn, self.case, self.dtype, self.device, self.signature, self.grads, self.seed,
                        self.dropout_mask)

    def check(self, fn):
        r = self.run(fn)
        if r.skipped is not None:
            import pytest

            pytest.skip(r.skipped)
        if not r.passed:
            raise ParityFailure(r.describe())
        return r


def check_attention(fn, *, signature="sdpa", dtypes=None, devices=None, cases=None, grads=True, seed=None,
                    dropout_mask=None) -> Report:
    """Run fn over the sweep (default_cases(); dtypes float32, bfloat16, float16; the GPU if there
    is one, else the CPU) and return a Report (`.passed`, `.failures`, `.table()`).  See the
    module's docstring for the signatures and the dropout hook."""
    return Report([r.run(fn) for r in sweep(signature, dtypes, devices, cases, grads, seed, dropout_mask)])


__all__ = ["Case", "CaseResult", "CaseRun", "MASKS", "Report", "ParityResult", "check_attention", "default_cases",
           "run_case", "sweep"]
