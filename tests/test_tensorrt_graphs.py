"""TensorRT-ready graphs on the CPU: measured ranges, which nodes stay fp32, the fp16/int8 copies and their checks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from labkit.config import Preset
from labkit.core.data import load_split
from labkit.core.decode import DecodeConfig
from labkit.engines import trt_graphs as G
from labkit.engines import trt_verify as V
from labkit.engines.onnx_graphs import FILES, read_sidecar
from labkit.engines.ort import load_sessions
from labkit.engines.ort_int8 import calibration_feeds, evaluate_dir, gate_pairs

ROOT = Path(__file__).resolve().parent.parent
modelopt = pytest.importorskip("modelopt.onnx.autocast", reason="needs the graphs extra: pip install -e '.[graphs]'")


@pytest.fixture(scope="module")
def feeds(tiny_onnx_dir, tiny_module_bundle):
    texts = [p.zh for p in load_split("train", limit=12)]
    return calibration_feeds(tiny_onnx_dir, tiny_module_bundle.tokenizer, texts, DecodeConfig(max_new_tokens=16), batch=6, keep_every=3)


@pytest.fixture(scope="module")
def ranges(tiny_onnx_dir, feeds):
    return G.measure_ranges(tiny_onnx_dir, feeds)


@pytest.fixture(scope="module")
def fp16_dir(tiny_onnx_dir, ranges, tmp_path_factory):
    return G.make_fp16(tiny_onnx_dir, tmp_path_factory.mktemp("fp16") / "g", G.keep_fp32(tiny_onnx_dir, ranges))


@pytest.fixture(scope="module")
def int8_dir(tiny_onnx_dir, feeds, tmp_path_factory):
    return G.make_int8(tiny_onnx_dir, tmp_path_factory.mktemp("int8") / "g", feeds, "modelopt")


@pytest.fixture(scope="module")
def test_feeds(tiny_onnx_dir, tiny_module_bundle):
    """Real decode feeds of unseen (test) sentences: what int8 parity is checked on."""
    return V.decode_feeds(tiny_onnx_dir, tiny_module_bundle.tokenizer, [p.zh for p in load_split("test", limit=6)],
                          DecodeConfig(max_new_tokens=16))


# --------------------------------------------------------------------------- ranges, hand-checkable


@pytest.mark.parametrize("value, flag", [(0.0, ""), (4.2, ""), (512.0, ""), (600.0, "coarse"), (65504.0, "coarse"),
                                         (1e5, "overflow"), (3.4e38, "overflow"), (3e-6, "subnormal"),
                                         (2.0**-14, "")])
def test_flag_follows_fp16_limits(value, flag):
    """65504 is fp16's largest finite value; above 512 its step is >= 0.5; below 2^-14 it is subnormal."""
    assert G.flag(value) == flag


def _toy_graph(path: Path) -> None:
    """y = (x * 100) + c with c = 1e6 (an initializer that overflows fp16), z = relu(x)."""
    nodes = [helper.make_node("Mul", ["x", "k"], ["big"], name="mul"),
             helper.make_node("Add", ["big", "c"], ["y"], name="add"),
             helper.make_node("Relu", ["x"], ["z"], name="relu")]
    inits = [numpy_helper.from_array(np.array(100.0, np.float32), "k"),
             numpy_helper.from_array(np.array(1e6, np.float32), "c")]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_graph_ranges_are_the_largest_values_seen(tmp_path):
    """Oracle: numpy on the same feeds. x in {[0.1, -0.3], [0.2, 0.05]} -> big 30, y 1e6+30, z 0.2."""
    _toy_graph(tmp_path / "toy.onnx")
    feeds = [{"x": np.array([0.1, -0.3], np.float32)}, {"x": np.array([0.2, 0.05], np.float32)}]
    got = {r.tensor: r for r in G.graph_ranges(tmp_path / "toy.onnx", "toy", feeds)}
    xs = np.stack([f["x"] for f in feeds])
    assert got["big"].max_abs == pytest.approx(float(np.abs(xs * 100).max()))
    assert got["z"].max_abs == pytest.approx(float(np.maximum(xs, 0).max()))
    assert (got["big"].node, got["big"].op, got["big"].flag) == ("mul", "Mul", "")
    assert got["y"].flag == "overflow" and got["c"].op == "initializer" and got["c"].flag == "overflow"


