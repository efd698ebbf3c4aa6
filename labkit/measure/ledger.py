"""The results ledger: one JSON line per measured variant, appended atomically, read as a DataFrame.

File: `artifacts/<preset>/ledger.jsonl`, schema `labkit.ledger/1`. Every record is validated on
the way in (`append`) and on the way out (`read`), so reports and tests can rely on the names.

Crash policy. `append` writes each record as one `os.write` of a whole line on an O_APPEND
descriptor and fsyncs it, so concurrent writers never interleave inside a line. A crash can still
leave a torn final line (a prefix of a record, no newline). A proper prefix of a JSON object is
never valid JSON, so the reader cannot mistake it for a record: `read` skips every unparseable
line with a `LedgerWarning` naming its line number (or raises with `strict=True`), while a line
that parses but breaks the schema is refused with `LedgerError`. `append` starts its line with a
newline when the file does not end with one, so a torn line never swallows the next record.

Left out on purpose: editing or deleting records (append a new one; `latest` picks it), locking
(O_APPEND whole-line writes make it unnecessary), and schema migration (there is one schema).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import secrets
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkit.core.artifacts import root as artifacts_root
from labkit.measure import replay
from labkit.measure.gates import status_of
from labkit.measure.timing import environment

if TYPE_CHECKING:
    import pandas as pd

SCHEMA = "labkit.ledger/1"
TECHNIQUES = frozenset(
    "baseline pruning distillation onnx quantization shortlist tensorrt kv-cache serving peer profiling".split()
)
STATUSES = frozenset({"ok", "failed", "skipped"})
TEXT_FIELDS = ("backend", "precision", "model", "parent")  # optional strings
NUMBER_METRICS = (
    "bleu", "chrf", "agreement", "tokens_per_s", "sentences_per_s", "peak_rss_mb", "size_mb",
)  # fmt: skip
# Fields DESIGN names that every record carries, even when null: a record missing one was built
# by hand around make_record and would read back with silent gaps.
REQUIRED_FIELDS = (
    "schema", "run_id", "time", "notebook", "variant", "parent", "technique", "backend",
    "precision", "model", "metrics", "gate", "env",
)  # fmt: skip
ENV_FIELDS = {"cpu": str, "cores": int, "threads": int, "versions": dict}  # plus gpu, git: str or None
SCORE_RANGES = {"bleu": (0.0, 100.0), "chrf": (0.0, 100.0), "agreement": (0.0, 1.0)}
# Flattened columns every DataFrame from `read` has, even when no record fills them.
COLUMNS = (
    "schema", "run_id", "time", "notebook", "variant", "parent", "technique", "backend",
    "precision", "model", "status", "reason",
    *(f"metrics.{m}" for m in ("bleu", "chrf", "bleu_signature", "agreement")),
    "metrics.latency_ms.p50", "metrics.latency_ms.p95", "metrics.latency_ms.n",
    *(f"metrics.{m}" for m in ("tokens_per_s", "sentences_per_s", "peak_rss_mb", "size_mb", "params")),
    "gate.name", "gate.passed", "gate.detail",
    "env.cpu", "env.cores", "env.threads", "env.gpu", "env.git",
)  # fmt: skip
RUN_ID_ENV = "LABKIT_RUN_ID"  # set by the runner so every notebook of one sequence shares it


class LedgerError(ValueError):
    """A record does not match the schema, or the ledger cannot be read as one."""


class LedgerWarning(UserWarning):
    """A torn (unparseable) line was skipped, or a record from an older labkit was read leniently."""


# ---------------------------------------------------------------- identity and paths


def ledger_path(preset: str, root: str | Path | None = None) -> Path:
    """Where `preset` keeps its ledger: `<root>/<preset>/ledger.jsonl`.

    `root` defaults to labkit.core.artifacts.root() ($LABKIT_ARTIFACTS, else artifacts/ at the
    repository root): ledger_path("ci") -> <root>/ci/ledger.jsonl
    """

    return Path(root if root is not None else artifacts_root()) / preset / "ledger.jsonl"


def new_run_id() -> str:
    """A fresh, sortable run id, e.g. '20250101T120000Z-3fa2c1'."""
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


_PROCESS_RUN_ID = new_run_id()


def run_id() -> str:
    """$LABKIT_RUN_ID if set (the runner sets it), else one id fixed for this process."""
    return os.environ.get(RUN_ID_ENV) or _PROCESS_RUN_ID


def utc_now() -> str:
    """ISO 8601 UTC time with milliseconds, e.g. '2025-01-01T12:00:00.123+00:00'."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------- validation


