"""The Triton forward's two ways to read K and V tiles: tensor descriptors (TMA on sm90, and the
path the interpreter takes for layouts a descriptor can address) and pointer loads (every other
GPU and layout).  Both must give the same results (bit for bit under the interpreter) and never
read past a sequence's rows, and the layout check must refuse what the TMA hardware cannot
address."""
import pytest
import torch

import attnfast

pytest.importorskip("attnfast.triton_kernels.attention")
from attnfast.triton_kernels import attention as A  # noqa: E402
from attnfast.triton_kernels.common import DESC_ENV, descriptor_ok, use_descriptors  # noqa: E402

pytestmark = pytest.mark.skipif(not attnfast.backends()["triton"].available, reason="triton backend unavailable")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_descriptor_ok_follows_the_16_byte_rule():
    x = torch.randn(2, 3, 40, 64, dtype=torch.bfloat16)
    assert descriptor_ok(x)
    assert descriptor_ok(torch.randn(2, 3, 40, 40, dtype=torch.bfloat16))  # rows of 80 bytes
    assert not descriptor_ok(torch.randn(2, 3, 40, 33, dtype=torch.float32))  # rows of 132 bytes
    assert not descriptor_ok(torch.randn(2, 3, 40, 36, dtype=torch.bfloat16))  # rows of 72 bytes
    assert not descriptor_ok(x.transpose(-1, -2))  # columns not contiguous
    assert not descriptor_ok(x[..., 1:])  # first element 2 bytes past an aligned address
    assert descriptor_ok(x[..., 8:])  # 16 bytes past it
    assert descriptor_ok(x.transpose(1, 2))  # heads and rows swapped: strides still aligned
    assert not descriptor_ok(torch.randn(1, 1, 1, 64).expand(2, 3, 40, 64))  # every row one address
    assert descriptor_ok(torch.randn(1, 3, 40, 64).expand(2, 3, 40, 64))  # batch broadcast: stride 0 is aligned
    y = torch.randn(5, 1, 7, 64)
    assert descriptor_ok(y.as_strided(y.shape, (448, 3, 64, 1)))  # a size-1 dim's stride is never used


def test_descriptor_ok_on_traced_tensors_reads_the_storage_offset():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 40, 64, dtype=torch.bfloat16)
        assert descriptor_ok(x)
        assert not descriptor_ok(x[..., 1:])
        assert descriptor_ok(x[..., 8:])


def test_env_switch_and_gpu_class(monkeypatch):
    x = torch.randn(1, 2, 16, 64)
    monkeypatch.setenv(DESC_ENV, "0")
    assert not use_descriptors(90, x.to(torch.bfloat16))
    monkeypatch.delenv(DESC_ENV)
    if A.INTERPRETING:
        assert use_descriptors(0, x.half())  # the interpreter runs the descriptor path for CPU tests
    if not A.INTERPRETING:  # (the interpreter takes descriptors whatever the arch, to test them)
        assert not use_descriptors(80, x.half())  # below sm90: pointer loads
    assert not use_descriptors(90, x.half()[..., 1:])  # first element 2 bytes past alignment
    assert not use_descriptors(90, x)  # float32: pointer loads (its products are not wgmma)
    assert use_descriptors(90, x.to(torch.bfloat16))


def _same(a, b):
    """Bit for bit under the interpreter (the same values loaded either way, the same arithmetic);
    on a GPU the two paths feed the tensor cores from differently laid out shared memory, so
    to within rounding (wgmma's accumulation order is not promised to match)."""
    if DEVICE == "cpu":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def _both_ways(monkeypatch, forward, *args):
    """forward(*args) with descriptors allowed, then with pointer loads only."""
    runs = []
    for desc in ("1", "0"):
        monkeypatch.setenv(DESC_ENV, desc)
        runs.append(forward(*args))
    return runs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (20, 3)])
