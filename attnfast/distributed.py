"""Context parallelism: exact attention over a sequence split across ranks (ring attention).

Every rank of a torch.distributed group holds one shard of the sequence of q, k
and v.  `ring_attention` passes the K/V shards round the ring (rank r sends to
r+1 and receives from r-1, `batch_isend_irecv`, posted before the step's compute
so the transfer overlaps it), computes each (local queries, visiting keys) block
with attnfast's own `(out, lse)` kernels, and merges the partial results by their
lse.  The backward recomputes every block from the merged (global) lse and
passes the dK/dV accumulators round a second ring, so each rank ends with the
gradients of its own shards.  The result equals single-process attention on the
whole sequence up to rounding; it runs on whichever backend serves the shards
(CPU, Triton, CUDA C++ or the reference).

Layouts (`shard_sequence`): `None` gives rank r the r-th of W contiguous chunks;
"zigzag" cuts the sequence into 2W chunks and gives rank r chunks r and
2W-1-r, so every rank does the same causal work at every step.

    dist.init_process_group("nccl")          # or "gloo" for CPU tensors
    q_loc = shard_sequence(q, -2, rank, world, layout="zigzag")   # also k, v
    out_loc = ring_attention(q_loc, k_loc, v_loc, is_causal=True)  # layout defaults to zigzag
    out = unshard_sequence(all_gathered_out_shards, -2, layout="zigzag")
"""
from __future__ import annotations

import math
import os
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from . import dispatch, ops
from ._validate import prepare

LAYOUTS = (None, "zigzag")


# ---------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------

def _check_layout(layout, name="layout"):
    if layout not in LAYOUTS:
        raise ValueError(f"{name} must be None (contiguous chunks) or 'zigzag', got {layout!r}")


def _chunk_ids(layout, rank, world):
    """(global chunk indices held by `rank`, in local order; number of chunks)."""
    if layout is None:
        return (rank,), world
    return (rank, 2 * world - 1 - rank), 2 * world


def _split_len(n, layout, world, what):
    """Length of one chunk when a sequence of length `n` is cut for `world` ranks."""
    _, n_chunks = _chunk_ids(layout, 0, world)
    if n % n_chunks:
        how = f"2 x world_size = {n_chunks} zigzag chunks" if layout == "zigzag" else f"world_size = {world} ranks"
        raise ValueError(f"{what} must be divisible into {how}, got length {n}")
    return n // n_chunks


