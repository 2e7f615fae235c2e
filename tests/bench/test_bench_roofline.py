"""`python -m attnfast bench roofline --smoke`: the limits, the micro-kernel alone and the target grid
on every ISA path this CPU runs; and the probe's own checks."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

import attnfast

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not attnfast.backends()["cpu"].available, reason="cpu backend not built")


def _paths():
    from attnfast import ops

    return {"avx512": ["avx512", "avx2"], "avx2": ["avx2"]}.get(ops._C.cpu_isa_best(), ["default"])


def test_bench_roofline_smoke(tmp_path):
    from attnfast.bench.roofline import SMOKE, grid

    proc = subprocess.run([sys.executable, "-m", "attnfast", "bench", "roofline", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "roofline.json").read_text())
    md = (tmp_path / "roofline.md").read_text()
    paths = _paths()
    peaks = data["limits"]["fma_peak_gflops"]
    assert sorted(peaks) == sorted(paths)
    for p in peaks.values():
        assert all(v > 0 and math.isfinite(v) for v in p.values())
    assert all(v > 0 for v in data["limits"]["stream_gbs"].values())
    mk = data["microkernel"]
    assert {(r["isa"], r["E"], r["product"]) for r in mk} == {
        (isa, E, prod) for isa in paths for E in (64, 128) for prod in ("score S = Q K^T", "P V + rescale")}
    assert all(r["gflops"] > 0 for r in mk)
    names = [c.name for c in grid(SMOKE)]
    expected_grids = ["best", "avx2"] if "avx512" in paths else ["best"]
    assert sorted(data["grids"]) == sorted(expected_grids)
    for path, g in data["grids"].items():
        assert g["error"] is None, g["error"]
        assert [r["name"] for r in g["records"]] == names
        if path == "avx2":
            assert g["info"]["isa"] == "avx2" and g["info"]["torch_capability"] == "AVX2"
        for r in g["records"]:
            assert len(r["times_attnfast_s"]) == len(r["times_torch_s"]) == SMOKE.pairs
            assert r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"] and r["ratio_min"] > 0
        for name in names:                                   # every case is a row of the path's table
            assert len(re.findall(rf"^\| {re.escape(name)} +\|", md, re.M)) == len(expected_grids), name


def test_probe_counts_its_flops_and_refuses_bad_arguments():
    from attnfast import ops

    width = {"avx512": 16, "avx2": 8, "default": 4}
    for isa in _paths():
        s, f = ops._C.cpu_probe(0, isa, 1000, 2)
        assert s > 0 and f == 2 * 12 * width[isa] * 1000 * 2
        s, f = ops._C.cpu_probe(1, isa, 3, 1, 12, 64, 128)
        assert s > 0 and f == 2 * 12 * 64 * 128 * 3
    with pytest.raises(RuntimeError, match="kind must be"):
        ops._C.cpu_probe(3, "avx2", 1, 1)
    with pytest.raises(RuntimeError, match="isa must be"):
        ops._C.cpu_probe(0, "sse9", 1, 1)
    with pytest.raises(RuntimeError, match="must be positive"):
        ops._C.cpu_probe(1, "default", 1, 1, 0, 64, 128)
