"""Kernel sweep on one device: attnfast's backends vs torch SDPA (each backend
torch has there) vs the naive reference vs flash-attn and xformers when they
can be imported; forward, backward and forward+backward; variants: no mask,
causal (flag), causal as a bool tensor, key padding (half the keys), sliding
window, GQA.

Timing: CPU: the peers of a case run interleaved (A B C A B C ...), `reps`
rounds after a warm-up, and the median, min and max are reported.  CUDA:
triton.testing.do_bench per peer (warm-up, L2 flushed, quantiles 0.2/0.5/0.8).
TFLOP/s = FLOPs / median time; FLOPs: forward 4*B*H*Lq*Lk*D, halved for the
causal variants, 4*B*H*D*(visible pairs) for the window, unchanged by the
key-padding mask; backward 2.5x forward, forward+backward 3.5x.  Peak memory:
CPU: peak RSS increase of one forward in a fresh process (bench/memprobe.py),
CUDA: torch.cuda.max_memory_allocated above the inputs.

A peer that cannot express a case (torch SDPA has no window argument: it gets
the band as a bool tensor; flash-attn takes no mask tensor) either gets the
equivalent mask or is listed as n/a with the reason.

Writes kernels.json, kernels.md, kernels_time.png, kernels_tflops.png.
"""
from __future__ import annotations

import importlib.util
import math
import statistics
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .common import DTYPE_SHORT, DTYPES, Call, fmt_num, md_table, progress, run_memprobes, time_interleaved

DESCRIPTION = ("kernel sweep: attnfast backends vs torch SDPA backends vs naive (vs flash-attn/xformers): "
               "fwd, bwd, fwd+bwd, time quantiles, TFLOP/s, peak memory")

MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}
MODE_LABEL = {"fwd": "forward", "bwd": "backward", "fwdbwd": "fwd+bwd"}
WINDOW = 256


# ---------------------------------------------------------------------------
# Cases
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


# ---------------------------------------------------------------------------
# Inputs and the equivalent masks
# ---------------------------------------------------------------------------
def _band(L, device):
    i = torch.arange(L, device=device)
    d = i[None, :] - i[:, None]
    return (d <= 0) & (d >= -WINDOW)


def make_case_inputs(case: Case, dtype, device):
    """q, k, v (B, H, L, D) (k, v with Hkv heads for GQA), with grad when timed backward."""
    g = case.mode != "fwd"
    hkv = case.Hkv or case.H
    q = torch.randn(case.B, case.H, case.L, case.D, dtype=dtype, device=device, requires_grad=g)
    k = torch.randn(case.B, hkv, case.L, case.D, dtype=dtype, device=device, requires_grad=g)
    v = torch.randn(case.B, hkv, case.L, case.D, dtype=dtype, device=device, requires_grad=g)
    return q, k, v


def sdpa_args(case: Case, device):
    """kwargs of F.scaled_dot_product_attention for the variant (masks as tensors)."""
    L = case.L
    if case.variant == "causal":
        return dict(is_causal=True)
    if case.variant == "causal-tensor":
        return dict(attn_mask=torch.ones(L, L, dtype=torch.bool, device=device).tril())
    if case.variant == "keypad":
        keep = torch.arange(L, device=device) < L // 2
        return dict(attn_mask=keep.view(1, 1, 1, L).expand(case.B, 1, 1, L))
    if case.variant == "window":
        return dict(attn_mask=_band(L, device))
    if case.variant == "gqa":
        return dict(enable_gqa=True)
    return {}


# ---------------------------------------------------------------------------
# Peers: fn(q, k, v, case) -> out, and why a peer cannot run a case
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    fn: Callable
    refuses: Callable[[Case], Optional[str]] = lambda case: None


def _attnfast(backend):
    def fn(q, k, v, case):
        import attnfast

        if case.variant == "window":
            return attnfast.attention(q, k, v, window=(WINDOW, 0), backend=backend)
        return attnfast.attention(q, k, v, backend=backend, **sdpa_args(case, q.device))
    return fn


