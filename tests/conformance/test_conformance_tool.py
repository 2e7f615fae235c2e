"""tools/torch_sdpa_conformance.py's bookkeeping: junit outcomes, the comparison with the list of
expected differences, and the groups (PyTorch's test file itself is not in this repository)."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("conformance", ROOT / "tools" / "torch_sdpa_conformance.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="test_transformers.TestSDPACPU" name="test_a_cpu" />
<testcase classname="test_transformers.TestSDPACPU" name="test_b_dropout_cpu"><failure message="x"/></testcase>
<testcase classname="test_transformers.TestSDPACPU" name="test_c_cpu"><error message="y"/></testcase>
<testcase classname="test_transformers.TestSDPACPU" name="test_d_cpu"><skipped message="z"/></testcase>
</testsuite></testsuites>"""


def test_junit_outcomes(tmp_path):
    path = tmp_path / "r.xml"
    path.write_text(JUNIT)
    assert tool.junit_outcomes(path) == {
        "TestSDPACPU::test_a_cpu": "passed", "TestSDPACPU::test_b_dropout_cpu": "failed",
        "TestSDPACPU::test_c_cpu": "failed", "TestSDPACPU::test_d_cpu": "skipped"}


def test_a_new_failure_an_entry_that_passes_and_an_unexplained_one_are_found():
    outcomes = {"A::a": "passed", "A::b_dropout": "failed", "A::c": "failed", "A::d": "failed"}
    expected = [dict(test="A::a", group="dropout", why="-"), dict(test="A::b_dropout", group="dropout", why="-"),
                dict(test="A::d", group="unexplained", why="-")]
    new, fixed, unexplained = tool.compare(outcomes, expected)
    assert (new, fixed, unexplained) == (["A::c"], ["A::a"], ["A::d"])


def test_groups_and_the_checked_in_list():
    assert tool.group_of("TestTransformersCPU::test_x_dropout_p_0_2_cpu")[0] == "dropout"
    assert tool.group_of("TestTransformersCPU::test_mask_check_fastpath_cpu")[0] == "fast path"
    assert tool.group_of("TestSDPACPU::test_something_new_cpu")[0] == "unexplained"
    doc = json.loads((ROOT / "tests" / "conformance" / "torch_sdpa_differences.json").read_text())
    assert doc["entries"] and all(e["group"] != "unexplained" and e["why"] for e in doc["entries"])
