"""INT8 post-training quantization of the exported graphs with ONNX Runtime.

Two recipes over a `labkit.export` directory, each producing a directory that
`labkit.runtime.OrtStepper.from_dir` runs unchanged:

    dynamic   ORT transformer optimizer (model_type "bart"), LM head untied, then
              `quantize_dynamic`: int8 per-channel weights, activations quantized
              on the fly per call (uint8). No calibration; the CPU recipe.
    qdq       `quantize_static` in QDQ format, int8 symmetric weights *and*
              activations (per-channel weights), ranges calibrated on training
              sentences run through the fp32 graphs (the decoder graphs see real
              past K/V). Standard ONNX ops only, so TensorRT can build it.

    out = ensure_quantized("ci", "dynamic")           # artifacts/ci/onnx-teacher-int8-dynamic
    stepper = OrtStepper.from_dir(out, threads=2)

Which weights are quantized is chosen per block (`BLOCKS`, matched on the
PyTorch module path each exporter records for a node); `sensitivity` quantizes
one block at a time and measures the BLEU cost, which is how the defaults in
`QUANT_BUDGETS` were chosen. Only weight MatMuls (and, if asked, the embedding
Gather) are quantized: attention-score MatMuls multiply two activations and stay
float. The tied LM head is a Gemm on the embedding matrix after export;
`untie_lm_head` gives it its own transposed copy as a MatMul, the form the
dynamic quantizer handles (it has no Gemm kernel) and that keeps the embedding
lookup independent of the head's precision.

Left out: quantization-aware training, int4/fp8, SmoothQuant-style rescaling,
and mixed per-layer recipes finer than a block type.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from labkit.export import size_mb as export_size_mb  # graph files + external data, MiB

BLOCKS = ("encoder-self-attn", "decoder-self-attn", "cross-attn", "ffn", "lm-head", "embeddings")
KINDS = ("dynamic", "qdq")
METHODS = ("minmax", "entropy", "percentile")
SCOPE_KEY = "pkg.torch.onnx.name_scopes"  # the dynamo exporter's module path per node
MAX_BLEU_DROP = 1.0  # the gate: an int8 variant losing more than this vs its fp32 parent failed


@dataclass(frozen=True)
class QuantBudget:
    calibration_sentences: int  # training sentences decoded by the fp32 graphs to record calibration feeds
    calibration_batch: int  # sentences per calibration batch
    keep_every: int  # keep every k-th decoder-with-past feed (bounds calibration memory and time)
    eval_sentences: int  # test sentences scored per variant in sensitivity and method comparisons
    blocks: tuple[str, ...]  # default blocks to quantize (chosen from `sensitivity` on the teacher)
    method: str = "minmax"  # default calibration method of the qdq recipe
    methods: tuple[str, ...] = METHODS  # compared in notebook 05 (entropy costs ~1 min per recipe)
    percentile: float = 99.999  # for method "percentile"
    # engines notebook 05 times in their own processes (labkit.benchmark variants); each costs a
    # process start and a model load, so ci times the dynamic recipe against its parent and the peer
    bench_variants: tuple[str, ...] = ("ort-fp32", "ort-int8", "ort-int8-qdq", "ct2-fp32", "ct2-int8")


# Chosen with notebook 05 on the embedded teacher (200 test sentences): each block alone left every
# sentence's tokens unchanged, and all six together changed none (dynamic) or 1 in 200 (QDQ),
# BLEU within 0.2 of fp32. The embeddings are measured safe, so they are int8 too (a quarter of the
# largest matrix); a new model re-measures with `sensitivity` before trusting this default.
DEFAULT_BLOCKS = BLOCKS
QUANT_BUDGETS = {
    "ci": QuantBudget(calibration_sentences=32, calibration_batch=16, keep_every=4, eval_sentences=48,
                      blocks=DEFAULT_BLOCKS, methods=("minmax", "percentile"),
                      bench_variants=("ort-fp32", "ort-int8", "ct2-int8")),
    "workshop": QuantBudget(calibration_sentences=256, calibration_batch=16, keep_every=2,
                            eval_sentences=500, blocks=DEFAULT_BLOCKS),
    "opus-mt-zh-en": QuantBudget(calibration_sentences=128, calibration_batch=8, keep_every=4,
                                 eval_sentences=300, blocks=DEFAULT_BLOCKS),
    "opus-mt-shape": QuantBudget(calibration_sentences=16, calibration_batch=8, keep_every=8,
                                 eval_sentences=0, blocks=DEFAULT_BLOCKS, methods=("minmax",)),
}


def budget_for(preset_name: str) -> QuantBudget:
    if preset_name not in QUANT_BUDGETS:
        raise KeyError(f"no quantization budget for preset {preset_name!r}; known: {', '.join(QUANT_BUDGETS)}")
    return QUANT_BUDGETS[preset_name]


# --------------------------------------------------------------------------- primitives: which node is what


def metadata_scope(node) -> str | None:
    """The module path the dynamo exporter records on a node, dot-joined (None if absent).

    "['', 'model.model.encoder.layers.0.fc1', 'linear_4']" -> ".model.model.encoder.layers.0.fc1.linear_4"
    """
    for prop in node.metadata_props:
        if prop.key == SCOPE_KEY:
            return ".".join(s.strip(" '\"") for s in prop.value.strip("[]").split(","))
    return None


def node_scopes(model) -> dict[str, str]:
    """Module path per node name: exporter metadata, else the Linear bias its output meets, else the name.

    TorchScript names nodes '/q_proj/MatMul' in both self- and cross-attention; the bias
    added to its output ('model.model.decoder.layers.1.encoder_attn.q_proj.bias') says which.
    """
    consts = _initializers(model)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    scopes = {}
    for node in model.graph.node:
        scope = metadata_scope(node)
        if scope is None:
            nearby = [i for c in consumers.get(node.output[0], []) for i in c.input]
            biases = [i for i in nearby if i in consts and i.endswith(".bias") and "norm" not in i]
            weights = [i for i in node.input if i in consts and i.endswith(".weight")]
            scope = (biases or weights or [node.name.replace("/", ".")])[0]
        scopes[node.name] = scope
    return scopes


def block_of(scope: str) -> str | None:
    """Which BLOCKS entry a module path belongs to (None: not a block weight).

    'model.model.decoder.layers.1.encoder_attn.q_proj' -> 'cross-attn'; '...fc2.bias' -> 'ffn';
    'model.model.shared.weight' (the tied embedding) -> 'embeddings'
    """
    if "lm_head" in scope:
        return "lm-head"
    if "embed_tokens" in scope or "shared" in scope:
        return "embeddings"
    if ".encoder_attn." in scope:
        return "cross-attn"
    if ".fc1" in scope or ".fc2" in scope:
        return "ffn"
    if ".self_attn." in scope:
        return "encoder-self-attn" if "encoder.layers." in scope else "decoder-self-attn"
    return None


def _initializers(model) -> set[str]:
    return {t.name for t in model.graph.initializer}


def node_blocks(model) -> dict[str, str]:
    """{node name: block} for the nodes holding weights: MatMul with a constant B, embedding Gather."""
    consts, scopes = _initializers(model), node_scopes(model)
    blocks = {}
    for node in model.graph.node:
        constant = (node.op_type == "MatMul" and node.input[1] in consts) or \
                   (node.op_type == "Gather" and node.input[0] in consts)
        block = block_of(scopes[node.name]) if constant else None
        if block is not None and (node.op_type == "MatMul") != (block == "embeddings"):
            blocks[node.name] = block  # a Gather is only ever an embedding lookup, a MatMul never
    return blocks


def weight_nodes(model, blocks: Iterable[str]) -> list[str]:
    """Names of the weight nodes of `blocks` in one graph, in graph order."""
    wanted = set(blocks)
    unknown = wanted - set(BLOCKS)
    if unknown:
        raise ValueError(f"unknown blocks {sorted(unknown)}; known: {BLOCKS}")
    return [name for name, block in node_blocks(model).items() if block in wanted]


def block_counts(model) -> dict[str, int]:
    """Weight nodes per block in one graph: {'ffn': 4, 'lm-head': 1, ...}."""
    found = list(node_blocks(model).values())
    return {b: found.count(b) for b in BLOCKS}


# --------------------------------------------------------------------------- primitives: graph edits


def untie_lm_head(model):
    """Gemm(x, W, transB=1) on a shared initializer W -> MatMul(x, W^T) on its own copy (+ Add C).

    The exporters fold the tied head into a Gemm over the embedding matrix; the dynamic
    quantizer has no Gemm kernel, and quantizing a shared matrix would change the embedding
    lookup too. Costs one more copy of the matrix in the fp32 file, a quarter of it in int8.
    """
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        simple = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or node.input[1] not in inits or not simple:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        name = f"{node.input[1]}.untied_t"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), name))
        has_bias = len(node.input) > 2 and node.input[2]
        out = node.output[0] + ("_matmul" if has_bias else "")
        matmul = helper.make_node("MatMul", [node.input[0], name], [out], name=node.name + "_matmul")
        matmul.metadata_props.extend(node.metadata_props)
        nodes.append(matmul)
        if has_bias:
            nodes.append(helper.make_node("Add", [out, node.input[2]], [node.output[0]], name=node.name + "_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def ort_optimize(src: Path, dst: Path, shape: dict) -> None:
    """ONNX Runtime's transformer optimizer for BART-like graphs (fuses Add+LayerNorm, ...)."""
    from onnxruntime.transformers.optimizer import optimize_model

    heads = shape["heads"]
    uniform = len(set(heads)) == 1  # pruned models: let the optimizer infer shapes per node
    opt = optimize_model(str(src), model_type="bart", num_heads=heads[0] if uniform else 0,
                         hidden_size=shape["d_model"] if uniform else 0, opt_level=0)
    opt.save_model_to_file(str(dst))


