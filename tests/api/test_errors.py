"""Bad input raises a clear Python error naming the argument, before any kernel runs."""
import math

import pytest
import torch

import attnfast


def qkv(B=2, H=4, L=8, S=8, E=16, Ev=16, Hkv=None, dtype=torch.float32):
    Hkv = Hkv or H
    return (torch.randn(B, H, L, E, dtype=dtype), torch.randn(B, Hkv, S, E, dtype=dtype),
            torch.randn(B, Hkv, S, Ev, dtype=dtype))


@pytest.fixture(params=["sdpa", "attention"])
def fn(request):
    if request.param == "sdpa":
        return attnfast.scaled_dot_product_attention
    return attnfast.attention


def _raises(exc, pattern, f, *args, **kwargs):
    with pytest.raises(exc, match=pattern):
        f(*args, **kwargs)


def test_wrong_rank(fn):
    q, k, v = qkv()
    _raises(ValueError, "query must have shape", fn, torch.randn(16), k, v)


def test_leading_dims_broadcast_as_torchs(fn):
    # torch's SDPA broadcasts the leading dims of query, key and value together (3-D with 4-D,
    # a batch or head count of 1); attnfast gives the same outputs, without copying k and v.
    q, k, v = qkv()
    F = torch.nn.functional.scaled_dot_product_attention
    for args in ((q, k[0], v[0]), (q, k[:1], v[:1]), (q[:1], k, v), (q, k[:, :1], v[:, :1]), (q, k, v[:1]),
                 (q[None], k[None].expand(3, 2, 4, 8, 16), v[None]), (q[0, 0], k, v)):
        want = F(*args)
        got = fn(*args)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mismatched_sizes(fn):
    q, k, v = qkv()
    _raises(ValueError, "value length must equal key length 8", fn, q, k, v[:, :, :5])
    _raises(ValueError, "key head dim must equal query head dim 16", fn, q, k[..., :8], v)
    _raises(ValueError, r"leading dims of query \(2, 4, 8, 16\), key \(2, 4, 8, 16\) and value \(2, 2, 8, 16\) do "
            "not broadcast", fn, q, k, v[:, :2])
    _raises(ValueError, "do not broadcast", fn, q, k[:, :, :, :][:1].expand(3, 4, 8, 16), v)


def test_gqa_rules(fn):
    q, k, v = qkv(H=6, Hkv=4)
    _raises(ValueError, r"query heads \(6\) to be a multiple of key heads \(4\)", fn, q, k, v,
            enable_gqa=True)
    q, k, v = qkv(H=4, Hkv=2)
    _raises(ValueError, "key has 2 heads but query has 4.*enable_gqa=True", fn, q, k, v)


def test_mask_that_does_not_broadcast(fn):
    q, k, v = qkv(L=8, S=10)
    _raises(ValueError, r"attn_mask of shape \(8, 8\) does not broadcast to .*\(2, 4, 8, 10\)", fn, q, k, v,
            attn_mask=torch.ones(8, 8, dtype=torch.bool))
    _raises(ValueError, "does not broadcast", fn, q, k, v, attn_mask=torch.ones(3, 4, 8, 10, dtype=torch.bool))


def test_integer_mask(fn):
    q, k, v = qkv()
    _raises(TypeError, "attn_mask must be bool or floating point, got torch.int64", fn, q, k, v,
            attn_mask=torch.ones(8, 8, dtype=torch.int64))


def test_mixed_devices(fn):
    q, k, v = qkv()
    _raises(ValueError, "key is on meta but query is on cpu", fn, q, k.to("meta"), v)
    _raises(ValueError, "attn_mask is on meta but query is on cpu", fn, q, k, v,
            attn_mask=torch.ones(8, 8, dtype=torch.bool, device="meta"))


