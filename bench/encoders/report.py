"""encoders.md and the plots: tables of the speed rows, the crossovers and the
long-range results, and a few sentences computed from the numbers."""
from __future__ import annotations

from ..common import MODES as MODE_LABEL
from ..common import fmt_num, md_table
from .models import ATTENTION, INIT_NOTE, MODES, RECURRENT, label

PLOTS = ("encoders_speed.png", "encoders_memory.png", "encoders_accuracy.png", "encoders_gradnorm.png")


# ---------------------------------------------------------------------------
# Tables and plots
# ---------------------------------------------------------------------------
def _speed_table(rows, mode, key, scale=1.0, digits=3):
    Ls = sorted({r["L"] for r in rows})
    names = list(dict.fromkeys(r["model"] for r in rows if r["variant"] == "matched-hidden" or
                               r["encoder"] in RECURRENT))
    body = []
    for name in names:
        got = {r["L"]: r for r in rows if r["model"] == name and r["mode"] == mode
               and r.get("same_model_as") is None}
        if not got:
            continue
        first = next(iter(got.values()))
        body.append([label(name), first["hidden"], f"{first['params']:,}"] +
                    [fmt_num(None if got.get(L, {}).get(key) is None else got[L][key] * scale, digits)
                     for L in Ls])
    return md_table(["encoder", "hidden", "params"] + [f"L={L}" for L in Ls], body)


def _threads_line(rows):
    used = {}
    for r in rows:
        if r.get("same_model_as") is None:
            used.setdefault((r["mode"], r["threads"]), []).append(f"{label(r['model'])}@{r['L']}")
    parts = []
    for mode in MODES:
        counts = {t: len(v) for (m, t), v in used.items() if m == mode}
        parts.append(f"{MODE_LABEL[mode]}: " + ", ".join(f"{n} rows at {t} thread{'s' if t > 1 else ''}"
                                                        for t, n in sorted(counts.items())))
    return "; ".join(parts)


def _crossover_table(cross):
    body = []
    recs = list(dict.fromkeys(c["recurrent"] for c in cross))
    for rec in recs:
        cells = [label(rec)]
        for mode in MODES:
            for att in ATTENTION:
                c = next((c for c in cross if (c["mode"], c["recurrent"], c["attention"]) == (mode, rec, att)), None)
                cells.append("-" if c is None else c["text"] + (f" ({c['sign_changes']} crossings)"
                                                                if c["sign_changes"] > 1 else ""))
        body.append(cells)
    head = ["recurrent encoder"] + [f"{MODE_LABEL[m]} vs {a}" for m in MODES for a in ATTENTION]
    return md_table(head, body, align=["l"] * len(head))


def _task_table(rows, key, digits=3):
    ds = sorted({r["distance"] for r in rows})
    body = []
    for enc in dict.fromkeys(r["encoder"] for r in rows):
        got = {r["distance"]: r[key] for r in rows if r["encoder"] == enc}
        body.append([enc] + [fmt_num(got.get(d), digits) if got.get(d) is not None else "-" for d in ds])
    return md_table(["encoder"] + [f"d={d}" for d in ds], body)


ZERO_FLOOR = 1e-40     # where a gradient norm of exactly 0 (float32 underflow) is drawn on a log axis
STYLE = {"attention-attnfast": ("C0", "-", "o"), "attention-torch": ("C1", "-.", "s"),
         "rnn": ("C2", "--", "^"), "lstm": ("C3", "--", "v"), "gru": ("C4", "--", "d")}


def _style(name):
    kind = name.split("/")[0]
    color, ls, marker = STYLE[kind]
    if name.endswith("matched-params"):
        ls = ":"
    return dict(color=color, linestyle=ls, marker=marker, markersize=4,
                markerfacecolor="none" if kind == "attention-torch" else color)   # visible on top of attnfast


