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
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import fmt_num, machine_info, md_table
from .common import progress as _progress_bar
from .memprobe import _reset_peak, _status_mib

DESCRIPTION = ("encoders: attention (attnfast, torch SDPA) vs RNN/LSTM/GRU: tokens/s, peak memory, crossover "
               "lengths, long-range recall accuracy and gradient norms")

ATTENTION = ("attention-attnfast", "attention-torch")
RECURRENT = ("rnn", "lstm", "gru")
ENCODERS = ATTENTION + RECURRENT
VARIANTS = ("matched-hidden", "matched-params")
MODES = ("fwd", "fwdbwd")
MODE_LABEL = {"fwd": "forward", "fwdbwd": "fwd+bwd"}
GATES = {"rnn": 1, "lstm": 4, "gru": 3}            # weight blocks per recurrent layer
RNN_CLASS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
PLOTS = ("encoders_speed.png", "encoders_memory.png", "encoders_accuracy.png", "encoders_gradnorm.png")


# ---------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SpeedPlan:
    B: int
    d_model: int
    nhead: int
    lengths: Tuple[int, ...]
    reps: Tuple[Tuple[int, int], ...]      # (up to L, timed rounds): first entry with L <= it
    both_threads_upto: int                 # L <= this: every encoder also timed at 1 thread
    threads: Optional[int] = None          # an int: that thread count only (no 1-thread entries)
    stall_factor: float = 3.0              # an entry whose warm-up took this x the model's best is not timed

    @property
    def ff(self):
        return 4 * self.d_model

    def reps_for(self, L):
        for upto, n in self.reps:
            if L <= upto:
                return n
        return self.reps[-1][1]


@dataclass(frozen=True)
class TaskPlan:
    d_model: int
    nhead: int
    n_values: int                          # classes (chance = 1 / n_values)
    n_distractors: int
    distances: Tuple[int, ...]
    steps: int
    batch: int
    n_train: int
    n_eval: int
    n_grad: int                            # held-out sequences the gradient norms average over
    lr_attention: float
    lr_recurrent: float
    warmup: float = 0.1                    # fraction of the steps
    clip: float = 1.0                      # max global grad norm
    seed: int = 0
    threads: int = 1                       # training speed does not change the results; 1 thread never stalls

    @property
    def ff(self):
        return 2 * self.d_model

    @property
    def vocab(self):
        return self.n_values + self.n_distractors + 1


PLANS = {
    "smoke": (SpeedPlan(B=1, d_model=32, nhead=2, lengths=(16, 32), reps=((10**9, 1),), both_threads_upto=0,
                        threads=1),
              TaskPlan(d_model=16, nhead=1, n_values=4, n_distractors=4, distances=(4, 8), steps=4, batch=8,
                       n_train=64, n_eval=32, n_grad=8, lr_attention=3e-3, lr_recurrent=1e-2)),
    "quick": (SpeedPlan(B=1, d_model=128, nhead=2, lengths=(64, 128, 256, 512, 1024, 2048),
                        reps=((10**9, 3),), both_threads_upto=512),
              TaskPlan(d_model=32, nhead=2, n_values=4, n_distractors=8, distances=(4, 16, 64, 256), steps=60,
                       batch=8, n_train=1024, n_eval=256, n_grad=32, lr_attention=3e-3, lr_recurrent=1e-2)),
    # default: ~2.5-3.5 min of speed sweep (GRU and attention at L=8192 dominate) and ~2.5 min of training
    # (GRU at distance 1024: per-step ATen ops, ~0.4 s a step) on a 2-core CPU shared with other work.
    "default": (SpeedPlan(B=1, d_model=128, nhead=2, lengths=(64, 128, 256, 512, 1024, 2048, 4096, 8192),
                          reps=((512, 5), (10**9, 3)), both_threads_upto=1024),
                TaskPlan(d_model=32, nhead=2, n_values=4, n_distractors=8, distances=(4, 16, 64, 256, 1024),
                         steps=150, batch=8, n_train=2048, n_eval=512, n_grad=32, lr_attention=3e-3,
                         lr_recurrent=1e-2)),
}
PLANS["full"] = PLANS["default"]           # the name `python -m attnfast bench` uses


# ---------------------------------------------------------------------------
# Encoders of matched size
# ---------------------------------------------------------------------------
def attention_layer(d_model, nhead, ff):
    return nn.TransformerEncoderLayer(d_model, nhead, ff, dropout=0.0, batch_first=True)


def recurrent_params(kind, d_in, hidden):
    """Parameters of one torch recurrent layer: gates x (W_ih, W_hh, b_ih, b_hh)."""
    return GATES[kind] * (hidden * d_in + hidden * hidden + 2 * hidden)


def hidden_for_params(kind, d_in, target):
    """Hidden size whose parameter count is closest to `target`."""
    g = GATES[kind]
    h = (-(d_in + 2) + math.sqrt((d_in + 2) ** 2 + 4 * target / g)) / 2    # root of g*(h^2 + (d_in+2) h) = P
    return min((max(1, math.floor(h)), math.ceil(h)), key=lambda c: abs(recurrent_params(kind, d_in, c) - target))


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@dataclass
class SpeedModel:
    name: str            # row id: "attention-attnfast", "lstm/matched-params", ...
    encoder: str         # one of ENCODERS
    variant: str         # "matched-hidden", "matched-params" (attention: the reference of both)
    hidden: int
    params: int
    module: nn.Module

    def forward(self, x):
        out = self.module(x)
        return out if self.encoder in ATTENTION else out[0]


def speed_models(plan: SpeedPlan, device, dtype):
    torch.manual_seed(0)
    att = attention_layer(plan.d_model, plan.nhead, plan.ff).to(device, dtype)   # one module, two SDPA routes
    target = n_params(att)
    models = [SpeedModel(name, name, "matched-hidden", plan.d_model, target, att) for name in ATTENTION]
    for variant in VARIANTS:
        for kind in RECURRENT:
            h = plan.d_model if variant == "matched-hidden" else hidden_for_params(kind, plan.d_model, target)
            m = RNN_CLASS[kind](plan.d_model, h, batch_first=True).to(device, dtype)
            assert n_params(m) == recurrent_params(kind, plan.d_model, h)
            models.append(SpeedModel(f"{kind}/{variant}", kind, variant, h, n_params(m), m))
    return models


