"""The one place that chooses a backend, and the backends themselves.

A backend is one object (`Backend`): a `name`, `serves(plan)` (None, or the
reason it cannot run that call), and the forward/backward of each attention
family it implements, on the canonical plans of attnfast/_validate.py:

    family       plan            methods
    "attention"  Plan            attention_forward(plan), attention_backward(plan, dout, out, lse, delta=None)
    "additive"   AdditivePlan    additive_forward(plan)
    "topk"       TopkPlan        topk_forward(plan)
    "varlen"     VarlenPlan      varlen_forward(plan)
    "kvcache"    KvcachePlan     kvcache_forward(plan)

The varlen and KV-cache methods have defaults that run the sequences one by one
on the backend's attention_forward; a backend with kernels for them overrides it.

The forwards are differentiable (their ops carry autograd); `attention_backward`
is the lse-driven backward that ring attention calls block by block.

The registry `REGISTRY` holds the four backends under one vocabulary of names
for every family:
  "cpu"        the fused C++ kernels (attnfast._C; ops in attnfast/ops.py)
  "triton"     the Triton kernels (triton_kernels/: kernels, launchers and their ops)
  "cuda"       the CUDA C++ kernels (attnfast._C built with CUDA; softmax attention only)
  "reference"  torch code: the naive reference for softmax attention
               (attnfast/reference.py), row chunks with recomputation for the
               additive and top-k families (attnfast/chunked.py)

Order of preference per device: CUDA tensors -> triton, cuda, reference;
CPU tensors -> cpu, reference.  `backend=` or the environment variable
ATTNFAST_BACKEND force one; a forced backend that cannot serve the call raises
BackendUnavailableError (no silent fallback).  Which backends can run at all is
a fact of the process (attnfast/facts.py), worked out once.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass

import torch

from . import ops
from .dropout import draw_rng, dropout_mask
from .facts import FACTS

ENV_VAR = "ATTNFAST_BACKEND"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for but cannot serve this input."""


class DegradedWarning(RuntimeWarning):
    """attnfast runs a slower path than this package offers (once per cause and process);
    attnfast.backends() says why."""


