"""attnfast.nn.MultiheadAttention against torch.nn.MultiheadAttention.

Parity: our float32 module and torch's float32 module both against torch's
module in float64 (same weights); outputs, returned weights and the gradients
of the inputs and of every parameter (attnfast.testing.parity).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import attnfast
import attnfast.nn as ann
from attnfast.patching import kernel_calls
from attnfast.testing import assert_parity, parity

E, H = 32, 4
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask")
BATCH, LQ, LK = 4, 24, 20


def _keypad(N, S, kind):
    """(N, S) padding mask in torch's convention; key 0 always visible (no dead rows)."""
    pad = torch.rand(N, S) < 0.35
    pad[:, 0] = False
    if kind == "bool":
        return pad
    return torch.randn(N, S).masked_fill(pad, float("-inf"))


def _attn_mask(L, S, N, kind):
    """2-D (L, S) or 3-D (N*H, L, S) mask in torch's convention; key 0 always visible."""
    shape = (L, S) if kind.startswith("2d") else (N * H, L, S)
    if kind.endswith("causal"):
        return torch.ones(L, S, dtype=torch.bool).triu(1)
    banned = torch.rand(shape) < 0.3
    banned[..., 0] = False
    if kind.endswith("bool"):
        return banned
    return torch.randn(shape).masked_fill(banned, float("-inf"))


# (module kwargs, forward setup) cases; each runs with batch_first both ways and
# need_weights both ways.
CASES = {
    "self": dict(),
    "self-eval": dict(eval=True),
    "self-2d-bool": dict(attn_mask="2d-bool"),
    "self-3d-float": dict(attn_mask="3d-float"),
    "self-kpm-bool": dict(kpm="bool"),
    "self-kpm-float-eval": dict(kpm="float", eval=True),
    "self-2d-bool+kpm-bool": dict(attn_mask="2d-bool", kpm="bool"),
    "self-3d-bool+kpm-float": dict(attn_mask="3d-bool", kpm="float"),
    "self-causal+kpm": dict(attn_mask="2d-causal", kpm="bool", is_causal=True),
    "self-causal": dict(attn_mask="2d-causal", is_causal=True),
    "cross": dict(cross=True),
    "cross-kdim-vdim-masks": dict(cross=True, kdim=24, vdim=20, attn_mask="2d-float", kpm="bool"),
    "cross-shared-kv-eval": dict(cross="kv", attn_mask="3d-bool", eval=True),
    # batch 8: bias_k's gradient sums the appended key's gradient over the batch; with a small
    # batch a few elements dominate its max error and the parity ratio is a coin toss.
    "bias-kv-zero-attn": dict(cross=True, add_bias_kv=True, add_zero_attn=True, attn_mask="2d-bool", kpm="bool",
                              batch=8),
    # torch's fused path would apply is_causal to the appended zero key too (hiding it from most
    # queries) while its need_weights path shows it to every query; ours shows it on both paths,
    # so both are compared with torch's need_weights path.
    "no-bias-causal-zero-attn": dict(bias=False, add_zero_attn=True, attn_mask="2d-causal", is_causal=True,
                                     torch_weights_path=True),
    "unbatched": dict(unbatched=True, cross=True, attn_mask="3d-float", kpm="bool"),
}


def _build(case, batch_first, dtype=torch.float32):
    mod_kw = dict(batch_first=batch_first, bias=case.get("bias", True), add_bias_kv=case.get("add_bias_kv", False),
                  add_zero_attn=case.get("add_zero_attn", False), kdim=case.get("kdim"), vdim=case.get("vdim"))
    theirs = torch.nn.MultiheadAttention(E, H, dtype=dtype, **mod_kw)
    ours = ann.MultiheadAttention(E, H, dtype=dtype, **mod_kw)
    ours.load_state_dict(theirs.state_dict())
    truth = copy.deepcopy(theirs).double()
    if case.get("bias", True):  # torch initialises biases to 0: make them count
        b_in, b_out = torch.randn(3 * E), torch.randn(E)
        with torch.no_grad():
            for m in (theirs, ours, truth):
                m.in_proj_bias.copy_(b_in)
                m.out_proj.bias.copy_(b_out)
    for m in (theirs, ours, truth):
        m.train(not case.get("eval", False))
    return ours, theirs, truth


