"""Smoke test of `python -m attnfast bench cpu_ratios --quick` (the CPU speed-target ratios)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import attnfast

REPO_ROOT = Path(__file__).resolve().parents[2]
GROUPS = ("dense", "fwdbwd", "masks", "window", "roofline", "threads")


@pytest.mark.skipif(not attnfast.backends()["cpu"].available, reason="cpu backend not built")
def test_bench_cpu_ratios_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "attnfast", "bench", "cpu_ratios", "--quick", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = tmp_path / "cpu_ratios.json"
    assert result.exists()
    assert (tmp_path / "cpu_ratios.md").exists()
    data = json.loads(result.read_text())
    records = data["records"]
    for group in GROUPS:
        recs = [r for r in records if r["group"] == group]
        assert recs, f"no records for group {group}"
        for r in recs:
            assert r["pairs"] >= 5, r["case"]
            assert len(r["times_a_ms"]) == len(r["times_b_ms"]) == len(r["ratios"]) == r["pairs"], r["case"]
            assert all(t > 0 for t in r["times_a_ms"] + r["times_b_ms"]), r["case"]
            assert r["median_ms_a"] > 0 and r["median_ms_b"] > 0, r["case"]
            for key in ("ratio_median", "ratio_min", "ratio_max"):
                assert math.isfinite(r[key]) and r[key] > 0, (r["case"], key)
            assert r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"], r["case"]
