"""The before/after table: one row per variant from the ledger, with speedup over the teacher.

    df = report.load(ledger.ledger_path("ci"))       # an absent ledger reads as empty
    table = report.before_after(df)                  # teacher first, then in the order they ran
    report.missing_steps(df)                         # ['pruning (02_head_pruning): no record yet', ...]

A row is the latest record of a variant (`ledger.latest`); columns whose metric no record
has stay empty, so later notebooks add rows and metrics without touching this module.
Tokenizer and postprocessing times come from the record's `stages` key or, failing that,
from the latest profiling record whose `parent` is that variant. Skipped and failed
variants are rows too, with their reason. Left out: statistics across runs (one run's
numbers per variant) and formatting beyond rounding (the notebook displays the DataFrame).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from labkit.measure import ledger

if TYPE_CHECKING:
    import pandas as pd

BASELINE = "teacher"  # the variant every speedup is measured against
# Which notebook writes each technique's records, in lab order (for "what is missing").
STEPS = {
    "baseline": "00_setup_and_baseline", "profiling": "01_profiling", "pruning": "02_head_pruning",
    "distillation": "03_distillation", "onnx": "04_onnx_export", "quantization": "05_int8_quantization",
    "tensorrt": "06_tensorrt", "kv-cache": "07_kv_cache_decoding", "serving": "08_serving",
}  # fmt: skip
# (column of the table, ledger column it comes from), in display order.
METRIC_COLUMNS = (
    ("latency_p50_ms", "metrics.latency_ms.p50"),
    ("latency_p95_ms", "metrics.latency_ms.p95"),
    ("tokenize_ms", "stages.tokenize.ms"),
    ("postprocess_ms", "stages.detokenize.ms"),
    ("peak_rss_mb", "metrics.peak_rss_mb"),
    ("size_mb", "metrics.size_mb"),
    ("bleu", "metrics.bleu"),
    ("chrf", "metrics.chrf"),
    ("bleu_sentences", None),  # how many sentences bleu/chrf cover (comparable_scores)
    ("agreement", "metrics.agreement"),
    ("sentences_per_s", "metrics.sentences_per_s"),
    ("qps", "metrics.qps"),
)
TEXT_COLUMNS = ("variant", "technique", "backend", "precision")


def load(path: str | Path) -> pd.DataFrame:
    """`ledger.read(path)`, or an empty ledger DataFrame when the file does not exist yet."""
    import pandas as pd


    if Path(path).exists():
        return ledger.read(path)
    return pd.DataFrame(columns=[*ledger.COLUMNS, "line", "record"])


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    """Column `name`, or an all-missing one when no record has that key."""
    import pandas as pd

    return df[name] if name in df.columns else pd.Series([None] * len(df), index=df.index, dtype=object)


def comparable_scores(rows: pd.DataFrame) -> pd.DataFrame:
    """BLEU and chrF on the set every variant is scored on: the preset's test subset.

    The baseline scores the whole test split for its quality floor and keeps the preset's subset
    under `subset`; mixing the two in one table would credit or blame variants for a change of
    sentences. {"metrics.bleu": 98.9, "eval_sentences": 1200, "subset.bleu": 98.7,
    "subset.eval_sentences": 200} -> bleu 98.7, chrf ..., eval_sentences 200.
    """
    import pandas as pd

    out = pd.DataFrame(index=rows.index)
    for key in ("bleu", "chrf"):
        full = pd.to_numeric(_col(rows, f"metrics.{key}"), errors="coerce")
        out[key] = pd.to_numeric(_col(rows, f"subset.{key}"), errors="coerce").fillna(full)
    subset_n = pd.to_numeric(_col(rows, "subset.eval_sentences"), errors="coerce")
    out["eval_sentences"] = subset_n.fillna(pd.to_numeric(_col(rows, "eval_sentences"), errors="coerce"))
    return out


def _gate_text(passed, name) -> str:
    """(True, 'bleu >= 60') -> 'passed: bleu >= 60'; no gate -> ''."""
    if passed is None or passed != passed:  # None or NaN: the record has no gate
        return ""
    return f"{'passed' if passed else 'FAILED'}: {name}"


def _profile_stages(df: pd.DataFrame) -> pd.DataFrame:
    """Stage columns of the latest profiling record per parent variant, indexed by that parent."""

    profiles = df[(_col(df, "technique") == "profiling") & _col(df, "parent").notna()]
    if profiles.empty:
        return profiles
    newest = ledger.latest(profiles).drop_duplicates("parent", keep="last")  # latest is time-ordered
    newest = newest.set_index("parent", drop=False)
    return newest[[c for c in df.columns if c.startswith("stages.")]]


def before_after(df: pd.DataFrame, baseline: str = BASELINE, include_profiling: bool = False) -> pd.DataFrame:
    """The seed-style table: variant, technique, backend, precision, latency p50/p95, tokenize and
    postprocess ms, peak RSS and size (MB), BLEU, chrF (on the shared test subset, see
    `comparable_scores`) and how many sentences they cover, agreement, sentences/s, QPS,
    speedup vs `baseline` (its p50 over the row's p50; empty for a row timed on another workload, i.e.
    another forced decode length), gate, status, reason.

    Empty ledger -> empty table with these columns. Profiling records are not variants and
    are left out unless `include_profiling`.
    """
    import pandas as pd


    columns = [*TEXT_COLUMNS, *(c for c, _ in METRIC_COLUMNS), "speedup_vs_teacher", "gate", "status", "reason"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    rows = ledger.latest(df)
    if not include_profiling:
        rows = rows[_col(rows, "technique") != "profiling"]
    stages = _profile_stages(df)
    table = pd.DataFrame({c: _col(rows, c) for c in TEXT_COLUMNS})
    scores = comparable_scores(rows).rename(columns={"eval_sentences": "bleu_sentences"})
    for name, source in METRIC_COLUMNS:
        values = scores[name] if name in scores.columns else pd.to_numeric(_col(rows, source), errors="coerce")
        if source in stages.columns:  # fall back to the variant's profiling record
            values = values.fillna(rows["variant"].map(stages[source]))
        table[name] = values.astype(float)
    base = table["latency_p50_ms"].get(baseline)
    table["speedup_vs_teacher"] = (base / table["latency_p50_ms"]) if base is not None else float("nan")
    # A latency over a forced decode length (kv-cache steps on opus-mt-shape) is another workload than
    # the baseline's translations: a ratio between them would read as a 50x slowdown.
    forced = pd.to_numeric(_col(rows, "forced_length"), errors="coerce").fillna(
        pd.to_numeric(_col(rows, "bench.forced_length"), errors="coerce"))  # labkit bench nests it
    base_forced = forced.get(baseline) if baseline in forced.index else float("nan")
    same_work = forced.eq(base_forced) | (forced.isna() & (base_forced != base_forced))
    table.loc[~same_work.to_numpy(), "speedup_vs_teacher"] = float("nan")
    table["gate"] = [_gate_text(p, n) for p, n in zip(_col(rows, "gate.passed"), _col(rows, "gate.name"))]
    table["status"] = _col(rows, "status").fillna("ok")
    table["reason"] = _col(rows, "reason").fillna("")
    order = sorted(range(len(table)), key=lambda i: (table.index[i] != baseline, i))
    return table.iloc[order].reset_index(drop=True)[columns]


def missing_steps(df: pd.DataFrame) -> list[str]:
    """What the ledger lacks, in lab order: one line per technique with no record, and why it matters.

    Empty ledger -> ['baseline (00_setup_and_baseline): no record yet (run it first: ...)', ...]
    """
    have = set(_col(df, "technique").dropna())
    missing = [f"{t} ({nb}): no record yet" for t, nb in STEPS.items() if t not in have]
    if BASELINE not in set(_col(df, "variant").dropna()):
        missing.insert(0, f"no '{BASELINE}' record: speedups need it (run 00_setup_and_baseline)")
    return missing


def save(table: pd.DataFrame, directory: str | Path) -> Path:
    """Write the table as report.csv and report.html under `directory` (atomically); returns the CSV."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.csv", table.to_csv(index=False)),
                       ("report.html", table.to_html(index=False, na_rep="", float_format=lambda x: f"{x:.2f}"))):
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(directory / name)
    return directory / "report.csv"