def _inputs(case, batch_first, dtype=torch.float32):
    N, L, S = case.get("batch", BATCH), LQ, LQ if not case.get("cross") else LK
    kdim, vdim = case.get("kdim") or E, case.get("vdim") or E

    def seq(n, d):
        return torch.randn(n, N, d, dtype=dtype)  # (L, N, d)

    q = seq(L, E)
    if case.get("cross") == "kv":
        k = v = seq(S, E)
    elif case.get("cross"):
        k, v = seq(S, kdim), seq(S, vdim)
    else:
        k = v = q
    kw = {}
    if case.get("attn_mask"):
        kw["attn_mask"] = _attn_mask(L, S, N, case["attn_mask"])
    if case.get("kpm"):
        kw["key_padding_mask"] = _keypad(N, S, case["kpm"])
    if case.get("is_causal"):
        kw["is_causal"] = True
    if case.get("unbatched"):
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        if "key_padding_mask" in kw:
            kw["key_padding_mask"] = kw["key_padding_mask"][0]
        if "attn_mask" in kw and kw["attn_mask"].dim() == 3:
            kw["attn_mask"] = kw["attn_mask"][:H]
    elif batch_first:
        done = {}  # one transposed tensor per distinct input: self-attention stays `q is k is v`
        q, k, v = (done.setdefault(id(t), t.transpose(0, 1).contiguous()) for t in (q, k, v))
    return (q, k, v), kw


def _run(mod, args, kw, dtype, need_weights):
    """Run with fresh leaves (keeping self-attention's `query is key is value`)."""
    leaves, out_args = {}, []
    for a in args:
        if id(a) not in leaves:
            leaves[id(a)] = a.detach().to(dtype).requires_grad_()
        out_args.append(leaves[id(a)])
    kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    out, w = mod(*out_args, need_weights=need_weights, **kw)
    return out, w, list(leaves.values())


def _check_parity(case, batch_first, need_weights, dtype=torch.float32, average=True):
    ours, theirs, truth = _build(case, batch_first, dtype)
    args, kw = _inputs(case, batch_first, dtype)
    kw["average_attn_weights"] = average
    torch_nw = need_weights or case.get("torch_weights_path", False)
    (o, w, xs), (to, tw, txs), (ro, rw, rxs) = (
        _run(ours, args, kw, dtype, need_weights), _run(theirs, args, kw, dtype, torch_nw),
        _run(truth, args, kw, torch.float64, torch_nw))
    if not need_weights:
        tw = rw = None
    assert o.shape == to.shape and o.dtype == to.dtype
    res = [parity("out", o, to, ro)]
    if need_weights:
        assert w.shape == tw.shape
        res.append(parity("weights", w, tw, rw))
    else:
        assert w is None and tw is None
    go = torch.randn_like(ro)
    gw = torch.randn_like(rw) if need_weights else None

    def grads(mod, out, weights, xs, d):
        loss = (out * go.to(d)).sum()
        if need_weights:
            loss = loss + (weights * gw.to(d)).sum()
        params = [p for _, p in sorted(mod.named_parameters())]
        return torch.autograd.grad(loss, xs + params)

    names = [f"d{i}" for i in range(len(xs))] + [f"d{n}" for n, _ in sorted(ours.named_parameters())]
    for name, a, b, c in zip(names, grads(ours, o, w, xs, dtype), grads(theirs, to, tw, txs, dtype),
                             grads(truth, ro, rw, rxs, torch.float64)):
        res.append(parity(name, a, b, c))
    assert_parity(res)


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seqfirst", "batchfirst"])
@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_torch_module(name, batch_first, need_weights):
    _check_parity(CASES[name], batch_first, need_weights)


def test_per_head_weights():
    _check_parity(CASES["self-3d-bool+kpm-float"], True, True, average=False)


def test_bfloat16():
    _check_parity(CASES["self-2d-bool+kpm-bool"], True, False, dtype=torch.bfloat16)