def make_plots(out, rows, task_rows, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    Ls = sorted({r["L"] for r in rows})
    ds = sorted({r["distance"] for r in task_rows})

    names = list(dict.fromkeys(r["model"] for r in rows if r.get("same_model_as") is None))
    paths = []

    def series(name, mode, key):
        pts = sorted((r["L"], r[key]) for r in rows if r["model"] == name and r["mode"] == mode
                     and r.get("same_model_as") is None and r[key] is not None and r[key] > 0)
        return [p[0] for p in pts], [p[1] for p in pts]

    def finish(fig, axes, path, note, xs=None):
        for ax in axes:
            ax.grid(True, which="both", alpha=0.3)
            if xs:
                ax.set_xticks(xs)
                ax.set_xticklabels([str(v) for v in xs], fontsize=8)
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axes[0].legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=6.5)
        width = fig.get_size_inches()[0]          # fixed margins: tight_layout costs seconds per figure
        fig.subplots_adjust(left=0.75 / width, right=1 - 0.2 / width, bottom=0.16, top=0.86, wspace=0.25)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path.name)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, mode in zip(axes, MODES):
        for name in names:
            xs, ys = series(name, mode, "tokens_per_s")
            ax.plot(xs, ys, label=label(name), **_style(name))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel("tokens/s")
        ax.set_title(MODE_LABEL[mode], fontsize=10)
    finish(fig, axes, out / PLOTS[0], "tokens/s = B*L / median time; solid: attention, dashed: recurrent at matched "
           "hidden size, dotted: at matched parameter count; see encoders.md", Ls)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("fwd", "peak_mib", "forward: peak RSS increase (MiB)"),
              ("fwdbwd", "peak_mib", "fwd+bwd: peak RSS increase (MiB)"),
              ("fwdbwd", "saved_for_backward_mib", "fwd+bwd: saved for backward (MiB, exact)")]
    for ax, (mode, key, ttl) in zip(axes, panels):
        for name in names:
            xs, ys = series(name, mode, key)
            ax.plot(xs, ys, label=label(name), **_style(name))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_title(ttl, fontsize=10)
    finish(fig, axes, out / PLOTS[1], "RSS: zero readings (recycled memory) are not drawn; saved for backward: "
           "distinct storages autograd keeps, parameters and input excluded", Ls)

    encs = list(dict.fromkeys(r["encoder"] for r in task_rows))
    fig, ax = plt.subplots(1, 1, figsize=(6.5, 4.2))
    for enc in encs:
        pts = sorted((r["distance"], r["accuracy"]) for r in task_rows if r["encoder"] == enc)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=enc, **_style(enc))
    if task_rows:
        ax.axhline(task_rows[0]["chance"], color="gray", linewidth=1, linestyle="-.", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("distance (steps between the value and the query)")
    ax.set_ylabel("held-out accuracy")
    finish(fig, [ax], out / PLOTS[2], "same steps, seeds, batches for every encoder; see encoders.md for the plan", ds)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (key, ttl) in zip(axes, [("grad_norm_pos0_init", "at init"), ("grad_norm_pos0_trained",
                                                                           "after training")]):
        for enc in encs:
            pts = sorted((r["distance"], max(r[key], ZERO_FLOOR)) for r in task_rows if r["encoder"] == enc)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=enc, **_style(enc))
        if any(r[k] == 0 for r in task_rows for k in ("grad_norm_pos0_init", "grad_norm_pos0_trained")):
            ax.axhline(ZERO_FLOOR, color="gray", linewidth=0.8, linestyle=":")
            ax.text(1.0, ZERO_FLOOR, "0 (underflowed float32)", transform=ax.get_yaxis_transform(), ha="right",
                    va="bottom", fontsize=7, color="gray")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("distance")
        ax.set_title(f"|d loss / d embedding[0]| {ttl}", fontsize=10)
    axes[0].set_ylabel("gradient norm (batch mean)")
    finish(fig, list(axes), out / PLOTS[3], "gradient of the summed cross-entropy w.r.t. the input embedding at "
           "position 0 (the value), per sequence, averaged over held-out sequences; exact zeros drawn on the "
           "dotted line", ds)
    return paths


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------
def _reading(rows, cross, task_rows):
    """A few sentences computed from the numbers."""
    lines = []
    for mode in MODES:
        af = [c for c in cross if c["mode"] == mode and c["attention"] == "attention-attnfast"]
        xs = [c for c in af if c["crossover_L"] is not None]
        if xs:
            lo, hi = min(xs, key=lambda c: c["crossover_L"]), max(xs, key=lambda c: c["crossover_L"])
            lines.append(f"{MODE_LABEL[mode]}: the recurrent encoders overtake attention-attnfast in tokens/s between "
                         f"L ~{lo['crossover_L']:.0f} ({label(lo['recurrent'])}) and ~{hi['crossover_L']:.0f} "
                         f"({label(hi['recurrent'])}); no crossover up to the longest L for "
                         f"{len(af) - len(xs)} of the {len(af)} recurrent models")
    Lmax = max(r["L"] for r in rows)
    at = {r["model"]: r for r in rows if r["L"] == Lmax and r["mode"] == "fwdbwd" and r.get("same_model_as") is None}
    if at:
        lines.append(f"memory at L={Lmax}, fwd+bwd, saved for backward (peak RSS increase): " + ", ".join(
            f"{label(n)} {fmt_num(r['saved_for_backward_mib'])} MiB ({fmt_num(r['peak_mib'])})" for n, r in at.items()))
    for mode in MODES:
        at = {r["model"]: r for r in rows if r["L"] == Lmax and r["mode"] == mode and r.get("same_model_as") is None}
        if "attention-attnfast" in at and "attention-torch" in at:
            q = at["attention-torch"]["median_ms"] / at["attention-attnfast"]["median_ms"]
            lines.append(f"{MODE_LABEL[mode]} at L={Lmax}: attention-torch / attention-attnfast time = {q:.2f} "
                         f"(> 1: attnfast faster)")
    if task_rows:
        dmax = max(r["distance"] for r in task_rows)
        for enc in dict.fromkeys(r["encoder"] for r in task_rows):
            rs = sorted((r for r in task_rows if r["encoder"] == enc), key=lambda r: r["distance"])
            solved = [r["distance"] for r in rs if r["accuracy"] >= 0.95]
            g = [r["grad_norm_pos0_init"] for r in rs]
            decay = f"{g[0] / g[-1]:.3g}x" if g[-1] > 0 else "to 0"
            lines.append(f"{enc}: held-out accuracy >= 0.95 at distance(s) {solved or 'none'}; at d={dmax}: "
                         f"{rs[-1]['accuracy']:.3f}; gradient norm at position 0 at init falls {decay} from "
                         f"d={rs[0]['distance']} to d={rs[-1]['distance']}")
    return lines