def test_descriptor_and_pointer_loads_agree_bitwise(monkeypatch, dtype, window):
    # Lk not a multiple of the tile (the descriptor zero-fills past Lk as the masked loads do: NaN
    # rows just past Lk must never be read), E below the padded tile width (40 of 64 columns),
    # GQA 4 -> 2, rows strided (a transposed view).
    B, Hq, Hkv, Lq, Lk, E = 2, 4, 2, 37, 83, 40
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, Lq, Hq, E, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    k, v = (torch.randn(B, Lk + 9, Hkv, E + 8, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    k[:, Lk:] = v[:, Lk:] = float("nan")  # rows past Lk,
    k[..., E:] = v[..., E:] = float("nan")  # and columns past E (the tile is 64 wide): never read
    k, v = (t.transpose(1, 2)[:, :, :Lk, :E] for t in (k, v))
    if A.INTERPRETING or torch.cuda.get_device_capability()[0] >= 9:
        assert use_descriptors(90, k, v)
    args = (q, k, v, None, 0.17, *window, True)
    (out_d, lse_d), (out_p, lse_p) = _both_ways(monkeypatch, A.attention_fwd, *args)
    _same(out_d, out_p)
    _same(lse_d, lse_p)
    assert not out_d.isnan().any()
    # (the accuracy of both against the reference: test_triton_parity, which takes descriptors
    # for its aligned cases and pointers for the others)


def test_packed_sequences_agree_bitwise(monkeypatch):
    # A ragged launch over a cache: each sequence's descriptor starts at its first row and ends at
    # its used length, so no tile reads the unused rows after it (NaN here).
    lens_q, lens_k, used = [5, 0, 19, 33], [7, 12, 0, 40], [7, 3, 0, 29]
    H, E = 2, 64
    g = torch.Generator().manual_seed(2)
    q = torch.randn(sum(lens_q), H, E, generator=g).to(DEVICE, torch.bfloat16)
    k, v = (torch.randn(sum(lens_k), H, E, generator=g).to(DEVICE, torch.bfloat16) for _ in range(2))
    cu = lambda ls: torch.tensor([0] + ls, device=DEVICE).cumsum(0).to(torch.int32)  # noqa: E731
    for start, n, u in zip(cu(lens_k).tolist(), lens_k, used):
        k[start + u:start + n] = v[start + u:start + n] = float("nan")
    used_k = torch.tensor(used, dtype=torch.int32, device=DEVICE)
    args = (q, k, v, cu(lens_q), cu(lens_k), used_k, max(lens_q), max(lens_k), 0.125, -1, 0, True)
    (out_d, lse_d), (out_p, lse_p) = _both_ways(monkeypatch, A.varlen_fwd, *args)
    _same(out_d, out_p)
    _same(lse_d, lse_p)
    assert not out_d.isnan().any()


@pytest.mark.parametrize("L", [(3, 1), (1, 3)])
def test_one_row_with_a_row_stride_a_descriptor_cannot_take(L):
    # E = 12 (bfloat16 rows of 24 bytes): no descriptor, though the one key (or query) row's
    # stride is never stepped over; forward and backward as with pointer loads.
    Lq, Lk = L
    q = torch.randn(1, 1, Lq, 12, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(1, 1, Lk, 12, dtype=torch.bfloat16, device=DEVICE, requires_grad=True) for _ in range(2))
    assert not descriptor_ok(k) and not descriptor_ok(q)
    out = attnfast.attention(q, k, v, backend="triton")
    out.sum().backward()
    ref = attnfast.attention(q.float(), k.float(), v.float(), backend="reference")
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)



def test_launches_make_the_tensors_gpu_current(monkeypatch):
    # Triton launches on the current GPU: tensors on another one must make theirs current for the
    # launch (simulated: no second GPU here).
    import contextlib

    from attnfast.triton_kernels import common

    current = [0]

    @contextlib.contextmanager
    def device(d):
        saved, current[0] = current[0], torch.device(d).index
        try:
            yield
        finally:
            current[0] = saved

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)

    class Q:
        device = torch.device("cuda", 1)

    seen = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: seen.append((grid, current[0]))

    monkeypatch.setattr(common, "INTERPRETING", True)  # the plain kernel, not wrap_triton's
    common.launcher(Q())(Kernel())[(3,)](1, x=2)
    Q.device = torch.device("cuda", 0)
    common.launcher(Q())(Kernel())[(4,)]()
    assert seen == [((3,), 1), ((4,), 0)] and current[0] == 0
