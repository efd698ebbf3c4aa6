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
PyTorch module path each exporter records for a node). The default blocks are
measured, not assumed: `ensure_blocks` quantizes one block type at a time with
the shipped dynamic pipeline (optimizer, untie, per-channel int8), keeps the
blocks whose BLEU cost alone stays within the gate, and stores the table and the
choice next to the export (`int8-blocks-<bundle>.json`); `ensure_quantized`
reads it. Speed-only presets (random weights, BLEU meaningless) measure nothing
and use DESIGN's default, `BODY_BLOCKS`. Only weight MatMuls (and, if asked, the
embedding Gather) are quantized: attention-score MatMuls multiply two
activations and stay float. The tied LM head is a Gemm on the embedding matrix
after export; `untie_lm_head` gives it its own transposed copy as a MatMul, the
form the dynamic quantizer handles (it has no Gemm kernel) and that keeps the
embedding lookup independent of the head's precision.

Every int8 copy is checked against the fp32 graphs it was made from before
anyone times it (`variant_gate`): BLEU drop <= MAX_BLEU_DROP on quality presets,
token agreement at the forced length on speed-only presets. A copy records the
digest of its parent's sidecar, so a re-export (a retrained teacher) rebuilds it.

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

from labkit.artifacts import write_json_atomic
from labkit.export import size_mb as export_size_mb  # graph files + external data, MiB

BLOCKS = ("encoder-self-attn", "decoder-self-attn", "cross-attn", "ffn", "lm-head", "embeddings")
KINDS = ("dynamic", "qdq")
METHODS = ("minmax", "entropy", "percentile")
SCOPE_KEY = "pkg.torch.onnx.name_scopes"  # the dynamo exporter's module path per node
MAX_BLEU_DROP = 1.0  # the gate: an int8 variant losing more than this vs its fp32 parent failed
MIN_FP32_AGREEMENT = 0.95  # a float32 engine reproduces its parent's greedy tokens (a rare near-tie may flip)
# Speed-only presets: random weights make BLEU meaningless, so int8 is held to its parent's tokens at the
# forced length; the random parent repeats a token or two, so this catches broken graphs, not lost quality.
MIN_SPEED_AGREEMENT = 0.9
# DESIGN: "Start with MatMul only; keep embeddings/LM head in float unless measured safe".
BODY_BLOCKS = ("encoder-self-attn", "decoder-self-attn", "cross-attn", "ffn")
BLOCKS_SCHEMA = "labkit.int8-blocks/1"
ALL_BLOCKS_BASIS = ("every block, LM head and embeddings included: labkit bench's ort-int8-all, to show what "
                    "the float LM head costs; its gate says how far it was checked")


@dataclass(frozen=True)
class QuantBudget:
    calibration_sentences: int  # training sentences decoded by the fp32 graphs to record calibration feeds
    calibration_batch: int  # sentences per calibration batch
    keep_every: int  # keep every k-th decoder-with-past feed (bounds calibration memory and time)
    eval_sentences: int  # test sentences every gate and the sensitivity study score (quality presets)
    method: str = "minmax"  # default calibration method of the qdq recipe
    methods: tuple[str, ...] = METHODS  # compared in notebook 05 (entropy costs ~1 min per recipe)
    percentile: float = 99.999  # for method "percentile"
    # engines notebook 05 times in their own processes (labkit.benchmark variants); each costs a
    # process start and a model load, so ci times the dynamic recipe against its parent and the peer
    bench_variants: tuple[str, ...] = ("ort-fp32", "ort-int8", "ort-int8-qdq", "ct2-fp32", "ct2-int8")


