"""Triton hard (top-k) attention (triton_kernels/topk.py, ops attnfast::triton_topk_fwd/bwd)
against topk_attention_ref by the parity rule, and its choice of keys against topk_select.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (small shapes)."""
import pytest
import torch

from attnfast.reference import topk_attention_ref, topk_select
from attnfast.testing import score_scale
from cases import check_parity

pytest.importorskip("triton")
from attnfast.triton_kernels import topk as topk_kernels  # noqa: E402
from attnfast.triton_kernels.topk import triton_topk_attention  # noqa: E402  (registers the ops)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["buffer", "threshold"])
def select_path(request, monkeypatch):
    """The two selection kernels: the candidate buffer (top_k <= BITONIC_MAX_K) and the
    threshold search (larger top_k), forced here for small top_k."""
    if request.param == "threshold":
        monkeypatch.setattr(topk_kernels, "BITONIC_MAX_K", 0)
    return request.param


CASES = [  # (B, Hq, Hkv, Lq, Lk, E, Ev, top_k, mask, causal, noncontig)
    (1, 4, 2, 9, 70, 16, 8, 5, None, False, False),        # GQA, Lq < Lk, two key tiles of 64
    (2, 2, 2, 17, 17, 16, 16, 1, None, True, False),       # top_k = 1, causal
    (1, 2, 1, 20, 12, 24, 12, 12, None, True, True),       # top_k = Lk, Lq > Lk, strided inputs
    (2, 2, 1, 11, 40, 20, 12, 19, "keypad", False, False),  # fewer visible keys than top_k; batch 0 sees none
    (2, 2, 2, 13, 30, 12, 20, 6, "rows", False, False),    # one fully hidden row, mask broadcast over heads
    (1, 2, 2, 33, 45, 40, 24, 37, "float", True, False),   # float mask, top_k > one chunk, not a power of 2
    (1, 1, 1, 5, 150, 8, 5, 100, "keypad", False, False),  # buffer of 128 keys over two tiles
]


FLOAT16_CASES = (0, 3, 5)


