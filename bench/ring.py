"""Ring attention on CPU processes (gloo): time per step, communication share, and a
model of compute vs communication for N GPUs over NVLink / InfiniBand.

    python -m attnfast bench ring [--quick | --smoke]        (writes ring.json, ring.md)

Per world size W (2 and 4 processes on this machine, threads split between them)
and global length L (B=1, H=4, D=64, float32, zigzag layout), rank by rank:
  forward / backward     wall time of ring_forward / ring_backward, and within it
                         the time in block kernels (compute) and blocked on the
                         ring (wait: the communication compute did not hide);
  exchange alone         the same transfers with no compute (the ring's raw
                         communication time).
Reported: per-step time (total / W) and, as shares of the total, the time
blocked on the ring, the transfers alone, and the spread of compute time between
ranks (blocked time is transfer that compute did not hide plus waiting for a
slower rank: where blocked < transfers alone, the overlap hid the rest); and the
model's threshold length for this machine's measured FLOP/s and bandwidth.
Medians over repeats; the slowest rank's total (a ring step waits for it).
Each rank is a process running this module with --worker (started by run()).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

B, H, D = 1, 4, 64
PLANS = {"quick": dict(worlds=(2, 4), lengths=(1024, 4096), reps=3),
         "full": dict(worlds=(2, 4), lengths=(1024, 4096, 16384), reps=5),
         "smoke": dict(worlds=(2,), lengths=(256,), reps=1)}

# GPU model inputs (leads, not measurements here): H200 SXM links and attention kernel classes.
LINKS = {"NVLink 4 (H100/H200 SXM, 450 GB/s per direction)": 450e9,
         "InfiniBand NDR (400 Gb/s per GPU, 50 GB/s)": 50e9}
KERNELS = {"FA2-class (fwd 350, bwd 300 TFLOP/s)": (350e12, 300e12),
           "FA3-class (fwd 600, bwd 500 TFLOP/s)": (600e12, 500e12)}
HEADS = {"MHA (Hq = Hkv)": (1, 1), "GQA 8:1": (8, 1)}


# ---------------------------------------------------------------------------
# Worker (one rank)
# ---------------------------------------------------------------------------

def _worker(args):
    import datetime

    import torch.distributed as dist

    from attnfast.distributed import prepare_ring, ring_backward, ring_forward, shard_sequence

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    rows = []
    for L in args.lengths:
        for causal in (False, True):
            g = torch.Generator().manual_seed(L)
            q, k, v, dout = (torch.randn(B, H, L, D, generator=g) for _ in range(4))
            ql, kl, vl, dl = (shard_sequence(t, 2, rank, world, "zigzag").contiguous() for t in (q, k, v, dout))
            _, ctx = prepare_ring(ql, kl, vl, is_causal=causal)
            reps = []
            for it in range(args.reps + 1):  # the first round warms up
                dist.barrier()
                tf = dict(compute_s=0.0, wait_s=0.0)
                t0 = time.perf_counter()
                out, lse = ring_forward(ctx, ql, kl, vl, trace=tf)
                tf["total_s"] = time.perf_counter() - t0
                dist.barrier()
                tb = dict(compute_s=0.0, wait_s=0.0)
                t0 = time.perf_counter()
                ring_backward(ctx, dl, ql, kl, vl, out, lse, trace=tb)
                tb["total_s"] = time.perf_counter() - t0
                dist.barrier()
                t0 = time.perf_counter()
                kv = (kl, vl)
                for step in range(world - 1):
                    kv = ctx.ring.exchange(kv, "timing", step, tag=0).wait()
                ex_f = time.perf_counter() - t0
                dist.barrier()
                t0 = time.perf_counter()  # the backward's transfers: K/V W-1 times, float32 dK/dV W times
                kv, grads = (kl, vl), (torch.zeros_like(kl), torch.zeros_like(vl))
                for step in range(world):
                    pk = ctx.ring.exchange(kv, "timing", step, tag=0) if step + 1 < world else None
                    grads = ctx.ring.exchange(grads, "timing", step, tag=2).wait()
                    kv = pk.wait() if pk is not None else kv
                ex_b = time.perf_counter() - t0
                if it:
                    reps.append([tf["total_s"], tf["compute_s"], tf["wait_s"], ex_f,
                                 tb["total_s"], tb["compute_s"], tb["wait_s"], ex_b])
            mine = torch.tensor(reps, dtype=torch.float64)  # (reps, 8)
            every = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(every, mine)
            if rank == 0:
                rows.append(dict(L=L, causal=causal, per_rank=[e.tolist() for e in every]))
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        Path(args.out).write_text(json.dumps(rows))


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------

FIELDS = ("fwd_total", "fwd_compute", "fwd_wait", "fwd_exchange", "bwd_total", "bwd_compute", "bwd_wait",
          "bwd_exchange")


def summarize(world, row):
    """Medians over repeats of the slowest rank's totals and the ranks' mean compute/wait."""
    per_rank = torch.tensor(row["per_rank"])  # (world, reps, 8)
    reps = per_rank.shape[1]
    med = {}
    for i, name in enumerate(FIELDS):
        x = per_rank[:, :, i]
        vals = x.max(0).values if name.endswith(("total", "exchange")) else x.mean(0)
        med[name] = statistics.median(vals.tolist())
        if name.endswith("compute"):  # max - min over ranks, per repeat
            med[name.replace("compute", "spread")] = statistics.median((x.max(0).values - x.min(0).values).tolist())
    L, causal = row["L"], row["causal"]
    l = L // world
    flops_fwd = 4.0 * B * H * L * L * D * (0.5 if causal else 1.0) / world  # per rank
    kv_bytes = 2 * B * H * l * D * 4  # one step's K and V, float32
    out = dict(world=world, L=L, l=l, causal=causal, reps=reps, **{k + "_s": v for k, v in med.items()},
               per_rank_s=dict(zip(FIELDS, per_rank.permute(2, 0, 1).tolist())))
    # bytes one rank sends: K/V W-1 times (forward); K/V W-1 times and float32 dK/dV W times (backward)
    for m, flops, sent in (("fwd", flops_fwd, kv_bytes * (world - 1)),
                           ("bwd", 2.5 * flops_fwd, kv_bytes * (2 * world - 1))):
        total, comp, wait, ex = (med[f"{m}_{x}"] for x in ("total", "compute", "wait", "exchange"))
        out[f"{m}_step_ms"] = total / world * 1e3
        out[f"{m}_blocked_share"] = wait / total
        out[f"{m}_transfer_share"] = ex / total
        out[f"{m}_spread_share"] = med[f"{m}_spread"] / total
        out[f"{m}_gflops"] = flops / comp / 1e9
        out[f"{m}_gbps"] = sent / ex / 1e9 if ex > 0 and sent else None  # the transfers measured alone
    from attnfast.distributed import model_hidden_length

    if out["fwd_gbps"]:
        out["fwd_l_star"] = model_hidden_length(out["fwd_gflops"] * 1e9, out["fwd_gbps"] * 1e9, causal=causal,
                                                elem_bytes=4)
    return out


def gpu_model_rows():
    from attnfast.distributed import model_hidden_length

    rows = []
    for link, bw in LINKS.items():
        for kname, (f_fwd, f_bwd) in KERNELS.items():
            for hname, (hq, hkv) in HEADS.items():
                cells = []
                for bwd, f in ((False, f_fwd), (True, f_bwd)):
                    for causal in (False, True):
                        cells.append(model_hidden_length(f, bw, heads_q=hq, heads_kv=hkv, causal=causal,
                                                         elem_bytes=2, backward=bwd))
                rows.append(dict(link=link, kernel=kname, heads=hname, l_star=cells))
    return rows


MODEL_TEXT = """\
### Model: when does the ring hide its communication?