def _is_number(x: Any) -> bool:
    # bool is an int subclass, but True is not a BLEU score; NaN is not JSON (use None).
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def json_number(x: Any) -> float | None:
    """A metric as a record holds it: NaN and None (not measured) -> None, numpy floats -> float.

    float("nan") -> None; np.float64(2.5) -> 2.5. JSON has no NaN, and validate refuses one.
    """
    return None if x is None or (isinstance(x, float) and x != x) else float(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_text(x: Any) -> bool:
    return isinstance(x, str) and x != ""


def _check(ok: bool, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise LedgerError(f"ledger field {field!r}: expected {expected}, got {value!r}")


def _check_optional_text(record: Mapping[str, Any], field: str, prefix: str = "") -> None:
    value = record.get(field)
    _check(value is None or isinstance(value, str), prefix + field, value, "a string or None")


def _validate_latency(lat: Any) -> None:
    _check(isinstance(lat, Mapping), "metrics.latency_ms", lat, "a dict {p50, p95, n}")
    for key in ("p50", "p95"):
        _check(_is_number(lat.get(key)), f"metrics.latency_ms.{key}", lat.get(key), "a finite number")
    n = lat.get("n")
    _check(_is_int(n) and n > 0, "metrics.latency_ms.n", n, "a positive int")


def _validate_metrics(metrics: Any) -> None:
    if metrics is None:
        return
    _check(isinstance(metrics, Mapping), "metrics", metrics, "a dict or None")
    for key in NUMBER_METRICS:
        value = metrics.get(key)
        _check(value is None or _is_number(value), f"metrics.{key}", value, "a finite number or None")
    _check_optional_text(metrics, "bleu_signature", "metrics.")
    params = metrics.get("params")
    _check(params is None or _is_int(params), "metrics.params", params, "an int or None")
    if metrics.get("latency_ms") is not None:
        _validate_latency(metrics["latency_ms"])


def _validate_gate(gate: Any) -> None:
    if gate is None:
        return
    _check(isinstance(gate, Mapping), "gate", gate, "a dict {name, passed, detail} or None")
    _check(isinstance(gate.get("name"), str), "gate.name", gate.get("name"), "a string")
    _check(isinstance(gate.get("passed"), bool), "gate.passed", gate.get("passed"), "a bool")
    _check(isinstance(gate.get("detail"), str), "gate.detail", gate.get("detail"), "a string")


def _consistent_latency(lat: Mapping[str, Any]) -> None:
    for key in ("p50", "p95"):
        _check(lat[key] >= 0, f"metrics.latency_ms.{key}", lat[key], "a finite number >= 0")
    _check(lat["p95"] >= lat["p50"], "metrics.latency_ms.p95", lat["p95"], f"a value >= p50 ({lat['p50']})")
    iqr, noisy = lat.get("iqr"), lat.get("noisy")  # optional: the spread behind p50
    _check(iqr is None or (_is_number(iqr) and iqr >= 0), "metrics.latency_ms.iqr", iqr, "a finite number >= 0")
    _check(noisy is None or isinstance(noisy, bool), "metrics.latency_ms.noisy", noisy, "a bool")


def _consistent_metrics(metrics: Mapping[str, Any] | None) -> None:
    if metrics is None:
        return
    for key, (low, high) in SCORE_RANGES.items():
        value = metrics.get(key)
        _check(value is None or low <= value <= high, f"metrics.{key}", value, f"a score in [{low:g}, {high:g}]")
    if metrics.get("latency_ms") is not None:
        _consistent_latency(metrics["latency_ms"])


def _consistent_env(env: Any) -> None:
    _check(isinstance(env, Mapping), "env", env, "a dict {cpu, cores, threads, gpu, versions, git}")
    for key, kind in ENV_FIELDS.items():
        value = env.get(key)
        ok = isinstance(value, kind) and not isinstance(value, bool) and (kind is not int or value > 0)
        _check(ok, f"env.{key}", value, f"a {'positive int' if kind is int else kind.__name__}")
    for key in ("gpu", "git"):
        _check(key in env, f"env.{key}", "<missing>", "present (None when there is none)")
        _check_optional_text(env, key, "env.")


def _parse_time(value: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        _check(False, "time", value, "an ISO 8601 time")


def _validate_status(record: Mapping[str, Any]) -> None:
    status, reason = record.get("status", "ok"), record.get("reason")
    _check(status in STATUSES, "status", status, f"one of {sorted(STATUSES)}")
    # A skipped TensorRT step with no reason reads like a bug in the report.
    if status != "ok":
        _check(_is_text(reason), "reason", reason, f"a non-empty string when status is {status!r}")
    _check_optional_text(record, "reason")


def validate_structure(record: Mapping[str, Any]) -> None:
    """The types of every field: what any `labkit.ledger/1` record, old or new, must satisfy."""
    _check(isinstance(record, Mapping), "<record>", type(record).__name__, "a dict")
    _check(record.get("schema") == SCHEMA, "schema", record.get("schema"), repr(SCHEMA))
    for field in ("run_id", "time", "notebook", "variant"):
        _check(_is_text(record.get(field)), field, record.get(field), "a non-empty string")
    _parse_time(record["time"])
    technique = record.get("technique")
    _check(technique in TECHNIQUES, "technique", technique, f"one of {sorted(TECHNIQUES)}")
    for field in TEXT_FIELDS:
        _check_optional_text(record, field)
    _validate_status(record)
    _validate_metrics(record.get("metrics"))
    _validate_gate(record.get("gate"))
    env = record.get("env")
    _check(env is None or isinstance(env, Mapping), "env", env, "a dict or None")


def validate_consistency(record: Mapping[str, Any]) -> None:
    """What the values must say together: every DESIGN field present, a zoned time, a complete env,
    scores in range, p95 >= p50, and no "ok" record whose gate failed. Records written by labkit
    before these rules existed may break them; `read` accepts those with a warning."""
    for field in REQUIRED_FIELDS:
        _check(field in record, field, "<missing>", "present (None where the schema allows it)")
    # A time without a zone cannot be ordered against records written on another machine.
    _check(_parse_time(record["time"]).tzinfo is not None, "time", record["time"], "an ISO 8601 time with a UTC offset")
    _consistent_metrics(record.get("metrics"))
    _consistent_env(record.get("env"))
    gate = record.get("gate")
    # A variant that failed its gate is never an "ok" number a report could offer as a win.
    failed_gate = isinstance(gate, Mapping) and gate.get("passed") is False
    _check(not (failed_gate and record.get("status", "ok") == "ok"), "status", record.get("status", "ok"),
           "'failed' (or 'skipped') when the gate failed")


def validate(record: Mapping[str, Any]) -> None:
    """Raise `LedgerError` naming the first field of `record` that breaks `labkit.ledger/1`.

    Missing `status` means "ok"; a "failed" or "skipped" record must say why in `reason`.
    {"schema": "labkit.ledger/1", ..., "technique": "prune"} -> LedgerError: ledger field 'technique': ...
    """
    validate_structure(record)
    validate_consistency(record)


# ---------------------------------------------------------------- records


def make_record(
    *,
    notebook: str,
    variant: str,
    technique: str,
    metrics: Mapping[str, Any] | None = None,
    gate: Mapping[str, Any] | None = None,
    status: str | None = None,
    reason: str | None = None,
    env: Mapping[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A validated record with schema, run_id, time and env filled in.

    `status` defaults to what the gate says: "failed", with the gate's detail as reason, when it did
    not pass; else "ok". Other fields (parent, backend, precision, model, or any extra key) pass through `fields`.

    >>> make_record(notebook="06_tensorrt", variant="trt-fp16", technique="tensorrt",
    ...             status="skipped", reason="no CUDA device")["status"]   # doctest: +SKIP
    'skipped'
    """
    if env is None:

        env = environment()
    if status is None:
        status, why = status_of([gate])
        reason = reason or why
    record = {
        "schema": SCHEMA,
        "run_id": run_id(),
        "time": utc_now(),
        "notebook": notebook,
        "variant": variant,
        "parent": None,
        "technique": technique,
        "backend": None,
        "precision": None,
        "model": None,
        "status": status,
        "reason": reason,
        "metrics": dict(metrics) if metrics is not None else None,
        "gate": dict(gate) if gate is not None else None,
        "env": dict(env),
    } | fields
    validate(record)
    return record


def _encode(record: Mapping[str, Any]) -> bytes:
    try:
        return (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"ledger record is not JSON-serialisable: {exc}") from None


def _ends_with_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"


def append(path: str | Path, record: Mapping[str, Any]) -> Mapping[str, Any]:
    """Validate `record` and append it to the ledger at `path` as one line; returns the record.

    A run that replays recorded measurements (labkit.measure.replay) validates and returns the record but
    writes nothing: its numbers are the recorded run's, already in the ledger.
    """
    validate(record)
    if replay.replaying():
        return record
    line = _encode(record)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if not _ends_with_newline(fd):
            line = b"\n" + line  # isolate a torn line left by a crashed writer
        written = os.write(fd, line)
        if written != len(line):
            raise LedgerError(f"short write to {path}: {written} of {len(line)} bytes (torn line left)")
        os.fsync(fd)
    finally:
        os.close(fd)
    return record


def append_all(path: str | Path, records: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Append the records one notebook writes together, each stamped `run_records=len(records)`.

    The stamp lets a report tell a complete run from a partial one (a crash between two appends
    leaves fewer records than announced): see labkit.measure.report. Returns the stamped records.
    """
    return [append(path, {**r, "run_records": len(records)}) for r in records]


# ---------------------------------------------------------------- reading


def _legacy(record: dict[str, Any]) -> dict[str, Any]:
    """An older record as today's rules read it: a failed gate makes it "failed" (with the gate's detail)."""
    status, why = status_of([record.get("gate")] if isinstance(record.get("gate"), Mapping) else [])
    if status == "failed" and record.get("status", "ok") == "ok":
        return {**record, "status": "failed", "reason": why}
    return record


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; a None sub-record contributes nothing.

    {"metrics": {"latency_ms": {"p50": 3.0}}, "gate": None} -> {"metrics.latency_ms.p50": 3.0}
    """
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, name + ".")
        elif not (value is None and key in ("metrics", "gate", "env", "latency_ms")):
            flat[name] = value
    return flat


def _parse_lines(path: Path, strict: bool) -> list[tuple[int, dict[str, Any]]]:
    records = []
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            message = f"{path}:{number}: torn or corrupt ledger line ({exc.__class__.__name__})"
            if strict:
                raise LedgerError(message) from None
            warnings.warn(message + ", skipped", LedgerWarning, stacklevel=3)
            continue
        try:
            validate_structure(record)
        except LedgerError as exc:
            raise LedgerError(f"{path}:{number}: {exc}") from None
        try:
            validate_consistency(record)
        except LedgerError as exc:  # written before the rule existed: keep it, but never as a false "ok"
            record = _legacy(record)
            warnings.warn(f"{path}:{number}: record written by an older labkit ({exc}); read as "
                          f"status {record['status']!r}", LedgerWarning, stacklevel=3)
        records.append((number, record))
    return records


def read(path: str | Path, *, strict: bool = False) -> pd.DataFrame:
    """The ledger as a DataFrame: one row per record, dotted columns, plus `line` and `record`.

    Columns include `metrics.bleu`, `metrics.latency_ms.p50`, `gate.passed` (see COLUMNS) even
    when empty; `record` holds the raw dict; `time` is a UTC timestamp. Torn lines are skipped
    with a LedgerWarning (LedgerError if `strict`); records breaking the schema raise LedgerError.
    """
    import pandas as pd

    parsed = _parse_lines(Path(path), strict)
    rows = [flatten(r) | {"line": n, "record": r} for n, r in parsed]
    extra = list(dict.fromkeys(k for row in rows for k in row if k not in COLUMNS))
    df = pd.DataFrame(rows, columns=[*COLUMNS, *extra])
    df["time"] = pd.to_datetime(df["time"], utc=True, format="ISO8601")
    return df


def latest(df: pd.DataFrame, variant: str | Iterable[str] | None = None) -> pd.DataFrame:
    """The most recent record per variant (ties in time go to the later line), indexed by variant.

    `variant` narrows to one name or a list of names; asking for one that is absent is an error.
    """
    wanted = [variant] if isinstance(variant, str) else list(variant or [])
    missing = sorted(set(wanted) - set(df["variant"]))
    if missing:
        raise LedgerError(f"no ledger record for variant(s) {missing}; known: {sorted(set(df['variant']))}")
    rows = df[df["variant"].isin(wanted)] if wanted else df
    newest = rows.sort_values(["time", "line"], kind="stable").groupby("variant", sort=False).tail(1)
    return newest.set_axis(newest["variant"].tolist(), axis=0)