def label(name):
    if "/" not in name:
        return name
    kind, variant = name.split("/")
    return f"{kind} ({'params' if variant == 'matched-params' else 'hidden'})"


# ---------------------------------------------------------------------------
# SDPA routing: which attention runs, and a check that it really runs
# ---------------------------------------------------------------------------
def _attnfast_route(encoder):
    """(enter, exit) that put F.scaled_dot_product_attention on this encoder's backend."""
    if encoder == "attention-attnfast":
        import attnfast

        return attnfast.patch, attnfast.unpatch
    return (lambda: None), (lambda: None)


@contextlib.contextmanager
def _fastpath_off():
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(old)


@contextlib.contextmanager
def count_sdpa_calls():
    """Count calls of torch.nn.functional.scaled_dot_product_attention (whatever it is now) in the block."""
    counts = {"sdpa": 0}
    inner = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        counts["sdpa"] += 1
        return inner(*args, **kwargs)

    F.scaled_dot_product_attention = counting
    try:
        yield counts
    finally:
        F.scaled_dot_product_attention = inner


def _check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def verify_routing(att_module, d_model, device, dtype):
    """Once, untimed: every attention encoder calls SDPA; attnfast's runs attnfast kernels only.

    Also records (not asserted) what torch's eval fast path does when it is left on:
    there SDPA is never called, which is why the benchmark switches it off.
    """
    from attnfast.patching import kernel_calls

    x = torch.randn(1, 16, d_model, device=device, dtype=dtype, requires_grad=True)
    found = {}
    for encoder in ATTENTION:
        enter, leave = _attnfast_route(encoder)
        for mode in MODES:
            enter()
            try:
                with kernel_calls() as kc, count_sdpa_calls() as sc:
                    _run_once(lambda t: att_module(t), x, mode)
            finally:
                leave()
            got = dict(sdpa_calls=sc["sdpa"], attnfast_fwd=kc["attnfast_fwd"], attnfast_bwd=kc["attnfast_bwd"],
                       torch_attention=kc["torch_attention"])
            found[f"{encoder} {mode}"] = got
            _check(got["sdpa_calls"] >= 1, f"{encoder} {mode}: F.scaled_dot_product_attention not called: {got}")
            if encoder == "attention-attnfast":
                _check(got["attnfast_fwd"] >= 1 and got["torch_attention"] == 0,
                       f"{encoder} {mode}: attnfast kernel not reached: {got}")
                _check(mode == "fwd" or got["attnfast_bwd"] >= 1, f"{encoder} {mode}: no attnfast backward: {got}")
            else:
                _check(got["attnfast_fwd"] == 0 and got["torch_attention"] >= 1,
                       f"{encoder} {mode}: expected torch's SDPA kernel: {got}")
    torch.backends.mha.set_fastpath_enabled(True)
    try:
        att_module.eval()
        with torch.no_grad(), count_sdpa_calls() as sc:
            att_module(x.detach())
    finally:
        torch.backends.mha.set_fastpath_enabled(False)
    found["attention-torch fwd, fast path left on (not used)"] = dict(sdpa_calls=sc["sdpa"])
    return found


