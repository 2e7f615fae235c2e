"""Kernel tables, one module for both devices: attnfast's backends against torch
SDPA, the naive reference and, on CUDA, flash-attn and xformers when they can
be imported.  The device chooses the peers and the shapes.  Three tables:

kernels (kernels.md, kernels.json, kernels_time.png, kernels_tflops.png; part of
  `all`): the sweep on one device (--device, --dtype): attnfast's backends there
  vs torch SDPA (its default choice and each backend it has on the device,
  forced) vs the naive reference (vs flash-attn, xformers); forward, backward and
  forward+backward; variants: no mask, causal (flag), causal as a bool tensor,
  key padding (half the keys), sliding window, GQA.  Timing: CPU: the peers of a
  case run interleaved (A B C A B C ...), `reps` rounds after a warm-up call, and
  the median, min and max are reported.  CUDA: triton.testing.do_bench per peer
  (warm-up, L2 flushed, quantiles 0.2/0.5/0.8).  Peak memory: CPU: peak RSS
  increase of one forward in a fresh process (memprobe.py), CUDA:
  torch.cuda.max_memory_allocated above the inputs.  A peer that cannot express
  a case (torch SDPA has no window argument: it gets the band as a bool tensor;
  flash-attn takes no mask tensor) either gets the equivalent mask or is listed
  as n/a with the reason.

cpu_kernels (cpu_kernels.md, cpu_kernels.json, cpu_kernels.png): attnfast's CPU
  kernel vs torch SDPA vs the naive reference, fp32 and bf16, causal or not,
  forward and forward+backward, self-attention (Lq = Lk = L), GFLOP/s.  Within
  each shape the peers run interleaved; the figure is the median of the timed
  rounds.  Peak memory: one fresh subprocess per probe, and a long-sequence
  comparison (attnfast vs naive).

gpu_kernels (gpu_kernels.md, gpu_kernels.json): attnfast (Triton, and CUDA C++
  when built) vs torch SDPA with no backend forced ("default") and forced to
  flash, efficient and cudnn, forward and forward+backward.  Shapes follow the
  FlashAttention benchmark convention: hidden size 2048 and 16k tokens per
  batch, so H = 2048 / D and B = 16384 / L.  Cases (most important first, since
  a time guard may cut the tail): bf16 D=128 forward non-causal L=4k..16k,
  causal, then forward+backward, then a key-padding bool mask (half the keys
  padded) at L=1k..4k, then the short L, then fp16, then D=64.  Timing:
  triton.testing.do_bench (L2 cleared before each call), median ms; a peer that
  refuses an input is recorded as "n/a" with its reason.  Deadline: cases that
  would start after ATTNFAST_GPU_BENCH_SECONDS (default 330) seconds are
  skipped, and the report says which.  Without a CUDA device there is nothing
  to do, except `--quick` under TRITON_INTERPRET=1: then two tiny cases run on
  CPU tensors for the Triton peer alone (a smoke test of this code path).

FLOPs (all three): forward 4*B*H*Lq*Lk*D, halved for the causal variants,
4*B*H*D*(visible pairs) for the window, unchanged by the key-padding mask;
backward 2.5x forward, forward+backward 3.5x.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import statistics
import subprocess
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .common import (DTYPE_SHORT, DTYPES, MODES, Call, fmt_num, md_table, median_ms, progress,
                     run_memprobes, time_interleaved)

MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}
WINDOW = 256
SWEEP_FLOP_NOTE = ("FLOPs / median time; FLOPs: forward 4*B*H*Lq*Lk*D, halved for the causal variants, "
                   "4*B*H*D*(visible pairs) for the window, unchanged by the key-padding mask; backward 2.5x "
                   "forward, forward+backward 3.5x")


# ---------------------------------------------------------------------------
# Cases and FLOPs
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    variant: str     # "none", "causal", "causal-tensor", "keypad", "window", "gqa"
    mode: str        # "fwd", "bwd", "fwdbwd"
    L: int
    D: int
    B: int = 1
    H: int = 8
    Hkv: Optional[int] = None

    def id(self):
        return f"{self.variant} {self.mode} L{self.L} D{self.D} B{self.B}H{self.H}" + \
            (f"kv{self.Hkv}" if self.Hkv else "")

    def visible_pairs(self):
        L = self.L
        if self.variant in ("causal", "causal-tensor"):
            return L * L / 2
        if self.variant == "window":  # keys i - WINDOW .. i
            w = min(WINDOW, L - 1)
            return L * (w + 1) - w * (w + 1) / 2
        return L * L

    def flops(self):
        return 4.0 * self.B * self.H * self.D * self.visible_pairs() * MODE_FACTOR[self.mode]


def make_case_inputs(case: Case, dtype, device, grad_output=False):
    """q, k, v (B, H, L, D) (k, v with Hkv heads for GQA), requiring grad when the mode has a
    backward, and then the output gradient g when `grad_output` (else None)."""
    grad = case.mode != "fwd"
    hkv = case.Hkv or case.H
    q = torch.randn(case.B, case.H, case.L, case.D, dtype=dtype, device=device, requires_grad=grad)
    k = torch.randn(case.B, hkv, case.L, case.D, dtype=dtype, device=device, requires_grad=grad)
    v = torch.randn(case.B, hkv, case.L, case.D, dtype=dtype, device=device, requires_grad=grad)
    g = torch.randn(case.B, case.H, case.L, case.D, dtype=dtype, device=device) if grad and grad_output else None
    return q, k, v, g


def _band(L, device):
    i = torch.arange(L, device=device)
    d = i[None, :] - i[:, None]
    return (d <= 0) & (d >= -WINDOW)


def case_args(case: Case, device):
    """The attention keywords of the variant (masks as tensors; the window as attnfast's argument)."""
    L = case.L
    if case.variant == "causal":
        return dict(is_causal=True)
    if case.variant == "causal-tensor":
        return dict(attn_mask=torch.ones(L, L, dtype=torch.bool, device=device).tril())
    if case.variant == "keypad":
        keep = torch.arange(L, device=device) < L // 2
        return dict(attn_mask=keep.view(1, 1, 1, L).expand(case.B, 1, 1, L))
    if case.variant == "window":
        return dict(window=(WINDOW, 0))
    if case.variant == "gqa":
        return dict(enable_gqa=True)
    return {}


# ---------------------------------------------------------------------------
# Peers: fn(q, k, v, args) -> out, args = the attention keywords of a case
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    fn: Callable
    refuses: Callable[[Case], Optional[str]] = lambda case: None
    sdpa_backends: Optional[Tuple] = None    # torch SDPA forced to these backends (sdpa_kernel)

    def context(self):
        """sdpa_kernel(the forced backends), or nothing."""
        if self.sdpa_backends is None:
            return nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(list(self.sdpa_backends))

    def call(self, q, k, v, args):
        """One call, inside the peer's context."""
        if self.sdpa_backends is None:
            return self.fn(q, k, v, args)
        with self.context():
            return self.fn(q, k, v, args)


def _attnfast(backend):
    def fn(q, k, v, args):
        import attnfast

        return attnfast.attention(q, k, v, backend=backend, **args)
    return fn


def _sdpa(q, k, v, args):
    if "window" in args:        # no window argument: the same band as a bool mask
        args = dict(attn_mask=_band(q.shape[-2], q.device))
    return F.scaled_dot_product_attention(q, k, v, **args)


def _naive(q, k, v, args):
    import attnfast

    return attnfast.attention_ref(q, k, v, upcast=False, **args)[0]


def _flash_attn(q, k, v, args):
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          causal=args.get("is_causal", False), window_size=args.get("window", (-1, -1)))
    return out.transpose(1, 2)


