"""The Triton backend's mask block lists and tile skipping.

`mask_block_lists` is plain torch: checked against a cell-by-cell count on the
expanded mask.  The skipping itself is checked end to end: NaN placed in keys
and values that the mask hides cell-wide must never reach the results.
"""
import pytest
import torch

import attnfast
from attnfast.reference import visible_mask

triton_kernels = pytest.importorskip("attnfast.triton_kernels.attention")


def _expected(mask, cm, cn, diag, wl, wr):
    """{(b, h, r): (partial cells, full cells)} by brute force on the expanded mask."""
    B, H, Lq, Lk = mask.shape
    assert diag == Lk - Lq
    band = visible_mask(Lq, Lk, causal_alignment="bottom_right", window=(wl, wr))
    out = {}
    for b in range(B):
        for h in range(H):
            for r in range(-(-Lq // cm)):
                part, full = [], []
                for c in range(-(-Lk // cn)):
                    cell = mask[b, h, r * cm:(r + 1) * cm, c * cn:(c + 1) * cn]
                    vis = cell if cell.dtype == torch.bool else cell != float("-inf")
                    need = ~cell if cell.dtype == torch.bool else cell != 0
                    # the band is taken per cell: a cell it touches is visited
                    # (the kernel masks the band element-wise)
                    if band is not None and not band[r * cm:(r + 1) * cm, c * cn:(c + 1) * cn].any():
                        continue
                    if not vis.any():
                        continue
                    (part if need.any() else full).append(c)
                out[(b, h, r)] = (part, full)
    return out


def _listed(rec, want_need):
    n = int(rec[0])
    entries = rec[1:1 + n].tolist()
    assert entries == sorted(entries)
    return [e >> 1 for e in entries if (e & 1) == want_need]


def _masks(B, H, Lq, Lk):
    keep = torch.rand(B, 1, Lq, Lk) > 0.5
    keep[..., :, 8:24] = True        # a fully visible column band
    keep[..., 16:32, :] = False      # a fully hidden row band
    docs = torch.zeros(B, 1, Lq, Lk, dtype=torch.bool)
    docs[..., :20, :13] = True
    docs[..., 20:, 13:] = True
    fl = torch.randn(1, H, Lq, Lk).masked_fill(~keep[:1].expand(1, H, Lq, Lk), float("-inf"))
    fl[..., :, 8:24] = 0.0
    return {
        "bool-heads": keep.expand(B, H, Lq, Lk),
        "bool-docs": docs.expand(B, H, Lq, Lk),
        "float-batch": fl.expand(B, H, Lq, Lk),
        "keypad": (torch.arange(Lk) < Lk // 2).view(1, 1, 1, Lk).expand(B, H, Lq, Lk),
        "queries": (torch.rand(B, 1, Lq, 1) > 0.5).expand(B, H, Lq, Lk),
    }


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (5, 3)], ids=["none", "causal", "window"])
@pytest.mark.parametrize("name", ["bool-heads", "bool-docs", "float-batch", "keypad", "queries"])
def test_block_lists_match_brute_force(name, window):
    B, H, Lq, Lk, cm, cn = 2, 3, 37, 45, 8, 16
    mask = _masks(B, H, Lq, Lk)[name]
    diag = Lk - Lq
    lists, lists_t = triton_kernels.mask_block_lists(mask, cm, cn, diag, *window)
    R, C = -(-Lq // cm), -(-Lk // cn)
    assert lists.shape == (B, H, R, C + 1) and lists_t.shape == (B, H, C, R + 1)
    assert lists.dtype == torch.int32
    want = _expected(mask, cm, cn, diag, *window)
    for (b, h, r), (part, full) in want.items():
        assert _listed(lists[b, h, r], 1) == part, (b, h, r)
        assert _listed(lists[b, h, r], 0) == full, (b, h, r)
    for b in range(B):  # the transposed lists hold the same cells
        for h in range(H):
            for kind in (0, 1):
                cells = {(r, c) for r in range(R) for c in _listed(lists[b, h, r], kind)}
                cells_t = {(r, c) for c in range(C) for r in _listed(lists_t[b, h, c], kind)}
                assert cells == cells_t


def test_block_lists_read_broadcast_masks_once():
    mask = torch.rand(1, 1, 40, 50) > 0.5
    lists, lists_t = triton_kernels.mask_block_lists(mask.expand(4, 8, 40, 50), 16, 16)
    assert lists.stride()[:2] == (0, 0) and lists_t.stride()[:2] == (0, 0)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not attnfast.backends()["triton"].available, reason="triton backend unavailable")
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_hidden_cells_are_never_read(kind):
    # Keys 64.. are hidden for every query: with list cells of 64 (interpreter)
    # or 128 (GPU) keys, the cells past the first 128 keys are never visited, so
    # NaN there cannot reach the output or the gradients.
    B, H, Lq, Lk, D = 1, 2, 40, 300, 16
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE) for L in (Lq, Lk, Lk))
    keep = (torch.arange(Lk, device=DEVICE) < 64).view(1, 1, 1, Lk)
    mask = keep if kind == "bool" else torch.zeros(1, 1, 1, Lk, device=DEVICE).masked_fill(~keep, float("-inf"))
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, 128:] = float("nan")
    v_nan[:, :, 128:] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (q, k_nan, v_nan)]
    out = attnfast.attention(*leaves, attn_mask=mask, backend="triton")
    clean = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, _ = attnfast.attention_ref(*clean, attn_mask=mask, upcast=False)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    ref_grads = torch.autograd.grad(ref, clean, g)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-4, atol=1e-5)
    for got, want in zip(grads[1:], ref_grads[1:]):
        torch.testing.assert_close(got[:, :, :128], want[:, :, :128], rtol=1e-4, atol=1e-5)
        assert torch.equal(got[:, :, 128:], torch.zeros_like(got[:, :, 128:]))