def _run_once(fn, x, mode, g=None):
    if mode == "fwd":
        with torch.no_grad():
            return fn(x)
    out = fn(x)
    out.backward(torch.ones_like(out) if g is None else g)
    return None


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------
class PeakMemory:
    """Peak memory increase of one call: CPU from the peak RSS, CUDA from the allocator."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self._trim = None
        self.ok = True
        if not self.cuda:
            lib = ctypes.util.find_library("c")
            try:
                self._trim = ctypes.CDLL(lib).malloc_trim if lib else None
            except (OSError, AttributeError):
                self._trim = None
            self.ok = self._reset() and _status_mib("VmHWM") is not None
        self.base = 0.0

    @staticmethod
    def _reset():
        return _reset_peak()  # peak RSS := current RSS

    def start(self):
        if not self.ok:
            return
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return
        if self._trim is not None:
            self._trim(0)         # hand freed heap pages back, so the baseline is what is live
        self._reset()
        self.base = _status_mib("VmRSS")

    def stop(self):
        if not self.ok:
            return None
        if self.cuda:
            torch.cuda.synchronize()
            return round(max(0.0, torch.cuda.max_memory_allocated() / 2**20 - self.base), 2)
        return round(max(0.0, _status_mib("VmHWM") - self.base), 2)


@contextlib.contextmanager
def saved_for_backward(exclude):
    """Bytes of the distinct storages autograd saves inside the block (storages in `exclude` left out)."""
    seen = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        try:
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                seen[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    box = {}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield box
    box["mib"] = round(sum(seen.values()) / 2**20, 3)


# ---------------------------------------------------------------------------
# Speed sweep
# ---------------------------------------------------------------------------
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _thread_options(device):
    n = torch.get_num_threads()
    return (n,) if torch.device(device).type != "cpu" or n == 1 else (1, n)


def _threads_beyond(options, recurrent):
    """Thread count past both_threads_upto: the fewest for a recurrent layer, the most for attention.

    On a shared machine every parallel region waits for all its threads, so it stalls for a scheduler
    time slice whenever another process holds one of their cores.  A recurrent layer opens regions of
    constant, small work at every time step (thousands per call): with 2 threads an LSTM forward at
    L=8192 was seen to take 10 s instead of 0.14 s, while at L <= 1024 the second thread saved it little.
    Attention's work per region grows as L^2, and so does what a second thread saves it.
    """
    return min(options) if recurrent else max(options)


def _drop_stalled(entries, warm_s, factor):
    """Leave out of the timed rounds a multi-thread entry whose warm-up call took > `factor` x the same
    model's warm-up at its fewest threads: a stalled multi-thread run (another process holding a core)
    says nothing about the encoder, and on a busy machine each such call can cost seconds.  The
    fewest-threads entry always stays (it cannot stall that way, and it ran first at this size, so its
    warm-up also paid the one-time costs)."""
    fewest = {}
    for name, t in warm_s:
        fewest[name] = min(fewest.get(name, t), t)
    keep, dropped = [], {}
    for m, t, g in entries:
        s, ref = warm_s[(m.name, t)], warm_s[(m.name, fewest[m.name])]
        if t != fewest[m.name] and s > factor * ref:
            dropped[(m.name, t)] = f"warm-up {s * 1e3:.1f} ms vs {ref * 1e3:.1f} ms at {fewest[m.name]} thread(s)"
        else:
            keep.append((m, t, g))
    return keep, dropped


def measure_speed(plan: SpeedPlan, models, device, dtype, show_progress=True):
    """Rows: one per (model, L, mode), with the times of the thread count used."""
    n_threads = torch.get_num_threads()
    options = _thread_options(device) if plan.threads is None else (plan.threads,)
    mem = PeakMemory(device)
    params = [p for m in models for p in m.module.parameters()]
    rows = []
    shapes = [(L, mode) for L in plan.lengths for mode in MODES]
    bar = _progress_bar(shapes, desc="encoders: speed", unit="shape") if show_progress else shapes
    try:
        for L, mode in bar:
            grad = mode == "fwdbwd"
            x = torch.randn(plan.B, L, plan.d_model, device=device, dtype=dtype, requires_grad=grad)
            gs = {}
            entries = []
            for m in models:
                g = gs.get(m.hidden)
                if grad and g is None:
                    g = gs[m.hidden] = torch.randn(plan.B, L, m.hidden, device=device, dtype=dtype)
                both = L <= plan.both_threads_upto
                for t in (options if both else (_threads_beyond(options, m.encoder in RECURRENT),)):
                    entries.append((m, t, g))
            reps = plan.reps_for(L)
            t_shape = time.perf_counter()
            times = {(m.name, t): [] for m, t, _ in entries}
            peak, saved, warm, dropped = {}, {}, {}, {}
            for r in range(1 + reps):        # round 0: warm-up + memory, untimed
                if r == 1:
                    entries, dropped = _drop_stalled(entries, warm, plan.stall_factor)
                for m, t, g in entries:
                    torch.set_num_threads(t)
                    m.module.train(grad)
                    x.grad = None
                    for p in m.module.parameters():
                        p.grad = None
                    enter, leave = _attnfast_route(m.encoder)
                    enter()
                    try:
                        if r == 0:
                            mem.start()
                            ctx = saved_for_backward(params + [x]) if grad else contextlib.nullcontext({})
                            t0 = time.perf_counter()
                            with ctx as box:
                                _run_once(m.forward, x, mode, g)
                            warm[(m.name, t)] = time.perf_counter() - t0
                            peak[(m.name, t)] = mem.stop()
                            saved[(m.name, t)] = box.get("mib")
                        else:
                            _sync(device)
                            t0 = time.perf_counter()
                            _run_once(m.forward, x, mode, g)
                            _sync(device)
                            times[(m.name, t)].append(time.perf_counter() - t0)
                    finally:
                        leave()
            for m in models:
                med = {t: statistics.median(ts) for (name, t), ts in times.items() if name == m.name and ts}
                best = min(med, key=med.get)
                rows.append(dict(
                    model=m.name, encoder=m.encoder, variant=m.variant, hidden=m.hidden, params=m.params,
                    B=plan.B, L=L, mode=mode, threads=best, reps=reps,
                    times_ms=[round(s * 1e3, 4) for s in times[(m.name, best)]],
                    median_ms=round(med[best] * 1e3, 4), tokens_per_s=round(plan.B * L / med[best], 1),
                    median_ms_by_threads={str(t): round(v * 1e3, 4) for t, v in med.items()},
                    max_ms_by_threads={str(t): round(max(ts) * 1e3, 4) for (name, t), ts in times.items()
                                       if name == m.name and ts},
                    stalled_threads_dropped={str(t): v for (name, t), v in dropped.items() if name == m.name},
                    shape_wall_s=round(time.perf_counter() - t_shape, 2),
                    peak_mib=peak[(m.name, best)], saved_for_backward_mib=saved[(m.name, best)]))
            del x, gs
    finally:
        torch.set_num_threads(n_threads)
    return rows


def with_reference_rows(rows):
    """The attention layer is the reference of both matchings: list it under matched-params too."""
    extra = [dict(r, variant="matched-params", same_model_as="matched-hidden")
             for r in rows if r["encoder"] in ATTENTION]
    return rows + extra


def _interp_crossing(L1, r1, L2, r2):
    """L where log(ratio) crosses 0 between (L1, r1) and (L2, r2), interpolated on log L."""
    a, b = math.log(r1), math.log(r2)
    return math.exp(math.log(L1) + a / (a - b) * (math.log(L2) - math.log(L1)))


def crossovers(rows):
    """For each recurrent model, attention encoder and mode: the length beyond which the recurrent
    encoder has more tokens/s (interpolated on log-log between the measured lengths)."""
    out = []
    models = list(dict.fromkeys(r["model"] for r in rows if r["encoder"] in RECURRENT))
    for mode in MODES:
        for rec in models:
            for att in ATTENTION:
                tps = {}
                for r in rows:
                    if r["mode"] == mode and r["model"] in (rec, att):
                        tps.setdefault(r["L"], {})[r["model"]] = r["tokens_per_s"]
                Ls = sorted(L for L, v in tps.items() if len(v) == 2)
                ratio = [tps[L][att] / tps[L][rec] for L in Ls]       # > 1: attention faster
                changes = sum((a > 1) != (b > 1) for a, b in zip(ratio, ratio[1:]))
                if not Ls:
                    continue
                if all(q <= 1 for q in ratio):
                    L_x, text = None, f"recurrent faster at every L (>= {Ls[0]})"
                elif ratio[-1] > 1:
                    L_x, text = None, f"attention faster at L = {Ls[-1]} (longest measured)"
                else:
                    i = max(j for j in range(len(Ls) - 1) if ratio[j] > 1)   # last L where attention led
                    L_x = _interp_crossing(Ls[i], ratio[i], Ls[i + 1], ratio[i + 1])
                    text = f"~{L_x:.0f}"
                out.append(dict(mode=mode, recurrent=rec, attention=att, crossover_L=None if L_x is None
                                else round(L_x, 1), text=text, sign_changes=changes,
                                ratio_at_L={str(L): round(q, 4) for L, q in zip(Ls, ratio)}))
    return out


# ---------------------------------------------------------------------------
# Long-range recall
# ---------------------------------------------------------------------------
def recall_split(plan: TaskPlan, distance):
    """Train and held-out sequences (uint8 tokens, long labels); held-out rows found in train are dropped."""
    g = torch.Generator().manual_seed(plan.seed * 1_000_003 + distance)
    n = plan.n_train + plan.n_eval
    x = torch.randint(plan.n_values, plan.n_values + plan.n_distractors, (n, distance + 1), generator=g,
                      dtype=torch.uint8)
    y = torch.randint(0, plan.n_values, (n,), generator=g)
    x[:, 0] = y.to(torch.uint8)
    x[:, -1] = plan.vocab - 1                                  # the query token
    xtr, ytr, xev, yev = x[:plan.n_train], y[:plan.n_train], x[plan.n_train:], y[plan.n_train:]
    seen = {bytes(row) for row in xtr.numpy()}
    keep = torch.tensor([bytes(row) not in seen for row in xev.numpy()], dtype=torch.bool)
    return xtr, ytr, xev[keep], yev[keep], int((~keep).sum())


def sinusoid_positions(T, d):
    pos = torch.arange(T, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)
    pe = torch.zeros(T, d)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


INIT_NOTE = ("init: torch defaults, named: nn.Embedding N(0, 1); nn.RNN/LSTM/GRU weights and biases "
             "U(-1/sqrt(h), 1/sqrt(h)), plus 1 on the LSTM forget-gate input bias (the usual forget-bias 1, "
             "Jozefowicz et al. 2015: otherwise the cell halves its memory every step at init); "
             "nn.TransformerEncoderLayer: attention in-projection xavier_uniform, biases 0, the other Linear "
             "layers kaiming_uniform(a=sqrt(5)) with U(+-1/sqrt(fan_in)) biases, LayerNorm 1 and 0; "
             "head nn.Linear default; fixed sinusoidal positions (attention only)")


class RecallModel(nn.Module):
    def __init__(self, encoder, plan: TaskPlan):
        super().__init__()
        d = plan.d_model
        self.encoder_name = encoder
        self.emb = nn.Embedding(plan.vocab, d)
        if encoder in ATTENTION:
            self.enc = attention_layer(d, plan.nhead, plan.ff)
        else:
            self.enc = RNN_CLASS[encoder](d, d, batch_first=True)
            if encoder == "lstm":
                with torch.no_grad():
                    self.enc.bias_ih_l0[d:2 * d] += 1.0             # gates i, f, g, o: f is the second block
        self.head = nn.Linear(d, plan.n_values)
        self._pe = torch.zeros(0, d)

    def encode(self, e):
        """Logits at the last (query) position from input embeddings e (B, T, d)."""
        if self.encoder_name in ATTENTION:
            T = e.shape[1]
            if self._pe.shape[0] < T:
                self._pe = sinusoid_positions(T, e.shape[2])
            h = self.enc(e + self._pe[:T].to(e))
        else:
            h = self.enc(e)[0]
        return self.head(h[:, -1])

    def forward(self, tokens):
        return self.encode(self.emb(tokens.long()))


def grad_norms_at_input(model, x, y):
    """Mean over the batch of |d loss / d e[0]| and |d loss / d e[query]|, e = input embeddings."""
    model.train()
    e = model.emb(x.long()).detach().requires_grad_(True)
    loss = F.cross_entropy(model.encode(e), y, reduction="sum")   # sum: each row's grad is its own loss's
    (ge,) = torch.autograd.grad(loss, e)
    norms = ge.norm(dim=-1)                                         # (B, T)
    return norms[:, 0].mean().item(), norms[:, -1].mean().item()


def _lr_lambda(steps, warmup):
    wu = max(1, int(round(warmup * steps)))

    def f(s):
        if s < wu:
            return (s + 1) / wu
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - wu) / max(1, steps - wu))))

    return f


def train_recall(encoder, distance, plan: TaskPlan, split, device="cpu"):
    xtr, ytr, xev, yev, dropped = split
    torch.manual_seed(plan.seed)                 # same init for every distance, and for both attention routes
    model = RecallModel(encoder, plan).to(device)
    lr = plan.lr_attention if encoder in ATTENTION else plan.lr_recurrent
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(plan.steps, plan.warmup))
    batches = torch.Generator().manual_seed(plan.seed + 7919 * distance)   # same batches for every encoder
    xg, yg = xev[:plan.n_grad].to(device), yev[:plan.n_grad].to(device)
    n_threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(plan.threads)
    used_threads = torch.get_num_threads()
    enter, leave = _attnfast_route(encoder)
    enter()
    try:
        g0_init, gq_init = grad_norms_at_input(model, xg, yg)
        pre_clip, step_s, losses = [], [], []
        t_start = time.perf_counter()
        for step in range(plan.steps):
            idx = torch.randint(0, xtr.shape[0], (plan.batch,), generator=batches)
            xb, yb = xtr[idx].to(device), ytr[idx].to(device)
            t0 = time.perf_counter()
            model.train()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            pre_clip.append(float(nn.utils.clip_grad_norm_(model.parameters(), plan.clip)))
            opt.step()
            sched.step()
            step_s.append(time.perf_counter() - t0)
            losses.append(loss.item())
        train_s = time.perf_counter() - t_start
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, xev.shape[0], 128):
                xb = xev[i:i + 128].to(device)
                correct += int((model(xb).argmax(-1).cpu() == yev[i:i + 128]).sum())
        acc = correct / max(1, xev.shape[0])
        g0, gq = grad_norms_at_input(model, xg, yg)
    finally:
        leave()
        torch.set_num_threads(n_threads)
    tail = losses[-max(1, len(losses) // 10):]
    return dict(
        encoder=encoder, distance=distance, accuracy=acc, chance=1.0 / plan.n_values,
        grad_norm_pos0_init=g0_init, grad_norm_query_init=gq_init,
        grad_norm_pos0_trained=g0, grad_norm_query_trained=gq,
        final_train_loss=round(statistics.mean(tail), 4), steps=plan.steps, batch=plan.batch, lr=lr,
        params=n_params(model), clipped_fraction=round(sum(n > plan.clip for n in pre_clip) / len(pre_clip), 3),
        median_pre_clip_norm=round(statistics.median(pre_clip), 4), threads=used_threads,
        s_per_step=round(statistics.median(step_s), 5), train_s=round(train_s, 2),
        n_train=int(xtr.shape[0]), n_eval=int(xev.shape[0]), eval_dropped_as_seen_in_train=dropped)


def run_long_range(plan: TaskPlan, encoders, device="cpu", show_progress=True):
    jobs = [(d, e) for d in plan.distances for e in encoders]
    bar = _progress_bar(jobs, desc="encoders: long-range", unit="run") if show_progress else jobs
    rows, split, split_d = [], None, None
    for distance, encoder in bar:
        if split_d != distance:
            split, split_d = recall_split(plan, distance), distance
        rows.append(train_recall(encoder, distance, plan, split, device))
    return rows


# ---------------------------------------------------------------------------
# Kernel paths (what torch runs for each recurrent layer here)
# ---------------------------------------------------------------------------
def recurrent_kernel_paths(device):
    """Which ATen ops one fwd+bwd of each recurrent layer dispatches (L=8): fused layer or per-step ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.name())
            return func(*args, **(kwargs or {}))

    out = {}
    x = torch.randn(1, 8, 8, device=device, requires_grad=True)
    for kind, cls in RNN_CLASS.items():
        m = cls(8, 8, batch_first=True).to(device)
        with Ops() as ops:
            m(x)[0].sum().backward()
        fused = sorted({n for n in ops.names if any(s in n for s in ("rnn_layer", "cudnn_rnn", "_thnn_fused"))})
        out[kind] = dict(aten_ops_at_L8=len(ops.names), fused_kernels=fused)
    return out


