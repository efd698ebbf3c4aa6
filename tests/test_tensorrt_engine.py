"""TensorRT Part 2 without a GPU where possible: profiles and commands, the staleness rule, output shapes,
TrtStepper's device-side buffers (ONNX Runtime standing in for the engines); the real builds carry the
`tensorrt` marker and skip with the reason here."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from labkit.config import Preset
from labkit.core.data import load_split
from labkit.core.decode import DecodeConfig, decode
from labkit.engines import tensorrt as T
from labkit.engines import trt_profiles as P
from labkit.engines.onnx_export import PARITY_CASES
from labkit.engines.onnx_graphs import read_sidecar
from labkit.engines.ort import OrtStepper, load_sessions
from labkit.engines.trt_verify import compare, random_feeds

SHAPE = {"decoder_layers": 2, "heads": [4, 2], "cross_heads": [4, 4], "head_dim": 8, "d_model": 32,
         "vocab_size": 100, "max_positions": 512, "start_id": 99, "eos_id": 0, "pad_id": 99}
AXES = P.Axes(batch=P.Dim(1, 1, 16), source=P.Dim(1, 12, 256), target=P.Dim(1, 1, 64), past=P.Dim(0, 6, 64))


# --------------------------------------------------------------------------- profiles and commands


def test_dim_needs_min_le_opt_le_max():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        P.Dim(2, 1, 3)


def test_graph_profile_per_input_hand_checked():
    """Pruned layer 1 has 2 self-attention heads: its past is (batch, 2, past, 8); cross K/V (batch, 4, source, 8)."""
    prof = P.graph_profile("decoder_with_past", AXES, SHAPE)
    assert list(prof)[:3] == ["input_ids", "encoder_attention_mask", "past_key_self_0"]
    assert prof["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [16, 1]}
    assert prof["past_value_self_1"] == {"min": [1, 2, 0, 8], "opt": [1, 2, 6, 8], "max": [16, 2, 64, 8]}
    assert prof["cross_key_1"] == {"min": [1, 4, 1, 8], "opt": [1, 4, 12, 8], "max": [16, 4, 256, 8]}
    enc = P.graph_profile("encoder", AXES, SHAPE)
    assert enc == {n: {"min": [1, 1], "opt": [1, 12], "max": [16, 256]} for n in ("input_ids", "attention_mask")}
    assert P.graph_profile("decoder", AXES, SHAPE)["encoder_hidden_states"]["max"] == [16, 256, 32]


def test_profile_axes_follow_the_preset_and_the_median_sentence(tiny_module_bundle):
    """Oracle: the median test sentence counted directly with the tokenizer."""
    preset = Preset.from_name("ci")
    pairs = load_split("test", limit=preset.eval_sentences)
    source = statistics.median_low(len(x) for x in tiny_module_bundle.tokenizer([p.zh for p in pairs])["input_ids"])
    target = statistics.median_low(len(x) for x in tiny_module_bundle.tokenizer(text_target=[p.en for p in pairs])["input_ids"])
    axes = P.profile_axes(preset, tiny_module_bundle.tokenizer, {**SHAPE, "max_positions": 512})
    assert axes.batch == P.Dim(1, 1, preset.batch_size)
    assert axes.source == P.Dim(1, source, 256)  # the Translator truncates to 256 tokens
    assert axes.past == P.Dim(0, target // 2, preset.max_new_tokens)
    speed = P.profile_axes(Preset.from_name("opus-mt-shape"), tiny_module_bundle.tokenizer, SHAPE)
    assert speed.past == P.Dim(0, 20, 40)  # forced 40 tokens: the middle of every decode


def test_trtexec_command_is_strongly_typed_without_precision_flags():
    cmd = P.trtexec_command("encoder_model.onnx", P.graph_profile("encoder", AXES, SHAPE))
    assert "--stronglyTyped" in cmd and "--fp16" not in cmd and "--int8" not in cmd
    assert "--minShapes=input_ids:1x1,attention_mask:1x1" in cmd
    assert "--maxShapes=input_ids:16x256,attention_mask:16x256" in cmd
    assert "--saveEngine=encoder_model.plan" in cmd and "--timingCacheFile=timing.cache" in cmd


def test_written_profiles_hold_runnable_polygraphy_commands(tiny_onnx_dir, tmp_path):
    """The polygraphy command of every graph parses and runs the ONNX Runtime side here (its --trt half needs
    TensorRT): flags, shapes and value ranges are what polygraphy accepts, at the opt shapes."""
    polygraphy = str(Path(sys.executable).parent / "polygraphy")
    if not Path(polygraphy).exists():
        pytest.skip("polygraphy is not installed (the graphs extra)")
    record = P.write_profiles(tiny_onnx_dir, P.Axes(P.Dim(1, 2, 4), P.Dim(1, 12, 256), P.Dim(1, 1, 64), P.Dim(0, 6, 64)),
                              1e-3, 2e-2)
    assert P.read_profiles(tiny_onnx_dir) == json.loads(json.dumps(record))
    for graph, cmd in record["polygraphy"].items():
        assert " --trt --onnxrt --strongly-typed " in cmd
        cpu_side = cmd.replace(" --trt ", " ").replace("polygraphy ", f"{polygraphy} ", 1)
        proc = subprocess.run(cpu_side, shell=True, cwd=tiny_onnx_dir, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "PASSED" in proc.stdout + proc.stderr, (graph, proc.stderr[-2000:])


def test_read_profiles_says_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="write_profiles"):
        P.read_profiles(tmp_path)


# --------------------------------------------------------------------------- staleness


WANTED = {"schema": T.SCHEMA, "tensorrt": "10.8.0", "gpu": "NVIDIA H200", "compute_capability": "9.0",
          "onnx_sha256": "abc", "profile": {"input_ids": {"min": [1, 1]}}, "workspace_mb": 4096, "strongly_typed": True}


@pytest.mark.parametrize("stored, reason", [
    (None, "no engine yet"),
    ({**WANTED, "tensorrt": "10.3.0"}, "built with TensorRT 10.3.0, this is 10.8.0"),
    ({**WANTED, "gpu": "NVIDIA A100", "compute_capability": "8.0"},
     "built for NVIDIA A100 (sm 8.0), this is NVIDIA H200 (sm 9.0)"),
    ({**WANTED, "onnx_sha256": "old"}, "the ONNX graph changed since the build"),
    ({**WANTED, "profile": {"input_ids": {"min": [1, 2]}}}, "the profile changed since the build"),
    ({**WANTED, "workspace_mb": 1024}, "the workspace mb changed since the build"),
    ({**WANTED, "schema": "labkit.trt-engine/0"},
     "sidecar schema 'labkit.trt-engine/0', expected 'labkit.trt-engine/1'"),
    (dict(WANTED), None),
])
def test_stale_reason(stored, reason):
    assert T.stale_reason(stored, WANTED) == reason


def test_engine_identity_tracks_the_graph_bytes(tiny_onnx_dir, tmp_path):
    graph = tmp_path / "g.onnx"
    shutil.copyfile(tiny_onnx_dir / "encoder_model.onnx", graph)
    device = {"gpu": "NVIDIA H200", "compute_capability": "9.0"}
    before = T.engine_identity(graph, {}, 4096, "10.8.0", device)
    graph.write_bytes(graph.read_bytes() + b"\0")
    after = T.engine_identity(graph, {}, 4096, "10.8.0", device)
    assert T.stale_reason(before, after) == "the ONNX graph changed since the build"


def test_read_engine_sidecar_tolerates_missing_and_corrupt(tmp_path):
    plan = tmp_path / "encoder_model.plan"
    assert T.read_engine_sidecar(plan) is None
    plan.write_bytes(b"engine")
    Path(str(plan) + ".json").write_text("{not json")
    assert T.read_engine_sidecar(plan) is None


def test_ensure_engines_builds_nothing_from_a_failed_graph(tmp_path):
    with pytest.raises(ValueError, match="failed their gate"):
        T.ensure_engines(tmp_path, {"name": "trt-ready-int8", "passed": False, "detail": "BLEU drop 1.4"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given where there is no GPU")
def test_engines_unavailable_names_the_missing_device():
    assert "no CUDA device" in T.engines_unavailable()


# --------------------------------------------------------------------------- the stepper, engines stood in for


def test_output_shapes_hand_checked():
    past = {"input_ids": (3, 1), "encoder_attention_mask": (3, 7), "past_key_self_0": (3, 4, 5, 8)}
    out = T.output_shapes("decoder_with_past", past, SHAPE)
    assert out["logits"] == (3, 100) and out["present_key_self_1"] == (3, 2, 6, 8) and len(out) == 5
    first = T.output_shapes("decoder", {"input_ids": (3, 2), "encoder_attention_mask": (3, 7)}, SHAPE)
    assert first["present_value_self_0"] == (3, 4, 2, 8) and first["cross_key_1"] == (3, 4, 7, 8)
    assert T.output_shapes("encoder", {"input_ids": (3, 7), "attention_mask": (3, 7)}, SHAPE) == \
        {"encoder_hidden_states": (3, 7, 32)}


def test_kv_buffers_swap_and_reorder_rows():
    kv = T.KvBuffers(["key_self_0"], {"key_self_0": 2}, rows=3, capacity=4, head_dim=1, dtype=torch.float32,
                     device=torch.device("cpu"))
    kv.spare(2)["key_self_0"].copy_(torch.arange(12.0).view(3, 2, 2, 1))
    kv.swap(2)
    same = kv.reordered(torch.tensor([2, 0, 1]))
    assert same is kv and torch.equal(kv.past()["key_self_0"][0], torch.arange(8.0, 12).view(2, 2, 1))
    grown = kv.reordered(torch.tensor([1, 1, 1, 1]))  # beam expansion: 3 rows -> 4, new buffers
    assert grown is not kv and grown.past()["key_self_0"].shape == (4, 2, 2, 1)
    with pytest.raises(ValueError, match="capacity 4 exceeded"):
        kv.spare(5)


class OrtRunner:
    """An engine stand-in: TrtRunner's `run` over an ONNX Runtime session, writing into the bound tensors."""

    def __init__(self, session):
        self.session = session

    def run(self, inputs: dict, outputs: dict, stream: int) -> None:
        names = list(outputs)
        for name, value in zip(names, self.session.run(names, {k: t.numpy() for k, t in inputs.items()})):
            assert tuple(outputs[name].shape) == value.shape, (name, outputs[name].shape, value.shape)
            outputs[name].copy_(torch.from_numpy(value))