def public_lse_dtype(dtype):
    """dtype of the lse the public functions return: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dtype_names(dtypes):
    return ", ".join(str(d).split(".")[-1] for d in dtypes)


# ---------------------------------------------------------------------------
# The backend interface
# ---------------------------------------------------------------------------

class Backend:
    """One backend: what it serves and the kernels of each family it implements."""

    name = ""
    families = frozenset({"attention", "additive", "topk", "varlen", "kvcache"})  # those it implements
    # {family: dtypes its kernels take}; absent: every floating dtype
    dtypes = {}

    def availability(self):
        """(available, reason): a fact of the process (attnfast/facts.py)."""
        raise NotImplementedError

    def saved_lse_dtype(self, dtype):
        """dtype of the lse `attention_forward` returns (and `attention_backward` takes):
        float64 for float32 inputs (the backward rebuilds P = exp(s - lse) from it)."""
        return ops.lse_dtype(dtype)

    def serves(self, plan):
        """None if this backend can run `plan`, else the reason it cannot."""
        if plan.family not in self.families:
            return f"it has no {plan.family} kernels"
        ok, reason = _AVAILABLE[self.name]
        if not ok:
            return reason
        return self._device_refuses(plan.q.device.type) or self.kernel_refuses(plan)

    def kernel_refuses(self, plan):
        """The kernels' own rule (dtypes, shapes, options), whatever the device: None or why not."""
        if plan.q.dtype not in self.dtypes.get(plan.family, FLOAT_DTYPES):
            return self._dtype_refusal(plan)
        if plan.family != "attention" and plan.mask is not None and plan.mask.requires_grad:
            return "the fused kernels give no gradient to a float attn_mask"
        return self._refuses(plan)

    def _dtype_refusal(self, plan):
        return f"the fused {plan.family} kernel takes {_dtype_names(self.dtypes[plan.family])}, got {plan.q.dtype}"

    def _device_refuses(self, device_type):
        return None

    def _refuses(self, plan):
        """Backend-specific refusals after the common checks."""
        return None

    def attention_forward(self, plan):
        """(out (B, Hq, Lq, Ev), lse (B, Hq, Lq) in `saved_lse_dtype`) of softmax attention;
        dropout draws its (seed, offset) from torch's generator."""
        raise NotImplementedError

    def attention_backward(self, plan, dout, out, lse, delta=None):
        """(dq, dk, dv) of `plan` given the forward's out and lse (no dropout; a float mask
        gets no gradient here).  delta: rowsum(dout * out) of the whole rows, in lse's
        dtype, in place of the kernels' own row sums (ring attention passes it: there a
        call's keys are only some of a row's)."""
        raise NotImplementedError

    def additive_forward(self, plan):
        """(out (B, H, Lq, Ev), lse (B, H, Lq)) of additive attention, differentiable in the
        plan's q, k, v, w_q, w_k, v_a."""
        raise NotImplementedError

    def varlen_forward(self, plan):
        """(out (total_q, Hq, Ev), lse (Hq, total_q)) of packed sequences (attnfast/varlen.py),
        differentiable in q, k, v.  This default: one attention call per sequence on this
        backend (each draws its own dropout rng)."""
        from .api import attention

        cq, ck = plan.cu_q.tolist(), plan.cu_k.tolist()
        used = None if plan.seqused_k is None else plan.seqused_k.tolist()
        outs, lses = [], []
        for i in range(len(cq) - 1):
            n = ck[i + 1] - ck[i] if used is None else used[i]
            qi, ki, vi = (t.transpose(0, 1) for t in (plan.q[cq[i]:cq[i + 1]], plan.k[ck[i]:ck[i] + n],
                                                        plan.v[ck[i]:ck[i] + n]))
            o, l = attention(qi, ki, vi, window=(plan.window_left, plan.window_right), scale=plan.scale,
                             causal_alignment="bottom_right" if plan.bottom_right else "top_left",
                             enable_gqa=True, dropout_p=plan.dropout_p, return_lse=True, backend=self.name)
            outs.append(o.transpose(0, 1))
            lses.append(l)
        if not outs:
            return plan.q.new_empty((0, plan.q.shape[1], plan.v.shape[2])), plan.q.new_empty((plan.q.shape[1], 0))
        return torch.cat(outs, 0), torch.cat(lses, 1)

    def kvcache_forward(self, plan):
        """(out (B, Lq, Hq, Ev), lse (B, Hq, Lq)) of attention over a KV cache (attnfast/varlen.py),
        forward only.  This default: one attention call per batch entry on this backend, over
        its keys (a view; gathered from the pages of a paged cache)."""
        from .api import attention
        from .reference import kvcache_keys

        outs, lses = [], []
        lens = plan.seqlens_k.tolist()
        for b in range(plan.q.shape[0]):
            k, v = kvcache_keys(plan.k_cache, plan.v_cache, b, lens[b], plan.block_table, plan.cache_batch_idx)
            o, l = attention(plan.q[b].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                             window=(plan.window_left, plan.window_right), causal_alignment="bottom_right",
                             scale=plan.scale, enable_gqa=True, return_lse=True, backend=self.name)
            outs.append(o.transpose(0, 1))
            lses.append(l)
        q = plan.q
        if not outs:
            return q.new_empty(q.shape[:3] + (plan.v_cache.shape[3],)), q.new_empty((0, q.shape[2], q.shape[1]))
        return torch.stack(outs), torch.stack(lses)

    def topk_forward(self, plan):
        """(out (B, Hq, Lq, Ev), lse (B, Hq, Lq)) of hard top-k attention, differentiable in
        q, k, v (straight-through)."""
        raise NotImplementedError

    def __repr__(self):
        return f"<attnfast backend {self.name!r}>"


