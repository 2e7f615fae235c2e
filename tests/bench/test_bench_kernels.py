"""`python -m attnfast bench kernels --smoke`: the kernel sweep in miniature, through the CLI,
with every peer that this machine has and sane values; then `report` over its results."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bench(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "attnfast", "bench", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels")
    return out, bench("kernels", "--smoke", "--device", "cpu", "--out", out, "--no-progress")


def test_every_peer_has_a_row(smoke):
    out, _ = smoke
    data = json.loads((out / "kernels.json").read_text())
    assert data["conditions"]["device"] == "cpu" and data["conditions"]["threads"] >= 1
    assert {"attnfast-cpu", "sdpa", "sdpa-math", "sdpa-flash", "naive"} <= set(data["peers"])
    assert {"flash-attn", "xformers"} <= set(data["unavailable"])  # CUDA-only peers, with the reason
    modes = {r["case"]["mode"] for r in data["results"]}
    assert {"fwd", "bwd"} <= modes
    for r in data["results"]:
        for name in ("attnfast-cpu", "sdpa", "naive"):
            row = r["peers"][name]
            assert row["median_ms"] > 0 and row["min_ms"] <= row["median_ms"] <= row["max_ms"], (r["case"], name)
            assert row["tflops"] > 0


def test_outputs_written(smoke):
    out, stdout = smoke
    for name in ("kernels.md", "kernels_time.png", "kernels_tflops.png"):
        assert (out / name).stat().st_size > 0
    assert "speedup vs sdpa" in (out / "kernels.md").read_text()
    assert "| none" in stdout  # the table is printed


def test_flops_formula(smoke):
    """FLOPs of every case: 4*B*H*L*L*D forward (the key-padding mask does not change the count),
    backward 2.5x; TFLOP/s = FLOPs / median time.  (Causal halving and fwd+bwd: test_bench.py.)"""
    out, _ = smoke
    data = json.loads((out / "kernels.json").read_text())
    assert {r["case"]["variant"] for r in data["results"]} == {"none", "keypad"}
    for r in data["results"]:
        c = r["case"]
        assert r["flops"] == 4 * c["B"] * c["H"] * c["L"] * c["L"] * c["D"] * {"fwd": 1, "bwd": 2.5}[c["mode"]], r
        for row in r["peers"].values():
            if "median_ms" in row:
                assert row["tflops"] == pytest.approx(r["flops"] / (row["median_ms"] * 1e-3) / 1e12)
    note = data["flop_note"]
    for part in ("forward 4*B*H*Lq*Lk*D", "halved for the causal variants", "4*B*H*D*(visible pairs) for the window",
                 "backward 2.5x forward", "forward+backward 3.5x"):
        assert part in note, part


def test_report_assembles_the_sections(smoke, tmp_path):
    import shutil

    out, _ = smoke
    for name in ("kernels.md", "kernels.json", "kernels_time.png", "kernels_tflops.png"):
        shutil.copy(out / name, tmp_path / name)
    cond = json.loads((out / "kernels.json").read_text())["conditions"]
    stdout = bench("report", "--smoke", "--device", "cpu", "--out", tmp_path)
    report = (tmp_path / "REPORT.md").read_text()
    assert "# attnfast benchmark report" in report and "## Kernels" in report
    assert "![kernels_time.png](kernels_time.png)" in report
    assert "encoders.md missing" in report  # a section that did not run says so
    assert cond["cpu_isa"] in report
    assert "| plan | smoke |" in report and "report:" in stdout
