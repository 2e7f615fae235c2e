"""The pytest plugin, used from outside: the example project (tests/harness_example) and a
project with a buggy kernel, each run by pytest in a process of its own, finding the plugin
through the installed package's `pytest11` entry point."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "harness_example"


def _pytest(folder, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=600)


def test_plugin_is_registered_and_light():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="pytest11") if e.name == "attnfast"]
    probe = subprocess.run([sys.executable, "-c", f"import sys, {ep.value}; print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "False", probe.stderr  # loading the plugin imports no torch


def test_example_project_passes_with_one_item_per_case(tmp_path):
    # run from a copy outside this repository: no conftest or configuration of attnfast's applies
    for f in EXAMPLE.iterdir():
        if f.suffix == ".py":
            shutil.copy(f, tmp_path)
    proc = _pytest(tmp_path, "-rs")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # 18 cases x 2 dtypes: 34 pass, the 2 dropout runs skip (the example's kernel has no dropout)
    assert "34 passed, 2 skipped" in proc.stdout, proc.stdout
    assert "dropout needs a dropout_mask hook" in proc.stdout


def test_a_buggy_kernel_fails_naming_the_case_and_its_numbers(tmp_path):
    (tmp_path / "test_buggy.py").write_text('''
import math
import pytest
import torch


def buggy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    # ignores `scale`; otherwise torch's
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                            enable_gqa=enable_gqa)


@pytest.mark.attention_cases(dtypes=[torch.float32], devices=["cpu"])
def test_buggy(attention_case):
    attention_case.check(buggy)
''')
    proc = _pytest(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed, 16 passed, 1 skipped" in proc.stdout, proc.stdout
    assert "FAILED test_buggy.py::test_buggy[explicit_scale-float32-cpu]" in proc.stdout
    assert "explicit_scale-float32-cpu: out: err" in proc.stdout and "FAIL" in proc.stdout


@pytest.mark.parametrize("marker", ["", "@pytest.mark.attention_cases('flash', dtypes=[torch.bfloat16], "
                                        "devices=['cpu'], grads=False)"])
def test_marker_keywords_and_default(tmp_path, marker):
    (tmp_path / "test_ids.py").write_text(f'''
import pytest
import torch


{marker}
def test_ids(attention_case):
    assert attention_case.signature in ("sdpa", "flash")
''')
    proc = _pytest(tmp_path, "--collect-only")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if marker:  # flash: only the cases flash_attn_func can express, bfloat16 only
        assert "test_ids[causal_bottom_right-bfloat16-cpu]" in proc.stdout
        assert "bool_mask" not in proc.stdout and "float32" not in proc.stdout
    else:  # the default sweep: sdpa, three dtypes
        assert "test_ids[bool_mask_broadcast-float16-" in proc.stdout
