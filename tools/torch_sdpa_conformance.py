"""PyTorch's own SDPA tests against attnfast: run test/test_transformers.py of the torch release in
use with torch.nn.functional.scaled_dot_product_attention patched to attnfast, and compare what
fails with the checked-in list of expected differences.

    python tools/torch_sdpa_conformance.py TEST_TRANSFORMERS_PY [--expected FILE] [--write] [-k EXPR]

The test file is PyTorch's (take it from the release tag that matches the installed torch); it
is run from a scratch folder, never copied into this repository.  The patch goes in before the
file imports scaled_dot_product_attention by name (a conftest.py of the scratch folder).  CPU
tests only (-k "cpu or CPU" by default).

Exit status 1 when a test fails that the list does not name (a new difference: fix it, or add
it with its group and reason) or when the list names a group no user would accept
("unexplained"); entries that now pass are reported, to be removed.  --write rewrites the list
from this run, each entry's group and reason from GROUPS (the first pattern that matches its
test id; "torch fails too" for a test that fails without the patch as well), for a person to
review.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

DEFAULT_LIST = os.path.join(os.path.dirname(__file__), "..", "tests", "conformance", "torch_sdpa_differences.json")

# (pattern on the test id, group, why): the groups of expected differences and their reasons.
GROUPS = [
    (r"transformerencoderlayer_subclass", "dropout",
     "compares a layer in training mode (dropout 0.1) with its TorchScript copy, which runs torch's own "
     "kernel and so torch's dropout mask"),
    (r"dropout", "dropout",
     "compares against torch's own dropout mask; attnfast draws its mask from its Philox stream "
     "(README: where attnfast differs); statistics equal, positions differ"),
    (r"fastpath|fast_path|native_mha|mask_check", "fast path",
     "mocks or inspects torch's C++ inference fast paths, which patch() switches off so that those "
     "modules reach attnfast"),
    (r"", "unexplained", "no reason yet: fix it or explain it"),
]

_CONFTEST = """\
import attnfast

attnfast.patch()  # before the test module binds scaled_dot_product_attention by name
"""


def group_of(test_id):
    for pattern, group, why in GROUPS:
        if re.search(pattern, test_id):
            return group, why
    raise AssertionError("the last pattern matches everything")


def junit_outcomes(path):
    """{test id: "passed" | "failed" | "skipped"} of a junit XML report; ids as
    "Class::test" (pytest's classname without the module, and the test's name)."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        cls = case.get("classname", "").split(".")[-1]
        tid = f"{cls}::{case.get('name')}" if cls else case.get("name")
        kinds = {child.tag for child in case}
        out[tid] = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
    return out


def compare(outcomes, expected):
    """(new, fixed, unexplained): failures the list does not name, listed tests that passed,
    listed entries of the "unexplained" group."""
    listed = {e["test"]: e for e in expected}
    failed = {t for t, o in outcomes.items() if o == "failed"}
    new = sorted(failed - set(listed))
    fixed = sorted(t for t in listed if outcomes.get(t) == "passed")
    unexplained = sorted(t for t, e in listed.items() if e["group"] == "unexplained")
    return new, fixed, unexplained


def run(test_file, k_expr, junit, patched=True):
    """pytest on a scratch copy of test_file with attnfast patched in (or not); returns the junit path."""
    work = tempfile.mkdtemp(prefix="torch-sdpa-conformance-")
    try:
        shutil.copy(test_file, os.path.join(work, "test_transformers.py"))
        with open(os.path.join(work, "conftest.py"), "w") as f:
            f.write(_CONFTEST if patched else "")
        sibling = "test_cpp_extensions_open_device_registration"
        src = os.path.join(os.path.dirname(os.path.abspath(test_file)), sibling + ".py")
        if os.path.exists(src):  # a helper module of torch's test folder that the file imports
            shutil.copy(src, work)
        else:
            with open(os.path.join(work, sibling + ".py"), "w") as f:
                f.write("def remove_build_path():\n    pass\n\n\ndef generate_faked_module():\n    return None\n")
        if os.path.exists(junit):
            os.remove(junit)  # (a stale report must not stand in for this run)
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_transformers.py",
                               "-k", k_expr, f"--junitxml={os.path.abspath(junit)}"], cwd=work, check=False)
        if proc.returncode not in (0, 1) or not os.path.exists(junit):  # 1: some tests failed
            raise SystemExit(f"pytest could not run {test_file} (exit status {proc.returncode})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return junit


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("test_file", help="PyTorch's test/test_transformers.py of the installed release")
    p.add_argument("--expected", default=DEFAULT_LIST)
    p.add_argument("--write", action="store_true", help="rewrite the list from this run")
    p.add_argument("-k", dest="k_expr", default="cpu or CPU")
    p.add_argument("--junit", default="torch_sdpa_conformance.xml")
    a = p.parse_args(argv)
    import torch

    outcomes = junit_outcomes(run(a.test_file, a.k_expr, a.junit))
    plain = junit_outcomes(run(a.test_file, a.k_expr, a.junit + ".torch.xml", patched=False)) if a.write else {}
    counts = {o: sum(v == o for v in outcomes.values()) for o in ("passed", "failed", "skipped")}
    print(f"torch {torch.__version__}, attnfast patched in: {counts}")
    if not counts["passed"]:
        print("no test passed: not a run of PyTorch's SDPA tests (check the file and -k)")
        return 1
    if a.write:
        entries = []
        for t in sorted(t for t, o in outcomes.items() if o == "failed"):
            group, why = group_of(t)
            if plain.get(t) == "failed":
                group, why = "torch fails too", "fails with torch's own SDPA as well (not patched)"
            entries.append(dict(test=t, group=group, why=why))
        with open(a.expected, "w") as f:
            json.dump(dict(torch=torch.__version__, entries=entries), f, indent=1)
        print(f"wrote {len(entries)} entries to {a.expected}")
        return 0
    with open(a.expected) as f:
        doc = json.load(f)
    if doc.get("torch") != torch.__version__:
        print(f"note: the list is for torch {doc.get('torch')}, this is {torch.__version__}")
    new, fixed, unexplained = compare(outcomes, doc["entries"])
    for t in fixed:
        print(f"now passes, remove from the list: {t}")
    for t in unexplained:
        print(f"listed without a reason: {t}")
    for t in new:
        print(f"NEW DIFFERENCE: {t}")
    groups = {}
    for e in doc["entries"]:
        groups[e["group"]] = groups.get(e["group"], 0) + 1
    print(f"{len(doc['entries'])} expected differences {groups}; {len(new)} new, {len(fixed)} now passing")
    return 1 if new or unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
