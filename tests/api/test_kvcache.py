"""attention_with_kvcache: in-place append, then attention over a contiguous or paged cache."""
import pytest
import torch

import attnfast
from attnfast.testing import assert_parity, compare_kvcache_with_reference

BACKENDS = [b for b in ("cpu", "triton", "reference") if attnfast.backends()[b].available]


def _cache(layout, B, S, Hkv, E, Ev, dtype, page=16):
    """(k_cache, v_cache, block_table, cache_batch_idx) with capacity S per batch entry."""
    if layout == "paged":
        nblk = (S + page - 1) // page
        pool = B * nblk + 3  # spare pages
        perm = torch.randperm(pool)[:B * nblk].view(B, nblk).to(torch.int32)
        return (torch.randn(pool, page, Hkv, E, dtype=dtype), torch.randn(pool, page, Hkv, Ev, dtype=dtype),
                perm, None)
    if layout == "batch_idx":
        idx = torch.randperm(B + 2)[:B].to(torch.int32)
        return torch.randn(B + 2, S, Hkv, E, dtype=dtype), torch.randn(B + 2, S, Hkv, Ev, dtype=dtype), None, idx
    return torch.randn(B, S, Hkv, E, dtype=dtype), torch.randn(B, S, Hkv, Ev, dtype=dtype), None, None