def test_eval_no_grad_matches_torch_fast_path():
    # torch's module takes its C++ inference path here (eval, no grad, batch_first self-attention).
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
    ours = ann.MultiheadAttention(E, H, batch_first=True).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 13, E)
    kpm = _keypad(3, 13, "bool")
    with torch.no_grad(), kernel_calls() as calls:
        t, _ = theirs(x, x, x, key_padding_mask=kpm, need_weights=False)
        o, w = ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert w is None and calls["attnfast_fwd"] == 1
    keep = ~kpm[:, :, None]  # torch's fast path zeroes padded query rows of the output
    t64, _ = copy.deepcopy(theirs).double()(x.double(), x.double(), x.double(), key_padding_mask=kpm,
                                            need_weights=False)
    r = parity("out", o.masked_select(keep), t.masked_select(keep), t64.masked_select(keep))
    assert r.ok, r


@pytest.mark.parametrize("variant", [dict(), dict(kdim=24, vdim=20), dict(bias=False), dict(add_bias_kv=True)],
                         ids=["packed", "separate", "no-bias", "bias-kv"])
def test_state_dict_both_ways(variant):
    theirs = torch.nn.MultiheadAttention(E, H, **variant)
    ours = ann.MultiheadAttention(E, H, **variant)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for name, t in theirs.state_dict().items():
        assert ours.state_dict()[name].shape == t.shape, name
    ours.load_state_dict(theirs.state_dict())  # strict
    assert all(torch.equal(ours.state_dict()[n], t) for n, t in theirs.state_dict().items())
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    back = torch.nn.MultiheadAttention(E, H, **variant)
    back.load_state_dict(ours.state_dict())  # strict
    assert all(torch.equal(back.state_dict()[n], t) for n, t in ours.state_dict().items())


