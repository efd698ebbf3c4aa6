"""Notebook 00's study: the `teacher` baseline record every later speedup is measured against.

    record = baseline_record(teacher, preset, latency, sentences_per_s, scores, subset)
    examples_table(pairs[:10], hyps[:10])   # source | reference(s) | teacher, one row per sentence

Left out: measuring (labkit.measure.quality and labkit.measure.timing do it in the notebook).
"""

from __future__ import annotations

from labkit.core.bundle import Bundle
from labkit.core.data import Pair
from labkit.measure import ledger, timing
from labkit.measure.quality import Scores


def baseline_record(teacher: Bundle, preset, latency: timing.Measurement, sentences_per_s: float,
                    scores: Scores | None, subset: Scores | None, degenerate: int | None = None,
                    loops_cut: int | None = None) -> dict:
    """The `baseline` record: batch-1 latency, throughput, size and (quality presets) BLEU/chrF on the whole
    test split plus, under `subset`, on the sentences every variant is scored on, on how many test sentences
    the decoder looped (`loops_cut`: the translator kept the phrase once) and how many outputs were still
    empty or looping (`degenerate_outputs`)."""
    metrics = {"latency_ms": timing.as_latency(latency), "sentences_per_s": round(sentences_per_s, 2),
               "params": teacher.params, "size_mb": round(teacher.size_mb, 3), "peak_rss_mb": timing.peak_rss_mb()}
    extra = {}
    if scores is not None:
        metrics |= scores.as_metrics() | {k: v for k, v in (("degenerate_outputs", degenerate), ("loops_cut", loops_cut))
                                          if v is not None}
        extra = {"eval_split": "test", "eval_sentences": scores.n,
                 "subset": {"eval_sentences": subset.n, **subset.as_metrics()}}
    return ledger.make_record(
        notebook="00_setup_and_baseline", variant="teacher", technique="baseline", backend="torch",
        precision="fp32", model=teacher.name, metrics=metrics, forced_length=preset.forced_length, **extra)


def examples_table(pairs: list[Pair], hyps: list[str]):
    """Source, every reference (one per line) and the output, for reading next to the scores."""
    import pandas as pd

    table = pd.DataFrame({"source": [p.zh for p in pairs], "reference(s)": [" / ".join(p.references) for p in pairs],
                          "teacher": hyps})
    table.index = range(1, len(table) + 1)
    return table.style.set_properties(**{"text-align": "left", "white-space": "pre-wrap"})


def inputs_table(sources: list[str], result):
    """Each example input (long ones shortened), its translation and every note, wrapped to the page's width
    instead of cut off."""
    import pandas as pd

    table = pd.DataFrame({"source": [e if len(e) < 40 else e[:40] + "…" for e in sources],
                          "translation": result.texts, "notes": ["; ".join(n) for n in result.notes]})
    return table.style.set_properties(**{"text-align": "left", "white-space": "pre-wrap"})
