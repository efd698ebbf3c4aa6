"""Layer shapes of a preset's model (shape-6-2: deep encoder, shallow decoder) and `labkit bench --shapes`.

Oracles: the 6-6 model's own weights (a cut shape keeps its first layers, the same encoder),
Hugging Face `generate` on the cut model (its KV cache must be renumbered), and hand-made
worker results for the bench's ratios (speed itself is never asserted).
"""

from __future__ import annotations

import argparse

import pytest
import torch

from labkit.config import Preset
from labkit.core import data
from labkit.core.bundle import build_opus_mt_shape, bundle_for, bundle_key, cut_layers, parse_shape, shape_key
from labkit.core.decode import DecodeConfig, TorchStepper, decode, strip
from labkit.engines.ct2 import ct2_dir
from labkit.engines.onnx_export import onnx_dir
from labkit.engines.ort_int8 import quantized_dir
from labkit.lab import bench
from labkit.measure import ledger

CI = Preset.from_name("ci")


@pytest.mark.parametrize("text,expected", [("6-2", (6, 2)), ("shape-6-1", (6, 1)), ("12-3", (12, 3)),
                                           ("student-6-2", None), ("6", None), ("6-x", None), ("teacher", None)])
def test_parse_shape(text, expected):
    assert parse_shape(text) == expected
    if expected:
        assert parse_shape(shape_key(*expected)) == expected


def test_opus_mt_shape_builder_keeps_the_encoder_and_cuts_the_decoder():
    """build_opus_mt_shape(decoder_layers=2) is the 6-6 model of the same seed with decoder layers 0, 1
    only: every encoder and embedding weight equal, the first two decoder layers equal, the rest gone."""
    full, shallow = build_opus_mt_shape(seed=0), build_opus_mt_shape(seed=0, decoder_layers=2)
    cfg = shallow.model.config
    assert (cfg.encoder_layers, cfg.decoder_layers) == (6, 2)
    assert (len(shallow.model.model.encoder.layers), len(shallow.model.model.decoder.layers)) == (6, 2)
    assert shallow.name == "shape-6-2" and full.name == "opus-mt-shape"
    big, small = full.model.state_dict(), shallow.model.state_dict()
    assert set(small) < set(big)
    assert not any(k.startswith(("model.decoder.layers.2.", "model.decoder.layers.5.")) for k in small)
    for key, tensor in small.items():
        assert torch.equal(tensor, big[key]), key
    assert full.params - shallow.params == 4 * sum(p.numel() for p in full.model.model.decoder.layers[0].parameters())


@pytest.mark.parametrize("enc,dec", [(6, 7), (0, 2), (6, 0), (7, 1)])
def test_a_shape_that_does_not_fit_is_refused(enc, dec):
    with pytest.raises(ValueError, match="does not fit"):
        bundle_for(CI, shape_key(enc, dec))


def test_shape_bundles_are_keyed_and_cached_apart():
    """shape-6-2 gets its own export, int8 and CTranslate2 directories; shape-6-6 IS the preset's model."""
    teacher, shallow = bundle_for(CI, "teacher"), bundle_for(CI, "shape-6-2")
    assert bundle_key(bundle_for(CI, "shape-6-6")) == "teacher"
    assert bundle_key(shallow) == "shape-6-2" and shallow.meta["speed_shape"]["trained"] is False
    assert bundle_key(teacher) == "teacher"
    for where in (onnx_dir, lambda p, k: quantized_dir(p, "dynamic", k, tag="all"), ct2_dir):
        assert where("ci", "shape-6-2") != where("ci", "teacher") != where("ci", "shape-6-1")
        assert "shape-6-2" in where("ci", "shape-6-2").name
    # a fresh load (what a bench worker does) is the same model: same weights, so cached artifacts match
    again = bundle_for(CI, "shape-6-2").model.state_dict()
    assert all(torch.equal(t, again[k]) for k, t in shallow.model.state_dict().items())


@pytest.mark.parametrize("enc,dec,beams", [(2, 1, 1), (1, 1, 4)])
def test_a_cut_model_decodes_like_generate(tiny_bundle, enc, dec, beams):
    """A cut model (tiny fixture: 2+2 layers) is still a consistent Marian model: labkit's cached
    decoding loop and HF generate agree on it token for token, greedy and beam."""
    model = cut_layers(tiny_bundle.model, enc, dec)
    assert (len(model.model.encoder.layers), len(model.model.decoder.layers)) == (enc, dec)
    batch = tiny_bundle.tokenizer([p.zh for p in data.load_split("test", limit=6)], return_tensors="pt", padding=True)
    with torch.inference_mode():
        ref = model.generate(**batch, num_beams=beams, do_sample=False, max_new_tokens=16)
    stepper = TorchStepper(model)
    ours = decode(stepper, batch["input_ids"], batch["attention_mask"], DecodeConfig(max_new_tokens=16, num_beams=beams))
    assert ours == [strip(row[1:].tolist(), stepper) for row in ref]


