"""`labkit bench`: variants timed in their own processes, compared with torch, written to the ledger."""

from __future__ import annotations

import argparse
import shutil

import pytest
import torch

from labkit import benchmark, ledger


@pytest.fixture(scope="module")
def artifacts(tiny_bundle_dir, tmp_path_factory):
    """An artifact root holding the tiny fixture as bundle 'tiny' of preset ci, already exported
    (TorchScript, seconds) so the bench does not spend a minute in the dynamo exporter."""
    from labkit.export import export
    from labkit.models import load_bundle

    root = tmp_path_factory.mktemp("artifacts")
    shutil.copytree(tiny_bundle_dir, root / "ci" / "tiny")
    torch.set_num_threads(1)
    export(load_bundle(tiny_bundle_dir), root / "ci" / "onnx-tiny", exporters=("torchscript",))
    return root


def test_parse_variants():
    assert benchmark.parse_variants(" torch, ort-int8,torch") == ["torch", "ort-int8"]
    with pytest.raises(ValueError, match="known"):
        benchmark.parse_variants("torch,tensorflow")
    with pytest.raises(ValueError):
        benchmark.parse_variants("")


def _result(p50, sps, ids, n=6):
    return {"p50": p50, "p95": p50 * 1.5, "iqr": 1.0, "n": n, "noisy": False, "sentences_per_s": sps,
            "ids": ids, "tokens": 2.0, "threads": 2, "load_s": 0.1, "peak_rss_mb": 100.0}


def test_results_frame_ratios_against_torch():
    """torch 300 ms / 10 sent/s; ort-int8 100 ms / 40 sent/s, one of two sentences differs ->
    speedup 3.0, throughput ratio 4.0, agreement 0.5."""
    df = benchmark.results_frame({"torch": _result(300.0, 10.0, [[1, 2], [3]]),
                                  "ort-int8": _result(100.0, 40.0, [[1, 2], [4]])}).set_index("variant")
    assert df.loc["torch", "speedup"] == 1.0 and df.loc["torch", "agreement"] == 1.0
    assert df.loc["ort-int8", "speedup"] == pytest.approx(3.0)
    assert df.loc["ort-int8", "throughput_ratio"] == pytest.approx(4.0)
    assert df.loc["ort-int8", "agreement"] == 0.5


@pytest.mark.slow
def test_run_bench_in_own_processes(artifacts, monkeypatch):
    """Three worker processes (~15 s each on 2 busy cores): CTranslate2 float32 decodes the very
    ids torch decodes; every worker timed the same sentences; each row became a ledger record."""
    monkeypatch.setenv("LABKIT_ARTIFACTS", str(artifacts))
    variants = ["torch", "ort-int8", "ct2-fp32"]
    df = benchmark.run_bench("ci", variants, threads=1, bundle_name="tiny", progress=False).set_index("variant")
    assert list(df.index) == variants
    assert df.loc["torch", "speedup"] == 1.0
    assert df.loc["ct2-fp32", "agreement"] == 1.0  # CTranslate2 float32 greedy == labkit greedy
    assert set(df["n"]) == {16 * 3}  # preset ci: 16 bench sentences x 3 repeats, for every variant
    assert (df["p50_ms"] > 0).all() and (df["sentences_per_s"] > 0).all()
    assert (df["threads"] == 1).all()
    records = ledger.read(ledger.ledger_path("ci"))
    newest = ledger.latest(records, [benchmark.ledger_variant(v) for v in variants])
    assert newest.loc["bench-ort-int8", "technique"] == "quantization"
    assert newest.loc["bench-ort-int8", "parent"] == "bench-ort-fp32"
    assert newest.loc["bench-ct2-fp32", "backend"] == "ctranslate2"
    assert newest.loc["bench-torch", "metrics.latency_ms.n"] == 48


def test_cli_rejects_unknown_variants(capsys):
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    args = parser.parse_args(["--preset", "ci", "--variants", "torch,trt-int4"])
    assert benchmark.main(args) == 2
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
    assert args.handler is cli.bench and args.threads == 1
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
