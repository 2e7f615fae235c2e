"""The encoders benchmark in its smoke plan: every encoder has rows, the numbers are sane, the files exist."""
import json
import math

import pytest

import attnfast

pytestmark = pytest.mark.skipif(not attnfast.backends()["cpu"].available, reason="cpu backend not built")

ENCODERS = ("attention-attnfast", "attention-torch", "rnn", "lstm", "gru")
PNGS = ("encoders_speed.png", "encoders_memory.png", "encoders_accuracy.png", "encoders_gradnorm.png")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    import torch

    from bench.encoders import run_encoders

    out = tmp_path_factory.mktemp("encoders")
    fastpath = torch.backends.mha.get_fastpath_enabled()
    result = run_encoders("smoke", out, progress=False)
    assert torch.backends.mha.get_fastpath_enabled() == fastpath      # restored after the run
    assert not attnfast.patching.is_patched()
    return out, result


def test_json_has_every_encoder_and_variant(smoke):
    out, result = smoke
    data = json.loads((out / "encoders.json").read_text())
    assert data["speed"] == result["speed"]
    c = data["conditions"]
    for key in ("cpu_model", "cpu_isa", "threads", "dtype", "torch", "attnfast", "timestamp"):
        assert c.get(key) is not None, key
    Ls = sorted({r["L"] for r in data["speed"]})
    assert len(Ls) >= 2
    for enc in ENCODERS:
        for variant in ("matched-hidden", "matched-params"):
            for mode in ("fwd", "fwdbwd"):
                rows = [r for r in data["speed"] if (r["encoder"], r["variant"], r["mode"]) == (enc, variant, mode)]
                assert sorted(r["L"] for r in rows) == Ls, (enc, variant, mode)
                for r in rows:
                    assert r["median_ms"] > 0 and all(t > 0 for t in r["times_ms"]), r
                    assert r["tokens_per_s"] == pytest.approx(r["B"] * r["L"] / (r["median_ms"] / 1e3), rel=1e-3)
                    assert r["peak_mib"] is None or r["peak_mib"] >= 0
                    if mode == "fwdbwd":
                        assert r["saved_for_backward_mib"] > 0, r    # something is saved for backward


def test_matched_params_are_matched(smoke):
    _, result = smoke
    models = {m["name"]: m for m in result["models"]}
    ref = models["attention-attnfast"]["params"]
    for kind in ("rnn", "lstm", "gru"):
        hid, par = models[f"{kind}/matched-hidden"], models[f"{kind}/matched-params"]
        assert hid["hidden"] == models["attention-attnfast"]["hidden"]
        assert abs(par["params"] - ref) / ref < 0.05, (kind, par["params"], ref)
        assert abs(par["params"] - ref) <= abs(hid["params"] - ref)


def test_attention_really_ran_through_sdpa(smoke):
    _, result = smoke
    v = result["verification"]
    for mode in ("fwd", "fwdbwd"):
        af, pt = v[f"attention-attnfast {mode}"], v[f"attention-torch {mode}"]
        assert af["sdpa_calls"] >= 1 and af["attnfast_fwd"] >= 1 and af["torch_attention"] == 0
        assert pt["sdpa_calls"] >= 1 and pt["attnfast_fwd"] == 0 and pt["torch_attention"] >= 1
    assert v["attention-attnfast fwdbwd"]["attnfast_bwd"] >= 1


def test_long_range_rows(smoke):
    _, result = smoke
    rows = result["long_range"]
    dists = sorted({r["distance"] for r in rows})
    assert len(dists) >= 2
    for enc in ENCODERS:
        got = [r for r in rows if r["encoder"] == enc]
        assert sorted(r["distance"] for r in got) == dists, enc
        for r in got:
            assert 0.0 <= r["accuracy"] <= 1.0, r
            for key in ("grad_norm_pos0_init", "grad_norm_pos0_trained", "grad_norm_query_init"):
                assert math.isfinite(r[key]) and r[key] >= 0, (key, r)
            assert r["grad_norm_query_init"] > 0, r
            assert r["n_eval"] > 0 and r["steps"] > 0
    # both attention routes start from the same weights and see the same batches
    for d in dists:
        a, b = (next(r for r in rows if r["encoder"] == e and r["distance"] == d) for e in ENCODERS[:2])
        assert a["grad_norm_pos0_init"] == pytest.approx(b["grad_norm_pos0_init"], rel=1e-3)


def test_files_written(smoke):
    out, result = smoke
    for name in PNGS:
        assert (out / name).stat().st_size > 1000, name
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert result["plots"] == list(PNGS)
    md = (out / "encoders.md").read_text()
    for heading in ("### Crossover lengths", "### Held-out accuracy vs distance", "### Gradient norm at position 0"):
        assert heading in md


def test_crossover_interpolation():
    from bench.encoders import crossovers

    def rows(model, encoder, tps):
        return [dict(model=model, encoder=encoder, mode=m, L=L, tokens_per_s=t) for L, t in tps.items()
                for m in ("fwd", "fwdbwd")]

    # attention: 1000 tokens/s at L=100, falling as 1/L; the RNN: flat 100 tokens/s -> equal at L=1000
    att = {100: 1000.0, 1000 / 2: 200.0, 2000: 50.0}
    data = rows("attention-attnfast", "attention-attnfast", att) + rows("attention-torch", "attention-torch", att)
    data += rows("rnn/matched-hidden", "rnn", {L: 100.0 for L in att})
    data += rows("gru/matched-hidden", "gru", {L: 10.0 for L in att})           # never faster
    c = {(x["recurrent"], x["attention"], x["mode"]): x for x in crossovers(data)}
    assert c[("rnn/matched-hidden", "attention-attnfast", "fwd")]["crossover_L"] == pytest.approx(1000, rel=1e-6)
    assert c[("gru/matched-hidden", "attention-torch", "fwdbwd")]["crossover_L"] is None


def test_hidden_for_params():
    from bench.encoders import hidden_for_params, recurrent_params

    for kind in ("rnn", "lstm", "gru"):
        for d_in, target in ((128, 198272), (32, 12704), (64, 5000)):
            h = hidden_for_params(kind, d_in, target)
            err = abs(recurrent_params(kind, d_in, h) - target)
            assert all(err <= abs(recurrent_params(kind, d_in, c) - target) for c in range(1, 4 * h + 10)), (kind, h)


def test_registered():
    from bench import SUITES, load_suite

    assert "encoders" in SUITES and not SUITES["encoders"].default
    mod = load_suite("encoders")
    assert mod.DESCRIPTION and callable(mod.run)


def test_stalled_multithread_entries_are_dropped():
    from bench.encoders import _drop_stalled

    class Model:
        def __init__(self, name):
            self.name = name

    a, b = Model("a"), Model("b")
    entries = [(a, 1, None), (a, 2, None), (b, 1, None), (b, 2, None)]
    # a at 2 threads stalled (50x); b at 1 thread paid the first call at this size (slow) and must stay
    warm = {("a", 1): 0.01, ("a", 2): 0.5, ("b", 1): 0.05, ("b", 2): 0.008}
    keep, dropped = _drop_stalled(entries, warm, 3.0)
    assert [(m.name, t) for m, t, _ in keep] == [("a", 1), ("b", 1), ("b", 2)]
    assert list(dropped) == [("a", 2)]
