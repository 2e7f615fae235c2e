"""attnfast.nn.AdditiveAttention against a hand-written naive Bahdanau computation.

Parity: the module in float32 / bfloat16 / float64 and the naive computation
in the same dtype, both against the naive computation in float64, all from
the module's own parameters; context, returned weights and the gradients of
the inputs and of every parameter (attnfast.testing.parity).  Then the module's
contracts: padding, layouts, a decoder loop, state_dict, errors, factory kwargs.
"""
import math

import pytest
import torch

from attnfast.nn import AdditiveAttention
from attnfast.testing import assert_parity, parity

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
PARAMS = ["w_q", "w_k", "v_a", "proj_bias", "out_proj.weight", "out_proj.bias"]


def _naive(p, H, query, key, value, keep=None, add=None, is_causal=False, reorder_ops=False):
    """Bahdanau attention written out head by head, batch-first inputs (B, L, F).

    p: dict of the module's parameters (PARAMS names; absent ones skipped), all in
    the dtype to compute in.  keep: bool (B, H, Lq, Lk) broadcastable, True =
    takes part; add: float (B, H, Lq, Lk) broadcastable, added to the scores.
    The softmax is exp(s - lse), the formula of attnfast.reference, so the
    same-precision yardstick errs as the project's reference does.
    reorder_ops: the same maths in another rounding order (products as (W xᵀ)ᵀ,
    torch.softmax): the float64 same-precision yardstick.
    Returns (context (B, Lq, value_dim), weights (B, H, Lq, Lk)); query steps
    with no visible key give 0.
    """
    B, Lq, Eq = query.shape
    Lk = key.shape[1]
    eq, ek, ev = Eq // H, key.shape[2] // H, value.shape[2] // H
    ctxs, ws = [], []
    for h in range(H):
        qh = query[..., h * eq:(h + 1) * eq]  # (B, Lq, eq)
        kh = key[..., h * ek:(h + 1) * ek]  # (B, Lk, ek)
        vh = value[..., h * ev:(h + 1) * ev]  # (B, Lk, ev)
        wq, wk, va = p["w_q"][h], p["w_k"][h], p["v_a"][h]
        if reorder_ops:
            qp = (wq @ qh.transpose(1, 2)).transpose(1, 2)
            kp = (wk @ kh.transpose(1, 2)).transpose(1, 2)
        else:
            qp, kp = qh @ wq.T, kh @ wk.T  # (B, Lq, Da), (B, Lk, Da)
        if "proj_bias" in p:
            qp = qp + p["proj_bias"][h]
        t = torch.tanh(qp[:, :, None, :] + kp[:, None, :, :])  # (B, Lq, Lk, Da)
        s = (t @ va[:, None]).squeeze(-1) if reorder_ops else (t * va).sum(-1)  # (B, Lq, Lk)
        if add is not None:
            s = s + add.expand(B, H, Lq, Lk)[:, h]
        if keep is not None:
            s = s.masked_fill(~keep.expand(B, H, Lq, Lk)[:, h], float("-inf"))
        if is_causal:
            s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool).triu(1), float("-inf"))
        dead = torch.isneginf(s).all(-1, keepdim=True)
        s = s.masked_fill(dead, 0.0)
        if reorder_ops:  # torch's softmax: another rounding order in the forward and the backward
            w = torch.softmax(s, dim=-1)
        else:  # exp(s - lse), as attnfast.reference computes it (the same-precision yardstick's formula)
            w = torch.exp(s - torch.logsumexp(s, dim=-1, keepdim=True))
        w = w.masked_fill(dead, 0.0)
        if reorder_ops:
            ctxs.append((vh.transpose(1, 2) @ w.transpose(1, 2)).transpose(1, 2))  # (B, Lq, ev)
        else:
            ctxs.append(w @ vh)
        ws.append(w)
    ctx = torch.cat(ctxs, dim=-1)
    if "out_proj.weight" in p:
        ctx = ctx @ p["out_proj.weight"].T
        if "out_proj.bias" in p:
            ctx = ctx + p["out_proj.bias"]
    return ctx, torch.stack(ws, dim=1)


