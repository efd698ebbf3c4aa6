"""INT8 post-training quantization of the exported graphs with ONNX Runtime.

Two recipes over a `labkit.engines.onnx_export` directory, each producing a directory that
`labkit.engines.ort.OrtStepper.from_dir` runs unchanged:

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
anyone times it (`labkit.measure.gates.variant_gate`): BLEU drop <= MAX_BLEU_DROP on quality presets,
token agreement at the forced length on speed-only presets. A copy records the
digest of its parent's sidecar, so a re-export (a retrained teacher) rebuilds it.

Left out: quantization-aware training, int4/fp8, SmoothQuant-style rescaling,
and mixed per-layer recipes finer than a block type.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from labkit.config import Preset, QuantBudget
from labkit.core.artifacts import ensure, preset_dir, read_json, staging, write_json_atomic
from labkit.core.bundle import Bundle, bundle_key, load_teacher
from labkit.core.data import Pair, load_split
from labkit.core.decode import decode
from labkit.core.translator import decode_config
from labkit.engines.onnx_blocks import BLOCKS, BODY_BLOCKS, _untie_file, ort_optimize, weight_nodes
from labkit.engines.onnx_export import derive_into, ensure_onnx
from labkit.engines.onnx_graphs import SIDECAR, read_sidecar
from labkit.engines.onnx_graphs import size_mb as export_size_mb
from labkit.engines.ort import OrtStepper, load_sessions, translate_ids, translator
from labkit.measure.gates import MAX_BLEU_DROP
from labkit.measure.quality import agreement, bench_texts, eval_pairs, score
from labkit.measure.replay import measurement

KINDS = ("dynamic", "qdq")
METHODS = ("minmax", "entropy", "percentile")
BLOCKS_SCHEMA = "labkit.int8-blocks/1"
ALL_BLOCKS_BASIS = ("every block, LM head and embeddings included: labkit bench's ort-int8-all, to show what "
                    "the float LM head costs; its gate says how far it was checked")


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


def quantize_into(onnx_dir: Path | str, out: Path, kind: str = "dynamic", blocks: Iterable[str] = BODY_BLOCKS,
                  feeds: dict[str, list[dict]] | None = None, method: str = "minmax", percentile: float = 99.999,
                  optimize: bool = True, blocks_basis: str | None = None) -> None:
    """A quantized copy of an export directory, written into the (staging) directory `out`; its sidecar says
    what was done.

    kind 'dynamic' needs nothing else; kind 'qdq' needs `feeds` from `calibration_feeds`.
    The recipe records the parent's sidecar digest (`sidecar_digest`) and why these blocks
    (`blocks_basis`), so `ensure_quantized` can tell a stale copy and the ledger can say.
    """

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "qdq" and not feeds:
        raise ValueError("static QDQ quantization needs calibration feeds (labkit.engines.ort_int8.calibration_feeds)")
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

    derive_into(onnx_dir, out, transform, precision="int8", parity=None, quantization=recipe)


def quantize_dir(onnx_dir: Path | str, out: Path | str, kind: str = "dynamic", blocks: Iterable[str] = BODY_BLOCKS,
                 **options) -> Path:
    """`quantize_into` a fresh directory committed atomically to `out` (options as there)."""
    with staging(out) as tmp:
        quantize_into(onnx_dir, tmp, kind, blocks, **options)
    return Path(out)


def recipe_of(directory: Path | str) -> dict | None:

    return read_sidecar(directory).get("quantization")


def sidecar_digest(directory: Path | str) -> str:
    """sha256 of an export directory's sidecar: the identity of that exact export.

    The sidecar holds every file's size, the exporters, the source bundle's metadata and the
    parity result, so any re-export gets a new digest and the copies derived from it rebuild.
    """
    import hashlib


    return hashlib.sha256((Path(directory) / SIDECAR).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- evaluation and the gate


def gate_pairs(preset) -> list:
    """The sentences every gate and the sensitivity study score, the same for parent and variant.

    Quality presets: the first QuantBudget.eval_sentences of the evaluation subset. Speed-only
    presets: the bench sentences without references (no BLEU; token agreement still counts).
    """

    if preset.quality:
        return eval_pairs(preset)[: preset.quant.eval_sentences]
    return [Pair(t, "") for t in bench_texts(preset)]


@measurement
def evaluate_translator(translator, preset, pairs, reference_ids: list[list[int]] | None = None) -> dict:
    """Translate `pairs` with any Translator-shaped engine: {bleu, chrf, bleu_signature, agreement, ids}.

    BLEU and chrF are None on speed-only presets (random weights, no references). `agreement`
    is the share of sentences whose ids equal `reference_ids` (None without them): a finer
    signal than BLEU when a change flips a few tokens.
    """

    ids, hyps = translate_ids(translator, [p.zh for p in pairs], preset.batch_size)
    scores = score(hyps, [p.references for p in pairs]).as_metrics() if preset.quality else \
        {"bleu": None, "chrf": None, "bleu_signature": None}
    return {**scores, "agreement": None if reference_ids is None else agreement(ids, reference_ids), "ids": ids}


@measurement
def evaluate_dir(directory: Path | str, bundle, preset, pairs, reference_ids: list[list[int]] | None = None,
                 threads: int = 1) -> dict:
    """`evaluate_translator` over the graphs in `directory` (tokenizer from `bundle`).

    One thread by default: this is a quality check, and a spinning two-thread pool on a shared
    machine only makes it slower.
    """

    return evaluate_translator(translator(directory, bundle, preset, threads=threads), preset, pairs, reference_ids)


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


BLOCKS_SIDECAR = "blocks.json"


def blocks_path(preset: str, bundle_name: str = "teacher") -> Path:
    """Where ensure_blocks keeps its measurement: <artifacts>/<preset>/int8-blocks-<bundle_name>/blocks.json."""
    return preset_dir(preset) / f"int8-blocks-{bundle_name}" / BLOCKS_SIDECAR


def measure_blocks(onnx_dir: Path | str, bundle, preset, max_drop: float = MAX_BLEU_DROP,
                   reference: dict | None = None) -> dict:
    """`sensitivity` on the gate sentences and `choose_blocks`: the record `ensure_blocks` stores.

    `reference`: the fp32 graphs' `evaluate_dir` result on the same sentences, when the caller has it."""
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


