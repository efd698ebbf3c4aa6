"""`labkit bench`: variants timed in their own processes, compared with torch, written to the ledger."""

from __future__ import annotations

import argparse
import shutil
import sys

import pytest
import torch

from labkit.config import Preset
from labkit.core.bundle import load_bundle
from labkit.engines import variants
from labkit.lab import bench
from labkit.measure import ledger, roofline


@pytest.fixture(scope="module")
def artifacts(tiny_bundle_dir, tmp_path_factory):
    """An artifact root holding the tiny fixture as bundle 'tiny' of preset ci, already exported
    (TorchScript, seconds) so the bench does not spend a minute in the dynamo exporter."""
    from labkit.core.bundle import load_bundle
    from labkit.engines.onnx_export import export

    root = tmp_path_factory.mktemp("artifacts")
    shutil.copytree(tiny_bundle_dir, root / "ci" / "tiny")
    torch.set_num_threads(1)
    export(load_bundle(tiny_bundle_dir), root / "ci" / "onnx-tiny", exporters=("torchscript",))
    return root


def test_parse_variants():
    assert bench.parse_variants(" torch, ort-int8,torch") == ["torch", "ort-int8"]
    with pytest.raises(ValueError, match="known"):
        bench.parse_variants("torch,tensorflow")
    with pytest.raises(ValueError):
        bench.parse_variants("")


def _result(p50, sps, ids, n=6):
    return {"p50": p50, "p95": p50 * 1.5, "iqr": 1.0, "n": n, "noisy": False, "sentences_per_s": sps,
            "ids": ids, "tokens": 2.0, "threads": 2, "load_s": 0.1, "peak_rss_mb": 100.0}


def test_results_frame_ratios_against_torch():
    """torch 300 ms / 10 sent/s; ort-int8 100 ms / 40 sent/s, one of two sentences differs ->
    speedup 3.0, throughput ratio 4.0, agreement 0.5."""
    df = bench.results_frame({"torch": _result(300.0, 10.0, [[1, 2], [3]]),
                                  "ort-int8": _result(100.0, 40.0, [[1, 2], [4]])}).set_index("variant")
    assert df.loc["torch", "speedup"] == 1.0 and df.loc["torch", "agreement"] == 1.0
    assert df.loc["ort-int8", "speedup"] == pytest.approx(3.0)
    assert df.loc["ort-int8", "throughput_ratio"] == pytest.approx(4.0)
    assert df.loc["ort-int8", "agreement"] == 0.5


def test_results_frame_leaves_untimed_variants_empty():
    """A failed variant has a row (status, gate) but no numbers, so it can never show a speedup."""
    gate = {"name": "bleu-drop<=1.0", "passed": False, "detail": "BLEU 20.00 vs fp32 parent 31.50: drop 11.50"}
    checks = {"torch": bench.Check("ok"), "ort-int8": bench.Check("failed", gate, gate["detail"])}
    df = bench.results_frame({"torch": _result(300.0, 10.0, [[1]])}, checks).set_index("variant")
    assert df.loc["ort-int8", "status"] == "failed" and df.loc["ort-int8", "gate_passed"] is False
    assert df.loc["ort-int8", ["p50_ms", "speedup", "sentences_per_s"]].isna().all()
    table = bench.bench_table(df.reset_index())
    assert "FAILED" in table and "fastest within its gate" not in table
    assert "no optimized variant beats torch eager" in table


def test_a_slower_variant_is_not_called_the_fastest():
    df = bench.results_frame({"torch": _result(25.0, 190.0, [[1]]), "ct2-int8": _result(75.0, 50.0, [[1]])})
    table = bench.bench_table(df)
    assert "no optimized variant beats torch eager" in table and "fastest within its gate" not in table


@pytest.fixture()
def fake_workers(monkeypatch):
    """Record which variants would get a timing process, and answer for them without starting one."""
    started = []

    def run_variant(variant, preset_name, threads, bundle_name="teacher", artifact=None):
        started.append(variant)
        return {**_result(100.0 if variant != "torch" else 300.0, 10.0, [[1]]), "threads": threads}

    monkeypatch.setattr(bench, "run_variant", run_variant)
    monkeypatch.setattr(roofline, "bandwidth_in_process", lambda threads, **k: roofline.Bandwidth((10.0,), threads, 8))
    return started


