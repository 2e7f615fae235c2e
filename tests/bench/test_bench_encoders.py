"""The encoders benchmark in its smoke plan, through the front door (`attnfast.bench.main`, in
this process, so that the process-wide switches it touches can be checked afterwards): every
encoder has rows, the numbers are sane and consistent, the files exist."""
import json
import math
import re

import pytest
import torch
import torch.nn as nn

import attnfast
import attnfast.bench

pytestmark = pytest.mark.skipif(not attnfast.backends()["cpu"].available, reason="cpu backend not built")

ENCODERS = ("attention-attnfast", "attention-torch", "rnn", "lstm", "gru")
RECURRENT = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
PNGS = ("encoders_speed.png", "encoders_memory.png", "encoders_accuracy.png", "encoders_gradnorm.png")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("encoders")
    fastpath = torch.backends.mha.get_fastpath_enabled()
    threads = torch.get_num_threads()
    assert attnfast.bench.main(["encoders", "--smoke", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    assert torch.backends.mha.get_fastpath_enabled() == fastpath      # restored after the run
    assert not attnfast.patching.is_patched()
    assert torch.get_num_threads() == threads
    return out, json.loads((out / "encoders.json").read_text())


def _md_table(md, heading):
    """(header cells, {first cell: other cells}) of the first markdown table under `heading`."""
    lines = md.split(heading + "\n", 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[start:end]]
    return rows[0], {r[0]: r[1:] for r in rows[2:]}


def _label(model):
    if "/" not in model:
        return model
    kind, variant = model.split("/")
    return f"{kind} ({'params' if variant == 'matched-params' else 'hidden'})"


def test_json_has_every_encoder_and_variant(smoke):
    out, data = smoke
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
    # the markdown tables show the JSON's numbers (3 significant digits)
    md = (out / "encoders.md").read_text()
    for mode, heading in (("fwd", "### Tokens/s, forward"), ("fwdbwd", "### Tokens/s, fwd+bwd")):
        header, table = _md_table(md, heading)
        assert header == ["encoder", "hidden", "params"] + [f"L={L}" for L in Ls]
        shown = {r["model"] for r in data["speed"] if r.get("same_model_as") is None}
        assert set(table) == {_label(m) for m in shown}
        for r in data["speed"]:
            if r["mode"] == mode and r.get("same_model_as") is None:
                cell = table[_label(r["model"])][2 + Ls.index(r["L"])]
                assert float(cell.replace(",", "")) == pytest.approx(r["tokens_per_s"], rel=6e-3), (r, cell)


def test_matched_params_are_matched(smoke):
    _, data = smoke
    models = {m["name"]: m for m in data["models"]}
    ref = models["attention-attnfast"]["params"]
    for kind in ("rnn", "lstm", "gru"):
        hid, par = models[f"{kind}/matched-hidden"], models[f"{kind}/matched-params"]
        assert hid["hidden"] == models["attention-attnfast"]["hidden"]
        assert abs(par["params"] - ref) / ref < 0.05, (kind, par["params"], ref)
        assert abs(par["params"] - ref) <= abs(hid["params"] - ref)


def test_hidden_for_params(smoke):
    """The matched-params hidden size is the one whose parameter count is closest to the attention
    layer's, over every hidden size up to well past it (parameter counts from torch's own modules)."""
    _, data = smoke
    d_in = data["speed_plan"]["d_model"]
    models = {m["name"]: m for m in data["models"]}
    target = models["attention-attnfast"]["params"]
    for kind, cls in RECURRENT.items():
        h = models[f"{kind}/matched-params"]["hidden"]
        count = {c: sum(p.numel() for p in cls(d_in, c).parameters()) for c in range(1, 4 * h + 10)}
        assert models[f"{kind}/matched-params"]["params"] == count[h]
        err = abs(count[h] - target)
        assert all(err <= abs(n - target) for n in count.values()), (kind, h)


def test_attention_really_ran_through_sdpa(smoke):
    _, data = smoke
    v = data["verification"]
    for mode in ("fwd", "fwdbwd"):
        af, pt = v[f"attention-attnfast {mode}"], v[f"attention-torch {mode}"]
        assert af["sdpa_calls"] >= 1 and af["attnfast_fwd"] >= 1 and af["torch_attention"] == 0
        assert pt["sdpa_calls"] >= 1 and pt["attnfast_fwd"] == 0 and pt["torch_attention"] >= 1
    assert v["attention-attnfast fwdbwd"]["attnfast_bwd"] >= 1


def test_long_range_rows(smoke):
    _, data = smoke
    rows = data["long_range"]
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
    out, data = smoke
    for name in PNGS:
        assert (out / name).stat().st_size > 1000, name
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert data["plots"] == list(PNGS)
    md = (out / "encoders.md").read_text()
    for heading in ("### Crossover lengths", "### Held-out accuracy vs distance", "### Gradient norm at position 0"):
        assert heading in md


def test_crossover_interpolation(smoke):
    """Every crossover record follows the rule, recomputed here from the speed rows: the length where
    recurrent tokens/s overtakes attention's, interpolated on log-log after the last length where
    attention led; none when the recurrent encoder leads everywhere or attention leads at the end."""
    _, data = smoke
    rows = [r for r in data["speed"] if r.get("same_model_as") is None]
    recurrent = sorted({r["model"] for r in rows if r["encoder"] in RECURRENT})
    cross = {(c["recurrent"], c["attention"], c["mode"]): c for c in data["crossover"]}
    assert set(cross) == {(rec, att, m) for rec in recurrent for att in ENCODERS[:2] for m in ("fwd", "fwdbwd")}
    for (rec, att, mode), c in cross.items():
        tps = {}
        for r in rows:
            if r["mode"] == mode and r["model"] in (rec, att):
                tps.setdefault(r["L"], {})[r["model"]] = r["tokens_per_s"]
        Ls = sorted(tps)
        ratio = [tps[L][att] / tps[L][rec] for L in Ls]       # > 1: attention faster
        assert c["ratio_at_L"] == {str(L): pytest.approx(q, abs=5.1e-5) for L, q in zip(Ls, ratio)}
        assert c["sign_changes"] == sum((a > 1) != (b > 1) for a, b in zip(ratio, ratio[1:]))
        if all(q <= 1 for q in ratio):
            assert c["crossover_L"] is None and c["text"] == f"recurrent faster at every L (>= {Ls[0]})"
        elif ratio[-1] > 1:
            assert c["crossover_L"] is None and c["text"] == f"attention faster at L = {Ls[-1]} (longest measured)"
        else:
            i = max(j for j in range(len(Ls) - 1) if ratio[j] > 1)
            a, b = math.log(ratio[i]), math.log(ratio[i + 1])
            expect = math.exp(math.log(Ls[i]) + a / (a - b) * (math.log(Ls[i + 1]) - math.log(Ls[i])))
            assert Ls[i] <= c["crossover_L"] <= Ls[i + 1]
            assert c["crossover_L"] == pytest.approx(expect, abs=0.06) and c["text"] == f"~{expect:.0f}"
    md = (smoke[0] / "encoders.md").read_text()
    header, table = _md_table(md, "### Crossover lengths")
    assert header[0] == "recurrent encoder" and set(table) == {_label(m) for m in recurrent}


def test_stalled_multithread_entries_are_dropped(smoke):
    """A multi-thread entry is left out of the timed rounds only against the same model's fewest-thread
    warm-up; what is left out is not timed, and the fewest-thread entry always is."""
    _, data = smoke
    for r in data["speed"]:
        timed = set(r["median_ms_by_threads"])
        dropped = set(r["stalled_threads_dropped"])
        fewest = min(map(int, timed | dropped))
        assert str(fewest) in timed and not (timed & dropped), r
        assert str(r["threads"]) in timed
        assert all(re.fullmatch(r"warm-up [\d.]+ ms vs [\d.]+ ms at \d+ thread\(s\)", v)
                   for v in r["stalled_threads_dropped"].values()), r


def test_registered(capsys):
    assert attnfast.bench.main(["--list"]) == 0
    listed = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    assert "encoders" in listed and "RNN/LSTM/GRU" in listed["encoders"]
    assert "encoders" in listed["all"]           # part of `make bench`
    assert attnfast.bench.main(["encoders", "--help"]) == 0
    text = capsys.readouterr().out
    for opt in ("--quick", "--smoke", "--device", "--out", "--threads", "--no-progress"):
        assert opt in text, opt
