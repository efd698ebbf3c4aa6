"""labkit.measure.roofline: bytes per decode step against hand counts, the bound's arithmetic, bandwidth.

The tiny ONNX graph below has one weight of each kind, so every expected number is written out:
    E    fp32 [100, 8] read only by Gather               -> one row:        8 * 4 =  32 bytes (embeddings)
    W    fp32 [8, 16]  read by MatMul 'layers.0...'      -> whole:     8 * 16 * 4 = 512 bytes (layer.0)
    Wq   int8 [16, 4] + scale fp32 [] + zero point int8 [] through DequantizeLinear into MatMul
                                                         -> 64 + 4 + 1         =  69 bytes (layer.1)
    T    fp32 [50, 4]  the tied head: Gather and, transposed, MatMul -> whole: 50 * 4 * 4 = 800 bytes (lm_head)
"""

from __future__ import annotations

import math
import struct

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from labkit.engines.variants import Check
from labkit.lab import bench, bench_roofline
from labkit.measure import roofline


def tiny_graph() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("E", (100, 8)), ("W", (8, 16)), ("lm_head.weight", (50, 4)))]
    inits += [numpy_helper.from_array(rng.integers(-127, 127, (16, 4)).astype(np.int8), "layers.1.q.weight_quantized"),
              numpy_helper.from_array(np.array(0.05, np.float32), "s"),
              numpy_helper.from_array(np.array(0, np.int8), "zp")]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "W"], ["h"], name="layers.0.fc/MatMul"),
             helper.make_node("DequantizeLinear", ["layers.1.q.weight_quantized", "s", "zp"], ["wq"], name="dq"),
             helper.make_node("MatMul", ["h", "wq"], ["h2"], name="layers.1.q/MatMul"),
             helper.make_node("Gather", ["lm_head.weight", "ids"], ["te"], name="tied_lookup"),
             helper.make_node("Add", ["h2", "te"], ["h3"], name="add"),
             helper.make_node("Transpose", ["lm_head.weight"], ["tt"], name="untie"),
             helper.make_node("MatMul", ["h3", "tt"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 50])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def test_onnx_bytes_by_hand(tmp_path):
    path = tmp_path / "decoder_with_past_model.onnx"
    onnx.save(tiny_graph(), path)
    sb = roofline.step_bytes(tmp_path)  # the directory: its decoder-with-past graph
    assert sb.by_part() == {"layer.0": 512, "layer.1": 69, "lm_head": 800, "embeddings": 32}
    assert sb.by_dtype() == {"float32": 32 + 512 + 4 + 800, "int8": 64 + 1}
    assert sb.total == 1413 and sb.mb == pytest.approx(1413e-6)
    assert roofline.onnx_step_bytes(path, gathered_rows={"E": 3}).by_part()["embeddings"] == 96  # a shortlist


def test_onnx_dir_without_a_step_graph_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="with_past"):
        roofline.step_bytes(tmp_path)


def test_torch_count_equals_an_independent_sum():
    from transformers import MarianConfig, MarianMTModel

    cfg = MarianConfig(vocab_size=60, d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                       pad_token_id=59, decoder_start_token_id=59)
    model = MarianMTModel(cfg).eval()
    dec = model.model.decoder
    assert model.lm_head.weight.data_ptr() == dec.embed_tokens.weight.data_ptr()  # tied, as Marian ships
    body = sum(p.numel() for n, p in dec.named_parameters()
               if not n.startswith(("embed_tokens", "embed_positions")) and ".encoder_attn.k_proj" not in n
               and ".encoder_attn.v_proj" not in n)
    expected = 4 * (body + 16 + model.lm_head.weight.numel() + model.final_logits_bias.numel())  # + 1 position row
    sb = roofline.torch_step_bytes(model)
    assert sb.total == expected
    assert sb.by_part()["embeddings"] == 16 * 4
    assert sb.by_part()["layer.0"] == sb.by_part()["layer.1"]
    assert sum(sb.excluded.values()) == 4 * 2 * 2 * (16 * 16 + 16)  # 2 layers x (k, v) x (weight + bias)


def _ct2_string(s: str) -> bytes:
    b = s.encode() + b"\0"
    return struct.pack("<H", len(b)) + b


def _ct2_variable(name: str, array: np.ndarray, type_id: int) -> bytes:
    return (_ct2_string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
            + struct.pack("<BI", type_id, array.nbytes) + array.tobytes())