def test_a_variant_failing_its_gate_is_recorded_failed_and_not_timed(tiny_bundle_dir, tmp_path, monkeypatch,
                                                                      fake_workers):
    """The int8 gate is made to fail: ort-int8 gets no timing process, its row and ledger record say
    failed with the gate, and the table offers no win; torch and ort-fp32 (parity) are timed."""
    from labkit.core.bundle import load_bundle
    from labkit.engines import ort_int8
    from labkit.engines.onnx_export import export

    monkeypatch.setenv("LABKIT_ARTIFACTS", str(tmp_path))
    shutil.copytree(tiny_bundle_dir, tmp_path / "ci" / "tiny")
    torch.set_num_threads(1)
    export(load_bundle(tiny_bundle_dir), tmp_path / "ci" / "onnx-tiny", exporters=("torchscript",))
    monkeypatch.setattr(ort_int8, "ensure_blocks", lambda *a, **k: {"blocks": ["ffn"], "basis": "test: ffn only"})
    failing = {"name": "bleu-drop<=1.0", "passed": False, "detail": "BLEU 20.00 vs fp32 parent 31.50: drop 11.50"}
    monkeypatch.setattr(variants, "variant_gate", lambda *a, **k: dict(failing))
    df = bench.run_bench(Preset.from_name("ci"), load_bundle(tmp_path / "ci" / "tiny"), ["torch", "ort-fp32", "ort-int8"], threads=1,
                             progress=False).set_index("variant")
    assert fake_workers == ["torch", "ort-fp32"]
    assert list(df["status"]) == ["ok", "ok", "failed"]
    assert df.loc["ort-fp32", "gate"] == "onnx-parity" and df.loc["ort-fp32", "gate_passed"] is True
    assert df.loc["ort-int8", "speedup"] != df.loc["ort-int8", "speedup"]  # NaN: never timed
    newest = ledger.latest(ledger.read(ledger.ledger_path("ci")), ["bench-torch", "bench-ort-fp32", "bench-ort-int8"])
    record = newest.loc["bench-ort-int8", "record"]
    assert record["status"] == "failed" and record["gate"] == failing and record["reason"] == failing["detail"]
    assert record["metrics"] is None and record["bench"]["timed"] is False
    assert record["recipe"]["blocks"] == ["ffn"] and record["recipe"]["blocks_basis"] == "test: ffn only"
    assert newest.loc["bench-ort-fp32", "gate.passed"] is True
    # the model's own name ('teacher' for this fixture), not the bundle directory's ('tiny')
    assert set(newest["model"]) == {load_bundle(tiny_bundle_dir).name} != {"tiny"}
    table = bench.bench_table(df.reset_index())
    assert "ort-int8: bleu-drop<=1.0 FAILED, not timed" in table
    assert "fastest within its gate: ort-fp32" in table
    # roofline columns from what each ran: the torch decoder and the TorchScript export read the same fp32 bytes
    assert df.loc["ort-fp32", "bytes_per_token_mb"] == pytest.approx(df.loc["torch", "bytes_per_token_mb"], rel=0.01)
    assert df.loc["torch", "bound_ms"] == pytest.approx(df.loc["torch", "bytes_per_token_mb"] / 10.0)
    assert record["metrics"] is None and newest.loc["bench-torch", "record"]["metrics"]["bytes_per_token_mb"] > 0


def test_missing_ctranslate2_is_a_recorded_skip(artifacts, monkeypatch, fake_workers, capsys):
    """Without CTranslate2 the ct2 variants are skipped with the install hint, in the table and the
    ledger, and `labkit bench` still exits 0 after timing the rest."""
    monkeypatch.setenv("LABKIT_ARTIFACTS", str(artifacts))
    monkeypatch.setitem(sys.modules, "ctranslate2", None)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--preset", "ci", "--variants", "torch,ct2-int8", "--threads", "1", "--bundle", "tiny"])
    assert bench.bench_command(args) == 0
    assert fake_workers == ["torch"]
    out = capsys.readouterr().out
    assert "skipped" in out and "labkit[peer]" in out
    record = ledger.latest(ledger.read(ledger.ledger_path("ci")), "bench-ct2-int8").iloc[0]["record"]
    assert record["status"] == "skipped" and "labkit[peer]" in record["reason"] and record["metrics"] is None


