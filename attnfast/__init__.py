"""attnfast: fused attention kernels for PyTorch.

    import attnfast
    out = attnfast.scaled_dot_product_attention(q, k, v, is_causal=True)
    out, lse = attnfast.attention(q, k, v, window=(256, 0), return_lse=True)
"""
from . import ops  # noqa: F401  (registers the custom ops)
from .api import attention, scaled_dot_product_attention, varlen_attention
from .dispatch import BackendUnavailableError, backends
from .reference import attention_ref

__version__ = "0.1.0"

__all__ = [
    "attention",
    "scaled_dot_product_attention",
    "varlen_attention",
    "attention_ref",
    "backends",
    "BackendUnavailableError",
    "__version__",
]
