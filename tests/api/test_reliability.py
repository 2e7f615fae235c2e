"""Reliability of the CPU path: hostile and extreme inputs, 64-bit sizes, determinism,
concurrency, memory at long lengths, and graceful degradation.

What "correct" means for non-finite inputs (documented in README, "Reliability"):
a NaN or inf in query row i or key row j makes exactly the output rows non-finite
that the reference makes so (those whose softmax sees it).  A NaN or inf in value
row j reaches every row that sees key j; a row that hides key j may get it too
where j lies in a key tile the row visits (0 * NaN in the P @ V product, as in the
naive reference, which spreads it to every row); tiles a row hides whole are never
read.
"""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import attnfast
from attnfast.reference import attention_ref, visible_mask
from attnfast.testing import compare_with_reference

ROOT = Path(__file__).resolve().parents[2]


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# ---------------------------------------------------------------------------
# The binding checks every argument before touching memory (direct op calls,
# bypassing the Python validation).
# ---------------------------------------------------------------------------
def _op_args(**over):
    q, k, v = _rand(1, 2, 8, 16), _rand(1, 2, 8, 16), _rand(1, 2, 8, 16)
    args = dict(q=q, k=k, v=v, attn_mask=None, scale=0.25, window_left=-1, window_right=-1,
                bottom_right=False, dropout_p=0.0, rng=None)
    args.update(over)
    return args


BAD_OP_CALLS = {
    "q 3-D": dict(q=_rand(2, 8, 16)),
    "k batch": dict(k=_rand(2, 2, 8, 16)),
    "v length": dict(v=_rand(1, 2, 7, 16)),
    "k head dim": dict(k=_rand(1, 2, 8, 15)),
    "heads not dividing": dict(q=_rand(1, 3, 8, 16)),
    "dtype mix": dict(k=_rand(1, 2, 8, 16, dtype=torch.float64)),
    "mask not expanded": dict(attn_mask=torch.ones(8, 8, dtype=torch.bool)),
    "mask wrong extent": dict(attn_mask=torch.ones(1, 2, 8, 9, dtype=torch.bool)),
    "float mask dtype": dict(attn_mask=torch.zeros(1, 2, 8, 8, dtype=torch.float64)),
    "dropout without rng": dict(dropout_p=0.5),
    "dropout out of range": dict(dropout_p=1.0, rng=torch.zeros(2, dtype=torch.long)),
}


@pytest.mark.parametrize("name", list(BAD_OP_CALLS))
def test_binding_rejects_bad_arguments(name):
    with pytest.raises(RuntimeError, match="attnfast cpu"):
        torch.ops.attnfast.fwd(**_op_args(**BAD_OP_CALLS[name]))


def test_binding_rejects_bad_backward_arguments():
    a = _op_args()
    out, lse = torch.ops.attnfast.fwd(**a)
    common = dict(attn_mask=None, scale=0.25, window_left=-1, window_right=-1, bottom_right=False,
                  dropout_p=0.0, rng=None, mask_grad=False)
    bad = {
        "lse dtype": dict(lse=lse.float()),
        "lse shape": dict(lse=lse[:, :, :4]),
        "dout shape": dict(dout=out[:, :, :4]),
        "mask_grad without float mask": dict(mask_grad=True),
    }
    for name, over in bad.items():
        kw = dict(dout=torch.randn_like(out), q=a["q"], k=a["k"], v=a["v"], out=out, lse=lse, dlse=None, **common)
        kw.update(over)
        with pytest.raises(RuntimeError, match="attnfast cpu"):
            torch.ops.attnfast.bwd(**kw)


