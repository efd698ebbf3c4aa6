"""TensorRT-ready graphs made on the CPU: an fp16 mixed-precision copy and an int8 Q/DQ copy of an export.

TensorRT >= 10 builds *strongly typed* networks: every tensor keeps the type the ONNX graph gives it, so
precision is chosen here, in the graph, not with builder flags (BuilderFlag.FP16/INT8 and calibrators are
deprecated in 10 and gone in 11). Two copies of a labkit ONNX directory, each runnable by OrtStepper:

    fp16   float16 weights and activations, except the nodes that touch a tensor *measured* to overflow
           fp16 (max |x| > 65504) or to lose its precision (> 512, where one fp16 step is >= 0.5; or
           below 2^-14 everywhere, where fp16 goes subnormal). NVIDIA ModelOpt's AutoCast converts, told
           which nodes to keep by that range table (onnxconverter-common's converter breaks these graphs).
    int8   explicit symmetric Q/DQ pairs where TensorRT fuses them (inputs of weight MatMuls), from
           ModelOpt's ONNX PTQ calibrated on the CPU provider, else labkit's own QDQ recipe (notebook 05).

    feeds = ort_int8.calibration_for(onnx_dir, preset)     # notebook 05's calibration sentences
    ranges = measure_ranges(onnx_dir, feeds)                 # max |x| of every tensor, flagged vs fp16
    make_fp16(onnx_dir, out16, keep_fp32(onnx_dir, ranges))  # e.g. {'decoder': ['node_softmax_1', ...]}
    make_int8(onnx_dir, out8, feeds)

Both keep fp32 graph inputs and outputs (`keep_io_types`), so every runtime feeds them as it feeds the
export. Left out: bf16/fp8/int4; fp16 I/O tensors (a device-resident fp16 cache would move half the
bytes); int8 graphs whose float parts are fp16 (ModelOpt's high_precision_dtype="fp16"): this int8
copy keeps fp32 around its Q/DQ pairs, which a strongly typed engine then runs in fp32.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from labkit.config import Preset
from labkit.core.artifacts import ensure, preset_dir, read_json, staging, write_json_atomic
from labkit.core.bundle import Bundle, bundle_key
from labkit.engines.onnx_blocks import BODY_BLOCKS
from labkit.engines.onnx_export import derive_into, ensure_onnx
from labkit.engines.onnx_graphs import SIDECAR, read_sidecar
from labkit.engines.ort_int8 import calibration_for, quantize_qdq_file, sidecar_digest

FP16_MAX = float(np.finfo(np.float16).max)  # 65504: anything larger becomes inf
FP16_TINY = float(np.finfo(np.float16).tiny)  # 2**-14 ~ 6.1e-5: below it fp16 is subnormal, bits are lost
DATA_MAX = 512.0  # fp16's step is 0.5 from 512 up (ModelOpt AutoCast's default data_max, same reason)
FLAGS = ("overflow", "coarse", "subnormal")  # a flagged tensor's producer and consumers stay fp32
FP16_TOOLS = ("modelopt",)  # onnxconverter-common 1.16 breaks the decoder graphs (see fp16_modelopt)
INT8_TOOLS = ("modelopt", "labkit-qdq")
INT8_METHOD = "max"  # ModelOpt's name for MinMax calibration, notebook 05's default
RANGES_SCHEMA = "labkit.trt-ranges/1"
RANGES_SIDECAR = "ranges.json"
# labkit's loop feeds the first-step decoder the start token alone, but its profile allows longer prefixes,
# and only those have a causal mask (-3.4e38 above the diagonal): it is also measured on these lengths.
COVER_TARGETS = (2, 4)


# --------------------------------------------------------------------------- primitives: ranges


def flag(max_abs: float) -> str:
    """How fp16 would hold a tensor of this max |x|: 1e5 -> 'overflow', 600 -> 'coarse',
    3e-6 -> 'subnormal', 0.0 or 4.2 -> '' (fits)."""
    if max_abs > FP16_MAX:
        return "overflow"
    if max_abs > DATA_MAX:
        return "coarse"
    if 0.0 < max_abs < FP16_TINY:
        return "subnormal"
    return ""


@dataclass(frozen=True)
class TensorRange:
    """The largest |value| one tensor of one graph took on the calibration feeds."""

    graph: str
    tensor: str
    node: str  # the node that produces it; '' for initializers
    op: str  # its op type, or 'initializer'
    max_abs: float
    flag: str  # '' or one of FLAGS


def _float_types() -> set[int]:
    import onnx

    return {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


def float_outputs(model) -> dict[str, tuple[str, str]]:
    """{tensor: (node name, op)} for every float tensor a node produces (types from shape inference)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    typed = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.output]}
    floats = _float_types()
    return {out: (node.name, node.op_type) for node in model.graph.node for out in node.output
            if out and typed.get(out) in floats}


