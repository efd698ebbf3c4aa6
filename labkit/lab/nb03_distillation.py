"""Notebook 03's study: teacher vs students side by side, their ledger records, loss and recovery figures.

    table = comparison_table({"teacher": t, "student-ends": s}, latency, scores, hyps)
    records = distillation_records(t, {"student-ends": s}, table, latency, scores, preset="ci", ...)

Making and training students lives in labkit.compress.distill; the gates in labkit.measure.gates.
Left out: anything notebooks after 03 need.
"""

from __future__ import annotations

from labkit.config import DistillBudget
from labkit.core.bundle import Bundle
from labkit.measure import ledger
from labkit.measure.gates import bleu_gap_gate, kd_gain_gate, status_of
from labkit.measure.ledger import json_number
from labkit.measure.quality import agreement
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
        "latency ratio": latency[name].p50 / ref,
        "params": bundle.params,
    } for name, bundle in bundles.items()}, orient="index")


def distillation_records(teacher: Bundle, students: dict[str, Bundle], table, latency: dict, scores: dict | None,
                   *, preset: str, budget: DistillBudget, sentences: int,
                   notebook: str = "03_distillation") -> list[dict]:
    """The reference (distill-ref-<teacher>) measured in this run, then one `distillation` record per student.

    A student's gate is `bleu_gap_gate` against budget.bleu_gap_target; `training_check` is
    `kd_gain_gate`. Either failing makes the record status "failed" with the detail as reason.
    Parent: the bundle it was distilled from. Latency ratios are to the reference timed here.
    """

    quality = lambda name: scores[name].as_metrics() if scores else {}  # noqa: E731
    # A pruned reference is a pruning variant re-measured here; pruning records carry their fraction.
    pruned = ({k: teacher.meta[k] for k in ("heads_removed_frac", "head_plan")}
              if teacher.meta.get("head_plan") else {})
    ref = ledger.make_record(
        notebook=notebook, variant=f"distill-ref-{teacher.name}", model=teacher.name, backend="torch",
        precision="fp32", technique="pruning" if pruned else "baseline", reference_for="distillation",
        metrics={**quality(teacher.name), "latency_ms": as_latency(latency[teacher.name]),
                 "params": teacher.params, "size_mb": round(teacher.size_mb, 3)}, **pruned)
    records = [ref]
    for name, bundle in students.items():
        run, row = bundle.meta["distillation"], table.loc[name]
        gate = bleu_gap_gate(scores[teacher.name].bleu if scores else None, scores[name].bleu if scores else None,
                             budget.bleu_gap_target, sentences, preset)
        check = kd_gain_gate(run["history"][0]["dev_bleu"], run["final_dev_bleu"], run["steps"], run["dev_sentences"])
        status, reason = status_of([gate, check])
        records.append(ledger.make_record(
            notebook=notebook, variant=name, technique="distillation", parent=teacher.name, model=name,
            backend="torch", precision="fp32", gate=gate, status=status, reason=reason,
            metrics={**quality(name), "latency_ms": as_latency(latency[name]), "params": bundle.params,
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


def recovery_figure(histories: dict[str, list[dict]], teacher_bleu: float | None = None):
    """Dev BLEU vs training step per student, with the teacher's dev BLEU as a line."""
    import pandas as pd
    import plotly.express as px

    rows = [{"student": name, "step": r["step"], "dev BLEU": r["dev_bleu"]}
            for name, history in histories.items() for r in history if r["dev_bleu"] is not None]
    fig = px.line(pd.DataFrame(rows), x="step", y="dev BLEU", color="student", markers=True,
                  title="Recovery: dev BLEU of the 4-layer students while distilling")
    if teacher_bleu is not None:
        fig.add_hline(y=teacher_bleu, line_dash="dash", annotation_text="teacher")
    return fig