# ---------------------------------------------------------------------------
# Tables and plots
# ---------------------------------------------------------------------------
def _speed_table(rows, mode, key, scale=1.0, digits=3):
    Ls = sorted({r["L"] for r in rows})
    names = list(dict.fromkeys(r["model"] for r in rows if r["variant"] == "matched-hidden" or
                               r["encoder"] in RECURRENT))
    body = []
    for name in names:
        got = {r["L"]: r for r in rows if r["model"] == name and r["mode"] == mode
               and r.get("same_model_as") is None}
        if not got:
            continue
        first = next(iter(got.values()))
        body.append([label(name), first["hidden"], f"{first['params']:,}"] +
                    [fmt_num(None if got.get(L, {}).get(key) is None else got[L][key] * scale, digits)
                     for L in Ls])
    return md_table(["encoder", "hidden", "params"] + [f"L={L}" for L in Ls], body)


def _threads_line(rows):
    used = {}
    for r in rows:
        if r.get("same_model_as") is None:
            used.setdefault((r["mode"], r["threads"]), []).append(f"{label(r['model'])}@{r['L']}")
    parts = []
    for mode in MODES:
        counts = {t: len(v) for (m, t), v in used.items() if m == mode}
        parts.append(f"{MODE_LABEL[mode]}: " + ", ".join(f"{n} rows at {t} thread{'s' if t > 1 else ''}"
                                                        for t, n in sorted(counts.items())))
    return "; ".join(parts)