def constant_ranges(model, graph: str) -> list[TensorRange]:
    """Ranges of the float initializers and Constant nodes (the attention mask's -3.4e38 lives here)."""
    from onnx import numpy_helper

    rows = []
    tensors = [(t, "", "initializer") for t in model.graph.initializer]
    tensors += [(a.t, n.name, "Constant") for n in model.graph.node if n.op_type == "Constant"
                for a in n.attribute if a.name == "value"]
    for tensor, node, op in tensors:
        if tensor.data_type not in _float_types():
            continue
        values = numpy_helper.to_array(tensor)
        top = float(np.abs(values).max()) if values.size else 0.0
        rows.append(TensorRange(graph, tensor.name if op == "initializer" else node, node, op, top, flag(top)))
    return rows


def graph_ranges(path: Path, graph: str, feeds: list[dict]) -> list[TensorRange]:
    """Run one fp32 graph on every feed with all its float tensors exposed; max |x| per tensor.

    ORT's optimizations are off so every tensor keeps the name it has in the file.
    """
    import onnx
    import onnxruntime as ort

    if not feeds:
        raise ValueError(f"no calibration feeds for {graph}: ranges need at least one")
    model = onnx.load(str(path))
    producers = float_outputs(model)
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in producers if t not in known)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    top = dict.fromkeys(names, 0.0)
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            if value.size:
                top[name] = max(top[name], float(np.abs(value).max()))
    rows = [TensorRange(graph, t, *producers.get(t, ("", "output")), m, flag(m)) for t, m in top.items()]
    return rows + constant_ranges(model, graph)


def covering_feeds(feeds: dict[str, list[dict]], targets: tuple[int, ...] = COVER_TARGETS) -> dict[str, list[dict]]:
    """The calibration feeds plus first-step decoder feeds whose prefix is `targets` tokens long (the start
    token repeated): a tensor that only exists for longer prefixes, like the causal mask, gets measured too."""
    longer = [{**f, "input_ids": np.repeat(f["input_ids"][:, :1], t, axis=1)} for f in feeds["decoder"][:2]
              for t in targets]
    return {**feeds, "decoder": feeds["decoder"] + longer}


def measure_ranges(onnx_dir: Path | str, feeds: dict[str, list[dict]]) -> list[TensorRange]:
    """`graph_ranges` of every graph of an export directory, on its calibration feeds (`covering_feeds`)."""
    onnx_dir = Path(onnx_dir)
    meta = read_sidecar(onnx_dir)
    feeds = covering_feeds(feeds)
    return [row for graph, name in meta["files"].items() for row in graph_ranges(onnx_dir / name, graph, feeds[graph])]


def range_table(ranges: list[TensorRange]) -> pd.DataFrame:  # noqa: F821
    """Rows per tensor, largest first: graph, tensor, node, op, max_abs, flag."""
    import pandas as pd

    return pd.DataFrame([asdict(r) for r in ranges]).sort_values("max_abs", ascending=False, ignore_index=True)


def keep_fp32(onnx_dir: Path | str, ranges: list[TensorRange]) -> dict[str, list[str]]:
    """{graph: node names that stay fp32}: the producer and every consumer of each flagged tensor.

    A consumer is kept too because fp16 would round the flagged value on its way in: the attention
    mask's -3.4e38 makes the mask Mul, the score Add and the Softmax after it stay fp32.
    """
    import onnx

    onnx_dir = Path(onnx_dir)
    meta = read_sidecar(onnx_dir)
    keep = {}
    for graph, name in meta["files"].items():
        flagged = {r.tensor for r in ranges if r.graph == graph and r.flag}
        model = onnx.load(str(onnx_dir / name), load_external_data=False)
        keep[graph] = [n.name for n in model.graph.node
                       if flagged & set(n.output) or flagged & set(n.input)]
    return keep