import triton  # noqa: E402  (present: the importorskip above passed)
import triton.language as tl  # noqa: E402

_band_range, _whole_range = triton_kernels._band_range, triton_kernels._whole_range


@triton.jit
def _ranges_kernel(Args, Out, BLOCK: tl.constexpr, BLOCK_OTHER: tl.constexpr):
    i = tl.program_id(0)
    start = tl.load(Args + 5 * i)
    L = tl.load(Args + 5 * i + 1)
    diag = tl.load(Args + 5 * i + 2)
    wl = tl.load(Args + 5 * i + 3)
    wr = tl.load(Args + 5 * i + 4)
    lo, hi = _band_range(start, BLOCK, BLOCK_OTHER, L, diag, wl, wr, True)
    a, z = _whole_range(start, BLOCK, BLOCK_OTHER, lo, hi, L, diag, wl, wr, True)
    tl.store(Out + 4 * i, lo)
    tl.store(Out + 4 * i + 1, hi)
    tl.store(Out + 4 * i + 2, a)
    tl.store(Out + 4 * i + 3, z)


def _stage_ranges(rows):
    """(lo, hi, a, z) of _band_range and _whole_range for each (start, L_other, diag, wl, wr) of
    `rows` {(BLOCK, BLOCK_OTHER): [...]}, computed by the kernels' own helpers (one program each)."""
    out = {}
    for (bm, bn), group in rows.items():
        args = torch.tensor(group, dtype=torch.int32).flatten()
        res = torch.zeros(4 * len(group), dtype=torch.int32)
        _ranges_kernel[(len(group),)](args, res, BLOCK=bm, BLOCK_OTHER=bn)
        out[(bm, bn)] = res.view(-1, 4).tolist()
    return out


def test_band_stages_cover_the_band_once_and_whole_tiles_need_no_mask():
    """The two stages of the kernels (attention.py: _whole_range, _edge_tile): the unmasked tiles
    [a, z) and the masked ones [lo, a) + [z, hi) visit each tile of the band range exactly once;
    every row of the block sees every key of an unmasked tile (below L, inside its band); every
    tile left out of [lo, hi) is hidden from every row.  Random blocks, lengths, diagonals and
    windows (a negative bound is no bound), both tile orientations."""
    g = torch.Generator().manual_seed(0)
    rows = {}
    for bm, bn in ((64, 32), (32, 64), (16, 16)):
        group = []
        for _ in range(60):
            L = int(torch.randint(1, 300, (1,), generator=g))
            start = bm * int(torch.randint(0, 300 // bm + 1, (1,), generator=g))
            diag = int(torch.randint(-200, 200, (1,), generator=g))
            wl, wr = (int(x) if x >= 0 else -1 for x in torch.randint(-40, 150, (2,), generator=g))
            group.append([start, L, diag, wl, wr])
        rows[(bm, bn)] = group
    got = _stage_ranges(rows)
    for (bm, bn), group in rows.items():
        for (start, L, diag, wl, wr), (lo, hi, a, z) in zip(group, got[(bm, bn)]):
            ctx = f"block [{start}, {start + bm}) tiles {bn} L {L} diag {diag} window ({wl}, {wr}): {lo, hi, a, z}"
            assert lo % bn == 0 and lo <= a <= z <= max(hi, lo) and (a == hi or a % bn == 0), ctx
            tiles = list(range(a, z, bn)) + list(range(lo, a, bn)) + list(range(z, hi, bn))
            assert sorted(tiles) == list(range(lo, hi, bn)) if hi > lo else tiles == [], ctx
            i = torch.arange(start, start + bm)[:, None]

            def seen(j):
                ok = (j < L) & (j >= 0) & (i >= 0)
                if wl >= 0:
                    ok = ok & (j >= i + diag - wl)
                if wr >= 0:
                    ok = ok & (j <= i + diag + wr)
                return ok

            for n in range(a, z, bn):
                assert seen(torch.arange(n, n + bn)[None, :]).all(), ctx + f" tile {n}"
            outside = [j for j in range(0, L) if not lo <= j < max(hi, lo)]
            if outside:
                assert not seen(torch.tensor(outside)[None, :]).any(), ctx