def test_keep_fp32_takes_producers_and_consumers_of_flagged_tensors(tmp_path):
    """c (1e6) is read by `add`, which also produces y (~1e6): add stays fp32; mul (30) and relu do not."""
    _toy_graph(tmp_path / "toy.onnx")
    size = (tmp_path / "toy.onnx").stat().st_size
    (tmp_path / "onnx.json").write_text(json.dumps({"schema": "labkit.onnx/1", "files": {"toy": "toy.onnx"},
                                                    "file_bytes": {"toy.onnx": size}}))
    ranges = G.graph_ranges(tmp_path / "toy.onnx", "toy", [{"x": np.array([0.1, -0.3], np.float32)}])
    assert G.keep_fp32(tmp_path, ranges) == {"toy": ["add"]}


def test_graph_ranges_refuse_no_feeds(tmp_path):
    _toy_graph(tmp_path / "toy.onnx")
    with pytest.raises(ValueError, match="no calibration feeds"):
        G.graph_ranges(tmp_path / "toy.onnx", "toy", [])


def test_covering_feeds_add_longer_decoder_prefixes(feeds):
    covered = G.covering_feeds(feeds)
    lengths = {f["input_ids"].shape[1] for f in covered["decoder"]}
    assert {1, *G.COVER_TARGETS} <= lengths and covered["encoder"] is feeds["encoder"]


def test_the_masks_overflow_and_stay_fp32(tiny_onnx_dir, ranges):
    """The export's attention masks hold finfo(float32).min: measured as overflow, in every graph, and the
    causal mask of the first-step decoder too (it exists only for prefixes longer than one token)."""
    overflow = {(r.graph, r.op) for r in ranges if r.flag == "overflow"}
    assert {g for g, _ in overflow} == set(FILES)
    keep = G.keep_fp32(tiny_onnx_dir, ranges)
    model = onnx.load(str(tiny_onnx_dir / FILES["decoder"]))
    softmax = {n.name for n in model.graph.node if n.op_type == "Softmax"}
    assert softmax and softmax <= set(keep["decoder"]), "every decoder softmax reads a masked score"


# --------------------------------------------------------------------------- fp16 copies


def test_fp16_copy_keeps_the_measured_nodes_and_passes_its_checks(tiny_onnx_dir, fp16_dir, ranges, tiny_module_bundle):
    keep = G.keep_fp32(tiny_onnx_dir, ranges)
    checks = [V.fp16_structure(fp16_dir, keep), V.ort_parity(tiny_onnx_dir, fp16_dir, tiny_module_bundle.model, "fp16"),
              V.fp16_numerics(tiny_onnx_dir, fp16_dir, tiny_module_bundle.model)]
    assert all(c.passed for c in checks), checks
    assert read_sidecar(fp16_dir)["precision"] == "fp16" and read_sidecar(fp16_dir)["fp16"]["keep_fp32"] == keep
    assert checks[2].where == V.REFERENCE and checks[1].where == V.ORT


def test_reference_session_matches_onnxruntime_on_fp32(tiny_onnx_dir, tiny_module_bundle):
    """The true-fp16 runner is only as good as its adapter: on fp32 graphs it must match ORT to rounding."""
    parent = load_sessions(tiny_onnx_dir)
    feeds = V.random_feeds(parent, tiny_module_bundle.model, V.PARITY_CASES[:1])
    result = V.compare(parent, V.reference_sessions(tiny_onnx_dir), feeds, atol=1e-5, rtol=1e-5)
    assert result["passed"], result


def test_fp16_parity_fails_a_perturbed_layer_norm(tiny_onnx_dir, fp16_dir, tiny_module_bundle, tmp_path):
    """The fp16 tolerance is tight enough to catch a real error: the encoder's last LayerNorm scale x 1.05
    (its output is the graph's, so it moves by ~5 % of max|x|; fp16 rounding moves it ~0.1 %)."""
    broken = tmp_path / "broken"
    shutil.copytree(fp16_dir, broken)
    path = broken / FILES["encoder"]
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    norm = [n for n in model.graph.node if n.op_type == "LayerNormalization" and n.input[1] in inits][-1]
    scale = inits[norm.input[1]]
    values = numpy_helper.to_array(scale)
    scale.CopyFrom(numpy_helper.from_array(values * np.array(1.05, values.dtype), scale.name))
    onnx.save(model, str(path))
    meta = read_sidecar(fp16_dir)
    meta["file_bytes"][FILES["encoder"]] = path.stat().st_size
    (broken / "onnx.json").write_text(json.dumps(meta))
    assert not V.ort_parity(tiny_onnx_dir, broken, tiny_module_bundle.model, "fp16").passed


def test_fp16_tokens_in_true_fp16_match_fp32(tiny_onnx_dir, fp16_dir, tiny_module_bundle):
    preset = Preset.from_name("ci").with_(max_new_tokens=16)
    pairs = gate_pairs(preset)[:3]
    fp32 = evaluate_dir(tiny_onnx_dir, tiny_module_bundle, preset, pairs)
    check = V.fp16_tokens(fp16_dir, tiny_module_bundle, preset, [p.zh for p in pairs], fp32["ids"])
    assert check.where == V.REFERENCE and check.passed, check


