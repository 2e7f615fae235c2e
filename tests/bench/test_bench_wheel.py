"""The benchmarks as a user of the package gets them: build the wheel of a copy of the sources
(this compiles attnfast._C, CPU only), install it into a fresh virtual environment, and run
`python -m attnfast bench ... --smoke` from a directory outside the source tree.

Nothing is downloaded: the wheel is built without build isolation and installed without
dependencies or an index; the new environment reaches torch and the other packages of this
interpreter through a .pth file that lists their folders (a folder named there adds its modules,
not the .pth hooks in it, so an editable install of attnfast there stays out of sight).

Cost: about 2 minutes on 2 cores, nearly all of it the compilation of the extension.
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("setup.py", "pyproject.toml", "README.md", "attnfast", "bench", "triton_kernels", "csrc")
DEPENDENCIES = ("torch", "numpy", "matplotlib", "tqdm", "triton")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (ROOT / "setup.py").is_file(), reason="needs the source tree"),
]


def _run(cmd, cwd, timeout, env=None):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    src, wheels, venv, work = base / "src", base / "wheels", base / "venv", base / "work"
    src.mkdir()                      # a copy: the build writes build/ and *.egg-info next to setup.py
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "results", "build", "*.egg-info")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy(ROOT / name, src / name)
    env = dict(os.environ, ATTNFAST_NO_CUDA="1")
    env.pop("PYTHONPATH", None)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels, src],
         cwd=base, timeout=1500, env=env)
    (wheel,) = wheels.glob("attnfast-*.whl")

    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=base, timeout=120)
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base, 60).strip())
    folders = []
    for mod in DEPENDENCIES:
        try:
            m = __import__(mod)
        except ImportError:
            continue
        folder = str(Path(m.__file__).resolve().parent.parent)
        if folder not in folders:
            folders.append(folder)
    (site / "attnfast_test_deps.pth").write_text("\n".join(folders) + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", wheel], cwd=base,
         timeout=300, env=env)
    work.mkdir()
    return wheel, venv, py, work, env


def test_wheel_holds_the_benchmarks(installed):
    wheel = installed[0]
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("attnfast/bench/__init__.py", "attnfast/bench/cli.py", "attnfast/bench/kernels.py",
                 "attnfast/bench/memprobe.py", "attnfast/bench/encoders/__init__.py",
                 "attnfast/triton_kernels/__init__.py", "attnfast/__main__.py"):
        assert name in names, name
    assert any(n.startswith("attnfast/_C") and n.endswith(".so") for n in names)
    assert not [n for n in names if "results" in n or n.startswith("bench/")]


def test_bench_smoke_from_elsewhere(installed):
    _, venv, py, work, env = installed
    where = _run([py, "-c", "import attnfast, attnfast.bench, attnfast._C; print(attnfast.bench.__file__); "
                            "print(attnfast._C.__file__)"], cwd=work, timeout=120, env=env).split()
    for path in where:                       # the installed package, not the source tree
        assert Path(path).resolve().is_relative_to(venv.resolve()), where

    out = _run([py, "-m", "attnfast", "bench", "all", "--smoke", "--device", "cpu", "--no-progress"], cwd=work,
               timeout=600, env=env)
    results = work / "attnfast-bench-results"            # the default result folder when installed
    for name in ("REPORT.md", "parity.json", "kernels.json", "kernels.md", "encoders.json", "encoders.md"):
        assert (results / name).is_file(), (name, out[-2000:])
    report = (results / "REPORT.md").read_text()
    assert "## Kernels" in report and "## Encoders: attention vs RNN, LSTM, GRU" in report
    cond = json.loads((results / "kernels.json").read_text())["conditions"]
    assert cond["git"] is None and cond["device"] == "cpu"      # no checkout to describe
    assert not list(venv.rglob("results")) and not list(venv.rglob("attnfast-bench-results"))

    # the suites that start subprocesses of the package: memory probes, ring ranks
    _run([py, "-m", "attnfast", "bench", "cpu_kernels", "--quick", "--out", "cpu"], cwd=work, timeout=600, env=env)
    mem = json.loads((work / "cpu" / "cpu_kernels.json").read_text())["memory"]
    assert mem and all(m["peak_mib"] is not None for m in mem), mem
    _run([py, "-m", "attnfast", "bench", "ring", "--smoke", "--out", "ring"], cwd=work, timeout=600, env=env)
    assert json.loads((work / "ring" / "ring.json").read_text())["records"]
