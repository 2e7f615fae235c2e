"""Dropout: the kernel's mask is Philox-regenerated; tests rebuild it exactly."""
import math

import pytest
import torch

import attnfast
from attnfast.testing import compare_with_reference, dropout_mask
from cases import Case, make_inputs

BACKENDS = [b for b in ("cpu", "triton", "reference") if attnfast.backends()[b].available]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_binomial_bounds(p):
    shape = (2, 3, 97, 211)
    m = dropout_mask(shape, p)
    n = m.numel()
    kept = int((m > 0).sum())
    mean, sd = n * (1 - p), math.sqrt(n * p * (1 - p))
    assert abs(kept - mean) < 5 * sd, (kept, mean, sd)
    assert torch.allclose(m[m > 0], torch.full_like(m[m > 0], 1 / (1 - p)))
    # Different calls draw different masks; rows and heads are not copies.
    assert not torch.equal(m, dropout_mask(shape, p))
    assert not torch.equal(m[0, 0], m[0, 1]) and not torch.equal(m[0, 0, 0], m[0, 0, 1])


DROPOUT_CASES = [
    Case(Lq=113, Lk=203, E=59),
    Case(Hq=4, Hkv=2, Lq=203, Lk=113, E=40, causal=True, align="bottom_right"),
    Case(Lq=113, Lk=113, E=64, mask="float_grad", mask_bcast="heads", dead_rows=True),
    Case(B=1, Hq=4, Hkv=2, Lq=2, Lk=1100, E=40),  # the CPU's decode path, keys in splits
]
# The Triton interpreter is slow: the same cases at about half the size.
DROPOUT_CASES_SMALL = [
    Case(B=1, Lq=57, Lk=101, E=59),
    Case(B=1, Hq=4, Hkv=2, Lq=101, Lk=57, E=40, causal=True, align="bottom_right"),
    Case(Lq=57, Lk=70, E=64, mask="float_grad", mask_bcast="heads", dead_rows=True),
]
PAIRS = [(b, c) for b in BACKENDS
         for c in (DROPOUT_CASES_SMALL if b == "triton" and not torch.cuda.is_available() else DROPOUT_CASES)]


@pytest.mark.parametrize("backend,case", PAIRS, ids=[f"{b}-{c.id()}" for b, c in PAIRS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_dropout_matches_reference_with_rebuilt_mask(case, dtype, backend, fresh_seed):
    p = 0.3
    q, k, v, m = make_inputs(case, dtype)
    shape = (case.B, case.Hq, case.Lq, case.Lk)

    def run(q, k, v, m):
        torch.manual_seed(fresh_seed + 1)
        return attnfast.attention(q, k, v, attn_mask=m, dropout_p=p, return_lse=True, backend=backend,
                                  **case.attention_kwargs())

    torch.manual_seed(fresh_seed + 1)
    dm = dropout_mask(shape, p)
    results = compare_with_reference(run, q, k, v, m, dropout_mask=dm, **case.ref_kwargs())
    bad = [r for r in results if not r.ok]
    assert not bad, "; ".join(map(repr, bad))


def test_sdpa_dropout_draws_fresh_masks():
    q, k, v = (torch.randn(1, 2, 64, 32) for _ in range(3))
    a = attnfast.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    b = attnfast.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert not torch.equal(a, b)
    torch.manual_seed(7)
    c = attnfast.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(7)
    d = attnfast.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(c, d)


def test_philox_matches_known_answer():
    """Philox4x32-10 known-answer vectors (Random123's kat_vectors)."""
    from attnfast.testing import philox_first_word

    t = lambda x: torch.tensor([x], dtype=torch.int64)  # noqa: E731
    # counter 0, key 0 -> 6627e8d5 ...
    assert philox_first_word(t(0), t(0), t(0), t(0), t(0), t(0)).item() == 0x6627E8D5
    # counter ffffffff x4, key ffffffff x2 -> 408f276d ...
    f = 0xFFFFFFFF
    assert philox_first_word(t(f), t(f), t(f), t(f), t(f), t(f)).item() == 0x408F276D
    # pi digits: counter 243f6a88 85a308d3 13198a2e 03707344, key a4093822 299f31d0 -> d16cfe09
    assert philox_first_word(t(0x243F6A88), t(0x85A308D3), t(0x13198A2E), t(0x03707344),
                             t(0xA4093822), t(0x299F31D0)).item() == 0xD16CFE09