@pytest.mark.parametrize("beams", [1, 3])
def test_trt_stepper_buffers_decode_like_ort(tiny_onnx_dir, tiny_module_bundle, beams):
    """Oracle: OrtStepper over the same graphs. TrtStepper's swapped K/V buffers, once-per-source cross K/V and
    beam reorders must give the same tokens."""
    sessions, meta = load_sessions(tiny_onnx_dir), read_sidecar(tiny_onnx_dir)
    enc = tiny_module_bundle.tokenizer([p.zh for p in load_split("test", limit=6)], padding=True, return_tensors="pt")
    cfg = DecodeConfig(max_new_tokens=24, num_beams=beams)
    want = decode(OrtStepper(sessions, meta), enc["input_ids"], enc["attention_mask"], cfg)
    stepper = T.TrtStepper({g: OrtRunner(s) for g, s in sessions.items()}, meta, "cpu", capacity=25)
    assert decode(stepper, enc["input_ids"], enc["attention_mask"], cfg) == want


def test_engine_session_compares_like_an_ort_session(tiny_onnx_dir, tiny_module_bundle):
    """EngineSession (numpy in and out around a runner) lets trt_verify.compare check engines: with ONNX
    Runtime behind it, it must reproduce ONNX Runtime exactly."""
    sessions, meta = load_sessions(tiny_onnx_dir), read_sidecar(tiny_onnx_dir)

    class Runner(OrtRunner):
        dtypes: dict = {}

    stand_in = {g: T.EngineSession(Runner(s), g, meta["model"], device="cpu") for g, s in sessions.items()}
    result = compare(sessions, stand_in, random_feeds(sessions, tiny_module_bundle.model, PARITY_CASES[:1]), atol=1e-12, rtol=0.0)
    assert result["passed"] and result["worst"]["max_abs"] == 0.0