def shard_sequence(x, dim, rank, world_size, layout=None):
    """This rank's shard of `x` along `dim` (a view for layout=None, a copy for "zigzag")."""
    _check_layout(layout)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    for name, val in (("rank", rank), ("world_size", world_size), ("dim", dim)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be an int, got {type(val).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for x of shape {tuple(x.shape)}")
    c = _split_len(x.size(dim), layout, world_size, f"x.size({dim})")
    ids, _ = _chunk_ids(layout, rank, world_size)
    parts = [x.narrow(dim, i * c, c) for i in ids]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def unshard_sequence(shards, dim, layout=None):
    """Reassemble the full tensor from the list of every rank's shard (rank order)."""
    _check_layout(layout)
    if not isinstance(shards, (list, tuple)) or not shards or not all(isinstance(s, torch.Tensor) for s in shards):
        raise TypeError("shards must be a non-empty list of tensors, one per rank in rank order")
    shapes = {tuple(s.shape) for s in shards}
    if len(shapes) != 1:
        raise ValueError(f"every shard must have the same shape, got {sorted(shapes)}")
    if layout is None:
        return torch.cat(list(shards), dim)
    world = len(shards)
    if shards[0].size(dim) % 2:
        raise ValueError(f"zigzag shards hold two equal chunks: shard size along dim {dim} must be even, "
                         f"got {shards[0].size(dim)}")
    chunks = [None] * (2 * world)
    for r, s in enumerate(shards):
        first, second = s.chunk(2, dim)
        chunks[r], chunks[2 * world - 1 - r] = first, second
    return torch.cat(chunks, dim)


# ---------------------------------------------------------------------------
# Which (query, key) blocks a step computes
# ---------------------------------------------------------------------------

def _spans(layout, rank, world, n_local):
    """Global start of each chunk a rank holds, its local start, and the chunk length."""
    ids, n_chunks = _chunk_ids(layout, rank, world)
    c = n_local // len(ids)
    return [(i * c, t * c, c) for t, i in enumerate(ids)]


def _relation(q_start, m, k_start, n):
    """How global query rows [q_start, q_start+m) see keys [k_start, k_start+n) under
    top-left causality (key j visible from query i iff j <= i): 'full', 'skip', or the
    diagonal offset d = q_start - k_start of a partly visible block."""
    if m == 0 or n == 0 or k_start > q_start + m - 1:
        return "skip"
    if k_start + n - 1 <= q_start:
        return "full"
    return q_start - k_start


def block_plan(q_spans, k_spans, is_causal):
    """The kernel calls of one step: [(q_rows, k_rows, window_right)], rows as
    (local start, length) and window_right -1 (none) or the causal diagonal
    offset.  Whole-shard calls where the relation allows, so the common zigzag
    steps are one call (half the queries against all keys, or all queries
    against half the keys)."""
    Lq = sum(c for _, _, c in q_spans)
    Lk = sum(c for _, _, c in k_spans)
    if not is_causal:
        return [((0, Lq), (0, Lk), -1)] if Lq and Lk else []
    rel = [[_relation(qg, m, kg, n) for kg, _, n in k_spans] for qg, _, m in q_spans]
    rows = list(zip(q_spans, rel))
    if len(rows) > 1 and all(r == rel[0] for r in rel) and all(x in ("full", "skip") for x in rel[0]):
        rows = [((None, 0, Lq), rel[0])]  # every query chunk sees the keys alike: one row
    calls = []
    for (_, q0, m), rrow in rows:
        if all(x == "full" for x in rrow):
            calls.append(((q0, m), (0, Lk), -1))
            continue
        for (_, k0, n), x in zip(k_spans, rrow):
            if x == "skip":
                continue
            if x == "full":
                calls.append(((q0, m), (k0, n), -1))
            else:  # partly visible: rows before the first visible key see nothing here
                skip = max(0, -x)
                calls.append(((q0 + skip, m - skip), (k0, n), x + skip))
    return calls


# ---------------------------------------------------------------------------
# Block kernels: the backend's own (out, lse) forward and its lse-driven backward
# ---------------------------------------------------------------------------

def _block(plan, q, k, v, wr):
    """The Plan of one block: local query rows against visiting keys, the causal rule
    as window_right = wr (-1: none).  The backward gets the global lse and delta =
    rowsum(dO * O) of the whole rows: a kernel's own delta, rowsum(P * dP) over the
    keys of its call, would cover only the visiting keys."""
    return replace(plan, q=q, k=k, v=v, window_left=-1, window_right=wr, bottom_right=False)


def merge_partial(out, lse, out_b, lse_b):
    """Fold a partial result (out_b, lse_b) over other keys into (out, lse), in place.

    out = out - sigmoid(lse_b - lse) * (out - out_b); lse = log(e^lse + e^lse_b).
    A block with no visible key (lse_b = -inf) leaves a row unchanged, and a
    row's first visible block replaces its zeros."""
    lse_b = lse_b.to(lse.dtype)
    w = torch.where(torch.isneginf(lse_b), torch.zeros_like(lse), torch.sigmoid(lse_b - lse))
    out.sub_(w.unsqueeze(-1).to(out.dtype) * (out - out_b.to(out.dtype)))
    lse.copy_(torch.logaddexp(lse, lse_b))


# ---------------------------------------------------------------------------
# The ring
# ---------------------------------------------------------------------------

class _Ring:
    """A group's ring: rank r sends to r+1 and receives from r-1 (global ranks for P2POp)."""

    def __init__(self, group):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("attnfast.distributed.ring_attention needs torch.distributed: call "
                               "torch.distributed.init_process_group first (one process per rank)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError("group: this process is not a member of the given process group")

        def peer(r):
            r %= self.world
            return r if group is None else dist.get_global_rank(group, r)

        self.next, self.prev = peer(self.rank + 1), peer(self.rank - 1)

    def fail(self, what, step, err):
        return RuntimeError(
            f"attnfast.distributed.ring_attention: rank {self.rank} of {self.world}: {what} at step {step} "
            f"(sending to rank {(self.rank + 1) % self.world}, receiving from rank {(self.rank - 1) % self.world}) "
            f"failed: a rank died, left, or did not call ring_attention within the process group's timeout "
            f"({type(err).__name__}: {err})")

    def exchange(self, tensors, what, step, tag):
        """Post sends of `tensors` to the next rank and receives of the same shapes from the previous."""
        recv = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
        p2p = [dist.P2POp(dist.isend, t, self.next, self.group, tag + i) for i, t in enumerate(tensors)]
        p2p += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag + i) for i, t in enumerate(recv)]
        try:
            reqs = dist.batch_isend_irecv(p2p)
        except Exception as e:  # noqa: BLE001  (gloo and NCCL raise different types)
            raise self.fail(what, step, e) from e
        return _Pending(self, reqs, list(tensors), recv, what, step)

    def check_agree(self, fields, device):
        """All ranks must pass the same call: gather (name, int) fields and compare."""
        mine = torch.tensor([v for _, v in fields], dtype=torch.int64, device=device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        try:
            dist.all_gather(every, mine, group=self.group)
        except Exception as e:  # noqa: BLE001
            raise self.fail("checking that every rank passed the same shapes", 0, e) from e
        mine_l = mine.tolist()
        for r, theirs in enumerate(every):
            theirs = theirs.tolist()
            for (name, _), a, b in zip(fields, mine_l, theirs):
                if a != b:
                    raise ValueError(
                        f"attnfast.distributed.ring_attention: rank {r} passed {name} = {b} but rank "
                        f"{self.rank} passed {a}; every rank must pass shards of the same shape, dtype and options")


class _Pending:
    def __init__(self, ring, reqs, sent, recv, what, step):
        self.ring, self.reqs, self.sent, self.recv, self.what, self.step = ring, reqs, sent, recv, what, step

    def wait(self, trace=None):
        t0 = time.perf_counter()
        try:
            for r in self.reqs:
                r.wait()
        except Exception as e:  # noqa: BLE001
            raise self.ring.fail(self.what, self.step, e) from e
        if trace is not None:
            trace["wait_s"] += time.perf_counter() - t0
        self.sent = None  # the send buffers may be freed now
        return self.recv


_DTYPE_CODE = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_BACKEND_CODE = {name: i for i, name in enumerate(dispatch.BACKENDS)}


def _call_fields(q, k, v, is_causal, scale, enable_gqa, layout, backend):
    fields = [("query.dim()", q.dim()), ("key.dim()", k.dim()), ("value.dim()", v.dim())]
    for name, t in (("query", q), ("key", k), ("value", v)):
        fields += [(f"{name}.shape[{i}]", s) for i, s in enumerate(t.shape)]
    fields += [("dtype", _DTYPE_CODE[q.dtype]), ("is_causal", int(is_causal)), ("enable_gqa", int(enable_gqa)),
               ("load_balance", LAYOUTS.index(layout)), ("backend", _BACKEND_CODE[backend]),
               ("scale (float64 bits)", struct.unpack("<q", struct.pack("<d", scale))[0])]
    return fields


class RingContext:
    """One call's fixed facts: the ring, the backend and the validated plan, the layout spans."""

    def __init__(self, ring, backend, plan, is_causal, layout):
        self.ring, self.backend, self.plan, self.is_causal = ring, backend, plan, is_causal
        q, k = plan.q, plan.k
        W, r = ring.world, ring.rank
        _split_len(q.shape[2] * W, layout, W, "the global query length (local length x world size)")
        _split_len(k.shape[2] * W, layout, W, "the global key length (local length x world size)")
        self.q_spans = _spans(layout, r, W, q.shape[2])
        self.k_spans = [_spans(layout, src, W, k.shape[2]) for src in range(W)]

    def blocks(self, step):
        """The kernel calls of `step`: block_plan of the local queries and the visiting keys."""
        return block_plan(self.q_spans, self.k_spans[(self.ring.rank - step) % self.ring.world], self.is_causal)


def _rows(t, span):
    return t.narrow(2, span[0], span[1])


def ring_forward(ctx, q, k, v, trace=None):
    """(out, lse) of local queries against every rank's keys, both in the merge dtype:
    float32 for half types, float64 for float32 and float64 (a float32 merge of float32
    partials measurably loosened the gradients' parity on the Triton backend, whose
    lse is float32)."""
    ring, backend = ctx.ring, ctx.backend
    B, Hq, Lq = q.shape[:3]
    acc_dtype = ops.lse_dtype(q.dtype)
    out = torch.zeros((B, Hq, Lq, v.shape[3]), dtype=acc_dtype, device=q.device)
    lse = torch.full((B, Hq, Lq), float("-inf"), dtype=acc_dtype, device=q.device)
    kv = (k, v)
    for step in range(ring.world):
        pending = ring.exchange(kv, "passing K/V (forward)", step, tag=0) if step + 1 < ring.world else None
        t0 = time.perf_counter()
        for qs, ks, wr in ctx.blocks(step):
            o_b, lse_b = backend.attention_forward(_block(ctx.plan, _rows(q, qs), _rows(kv[0], ks),
                                                          _rows(kv[1], ks), wr))
            merge_partial(_rows(out, qs), _rows(lse, qs), o_b, lse_b)
        if trace is not None:
            trace["compute_s"] += time.perf_counter() - t0
        if pending is not None:
            kv = tuple(pending.wait(trace))
    return out, lse


def ring_backward(ctx, dout, q, k, v, out, lse, trace=None):
    """(dq, dk, dv) of the local shards from ring_forward's (out, lse); the dK/dV
    accumulators travel with their K/V and come home after the last step."""
    ring, backend = ctx.ring, ctx.backend
    acc = ops.acc_dtype(q.dtype)
    lse_dtype = backend.saved_lse_dtype(q.dtype)
    delta = (dout.to(out.dtype) * out).sum(-1).to(lse_dtype)  # rowsum(dO * O) of the whole rows
    lse = lse.to(lse_dtype)
    out = out.to(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv, grads, pending_grads = (k, v), None, None
    for step in range(ring.world):
        pending_kv = ring.exchange(kv, "passing K/V (backward)", step, tag=0) if step + 1 < ring.world else None
        t0 = time.perf_counter()
        dk_b = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv_b = torch.zeros(v.shape, dtype=acc, device=v.device)
        for qs, ks, wr in ctx.blocks(step):
            block = _block(ctx.plan, _rows(q, qs), _rows(kv[0], ks), _rows(kv[1], ks), wr)
            dq_c, dk_c, dv_c = backend.attention_backward(block, _rows(dout, qs), _rows(out, qs), _rows(lse, qs),
                                                          _rows(delta, qs))
            _rows(dq, qs).add_(dq_c)
            _rows(dk_b, ks).add_(dk_c)
            _rows(dv_b, ks).add_(dv_c)
        if trace is not None:
            trace["compute_s"] += time.perf_counter() - t0
        if pending_grads is not None:  # the accumulators of the K/V held now, from the ranks before
            dk_in, dv_in = pending_grads.wait(trace)
            dk_b.add_(dk_in)
            dv_b.add_(dv_in)
        grads = (dk_b, dv_b)
        if ring.world > 1:  # pass them on; after the last step they reach the K/V's own rank
            pending_grads = ring.exchange(grads, "passing dK/dV", step, tag=2)
        if pending_kv is not None:
            kv = tuple(pending_kv.wait(trace))
    if pending_grads is not None:
        grads = pending_grads.wait(trace)
    return dq.to(q.dtype), grads[0].to(k.dtype), grads[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(fctx, q, k, v, ctx):
        out, lse = ring_forward(ctx, q, k, v)
        fctx.save_for_backward(q, k, v, out, lse)
        fctx.ring_ctx = ctx
        return out.to(q.dtype)

    @staticmethod
    def backward(fctx, dout):
        q, k, v, out, lse = fctx.saved_tensors
        dq, dk, dv = ring_backward(fctx.ring_ctx, dout, q, k, v, out, lse)
        return dq, dk, dv, None


def prepare_ring(q, k, v, *, group=None, is_causal=False, scale=None, enable_gqa=False, load_balance="zigzag",
                 backend=None):
    """Validate a call and build its RingContext; returns (plan, ctx)."""
    _check_layout(load_balance, "load_balance")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a Python bool, got {type(is_causal).__name__}")
    plan = prepare(q, k, v, None, 0.0, False, scale, enable_gqa)
    ring = _Ring(group)
    chosen = dispatch.choose(plan, backend)
    ring.check_agree(_call_fields(q, k, v, is_causal, plan.scale, enable_gqa, load_balance, chosen.name), q.device)
    ctx = RingContext(ring, chosen, plan, is_causal, load_balance)
    return plan, ctx


def ring_attention(q, k, v, *, group=None, is_causal=False, scale=None, enable_gqa=False, load_balance="zigzag",
                   backend=None):
    """Exact attention of this rank's query shard over the whole (sharded) sequence.

    q: (..., Hq, Lq_local, E), k: (..., Hkv, Lk_local, E), v: (..., Hkv, Lk_local, Ev):
    this rank's shards along the sequence dim (-2), cut by `shard_sequence` with
    `layout=load_balance` ("zigzag", the default, balances causal work; None is
    contiguous chunks).  Every rank of `group` (default: the world) calls it with
    shards of the same shape and the same options.  `is_causal` is torch's
    top-left causality over the global positions; Lq may differ from Lk (both
    must cut into the layout's chunks).  Returns this rank's output shard
    (..., Hq, Lq_local, Ev); differentiable in q, k and v.

    Partial results merge by lse in float32 (float64 for float32/float64
    inputs); dK/dV travel the ring as float32 (float64) accumulators.  One small
    all_gather per call checks that every rank passed the same shapes and
    options.  A rank that dies or never calls makes the others raise
    RuntimeError within the process group's timeout.  `backend` forces one of
    attnfast's backends for the block kernels (default: dispatch's choice).
    """
    plan, ctx = prepare_ring(q, k, v, group=group, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                             load_balance=load_balance, backend=backend)
    qc, kc, vc = (t.contiguous() for t in (plan.q, plan.k, plan.v))  # send buffers must be dense
    out = _RingAttention.apply(qc, kc, vc, ctx)
    return out.reshape(plan.lead + (q.shape[-2], v.shape[-1]))


def model_hidden_length(flops_per_s, bytes_per_s, *, heads_q=1, heads_kv=1, causal=False, elem_bytes=2,
                        backward=False):
    """Local sequence length above which one ring step's compute hides its transfer.

    Per step and (batch, head) a rank computes 4·l²·E FLOPs per query head
    (half for zigzag causal; backward 2.5x) and sends K and V: 2·l·E·elem_bytes
    per key head (backward: K/V plus float32 dK/dV, 2·l·E·(elem_bytes + 4)).
    Hidden when compute time >= transfer time:  l >= ratio (FLOP/s ÷ bytes/s)
    times bytes per FLOP per token."""
    flops_coef = 4.0 * heads_q * (0.5 if causal else 1.0) * (2.5 if backward else 1.0)  # x l^2 E
    bytes_coef = 2.0 * heads_kv * (elem_bytes + (4 if backward else 0))  # x l E
    return math.ceil(bytes_coef * flops_per_s / (flops_coef * bytes_per_s))


# ---------------------------------------------------------------------------
# A local world of processes (what torchrun does, with a hard timeout)
# ---------------------------------------------------------------------------

@dataclass
class RankResult:
    rank: int
    returncode: int | None  # None: killed at the timeout
    stdout: str
    stderr: str

    @property
    def timed_out(self):
        return self.returncode is None


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(argv, world_size, timeout, env=None, cwd=None):
    """Run `python *argv` as ranks 0..world_size-1 of one torch.distributed world on this
    machine (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and a free MASTER_PORT set, as
    torchrun does); returns [RankResult] once all exit, or kills the rest `timeout`
    seconds after the start.  For tests and benchmarks of ring attention on one host."""
    port = _free_port()
    procs = []
    for rank in range(world_size):
        e = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env or {}))
        procs.append(subprocess.Popen([sys.executable, *argv], cwd=cwd, env=e, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    deadline = time.monotonic() + timeout
    results = []
    for rank, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append(RankResult(rank, p.returncode, out, err))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            results.append(RankResult(rank, None, out, err))
    return results
