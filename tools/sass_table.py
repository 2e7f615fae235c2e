"""Recompile attnfast's rows of bench/results/triton_sass_sm90.json for sm90 and print the table.

    python tools/sass_table.py [--json bench/results/triton_sass_sm90.json] [--write]

Rows whose `who` is "tutorial" (the Triton tutorial's kernels, compiled once from a copy outside
the repository) and "old" (an earlier attnfast, kept as history) are taken from the file as
they are.  attnfast's current kernels are compiled now through
attnfast.triton_kernels.compile_check, on the configs of the file's "new" rows: the forward
both ways, "tma" (K/V tiles through tensor descriptors, as the launcher takes them on sm90 for
16-bit inputs) and "pointers" (as on other GPUs, or with ATTNFAST_TRITON_TMA=0); the backward
kernels as they are ("new").  --write rewrites the JSON; the table goes to stdout.
"""
import argparse
import json
import sys

from attnfast.triton_kernels.compile_check import SASS_OPS, compile_one

LABEL = {
    "tutorial": "Triton tutorial (06-fused-attention)",
    "old": "attnfast, one masked loop, exp",
    "pointers": "attnfast, exp2, two stages, pointer loads",
    "tma": "attnfast, exp2, two stages, K/V by TMA",
    "new": "attnfast now (loop tiles by TMA)",
    "new-pointers": "attnfast now (32-row tiles: pointer loads)",
}
KIND = {"fwd": "forward", "bwd": "backward (one kernel)", "rows": "backward dQ (+ delta pass)",
        "dkdv": "backward dK/dV"}
COLS = ("HGMMA", "HMMA", "MUFU.EX2", "FFMA", "FMUL", "LDGSTS", "UTMALDG")


def compiled_rows(row, arch, dtype):
    """attnfast's rows for one configuration of the file."""
    cfg, D, causal = tuple(row["config"]), row["D"], row["causal"]
    whos = ("tma", "pointers") if row["kind"] == "fwd" else ("new",)
    out = []
    for who in whos:
        r = compile_one(row["kind"], arch, cfg, D, dtype, 0, causal, sass=True, desc=who != "pointers")
        if who == "new" and not r["desc"]:  # a config below DESC_ROWS takes pointer loads
            who = "new-pointers"
        out.append(dict(who=who, kind=row["kind"], config=list(cfg), D=D, causal=causal, dtype=dtype,
                        shared=r["shared"], registers=r["registers"], spill_bytes=r["spill_bytes"],
                        **{op: r["sass"][op] for op in SASS_OPS}, instructions=r["sass"]["instructions"]))
    return out


def table(rows):
    head = ("| kernel | kind | D | causal | tile (M, N, warps, stages) | regs | spill B | smem KiB | "
            + " | ".join(COLS) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [LABEL[r["who"]], KIND[r["kind"]], str(r["D"]), str(r["causal"]), str(tuple(r["config"]))]
        if "registers" in r:
            cells += [str(r["registers"]), str(r["spill_bytes"]), str(round(r["shared"] / 1024))]
            cells += [str(r[op]) for op in COLS]
        else:
            cells += ["n/a: " + (r.get("error") or "no figures").splitlines()[0][:60]] + [""] * (2 + len(COLS))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="bench/results/triton_sass_sm90.json")
    p.add_argument("--write", action="store_true")
    a = p.parse_args(argv)
    with open(a.json) as f:
        doc = json.load(f)
    rows = []
    for row in doc["rows"]:
        if row["who"] in ("tutorial", "old"):
            rows.append(row)
        elif row["who"] != "pointers":  # a forward's "tma" row compiles its "pointers" row too
            row = dict(row, who="new" if row["who"] == "new-pointers" else row["who"])
            rows.extend(compiled_rows(row, doc["arch"], doc["dtype"]))
        print(f"{len(rows)} rows", file=sys.stderr, flush=True)
    if a.write:
        import triton

        doc.update(triton=triton.__version__, rows=rows)
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
