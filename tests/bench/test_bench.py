"""Smoke test of `python -m bench --quick` (the `make bench` entry point)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import attnfast

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not attnfast.backends()["cpu"].available, reason="cpu backend not built")
def test_bench_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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


@pytest.mark.skipif(not attnfast.backends()["cpu"].available, reason="cpu backend not built")
def test_variants_suite_tiny_plan(tmp_path, monkeypatch):
    """The variants suite end to end on a tiny plan: tables, JSON, memory probes in fresh processes."""
    from bench import variants
    from bench.common import Context

    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setitem(variants.PLANS, "quick", dict(L=(64,), probe_L=(128,), reps=1, topk_L=96, ks=(8, 96)))
    assert variants.run(Context.create(quick=True, out=str(tmp_path)))
    data = json.loads((tmp_path / "variants.json").read_text())
    first, probe = data["additive"]
    assert first["fused_error"] is None and first["naive_error"] is None and first["fused_fwdbwd_ms"] > 0
    assert first["naive_peak_mib"] > first["fused_peak_mib"] >= 0
    assert probe["L"] == 128 and probe["naive_peak_mib"] > 0
    assert [t["k"] for t in data["topk"]] == [8, 96]
    assert all(t[f"{p}_{m}_ms"] > 0 for t in data["topk"]
               for p in ("fused", "chunked", "dense") for m in ("fwd", "fwdbwd"))
    assert "| k " in (tmp_path / "variants.md").read_text()
