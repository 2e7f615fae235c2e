"""The Triton additive (Bahdanau) attention op against `additive_attention_ref` by the parity rule.

The op takes projected float32 inputs; the tests project q and k with
torch.matmul exactly as attnfast/variants.py does (half inputs upcast to
float32 first) and compare out, lse and the gradients of q, k, v, w_q, w_k and
v_a.  Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors
(small shapes: the interpreter is slow); with one, on CUDA tensors.
"""
import pytest
import torch

pytest.importorskip("triton")

from attnfast.reference import additive_attention_ref  # noqa: E402
from attnfast.testing import additive_score_scale  # noqa: E402
from cases import check_parity  # noqa: E402
from attnfast.triton_kernels import additive as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _bias(mask, cd):
    """The float bias the op takes for a bool (True = visible) or float mask, as variants.py builds it."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=cd, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(cd)


def _additive(q, k, v, w_q, w_k, v_a, mask=None, causal=False, bool_mask=False):
    """(out, lse) through the op, with projections (and float32 upcast) as in variants.py."""
    H, Lq = q.shape[-3], q.shape[-2]
    B, Lk, Da = q.shape[0], k.shape[-2], w_q.shape[-2]
    cd = torch.float32
    qp = torch.matmul(q.to(cd), w_q.to(cd).transpose(-1, -2))
    kp = torch.matmul(k.to(cd), w_k.to(cd).transpose(-1, -2))
    m = None
    if mask is not None:
        m = mask if bool_mask else _bias(mask, cd)
        m = m.expand(B, H, Lq, Lk)
    out, lse = torch.ops.attnfast.triton_additive_fwd(qp, kp, v_a.to(cd).expand(H, Da), v.to(cd), m, causal)
    return out.to(q.dtype), lse.float()  # the public API returns lse as float32 (float64 inside)


CASES = [  # (B, H, Lq, Lk, Eq, Ek, Ev, Da, per_head, mask, causal)
    (2, 2, 9, 13, 8, 6, 5, 12, True, None, False),  # Lq < Lk, Da and Ev not powers of two
    (1, 2, 19, 11, 16, 12, 16, 16, False, None, True),  # Lq > Lk, causal over several tiles
    (2, 1, 5, 21, 12, 4, 7, 24, False, "keypad", False),  # batch 0 sees no key
    (1, 2, 11, 7, 8, 8, 8, 12, True, "float", True),
    (1, 1, 1, 1, 4, 4, 4, 4, False, None, False),
    (1, 1, 13, 29, 8, 8, 9, 59, False, "float", False),  # Da 59 (padded to 64), Ev 9
]


def _inputs(case, dtype):
    B, H, Lq, Lk, Eq, Ek, Ev, Da, per_head, mask_kind, causal = case
    dev = DEVICE
    q, k, v = (torch.randn(B, H, Lq, Eq, device=dev), torch.randn(B, H, Lk, Ek, device=dev),
               torch.randn(B, H, Lk, Ev, device=dev))
    lead = (H,) if per_head else ()
    w_q = torch.randn(lead + (Da, Eq), device=dev) / Eq ** 0.5
    w_k = torch.randn(lead + (Da, Ek), device=dev) / Ek ** 0.5
    v_a = torch.randn(lead + (Da,), device=dev)
    mask = None
    if mask_kind == "keypad":
        mask = torch.rand(B, 1, 1, Lk, device=dev) > 0.3
        mask[0] = False  # batch 0: every key hidden, its rows give out 0 and lse -inf
    elif mask_kind == "float":
        mask = torch.randn(Lq, Lk, device=dev)
        mask[0, 1:] = float("-inf")  # a float mask hides too
    ins = [t.to(dtype) for t in (q, k, v, w_q, w_k, v_a)]
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dtype)
    return ins, mask, causal


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:8])) + f"-{c[9]}-{c[10]}")
def test_parity(case, dtype):
    if dtype == torch.bfloat16 and case[2] == 1:
        pytest.skip("the 1 x 1 case adds nothing in bfloat16")
    ins, mask, causal = _inputs(case, dtype)

    def run(*t):
        return _additive(*t, mask=mask, causal=causal)

    def ref(*t, upcast):
        return additive_attention_ref(*t, attn_mask=mask, is_causal=causal, upcast=upcast)

    check_parity(run, ref, ins, score_scale=additive_score_scale(*ins, mask))


def test_parity_bool_mask_and_strided_inputs():
    """A bool mask passed as is (True = visible), and q/k/v transposed from (B, L, H, E)."""
    B, H, Lq, Lk, E, Da = 2, 2, 10, 14, 8, 20
    q = torch.randn(B, Lq, H, E, device=DEVICE).transpose(1, 2)
    k = torch.randn(B, Lk, H, E, device=DEVICE).transpose(1, 2)
    v = torch.randn(B, Lk, H, 6, device=DEVICE).transpose(1, 2)
    ws = [torch.randn(H, Da, E, device=DEVICE) / E ** 0.5, torch.randn(Da, E, device=DEVICE) / E ** 0.5,
          torch.randn(H, Da, device=DEVICE)]
    mask = torch.rand(1, H, Lq, Lk, device=DEVICE) > 0.4
    mask[0, 1, 3] = False  # one dead row per batch in head 1

    def run(*t):
        return _additive(*t, mask=mask, causal=False, bool_mask=True)

    def ref(*t, upcast):
        return additive_attention_ref(*t, attn_mask=mask, upcast=upcast)

    check_parity(run, ref, [q, k, v, *ws], score_scale=additive_score_scale(q, k, v, *ws))


def test_dead_rows_have_no_nan_gradient():
    qp, kp = torch.randn(1, 1, 4, 8, device=DEVICE), torch.randn(1, 1, 6, 8, device=DEVICE)
    va, v = torch.randn(1, 8, device=DEVICE), torch.randn(1, 1, 6, 3, device=DEVICE)
    bias = torch.zeros(1, 1, 4, 6, device=DEVICE)
    bias[..., 2, :] = float("-inf")
    ins = [t.requires_grad_() for t in (qp, kp, va, v)]
    out, lse = torch.ops.attnfast.triton_additive_fwd(*ins, bias, False)
    assert torch.isneginf(lse[0, 0, 2]) and (out[0, 0, 2] == 0).all()
    g = torch.autograd.grad((out.sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()), ins)
    assert all(torch.isfinite(t).all() for t in g)
    assert (g[0][0, 0, 2] == 0).all()


def test_backward_is_deterministic():
    qp, kp = torch.randn(1, 2, 9, 8, device=DEVICE), torch.randn(1, 2, 11, 8, device=DEVICE)
    va, v = torch.randn(2, 8, device=DEVICE), torch.randn(1, 2, 11, 4, device=DEVICE)
    out, lse = torch.ops.attnfast.triton_additive_fwd(qp, kp, va, v, None, True)
    dout = torch.randn_like(out)
    a = torch.ops.attnfast.triton_additive_bwd(dout, qp, kp, va, v, None, True, out, lse, None)
    b = torch.ops.attnfast.triton_additive_bwd(dout, qp, kp, va, v, None, True, out, lse, None)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_tanh_accuracy():
    """The kernels' tanh against float64 tanh: within 2 float32 ulps of the result (the
    polynomial below 0.625, the compensated exp form above, both signs, arguments
    that round to +-1; 0.8 ulp with a correctly rounded exp, 1.2 with numpy's), and
    1 - tanh^2 within a few ulps relative (1 - t*t from the rounded t would be ~1e4
    ulps off at |x| = 6).  A GPU's exp (ex2.approx) errs more: looser bounds there."""
    import triton
    import triton.language as tl

    @triton.jit
    def _tanh_kernel(X, Y, S, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        t, sech2 = K._tanh_sech2(tl.load(X + offs, mask=offs < n))
        tl.store(Y + offs, t, mask=offs < n)
        tl.store(S + offs, sech2, mask=offs < n)

    x = torch.cat([torch.linspace(-1, 1, 4001), torch.linspace(-12, 12, 4001), torch.randn(2000) * 3,
                   torch.tensor([0.0, 1e-30, -1e-30, 0.625, -0.625, 0.62499997, 50.0, -50.0, 1e3])])
    x = x.to(DEVICE)
    y, sech2 = torch.empty_like(x), torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, sech2, x.numel(), BLOCK=1024)
    truth = torch.tanh(x.double())
    eps, tiny = torch.finfo(torch.float32).eps, torch.finfo(torch.float32).tiny
    ulp = 2.0 ** torch.floor(torch.log2(truth.abs().clamp_min(tiny))) * eps
    t_ulps, s_ulps = (1.5, 3.0) if DEVICE == "cpu" else (2.5, 8.0)
    assert ((y.double() - truth).abs() <= t_ulps * ulp).all()
    s_truth = 1 / torch.cosh(x.double()) ** 2
    keep = x.abs() <= 12
    assert ((sech2.double() - s_truth).abs()[keep] <= s_ulps * eps * s_truth[keep]).all()
    nan = torch.tensor([float("nan")], device=DEVICE)
    _tanh_kernel[(1,)](nan, y, sech2, 1, BLOCK=16)
    assert torch.isnan(y[0]) and torch.isnan(sech2[0])


