"""Smoke tests of the GPU check: bench/gpu_check.sh parses and benchmarks through the front
door, and the gpu_kernels suite runs its tiny interpreter path (TRITON_INTERPRET=1, CPU tensors)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")
def test_gpu_check_script_syntax():
    script = REPO_ROOT / "bench" / "gpu_check.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert '-m attnfast bench gpu_kernels --out "$OUT"' in text
    assert "-m bench " not in text


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_gpu_kernels_quick_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("ATTNFAST_BACKEND", None)
    proc = subprocess.run([sys.executable, "-m", "attnfast", "bench", "gpu_kernels", "--quick", "--out",
                           str(tmp_path)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = tmp_path / "gpu_kernels.json"
    assert result.exists(), proc.stdout[-3000:]
    data = json.loads(result.read_text())
    recs = [r for r in data["records"] if r["peer"] == "attnfast-triton"]
    assert recs, "no records for attnfast-triton"
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in recs), recs
    assert (tmp_path / "gpu_kernels.md").exists()
