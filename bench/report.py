"""REPORT.md: the conditions, the kernel and encoder tables, and their plots,
assembled from the files the suites wrote into one result directory."""
from __future__ import annotations

import json
from pathlib import Path


def _conditions_table(cond, plan, timings):
    rows = [("machine", f"{cond.get('cpu_model')}, {cond.get('logical_cpus')} logical CPUs, "
                        f"{cond.get('threads')} torch threads"),
            ("attnfast CPU path", cond.get("cpu_isa")),
            ("GPU", cond.get("gpu", "none")),
            ("device / dtype", f"{cond.get('device')} / {cond.get('dtype')}"),
            ("versions", f"attnfast {cond.get('attnfast')} (git {cond.get('git')}), torch {cond.get('torch')}, "
                         f"triton {cond.get('triton')}, python {cond.get('python')}"),
            ("plan", plan),
            ("run time", ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())),
            ("date", cond.get("timestamp"))]
    lines = ["| | |", "|:--|:--|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _section(out, md_name, json_name, title, optional=False):
    md = out / md_name
    if not md.exists():
        return [] if optional else [f"## {title}", "", f"(not run: {md_name} missing)", ""]
    lines = [f"## {title}", "", md.read_text().strip(), ""]
    js = out / json_name
    if js.exists():
        plots = json.loads(js.read_text()).get("plots", [])
        lines += [f"![{p}]({p})" for p in plots] + [""]
    return lines


def write_report(out, cond, plan, timings):
    out = Path(out)
    parts = ["# attnfast benchmark report", "", _conditions_table(cond, plan, timings), ""]
    parity = out / "parity.json"
    if parity.exists():
        p = json.loads(parity.read_text())
        parts += ["## Parity", "", f"{p['cases_ok']}/{p['cases']} cases of the CPU kernel within the rule "
                  "max|kernel − fp64 truth| ≤ 2·max|same-precision naive − truth| + 2 ulp·max|truth| "
                  "(out, lse, dq, dk, dv; `parity.json`).", ""]
    parts += _section(out, "kernels.md", "kernels.json", "Kernels")
    parts += _section(out, "encoders.md", "encoders.json", "Encoders: attention vs RNN, LSTM, GRU")
    parts += _section(out, "ring.md", "ring.json", "Context parallelism: ring attention",
                      optional=True)
    parts += _section(out, "variants.md", "variants.json", "Attention variants: additive and top-k",
                      optional=True)
    path = out / "REPORT.md"
    path.write_text("\n".join(parts).rstrip() + "\n")
    return path


def run(ctx):
    """Suite `report`: REPORT.md from what the suites run so far (or before) left in ctx.out."""
    path = write_report(ctx.out, ctx.conditions(), ctx.plan, ctx.timings)
    print(f"report: {path}")
    return True