def _additive_bias(plan, dtype):
    """The fused additive kernels' mask: a float bias (B, H, Lq, Lk), -inf where hidden,
    converted on the mask's own elements (its broadcast dims stay stride 0)."""
    if plan.mask is None:
        return None
    m = plan.mask.detach()
    for d in range(m.dim()):
        if m.stride(d) == 0 and m.size(d) > 1:
            m = m.narrow(d, 0, 1)
    if m.dtype == torch.bool:
        m = torch.zeros((), dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))
    return m.to(dtype).expand(plan.mask.shape)


class _FusedBackend(Backend):
    """The additive and top-k forwards of the fused backends, whose ops take the same
    arguments: attnfast::{prefix}additive_fwd and attnfast::{prefix}topk_fwd."""

    op_prefix = ""

    def _op(self, family, name):
        """The op `name` of this backend (importing the module that registers it)."""
        return getattr(torch.ops.attnfast, self.op_prefix + name)

    def additive_forward(self, plan):
        qp, kp, va, v = plan.projections()
        H, Da = qp.shape[1], qp.shape[3]
        return self._op("additive", "additive_fwd")(qp, kp, va.expand(H, Da), v, _additive_bias(plan, qp.dtype),
                                                    plan.is_causal)

    def topk_forward(self, plan):
        mask = None if plan.mask is None else plan.mask.detach()
        out, lse, _ = self._op("topk", "topk_fwd")(plan.q, plan.k, plan.v, mask, plan.is_causal, plan.scale,
                                                   plan.top_k)
        return out, lse


class CpuBackend(_FusedBackend):
    name = "cpu"
    dtypes = {"additive": (torch.float32, torch.bfloat16, torch.float16)}

    def availability(self):
        if not FACTS.extension:
            return False, f"extension attnfast._C not built: {FACTS.extension_error}"
        return True, "fused C++ kernel"

    def _device_refuses(self, device_type):
        return None if device_type == "cpu" else f"it serves CPU tensors, got {device_type} tensors"

    def attention_forward(self, plan):
        rng = draw_rng(plan.q.device) if plan.dropout_p > 0.0 else None
        return torch.ops.attnfast.fwd(plan.q, plan.k, plan.v, plan.mask, plan.scale, plan.window_left,
                                      plan.window_right, plan.bottom_right, plan.dropout_p, rng)

    def attention_backward(self, plan, dout, out, lse, delta=None):
        return torch.ops.attnfast.bwd(dout, plan.q, plan.k, plan.v, out, lse, None, plan.mask, plan.scale,
                                      plan.window_left, plan.window_right, plan.bottom_right, 0.0, None, False,
                                      delta)[:3]

    def varlen_forward(self, plan):
        rng = draw_rng(plan.q.device) if plan.dropout_p > 0.0 else None
        return torch.ops.attnfast.varlen_fwd(plan.q, plan.k, plan.v, plan.cu_q, plan.cu_k, plan.seqused_k,
                                             plan.max_q, plan.max_k, plan.scale, plan.window_left,
                                             plan.window_right, plan.bottom_right, plan.dropout_p, rng)

    def kvcache_forward(self, plan):
        return torch.ops.attnfast.kvcache_fwd(plan.q, plan.k_cache, plan.v_cache, plan.seqlens_k,
                                              plan.cache_batch_idx, plan.block_table, plan.scale, plan.window_left,
                                              plan.window_right, plan.num_splits)


