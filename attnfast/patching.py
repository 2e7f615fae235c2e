"""Route torch.nn.functional.scaled_dot_product_attention through attnfast.

    attnfast.patch()             # from now on
    attnfast.unpatch()           # back to torch's
    with attnfast.patched():     # for a block; restored even if the block raises
        loss = model(x).sum()
        loss.backward()          # backward runs attnfast's kernel wherever the forward did

What is covered: every call that looks the function up as an attribute of
torch.nn.functional at call time: `F.scaled_dot_product_attention(...)` in
user code and Hugging Face's "sdpa" attention, and torch's own
F.multi_head_attention_forward, which nn.MultiheadAttention,
nn.TransformerEncoderLayer, nn.TransformerDecoderLayer and nn.Transformer reach
on their Python path.  A name imported earlier with
`from torch.nn.functional import scaled_dot_product_attention` keeps torch's
function.

torch's C++ inference fast paths (torch._native_multi_head_attention for
nn.MultiheadAttention, torch._transformer_encoder_layer_fwd and nested tensors
for the encoder, taken in eval mode without autograd) call torch's own kernels
from C++, where no Python patch reaches.  So patching also switches them off
with torch.backends.mha.set_fastpath_enabled(False), and unpatching restores
the previous setting: under the patch those modules take their Python path,
which calls attnfast.

Calls attnfast has no fused backend for (a device without one, nested tensors)
go to torch's original function, unless ATTNFAST_BACKEND forces a backend.  So do
calls inside `torch.nn.attention.sdpa_kernel(...)`: a block that restricts torch's
SDPA backends (switches off one that was on at patch()) asks for torch's own
kernels, and gets them, with their errors (the math backend, for one, refuses
attn_mask with is_causal=True); a warning says so once.  Backends switched off
before patch() leave attnfast in charge.  Under torch.compile the switches are
not consulted (the compiled graph calls attnfast).
Semantics are SDPA's except that rows with no visible key give 0, not NaN,
and dropout draws from attnfast's generator.

`kernel_calls()` counts what actually ran, to check that a model reaches
attnfast:

    with attnfast.patched(), attnfast.patching.kernel_calls() as calls:
        model(x).sum().backward()
    calls["attnfast_fwd"], calls["attnfast_bwd"], calls["torch_attention"]
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections import Counter

import torch
import torch.nn.functional as F

__all__ = ["patch", "unpatch", "patched", "is_patched", "kernel_calls"]

_lock = threading.Lock()
_original = None        # torch's function while patched, else None
_saved_fastpath = None  # torch.backends.mha fast-path setting before patch()
_backends_at_patch = None  # torch's SDPA backend switches when patch() ran
_wrappers = []          # every patched function made (see _routed)
_warned = False


def _sdpa_backends():
    """torch's switches of its SDPA kernels (flash, memory-efficient, math, cuDNN: what
    torch.nn.attention.sdpa_kernel sets; not the "overrideable" one of out-of-tree devices,
    which a list of every kernel leaves out), as a tuple of bools."""
    return (torch._C._get_flash_sdp_enabled(), torch._C._get_mem_efficient_sdp_enabled(),
            torch._C._get_math_sdp_enabled(), torch._C._get_cudnn_sdp_enabled())


def _routed(original):
    from . import dispatch
    from ._validate import prepare
    from .api import _run

    @functools.wraps(original)
    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        tensors = (query, key, value, attn_mask)
        if (not torch.compiler.is_compiling() and _restricted()) or any(
                isinstance(t, torch.Tensor) and t.is_nested for t in tensors):
            # Inside torch.nn.attention.sdpa_kernel(...) (a backend of torch's switched off since
            # patch()): the caller chose among torch's own kernels, so torch serves the call.
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        plan = prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        backend = dispatch.choose(plan)
        if backend.name == "reference" and not os.environ.get(dispatch.ENV_VAR):
            # No fused kernel serves this device: torch's own is the faster fallback.
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        return _run(plan, backend, False)

    scaled_dot_product_attention.__attnfast_original__ = original
    _wrappers.append(scaled_dot_product_attention)  # alive for good: TorchScript's table keys it by id()
    # TorchScript compiles a call of this function as torch's op (a scripted model runs no Python):
    # without this, scripting a module that calls it (nn.MultiheadAttention) fails while patched.
    try:
        from torch.jit._builtins import _find_builtin, _register_builtin

        op = _find_builtin(original)
        if op is not None:
            _register_builtin(scaled_dot_product_attention, op)
    except ImportError:  # pragma: no cover - a torch without TorchScript's builtin table
        pass
    return scaled_dot_product_attention


def _restricted():
    """True when a backend of torch's that was on at patch() is off now (a sdpa_kernel block, or a
    switch flipped since); warns once, so that the hand-back to torch is not silent."""
    global _warned
    now = _sdpa_backends()
    if _backends_at_patch is None or not any(was and not on for was, on in zip(_backends_at_patch, now)):
        return False
    if not _warned:
        _warned = True
        import warnings

        warnings.warn("attnfast: torch's SDPA backends are restricted (torch.nn.attention.sdpa_kernel, or "
                      "torch.backends.cuda.enable_*_sdp since attnfast.patch()); such calls run torch's kernels",
                      stacklevel=3)
    return True


def is_patched():
    """True while torch.nn.functional.scaled_dot_product_attention is attnfast's."""
    return _original is not None


def patch():
    """Route torch.nn.functional.scaled_dot_product_attention through attnfast (idempotent)."""
    global _original, _saved_fastpath, _backends_at_patch
    with _lock:
        if _original is not None:
            return
        current = F.scaled_dot_product_attention
        _original = current
        _saved_fastpath = torch.backends.mha.get_fastpath_enabled()
        _backends_at_patch = _sdpa_backends()
        F.scaled_dot_product_attention = _routed(current)
        torch.backends.mha.set_fastpath_enabled(False)


def unpatch():
    """Restore torch's function and fast-path setting (no-op when not patched)."""
    global _original, _saved_fastpath
    with _lock:
        if _original is None:
            return
        F.scaled_dot_product_attention = _original
        torch.backends.mha.set_fastpath_enabled(_saved_fastpath)
        _original = _saved_fastpath = None


@contextlib.contextmanager
def patched():
    """Patch for the duration of a with-block; restores on exit, also when the block raises.
    Nested use is fine: only the outermost block that patched unpatches."""
    owner = not is_patched()
    patch()
    try:
        yield
    finally:
        if owner:
            unpatch()


@contextlib.contextmanager
def kernel_calls():
    """Count the attention kernels that run inside the block (forward and backward).

    Yields a Counter with keys "attnfast_fwd", "attnfast_bwd" (attnfast's custom
    ops, any backend) and "torch_attention" (torch's SDPA kernels, its native
    multi-head attention and its fused encoder layer).  Run backward inside the
    block to count backward kernels.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = Counter()

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ns = getattr(func, "namespace", "")
            name = func.name()
            if ns == "attnfast":
                base = name.split("::")[-1].split(".")[0]
                calls["attnfast_bwd" if "bwd" in base else "attnfast_fwd"] += 1
            elif ns == "aten" and any(s in name for s in ("scaled_dot_product", "native_multi_head_attention",
                                                           "transformer_encoder_layer_fwd")):
                calls["torch_attention"] += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        yield calls
