"""Parity of the Triton backend with the reference, by the rule in attnfast/testing.py.

On a machine without a GPU these run under TRITON_INTERPRET=1 on CPU tensors
(small shapes: the interpreter is slow); with a GPU they run on CUDA tensors.
"""
import pytest
import torch

import attnfast
from attnfast.testing import assert_parity, compare_with_reference
from cases import Case, make_inputs

pytestmark = pytest.mark.skipif(not attnfast.backends()["triton"].available,
                                reason="triton backend unavailable")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    Case(B=1, Hq=2, Hkv=2, Lq=17, Lk=17, E=64),
    Case(B=1, Hq=1, Hkv=1, Lq=1, Lk=1, E=40),
    Case(B=1, Hq=2, Hkv=2, Lq=37, Lk=83, E=59, Ev=40),
    Case(B=1, Hq=2, Hkv=2, Lq=83, Lk=37, E=96, Ev=24),
    Case(B=2, Hq=4, Hkv=2, Lq=70, Lk=70, E=32, causal=True),
    Case(B=1, Hq=3, Hkv=1, Lq=37, Lk=83, E=40, causal=True, align="bottom_right"),
    Case(B=1, Hq=2, Hkv=2, Lq=83, Lk=37, E=32, causal=True, align="bottom_right"),
    Case(B=1, Hq=2, Hkv=2, Lq=90, Lk=90, E=32, window=(9, 4)),
    Case(B=1, Hq=2, Hkv=2, Lq=70, Lk=90, E=32, window=(-1, 5), align="bottom_right"),
    # a band with whole (unmasked) tiles between masked edges on both sides
    Case(B=1, Hq=1, Hkv=1, Lq=300, Lk=330, E=32, window=(150, 70)),
    Case(B=2, Hq=2, Hkv=2, Lq=37, Lk=83, E=40, mask="bool", mask_bcast="heads", dead_rows=True),
    Case(B=2, Hq=2, Hkv=2, Lq=37, Lk=83, E=40, mask="float_grad", mask_bcast="batch"),
    Case(B=1, Hq=2, Hkv=1, Lq=70, Lk=140, E=32, mask="bool", mask_bcast="keypad", causal=True),
    Case(B=2, Hq=2, Hkv=2, Lq=37, Lk=53, E=111, noncontig=True),
    # block-structured masks over several list cells (64 x 64 under the interpreter)
    Case(B=2, Hq=1, Hkv=1, Lq=100, Lk=150, E=32, mask="bool", mask_bcast="docs"),
    Case(B=2, Hq=1, Hkv=1, Lq=150, Lk=100, E=40, mask="float_grad", mask_bcast="docs", window=(60, 20)),
    Case(B=1, Hq=1, Hkv=1, Lq=150, Lk=150, E=32, mask="float", mask_bcast="tril"),
]


