"""varlen_attention: packed sequences without padding, on each backend."""
import pytest
import torch

import attnfast
from attnfast.testing import compare_with_reference

BACKENDS = [b for b in ("cpu", "triton") if attnfast.backends()[b].available]


def _packed(lens_q, lens_k, Hq, Hkv, E, Ev, dtype):
    q = torch.randn(sum(lens_q), Hq, E, dtype=dtype)
    k = torch.randn(sum(lens_k), Hkv, E, dtype=dtype)
    v = torch.randn(sum(lens_k), Hkv, Ev, dtype=dtype)
    cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0).tolist()), dtype=torch.int32)  # noqa: E731
    return q, k, v, cu(lens_q), cu(lens_k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,align,window", [(False, "top_left", None), (True, "bottom_right", None),
                                                (False, "top_left", (7, 2))])
def test_varlen_matches_reference_per_sequence(backend, causal, align, window):
    lens_q, lens_k = [5, 33, 1, 17], [9, 20, 4, 17]
    q, k, v, cq, ck = _packed(lens_q, lens_k, 4, 2, 32, 24, torch.float32)
    out, lse = attnfast.varlen_attention(q, k, v, cq, ck, max(lens_q), max(lens_k), is_causal=causal,
                                         causal_alignment=align, window=window, return_lse=True,
                                         backend=backend)
    assert out.shape == (sum(lens_q), 4, 24) and lse.shape == (4, sum(lens_q))
    for i in range(len(lens_q)):
        a, b, c, d = cq[i], cq[i + 1], ck[i], ck[i + 1]
        qi, ki, vi = (t.transpose(0, 1) for t in (q[a:b], k[c:d], v[c:d]))

        def run(qq, kk, vv, m, a=a, b=b):
            return out[a:b].transpose(0, 1), lse[:, a:b]

        res = compare_with_reference(run, qi, ki, vi, None, grads=False, is_causal=causal,
                                     causal_alignment=align, window=window, enable_gqa=True)
        assert all(r.ok for r in res), (i, res)


def test_varlen_gradients_flow():
    q, k, v, cq, ck = _packed([3, 6], [4, 6], 2, 2, 16, 16, torch.float64)
    for t in (q, k, v):
        t.requires_grad_()
    torch.autograd.gradcheck(
        lambda q, k, v: attnfast.varlen_attention(q, k, v, cq, ck, 6, 6, is_causal=True, backend="cpu"),
        (q, k, v), atol=1e-6, fast_mode=True)


def test_varlen_bad_input():
    q, k, v, cq, ck = _packed([3, 6], [4, 6], 2, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        attnfast.varlen_attention(q, k, v, torch.tensor([1, 3, 9], dtype=torch.int32), ck, 6, 6)
    with pytest.raises(ValueError, match="max_seqlen"):
        attnfast.varlen_attention(q, k, v, cq, ck, 2, 6)
    with pytest.raises(ValueError, match="packed"):
        attnfast.varlen_attention(q[None], k, v, cq, ck, 6, 6)
    with pytest.raises(TypeError, match="cu_seqlens_k"):
        attnfast.varlen_attention(q, k, v, cq, ck.float(), 6, 6)