def markdown(result):
    sp, tp = result["speed_plan"], result["task_plan"]
    c, meas = result["conditions"], result["measurement"]
    rows, cross, task_rows = result["speed"], result["crossover"], result["long_range"]
    hidden_models = [x for x in result["models"] if x["encoder"] in RECURRENT]
    la = meas.get("load_average_before"), meas.get("load_average_after")
    kp = meas["recurrent_kernel_paths"]
    md = [
        f"# Encoders: attention vs RNN, LSTM, GRU ({result['mode']})", "",
        f"- machine: {c['cpu_model']}, {c['logical_cpus']} logical CPUs, torch threads {c['threads']} "
        f"(speed: each encoder at {' and '.join(map(str, c['thread_options']))}, the faster kept; long-range "
        f"training at {c['task_threads']}); attnfast {c['attnfast']} "
        f"(git {c['git']}, ISA path {c['cpu_isa']}), torch {c['torch']}, python {c['python']}; device {c['device']}, "
        f"speed dtype {c['dtype']}, task float32; {c['timestamp']}",
        "- load average (1/5/15 min) before: " + (", ".join(f"{v:.1f}" for v in la[0]) if la[0] else "-") +
        "; after: " + (", ".join(f"{v:.1f}" for v in la[1]) if la[1] else "-"),
        "- run time: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in result["elapsed_s"].items()),
        "",
        "## Speed and memory", "",
        f"- attention: one nn.TransformerEncoderLayer(d_model={sp['d_model']}, nhead={sp['nhead']}, "
        f"dim_feedforward={sp['ff']}, dropout=0, batch_first), the same weights on two SDPA routes: "
        "attention-attnfast = torch.nn.functional.scaled_dot_product_attention patched to attnfast "
        "(attnfast.patch()), attention-torch = torch's SDPA; torch's encoder fast path is off during the run, so "
        "both take the Python path that calls SDPA (checked once with call counters, below)",
        "- recurrent: one nn.RNN (tanh) / nn.LSTM / nn.GRU layer over the same "
        f"{sp['d_model']}-wide input; matched hidden: hidden {sp['d_model']}; matched params: hidden "
        + ", ".join(f"{x['encoder']} {x['hidden']} ({x['params']:,} params)" for x in hidden_models
                    if x["variant"] == "matched-params")
        + f" vs the attention layer's {result['models'][0]['params']:,}; the attention layer is the reference of "
          "both matchings (listed once below, twice in the JSON)",
        f"- input: x ~ N(0, 1) of shape (B={sp['B']}, L, {sp['d_model']}); forward: torch.no_grad, eval mode; "
        "fwd+bwd: out = encoder(x); out.backward(g) in train mode, x requires grad, grads dropped between calls "
        "(untimed); tokens/s = B*L / median time",
        "- timing: per (L, mode) all encoders round-robin; round 0 warm-up (and memory), then "
        + (", ".join(f"{n} timed rounds for L <= {u}" if u < 10**9 else f"{n} for longer L" for u, n in sp["reps"])
           if len(sp["reps"]) > 1 else f"{sp['reps'][0][1]} timed round(s)")
        + "; median",
        ("- threads: each encoder at " + " and ".join(map(str, c["thread_options"])) + " (interleaved) up to "
         f"L={sp['both_threads_upto']}, the row keeps the faster; beyond it the recurrent layers run at 1 thread "
         f"and attention at {max(c['thread_options'])} (on a shared machine a parallel region stalls whenever "
         "another process holds one of its cores; a recurrent layer opens one of constant small work per time "
         "step: a 2-thread LSTM forward at L=8192 once took 10 s instead of 0.14 s; attention's work per region "
         f"grows as L^2); a {max(c['thread_options'])}-thread entry whose warm-up call took > "
         f"{sp['stall_factor']:g}x the 1-thread one is left out of the timed rounds (a stall; listed in the JSON "
         "as stalled_threads_dropped); used: "
         if len(c["thread_options"]) > 1 else
         f"- threads: {c['thread_options'][0]}; ") + _threads_line(rows),
        f"- memory: {meas['memory']}; zero means the call fit in memory the allocator already held; one call "
        "each, so a lone spike is noise (e.g. a worker thread's first allocations); saved for backward: exact "
        "bytes of the distinct storages autograd keeps (parameters, input excluded), free of such noise",
        "- torch kernels here: " + "; ".join(
            f"{k}: {'fused ' + ', '.join(v['fused_kernels']) if v['fused_kernels'] else 'per-step ATen ops'} "
            f"({v['aten_ops_at_L8']} ATen calls for fwd+bwd at L=8)" for k, v in kp.items()),
        "",
        "### Tokens/s, forward", "", _speed_table(rows, "fwd", "tokens_per_s"), "",
        "### Tokens/s, fwd+bwd", "", _speed_table(rows, "fwdbwd", "tokens_per_s"), "",
        "### Crossover lengths", "",
        "The length beyond which the recurrent encoder processes more tokens/s than the attention encoder "
        "(interpolated on log-log between the measured lengths, after the last length where attention led; "
        "more than one crossing means noise or a close race).", "",
        _crossover_table(cross), "",
        "### Peak memory, forward (MiB, peak RSS increase)", "", _speed_table(rows, "fwd", "peak_mib"), "",
        "### Peak memory, fwd+bwd (MiB, peak RSS increase)", "", _speed_table(rows, "fwdbwd", "peak_mib"), "",
        "### Saved for backward (MiB, exact)", "", _speed_table(rows, "fwdbwd", "saved_for_backward_mib"), "",
        "### Routing check (once, before timing)", "",
        md_table(["run", "SDPA calls", "attnfast fwd", "attnfast bwd", "torch attention kernels"],
                 [[k, v.get("sdpa_calls"), v.get("attnfast_fwd", "-"), v.get("attnfast_bwd", "-"),
                   v.get("torch_attention", "-")] for k, v in result["verification"].items()]),
        "",
        "## Long-range recall", "",
        f"- task: token 0 is a value (one of {tp['n_values']}; chance {1 / tp['n_values']:.2f}), then distance-1 "
        f"distractors (uniform over {tp['n_distractors']} other tokens), then a query token at position "
        "`distance`; predict the value from the encoder output at the query",
        f"- models: Embedding({tp['vocab']}, {tp['d_model']}) -> encoder -> Linear({tp['d_model']}, "
        f"{tp['n_values']}) on the query position; attention: TransformerEncoderLayer(d_model={tp['d_model']}, "
        f"nhead={tp['nhead']}, dim_feedforward={tp['ff']}, dropout=0) + sinusoidal positions, on both SDPA routes; "
        f"recurrent: one layer, hidden {tp['d_model']}",
        f"- training: {tp['steps']} Adam steps of batch {tp['batch']} for every encoder and distance; lr "
        f"{tp['lr_attention']:g} (attention), {tp['lr_recurrent']:g} (recurrent) with linear warm-up over "
        f"{tp['warmup']:.0%} of the steps then cosine decay to 0; gradient clipping at global norm {tp['clip']:g}; "
        f"seeds: init {tp['seed']} (same for every distance; both attention routes start from the same weights), "
        "data and batches a fixed function of the distance (same for every encoder)",
        f"- {INIT_NOTE}",
        f"- held-out split: {tp['n_train']} training and {tp['n_eval']} held-out sequences per distance, drawn "
        "together; held-out sequences equal to a training one are dropped; accuracy on the held-out split, eval "
        "mode",
        f"- gradient norm: |d loss / d embedding[0]| with the cross-entropy summed over {tp['n_grad']} held-out "
        "sequences (each sequence's gradient is then its own), averaged over them; the query position's norm is "
        "the scale to read it against",
        "",
        "### Held-out accuracy vs distance", "", _task_table(task_rows, "accuracy"), "",
        "### Gradient norm at position 0, at init", "",
        "0 means the gradient underflowed float32 on its way back to position 0.", "",
        _task_table(task_rows, "grad_norm_pos0_init"), "",
        "### Gradient norm at position 0, after training", "", _task_table(task_rows, "grad_norm_pos0_trained"), "",
        "### Gradient norm at the query position, at init", "", _task_table(task_rows, "grad_norm_query_init"), "",
        "### Training loss (mean over the last 10% of steps)", "", _task_table(task_rows, "final_train_loss"), "",
        "### Share of steps whose gradient was clipped", "", _task_table(task_rows, "clipped_fraction"), "",
        "### Seconds per training step (median)", "", _task_table(task_rows, "s_per_step"), "",
        "## Reading", "",
    ]
    md += [f"- {s}" for s in _reading(rows, cross, task_rows)]
    md += ["", "Plots: " + ", ".join(result["plots"]), ""]
    return "\n".join(md)

