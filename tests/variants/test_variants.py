"""Additive (Bahdanau) and hard (top-k) attention against their references by the parity rule."""
import pytest
import torch

import attnfast
from attnfast import chunked
from attnfast.reference import additive_attention_ref, topk_attention_ref, topk_select
from attnfast.testing import additive_score_scale, score_scale
from cases import check_parity

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


ADDITIVE = [  # (B, H, Lq, Lk, Eq, Ek, Ev, Da, per_head, mask, causal)
    (2, 2, 9, 13, 8, 6, 5, 16, True, None, False),
    (1, 3, 17, 17, 16, 16, 16, 8, False, None, True),
    (2, 1, 5, 21, 12, 4, 7, 32, False, "keypad", False),
    (1, 2, 11, 7, 8, 8, 8, 12, True, "float", True),
    (1, 1, 1, 1, 4, 4, 4, 4, False, None, False),
]


needs_ext = pytest.mark.skipif(not attnfast.ops.loaded(), reason="extension not built")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ADDITIVE)
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "reference", "reference-small-chunks"])
def test_additive_parity(case, dtype, backend, monkeypatch):
    if backend == "cpu" and dtype == torch.float64:
        pytest.skip("the fused kernel serves float32 and half types (float64 runs the reference path)")
    if backend == "reference-small-chunks":
        monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 40)
        backend = "reference"
    B, H, Lq, Lk, Eq, Ek, Ev, Da, per_head, mask_kind, causal = case
    q, k, v = torch.randn(B, H, Lq, Eq), torch.randn(B, H, Lk, Ek), torch.randn(B, H, Lk, Ev)
    lead = (H,) if per_head else ()
    w_q, w_k, v_a = torch.randn(lead + (Da, Eq)) / Eq ** 0.5, torch.randn(lead + (Da, Ek)) / Ek ** 0.5, \
        torch.randn(lead + (Da,))
    mask = None
    if mask_kind == "keypad":
        mask = (torch.rand(B, 1, 1, Lk) > 0.3)
        mask[0, 0, 0, :] = False  # batch 0: every key hidden, rows give 0
    elif mask_kind == "float":
        mask = torch.randn(Lq, Lk)
    ins = [t.to(dtype) for t in (q, k, v, w_q, w_k, v_a)]
    m = None if mask is None else (mask if mask.dtype == torch.bool else mask.to(dtype))

    def run(*t):
        return attnfast.additive_attention(*t, attn_mask=m, is_causal=causal, return_lse=True, backend=backend)

    def ref(*t, upcast, reorder_ops=False):
        return additive_attention_ref(*t, attn_mask=m, is_causal=causal, upcast=upcast, reorder_ops=reorder_ops)

    check_parity(run, ref, ins, score_scale=additive_score_scale(*ins, m))


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "reference",
                                     pytest.param("triton", marks=pytest.mark.skipif(
                                         not attnfast.backends()["triton"].available,
                                         reason="triton backend unavailable"))])
def test_additive_lse_gradient(backend):
    """A loss on lse as well as out: d lse / d s = P reaches every input."""
    q, k, v = torch.randn(2, 2, 7, 6), torch.randn(2, 2, 9, 5), torch.randn(2, 2, 9, 4)
    ws = [torch.randn(2, 8, 6) / 3, torch.randn(8, 5) / 3, torch.randn(2, 8)]
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    ins = [t.to(dev).requires_grad_() for t in (q, k, v, *ws)]
    out, lse = attnfast.additive_attention(*ins, is_causal=True, return_lse=True, backend=backend)
    g = torch.autograd.grad((out * out).sum() + 3 * lse.sum(), ins)
    ref_in = [t.clone().double().requires_grad_() for t in (q, k, v, *ws)]
    r_out, r_lse = additive_attention_ref(*ref_in, is_causal=True)
    rg = torch.autograd.grad((r_out * r_out).sum() + 3 * r_lse.sum(), ref_in)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-4, atol=1e-5)


