"""attn_implementation="attnfast" in Hugging Face transformers matches "sdpa".

Tiny randomly initialised models built from configs (nothing downloaded): a
Llama decoder with grouped-query attention, and a BERT encoder with padding.
Logits and the gradients of every parameter: attnfast and sdpa (float32)
against sdpa in float64, by the parity rule.
"""
import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnfast.integrations.transformers as hf  # noqa: E402
from attnfast.patching import kernel_calls  # noqa: E402
from attnfast.testing import assert_parity, parity  # noqa: E402

VOCAB, LAYERS = 96, 2
HIDDEN = 64


@pytest.fixture(scope="module", autouse=True)
def registered():
    hf.register()


def _models(config, auto_cls):
    sdpa = auto_cls.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    ours = auto_cls.from_config(copy.deepcopy(config), attn_implementation="attnfast")
    ours.load_state_dict(sdpa.state_dict())
    truth = copy.deepcopy(sdpa).double()
    assert ours.config._attn_implementation == "attnfast" and truth.config._attn_implementation == "sdpa"
    for m in (sdpa, ours, truth):
        m.train()  # dropout probabilities are 0 in the configs
    return ours, sdpa, truth


def _right_padded(B, L):
    lengths = torch.randint(L // 2, L + 1, (B,))
    lengths[0], lengths[-1] = L, torch.randint(L // 2, L, ())  # one full row, one padded row at least
    return (torch.arange(L)[None, :] < lengths[:, None]).long()


def _check(ours, sdpa, truth, inputs, expect_calls):
    grad_logits = None
    results, outs = [], []
    for model in (ours, sdpa, truth):
        with kernel_calls() as calls:
            logits = model(**inputs).logits
            if grad_logits is None:
                grad_logits = torch.randn(logits.shape, dtype=torch.float64)
            params = [p for _, p in model.named_parameters()]
            grads = torch.autograd.grad(logits, params, grad_logits.to(logits.dtype))
        outs.append((logits, grads, calls))
    (o, og, calls), (t, tg, plain), (r, rg, _) = outs
    assert calls == {"attnfast_fwd": expect_calls, "attnfast_bwd": expect_calls}
    assert plain["attnfast_fwd"] == 0 and plain["torch_attention"] > 0
    results.append(parity("logits", o, t, r))
    grads = {n: (a, b, c) for (n, _), a, b, c in zip(ours.named_parameters(), og, tg, rg)}
    # A key projection's bias has zero exact gradient (softmax ignores a shift common to a
    # row's scores), so on its own its error is pure rounding noise with nothing to scale a
    # floor by.  Check it packed with the query and value biases, as torch's in_proj_bias is.
    for name in [n for n in grads if n.endswith(".key.bias")]:
        parts = [grads.pop(name.replace(".key.", f".{p}.")) for p in ("query", "key", "value")]
        grads[name.replace(".key.", ".qkv.")] = tuple(torch.cat(x) for x in zip(*parts))
    results += [parity(f"d{n}", a, b, c) for n, (a, b, c) in grads.items()]
    assert_parity(results)


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "causal+padding"])
def test_llama_gqa(padded, monkeypatch):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, attention_dropout=0.0)
    ours, sdpa, truth = _models(config, transformers.AutoModelForCausalLM)
    B, L = 3, 17
    inputs = {"input_ids": torch.randint(0, VOCAB, (B, L))}
    if padded:
        inputs["attention_mask"] = _right_padded(B, L)

    seen = []
    real = hf.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((tuple(q.shape), tuple(k.shape), None if attn_mask is None else tuple(attn_mask.shape), kw))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(hf, "scaled_dot_product_attention", spy)
    _check(ours, sdpa, truth, inputs, LAYERS)
    # GQA reaches the kernel unexpanded (2 key/value heads for 4 query heads); without padding the
    # causal rule is the kernel's flag, with padding it is in the (B, 1, L, L) mask.
    assert len(seen) == LAYERS
    for q, k, m, kw in seen:
        assert q == (B, 4, L, HIDDEN // 4) and k == (B, 2, L, HIDDEN // 4) and kw["enable_gqa"]
        assert (m, kw["is_causal"]) == (((B, 1, L, L), False) if padded else (None, True))


@pytest.mark.parametrize("left_padded", [False, True], ids=["unpadded", "left-padded"])
def test_llama_generate_gives_sdpa_tokens(left_padded):
    """Greedy generation of 64 new tokens (decoding: one query over a growing KV cache, through
    the short-query kernel) gives the same tokens as "sdpa", with and without left padding."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, attention_dropout=0.0, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=None)
    sdpa = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="attnfast").eval()
    ours.load_state_dict(sdpa.state_dict())
    B, L, NEW = 3, 11, 64
    ids = torch.randint(2, VOCAB, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    if left_padded:
        mask[1, :4] = 0
        mask[2, :7] = 0
        ids[mask == 0] = 0
    tokens = []
    for model in (sdpa, ours):
        with kernel_calls() as calls:
            tokens.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                                         min_new_tokens=NEW, do_sample=False))
    assert calls["attnfast_fwd"] == NEW * LAYERS  # the prompt, then one call per new token and layer
    assert tokens[0].shape == (B, L + NEW)
    assert torch.equal(tokens[1], tokens[0])


def test_bert_padding():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=4, intermediate_size=2 * HIDDEN, max_position_embeddings=64,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ours, sdpa, truth = _models(config, transformers.AutoModelForMaskedLM)
    B, L = 3, 19
    inputs = {"input_ids": torch.randint(0, VOCAB, (B, L)), "attention_mask": _right_padded(B, L)}
    _check(ours, sdpa, truth, inputs, LAYERS)


def test_register_is_idempotent_and_listed():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert hf.register() == "attnfast" and hf.register() == "attnfast"
    assert AttentionInterface()["attnfast"] is hf.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["attnfast"] is ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]


def test_unsupported_options_raise():
    q = torch.randn(1, 2, 5, 8)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="does not support `softcap`"):
        hf.attention_forward(module, q, q, q, None, softcap=30.0)
    with pytest.raises(ValueError, match="attention sinks"):
        hf.attention_forward(module, q, q, q, None, s_aux=torch.zeros(2))
    with pytest.warns(UserWarning, match="does not return attention weights"):
        out, w = hf.attention_forward(module, q, q, q, None, output_attentions=True)
    assert w is None and out.shape == (1, 5, 2, 8)


def test_importing_attnfast_does_not_import_transformers():
    code = "import sys, attnfast; assert 'transformers' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