def test_tiles():
    """GPU tile shapes: powers of two, BLOCK_M >= BLOCK_N, about TILE_ELEMENTS
    elements per (M, N, D) tile, never below 4 x 4."""
    for d in (2, 4, 8, 16, 32, 64, 128, 256):
        for dv in (2, 16, 256):
            bm, bn = K.tiles(d, dv)
            e = max(d, dv)
            assert bm & (bm - 1) == 0 and bn & (bn - 1) == 0 and bm >= bn >= 4
            assert bm * bn * e <= max(K.TILE_ELEMENTS, 16 * e)
            assert bm * bn == min(2048, max(16, K.TILE_ELEMENTS // e))


def test_opcheck():
    """Schema and autograd registration, with strided inputs and a broadcast bias.
    Fake-tensor tracing needs compiled kernels: the interpreter runs them eagerly
    on host memory, so those checks run on GPUs only."""
    qp = torch.randn(2, 9, 3, 16, device=DEVICE).transpose(1, 2)
    kp = torch.randn(2, 13, 3, 16, device=DEVICE).transpose(1, 2)
    va = torch.randn(3, 16, device=DEVICE)
    v = torch.randn(2, 13, 3, 5, device=DEVICE).transpose(1, 2)
    bias = torch.randn(9, 13, device=DEVICE).expand(2, 3, 9, 13)
    utils = ("test_schema", "test_autograd_registration")
    if DEVICE == "cuda":
        utils += ("test_faketensor", "test_aot_dispatch_dynamic")
    for mask, causal in ((None, False), (bias, True)):
        args = (qp.requires_grad_(), kp.requires_grad_(), va.requires_grad_(), v.requires_grad_(), mask, causal)
        torch.library.opcheck(torch.ops.attnfast.triton_additive_fwd.default, args, test_utils=utils)


def test_bad_input():
    qp, kp = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8)
    va, v = torch.randn(2, 8), torch.randn(1, 2, 7, 4)
    op = torch.ops.attnfast.triton_additive_fwd
    with pytest.raises(TypeError, match="qp must be float32"):
        op(qp.double(), kp, va, v, None, False)
    with pytest.raises(ValueError, match="shapes disagree"):
        op(qp, kp[..., :6], va, v, None, False)
    with pytest.raises(ValueError, match="shapes disagree"):
        op(qp, kp, va[:1], v, None, False)
    with pytest.raises(ValueError, match=r"does not broadcast to \(B, H, Lq, Lk\)"):
        op(qp, kp, va, v, torch.zeros(5, 6), False)
    with pytest.raises(TypeError, match="float bias or a bool mask"):
        op(qp, kp, va, v, torch.zeros(5, 7, dtype=torch.int32), False)
    with pytest.raises(ValueError, match="expected qp"):
        op(qp[0], kp, va, v, None, False)