def _crossover_table(cross):
    body = []
    recs = list(dict.fromkeys(c["recurrent"] for c in cross))
    for rec in recs:
        cells = [label(rec)]
        for mode in MODES:
            for att in ATTENTION:
                c = next((c for c in cross if (c["mode"], c["recurrent"], c["attention"]) == (mode, rec, att)), None)
                cells.append("-" if c is None else c["text"] + (f" ({c['sign_changes']} crossings)"
                                                                if c["sign_changes"] > 1 else ""))
        body.append(cells)
    head = ["recurrent encoder"] + [f"{MODE_LABEL[m]} vs {a}" for m in MODES for a in ATTENTION]
    return md_table(head, body, align=["l"] * len(head))


def _task_table(rows, key, digits=3):
    ds = sorted({r["distance"] for r in rows})
    body = []
    for enc in dict.fromkeys(r["encoder"] for r in rows):
        got = {r["distance"]: r[key] for r in rows if r["encoder"] == enc}
        body.append([enc] + [fmt_num(got.get(d), digits) if got.get(d) is not None else "-" for d in ds])
    return md_table(["encoder"] + [f"d={d}" for d in ds], body)


ZERO_FLOOR = 1e-40     # where a gradient norm of exactly 0 (float32 underflow) is drawn on a log axis
STYLE = {"attention-attnfast": ("C0", "-", "o"), "attention-torch": ("C1", "-.", "s"),
         "rnn": ("C2", "--", "^"), "lstm": ("C3", "--", "v"), "gru": ("C4", "--", "d")}