def _untie_file(src: Path, dst: Path) -> None:
    import onnx

    onnx.save(untie_lm_head(onnx.load(str(src))), str(dst))


# --------------------------------------------------------------------------- calibration


class _Recorder:
    """An InferenceSession stand-in that keeps every k-th feed it runs (for calibration)."""

    def __init__(self, session, keep_every: int = 1):
        self.session, self.keep_every, self.calls, self.feeds = session, keep_every, 0, []

    def run(self, names, feed, *args, **kwargs):
        if self.calls % self.keep_every == 0:
            self.feeds.append({k: np.array(v) for k, v in feed.items()})
        self.calls += 1
        return self.session.run(names, feed, *args, **kwargs)

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()


def calibration_feeds(onnx_dir: Path | str, tokenizer, texts: list[str], cfg, batch: int = 16,
                      keep_every: int = 4, threads: int = 1) -> dict[str, list[dict]]:
    """{graph: [feed, ...]}: the inputs each fp32 graph sees while greedily translating `texts`.

    The decoder-with-past graph is calibrated on real past K/V, which only a real decode makes.
    """
    from labkit.decode import decode
    from labkit.export import read_sidecar
    from labkit.runtime import OrtStepper, load_sessions

    meta = read_sidecar(onnx_dir)
    sessions = load_sessions(onnx_dir, threads=threads)
    recorders = {g: _Recorder(s, keep_every if g == "decoder_with_past" else 1) for g, s in sessions.items()}
    stepper = OrtStepper(recorders, meta, io="numpy")
    for start in range(0, len(texts), batch):
        enc = tokenizer(texts[start:start + batch], padding=True, truncation=True, max_length=128,
                        return_tensors="pt")
        decode(stepper, enc["input_ids"], enc["attention_mask"], cfg)
    return {g: r.feeds for g, r in recorders.items()}