class CudaBackend(Backend):
    """The CUDA C++ kernels: float16/bfloat16, equal query and value head dims with a kernel
    (the extension's lists: `head_dims` = (forward, backward)), no dropout; dense calls and
    packed batches (varlen, one launch)."""

    name = "cuda"
    families = frozenset({"attention", "varlen"})
    dtypes = dict.fromkeys(("attention", "varlen"), (torch.float16, torch.bfloat16))

    def __init__(self, head_dims=None):
        self.head_dims = FACTS.cuda_head_dims if head_dims is None else head_dims

    def availability(self):
        if not FACTS.extension:
            return False, "extension attnfast._C not built"
        if not FACTS.cuda_kernels:
            return False, "extension built without CUDA kernels"
        if not FACTS.cuda_device:
            return False, "no CUDA device"
        return True, "CUDA C++ kernels"

    def _device_refuses(self, device_type):
        return None if device_type == "cuda" else f"it serves CUDA tensors, got {device_type} tensors"

    def _dtype_refusal(self, plan):
        return f"it serves float16 and bfloat16 (fp32 goes to Triton), got {plan.q.dtype}"

    def _refuses(self, plan):
        E, Ev = plan.q.shape[-1], plan.v.shape[-1]
        if E != Ev:
            return f"it needs equal query and value head dims, got {E} and {Ev}"
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (plan.q, plan.k, plan.v, plan.mask))
        dims = self.head_dims[1] if grad else self.head_dims[0]
        if E not in dims:
            what = "forward and backward" if grad else "forward"
            return f"it has {what} kernels for head dims {dims}, got {E}"
        if plan.dropout_p > 0.0:
            return "dropout is served by the Triton backend"
        return None

    attention_forward = CpuBackend.attention_forward
    attention_backward = CpuBackend.attention_backward
    varlen_forward = CpuBackend.varlen_forward  # (the same ops: attnfast::varlen_fwd / varlen_bwd on CUDA)


