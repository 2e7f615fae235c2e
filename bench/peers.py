"""The implementations a benchmark compares ("peers").

A peer is `fn(q, k, v, causal) -> out` for q, k, v of shape (B, H, L, D).
Later suites add peers (GPU kernels, other libraries) to their own lists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Peer:
    name: str          # short id used in records, CLI and tables
    label: str         # what it is, for the table notes
    fn: Callable
    unavailable: Callable[[], Optional[str]] = lambda: None   # reason it cannot run, or None


def _attnfast_cpu(q, k, v, causal):
    import attnfast

    return attnfast.attention(q, k, v, is_causal=causal, backend="cpu")


def attnfast_cpu_unavailable():
    """None when attnfast's CPU backend can run, else the reason it cannot."""
    import attnfast

    st = attnfast.backends()["cpu"]
    return None if st.available else st.reason


def _torch_sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _naive(q, k, v, causal):
    from attnfast.reference import attention_ref

    return attention_ref(q, k, v, is_causal=causal, upcast=False)[0]


CPU_PEERS = [
    Peer("attnfast", "attnfast.attention(backend='cpu'): the fused C++ kernel", _attnfast_cpu,
         attnfast_cpu_unavailable),
    Peer("sdpa", "torch.nn.functional.scaled_dot_product_attention", _torch_sdpa),
    Peer("naive", "attnfast.reference.attention_ref(upcast=False): matmul, softmax, matmul in the input dtype",
         _naive),
]

PEERS = {p.name: p for p in CPU_PEERS}


def make_inputs(B, H, L, D, dtype, requires_grad=False, Lk=None):
    """q, k, v (B, H, L, D) ~ N(0, 1) (and the output gradient when requires_grad)."""
    Lk = L if Lk is None else Lk
    q = torch.randn(B, H, L, D, dtype=dtype)
    k = torch.randn(B, H, Lk, D, dtype=dtype)
    v = torch.randn(B, H, Lk, D, dtype=dtype)
    if not requires_grad:
        return q, k, v, None
    for t in (q, k, v):
        t.requires_grad_(True)
    return q, k, v, torch.randn(B, H, L, D, dtype=dtype)