def _xformers(q, k, v, args):
    import xformers.ops as xops

    bias = xops.LowerTriangularMask() if args.get("is_causal") else None
    if args.get("enable_gqa"):
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


def _no_tensor_masks(case):
    if case.variant in ("causal-tensor", "keypad"):
        return "takes no mask tensor in this benchmark"
    return None


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, name)


# The CPU table's peers, and the memory probes' (memprobe.py --peer NAME).
CPU_TABLE_PEERS = [
    Peer("attnfast", "attnfast.attention(backend='cpu'): the fused C++ kernel", _attnfast("cpu")),
    Peer("sdpa", "torch.nn.functional.scaled_dot_product_attention", _sdpa),
    Peer("naive", "attnfast.reference.attention_ref(upcast=False): matmul, softmax, matmul in the input dtype",
         _naive),
]
PROBE_PEERS = {p.name: p for p in CPU_TABLE_PEERS}


def sweep_peers(device: str) -> Tuple[List[Peer], Dict[str, str]]:
    """The sweep's (peers that can run here, {peer: why not} for those that cannot)."""
    import attnfast

    peers, missing = [], {}
    status = attnfast.backends()
    for backend in (("cpu",) if device == "cpu" else ("triton", "cuda")):
        st = status[backend]
        name = f"attnfast-{backend}"
        if st.available:
            peers.append(Peer(name, f"attnfast, backend={backend!r}", _attnfast(backend)))
        else:
            missing[name] = st.reason
    peers.append(Peer("sdpa", "torch SDPA, torch's choice of backend", _sdpa))
    forced = ([("math", "MATH"), ("flash", "FLASH_ATTENTION")] if device == "cpu" else
              [("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"),
               ("math", "MATH")])
    for short, be in forced:
        peers.append(Peer(f"sdpa-{short}", f"torch SDPA forced to {be}", _sdpa,
                          sdpa_backends=(_sdpa_backend(be),)))
    peers.append(Peer("naive", "attnfast.reference.attention_ref(upcast=False): matmul, softmax, matmul", _naive))
    for mod, name, fn, refuses in (("flash_attn", "flash-attn", _flash_attn, _no_tensor_masks),
                                   ("xformers", "xformers", _xformers,
                                    lambda c: _no_tensor_masks(c) or ("window: not expressed" if c.variant == "window" else None))):
        if device != "cuda":
            missing[name] = "CUDA only"
        elif importlib.util.find_spec(mod) is None:
            missing[name] = f"{mod} is not installed"
        else:
            peers.append(Peer(name, mod, fn, refuses))
    return peers, missing


def gpu_table_peers():
    """The GPU table's (peers, notes): the peers this machine can run, and why any is left out."""
    import attnfast

    peers = [Peer("attnfast-triton", "attnfast.attention(backend='triton')", _attnfast("triton"))]
    notes = []
    st = attnfast.backends()["cuda"]
    if st.available:
        peers.append(Peer("attnfast-cuda", "attnfast.attention(backend='cuda')", _attnfast("cuda")))
    else:
        notes.append(f"attnfast-cuda left out: the cuda backend is not available ({st.reason})")
    peers.append(Peer("sdpa-default", "torch SDPA, no backend forced", _sdpa))
    for short, name in (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
                        ("cudnn", "CUDNN_ATTENTION")):
        peers.append(Peer(f"sdpa-{short}", f"torch SDPA under sdpa_kernel(SDPBackend.{name})", _sdpa,
                          sdpa_backends=(_sdpa_backend(name),)))
    return peers, notes


def interpret_peers():
    return [Peer("attnfast-triton", "attnfast.attention(backend='triton'), TRITON_INTERPRET=1 on CPU tensors",
                 _attnfast("triton"))], []