def _to(dev, t):
    if t is None:
        return None
    out = t.detach().to(dev)
    return out.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_parity(case, dtype):
    q, k, v, m = (_to(DEVICE, t) for t in make_inputs(case, dtype))

    def run(q, k, v, m):
        return attnfast.attention(q, k, v, attn_mask=m, return_lse=True, backend="triton",
                                  **case.attention_kwargs())

    results = compare_with_reference(run, q, k, v, m, **case.ref_kwargs())
    assert_parity(results, f"{case.id()} {dtype}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_negative_scale(causal):
    """A negative scale: the forward's whole tiles take their row max from max(q.k) * scale,
    which only holds for a scale >= 0, so every tile takes the masked path then.  (Scores
    spread over ~200 in log2 units: a row max taken as the smallest score overflows exp2.)"""
    q = (16 * torch.randn(1, 2, 150, 32, device=DEVICE)).requires_grad_()
    k, v = (torch.randn(1, 2, 150, 32, device=DEVICE, requires_grad=True) for _ in range(2))

    def run(q, k, v, m):
        return attnfast.attention(q, k, v, return_lse=True, is_causal=causal, scale=-0.3, backend="triton")

    assert_parity(compare_with_reference(run, q, k, v, None, is_causal=causal, scale=-0.3), f"scale -0.3 {causal}")


def test_lse_gradient():
    q, k, v = (torch.randn(1, 2, 33, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    out, lse = attnfast.attention(q, k, v, return_lse=True, is_causal=True, backend="triton")
    r_out, r_lse = attnfast.attention_ref(q, k, v, is_causal=True)
    w = torch.randn_like(lse)
    g = torch.autograd.grad(out.sum() + (lse * w).sum(), (q, k, v))
    rg = torch.autograd.grad(r_out.sum() + (r_lse.float() * w).sum(), (q, k, v))
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5)


def test_opcheck():
    from attnfast.triton_kernels import attention  # noqa: F401  (registers the ops)

    q = torch.randn(1, 17, 2, 32, device=DEVICE).transpose(1, 2)
    k = torch.randn(1, 23, 2, 32, device=DEVICE).transpose(1, 2)
    v = torch.randn(1, 23, 2, 16, device=DEVICE).transpose(1, 2)
    m = torch.rand(17, 23, device=DEVICE) > 0.3
    # Fake-tensor tracing launches nothing, which the interpreter cannot do
    # (it runs kernels eagerly on host memory): on CPU only the schema test.
    utils = ("test_schema", "test_faketensor", "test_autograd_registration") if DEVICE == "cuda" else ("test_schema",)
    torch.library.opcheck(torch.ops.attnfast.triton_fwd.default,
                          (q, k, v, m.expand(1, 2, 17, 23), 0.2, -1, 0, True, 0.0, 0, 0), test_utils=utils)


def test_bwd_with_given_delta_splits_over_key_blocks():
    """Backward calls on key blocks with the whole rows' lse (strided: sliced from the whole
    call's) and delta add up to the whole backward (what ring attention relies on)."""
    from attnfast.triton_kernels import attention  # noqa: F401  (registers the ops)

    q = torch.randn(1, 2, 24, 16, device=DEVICE)
    k, v = (torch.randn(1, 1, 24, 16, device=DEVICE) for _ in range(2))
    dout = torch.randn(1, 2, 24, 16, device=DEVICE)
    out, lse = torch.ops.attnfast.triton_fwd(q, k, v, None, 0.25, -1, 0, False, 0.0, 0, 0)
    whole = torch.ops.attnfast.triton_bwd(dout, q, k, v, out, lse, None, None, 0.25, -1, 0, False, False,
                                          0.0, 0, 0)
    delta = (dout * out).sum(-1)
    # keys 0:12 are seen in full by rows 12:, causally by rows :12; keys 12: causally by rows 12:
    a = torch.ops.attnfast.triton_bwd(dout, q, k[:, :, :12], v[:, :, :12], out, lse, None, None, 0.25, -1, 0,
                                      False, False, 0.0, 0, 0, delta)
    r = slice(12, 24)
    b = torch.ops.attnfast.triton_bwd(dout[:, :, r], q[:, :, r], k[:, :, r], v[:, :, r], out[:, :, r],
                                      lse[:, :, r], None, None, 0.25, -1, 0, False, False, 0.0, 0, 0, delta[:, :, r])
    dq = a[0].clone()
    dq[:, :, r] += b[0]
    torch.testing.assert_close(dq, whole[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([a[1], b[1]], 2), whole[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([a[2], b[2]], 2), whole[2], rtol=0, atol=1e-5)


def test_rejects_what_it_cannot_serve():
    q = torch.randn(1, 2, 8, 16, device=DEVICE, dtype=torch.float64)
    with pytest.raises(attnfast.BackendUnavailableError, match="float64"):
        attnfast.attention(q, q, q, backend="triton")


try:  # the probes of test_saved_lse_...: jit functions of this module (they see its globals)
    import triton
    import triton.language as tl

    from attnfast.triton_kernels.common import lse_parts, row_lse

    @triton.jit
    def _row_lse_probe(M, L, LSE, HI, LO, N: tl.constexpr):
        i = tl.arange(0, N)
        lse = row_lse(tl.load(M + i), tl.load(L + i))
        tl.store(LSE + i, lse)
        hi, lo = lse_parts(lse)
        tl.store(HI + i, hi)
        tl.store(LO + i, lo)

    @triton.jit
    def _lse_parts_probe(X, HI, LO):
        i = tl.arange(0, 4)
        hi, lo = lse_parts(tl.load(X + i, mask=i < 3, other=float("inf")))  # row 3: past the end
        tl.store(HI + i, hi, mask=i < 3)
        tl.store(LO + i, lo, mask=i < 3)
except ImportError:  # no triton: the module's tests skip
    pass


def test_saved_lse_is_float64_to_float32_rounding_and_splits_exactly():
    """common.row_lse: m + log(l) as float64 from float32 m and l with float64 arithmetic
    only, within 1e-10 of torch's float64 (float32 storage alone would lose up to half an
    ulp of |lse|, ~2.4e-7 at |lse| ~ 4); common.lse_parts: hi + lo = lse to 48 bits, rows that
    see no key (-inf) or lie past Lq (+inf) get hi = +inf, lo = 0."""
    n = 1024
    m = (torch.randn(n, device=DEVICE) * 30).float()
    l = torch.exp(torch.rand(n, device=DEVICE) * 16).float().clamp_min(1.0)  # 1 .. 9e6, every binade
    l[:4] = torch.tensor([1.0, 2.0, 1.4142135, 1.4142137])  # the edges of the reduction
    lse, hi, lo = (torch.empty(n, device=DEVICE, dtype=d) for d in (torch.float64, torch.float32, torch.float32))
    _row_lse_probe[(1,)](m, l, lse, hi, lo, N=n)
    want = m.double() + torch.log(l.double())
    assert (lse - want).abs().max().item() <= 1e-10
    assert ((hi.double() + lo.double() - lse).abs() <= 1e-14 * lse.abs()).all()  # two float32s: 48 bits
    assert (want - want.float().double()).abs().max().item() > 1e-7  # what float32 storage would lose

    edge = torch.tensor([float("-inf"), float("inf"), 3.5], device=DEVICE, dtype=torch.float64)
    hi, lo = torch.empty(3, device=DEVICE), torch.empty(3, device=DEVICE)
    _lse_parts_probe[(1,)](edge, hi, lo)
    assert hi.tolist() == [float("inf"), float("inf"), 3.5] and lo.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("Lq,Lk,causal,window,dtype", [
    (1, 700, False, None, torch.float32),
    (4, 650, True, None, torch.float32),
    (16, 900, False, (40, 0), torch.float32),
    (2, 513, True, None, torch.bfloat16),
])
def test_split_kv_short_queries_match_reference(Lq, Lk, causal, window, dtype):
    """Short queries with fewer (batch, head) programs than SMs run the split-KV kernel (flash-
    decoding; the interpreter assumes INTERP_SMS SMs): forward and backward by the parity rule."""
    from attnfast.triton_kernels.attention import split_count

    B, Hq, Hkv, E = 1, 2, 1, 32
    assert split_count(B * Hq, Lk, torch.device(DEVICE)) > 1  # the split path is what runs
    q, k, v = (torch.randn(B, h, L, E, dtype=dtype, device=DEVICE) for h, L in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))

    def run(q, k, v, m):
        return attnfast.attention(q, k, v, is_causal=causal, causal_alignment="bottom_right", window=window,
                                  enable_gqa=True, return_lse=True, backend="triton")

    assert_parity(compare_with_reference(run, q, k, v, is_causal=causal, causal_alignment="bottom_right",
                                         window=window, enable_gqa=True))