class TritonBackend(_FusedBackend):
    name = "triton"
    op_prefix = "triton_"
    dtypes = dict.fromkeys(("attention", "additive", "topk", "varlen", "kvcache"),
                           (torch.float16, torch.bfloat16, torch.float32))

    def _op(self, family, name):
        importlib.import_module(f".triton_kernels.{family}", __package__)  # imports triton; registers the ops
        return super()._op(family, name)

    def availability(self):
        if not FACTS.triton_installed:
            return False, "triton is not installed"
        if FACTS.triton_interpreting:
            return True, "Triton kernels under the interpreter (TRITON_INTERPRET=1, CPU tensors)"
        if not FACTS.cuda_device:
            return False, "no CUDA device"
        return True, "Triton kernels"

    def _device_refuses(self, device_type):
        if device_type == "cuda" or (FACTS.triton_interpreting and device_type == "cpu"):
            return None
        return f"it serves CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device_type} tensors"

    def _dtype_refusal(self, plan):
        return f"{plan.q.dtype} is not supported by the Triton kernels".replace("torch.", "")

    def attention_forward(self, plan):
        seed = int(draw_rng()[0]) if plan.dropout_p > 0.0 else 0
        return self._op("attention", "fwd")(plan.q, plan.k, plan.v, plan.mask, plan.scale, plan.window_left,
                                             plan.window_right, plan.bottom_right, plan.dropout_p, seed, 0)

    def varlen_forward(self, plan):
        seed = int(draw_rng()[0]) if plan.dropout_p > 0.0 else 0
        return self._op("attention", "varlen_fwd")(plan.q, plan.k, plan.v, plan.cu_q, plan.cu_k, plan.seqused_k,
                                                    plan.max_q, plan.max_k, plan.scale, plan.window_left,
                                                    plan.window_right, plan.bottom_right, plan.dropout_p, seed, 0)

    def kvcache_forward(self, plan):
        """A paged cache, and short queries (Lq <= SPLIT_MAX_ROWS) where key splits pay: the
        split-KV kernel over the cache rows, pages read in place through the block table.  The
        rest: the varlen kernel, one launch: entry b's queries are a packed sequence, its cache
        row the key run starting at cache_batch_idx[b] * S, seqused_k the lengths, the diagonal
        bottom-right."""
        q, kc, vc = plan.q, plan.k_cache, plan.v_cache
        B, Lq, Hq, _ = q.shape
        attention = importlib.import_module(".triton_kernels.attention", __package__)
        paged = plan.block_table is not None
        if Lq > 0 and B > 0 and kc.shape[1] > 0 and (paged or Lq <= attention.SPLIT_MAX_ROWS):
            S = kc.shape[1] * (plan.block_table.shape[1] if paged else 1)  # keys an entry can hold
            blocks = -(-Lq // attention.split_block_m(Lq, q.dtype))  # query blocks of a split
            nsplit = plan.num_splits or attention.split_count(B * Hq * blocks, S, q.device)
            if nsplit > 1 or paged:  # flash-decoding over the cache rows; a paged cache read in place
                out, lse = attention.split_fwd(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2),
                                               plan.seqlens_k, plan.cache_batch_idx, plan.scale, plan.window_left,
                                               plan.window_right, nsplit, block_table=plan.block_table)
                return out.transpose(1, 2), lse
        if paged:  # an empty call: nothing to read
            kc, vc = kc[:0], vc[:0]
            starts = torch.arange(B, device=q.device, dtype=torch.int32)
        else:
            starts = (plan.cache_batch_idx if plan.cache_batch_idx is not None
                      else torch.arange(B, device=q.device, dtype=torch.int32))
        S = kc.shape[1]
        cu_q = torch.arange(B + 1, device=q.device, dtype=torch.int32) * Lq
        # Key starts; the last entry is never read as a start (seqused_k gives every length).
        cu_k = torch.cat([starts * S, starts.new_zeros(1)]).to(torch.int32)
        out, lse = self._op("attention", "varlen_fwd")(
            q.reshape(B * Lq, Hq, q.shape[3]), kc.reshape(-1, kc.shape[2], kc.shape[3]),
            vc.reshape(-1, vc.shape[2], vc.shape[3]), cu_q, cu_k, plan.seqlens_k, Lq, S, plan.scale,
            plan.window_left, plan.window_right, True, 0.0, 0, 0)
        return out.view(B, Lq, Hq, plan.v_cache.shape[-1]), lse.view(Hq, B, Lq).permute(1, 0, 2)

    def attention_backward(self, plan, dout, out, lse, delta=None):
        return self._op("attention", "bwd")(dout, plan.q, plan.k, plan.v, out, lse, None, plan.mask, plan.scale,
                                             plan.window_left, plan.window_right, plan.bottom_right, False, 0.0,
                                             0, 0, delta)[:3]


class ReferenceBackend(Backend):
    """torch code on any device and dtype: the naive reference (softmax attention), and
    memory-bounded row chunks (additive, top-k)."""

    name = "reference"

    def availability(self):
        return True, "torch code: naive matmul-softmax-matmul; row chunks for the additive and top-k families"

    def attention_forward(self, plan):
        from .reference import attention_ref

        dmask = None
        if plan.dropout_p > 0.0:
            dmask = dropout_mask(tuple(plan.q.shape[:3]) + (plan.k.shape[2],), plan.dropout_p, draw_rng(),
                                 plan.q.device)
        out, lse = attention_ref(plan.q, plan.k, plan.v, plan.mask, window=(plan.window_left, plan.window_right),
                                 causal_alignment="bottom_right" if plan.bottom_right else "top_left",
                                 scale=plan.scale, enable_gqa=True, dropout_mask=dmask, upcast=False)
        return out, lse.to(self.saved_lse_dtype(plan.q.dtype))

    def attention_backward(self, plan, dout, out, lse, delta=None):
        from .reference import attention_bwd_ref

        if delta is None:
            delta = (dout.to(ops.acc_dtype(out.dtype)) * out).sum(-1)
        return attention_bwd_ref(dout, plan.q, plan.k, plan.v, lse, delta, plan.mask, plan.scale,
                                 (plan.window_left, plan.window_right), plan.bottom_right)

    def additive_forward(self, plan):
        from .chunked import additive_chunked

        return additive_chunked(plan)

    def topk_forward(self, plan):
        from .chunked import topk_chunked

        return topk_chunked(plan)