def test_ct2_model_bin_header(tmp_path):
    """A hand-written model.bin (CTranslate2's layout, version 6): what a step reads, tied head whole."""
    variables = [("encoder/layer_0/ffn/linear_0/weight", np.zeros((4, 4), np.float32), 0),  # encoder: not a step
                 ("decoder/layer_0/self_attention/linear_0/weight", np.zeros((6, 4), np.int8), 1),  # 24
                 ("decoder/layer_0/self_attention/linear_0/weight_scale", np.zeros(6, np.float32), 0),  # 24
                 ("decoder/layer_0/attention/linear_1/weight", np.zeros((8, 4), np.int8), 1),  # memory K/V: cached
                 ("decoder/embeddings/weight", np.zeros((10, 4), np.float32), 0),  # tied: 160 whole
                 ("decoder/position_encodings/encodings", np.zeros((8, 4), np.float32), 0)]  # one row: 16
    blob = struct.pack("<I", 6) + _ct2_string("TransformerSpec") + struct.pack("<II", 1, len(variables))
    blob += b"".join(_ct2_variable(*v) for v in variables)
    blob += struct.pack("<I", 1) + _ct2_string("decoder/projection/weight") + _ct2_string("decoder/embeddings/weight")
    (tmp_path / "model.bin").write_bytes(blob)
    sb = roofline.step_bytes(tmp_path)
    assert sb.by_part() == {"layer.0": 48, "lm_head": 160, "embeddings": 16}
    assert sb.excluded == {"decoder/layer_0/attention/linear_1/weight": 32}


def test_limit_arithmetic():
    """55 MB at 36 GB/s: 55e6 / 36e9 s = 1.528 ms; measured 3.0 ms -> 18.33 GB/s, 50.9 % of the limit."""
    lim = roofline.limit(55e6, 36.0, 3.0)
    assert lim["bound_ms"] == pytest.approx(55e6 / 36e9 * 1e3)
    assert lim["achieved_gbps"] == pytest.approx(55e6 / 3e-3 / 1e9)
    assert lim["pct_of_limit"] == pytest.approx(100 * 1.52778 / 3.0, rel=1e-4)
    assert lim["bytes_per_token_mb"] == 55.0
    assert math.isnan(roofline.limit(55e6, 36.0)["achieved_gbps"])


def test_bandwidth_is_a_positive_number_with_its_threads():
    before = torch.get_num_threads()
    bw = roofline.bandwidth(1, buffer_mb=8, warmup=1, repeats=3)
    assert bw.threads == 1 and len(bw.gbps) == 3 and torch.get_num_threads() == before
    assert all(math.isfinite(g) and g > 0 for g in bw.gbps)
    lo, hi = bw.spread
    assert lo <= bw.median_gbps <= hi and "1 threads" in str(bw)
    assert bw.cpu_share > 0  # how much CPU the reads got: a busy machine says so


def test_bench_rows_get_roofline_columns_and_ledger_keys(tmp_path, monkeypatch):
    """A timed ORT row gets bytes from its artifact; the footer names the bandwidth; the ledger keeps the numbers."""
    monkeypatch.setenv("LABKIT_ARTIFACTS", str(tmp_path / "art"))
    onnx.save(tiny_graph(), tmp_path / "decoder_with_past_model.onnx")
    result = {"p50": 2.0, "p95": 2.5, "iqr": 0.1, "n": 4, "noisy": False, "sentences_per_s": 9.0, "tokens": 4.0,
              "threads": 1, "load_s": 0.1, "peak_rss_mb": 100.0, "ids": [[1, 2, 3, 4]]}
    checks = {"ort-fp32": Check("ok", {"name": "onnx-parity", "passed": True, "detail": "ok"}, None, str(tmp_path)),
              "ort-int8": Check("failed", {"name": "agreement", "passed": False, "detail": "no"}, "no")}
    bw = roofline.Bandwidth((1.0, 1.2, 0.8), 1, 8)
    df = bench_roofline.add_roofline(bench.results_frame({"ort-fp32": result}, checks), checks, None, bw)
    row = df.set_index("variant").loc["ort-fp32"]
    assert row.bytes_per_token_mb == pytest.approx(1413e-6) and row.ms_per_token == 0.5
    assert row.bound_ms == pytest.approx(1413 / 1e9 * 1e3) and row.pct_of_limit == pytest.approx(100 * row.bound_ms / 0.5)
    assert pd.isna(df.set_index("variant").loc["ort-int8", "bound_ms"])  # failed rows are not timed
    assert "memory bandwidth" in bench.bench_table(df) and "1.0 GB/s" in bench.bench_table(df)
    record = bench.write_records(df, bench.Preset.from_name("ci"))[0]
    assert record["metrics"]["bytes_per_token_mb"] == pytest.approx(1413e-6)
    assert record["metrics"]["pct_of_bandwidth_limit"] == pytest.approx(row.pct_of_limit)


def test_roofline_chart_draws_the_bound_and_one_point_per_variant():
    from labkit.measure import plots

    table = pd.DataFrame({"variant": ["ort-fp32", "ort-int8"], "bytes_per_token_mb": [200.0, 50.0],
                          "ms_per_token": [12.0, 4.0]})
    fig = plots.roofline_chart(table, 25.0, (20.0, 30.0))
    bound = fig.data[0]
    assert list(bound.y) == [x / 25.0 for x in bound.x]  # ms = MB / (GB/s)
    assert [t.name for t in fig.data[3:]] == ["ort-fp32", "ort-int8"] and fig.data[3].y == (12.0,)