Per ring step a rank computes its local queries (l = L/N tokens) against one visiting K/V
shard and sends one shard on.  Per (batch, query head), with head dim E and a kernel
running at F FLOP/s, and a link of β bytes/s per direction:

    compute  = c · 4·l²·E / F            c = 1 (full), 1/2 (causal, zigzag: every step is half)
    transfer = 2·l·E·b / β · (Hkv/Hq)    K and V, b bytes per element (bf16: 2)

The backward computes 2.5x the FLOPs and moves K/V plus float32 dK/dV (b + 4 bytes).
Compute hides the transfer when compute >= transfer, i.e. for local lengths

    l >= l* = 2·b·(Hkv/Hq)·F / (4·c·β)        (backward: 2·(b + 4)·(Hkv/Hq)·F / (10·c·β))

l* grows with the kernel's speed: a faster kernel needs longer shards to hide the same link.
It does not depend on E, B or the number of devices N (each step's compute and transfer
both scale with E and B; N only sets l = L/N).  A ring is as fast as its slowest hop: with 8
GPUs per node and a ring over several nodes, the InfiniBand hop sets l*.  Datasheet rates:
achieved NCCL bandwidth is lower (often 70-85%), which raises l* by the same factor, and
the transfer competes for SMs and HBM with the kernel.