# ---------------------------------------------------------------------------
# Non-finite inputs reach exactly the rows that see them.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nonfinite_inputs_reach_exactly_the_rows_that_see_them(where, bad, causal):
    B, H, L, D = 1, 2, 150, 32
    q, k, v = (_rand(B, H, L, D) for _ in range(3))
    row = 70
    x = {"q": q, "k": k, "v": v}
    x[where][0, 1, row, 3] = bad
    keep = torch.rand(L, L) > 0.2
    keep[:, row] &= torch.arange(L) % 2 == 0  # some rows hide the bad key
    out = attnfast.attention(q, k, v, attn_mask=keep, is_causal=causal)
    sees = keep & visible_mask(L, L, is_causal=True) if causal else keep
    ref, _ = attention_ref(q.double(), k.double(), v.double(), keep, is_causal=causal)
    bad_rows = ~torch.isfinite(out[0, 1]).all(-1)
    if where == "v":
        # Every row that sees key `row` weighs its value row (P > 0), so it must be
        # non-finite.  A row that hides the key may be too, where the key falls in a
        # tile it visits (0 * NaN in the P @ V product, as in the naive reference, whose
        # non-finite rows bound ours from above); tiles a row hides whole are never read.
        must = sees[:, row]
        ref_bad = ~torch.isfinite(ref[0, 1]).all(-1)
        assert (bad_rows >= must).all() and (bad_rows <= ref_bad).all()
        tainted = bad_rows
        clean = v.clone()
        clean[0, 1, row] = 0.0
        ref, _ = attention_ref(q.double(), k.double(), clean.double(), keep, is_causal=causal)
    else:
        # A bad query or key makes a score +-inf or NaN: the rows whose softmax that
        # breaks are exactly the reference's non-finite rows.
        tainted = ~torch.isfinite(ref[0, 1]).all(-1)
        assert tainted[row] if where == "q" else tainted.any()
        assert (bad_rows == tainted).all(), "non-finite rows differ from the rows that see the bad value"
    torch.testing.assert_close(out[0, 1, ~tainted].double(), ref[0, 1, ~tainted], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0, 0].double(), ref[0, 0], rtol=1e-4, atol=1e-5)


def test_huge_logits_stay_finite_and_correct():
    """Scores of magnitude ~1e4: the online softmax must not overflow (lse finite, rows sum to 1)."""
    torch.manual_seed(1)
    q, k, v = (_rand(2, 2, 97, 16) for _ in range(3))
    q = q * 50.0
    k = k * 50.0  # q.k ~ N(0, 2500^2 * 16): |s| up to ~1e4 after the 1/4 scale
    res = compare_with_reference(lambda q, k, v, m: attnfast.attention(q, k, v, return_lse=True), q, k, v)
    assert all(r.ok for r in res), res
    out, lse = attnfast.attention(q, k, v, return_lse=True)
    assert torch.isfinite(lse).all() and lse.abs().max() > 1e3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_inputs_near_the_top_of_their_range(dtype):
    """q.k far beyond fp16's 65504 and v near its top: fp32 accumulation, finite output."""
    top = torch.finfo(torch.float16).max
    q = (_rand(1, 2, 64, 64) * 200).clamp(-top, top).to(dtype)
    k = (_rand(1, 2, 64, 64) * 200).clamp(-top, top).to(dtype)
    v = (torch.rand(1, 2, 64, 64) * 2 - 1).mul(0.9 * top).to(dtype)
    out, lse = attnfast.attention(q, k, v, scale=1.0, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), scale=1.0)
    rel = (out.double() - ref).abs().max() / ref.abs().max()
    assert rel < 2 * torch.finfo(dtype).eps * 4, rel  # a few roundings of the output dtype
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=0)


def test_lse_finite_wherever_a_row_sees_a_key():
    q, k, v = (_rand(1, 3, 50, 8) for _ in range(3))
    keep = torch.rand(1, 3, 50, 50) > 0.97  # sparse: some rows see nothing
    _, lse = attnfast.attention(q, k, v, attn_mask=keep, return_lse=True)
    alive = keep.any(-1)
    assert torch.isfinite(lse[alive]).all()
    assert torch.isneginf(lse[~alive]).all()