QUANT_BUDGETS = {
    "ci": QuantBudget(calibration_sentences=32, calibration_batch=16, keep_every=4, eval_sentences=48,
                      methods=("minmax", "percentile"), bench_variants=("ort-fp32", "ort-int8", "ct2-int8")),
    "workshop": QuantBudget(calibration_sentences=256, calibration_batch=16, keep_every=2, eval_sentences=500),
    "opus-mt-zh-en": QuantBudget(calibration_sentences=128, calibration_batch=8, keep_every=4, eval_sentences=300),
    "opus-mt-shape": QuantBudget(calibration_sentences=16, calibration_batch=8, keep_every=8, eval_sentences=0,
                                 methods=("minmax",)),
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


def quantize_dir(onnx_dir: Path | str, out: Path | str, kind: str = "dynamic", blocks: Iterable[str] = BODY_BLOCKS,
                 feeds: dict[str, list[dict]] | None = None, method: str = "minmax", percentile: float = 99.999,
                 optimize: bool = True, blocks_basis: str | None = None) -> Path:
    """A quantized copy of an export directory (atomic, sidecar says what was done).

    kind 'dynamic' needs nothing else; kind 'qdq' needs `feeds` from `calibration_feeds`.
    The recipe records the parent's sidecar digest (`sidecar_digest`) and why these blocks
    (`blocks_basis`), so `ensure_quantized` can tell a stale copy and the ledger can say.
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
              "blocks_basis": blocks_basis, "parent_sidecar_sha256": sidecar_digest(onnx_dir),
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


def sidecar_digest(directory: Path | str) -> str:
    """sha256 of an export directory's sidecar: the identity of that exact export.

    The sidecar holds every file's size, the exporters, the source bundle's metadata and the
    parity result, so any re-export gets a new digest and the copies derived from it rebuild.
    """
    import hashlib

    from labkit.export import SIDECAR

    return hashlib.sha256((Path(directory) / SIDECAR).read_bytes()).hexdigest()


def _made_with(directory: Path | str, settings: dict) -> bool:
    """Whether `directory` holds a readable int8 copy whose recipe has every one of `settings`."""
    try:
        recipe = recipe_of(directory)
    except (FileNotFoundError, ValueError):
        return False
    return bool(recipe) and all(recipe.get(k) == v for k, v in settings.items())


# --------------------------------------------------------------------------- evaluation and the gate


def gate_pairs(preset) -> list:
    """The sentences every gate and the sensitivity study score, the same for parent and variant.

    Quality presets: the first QuantBudget.eval_sentences of the evaluation subset. Speed-only
    presets: the bench sentences without references (no BLEU; token agreement still counts).
    """
    from labkit.data import Pair
    from labkit.evaluate import bench_texts, eval_pairs

    if preset.quality:
        return eval_pairs(preset)[: budget_for(preset.name).eval_sentences]
    return [Pair(t, "") for t in bench_texts(preset)]


def evaluate_translator(translator, preset, pairs, reference_ids: list[list[int]] | None = None) -> dict:
    """Translate `pairs` with any Translator-shaped engine: {bleu, chrf, bleu_signature, agreement, ids}.

    BLEU and chrF are None on speed-only presets (random weights, no references). `agreement`
    is the share of sentences whose ids equal `reference_ids` (None without them): a finer
    signal than BLEU when a change flips a few tokens.
    """
    from labkit.evaluate import agreement, score
    from labkit.runtime import translate_ids

    ids, hyps = translate_ids(translator, [p.zh for p in pairs], preset.batch_size)
    scores = score(hyps, [p.en for p in pairs]).as_metrics() if preset.quality else \
        {"bleu": None, "chrf": None, "bleu_signature": None}
    return {**scores, "agreement": None if reference_ids is None else agreement(ids, reference_ids), "ids": ids}


def evaluate_dir(directory: Path | str, bundle, preset, pairs, reference_ids: list[list[int]] | None = None,
                 threads: int = 1) -> dict:
    """`evaluate_translator` over the graphs in `directory` (tokenizer from `bundle`).

    One thread by default: this is a quality check, and a spinning two-thread pool on a shared
    machine only makes it slower.
    """
    from labkit.runtime import translator

    return evaluate_translator(translator(directory, bundle, preset, threads=threads), preset, pairs, reference_ids)


def bleu_gate(bleu: float, parent_bleu: float, max_drop: float = MAX_BLEU_DROP, parent: str = "the fp32 parent",
              agreement: float | None = None, n: int | None = None) -> dict:
    """The int8 gate on quality presets: {'name': 'bleu-drop<=1.0', 'passed': drop <= 1.0, 'detail': ...}.

    bleu 30.4, parent_bleu 31.5 -> drop 1.1 -> passed False.
    """
    drop = parent_bleu - bleu
    detail = f"BLEU {bleu:.2f} vs {parent} {parent_bleu:.2f}: drop {drop:.2f} (max {max_drop})"
    if agreement is not None:
        detail += f"; token ids identical to {parent}'s on {round(agreement * n)}/{n} sentences"
    return {"name": f"bleu-drop<={max_drop}", "passed": bool(drop <= max_drop), "detail": detail}


def agreement_gate(agreement: float, minimum: float, n: int, parent: str = "the fp32 parent", note: str = "") -> dict:
    """A token-agreement gate: agreement 47/48, minimum 0.95 ->
    {'name': 'agreement>=0.95', 'passed': True, 'detail': "token ids identical to torch's on 47/48 sentences ..."}.
    """
    detail = f"token ids identical to {parent}'s on {round(agreement * n)}/{n} sentences (min {minimum:.0%})"
    return {"name": f"agreement>={minimum}", "passed": bool(agreement >= minimum),
            "detail": detail + (f"; {note}" if note else "")}


def variant_gate(result: dict, parent: dict, precision: str, preset, parent_name: str = "the fp32 parent") -> dict:
    """Gate an optimized variant against its parent; both are `evaluate_translator` results on `gate_pairs`.

    fp32 (a conversion, e.g. CTranslate2 float32): its tokens must equal the parent's
    (agreement >= MIN_FP32_AGREEMENT). int8 on quality presets: BLEU drop <= MAX_BLEU_DROP.
    int8 on speed-only presets: agreement >= MIN_SPEED_AGREEMENT at the forced length, and the
    detail says how little that proves (how many distinct tokens the random parent emits).
    """
    from labkit.evaluate import agreement

    same, n = agreement(result["ids"], parent["ids"]), len(parent["ids"])
    if precision == "fp32":
        return agreement_gate(same, MIN_FP32_AGREEMENT, n, parent_name)
    if preset.quality:
        return bleu_gate(result["bleu"], parent["bleu"], MAX_BLEU_DROP, parent_name, agreement=same, n=n)
    distinct = len({t for row in parent["ids"] for t in row})
    note = (f"speed-only preset (random weights, no BLEU): greedy forced to {preset.forced_length} tokens; the "
            f"parent's output holds {distinct} distinct token(s), so this catches a broken graph, not lost quality")
    return agreement_gate(same, MIN_SPEED_AGREEMENT, n, parent_name, note)


def sensitivity(onnx_dir: Path | str, bundle, preset, pairs, work: Path | str, blocks: Iterable[str] = BLOCKS,
                kind: str = "dynamic", feeds=None, reference: dict | None = None, optimize: bool = True) -> list[dict]:
    """Quantize one block type at a time and score it: [{block, nodes, bleu, chrf, agreement, size_mb}, ...].

    The first row, block 'none', is the fp32 graphs (`reference`, an `evaluate_dir` result, if
    given), against which agreement is counted. `optimize` runs ORT's transformer optimizer
    first, as the shipped dynamic recipe does: its fusions (Add+LayerNorm, the folded LM head)
    change the float arithmetic around the quantized MatMuls, so the choice is measured on the
    graphs that will ship.
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


def blocks_path(preset: str, bundle_name: str = "teacher") -> Path:
    """Where ensure_blocks keeps its measurement: <artifacts>/<preset>/int8-blocks-<bundle_name>.json."""
    from labkit.artifacts import preset_dir

    return preset_dir(preset) / f"int8-blocks-{bundle_name}.json"


def read_blocks(path: Path | str) -> dict | None:
    """A stored block choice; None when missing, corrupt or of another schema (it is measured again)."""
    try:
        record = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("schema") == BLOCKS_SCHEMA else None


def measure_blocks(onnx_dir: Path | str, bundle, preset, max_drop: float = MAX_BLEU_DROP,
                   reference: dict | None = None) -> dict:
    """`sensitivity` on the gate sentences and `choose_blocks`: the record `ensure_blocks` stores.

    `reference`: the fp32 graphs' `evaluate_dir` result on the same sentences, when the caller has it."""
    from labkit.artifacts import preset_dir

    pairs = gate_pairs(preset)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=preset_dir(preset.name), prefix=".int8-sensitivity-") as work:
        rows = sensitivity(onnx_dir, bundle, preset, pairs, work, reference=reference)
    return {"schema": BLOCKS_SCHEMA, "blocks": list(choose_blocks(rows, max_drop)),
            "basis": f"measured: each block alone within {max_drop} BLEU of the fp32 graphs on {len(pairs)} test "
                     "sentences (dynamic recipe, ORT optimizer on); together they face the gate again",
            "max_bleu_drop": max_drop, "eval_sentences": len(pairs), "kind": "dynamic", "optimize": True,
            "parent_sidecar_sha256": sidecar_digest(onnx_dir), "rows": rows,
            "seconds": round(time.perf_counter() - start, 1)}