def _module(Eq, Ek, Ev, Da, H, **kw):
    m = AdditiveAttention(Eq, Ek, Ev, attn_dim=Da, num_heads=H, **kw)
    with torch.no_grad():  # nonzero biases, so their folding is tested
        for name in ("proj_bias", "out_proj.bias"):
            t = m.get_parameter(name) if name in dict(m.named_parameters()) else None
            if t is not None:
                t.normal_(0.0, 0.5)
    return m


CASES = {  # (B, H, Lq, Lk, Eq, Ek, Ev, Da), module kwargs, masks
    "kpm-bool+out_proj": ((2, 2, 5, 9, 8, 6, 4, 12), dict(out_proj=True), dict(kpm="bool")),
    "causal+2d-float-nobias": ((1, 1, 7, 7, 6, 6, 6, 5), dict(bias=False), dict(am="2d-float", causal=True)),
    "one-step+3d-bool+kpm-float+dead": ((16, 2, 1, 11, 4, 8, 6, 16), dict(), dict(am="3d-bool", kpm="float",
                                                                             dead=True)),
}


def _masks(B, H, Lq, Lk, am=None, kpm=None, dead=False, causal=False):
    """torch-convention masks for the module, and their (keep, add) for the naive computation."""
    keep = add = key_padding_mask = attn_mask = None
    if kpm is not None:
        pad = torch.rand(B, Lk) < 0.35
        pad[:, 0] = False
        if dead:
            pad[0] = True  # batch 0 sees no key: its context is 0
        if kpm == "bool":
            key_padding_mask, keep = pad, ~pad[:, None, None, :]
        else:
            key_padding_mask = torch.randn(B, Lk).masked_fill(pad, float("-inf"))
            add = key_padding_mask[:, None, None, :]
    if am is not None:
        shape = (Lq, Lk) if am.startswith("2d") else (B * H, Lq, Lk)
        banned = torch.rand(shape) < 0.3
        banned[..., 0] = False
        if am.endswith("bool"):
            attn_mask = banned
            k = ~banned.reshape(-1, H, Lq, Lk) if am.startswith("3d") else ~banned
            keep = k if keep is None else keep & k
        else:
            attn_mask = torch.randn(shape).masked_fill(banned, float("-inf"))
            a = attn_mask.reshape(-1, H, Lq, Lk) if am.startswith("3d") else attn_mask
            add = a if add is None else add + a
    return key_padding_mask, attn_mask, keep, add