def _reader(feeds: list[dict]):
    """A CalibrationDataReader over recorded feeds, with the range API that strided calibration uses."""
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        def __init__(self):
            self.set_range(0, len(feeds))

        def __len__(self):
            return len(feeds)

        def set_range(self, start_index: int, end_index: int):
            self.it = iter(feeds[start_index:end_index])

        def get_next(self):
            return next(self.it, None)

    return FeedReader()


@contextmanager
def _quiet_root_logger():
    """ORT's quantizer logs a pre-processing advice on the root logger for every graph."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# --------------------------------------------------------------------------- transforms (one graph file)


def _extra_options(**more) -> dict:
    import onnx

    # Shape inference cannot type the outputs of ORT's fused contrib ops (SkipLayerNormalization):
    # without a default the quantizer refuses an optimized graph.
    return {"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True, **more}


def quantize_dynamic_file(src: Path, dst: Path, blocks: Iterable[str], shape: dict, optimize: bool = True) -> int:
    """optimize -> untie LM head -> quantize_dynamic of the `blocks` weights; returns nodes quantized."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        stage = src
        if optimize:
            ort_optimize(src, work / "opt.onnx", shape)
            stage = work / "opt.onnx"
        _untie_file(stage, work / "untied.onnx")
        nodes = weight_nodes(onnx.load(str(work / "untied.onnx"), load_external_data=False), blocks)
        if not nodes:  # nothing of these blocks in this graph: keep it fp32 (as optimized)
            shutil.copyfile(work / "untied.onnx", dst)
            return 0
        with _quiet_root_logger():
            quantize_dynamic(str(work / "untied.onnx"), str(dst), op_types_to_quantize=["MatMul", "Gather"],
                             per_channel=True, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                             extra_options=_extra_options())
    return len(nodes)


