"""One small call of every backend against the reference, forward and backward.

The first test step of bench/gpu_check.sh: on a machine with a CUDA device the triton and cuda
backends must be there (a missing one fails, with the reason the dispatcher gives); without one,
triton runs under the interpreter on CPU tensors and cuda is skipped.
"""
import pytest
import torch

import attnfast
from attnfast.testing import assert_parity, compare_with_reference
from cases import Case, make_inputs

ON_GPU = torch.cuda.is_available()
SMOKE = [Case(B=1, Hq=2, Hkv=1, Lq=33, Lk=70, E=64, causal=True, align="bottom_right"),  # (head dims of every backend)
         Case(B=2, Hq=2, Hkv=2, Lq=40, Lk=40, E=64, mask="bool", mask_bcast="keypad")]


@pytest.mark.parametrize("case", SMOKE, ids=[c.id() for c in SMOKE])
@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_backend_smoke(backend, case):
    if backend == "cuda" and not ON_GPU:
        pytest.skip("the cuda backend needs a CUDA device (tests/cuda/test_cuda_emu.py emulates its kernels)")
    status = attnfast.backends()[backend]
    if not status.available:
        pytest.fail(f"the {backend} backend is not available: {status.reason}")
    device = "cuda" if backend != "cpu" and ON_GPU else "cpu"
    dtype = torch.float32 if backend == "cpu" else torch.bfloat16
    q, k, v, m = (t if t is None else t.detach().to(device).requires_grad_(t.requires_grad)
                  for t in make_inputs(case, dtype))

    def run(q, k, v, m):
        return attnfast.attention(q, k, v, attn_mask=m, return_lse=True, backend=backend, **case.attention_kwargs())

    assert_parity(compare_with_reference(run, q, k, v, m, **case.ref_kwargs()), f"{backend} {case.id()}")
