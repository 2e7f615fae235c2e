"""The serving benchmarks (bench/serving.py): smoke plans run, and their tables say what they measured."""
import json

import pytest
import torch

import attnfast.bench
from attnfast.bench.serving import loguniform_lengths

pytestmark = pytest.mark.skipif(not attnfast.backends()["cpu"].available, reason="needs the CPU kernels")


@pytest.mark.parametrize("suite,keys", [
    ("varlen", {"speedup_vs_loop", "speedup_vs_padded", "median_ms"}),
    ("decode", {"split_vs_no_split", "split_vs_torch", "gbs", "read_gbs"}),
    ("kvcache", {"tokens_per_s", "median_ms"}),
])
def test_serving_suite_smoke(suite, keys, tmp_path):
    assert attnfast.bench.main([suite, "--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / f"serving_{suite}.json").read_text())
    assert data["records"] and all(keys <= set(r) for r in data["records"])
    assert "conditions" in data and (tmp_path / f"serving_{suite}.md").read_text().startswith("# ")


@pytest.mark.parametrize("n,total", [(1, 50), (7, 7), (2000, 65536), (40, 1000)])
def test_loguniform_lengths_sum_to_the_total(n, total):
    lens = loguniform_lengths(n, total, torch.Generator().manual_seed(0))
    assert len(lens) == n and sum(lens) == total and min(lens) >= 1
