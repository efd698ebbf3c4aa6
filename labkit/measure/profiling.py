"""Where the time of one translation goes: stages, operators, input length, threads.

    budget = Preset.from_name("ci").profile          # how much profiling a ci run affords
    table = stage_breakdown(translator, texts, warmup=budget.warmup, repeats=budget.repeats)
    by_category(table)      # preprocessing / tokenizer / model inference / postprocessing
    operator_table(translator, texts[0])             # top torch ops by self CPU time
    length_curve(translator, texts, (4, 16, 32))     # latency vs source tokens
    thread_effect(translator, texts, (1, 2))         # latency per intra-op thread count

Every timing goes through `labkit.measure.timing.measure` (warm-up, repeats, p50/p95/IQR,
noise flag) at batch 1. Stage times come from the Translator's own timers
(`Result.timings_ms`), so they add up to the end-to-end time; the small rest is
Python glue around the stages. Left out: GPU kernel traces, per-operator memory,
flame graphs, and profiling batched or served traffic (labkit.serve).
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from labkit.core.translator import STAGES
from labkit.measure import timing
from labkit.measure.replay import measurement

if TYPE_CHECKING:
    import pandas as pd

# The seed table's categories: what a reader of the before/after table calls each stage.
CATEGORIES = {
    "normalize": "preprocessing",
    "tokenize": "tokenizer",
    "encode": "model inference",
    "decode": "model inference",
    "detokenize": "postprocessing",
}


# ---------------------------------------------------------------- primitives


def _timed_runs(translator, text: str, warmup: int, repeats: int, label: str = ""):
    """Measure translator.run([text]); return (Measurement, the timed calls' Results in order)."""
    results = []
    m = timing.measure(lambda: results.append(translator.run([text])), warmup=warmup,
                      repeats=repeats, label=label)
    return m, results[-m.n:]  # the first `warmup` results were untimed


def pooled(measurements: list[timing.Measurement], label: str = "") -> timing.Measurement:
    """One Measurement holding every timed call of several (e.g. one per sentence)."""
    times = tuple(t for m in measurements for t in m.times_ms)
    return timing.Measurement(times, threads=measurements[0].threads,
                             peak_rss_mb=timing.peak_rss_mb(), label=label)


def _stat_columns(m: timing.Measurement) -> dict:
    """Row fields of a table: p50, p95, q1, q3, iqr, n, noisy (q1/q3 give error bars)."""
    return {"p50_ms": m.p50, "p95_ms": m.p95, "q1_ms": timing.percentile(m.times_ms, 0.25),
            "q3_ms": timing.percentile(m.times_ms, 0.75), "iqr_ms": m.iqr, "n": m.n, "noisy": m.noisy}


def text_of_length(tokenizer, corpus: list[str], tokens: int) -> str:
    """Source text that tokenizes to `tokens` ids (counting </s>), or as close below as possible.

    Corpus sentences are concatenated until long enough, then cut character by character;
    tokens=4 with corpus ['我喜欢猫。'] -> '我喜欢' if that is 3 pieces + </s>.
    """
    if tokens < 2:
        raise ValueError(f"need at least 2 tokens (one piece + </s>), got {tokens}")
    if not corpus:
        raise ValueError("need at least one corpus sentence to build inputs")
    # a short prefix of 'Tom很困…' would be 'Tom', which the translator returns untranslated: start with Chinese
    corpus = [t for t in corpus if t and "\u4e00" <= t[0] <= "\u9fff"] or corpus
    count = lambda s: len(tokenizer(s)["input_ids"])  # noqa: E731
    text, i = "", 0
    while count(text) < tokens and i < 64 * len(corpus):
        text, i = text + corpus[i % len(corpus)], i + 1
    lo, hi = 1, len(text)  # longest prefix with count <= tokens (count grows with the prefix)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(text[:mid]) <= tokens else (lo, mid - 1)
    return text[:lo]


# ---------------------------------------------------------------- analyses


@measurement
def stage_breakdown(translator, texts: list[str], *, warmup: int, repeats: int) -> pd.DataFrame:
    """Per-stage time of batch-1 translation: one row per stage (stage, category, ms, p95_ms, pct).

    Each sentence is translated alone `repeats` times (after `warmup`); a stage's `ms` is its
    median over the repeats, averaged over sentences, so the row is "an average sentence";
    `p95_ms` is over every timed call. `pct` is the share of the stage sum. `table.attrs` holds the end-to-end view:
    `end_to_end_ms` (per-sentence median, averaged: comparable to the stage sum),
    `latency` ({p50, p95, n} over every timed call, for the ledger) and `noisy`.
    """
    import pandas as pd

    per_sentence, samples, measurements = [], {s: [] for s in STAGES}, []
    for text in texts:
        m, results = _timed_runs(translator, text, warmup, repeats, "end to end")
        measurements.append(m)
        per_sentence.append({s: statistics.median(r.timings_ms[s] for r in results) for s in STAGES})
        for s in STAGES:
            samples[s] += [r.timings_ms[s] for r in results]
    ms = {s: statistics.fmean(row[s] for row in per_sentence) for s in STAGES}
    total = sum(ms.values())
    table = pd.DataFrame([{"stage": s, "category": CATEGORIES[s], "ms": ms[s],
                           "p95_ms": timing.percentile(samples[s], 0.95),
                           "pct": 100 * ms[s] / total if total else 0.0} for s in STAGES])
    everything = pooled(measurements, "end to end")
    table.attrs = {"end_to_end_ms": statistics.fmean(m.p50 for m in measurements),
                   "latency": timing.as_latency(everything), "noisy": everything.noisy,
                   "sentences": len(texts), "repeats": repeats, "threads": everything.threads}
    return table


def by_category(table: pd.DataFrame) -> pd.DataFrame:
    """Stage rows summed into the seed table's categories (preprocessing, tokenizer, ...)."""
    order = list(dict.fromkeys(CATEGORIES.values()))
    grouped = table.groupby("category", sort=False)[["ms", "pct"]].sum()
    return grouped.reindex(order).reset_index()


def stages_metric(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """The ledger's extra key `stages`: {stage: {"ms", "pct"}}, rounded."""
    return {r.stage: {"ms": round(float(r.ms), 4), "pct": round(float(r.pct), 2)}
            for r in table.itertuples()}


def coverage(table: pd.DataFrame) -> float:
    """Stage sum over end-to-end time: 1.0 means the stages explain all of it."""
    return float(table["ms"].sum()) / table.attrs["end_to_end_ms"]


@measurement
def operator_table(translator, text: str, top: int = 15) -> pd.DataFrame:
    """Top torch operators by self CPU time for one batch-1 translation of `text`.

    Columns: op, calls, self_cpu_ms, cpu_total_ms (incl. children), self_pct (of all ops'
    self time). One warm-up call runs first so lazy initialisation is not profiled;
    `attrs["wall_ms"]` is the profiled call's wall time (profiling adds overhead).
    """
    import pandas as pd
    from torch.profiler import ProfilerActivity, profile

    translator.run([text])  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        m = timing.measure(lambda: translator.run([text]), warmup=0, repeats=1, label="profiled call")
    events = list(prof.key_averages())
    total_self = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "cpu_total_ms": e.cpu_time_total / 1e3, "self_pct": 100 * e.self_cpu_time_total / total_self}
            for e in events]
    table = pd.DataFrame(rows).sort_values("self_cpu_ms", ascending=False).head(top).reset_index(drop=True)
    table.attrs = {"wall_ms": m.p50, "ops": len(events)}
    return table