def test_additive_backend_choice():
    q = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    w = torch.randn(4, 4, dtype=torch.float64)
    with pytest.raises(attnfast.BackendUnavailableError, match="the fused additive kernel takes float32, bfloat16, float16"):
        attnfast.additive_attention(q, q, q, w, w, w[0], backend="cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        attnfast.additive_attention(q, q, q, w, w, w[0], backend="tpu")
    with pytest.raises(attnfast.BackendUnavailableError, match="backend='cuda' cannot serve this call: it has no additive kernels"):
        attnfast.additive_attention(q, q, q, w, w, w[0], backend="cuda")
    with pytest.raises(attnfast.BackendUnavailableError, match="float64 is not supported"):
        attnfast.additive_attention(q, q, q, w, w, w[0], backend="triton")
    bias = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(attnfast.BackendUnavailableError, match="no gradient to a float attn_mask"):
        attnfast.topk_attention(q, q, q, 2, attn_mask=bias, backend="cpu")
    # By default a mask that needs a gradient takes the reference path, and gets one.
    attnfast.topk_attention(q, q, q, 2, attn_mask=bias).sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0


needs_triton = pytest.mark.skipif(not attnfast.backends()["triton"].available, reason="triton backend unavailable")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_backends_through_the_public_functions(dtype):
    """The public functions reach the Triton ops: 5-D input, GQA, a broadcast bool mask, lse."""
    dev = TRITON_DEVICE
    q, k, v = torch.randn(2, 1, 4, 9, 8), torch.randn(2, 1, 2, 13, 8), torch.randn(2, 1, 2, 13, 6)
    mask = torch.rand(2, 1, 1, 1, 13) > 0.3
    ins = [t.to(dev, dtype) for t in (q, k, v)]

    def run(*t):
        return attnfast.topk_attention(*t, 5, attn_mask=mask.to(dev), is_causal=True, enable_gqa=True,
                                       return_lse=True, backend="triton")

    def ref(*t, upcast, reorder_ops=False):
        return topk_attention_ref(*t, 5, attn_mask=mask.to(dev), is_causal=True, enable_gqa=True, upcast=upcast,
                                  reorder_ops=reorder_ops)

    check_parity(run, ref, ins, score_scale=score_scale(ins[0], ins[1], None, None))
    k2, w_q, w_k, v_a = torch.randn(2, 1, 4, 13, 5), torch.randn(4, 6, 8) / 3, torch.randn(6, 5) / 2, torch.randn(6)
    v2 = torch.randn(2, 1, 4, 13, 3)
    ins = [t.to(dev, dtype) for t in (q, k2, v2, w_q, w_k, v_a)]

    def run_add(*t):
        return attnfast.additive_attention(*t, attn_mask=mask.to(dev), is_causal=True, return_lse=True,
                                           backend="triton")

    def ref_add(*t, upcast, reorder_ops=False):
        return additive_attention_ref(*t, attn_mask=mask.to(dev), is_causal=True, upcast=upcast,
                                      reorder_ops=reorder_ops)

    check_parity(run_add, ref_add, ins, score_scale=additive_score_scale(*ins))


TOPK = [  # (B, Hq, Hkv, Lq, Lk, E, Ev, top_k, mask, causal)
    (2, 2, 2, 9, 13, 8, 8, 4, None, False),
    (1, 4, 2, 17, 17, 16, 8, 3, None, True),
    (1, 2, 1, 6, 30, 8, 8, 30, "keypad", False),
    (2, 2, 2, 12, 12, 8, 8, 1, "float", True),
]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
@pytest.mark.parametrize("case", TOPK)
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "reference", "reference-small-chunks"])
def test_topk_parity(case, dtype, backend, monkeypatch):
    if backend == "reference-small-chunks":
        monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 50)
        backend = "reference"
    elif dtype == torch.float16 and backend == "reference":
        pytest.skip("float16 runs on the fused kernel's test only")
    B, Hq, Hkv, Lq, Lk, E, Ev, top_k, mask_kind, causal = case
    q, k, v = torch.randn(B, Hq, Lq, E), torch.randn(B, Hkv, Lk, E), torch.randn(B, Hkv, Lk, Ev)
    mask = None
    if mask_kind == "keypad":
        mask = torch.rand(B, 1, 1, Lk) > 0.5
    elif mask_kind == "float":
        mask = torch.randn(Lq, Lk).to(dtype)
    ins = [t.to(dtype) for t in (q, k, v)]

    def run(*t):
        return attnfast.topk_attention(*t, top_k, attn_mask=mask, is_causal=causal, enable_gqa=True,
                                       return_lse=True, backend=backend)

    def ref(*t, upcast, reorder_ops=False):
        return topk_attention_ref(*t, top_k, attn_mask=mask, is_causal=causal, enable_gqa=True, upcast=upcast,
                                  reorder_ops=reorder_ops)

    check_parity(run, ref, ins, score_scale=score_scale(ins[0], ins[1], mask, None))


def test_topk_equals_dense_when_k_is_every_key():
    q, k, v = (torch.randn(2, 3, 10, 8, dtype=torch.float64) for _ in range(3))
    out = attnfast.topk_attention(q, k, v, 10, is_causal=True)
    torch.testing.assert_close(out, attnfast.attention(q, k, v, is_causal=True), rtol=0, atol=1e-12)


