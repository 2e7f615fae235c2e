"""The Triton autotuning tables and their pruning; one config compiled for sm90.

The autotuner itself runs only on a GPU; what can be checked without one is
which configs it is offered, and that the kernels compile for the targets.
"""
import pytest

A = pytest.importorskip("attnfast.triton_kernels.attention")


def _args(arch, d, lq, lk, fp32=False):
    return dict(ARCH=arch, BLOCK_D=d, BLOCK_DV=d, Lq=lq, Lk=lk, DOT=1 if fp32 else 0)


@pytest.mark.parametrize("kind", ["fwd", "rows", "dkdv"])
def test_tables_are_valid(kind):
    for per_gpu in [*A.TUNING[kind].values(), A.TUNING_FP32[kind]]:
        assert set(per_gpu) == {64, 128, 256}
        for entries in per_gpu.values():
            assert entries and len(set(entries)) == len(entries)
            for bm, bn, warps, stages in entries:
                # every kernel tile must lie in one mask-list cell
                for block, cell in ((bm, A.GPU_CELL[0]), (bn, A.GPU_CELL[1])):
                    assert 16 <= block <= cell and cell % block == 0 and block & (block - 1) == 0
                assert warps in (4, 8) and 1 <= stages <= 4


@pytest.mark.parametrize("kind", ["fwd", "rows", "dkdv"])
@pytest.mark.parametrize("arch,cls", [(90, "sm90"), (100, "sm90"), (80, "sm80"), (86, "small"), (120, "small")])
def test_prune_offers_the_table_of_the_gpu_and_head_dim(kind, arch, cls, monkeypatch):
    monkeypatch.delenv(A.AUTOTUNE_ENV, raising=False)
    configs = A._all_configs(kind)
    for d, dclass in ((40, 64), (64, 64), (96, 128), (128, 128), (256, 256)):
        bd = max(16, 1 << (d - 1).bit_length())
        got = A.select_configs(kind, configs, _args(arch, bd, 4096, 4096))
        assert [A._config_tuple(c) for c in got] == A.TUNING[kind][cls][dclass]


def test_prune_drops_tiles_longer_than_the_sequence(monkeypatch):
    monkeypatch.delenv(A.AUTOTUNE_ENV, raising=False)
    got = A.select_configs("fwd", A._all_configs("fwd"), _args(90, 64, 40, 4096))
    assert got and all(c.kwargs["BLOCK_M"] <= 64 for c in got)
    # when every listed tile is too long, the table is kept as it is
    got = A.select_configs("fwd", A._all_configs("fwd"), _args(90, 128, 8, 8))
    assert [A._config_tuple(c) for c in got] == A.TUNING["fwd"]["sm90"][128]


def test_autotune_off_takes_the_first_config(monkeypatch):
    monkeypatch.setenv(A.AUTOTUNE_ENV, "0")
    got = A.select_configs("dkdv", A._all_configs("dkdv"), _args(90, 128, 4096, 4096))
    assert [A._config_tuple(c) for c in got] == A.TUNING["dkdv"]["sm90"][128][:1]


@pytest.mark.parametrize("kind", ["fwd", "rows", "dkdv"])
def test_float32_takes_its_own_table(kind, monkeypatch):
    """float32 inputs (IEEE dots) get the small tiles of TUNING_FP32 on every GPU class."""
    monkeypatch.delenv(A.AUTOTUNE_ENV, raising=False)
    for arch in (80, 86, 90):
        got = A.select_configs(kind, A._all_configs(kind), _args(arch, 128, 4096, 4096, fp32=True))
        assert [A._config_tuple(c) for c in got] == A.TUNING_FP32[kind][128]


def test_autotuners_are_keyed_explicitly():
    for tuned in (A._fwd_tuned, A._rows_tuned, A._dkdv_tuned):
        assert {"ARCH", "LQ_KEY", "LK_KEY", "E", "Ev", "MASK_KIND", "WINDOWED", "DOT"} <= set(tuned.keys)


def test_first_configs_compile_for_sm90(tmp_path):
    # in a fresh process: the interpreter (set for the other tests) cannot compile
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "attnfast.triton_kernels.compile_check", "--archs", "90",
                           "--heads", "64", "--masks", "bool", "--first", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["kind"] for r in rows] == ["fwd", "rows", "dkdv"]
    assert all(r["fits"] and r["registers"] > 0 and r["shared"] > 0 for r in rows)
    # float32 at D 128: the tiles the autotuner-off path takes must launch too
    out = tmp_path / "rows32.json"
    proc = subprocess.run([sys.executable, "-m", "attnfast.triton_kernels.compile_check", "--archs", "90",
                           "--heads", "128", "--masks", "none", "--dtype", "fp32", "--first", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(r["fits"] for r in json.loads(out.read_text())["rows"])


def test_forward_sass_for_sm90(tmp_path):
    """The sm90 forward's first D 64 config in its SASS: the products on wgmma only; each score
    formed as one FFMA (qk * hi + qk * lo, the scale times log2 e folded in) and exponentiated
    by one MUFU.EX2 (no multiply by log2 e inside exp); K and V tiles by TMA; the band (causal)
    variant and the plain one both have the two stages (whole tiles, then the masked edge)."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    got = {}
    for windowed in ("0", "1"):
        out = tmp_path / f"sass{windowed}.json"
        proc = subprocess.run([sys.executable, "-m", "attnfast.triton_kernels.compile_check", "--archs", "90",
                               "--kinds", "fwd", "--heads", "64", "--masks", "none", "--first", "--sass",
                               "--windowed", windowed, "--json", str(out)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (row,) = json.loads(out.read_text())["rows"]
        got[windowed] = row
    bm, bn, warps, _ = got["1"]["config"]
    per_thread = bm * bn // (32 * warps)          # scores of a tile held by one thread
    for row in got.values():
        sass = row["sass"]
        assert sass["HGMMA"] > 0 and sass["HMMA"] == 0, sass
        assert sass["FFMA"] >= per_thread, sass   # qk * scale - m fused, a score each
        assert row["spill_bytes"] == 0
        # K/V tiles by TMA (tensor descriptors), no per-element cp.async loads
        assert row["desc"] and sass["UTMALDG"] > 0 and sass["LDGSTS"] == 0, sass
    # both variants have the two stages (masked: the last partial key tile), each one exp2 a score
    assert got["0"]["sass"]["MUFU.EX2"] == got["1"]["sass"]["MUFU.EX2"] >= 2 * per_thread


def test_variant_kernels_compile_for_sm90(tmp_path):
    """The additive and top-k kernels, with the arguments their launchers pass, compile for
    sm90 and fit its shared memory (the interpreter runs them but never compiles them)."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "variants.json"
    proc = subprocess.run([sys.executable, "-m", "attnfast.triton_kernels.compile_check", "--variants", "--archs", "90",
                           "--first", "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    kernels = {r["kind"].split()[-1] for r in rows}
    assert kernels == {"_fwd_kernel", "_bwd_rows_kernel", "_bwd_keys_kernel", "_select_kernel",
                       "_threshold_select_kernel", "_bwd_kernel", "_split_fwd_kernel"}, kernels
    assert all(r["fits"] and r["registers"] > 0 for r in rows)
