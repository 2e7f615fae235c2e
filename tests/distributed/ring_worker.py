"""One rank of the ring-attention tests (started by test_distributed.py through
attnfast.distributed.launch_local; gloo on CPU).

    python tests/distributed/ring_worker.py parity OUT.json [REPEATS]   every case: ring vs the parity rule
    python tests/distributed/ring_worker.py dies|late|idle|absent|mismatch  failure drills (see test_distributed.py)

parity: every rank draws the same global q, k, v, dout (one seed), runs
ring_attention on its shards (forward and backward), and the shards are
all-gathered and unsharded; rank 0 applies the parity rule to the whole
output and gradients against the float64 reference and writes the results,
with the single-process attnfast result's own parity and its distance to the ring's.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("RING_TEST_TIMEOUT", "60")))
DEVICE = os.environ.get("RING_DEVICE", "cpu")  # "cuda": NCCL, one GPU per rank


def init():
    if DEVICE == "cuda":
        torch.cuda.set_device(RANK)
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", rank=RANK, world_size=WORLD, timeout=TIMEOUT)


# name, (B, Hq, Hkv, Lq, Lk, E, Ev), dtype, is_causal, layout, backend, 3-D input (no batch dim)
CASES = [
    ("full", (2, 2, 2, 8, 8, 16, 16), torch.float32, False, "zigzag", None, False),
    ("causal-zigzag", (2, 2, 2, 8, 8, 16, 16), torch.float32, True, "zigzag", None, False),
    ("causal-contiguous", (1, 3, 3, 5, 5, 24, 24), torch.float32, True, None, None, False),
    ("gqa-causal", (1, 4, 2, 8, 8, 16, 16), torch.float32, True, "zigzag", None, False),
    ("mqa-full-ev", (2, 4, 1, 6, 6, 16, 8), torch.float32, False, None, None, False),
    ("cross-lq<lk", (1, 2, 2, 4, 12, 16, 16), torch.float32, False, "zigzag", None, False),
    ("causal-lq>lk-zigzag", (1, 2, 2, 12, 8, 16, 16), torch.float32, True, "zigzag", None, False),
    ("causal-lq<lk-contiguous", (1, 2, 1, 6, 10, 16, 16), torch.float32, True, None, None, False),
    ("causal-3d-scale", (1, 2, 2, 8, 8, 32, 32), torch.float32, True, "zigzag", None, True),
    ("causal-bf16", (1, 2, 2, 16, 16, 32, 32), torch.bfloat16, True, "zigzag", None, False),
    ("causal-fp64", (1, 2, 2, 8, 8, 16, 16), torch.float64, True, "zigzag", None, False),
    ("causal-reference-backend", (1, 2, 1, 8, 8, 16, 16), torch.float32, True, "zigzag", "reference", False),
]
if DEVICE == "cuda":  # the CUDA C++ kernels serve half types at head dims 64/96/128
    CASES.append(("causal-cuda-backend", (1, 4, 2, 64, 64, 64, 64), torch.bfloat16, True, "zigzag", "cuda", False))
if os.environ.get("TRITON_INTERPRET") == "1" or DEVICE == "cuda":
    CASES.append(("causal-triton-backend", (1, 2, 1, 8, 8, 16, 16), torch.float32, True, "zigzag", "triton", False))
if os.environ.get("RING_CASES"):  # a comma-separated subset, for sweeps over seeds
    CASES = [c for c in CASES if c[0] in os.environ["RING_CASES"].split(",")]


def gather_unshard(x, layout):
    from attnfast.distributed import unshard_sequence

    parts = [torch.empty_like(x) for _ in range(WORLD)]
    dist.all_gather(parts, x.contiguous())
    return unshard_sequence(parts, -2, layout)


def run_case(name, dims, dtype, causal, layout, backend, three_d, seed):
    import attnfast
    from attnfast.distributed import ring_attention, shard_sequence
    from attnfast.reference import attention_ref
    from attnfast.testing import parity

    B, Hq, Hkv, lq, lk, E, Ev = dims  # lq, lk: local lengths
    Lq, Lk = lq * WORLD, lk * WORLD
    g = torch.Generator().manual_seed(seed)
    lead = (Hq,) if three_d else (B, Hq)
    lead_kv = (Hkv,) if three_d else (B, Hkv)
    q = torch.randn(lead + (Lq, E), generator=g).to(DEVICE, dtype)
    k = torch.randn(lead_kv + (Lk, E), generator=g).to(DEVICE, dtype)
    v = torch.randn(lead_kv + (Lk, Ev), generator=g).to(DEVICE, dtype)
    dout = torch.randn(lead + (Lq, Ev), generator=g).to(DEVICE, dtype)
    scale = 0.3 if three_d else None
    gqa = Hq != Hkv

    shard = lambda t: shard_sequence(t, -2, RANK, WORLD, layout).detach().requires_grad_(True)  # noqa: E731
    ql, kl, vl = shard(q), shard(k), shard(v)
    out_l = ring_attention(ql, kl, vl, is_causal=causal, scale=scale, enable_gqa=gqa, load_balance=layout,
                           backend=backend)
    out_l.backward(shard_sequence(dout, -2, RANK, WORLD, layout))
    ring = [gather_unshard(t, layout) for t in (out_l, ql.grad, kl.grad, vl.grad)]
    if RANK != 0:
        return None

    def run(want_grad, **kw):
        ins = [t.detach().clone().requires_grad_(want_grad) for t in (q, k, v)]
        if "upcast" in kw:
            out, _ = attention_ref(*ins, is_causal=causal, scale=scale, enable_gqa=gqa, **kw)
        else:
            out = attnfast.attention(*ins, is_causal=causal, scale=scale, enable_gqa=gqa, backend=backend)
        return [out] + list(torch.autograd.grad(out, ins, dout.to(out.dtype)))

    single = run(True)
    same = run(True, upcast=False, reorder_ops=dtype == torch.float64)
    truth = run(True, upcast=True)
    n = max(Lq, Lk, E, Ev)
    names = ("out", "dq", "dk", "dv")
    rec = dict(name=name, dims=dims, dtype=str(dtype), causal=causal, layout=layout, backend=backend, checks=[])
    for nm, r, s, sp, t in zip(names, ring, single, same, truth):
        pr = parity(nm, r, sp, t, n)
        ps = parity(nm, s, sp, t, n)
        rec["checks"].append(dict(tensor=nm, ok=pr.ok, err=pr.err, tol=pr.tol, ref_err=pr.ref_err,
                                  single_err=ps.err, ring_vs_single=(r.double() - s.double()).abs().max().item()))
    return rec


def parity_mode(out_path, repeats=1):
    init()
    seed = int(os.environ.get("ATTNFAST_TEST_SEED", "0"))
    records = []
    for rep in range(repeats):
        for i, case in enumerate(CASES):
            rec = run_case(*case, seed=seed + rep * len(CASES) + i)
            if rec is not None:
                rec["seed"] = seed + rep * len(CASES) + i
                records.append(rec)
    dist.barrier()
    if RANK == 0:
        with open(out_path, "w") as f:
            json.dump(records, f, indent=1)
    dist.barrier()
    # Leave without gloo's teardown: destroy_process_group() at exit aborted a rank once
    # (std::terminate from gloo's I/O thread, "terminate called without an active exception")
    # after every result was in; the work this test checks is done and written by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def drill(mode):
    """Failure drills; the rank that survives reports what it caught on stdout."""
    from attnfast.distributed import ring_attention

    t0 = time.monotonic()
    if mode == "absent" and RANK == 1:
        return  # never joins the process group
    try:
        init()
    except Exception as e:  # noqa: BLE001
        print(f"CAUGHT {type(e).__name__} after {time.monotonic() - t0:.1f}s: {e}")
        sys.stdout.flush()
        os._exit(0)
    q = torch.randn(1, 2, 8 if mode != "mismatch" or RANK == 0 else 12, 16, requires_grad=True)
    if RANK == 1:
        if mode == "dies":
            os._exit(3)  # dies before calling
        if mode == "late":  # calls forward, then dies instead of running the backward
            ring_attention(q, q, q, is_causal=True)
            os._exit(3)
        if mode == "idle":  # alive, but never calls
            time.sleep(TIMEOUT.total_seconds() + 1)
            os._exit(0)
    try:
        out = ring_attention(q, q, q, is_causal=True)
        out.sum().backward()
        print("NO ERROR")
    except Exception as e:  # noqa: BLE001
        print(f"CAUGHT {type(e).__name__} after {time.monotonic() - t0:.1f}s: {e}")
    sys.stdout.flush()
    os._exit(0)  # no destroy_process_group: the peer is gone


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "parity":
        parity_mode(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1)
    else:
        drill(sys.argv[1])
