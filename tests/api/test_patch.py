"""attnfast.patch() / unpatch() / patched(): torch's SDPA, and the torch modules that call it, run attnfast."""
import copy

import pytest
import torch
import torch.nn.functional as F

import attnfast
from attnfast.patching import is_patched, kernel_calls
from attnfast.testing import parity

D_MODEL, NHEAD, LAYERS = 64, 4, 2

pytestmark = [pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
              pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")]


@pytest.fixture(autouse=True)
def always_unpatched():
    """Every test starts and ends unpatched, with torch's fast-path setting untouched."""
    original, fastpath = F.scaled_dot_product_attention, torch.backends.mha.get_fastpath_enabled()
    assert not is_patched()
    yield
    attnfast.unpatch()
    assert F.scaled_dot_product_attention is original
    assert torch.backends.mha.get_fastpath_enabled() == fastpath


def _transformer(batch_first):
    return torch.nn.Transformer(d_model=D_MODEL, nhead=NHEAD, num_encoder_layers=LAYERS, num_decoder_layers=LAYERS,
                                dim_feedforward=64, dropout=0.0, batch_first=batch_first)


def _pad(N, L):
    """(N, L) key padding mask (True = padding), right-padded, every sequence at least 3 long."""
    lengths = torch.randint(3, L + 1, (N,))
    lengths[0], lengths[-1] = L, torch.randint(3, L, ())  # one full row, one padded row at least
    return torch.arange(L)[None, :] >= lengths[:, None]


def _data(batch_first, N=3, S=19, T=13):
    src, tgt = torch.randn(S, N, D_MODEL), torch.randn(T, N, D_MODEL)
    if batch_first:
        src, tgt = src.transpose(0, 1).contiguous(), tgt.transpose(0, 1).contiguous()
    src_pad, tgt_pad = _pad(N, S), _pad(N, T)
    masks = dict(tgt_mask=torch.ones(T, T, dtype=torch.bool).triu(1), tgt_is_causal=True,
                 src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad)
    return src, tgt, masks


def _forward_backward(model, src, tgt, masks, grad_out, dtype):
    src, tgt = (t.detach().to(dtype).requires_grad_() for t in (src, tgt))
    masks = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
             for k, v in masks.items()}
    out = model(src, tgt, **masks)
    params = [p for _, p in model.named_parameters()]
    grads = torch.autograd.grad(out, [src, tgt] + params, grad_out.to(dtype))
    return out, grads


@pytest.mark.parametrize("batch_first", [False, True], ids=["seqfirst", "batchfirst"])
def test_transformer_same_outputs_and_gradients_patched(batch_first):
    model = _transformer(batch_first).train()  # dropout 0: train mode, the Python path in torch too
    truth = copy.deepcopy(model).double()
    src, tgt, masks = _data(batch_first)
    grad_out = torch.randn(tgt.shape, dtype=torch.float64)

    with kernel_calls() as plain_calls:
        t_out, t_grads = _forward_backward(model, src, tgt, masks, grad_out, torch.float32)
    with attnfast.patched(), kernel_calls() as calls:
        o_out, o_grads = _forward_backward(model, src, tgt, masks, grad_out, torch.float32)
    r_out, r_grads = _forward_backward(truth, src, tgt, masks, grad_out, torch.float64)

    # Every attention (encoder self, decoder self and cross) ran attnfast, forward and backward;
    # none ran torch's kernels.  Unpatched, none ran attnfast.
    n_attn = LAYERS + 2 * LAYERS
    assert calls == {"attnfast_fwd": n_attn, "attnfast_bwd": n_attn}
    assert plain_calls["attnfast_fwd"] == 0 and plain_calls["torch_attention"] >= n_attn

    names = ["dsrc", "dtgt"] + [f"d{n}" for n, _ in model.named_parameters()]
    res = [parity("out", o_out, t_out, r_out)]
    res += [parity(n, a, b, c) for n, a, b, c in zip(names, o_grads, t_grads, r_grads)]
    bad = [r for r in res if not r.ok]
    assert not bad, "; ".join(map(repr, bad))


def test_transformer_eval_fast_paths_are_routed_too():
    # Eval + no grad + batch_first: unpatched, torch takes its C++ paths (nested tensors in the
    # encoder, fused encoder layers, native multi-head attention); patched, the Python path -> attnfast.
    model = _transformer(True).eval()
    src, tgt, masks = _data(True)
    with torch.no_grad():
        with kernel_calls() as plain_calls:
            t_out = model(src, tgt, **masks)
        with attnfast.patched(), kernel_calls() as calls:
            o_out = model(src, tgt, **masks)
        r_out = copy.deepcopy(model).double()(src.double(), tgt.double(), **masks)
    assert plain_calls["torch_attention"] > 0 and plain_calls["attnfast_fwd"] == 0
    assert calls["attnfast_fwd"] == LAYERS + 2 * LAYERS and calls["torch_attention"] == 0
    keep = ~masks["tgt_key_padding_mask"][:, :, None]  # rows of real target tokens
    r = parity("out", o_out.masked_select(keep), t_out.masked_select(keep), r_out.masked_select(keep))
    assert r.ok, r