# ---------------------------------------------------------------------------
# Timing (shared by the sweep and the GPU table; the CPU table times its own calls, below)
# ---------------------------------------------------------------------------
def timed_call(call, q, k, v, mode, g=None):
    """What a timing loop runs for `mode`, given call() -> out: the forward (under no_grad); the
    backward alone, of one stored forward (a random output gradient); the forward+backward
    (torch.autograd.grad with the output gradient g, or ones when g is None)."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return call()
        return run
    if mode == "bwd":
        out = call()
        go = torch.randn_like(out)

        def run():
            return torch.autograd.grad(out, (q, k, v), go, retain_graph=True)
        return run

    def run():
        out = call()
        return torch.autograd.grad(out, (q, k, v), torch.ones_like(out) if g is None else g)
    return run


def _stats(seconds):
    ms = sorted(s * 1e3 for s in seconds)
    return dict(median_ms=statistics.median(ms), min_ms=ms[0], max_ms=ms[-1], n=len(ms))


def _do_bench(run, **kw):
    from triton.testing import do_bench

    return do_bench(run, **kw)


# ===========================================================================
# 1. The sweep: kernels.md
# ===========================================================================
@dataclass(frozen=True)
class Plan:
    Ls: Tuple[int, ...]              # lengths of the dense and causal cases
    D: int
    variants: Tuple[str, ...]
    modes: Tuple[str, ...]
    extra: Tuple[Tuple[int, int, Tuple[str, ...]], ...] = ()  # (L, D, variants) more cases
    reps: int = 3
    naive_max_L: int = 2048          # naive and sdpa-math materialize the L x L scores: slow, O(L^2) memory
    mem_Ls: Tuple[int, ...] = ()     # forward peak-memory probes (CPU)
    H: int = 8
    other_Ls: Optional[Tuple[int, ...]] = None   # lengths of the other variants (default: Ls)
    grad_max_L: Optional[int] = None             # no backward cases above this length (time)

    def cases(self):
        out = []
        for v in self.variants:
            for mode in self.modes:
                if v != "none" and mode == "bwd":
                    continue  # backward alone: for the dense case only
                Ls = self.Ls if v in ("none", "causal") or self.other_Ls is None else self.other_Ls
                if mode != "fwd" and self.grad_max_L is not None:
                    Ls = [L for L in Ls if L <= self.grad_max_L]
                out += [_case(v, mode, L, self.D, self.H) for L in Ls]
        for L, D, variants in self.extra:
            out += [_case(v, m, L, D, self.H) for v in variants for m in self.modes if m != "bwd"]
        return out


def _case(variant, mode, L, D, H):
    return Case(variant, mode, L, D, H=H, Hkv=H // 4 if variant == "gqa" else None)


# Peers that build the whole L x L score matrix; the plan's naive_max_L bounds their lengths.
SCORE_MATERIALIZING = ("naive", "sdpa-math")

PLANS = {
    "cpu": {
        "smoke": Plan(Ls=(64,), D=32, variants=("none", "keypad"), modes=("fwd", "bwd"), reps=1, H=2),
        "quick": Plan(Ls=(256, 1024), D=64, variants=("none", "causal", "keypad", "gqa"),
                      modes=("fwd", "bwd", "fwdbwd"), reps=3, H=4, naive_max_L=1024, mem_Ls=(1024,)),
        "full": Plan(Ls=(512, 1024, 2048, 4096), D=64,
                     variants=("none", "causal", "causal-tensor", "keypad", "window", "gqa"),
                     modes=("fwd", "bwd", "fwdbwd"), extra=((1024, 128, ("none", "causal")),),
                     reps=3, H=4, naive_max_L=1024, mem_Ls=(1024, 4096), other_Ls=(1024, 2048),
                     grad_max_L=2048),
    },
    "cuda": {
        "smoke": Plan(Ls=(256,), D=64, variants=("none", "keypad"), modes=("fwd", "bwd"), reps=1),
        "quick": Plan(Ls=(1024, 4096), D=128, variants=("none", "causal", "keypad", "gqa"),
                      modes=("fwd", "bwd", "fwdbwd"), H=16, naive_max_L=4096),
        "full": Plan(Ls=(1024, 2048, 4096, 8192, 16384), D=128,
                     variants=("none", "causal", "causal-tensor", "keypad", "window", "gqa"),
                     modes=("fwd", "bwd", "fwdbwd"), extra=((4096, 64, ("none", "causal")),),
                     H=16, naive_max_L=8192),
    },
}


def sweep_case(peers, case, dtype, device, reps, naive_max_L):
    """{peer: row} for one case."""
    rows = {}
    q, k, v, _ = make_case_inputs(case, dtype, device)
    runnable = {}
    for p in peers:
        why = p.refuses(case)
        if p.name in SCORE_MATERIALIZING and case.L > naive_max_L:
            why = f"skipped above L={naive_max_L} (time and O(L^2) memory)"
        if why is None:
            try:
                runnable[p.name] = timed_call(lambda p=p: p.call(q, k, v, case_args(case, q.device)), q, k, v,
                                              case.mode)
                runnable[p.name]()  # refusals surface here (e.g. an SDPA backend that cannot run it)
            except Exception as e:  # noqa: BLE001 - the peer's own refusal is the result
                runnable.pop(p.name, None)
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        if why is not None:
            rows[p.name] = dict(skipped=why)
    if device == "cuda":
        for name, run in runnable.items():
            qs = _do_bench(run, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
            rows[name] = dict(median_ms=qs[1], q20_ms=qs[0], q80_ms=qs[2])
    else:
        times = time_interleaved({n: Call(r) for n, r in runnable.items()}, reps=reps, warmup=0)
        rows.update({n: _stats(t) for n, t in times.items()})
    for name, r in rows.items():
        if "median_ms" in r:
            r["tflops"] = case.flops() / (r["median_ms"] * 1e-3) / 1e12
    return rows


def _cuda_peak_mib(peer, case, dtype):
    q, k, v, _ = make_case_inputs(case, dtype, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        peer.call(q, k, v, case_args(case, q.device))
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_sweep(ctx):
    """Run the sweep on ctx.device in ctx.dtype and plan ctx.plan; write kernels.{json,md} and the
    plots into ctx.out; return the JSON-able result."""
    device, dtype = ctx.device, ctx.dtype
    plan = PLANS[device][ctx.plan]
    tdtype = DTYPES[dtype]
    peers, missing = sweep_peers(device)
    results = []
    cases = plan.cases()
    it = progress(cases, desc=f"kernels {device} {DTYPE_SHORT[dtype]}") if ctx.progress else cases
    for case in it:
        rows = sweep_case(peers, case, tdtype, device, plan.reps, plan.naive_max_L)
        results.append(dict(case=asdict(case), flops=case.flops(), peers=rows))
    memory = []
    if device == "cpu" and plan.mem_Ls:
        probes = [dict(peer=p, dtype=dtype, L=L, mode="fwd", B=1, H=plan.H, D=plan.D)
                  for L in plan.mem_Ls for p in ("attnfast", "sdpa", "naive")]
        memory = run_memprobes(probes, threads=ctx.threads)
    elif device == "cuda":
        for L in plan.Ls:
            case = _case("none", "fwd", L, plan.D, plan.H)
            for p in peers:
                if p.name in SCORE_MATERIALIZING and L > plan.naive_max_L:
                    continue
                try:
                    memory.append(dict(peer=p.name, L=L, D=plan.D, peak_mib=_cuda_peak_mib(p, case, tdtype)))
                except Exception as e:  # noqa: BLE001
                    memory.append(dict(peer=p.name, L=L, D=plan.D, peak_mib=None, error=str(e)[:120]))
    payload = dict(device=device, dtype=dtype, mode=ctx.plan, plan=asdict(plan), window=WINDOW,
                   peers={p.name: p.label for p in peers}, unavailable=missing, results=results,
                   memory=memory, flop_note=SWEEP_FLOP_NOTE)
    write_sweep(payload, ctx.out)
    return payload


def _ours(payload):
    return "attnfast-cpu" if payload["device"] == "cpu" else "attnfast-triton"


def sweep_markdown(payload):
    ours = _ours(payload)
    names = [n for n in payload["peers"]]
    lines = [f"### Kernels: {payload['device']}, {payload['dtype']} ({payload['mode']} plan)", "",
             "Median ms per call (speedup = peer time / " + ours + " time; > 1: " + ours + " faster).", ""]
    header = ["variant", "mode", "L", "D", "H"] + names + [f"speedup vs {n}" for n in names if n != ours]
    rows = []
    for r in payload["results"]:
        c, pr = r["case"], r["peers"]
        base = pr.get(ours, {}).get("median_ms")
        cells = [c["variant"], MODES[c["mode"]], c["L"], c["D"],
                 f"{c['H']}" + (f"/{c['Hkv']}" if c["Hkv"] else "")]
        cells += [fmt_num(pr[n]["median_ms"]) if "median_ms" in pr.get(n, {}) else "n/a" for n in names]
        for n in names:
            if n == ours:
                continue
            t = pr.get(n, {}).get("median_ms")
            cells.append(f"{t / base:.2f}x" if (t and base) else "-")
        rows.append(cells)
    lines.append(md_table(header, rows))
    lines += ["", "TFLOP/s of " + ours + " and torch SDPA:", ""]
    trows = [[r["case"]["variant"], MODES[r["case"]["mode"]], r["case"]["L"], r["case"]["D"]] +
             [fmt_num(r["peers"].get(n, {}).get("tflops")) for n in (ours, "sdpa")] for r in payload["results"]]
    lines.append(md_table(["variant", "mode", "L", "D", ours, "sdpa"], trows))
    if payload["memory"]:
        lines += ["", "Peak memory of one forward (MiB):", ""]
        mrows = [[m["peer"], m["L"], fmt_num(m.get("peak_mib"))] for m in payload["memory"]]
        lines.append(md_table(["peer", "L", "peak MiB"], mrows))
    skipped = sorted({(n, v["skipped"]) for r in payload["results"] for n, v in r["peers"].items() if "skipped" in v})
    if skipped or payload["unavailable"]:
        lines += ["", "Not measured:"]
        lines += [f"- {n}: {why}" for n, why in payload["unavailable"].items()]
        lines += [f"- {n} (some cases): {why}" for n, why in skipped]
    lines += ["", "Peers: " + "; ".join(f"`{n}` = {label}" for n, label in payload["peers"].items()),
              "", "TFLOP/s = " + payload["flop_note"] + "."]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sweep_plot(payload, out):
    """kernels_time.png (median ms vs L, log-log) and kernels_tflops.png, forward, per variant."""
    plt = _pyplot()
    variants = sorted({r["case"]["variant"] for r in payload["results"]})
    D0 = payload["plan"]["D"]
    files = []
    for metric, fname, ylabel in (("median_ms", "kernels_time.png", "median ms (forward)"),
                                  ("tflops", "kernels_tflops.png", "TFLOP/s (forward)")):
        ncol = min(3, len(variants))
        nrow = -(-len(variants) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
        for ax in axes.flat[len(variants):]:
            ax.set_visible(False)
        for ax, variant in zip(axes.flat, variants):
            rs = [r for r in payload["results"] if r["case"]["variant"] == variant and r["case"]["mode"] == "fwd"
                  and r["case"]["D"] == D0]
            for name in payload["peers"]:
                pts = [(r["case"]["L"], r["peers"][name][metric]) for r in rs
                       if metric in r["peers"].get(name, {})]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_xscale("log", base=2)
            if metric == "median_ms":
                ax.set_yscale("log")
            ax.set_title(variant)
            ax.set_xlabel("L")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{payload['device']} {payload['dtype']}, D={D0}")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(fname)
    return files


def write_sweep(payload, out):
    import json

    out.mkdir(parents=True, exist_ok=True)
    payload["plots"] = sweep_plot(payload, out)
    (out / "kernels.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (out / "kernels.md").write_text(sweep_markdown(payload))


def run(ctx) -> bool:
    """Suite `kernels`: the sweep on the chosen device."""
    payload = run_sweep(ctx)
    ctx.stamp("kernels.json")
    print(sweep_markdown(payload))
    return True


# ===========================================================================
# 2. The CPU table: cpu_kernels.md
# ===========================================================================
CPU_FLOP_NOTE = ("GFLOP/s = FLOPs / median time, FLOPs: forward = 4*B*H*Lq*Lk*D (halved when causal), "
                 "backward = 2.5x forward, fwd+bwd = 3.5x forward")
SPEEDUP_NOTE = "speedup = SDPA ms / attnfast ms (> 1: attnfast is faster)"


@dataclass(frozen=True)
class SkipRule:
    """Leave `peer` out for `dtype`, L >= from_L, these modes (causal and not)."""
    peer: str
    dtype: str
    from_L: int
    modes: Tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class CpuPlan:
    B: int
    H: int
    D: int
    sizes: Dict[str, Tuple[int, ...]]          # dtype -> sequence lengths
    causal: Tuple[bool, ...] = (False, True)
    modes: Tuple[str, ...] = ("fwd", "fwdbwd")
    warmup: int = 1                             # untimed rounds per shape, for L < nowarm_from ...
    nowarm_from: Optional[int] = None           # (the first L of each dtype/causal/mode always gets one;
                                                #  after it the code path is warm)
    reps: int = 3                               # timed rounds, for L < large_from ...
    large_from: Optional[int] = None
    large_reps: int = 3                         # ... and for L >= large_from
    skip: Tuple[SkipRule, ...] = ()
    mem_L: Tuple[int, ...] = ()                 # per-peer forward probes (float32, non-causal)
    mem_peers: Optional[Tuple[str, ...]] = None #   ... of these peers (None: all)
    mem_long: Optional[Tuple[int, Tuple[str, ...]]] = None   # (L, peers): the long-sequence comparison
    mem_jobs: int = 1                           # concurrent probes (>1 only where cores are idle)

    def rounds(self, L, first):
        warm = self.warmup if self.nowarm_from is None or L < self.nowarm_from else 0
        reps = self.large_reps if self.large_from is not None and L >= self.large_from else self.reps
        return (max(warm, 1) if first else warm), reps

    def skip_reason(self, peer, dtype, L, mode):
        for r in self.skip:
            if (r.peer, r.dtype) == (peer, dtype) and L >= r.from_L and mode in r.modes:
                return r.reason
        return None


CPU_FULL = CpuPlan(
    B=1, H=8, D=64,
    sizes={"float32": (512, 1024, 2048, 4096), "bfloat16": (512, 1024)},
    warmup=1, nowarm_from=1024, reps=3, large_from=2048, large_reps=2,   # keeps the run near 3 min
    skip=(   # the naive reference is O(L^2) in memory and slow on CPU; these keep the run near 3 min
        SkipRule("naive", "float32", 4096, ("fwd",), "time budget: ~5 s per call"),
        SkipRule("naive", "float32", 2048, ("fwdbwd",), "time budget: ~3 s per call at L=2048, ~14 s at 4096"),
        SkipRule("naive", "bfloat16", 1024, ("fwd", "fwdbwd"),
                 "time budget: CPU bf16 matmul, ~1.2 s per forward, ~2.7 s per fwd+bwd call at L=1024"),
    ),
    mem_L=(4096,), mem_long=(8192, ("attnfast", "naive")), mem_jobs=1,
)

CPU_QUICK = CpuPlan(                             # smoke test: every code path, tiny and few
    B=1, H=4, D=64,
    sizes={"float32": (128, 256), "bfloat16": (128,)},
    warmup=1, reps=2,
    mem_L=(512,), mem_peers=("naive",),         # one probe: a subprocess costs ~3-5 s here
)


def _cpu_table_calls(peers, dtype, plan, L, causal, mode):
    """Forward: out = f(q, k, v); fwd+bwd: f(q, k, v).backward(g), the grads set to None (untimed) before."""
    case = Case("causal" if causal else "none", mode, L, plan.D, B=plan.B, H=plan.H)
    q, k, v, g = make_case_inputs(case, DTYPES[dtype], "cpu", grad_output=True)
    args = dict(is_causal=causal)
    calls = {}
    for p in peers:
        if mode == "fwdbwd":
            def run(p=p):
                p.call(q, k, v, args).backward(g)

            def prepare():
                q.grad = k.grad = v.grad = None
        else:
            def run(p=p):
                p.call(q, k, v, args)

            prepare = None
        calls[p.name] = Call(run, prepare)
    return calls, case.flops()


def cpu_table_measure(plan, peers, show_progress=True):
    """Timing records and the list of skipped (peer, shape) with reasons."""
    records, skipped = [], []
    configs = [(dt, c, m) for dt in plan.sizes for c in plan.causal for m in plan.modes]
    shapes = [(dt, c, m, L, i == 0) for dt, c, m in configs for i, L in enumerate(plan.sizes[dt])]
    for dtype, causal, mode, L, first in (progress(shapes, desc="cpu kernels", unit="shape") if show_progress
                                          else shapes):
        active = []
        for p in peers:
            why = plan.skip_reason(p.name, dtype, L, mode)
            if why:
                skipped.append(dict(peer=p.name, dtype=dtype, L=L, causal=causal, mode=mode, reason=why))
            else:
                active.append(p)
        warmup, reps = plan.rounds(L, first)
        calls, flops = _cpu_table_calls(active, dtype, plan, L, causal, mode)
        with torch.inference_mode(mode == "fwd"):
            times = time_interleaved(calls, reps=reps, warmup=warmup)
        for name, ts in times.items():
            ms = median_ms(ts)
            records.append(dict(peer=name, dtype=dtype, B=plan.B, H=plan.H, Lq=L, Lk=L, D=plan.D,
                                causal=causal, mode=mode, warmup=warmup, reps=len(ts),
                                times_ms=[round(t * 1e3, 3) for t in ts], median_ms=round(ms, 3),
                                gflops=round(flops / (ms * 1e-3) / 1e9, 3), flops=flops, peak_mib=None))
    return records, skipped


def cpu_table_memory(plan, peers, threads):
    probes = [dict(peer=p.name, dtype="float32", L=L, B=plan.B, H=plan.H, D=plan.D)
              for L in plan.mem_L for p in peers if plan.mem_peers is None or p.name in plan.mem_peers]
    if plan.mem_long is not None:
        L, names = plan.mem_long
        probes += [dict(peer=n, dtype="float32", L=L, B=plan.B, H=plan.H, D=plan.D)
                   for n in names if n in {p.name for p in peers}]
    order = {p.name: i for i, p in enumerate(peers)}
    probes.sort(key=lambda p: (-p["L"], order[p["peer"]]))   # longest first: the pool finishes together
    mem = run_memprobes(probes, threads=threads, jobs=plan.mem_jobs)
    return sorted(mem, key=lambda m: (m["L"], order[m["peer"]]))


def cpu_kernel_table(records, peer_names):
    by = {}
    for r in records:
        by.setdefault((r["dtype"], r["causal"], r["mode"], r["Lq"]), {})[r["peer"]] = r
    header = (["dtype", "causal", "mode", "L"] + [f"{n} ms" for n in peer_names]
              + [f"{n} GFLOP/s" for n in peer_names] + ["speedup vs SDPA"])
    rows = []
    for (dtype, causal, mode, L), cell in by.items():
        ms = [fmt_num(cell[n]["median_ms"]) if n in cell else "skip" for n in peer_names]
        gf = [fmt_num(cell[n]["gflops"]) if n in cell else "skip" for n in peer_names]
        sp = (f"{cell['sdpa']['median_ms'] / cell['attnfast']['median_ms']:.2f}x"
              if "sdpa" in cell and "attnfast" in cell else "-")
        rows.append([DTYPE_SHORT[dtype], "yes" if causal else "no", MODES[mode], L] + ms + gf + [sp])
    return md_table(header, rows, align=["l", "l", "l"] + ["r"] * (len(header) - 3))


def cpu_memory_table(mem):
    rows = []
    for m in mem:
        peak = "error: " + m.get("error", "?") if m.get("peak_mib") is None else fmt_num(m["peak_mib"])
        rows.append([m["peer"], DTYPE_SHORT[m["dtype"]], f"B{m['B']} H{m['H']} D{m['D']}", m["L"],
                     "yes" if m["causal"] else "no", MODES[m["mode"]], peak])
    return md_table(["peer", "dtype", "shape", "L", "causal", "mode", "peak MiB (RSS increase)"], rows,
                    align=["l", "l", "l", "r", "l", "l", "r"])


def cpu_long_line(plan, mem):
    if plan.mem_long is None:
        return None
    L, names = plan.mem_long
    got = {m["peer"]: m.get("peak_mib") for m in mem if m["L"] == L}
    if not all(got.get(n) is not None for n in names):
        return f"L={L}: memory probe failed for " + ", ".join(n for n in names if got.get(n) is None)
    parts = [f"{n} {fmt_num(got[n])} MiB" for n in names]
    line = f"peak memory at L={L}, fp32 forward, B{plan.B} H{plan.H} D{plan.D}: " + " vs ".join(parts)
    if len(names) == 2 and got[names[0]] > 0:
        line += f" ({names[1]}/{names[0]} = {got[names[1]] / got[names[0]]:.0f}x)"
    return line


def cpu_skipped_lines(skipped):
    groups = {}
    for s in skipped:
        g = groups.setdefault((s["peer"], s["dtype"], s["reason"]), (set(), {}))
        g[0].add(s["L"])
        g[1][MODES[s["mode"]]] = None
    return [f"skipped {peer} {DTYPE_SHORT[dtype]} {' and '.join(modes)} at L={','.join(map(str, sorted(Ls)))} "
            f"(causal and not): {why}" for (peer, dtype, why), (Ls, modes) in groups.items()]


def cpu_conditions(ctx, plan, peers):
    m = ctx.machine
    return [
        f"machine: {m['cpu_model']}, {m['logical_cpus']} logical cpus, {m['threads']} torch threads; "
        f"torch {m['torch']}, attnfast {m['attnfast']} (git {m['git']}, ISA path {m['cpu_isa']}); {m['timestamp']}",
        f"shapes: B={plan.B}, H={plan.H}, D={plan.D}, Lq=Lk=L; inputs N(0,1), contiguous (B, H, L, D)",
        f"timing: peers interleaved per shape (A B C A B C ...); median of {plan.reps} timed rounds"
        + (f" ({plan.large_reps} for L >= {plan.large_from})" if plan.large_from else "")
        + f" after {plan.warmup} untimed warm-up round"
        + (f" (none for L >= {plan.nowarm_from}: the smaller L run just before warmed the code path)"
           if plan.nowarm_from else "")
        + "; forward under torch.inference_mode; fwd+bwd: out = f(q, k, v); out.backward(g), with the "
          "grads set to None (untimed) between calls",
        CPU_FLOP_NOTE,
        SPEEDUP_NOTE,
        "peers: " + "; ".join(f"{p.name} = {p.label}" for p in peers),
        "peak memory: fresh subprocess per probe (bench/memprobe.py): increase of the peak RSS (VmHWM, reset "
        "via /proc/self/clear_refs; ru_maxrss would carry the parent's size) over the baseline taken after "
        "the inputs exist and one tiny L=16 call warmed the code path; includes the output",
    ]


def cpu_plot(path, records, plan, title):
    plt = _pyplot()
    panels = [(dt, c) for dt in plan.sizes for c in plan.causal]
    fig, axes = plt.subplots(len(panels), len(plan.modes), figsize=(5.2 * len(plan.modes), 3.2 * len(panels)),
                             squeeze=False)
    markers = itertools.cycle("osd^v<>")
    style = {}
    for (dtype, causal), row in zip(panels, axes):
        for mode, ax in zip(plan.modes, row):
            for peer in dict.fromkeys(r["peer"] for r in records):
                pts = sorted((r["Lq"], r["gflops"]) for r in records
                             if (r["peer"], r["dtype"], r["causal"], r["mode"]) == (peer, dtype, causal, mode))
                if not pts:
                    continue
                if peer not in style:
                    style[peer] = next(markers)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=style[peer], label=peer)
            ax.set_xscale("log", base=2)
            ax.set_xticks(plan.sizes[dtype])
            ax.set_xticklabels([str(L) for L in plan.sizes[dtype]])
            ax.set_title(f"{DTYPE_SHORT[dtype]}, {'causal' if causal else 'non-causal'}, {MODES[mode]}",
                         fontsize=10)
            ax.set_xlabel("L (Lq = Lk)")
            ax.set_ylabel("GFLOP/s")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.003, "missing points: skipped (see cpu_kernels.md).  " + CPU_FLOP_NOTE, ha="center",
             va="bottom", fontsize=6.5)
    fig.tight_layout(rect=(0, 0.015, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_cpu_table(ctx):
    """Suite `cpu_kernels`: the CPU table."""
    import attnfast

    plan = CPU_QUICK if ctx.quick else CPU_FULL
    st = attnfast.backends()["cpu"]
    if not st.available:
        print(f"peer attnfast unavailable: {st.reason}")
    peers = [p for p in CPU_TABLE_PEERS if p.name != "attnfast" or st.available]
    names = [p.name for p in peers]
    t0 = time.perf_counter()
    records, skipped = cpu_table_measure(plan, peers, ctx.progress)
    t1 = time.perf_counter()
    mem = cpu_table_memory(plan, peers, ctx.threads)
    t2 = time.perf_counter()
    for probe in mem:                               # attach probes to their table rows
        for r in records:
            if (r["peer"], r["dtype"], r["Lq"], r["causal"], r["mode"]) == \
                    (probe["peer"], probe["dtype"], probe["L"], probe["causal"], probe["mode"]):
                r["peak_mib"] = probe.get("peak_mib")

    cond = cpu_conditions(ctx, plan, peers)
    table = cpu_kernel_table(records, names)
    mtable = cpu_memory_table(mem)
    longl = cpu_long_line(plan, mem)
    skips = cpu_skipped_lines(skipped)
    print("\n".join(cond[1:]))                      # cond[0], the machine, is in the run's header
    print()
    print(table)
    for s in skips:
        print(s)
    print()
    print(mtable)
    if longl:
        print(longl)

    ctx.write_json("cpu_kernels.json", dict(
        machine=ctx.machine, quick=ctx.quick, seed=ctx.seed, conditions=cond, plan=dict(
            B=plan.B, H=plan.H, D=plan.D, sizes=plan.sizes, causal=plan.causal, modes=plan.modes),
        records=records, memory=mem, skipped=skipped))
    md = ["# CPU attention kernels", "", *[f"- {c}" for c in cond], "", "## Time and throughput", "", table, ""]
    md += [f"- {s}" for s in skips] + ["", "## Peak memory", "", mtable, ""]
    if longl:
        md += [longl, ""]
    ctx.write_text("cpu_kernels.md", "\n".join(md))
    m = ctx.machine
    cpu_plot(ctx.out / "cpu_kernels.png", records, plan,
             f"attention on CPU: {m['cpu_model']}, {m['threads']} threads, torch {m['torch']}, "
             f"B={plan.B} H={plan.H} D={plan.D}")
    procs = f"{len(mem)} subprocess" + ("es" if len(mem) != 1 else "")
    print(f"timing {t1 - t0:.0f} s, memory probes {t2 - t1:.0f} s ({procs}); "
          "wrote cpu_kernels.json, cpu_kernels.md, cpu_kernels.png")
    ok = all(probe.get("peak_mib") is not None for probe in mem)
    if not ok:
        print("a memory probe failed")
    return ok


# ===========================================================================
# 3. The GPU table: gpu_kernels.md
# ===========================================================================
ENV_SECONDS = "ATTNFAST_GPU_BENCH_SECONDS"
DEFAULT_SECONDS = 330.0
TOKENS, HIDDEN = 16384, 2048          # B * L and H * D (FlashAttention benchmark convention)
CHECK_TOL = 0.05                      # max |attnfast - SDPA| on a forward output; more = broken kernel
DO_BENCH = dict(warmup=20, rep=80)    # ms of warm-up and of timed calls per peer and case

GPU_FLOP_NOTE = ("TFLOP/s = FLOPs / median time; FLOPs: forward 4*B*H*Lq*Lk*D (halved when causal; the key-padding "
                 "mask does not change the count), fwd+bwd 3.5x forward")
RATIO_NOTE = ("ratio = t_SDPA / t_attnfast-triton, i.e. attnfast-triton TFLOP/s over the SDPA peer's "
              "(> 1: attnfast faster)")
GPU_VARIANT = {"none": "full", "causal": "causal", "keypad": "keypad mask"}   # the table's names
VARIANT_ORDER = {"full": 0, "causal": 1, "keypad mask": 2}


def gpu_case_id(dtype, case):
    return f"{DTYPE_SHORT[dtype]} D{case.D} {GPU_VARIANT[case.variant]} {case.mode} L{case.L} B{case.B}H{case.H}"


def fa_case(dtype, D, mode, causal, L, mask=False):
    """(dtype, case) of the FlashAttention convention: B = TOKENS / L, H = HIDDEN / D."""
    return dtype, Case("keypad" if mask else "causal" if causal else "none", mode, L, D, B=TOKENS // L,
                       H=HIDDEN // D)


def full_gpu_cases():
    """Every GPU case, most important first (a deadline cuts from the end)."""
    long_L, short_L, mask_L = (4096, 8192, 16384), (1024, 2048), (1024, 2048, 4096)
    out = []
    # The headline first (bf16, D 128 and 64), then float16: the deadline cuts the end.
    for dtype, D in (("bfloat16", 128), ("bfloat16", 64), ("float16", 128), ("float16", 64)):
        for Ls in (long_L, short_L):
            for mode in ("fwd", "fwdbwd"):
                for causal in (False, True):
                    out += [fa_case(dtype, D, mode, causal, L) for L in Ls]
            if Ls == long_L:
                for mode in ("fwd", "fwdbwd"):
                    out += [fa_case(dtype, D, mode, False, L, mask=True) for L in mask_L]
    return out


def quick_gpu_cases():
    return [fa_case("bfloat16", 128, "fwd", False, 1024), fa_case("bfloat16", 128, "fwd", False, 4096),
            fa_case("bfloat16", 128, "fwd", True, 4096), fa_case("bfloat16", 128, "fwdbwd", False, 4096),
            fa_case("bfloat16", 128, "fwd", False, 1024, mask=True)]


def interpret_cases():
    """Tiny CPU cases for TRITON_INTERPRET=1 (the interpreter is slow)."""
    return [("bfloat16", Case("none", "fwd", 64, 32, B=1, H=2)),
            ("bfloat16", Case("causal", "fwdbwd", 64, 32, B=1, H=2))]


def gpu_case_inputs(dtype, case, device):
    """q, k, v, g (fwd+bwd) and the attention keywords: the key-padding mask a bool (B, 1, 1, L)
    tensor, the first L/2 keys kept, built once per case."""
    q, k, v, g = make_case_inputs(case, DTYPES[dtype], device, grad_output=True)
    mask = None
    if case.variant == "keypad":
        mask = torch.zeros(case.B, 1, 1, case.L, dtype=torch.bool, device=device)
        mask[..., : case.L // 2] = True
    return q, k, v, g, dict(attn_mask=mask, is_causal=case.variant == "causal")


def _short(text, n=300):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _reason(err, caught):
    msgs = []
    for w in caught:
        m = _short(w.message, 200)
        if m not in msgs:
            msgs.append(m)
    head = f"{type(err).__name__}: {_short(str(err).splitlines()[0] if str(err) else '', 200)}"
    return _short(head + ("; warnings: " + " | ".join(msgs) if msgs else ""), 600)


def _time_cpu_ms(fn, reps=3):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def gpu_measure(peer, dtype, case, inputs, on_gpu):
    """Record of one peer on one case: probe call (errors -> n/a), then median ms."""
    q, k, v, g, args = inputs
    variant = GPU_VARIANT[case.variant]
    rec = dict(case=gpu_case_id(dtype, case), peer=peer.name, dtype=dtype, D=case.D, mode=case.mode,
               causal=case.variant == "causal", mask=case.variant == "keypad", L=case.L, B=case.B, H=case.H,
               variant=variant, flops=case.flops(), status="ok", ms=None, tflops=None, reason=None, out=None)
    call = timed_call(lambda: peer.fn(q, k, v, args), q, k, v, case.mode, g)   # (no .grad accumulation)
    with peer.context():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                first = call()
                if on_gpu:
                    torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001  (a peer refusing an input is a result, not a crash)
                rec.update(status="n/a", reason=_reason(e, caught))
                if on_gpu and isinstance(e, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                return rec
        if case.mode == "fwd":
            rec["out"] = first
        del first
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ms = _do_bench(call, return_mode="median", **DO_BENCH) if on_gpu else _time_cpu_ms(call)
            except Exception as e:  # noqa: BLE001
                rec.update(status="n/a", reason=_reason(e, []), out=None)
                return rec
    rec.update(ms=ms, tflops=case.flops() / (ms * 1e-3) / 1e12)
    return rec


def check_outputs(recs):
    """Max |attnfast - reference peer| per attnfast record of a forward case (the outputs are then dropped)."""
    ref = next((r for r in recs if r["peer"].startswith("sdpa") and r["out"] is not None), None)
    for r in recs:
        if r["out"] is not None and ref is not None and r["peer"].startswith("attnfast"):
            d = (r["out"].float() - ref["out"].float()).abs().max().item()
            r.update(check_vs=ref["peer"], max_abs_diff=d, check_ok=bool(d <= CHECK_TOL))
    for r in recs:
        r.pop("out", None)


def check_outputs_cpu(recs, inputs):
    """Interpreter mode: compare with torch SDPA on the same CPU tensors (untimed)."""
    q, k, v, _, args = inputs
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q, k, v, **args)
    for r in recs:
        if r.get("out") is not None:
            d = (r["out"].float() - ref.float()).abs().max().item()
            r.update(check_vs="torch SDPA (cpu)", max_abs_diff=d, check_ok=bool(d <= CHECK_TOL))
        r.pop("out", None)


def _driver_version():
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        return p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def device_info(ctx, on_gpu):
    import attnfast

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = dict(torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
                date=ctx.machine.get("timestamp"), attnfast=ctx.machine.get("attnfast"), git=ctx.machine.get("git"),
                backends={n: dict(available=s.available, reason=s.reason) for n, s in attnfast.backends().items()})
    if on_gpu:
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, sm=f"{p.major}{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    sms=p.multi_processor_count, cudnn=torch.backends.cudnn.version(), driver=_driver_version())
    else:
        info.update(device=f"cpu ({ctx.machine.get('cpu_model')}), Triton interpreter (TRITON_INTERPRET=1)")
    return info


def info_line(info):
    parts = [f"device: {info['device']}"]
    if "sm" in info:
        parts[0] += f" (sm{info['sm']}, {info['sms']} SMs, {info['memory_gib']} GiB)"
        parts.append(f"driver {info['driver']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}")
    parts.append(f"torch {info['torch']}, triton {info['triton']}, attnfast {info['attnfast']} (git {info['git']})")
    parts.append(f"{info['date']}")
    return "; ".join(parts)


def _cell_tf(r):
    if r is None:
        return "-"
    return fmt_num(r["tflops"]) if r["status"] == "ok" else "n/a"


def _ratio(a, b):
    if a is None or b is None or a["status"] != "ok" or b["status"] != "ok":
        return "-"
    return f"{b['ms'] / a['ms']:.2f}"


def gpu_tables(records, peer_names):
    """[(title, markdown table)] per dtype / D / variant / mode, rows by L."""
    by = {}
    for r in records:
        by.setdefault((r["dtype"], r["D"], r["variant"], r["mode"]), {}).setdefault((r["L"], r["B"], r["H"]), {})[
            r["peer"]] = r
    af = [p for p in peer_names if p.startswith("attnfast")]
    sd = [p for p in peer_names if p.startswith("sdpa")]
    out = []
    order = sorted(by, key=lambda k: (DTYPE_SHORT[k[0]] != "bf16", -k[1], VARIANT_ORDER[k[2]], k[3] != "fwd"))
    for key in order:
        dtype, D, variant, mode = key
        header = ["L", "B x H"]
        for p in af:
            header += [f"{p} ms", f"{p} TFLOP/s"]
        header += [f"{p} TFLOP/s" for p in sd]
        ratio_peers = [p for p in ("sdpa-default", "sdpa-flash") if p in sd]
        header += [f"triton / {p[5:]}" for p in ratio_peers]
        rows = []
        for (L, B, H), recs in sorted(by[key].items()):
            row = [L, f"{B} x {H}"]
            for p in af:
                r = recs.get(p)
                ok = r is not None and r["status"] == "ok"
                row += [fmt_num(r["ms"]) if ok else ("n/a" if r else "-"), _cell_tf(r)]
            row += [_cell_tf(recs.get(p)) for p in sd]
            row += [_ratio(recs.get("attnfast-triton"), recs.get(p)) for p in ratio_peers]
            rows.append(row)
        title = f"{DTYPE_SHORT[dtype]}, D={D}, {variant}, {MODES[mode]}"
        out.append((title, md_table(header, rows)))
    return out


def na_notes(records):
    """One line per (peer, reason) of the n/a records, with the cases it hit."""
    seen = {}
    for r in records:
        if r["status"] != "ok":
            seen.setdefault((r["peer"], r["reason"]), []).append(r["case"])
    lines = []
    for (peer, reason), cases in seen.items():
        where = ", ".join(cases[:3]) + (f" and {len(cases) - 3} more" if len(cases) > 3 else "")
        lines.append(f"{peer} n/a ({len(cases)} case(s): {where}): {reason}")
    return lines


def check_notes(records):
    bad = [r for r in records if r.get("check_ok") is False]
    checked = [r for r in records if "check_ok" in r]
    if not checked:
        return []
    worst = max(r["max_abs_diff"] for r in checked)
    line = (f"output check (forward cases, untimed): max |attnfast - {checked[0]['check_vs']}| over "
            f"{len(checked)} record(s) = {worst:.3g} (tolerance {CHECK_TOL})")
    return [line] + [f"OUTPUT MISMATCH: {r['peer']} {r['case']}: max abs diff {r['max_abs_diff']:.3g}"
                     for r in bad]


def skipped_notes(skipped, deadline):
    if not skipped:
        return []
    names = ", ".join(skipped[:6]) + (f" ... ({len(skipped) - 6} more)" if len(skipped) > 6 else "")
    return [f"TIME GUARD: the {deadline:.0f} s deadline ({ENV_SECONDS}) passed; skipped the remaining "
            f"{len(skipped)} case(s): {names}"]


def deadline_seconds():
    raw = os.environ.get(ENV_SECONDS)
    if not raw:
        return DEFAULT_SECONDS
    try:
        return float(raw)
    except ValueError:
        print(f"ignoring {ENV_SECONDS}={raw!r} (not a number); deadline {DEFAULT_SECONDS:.0f} s")
        return DEFAULT_SECONDS


def run_gpu_table(ctx):
    """Suite `gpu_kernels`: the GPU table (or its interpreter smoke test)."""
    import attnfast

    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpret and ctx.quick:
        on_gpu = False                  # the interpreter smoke test: CPU tensors, even where a GPU is
    elif not torch.cuda.is_available():
        print("gpu_kernels needs a CUDA GPU (torch.cuda.is_available() is False): nothing to do "
              "(`--quick` with TRITON_INTERPRET=1 runs a tiny CPU smoke test of this suite instead)")
        return True
    elif interpret:
        print("TRITON_INTERPRET=1 is set: the Triton kernels would run under the interpreter; unset it to "
              "benchmark (or add --quick for the CPU smoke test)")
        return False
    else:
        on_gpu = True
    st = attnfast.backends()["triton"]
    if not st.available:
        print(f"attnfast triton backend unavailable: {st.reason}")
        return False
    if on_gpu:
        try:
            import triton.testing  # noqa: F401  (do_bench)
        except ImportError as e:
            print(f"triton.testing is needed for the timing: {e}")
            return False

    device = "cuda" if on_gpu else "cpu"
    peers, peer_notes = gpu_table_peers() if on_gpu else interpret_peers()
    cases = (quick_gpu_cases() if ctx.quick else full_gpu_cases()) if on_gpu else interpret_cases()
    deadline = deadline_seconds()
    info = device_info(ctx, on_gpu)
    plan_name = ("quick" if ctx.quick else "full") if on_gpu else "interpreter smoke test (CPU tensors)"
    timing = (f"triton.testing.do_bench(warmup={DO_BENCH['warmup']} ms, rep={DO_BENCH['rep']} ms, "
              "return_mode='median'), L2 cleared before each call" if on_gpu else
              "time.perf_counter, median of 3 calls after one untimed call")
    print(info_line(info))
    print(f"plan: {plan_name}, {len(cases)} case(s) x {len(peers)} peer(s); deadline {deadline:.0f} s "
          f"({ENV_SECONDS}); timing: {timing}")
    for n in peer_notes:
        print(n)
    print(flush=True)

    records: List[dict] = []
    skipped: List[str] = []

    def save_json(wall, partial):
        ctx.write_json("gpu_kernels.json", dict(
            device=info, machine=ctx.machine, quick=ctx.quick, plan=plan_name, partial=partial,
            deadline_s=deadline, wall_s=round(wall, 2), timing=timing,
            peers=[dict(name=p.name, label=p.label) for p in peers], peer_notes=peer_notes, skipped=skipped,
            records=records))

    t0 = time.perf_counter()
    for i, (dtype, case) in enumerate(cases):
        elapsed = time.perf_counter() - t0
        if i > 0 and elapsed > deadline:           # the first case always runs
            skipped = [gpu_case_id(*c) for c in cases[i:]]
            print(f"[{elapsed:6.1f} s] deadline {deadline:.0f} s passed: skipping the remaining {len(skipped)} "
                  "case(s)", flush=True)
            break
        torch.manual_seed(ctx.seed + i)
        inputs = gpu_case_inputs(dtype, case, device)
        recs = [gpu_measure(p, dtype, case, inputs, on_gpu) for p in peers]
        if on_gpu:
            check_outputs(recs)
        else:
            check_outputs_cpu(recs, inputs)
        del inputs
        records += recs
        cells = [f"{r['peer']} " + (f"{r['ms']:.3f} ms {r['tflops']:.1f} TF/s" if r["status"] == "ok" else "n/a")
                 for r in recs]
        print(f"[{time.perf_counter() - t0:6.1f} s] {gpu_case_id(dtype, case)}: " + " | ".join(cells), flush=True)
        save_json(time.perf_counter() - t0, partial=True)     # kept if the run is killed from outside
    wall = time.perf_counter() - t0

    notes = [GPU_FLOP_NOTE, RATIO_NOTE, f"timing: {timing}",
             f"shapes: B*L = {TOKENS} tokens, H*D = {HIDDEN} (FlashAttention benchmark convention); inputs N(0,1), "
             "contiguous (B, H, L, D); keypad mask: bool (B, 1, 1, L), the first L/2 keys kept"
             if on_gpu else "shapes: tiny CPU tensors (interpreter smoke test)",
             *[f"{p.name}: {p.label}" for p in peers], *peer_notes, *na_notes(records), *check_notes(records),
             *skipped_notes(skipped, deadline), f"wall time of the cases: {wall:.0f} s"]
    tbls = gpu_tables(records, [p.name for p in peers])
    md = [f"# GPU kernels: attnfast vs torch SDPA ({plan_name})", "", f"- {info_line(info)}", ""]
    print()
    for title, tbl in tbls:
        print(f"## {title}\n\n{tbl}\n")
        md += [f"## {title}", "", tbl, ""]
    print("\n".join(notes))
    md += [f"- {n}" for n in notes]
    save_json(wall, partial=False)
    ctx.write_text("gpu_kernels.md", "\n".join(md) + "\n")
    print("wrote gpu_kernels.json, gpu_kernels.md")

    triton_recs = [r for r in records if r["peer"] == "attnfast-triton"]
    failed = [r["case"] for r in triton_recs if r["status"] != "ok"]
    mismatch = [r["case"] for r in records if r.get("check_ok") is False]
    if failed:
        print("attnfast-triton failed on: " + ", ".join(failed))
    if mismatch:
        print("attnfast output mismatch on: " + ", ".join(mismatch))
    return bool(triton_recs) and not failed and not mismatch