TOPK_FUSED = [  # (B, Hq, Hkv, Lq, Lk, E, top_k, mask, causal): several key tiles and query blocks
    (1, 2, 1, 200, 300, 16, 37, None, True),
    (2, 2, 2, 40, 260, 8, 200, "keypad", False),
    (1, 1, 1, 30, 129, 8, 1, "float", False),
    (1, 2, 2, 50, 700, 4, 20, "ties", False),  # scores from a few integers: ties across list cuts
    (1, 1, 1, 20, 600, 4, 150, "ties", True),
]


@needs_ext
@pytest.mark.parametrize("case", TOPK_FUSED)
def test_topk_fused_keeps_the_reference_choice(case):
    """The kernel's kept keys (idx) are exactly topk_select's, over several key tiles and query blocks;
    float64 scores differ between the two only in rounding, far below the gaps between keys."""
    B, Hq, Hkv, Lq, Lk, E, top_k, mask_kind, causal = case
    q, k, v = (torch.randn(B, h, n, E, dtype=torch.float64) for h, n in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
    if mask_kind == "ties":
        q, k = q.round().clamp(-1, 1), k.round().clamp(-1, 1)
    mask = None
    if mask_kind == "keypad":
        mask = torch.rand(B, 1, 1, Lk) > 0.3
        mask[1, 0, 0, 10:] = False  # 10 visible keys for batch 1: fewer than top_k
    elif mask_kind == "float":
        mask = torch.randn(Lq, Lk, dtype=torch.float64)
    m4 = None if mask is None else mask.expand(B, Hq, Lq, Lk)
    scale = 1.0 if mask_kind == "ties" else E ** -0.5
    _, _, idx = torch.ops.attnfast.topk_fwd(q, k, v, m4, causal, scale, top_k)
    s = torch.matmul(q, k.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    if causal:
        s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool).triu(1), float("-inf"))
    chosen = torch.zeros(B, Hq, Lq, Lk + 1, dtype=torch.bool).scatter_(-1, idx.long() % (Lk + 1), True)[..., :Lk]
    assert torch.equal(chosen, topk_select(s, top_k))
    n_kept = (idx >= 0).sum(-1)
    assert torch.equal(n_kept, topk_select(s, top_k).sum(-1))
    assert (idx[..., :1] >= -1).all() and ((idx >= 0).long().diff(dim=-1) <= 0).all()  # -1 only at the end


@needs_ext
def test_topk_fused_ties_nan_and_empty_rows():
    q = torch.zeros(1, 1, 3, 4)  # every score 0: ties everywhere
    k, v = torch.randn(1, 1, 300, 4), torch.randn(1, 1, 300, 2)
    mask = torch.ones(1, 1, 3, 300, dtype=torch.bool)
    mask[0, 0, 2] = False  # row 2 sees nothing
    out, lse, idx = torch.ops.attnfast.topk_fwd(q, k, v, mask, False, 0.5, 5)
    assert sorted(idx[0, 0, 0].tolist()) == [0, 1, 2, 3, 4]  # the lowest indices win every tie
    assert idx[0, 0, 2].tolist() == [-1] * 5 and out[0, 0, 2].eq(0).all() and lse[0, 0, 2] == float("-inf")
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, :5].mean(0))
    q2 = torch.randn(1, 1, 3, 4)
    k2 = k.clone()
    k2[0, 0, 150, 1] = float("nan")  # key 150's score is NaN in every row: chosen, the rows go NaN
    out = attnfast.topk_attention(q2, k2, v, 3, backend="cpu")
    assert torch.isnan(out).all()
    g = torch.zeros(1, 1, 3, 2)
    dq, dk, dv = torch.ops.attnfast.topk_bwd(g, q, k, v, mask, 0.5, lse, idx, None)
    assert dq.eq(0).all() and dk.eq(0).all() and dv.eq(0).all()


@needs_ext
def test_opcheck_topk():
    q = torch.randn(2, 9, 4, 8).transpose(1, 2)
    k = torch.randn(2, 13, 2, 8).transpose(1, 2)
    v = torch.randn(2, 13, 2, 5).transpose(1, 2)
    bias = torch.randn(9, 13).expand(2, 4, 9, 13)
    for mask, causal in ((None, False), (bias, True), (bias > 0, False)):
        args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, causal, 0.3, 4)
        torch.library.opcheck(torch.ops.attnfast.topk_fwd.default, args)


@needs_ext
def test_topk_bwd_rejects_bad_indices():
    q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 2)
    out, lse, idx = torch.ops.attnfast.topk_fwd(q, k, v, None, False, 0.5, 2)
    for bad in (5, -2):
        with pytest.raises(RuntimeError, match=r"idx entries must be key indices in \[0, Lk\) or -1"):
            torch.ops.attnfast.topk_bwd(out, q, k, v, None, 0.5, lse, idx.clone().fill_(bad), None)


