"""`python -m attnfast bench kernels --smoke`: the kernel sweep in miniature,
through the CLI, with every peer that this machine has and sane values."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels")
    proc = subprocess.run([sys.executable, "-m", "attnfast", "bench", "kernels", "--smoke", "--device", "cpu",
                           "--out", str(out), "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, proc.stdout


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


def test_flops_formula():
    from bench.kernels import Case

    c = Case("none", "fwd", L=1024, D=64, B=2, H=8)
    assert c.flops() == 4 * 2 * 8 * 1024 * 1024 * 64
    assert Case("causal", "fwd", 1024, 64, 2, 8).flops() == c.flops() / 2
    assert Case("none", "fwdbwd", 1024, 64, 2, 8).flops() == 3.5 * c.flops()
    w = Case("window", "fwd", 1024, 64, 2, 8)
    assert c.flops() / 4 > w.flops() > c.flops() / 8  # 257 keys of 1024 at most, fewer at the start


def test_report_assembles_the_sections(smoke, tmp_path):
    import shutil

    from bench.report import write_report

    out, _ = smoke
    for name in ("kernels.md", "kernels.json", "kernels_time.png", "kernels_tflops.png"):
        shutil.copy(out / name, tmp_path / name)
    cond = json.loads((out / "kernels.json").read_text())["conditions"]
    report = write_report(tmp_path, cond, "smoke", {"kernels": 1.0}).read_text()
    assert "# attnfast benchmark report" in report and "## Kernels" in report
    assert "![kernels_time.png](kernels_time.png)" in report
    assert "encoders.md missing" in report  # a section that did not run says so
    assert cond["cpu_isa"] in report
