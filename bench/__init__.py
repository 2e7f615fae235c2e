"""attnfast benchmarks: `python -m bench` (what `make bench` runs).

The benchmark is a small registry of *suites*.  Each suite is a module with

    DESCRIPTION = "one line"
    def run(ctx: bench.common.Context) -> bool   # True when everything passed

and is listed in `SUITES` below (imported lazily, so a suite's heavy imports
cost nothing when it is not selected).  `python -m bench` runs the suites
marked `default`; `--suite NAME` (repeatable) picks others, `--list` shows
them.  Adding a suite = one module + one line here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Suite:
    module: str        # importable module implementing DESCRIPTION and run(ctx)
    description: str
    default: bool = True


SUITES = {
    "parity": Suite("bench.parity", "parity of the CPU kernel with the reference (attnfast.testing rule)"),
    "cpu_kernels": Suite("bench.cpu_kernels", "CPU kernel table: attnfast cpu vs torch SDPA vs naive, "
                                              "time, GFLOP/s, peak memory"),
    "cpu_ratios": Suite("bench.cpu_ratios", "CPU speed targets: SDPA/attnfast time ratios, peers alternated", default=False),
    "encoders": Suite("bench.encoders", "attention vs RNN/LSTM/GRU encoders: tokens/s, memory, long-range recall", default=False),
    "ring": Suite("bench.ring", "ring attention on 2 and 4 CPU processes: time per step, communication share, "
                                "GPU scaling model", default=False),
    "variants": Suite("bench.variants", "additive attention fused vs naive (time, memory, where naive stops "
                                        "fitting); top-k vs dense", default=False),
    "gpu_kernels": Suite("bench.gpu_kernels", "GPU kernel table: attnfast triton/cuda vs torch SDPA backends, TFLOP/s", default=False),
}


def default_suites():
    return [name for name, s in SUITES.items() if s.default]


def load_suite(name):
    import importlib

    return importlib.import_module(SUITES[name].module)