def _style(name):
    kind = name.split("/")[0]
    color, ls, marker = STYLE[kind]
    if name.endswith("matched-params"):
        ls = ":"
    return dict(color=color, linestyle=ls, marker=marker, markersize=4,
                markerfacecolor="none" if kind == "attention-torch" else color)   # visible on top of attnfast


def make_plots(out, rows, task_rows, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    Ls = sorted({r["L"] for r in rows})
    ds = sorted({r["distance"] for r in task_rows})

    names = list(dict.fromkeys(r["model"] for r in rows if r.get("same_model_as") is None))
    paths = []

    def series(name, mode, key):
        pts = sorted((r["L"], r[key]) for r in rows if r["model"] == name and r["mode"] == mode
                     and r.get("same_model_as") is None and r[key] is not None and r[key] > 0)
        return [p[0] for p in pts], [p[1] for p in pts]

    def finish(fig, axes, path, note, xs=None):
        for ax in axes:
            ax.grid(True, which="both", alpha=0.3)
            if xs:
                ax.set_xticks(xs)
                ax.set_xticklabels([str(v) for v in xs], fontsize=8)
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axes[0].legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=6.5)
        width = fig.get_size_inches()[0]          # fixed margins: tight_layout costs seconds per figure
        fig.subplots_adjust(left=0.75 / width, right=1 - 0.2 / width, bottom=0.16, top=0.86, wspace=0.25)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path.name)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, mode in zip(axes, MODES):
        for name in names:
            xs, ys = series(name, mode, "tokens_per_s")
            ax.plot(xs, ys, label=label(name), **_style(name))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel("tokens/s")
        ax.set_title(MODE_LABEL[mode], fontsize=10)
    finish(fig, axes, out / PLOTS[0], "tokens/s = B*L / median time; solid: attention, dashed: recurrent at matched "
           "hidden size, dotted: at matched parameter count; see encoders.md", Ls)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("fwd", "peak_mib", "forward: peak RSS increase (MiB)"),
              ("fwdbwd", "peak_mib", "fwd+bwd: peak RSS increase (MiB)"),
              ("fwdbwd", "saved_for_backward_mib", "fwd+bwd: saved for backward (MiB, exact)")]
    for ax, (mode, key, ttl) in zip(axes, panels):
        for name in names:
            xs, ys = series(name, mode, key)
            ax.plot(xs, ys, label=label(name), **_style(name))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_title(ttl, fontsize=10)
    finish(fig, axes, out / PLOTS[1], "RSS: zero readings (recycled memory) are not drawn; saved for backward: "
           "distinct storages autograd keeps, parameters and input excluded", Ls)

    encs = list(dict.fromkeys(r["encoder"] for r in task_rows))
    fig, ax = plt.subplots(1, 1, figsize=(6.5, 4.2))
    for enc in encs:
        pts = sorted((r["distance"], r["accuracy"]) for r in task_rows if r["encoder"] == enc)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=enc, **_style(enc))
    if task_rows:
        ax.axhline(task_rows[0]["chance"], color="gray", linewidth=1, linestyle="-.", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("distance (steps between the value and the query)")
    ax.set_ylabel("held-out accuracy")
    finish(fig, [ax], out / PLOTS[2], "same steps, seeds, batches for every encoder; see encoders.md for the plan", ds)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (key, ttl) in zip(axes, [("grad_norm_pos0_init", "at init"), ("grad_norm_pos0_trained",
                                                                           "after training")]):
        for enc in encs:
            pts = sorted((r["distance"], max(r[key], ZERO_FLOOR)) for r in task_rows if r["encoder"] == enc)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=enc, **_style(enc))
        if any(r[k] == 0 for r in task_rows for k in ("grad_norm_pos0_init", "grad_norm_pos0_trained")):
            ax.axhline(ZERO_FLOOR, color="gray", linewidth=0.8, linestyle=":")
            ax.text(1.0, ZERO_FLOOR, "0 (underflowed float32)", transform=ax.get_yaxis_transform(), ha="right",
                    va="bottom", fontsize=7, color="gray")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("distance")
        ax.set_title(f"|d loss / d embedding[0]| {ttl}", fontsize=10)
    axes[0].set_ylabel("gradient norm (batch mean)")
    finish(fig, list(axes), out / PLOTS[3], "gradient of the summed cross-entropy w.r.t. the input embedding at "
           "position 0 (the value), per sequence, averaged over held-out sequences; exact zeros drawn on the "
           "dotted line", ds)
    return paths


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------
def _reading(rows, cross, task_rows):
    """A few sentences computed from the numbers."""
    lines = []
    for mode in MODES:
        af = [c for c in cross if c["mode"] == mode and c["attention"] == "attention-attnfast"]
        xs = [c for c in af if c["crossover_L"] is not None]
        if xs:
            lo, hi = min(xs, key=lambda c: c["crossover_L"]), max(xs, key=lambda c: c["crossover_L"])
            lines.append(f"{MODE_LABEL[mode]}: the recurrent encoders overtake attention-attnfast in tokens/s between "
                         f"L ~{lo['crossover_L']:.0f} ({label(lo['recurrent'])}) and ~{hi['crossover_L']:.0f} "
                         f"({label(hi['recurrent'])}); no crossover up to the longest L for "
                         f"{len(af) - len(xs)} of the {len(af)} recurrent models")
    Lmax = max(r["L"] for r in rows)
    at = {r["model"]: r for r in rows if r["L"] == Lmax and r["mode"] == "fwdbwd" and r.get("same_model_as") is None}
    if at:
        lines.append(f"memory at L={Lmax}, fwd+bwd, saved for backward (peak RSS increase): " + ", ".join(
            f"{label(n)} {fmt_num(r['saved_for_backward_mib'])} MiB ({fmt_num(r['peak_mib'])})" for n, r in at.items()))
    for mode in MODES:
        at = {r["model"]: r for r in rows if r["L"] == Lmax and r["mode"] == mode and r.get("same_model_as") is None}
        if "attention-attnfast" in at and "attention-torch" in at:
            q = at["attention-torch"]["median_ms"] / at["attention-attnfast"]["median_ms"]
            lines.append(f"{MODE_LABEL[mode]} at L={Lmax}: attention-torch / attention-attnfast time = {q:.2f} "
                         f"(> 1: attnfast faster)")
    if task_rows:
        dmax = max(r["distance"] for r in task_rows)
        for enc in dict.fromkeys(r["encoder"] for r in task_rows):
            rs = sorted((r for r in task_rows if r["encoder"] == enc), key=lambda r: r["distance"])
            solved = [r["distance"] for r in rs if r["accuracy"] >= 0.95]
            g = [r["grad_norm_pos0_init"] for r in rs]
            decay = f"{g[0] / g[-1]:.3g}x" if g[-1] > 0 else "to 0"
            lines.append(f"{enc}: held-out accuracy >= 0.95 at distance(s) {solved or 'none'}; at d={dmax}: "
                         f"{rs[-1]['accuracy']:.3f}; gradient norm at position 0 at init falls {decay} from "
                         f"d={rs[0]['distance']} to d={rs[-1]['distance']}")
    return lines