# --------------------------------------------------------------------------- transforms (one graph file)


@contextlib.contextmanager
def _quiet(*loggers: str, level: int = logging.ERROR):
    """ModelOpt logs every kept node at INFO, twice (its own handler and the root's)."""
    saved = {n: logging.getLogger(n).level for n in loggers}
    root = logging.getLogger()
    root_level = root.level
    for n in loggers:
        logging.getLogger(n).setLevel(level)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
        root.setLevel(root_level)


def fp16_modelopt(src: Path, dst: Path, keep: list[str]) -> None:
    """ModelOpt AutoCast: fp16 everywhere but `keep`; data_max=inf because our ranges already decided.

    The one fp16 converter here: onnxconverter-common 1.16's float16 converter, the usual fallback, breaks
    labkit's decoder graphs (with keep_io_types, a graph output that is also read inside the graph, such as
    cross_key_i, gets its in-graph readers rewired to the fp32 copy made for the output: ONNX Runtime
    refuses the types), and it leaves Cast nodes' `to` attribute at float while retyping their outputs.
    """
    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision

    with _quiet("modelopt", "modelopt.onnx", "modelopt.onnx.autocast"):
        model = convert_to_mixed_precision(str(src), low_precision_type="fp16", keep_io_types=True,
                                           nodes_to_exclude=[re.escape(n) + "$" for n in keep],
                                           data_max=np.inf, init_max=FP16_MAX, providers=["cpu"])
    onnx.save(model, str(dst))


class FeedReader:
    """ONNX Runtime's CalibrationDataReader protocol over recorded feeds, plus the get_first/rewind
    that ModelOpt's PTQ calls (it test-runs the first feed before calibrating)."""

    def __init__(self, feeds: list[dict]):
        if not feeds:
            raise ValueError("calibration needs at least one feed")
        self.feeds = feeds
        self.rewind()

    def get_next(self):
        return next(self._it, None)

    def get_first(self):
        return self.feeds[0]

    def rewind(self):
        self._it = iter(self.feeds)

    def set_range(self, start_index: int, end_index: int):
        self._it = iter(self.feeds[start_index:end_index])

    def __len__(self):
        return len(self.feeds)


def int8_modelopt(src: Path, dst: Path, feeds: list[dict]) -> None:
    """ModelOpt ONNX PTQ: symmetric int8 Q/DQ, MinMax ranges calibrated on the CPU provider.

    `dq_only`: weights are stored as int8 initializers read through DequantizeLinear (activations keep
    their Q/DQ pairs), the form TensorRT fuses into int8 kernels; the files shrink to ~40 % of fp32
    (7.7 vs 19.7 MB on the ci teacher) with the same outputs as fake-quantized fp32 weights.

    ModelOpt writes helper files next to its input, so it works on a copy in a scratch directory. Its
    loggers are silenced below CRITICAL: on a machine without a GPU it logs "Failed to get GPU count: NVML
    Shared Library Not Found" as an ERROR and carries on with the CPU provider; real failures raise.
    """
    from modelopt.onnx.quantization import quantize

    with tempfile.TemporaryDirectory() as work, _quiet("modelopt", "modelopt.onnx", level=logging.CRITICAL):
        copy = Path(work) / src.name
        shutil.copyfile(src, copy)
        quantize(str(copy), quantize_mode="int8", calibration_data_reader=FeedReader(feeds),
                 calibration_method=INT8_METHOD, calibration_eps=["cpu"], high_precision_dtype="fp32",
                 output_path=str(dst), log_level="CRITICAL", dq_only=True)  # quantize() sets its log level itself


def int8_labkit(src: Path, dst: Path, feeds: list[dict], blocks=BODY_BLOCKS) -> None:
    """Notebook 05's static QDQ recipe (ORT quantize_static, symmetric int8 weights and activations).

    The fallback where ModelOpt is missing. Not in a process where ModelOpt's PTQ has run: it patches
    onnxruntime.quantization in place, after which quantize_static misses some tensors' ranges."""
    quantize_qdq_file(src, dst, blocks, feeds, method="minmax")


