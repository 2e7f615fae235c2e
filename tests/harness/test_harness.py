"""attnfast.testing.check_attention: it passes torch's SDPA and attnfast's backends, and it
catches planted bugs, each in the cases that expose it (and names them with their numbers)."""
import math

import pytest
import torch

import attnfast
from attnfast.testing import Case, ParityFailure, check_attention, default_cases, dropout_mask, sweep

F = torch.nn.functional


def attnfast_dropout(seed, p, shape, device):
    """The dropout mask attnfast draws right after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return dropout_mask(shape, p, device=device)


def failing(report):
    return {(r.case.name, str(r.dtype).replace("torch.", "")) for r in report.failures}


def test_torch_sdpa_passes():
    report = check_attention(F.scaled_dot_product_attention, devices=["cpu"])
    assert report.passed, report
    assert len(report.results) == 3 * len(default_cases())
    assert {r.skipped for r in report.results} == {None, "dropout needs a dropout_mask hook"}


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_attnfast_backends_pass(backend):
    if not attnfast.backends()[backend].available:
        pytest.skip(f"{backend} backend unavailable")

    def fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return attnfast.attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                  scale=scale, enable_gqa=enable_gqa, backend=backend)

    dtypes = [torch.float32, torch.bfloat16] if backend == "triton" else None  # the interpreter is slow
    report = check_attention(fn, devices=["cpu"] if backend != "triton" else None, dtypes=dtypes,
                             dropout_mask=attnfast_dropout)
    assert report.passed, report
    assert not any(r.skipped for r in report.results)  # dropout included


def test_flash_signature_on_attnfast():
    # FlashAttention's flash_attn_func: (B, L, H, E), causal bottom-right, window_size.
    def flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1)):
        out = attnfast.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                                 scale=softmax_scale, is_causal=causal, causal_alignment="bottom_right",
                                 window=window_size, enable_gqa=True)
        return out.transpose(1, 2)

    report = check_attention(flash, signature="flash", devices=["cpu"], dropout_mask=attnfast_dropout)
    assert report.passed, report
    ran = {r.case.name for r in report.results if r.skipped is None}
    assert {"causal_bottom_right", "sliding_window", "gqa", "dropout"} <= ran
    assert "bool_mask_broadcast" not in ran  # flash_attn_func takes no mask


# ---------------------------------------------------------------------------
# Planted bugs: each must fail, in the cases that expose it.
# ---------------------------------------------------------------------------
def naive(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *, p_dtype=None,
          nan_rows=False, repeat=None):
    """SDPA by the book in float32 (the planted bugs are switches of it)."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k = (repeat or (lambda t, r: t.repeat_interleave(r, dim=-3)))(k, rep)
        v = v.repeat_interleave(rep, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * q.float() @ k.float().transpose(-1, -2)
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.float()
    p = torch.softmax(s, -1)
    if not nan_rows:
        p = p.nan_to_num(0.0)
    if p_dtype is not None:
        p = p.to(p_dtype).float()
    return (p @ v.float()).to(q.dtype)


def test_the_unplanted_naive_kernel_passes():
    report = check_attention(naive, devices=["cpu"])
    assert report.passed, report


def test_p_rounded_to_bf16_early_is_caught():
    report = check_attention(lambda *a, **kw: naive(*a, **kw, p_dtype=torch.bfloat16), devices=["cpu"])
    bad = failing(report)
    # float32: P's 8 bits show (relative 4e-3 against a baseline of 1e-7); bfloat16 rounds P so
    # anyway; float16's own baseline (1e-3) hides a bfloat16 P in most cases
    assert ("bfloat16" not in {dt for _, dt in bad}) and ("plain", "float32") in bad
    assert len([1 for _, dt in bad if dt == "float32"]) >= len(default_cases()) - 3


def test_mask_ignored_on_the_last_tile_is_caught():
    def last_tile_unmasked(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:  # key tiles of 16: the last one reads no mask
            last = (k.shape[-2] - 1) // 16 * 16
            attn_mask = attn_mask.clone()
            attn_mask[..., last:] = True if attn_mask.dtype == torch.bool else 0.0
        return naive(q, k, v, attn_mask, **kw)

    bad = {name for name, _ in failing(check_attention(last_tile_unmasked, devices=["cpu"]))}
    assert {"bool_mask_broadcast", "key_padding", "float_mask_per_head"} <= bad
    assert bad <= {"bool_mask_broadcast", "key_padding", "float_mask_per_head", "fully_masked_rows",
                   "causal_bottom_right", "sliding_window"}  # (the last two: their band is a mask)


def test_wrong_scale_is_caught():
    def ignores_scale(q, k, v, scale=None, **kw):
        return naive(q, k, v, **kw)

    assert {name for name, _ in failing(check_attention(ignores_scale, devices=["cpu"]))} == {"explicit_scale"}


def test_nan_for_fully_masked_rows_is_caught():
    report = check_attention(lambda *a, **kw: naive(*a, **kw, nan_rows=True), devices=["cpu"])
    assert {name for name, _ in failing(report)} == {"fully_masked_rows"}
    (r,) = [r for r in report.failures if r.dtype == torch.float32]
    assert r.worst.err == math.inf  # NaN where the truth is 0


class _FirstOfGroup(torch.autograd.Function):
    """k repeated to the query heads, whose backward keeps the gradient of each group's first
    head only (the right one sums over the group)."""

    @staticmethod
    def forward(ctx, k, rep):
        ctx.rep = rep
        return k.repeat_interleave(rep, dim=-3)

    @staticmethod
    def backward(ctx, g):
        return g[..., ::ctx.rep, :, :], None


def test_gqa_dk_off_is_caught():
    report = check_attention(lambda *a, **kw: naive(*a, **kw, repeat=_FirstOfGroup.apply), devices=["cpu"])
    assert failing(report) == {(name, dt) for name in ("gqa", "mqa") for dt in ("float32", "bfloat16", "float16")}
    assert {r.worst.name for r in report.failures} == {"dk"}


class _ScaleGrad(torch.autograd.Function):
    """The identity, whose backward scales the gradient by 0.9."""

    @staticmethod
    def forward(ctx, k):
        return k.view_as(k)

    @staticmethod
    def backward(ctx, g):
        return 0.9 * g


def test_a_gradient_ten_percent_off_is_caught_in_every_dtype():
    report = check_attention(lambda q, k, v, **kw: naive(q, _ScaleGrad.apply(k), v, **kw), devices=["cpu"])
    bad = failing(report)
    # every case where dk is not 0 (one key: dk = 0 exactly), in every dtype
    want = {(c.name, dt) for c in default_cases() if c.name not in ("single_key", "dropout")
            for dt in ("float32", "bfloat16", "float16")}
    assert bad == want
    assert {r.worst.name for r in report.failures} == {"dk"}


# ---------------------------------------------------------------------------
# The report and the runs
# ---------------------------------------------------------------------------
def test_report_names_the_failures_with_their_numbers():
    report = check_attention(lambda *a, **kw: naive(*a, **kw, nan_rows=True), devices=["cpu"],
                             dtypes=[torch.float32], cases=[Case("fully_masked_rows", mask="dead_rows"), Case("plain")])
    assert not report.passed and [r.case.name for r in report.failures] == ["fully_masked_rows"]
    table = report.table()
    assert "fully_masked_rows-float32-cpu" in table and "FAIL" in table and "plain-float32-cpu" in table
    assert "2 runs, 1 failed; worst: fully_masked_rows-float32-cpu" in table
    with pytest.raises(ParityFailure, match=r"fully_masked_rows-float32-cpu: out: err inf"):
        sweep(cases=[Case("fully_masked_rows", mask="dead_rows")], dtypes=[torch.float32],
              devices=["cpu"])[0].check(lambda *a, **kw: naive(*a, **kw, nan_rows=True))


def test_a_raising_kernel_fails_its_case_and_not_implemented_skips_it():
    def picky(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:
            raise NotImplementedError("no masks")
        if q.shape[-1] != 32:
            raise RuntimeError("head dim 32 only")
        return naive(q, k, v, **kw)

    report = check_attention(picky, devices=["cpu"], dtypes=[torch.float32])
    skipped = {r.case.name for r in report.results if r.skipped}
    assert {"bool_mask_broadcast", "key_padding", "fully_masked_rows", "dropout"} <= skipped
    assert {r.case.name for r in report.failures} == {"odd_head_dim"}
    assert "RuntimeError: head dim 32 only" in report.table()


def test_a_kernel_that_skips_every_case_does_not_pass():
    def nothing(*args, **kwargs):
        raise NotImplementedError("not yet")

    report = check_attention(nothing, devices=["cpu"], dtypes=[torch.float32])
    assert not report.passed and not report.failures  # nothing failed, and nothing was tested


def test_sweep_checks_its_arguments():
    with pytest.raises(ValueError, match="signature must be one of"):
        check_attention(naive, signature="xformers")
    with pytest.raises(TypeError, match="cases must hold attnfast.testing.Case"):
        check_attention(naive, cases=["plain"])