def _sdpa(backends):
    def fn(q, k, v, case):
        ctx = nullcontext()
        if backends is not None:
            from torch.nn.attention import sdpa_kernel
            ctx = sdpa_kernel(backends)
        with ctx:
            return F.scaled_dot_product_attention(q, k, v, **sdpa_args(case, q.device))
    return fn


def _naive(q, k, v, case):
    from attnfast.reference import attention_ref

    if case.variant == "window":
        return attention_ref(q, k, v, window=(WINDOW, 0), upcast=False)[0]
    args = sdpa_args(case, q.device)
    return attention_ref(q, k, v, attn_mask=args.get("attn_mask"), is_causal=args.get("is_causal", False),
                         enable_gqa=args.get("enable_gqa", False), upcast=False)[0]


def _flash_attn(q, k, v, case):
    from flash_attn import flash_attn_func

    window = (WINDOW, 0) if case.variant == "window" else (-1, -1)
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          causal=case.variant == "causal", window_size=window)
    return out.transpose(1, 2)


def _xformers(q, k, v, case):
    import xformers.ops as xops

    bias = xops.LowerTriangularMask() if case.variant == "causal" else None
    if case.variant == "gqa":
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


def _no_tensor_masks(case):
    if case.variant in ("causal-tensor", "keypad"):
        return "takes no mask tensor in this benchmark"
    return None


def peers_for(device: str) -> Tuple[List[Peer], Dict[str, str]]:
    """(peers that can run here, {peer: why not} for those that cannot)."""
    import attnfast
    from torch.nn.attention import SDPBackend

    peers, missing = [], {}
    status = attnfast.backends()
    for backend in (("cpu",) if device == "cpu" else ("triton", "cuda")):
        st = status[backend]
        name = f"attnfast-{backend}"
        if st.available:
            peers.append(Peer(name, f"attnfast, backend={backend!r}", _attnfast(backend)))
        else:
            missing[name] = st.reason
    peers.append(Peer("sdpa", "torch SDPA, torch's choice of backend", _sdpa(None)))
    sdpa_backends = ([("math", SDPBackend.MATH), ("flash", SDPBackend.FLASH_ATTENTION)] if device == "cpu" else
                     [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                      ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)])
    for short, be in sdpa_backends:
        peers.append(Peer(f"sdpa-{short}", f"torch SDPA forced to {be.name}", _sdpa([be])))
    peers.append(Peer("naive", "attnfast.reference.attention_ref(upcast=False): matmul, softmax, matmul",
                      _naive))
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


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------
def _calls(peer, case, q, k, v):
    """(run, prepare) for the mode: forward; backward of a stored forward; both."""
    if case.mode == "fwd":
        def run():
            with torch.no_grad():
                return peer.fn(q, k, v, case)
        return run
    go = None
    if case.mode == "bwd":
        out = peer.fn(q, k, v, case)
        go = torch.randn_like(out)

        def run():
            return torch.autograd.grad(out, (q, k, v), go, retain_graph=True)
        return run

    def run():
        out = peer.fn(q, k, v, case)
        return torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return run


def _stats(seconds):
    ms = sorted(s * 1e3 for s in seconds)
    return dict(median_ms=statistics.median(ms), min_ms=ms[0], max_ms=ms[-1], n=len(ms))


