"""attnfast's pytest plugin (entry point `attnfast`, loaded when attnfast is installed).

A top-level module of its own, so that pytest loading it imports neither attnfast nor torch:
a test that asks for `attention_case` does.

One test, one pytest item per case of attnfast.testing's sweep:

    import pytest, torch

    @pytest.mark.attention_cases(signature="sdpa", dtypes=[torch.float32, torch.bfloat16])
    def test_my_attention(attention_case):
        attention_case.check(my_attention)   # fails naming the case and its numbers

The `attention_case` fixture is a CaseRun (attnfast.harness); the `attention_cases` marker takes
check_attention's keywords (signature, dtypes, devices, cases, grads, seed, dropout_mask).
Without the marker the test runs the default sweep with the sdpa signature.
"""
from __future__ import annotations

MARKER = "attention_cases"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        f"{MARKER}(signature='sdpa', dtypes=None, devices=None, cases=None, grads=True, seed=None, "
        "dropout_mask=None): parametrise the test's attention_case fixture over attnfast's sweep of "
        "attention cases (attnfast.testing.check_attention's keywords)",
    )


def pytest_generate_tests(metafunc):
    if "attention_case" not in metafunc.fixturenames:
        return
    from attnfast.harness import sweep

    marker = metafunc.definition.get_closest_marker(MARKER)
    kwargs = dict(marker.kwargs) if marker is not None else {}
    if marker is not None and marker.args:
        kwargs.setdefault("signature", marker.args[0])
    runs = sweep(**kwargs)
    metafunc.parametrize("attention_case", runs, ids=[r.id for r in runs])