# --------------------------------------------------------------------------- on a GPU with TensorRT


@pytest.mark.tensorrt
def test_engines_build_and_decode_like_ort(tiny_onnx_dir, tiny_module_bundle, tmp_path):
    directory = tmp_path / "fp32"
    shutil.copytree(tiny_onnx_dir, directory)
    P.write_profiles(directory, P.Axes(P.Dim(1, 1, 4), P.Dim(1, 8, 64), P.Dim(1, 1, 24), P.Dim(0, 6, 24)),
                     1e-3, 2e-2)
    logs = []
    plans = T.ensure_engines(directory, {"name": "fp32", "passed": True, "detail": ""}, logs.append)
    assert set(plans) == {"encoder", "decoder", "decoder_with_past"} and all("no engine yet" in m for m in logs)
    assert T.ensure_engines(directory, {"passed": True}, logs.append) == plans and len(logs) == 3  # reused
    enc = tiny_module_bundle.tokenizer([p.zh for p in load_split("test", limit=4)], padding=True, return_tensors="pt")
    cfg = DecodeConfig(max_new_tokens=20)
    want = decode(OrtStepper(load_sessions(tiny_onnx_dir), read_sidecar(tiny_onnx_dir)), enc["input_ids"],
                  enc["attention_mask"], cfg)
    assert decode(T.TrtStepper.from_dir(directory), enc["input_ids"], enc["attention_mask"], cfg) == want
    assert np.isfinite(T.read_engine_sidecar(plans["encoder"])["build_seconds"])