def ensure_blocks(preset, bundle_name: str = "teacher", bundle=None, reference: dict | None = None) -> dict:
    """The dynamic recipe's default blocks for `bundle_name`'s export: {blocks, basis, rows, ...}.

    Quality presets: measured once per export by `measure_blocks` (six quantize-and-score
    rounds; the record keeps how many seconds they took), stored at `blocks_path`, and measured
    again when the export changes (sidecar digest) or the gate does. Speed-only presets have
    nothing to measure (random weights): BODY_BLOCKS, DESIGN's default, with rows None.
    `reference`: the fp32 graphs scored on `gate_pairs(preset)`, when the caller has them already.
    """
    from labkit.config import Preset
    from labkit.artifacts import bundle_for
    from labkit.export import ensure_onnx

    preset = Preset.from_name(preset) if isinstance(preset, str) else preset
    if not preset.quality:
        return {"schema": BLOCKS_SCHEMA, "blocks": list(BODY_BLOCKS), "rows": None,
                "basis": "default, not measured (speed-only preset: random weights make BLEU meaningless): the "
                         "body's weight MatMuls; embeddings and LM head stay float"}
    bundle = bundle if bundle is not None else bundle_for(preset.name, bundle_name)
    src = ensure_onnx(preset, bundle_name, bundle=bundle)
    path = blocks_path(preset.name, bundle_name)
    stored = read_blocks(path)
    wanted = {"parent_sidecar_sha256": sidecar_digest(src), "max_bleu_drop": MAX_BLEU_DROP,
              "eval_sentences": len(gate_pairs(preset)), "kind": "dynamic", "optimize": True}
    if stored and all(stored.get(k) == v for k, v in wanted.items()):
        return stored
    record = measure_blocks(src, bundle, preset, reference=reference)
    write_json_atomic(path, record)
    return record