def environment_table(env: dict) -> pd.DataFrame:
    """`labkit.measure.timing.environment()` as rows (item, value, meaning), saying plainly what is absent.

    {"gpu": None, "versions": {"tensorrt": None, ...}} -> rows 'GPU: none (CUDA not available) ...'
    """
    import pandas as pd

    versions = env.get("versions", {})
    gpu, trt = env.get("gpu"), versions.get("tensorrt")
    rows = [("CPU", env.get("cpu"), f"{env.get('cores')} usable cores, {env.get('threads')} torch threads"),
            ("GPU", gpu or "none", "CUDA device found" if gpu else
             "no CUDA device: GPU steps (06_tensorrt) explain and record a skip"),
            ("TensorRT", trt or "not installed", "installed" if trt else
             "absent: 06_tensorrt explains and records a skip (pip install labkit[trt] on a GPU machine)")]
    rows += [(pkg, v or "not installed", "") for pkg, v in versions.items() if pkg != "tensorrt"]
    rows += [("git commit", env.get("git") or "unknown", "")]
    return pd.DataFrame(rows, columns=["item", "value", "meaning"])


def problems(table: pd.DataFrame) -> list[str]:
    """Rows that did not produce numbers, with their reason: 'trt-fp16: skipped (no CUDA device)'."""
    bad = table[table["status"] != "ok"]
    return [f"{r.variant}: {r.status} ({r.reason})" for r in bad.itertuples()]
