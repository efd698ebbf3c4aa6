"""INT8 quantization of exported graphs: which nodes, what format, how close to fp32."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from labkit.config import Preset
from labkit.core.data import load_split
from labkit.core.decode import DecodeConfig
from labkit.engines import onnx_blocks as B
from labkit.engines import ort_int8 as Q
from labkit.engines.onnx_export import ensure_onnx, export
from labkit.engines.onnx_graphs import FILES, read_sidecar
from labkit.engines.onnx_graphs import size_mb as export_size_mb
from labkit.measure import gates

CI = Preset.from_name("ci")


@pytest.fixture(scope="module")
def onnx_dir(tiny_bundle_dir, tmp_path_factory):
    """The tiny fixture exported with the TorchScript exporter (seconds; dynamo takes a minute)."""
    from labkit.core.bundle import load_bundle

    torch.set_num_threads(1)
    return export(load_bundle(tiny_bundle_dir), tmp_path_factory.mktemp("onnx") / "fp32", exporters=("torchscript",))


@pytest.fixture(scope="module")
def feeds(onnx_dir, tiny_bundle_dir):
    from labkit.core.bundle import load_bundle

    texts = [p.zh for p in load_split("train", limit=12)]
    return Q.calibration_feeds(onnx_dir, load_bundle(tiny_bundle_dir).tokenizer, texts,
                               DecodeConfig(max_new_tokens=16), batch=6, keep_every=3)


def _scoped(op, inputs, scope):
    node = helper.make_node(op, inputs, ["y"], name="node_x")
    node.metadata_props.add(key=B.SCOPE_KEY, value=scope)
    return node


@pytest.mark.parametrize("scope, block", [
    ("['', 'model.model.encoder.layers.3.self_attn.k_proj', 'linear_6']", "encoder-self-attn"),
    ("['', 'model.model.decoder.layers.0.self_attn.out_proj', 'linear_3']", "decoder-self-attn"),
    ("['', 'model.model.decoder.layers.5.encoder_attn.v_proj', 'linear_11']", "cross-attn"),
    ("['', 'model.model.encoder.layers.1.fc2', 'linear_5']", "ffn"),
    ("['', 'model.lm_head', 'linear_16']", "lm-head"),
    ("['', 'model.model.decoder.embed_tokens', 'embedding']", "embeddings"),
    ("['', 'matmul_3']", None),  # attention scores: two activations, no weight
])
def test_block_of_dynamo_scopes(scope, block):
    assert B.block_of(B.metadata_scope(_scoped("MatMul", ["a", "b"], scope))) == block


def test_torchscript_names_are_resolved_through_the_bias():
    """'/q_proj/MatMul' exists in self- and cross-attention; the bias Add after it tells them apart."""
    w = helper.make_tensor("w", onnx.TensorProto.FLOAT, [2, 2], [1, 0, 0, 1])
    b = helper.make_tensor("model.model.decoder.layers.1.encoder_attn.q_proj.bias", onnx.TensorProto.FLOAT, [2], [0, 0])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="/q_proj/MatMul"),
         helper.make_node("Add", ["h", b.name], ["y"], name="/q_proj/Add")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])], [w, b])
    assert B.node_blocks(helper.make_model(graph)) == {"/q_proj/MatMul": "cross-attn"}


def test_every_linear_of_the_model_is_found_once_per_graph(onnx_dir, tiny_bundle):
    """2+2 layers: encoder 2x(4 attn + 2 ffn); decoder 2x(4 self + 4 cross + 2 ffn) + head;
    decoder_with_past has no cross K/V projections (they come in as inputs): 2x(4 + 2 + 2) + head."""
    counts = {g: B.block_counts(B.untie_lm_head(onnx.load(str(onnx_dir / f)))) for g, f in FILES.items()}
    assert counts["encoder"] == {"encoder-self-attn": 8, "decoder-self-attn": 0, "cross-attn": 0, "ffn": 4,
                                 "lm-head": 0, "embeddings": 1}
    assert counts["decoder"] == {"encoder-self-attn": 0, "decoder-self-attn": 8, "cross-attn": 8, "ffn": 4,
                                 "lm-head": 1, "embeddings": 1}
    assert counts["decoder_with_past"]["cross-attn"] == 4 and counts["decoder_with_past"]["lm-head"] == 1


def _logits(path, feed):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], feed)[0]


def test_untie_lm_head_keeps_the_logits(onnx_dir, feeds, tmp_path):
    src = onnx_dir / FILES["decoder_with_past"]
    model = onnx.load(str(src))
    untied = B.untie_lm_head(model)
    assert not [n for n in untied.graph.node if n.op_type == "Gemm"]
    onnx.save(untied, str(tmp_path / "untied.onnx"))
    feed = feeds["decoder_with_past"][0]
    np.testing.assert_allclose(_logits(tmp_path / "untied.onnx", feed), _logits(src, feed), rtol=1e-5, atol=1e-5)


def test_calibration_feeds_carry_real_past(feeds):
    """The decoder-with-past graph is calibrated on past K/V from a real decode: lengths grow by step."""
    assert len(feeds["encoder"]) == len(feeds["decoder"]) == 2  # 12 sentences in batches of 6
    pasts = sorted({f["past_key_self_0"].shape[2] for f in feeds["decoder_with_past"]})
    assert pasts[0] == 1 and len(pasts) > 2  # first kept step has one past position
    assert all(np.abs(f["past_key_self_0"]).max() > 0 for f in feeds["decoder_with_past"])


def _ops(directory):
    """Per graph: op types, with an embedding lookup on int8 weights counted as 'Gather(int8)'."""
    meta = read_sidecar(directory)
    ops = {}
    for g, f in meta["files"].items():
        nodes = onnx.load(str(directory / f)).graph.node
        ops[g] = [n.op_type + ("(int8)" if n.op_type == "Gather" and n.input[0].endswith("_quantized") else "")
                  for n in nodes]
    return ops


@pytest.mark.parametrize("blocks", [("ffn",), B.BODY_BLOCKS, B.BLOCKS], ids=["ffn-only", "body", "all"])
def test_dynamic_quantizes_exactly_the_chosen_blocks(onnx_dir, tmp_path, blocks):
    """Weight MatMuls become MatMulInteger; the embedding Gather reads int8 rows (then DequantizeLinear)."""
    out = Q.quantize_dir(onnx_dir, tmp_path / "dyn", "dynamic", blocks)
    counts = {g: B.block_counts(B.untie_lm_head(onnx.load(str(onnx_dir / f)))) for g, f in FILES.items()}
    matmuls = {g: sum(c[b] for b in blocks if b != "embeddings") for g, c in counts.items()}
    gathers = {g: c["embeddings"] if "embeddings" in blocks else 0 for g, c in counts.items()}
    ops = _ops(out)
    assert {g: o.count("MatMulInteger") for g, o in ops.items()} == matmuls
    assert {g: o.count("Gather(int8)") for g, o in ops.items()} == gathers
    assert Q.recipe_of(out)["nodes_quantized"] == {g: matmuls[g] + gathers[g] for g in FILES}
    assert read_sidecar(out)["precision"] == "int8"


def test_dynamic_int8_logits_stay_close_to_fp32(onnx_dir, feeds, tmp_path):
    """Per-channel int8 weights perturb logits a little, not the ranking of the top candidates."""
    out = Q.quantize_dir(onnx_dir, tmp_path / "dyn", "dynamic", B.BLOCKS)
    assert export_size_mb(out) < export_size_mb(onnx_dir)
    for feed in feeds["decoder_with_past"][:3]:
        ref, got = _logits(onnx_dir / FILES["decoder_with_past"], feed), _logits(out / FILES["decoder_with_past"], feed)
        cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
        assert cos.min() > 0.99
        assert (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.8


@pytest.mark.parametrize("method", Q.METHODS)
def test_qdq_is_symmetric_int8_in_standard_ops(onnx_dir, feeds, tmp_path, method):
    """What TensorRT needs: QuantizeLinear/DequantizeLinear pairs, int8, zero points 0, no contrib ops."""
    from onnx import numpy_helper

    out = Q.quantize_dir(onnx_dir, tmp_path / method, "qdq", B.BLOCKS, feeds=feeds, method=method)
    for name in FILES.values():
        model = onnx.load(str(out / name))
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
        assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 0
        inits = {t.name: t for t in model.graph.initializer}
        zero_points = [inits[n.input[2]] for n in model.graph.node
                       if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits]
        assert zero_points and all(zp.data_type == onnx.TensorProto.INT8 for zp in zero_points)
        assert all(not numpy_helper.to_array(zp).any() for zp in zero_points)
    feed = feeds["decoder_with_past"][0]
    ref, got = _logits(onnx_dir / FILES["decoder_with_past"], feed), _logits(out / FILES["decoder_with_past"], feed)
    cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cos.min() > 0.98


def test_quantized_dir_runs_in_the_translator(onnx_dir, tiny_bundle, tmp_path):
    from labkit.core.translator import StepperTranslator
    from labkit.engines.ort import OrtStepper

    out = Q.quantize_dir(onnx_dir, tmp_path / "dyn", "dynamic")
    result = StepperTranslator(tiny_bundle, OrtStepper.from_dir(out)).run(["我喜欢猫。", ""])
    assert result.texts[0] and result.texts[1] == ""
    assert json.loads((out / "onnx.json").read_text())["quantization"]["kind"] == "dynamic"


def test_qdq_needs_feeds(onnx_dir, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        Q.quantize_dir(onnx_dir, tmp_path / "q", "qdq")


@pytest.mark.parametrize("bleu, parent, passed", [(30.6, 31.5, True), (30.5, 31.5, True), (30.4, 31.5, False),
                                                  (32.0, 31.5, True)])
def test_bleu_gate(bleu, parent, passed):
    gate = gates.bleu_drop_gate(bleu, parent)
    assert gate["passed"] is passed and gate["name"] == "bleu-drop<=1.0"
    assert f"{parent:.2f}" in gate["detail"]


def test_choose_blocks_keeps_the_cheap_ones():
    """reference 30; ffn costs 0.2, lm-head 1.5, embeddings had no nodes -> ('ffn',) at max_drop 1.0."""
    rows = [{"block": "none", "nodes": 0, "bleu": 30.0}, {"block": "ffn", "nodes": 4, "bleu": 29.8},
            {"block": "lm-head", "nodes": 1, "bleu": 28.5}, {"block": "embeddings", "nodes": 0, "bleu": 30.0}]
    assert Q.choose_blocks(rows, 1.0) == ("ffn",)
    assert Q.choose_blocks(rows, 2.0) == ("ffn", "lm-head")


# --------------------------------------------------------------------------- the gate


def _result(ids, bleu=None):
    return {"ids": ids, "bleu": bleu}


@pytest.mark.parametrize("preset, precision, child, parent, name, passed", [
    # int8 on a quality preset: BLEU decides (30.4 vs 31.5 is a 1.1 drop); agreement only informs
    ("ci", "int8", _result([[1], [2]], 30.4), _result([[1], [2]], 31.5), "bleu-drop<=1.0", False),
    ("ci", "int8", _result([[1], [3]], 31.0), _result([[1], [2]], 31.5), "bleu-drop<=1.0", True),
    # a float32 conversion must give the parent's tokens: 19 of 20 sentences = 0.95 passes, 18 fails
    ("ci", "fp32", _result([[1]] * 19 + [[9]]), _result([[1]] * 20), "agreement>=0.95", True),
    ("ci", "fp32", _result([[1]] * 18 + [[9]] * 2), _result([[1]] * 20), "agreement>=0.95", False),
    # speed-only preset: no BLEU; 9 of 10 forced-length outputs identical = 0.9 passes, 8 fails
    ("opus-mt-shape", "int8", _result([[7, 7]] * 9 + [[7, 8]]), _result([[7, 7]] * 10), "agreement>=0.9", True),
    ("opus-mt-shape", "int8", _result([[7, 7]] * 8 + [[7, 8]] * 2), _result([[7, 7]] * 10), "agreement>=0.9", False),
])
def test_variant_gate_rules(preset, precision, child, parent, name, passed):
    gate = gates.variant_gate(child, parent, precision, Preset.from_name(preset))
    assert gate["name"] == name and gate["passed"] is passed and gate["detail"]


def test_speed_only_gate_says_how_little_it_proves():
    """Random weights repeat a token: the detail names the preset's forced length and the parent's
    distinct tokens (1 here), so nobody reads 'agreement 1.0' as a quality result."""
    gate = gates.variant_gate(_result([[7] * 40] * 8), _result([[7] * 40] * 8), "int8", Preset.from_name("opus-mt-shape"))
    assert gate["passed"] and "8/8" in gate["detail"]
    assert "forced to 40 tokens" in gate["detail"] and "1 distinct token" in gate["detail"]


# --------------------------------------------------------------------------- the handler: measured defaults, staleness


@pytest.fixture()
def root(tiny_bundle_dir, tmp_path, monkeypatch):
    """A fresh artifact root with the tiny fixture as bundle 'tiny' of preset ci, already exported
    with the TorchScript exporter (seconds), so ensure_onnx reuses it instead of exporting."""

    monkeypatch.setenv("LABKIT_ARTIFACTS", str(tmp_path))
    shutil.copytree(tiny_bundle_dir, tmp_path / "ci" / "tiny")
    torch.set_num_threads(1)
    ensure_onnx(CI, tiny(tmp_path), exporters=("torchscript",))
    return tmp_path


def tiny(root):
    """The tiny fixture as the bundle under test, loaded from the artifact root."""
    from labkit.core.bundle import load_bundle

    return load_bundle(root / "ci" / "tiny")


def retrain(root):
    """What a retrained bundle and notebook 04 leave behind: other weights, a new export."""
    bundle = tiny(root)
    with torch.no_grad():
        bundle.model.model.encoder.layers[0].fc1.bias[0] += 1e-3
    bundle.meta["retrained"] = True
    bundle.save(root / "ci" / "tiny")
    ensure_onnx(CI, tiny(root), exporters=("torchscript",))


def fake_sensitivity(calls, bleus):
    """Stands in for the six quantize-and-score rounds: rows with the given BLEU per block, fp32 at 30."""
    def sensitivity(onnx_dir, bundle, preset, pairs, work, **kwargs):
        calls.append(onnx_dir)
        return [{"block": "none", "nodes": 0, "bleu": 30.0}] + [
            {"block": b, "nodes": 4, "bleu": bleus.get(b, 25.0)} for b in B.BLOCKS]
    return sensitivity


def test_ensure_blocks_measures_once_per_export(root, monkeypatch):
    """ffn and cross-attn cost <= 1.0 BLEU alone -> they are the default; the file is read back, and
    measured again after a re-export (its sidecar digest changed)."""
    calls = []
    monkeypatch.setattr(Q, "sensitivity", fake_sensitivity(calls, {"ffn": 29.5, "cross-attn": 29.0}))
    choice = Q.ensure_blocks(CI, tiny(root))
    assert choice["blocks"] == ["cross-attn", "ffn"] and choice["basis"].startswith("measured")
    stored = json.loads(Q.blocks_path("ci", "tiny").read_text())
    assert stored["schema"] == Q.BLOCKS_SCHEMA and stored["rows"][0]["block"] == "none"
    assert stored["parent_sidecar_sha256"] == Q.sidecar_digest(root / "ci" / "onnx-tiny")
    assert Q.ensure_blocks(CI, tiny(root))["blocks"] == ["cross-attn", "ffn"] and len(calls) == 1
    retrain(root)
    Q.ensure_blocks(CI, tiny(root))
    assert len(calls) == 2
    assert not [p.name for p in (root / "ci").iterdir() if p.name.startswith(".")], "no temp files left behind"


def test_speed_only_default_is_the_body_not_measured(monkeypatch):
    monkeypatch.setattr(Q, "sensitivity", lambda *a, **k: pytest.fail("nothing to measure on random weights"))
    choice = Q.ensure_blocks(Preset.from_name("opus-mt-shape"), None)
    assert tuple(choice["blocks"]) == B.BODY_BLOCKS and choice["rows"] is None
    assert "embeddings" not in choice["blocks"] and "lm-head" not in choice["blocks"]


def test_ensure_quantized_uses_the_measured_blocks(root, monkeypatch):
    monkeypatch.setattr(Q, "sensitivity", fake_sensitivity([], {"ffn": 29.5}))
    recipe = Q.recipe_of(Q.ensure_quantized(CI, tiny(root), "dynamic"))
    assert recipe["blocks"] == ["ffn"] and recipe["blocks_basis"].startswith("measured")
    assert recipe["ort_optimizer"] is True


def test_ensure_quantized_refuses_when_no_block_is_safe(root, monkeypatch):
    monkeypatch.setattr(Q, "sensitivity", fake_sensitivity([], {}))  # every block alone costs 5 BLEU
    with pytest.raises(AssertionError, match="int8-safe"):
        Q.ensure_quantized(CI, tiny(root), "dynamic")


def test_ensure_quantized_rebuilds_a_stale_copy(root):
    """Reused while made from the current export with the same settings; rebuilt after a re-export
    (a retrained teacher) and when the optimizer setting differs."""
    out = Q.ensure_quantized(CI, tiny(root), "dynamic", blocks=("ffn",))
    made = (out / "onnx.json").read_text()
    assert Q.ensure_quantized(CI, tiny(root), "dynamic", blocks=("ffn",)) == out
    assert (out / "onnx.json").read_text() == made  # reused, not rebuilt
    retrain(root)
    Q.ensure_quantized(CI, tiny(root), "dynamic", blocks=("ffn",))
    assert Q.recipe_of(out)["parent_sidecar_sha256"] == Q.sidecar_digest(root / "ci" / "onnx-tiny")
    assert read_sidecar(out)["source"]["meta"]["retrained"] is True
    Q.quantize_dir(root / "ci" / "onnx-tiny", out, "dynamic", ("ffn",), optimize=False)
    assert Q.recipe_of(Q.ensure_quantized(CI, tiny(root), "dynamic", blocks=("ffn",)))["ort_optimizer"] is True


def test_the_all_blocks_copy_lives_beside_the_default_and_says_why(root, monkeypatch):
    """ort-int8-all quantizes every block into its own directory: building it never replaces the
    measured default recipe, and its recipe carries the reason it exists."""
    from labkit.engines import variants

    monkeypatch.setattr(Q, "sensitivity", fake_sensitivity([], {"ffn": 29.5}))
    default = Q.ensure_quantized(CI, tiny(root), "dynamic")
    every = variants.artifact_for("ort-int8-all", CI, tiny(root))
    assert every != default and every.name.endswith("-all")
    assert Q.recipe_of(every)["blocks"] == list(B.BLOCKS) and Q.recipe_of(every)["blocks_basis"] == Q.ALL_BLOCKS_BASIS
    assert Q.recipe_of(Q.ensure_quantized(CI, tiny(root), "dynamic"))["blocks"] == ["ffn"]  # still the default