def test_encoder_and_decoder_layers_and_mha_reach_attnfast():
    x = torch.randn(2, 9, D_MODEL)
    enc = torch.nn.TransformerEncoderLayer(D_MODEL, NHEAD, 64, dropout=0.0, batch_first=True)
    dec = torch.nn.TransformerDecoderLayer(D_MODEL, NHEAD, 64, dropout=0.0, batch_first=True)
    mha = torch.nn.MultiheadAttention(D_MODEL, NHEAD, batch_first=True)
    with attnfast.patched():
        with kernel_calls() as c_enc:
            enc(x, is_causal=True, src_mask=torch.nn.Transformer.generate_square_subsequent_mask(9))
        with kernel_calls() as c_dec:
            dec(x, x)
        with kernel_calls() as c_mha:
            mha(x, x, x, need_weights=False)
        with kernel_calls() as c_weights:
            mha(x, x, x)  # need_weights=True: torch computes the weights itself, no SDPA call
    assert c_enc == {"attnfast_fwd": 1}
    assert c_dec == {"attnfast_fwd": 2}
    assert c_mha == {"attnfast_fwd": 1}
    assert c_weights["attnfast_fwd"] == 0


def test_patched_restores_even_when_the_body_raises():
    original, fastpath = F.scaled_dot_product_attention, torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(KeyError, match="boom"):
        with attnfast.patched():
            assert F.scaled_dot_product_attention is not original and is_patched()
            assert torch.backends.mha.get_fastpath_enabled() is False
            raise KeyError("boom")
    assert F.scaled_dot_product_attention is original and not is_patched()
    assert torch.backends.mha.get_fastpath_enabled() == fastpath


def test_patch_unpatch_idempotent_and_nesting():
    original = F.scaled_dot_product_attention
    attnfast.patch()
    routed = F.scaled_dot_product_attention
    attnfast.patch()  # no double wrapping
    assert F.scaled_dot_product_attention is routed and routed.__attnfast_original__ is original
    with attnfast.patched():  # already patched: the block does not unpatch on exit
        pass
    assert is_patched()
    attnfast.unpatch()
    attnfast.unpatch()
    assert F.scaled_dot_product_attention is original
    with attnfast.patched():
        with attnfast.patched():
            pass
        assert is_patched()  # the inner block did not own the patch
    assert not is_patched()


def test_patched_sdpa_is_attnfast():
    q, k, v = torch.randn(2, 4, 11, 16), torch.randn(2, 2, 15, 16), torch.randn(2, 2, 15, 16)
    m = torch.rand(11, 15) > 0.3
    m[:, 0] = True
    with attnfast.patched(), kernel_calls() as calls:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.2, enable_gqa=True)
    assert calls == {"attnfast_fwd": 1}
    assert torch.equal(out, attnfast.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.2, enable_gqa=True))


def test_devices_without_a_fused_backend_fall_back_to_torch(monkeypatch):
    monkeypatch.delenv("ATTNFAST_BACKEND", raising=False)
    q = torch.empty(2, 4, 11, 16, device="meta")
    with attnfast.patched(), kernel_calls() as calls:
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert out.device.type == "meta" and out.shape == q.shape
    assert calls["attnfast_fwd"] == 0


def test_bad_input_raises_attnfast_errors_when_patched():
    q = torch.randn(2, 4, 11, 16)
    with attnfast.patched():
        with pytest.raises(ValueError, match="value length must equal key length 11"):
            F.scaled_dot_product_attention(q, q, q[:, :, :5])
        with pytest.raises(TypeError, match="attn_mask must be bool or floating point"):
            F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(11, 11, dtype=torch.int64))


def test_sdpa_kernel_hands_the_call_back_to_torch():
    # A block that restricts torch's SDPA backends asks for torch's kernels: under the patch it
    # gets them (and their errors: the math backend refuses attn_mask with is_causal=True);
    # outside the block, attnfast serves again.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 4, 11, 16)
    m = torch.rand(11, 11) > 0.3
    with attnfast.patched(), kernel_calls() as calls:
        with sdpa_kernel(SDPBackend.MATH):
            want = F.scaled_dot_product_attention(q, q, q, attn_mask=m)
            with pytest.raises(RuntimeError, match="attn_mask should not be set when is_causal"):
                F.scaled_dot_product_attention(q, q, q, attn_mask=m, is_causal=True)
        assert calls["attnfast_fwd"] == 0  # (torch's math path runs as plain matmul and softmax ops)
        got = F.scaled_dot_product_attention(q, q, q, attn_mask=m)
        assert calls["attnfast_fwd"] == 1
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # the AND of the two, as torch's default CPU path does (attnfast serves it)
        F.scaled_dot_product_attention(q, q, q, attn_mask=m, is_causal=True)
        assert calls["attnfast_fwd"] == 2


def test_backends_switched_off_before_patch_leave_attnfast_in_charge():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 4, 11, 16)
    with sdpa_kernel([SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]):
        with attnfast.patched(), kernel_calls() as calls:
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
        assert calls == {"attnfast_fwd": 1}


def test_torchscript_of_torch_modules_works_while_patched():
    # TorchScript compiles the patched function's calls as torch's op: scripting an encoder layer
    # (which calls F.scaled_dot_product_attention) must not try to compile attnfast's Python.
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    with attnfast.patched():
        scripted = torch.jit.script(layer)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), layer(x), rtol=1e-5, atol=1e-5)
