"""Parity of the C++ CPU backend with the reference, by the rule in attnfast/testing.py."""
import pytest
import torch

import attnfast
from attnfast.testing import assert_parity, compare_with_reference
from cases import DECODE, SUBSET, SWEEP, make_inputs

pytestmark = pytest.mark.skipif(not attnfast.backends()["cpu"].available, reason="cpu backend not built")


def _check(case, dtype, backend="cpu"):
    q, k, v, m = make_inputs(case, dtype)

    def run(q, k, v, m):
        return attnfast.attention(q, k, v, attn_mask=m, return_lse=True, backend=backend,
                                  **case.attention_kwargs())

    results = compare_with_reference(run, q, k, v, m, **case.ref_kwargs())
    assert_parity(results, f"{case.id()} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", SWEEP, ids=[c.id() for c in SWEEP])
def test_parity(case, dtype):
    _check(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
@pytest.mark.parametrize("case", DECODE, ids=[c.id() for c in DECODE])
def test_parity_decode(case, dtype):
    _check(case, dtype)


def test_decode_independent_of_thread_count():
    """The decode path's key splits depend on the shape only: 1 and 2 threads agree bitwise."""
    q, k, v, m = make_inputs(DECODE[1], torch.float32)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(attnfast.attention(q, k, v, return_lse=True, backend="cpu", **DECODE[1].attention_kwargs()))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["f16", "f64"])
@pytest.mark.parametrize("case", SUBSET, ids=[c.id() for c in SUBSET])
def test_parity_other_dtypes(case, dtype):
    _check(case, dtype)


ISA_CASES = SUBSET + DECODE[:3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("isa", ["default", "avx2"])
@pytest.mark.parametrize("case", ISA_CASES, ids=[c.id() for c in ISA_CASES])
def test_parity_each_isa_path(case, isa, dtype, monkeypatch):
    """Every ISA build this CPU can run gives the same verdict (bf16: the widening products of
    these builds, where the AVX-512 build's own run takes vdpbf16ps pairs)."""
    monkeypatch.setenv("ATTNFAST_CPU_ISA", isa)
    _check(case, dtype)


def test_backward_deterministic():
    q, k, v, m = make_inputs(SWEEP[9], torch.float32)
    grads = []
    for _ in range(2):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attnfast.attention(*ins, enable_gqa=True, backend="cpu")
        grads.append(torch.autograd.grad(out, ins, torch.ones_like(out)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_fully_masked_rows_are_zero_with_finite_grads():
    q, k, v = (torch.randn(1, 2, 9, 16, requires_grad=True) for _ in range(3))
    mask = torch.ones(9, 9, dtype=torch.bool)
    mask[3] = False
    out, lse = attnfast.attention(q, k, v, attn_mask=mask, return_lse=True, backend="cpu")
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    assert torch.isneginf(lse[:, :, 3]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, 3], torch.zeros_like(q.grad[:, :, 3]))


def test_lse_gradient():
    """Gradients flowing into the returned lse are honoured."""
    q, k, v = (torch.randn(1, 2, 33, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = attnfast.attention(q, k, v, return_lse=True, is_causal=True, backend="cpu")
    r_out, r_lse = attnfast.attention_ref(q, k, v, is_causal=True)
    w = torch.randn_like(r_lse)
    g = torch.autograd.grad((out.sum() + (lse * w).sum()), (q, k, v))
    rg = torch.autograd.grad((r_out.sum() + (r_lse * w).sum()), (q, k, v))
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_mask_is_not_expanded_in_memory():
    """A broadcast mask reaches the kernel as a stride-0 view, not a copy."""
    from attnfast._validate import prepare

    q = torch.randn(2, 4, 64, 32)
    m = torch.rand(64, 64) > 0.5
    plan = prepare(q, q, q, m)
    assert plan.mask.shape == (2, 4, 64, 64)
    assert plan.mask.stride()[:2] == (0, 0)
    assert plan.mask.data_ptr() == m.data_ptr()
