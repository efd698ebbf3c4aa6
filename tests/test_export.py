"""ONNX export: the three graphs must compute what the PyTorch model computes.

Oracles: the PyTorch model's own forward (parity, max |Δ| per output on shapes
unlike the export example: batch 1/3/4, padding, empty past) and greedy decoding
with TorchStepper (token-for-token agreement of the ORT stepper). Also checked:
every Marian variant the lab produces (head-pruned with uneven heads per layer,
a student with fewer decoder layers), external-data files, atomic writes, and
loud failures on missing or corrupt files.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from labkit.config import Preset
from labkit.core import data
from labkit.core.decode import DecodeConfig, TorchStepper, decode
from labkit.engines import onnx_export
from labkit.engines.onnx_graphs import FILES, GRAPHS, OPSET, SIDECAR, io_names, read_sidecar
from labkit.engines.ort import OrtStepper, load_sessions

FAST = ("torchscript",)  # the legacy exporter takes ~1 s on the tiny model; dynamo ~20 s


@pytest.fixture(scope="module")
def sources(tiny_bundle_dir):
    from labkit.core.bundle import load_bundle

    bundle = load_bundle(tiny_bundle_dir)
    return bundle.tokenizer([p.zh for p in data.load_split("test", limit=16)], return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def dynamo_dir(tiny_bundle_dir, tmp_path_factory):
    """The default export (dynamo exporter first) of the tiny teacher."""
    from labkit.core.bundle import load_bundle

    return onnx_export.export(load_bundle(tiny_bundle_dir), tmp_path_factory.mktemp("onnx") / "onnx-tiny")


def greedy_agrees(model, directory, enc, beams: int = 1) -> bool:
    cfg = DecodeConfig(max_new_tokens=24, num_beams=beams)
    ref = decode(TorchStepper(model), enc["input_ids"], enc["attention_mask"], cfg)
    return decode(OrtStepper.from_dir(directory), enc["input_ids"], enc["attention_mask"], cfg) == ref


def test_default_export_uses_dynamo_and_passes_parity(dynamo_dir):
    meta = read_sidecar(dynamo_dir)
    assert meta["exporter"] == dict.fromkeys(GRAPHS, "dynamo")
    assert meta["opset"] == OPSET and meta["precision"] == "fp32"
    assert set(meta["file_bytes"]) == set(FILES.values())
    assert meta["parity"]["passed"], meta["parity"]["worst"]


def test_parity_covers_every_output_of_every_graph(dynamo_dir):
    """2 decoder layers: decoder has logits + 4 present + 4 cross outputs, with-past logits + 4 present."""
    graphs = read_sidecar(dynamo_dir)["parity"]["graphs"]
    assert {g: len(v) for g, v in graphs.items()} == {"encoder": 1, "decoder": 9, "decoder_with_past": 5}
    assert max(d for g in graphs.values() for d in g.values()) < 1e-5  # fp32 reorderings: ~1e-6


def test_graph_names_match_the_sidecar(dynamo_dir):
    meta = read_sidecar(dynamo_dir)
    sessions = load_sessions(dynamo_dir)
    for graph, session in sessions.items():
        assert [i.name for i in session.get_inputs()] == meta["inputs"][graph] == io_names(graph, 2)[0]
        assert [o.name for o in session.get_outputs()] == meta["outputs"][graph]


@pytest.mark.parametrize("beams", [1, 4])
def test_ort_decode_matches_torch(tiny_bundle, dynamo_dir, sources, beams):
    assert greedy_agrees(tiny_bundle.model, dynamo_dir, sources, beams)


@pytest.mark.parametrize("variant", ["pruned", "student"])
def test_every_marian_variant_exports(tiny_bundle, sources, tmp_path, variant):
    """Uneven heads per layer (self and cross differ) and a 1-decoder-layer student."""
    if variant == "pruned":
        from labkit.compress.prune import prune_bundle

        bundle = prune_bundle(tiny_bundle, {"encoder_self": {1: [2]}, "decoder_self": {0: [3], 1: [0, 1]},
                                            "cross": {1: [1, 2, 3]}})
    else:
        from labkit.compress.distill import make_student

        bundle = make_student(tiny_bundle, [1])
    out = onnx_export.export(bundle, tmp_path / variant, exporters=FAST)
    meta = read_sidecar(out)
    assert meta["parity"]["passed"], meta["parity"]["worst"]
    heads = {"pruned": ([3, 2], [4, 1]), "student": ([4], [4])}[variant]
    assert (meta["model"]["heads"], meta["model"]["cross_heads"]) == heads
    assert greedy_agrees(bundle.model, out, sources)


def test_parity_gate_can_fail(tiny_bundle, dynamo_dir):
    """A model that differs from the exported one by one weight must fail the gate."""
    with torch.no_grad():
        tiny_bundle.model.model.decoder.layers[1].fc2.bias[0] += 0.05  # one element: LayerNorm cannot undo it
    result = onnx_export.parity(tiny_bundle.model, dynamo_dir)
    assert not result["passed"] and result["worst"]["graph"] in ("decoder", "decoder_with_past")


@pytest.mark.parametrize("scale", [1.001, 1.0003])
def test_parity_gate_catches_a_slightly_scaled_weight(tiny_bundle, dynamo_dir, scale):
    """One encoder fc1 matrix times 1.001 moved the teacher's encoder output by 4e-4 and passed the old
    1e-4 + 1e-4 * max|ref| gate; real fp32 exports differ by ~1e-6, so even 1.0003 must fail now."""
    with torch.no_grad():
        tiny_bundle.model.model.encoder.layers[0].fc1.weight.mul_(scale)
    result = onnx_export.parity(tiny_bundle.model, dynamo_dir)
    assert not result["passed"] and result["worst"]["graph"] == "encoder", result["worst"]
    assert result["worst"]["ratio"] > 2, result["worst"]  # fails clearly, not by a hair


def _broken_dynamo(real, how: str, tried: list):
    """export_graph whose dynamo exporter fails: it raises after a partial write, or writes other names."""

    def export_graph(module, args, path, graph, n_layers, exporter, opset=OPSET):
        tried.append((graph, exporter))
        if exporter != "dynamo":
            return real(module, args, path, graph, n_layers, exporter, opset)
        if how == "raises":
            path.write_bytes(b"partial")
            raise RuntimeError("simulated torch.export failure")
        import onnx

        real(module, args, path, graph, n_layers, "torchscript", opset)
        proto = onnx.load(str(path))
        proto.graph.input[0].name = "renamed_by_exporter"  # what dropping or renaming an input looks like
        onnx.save(proto, str(path))

    return export_graph


@pytest.mark.parametrize("how", ["raises", "wrong-names"])
def test_dynamo_failure_falls_back_to_torchscript(tiny_bundle, sources, tmp_path, monkeypatch, how):
    """The default export (dynamo first) with a failing dynamo exporter: TorchScript graphs, recorded, gated."""
    tried = []
    monkeypatch.setattr(onnx_export, "export_graph", _broken_dynamo(onnx_export.export_graph, how, tried))
    out = onnx_export.export(tiny_bundle, tmp_path / "fallback")
    assert tried == [(g, e) for g in GRAPHS for e in ("dynamo", "torchscript")]
    meta = read_sidecar(out)
    assert meta["exporter"] == dict.fromkeys(GRAPHS, "torchscript")
    assert meta["parity"]["passed"] and meta["parity"]["atol"] == onnx_export.PARITY_ATOL, meta["parity"]["worst"]
    assert greedy_agrees(tiny_bundle.model, out, sources)


def test_external_data_round_trip(tiny_bundle, sources, tmp_path):
    out = onnx_export.export(tiny_bundle, tmp_path / "ext", exporters=FAST, external_data_mb=None)
    names = set(read_sidecar(out)["file_bytes"])
    assert {f"{name}.data" for name in FILES.values()} <= names
    moved = out.rename(tmp_path / "moved")  # data files are found relative to the graph
    assert greedy_agrees(tiny_bundle.model, moved, sources)


def test_failed_export_leaves_nothing_behind(tiny_bundle, tmp_path):
    with pytest.raises(RuntimeError, match="every exporter failed"):
        onnx_export.export(tiny_bundle, tmp_path / "out", exporters=("no-such-exporter",))
    assert list(tmp_path.iterdir()) == []


def test_missing_and_corrupt_files_fail_loudly(dynamo_dir, tmp_path):
    bad = shutil.copytree(dynamo_dir, tmp_path / "bad")
    graph = bad / FILES["decoder"]
    size = graph.stat().st_size
    graph.write_bytes(graph.read_bytes()[: size // 2])
    with pytest.raises(ValueError, match="truncated"):
        OrtStepper.from_dir(bad)
    graph.write_bytes(b"\x00garbage" * (size // 8) + b"\x00" * (size % 8))  # same size, not a graph
    with pytest.raises(RuntimeError, match="corrupt"):
        OrtStepper.from_dir(bad)
    (bad / SIDECAR).unlink()
    with pytest.raises(FileNotFoundError, match="onnx.json is missing"):
        OrtStepper.from_dir(bad)


def test_derive_makes_a_runnable_copy(tiny_bundle, dynamo_dir, sources, tmp_path):
    out = onnx_export.derive(dynamo_dir, tmp_path / "copy", shutil.copyfile, precision="fp32-copy")
    meta = read_sidecar(out)
    assert meta["precision"] == "fp32-copy" and meta["derived_from"] == str(dynamo_dir)
    assert greedy_agrees(tiny_bundle.model, out, sources)


def test_ensure_onnx_builds_once_and_again_when_the_bundle_changes(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_ARTIFACTS", str(tmp_path))
    ci = Preset.from_name("ci")
    out = onnx_export.ensure_onnx(ci, tiny_bundle, exporters=FAST)
    assert out == tmp_path / "ci" / "onnx-teacher"
    assert json.loads((out / SIDECAR).read_text())["source"]["name"] == tiny_bundle.name
    real_export, calls = onnx_export.write_export, []

    def counting_export(*args, **kwargs):
        calls.append(1)
        return real_export(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "write_export", counting_export)
    assert onnx_export.ensure_onnx(ci, tiny_bundle, exporters=FAST) == out and calls == []
    with torch.no_grad():  # other weights (a retrained teacher): the old export is stale
        tiny_bundle.model.model.encoder.layers[0].fc1.bias[0] += 1e-3
    assert onnx_export.ensure_onnx(ci, tiny_bundle, exporters=FAST) == out and calls == [1]
