"""attnfast benchmarks, installed with attnfast as `attnfast.bench`.

    python -m attnfast bench SUITE [options]     (`make bench` = `all --quick`)
    python -m attnfast bench --list              the suites
    python -m attnfast bench SUITE --help        the options SUITE takes

Results go to --out: by default bench/results in a source checkout, and
./attnfast-bench-results (in the current directory) when attnfast is installed.

The suites are one registry, `SUITES` below.  A suite is a function
`run(ctx) -> bool` (True when everything passed; ctx is a common.Context) in a
module of this package, imported only when the suite runs, with the options it
takes; a group (`all`) runs its suites in order with one context.  Adding a
suite = one function + one line here.  Modules run as subprocesses (the memory
probes, the ring benchmark's ranks) are started as `python -m attnfast.bench.MODULE`
by the suites themselves; they are not entry points.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

COMMON = ("out", "threads", "seed")


@dataclass(frozen=True)
class Suite:
    description: str
    module: str = ""                  # module of this package holding the entry
    entry: str = "run"                # its function run(ctx) -> bool
    plans: Tuple[str, ...] = ("quick",)   # plans besides the full one (--quick, --smoke)
    options: Tuple[str, ...] = COMMON     # the other options it takes (cli.OPTIONS)
    parts: Tuple[str, ...] = ()       # a group: the suites it runs, in order


SUITES = {
    "parity": Suite("parity of the CPU kernel with the reference (attnfast.testing rule)", "parity"),
    "kernels": Suite("kernel sweep: attnfast backends vs torch SDPA backends vs naive (vs flash-attn/xformers): "
                     "fwd, bwd, fwd+bwd, time quantiles, TFLOP/s, peak memory", "kernels",
                     plans=("quick", "smoke"), options=("device", "dtype", "out", "threads", "no-progress")),
    "cpu_kernels": Suite("CPU kernel table: attnfast cpu vs torch SDPA vs naive reference (time, GFLOP/s, "
                         "peak memory)", "kernels", "run_cpu_table"),
    "gpu_kernels": Suite("GPU kernel table: attnfast triton (and cuda) vs torch SDPA default/flash/efficient/cudnn, "
                         "fwd and fwd+bwd, TFLOP/s (needs a CUDA GPU; --quick under TRITON_INTERPRET=1: a CPU "
                         "smoke test)", "kernels", "run_gpu_table"),
    "encoders": Suite("attention (attnfast, torch SDPA) vs RNN/LSTM/GRU encoders: tokens/s, peak memory, "
                      "crossover lengths, long-range recall accuracy and gradient norms", "encoders",
                      plans=("quick", "smoke"), options=("device",) + COMMON + ("no-progress",)),
    "variants": Suite("additive attention fused vs naive (time, peak memory, where naive stops fitting); "
                      "top-k vs dense", "variants", plans=("quick", "smoke")),
    "ring": Suite("ring attention on 2 and 4 CPU processes: time per step, communication share; GPU scaling "
                  "model", "ring", plans=("quick", "smoke")),
    "cpu_ratios": Suite("CPU speed targets as ratios: torch SDPA time / attnfast time, peers alternated per case "
                        "(dense, fwd+bwd, masks, window, matmul roofline, thread scaling)", "cpu_ratios"),
    "roofline": Suite("CPU roofline: FMA peak probe, sgemm rate, stream bandwidth, the micro-kernel alone, and the "
                      "target grid (torch SDPA / attnfast, alternated pairs) as shares of them, per ISA path",
                      "roofline", plans=("quick", "smoke")),
    "varlen": Suite("packed batches: one varlen_attention call vs the per-sequence loop vs padded dense SDPA, "
                    "1 to 4096 sequences (CPU)", "serving", "run_varlen", plans=("quick", "smoke")),
    "decode": Suite("decoding (Lq = 1): split-KV vs no split vs torch SDPA, and GB/s as a share of the read "
                    "bandwidth (CPU)", "serving", "run_decode", plans=("quick", "smoke")),
    "kvcache": Suite("attention_with_kvcache decode steps, contiguous vs paged cache: tokens/s (CPU)", "serving",
                     "run_kvcache", plans=("quick", "smoke")),
    "report": Suite("REPORT.md from the results in --out (conditions, then the parity, kernel, encoder, ring "
                    "and variants sections that are there)", "report", plans=("quick", "smoke"),
                    options=("device", "dtype", "out")),
    "all": Suite("what `make bench` runs: the parity summary, kernels, encoders, then REPORT.md",
                 plans=("quick", "smoke"), options=("device", "dtype", "out", "threads", "no-progress"),
                 parts=("parity", "kernels", "encoders", "report")),
}


def load(name):
    """The entry function of suite `name` (its module imported now)."""
    import importlib

    s = SUITES[name]
    return getattr(importlib.import_module(f".{s.module}", __name__), s.entry)


def main(argv=None):
    """The front door, `python -m attnfast bench ...`: main(["kernels", "--smoke"]) -> exit status."""
    from .cli import main as cli_main

    return cli_main(argv)