def time_case(peers, case, dtype, device, reps, naive_max_L):
    """{peer: row} for one case."""
    rows = {}
    q, k, v = make_case_inputs(case, dtype, device)
    runnable = {}
    for p in peers:
        why = p.refuses(case)
        if p.name in SCORE_MATERIALIZING and case.L > naive_max_L:
            why = f"skipped above L={naive_max_L} (time and O(L^2) memory)"
        if why is None:
            try:
                runnable[p.name] = _calls(p, case, q, k, v)
                runnable[p.name]()  # refusals surface here (e.g. an SDPA backend that cannot run it)
            except Exception as e:  # noqa: BLE001 - the peer's own refusal is the result
                runnable.pop(p.name, None)
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        if why is not None:
            rows[p.name] = dict(skipped=why)
    if device == "cuda":
        import triton.testing

        for name, run in runnable.items():
            qs = triton.testing.do_bench(run, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
            rows[name] = dict(median_ms=qs[1], q20_ms=qs[0], q80_ms=qs[2])
    else:
        times = time_interleaved({n: Call(r) for n, r in runnable.items()}, reps=reps, warmup=0)
        rows.update({n: _stats(t) for n, t in times.items()})
    for name, r in rows.items():
        if "median_ms" in r:
            r["tflops"] = case.flops() / (r["median_ms"] * 1e-3) / 1e12
    return rows


def _cuda_peak_mib(peer, case, dtype):
    q, k, v = make_case_inputs(case, dtype, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        peer.fn(q, k, v, case)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ---------------------------------------------------------------------------
# Driver, report
# ---------------------------------------------------------------------------
def run_kernels(mode="quick", device="cpu", dtype="float32", out=None, threads=None, progress_bar=True):
    """Run the sweep; returns the JSON-able result (and writes files when `out`)."""
    plan = PLANS[device][mode]
    tdtype = DTYPES[dtype]
    peers, missing = peers_for(device)
    results = []
    cases = plan.cases()
    it = progress(cases, desc=f"kernels {device} {DTYPE_SHORT[dtype]}") if progress_bar else cases
    for case in it:
        rows = time_case(peers, case, tdtype, device, plan.reps, plan.naive_max_L)
        results.append(dict(case=asdict(case), flops=case.flops(), peers=rows))
    memory = []
    if device == "cpu" and plan.mem_Ls:
        probes = [dict(peer=p, dtype=dtype, L=L, mode="fwd", B=1, H=plan.H, D=plan.D)
                  for L in plan.mem_Ls for p in ("attnfast", "sdpa", "naive")]
        memory = run_memprobes(probes, threads=threads)
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
    payload = dict(device=device, dtype=dtype, mode=mode, plan=asdict(plan), window=WINDOW,
                   peers={p.name: p.label for p in peers}, unavailable=missing, results=results,
                   memory=memory, flop_note=" ".join(__doc__.split("TFLOP/s = ")[1].split(".  Peak")[0].split()))
    if out is not None:
        write_outputs(payload, out)
    return payload


def _ours(payload):
    return "attnfast-cpu" if payload["device"] == "cpu" else "attnfast-triton"


def markdown(payload):
    ours = _ours(payload)
    names = [n for n in payload["peers"]]
    lines = [f"### Kernels: {payload['device']}, {payload['dtype']} ({payload['mode']} plan)", "",
             "Median ms per call (speedup = peer time / " + ours + " time; > 1: " + ours + " faster).", ""]
    header = ["variant", "mode", "L", "D", "H"] + names + [f"speedup vs {n}" for n in names if n != ours]
    rows = []
    for r in payload["results"]:
        c, pr = r["case"], r["peers"]
        base = pr.get(ours, {}).get("median_ms")
        cells = [c["variant"], MODE_LABEL[c["mode"]], c["L"], c["D"],
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
    trows = [[r["case"]["variant"], MODE_LABEL[r["case"]["mode"]], r["case"]["L"], r["case"]["D"]] +
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


def plot(payload, out):
    """kernels_time.png (median ms vs L, log-log) and kernels_tflops.png, forward, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def write_outputs(payload, out):
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload["plots"] = plot(payload, out)
    (out / "kernels.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (out / "kernels.md").write_text(markdown(payload))


def run(ctx) -> bool:
    """Suite entry (python -m bench --suite kernels)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    payload = run_kernels("quick" if ctx.quick else "full", device=device, out=ctx.out, threads=ctx.threads)
    print(markdown(payload))
    ours = _ours(payload)
    return all("median_ms" in r["peers"].get(ours, {}) for r in payload["results"]) and math.isfinite(1.0)
