"""attnfast.scaled_dot_product_attention agrees with torch's on the same inputs."""
import pytest
import torch
import torch.nn.functional as F

import attnfast
from attnfast.testing import assert_parity, parity


def _agree(args, kwargs, dtype, grads=True):
    """torch SDPA (same dtype) and attnfast vs the float64 torch result, by the parity rule."""
    def clone(t, want):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach().clone()
        return t.requires_grad_() if want and t.is_floating_point() else t

    ours_in = [clone(a, grads) for a in args]
    torch_in = [clone(a, grads) for a in args]
    truth_in = [clone(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a, grads)
                for a in args]
    ours = attnfast.scaled_dot_product_attention(*ours_in, **kwargs)
    theirs = F.scaled_dot_product_attention(*torch_in, **kwargs)
    truth = F.scaled_dot_product_attention(*truth_in, **kwargs)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    finite = torch.isfinite(truth)  # torch gives NaN on fully masked rows; we give 0
    res = [parity("out", ours[finite], theirs[finite], truth[finite])]
    if grads:
        do = torch.randn_like(truth)
        idx = [i for i, a in enumerate(ours_in) if isinstance(a, torch.Tensor) and a.requires_grad]
        g = torch.autograd.grad(ours, [ours_in[i] for i in idx], do.to(dtype))
        tg = torch.autograd.grad(theirs, [torch_in[i] for i in idx], do.to(dtype))
        rg = torch.autograd.grad(truth, [truth_in[i] for i in idx], do)
        for i, a, b, c in zip(idx, g, tg, rg):
            res.append(parity(f"grad{i}", a, b, c))
    assert_parity(res)
    return ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kw", [
    {}, {"is_causal": True}, {"scale": 0.3}, {"is_causal": True, "scale": 0.07},
], ids=["plain", "causal", "scale", "causal-scale"])
def test_plain(kw, dtype):
    q, k, v = torch.randn(2, 3, 37, 24, dtype=dtype), torch.randn(2, 3, 53, 24, dtype=dtype), \
        torch.randn(2, 3, 53, 40, dtype=dtype)
    _agree((q, k, v), kw, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_masks(dtype):
    q, k, v = (torch.randn(2, 4, 29, 16, dtype=dtype) for _ in range(3))
    bool_mask = torch.rand(1, 4, 29, 29) > 0.3
    bool_mask[..., 0] = True  # torch's result is NaN on fully masked rows
    _agree((q, k, v, bool_mask), {}, dtype)
    float_mask = torch.randn(2, 1, 29, 29, dtype=dtype)
    _agree((q, k, v, float_mask), {}, dtype)


def test_gqa():
    q = torch.randn(2, 8, 33, 32)
    k, v = torch.randn(2, 2, 45, 32), torch.randn(2, 2, 45, 32)
    _agree((q, k, v), {"enable_gqa": True}, torch.float32)


@pytest.mark.parametrize("shape", [(7, 16), (3, 7, 16), (2, 3, 7, 16), (2, 2, 3, 7, 16)],
                         ids=["2d", "3d", "4d", "5d"])
def test_any_number_of_batch_dims(shape):
    q, k, v = (torch.randn(shape) for _ in range(3))
    out = _agree((q, k, v), {"is_causal": True}, torch.float32)
    assert out.shape == shape


def test_causal_bias():
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    q = torch.randn(1, 2, 19, 16)
    k, v = torch.randn(1, 2, 31, 16), torch.randn(1, 2, 31, 16)
    for bias in (causal_upper_left(19, 31), causal_lower_right(19, 31)):
        ours = attnfast.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        torch.testing.assert_close(ours, theirs)


def test_is_causal_with_mask_is_the_and_of_both():
    q, k, v = (torch.randn(1, 2, 23, 16) for _ in range(3))
    m = torch.rand(23, 23) > 0.4
    m.fill_diagonal_(True)
    ours = attnfast.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m & torch.ones(23, 23, dtype=torch.bool).tril())
    torch.testing.assert_close(ours, ref)


def test_fully_masked_rows_give_zero_not_nan():
    q, k, v = (torch.randn(1, 1, 5, 8) for _ in range(3))
    m = torch.ones(5, 5, dtype=torch.bool)
    m[2] = False
    out = attnfast.scaled_dot_product_attention(q, k, v, attn_mask=m)
    assert torch.equal(out[0, 0, 2], torch.zeros(8))
    assert torch.isfinite(out).all()