def quantize_qdq_file(src: Path, dst: Path, blocks: Iterable[str], feeds: list[dict], method: str = "minmax",
                      percentile: float = 99.999) -> int:
    """untie LM head -> quantize_static, QDQ, symmetric int8 activations and weights; returns nodes quantized."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    with tempfile.TemporaryDirectory() as work:
        untied = Path(work) / "untied.onnx"
        _untie_file(src, untied)
        nodes = weight_nodes(onnx.load(str(untied), load_external_data=False), blocks)
        if not nodes:
            shutil.copyfile(untied, dst)
            return 0
        # One feed per collection pass (strided calibration): feeds differ in shape, and the
        # histogram calibrators cannot stack tensors of different shapes from one pass.
        options = _extra_options(ActivationSymmetric=True, WeightSymmetric=True, CalibStridedMinMax=1,
                                 CalibPercentile=percentile, CalibTensorRangeSymmetric=True)
        with _quiet_root_logger():
            quantize_static(str(untied), str(dst), _reader(feeds), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul", "Gather"], per_channel=True, reduce_range=False,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=nodes, calibrate_method=calibrate, extra_options=options)
    return len(nodes)


# --------------------------------------------------------------------------- directories


def quantize_dir(onnx_dir: Path | str, out: Path | str, kind: str = "dynamic", blocks: Iterable[str] = DEFAULT_BLOCKS,
                 feeds: dict[str, list[dict]] | None = None, method: str = "minmax", percentile: float = 99.999,
                 optimize: bool = True) -> Path:
    """A quantized copy of an export directory (atomic, sidecar says what was done).

    kind 'dynamic' needs nothing else; kind 'qdq' needs `feeds` from `calibration_feeds`.
    """
    from labkit.export import derive, read_sidecar

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "qdq" and not feeds:
        raise ValueError("static QDQ quantization needs calibration feeds (labkit.quantize.calibration_feeds)")
    blocks = tuple(blocks)
    meta = read_sidecar(onnx_dir)
    graph_of = {name: graph for graph, name in meta["files"].items()}
    counts: dict[str, int] = {}
    start = time.perf_counter()
    recipe = {"kind": kind, "blocks": list(blocks), "per_channel": True, "weights": "int8",
              "activations": "uint8 dynamic" if kind == "dynamic" else "int8 symmetric static",
              "format": "QOperator (MatMulInteger)" if kind == "dynamic" else "QDQ",
              "method": method if kind == "qdq" else None, "ort_optimizer": optimize and kind == "dynamic",
              "calibration_feeds": {g: len(f) for g, f in (feeds or {}).items()},
              "nodes_quantized": counts, "seconds": 0.0}

    def transform(src: Path, dst: Path) -> None:
        # Fills `recipe` as it goes: derive writes the sidecar after the last graph, in the same commit.
        graph = graph_of[src.name]
        if kind == "dynamic":
            counts[graph] = quantize_dynamic_file(src, dst, blocks, meta["model"], optimize)
        else:
            counts[graph] = quantize_qdq_file(src, dst, blocks, feeds[graph], method, percentile)
        recipe["seconds"] = round(time.perf_counter() - start, 1)

    return derive(onnx_dir, out, transform, precision="int8", parity=None, quantization=recipe)


def recipe_of(directory: Path | str) -> dict | None:
    from labkit.export import read_sidecar

    return read_sidecar(directory).get("quantization")


# --------------------------------------------------------------------------- evaluation helpers


def evaluate_dir(directory: Path | str, bundle, preset, pairs, reference_ids: list[list[int]] | None = None,
                 threads: int = 1) -> dict:
    """Translate `pairs` with the graphs in `directory`: {bleu, chrf, bleu_signature, agreement, ids}.

    `agreement` is the share of sentences whose ids equal `reference_ids` (None without them):
    a finer signal than BLEU when a change flips a few tokens. One thread by default: this is a
    quality check, and a spinning two-thread pool on a shared machine only makes it slower.
    """
    from labkit.evaluate import agreement, score
    from labkit.runtime import translate_ids, translator

    ids, hyps = translate_ids(translator(directory, bundle, preset, threads=threads), [p.zh for p in pairs],
                              preset.batch_size)
    scores = score(hyps, [p.en for p in pairs])
    return {**scores.as_metrics(), "agreement": agreement(ids, reference_ids) if reference_ids else None,
            "ids": ids}


def bleu_gate(bleu: float, parent_bleu: float, max_drop: float = MAX_BLEU_DROP) -> dict:
    """The ledger gate: {'name': 'bleu-drop<=1.0', 'passed': drop <= 1.0, 'detail': ...}."""
    drop = parent_bleu - bleu
    return {"name": f"bleu-drop<={max_drop}", "passed": bool(drop <= max_drop),
            "detail": f"BLEU {bleu:.2f} vs fp32 parent {parent_bleu:.2f}: drop {drop:.2f}"}


def sensitivity(onnx_dir: Path | str, bundle, preset, pairs, work: Path | str, blocks: Iterable[str] = BLOCKS,
                kind: str = "dynamic", feeds=None, reference: dict | None = None, optimize: bool = False) -> list[dict]:
    """Quantize one block type at a time and score it: [{block, nodes, bleu, chrf, agreement, size_mb}, ...].

    The first row, block 'none', is the fp32 graphs (`reference`, an `evaluate_dir` result, if
    given), against which agreement is counted. `optimize=False` skips ORT's fusion pass: it is
    float-exact and costs seconds per variant.
    """
    work = Path(work)
    fp32 = reference or evaluate_dir(onnx_dir, bundle, preset, pairs)
    rows = [{"block": "none", "nodes": 0, "size_mb": export_size_mb(onnx_dir), **fp32, "agreement": 1.0}]
    for block in blocks:
        out = quantize_dir(onnx_dir, work / f"{kind}-{block}", kind, [block], feeds=feeds, optimize=optimize)
        nodes = sum(recipe_of(out)["nodes_quantized"].values())
        rows.append({"block": block, "nodes": nodes, "size_mb": export_size_mb(out),
                     **evaluate_dir(out, bundle, preset, pairs, fp32["ids"])})
    return [{k: v for k, v in row.items() if k != "ids"} for row in rows]


def choose_blocks(rows: list[dict], max_drop: float) -> tuple[str, ...]:
    """Blocks whose quantization alone costs at most `max_drop` BLEU vs the 'none' row."""
    reference = next(r["bleu"] for r in rows if r["block"] == "none")
    return tuple(r["block"] for r in rows if r["block"] != "none" and r["nodes"]
                 and reference - r["bleu"] <= max_drop)


# --------------------------------------------------------------------------- handler


def quantized_dir(preset: str, kind: str, bundle_name: str = "teacher", method: str | None = None) -> Path:
    """Where ensure_quantized keeps a recipe: <artifacts>/<preset>/onnx-<bundle_name>-int8-<kind>.

    A qdq copy calibrated with a method other than the preset's default gets a '-<method>' suffix,
    so comparing methods never replaces the kept artifact.
    """
    from labkit.artifacts import preset_dir

    suffix = f"-{method}" if kind == "qdq" and method and method != budget_for(preset).method else ""
    return preset_dir(preset) / f"onnx-{bundle_name}-int8-{kind}{suffix}"


def ensure_quantized(preset, kind: str = "dynamic", bundle_name: str = "teacher", blocks: Iterable[str] | None = None,
                     method: str | None = None, feeds: dict[str, list[dict]] | None = None) -> Path:
    """The preset's int8 copy of `bundle_name`'s export, built if missing or made with other settings.

    Blocks and calibration method default to the preset's QuantBudget; the qdq recipe decodes
    `calibration_sentences` training sentences with the fp32 graphs first, unless `feeds`
    (from `calibration_for`) are given.
    """
    from labkit.config import Preset
    from labkit.export import ensure_onnx

    preset = Preset.from_name(preset) if isinstance(preset, str) else preset
    budget = budget_for(preset.name)
    blocks = tuple(blocks or budget.blocks)
    method = method or budget.method
    out = quantized_dir(preset.name, kind, bundle_name, method)
    try:
        recipe = recipe_of(out)
        if recipe and recipe["blocks"] == list(blocks) and (kind == "dynamic" or recipe["method"] == method):
            return out
    except (FileNotFoundError, ValueError):
        pass
    src = ensure_onnx(preset, bundle_name)
    if kind == "qdq" and feeds is None:
        feeds = calibration_for(src, preset, budget)
    return quantize_dir(src, out, kind, blocks, feeds=feeds, method=method, percentile=budget.percentile)


def calibration_for(onnx_dir: Path | str, preset, budget: QuantBudget | None = None) -> dict[str, list[dict]]:
    """Calibration feeds from the preset's training sentences, decoded as the preset decodes."""
    from labkit.data import load_split
    from labkit.pipeline import decode_config

    budget = budget or budget_for(preset.name)
    texts = [p.zh for p in load_split("train", limit=budget.calibration_sentences)]
    return calibration_feeds(onnx_dir, _tokenizer_for(preset), texts, decode_config(preset),
                             batch=budget.calibration_batch, keep_every=budget.keep_every, threads=1)


def _tokenizer_for(preset):
    from labkit.models import load_teacher

    # Every preset's model shares the teacher's tokenizer except a hub Marian model.
    if preset.model.kind == "marian":
        from transformers import MarianTokenizer

        return MarianTokenizer.from_pretrained(preset.model.name_or_path)
    return load_teacher().tokenizer


# --------------------------------------------------------------------------- plots


def plot_sensitivity(rows: list[dict]):
    """Grouped bars per block: BLEU lost and % of sentences whose tokens changed, vs fp32."""
    import plotly.graph_objects as go

    ref = next(r for r in rows if r["block"] == "none")
    blocks = [r for r in rows if r["block"] != "none"]
    names = [r["block"] for r in blocks]
    fig = go.Figure([go.Bar(name="BLEU drop", x=names, y=[ref["bleu"] - r["bleu"] for r in blocks]),
                     go.Bar(name="% sentences changed", x=names, y=[100 * (1 - r["agreement"]) for r in blocks])])
    fig.update_layout(title="INT8 sensitivity: one block type quantized at a time (dynamic, per-channel)",
                      barmode="group", xaxis_title="quantized block", yaxis_title="vs fp32")
    return fig
