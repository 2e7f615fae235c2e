"""Facts of this process that decide which backends can run, worked out once at import.

Everything here is fixed for the life of the process: whether the extension
attnfast._C loaded, the best CPU ISA path it has for this CPU, the head dims its
CUDA kernels were built for (read from the extension, which takes them from the
one list in csrc/cuda), whether a CUDA device is present, and whether Triton is
installed and runs under its interpreter (TRITON_INTERPRET=1, read once, as
Triton itself reads it when a kernel is defined).  The ISA path in use can still
be capped per call by ATTNFAST_CPU_ISA (the extension reads it).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import ops


@dataclass(frozen=True)
class Facts:
    extension_error: Optional[str]      # None when attnfast._C loaded
    cpu_isa_best: Optional[str]         # "avx512", "avx2" or "default"; None without the extension
    cuda_kernels: bool                  # the extension holds the CUDA C++ kernels
    cuda_head_dims: Tuple[Tuple[int, ...], Tuple[int, ...]]  # (forward, backward) head dims of those
    cuda_device: bool                   # torch sees a CUDA device
    triton_installed: bool
    triton_interpreting: bool           # TRITON_INTERPRET=1: Triton kernels run on CPU tensors

    @property
    def extension(self):
        return self.extension_error is None


def _has_kernel(op, key):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
    except RuntimeError:
        return False


def _read():
    C = ops._C
    cuda_kernels = C is not None and _has_kernel("attnfast::fwd", "CUDA")
    head_dims = ((), ())
    if C is not None:  # the extension's one list (csrc/cuda/flash.h); empty in a build without CUDA
        fwd, bwd = C.cuda_head_dims()
        head_dims = (tuple(fwd), tuple(bwd))
    return Facts(
        extension_error=ops.load_error() if C is None else None,
        cpu_isa_best=C.cpu_isa_best() if C is not None else None,
        cuda_kernels=cuda_kernels,
        cuda_head_dims=head_dims,
        cuda_device=torch.cuda.is_available(),
        triton_installed=importlib.util.find_spec("triton") is not None,
        triton_interpreting=os.environ.get("TRITON_INTERPRET", "0") == "1",
    )


FACTS = _read()
