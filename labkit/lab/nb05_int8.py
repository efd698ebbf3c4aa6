"""Notebook 05's study: the sensitivity figure and the ledger records of the int8 recipes and the peer.

    records = ledger_records(recorded, dirs, scores, gates, fp32, timed, peer, peer_skip, pairs, bundle, "minmax")
    roof = roofline_table(preset, bundle, speed, gates)      # section 6: bytes/token vs the bandwidth bound

The mechanism (quantizing, calibrating, choosing blocks) lives in labkit.engines.ort_int8 and the
rules in labkit.measure.gates; this module only reports, and gathers the roofline rows (bytes of weights
per token against the bandwidth bound, labkit.measure.roofline). Left out: timing (labkit.lab.bench does it).
"""

from __future__ import annotations

from labkit.engines.onnx_graphs import size_mb
from labkit.engines.ort_int8 import recipe_of
from labkit.lab import bench
from labkit.lab.bench_roofline import COLUMNS as ROOFLINE_COLUMNS
from labkit.lab.bench_roofline import roofline_metrics
from labkit.measure import ledger, plots
from labkit.measure.replay import measurement

NOTEBOOK = "05_int8_quantization"
ROOFLINE_VARIANTS = ("torch", "ort-fp32", "ort-int8", "ort-int8-all")  # fp32 twice (two engines), int8 twice


@measurement
def roofline_table(preset, bundle, speed, gates: dict, variants=ROOFLINE_VARIANTS):
    """The roofline rows of `variants`: section 5's timed rows where it timed them, the others benched now
    (gated first, own processes) against section 5's bandwidth, so every point shares one bound line."""
    import pandas as pd

    missing = [v for v in variants if v not in speed.index or speed.loc[v, "status"] != "ok"]
    rows = [speed.loc[[v for v in variants if v not in missing]]]
    if missing:
        rows.append(bench.run_bench(preset, bundle, missing, write_ledger=False, progress=False, gates=gates,
                                    bandwidth=speed.attrs["bandwidth"]).set_index("variant"))
    table = pd.concat(rows).loc[list(variants)]
    return table[table["status"] == "ok"][["precision", *ROOFLINE_COLUMNS]].reset_index()


def plot_sensitivity(rows: list[dict]):
    """Grouped bars per block: BLEU lost and % of sentences whose tokens changed, vs fp32."""
    import plotly.graph_objects as go

    ref = next(r for r in rows if r["block"] == "none")
    blocks = [r for r in rows if r["block"] != "none"]
    names = [r["block"] for r in blocks]
    fig = go.Figure([go.Bar(name="BLEU drop", x=names, y=[ref["bleu"] - r["bleu"] for r in blocks]),
                     go.Bar(name="% sentences changed", x=names, y=[100 * (1 - r["agreement"]) for r in blocks])])
    fig.update_layout(title="INT8 sensitivity: one block type quantized at a time (dynamic, per-channel, optimized)",
                      barmode="group", xaxis_title="quantized block", yaxis_title="vs fp32")
    return plots.paint(fig)


def _timed_metrics(timed, variant: str) -> dict:
    """Latency and throughput of a bench variant that was timed; {} for one that was not (failed or skipped)."""
    if variant not in timed.index:
        return {}
    r = timed.loc[variant]
    return {"latency_ms": {"p50": r.p50_ms, "p95": r.p95_ms, "n": int(r.n)}, "sentences_per_s": r.sentences_per_s,
            **roofline_metrics(r)}


def int8_records(recorded: dict, dirs: dict, scores: dict, gates: dict, fp32: dict, timed, pairs, bundle,
                 method: str) -> list[dict]:
    """One `quantization` record per int8 recipe, parent onnx-fp32, with its gate, recipe and speedup (same run)."""
    records = []
    for name, variant in recorded.items():
        s = scores[name]
        speedup = (round(timed.loc["ort-fp32", "p50_ms"] / timed.loc[variant, "p50_ms"], 3)
                   if variant in timed.index and "ort-fp32" in timed.index else None)
        records.append(ledger.make_record(
            notebook=NOTEBOOK, variant=name.replace(f"-{method}", ""), technique="quantization",
            parent="onnx-fp32", backend="onnxruntime", precision="int8", model=bundle.name, gate=gates[variant],
            metrics={"bleu": s["bleu"], "chrf": s["chrf"], "bleu_signature": s["bleu_signature"],
                     "agreement": s["agreement"], "size_mb": round(size_mb(dirs[name]), 3),
                     **_timed_metrics(timed, variant)},
            eval_sentences=len(pairs), parent_bleu=fp32["bleu"],  # the gate subset; 04's onnx-fp32 uses eval_sentences
            recipe=recipe_of(dirs[name]), speedup_vs_parent=speedup))
    return records


def peer_records(peer: dict, gates: dict, peer_skip: str | None, timed, pairs, bundle) -> list[dict]:
    """One `peer` record per CTranslate2 compute type: skipped with the reason, or gated against torch."""
    records = []
    for name in ("ct2-fp32", "ct2-int8"):
        result = peer.get(name)
        skipped = {"status": "skipped", "reason": peer_skip} if result is None else {}
        metrics = None if result is None else {**{k: v for k, v in result.items() if k != "ids"},
                                               **_timed_metrics(timed, name)}
        records.append(ledger.make_record(
            notebook=NOTEBOOK, variant=name, technique="peer", parent="teacher", backend="ctranslate2",
            precision=name.split("-")[1], model=bundle.name, gate=gates.get(name), metrics=metrics,
            own_process=name in timed.index, eval_sentences=len(pairs), **skipped))
    return records
