"""Smoke tests of suites through the front door `python -m attnfast bench SUITE`: the parity
summary and the CPU kernel table (`--quick`), the variants suite (`--smoke`) and the ring
suite (`--smoke`)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import attnfast

REPO_ROOT = Path(__file__).resolve().parents[2]
needs_cpu = pytest.mark.skipif(not attnfast.backends()["cpu"].available, reason="cpu backend not built")


def bench(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "attnfast", "bench", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@needs_cpu
def test_bench_quick(tmp_path):
    bench("parity", "--quick", "--out", tmp_path)
    bench("cpu_kernels", "--quick", "--out", tmp_path)
    result = tmp_path / "cpu_kernels.json"
    assert result.exists()
    data = json.loads(result.read_text())
    assert data["records"]
    for peer in ("attnfast", "sdpa", "naive"):
        recs = [r for r in data["records"] if r["peer"] == peer]
        assert recs, f"no records for {peer}"
        assert all(r["median_ms"] > 0 for r in recs), peer
    for name in ("cpu_kernels.md", "cpu_kernels.png", "parity.json"):
        assert (tmp_path / name).exists(), name
    # FLOPs: forward 4*B*H*Lq*Lk*D, halved when causal; fwd+bwd 3.5x forward
    for r in data["records"]:
        fwd = 4 * r["B"] * r["H"] * r["Lq"] * r["Lk"] * r["D"] / (2 if r["causal"] else 1)
        assert r["flops"] == fwd * {"fwd": 1, "fwdbwd": 3.5}[r["mode"]], r
    assert {(r["causal"], r["mode"]) for r in data["records"]} == {(c, m) for c in (False, True)
                                                                   for m in ("fwd", "fwdbwd")}
    parity = json.loads((tmp_path / "parity.json").read_text())
    assert parity["cases"] >= 1 and parity["cases_ok"] == parity["cases"]


@needs_cpu
def test_variants_suite_tiny_plan(tmp_path):
    """The variants suite end to end on its smoke plan: tables, JSON, memory probes in fresh processes."""
    bench("variants", "--smoke", "--out", tmp_path)
    data = json.loads((tmp_path / "variants.json").read_text())
    first, probe = data["additive"]
    assert first["fused_error"] is None and first["naive_error"] is None and first["fused_fwdbwd_ms"] > 0
    assert first["naive_peak_mib"] > first["fused_peak_mib"] >= 0
    assert probe["L"] == 128 and probe["naive_peak_mib"] > 0
    assert [t["k"] for t in data["topk"]] == [8, 96]
    assert all(t[f"{p}_{m}_ms"] > 0 for t in data["topk"]
               for p in ("fused", "chunked", "dense") for m in ("fwd", "fwdbwd"))
    assert "| k " in (tmp_path / "variants.md").read_text()


@needs_cpu
def test_ring_suite_smoke(tmp_path):
    """The ring suite on its smoke plan: 2 ranks (this package's ring module with --worker), both
    causal settings, the table and the GPU model."""
    bench("ring", "--smoke", "--out", tmp_path, timeout=900)
    data = json.loads((tmp_path / "ring.json").read_text())
    assert [(r["world"], r["L"], r["causal"]) for r in data["records"]] == [(2, 256, False), (2, 256, True)]
    for r in data["records"]:
        assert r["fwd_step_ms"] > 0 and r["bwd_step_ms"] > 0, r
        assert len(r["per_rank_s"]["fwd_total"]) == 2, r
    assert data["gpu_model"]
    md = (tmp_path / "ring.md").read_text()
    assert "| W " in md and "### Model: when does the ring hide its communication?" in md