# --------------------------------------------------------------------------- which tool


def _importable(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def tool_for(kind: str) -> str:
    """The converter this machine has: ModelOpt when `modelopt.onnx` imports; for int8, else notebook 05's QDQ.

    tool_for("fp16") -> "modelopt" (ImportError with the install line without it); tool_for("int8") ->
    "modelopt" | "labkit-qdq".
    """
    if kind not in ("fp16", "int8"):
        raise ValueError(f"kind must be 'fp16' or 'int8', got {kind!r}")
    module = "modelopt.onnx.autocast" if kind == "fp16" else "modelopt.onnx.quantization"
    if _importable(module):
        return "modelopt"
    if kind == "int8":
        return "labkit-qdq"
    raise ImportError("fp16 graphs need NVIDIA ModelOpt's ONNX AutoCast: pip install -e '.[graphs]' "
                      "(ModelOpt without its [onnx] extra, which would replace onnxruntime; see pyproject.toml)")


# --------------------------------------------------------------------------- directories


def fp16_into(onnx_dir: Path | str, directory: Path, keep: dict[str, list[str]], tool: str | None = None) -> dict:
    """An fp16 mixed-precision copy of an export directory, written into `directory` (a staging directory);
    `keep` says which nodes stay fp32. The sidecar's `fp16` recipe records the tool, the kept nodes and the
    parent's digest."""
    tool = tool or tool_for("fp16")
    if tool not in FP16_TOOLS:
        raise ValueError(f"fp16 tool must be one of {FP16_TOOLS}, got {tool!r}")
    graph_of = {name: graph for graph, name in read_sidecar(onnx_dir)["files"].items()}
    start = time.perf_counter()
    recipe = {"tool": tool, "keep_fp32": keep, "keep_io_types": True, "rule": _rule(),
              "parent_sidecar_sha256": sidecar_digest(onnx_dir)}

    def transform(src: Path, dst: Path) -> None:
        fp16_modelopt(src, dst, keep[graph_of[src.name]])
        recipe["seconds"] = round(time.perf_counter() - start, 1)

    return derive_into(onnx_dir, directory, transform, precision="fp16", parity=None, fp16=recipe)


def int8_into(onnx_dir: Path | str, directory: Path, feeds: dict[str, list[dict]], tool: str | None = None) -> dict:
    """An int8 explicit Q/DQ copy of an export directory, calibrated on `feeds` (per graph), written into
    `directory` (a staging directory)."""
    tool = tool or tool_for("int8")
    if tool not in INT8_TOOLS:
        raise ValueError(f"int8 tool must be one of {INT8_TOOLS}, got {tool!r}")
    graph_of = {name: graph for graph, name in read_sidecar(onnx_dir)["files"].items()}
    start = time.perf_counter()
    recipe = {"tool": tool, "format": "QDQ", "symmetric": True,
              "weights": "int8 initializers + DequantizeLinear, per channel" if tool == "modelopt" else
              "fp32 initializers + Q/DQ, per channel",
              "activations": "int8 per tensor", "method": INT8_METHOD if tool == "modelopt" else "minmax",
              "blocks": "ModelOpt's TensorRT placement" if tool == "modelopt" else list(BODY_BLOCKS),
              "calibration_feeds": {g: len(f) for g, f in feeds.items()},
              "parent_sidecar_sha256": sidecar_digest(onnx_dir)}

    def transform(src: Path, dst: Path) -> None:
        graph_feeds = feeds[graph_of[src.name]]
        (int8_modelopt if tool == "modelopt" else int8_labkit)(src, dst, graph_feeds)
        recipe["seconds"] = round(time.perf_counter() - start, 1)

    return derive_into(onnx_dir, directory, transform, precision="int8", parity=None, quantization=recipe)


def make_fp16(onnx_dir: Path | str, out: Path | str, keep: dict[str, list[str]], tool: str | None = None) -> Path:
    """`fp16_into` a fresh directory committed atomically to `out`."""
    with staging(out) as tmp:
        fp16_into(onnx_dir, tmp, keep, tool)
    return Path(out)


def make_int8(onnx_dir: Path | str, out: Path | str, feeds: dict[str, list[dict]], tool: str | None = None) -> Path:
    """`int8_into` a fresh directory committed atomically to `out`."""
    with staging(out) as tmp:
        int8_into(onnx_dir, tmp, feeds, tool)
    return Path(out)


def _rule() -> str:
    return (f"a node stays fp32 when a tensor it produces or reads had max |x| > {DATA_MAX:g} (fp16 step >= 0.5; "
            f"> {FP16_MAX:g} overflows) or 0 < max |x| < 2^-14 (subnormal) on the calibration feeds, first-step "
            f"decoder prefixes of {', '.join(map(str, COVER_TARGETS))} tokens included")


# --------------------------------------------------------------------------- handler


@dataclass(frozen=True)
class TrtGraphs:
    """The TensorRT-ready copies of one export, and the range table that chose the fp16 one."""

    parent: Path  # the fp32 export
    fp16: Path
    int8: Path
    ranges: list[TensorRange]
    keep: dict[str, list[str]]


def graphs_dir(preset: str, kind: str, bundle_name: str = "teacher") -> Path:
    """<artifacts>/<preset>/onnx-<bundle_name>-trt-<kind> (kind fp16 | int8)."""
    return preset_dir(preset) / f"onnx-{bundle_name}-trt-{kind}"


def ranges_dir(preset: str, bundle_name: str = "teacher") -> Path:
    """<artifacts>/<preset>/trt-ranges-<bundle_name>, holding ranges.json."""
    return preset_dir(preset) / f"trt-ranges-{bundle_name}"


def ensure_ranges(onnx_dir: Path, out: Path, recipe: dict, feeds) -> list[TensorRange]:
    """The range table of `onnx_dir`, measured again exactly when `recipe` (parent digest, rule, calibration)
    changes; `feeds()` is called only then."""
    def build(tmp: Path) -> None:
        start = time.perf_counter()
        rows = [asdict(r) for r in measure_ranges(onnx_dir, feeds())]
        write_json_atomic(tmp / RANGES_SIDECAR, {"schema": RANGES_SCHEMA, "rule": _rule(), "rows": rows,
                                                 "seconds": round(time.perf_counter() - start, 1)})

    stored = read_json(ensure(out, RANGES_SIDECAR, recipe, build) / RANGES_SIDECAR)
    return [TensorRange(**row) for row in stored["rows"]]


def ensure_trt_graphs(preset: Preset, bundle: Bundle, feeds_fn=None) -> TrtGraphs:
    """The ranges, fp16 and int8 copies of `bundle`'s export for `preset`, each built again exactly when its
    recipe changes (the export's sidecar digest, the tool, the kept nodes, the calibration budget).

    `feeds_fn()` returns calibration feeds (default: ort_int8.calibration_for, notebook 05's sentences);
    it is called only when something has to be measured or calibrated, and at most once.
    """
    onnx_dir, name = ensure_onnx(preset, bundle), bundle_key(bundle)
    cache: dict[str, dict] = {}

    def feeds() -> dict[str, list[dict]]:
        if "feeds" not in cache:
            cache["feeds"] = feeds_fn() if feeds_fn else calibration_for(onnx_dir, preset)
        return cache["feeds"]

    budget = preset.quant
    base = {"parent_sidecar_sha256": sidecar_digest(onnx_dir),
            "calibration": [budget.calibration_sentences, budget.calibration_batch, budget.keep_every]}
    ranges = ensure_ranges(onnx_dir, ranges_dir(preset.name, name), {**base, "rule": _rule()}, feeds)
    keep = keep_fp32(onnx_dir, ranges)
    tools = {"fp16": tool_for("fp16"), "int8": tool_for("int8")}
    fp16 = ensure(graphs_dir(preset.name, "fp16", name), SIDECAR, {**base, "tool": tools["fp16"], "keep_fp32": keep},
                  lambda tmp: fp16_into(onnx_dir, tmp, keep, tools["fp16"]))
    int8 = ensure(graphs_dir(preset.name, "int8", name), SIDECAR, {**base, "tool": tools["int8"], "weights": "dq_only"},
                  lambda tmp: int8_into(onnx_dir, tmp, feeds(), tools["int8"]))
    return TrtGraphs(onnx_dir, fp16, int8, ranges, keep)
