"""The speed and memory sweep: every encoder at every length, forward and fwd+bwd,
round-robin, at the thread counts that do not stall; the peak memory of each call
and what autograd saves for backward; the crossover lengths of the result."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import statistics
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..common import progress as _progress_bar
from ..memprobe import _reset_peak, _status_mib
from .models import ATTENTION, MODES, RECURRENT, attnfast_route, run_once


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


def thread_options(device):
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
    options = thread_options(device) if plan.threads is None else (plan.threads,)
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
                    enter, leave = attnfast_route(m.encoder)
                    enter()
                    try:
                        if r == 0:
                            mem.start()
                            ctx = saved_for_backward(params + [x]) if grad else contextlib.nullcontext({})
                            t0 = time.perf_counter()
                            with ctx as box:
                                run_once(m.forward, x, mode, g)
                            warm[(m.name, t)] = time.perf_counter() - t0
                            peak[(m.name, t)] = mem.stop()
                            saved[(m.name, t)] = box.get("mib")
                        else:
                            _sync(device)
                            t0 = time.perf_counter()
                            run_once(m.forward, x, mode, g)
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

