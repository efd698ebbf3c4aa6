"""The before/after table from a synthetic ledger: any subset of columns, skipped rows, latest wins."""

from __future__ import annotations

import math

import pytest

from labkit.measure import ledger, report

ENV = {"cpu": "test cpu", "cores": 2, "threads": 2, "gpu": None, "versions": {}, "git": None}


def lat(p50):
    return {"p50": p50, "p95": p50 * 1.5, "n": 20}


def write(path, **fields):
    ledger.append(path, ledger.make_record(notebook=fields.pop("notebook", "nb"), env=ENV, **fields))


@pytest.fixture()
def ledger_df(tmp_path):
    path = tmp_path / "ci" / "ledger.jsonl"
    write(path, variant="teacher", technique="baseline", backend="torch", precision="fp32",
          metrics={"bleu": 50.0, "chrf": 60.0, "latency_ms": lat(99.0)})  # superseded below
    write(path, variant="teacher", technique="baseline", backend="torch", precision="fp32",
          metrics={"bleu": 65.0, "chrf": 80.0, "latency_ms": lat(40.0), "peak_rss_mb": 500.0,
                   "size_mb": 12.0, "sentences_per_s": 90.0})
    write(path, variant="teacher-profile", technique="profiling", parent="teacher", backend="torch",
          metrics={"latency_ms": lat(41.0)},
          stages={"tokenize": {"ms": 0.5, "pct": 1.2}, "encode": {"ms": 2.0, "pct": 4.9},
                  "decode": {"ms": 38.0, "pct": 92.7}, "detokenize": {"ms": 0.2, "pct": 0.5}})
    write(path, variant="ort-int8", technique="quantization", parent="teacher", backend="onnxruntime",
          precision="int8", metrics={"bleu": 64.0, "latency_ms": lat(10.0), "qps": 250.0},
          gate={"name": "bleu >= teacher - 1", "passed": True, "detail": "64.0 vs 65.0"},
          stages={"tokenize": {"ms": 0.4, "pct": 4.0}, "detokenize": {"ms": 0.1, "pct": 1.0}})
    write(path, variant="pruned-50", technique="pruning", parent="teacher",
          metrics={"bleu": 50.0, "latency_ms": lat(20.0)},
          gate={"name": "bleu >= teacher - 1", "passed": False, "detail": "50.0 vs 65.0"})
    write(path, variant="trt-fp16", technique="tensorrt", status="skipped",
          reason="no CUDA device: TensorRT needs an NVIDIA GPU")
    return report.load(path)


def test_before_after_rows_and_speedups(ledger_df):
    table = report.before_after(ledger_df).set_index("variant")
    assert table.index.tolist() == ["teacher", "ort-int8", "pruned-50", "trt-fp16"]  # teacher first, no profiling
    assert table.loc["teacher", "latency_p50_ms"] == 40.0  # the latest teacher record wins
    assert table.loc["teacher", "speedup_vs_teacher"] == 1.0
    assert table.loc["ort-int8", "speedup_vs_teacher"] == pytest.approx(4.0)  # 40 / 10
    assert table.loc["pruned-50", "speedup_vs_teacher"] == pytest.approx(2.0)
    assert table.loc["teacher", "latency_p95_ms"] == 60.0 and table.loc["teacher", "peak_rss_mb"] == 500.0


def test_stage_times_from_the_record_or_its_profile(ledger_df):
    table = report.before_after(ledger_df).set_index("variant")
    assert table.loc["teacher", "tokenize_ms"] == 0.5  # from teacher-profile (parent = teacher)
    assert table.loc["ort-int8", "tokenize_ms"] == 0.4  # its own stages win
    assert math.isnan(table.loc["pruned-50", "tokenize_ms"])


def test_gates_skips_and_sparse_metrics(ledger_df):
    table = report.before_after(ledger_df).set_index("variant")
    assert table.loc["ort-int8", "gate"] == "passed: bleu >= teacher - 1"
    assert table.loc["pruned-50", "gate"].startswith("FAILED")
    assert table.loc["trt-fp16", ["status", "reason"]].tolist() == ["skipped", "no CUDA device: TensorRT needs an NVIDIA GPU"]
    assert math.isnan(table.loc["trt-fp16", "latency_p50_ms"]) and table.loc["trt-fp16", "gate"] == ""
    assert table.loc["ort-int8", "qps"] == 250.0 and math.isnan(table.loc["teacher", "qps"])
    assert report.problems(report.before_after(ledger_df)) == [
        "pruned-50: failed (50.0 vs 65.0)",  # its gate failed, so make_record wrote it as failed
        "trt-fp16: skipped (no CUDA device: TensorRT needs an NVIDIA GPU)"]


def test_profiling_rows_on_request(ledger_df):
    table = report.before_after(ledger_df, include_profiling=True)
    assert "teacher-profile" in table["variant"].tolist()


