"""varlen_attention: packed sequences without padding, one kernel call (CPU), on each backend."""
import pytest
import torch

import attnfast
from attnfast.dropout import dropout_mask
from attnfast.testing import assert_parity, compare_varlen_with_reference

BACKENDS = [b for b in ("cpu", "triton", "reference") if attnfast.backends()[b].available]


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)


def _packed(lens_q, lens_k, Hq, Hkv, E, Ev, dtype):
    q = torch.randn(sum(lens_q), Hq, E, dtype=dtype)
    k = torch.randn(sum(lens_k), Hkv, E, dtype=dtype)
    v = torch.randn(sum(lens_k), Hkv, Ev, dtype=dtype)
    return q, k, v, _cu(lens_q), _cu(lens_k)


def _lengths(n, hi, zero_ok=True):
    """n random lengths in [0 or 1, hi], always including the edge lengths 0 (if allowed) and 1."""
    lens = torch.randint(0 if zero_ok else 1, hi + 1, (n,)).tolist()
    lens[0] = 1
    if zero_ok and n > 2:
        lens[2] = 0
    return lens


def _run(backend, cq, ck, mq, mk, **kw):
    def run(q, k, v):
        return attnfast.varlen_attention(q, k, v, cq, ck, mq, mk, return_lse=True, backend=backend, **kw)
    return run


CASES = [  # (is_causal, causal_alignment, window)
    (False, "top_left", None),
    (True, "top_left", None),
    (True, "bottom_right", None),
    (False, "bottom_right", (7, 2)),
]


# Every head layout on the CPU kernel; GQA only on the backends that loop over the sequences.
HEADS = [(b, h) for b in BACKENDS for h in ([(4, 4), (4, 2), (3, 1)] if b == "cpu" else [(4, 2)])]


@pytest.mark.parametrize("backend,heads", HEADS)
@pytest.mark.parametrize("causal,align,window", CASES)
def test_varlen_matches_reference_forward_and_backward(backend, heads, causal, align, window):
    n = 9 if backend != "reference" else 5
    lens_q, lens_k = _lengths(n, 70), _lengths(n, 90)  # Lq != Lk per sequence, lengths 0 and 1
    q, k, v, cq, ck = _packed(lens_q, lens_k, heads[0], heads[1], 32, 24, torch.float32)
    res = compare_varlen_with_reference(_run(backend, cq, ck, max(lens_q), max(lens_k), is_causal=causal,
                                             causal_alignment=align, window=window),
                                        q, k, v, cq, ck, is_causal=causal, causal_alignment=align, window=window)
    assert_parity(res, f"{backend} lens_q={lens_q} lens_k={lens_k}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_varlen_other_dtypes(dtype):
    lens_q, lens_k = _lengths(6, 40), _lengths(6, 300)
    q, k, v, cq, ck = _packed(lens_q, lens_k, 4, 2, 64, 64, dtype)
    res = compare_varlen_with_reference(_run("cpu", cq, ck, max(lens_q), max(lens_k), is_causal=True,
                                             causal_alignment="bottom_right"),
                                        q, k, v, cq, ck, is_causal=True, causal_alignment="bottom_right")
    assert_parity(res, f"lens_q={lens_q} lens_k={lens_k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_seqused_k(backend):
    lens_q, lens_k = [3, 1, 5, 2], [10, 7, 300, 4]
    used = torch.tensor([6, 0, 257, 4], dtype=torch.int32)
    q, k, v, cq, ck = _packed(lens_q, lens_k, 4, 2, 16, 16, torch.float32)
    res = compare_varlen_with_reference(_run(backend, cq, ck, 5, 300, seqused_k=used, is_causal=True,
                                             causal_alignment="bottom_right"),
                                        q, k, v, cq, ck, seqused_k=used, is_causal=True,
                                        causal_alignment="bottom_right")
    assert_parity(res)
    # Keys past seqused_k take no part: changing them changes nothing, and they get no gradient.
    k2, v2 = k.clone(), v.clone()
    k2[ck[0] + 6:ck[1]] = 1e3
    v2[ck[2] + 257:ck[3]] = float("nan")
    a = attnfast.varlen_attention(q, k, v, cq, ck, 5, 300, seqused_k=used, backend=backend)
    b = attnfast.varlen_attention(q, k2, v2, cq, ck, 5, 300, seqused_k=used, backend=backend)
    assert torch.equal(a, b)
    kk = k.clone().requires_grad_()
    attnfast.varlen_attention(q, kk, v, cq, ck, 5, 300, seqused_k=used, backend=backend).sum().backward()
    assert kk.grad[ck[0] + 6:ck[1]].abs().max() == 0 and kk.grad[ck[1]:ck[2]].abs().max() == 0


def test_varlen_decode_rows_use_the_split_kernel():
    """One query per sequence over long key runs (the decode shape): every sequence's keys are
    split (kernel decode_impl); the result holds to the per-sequence reference."""
    lens_k = [1, 0, 3000, 700, 1500]
    q, k, v, cq, ck = _packed([1] * 5, lens_k, 8, 2, 64, 64, torch.float32)
    res = compare_varlen_with_reference(_run("cpu", cq, ck, 1, 3000, is_causal=True, causal_alignment="bottom_right"),
                                        q, k, v, cq, ck, is_causal=True, causal_alignment="bottom_right")
    assert_parity(res, "decode")


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in BACKENDS])
def test_varlen_is_one_op_call(backend):
    lens = _lengths(50, 20)
    q, k, v, cq, ck = _packed(lens, lens, 2, 2, 16, 16, torch.float32)
    prefix = "attnfast::" + ("triton_" if backend == "triton" else "")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        attnfast.varlen_attention(q, k, v, cq, ck, 20, 20, backend=backend)
    names = [e.name for e in prof.events()]
    assert names.count(prefix + "varlen_fwd") == 1
    assert prefix + "fwd" not in names


