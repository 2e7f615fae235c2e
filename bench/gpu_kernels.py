"""GPU kernel table: attnfast (Triton, and CUDA C++ when built) vs torch SDPA and
each of its CUDA backends, forward and forward+backward, self-attention.

Peers: attnfast.attention(backend="triton"), attnfast.attention(backend="cuda")
when that backend is available, and torch.nn.functional.scaled_dot_product_attention
with no backend forced ("default") and forced to flash, efficient and cudnn
with torch.nn.attention.sdpa_kernel.  A peer that refuses an input is recorded
as "n/a" with its reason.

Shapes follow the FlashAttention benchmark convention: hidden size 2048 and
16k tokens per batch, so H = 2048 / D and B = 16384 / L.  Cases (most
important first, since a time guard may cut the tail): bf16 D=128 forward
non-causal L=4k..16k, causal, then forward+backward, then a key-padding bool
mask (half the keys padded) at L=1k..4k, then the short L, then fp16, then D=64.

Timing: triton.testing.do_bench (L2 cleared before each call), median ms.
TFLOP/s: forward FLOPs 4*B*H*Lq*Lk*D (halved when causal; a mask does not
change the count), fwd+bwd 3.5x forward.

Deadline: cases that would start after ATTNFAST_GPU_BENCH_SECONDS (default
330) seconds are skipped, and the report says which.  Without a CUDA device
there is nothing to do, except `--quick` under TRITON_INTERPRET=1: then one or
two tiny cases run on CPU tensors for the Triton peer alone (a smoke test of
this code path).

Writes gpu_kernels.json and gpu_kernels.md.  Not a default suite:
`python -m bench --suite gpu_kernels [--quick]`.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, List

import torch
import torch.nn.functional as F

import attnfast

from .common import DTYPE_SHORT, DTYPES, MODES, fmt_num, md_table

DESCRIPTION = ("GPU kernel table: attnfast triton (and cuda) vs torch SDPA default/flash/efficient/cudnn, "
               "fwd and fwd+bwd, TFLOP/s (needs a CUDA GPU)")

ENV_SECONDS = "ATTNFAST_GPU_BENCH_SECONDS"
DEFAULT_SECONDS = 330.0
MODE_FACTOR = {"fwd": 1.0, "fwdbwd": 3.5}
TOKENS, HIDDEN = 16384, 2048          # B * L and H * D (FlashAttention benchmark convention)
CHECK_TOL = 0.05                      # max |attnfast - SDPA| on a forward output; more = broken kernel
DO_BENCH = dict(warmup=20, rep=80)    # ms of warm-up and of timed calls per peer and case

FLOP_NOTE = ("TFLOP/s = FLOPs / median time; FLOPs: forward 4*B*H*Lq*Lk*D (halved when causal; the key-padding "
             "mask does not change the count), fwd+bwd 3.5x forward")
RATIO_NOTE = ("ratio = t_SDPA / t_attnfast-triton, i.e. attnfast-triton TFLOP/s over the SDPA peer's "
              "(> 1: attnfast faster)")


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    dtype: str       # key of common.DTYPES
    D: int
    mode: str        # "fwd" or "fwdbwd"
    causal: bool
    mask: bool       # key-padding bool mask (B, 1, 1, L), the first L/2 keys kept
    L: int
    B: int
    H: int

    @property
    def variant(self):
        return "keypad mask" if self.mask else ("causal" if self.causal else "full")

    def id(self):
        return f"{DTYPE_SHORT[self.dtype]} D{self.D} {self.variant} {self.mode} L{self.L} B{self.B}H{self.H}"

    def flops(self):
        f = 4.0 * self.B * self.H * self.L * self.L * self.D
        if self.causal:
            f /= 2
        return f * MODE_FACTOR[self.mode]


def fa_case(dtype, D, mode, causal, L, mask=False):
    return Case(dtype, D, mode, causal, mask, L, B=TOKENS // L, H=HIDDEN // D)


def full_cases():
    """Every GPU case, most important first (a deadline cuts from the end)."""
    long_L, short_L, mask_L = (4096, 8192, 16384), (1024, 2048), (1024, 2048, 4096)
    out = []
    for dtype, D in (("bfloat16", 128), ("float16", 128), ("bfloat16", 64), ("float16", 64)):
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
    return [Case("bfloat16", 32, "fwd", False, False, 64, B=1, H=2),
            Case("bfloat16", 32, "fwdbwd", True, False, 64, B=1, H=2)]


def make_case_inputs(case, device):
    dt = DTYPES[case.dtype]
    grad = case.mode == "fwdbwd"
    q, k, v = (torch.randn(case.B, case.H, case.L, case.D, device=device, dtype=dt, requires_grad=grad)
               for _ in range(3))
    g = torch.randn(case.B, case.H, case.L, case.D, device=device, dtype=dt) if grad else None
    mask = None
    if case.mask:
        mask = torch.zeros(case.B, 1, 1, case.L, dtype=torch.bool, device=device)
        mask[..., : case.L // 2] = True
    return q, k, v, g, mask


# ---------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    fn: Callable                               # fn(q, k, v, causal, mask) -> out
    context: Callable = nullcontext            # entered around the probe and the timing
    attnfast: bool = False


def _attnfast(backend):
    def fn(q, k, v, causal, mask):
        return attnfast.attention(q, k, v, attn_mask=mask, is_causal=causal, backend=backend)
    return fn


def _sdpa(q, k, v, causal, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def _sdpa_ctx(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, name)
    return lambda: sdpa_kernel(backend)


def gpu_peers():
    """(peers, notes): the peers this machine can run, and why any is left out."""
    peers = [Peer("attnfast-triton", "attnfast.attention(backend='triton')", _attnfast("triton"), attnfast=True)]
    notes = []
    st = attnfast.backends()["cuda"]
    if st.available:
        peers.append(Peer("attnfast-cuda", "attnfast.attention(backend='cuda')", _attnfast("cuda"), attnfast=True))
    else:
        notes.append(f"attnfast-cuda left out: the cuda backend is not available ({st.reason})")
    peers.append(Peer("sdpa-default", "torch SDPA, no backend forced", _sdpa))
    for short, name in (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
                        ("cudnn", "CUDNN_ATTENTION")):
        peers.append(Peer(f"sdpa-{short}", f"torch SDPA under sdpa_kernel(SDPBackend.{name})", _sdpa,
                          _sdpa_ctx(name)))
    return peers, notes


def interpret_peers():
    return [Peer("attnfast-triton", "attnfast.attention(backend='triton'), TRITON_INTERPRET=1 on CPU tensors",
                 _attnfast("triton"), attnfast=True)], []


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------
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


def measure(peer, case, inputs, on_gpu):
    """Record of one peer on one case: probe call (errors -> n/a), then median ms."""
    q, k, v, g, mask = inputs
    rec = dict(case=case.id(), peer=peer.name, **asdict(case), variant=case.variant, flops=case.flops(),
               status="ok", ms=None, tflops=None, reason=None, out=None)
    if case.mode == "fwd":
        def call():
            with torch.no_grad():
                return peer.fn(q, k, v, case.causal, mask)
    else:
        def call():
            out = peer.fn(q, k, v, case.causal, mask)
            return torch.autograd.grad(out, (q, k, v), g)     # no .grad accumulation between calls
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
                if on_gpu:
                    from triton.testing import do_bench

                    ms = do_bench(call, return_mode="median", **DO_BENCH)
                else:
                    ms = _time_cpu_ms(call)
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


def check_outputs_cpu(recs, case, inputs):
    """Interpreter mode: compare with torch SDPA on the same CPU tensors (untimed)."""
    q, k, v, _, mask = inputs
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=case.causal)
    for r in recs:
        if r.get("out") is not None:
            d = (r["out"].float() - ref.float()).abs().max().item()
            r.update(check_vs="torch SDPA (cpu)", max_abs_diff=d, check_ok=bool(d <= CHECK_TOL))
        r.pop("out", None)


# ---------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
VARIANT_ORDER = {"full": 0, "causal": 1, "keypad mask": 2}


def _cell_tf(r):
    if r is None:
        return "-"
    return fmt_num(r["tflops"]) if r["status"] == "ok" else "n/a"


def _ratio(a, b):
    if a is None or b is None or a["status"] != "ok" or b["status"] != "ok":
        return "-"
    return f"{b['ms'] / a['ms']:.2f}"


def tables(records, peer_names):
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


# ---------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------
def deadline_seconds():
    raw = os.environ.get(ENV_SECONDS)
    if not raw:
        return DEFAULT_SECONDS
    try:
        return float(raw)
    except ValueError:
        print(f"ignoring {ENV_SECONDS}={raw!r} (not a number); deadline {DEFAULT_SECONDS:.0f} s")
        return DEFAULT_SECONDS


def run(ctx):
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
    peers, peer_notes = gpu_peers() if on_gpu else interpret_peers()
    cases = (quick_gpu_cases() if ctx.quick else full_cases()) if on_gpu else interpret_cases()
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
    for i, case in enumerate(cases):
        elapsed = time.perf_counter() - t0
        if i > 0 and elapsed > deadline:           # the first case always runs
            skipped = [c.id() for c in cases[i:]]
            print(f"[{elapsed:6.1f} s] deadline {deadline:.0f} s passed: skipping the remaining {len(skipped)} "
                  "case(s)", flush=True)
            break
        torch.manual_seed(ctx.seed + i)
        inputs = make_case_inputs(case, device)
        recs = [measure(p, case, inputs, on_gpu) for p in peers]
        if on_gpu:
            check_outputs(recs)
        else:
            check_outputs_cpu(recs, case, inputs)
        del inputs
        records += recs
        cells = [f"{r['peer']} " + (f"{r['ms']:.3f} ms {r['tflops']:.1f} TF/s" if r["status"] == "ok" else "n/a")
                 for r in recs]
        print(f"[{time.perf_counter() - t0:6.1f} s] {case.id()}: " + " | ".join(cells), flush=True)
        save_json(time.perf_counter() - t0, partial=True)     # kept if the run is killed from outside
    wall = time.perf_counter() - t0

    notes = [FLOP_NOTE, RATIO_NOTE, f"timing: {timing}",
             f"shapes: B*L = {TOKENS} tokens, H*D = {HIDDEN} (FlashAttention benchmark convention); inputs N(0,1), "
             "contiguous (B, H, L, D); keypad mask: bool (B, 1, 1, L), the first L/2 keys kept"
             if on_gpu else "shapes: tiny CPU tensors (interpreter smoke test)",
             *[f"{p.name}: {p.label}" for p in peers], *peer_notes, *na_notes(records), *check_notes(records),
             *skipped_notes(skipped, deadline), f"wall time of the cases: {wall:.0f} s"]
    tbls = tables(records, [p.name for p in peers])
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