CASES = [  # (layout, Lq, new tokens, Hq, Hkv, is_causal, window)
    ("contiguous", 1, 1, 8, 2, True, None),
    ("contiguous", 3, 3, 4, 4, True, None),
    ("contiguous", 5, 0, 4, 1, False, (9, -1)),
    ("batch_idx", 1, 1, 4, 2, True, None),
    ("batch_idx", 2, 2, 4, 2, True, (20, 0)),
    ("paged", 1, 1, 8, 2, True, None),
    ("paged", 4, 4, 4, 2, True, None),
    ("paged", 12, 12, 8, 2, True, None),  # 48 query rows per kv head: pages gathered for the blocked kernel
    ("paged", 1, 0, 4, 4, False, None),
    ("paged", 40, 40, 4, 2, True, None),  # a prefill over pages (Triton: query blocks of the split-KV kernel)
    ("paged", 20, 0, 2, 1, False, (9, 3)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout,Lq,new,Hq,Hkv,causal,window", CASES)
def test_kvcache_matches_reference_and_appends_in_place(backend, layout, Lq, new, Hq, Hkv, causal, window):
    B, S, E = 4, 1100 if backend == "cpu" else 130, 32
    kc, vc, table, idx = _cache(layout, B, S, Hkv, E, E, torch.float32)
    seqlens = torch.randint(0, S - new + 1, (B,), dtype=torch.int32)
    seqlens[0] = 0 if new else 1  # an entry whose only keys are the new ones (or a single one)
    seqlens[1] = S - new          # an entry filled to capacity
    q = torch.randn(B, Lq, Hq, E)
    k = torch.randn(B, new, Hkv, E) if new else None
    v = torch.randn(B, new, Hkv, E) if new else None
    kc0, vc0 = kc.clone(), vc.clone()
    out, lse = attnfast.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=table,
                                               cache_batch_idx=idx, is_causal=causal, window=window,
                                               return_lse=True, backend=backend)
    assert out.shape == (B, Lq, Hq, E) and lse.shape == (B, Hq, Lq)
    # The cache is the old one with exactly the new rows written at cache_seqlens.
    want_k, want_v = kc0.clone(), vc0.clone()
    for b in range(B):
        for t in range(new):
            pos = int(seqlens[b]) + t
            if table is not None:
                where = (int(table[b, pos // kc.shape[1]]), pos % kc.shape[1])
            else:
                where = (int(idx[b]) if idx is not None else b, pos)
            want_k[where] = k[b, t]
            want_v[where] = v[b, t]
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    res = compare_kvcache_with_reference(out, lse, q, kc, vc, seqlens + new, table, idx, is_causal=causal,
                                         window=window)
    assert_parity(res, f"{layout} seqlens={seqlens.tolist()}")


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_kvcache_other_dtypes(layout, dtype):
    B, S, Hq, Hkv, E = 3, 700, 8, 2, 64
    kc, vc, table, idx = _cache(layout, B, S, Hkv, E, E, dtype, page=64)
    seqlens = torch.tensor([699, 0, 300], dtype=torch.int32)
    q, k, v = torch.randn(B, 1, Hq, E, dtype=dtype), torch.randn(B, 1, Hkv, E, dtype=dtype), \
        torch.randn(B, 1, Hkv, E, dtype=dtype)
    out, lse = attnfast.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=table,
                                               is_causal=True, return_lse=True, backend="cpu")
    assert_parity(compare_kvcache_with_reference(out, lse, q, kc, vc, seqlens + 1, table, is_causal=True))


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in BACKENDS])
@pytest.mark.parametrize("num_splits", [1, 3, 64])
@pytest.mark.parametrize("layout,page", [("contiguous", None), ("paged", 16), ("paged", 72)])
def test_kvcache_num_splits_keeps_parity(num_splits, backend, layout, page):
    """Forced split counts (1: no split-KV) give the same attention, by the parity rule (Triton:
    the split-KV kernel for more than one split, and for any split count on a paged cache, read in
    place: key tiles that span pages (page 16) and pages that end inside a tile (page 72))."""
    B, S, Hq, Hkv, E = 2, 3000 if backend == "cpu" else 600, 4, 1, 64
    kc, vc, table, _ = _cache(layout, B, S, Hkv, E, E, torch.float32, page=page or 16)
    seqlens = torch.tensor([S - 1, S * 3 // 5], dtype=torch.int32)
    q = torch.randn(B, 1, Hq, E)
    out, lse = attnfast.attention_with_kvcache(q, kc, vc, cache_seqlens=seqlens, num_splits=num_splits,
                                               block_table=table, return_lse=True, backend=backend)
    assert_parity(compare_kvcache_with_reference(out, lse, q, kc, vc, seqlens, table))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "batch_idx", "paged"])
@pytest.mark.parametrize("B,Lq", [(0, 3), (2, 0)])
def test_kvcache_empty_calls(backend, layout, B, Lq):
    """No batch entries, or no query rows: empty outputs of the right shapes, the cache untouched."""
    kc, vc, table, idx = _cache(layout, 2, 64, 2, 32, 24, torch.float32)
    table = table[:B] if table is not None else None
    idx = idx[:B] if idx is not None else None
    if layout == "contiguous":  # one cache entry per batch entry
        kc, vc = kc[:B], vc[:B]
    kc0 = kc.clone()
    out, lse = attnfast.attention_with_kvcache(torch.randn(B, Lq, 4, 32), kc, vc,
                                               cache_seqlens=torch.full((B,), 40, dtype=torch.int32),
                                               block_table=table, cache_batch_idx=idx, is_causal=True,
                                               return_lse=True, backend=backend)
    assert out.shape == (B, Lq, 4, 24) and lse.shape == (B, 4, Lq)
    assert torch.equal(kc, kc0)


def test_kvcache_int_seqlens_and_no_grad():
    kc, vc, _, _ = _cache("contiguous", 2, 32, 2, 16, 16, torch.float32)
    q = torch.randn(2, 1, 2, 16, requires_grad=True)
    out = attnfast.attention_with_kvcache(q, kc, vc, cache_seqlens=20)
    ref = attnfast.attention_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([20, 20], dtype=torch.int32))
    assert torch.equal(out, ref) and not out.requires_grad


