"""Encoders: "RNN, LSTM, GRU or Transformer for long sequences?" made measurable.

Speed.  One nn.TransformerEncoderLayer (d_model, nhead, dim_feedforward =
4*d_model, dropout 0, batch_first) runs twice: with
torch.nn.functional.scaled_dot_product_attention routed through attnfast
(`attnfast.patch()`), and on torch's own SDPA.  torch's C++ fast path for
encoder layers (eval mode, no grad) never calls SDPA, so it is switched off
for the whole run (torch.backends.mha.set_fastpath_enabled(False), restored
afterwards), and a call counter checks once, before any timing, that both
attention encoders call SDPA and that the attnfast one runs attnfast's kernels
(forward and backward) and no torch attention kernel.  Against it: nn.RNN
(tanh), nn.LSTM and nn.GRU, one layer over the same d_model-wide input, at
the same hidden size ("matched hidden") and at the hidden size whose
parameter count is closest to the attention layer's ("matched params"; the
attention layer is the reference of both matchings).  Forward runs under
torch.no_grad in eval mode; fwd+bwd is out = encoder(x); out.backward(g) in
train mode, x requiring grad (as embeddings do), grads dropped (untimed)
between calls.  tokens/s = B*L / median time.

Timing: the encoders of one (L, mode) run round-robin (A B C ... A B C ...)
so the machine's noise hits them alike; round 0 is an untimed warm-up that
also measures memory, the median of the timed rounds is reported.  Thread
count: on a CPU each encoder is timed at 1 thread and at torch's thread count
(entries interleaved) up to a length, and the row keeps the faster; beyond
it the recurrent layers run at 1 thread and the attention encoder at torch's
count (see _threads_beyond).  Small parallel
regions (a recurrent step, a LayerNorm at short L) stall for a scheduler time
slice whenever a core is busy with another process, so on a shared machine
a single thread can be many times faster for them; the count used is in
every row.  The long-range training runs at 1 thread (its speed does not
change its results).

Memory (CPU): increase of the process's peak RSS during the warm-up call,
after malloc_trim and a reset of the peak (/proc/self/clear_refs), over
the RSS just before it.  Memory the allocator recycles within the call does
not show, so small sizes can read 0.  Fwd+bwd also reports the exact bytes
autograd saved for backward (torch.autograd.graph.saved_tensors_hooks,
distinct storages, parameters and the input excluded).

Long-range recall.  Sequence: a value token (one of n_values) at position 0,
`distance - 1` distractor tokens (uniform over their own n_distractors
tokens), a query token at position `distance`; the label is the value.
Every encoder (d_model wide, one layer, + Embedding, + Linear head on the
query position; the attention encoder adds sinusoidal positions) trains for
the same number of Adam steps with the same seeds and batches, gradient
clipping, linear warm-up + cosine decay, and is scored on a held-out split
(sequences never trained on).  The gradient norm reaching position 0 is
|d loss / d embedding[0]| per sequence (loss summed over the batch, so each
sequence's gradient is its own), averaged over a held-out batch, at init and
after training; the same at the query position is the scale it is read
against.

Writes encoders.json, encoders.md, encoders_speed.png, encoders_memory.png,
encoders_accuracy.png, encoders_gradnorm.png.

The package: models.py (the encoders of matched size, the SDPA routing and its
check, the recall model), timing.py (the speed and memory sweep, crossovers),
tasks.py (the long-range recall task: data, training, gradient norms),
report.py (encoders.md and the plots).  `python -m attnfast bench encoders
[--quick | --smoke] [--device D]`.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..common import machine_info
from .models import ENCODERS, INIT_NOTE, fastpath_off, recurrent_kernel_paths, speed_models, verify_routing
from .report import PLOTS, make_plots, markdown
from .tasks import TaskPlan, run_long_range
from .timing import PeakMemory, SpeedPlan, crossovers, measure_speed, thread_options, with_reference_rows

PLANS = {
    "smoke": (SpeedPlan(B=1, d_model=32, nhead=2, lengths=(16, 32), reps=((10**9, 1),), both_threads_upto=0,
                        threads=1),
              TaskPlan(d_model=16, nhead=1, n_values=4, n_distractors=4, distances=(4, 8), steps=4, batch=8,
                       n_train=64, n_eval=32, n_grad=8, lr_attention=3e-3, lr_recurrent=1e-2)),
    "quick": (SpeedPlan(B=1, d_model=128, nhead=2, lengths=(64, 128, 256, 512, 1024, 2048),
                        reps=((10**9, 3),), both_threads_upto=512),
              TaskPlan(d_model=32, nhead=2, n_values=4, n_distractors=8, distances=(4, 16, 64, 256), steps=60,
                       batch=8, n_train=1024, n_eval=256, n_grad=32, lr_attention=3e-3, lr_recurrent=1e-2)),
    # full: ~2.5-3.5 min of speed sweep (GRU and attention at L=8192 dominate) and ~2.5 min of training
    # (GRU at distance 1024: per-step ATen ops, ~0.4 s a step) on a 2-core CPU shared with other work.
    "full": (SpeedPlan(B=1, d_model=128, nhead=2, lengths=(64, 128, 256, 512, 1024, 2048, 4096, 8192),
                       reps=((512, 5), (10**9, 3)), both_threads_upto=1024),
             TaskPlan(d_model=32, nhead=2, n_values=4, n_distractors=8, distances=(4, 16, 64, 256, 1024),
                      steps=150, batch=8, n_train=2048, n_eval=512, n_grad=32, lr_attention=3e-3,
                      lr_recurrent=1e-2)),
}


def run_encoders(mode: str, out_dir, device="cpu", dtype=torch.float32, progress=True) -> dict:
    """Run the encoder benchmark in plan `mode` ("smoke", "quick", "full"), write
    encoders.json, encoders.md and the PNGs into `out_dir`, and return the JSON-able result."""
    if mode not in PLANS:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(PLANS)}")
    import attnfast

    speed_plan, task_plan = PLANS[mode]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = str(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    st = attnfast.backends()
    fused = [st["cpu"]] if torch.device(device).type == "cpu" else [st["triton"], st["cuda"]]
    if not any(b.available for b in fused):
        raise RuntimeError(f"attnfast has no fused backend for {device} here: "
                           + "; ".join(f"{b.name}: {b.reason}" for b in fused))
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    timings = {}
    t_all = time.perf_counter()
    with fastpath_off():
        t0 = time.perf_counter()
        models = speed_models(speed_plan, device, dtype)
        verification = verify_routing(models[0].module, speed_plan.d_model, device, dtype)
        paths = recurrent_kernel_paths(device)
        timings["checks_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = measure_speed(speed_plan, models, device, dtype, progress)
        timings["speed_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        task_rows = run_long_range(task_plan, ENCODERS, device, progress)
        timings["long_range_s"] = time.perf_counter() - t0
    rows = with_reference_rows(rows)
    cross = crossovers(rows)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    m = machine_info()
    conditions = dict(m, device=device, dtype=str(dtype).replace("torch.", ""),
                      thread_options=list(thread_options(device) if speed_plan.threads is None
                                          else (speed_plan.threads,)),
                      task_threads=task_plan.threads)
    measurement = dict(
        load_average_before=load_before, load_average_after=load_after,
        fast_path="torch.backends.mha fast path off during the run (restored after)",
        memory=("unavailable" if not PeakMemory(device).ok else
                "torch.cuda.max_memory_allocated increase of the warm-up call" if torch.device(device).type == "cuda"
                else "peak RSS increase of the warm-up call, after malloc_trim and a peak reset"),
        recurrent_kernel_paths=paths, task_dtype="float32", init=INIT_NOTE,
        speed_thread_options=conditions["thread_options"], task_threads=conditions["task_threads"])
    result = dict(
        suite="encoders", mode=mode, conditions=conditions, measurement=measurement,
        speed_plan=dict(asdict(speed_plan), ff=speed_plan.ff), task_plan=dict(asdict(task_plan), ff=task_plan.ff,
                                                                              vocab=task_plan.vocab),
        models=[dict(name=x.name, encoder=x.encoder, variant=x.variant, hidden=x.hidden, params=x.params)
                for x in models],
        verification=verification, speed=rows, crossover=cross, long_range=task_rows, plots=list(PLOTS))
    m_title = (f"{m['cpu_model']}, {torch.get_num_threads()} threads, torch {m['torch']}, "
               f"attnfast ISA {m['cpu_isa']}, {conditions['dtype']}" if torch.device(device).type == "cpu" else
               f"{device}, torch {m['torch']}, {conditions['dtype']}")
    make_plots(out, rows, task_rows, f"encoders ({mode}): {m_title}")
    timings["total_s"] = time.perf_counter() - t_all
    result["elapsed_s"] = {k: round(v, 1) for k, v in timings.items()}
    md = markdown(result)
    (out / "encoders.md").write_text(md)
    import json

    (out / "encoders.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def run(ctx):
    """Suite `encoders`: the plan of the run on its device, in float32."""
    result = run_encoders(ctx.plan, ctx.out, device=ctx.device, dtype=torch.float32, progress=ctx.progress)
    ctx.stamp("encoders.json", dtype="float32")
    print((ctx.out / "encoders.md").read_text())
    speed_ok = all(r["median_ms"] > 0 for r in result["speed"])
    task_ok = all(0.0 <= r["accuracy"] <= 1.0 for r in result["long_range"])
    return speed_ok and task_ok