Threshold l* in tokens per device (bf16, E any), forward and backward, full and causal:
"""


def write_results(ctx, records, cond):
    from .common import fmt_num, md_table

    md = ["Ring attention on this machine's CPU processes (gloo over loopback; B=1, H=4, D=64, float32, "
          "zigzag layout; torch threads split between the ranks). `step` = wall time / W. As shares of the "
          "wall time: `blocked` = time waiting on the ring (transfer compute did not hide, plus waiting for "
          "a slower rank), `transfers` = the same transfers run alone, `spread` = max − min compute time "
          "over ranks. `blocked` below `transfers` means the overlap hid the rest; `blocked` above it is "
          "rank imbalance (see `spread`). `l*` = the model's threshold for the measured GFLOP/s and GB/s.", ""]
    header = ["W", "L", "l = L/W", "causal", "fwd step ms", "blocked", "transfers", "spread", "bwd step ms",
              "blocked", "transfers", "spread", "GFLOP/s per rank (fwd)", "GB/s (fwd transfers)", "model l*"]
    rows = []
    for r in records:
        pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        rows.append([r["world"], r["L"], r["l"], "yes" if r["causal"] else "no"]
                    + [x for m in ("fwd", "bwd") for x in (fmt_num(r[f"{m}_step_ms"]), pct(r[f"{m}_blocked_share"]),
                                                           pct(r[f"{m}_transfer_share"]), pct(r[f"{m}_spread_share"]))]
                    + [fmt_num(r["fwd_gflops"]), fmt_num(r["fwd_gbps"]), r.get("fwd_l_star", "-")])
    md += [md_table(header, rows), "", MODEL_TEXT]
    model = gpu_model_rows()
    mrows = [[m["link"], m["kernel"], m["heads"], *[f"{x:,}" for x in m["l_star"]]] for m in model]
    md += [md_table(["link", "kernel", "heads", "fwd full", "fwd causal", "bwd full", "bwd causal"], mrows,
                    align=["l", "l", "l", "r", "r", "r", "r"]), ""]
    ctx.write_text("ring.md", "\n".join(md))
    ctx.write_json("ring.json", dict(conditions=cond, shape=dict(B=B, H=H, D=D, dtype="float32"),
                                     records=records, gpu_model=model))
    print("\n".join(md))


def run(ctx):
    from attnfast.distributed import launch_local

    from .common import module_argv, subprocess_env

    plan = PLANS[ctx.plan]
    records, ok = [], True
    for world in plan["worlds"]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "ring.json"
            argv = module_argv("ring", "--worker", "--out", out, "--reps", plan["reps"], "--lengths", *plan["lengths"])
            t0 = time.perf_counter()
            results = launch_local(argv, world, timeout=1800,
                                   env=subprocess_env(OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world))))
            if any(r.returncode != 0 for r in results) or not out.exists():
                ok = False
                for r in results:
                    print(f"rank {r.rank} rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}", file=sys.stderr)
                continue
            print(f"W={world}: {time.perf_counter() - t0:.0f} s", flush=True)
            records += [summarize(world, row) for row in json.loads(out.read_text())]
    cond = dict(ctx.machine, ranks_threads={w: max(1, (os.cpu_count() or 1) // w) for w in plan["worlds"]})
    if records:
        write_results(ctx, records, cond)
    return ok and bool(records)


def main(argv=None):
    """A rank of run(): `python -m attnfast.bench.ring --worker ...` (the suite itself is
    `python -m attnfast bench ring`)."""
    p = argparse.ArgumentParser(prog=f"python -m {__package__}.ring", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=str, default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024])
    a = p.parse_args(argv)
    if not a.worker:
        print("this module is a rank of the ring benchmark; run the suite with `python -m attnfast bench ring "
              "[--quick | --smoke]`", file=sys.stderr)
        return 2
    _worker(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