def test_topk_ties_go_to_the_lower_index():
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, float("-inf")]])
    assert topk_select(s, 2).tolist() == [[False, True, True, False, False, False]]
    assert topk_select(s, 6).tolist() == [[True, True, True, True, True, False]]  # -inf is never chosen
    q = torch.zeros(1, 1, 1, 4)  # every score 0: a four-way tie
    v = torch.arange(4.0).view(1, 1, 4, 1)
    out = attnfast.topk_attention(q, torch.randn(1, 1, 4, 4), v, 2)
    assert out.item() == 0.5  # keys 0 and 1, equally weighted


def test_topk_backward_is_straight_through():
    """Keys outside every row's top-k get no gradient at all."""
    q = torch.randn(1, 1, 3, 8)
    k = torch.randn(1, 1, 9, 8, requires_grad=True)
    v = torch.randn(1, 1, 9, 4, requires_grad=True)
    attnfast.topk_attention(q, k, v, 2).sum().backward()
    chosen = topk_select(q @ k.detach().transpose(-1, -2) / 8 ** 0.5, 2).any(-2).squeeze()
    assert (k.grad[0, 0, ~chosen] == 0).all() and (v.grad[0, 0, ~chosen] == 0).all()
    assert (v.grad[0, 0, chosen].abs().sum(-1) > 0).all()


def test_bad_input():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 4)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, Lk\] = \[1, 7\], got 0"):
        attnfast.topk_attention(q, k, v, 0)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, Lk\] = \[1, 7\], got 8"):
        attnfast.topk_attention(q, k, v, 8)
    with pytest.raises(TypeError, match="top_k must be an int"):
        attnfast.topk_attention(q, k, v, 2.0)
    with pytest.raises(ValueError, match="enable_gqa"):
        attnfast.topk_attention(q, k[:, :1], v[:, :1], 2)
    with pytest.raises(ValueError, match="does not broadcast"):
        attnfast.topk_attention(q, k, v, 2, attn_mask=torch.ones(5, 6, dtype=torch.bool))
    w_q, w_k, v_a = torch.randn(16, 8), torch.randn(16, 8), torch.randn(16)
    with pytest.raises(ValueError, match=r"w_q must be \(Da, 8\) or \(2, Da, 8\)"):
        attnfast.additive_attention(q, k, v, torch.randn(16, 7), w_k, v_a)
    with pytest.raises(ValueError, match=r"w_k must be \(Da, 8\) or \(2, Da, 8\)"):
        attnfast.additive_attention(q, k, v, w_q, torch.randn(3, 16, 8), v_a)
    with pytest.raises(ValueError, match="same attention dim: 16 vs 12"):
        attnfast.additive_attention(q, k, v, w_q, torch.randn(12, 8), v_a)
    with pytest.raises(ValueError, match=r"v_a must be \(16,\) or \(2, 16\)"):
        attnfast.additive_attention(q, k, v, w_q, w_k, torch.randn(15))
    with pytest.raises(TypeError, match="w_q dtype torch.float64 must match"):
        attnfast.additive_attention(q, k, v, w_q.double(), w_k, v_a)
    with pytest.raises(ValueError, match="must share query's batch dims"):
        attnfast.additive_attention(q, k[:, :, :6], v, w_q, w_k, v_a)


@needs_ext
def test_opcheck_additive():
    """The fused additive op's fake kernel, schema and autograd registration (strided inputs)."""
    qp = torch.randn(2, 9, 3, 16).transpose(1, 2)
    kp = torch.randn(2, 13, 3, 16).transpose(1, 2)
    va = torch.randn(3, 16)
    v = torch.randn(2, 13, 3, 5).transpose(1, 2)
    bias = torch.randn(9, 13).expand(2, 3, 9, 13)
    for mask, causal in ((None, False), (bias, True)):
        args = (qp.requires_grad_(), kp.requires_grad_(), va.requires_grad_(), v.requires_grad_(), mask, causal)
        torch.library.opcheck(torch.ops.attnfast.additive_fwd.default, args)


@needs_ext
def test_additive_nan_reaches_only_its_row():
    q, k, v = torch.randn(1, 1, 6, 4), torch.randn(1, 1, 9, 4), torch.randn(1, 1, 9, 3)
    w = torch.randn(8, 4)
    q[0, 0, 2, 1] = float("nan")
    out = attnfast.additive_attention(q, k, v, w, w, torch.randn(8), backend="cpu")
    assert torch.isnan(out[0, 0, 2]).all()
    assert torch.isfinite(out[0, 0, [0, 1, 3, 4, 5]]).all()
