"""The CUDA C++ kernels' own source, run by the host emulator, against the reference.

csrc/cuda/tools/emu.h stands in for the GPU: every CUDA thread is a fiber, the
warp-collective instructions (ldmatrix, mma.sync m16n8k16, shuffles) are
computed from the PTX ISA's fragment layouts, cp.async copies land only at the
cp.async.wait_group that covers them, and shared memory starts as NaN.  So a
wrong fragment index, a missing barrier or wait, or a bad band/mask rule fails
these tests on a machine without a GPU.  Held to the same parity rule as every
backend (forward, lse, dq, dk, dv and a float mask's gradient).
"""
import pytest
import torch

from attnfast.testing import assert_parity, compare_with_reference
from cases import Case, make_inputs

cuda_emu = pytest.importorskip("cuda_emu")

if cuda_emu.cuda_include() is None:
    pytest.skip("CUDA headers (cuda_bf16.h) not installed", allow_module_level=True)

# Lengths straddle the tiles (forward: 128 query rows x 64 keys at D <= 128,
# 64 x 32 at D = 256; backward: 128 keys x 64 or 32 query rows).
CASES = [
    Case(B=1, Hq=2, Hkv=2, Lq=70, Lk=70, E=64),
    Case(B=2, Hq=2, Hkv=1, Lq=1, Lk=203, E=64, causal=True, align="bottom_right"),
    Case(B=1, Hq=2, Hkv=2, Lq=203, Lk=17, E=96, causal=True, align="bottom_right"),
    Case(B=1, Hq=2, Hkv=2, Lq=150, Lk=203, E=128, causal=True),
    Case(B=1, Hq=4, Hkv=2, Lq=130, Lk=130, E=64, window=(20, 5)),
    Case(B=1, Hq=4, Hkv=1, Lq=65, Lk=200, E=96, noncontig=True),
    Case(B=2, Hq=2, Hkv=2, Lq=70, Lk=140, E=64, mask="bool", mask_bcast="keypad"),
    Case(B=2, Hq=2, Hkv=2, Lq=40, Lk=150, E=64, mask="bool", mask_bcast="heads", dead_rows=True),
    Case(B=1, Hq=2, Hkv=2, Lq=129, Lk=129, E=128, mask="float_grad", mask_bcast="docs", causal=True),
    Case(B=2, Hq=2, Hkv=1, Lq=33, Lk=70, E=64, mask="float_grad", mask_bcast="batch", dead_rows=True),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_emulated_cuda_kernels_parity(case, dtype):
    cuda_emu.set_schedule(0 if dtype == torch.bfloat16 else 1)  # both warp orders over the sweep
    q, k, v, m = make_inputs(case, dtype)
    res = compare_with_reference(lambda q, k, v, m: cuda_emu.attention(q, k, v, m, **case.attention_kwargs()),
                                 q, k, v, m, **case.ref_kwargs())
    assert_parity(res, f"{case.id()} {dtype}")


@pytest.mark.parametrize("case", [Case(B=1, Hq=2, Hkv=1, Lq=70, Lk=90, E=256, causal=True, align="bottom_right"),
                                  Case(B=1, Hq=1, Hkv=1, Lq=40, Lk=33, E=256, mask="bool", mask_bcast="full")],
                         ids=["causal", "bool"])
def test_emulated_forward_head_dim_256(case):
    q, k, v, m = make_inputs(case, torch.bfloat16)
    res = compare_with_reference(lambda q, k, v, m: cuda_emu.attention(q, k, v, m, **case.attention_kwargs()),
                                 q, k, v, m, grads=False, **case.ref_kwargs())
    assert all(r.ok for r in res), res


def test_fully_masked_rows_give_zero_and_minus_inf_lse():
    q, k, v, _ = make_inputs(Case(B=1, Hq=2, Hkv=2, Lq=20, Lk=30, E=64), torch.bfloat16)
    keep = torch.ones(1, 2, 20, 30, dtype=torch.bool)
    keep[:, :, 5] = False
    out, lse = cuda_emu.attention(q, k, v, keep)
    assert torch.equal(out[:, :, 5], torch.zeros_like(out[:, :, 5]))
    assert torch.isneginf(lse[:, :, 5]).all() and torch.isfinite(lse[:, :, :5]).all()


def test_nan_in_a_query_row_reaches_exactly_that_row():
    q, k, v, _ = make_inputs(Case(B=1, Hq=2, Hkv=2, Lq=70, Lk=90, E=64), torch.bfloat16)
    q[0, 1, 33, 5] = float("nan")
    out, lse = cuda_emu.attention(q, k, v)
    bad = ~torch.isfinite(out.float()).all(-1)
    expected = torch.zeros_like(bad)
    expected[0, 1, 33] = True
    assert torch.equal(bad, expected) and torch.isnan(lse[0, 1, 33]) and torch.isfinite(lse[~expected]).all()


def test_caller_given_delta_lets_key_blocks_add_up():
    """With the whole rows' lse and delta_in = rowsum(dO * O), backward launches on two key
    blocks add up to the whole backward (what ring attention relies on)."""
    q = torch.randn(1, 2, 70, 64).bfloat16()
    k, v = (torch.randn(1, 1, 140, 64).bfloat16() for _ in range(2))
    dout = torch.randn(1, 2, 70, 64).bfloat16()
    out, lse = cuda_emu.fwd(q, k, v, None, 0.125, -1, -1, False)
    whole = cuda_emu.bwd(dout, q, k, v, out, lse, None, None, 0.125, -1, -1, False, False)
    delta = (dout.float() * out.float()).sum(-1)
    a = cuda_emu.bwd(dout, q, k[:, :, :64], v[:, :, :64], out, lse, None, None, 0.125, -1, -1, False, False, delta)
    b = cuda_emu.bwd(dout, q, k[:, :, 64:], v[:, :, 64:], out, lse, None, None, 0.125, -1, -1, False, False, delta)
    tol = dict(rtol=2e-2, atol=2e-2)  # bf16 outputs: a few roundings apart
    torch.testing.assert_close(a[0].float() + b[0].float(), whole[0].float(), **tol)
    torch.testing.assert_close(torch.cat([a[1], b[1]], 2).float(), whole[1].float(), **tol)
    torch.testing.assert_close(torch.cat([a[2], b[2]], 2).float(), whole[2].float(), **tol)


# Packed batches (varlen): (per-sequence query lengths, key lengths, Hq, Hkv, E, rule, seqused_k).
# Lengths of 0 and 1, Lq != Lk per sequence, sequences past one query block (128 rows) and one
# backward key block (128 keys).
VARLEN_CASES = [
    ([5, 0, 1, 140, 33], [9, 3, 1, 140, 70], 2, 1, 64, dict(is_causal=True, causal_alignment="bottom_right"), None),
    ([70, 20, 129], [70, 20, 129], 2, 2, 128, dict(is_causal=True), None),
    ([17, 64, 3], [40, 64, 80], 4, 2, 96, dict(window=(10, 4)), None),
    ([30, 1, 50], [60, 8, 140], 2, 1, 64, dict(), [33, 0, 131]),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("lq,lk,Hq,Hkv,E,rule,used", VARLEN_CASES, ids=[f"varlen{i}" for i in range(len(VARLEN_CASES))])
def test_emulated_cuda_varlen_parity(lq, lk, Hq, Hkv, E, rule, used, dtype):
    """One launch over a packed batch (cu_seqlens in the kernels' params), forward and backward,
    against the per-sequence reference by the parity rule."""
    from attnfast.testing import compare_varlen_with_reference

    cuda_emu.set_schedule(0 if dtype == torch.bfloat16 else 1)
    cu = lambda n: torch.tensor([0] + n).cumsum(0).to(torch.int32)  # noqa: E731
    cu_q, cu_k = cu(lq), cu(lk)
    q = torch.randn(sum(lq), Hq, E).to(dtype)
    k, v = torch.randn(sum(lk), Hkv, E).to(dtype), torch.randn(sum(lk), Hkv, E).to(dtype)
    used_k = None if used is None else torch.tensor(used, dtype=torch.int32)
    run = lambda q, k, v: cuda_emu.varlen_attention(q, k, v, cu_q, cu_k, used_k, **rule)  # noqa: E731
    assert_parity(compare_varlen_with_reference(run, q, k, v, cu_q, cu_k, used_k, **rule), f"varlen {dtype}")
    if used_k is not None:  # keys past seqused_k get no gradient
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out, _ = run(qq, kk, vv)
        out.sum().backward()
        for i, n in enumerate(used):
            unused = slice(cu_k[i] + n, cu_k[i + 1])
            assert kk.grad[unused].abs().sum() == 0 and vv.grad[unused].abs().sum() == 0
