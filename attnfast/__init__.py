"""attnfast: fused attention kernels for PyTorch.

    import attnfast
    out = attnfast.scaled_dot_product_attention(q, k, v, is_causal=True)
    out, lse = attnfast.attention(q, k, v, window=(256, 0), return_lse=True)
    mha = attnfast.nn.MultiheadAttention(512, 8, batch_first=True)   # torch's module, fused
    with attnfast.patched(): ...   # torch's F.scaled_dot_product_attention -> attnfast
"""
from . import ops  # noqa: F401  (registers the custom ops)
from . import nn  # noqa: F401
from .api import attention, scaled_dot_product_attention
from .varlen import attention_with_kvcache, varlen_attention
from ._validate import ArgumentError, ArgumentTypeError
from .dispatch import BackendUnavailableError, DegradedWarning, backends
from .patching import patch, patched, unpatch
from .reference import attention_ref
from .variants import additive_attention, topk_attention

__version__ = "0.1.0"

__all__ = [
    "attention",
    "scaled_dot_product_attention",
    "varlen_attention",
    "attention_with_kvcache",
    "additive_attention",
    "topk_attention",
    "attention_ref",
    "nn",
    "patch",
    "unpatch",
    "patched",
    "backends",
    "BackendUnavailableError",
    "ArgumentError",
    "ArgumentTypeError",
    "DegradedWarning",
    "__version__",
]