def test_missing_steps(ledger_df):
    missing = report.missing_steps(ledger_df)
    assert "distillation (03_distillation): no record yet" in missing
    assert not any(m.startswith(("baseline", "pruning", "tensorrt", "no 'teacher'")) for m in missing)


def test_empty_or_absent_ledger(tmp_path):
    df = report.load(tmp_path / "nope" / "ledger.jsonl")
    table = report.before_after(df)
    assert table.empty and {"variant", "bleu", "speedup_vs_teacher", "status"} <= set(table.columns)
    missing = report.missing_steps(df)
    assert missing[0].startswith("no 'teacher' record") and len(missing) == 1 + len(report.STEPS)


def test_without_a_teacher_speedup_is_missing(tmp_path):
    path = tmp_path / "ledger.jsonl"
    write(path, variant="ort-fp32", technique="onnx", metrics={"latency_ms": lat(30.0)})
    table = report.before_after(report.load(path))
    assert table["variant"].tolist() == ["ort-fp32"] and math.isnan(table["speedup_vs_teacher"].iloc[0])
    assert math.isnan(table["bleu"].iloc[0])


def test_save_writes_csv_and_html(ledger_df, tmp_path):
    import pandas as pd

    table = report.before_after(ledger_df)
    csv = report.save(table, tmp_path / "out")
    assert pd.read_csv(csv)["variant"].tolist() == table["variant"].tolist()
    assert "<table" in (tmp_path / "out" / "report.html").read_text()


@pytest.mark.parametrize("gpu,trt,expect_gpu,expect_trt", [
    (None, None, "none", "not installed"),
    ("NVIDIA H200", "10.13", "NVIDIA H200", "10.13"),
])
def test_environment_table_says_what_is_absent(gpu, trt, expect_gpu, expect_trt):
    env = {"cpu": "x", "cores": 2, "threads": 2, "gpu": gpu, "git": None,
           "versions": {"python": "3.12", "torch": "2.13", "tensorrt": trt}}
    rows = report.environment_table(env).set_index("item")
    assert rows.loc["GPU", "value"] == expect_gpu and rows.loc["TensorRT", "value"] == expect_trt
    assert ("skip" in rows.loc["TensorRT", "meaning"]) == (trt is None)


def test_teacher_bleu_is_compared_on_the_subset_the_variants_use(tmp_path):
    """The teacher's full-split BLEU (1 200 sentences) would be compared with variants scored on 200;
    the table and the Pareto plot take its `subset` score instead."""
    from labkit.measure import plots

    path = tmp_path / "ci" / "ledger.jsonl"
    write(path, variant="teacher", technique="baseline", metrics={"bleu": 98.9, "chrf": 99.5, "latency_ms": lat(40.0)},
          eval_sentences=1200, subset={"eval_sentences": 200, "bleu": 98.7, "chrf": 99.4})
    write(path, variant="ort-int8", technique="quantization", metrics={"bleu": 98.5, "latency_ms": lat(10.0)})
    df = report.load(path)
    table = report.before_after(df).set_index("variant")
    assert (table.loc["teacher", "bleu"], table.loc["teacher", "chrf"]) == (98.7, 99.4)
    assert table.loc["teacher", "bleu_sentences"] == 200
    assert table.loc["ort-int8", "bleu"] == 98.5 and math.isnan(table.loc["ort-int8", "bleu_sentences"])
    points = plots.pareto_points(df).set_index("variant")
    assert points.loc["teacher", "metrics.bleu"] == 98.7


def test_no_speedup_between_different_workloads(tmp_path):
    """kv-cache records time a 128-token forced decode of opus-mt-shape: not comparable with the
    teacher's translations, so they get no speedup; a bench row of the same workload does."""
    path = tmp_path / "ci" / "ledger.jsonl"
    write(path, variant="teacher", technique="baseline", metrics={"latency_ms": lat(25.0)})
    write(path, variant="kv-static", technique="kv-cache", metrics={"latency_ms": lat(1500.0)}, forced_length=128)
    write(path, variant="bench-ort-int8", technique="quantization", metrics={"latency_ms": lat(12.5)}, forced_length=None)
    write(path, variant="bench-ort-fp32", technique="onnx", metrics={"latency_ms": lat(300.0)}, bench={"forced_length": 40})
    table = report.before_after(report.load(path)).set_index("variant")
    assert math.isnan(table.loc["bench-ort-fp32", "speedup_vs_teacher"])  # labkit bench nests forced_length
    assert math.isnan(table.loc["kv-static", "speedup_vs_teacher"])
    assert table.loc["bench-ort-int8", "speedup_vs_teacher"] == pytest.approx(2.0)
    assert table.loc["teacher", "speedup_vs_teacher"] == 1.0