def test_kvcache_bad_input_never_writes_out_of_bounds():
    B, S, H, E = 2, 32, 2, 16
    kc, vc, _, _ = _cache("contiguous", B, S, H, E, E, torch.float32)
    q, k, v = torch.randn(B, 1, H, E), torch.randn(B, 3, H, E), torch.randn(B, 3, H, E)
    snapshot = kc.clone()
    lens = torch.tensor([5, 30], dtype=torch.int32)  # 30 + 3 > 32
    with pytest.raises(ValueError, match="cache_seqlens \\+ seqlen_new must be in \\[0, 32\\]"):
        attnfast.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens)
    with pytest.raises(ValueError, match="cache_seqlens"):
        attnfast.attention_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_seqlens must have 2 entries"):
        attnfast.attention_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([1], dtype=torch.int32))
    with pytest.raises(TypeError, match="k dtype"):
        attnfast.attention_with_kvcache(q, kc, vc, k.double(), v.double(), cache_seqlens=3)
    with pytest.raises(TypeError, match="k_cache dtype"):
        attnfast.attention_with_kvcache(q, kc.half(), vc.half(), cache_seqlens=3)
    with pytest.raises(ValueError, match="k_cache is on meta"):
        attnfast.attention_with_kvcache(q, kc.to("meta"), vc, cache_seqlens=3)
    with pytest.raises(ValueError, match="k and v must be given together"):
        attnfast.attention_with_kvcache(q, kc, vc, k, None, cache_seqlens=3)
    with pytest.raises(ValueError, match="cache_batch_idx entries must be in"):
        attnfast.attention_with_kvcache(q, kc, vc, cache_seqlens=3, cache_batch_idx=torch.tensor([0, 2],
                                                                                                 dtype=torch.int32))
    # Paged: a block index outside the pool, and a table too short for the new tokens.
    pool_k, pool_v = torch.randn(4, 8, H, E), torch.randn(4, 8, H, E)
    table = torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)
    pool_snapshot = pool_k.clone()
    with pytest.raises(ValueError, match="block_table entries in use must be pages of the pool \\[0, 4\\)"):
        attnfast.attention_with_kvcache(q, pool_k, pool_v, k, v, cache_seqlens=torch.tensor([1, 7], dtype=torch.int32),
                                        block_table=table)
    with pytest.raises(ValueError, match="capacity"):
        attnfast.attention_with_kvcache(q, pool_k, pool_v, k, v, cache_seqlens=torch.tensor([14, 0], dtype=torch.int32),
                                        block_table=table)
    with pytest.raises(TypeError, match="block_table must be an int32"):
        attnfast.attention_with_kvcache(q, pool_k, pool_v, cache_seqlens=3, block_table=table.long())
    assert torch.equal(kc, snapshot) and torch.equal(pool_k, pool_snapshot)
    # The op checks what it reads itself.
    with pytest.raises(RuntimeError, match="block_table\\[1, 1\\] = 9 is outside the pool"):
        torch.ops.attnfast.kvcache_fwd(q, pool_k, pool_v, torch.tensor([1, 12], dtype=torch.int32), None, table,
                                       0.25, -1, 0, 0)
    with pytest.raises(RuntimeError, match="outside \\[0, 32\\]"):
        torch.ops.attnfast.kvcache_fwd(q, kc, vc, torch.tensor([1, 33], dtype=torch.int32), None, None,
                                       0.25, -1, 0, 0)


def test_kvcache_op_passes_opcheck():
    kc, vc, table, _ = _cache("paged", 2, 64, 2, 16, 16, torch.float32)
    q = torch.randn(2, 1, 4, 16)
    torch.library.opcheck(torch.ops.attnfast.kvcache_fwd,
                          (q, kc, vc, torch.tensor([64, 17], dtype=torch.int32), None, table, 0.25, -1, 0, 0))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the C++ extension")
