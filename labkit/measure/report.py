"""The before/after table: each notebook's latest complete run, with speedups measured in that run.

    df = report.load(ledger.ledger_path("ci"))       # an absent ledger reads as empty
    rows = report.current(df)                        # per notebook, the records of its latest complete run
    table = report.before_after(df)                  # one row per variant: teacher first, then lab order
    report.missing_steps(df)                         # ['pruning (02_head_pruning): no record yet', ...]

Which records count. The ledger keeps every run; the report shows, per notebook, the records of
its latest *complete* run. A run of notebook N is the set of records N wrote under one run id.
It is complete when (1) it wrote every record it announced (`ledger.append_all` stamps each
record of one write with `run_records`, the number written together; a record without the
stamp announces only itself) and (2) at least one of its records is `ok` (a run in which every
variant failed or was skipped measured nothing). Every record has status ok, failed or skipped
(the schema enforces it). A partial or all-failed later run therefore never hides an earlier
complete one; when no run of a notebook is complete, its latest run is shown, marked incomplete.

How a speedup is computed. Only against a baseline timed in the same run and on the same
workload, never against "the newest teacher": first the study's own same-run comparison
(`teacher_latency_ms`: pruning, distillation; `torch_latency_ms`: ONNX; `bench.speedup_vs_torch`:
labkit bench; `speedup_vs_parent`: INT8 vs onnx-fp32), else the record's parent in the same run id
with the same forced decode length. Each speedup says what it is against (`speedup_vs`), so
re-running one notebook never changes another notebook's numbers. Whole-decode times
(kv-cache: one forced 128-token decode) go in `decode_*` columns, never beside per-sentence
latency. Left out: statistics across runs (one run's numbers per notebook) and HTML (report_html).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from labkit.measure import ledger
from labkit.measure.timing import NOISE_THRESHOLD

if TYPE_CHECKING:
    import pandas as pd

BASELINE = "teacher"  # the variant every headline speedup is measured against
# Which notebook writes each technique's records, in lab order (for "what is missing").
STEPS = {
    "baseline": "00_setup_and_baseline", "profiling": "01_profiling", "pruning": "02_head_pruning",
    "distillation": "03_distillation", "onnx": "04_onnx_export", "quantization": "05_int8_quantization",
    "shortlist": "05_int8_quantization",
    "tensorrt": "06_tensorrt", "kv-cache": "07_kv_cache_decoding", "serving": "08_serving",
}  # fmt: skip
WHOLE_DECODE = frozenset({"kv-cache"})  # techniques whose latency is one whole forced decode, not a sentence
TAIL_RATIO = 3.0  # p95 above 3x p50: a long tail (a busy machine), flagged like a wide IQR
# (column of the table, ledger column it comes from), in display order.
METRIC_COLUMNS = (
    ("latency_p50_ms", "metrics.latency_ms.p50"),
    ("latency_p95_ms", "metrics.latency_ms.p95"),
    ("decode_p50_ms", None),  # whole-decode times (WHOLE_DECODE), filled from the latency of those rows
    ("decode_p95_ms", None),
    ("tokenize_ms", "stages.tokenize.ms"),
    ("postprocess_ms", "stages.detokenize.ms"),
    ("peak_rss_mb", "metrics.peak_rss_mb"),
    ("size_mb", "metrics.size_mb"),
    ("bleu", "metrics.bleu"),
    ("chrf", "metrics.chrf"),
    ("bleu_sentences", None),  # how many sentences bleu/chrf cover (comparable_scores)
    ("agreement", "metrics.agreement"),
    ("sentences_per_s", "metrics.sentences_per_s"),
    ("tokens_per_s", "metrics.tokens_per_s"),
    ("qps", "metrics.qps"),
)
TEXT_COLUMNS = ("variant", "notebook", "technique", "backend", "precision")
TAIL_COLUMNS = ("speedup", "speedup_vs", "noisy", "gate", "status", "reason", "run_id")


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


def _num(df: pd.DataFrame, name: str) -> pd.Series:
    import pandas as pd

    return pd.to_numeric(_col(df, name), errors="coerce")


# ---------------------------------------------------------------- which run counts


def runs(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (notebook, run_id), oldest first: time (of its last record), records, ok, failed,
    skipped, announced (what `run_records` promised), complete, why (empty when complete)."""
    import pandas as pd

    columns = ["notebook", "run_id", "time", "records", "ok", "failed", "skipped", "announced", "complete", "why"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for (notebook, run_id), g in df.groupby(["notebook", "run_id"], sort=False):
        status = _col(g, "status").fillna("ok")
        announced = int(_num(g, "run_records").fillna(1).max())
        written = g["variant"].nunique()
        why = (f"partial: {written} of {announced} records written" if written < announced
               else "" if (status == "ok").any() else "no ok record: every variant failed or was skipped")
        rows.append([notebook, run_id, g["time"].max(), len(g), int((status == "ok").sum()),
                     int((status == "failed").sum()), int((status == "skipped").sum()), announced, not why, why])
    return pd.DataFrame(rows, columns=columns).sort_values("time", kind="stable").reset_index(drop=True)


def chosen_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Per notebook, the run the report shows: its latest complete run, else its latest run.

    Indexed by notebook; columns as `runs`, plus `newer_incomplete` (how many later runs were passed over).
    """
    import pandas as pd

    table = runs(df)
    picked = []
    for _, g in table.groupby("notebook", sort=False):
        complete = g[g["complete"]]
        row = (complete if len(complete) else g).iloc[-1]
        picked.append(row.to_dict() | {"newer_incomplete": int((g["time"] > row["time"]).sum())})
    return pd.DataFrame(picked, columns=[*table.columns, "newer_incomplete"]).set_index("notebook", drop=False)


def current(df: pd.DataFrame) -> pd.DataFrame:
    """The ledger rows of each notebook's chosen run (`chosen_runs`), the latest record per variant in it."""
    if df.empty:
        return df
    chosen = chosen_runs(df)
    keep = [chosen.loc[nb, "run_id"] == rid for nb, rid in zip(df["notebook"], df["run_id"])]
    rows = df[keep].sort_values(["time", "line"], kind="stable")
    return rows.drop_duplicates(["notebook", "variant"], keep="last")


# ---------------------------------------------------------------- speedups within one run


def _workload(rows: pd.DataFrame) -> pd.Series:
    """The forced decode length each record was timed at (NaN: free decoding); labkit bench nests it."""
    return _num(rows, "forced_length").fillna(_num(rows, "bench.forced_length"))


def _recorded_speedup(row: pd.Series) -> tuple[float, str] | None:
    """The study's own same-run comparison, if the record carries one: (speedup, what it is against)."""
    p50, parent = row.get("metrics.latency_ms.p50"), row.get("parent") or BASELINE
    if _present(row.get("teacher_latency_ms.p50")) and _present(p50):  # pruning, distillation
        return row["teacher_latency_ms.p50"] / p50, (BASELINE if row.get("technique") == "pruning" else parent)
    if _present(row.get("torch_latency_ms.p50")) and _present(p50):  # onnx: torch eager, own processes
        return row["torch_latency_ms.p50"] / p50, parent
    if _present(row.get("bench.speedup_vs_torch")):
        model = row.get("model")
        return row["bench.speedup_vs_torch"], BASELINE if model in (None, BASELINE) else f"{model} (torch eager)"
    if _present(row.get("speedup_vs_parent")):  # int8 vs onnx-fp32, timed together
        return row["speedup_vs_parent"], parent
    return None


def _present(x) -> bool:
    return x is not None and x == x


def speedups(rows: pd.DataFrame, ledger_df: pd.DataFrame) -> pd.DataFrame:
    """`speedup` and `speedup_vs` for each record in `rows`, each from the record's own run only.

    Order: the study's own comparison (`_recorded_speedup`); the teacher or a reference record
    (`reference_for`) is 1.0 against itself; else the parent's p50 in the same run id and workload
    over the record's p50; else none (NaN, ''). `ledger_df` is the whole ledger (parents may
    come from another notebook of the same run).
    """
    import pandas as pd

    work, all_work = _workload(rows), _workload(ledger_df)
    out = []
    for i, (_, row) in enumerate(rows.iterrows()):
        found = _recorded_speedup(row)
        if found is None and (row["variant"] == BASELINE or _present(row.get("reference_for"))):
            found = (1.0, "itself") if _present(row.get("metrics.latency_ms.p50")) else None
        if found is None and _present(row.get("parent")) and _present(row.get("metrics.latency_ms.p50")):
            same = ledger_df[(ledger_df["run_id"] == row["run_id"]) & (ledger_df["variant"] == row["parent"])
                             & (_col(ledger_df, "status").fillna("ok") == "ok")]
            same = same[all_work[same.index].fillna(-1) == (work.iloc[i] if work.iloc[i] == work.iloc[i] else -1)]
            p50 = same["metrics.latency_ms.p50"].dropna()
            if len(p50):
                found = (float(p50.iloc[-1]) / row["metrics.latency_ms.p50"], row["parent"])
        out.append(found or (float("nan"), ""))
    return pd.DataFrame(out, index=rows.index, columns=["speedup", "speedup_vs"])


def noisy(rows: pd.DataFrame) -> pd.Series:
    """True where the record's timing should not be trusted to a few percent: it says so itself
    (`noisy`, `bench.noisy`), IQR/median is over timing.NOISE_THRESHOLD, or p95 > TAIL_RATIO x p50."""
    p50, p95, iqr = (_num(rows, f"metrics.latency_ms.{k}") for k in ("p50", "p95", "iqr"))
    said = _col(rows, "metrics.latency_ms.noisy").eq(True) | _col(rows, "bench.noisy").eq(True)
    return said | (iqr / p50 > NOISE_THRESHOLD) | (p95 > TAIL_RATIO * p50)


# ---------------------------------------------------------------- the table


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
        out[key] = _num(rows, f"subset.{key}").fillna(_num(rows, f"metrics.{key}"))
    out["eval_sentences"] = _num(rows, "subset.eval_sentences").fillna(_num(rows, "eval_sentences"))
    return out


def _gate_text(passed, name) -> str:
    """(True, 'bleu >= 60') -> 'passed: bleu >= 60'; no gate -> ''."""
    if passed is None or passed != passed:  # None or NaN: the record has no gate
        return ""
    return f"{'passed' if passed else 'FAILED'}: {name}"


def _profile_stages(rows: pd.DataFrame) -> pd.DataFrame:
    """Stage columns of the latest profiling record per parent variant (among `rows`), indexed by parent."""
    profiles = rows[(_col(rows, "technique") == "profiling") & _col(rows, "parent").notna()]
    newest = profiles.drop_duplicates("parent", keep="last").set_index("parent", drop=False)
    return newest[[c for c in rows.columns if c.startswith("stages.")]]


def _metrics(rows: pd.DataFrame, stages: pd.DataFrame) -> dict[str, pd.Series]:
    """The METRIC_COLUMNS of `rows`: whole-decode latencies moved to decode_*, stages from profiles."""
    scores = comparable_scores(rows).rename(columns={"eval_sentences": "bleu_sentences"})
    whole = _col(rows, "technique").isin(WHOLE_DECODE)
    out = {}
    for name, source in METRIC_COLUMNS:
        if name in scores.columns:
            values = scores[name]
        elif name.startswith("decode_"):
            values = _num(rows, f"metrics.latency_ms.{name.split('_')[1]}").where(whole)
        else:
            values = _num(rows, source)
            if name.startswith("latency_"):
                values = values.where(~whole)
        if source in stages.columns:  # fall back to the variant's profiling record
            values = values.fillna(rows["variant"].map(stages[source]))
        out[name] = values.astype(float)
    return out


def before_after(df: pd.DataFrame, include_profiling: bool = False) -> pd.DataFrame:
    """One row per variant of each notebook's chosen run (`current`): variant, notebook, technique,
    backend, precision, latency p50/p95 per sentence, decode p50/p95 (whole forced decodes),
    tokenize and postprocess ms, peak RSS and size (MB), BLEU, chrF (shared test subset, see
    `comparable_scores`) and their sentence count, agreement, sentences/s, tokens/s, QPS,
    speedup and what it is against (same run, see `speedups`), noisy, gate, status, reason, run_id.

    The teacher leads, the rest follow in lab order. Empty ledger -> empty table with these
    columns. Profiling records are not variants and are left out unless `include_profiling`.
    """
    import pandas as pd

    columns = [*TEXT_COLUMNS, *(c for c, _ in METRIC_COLUMNS), *TAIL_COLUMNS]
    if df.empty:
        return pd.DataFrame(columns=columns)
    rows = current(df)
    stages = _profile_stages(rows)
    if not include_profiling:
        rows = rows[_col(rows, "technique") != "profiling"]
    table = pd.DataFrame({c: _col(rows, c) for c in TEXT_COLUMNS})
    for name, values in _metrics(rows, stages).items():
        table[name] = values
    table[["speedup", "speedup_vs"]] = speedups(rows, df)
    table["noisy"] = noisy(rows)
    table["gate"] = [_gate_text(p, n) for p, n in zip(_col(rows, "gate.passed"), _col(rows, "gate.name"))]
    table["status"] = _col(rows, "status").fillna("ok")
    table["reason"] = _col(rows, "reason").fillna("")
    table["run_id"] = rows["run_id"]
    order = sorted(range(len(table)), key=lambda i: (table["variant"].iloc[i] != BASELINE, i))
    return table.iloc[order].reset_index(drop=True)[columns]


def headline(table: pd.DataFrame) -> dict | None:
    """The baseline against the fastest variant whose gate passed, speedup measured in the same run.

    Candidates: ok rows, gate passed or none, per-sentence latency, speedup against the teacher.
    Returns {variant, speedup, bleu_change, size_mb, teacher_size_mb, p50_ms, noisy, run_id} or None.
    """
    base = table[table["variant"] == BASELINE]
    ok = table[(table["status"] == "ok") & ~table["gate"].str.startswith("FAILED")
               & (table["speedup_vs"] == BASELINE) & table["latency_p50_ms"].notna() & (table["variant"] != BASELINE)]
    if ok.empty:
        return None
    best = ok.loc[ok["speedup"].idxmax()]
    teacher = base.iloc[0] if len(base) else None
    change = best["bleu"] - teacher["bleu"] if teacher is not None else float("nan")
    return {"variant": best["variant"], "notebook": best["notebook"], "speedup": float(best["speedup"]),
            "bleu": best["bleu"], "bleu_change": change, "size_mb": best["size_mb"],
            "teacher_size_mb": teacher["size_mb"] if teacher is not None else float("nan"),
            "p50_ms": best["latency_p50_ms"], "noisy": bool(best["noisy"]), "run_id": best["run_id"]}


def missing_steps(df: pd.DataFrame, notebooks: str | Path | None = None) -> list[str]:
    """What the ledger lacks, in lab order: one line per technique with no record, and why it matters.

    With `notebooks` (the notebooks folder), a step whose notebook is not there says so instead of
    asking to run it. Empty ledger -> ["no 'teacher' record: ...", 'baseline (00_setup_and_baseline): no record yet', ...]
    """
    have = set(_col(df, "technique").dropna())
    present = None if notebooks is None else {p.stem for p in Path(notebooks).glob("*.ipynb")}
    missing = [f"{t} ({nb}): " + ("no record yet" if present is None or nb in present
                                   else "no record; this checkout has no such notebook")
               for t, nb in STEPS.items() if t not in have]
    if BASELINE not in set(_col(df, "variant").dropna()):
        missing.insert(0, f"no '{BASELINE}' record: the headline needs it (run 00_setup_and_baseline)")
    return missing


def save(table: pd.DataFrame, directory: str | Path) -> Path:
    """Write the table as report.csv under `directory` (atomically); returns its path.
    The HTML report is `labkit.measure.report_html.write`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".report.csv.tmp"
    tmp.write_text(table.to_csv(index=False))
    return tmp.replace(directory / "report.csv")


def budget_table(budget) -> pd.DataFrame:
    """A preset's budget (a dataclass) as a two-column table, one setting per row, instead of its repr:
    budget_table(PruneBudget()) -> rows ('calibration_sentences', 64), ..."""
    import pandas as pd

    def shown(value):
        if dataclasses.is_dataclass(value):
            return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(value).items())
        if isinstance(value, tuple | list):
            return ", ".join(str(shown(v)) for v in value)
        return str(value)  # text, so pandas does not turn a column of ints and floats into 20.0000

    rows = [(f.name, shown(getattr(budget, f.name))) for f in dataclasses.fields(budget)]
    return pd.DataFrame(rows, columns=["setting", "value"]).set_index("setting")


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
