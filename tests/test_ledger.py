"""The ledger refuses bad records by name, survives torn lines, and reads back as a flat DataFrame."""

import copy
import json
import os

import pandas as pd
import pytest

from labkit.core import artifacts
from labkit.measure import ledger
from labkit.measure.ledger import LedgerError, LedgerWarning

ENV = {"cpu": "test cpu", "cores": 2, "threads": 2, "gpu": None, "versions": {"python": "3"}, "git": None}


def record(**overrides):
    """A complete, valid record; `env` is fixed so tests do not depend on the machine."""
    fields = dict(
        notebook="00_setup_and_baseline",
        variant="baseline",
        technique="baseline",
        backend="torch",
        precision="fp32",
        model="tiny-teacher",
        metrics={
            "bleu": 21.5, "chrf": 48.0, "bleu_signature": "nrefs:1|tok:13a", "agreement": 1.0,
            "latency_ms": {"p50": 12.0, "p95": 15.0, "n": 20}, "tokens_per_s": 300.0,
            "sentences_per_s": 10.0, "peak_rss_mb": 512.0, "size_mb": 30.0, "params": 7_000_000,
        },  # fmt: skip
        gate={"name": "bleu >= baseline - 1", "passed": True, "detail": "21.5 vs 21.5"},
        env=ENV,
    )
    return ledger.make_record(**(fields | overrides))


def test_make_record_fills_schema_run_id_time_and_env(monkeypatch):
    monkeypatch.setenv("LABKIT_RUN_ID", "run-42")
    r = ledger.make_record(notebook="06_tensorrt", variant="trt", technique="tensorrt",
                           status="skipped", reason="no CUDA device")  # fmt: skip
    assert r["schema"] == "labkit.ledger/1"
    assert r["run_id"] == "run-42"
    assert pd.Timestamp(r["time"]).tzinfo is not None  # UTC, ISO 8601
    assert set(r["env"]) >= {"cpu", "cores", "threads", "gpu", "versions", "git"}
    assert (r["status"], r["metrics"], r["gate"]) == ("skipped", None, None)


def test_run_id_is_fixed_per_process_without_env(monkeypatch):
    monkeypatch.delenv("LABKIT_RUN_ID", raising=False)
    assert ledger.run_id() == ledger.run_id() != ""


def _set(r, dotted, value):
    *parents, leaf = dotted.split(".")
    target = r
    for key in parents:
        target = target[key]
    if value is _DELETE:
        del target[leaf]
    else:
        target[leaf] = value


_DELETE = object()


@pytest.mark.parametrize(
    "field, value",
    [
        ("schema", "labkit.ledger/0"),
        ("run_id", ""),
        ("time", "yesterday"),
        ("variant", None),
        ("technique", "magic"),
        ("backend", 3),
        ("status", "maybe"),
        ("metrics", [1, 2]),
        ("metrics.bleu", "high"),
        ("metrics.bleu", True),  # a bool is not a score
        ("metrics.chrf", float("nan")),  # use None for "not measured"
        ("metrics.params", 1.5),
        ("metrics.bleu_signature", 1),
        ("metrics.latency_ms", 12.0),
        ("metrics.latency_ms.p95", _DELETE),
        ("metrics.latency_ms.n", 0),
        ("gate", "passed"),
        ("gate.passed", "yes"),
        ("gate.name", _DELETE),
        ("env", "laptop"),
        ("env", None),
        ("env.cores", "two"),
        ("env.threads", 0),
        ("env.git", _DELETE),
        ("env.versions", _DELETE),
        ("parent", _DELETE),  # every DESIGN field is present, even when null
        ("gate", _DELETE),
        ("time", "2025-01-01T12:00:00"),  # no UTC offset
        ("metrics.bleu", 250.0),
        ("metrics.chrf", -1.0),
        ("metrics.agreement", 1.5),
        ("metrics.latency_ms.p95", 11.0),  # below p50
        ("metrics.latency_ms.p50", -1.0),
        ("metrics.latency_ms.iqr", -0.5),
        ("metrics.latency_ms.noisy", "yes"),
    ],
)
def test_validate_names_the_bad_field(field, value):
    r = copy.deepcopy(record())
    _set(r, field, value)
    with pytest.raises(LedgerError, match=f"'{field}'"):
        ledger.validate(r)


@pytest.mark.parametrize("status", ["failed", "skipped"])
def test_not_ok_needs_a_reason(status):
    with pytest.raises(LedgerError, match="'reason'"):
        record(status=status)
    assert record(status=status, reason="no GPU")["reason"] == "no GPU"


@pytest.mark.parametrize(
    "overrides",
    [{"metrics": None}, {"gate": None}, {"metrics": {"bleu": None, "latency_ms": None}},
     {"parent": "baseline", "plan": {"heads": [1, 2]}}],  # fmt: skip
)
def test_optional_and_extra_fields_are_valid(overrides):
    ledger.validate(record(**overrides))


def test_append_then_read_roundtrip_with_flat_columns(tmp_path):
    path = tmp_path / "ci" / "ledger.jsonl"
    a = ledger.append(path, record())
    b = ledger.append(path, record(variant="int8", parent="baseline", gate=None, metrics={"bleu": 20.0}))
    df = ledger.read(path)
    assert len(df) == 2
    assert set(ledger.COLUMNS) <= set(df.columns)
    assert df.loc[0, "metrics.latency_ms.p50"] == 12.0
    assert df.loc[0, "metrics.latency_ms.n"] == 20
    assert df["gate.passed"].tolist()[0] is True
    assert pd.isna(df.loc[1, "gate.passed"]) and pd.isna(df.loc[1, "metrics.latency_ms.p50"])
    assert df["record"].tolist() == [a, b]  # raw records kept verbatim
    assert df["line"].tolist() == [1, 2]
    assert str(df["time"].dt.tz) == "UTC"