@pytest.mark.parametrize("layout", ["contiguous", "batch_idx", "paged"])
@pytest.mark.parametrize("strided", [False, True])
def test_kvcache_append_op_writes_what_index_put_writes(layout, strided):
    from attnfast.varlen import _append

    B, S, H, E, Ev, new = 3, 40, 2, 16, 8, 5
    kc, vc, table, idx = _cache(layout, B, S, H, E, Ev, torch.float32, page=8)
    if strided:  # caches and new rows with non-unit head-dim strides
        kc = torch.randn(kc.shape[:3] + (2 * E,))[..., ::2]
        k = torch.randn(B, H, new, E).transpose(1, 2)
        v = torch.randn(B, new, H, 2 * Ev)[..., ::2]
    else:
        k, v = torch.randn(B, new, H, E), torch.randn(B, new, H, Ev)
    lens = torch.tensor([0, 17, S - new], dtype=torch.int32)
    kref, vref = kc.clone(), vc.clone()
    positions = lens.unsqueeze(1) + torch.arange(new, dtype=torch.int32)
    rows = idx if idx is not None else torch.arange(B, dtype=torch.int32)
    _append(kref, k, positions, rows, table)
    _append(vref, v, positions, rows, table)
    torch.ops.attnfast.kvcache_append(kc, vc, k, v, lens, idx, table)
    assert torch.equal(kc, kref) and torch.equal(vc, vref)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the C++ extension")
def test_kvcache_append_op_checks_every_row_before_writing():
    B, H, E = 2, 2, 16
    kc, vc = torch.randn(B, 32, H, E), torch.randn(B, 32, H, E)
    k, v = torch.randn(B, 3, H, E), torch.randn(B, 3, H, E)
    pool_k, pool_v = torch.randn(4, 8, H, E), torch.randn(4, 8, H, E)
    table = torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)  # page 9 is outside the pool
    snapshots = [t.clone() for t in (kc, vc, pool_k, pool_v)]
    append = torch.ops.attnfast.kvcache_append
    with pytest.raises(ValueError, match="cache_seqlens \\+ seqlen_new must be in \\[0, 32\\].*\\[1\\] = 30"):
        append(kc, vc, k, v, torch.tensor([0, 30], dtype=torch.int32), None, None)
    with pytest.raises(ValueError, match="cache_seqlens \\+ seqlen_new .*\\[0\\] = -1"):
        append(kc, vc, k, v, torch.tensor([-1, 0], dtype=torch.int32), None, None)
    with pytest.raises(ValueError, match="batch entry 1 writes to cache entry 5, outside \\[0, 2\\)"):
        append(kc, vc, k, v, torch.tensor([0, 0], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32), None)
    with pytest.raises(ValueError, match="batch entry 1 writes to page 9, outside \\[0, 4\\)"):
        append(pool_k, pool_v, k, v, torch.tensor([0, 6], dtype=torch.int32), None, table)  # rows 6..8: pages 0, 1
    with pytest.raises(ValueError, match="\\[0, 16\\]"):
        append(pool_k, pool_v, k, v, torch.tensor([0, 14], dtype=torch.int32), None, table)
    with pytest.raises(TypeError, match="one dtype"):
        append(kc, vc, k.double(), v.double(), torch.tensor([0, 0], dtype=torch.int32), None, None)
    with pytest.raises(ValueError, match="must be \\(batch, seqlen_new, heads, head_dim\\) like k_cache"):
        append(kc, vc, k[:, :, :1], v, torch.tensor([0, 0], dtype=torch.int32), None, None)
    for t, s in zip((kc, vc, pool_k, pool_v), snapshots):
        assert torch.equal(t, s)
    torch.library.opcheck(append, (kc, vc, k, v, torch.tensor([0, 20], dtype=torch.int32), None, None))


_FAST = getattr(attnfast.varlen, "_PLAIN_KVCACHE", None)


