"""The front door `python -m attnfast bench`: one registry of suites (--list), each with the
options it takes (--help), usage errors, and no second door."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnfast.bench

ROOT = Path(__file__).resolve().parents[2]
SUITES = ("parity", "kernels", "cpu_kernels", "gpu_kernels", "encoders", "variants", "ring", "cpu_ratios", "roofline",
          "varlen", "decode", "kvcache", "report", "all")
# the options each suite takes (beyond --help)
OPTIONS = {
    "parity": {"--quick", "--out", "--threads", "--seed"},
    "kernels": {"--quick", "--smoke", "--device", "--dtype", "--out", "--threads", "--no-progress"},
    "cpu_kernels": {"--quick", "--out", "--threads", "--seed"},
    "gpu_kernels": {"--quick", "--out", "--threads", "--seed"},
    "encoders": {"--quick", "--smoke", "--device", "--out", "--threads", "--seed", "--no-progress"},
    "variants": {"--quick", "--smoke", "--out", "--threads", "--seed"},
    "ring": {"--quick", "--smoke", "--out", "--threads", "--seed"},
    "cpu_ratios": {"--quick", "--out", "--threads", "--seed"},
    "roofline": {"--quick", "--smoke", "--out", "--threads", "--seed"},
    "varlen": {"--quick", "--smoke", "--out", "--threads", "--seed"},
    "decode": {"--quick", "--smoke", "--out", "--threads", "--seed"},
    "kvcache": {"--quick", "--smoke", "--out", "--threads", "--seed"},
    "report": {"--quick", "--smoke", "--device", "--dtype", "--out"},
    "all": {"--quick", "--smoke", "--device", "--dtype", "--out", "--threads", "--no-progress"},
}
EVERY_OPTION = set().union(*OPTIONS.values())


def test_list_shows_every_suite(capsys):
    assert attnfast.bench.main(["--list"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert tuple(ln.split()[0] for ln in lines) == SUITES
    assert all(len(ln.split()) > 3 for ln in lines)                # each with its description
    assert "[parity + kernels + encoders + report]" in lines[-1]    # `all`, what `make bench` runs


@pytest.mark.parametrize("suite", SUITES)
def test_help_lists_the_options_of_the_suite(suite, capsys):
    assert attnfast.bench.main([suite, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m attnfast bench {suite}")
    shown = {opt for opt in EVERY_OPTION if f"{opt} " in text or f"{opt}\n" in text or f"{opt}]" in text}
    assert shown == OPTIONS[suite]


def test_usage_errors(capsys):
    assert attnfast.bench.main([]) == 2
    assert "--list" in capsys.readouterr().err
    assert attnfast.bench.main(["nonesuch"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert attnfast.bench.main(["cpu_ratios", "--smoke"]) == 2      # an option the suite does not take
    assert attnfast.bench.main(["kernels", "--quick", "--smoke"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_device_cuda_without_a_gpu(tmp_path, capsys):
    assert attnfast.bench.main(["kernels", "--smoke", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_one_front_door():
    """`python -m attnfast bench` reaches the same main; the package has no door of its own."""
    proc = subprocess.run([sys.executable, "-m", "attnfast", "bench", "--list"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split()[0] == "parity", proc.stderr
    proc = subprocess.run([sys.executable, "-m", "attnfast.bench"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "cannot be directly executed" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "attnfast"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "python -m attnfast bench SUITE" in proc.stderr
