"""Notebook 05's shortlist section: gate the shortlisted variants, the candidate-size figure, the ledger records.

    checks = gate_shortlists(preset, bundle, pairs, ("ort-int8-sl", "ct2-int8-vmap"))
    plot_candidates(stats).show()
    records = shortlist_records(checks, stats, timed, bundle, len(pairs))

The mechanism lives in labkit.engines.shortlist (the table, CTranslate2's vocabulary map) and
labkit.engines.shortlist_ort (head-less decoders); gates in labkit.measure.gates.shortlist_gate;
timing in labkit.lab.bench. Left out: sweeping k and N (one table per preset budget).
"""

from __future__ import annotations

import numpy as np

from labkit.engines.variants import VARIANTS, Check, check_variants
from labkit.measure import ledger
from labkit.measure.plots import PALETTE
from labkit.measure.replay import measurement

NOTEBOOK = "05_int8_quantization"


@measurement
def gate_shortlists(preset, bundle, pairs, variants) -> dict[str, Check]:
    """Each shortlisted variant and its full-vocabulary parent, gated on `pairs` (parents first)."""
    chain = [v2 for v in variants for v2 in (VARIANTS[v].parent, v)]
    return check_variants(preset, list(dict.fromkeys(chain)), bundle, pairs=pairs)


def size_summary(stats: dict) -> dict:
    """The numbers of `candidate_stats` without the per-sentence lists (for tables and the ledger)."""
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items() if not k.endswith("_sizes")}


def plot_candidates(stats: dict):
    """Histograms of candidate-set sizes per sentence and per batch, the full vocabulary as a line."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (key, label) in enumerate((("sentence_sizes", "per sentence"),
                                      ("batch_sizes", f"per batch of {stats['batch']}"))):
        fig.add_trace(go.Histogram(x=stats[key], name=f"{label} (mean {np.mean(stats[key]):.0f})",
                                   marker_color=PALETTE[i], opacity=0.75, nbinsx=40))
    fig.add_vline(x=stats["vocab_size"], line_dash="dash", line_color=PALETTE[7],
                  annotation_text=f"full vocabulary {stats['vocab_size']}")
    fig.update_layout(barmode="overlay", xaxis_title="candidate ids the LM head computes",
                      yaxis_title="sentences / batches",
                      title=f"Shortlist candidate sets on {stats['sentences']} test sentences; reference pieces "
                            f"inside their batch's set: {stats['coverage']:.2%}")
    return fig


def _timed(timed, variant: str) -> dict:
    if variant not in timed.index:
        return {}
    r = timed.loc[variant]
    return {"latency_ms": {"p50": r.p50_ms, "p95": r.p95_ms, "n": int(r.n)}, "sentences_per_s": r.sentences_per_s}


def shortlist_records(checks: dict[str, Check], stats: dict, timed, bundle, sentences: int) -> list[dict]:
    """One `shortlist` record per shortlisted variant (failed ones with their gate), speedup vs its parent."""
    records = []
    for variant, check in checks.items():
        spec = VARIANTS[variant]
        if spec.technique != "shortlist":
            continue
        gm = check.info.get("gate_metrics", {})
        both = variant in timed.index and spec.parent in timed.index
        skipped = {"status": "skipped", "reason": check.reason} if check.status == "skipped" else {}
        records.append(ledger.make_record(
            notebook=NOTEBOOK, variant=variant, technique="shortlist", parent=spec.parent, backend=spec.backend,
            precision=spec.precision, model=bundle.name, gate=check.gate,
            metrics={"bleu": gm.get("bleu"), "chrf": gm.get("chrf"), "agreement": gm.get("agreement"),
                     **_timed(timed, variant)},
            parent_bleu=gm.get("parent_bleu"), eval_sentences=sentences, candidates=size_summary(stats),
            speedup_vs_parent=round(timed.loc[spec.parent, "p50_ms"] / timed.loc[variant, "p50_ms"], 3) if both else None,
            **skipped))
    return records
