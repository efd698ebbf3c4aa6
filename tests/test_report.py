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
    assert table.loc["teacher", ["speedup", "speedup_vs"]].tolist() == [1.0, "itself"]
    assert table.loc["ort-int8", "speedup"] == pytest.approx(4.0)  # 40 / 10: the parent in the same run
    assert table.loc["pruned-50", ["speedup", "speedup_vs"]].tolist() == [pytest.approx(2.0), "teacher"]
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


def test_missing_steps_do_not_ask_for_notebooks_the_checkout_lacks(ledger_df, tmp_path):
    (tmp_path / "03_distillation.ipynb").write_text("{}")
    missing = report.missing_steps(ledger_df, notebooks=tmp_path)
    assert "distillation (03_distillation): no record yet" in missing
    assert "serving (08_serving): no record; this checkout has no such notebook" in missing


def test_empty_or_absent_ledger(tmp_path):
    df = report.load(tmp_path / "nope" / "ledger.jsonl")
    table = report.before_after(df)
    assert table.empty and {"variant", "bleu", "speedup", "speedup_vs", "status"} <= set(table.columns)
    missing = report.missing_steps(df)
    assert missing[0].startswith("no 'teacher' record") and len(missing) == 1 + len(report.STEPS)


def test_without_a_teacher_speedup_is_missing(tmp_path):
    path = tmp_path / "ledger.jsonl"
    write(path, variant="ort-fp32", technique="onnx", metrics={"latency_ms": lat(30.0)})
    table = report.before_after(report.load(path))
    assert table["variant"].tolist() == ["ort-fp32"] and math.isnan(table["speedup"].iloc[0])
    assert math.isnan(table["bleu"].iloc[0])


def test_save_writes_csv(ledger_df, tmp_path):
    import pandas as pd

    table = report.before_after(ledger_df)
    csv = report.save(table, tmp_path / "out")
    assert pd.read_csv(csv)["variant"].tolist() == table["variant"].tolist()


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
    """kv-cache records time a whole 128-token forced decode: no speedup against the teacher's
    per-sentence latency and never in its column; a bench row of the same workload does get one."""
    path = tmp_path / "ci" / "ledger.jsonl"
    write(path, variant="teacher", technique="baseline", metrics={"latency_ms": lat(25.0)})
    write(path, variant="kv-static", technique="kv-cache", parent="teacher", metrics={"latency_ms": lat(1500.0)},
          forced_length=128)
    write(path, variant="bench-ort-int8", technique="quantization", parent="teacher",
          metrics={"latency_ms": lat(12.5)}, forced_length=None)
    write(path, variant="bench-ort-fp32", technique="onnx", parent="teacher", metrics={"latency_ms": lat(300.0)},
          bench={"forced_length": 40})
    table = report.before_after(report.load(path)).set_index("variant")
    assert math.isnan(table.loc["bench-ort-fp32", "speedup"])  # labkit bench nests forced_length
    assert math.isnan(table.loc["kv-static", "speedup"])
    assert math.isnan(table.loc["kv-static", "latency_p50_ms"]) and table.loc["kv-static", "decode_p50_ms"] == 1500.0
    assert table.loc["bench-ort-int8", "speedup"] == pytest.approx(2.0)


# ---------------------------------------------------------------- speedups that hold still


def lab_run(path, run, teacher_ms, monkeypatch, notebooks=("00", "02", "05", "07")):
    """One runner sequence under run id `run`: each notebook writes its records as the lab does."""
    monkeypatch.setenv("LABKIT_RUN_ID", run)
    if "00" in notebooks:
        write(path, notebook="00_setup_and_baseline", variant="teacher", technique="baseline",
              metrics={"bleu": 99.0, "latency_ms": lat(teacher_ms), "size_mb": 12.0})
    if "02" in notebooks:  # pruning times its own teacher beside its variants
        ledger.append_all(path, [ledger.make_record(
            notebook="02_head_pruning", variant=f"pruned-{k}", technique="pruning", parent="teacher", env=ENV,
            metrics={"bleu": 98.5, "latency_ms": lat(teacher_ms * (1 - k / 100))},
            teacher_latency_ms=lat(teacher_ms * 1.1)) for k in (10, 25)])
    if "05" in notebooks:  # int8 vs onnx-fp32 timed together; ct2 pairs with the teacher of its run
        ledger.append_all(path, [
            ledger.make_record(notebook="05_int8_quantization", variant="onnx-int8", technique="quantization",
                               parent="onnx-fp32", env=ENV, metrics={"bleu": 98.8, "latency_ms": lat(10.0)},
                               speedup_vs_parent=2.5),
            ledger.make_record(notebook="05_int8_quantization", variant="ct2-int8", technique="peer",
                               parent="teacher", env=ENV, metrics={"bleu": 98.9, "latency_ms": lat(teacher_ms / 4)})])
    if "07" in notebooks:
        ledger.append_all(path, [ledger.make_record(
            notebook="07_kv_cache_decoding", variant=f"kv-{m}", technique="kv-cache", env=ENV, forced_length=128,
            parent=None if m == "dynamic" else "kv-dynamic", metrics={"latency_ms": lat(ms)})
            for m, ms in (("dynamic", 2000.0), ("static", 1600.0))])