def run_encoders(mode: str, out_dir, device="cpu", dtype=torch.float32, progress=True) -> dict:
    """Run the encoder benchmark in plan `mode` ("smoke", "quick", "default"/"full"), write
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
    with _fastpath_off():
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
                      thread_options=list(_thread_options(device) if speed_plan.threads is None
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


def markdown(result):
    sp, tp = result["speed_plan"], result["task_plan"]
    c, meas = result["conditions"], result["measurement"]
    rows, cross, task_rows = result["speed"], result["crossover"], result["long_range"]
    hidden_models = [x for x in result["models"] if x["encoder"] in RECURRENT]
    la = meas.get("load_average_before"), meas.get("load_average_after")
    kp = meas["recurrent_kernel_paths"]
    md = [
        f"# Encoders: attention vs RNN, LSTM, GRU ({result['mode']})", "",
        f"- machine: {c['cpu_model']}, {c['logical_cpus']} logical CPUs, torch threads {c['threads']} "
        f"(speed: each encoder at {' and '.join(map(str, c['thread_options']))}, the faster kept; long-range "
        f"training at {c['task_threads']}); attnfast {c['attnfast']} "
        f"(git {c['git']}, ISA path {c['cpu_isa']}), torch {c['torch']}, python {c['python']}; device {c['device']}, "
        f"speed dtype {c['dtype']}, task float32; {c['timestamp']}",
        "- load average (1/5/15 min) before: " + (", ".join(f"{v:.1f}" for v in la[0]) if la[0] else "-") +
        "; after: " + (", ".join(f"{v:.1f}" for v in la[1]) if la[1] else "-"),
        f"- run time: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in result["elapsed_s"].items()),
        "",
        "## Speed and memory", "",
        f"- attention: one nn.TransformerEncoderLayer(d_model={sp['d_model']}, nhead={sp['nhead']}, "
        f"dim_feedforward={sp['ff']}, dropout=0, batch_first), the same weights on two SDPA routes: "
        "attention-attnfast = torch.nn.functional.scaled_dot_product_attention patched to attnfast "
        "(attnfast.patch()), attention-torch = torch's SDPA; torch's encoder fast path is off during the run, so "
        "both take the Python path that calls SDPA (checked once with call counters, below)",
        "- recurrent: one nn.RNN (tanh) / nn.LSTM / nn.GRU layer over the same "
        f"{sp['d_model']}-wide input; matched hidden: hidden {sp['d_model']}; matched params: hidden "
        + ", ".join(f"{x['encoder']} {x['hidden']} ({x['params']:,} params)" for x in hidden_models
                    if x["variant"] == "matched-params")
        + f" vs the attention layer's {result['models'][0]['params']:,}; the attention layer is the reference of "
          "both matchings (listed once below, twice in the JSON)",
        f"- input: x ~ N(0, 1) of shape (B={sp['B']}, L, {sp['d_model']}); forward: torch.no_grad, eval mode; "
        "fwd+bwd: out = encoder(x); out.backward(g) in train mode, x requires grad, grads dropped between calls "
        "(untimed); tokens/s = B*L / median time",
        "- timing: per (L, mode) all encoders round-robin; round 0 warm-up (and memory), then "
        + (", ".join(f"{n} timed rounds for L <= {u}" if u < 10**9 else f"{n} for longer L" for u, n in sp["reps"])
           if len(sp["reps"]) > 1 else f"{sp['reps'][0][1]} timed round(s)")
        + "; median",
        ("- threads: each encoder at " + " and ".join(map(str, c["thread_options"])) + " (interleaved) up to "
         f"L={sp['both_threads_upto']}, the row keeps the faster; beyond it the recurrent layers run at 1 thread "
         f"and attention at {max(c['thread_options'])} (on a shared machine a parallel region stalls whenever "
         "another process holds one of its cores; a recurrent layer opens one of constant small work per time "
         "step: a 2-thread LSTM forward at L=8192 once took 10 s instead of 0.14 s; attention's work per region "
         f"grows as L^2); a {max(c['thread_options'])}-thread entry whose warm-up call took > "
         f"{sp['stall_factor']:g}x the 1-thread one is left out of the timed rounds (a stall; listed in the JSON "
         "as stalled_threads_dropped); used: "
         if len(c["thread_options"]) > 1 else
         f"- threads: {c['thread_options'][0]}; ") + _threads_line(rows),
        f"- memory: {meas['memory']}; zero means the call fit in memory the allocator already held; one call "
        "each, so a lone spike is noise (e.g. a worker thread's first allocations); saved for backward: exact "
        "bytes of the distinct storages autograd keeps (parameters, input excluded), free of such noise",
        "- torch kernels here: " + "; ".join(
            f"{k}: {'fused ' + ', '.join(v['fused_kernels']) if v['fused_kernels'] else 'per-step ATen ops'} "
            f"({v['aten_ops_at_L8']} ATen calls for fwd+bwd at L=8)" for k, v in kp.items()),
        "",
        "### Tokens/s, forward", "", _speed_table(rows, "fwd", "tokens_per_s"), "",
        "### Tokens/s, fwd+bwd", "", _speed_table(rows, "fwdbwd", "tokens_per_s"), "",
        "### Crossover lengths", "",
        "The length beyond which the recurrent encoder processes more tokens/s than the attention encoder "
        "(interpolated on log-log between the measured lengths, after the last length where attention led; "
        "more than one crossing means noise or a close race).", "",
        _crossover_table(cross), "",
        "### Peak memory, forward (MiB, peak RSS increase)", "", _speed_table(rows, "fwd", "peak_mib"), "",
        "### Peak memory, fwd+bwd (MiB, peak RSS increase)", "", _speed_table(rows, "fwdbwd", "peak_mib"), "",
        "### Saved for backward (MiB, exact)", "", _speed_table(rows, "fwdbwd", "saved_for_backward_mib"), "",
        "### Routing check (once, before timing)", "",
        md_table(["run", "SDPA calls", "attnfast fwd", "attnfast bwd", "torch attention kernels"],
                 [[k, v.get("sdpa_calls"), v.get("attnfast_fwd", "-"), v.get("attnfast_bwd", "-"),
                   v.get("torch_attention", "-")] for k, v in result["verification"].items()]),
        "",
        "## Long-range recall", "",
        f"- task: token 0 is a value (one of {tp['n_values']}; chance {1 / tp['n_values']:.2f}), then distance-1 "
        f"distractors (uniform over {tp['n_distractors']} other tokens), then a query token at position "
        "`distance`; predict the value from the encoder output at the query",
        f"- models: Embedding({tp['vocab']}, {tp['d_model']}) -> encoder -> Linear({tp['d_model']}, "
        f"{tp['n_values']}) on the query position; attention: TransformerEncoderLayer(d_model={tp['d_model']}, "
        f"nhead={tp['nhead']}, dim_feedforward={tp['ff']}, dropout=0) + sinusoidal positions, on both SDPA routes; "
        f"recurrent: one layer, hidden {tp['d_model']}",
        f"- training: {tp['steps']} Adam steps of batch {tp['batch']} for every encoder and distance; lr "
        f"{tp['lr_attention']:g} (attention), {tp['lr_recurrent']:g} (recurrent) with linear warm-up over "
        f"{tp['warmup']:.0%} of the steps then cosine decay to 0; gradient clipping at global norm {tp['clip']:g}; "
        f"seeds: init {tp['seed']} (same for every distance; both attention routes start from the same weights), "
        "data and batches a fixed function of the distance (same for every encoder)",
        f"- {INIT_NOTE}",
        f"- held-out split: {tp['n_train']} training and {tp['n_eval']} held-out sequences per distance, drawn "
        "together; held-out sequences equal to a training one are dropped; accuracy on the held-out split, eval "
        "mode",
        f"- gradient norm: |d loss / d embedding[0]| with the cross-entropy summed over {tp['n_grad']} held-out "
        "sequences (each sequence's gradient is then its own), averaged over them; the query position's norm is "
        "the scale to read it against",
        "",
        "### Held-out accuracy vs distance", "", _task_table(task_rows, "accuracy"), "",
        "### Gradient norm at position 0, at init", "",
        "0 means the gradient underflowed float32 on its way back to position 0.", "",
        _task_table(task_rows, "grad_norm_pos0_init"), "",
        "### Gradient norm at position 0, after training", "", _task_table(task_rows, "grad_norm_pos0_trained"), "",
        "### Gradient norm at the query position, at init", "", _task_table(task_rows, "grad_norm_query_init"), "",
        "### Training loss (mean over the last 10% of steps)", "", _task_table(task_rows, "final_train_loss"), "",
        "### Share of steps whose gradient was clipped", "", _task_table(task_rows, "clipped_fraction"), "",
        "### Seconds per training step (median)", "", _task_table(task_rows, "s_per_step"), "",
        "## Reading", "",
    ]
    md += [f"- {s}" for s in _reading(rows, cross, task_rows)]
    md += ["", "Plots: " + ", ".join(result["plots"]), ""]
    return "\n".join(md)


def print_summary(result, file=None):
    rows, task_rows = result["speed"], result["long_range"]
    p = lambda *a: print(*a, file=file or sys.stdout)   # noqa: E731
    for mode in MODES:
        p(f"\ntokens/s, {MODE_LABEL[mode]}:")
        p(_speed_table(rows, mode, "tokens_per_s"))
    p("\ncrossover lengths (recurrent faster beyond):")
    p(_crossover_table(result["crossover"]))
    p("\nheld-out accuracy vs distance:")
    p(_task_table(task_rows, "accuracy"))
    p("\ngradient norm at position 0 at init:")
    p(_task_table(task_rows, "grad_norm_pos0_init"))
    p("\n" + "; ".join(f"{k} {v:.0f} s" for k, v in result["elapsed_s"].items()))


def run(ctx):
    """Suite entry (python -m bench --suite encoders [--quick])."""
    result = run_encoders("quick" if ctx.quick else "default", ctx.out)
    print_summary(result)
    print("wrote encoders.json, encoders.md, " + ", ".join(PLOTS))
    speed_ok = all(r["median_ms"] > 0 for r in result["speed"])
    task_ok = all(0.0 <= r["accuracy"] <= 1.0 for r in result["long_range"])
    return speed_ok and task_ok


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.encoders", description=DESCRIPTION)
    ap.add_argument("--mode", choices=sorted(PLANS), default="default")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    result = run_encoders(a.mode, a.out, progress=not a.no_progress)
    print_summary(result)
    print(f"mode {a.mode}: {time.perf_counter() - t0:.1f} s; wrote {a.out}/encoders.json, encoders.md, "
          + ", ".join(PLOTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