def _make(case, dtype):
    B, Hq, Hkv, Lq, Lk, E, Ev, top_k, mask_kind, causal, noncontig = case
    if noncontig:  # (B, L, H, D) storage seen as (B, H, L, D)
        q = torch.randn(B, Lq, Hq, E).transpose(1, 2)
        k, v = torch.randn(B, Lk, Hkv, E).transpose(1, 2), torch.randn(B, Lk, Hkv, Ev).transpose(1, 2)
    else:
        q, k, v = torch.randn(B, Hq, Lq, E), torch.randn(B, Hkv, Lk, E), torch.randn(B, Hkv, Lk, Ev)
    mask = None
    if mask_kind == "keypad":
        mask = torch.rand(B, 1, 1, Lk) > 0.6
        mask[0] = False
    elif mask_kind == "rows":
        mask = torch.rand(B, 1, Lq, Lk) > 0.3
        mask[1, 0, 4] = False
    elif mask_kind == "float":
        mask = torch.randn(Lq, Lk).to(dtype)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return [to(t.to(dtype)) for t in (q, k, v)], to(mask), top_k, causal


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_parity(case, dtype):
    if dtype == torch.float16 and CASES.index(case) not in FLOAT16_CASES:
        pytest.skip("float16 differs from bfloat16 only in rounding (both upcast on load): three cases cover it")
    ins, mask, top_k, causal = _make(case, dtype)

    def run(q, k, v):
        return triton_topk_attention(q, k, v, top_k, mask=mask, causal=causal)

    def ref(q, k, v, upcast):
        return topk_attention_ref(q, k, v, top_k, attn_mask=mask, is_causal=causal, enable_gqa=True,
                                  upcast=upcast)

    check_parity(run, ref, ins, score_scale=score_scale(ins[0], ins[1], mask, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [3, 5], ids=["case3", "case5"])
def test_parity_threshold_path(case, dtype, monkeypatch):
    monkeypatch.setattr(topk_kernels, "BITONIC_MAX_K", 0)
    test_parity(CASES[case], dtype)


def test_lse_gradient():
    ins, mask, top_k, causal = _make((2, 2, 1, 11, 40, 20, 12, 9, "keypad", True, False), torch.float32)
    w = torch.randn(2, 2, 11, device=DEVICE)

    def run(q, k, v):
        return triton_topk_attention(q, k, v, top_k, mask=mask, causal=causal)

    def ref(q, k, v, upcast):
        return topk_attention_ref(q, k, v, top_k, attn_mask=mask, is_causal=causal, enable_gqa=True,
                                  upcast=upcast)

    check_parity(run, ref, ins, lse_weight=w, score_scale=score_scale(ins[0], ins[1], mask, None))


def _chosen(idx, Lk):
    """(..., Lk) bool of the keys listed in idx (-1: none)."""
    hit = torch.zeros(idx.shape[:-1] + (Lk + 1,), dtype=torch.bool, device=idx.device)
    return hit.scatter_(-1, idx.long() % (Lk + 1), True)[..., :Lk]


@pytest.mark.parametrize("mask_kind,causal", [(None, False), ("keypad", True), ("float", False)])
def test_idx_is_topk_select(mask_kind, causal, select_path):
    """idx holds exactly topk_select's keys (ties to the lower index), best first on the
    buffer path and in key order on the threshold path, -1 only at the end.  Inputs on a
    grid of quarters make every score exact in float32 and float64 alike, and ties
    frequent."""
    B, Hq, Hkv, Lq, Lk, E, top_k = 1, 2, 1, 21, 100, 16, 13
    grid = lambda *s: torch.randint(-4, 5, s).float() / 4  # noqa: E731
    q, k, v = grid(B, Hq, Lq, E), grid(B, Hkv, Lk, E), torch.randn(B, Hkv, Lk, 4)
    mask = None
    if mask_kind == "keypad":
        mask = torch.rand(B, 1, 1, Lk) > 0.5
    elif mask_kind == "float":
        mask = grid(Lq, Lk)
    m4 = None if mask is None else mask.expand(B, Hq, Lq, Lk).to(DEVICE)
    _, _, idx = torch.ops.attnfast.triton_topk_fwd(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), m4, causal, 0.5,
                                                  top_k)
    idx = idx.cpu()
    s = torch.matmul(q.double(), k.double().repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) * 0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool).triu(1), float("-inf"))
    want = topk_select(s, top_k)
    assert torch.equal(_chosen(idx, Lk), want)
    assert torch.equal((idx >= 0).sum(-1), want.sum(-1))
    if select_path == "buffer":  # best first, ties by index: the order of a stable descending sort
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :top_k]
    else:  # key order
        order = torch.sort(torch.where(want, torch.arange(Lk), Lk), dim=-1).values[..., :top_k]
    assert torch.equal(torch.where(idx >= 0, idx.long(), -1), torch.where(idx >= 0, order, -1))


def test_exact_ties_go_to_the_lower_index(select_path):
    q = torch.zeros(1, 1, 4, 8, device=DEVICE)  # every score 0
    k, v = torch.randn(1, 1, 150, 8, device=DEVICE), torch.randn(1, 1, 150, 3, device=DEVICE)
    mask = torch.ones(1, 1, 4, 150, dtype=torch.bool, device=DEVICE)
    mask[0, 0, 1, [0, 2]] = False  # row 1: keys 0 and 2 hidden
    mask[0, 0, 2] = False  # row 2 sees nothing
    mask[0, 0, 3, :147] = False  # row 3 sees 3 keys, fewer than top_k
    out, lse, idx = torch.ops.attnfast.triton_topk_fwd(q, k, v, mask, False, 0.3, 5)
    assert idx[0, 0].tolist() == [[0, 1, 2, 3, 4], [1, 3, 4, 5, 6], [-1] * 5, [147, 148, 149, -1, -1]]
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, :5].mean(0))
    assert out[0, 0, 2].eq(0).all() and lse[0, 0, 2] == float("-inf")
    # duplicated keys: equal scores at indices r, r + 8, r + 16, ... (quarters: exact
    # scores, so equal keys tie exactly whatever the summation order)
    k8 = (torch.randint(-4, 5, (1, 1, 8, 8), device=DEVICE) / 4).repeat(1, 1, 20, 1)
    q1 = torch.randint(-4, 5, (1, 1, 3, 8), device=DEVICE) / 4
    _, _, idx = torch.ops.attnfast.triton_topk_fwd(q1, k8, k8, None, False, 0.5, 13)
    s8 = (q1 @ k8.transpose(-1, -2)).cpu() * 0.5
    best = torch.sort(s8, dim=-1, descending=True, stable=True).indices[..., :13]
    if select_path == "threshold":  # key order
        best = best.sort(-1).values
    assert torch.equal(idx.cpu().long(), best)