def ensure_blocks(preset: Preset, bundle: Bundle, reference: dict | None = None) -> dict:
    """The dynamic recipe's default blocks for `bundle`'s export: {blocks, basis, rows, ...}.

    Quality presets: measured once per export by `measure_blocks` (six quantize-and-score rounds;
    the record keeps how many seconds they took) and measured again exactly when the export
    (its sidecar digest), the gate or the gate sentences change. Speed-only presets have nothing
    to measure (random weights): BODY_BLOCKS, DESIGN's default, with rows None.
    `reference`: the fp32 graphs scored on `gate_pairs(preset)`, when the caller has them already.
    """
    if not preset.quality:
        return {"schema": BLOCKS_SCHEMA, "blocks": list(BODY_BLOCKS), "rows": None,
                "basis": "default, not measured (speed-only preset: random weights make BLEU meaningless): the "
                         "body's weight MatMuls; embeddings and LM head stay float"}
    src = ensure_onnx(preset, bundle)
    path = blocks_path(preset.name, bundle_key(bundle))
    recipe = {"parent_sidecar_sha256": sidecar_digest(src), "max_bleu_drop": MAX_BLEU_DROP,
              "eval_sentences": len(gate_pairs(preset)), "kind": "dynamic", "optimize": True}
    build = lambda tmp: write_json_atomic(tmp / BLOCKS_SIDECAR, measure_blocks(src, bundle, preset, reference=reference))  # noqa: E731
    return read_json(ensure(path.parent, BLOCKS_SIDECAR, recipe, build) / BLOCKS_SIDECAR)


def quantized_dir(preset: str, kind: str, bundle_name: str = "teacher", method: str | None = None,
                  tag: str = "") -> Path:
    """Where ensure_quantized keeps a recipe: <artifacts>/<preset>/onnx-<bundle_name>-int8-<kind>[-<tag>].

    A qdq copy calibrated with a method other than the preset's default gets a '-<method>' suffix,
    so comparing methods never replaces the kept artifact; `tag` names a copy with other blocks
    ("all": every block), so it never replaces the default recipe either.
    """
    suffix = f"-{method}" if kind == "qdq" and method and method != Preset.from_name(preset).quant.method else ""
    return preset_dir(preset) / f"onnx-{bundle_name}-int8-{kind}{suffix}{f'-{tag}' if tag else ''}"


