"""Notebook 03's study: teacher vs students side by side, their ledger records, loss and recovery figures.

    table = comparison_table({"teacher": t, "student-ends": s}, latency, scores, hyps)
    records = distillation_records(t, {"student-ends": s}, table, latency, scores, preset="ci", ...)
    costs = step_costs({"teacher": t, "student-6-1": s1}, preset, texts)   # ms per decoder step, forced length

Making and training students lives in labkit.compress.distill; the gates in labkit.measure.gates.
Left out: anything notebooks after 03 need.
"""

from __future__ import annotations

from labkit.config import DistillBudget, Preset
from labkit.core.bundle import Bundle
from labkit.core.translator import translator_for
from labkit.measure import ledger, tables, timing
from labkit.measure.gates import bleu_gap_gate, kd_gain_gate, status_of
from labkit.measure.ledger import json_number
from labkit.measure.plots import series_colors
from labkit.measure.quality import agreement
from labkit.measure.replay import measurement
from labkit.measure.timing import as_latency

# --------------------------------------------------------------------------- comparing and recording


def comparison_table(bundles: dict[str, Bundle], latency: dict, scores: dict | None = None,
                     hyps: dict | None = None, reference: str = "teacher"):
    """Reference vs students, one row per bundle: layers, BLEU, chrF, BLEU gap, share of identical
    outputs, latency p50 and ratio to the reference's (same run), parameters.

    `latency` maps names to labkit.measure.timing Measurements; `scores`/`hyps` (labkit.measure.quality) are None
    for speed-only presets, and the quality columns then are too.
    """
    import pandas as pd

    ref = latency[reference].p50
    return pd.DataFrame.from_dict({name: {
        "decoder layers": bundle.model.config.decoder_layers,
        "encoder layers": bundle.model.config.encoder_layers,
        "BLEU": scores[name].bleu if scores else None,
        "chrF": scores[name].chrf if scores else None,
        "BLEU gap": scores[reference].bleu - scores[name].bleu if scores else None,
        "same output as teacher": agreement(hyps[name], hyps[reference]) if hyps else None,
        "latency p50 ms": latency[name].p50,
        "latency p95 ms": latency[name].p95,
        "latency ratio": latency[name].p50 / ref,
        "params": bundle.params,
    } for name, bundle in bundles.items()}, orient="index")


# What a comparison table shows (its name on screen): encoder layers are 6 for every model here
SHOWN = {"decoder layers": "decoder layers", "BLEU": "BLEU", "chrF": "chrF", "BLEU gap": "BLEU gap",
         "same output as teacher": "same as teacher", "latency p50 ms": "p50 ms", "latency p95 ms": "p95 ms",
         "latency ratio": "latency ratio", "params": "params", "ms per step": "ms per step",
         "encode ms": "encode ms", "step ratio": "step ratio"}


def shown(table, columns=None):
    """A comparison table as the notebook shows it: the SHOWN columns present (or `columns`), short names,
    rounded, narrow enough for the page (labkit.measure.tables.tidy)."""
    columns = [c for c in (columns or SHOWN) if c in table]
    return tables.tidy(table[columns].rename(columns=SHOWN), rename=False)


def samples_table(pairs, hyps: dict[str, list[str]], n: int):
    """The first `n` test sentences, one row per (sentence, who): source, reference, then each model's output,
    so sentences wrap down the page instead of each model adding a column across it."""
    import pandas as pd

    rows = []
    for k, pair in enumerate(pairs[:n], start=1):
        rows += [(k, "source", pair.zh), (k, "reference", pair.en)]
        rows += [(k, name, h[k - 1]) for name, h in hyps.items()]
    frame = pd.DataFrame(rows, columns=["#", "from", "text"]).set_index(["#", "from"])
    return tables.tidy(frame, wrap_ch=90).set_properties(**{"text-align": "left"})


def runs_table(runs: dict[str, dict]):
    """How each student was trained (its sidecar's `distillation` block), one row per student; the batch size and
    training pairs are the budget's (the table above it)."""
    import pandas as pd

    return pd.DataFrame.from_dict({name: {
        "decoder layers": r["decoder_layer_map"], "encoder layers": r["encoder_layer_map"] or "all",
        "seq-KD": r["seq_kd"], "steps": r["steps"], "dev BLEU first": r["history"][0]["dev_bleu"],
        "dev BLEU last": r["final_dev_bleu"], "teacher dev": r["teacher_dev_bleu"], "train s": r["wall_time_s"],
    } for name, r in runs.items()}, orient="index")


