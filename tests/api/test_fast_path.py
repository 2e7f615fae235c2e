"""The plain CPU call's C++ path (attnfast._C.plain_sdpa, taken by
attnfast.scaled_dot_product_attention): the same results and gradients as the
general Python path, and None (the Python path decides) for anything else."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

import attnfast
from attnfast import ops

pytestmark = pytest.mark.skipif(ops._C is None or not attnfast.backends()["cpu"].available,
                                reason="cpu backend not built")


def _qkv(dtype, Hq=4, Hkv=4, Lq=9, Lk=13, E=16, Ev=16, grad=False):
    q = torch.randn(2, Hq, Lq, E).to(dtype)
    k = torch.randn(2, Hkv, Lk, E).to(dtype)
    v = torch.randn(2, Hkv, Lk, Ev).to(dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


CALLS = [
    dict(),
    dict(is_causal=True),
    dict(scale=0.3),
    dict(is_causal=True, scale=0.7, enable_gqa=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kw", CALLS, ids=lambda kw: "-".join(kw) or "plain")
def test_fast_path_equals_the_general_path_bitwise(kw, dtype):
    gqa = kw.get("enable_gqa", False)
    q, k, v = _qkv(dtype, Hkv=2 if gqa else 4, Ev=8, grad=dtype != torch.float16)
    direct = ops._C.plain_sdpa(q, k, v, None, 0.0, kw.get("is_causal", False), kw.get("scale"), gqa)
    assert isinstance(direct, torch.Tensor)  # the plain call is taken here
    fast = attnfast.scaled_dot_product_attention(q, k, v, **kw)
    general = attnfast.attention(q, k, v, backend="cpu", **kw)  # prepare + choose + the op from Python
    assert torch.equal(direct, general) and torch.equal(fast, general)
    if q.requires_grad:
        g = torch.randn_like(fast)
        grads_fast = torch.autograd.grad(fast, (q, k, v), g)
        grads_general = torch.autograd.grad(general, (q, k, v), g)
        for a, b in zip(grads_fast, grads_general):
            assert torch.equal(a, b)


def test_default_scale_is_the_python_one():
    q, k, v = _qkv(torch.float32, E=24)
    out = ops._C.plain_sdpa(q, k, v, None, 0.0, False, None, False)
    assert torch.equal(out, attnfast.attention(q, k, v, scale=1.0 / 24 ** 0.5, backend="cpu"))


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("case", ["mask", "dropout", "int-causal", "int-gqa", "int-scale", "inf-scale", "subclass",
                                  "3d", "dtype-mix", "int-dtype", "shape", "gqa-off", "gqa-ratio", "meta"])
def test_anything_else_goes_to_the_python_path(case):
    q, k, v = _qkv(torch.float32)
    args = dict(attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)
    if case == "mask":
        args["attn_mask"] = torch.ones(9, 13, dtype=torch.bool)
    elif case == "dropout":
        args["dropout_p"] = 0.1
    elif case == "int-causal":
        args["is_causal"] = 1
    elif case == "int-gqa":
        args["enable_gqa"] = 1
    elif case == "int-scale":
        args["scale"] = 1
    elif case == "inf-scale":
        args["scale"] = float("inf")
    elif case == "subclass":
        q = q.as_subclass(_Sub)
    elif case == "3d":
        q, k, v = q[0], k[0], v[0]
    elif case == "dtype-mix":
        k = k.double()
    elif case == "int-dtype":
        q, k, v = (t.to(torch.int32) for t in (q, k, v))
    elif case == "shape":
        v = v[:, :, :-1]
    elif case == "gqa-off":
        k, v = k[:, :2], v[:, :2]
    elif case == "gqa-ratio":
        k, v = k[:, :3], v[:, :3]
        args["enable_gqa"] = True
    elif case == "meta":
        q, k, v = (t.to("meta") for t in (q, k, v))
    assert ops._C.plain_sdpa(q, k, v, *args.values()) is None


def test_forced_backend_and_torch_function_modes_take_the_python_path(monkeypatch):
    q, k, v = _qkv(torch.float32)
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        assert ops._C.plain_sdpa(q, k, v, None, 0.0, False, None, False) is None
        attnfast.scaled_dot_product_attention(q, k, v)
    assert any("attnfast.fwd" in s for s in seen), seen  # the mode saw the op
    monkeypatch.setenv("ATTNFAST_BACKEND", "reference")
    assert ops._C.plain_sdpa(q, k, v, None, 0.0, False, None, False) is None
    monkeypatch.setenv("ATTNFAST_BACKEND", "")
    assert ops._C.plain_sdpa(q, k, v, None, 0.0, False, None, False) is not None


def test_errors_still_name_the_argument():
    q, k, v = _qkv(torch.float32)
    with pytest.raises(TypeError, match="is_causal"):
        attnfast.scaled_dot_product_attention(q, k, v, is_causal=1)
    with pytest.raises(ValueError, match="value"):
        attnfast.scaled_dot_product_attention(q, k, v[:, :, :-1])