@measurement
def length_curve(translator, corpus: list[str], lengths, *, warmup: int, repeats: int) -> pd.DataFrame:
    """Batch-1 latency for sources of each length in tokens (built from `corpus`).

    Rows: length (asked), input_tokens (got), output_tokens (of the last timed call; the
    forced length for speed-only presets, the model's choice otherwise), p50/p95/q1/q3 ms.
    """
    import pandas as pd

    rows = []
    for n in lengths:
        text = text_of_length(translator.tokenizer, corpus, n)
        m, results = _timed_runs(translator, text, warmup, repeats, f"{n} tokens")
        got = len(translator.tokenizer(text)["input_ids"])
        rows.append({"length": n, "input_tokens": got, "output_tokens": len(results[-1].ids[0]),
                     **_stat_columns(m)})
    return pd.DataFrame(rows)


@measurement
def thread_effect(translator, texts: list[str], counts, *, warmup: int, repeats: int) -> pd.DataFrame:
    """Batch-1 latency (cycling `texts`, `repeats` passes) at each intra-op thread count.

    Rows: threads, p50/p95/q1/q3 ms, speedup (p50 at the first count / p50 here), cores.
    The thread count in use before the call is restored afterwards, even on error.
    """
    import itertools
    import os

    import pandas as pd

    saved_threads = timing.current_threads()
    saved_env = {v: os.environ.get(v) for v in timing.THREAD_ENV_VARS}
    rows = []
    try:
        for n in counts:
            timing.pin_threads(n)
            cycle = itertools.cycle(texts)
            m = timing.measure(lambda cycle=cycle: translator.translate([next(cycle)]), warmup=warmup,
                              repeats=repeats * len(texts), label=f"{n} threads")
            rows.append({"threads": n, **_stat_columns(m), "cores": timing.usable_cores()})
    finally:
        timing.pin_threads(saved_threads)
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
    table = pd.DataFrame(rows)
    table["speedup"] = table["p50_ms"].iloc[0] / table["p50_ms"]
    return table
