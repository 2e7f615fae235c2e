"""attnfast as a Hugging Face transformers attention implementation.

    from attnfast.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="attnfast")
    model.set_attn_implementation("attnfast")   # or switch a loaded model

`register()` adds "attnfast" to transformers' AttentionInterface (the
attention function) and AttentionMaskInterface (the masks the model builds
for it: the same as for "sdpa", a boolean (B, 1, Lq, Lk) mask or None when
is_causal covers it).  Models whose attention layers call
ALL_ATTENTION_FUNCTIONS (those with `_supports_attention_backend = True`:
Llama, Mistral, Qwen2, GPT-2, BERT, RoBERTa, DistilBERT and most recent
ones) then run attnfast's kernels.  Grouped-query attention goes to the
kernel as is (no repeat of the key/value heads), with or without a mask.

Not supported (ValueError): `softcap`, attention sinks (`s_aux`).  With
output_attentions the weights are not computed (None), as with "sdpa".
"""
from __future__ import annotations

import warnings

import torch

from ..api import scaled_dot_product_attention

__all__ = ["register", "attention_forward", "NAME"]

NAME = "attnfast"


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      position_bias=None, **kwargs):
    """transformers attention function: query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D)
    -> (out (B, Lq, Hq, Dv), None).  Same decisions as transformers' "sdpa" function."""
    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='attnfast' does not support `softcap`; use 'eager'")
    if kwargs.get("s_aux") is not None:
        raise ValueError("attn_implementation='attnfast' does not support attention sinks (`s_aux`); use 'eager'")
    if kwargs.get("output_attentions", False):
        warnings.warn("attn_implementation='attnfast' does not return attention weights (output_attentions); "
                      "use 'eager' for them", stacklevel=2)
    Lq = query.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # As "sdpa": the causal flag only when no mask was built, and never for a single query
    # (decoding: the one new token sees the whole cache).  Top-left alignment, so with
    # Lk > Lq (an empty static cache) the keys past Lq stay hidden, as sdpa's cropping does.
    is_causal = bool(is_causal) and attention_mask is None and Lq > 1
    mask = attention_mask
    if position_bias is not None:  # additive bias (T5-style): merge with the mask as a float mask
        bias = position_bias.to(query.dtype)
        if mask is None:
            mask = bias
        elif mask.dtype == torch.bool:
            mask = bias.masked_fill(~mask, float("-inf"))
        else:
            mask = bias + mask
    out = scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                       scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME):
    """Register attnfast with transformers under `name` (default "attnfast"); idempotent."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError as e:  # pragma: no cover - depends on the installed version
        raise ImportError("attnfast.integrations.transformers needs transformers with AttentionInterface "
                          f"(4.48 or later): {e}") from e
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return name