def distillation_records(teacher: Bundle, students: dict[str, Bundle], table, latency: dict, scores: dict | None,
                   *, preset: str, budget: DistillBudget, sentences: int,
                   notebook: str = "03_distillation", with_reference: bool = True) -> list[dict]:
    """The reference (distill-ref-<teacher>) measured in this run, then one `distillation` record per student.

    A student's gate is `bleu_gap_gate` against budget.bleu_gap_target; `training_check` is
    `kd_gain_gate`. Either failing makes the record status "failed" with the detail as reason.
    Parent: the bundle it was distilled from. Latency ratios are to the reference timed here.
    """

    scored = lambda name: scores[name].as_metrics() if scores else {}  # noqa: E731
    # `with_reference=False`: a later group of students measured against the same reference record
    # A pruned reference is a pruning variant re-measured here; pruning records carry their fraction.
    pruned = ({k: teacher.meta[k] for k in ("heads_removed_frac", "head_plan")}
              if teacher.meta.get("head_plan") else {})
    ref = ledger.make_record(
        notebook=notebook, variant=f"distill-ref-{teacher.name}", model=teacher.name, backend="torch",
        precision="fp32", technique="pruning" if pruned else "baseline", reference_for="distillation",
        metrics={**scored(teacher.name), "latency_ms": as_latency(latency[teacher.name]),
                 "params": teacher.params, "size_mb": round(teacher.size_mb, 3)}, **pruned)
    records = [ref] if with_reference else []
    for name, bundle in students.items():
        run, row = bundle.meta["distillation"], table.loc[name]
        gate = bleu_gap_gate(scores[teacher.name].bleu if scores else None, scores[name].bleu if scores else None,
                             budget.bleu_gap_target, sentences, preset)
        check = kd_gain_gate(run["history"][0]["dev_bleu"], run["final_dev_bleu"], run["steps"], run["dev_sentences"])
        status, reason = status_of([gate, check])
        records.append(ledger.make_record(
            notebook=notebook, variant=name, technique="distillation", parent=teacher.name, model=name,
            backend="torch", precision="fp32", gate=gate, status=status, reason=reason,
            metrics={**scored(name), "latency_ms": as_latency(latency[name]), "params": bundle.params,
                     "size_mb": round(bundle.size_mb, 3), "agreement": row["same output as teacher"]},
            decoder_layers=bundle.model.config.decoder_layers, encoder_layers=bundle.model.config.encoder_layers,
            layer_map=run["decoder_layer_map"], encoder_layer_map=run["encoder_layer_map"],
            strategy=run.get("strategy"), steps=run["steps"], seq_kd=run["seq_kd"],
            loss_weights=run["loss_weights"],
            step0_dev_bleu=run["history"][0]["dev_bleu"], final_dev_bleu=run["final_dev_bleu"],
            training_check=check, bleu_gap=json_number(row["BLEU gap"]),
            latency_ratio=round(float(row["latency ratio"]), 4),
            teacher_latency_ms=as_latency(latency[teacher.name])))
    return records


# --------------------------------------------------------------------------- shallow decoders: cost per decoder step


@measurement
def step_costs(bundles: dict[str, Bundle], preset: Preset, texts: list[str], tokens: int = 32,
               reference: str = "teacher"):
    """Cost of one decoder step per model: batch-1 decodes forced to exactly `tokens` tokens.

    Every model does the same number of decoder steps, and the translator's own stage timings
    split each call into 'encode' (once per sentence) and 'decode' (`tokens` steps), so
    'ms per step' = median over calls of decode ms / tokens, with no difference of two noisy
    numbers. Models take turns sentence by sentence (a busy machine slows them alike); warm-up
    and passes come from the preset, threads are pinned. Columns: 'ms per step', 'encode ms',
    'step ratio' (to the reference's ms per step), 'calls'.
    """
    import statistics

    import pandas as pd

    timing.pin_threads(preset.threads)
    forced = preset.with_(forced_length=tokens)
    translators = {name: translator_for(bundle, forced) for name, bundle in bundles.items()}
    for translator in translators.values():
        for text in texts[:preset.bench_warmup]:
            translator.run([text])
    calls = {name: [] for name in translators}
    for _ in range(preset.bench_repeats):
        for text in texts:
            for name, translator in translators.items():
                calls[name].append(translator.run([text]).timings_ms)
    df = pd.DataFrame.from_dict({name: {
        "ms per step": statistics.median(c["decode"] / tokens for c in runs),
        "encode ms": statistics.median(c["encode"] for c in runs), "calls": len(runs),
    } for name, runs in calls.items()}, orient="index")
    df["step ratio"] = df["ms per step"] / df.loc[reference, "ms per step"]
    return df