def speedup_by_variant(path):
    table = report.before_after(report.load(path)).set_index("variant")
    return table[["speedup", "speedup_vs", "run_id"]]


def test_rerunning_one_notebook_leaves_every_other_notebooks_speedups(tmp_path, monkeypatch):
    path = tmp_path / "ci" / "ledger.jsonl"
    lab_run(path, "run-a", 26.0, monkeypatch)
    before = speedup_by_variant(path)
    assert before.loc["pruned-25", "speedup"] == pytest.approx(26.0 * 1.1 / 19.5)
    assert before.loc["ct2-int8", ["speedup", "speedup_vs"]].tolist() == [pytest.approx(4.0), "teacher"]
    assert before.loc["onnx-int8", ["speedup", "speedup_vs"]].tolist() == [2.5, "onnx-fp32"]
    assert before.loc["kv-static", ["speedup", "speedup_vs"]].tolist() == [pytest.approx(1.25), "kv-dynamic"]
    lab_run(path, "run-b", 16.5, monkeypatch, notebooks=("00",))  # notebook 00 alone, a faster teacher
    after = speedup_by_variant(path)
    assert after.loc["teacher", "run_id"] == "run-b"
    others = [v for v in before.index if v != "teacher"]
    assert after.loc[others].equals(before.loc[others])


def test_a_partial_or_all_failed_later_run_does_not_hide_a_complete_one(tmp_path, monkeypatch):
    path = tmp_path / "ci" / "ledger.jsonl"
    lab_run(path, "run-a", 26.0, monkeypatch)
    monkeypatch.setenv("LABKIT_RUN_ID", "run-partial")  # announced two records, wrote one (a crash)
    ledger.append(path, ledger.make_record(
        notebook="02_head_pruning", variant="pruned-10", technique="pruning", parent="teacher", env=ENV,
        metrics={"latency_ms": lat(900.0)}, teacher_latency_ms=lat(20.0)) | {"run_records": 2})
    monkeypatch.setenv("LABKIT_RUN_ID", "run-failed")  # every variant failed its gate
    ledger.append_all(path, [ledger.make_record(
        notebook="07_kv_cache_decoding", variant="kv-static", technique="kv-cache", env=ENV, forced_length=128,
        gate={"name": "same tokens", "passed": False, "detail": "differs"}, metrics={"latency_ms": lat(5.0)})])
    df = report.load(path)
    chosen = report.chosen_runs(df)
    assert chosen.loc["02_head_pruning", ["run_id", "newer_incomplete"]].tolist() == ["run-a", 1]
    assert chosen.loc["07_kv_cache_decoding", "run_id"] == "run-a"
    why = report.runs(df).set_index("run_id")["why"]
    assert why["run-partial"] == "partial: 1 of 2 records written" and why["run-failed"].startswith("no ok record")
    table = report.before_after(df).set_index("variant")
    assert table.loc["pruned-10", "latency_p50_ms"] == pytest.approx(23.4) and table.loc["kv-static", "status"] == "ok"


def test_noisy_measurements_are_flagged():
    import pandas as pd

    rows = pd.DataFrame({"metrics.latency_ms.p50": [26.0, 26.0, 26.0, 26.0],
                         "metrics.latency_ms.p95": [30.0, 614.0, 30.0, 30.0],
                         "metrics.latency_ms.iqr": [1.0, 1.0, 5.0, None],
                         "metrics.latency_ms.noisy": [False, False, False, True]})
    assert report.noisy(rows).tolist() == [False, True, True, True]


def test_headline_is_the_fastest_gated_variant_against_the_teacher(tmp_path, monkeypatch):
    path = tmp_path / "ci" / "ledger.jsonl"
    lab_run(path, "run-a", 26.0, monkeypatch)
    head = report.headline(report.before_after(report.load(path)))
    assert head["variant"] == "ct2-int8" and head["speedup"] == pytest.approx(4.0)
    assert head["bleu_change"] == pytest.approx(-0.1) and head["run_id"] == "run-a"