# --------------------------------------------------------------------------- labkit bench --shapes


def _result(p50, sps, ids):
    return {"p50": p50, "p95": p50 * 1.1, "iqr": 1.0, "n": 3, "noisy": False, "sentences_per_s": sps,
            "load_s": 0.1, "peak_rss_mb": 10.0, "ids": ids, "tokens": 2.0}


@pytest.fixture
def shape_workers(monkeypatch, tmp_path):
    """No timing processes: torch on the 6-6 model takes 300 ms, on shape-6-1 100 ms (hand-made)."""
    monkeypatch.setenv("LABKIT_ARTIFACTS", str(tmp_path))
    started = []

    def run_variant(variant, preset_name, threads, bundle_name="teacher", artifact=None):
        started.append((variant, bundle_name))
        p50 = {"teacher": 300.0, "shape-6-1": 100.0}[bundle_name]
        return {**_result(p50, 1000.0 / p50, [[1, 2]]), "threads": threads}

    monkeypatch.setattr(bench, "run_variant", run_variant)
    return started


def test_run_shapes_rebases_every_speedup_on_the_first_shape(shape_workers):
    df = bench.run_shapes(CI, ["6-6", "6-1"], ["torch"], threads=1, progress=False)
    assert shape_workers == [("torch", "teacher"), ("torch", "shape-6-1")]
    assert list(df["shape"]) == ["shape-6-6", "shape-6-1"]
    assert list(df["speedup"]) == pytest.approx([1.0, 3.0])  # 300 / 100: vs torch on 6-6, not on itself
    assert list(df["throughput_ratio"]) == pytest.approx([1.0, 3.0])
    records = ledger.read(ledger.ledger_path("ci"))
    newest = ledger.latest(records, ["bench-torch", "bench-torch-shape-6-1"])
    other = newest.loc["bench-torch-shape-6-1", "record"]
    assert other["model"] == "shape-6-1" and other["shape"] == "shape-6-1"
    assert other["bench"]["speedup_vs_torch"] == pytest.approx(3.0) and other["speedup_baseline"] == "torch on shape-6-6"
    assert newest.loc["bench-torch", "record"]["bench"]["speedup_vs_torch"] == pytest.approx(1.0)
    table = bench.bench_table(df)
    assert "shape-6-1 torch: torch eager, no gate" in table and "shape-6-6 torch: baseline, no gate" in table
    assert "fastest within its gate: shape-6-1 torch (3.00x torch eager on shape-6-6" in table


def test_labkit_bench_shapes_flag(shape_workers, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--preset", "ci", "--variants", "torch", "--threads", "1", "--shapes", "6-6,6-1",
                              "--no-ledger"])
    assert bench.bench_command(args) == 0
    out = capsys.readouterr().out
    assert "shape" in out.splitlines()[0] and "shape-6-1" in out
    for bad in ("6-6,6-9", "6-6,shape-6-6"):
        args = parser.parse_args(["--preset", "ci", "--variants", "torch", "--shapes", bad, "--no-ledger"])
        assert bench.bench_command(args) == 2
        assert "labkit bench:" in capsys.readouterr().err


@pytest.mark.slow
def test_run_shapes_in_own_processes(tmp_path, monkeypatch):
    """Real workers on ci's teacher and its 6-1 cut (untrained: it decodes other tokens): both timed
    on the same sentences, the cut one's speedup is against the 6-6 torch row of this run."""
    monkeypatch.setenv("LABKIT_ARTIFACTS", str(tmp_path))
    df = bench.run_shapes(CI, ["6-6", "6-1"], ["torch"], threads=1, progress=False)
    assert list(df["status"]) == ["ok", "ok"] and set(df["n"]) == {CI.bench_sentences * CI.bench_repeats}
    base, cut = df.iloc[0], df.iloc[1]
    assert base["speedup"] == 1.0 and cut["speedup"] == pytest.approx(base["p50_ms"] / cut["p50_ms"])