# --------------------------------------------------------------------------- int8 copies


def test_int8_copy_is_symmetric_qdq_and_close_on_real_feeds(tiny_onnx_dir, int8_dir, tiny_module_bundle, test_feeds):
    checks = [V.int8_structure(int8_dir), V.ort_parity(tiny_onnx_dir, int8_dir, tiny_module_bundle.model, "int8", test_feeds)]
    assert all(c.passed for c in checks), checks
    assert read_sidecar(int8_dir)["quantization"]["tool"] == "modelopt"


def test_int8_structure_catches_a_nonzero_zero_point(int8_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(int8_dir, broken)
    path = broken / FILES["encoder"]
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits)
    zp = inits[q.input[2]]
    zp.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(zp) + np.int8(3), zp.name))
    onnx.save(model, str(path))
    meta = read_sidecar(int8_dir)
    meta["file_bytes"][FILES["encoder"]] = path.stat().st_size
    (broken / "onnx.json").write_text(json.dumps(meta))
    assert not V.int8_structure(broken).passed


def test_labkit_qdq_fallback_passes_the_same_checks(tiny_onnx_dir, tiny_bundle_dir, tmp_path):
    """Notebook 05's QDQ where ModelOpt is absent. In its own process: ModelOpt's PTQ, run by other tests
    here, patches onnxruntime.quantization in place."""
    code = f"""
import torch
from labkit.core.bundle import load_bundle
from labkit.core.data import load_split
from labkit.core.decode import DecodeConfig
from labkit.engines import trt_graphs as G, trt_verify as V
from labkit.engines.ort_int8 import calibration_feeds
b = load_bundle({str(tiny_bundle_dir)!r})
cfg = DecodeConfig(max_new_tokens=16)
# 48 calibration sentences: with 12 (all short), the test sentences' activations left the recorded ranges
feeds = calibration_feeds({str(tiny_onnx_dir)!r}, b.tokenizer, [p.zh for p in load_split("train", limit=48)], cfg, batch=12,
                          keep_every=3)
out = G.make_int8({str(tiny_onnx_dir)!r}, {str(tmp_path / "qdq")!r}, feeds, "labkit-qdq")
test = V.decode_feeds({str(tiny_onnx_dir)!r}, b.tokenizer, [p.zh for p in load_split("test", limit=6)], cfg)
checks = [V.int8_structure(out), V.ort_parity({str(tiny_onnx_dir)!r}, out, b.model, "int8", test)]
assert all(c.passed for c in checks), checks
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --------------------------------------------------------------------------- tools and gates


def test_tool_for_names_what_this_machine_has():
    assert G.tool_for("fp16") == "modelopt" and G.tool_for("int8") == "modelopt"
    with pytest.raises(ValueError, match="fp16' or 'int8"):
        G.tool_for("fp8")


def test_gate_of_fails_on_one_failed_check_and_says_where():
    ok = V.GraphCheck("int8", "parity", V.ORT, 0.3, "<= 1", True, "fine")
    bad = V.GraphCheck("int8", "bleu-drop", V.ORT, 1.4, "<= 1.0", False, "BLEU 97.6 vs fp32 99.0")
    gate = V.gate_of("int8", [ok, bad])
    assert gate["name"] == "trt-ready-int8" and gate["passed"] is False
    assert "bleu-drop (onnxruntime CPU): BLEU 97.6" in gate["detail"] and "parity" not in gate["detail"]
    assert V.gate_of("int8", [ok])["passed"] is True


def test_ensure_trt_graphs_builds_once_and_calibrates_at_most_once(tiny_onnx_dir, tiny_module_bundle, feeds, tmp_path, monkeypatch):
    """One builder shape: the second call reuses ranges, fp16 and int8 copies without decoding a sentence."""
    monkeypatch.setenv("LABKIT_ARTIFACTS", str(tmp_path))
    monkeypatch.setattr(G, "ensure_onnx", lambda preset, bundle: tiny_onnx_dir)
    calls = []

    def feeds_fn():
        calls.append(1)
        return feeds

    first = G.ensure_trt_graphs(Preset.from_name("ci"), tiny_module_bundle, feeds_fn)
    assert len(calls) == 1 and first.fp16.exists() and first.int8.exists()
    second = G.ensure_trt_graphs(Preset.from_name("ci"), tiny_module_bundle, feeds_fn)
    assert len(calls) == 1 and second.keep == first.keep and second.ranges == first.ranges
    assert read_sidecar(second.fp16)["artifact"]["recipe"]["keep_fp32"] == first.keep
