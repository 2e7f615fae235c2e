"""Public API surface: backends(), dispatch and overrides, info, reference backend."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import attnfast
from attnfast import dispatch


def test_backends_lists_every_backend_with_a_reason():
    b = attnfast.backends()
    assert set(b) == {"cpu", "triton", "cuda", "reference"}
    for name, st in b.items():
        assert isinstance(st.available, bool) and st.reason
    assert b["reference"].available
    if not torch.cuda.is_available():
        assert not b["cuda"].available
        interp = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
        assert b["triton"].available == interp


def test_dispatch_prefers_cpu_kernel_on_cpu():
    from attnfast._validate import prepare

    plan = prepare(*(torch.randn(1, 2, 8, 16) for _ in range(3)))
    expected = "cpu" if attnfast.backends()["cpu"].available else "reference"
    assert dispatch.choose(plan).name == expected
    assert dispatch.choose(plan, "reference").name == "reference"


def _plan_fields(plan):
    return (plan.q, plan.k, plan.v, plan.mask, plan.scale, plan.window_left, plan.window_right, plan.bottom_right,
            plan.dropout_p, plan.lead)


def test_prepare_fast_path_gives_the_general_plan_and_refuses_what_it_refuses():
    """prepare's fast path (_plain_plan) may only return the Plan the general checks
    give, and must decline every call the general checks reject."""
    import itertools

    from attnfast import _validate

    shapes = [((1, 4, 5, 8), (1, 4, 7, 8), (1, 4, 7, 6)), ((2, 4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8)),
              ((1, 3, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8)), ((1, 4, 5, 8), (1, 4, 7, 9), (1, 4, 7, 8)),
              ((1, 4, 5, 8), (1, 4, 7, 8), (1, 4, 6, 8)), ((1, 4, 5, 8), (2, 4, 7, 8), (2, 4, 7, 8)),
              ((1, 4, 5, 0), (1, 4, 7, 0), (1, 4, 7, 3)), ((4, 5, 8), (4, 7, 8), (4, 7, 8)),
              ((1, 0, 5, 8), (1, 0, 7, 8), (1, 0, 7, 8))]
    variants = itertools.product(
        shapes, (torch.float32, torch.float64, torch.int32), (None, torch.float16), (False, True, 1),
        (None, 0.3, 2, float("inf"), float("nan")), (0.0, 0, 0.5, 1.0, True), ("top_left", "bottom_right", "x"),
        (False, True))
    fast_hits = 0
    for (sq, sk, sv), dtype, v_dtype, causal, scale, p, align, gqa in variants:
        q, k = torch.zeros(sq, dtype=dtype), torch.zeros(sk, dtype=dtype)
        v = torch.zeros(sv, dtype=v_dtype or dtype)
        args = (q, k, v, None, p, causal, scale, gqa, align, None)
        fast = _validate._plain_plan(*args)
        try:
            general = _validate._prepare_general(*args)
        except (TypeError, ValueError):
            assert fast is None, args
            continue
        if fast is not None:
            fast_hits += 1
            a, b = _plan_fields(fast), _plan_fields(general)
            assert all(x is y for x, y in zip(a[:3], b[:3])) and a[3:] == b[3:], args
            assert type(fast.dropout_p) is float and type(fast.scale) is float
    assert fast_hits > 100


def test_env_override(monkeypatch):
    from attnfast._validate import prepare

    plan = prepare(*(torch.randn(1, 2, 8, 16) for _ in range(3)))
    monkeypatch.setenv("ATTNFAST_BACKEND", "reference")
    assert dispatch.choose(plan).name == "reference"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_and_reference_backends_agree(dtype):
    q, k, v = (torch.randn(2, 3, 33, 16, dtype=dtype) for _ in range(3))
    m = torch.rand(33, 33) > 0.2
    a, la = attnfast.attention(q, k, v, attn_mask=m, is_causal=True, return_lse=True, backend="cpu")
    b, lb = attnfast.attention(q, k, v, attn_mask=m, is_causal=True, return_lse=True, backend="reference")
    assert la.dtype == lb.dtype == torch.float32 and la.shape == (2, 3, 33)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    torch.testing.assert_close(la, lb, atol=tol, rtol=tol)


def test_reference_backend_dropout_uses_the_same_rng():
    q, k, v = (torch.randn(1, 2, 17, 16) for _ in range(3))
    torch.manual_seed(3)
    a = attnfast.attention(q, k, v, dropout_p=0.4, backend="cpu")
    torch.manual_seed(3)
    b = attnfast.attention(q, k, v, dropout_p=0.4, backend="reference")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lse_shape_with_leading_dims():
    q, k, v = (torch.randn(2, 3, 4, 9, 16) for _ in range(3))
    out, lse = attnfast.attention(q, k, v, return_lse=True)
    assert out.shape == (2, 3, 4, 9, 16) and lse.shape == (2, 3, 4, 9)


def test_zero_length_keys_give_zeros():
    q = torch.randn(1, 2, 5, 8)
    k = v = torch.randn(1, 2, 0, 8)
    out, lse = attnfast.attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_info_cli():
    r = subprocess.run([sys.executable, "-m", "attnfast", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for word in ("attnfast", "torch", "triton", "cpu ISA", "backends", "reference"):
        assert word in r.stdout