def test_dead_rows_have_no_nan_gradient():
    q, k, v = (torch.randn(1, 1, 4, 8, device=DEVICE, requires_grad=True) for _ in range(3))
    mask = torch.zeros(4, 4, dtype=torch.bool, device=DEVICE)  # nothing visible anywhere
    out, lse = triton_topk_attention(q, k, v, 2, mask=mask)
    assert out.eq(0).all() and torch.isneginf(lse).all()
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    for t in (q, k, v):
        assert t.grad.eq(0).all()


def test_backward_is_straight_through():
    """Keys outside every row's top-k get exactly zero dk and dv; GQA heads add up."""
    q = torch.randn(1, 4, 6, 8, device=DEVICE)
    k = torch.randn(1, 2, 90, 8, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 2, 90, 4, device=DEVICE, requires_grad=True)
    out, _ = triton_topk_attention(q, k, v, 3)
    out.sum().backward()
    _, _, idx = torch.ops.attnfast.triton_topk_fwd(q, k.detach(), v.detach(), None, False, 8 ** -0.5, 3)
    chosen = _chosen(idx, 90).view(1, 2, 2 * 6, 90).any(-2)  # (1, Hkv, Lk): chosen by some row of the group
    assert chosen.sum() < 90 * 2
    assert k.grad[~chosen].eq(0).all() and v.grad[~chosen].eq(0).all()
    assert (v.grad[chosen].abs().sum(-1) > 0).all()


def test_opcheck():
    """Schema, fake kernel and autograd registration of the forward op (strided inputs).
    (Not test_aot_dispatch_dynamic: under the interpreter, common.launcher leaves the kernels
    out of the traced graph, so the traced op computes nothing.)"""
    q = torch.randn(1, 9, 2, 16, device=DEVICE).transpose(1, 2)
    k = torch.randn(1, 13, 1, 16, device=DEVICE).transpose(1, 2)
    v = torch.randn(1, 13, 1, 5, device=DEVICE).transpose(1, 2)
    bias = torch.randn(9, 13, device=DEVICE).expand(1, 2, 9, 13)
    for mask, causal in ((None, True), (bias, False), (bias > 0, False)):
        args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, causal, 0.3, 4)
        torch.library.opcheck(torch.ops.attnfast.triton_topk_fwd.default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_bad_input():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 4)
    fwd = torch.ops.attnfast.triton_topk_fwd
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, Lk\] = \[1, 7\], got 0"):
        fwd(q, k, v, None, False, 0.5, 0)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, Lk\] = \[1, 7\], got 8"):
        fwd(q, k, v, None, False, 0.5, 8)
    with pytest.raises(ValueError, match=r"query heads \(2\) must be a multiple of key/value heads \(3\)"):
        fwd(q, torch.randn(1, 3, 7, 8), torch.randn(1, 3, 7, 4), None, False, 0.5, 2)
    with pytest.raises(TypeError, match="must be float16, bfloat16 or float32"):
        fwd(q.double(), k.double(), v.double(), None, False, 0.5, 2)
    with pytest.raises(ValueError, match=r"mask must be expanded to \(B, Hq, Lq, Lk\)"):
        fwd(q, k, v, torch.ones(5, 7, dtype=torch.bool), False, 0.5, 2)
    with pytest.raises(TypeError, match="mask must be bool or q's dtype"):
        fwd(q, k, v, torch.zeros(1, 2, 5, 7, dtype=torch.float16), False, 0.5, 2)
    with pytest.raises(ValueError, match="does not broadcast"):
        triton_topk_attention(q, k, v, 2, mask=torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="k must be"):
        triton_topk_attention(q, k[..., :6], v, 2)
    with pytest.raises(ValueError, match="q must be a 4-D tensor"):
        triton_topk_attention(q[0], k, v, 2)