REGISTRY = {b.name: b for b in (CpuBackend(), TritonBackend(), CudaBackend(), ReferenceBackend())}
BACKENDS = tuple(REGISTRY)  # the names
_AVAILABLE = {name: b.availability() for name, b in REGISTRY.items()}
_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
# The C++ kernels serve every CPU softmax-attention plan (each floating dtype, every
# option), and on a CPU with AVX2 + FMA there is nothing to warn about: choose's fast path.
_CPU_FIRST = _AVAILABLE["cpu"][0] and FACTS.cpu_isa_best != "default"


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why not, or what it serves

    def __str__(self):
        return f"{self.name:<10} {'yes' if self.available else 'no ':<4} {self.reason}"


def backends():
    """Status of every backend: {name: BackendStatus(name, available, reason)}."""
    out = {}
    for name, (ok, reason) in _AVAILABLE.items():
        if name == "cpu" and ok:
            reason += f", ISA path {ops._C.cpu_isa()}"
            if FACTS.cpu_isa_best == "default":
                reason += " (this CPU lacks AVX2 + FMA: the portable path)"
        out[name] = BackendStatus(name, ok, reason)
    return out


def get(name):
    """The backend called `name`."""
    if name not in REGISTRY:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return REGISTRY[name]


# ---------------------------------------------------------------------------
# The choice
# ---------------------------------------------------------------------------

_WARNED = set()


def _warn_once(cause, message):
    if cause not in _WARNED:
        _WARNED.add(cause)
        warnings.warn(message, DegradedWarning, stacklevel=5)


def _note_degraded(backend, plan):
    """One warning per cause when the default choice for softmax attention is a fallback
    (eager calls only: a warning inside a torch.compile trace would break the graph)."""
    if plan.family != "attention" or torch.compiler.is_compiling():
        return
    if plan.q.device.type == "cpu":
        if backend.name == "reference":
            _warn_once("cpu", f"attnfast: the C++ CPU kernel is unavailable ({_AVAILABLE['cpu'][1]}); "
                              "calls run the naive reference (correct, but O(L^2) memory and slow)")
        elif backend.name == "cpu" and FACTS.cpu_isa_best == "default":
            # AVX2 + FMA is a first-class path (the kernels are tuned for it); only a CPU without
            # it falls to the portable 128-bit build.
            _warn_once("cpu-isa", "attnfast: this CPU lacks AVX2 + FMA; the CPU kernel runs its portable "
                                  "(128-bit vector) path")
    elif backend.name == "reference":
        why = "; ".join(f"{b}: {REGISTRY[b].serves(plan)}" for b in ("triton", "cuda"))
        _warn_once(f"gpu:{why}", f"attnfast: no GPU kernel serves this call ({why}); it runs the naive reference")


def choose(plan, backend=None):
    """The Backend that runs `plan` (see the module docstring).  `backend`: a name, or
    None for the environment's ATTNFAST_BACKEND or else the first in the device's order
    that serves the plan."""
    requested = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if requested is None and _CPU_FIRST and plan.family == "attention" and plan.q.is_cpu:
        return REGISTRY["cpu"]  # what the loop below gives for every CPU attention plan (and no warning)
    if requested is not None:
        chosen = get(requested)
        why = chosen.serves(plan)
        if why is not None:
            src = "backend=" if backend is not None else f"{ENV_VAR}="
            raise BackendUnavailableError(f"{src}{requested!r} cannot serve this call: {why}")
        return chosen
    for name in _ORDER.get(plan.q.device.type, ("reference",)):
        if REGISTRY[name].serves(plan) is None:
            _note_degraded(REGISTRY[name], plan)
            return REGISTRY[name]
    return REGISTRY["reference"]