def test_varlen_dropout_draws_per_sequence_offsets():
    """Sequence i's dropout is the dense kernel's with the call's (seed, offset + i)."""
    lens_q, lens_k = [5, 0, 17, 1], [9, 3, 17, 40]
    q, k, v, cq, ck = _packed(lens_q, lens_k, 4, 2, 16, 16, torch.float32)
    p = 0.3
    torch.manual_seed(1234)
    rng = attnfast.dropout.draw_rng()
    masks = []
    for i, (a, b) in enumerate(zip(lens_q, lens_k)):
        masks.append(dropout_mask((4, a, b), p, rng + torch.tensor([0, i])))
    torch.manual_seed(1234)

    def run(q, k, v):
        return attnfast.varlen_attention(q, k, v, cq, ck, 17, 40, dropout_p=p, is_causal=True, return_lse=True,
                                         backend="cpu")

    res = compare_varlen_with_reference(run, q, k, v, cq, ck, dropout_masks=masks, is_causal=True)
    assert_parity([r for r in res if r.name != "lse"], "dropout")  # lse is taken before dropout
    # A gradient check of the same draw through autograd (the backward regenerates the mask).
    qd = q.double().requires_grad_()
    kd, vd = k.double().requires_grad_(), v.double().requires_grad_()

    def f(q, k, v):
        torch.manual_seed(1234)
        return attnfast.varlen_attention(q, k, v, cq, ck, 17, 40, dropout_p=p, is_causal=True, backend="cpu")

    torch.autograd.gradcheck(f, (qd, kd, vd), atol=1e-6, fast_mode=True)


def test_varlen_gradients_flow():
    q, k, v, cq, ck = _packed([3, 6, 0, 1], [4, 6, 2, 0], 2, 1, 16, 8, torch.float64)
    for t in (q, k, v):
        t.requires_grad_()

    def f(q, k, v):
        out, lse = attnfast.varlen_attention(q, k, v, cq, ck, 6, 6, is_causal=True, return_lse=True, backend="cpu")
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    torch.autograd.gradcheck(f, (q, k, v), atol=1e-6)


def test_varlen_op_passes_opcheck():
    lens = [3, 0, 7]
    q, k, v, cq, ck = _packed(lens, [5, 2, 7], 2, 1, 16, 16, torch.float32)
    q.requires_grad_()
    torch.library.opcheck(torch.ops.attnfast.varlen_fwd,
                          (q, k, v, cq, ck, None, 7, 7, 0.25, -1, 0, True, 0.0, None))


def test_varlen_under_torch_compile():
    lens = [3, 9, 1]
    q, k, v, cq, ck = _packed(lens, lens, 2, 2, 16, 16, torch.float32)
    f = torch.compile(lambda q, k, v: attnfast.varlen_attention(q, k, v, cq, ck, 9, 9, is_causal=True,
                                                                backend="cpu"), fullgraph=True)
    torch.testing.assert_close(f(q, k, v), attnfast.varlen_attention(q, k, v, cq, ck, 9, 9, is_causal=True,
                                                                       backend="cpu"), rtol=0, atol=0)


def test_varlen_bad_input():
    q, k, v, cq, ck = _packed([3, 6], [4, 6], 2, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        attnfast.varlen_attention(q, k, v, torch.tensor([1, 3, 9], dtype=torch.int32), ck, 6, 6)
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0, never decrease"):
        attnfast.varlen_attention(q, k, v, cq, torch.tensor([0, 11, 10], dtype=torch.int32), 6, 11)
    with pytest.raises(ValueError, match="max_seqlen"):
        attnfast.varlen_attention(q, k, v, cq, ck, 2, 6)
    with pytest.raises(ValueError, match="packed"):
        attnfast.varlen_attention(q[None], k, v, cq, ck, 6, 6)
    with pytest.raises(TypeError, match="cu_seqlens_k"):
        attnfast.varlen_attention(q, k, v, cq, ck.float(), 6, 6)
    with pytest.raises(ValueError, match="cu_seqlens_k must have 3 entries"):
        attnfast.varlen_attention(q, k, v, cq, ck[:2], 6, 6)
    with pytest.raises(ValueError, match="seqused_k must be in"):
        attnfast.varlen_attention(q, k, v, cq, ck, 6, 6, seqused_k=torch.tensor([5, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple"):
        attnfast.varlen_attention(q[:, :1].expand(-1, 3, -1), k, v, cq, ck, 6, 6)
    with pytest.raises(TypeError, match="dtype"):
        attnfast.varlen_attention(q, k.double(), v, cq, ck, 6, 6)
    # The op checks the offsets itself too: no read outside the packed tensors.
    with pytest.raises(RuntimeError, match="cu_seqlens_k must never decrease"):
        torch.ops.attnfast.varlen_fwd(q, k, v, cq, torch.tensor([0, 11, 10], dtype=torch.int32), None, 6, 11,
                                      0.25, -1, -1, False, 0.0, None)
    with pytest.raises(RuntimeError, match="seqused_k"):
        torch.ops.attnfast.varlen_fwd(q, k, v, cq, ck, torch.tensor([5, 1], dtype=torch.int32), 6, 6,
                                      0.25, -1, -1, False, 0.0, None)