@pytest.mark.parametrize("need_weights", [False, True], ids=["ctx", "ctx+weights"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_parity(case, dtype, need_weights):
    (B, H, Lq, Lk, Eq, Ek, Ev, Da), kw, mk = CASES[case]
    causal = mk.get("causal", False)
    m = _module(Eq, Ek, Ev, Da, H, **kw).to(dtype)
    query, key, value = torch.randn(B, Lq, Eq), torch.randn(B, Lk, Ek), torch.randn(B, Lk, Ev)
    kpm, am, keep, add = _masks(B, H, Lq, Lk, mk.get("am"), mk.get("kpm"), mk.get("dead", False), causal)
    cast = lambda t, d: None if t is None else (t if t.dtype == torch.bool else t.to(d))  # noqa: E731

    ins = [t.to(dtype).requires_grad_() for t in (query, key, value)]
    names = [n for n, _ in m.named_parameters()]
    ctx, w = m(*ins, key_padding_mask=cast(kpm, dtype), attn_mask=cast(am, dtype), is_causal=causal,
               need_weights=need_weights)
    assert (w is not None) == need_weights
    leaves = ins + [m.get_parameter(n) for n in names]

    def naive(d, reorder):
        x = [t.detach().to(d).requires_grad_() for t in (query, key, value)]
        p = {n: m.get_parameter(n).detach().to(d).requires_grad_() for n in names}
        # The module's masks are in its dtype; the float64 truth sees those same values.
        out = _naive(p, H, *x, keep=keep, add=cast(cast(add, dtype), d), is_causal=causal, reorder_ops=reorder)
        return out, x + [p[n] for n in names]

    (r_ctx, r_w), r_leaves = naive(dtype, dtype == torch.float64)
    (t_ctx, t_w), t_leaves = naive(torch.float64, False)
    n = max(Lq, Lk, Eq, Ek, Ev, Da)
    res = [parity("context", ctx, r_ctx, t_ctx, n)]
    dctx, dw = torch.randn_like(t_ctx), torch.randn_like(t_w)
    if need_weights:
        assert w.shape == (B, H, Lq, Lk) and w.dtype == dtype
        res.append(parity("weights", w, r_w, t_w, n))
        # a loss on the weights too: their gradient reaches every input through the naive path
        loss, r_loss = (ctx * dctx.to(dtype)).sum() + (w * dw.to(dtype)).sum(), \
            (r_ctx * dctx.to(dtype)).sum() + (r_w * dw.to(dtype)).sum()
        t_loss = (t_ctx * dctx).sum() + (t_w * dw).sum()
    else:
        loss, r_loss, t_loss = (ctx * dctx.to(dtype)).sum(), (r_ctx * dctx.to(dtype)).sum(), (t_ctx * dctx).sum()
    g = torch.autograd.grad(loss, leaves)
    rg = torch.autograd.grad(r_loss, r_leaves)
    tg = torch.autograd.grad(t_loss, t_leaves)
    for name, a, r, t in zip(["query", "key", "value"] + names, g, rg, tg):
        # A parameter's gradient sums over the batch and both sequences: its longest
        # reduction (the float64 floor's n) is B*Lq*Lk terms.
        res.append(parity(f"grad {name}", a, r, t, n if name in ("query", "key", "value") else max(n, B * Lq * Lk)))
    assert_parity(res)
    if mk.get("dead"):
        assert torch.equal(ctx[0], torch.zeros_like(ctx[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_padded_keys_change_nothing(dtype):
    m = _module(8, 6, 4, 8, 2).to(dtype)
    B, Lq, Lk = 2, 4, 5
    query, key, value = (torch.randn(B, L, E, dtype=dtype) for L, E in ((Lq, 8), (Lk, 6), (Lk, 4)))
    ctx, w = m(query, key, value, need_weights=True)
    # 3 padding keys inserted between the real ones (positions 1, 3, 6), with random content
    pos = torch.tensor([1, 3, 6])
    real = torch.tensor([i for i in range(Lk + 3) if i not in pos.tolist()])
    pk, pv = torch.randn(B, Lk + 3, 6, dtype=dtype), torch.randn(B, Lk + 3, 4, dtype=dtype)
    pk[:, real], pv[:, real] = key, value
    pad = torch.zeros(B, Lk + 3, dtype=torch.bool)
    pad[:, pos] = True
    for kpm in (pad, torch.zeros(B, Lk + 3, dtype=dtype).masked_fill(pad, float("-inf"))):
        p_ctx, p_w = m(query, pk, pv, key_padding_mask=kpm, need_weights=True)
        torch.testing.assert_close(p_ctx, ctx)
        assert torch.equal(p_w[..., pos], torch.zeros_like(p_w[..., pos]))
        torch.testing.assert_close(p_w[..., real], w)
    # whatever the padded keys hold, nothing changes
    pk2, pv2 = pk.clone(), pv.clone()
    pk2[:, pos], pv2[:, pos] = 1e3 * torch.randn(B, 3, 6, dtype=dtype), 1e3 * torch.randn(B, 3, 4, dtype=dtype)
    a, _ = m(query, pk, pv, key_padding_mask=pad)
    b, _ = m(query, pk2, pv2, key_padding_mask=pad)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_layouts_agree():
    """batch_first True, False and unbatched calls give the same context and weights."""
    kw = dict(key_dim=6, value_dim=4, attn_dim=8, num_heads=2, out_proj=True)
    bf = AdditiveAttention(8, batch_first=True, dtype=torch.float64, **kw)
    sf = AdditiveAttention(8, batch_first=False, dtype=torch.float64, **kw)
    sf.load_state_dict(bf.state_dict())
    B, Lq, Lk = 3, 4, 7
    query, key, value = torch.randn(B, Lq, 8), torch.randn(B, Lk, 6), torch.randn(B, Lk, 4)
    query, key, value = query.double(), key.double(), value.double()
    kpm = torch.rand(B, Lk) < 0.3
    kpm[:, 0] = False
    am = torch.rand(Lq, Lk) < 0.2
    ctx, w = bf(query, key, value, key_padding_mask=kpm, attn_mask=am, need_weights=True)
    assert ctx.shape == (B, Lq, 4) and w.shape == (B, 2, Lq, Lk)
    s_ctx, s_w = sf(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), key_padding_mask=kpm,
                    attn_mask=am, need_weights=True)
    assert s_ctx.shape == (Lq, B, 4)
    torch.testing.assert_close(s_ctx.transpose(0, 1), ctx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_w, w, rtol=1e-12, atol=1e-12)
    for b in range(B):
        for mod in (bf, sf):
            u_ctx, u_w = mod(query[b], key[b], value[b], key_padding_mask=kpm[b], attn_mask=am, need_weights=True)
            assert u_ctx.shape == (Lq, 4) and u_w.shape == (2, Lq, Lk)
            torch.testing.assert_close(u_ctx, ctx[b], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(u_w, w[b], rtol=1e-12, atol=1e-12)


def test_value_defaults_to_key_and_need_weights_keeps_context():
    m = AdditiveAttention(8, 6, num_heads=2)
    assert m.value_dim == 6 and m.attn_dim == 8
    query, key = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    a, none = m(query, key)
    assert none is None
    b, w = m(query, key, key, need_weights=True)
    assert torch.equal(a, b)  # need_weights does not change the context
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 3))


def test_gradients_reach_every_parameter():
    m = AdditiveAttention(8, 6, 4, attn_dim=12, num_heads=2, out_proj=True)
    assert sorted(n for n, _ in m.named_parameters()) == sorted(PARAMS)
    query = torch.randn(2, 3, 8, requires_grad=True)
    key = torch.randn(2, 5, 6, requires_grad=True)
    value = torch.randn(2, 5, 4, requires_grad=True)
    ctx, _ = m(query, key, value)
    (ctx * torch.randn_like(ctx)).sum().backward()
    for name, p in list(m.named_parameters()) + [("query", query), ("key", key), ("value", value)]:
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_state_dict_round_trip():
    kw = dict(key_dim=6, value_dim=4, attn_dim=12, num_heads=2, out_proj=True)
    a, b = _module(8, 6, 4, 12, 2, out_proj=True), AdditiveAttention(8, **kw)
    sd = a.state_dict()
    assert sorted(sd) == sorted(PARAMS)
    assert sd["w_q"].shape == (2, 6, 4) and sd["w_k"].shape == (2, 6, 3) and sd["v_a"].shape == (2, 6)
    assert sd["proj_bias"].shape == (2, 6) and sd["out_proj.weight"].shape == (4, 4)
    b.load_state_dict(sd)
    query, key, value = torch.randn(2, 3, 8), torch.randn(2, 5, 6), torch.randn(2, 5, 4)
    assert torch.equal(a(query, key, value)[0], b(query, key, value)[0])
    nobias = AdditiveAttention(8, **{**kw, "out_proj": False}, bias=False)
    assert sorted(nobias.state_dict()) == ["v_a", "w_k", "w_q"]
    with pytest.raises(RuntimeError, match="proj_bias"):
        nobias.load_state_dict(sd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_decoder_loop(dtype):
    """One query step at a time equals all steps at once (no causal rule across steps)."""
    m = _module(8, 6, 4, 8, 2, out_proj=True).to(dtype)
    B, T, S = 3, 6, 9
    enc_k, enc_v = torch.randn(B, S, 6, dtype=dtype), torch.randn(B, S, 4, dtype=dtype)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, 6:] = True  # batch 1: a shorter source sentence
    dec = torch.randn(B, T, 8, dtype=dtype)
    ctx, w = m(dec, enc_k, enc_v, key_padding_mask=pad, need_weights=True)
    steps = [m(dec[:, t:t + 1], enc_k, enc_v, key_padding_mask=pad, need_weights=True) for t in range(T)]
    torch.testing.assert_close(torch.cat([c for c, _ in steps], dim=1), ctx)
    torch.testing.assert_close(torch.cat([x for _, x in steps], dim=2), w)
    # causal over a growing key prefix: step t sees keys 0..t, as one causal call does
    kk, vv = torch.randn(B, T, 6, dtype=dtype), torch.randn(B, T, 4, dtype=dtype)
    full, _ = m(dec, kk, vv, is_causal=True)
    prefix = torch.cat([m(dec[:, t:t + 1], kk[:, :t + 1], vv[:, :t + 1])[0] for t in range(T)], dim=1)
    torch.testing.assert_close(prefix, full)


BAD = [  # (forward kwargs as a function of the good inputs (q, k, v), error, message)
    (lambda q, k, v: dict(query=q.numpy()), TypeError, "query must be a torch.Tensor"),
    (lambda q, k, v: dict(query=q[0, 0]), ValueError, r"query must be batched 3-D \(B, L, features\)"),
    (lambda q, k, v: dict(key=k[0]), ValueError, "key must be 3-D like query"),
    (lambda q, k, v: dict(query=q[..., :7]), ValueError, r"query must have query_dim=8 features.*\(2, 3, 7\)"),
    (lambda q, k, v: dict(key=k[..., :5]), ValueError, "key must have key_dim=6"),
    (lambda q, k, v: dict(value=v[..., :3]), ValueError, "value must have value_dim=4"),
    (lambda q, k, v: dict(value=v[:, :4]), ValueError, "key and value must have the same length"),
    (lambda q, k, v: dict(key=k[:1], value=v[:1]), ValueError, "key batch size 1 must equal query batch size 2"),
    (lambda q, k, v: dict(query=q.double()), TypeError, "query dtype torch.float64 must match the module's"),
    (lambda q, k, v: dict(value=v.half()), TypeError, "value dtype torch.float16"),
    (lambda q, k, v: dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError,
     r"key_padding_mask must be \(B, Lk\) = \(2, 5\), got \(2, 4\)"),
    (lambda q, k, v: dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.int32)), TypeError,
     "only bool and floating types of key_padding_mask"),
    (lambda q, k, v: dict(key_padding_mask=[[True]]), TypeError, "key_padding_mask must be a torch.Tensor or None"),
    (lambda q, k, v: dict(attn_mask=torch.zeros(5, 3, dtype=torch.bool)), ValueError,
     r"2-D attn_mask must be \(Lq, Lk\) = \(3, 5\)"),
    (lambda q, k, v: dict(attn_mask=torch.zeros(2, 3, 5, dtype=torch.bool)), ValueError,
     r"3-D attn_mask must be \(B\*num_heads, Lq, Lk\) = \(4, 3, 5\)"),
    (lambda q, k, v: dict(attn_mask=torch.zeros(2, 2, 3, 5, dtype=torch.bool)), ValueError,
     "attn_mask must be 2-D .* got 4-D"),
    (lambda q, k, v: dict(is_causal=1), TypeError, "is_causal must be a Python bool"),
    (lambda q, k, v: dict(need_weights="yes"), TypeError, "need_weights must be a Python bool"),
]


@pytest.mark.parametrize("make,err,match", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_inputs(make, err, match):
    m = AdditiveAttention(8, 6, 4, num_heads=2)
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 5, 6), torch.randn(2, 5, 4)
    kw = dict(query=q, key=k, value=v)
    kw.update(make(q, k, v))
    with pytest.raises(err, match=match):
        m(**kw)


def test_bad_unbatched_and_constructor():
    m = AdditiveAttention(8, 6, 4, num_heads=2, batch_first=False)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(Lk,\) = \(5,\)"):
        m(torch.randn(3, 8), torch.randn(5, 6), torch.randn(5, 4), key_padding_mask=torch.zeros(1, 5) > 0)
    with pytest.raises(ValueError, match=r"3-D attn_mask must be \(num_heads, Lq, Lk\) = \(2, 3, 5\)"):
        m(torch.randn(3, 8), torch.randn(5, 6), torch.randn(5, 4), attn_mask=torch.zeros(1, 3, 5) > 0)
    with pytest.raises(ValueError, match=r"query must be batched 3-D \(L, B, features\)"):
        m(torch.randn(1, 3, 3, 8), torch.randn(5, 6))
    with pytest.raises(ValueError, match="key_dim=6 must be divisible by num_heads=4"):
        AdditiveAttention(8, 6, num_heads=4)
    with pytest.raises(ValueError, match="attn_dim=6 must be divisible by num_heads=4"):
        AdditiveAttention(8, attn_dim=6, num_heads=4)
    with pytest.raises(ValueError, match="query_dim must be a positive int, got 0"):
        AdditiveAttention(0)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        AdditiveAttention(8, num_heads=2.0)


def test_factory_kwargs_and_init():
    m = AdditiveAttention(8, 6, 4, attn_dim=12, num_heads=2, out_proj=True, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in m.parameters())
    # Xavier-uniform per head: fan_in = head features, fan_out = head attention dim
    assert m.w_q.abs().max() <= math.sqrt(6 / (4 + 6)) and m.w_k.abs().max() <= math.sqrt(6 / (3 + 6))
    assert m.w_q.std() > 0.25 * math.sqrt(6 / (4 + 6))
    assert m.v_a.abs().max() <= 1 / math.sqrt(6)
    assert torch.equal(m.proj_bias, torch.zeros(2, 6)) and torch.equal(m.out_proj.bias, torch.zeros(4))
    assert "num_heads=2" in repr(m)
    meta = AdditiveAttention(8, 6, 4, num_heads=2, out_proj=True, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    ctx, _ = meta(torch.randn(2, 3, 8), torch.randn(2, 5, 6), torch.randn(2, 5, 4))
    assert ctx.shape == (2, 3, 4) and torch.isfinite(ctx).all()
    half = AdditiveAttention(8, dtype=torch.bfloat16)
    ctx, w = half(torch.randn(1, 2, 8, dtype=torch.bfloat16), torch.randn(1, 4, 8, dtype=torch.bfloat16),
                  need_weights=True)
    assert ctx.dtype == w.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    m = _module(8, 6, 4, 8, 2, out_proj=True)
    query, key, value = torch.randn(2, 3, 8), torch.randn(2, 5, 6), torch.randn(2, 5, 4)
    pad = torch.rand(2, 5) < 0.3
    pad[:, 0] = False
    ref, ref_w = m.double()(query.double(), key.double(), value.double(), key_padding_mask=pad, need_weights=True)
    mc = AdditiveAttention(8, 6, 4, attn_dim=8, num_heads=2, out_proj=True, device="cuda")
    assert all(p.is_cuda for p in mc.parameters())
    mc.load_state_dict(m.state_dict())
    ctx, w = mc(query.cuda(), key.cuda(), value.cuda(), key_padding_mask=pad.cuda(), need_weights=True)
    torch.testing.assert_close(ctx.double().cpu(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.double().cpu(), ref_w, rtol=1e-4, atol=1e-5)