def quantized_dir(preset: str, kind: str, bundle_name: str = "teacher", method: str | None = None,
                  tag: str = "") -> Path:
    """Where ensure_quantized keeps a recipe: <artifacts>/<preset>/onnx-<bundle_name>-int8-<kind>[-<tag>].

    A qdq copy calibrated with a method other than the preset's default gets a '-<method>' suffix,
    so comparing methods never replaces the kept artifact; `tag` names a copy with other blocks
    ("all": every block), so it never replaces the default recipe either.
    """
    from labkit.artifacts import preset_dir

    suffix = f"-{method}" if kind == "qdq" and method and method != budget_for(preset).method else ""
    return preset_dir(preset) / f"onnx-{bundle_name}-int8-{kind}{suffix}{f'-{tag}' if tag else ''}"


def ensure_quantized(preset, kind: str = "dynamic", bundle_name: str = "teacher", blocks: Iterable[str] | None = None,
                     method: str | None = None, feeds: dict[str, list[dict]] | None = None, bundle=None,
                     tag: str = "", basis: str | None = None) -> Path:
    """The preset's int8 copy of `bundle_name`'s export, built if missing, stale or made otherwise.

    Blocks default to `ensure_blocks` (measured on quality presets), the calibration method to
    the preset's QuantBudget. A copy is reused only if it was made from the current export
    (`ensure_onnx` re-exports a changed bundle; the copy's recipe holds the digest of the sidecar
    it was made from) with the same kind, blocks, method and optimizer setting. The qdq recipe
    decodes `calibration_sentences` training sentences with the fp32 graphs first, unless `feeds`
    (from `calibration_for`) are given; `bundle` when it is already loaded. AssertionError when
    no block type is int8-safe. Caller-chosen `blocks` go in a copy named by `tag`, with `basis`
    saying why they were chosen.
    """
    from labkit.config import Preset
    from labkit.artifacts import bundle_for
    from labkit.export import ensure_onnx

    preset = Preset.from_name(preset) if isinstance(preset, str) else preset
    budget = budget_for(preset.name)
    bundle = bundle if bundle is not None else bundle_for(preset.name, bundle_name)
    src = ensure_onnx(preset, bundle_name, bundle=bundle)
    if blocks is None:
        choice = ensure_blocks(preset, bundle_name, bundle)
        blocks, basis = tuple(choice["blocks"]), choice["basis"]
    else:
        blocks, basis = tuple(blocks), basis or "chosen by the caller"
    if not blocks:
        raise AssertionError(f"no block type stays within {MAX_BLEU_DROP} BLEU of fp32 on its own "
                             f"({blocks_path(preset.name, bundle_name)}): nothing of {bundle_name} is int8-safe")
    method = method or budget.method
    out = quantized_dir(preset.name, kind, bundle_name, method, tag)
    settings = {"kind": kind, "blocks": list(blocks), "method": method if kind == "qdq" else None,
                "ort_optimizer": kind == "dynamic", "parent_sidecar_sha256": sidecar_digest(src)}
    if _made_with(out, settings):
        return out
    if kind == "qdq" and feeds is None:
        feeds = calibration_for(src, preset, budget)
    return quantize_dir(src, out, kind, blocks, feeds=feeds, method=method, percentile=budget.percentile,
                        blocks_basis=basis)


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
    fig.update_layout(title="INT8 sensitivity: one block type quantized at a time (dynamic, per-channel, optimized)",
                      barmode="group", xaxis_title="quantized block", yaxis_title="vs fp32")
    return fig
