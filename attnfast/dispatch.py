"""The one place that chooses a backend.

Order of preference per device: CUDA tensors -> triton, cuda, reference;
CPU tensors -> cpu, reference.  `backend=` or the environment variable
ATTNFAST_BACKEND force one; a forced backend that cannot serve the input raises
BackendUnavailableError (no silent fallback).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch

from . import ops

BACKENDS = ("cpu", "triton", "cuda", "reference")
ENV_VAR = "ATTNFAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for but cannot serve this input."""


class DegradedWarning(RuntimeWarning):
    """attnfast runs a slower path than this package offers (once per cause and process);
    attnfast.backends() says why."""


_WARNED = set()


def _warn_once(cause, message):
    if cause not in _WARNED:
        _WARNED.add(cause)
        warnings.warn(message, DegradedWarning, stacklevel=4)


def _note_degraded(name, plan):
    """One warning per cause when the default choice is a fallback (eager calls only: a
    warning inside a torch.compile trace would break the graph)."""
    if torch.compiler.is_compiling():
        return
    if plan.q.device.type == "cpu":
        if name == "reference":
            _warn_once("cpu", f"attnfast: the C++ CPU kernel is unavailable ({_AVAILABLE['cpu'][1]}); "
                              "calls run the naive reference (correct, but O(L^2) memory and slow)")
        elif name == "cpu" and _CPU_ISA_BEST != "avx512":
            _warn_once("cpu-isa", f"attnfast: this CPU lacks AVX-512 (with avx512_bf16); the CPU kernel runs its "
                                  f"{_CPU_ISA_BEST} path")
    elif name == "reference":
        why = "; ".join(f"{b}: {_serves(b, plan)}" for b in ("triton", "cuda"))
        _warn_once(f"gpu:{why}", f"attnfast: no GPU kernel serves this call ({why}); it runs the naive reference")


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why not, or what it serves

    def __str__(self):
        return f"{self.name:<10} {'yes' if self.available else 'no ':<4} {self.reason}"


def _has_kernel(op, key):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
    except RuntimeError:
        return False


def _availability(name):
    """(available, reason): fixed facts of this process, worked out once at import."""
    if name == "reference":
        return True, "naive matmul-softmax-matmul (any device, any dtype)"
    if name == "cpu":
        if not ops.loaded():
            return False, f"extension attnfast._C not built: {ops.load_error()}"
        return True, "fused C++ kernel"
    if name == "cuda":
        if not ops.loaded():
            return False, "extension attnfast._C not built"
        if not _has_kernel("attnfast::fwd", "CUDA"):
            return False, "extension built without CUDA kernels"
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, "CUDA C++ kernels"
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return True, "Triton kernels under the interpreter (TRITON_INTERPRET=1, CPU tensors)"
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, "Triton kernels"
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


_AVAILABLE = {name: _availability(name) for name in BACKENDS}
_CPU_ISA_BEST = ops._C.cpu_isa_best() if ops.loaded() else None  # fixed per machine


def backends():
    """Status of every backend: {name: BackendStatus(name, available, reason)}."""
    out = {}
    for name, (ok, reason) in _AVAILABLE.items():
        if name == "cpu" and ok:
            reason += f", ISA path {ops._C.cpu_isa()}"
            if _CPU_ISA_BEST != "avx512":
                reason += " (this CPU lacks AVX-512 with avx512_bf16)"
        out[name] = BackendStatus(name, ok, reason)
    return out


def _serves(name, plan):
    """None if backend `name` can run `plan`, else the reason it cannot."""
    ok, reason = _AVAILABLE[name]
    if not ok:
        return reason
    dev = plan.q.device.type
    if name == "cpu" and dev != "cpu":
        return f"it serves CPU tensors, got {dev} tensors"
    interp = _AVAILABLE["triton"][1].startswith("Triton kernels under the interpreter")
    if name == "cuda":
        if dev != "cuda":
            return f"it serves CUDA tensors, got {dev} tensors"
        return _cuda_refuses(plan)
    if name == "triton":
        if dev != "cuda" and not (interp and dev == "cpu"):
            return f"it serves CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {dev} tensors"
        if plan.q.dtype == torch.float64:
            return "float64 is not supported by the Triton kernels"
    return None


# Head dims with CUDA C++ kernels (csrc/cuda/flash.h); others go to Triton.
CUDA_FWD_HEAD_DIMS = (64, 96, 128, 256)
CUDA_BWD_HEAD_DIMS = (64, 96, 128)


def _cuda_refuses(plan):
    """None if the CUDA C++ kernels serve `plan`, else why not."""
    if plan.q.dtype not in (torch.float16, torch.bfloat16):
        return f"it serves float16 and bfloat16 (fp32 goes to Triton), got {plan.q.dtype}"
    E, Ev = plan.q.shape[-1], plan.v.shape[-1]
    if E != Ev:
        return f"it needs equal query and value head dims, got {E} and {Ev}"
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (plan.q, plan.k, plan.v, plan.mask))
    dims = CUDA_BWD_HEAD_DIMS if grad else CUDA_FWD_HEAD_DIMS
    if E not in dims:
        what = "forward and backward" if grad else "forward"
        return f"it has {what} kernels for head dims {dims}, got {E}"
    if plan.dropout_p > 0.0:
        return "dropout is served by the Triton backend"
    return None


def choose(plan, backend=None):
    """Name of the backend that runs `plan` (see module docstring)."""
    requested = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
        why = _serves(requested, plan)
        if why is not None:
            src = "backend=" if backend is not None else f"{ENV_VAR}="
            raise BackendUnavailableError(f"{src}{requested!r} cannot serve this call: {why}")
        return requested
    order = ("triton", "cuda", "reference") if plan.q.device.type == "cuda" else ("cpu", "reference")
    for name in order:
        if _serves(name, plan) is None:
            _note_degraded(name, plan)
            return name
    return "reference"