def shallow_records(teacher: Bundle, students: dict[str, Bundle], table, latency: dict, scores: dict | None,
                    costs, *, preset: str, budget: DistillBudget, sentences: int) -> list[dict]:
    """distillation_records for the shallow-decoder students (the reference record is the 6-4 section's),
    each with its measured cost per decoder step and its ratio to the teacher's from step_costs."""
    records = distillation_records(teacher, students, table, latency, scores, preset=preset, budget=budget,
                                   sentences=sentences, with_reference=False)
    for record in records:
        row = costs.loc[record["variant"]]
        record.update(shape="deep-encoder/shallow-decoder", decode_step_ms=round(float(row["ms per step"]), 4),
                      decode_step_ratio=round(float(row["step ratio"]), 4),
                      teacher_decode_step_ms=round(float(costs.loc[teacher.name, "ms per step"]), 4))
    return records


# --------------------------------------------------------------------------- figures


def loss_figure(curves: dict[str, list[dict]]):
    """Per-component loss curves (one panel per component, one line per student)."""
    import pandas as pd
    import plotly.express as px

    rows = [{"student": name, "step": r["step"], "component": comp, "value": r[comp]}
            for name, curve in curves.items() for r in curve for comp in ("loss", "kl", "mse", "ce")]
    fig = px.line(pd.DataFrame(rows), x="step", y="value", color="student", facet_col="component",
                  facet_col_wrap=4, title="Distillation loss by component (KL includes T², T anneals 4 → 1)")
    fig.update_yaxes(matches=None, showticklabels=True)
    return fig


def recovery_figure(histories: dict[str, list[dict]], teacher_bleu: float | None = None,
                    title: str = "Recovery: dev BLEU of the 4-layer students while distilling"):
    """Dev BLEU vs training step per student, with the teacher's dev BLEU as a line."""
    import pandas as pd
    import plotly.express as px

    rows = [{"student": name, "step": r["step"], "dev BLEU": r["dev_bleu"]}
            for name, history in histories.items() for r in history if r["dev_bleu"] is not None]
    fig = px.line(pd.DataFrame(rows), x="step", y="dev BLEU", color="student", markers=True, title=title)
    if teacher_bleu is not None:
        fig.add_hline(y=teacher_bleu, line_dash="dash", annotation_text="teacher")
    return fig


def shallow_figure(table, costs):
    """Quality (BLEU, chrF) and speed (batch-1 p50 with p95, ms per decoder step) per model, side by side."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    colors = series_colors(table.index)
    fig = make_subplots(rows=1, cols=3, subplot_titles=("test BLEU / chrF", "batch-1 latency p50 (to p95), ms",
                                                        "ms per decoder step (forced length)"))
    for name in table.index:
        c = colors[name]
        if table["BLEU"].notna().any():
            fig.add_trace(go.Bar(name=name, x=["BLEU", "chrF"], y=[table.loc[name, "BLEU"], table.loc[name, "chrF"]],
                                 marker_color=c, legendgroup=name), row=1, col=1)
        p50, p95 = table.loc[name, "latency p50 ms"], table.loc[name, "latency p95 ms"]
        fig.add_trace(go.Bar(name=name, x=[name], y=[p50], marker_color=c, legendgroup=name, showlegend=False,
                             error_y=dict(type="data", symmetric=False, array=[p95 - p50], arrayminus=[0])),
                      row=1, col=2)
        fig.add_trace(go.Bar(name=name, x=[name], y=[costs.loc[name, "ms per step"]], marker_color=c,
                             legendgroup=name, showlegend=False), row=1, col=3)
    fig.update_layout(barmode="group", title="Deep encoder, shallow decoder: quality and speed, same run")
    return fig