@pytest.mark.slow
def test_run_bench_in_own_processes(artifacts, monkeypatch):
    """Gates first, then one worker process per variant that passed (~15 s each on 2 busy cores):
    CTranslate2 float32 decodes the very ids torch decodes; every worker timed the same sentences;
    each row became a ledger record with its gate, and only passed variants carry latencies."""
    monkeypatch.setenv("LABKIT_ARTIFACTS", str(artifacts))
    variants = ["torch", "ort-int8", "ct2-fp32"]
    df = bench.run_bench(Preset.from_name("ci"), load_bundle(artifacts / "ci" / "tiny"), variants, threads=1,
                         progress=False).set_index("variant")
    assert list(df.index) == variants
    assert df.loc["torch", "speedup"] == 1.0 and df.loc["torch", "gate"] is None
    assert df.loc["ct2-fp32", "gate"] == "agreement>=0.95" and df.loc["ct2-fp32", "status"] == "ok"
    assert df.loc["ct2-fp32", "agreement"] == 1.0  # CTranslate2 float32 greedy == labkit greedy
    assert df.loc["ort-int8", "gate"] == "bleu-drop<=1.0"
    timed = df[df["status"] == "ok"]
    assert (timed["gate_passed"].isna() | (timed["gate_passed"] == True)).all()  # noqa: E712
    ci = Preset.from_name("ci")
    assert set(timed["n"]) == {ci.bench_sentences * ci.bench_repeats}  # the same sentences and passes for every variant
    assert (timed["p50_ms"] > 0).all() and (timed["sentences_per_s"] > 0).all()
    assert (timed["threads"] == 1).all()
    assert df[df["status"] != "ok"]["p50_ms"].isna().all()
    records = ledger.read(ledger.ledger_path("ci"))
    newest = ledger.latest(records, [bench.ledger_variant(v) for v in variants])
    assert newest.loc["bench-ort-int8", "technique"] == "quantization"
    assert newest.loc["bench-ort-int8", "parent"] == "bench-ort-fp32"
    assert newest.loc["bench-ort-int8", "record"]["recipe"]["blocks"]  # the measured default blocks
    assert newest.loc["bench-ct2-fp32", "backend"] == "ctranslate2"
    assert newest.loc["bench-torch", "metrics.latency_ms.n"] == ci.bench_sentences * ci.bench_repeats
    for record in newest["record"]:
        assert (record["status"] == "ok") == (record["gate"] is None or record["gate"]["passed"]), record


def test_cli_rejects_unknown_variants(capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--preset", "ci", "--variants", "torch,trt-int4"])
    assert bench.bench_command(args) == 2
    assert "unknown variant" in capsys.readouterr().err


def test_labkit_bench_is_a_cli_subcommand(capsys):
    """`labkit bench --help` parses and names the variants; bad variants or presets exit 2 with a message."""
    from labkit import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--variants" in out and "ort-int8" in out
    args = cli.build_parser().parse_args(["bench", "--preset", "ci", "--variants", "torch,ort-fp32", "--threads", "1"])
    assert args.command == "bench" and args.handler is cli.dispatch and args.threads == 1
    assert cli.main(["bench", "--preset", "ci", "--variants", "torch,onnx-fp64"]) == 2
    assert "unknown variant(s) ['onnx-fp64']" in capsys.readouterr().err
    assert cli.main(["bench", "--preset", "no-such-preset", "--variants", "torch"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_labkit_bench_unknown_variant_exits_nonzero_in_a_process():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "labkit", "bench", "--preset", "ci", "--variants", "trt-int4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown variant" in proc.stderr and "known: torch" in proc.stderr


def test_default_variants_show_the_float_lm_head_cost_on_speed_only_presets():
    assert bench.default_variants("ci") == bench.DEFAULT_VARIANTS
    assert bench.default_variants("opus-mt-shape") == (*bench.DEFAULT_VARIANTS, "ort-int8-all")
    assert all(v in bench.VARIANTS for v in bench.default_variants("opus-mt-shape"))
