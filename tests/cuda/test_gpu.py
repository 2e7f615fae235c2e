"""GPU-only checks (`pytest -m gpu`): the Triton and CUDA C++ backends on CUDA tensors at real sizes.

Skipped on machines without a CUDA device (see conftest.py); bench/gpu_check.sh
runs them on a GPU machine.
"""
import pytest
import torch

import attnfast
from attnfast.testing import assert_parity, compare_with_reference, dropout_mask
from cases import Case, make_inputs

pytestmark = pytest.mark.gpu

CASES = [
    Case(B=2, Hq=8, Hkv=8, Lq=1024, Lk=1024, E=128),
    Case(B=2, Hq=8, Hkv=2, Lq=1024, Lk=1024, E=64, causal=True),
    Case(B=1, Hq=4, Hkv=4, Lq=777, Lk=1500, E=96, causal=True, align="bottom_right"),
    Case(B=1, Hq=4, Hkv=1, Lq=1024, Lk=1024, E=128, window=(128, 0)),
    Case(B=2, Hq=4, Hkv=4, Lq=513, Lk=1025, E=64, mask="bool", mask_bcast="keypad"),
    Case(B=2, Hq=4, Hkv=4, Lq=300, Lk=400, E=111, mask="float_grad", mask_bcast="batch"),
    Case(B=1, Hq=2, Hkv=2, Lq=256, Lk=256, E=256, noncontig=True),
    Case(B=2, Hq=4, Hkv=2, Lq=1000, Lk=1200, E=64, mask="bool", mask_bcast="docs"),
    Case(B=2, Hq=4, Hkv=4, Lq=1200, Lk=1000, E=128, mask="float_grad", mask_bcast="docs", window=(300, 100)),
]


def _cuda(t):
    if t is None:
        return None
    return t.detach().cuda().requires_grad_(t.requires_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_triton_parity_cuda(case, dtype):
    _check_parity(case, dtype, "triton")


def _check_parity(case, dtype, backend):
    """`backend`'s outputs and gradients on CUDA tensors by the parity rule."""
    q, k, v, m = (_cuda(t) for t in make_inputs(case, dtype))

    def run(q, k, v, m):
        return attnfast.attention(q, k, v, attn_mask=m, return_lse=True, backend=backend,
                                  **case.attention_kwargs())

    res = compare_with_reference(run, q, k, v, m, **case.ref_kwargs())
    assert_parity(res, f"{case.id()} {dtype}")


CUDA_CASES = [c for c in CASES if c.E in (64, 96, 128)] + [
    Case(B=1, Hq=4, Hkv=2, Lq=1, Lk=203, E=64, causal=True, align="bottom_right"),
    Case(B=2, Hq=2, Hkv=2, Lq=1025, Lk=17, E=128, causal=True),
    Case(B=1, Hq=6, Hkv=3, Lq=113, Lk=113, E=96, mask="bool", mask_bcast="heads"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=[c.id() for c in CUDA_CASES])
def test_cuda_cpp_parity(case, dtype):
    """The CUDA C++ kernels (csrc/cuda), forward and backward, by the parity rule."""
    if not attnfast.backends()["cuda"].available:
        pytest.fail(f"the cuda backend should be built on a GPU machine: {attnfast.backends()['cuda'].reason}")
    _check_parity(case, dtype, "cuda")


@pytest.mark.parametrize("E", [64, 128, 256])
def test_cuda_cpp_forward_only(E):
    """Forward without gradients, including the head dim with a forward kernel only (256)."""
    if not attnfast.backends()["cuda"].available:
        pytest.fail(attnfast.backends()["cuda"].reason)
    case = Case(B=2, Hq=4, Hkv=1, Lq=300, Lk=517, E=E, causal=True, align="bottom_right")
    q, k, v, _ = (_cuda(t) for t in make_inputs(case, torch.bfloat16))
    res = compare_with_reference(
        lambda q, k, v, m: attnfast.attention(q, k, v, return_lse=True, backend="cuda", **case.attention_kwargs()),
        q, k, v, None, grads=False, **case.ref_kwargs())
    assert all(r.ok for r in res), res


def test_triton_dropout_cuda(fresh_seed):
    case = Case(B=2, Hq=4, Hkv=2, Lq=300, Lk=500, E=64, causal=True)
    q, k, v, _ = (_cuda(t) for t in make_inputs(case, torch.bfloat16))

    def run(q, k, v, m):
        torch.manual_seed(fresh_seed + 1)
        return attnfast.attention(q, k, v, dropout_p=0.2, return_lse=True, backend="triton",
                                  **case.attention_kwargs())

    torch.manual_seed(fresh_seed + 1)
    dm = dropout_mask((2, 4, 300, 500), 0.2, device="cuda")
    res = compare_with_reference(run, q, k, v, None, dropout_mask=dm, **case.ref_kwargs())
    assert all(r.ok for r in res), res


def test_dispatch_picks_triton_for_cuda():
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    from attnfast._validate import prepare
    from attnfast import dispatch

    assert dispatch.choose(prepare(q, q, q)) in ("triton", "cuda")


def test_compile_fullgraph_cuda():
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))

    def f(q, k, v):
        return attnfast.scaled_dot_product_attention(q, k, v, is_causal=True).float().square().sum()

    e = f(q, k, v)
    ge = torch.autograd.grad(e, (q, k, v))
    c = torch.compile(f, fullgraph=True)(q, k, v)
    gc = torch.autograd.grad(c, (q, k, v))
    torch.testing.assert_close(c, e)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_opcheck_cuda():
    from attnfast.triton_kernels import attention  # noqa: F401  (registers the ops)

    q = torch.randn(1, 67, 2, 64, device="cuda", dtype=torch.float16).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 90, 2, 64, device="cuda", dtype=torch.float16).transpose(1, 2).requires_grad_()
    v = torch.randn(1, 90, 2, 32, device="cuda", dtype=torch.float16).transpose(1, 2).requires_grad_()
    torch.library.opcheck(torch.ops.attnfast.triton_fwd.default, (q, k, v, None, 0.125, -1, 0, True, 0.0, 0, 0))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_varlen_one_launch_parity_cuda(backend, dtype):
    """A packed batch (lengths 0, 1 and past several tiles, Lq != Lk, GQA, causal bottom-right,
    seqused_k) in one launch, forward and backward, by the parity rule."""
    from attnfast.testing import compare_varlen_with_reference

    if not attnfast.backends()[backend].available:
        pytest.fail(f"the {backend} backend should be built on a GPU machine: {attnfast.backends()[backend].reason}")
    lq, lk, used = [300, 0, 1, 1025, 77], [512, 3, 1, 1025, 200], [500, 0, 1, 1025, 150]
    cu = lambda n: torch.tensor([0] + n).cumsum(0).to(torch.int32).cuda()  # noqa: E731
    cu_q, cu_k, used_k = cu(lq), cu(lk), torch.tensor(used, dtype=torch.int32).cuda()
    q = torch.randn(sum(lq), 8, 128, device="cuda", dtype=dtype)
    k, v = (torch.randn(sum(lk), 2, 128, device="cuda", dtype=dtype) for _ in range(2))
    rule = dict(is_causal=True, causal_alignment="bottom_right")

    def run(q, k, v):
        return attnfast.varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), seqused_k=used_k, return_lse=True,
                                         backend=backend, **rule)

    assert_parity(compare_varlen_with_reference(run, q, k, v, cu_q, cu_k, used_k, **rule), f"varlen {backend} {dtype}")