@pytest.mark.skipif(_FAST is None, reason="the C++ fast path needs the extension (and a vector ISA)")
@pytest.mark.parametrize("layout", ["contiguous", "batch_idx", "paged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.parametrize("new,causal,scale,num_splits", [(1, True, None, 0), (0, False, 0.3, 1), (3, True, None, 3)])
def test_kvcache_fast_path_equals_the_python_path(layout, dtype, new, causal, scale, num_splits, monkeypatch):
    """The plain decode step in C++ (plain_kvcache) gives bit for bit the Python path's output and
    writes the same cache."""
    B, S, Hq, Hkv, E = 3, 64, 8, 2, 32
    kc, vc, table, idx = _cache(layout, B, S, Hkv, E, E, dtype)
    q = torch.randn(B, 2, Hq, E, dtype=dtype)
    k, v = (torch.randn(B, new, Hkv, E, dtype=dtype) if new else None for _ in range(2))
    lens = torch.tensor([0, 17, S - new], dtype=torch.int32)
    kw = dict(cache_seqlens=lens, block_table=table, cache_batch_idx=idx, is_causal=causal, scale=scale,
              num_splits=num_splits)
    kc_fast, vc_fast, kc_py, vc_py = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    calls = []
    monkeypatch.setattr(attnfast.varlen, "_PLAIN_KVCACHE", lambda *a: calls.append(_FAST(*a)) or calls[-1])
    got = attnfast.attention_with_kvcache(q, kc_fast, vc_fast, k, v, **kw)
    assert len(calls) == 1 and calls[0] is not None, "the plain call must take the fast path"
    monkeypatch.setattr(attnfast.varlen, "_PLAIN_KVCACHE", None)
    want = attnfast.attention_with_kvcache(q, kc_py, vc_py, k, v, **kw)
    assert torch.equal(got, want)
    assert torch.equal(kc_fast, kc_py) and torch.equal(vc_fast, vc_py)
    assert new == 0 or not torch.equal(kc_fast, kc)


@pytest.mark.skipif(_FAST is None, reason="the C++ fast path needs the extension (and a vector ISA)")
def test_kvcache_fast_path_leaves_the_rest_to_python(monkeypatch):
    """Anything but the plain, valid decode step returns None from the fast path (the Python path then
    decides and raises its own errors)."""
    B, S, H, E = 2, 32, 2, 16
    kc, vc, table, _ = _cache("paged", B, S, H, E, E, torch.float32, page=8)
    q, k, v = torch.randn(B, 1, H, E), torch.randn(B, 1, H, E), torch.randn(B, 1, H, E)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    refused = [
        (q, kc, vc, k, v, lens.long(), table, None, True, None, 0),       # int64 lengths
        (q, kc, vc, k, v, torch.tensor([3, 32], dtype=torch.int32), table, None, True, None, 0),  # past capacity
        (q, kc, vc, k, None, lens, table, None, True, None, 0),            # k without v
        (q, kc, vc, k.double(), v.double(), lens, table, None, True, None, 0),  # dtype mix
        (q.requires_grad_(), kc, vc, k, v, lens, table, None, True, None, 0),   # gradients
        (q.detach(), kc, vc, k, v, lens, table.clone().fill_(99), None, True, None, 0),  # pages outside the pool
        (q.detach(), kc, vc, k, v, lens, table, None, 1, None, 0),         # is_causal not a bool
        (q.detach(), kc, vc, k, v, lens, table, None, True, 1, 0),         # an int scale
        (q.detach(), kc, vc, k, v, lens, table, None, True, None, -1),     # negative splits
        (q.detach(), kc, vc, k, v, 3, table, None, True, None, 0),         # an int cache_seqlens
    ]
    before = kc.clone()
    for args in refused:
        assert _FAST(*args) is None, args
    assert torch.equal(kc, before)
    monkeypatch.setenv("ATTNFAST_BACKEND", "cpu")
    assert _FAST(q.detach(), kc, vc, k, v, lens, table, None, True, None, 0) is None
    monkeypatch.delenv("ATTNFAST_BACKEND")
    assert _FAST(q.detach(), kc, vc, k, v, lens, table, None, True, None, 0) is not None