def test_read_empty_ledger_has_the_stable_columns(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.touch()
    df = ledger.read(path)
    assert df.empty and set(ledger.COLUMNS) <= set(df.columns)


def test_append_refuses_invalid_record_and_leaves_file_unchanged(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger.append(path, record())
    before = path.read_bytes()
    bad = record() | {"technique": "magic"}
    with pytest.raises(LedgerError, match="technique"):
        ledger.append(path, bad)
    with pytest.raises(LedgerError, match="JSON"):
        ledger.append(path, record(extra=object()))
    assert path.read_bytes() == before


def test_torn_final_line_is_skipped_with_warning_and_isolated_by_next_append(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger.append(path, record(variant="a"))
    whole = json.dumps(record(variant="torn")).encode()
    with open(path, "ab") as f:  # a writer that crashed halfway through its line
        f.write(whole[: len(whole) // 2])
    with pytest.warns(LedgerWarning, match=":2: torn"):
        assert ledger.read(path)["variant"].tolist() == ["a"]
    with pytest.raises(LedgerError, match="torn"):
        ledger.read(path, strict=True)
    ledger.append(path, record(variant="b"))  # must not glue itself onto the torn line
    with pytest.warns(LedgerWarning):
        assert ledger.read(path)["variant"].tolist() == ["a", "b"]


def test_short_write_raises_and_leaves_only_a_detectable_torn_line(tmp_path, monkeypatch):
    path = tmp_path / "ledger.jsonl"
    ledger.append(path, record(variant="a"))
    real_write = os.write
    monkeypatch.setattr(ledger.os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))
    with pytest.raises(LedgerError, match="short write"):
        ledger.append(path, record(variant="crash"))
    monkeypatch.setattr(ledger.os, "write", real_write)
    ledger.append(path, record(variant="b"))
    with pytest.warns(LedgerWarning):
        assert ledger.read(path)["variant"].tolist() == ["a", "b"]


def test_read_refuses_a_record_with_the_wrong_schema(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger.append(path, record())
    with open(path, "a") as f:
        f.write(json.dumps(record() | {"schema": "someone-else/3"}) + "\n")
    with pytest.raises(LedgerError, match=r"ledger.jsonl:2: .*'schema'"):
        ledger.read(path)


def test_latest_picks_newest_per_variant_and_breaks_time_ties_by_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    rows = [("a", "2025-01-01T00:00:00+00:00", 1.0), ("b", "2025-01-02T00:00:00+00:00", 2.0),
            ("a", "2025-01-03T00:00:00+00:00", 3.0), ("a", "2025-01-02T00:00:00+00:00", 4.0),
            ("b", "2025-01-02T00:00:00+00:00", 5.0)]  # fmt: skip
    for variant, time, bleu in rows:
        ledger.append(path, record(variant=variant, metrics={"bleu": bleu}) | {"time": time})
    newest = ledger.latest(ledger.read(path))
    assert newest.loc["a", "metrics.bleu"] == 3.0  # newest time, although not the last line
    assert newest.loc["b", "metrics.bleu"] == 5.0  # same time as line 2: the later line wins
    assert ledger.latest(ledger.read(path), variant="b").index.tolist() == ["b"]
    with pytest.raises(LedgerError, match="'zzz'"):
        ledger.latest(ledger.read(path), variant="zzz")


def test_ledger_path_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("LABKIT_ARTIFACTS", raising=False)
    # the default is anchored at the repository, not the cwd (notebooks run from notebooks/)
    assert ledger.ledger_path("ci") == artifacts.REPO_ROOT / "artifacts" / "ci" / "ledger.jsonl"
    monkeypatch.setenv("LABKIT_ARTIFACTS", str(tmp_path))
    assert ledger.ledger_path("ci") == tmp_path / "ci" / "ledger.jsonl"
    assert ledger.ledger_path("ci", root="x").as_posix() == "x/ci/ledger.jsonl"


def test_a_failed_gate_makes_a_failed_record_and_never_an_ok_one():
    gate = {"name": "bleu drop <= 1.0", "passed": False, "detail": "drop 2.4 > 1.0"}
    r = record(gate=gate)
    assert (r["status"], r["reason"]) == ("failed", "drop 2.4 > 1.0")
    assert record(gate=gate, status="skipped", reason="not timed")["status"] == "skipped"
    with pytest.raises(LedgerError, match="'status'"):
        record(gate=gate, status="ok")
    assert record()["status"] == "ok"  # a passed gate


def test_records_from_an_older_labkit_still_read_but_never_as_a_false_ok(tmp_path):
    """Before the consistency rules, make_record wrote status "ok" whatever the gate said, and left
    env and latency spreads loose. Such a ledger still reads (with a warning per record); a failed
    gate reads as "failed"; a record that is structurally broken is still refused."""
    path = tmp_path / "ledger.jsonl"
    old = copy.deepcopy(record())
    old |= {"status": "ok", "gate": {"name": "bleu_gap", "passed": False, "detail": "gap 2.4 > 1.5"},
            "env": {"cpu": "old"}, "time": "2025-01-01T12:00:00"}
    path.write_text(json.dumps(old) + "\n" + json.dumps(record(variant="new")) + "\n")
    with pytest.warns(LedgerWarning, match="older labkit"):
        df = ledger.read(path)
    assert df.set_index("variant").loc["baseline", ["status", "reason"]].tolist() == ["failed", "gap 2.4 > 1.5"]
    assert df.set_index("variant").loc["new", "status"] == "ok"
    path.write_text(json.dumps({**old, "technique": "magic"}) + "\n")
    with pytest.raises(LedgerError, match="'technique'"):
        ledger.read(path)