def test_masks_reach_the_kernel_as_broadcast_views(monkeypatch):
    seen = []
    real = ann.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
        seen.append((None if attn_mask is None else tuple(attn_mask.shape), is_causal, tuple(q.shape)))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)

    monkeypatch.setattr(ann, "scaled_dot_product_attention", spy)
    m = ann.MultiheadAttention(E, H, batch_first=True)
    N, L = 3, 9
    x = torch.randn(N, L, E)
    kpm, am = _keypad(N, L, "bool"), _attn_mask(L, L, N, "2d-bool")
    m(x, x, x, key_padding_mask=kpm, need_weights=False)
    m(x, x, x, key_padding_mask=kpm, attn_mask=am, need_weights=False)
    m(x, x, x, key_padding_mask=kpm, attn_mask=_attn_mask(L, L, N, "2d-causal"), is_causal=True, need_weights=False)
    m(x, x, x, attn_mask=am, need_weights=False)
    assert seen == [((N, 1, 1, L), False, (N, H, L, E // H)),
                    ((N, 1, L, L), False, (N, H, L, E // H)),
                    ((N, 1, 1, L), True, (N, H, L, E // H)),
                    ((1, 1, L, L), False, (N, H, L, E // H))]
    seen.clear()
    m(x, x, x, key_padding_mask=kpm)  # need_weights=True (default): the unfused path
    assert seen == []


def test_fused_path_runs_attnfast_forward_and_backward():
    m = ann.MultiheadAttention(E, H)
    x = torch.randn(7, 2, E, requires_grad=True)
    with kernel_calls() as calls:
        out, _ = m(x, x, x, need_weights=False)
        out.sum().backward()
    assert calls == {"attnfast_fwd": 1, "attnfast_bwd": 1}
    with kernel_calls() as calls:
        m(x, x, x)
    assert calls["attnfast_fwd"] == 0 and calls["torch_attention"] == 0


def test_dead_rows_give_zero_on_both_paths():
    m = ann.MultiheadAttention(E, H, batch_first=True, bias=False)
    x = torch.randn(2, 5, E)
    am = torch.zeros(5, 5, dtype=torch.bool)
    am[3] = True  # query 3 may see no key
    fused, _ = m(x, x, x, attn_mask=am, need_weights=False)
    unfused, w = m(x, x, x, attn_mask=am, need_weights=True)
    assert torch.isfinite(fused).all() and torch.isfinite(unfused).all() and torch.isfinite(w).all()
    assert torch.equal(fused[:, 3], torch.zeros(2, E)) and torch.equal(unfused[:, 3], torch.zeros(2, E))
    assert torch.equal(w[:, 3], torch.zeros(2, 5))
    torch.testing.assert_close(fused, unfused)


def test_training_dropout_is_attnfast_dropout():
    from attnfast.reference import attention_ref
    from attnfast.testing import dropout_mask

    p, N, L = 0.3, 2, 10
    m = ann.MultiheadAttention(E, H, dropout=p, batch_first=True).train()
    x = torch.randn(N, L, E)
    seed = int(torch.randint(0, 2**31, ()).item())
    torch.manual_seed(seed)
    out, _ = m(x, x, x, need_weights=False)
    torch.manual_seed(seed)
    mult = dropout_mask((N, H, L, L), p)
    q, k, v = (t.unflatten(-1, (H, E // H)).transpose(1, 2) for t in F.linear(x, m.in_proj_weight,
                                                                              m.in_proj_bias).split(E, -1))
    ref, _ = attention_ref(q, k, v, dropout_mask=mult, upcast=False)
    expected = m.out_proj(ref.transpose(1, 2).reshape(N, L, E))
    torch.testing.assert_close(out, expected)
    m.eval()
    assert not torch.allclose(m(x, x, x, need_weights=False)[0], out)


# -- bad input ------------------------------------------------------------------------------

def test_constructor_errors():
    with pytest.raises(ValueError, match="embed_dim must be divisible by num_heads"):
        ann.MultiheadAttention(30, 4)
    with pytest.raises(ValueError, match="embed_dim and num_heads must be greater than 0"):
        ann.MultiheadAttention(32, 0)
    with pytest.raises(ValueError, match="dropout must be in"):
        ann.MultiheadAttention(32, 4, dropout=1.0)


def test_forward_errors():
    m = ann.MultiheadAttention(E, H)
    x = torch.randn(6, 2, E)  # (L, N, E)

    def raises(exc, pattern, *args, **kw):
        with pytest.raises(exc, match=pattern):
            m(*args, **kw)

    raises(ValueError, "batched 3D tensor but received 4-D query", x[None], x[None], x[None])
    raises(ValueError, r"expected `key` and `value` to be 3-D but found 2-D and 2-D", x, x[:, 0], x[:, 0])
    raises(ValueError, "was expecting embedding dimension of 32, but got 16", x[..., :16], x, x)
    raises(ValueError, "key must have kdim=32", x, x[..., :16], x)
    raises(ValueError, "do not match value's", x, x, x[:5])
    raises(ValueError, "key batch size 1 must equal query batch size 2", x, x[:, :1], x[:, :1])
    raises(TypeError, "key dtype torch.float64 must match query dtype torch.float32", x, x.double(), x)
    raises(ValueError, r"The shape of the 2D attn_mask is \(6, 5\), but should be \(6, 6\)", x, x, x,
           attn_mask=torch.zeros(6, 5, dtype=torch.bool))
    raises(ValueError, r"The shape of the 3D attn_mask is \(4, 6, 6\), but should be \(8, 6, 6\)", x, x, x,
           attn_mask=torch.zeros(4, 6, 6, dtype=torch.bool))
    raises(ValueError, "expected `attn_mask` to be `None`, 2-D or 3-D but found 4-D", x, x, x,
           attn_mask=torch.zeros(1, 8, 6, 6, dtype=torch.bool))
    raises(ValueError, r"expecting key_padding_mask shape of \(2, 6\), but got \(2, 5\)", x, x, x,
           key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    raises(ValueError, "expected `key_padding_mask` to be `None` or 2-D but found 1-D", x, x, x,
           key_padding_mask=torch.zeros(6, dtype=torch.bool))
    raises(TypeError, "only bool and floating types of key_padding_mask are supported", x, x, x,
           key_padding_mask=torch.zeros(2, 6, dtype=torch.int64))
    raises(TypeError, "only bool and floating types of attn_mask are supported", x, x, x,
           attn_mask=torch.zeros(6, 6, dtype=torch.int32))
    raises(RuntimeError, "Need attn_mask if specifying the is_causal hint", x, x, x, is_causal=True)
    raises(TypeError, "query must be a torch.Tensor", [1.0], x, x)
    raises(TypeError, "key_padding_mask must be a torch.Tensor or None", x, x, x, key_padding_mask=[[True]])


def test_exported_from_package():
    assert attnfast.nn.MultiheadAttention is ann.MultiheadAttention
