"""Smoke test of `python -m bench --quick` (the `make bench` entry point)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import attnfast

REPO_ROOT = Path(__file__).resolve().parents[1]


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