def test_mixed_dtypes(fn):
    q, k, v = qkv()
    _raises(TypeError, "value dtype torch.float64 must match query dtype torch.float32", fn, q, k, v.double())
    _raises(TypeError, "query must be float16, bfloat16, float32 or float64, got torch.int32", fn,
            q.int(), k.int(), v.int())


def test_unknown_alignment():
    q, k, v = qkv()
    _raises(ValueError, "causal_alignment must be one of .*'top_left', 'bottom_right'.*got 'bottom'",
            attnfast.attention, q, k, v, is_causal=True, causal_alignment="bottom")


@pytest.mark.parametrize("window", [(3,), (1, 2, 3), (-2, 0), (1.5, 0), "left", (0, -7)])
def test_bad_window(window):
    q, k, v = qkv()
    _raises(ValueError, "window", attnfast.attention, q, k, v, window=window)


@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan])
def test_scale_not_finite(fn, scale):
    q, k, v = qkv()
    _raises(ValueError, "scale must be finite", fn, q, k, v, scale=scale)


def test_scale_wrong_type(fn):
    q, k, v = qkv()
    _raises(TypeError, "scale must be a float or None", fn, q, k, v, scale="0.5")


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_bad_dropout(fn, p):
    q, k, v = qkv()
    _raises(ValueError, r"dropout_p must be in \[0, 1\)", fn, q, k, v, dropout_p=p)


def test_not_a_tensor(fn):
    q, k, v = qkv()
    _raises(TypeError, "key must be a torch.Tensor, got list", fn, q, [1, 2], v)
    _raises(TypeError, "attn_mask must be a torch.Tensor, a CausalBias or None, got str", fn, q, k, v,
            attn_mask="causal")


def test_backend_override_errors(monkeypatch):
    q, k, v = qkv()
    _raises(ValueError, "backend must be one of", attnfast.attention, q, k, v, backend="tpu")
    _raises(attnfast.BackendUnavailableError, "backend='triton' cannot serve this call",
            attnfast.attention, q.double(), k.double(), v.double(), backend="triton")
    monkeypatch.setenv("ATTNFAST_BACKEND", "cuda")
    _raises(attnfast.BackendUnavailableError, "ATTNFAST_BACKEND='cuda' cannot serve this call",
            attnfast.attention, q, k, v)


def test_errors_come_before_any_kernel(monkeypatch):
    """Validation runs before the op: a poisoned op is never reached on bad input."""
    import attnfast.api as api

    called = []
    monkeypatch.setattr(api.dispatch, "choose", lambda *a, **k: called.append(1))
    q, k, v = qkv()
    with pytest.raises(ValueError):
        attnfast.attention(q, k, v[:, :, :3])
    assert not called


def test_errors_are_also_runtime_errors_as_torchs(fn):
    # torch's SDPA raises RuntimeError for a 1-D input and for mixed dtypes; code written for
    # it catches that, and code written for attnfast catches ValueError / TypeError: both work.
    q, k, v = qkv()
    for bad, kind in (((torch.randn(16), k, v), ValueError), ((q, k, v.double()), TypeError),
                      ((q, k, v[:, :2]), ValueError)):
        with pytest.raises(RuntimeError) as info:
            fn(*bad)
        assert isinstance(info.value, kind) and isinstance(info.value, attnfast.ArgumentError if kind is ValueError
                                                           else attnfast.ArgumentTypeError)
        with pytest.raises(RuntimeError):
            torch.nn.functional.scaled_dot_product_attention(*bad)


def test_causal_bias_with_is_causal_raises_as_torch(fn):
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    q, k, v = qkv(L=4, S=6)
    for bias in (causal_upper_left(4, 6), causal_lower_right(4, 6)):
        with pytest.raises(ValueError, match="CausalBias should not be used with causal=True") as torch_info:
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True)
        _raises(ValueError, str(torch_info.value), fn, q, k, v, attn_mask=bias, is_causal=True)
        fn(q, k, v, attn_mask=bias)  # without is_causal: served