def ensure_quantized(preset: Preset, bundle: Bundle, kind: str = "dynamic", blocks: Iterable[str] | None = None,
                     method: str | None = None, feeds: dict[str, list[dict]] | None = None,
                     tag: str = "", basis: str | None = None) -> Path:
    """The preset's int8 copy of `bundle`'s export, built again exactly when its recipe changes.

    Blocks default to `ensure_blocks` (measured on quality presets), the calibration method to
    the preset's QuantBudget. The recipe holds the digest of the export's sidecar (`ensure_onnx`
    re-exports a changed bundle), the kind, blocks, method, percentile, calibration budget and
    optimizer setting. The qdq recipe decodes `calibration_sentences` training sentences with the
    fp32 graphs first, unless `feeds` (from `calibration_for`) are given. AssertionError when no
    block type is int8-safe. Caller-chosen `blocks` go in a copy named by `tag`, with `basis`
    saying why they were chosen.
    """
    budget = preset.quant
    src = ensure_onnx(preset, bundle)
    if blocks is None:
        choice = ensure_blocks(preset, bundle)
        blocks, basis = tuple(choice["blocks"]), choice["basis"]
    else:
        blocks, basis = tuple(blocks), basis or "chosen by the caller"
    if not blocks:
        raise AssertionError(f"no block type stays within {MAX_BLEU_DROP} BLEU of fp32 on its own "
                             f"({blocks_path(preset.name, bundle_key(bundle))}): nothing of {bundle.name} is int8-safe")
    method = method or budget.method
    out = quantized_dir(preset.name, kind, bundle_key(bundle), method, tag)
    qdq = kind == "qdq"
    recipe = {"kind": kind, "blocks": list(blocks), "basis": basis, "ort_optimizer": kind == "dynamic",
              "parent_sidecar_sha256": sidecar_digest(src), "method": method if qdq else None,
              "percentile": budget.percentile if qdq and method == "percentile" else None,
              "calibration": [budget.calibration_sentences, budget.calibration_batch, budget.keep_every] if qdq else None}

    def build(tmp: Path) -> None:
        calibration = calibration_for(src, preset, budget) if qdq and feeds is None else feeds
        quantize_into(src, tmp, kind, blocks, feeds=calibration, method=method, percentile=budget.percentile,
                      blocks_basis=basis)

    return ensure(out, SIDECAR, recipe, build)


def ensure_per_token(preset: Preset, bundle: Bundle) -> Path:
    """The dynamic int8 copy with one activation scale per token (`per_token_activations`): the same weights
    as `ensure_quantized(preset, bundle, "dynamic")`, answers that do not depend on the batch.

        ensure_per_token(Preset.from_name("ci"), teacher)   # artifacts/ci/onnx-teacher-int8-dynamic-token
    """
    src = ensure_quantized(preset, bundle, "dynamic")
    out = src.with_name(src.name + "-token")
    parent = recipe_of(src) or {}
    recipe = {"parent_sidecar_sha256": sidecar_digest(src), "activations": "uint8 dynamic, one scale per token"}
    counts: dict[str, int] = {}  # file -> nodes rewritten, filled before derive_into writes the sidecar

    def rewrite(a: Path, b: Path) -> None:
        counts[a.name] = per_token_activations(a, b)

    def build(tmp: Path) -> None:
        derive_into(src, tmp, rewrite, quantization={**parent, "activations": recipe["activations"], "per_token": True,
                                                     "per_token_rewrites": counts})

    return ensure(out, SIDECAR, recipe, build)


def calibration_for(onnx_dir: Path | str, preset, budget: QuantBudget | None = None) -> dict[str, list[dict]]:
    """Calibration feeds from the preset's training sentences, decoded as the preset decodes."""

    budget = budget or preset.quant
    texts = [p.zh for p in load_split("train", limit=budget.calibration_sentences)]
    return calibration_feeds(onnx_dir, _tokenizer_for(preset), texts, decode_config(preset),
                             batch=budget.calibration_batch, keep_every=budget.keep_every, threads=1)


def _tokenizer_for(preset):

    # Every preset's model shares the teacher's tokenizer except a hub Marian model.
    if preset.model.kind == "marian":
        from transformers import MarianTokenizer

        return MarianTokenizer.from_pretrained(preset.model.name_or_path)
    return load_teacher().tokenizer