# ---------------------------------------------------------------------------
# Index arithmetic past 2^31 elements: Lq * Lk > 2^31 with a tiny head dim.
# ---------------------------------------------------------------------------
def test_score_count_past_two_to_the_31():
    L = 46_341  # L * L = 2_147_488_281 > 2^31
    torch.manual_seed(0)
    q, k, v = (_rand(1, 1, L, 2) for _ in range(3))
    q.requires_grad_()
    out = attnfast.attention(q, k, v, is_causal=True)
    rows = torch.tensor([0, 1, 12_345, 46_339, 46_340])
    g = torch.randn_like(out)
    (dq,) = torch.autograd.grad(out, q, g)
    # The reference on the sampled rows (a causal row i sees keys 0..i).
    for i in rows.tolist():
        qi = q.detach()[:, :, i:i + 1].double().requires_grad_()
        s = (qi @ k[:, :, :i + 1].double().transpose(-1, -2)) * (2 ** -0.5)
        o = torch.softmax(s, -1) @ v[:, :, :i + 1].double()
        (dqi,) = torch.autograd.grad(o, qi, g[:, :, i:i + 1].double())
        torch.testing.assert_close(out[:, :, i:i + 1].double(), o, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dq[:, :, i:i + 1].double(), dqi, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------
# Determinism and concurrency.
# ---------------------------------------------------------------------------
def _fwd_bwd(q, k, v, mask=None, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attnfast.attention(q, k, v, attn_mask=mask, **kw)
    g = torch.ones_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    return out, dq, dk, dv


@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(enable_gqa=True)], ids=["full", "causal", "gqa"])
def test_cpu_forward_and_backward_are_bitwise_repeatable(kw):
    Hkv = 1 if kw.get("enable_gqa") else 4
    q, k, v = _rand(2, 4, 300, 40), _rand(2, Hkv, 333, 40), _rand(2, Hkv, 333, 40)
    first = _fwd_bwd(q, k, v, **kw)
    for _ in range(3):
        again = _fwd_bwd(q, k, v, **kw)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_cpu_results_do_not_depend_on_the_thread_count():
    """Work is split over (batch, head, query block) for the forward and key
    blocks for the backward, with fixed summation order inside each item, so the
    thread count changes only who computes an item, not how."""
    q, k, v = _rand(1, 2, 500, 64), _rand(1, 2, 500, 64), _rand(1, 2, 500, 64)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _fwd_bwd(q, k, v, is_causal=True)
        torch.set_num_threads(max(2, n))
        many = _fwd_bwd(q, k, v, is_causal=True)
    finally:
        torch.set_num_threads(n)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_eight_python_threads_at_once():
    shapes = [(1 + i % 2, 1 + i % 3, 40 + 37 * i, 16 + 8 * (i % 4)) for i in range(8)]
    inputs = [tuple(_rand(*s) for _ in range(3)) for s in shapes]
    expected = [_fwd_bwd(*x, is_causal=i % 2 == 0) for i, x in enumerate(inputs)]
    got, errors = [None] * 8, []
    start = threading.Barrier(8)

    def work(i):
        try:
            start.wait()
            for _ in range(3):
                got[i] = _fwd_bwd(*inputs[i], is_causal=i % 2 == 0)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((i, e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for i in range(8):
        for a, b in zip(expected[i], got[i]):
            assert torch.equal(a, b), f"thread {i}: shape {shapes[i]}"


# ---------------------------------------------------------------------------
# Memory: forward + backward at L = 16384 grows resident memory by O(L).
# ---------------------------------------------------------------------------
def _probe(L, mode="fwdbwd"):
    # Causal halves the time; the kernel's scratch does not depend on the mask (measured at
    # L=16384: dense 144.9 MiB, causal 144.7 MiB).
    cmd = [sys.executable, "-m", "attnfast.bench.memprobe", "--peer", "attnfast", "--L", str(L), "--B", "1", "--H", "4",
           "--D", "64", "--mode", mode, "--causal"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_memory_at_16k_is_linear_and_a_small_fraction_of_the_naive_scores():
    naive_scores_mib = 1 * 4 * 16384 * 16384 * 4 / 2**20  # one fp32 L x L matrix per head: 4096 MiB
    big = _probe(16384)
    half = _probe(8192)
    assert big["peak_reset"], big
    assert big["peak_mib"] <= 0.10 * naive_scores_mib, big
    # O(L): doubling L at most ~doubles the growth (O(L^2) would quadruple it); small absolute
    # slack for the allocator's granularity.
    assert big["peak_mib"] <= 2.5 * half["peak_mib"] + 16, (half, big)


# ---------------------------------------------------------------------------
# Degradation: no extension, or a CPU without AVX-512.
# ---------------------------------------------------------------------------
_NO_EXTENSION = r"""
import sys, warnings
sys.modules["attnfast._C"] = None          # as if the extension had failed to build
import torch, attnfast
st = attnfast.backends()["cpu"]
assert not st.available and "not built" in st.reason, st
q, k, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    a = attnfast.scaled_dot_product_attention(q, k, v, is_causal=True)
    b = attnfast.attention(q, k, v, is_causal=True)
ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
torch.testing.assert_close(a, ref)
torch.testing.assert_close(b, ref)
deg = [x for x in w if issubclass(x.category, attnfast.DegradedWarning)]
assert len(deg) == 1 and "naive reference" in str(deg[0].message), [str(x.message) for x in w]
print("ok")
"""

_ISA = r"""
import warnings, torch, attnfast
from attnfast import ops
q, k, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    for _ in range(3):
        attnfast.attention(q, k, v)
deg = [str(x.message) for x in w if issubclass(x.category, attnfast.DegradedWarning)]
best = ops._C.cpu_isa_best()
# AVX2 and AVX-512 are first-class paths: only the portable path is a degradation.
assert len(deg) == (1 if best == "default" else 0), (best, deg)
reason = attnfast.backends()["cpu"].reason
assert ops._C.cpu_isa() in reason and (best != "default" or "lacks AVX2" in reason), reason
print(best)
"""


def _run_py(code):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ATTNFAST_CPU_ISA")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_without_the_extension_calls_fall_back_with_one_warning():
    r = _run_py(_NO_EXTENSION)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_only_a_cpu_without_avx2_warns_once():
    r = _run_py(_ISA)
    assert r.returncode == 0, r.stderr[-3000:]


def test_triton_nan_query_row_reaches_exactly_that_row():
    """The same rule in the Triton kernels (interpreter on CPU tensors)."""
    if not attnfast.backends()["triton"].available:
        pytest.skip(attnfast.backends()["triton"].reason)
    q, k, v = (_rand(1, 2, 70, 32) for _ in range(3))
    q[0, 1, 33, 5] = float("nan")
    out, lse = attnfast.attention(q, k, v, return_lse=True, backend="triton")
    bad = ~torch.isfinite(out).all(-1)
    expected = torch.zeros_like(bad)
    expected[0, 1, 33] = True
    assert torch.equal(bad, expected) and torch.isnan(lse[0, 1, 33]) and torch.isfinite(lse[~expected]).all()


def test_lse_floor_follows_the_scores_rounding_scale_and_still_catches_errors():
    """The lse floor scales with |scale| * sum|q k| (the rounding scale of a score), so a
    1 x 1 problem's lse is not judged against a lucky naive draw; an lse off by 1e-5
    relative to that scale still fails."""
    from attnfast.testing import score_scale

    q, k = torch.tensor([[[[1.0, -1.0]]]]), torch.tensor([[[[3.0, 2.0]]]])
    assert score_scale(q, k, None, 0.5) == 2.5
    assert score_scale(q, torch.zeros(1, 1, 1, 2), torch.full((1, 1, 1, 1), -4.0), 1.0) == 4.0
    q, k, v = (_rand(1, 1, 1, 40) for _ in range(3))

    def off_by(delta):
        def run(q, k, v, m):
            out, lse = attnfast.attention(q, k, v, return_lse=True)
            return out, lse + delta * score_scale(q, k, None, None)
        return {r.name: r.ok for r in compare_with_reference(run, q, k, v, grads=False)}

    assert off_by(0.0)["lse"]
    assert not off_by(1e-5)["lse"]


def test_additive_score_scale_bounds_the_rounding_of_additive_scores():
    """additive_score_scale is the sum over d of |v_a[d]| (1 + |W_q||q| + |W_k||k|): checked by
    hand on one case, and, over random 1 x 1 problems whose single score often cancels, the
    float32 score's error stays within two ulps of it where max|score| alone would not do."""
    from attnfast.reference import additive_scores
    from attnfast.testing import additive_score_scale

    q, k = torch.tensor([[[[1.0, -2.0]]]]), torch.tensor([[[[0.5]]]])
    w_q, w_k, v_a = torch.tensor([[1.0, 1.0], [2.0, 0.0]]), torch.tensor([[1.0], [-4.0]]), torch.tensor([1.0, -0.5])
    # d=0: |1| (1 + 3 + 0.5); d=1: |-0.5| (1 + 2 + 2) -> 4.5 + 2.5
    assert additive_score_scale(q, k, k, w_q, w_k, v_a) == 7.0
    assert additive_score_scale(q, k, k, w_q, w_k, v_a, torch.full((1, 1), -3.0)) == 10.0
    eps = torch.finfo(torch.float32).eps
    beyond_abs = 0
    for _ in range(200):
        q, k, w_q, w_k, v_a = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4), torch.randn(4, 4) / 2, \
            torch.randn(4, 4) / 2, torch.randn(4)
        s32 = additive_scores(q @ w_q.T, k @ w_k.T, v_a).double()
        s64 = additive_scores(q.double() @ w_q.double().T, k.double() @ w_k.double().T, v_a.double())
        err = (s32 - s64).abs().item()
        assert err <= 2 * eps * additive_score_scale(q, k, k, w_q, w_k, v_a)
        beyond_abs += err > 2 * eps * s64.abs().item()
    assert beyond_abs > 0  # the cancelling sums the scale is there for


def test_parity_sweep_tool_records_every_check():
    """tools/parity_sweep.py: runs a selection over fresh seeds and reports each parity
    check's err/tol (here the lse floor test's checks, two runs)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, str(root / "tools" / "parity_sweep.py"), "--runs", "2",
                          "tests/api/test_reliability.py", "-k", "lse_floor"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "runs with a failure: 0/2" in res.stdout
    assert "test_lse_floor_follows_the_scores_rounding_scale_and_still_catches_errors :: lse" in res.stdout


_REDRAW_PROBE = '''
import torch
from attnfast.testing import ParityFailure

SEEDS = []
PLAIN = []


def test_fails_once():
    SEEDS.append(torch.initial_seed())
    if len(SEEDS) == 1:
        raise ParityFailure("first draw")
    assert SEEDS[1] != SEEDS[0]  # the redraw is a fresh draw


def test_fails_always():
    raise ParityFailure("every draw")


def test_plain_assertions_are_not_redrawn():
    PLAIN.append(1)
    assert len(PLAIN) > 1
'''


@pytest.mark.parametrize("replay", [False, True], ids=["fresh", "replay"])
def test_a_parity_failure_gets_one_fresh_redraw(tmp_path, replay):
    """tests/conftest.py: a ParityFailure is judged again on one fresh draw (and reported as a
    warning with its seed when that passes); failing both fails; a replay (ATTNFAST_TEST_SEED)
    judges its one draw; other assertion errors are never redrawn."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests_dir = Path(__file__).resolve().parents[1]
    (tmp_path / "test_probe.py").write_text(_REDRAW_PROBE)
    env = dict(os.environ, PYTHONPATH=str(tests_dir) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ATTNFAST_TEST_SEED", None)
    if replay:
        env["ATTNFAST_TEST_SEED"] = "12345"
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                          "-rA", "-W", "default", str(tmp_path / "test_probe.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = res.stdout
    assert "FAILED test_probe.py::test_plain_assertions_are_not_redrawn" in out, out
    assert "FAILED test_probe.py::test_fails_always" in out, out
    if replay:
        assert "FAILED test_probe.py::test_fails_once" in out and "2 failed" not in out, out
    else:
        assert "PASSED test_probe.py::test_fails_once" in out, out
        assert "parity failed on the first draw" in out, out
        assert "parity fails on two draws" in out, out