# --------------------------------------------------------------------------- per-token activation scales


def per_token_activations(src: Path, dst: Path) -> int:
    """Rewrite a dynamically quantized graph so every activation gets one scale per token, not per tensor.

    `quantize_dynamic` quantizes a MatMul's input with DynamicQuantizeLinear: one uint8 scale and zero
    point for the whole tensor, i.e. for every sentence in the batch at once, so a sentence's answer
    depends on its batch mates. Here each DynamicQuantizeLinear becomes the same arithmetic over the last
    axis only (ReduceMin/ReduceMax per token, range widened to include 0, scale = range / 255), and
    since MatMulInteger takes only a scalar input zero point, the zero point is subtracted after it:
    (x_q - zp) @ W = x_q @ W - zp * colsum(W). Nothing mixes tokens any more, so nothing mixes
    sentences. Returns the number of DynamicQuantizeLinear nodes rewritten.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    added_consts: set[str] = set()

    def const(name: str, value: np.ndarray) -> str:
        if name not in added_consts:
            graph.initializer.append(numpy_helper.from_array(value, name))
            added_consts.add(name)
        return name

    zero, top = const("pt/zero", np.array(0.0, np.float32)), const("pt/255", np.array(255.0, np.float32))
    eps, axes = const("pt/eps", np.array(1e-12, np.float32)), const("pt/last_axis", np.array([-1], np.int64))
    after_cast: dict[str, list] = {}  # Cast node name -> nodes that must follow it
    out_nodes, count = [], 0

    def op(kind, inputs, out, **attrs):
        out_nodes.append(helper.make_node(kind, inputs, [out], name=f"pt/{out}", **attrs))
        return out

    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            out_nodes.append(node)
            out_nodes += after_cast.pop(node.name, [])
            continue
        count += 1
        x, (xq, xs, _xzp) = node.input[0], node.output
        p = f"pt{count}"
        lo = op("Min", [op("ReduceMin", [x, axes], f"{p}_min", keepdims=1), zero], f"{p}_lo")
        hi = op("Max", [op("ReduceMax", [x, axes], f"{p}_max", keepdims=1), zero], f"{p}_hi")
        op("Max", [op("Div", [op("Sub", [hi, lo], f"{p}_range"), top], f"{p}_s"), eps], xs)
        zp = op("Clip", [op("Round", [op("Div", [op("Neg", [lo], f"{p}_neg"), xs], f"{p}_zq")], f"{p}_zr"), zero, top],
                f"{p}_zp")
        shifted = op("Add", [op("Round", [op("Div", [x, xs], f"{p}_xd")], f"{p}_xr"), zp], f"{p}_xs")
        op("Cast", [op("Clip", [shifted, zero, top], f"{p}_xc")], xq, to=TensorProto.UINT8)
        for mm in consumers.get(xq, []):
            if mm.op_type != "MatMulInteger":
                raise ValueError(f"{src.name}: {mm.name} ({mm.op_type}) reads {xq}; only MatMulInteger is rewritten")
            w = numpy_helper.to_array(inits[mm.input[1]]).astype(np.int64)
            w_zp = numpy_helper.to_array(inits[mm.input[3]]).astype(np.int64) if len(mm.input) > 3 and mm.input[3] else 0
            colsum = const(f"{mm.name or mm.output[0]}/colsum", (w - w_zp).sum(0).astype(np.float32))
            mm.input[2] = ""  # input zero point 0: subtracted below instead
            (cast,) = [c for c in consumers[mm.output[0]] if c.op_type == "Cast"]
            out = cast.output[0]
            cast.output[0] = f"{out}/raw"
            after_cast[cast.name] = [
                helper.make_node("Mul", [zp, colsum], [f"{out}/zp_term"], name=f"{cast.name}/zp_term"),
                helper.make_node("Sub", [f"{out}/raw", f"{out}/zp_term"], [out], name=f"{cast.name}/zp_fix")]
    if after_cast:
        raise ValueError(f"{src.name}: Cast nodes {sorted(after_cast)} not found after their MatMulInteger")
    del graph.node[:]
    graph.node.extend(out_nodes)
    onnx.save_model(model, str(dst))
    return count
