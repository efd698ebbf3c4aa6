"""ONNX Runtime decoding over a shortlist: decoder graphs without the LM head, the head applied to candidate rows.

    out = ensure_shortlisted(preset, bundle, ensure_quantized(preset, bundle, "dynamic"))
    stepper = ShortlistStepper.from_dir(out, threads=2)      # a labkit.core.decode Stepper
    StepperTranslator(bundle, stepper).translate(["我喜欢猫。"])

Graph surgery (`split_lm_head`) on an existing variant's two decoder graphs: the output projection
(after ORT's optimizer and untying a MatMul on its own transposed copy, after dynamic quantization a
DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul chain, in a plain export a Gemm on the tied
embedding) and the final_logits_bias Add are cut off, so the graphs return the last position's hidden
state (rows, d_model). The head's weights go to `lm_head.npz`; `LmHead.gather` takes the candidate
columns once per batch, and every step computes only those logits in a tiny one-thread ORT graph
of the parent's own ops (`head_graph`: MatMul + Add, or DynamicQuantizeLinear -> MatMulInteger ->
Cast -> Mul -> Add with the int8 columns as inputs), so they equal the parent's logits. The logits
go into a (rows, vocab) buffer of -inf at the candidate columns, so labkit.core.decode's one greedy
and beam loop runs unchanged and argmax lands on vocabulary ids. Beam search normalises over the
candidates only, as Marian's shortlist does. `MaskedStepper` is the oracle: any full-vocabulary
stepper with the same non-candidates set to -inf.

Left out: IOBinding (the stripped graphs run with io "numpy" only), a graph input of candidate ids
(ORT would gather the rows every step), and sharing the head with the embedding lookup.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labkit.config import Preset
from labkit.core.artifacts import digest, ensure, preset_dir
from labkit.core.bundle import Bundle
from labkit.engines.onnx_export import derive_into
from labkit.engines.onnx_graphs import SIDECAR, read_sidecar
from labkit.engines.ort import OrtState, OrtStepper, load_sessions
from labkit.engines.shortlist import SIDECAR as SHORTLIST_FILE
from labkit.engines.shortlist import Shortlist, ensure_shortlist, load_shortlist

HEAD_FILE = "lm_head.npz"
HIDDEN = "last_hidden"  # the stripped decoders' first output, (rows, d_model)
_WEIGHT_OPS = ("Gemm", "MatMul", "MatMulInteger")


# --------------------------------------------------------------------------- the head, outside the graph


@dataclass(frozen=True)
class LmHead:
    """The output projection, columns = vocabulary ids. kind "float": logits = h @ weight + bias;
    kind "int8": ONNX dynamic quantization of h, then (q - zp) @ (weight - w_zp) * scale_h * w_scale + bias."""

    kind: str
    weight: np.ndarray  # (d_model, vocab): float32, or int8/uint8 for kind "int8"
    bias: np.ndarray  # (vocab,) float32 (zeros when the graph had none)
    w_scale: np.ndarray | None = None  # (vocab,) float32, int8 only
    w_zero: np.ndarray | None = None  # (vocab,) int8 only
    per_token: bool = False  # int8 with one activation scale per row (ort_int8.per_token_activations), not per tensor

    def gather(self, ids: np.ndarray) -> CandidateHead:
        """The head restricted to candidate columns `ids` (copied once per batch, contiguous)."""
        cols = np.ascontiguousarray(self.weight[:, ids])
        extra = {} if self.kind == "float" else {"w_zero": np.ascontiguousarray(self.w_zero[ids]),
                                                 "w_scale": np.ascontiguousarray(self.w_scale[ids])}
        if self.per_token:  # the input zero point is subtracted after MatMulInteger: zp * colsum(W - w_zero)
            extra["colsum"] = np.ascontiguousarray(self.colsum[ids])
        return CandidateHead(ids, {"weight": cols, "bias": np.ascontiguousarray(self.bias[ids]), **extra})

    @functools.cached_property
    def colsum(self) -> np.ndarray:
        """(vocab,) float32: each column's sum of (W - w_zero), computed once (continuous batching gathers often)."""
        return (self.weight.astype(np.int64) - self.w_zero.astype(np.int64)).sum(0).astype(np.float32)

    def save(self, path: Path) -> None:
        extra = {} if self.kind == "float" else {"w_scale": self.w_scale, "w_zero": self.w_zero}
        np.savez(path, kind=np.array(self.kind), weight=self.weight, bias=self.bias, per_token=np.array(self.per_token),
                 **extra)

    @classmethod
    def load(cls, path: Path) -> LmHead:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} is missing: rebuild the directory with ensure_shortlisted")
        with np.load(path) as f:
            kind = str(f["kind"])
            return cls(kind, f["weight"], f["bias"], f["w_scale"] if kind == "int8" else None,
                       f["w_zero"] if kind == "int8" else None, bool(f["per_token"]) if "per_token" in f else False)


def head_graph(kind: str, weight_type: int | None = None, per_token: bool = False):
    """A tiny ONNX graph of the head over candidate columns given as inputs: the parent's own ops
    (MatMul + Add; DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul -> Add for int8; for per-token int8
    the rewrite of labkit.engines.ort_int8.per_token_activations, one scale per row)."""
    from onnx import TensorProto, helper, numpy_helper

    f32, dims = TensorProto.FLOAT, {"hidden": ["rows", "d"], "weight": ["d", "c"], "bias": ["c"]}
    types = {"hidden": f32, "weight": f32, "bias": f32}
    if kind == "float":
        nodes = [helper.make_node("MatMul", ["hidden", "weight"], ["raw"]),
                 helper.make_node("Add", ["raw", "bias"], ["logits"])]
    elif per_token:
        wt = weight_type or TensorProto.INT8
        types |= {"weight": wt, "w_zero": wt, "w_scale": f32, "colsum": f32}
        dims |= {"w_zero": ["c"], "w_scale": ["c"], "colsum": ["c"]}
        nodes = _per_token_head_nodes()
    else:
        wt = weight_type or TensorProto.INT8  # the quantizer's weight type (QInt8 here; UInt8 works too)
        types |= {"weight": wt, "w_zero": wt, "w_scale": f32}
        dims |= {"w_zero": ["c"], "w_scale": ["c"]}
        nodes = [helper.make_node("DynamicQuantizeLinear", ["hidden"], ["q", "q_scale", "q_zero"]),
                 helper.make_node("MatMulInteger", ["q", "weight", "q_zero", "w_zero"], ["acc"]),
                 helper.make_node("Cast", ["acc"], ["acc_f"], to=f32),
                 helper.make_node("Mul", ["q_scale", "w_scale"], ["scale"]),
                 helper.make_node("Mul", ["acc_f", "scale"], ["raw"]),
                 helper.make_node("Add", ["raw", "bias"], ["logits"])]
    inputs = [helper.make_tensor_value_info(n, types[n], dims[n]) for n in types]
    consts = [numpy_helper.from_array(v, k) for k, v in PER_TOKEN_CONSTS.items()] if per_token else []
    graph = helper.make_graph(nodes, "shortlist_head", inputs,
                              [helper.make_tensor_value_info("logits", f32, ["rows", "c"])], initializer=consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


PER_TOKEN_CONSTS = {"zero": np.array(0.0, np.float32), "top": np.array(255.0, np.float32),
                    "eps": np.array(1e-12, np.float32), "last_axis": np.array([-1], np.int64)}


def _per_token_head_nodes():
    """The per-token int8 head, op for op as per_token_activations writes it into the parent's graphs:
    scale = max((max(hi, 0) - min(lo, 0)) / 255, eps) per row, zero point round(-lo / scale), uint8 input,
    MatMulInteger without input zero point, minus zp * colsum(W - w_zero), times scale * w_scale, plus bias."""
    from onnx import TensorProto, helper

    n = helper.make_node
    return [n("ReduceMin", ["hidden", "last_axis"], ["mn"], keepdims=1), n("Min", ["mn", "zero"], ["lo"]),
            n("ReduceMax", ["hidden", "last_axis"], ["mx"], keepdims=1), n("Max", ["mx", "zero"], ["hi"]),
            n("Sub", ["hi", "lo"], ["range"]), n("Div", ["range", "top"], ["s"]), n("Max", ["s", "eps"], ["q_scale"]),
            n("Neg", ["lo"], ["neg"]), n("Div", ["neg", "q_scale"], ["zq"]), n("Round", ["zq"], ["zr"]),
            n("Clip", ["zr", "zero", "top"], ["zp"]),
            n("Div", ["hidden", "q_scale"], ["xd"]), n("Round", ["xd"], ["xr"]), n("Add", ["xr", "zp"], ["xs"]),
            n("Clip", ["xs", "zero", "top"], ["xc"]), n("Cast", ["xc"], ["q"], to=TensorProto.UINT8),
            n("MatMulInteger", ["q", "weight", "", "w_zero"], ["acc"]),
            n("Cast", ["acc"], ["acc_raw"], to=TensorProto.FLOAT),
            n("Mul", ["zp", "colsum"], ["zp_term"]), n("Sub", ["acc_raw", "zp_term"], ["acc_f"]),
            n("Mul", ["q_scale", "w_scale"], ["scale"]), n("Mul", ["acc_f", "scale"], ["raw"]),
            n("Add", ["raw", "bias"], ["logits"])]


def head_session(kind: str, weight_dtype=np.int8, per_token: bool = False):
    """The head graph in a one-thread session: it runs on the caller's thread, so it never fights the
    decoder's thread pool for the cores (torch's or numpy's own pools did: 40-100 ms a step on a busy 2-core
    machine for a 16 x 128 x 500 product)."""
    import onnxruntime
    from onnx import helper

    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = 1, 1, 3
    model = head_graph(kind, helper.np_dtype_to_tensor_dtype(np.dtype(weight_dtype)), per_token)
    return onnxruntime.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class CandidateHead:
    """One batch's candidate columns of the head, as the head graph's inputs."""

    ids: np.ndarray  # candidate vocabulary ids, sorted
    feed: dict[str, np.ndarray]  # weight (d_model, C), bias (C,), and for int8 w_zero, w_scale (C,)

    def logits(self, session, hidden: np.ndarray) -> np.ndarray:
        """(rows, d_model) -> (rows, C) float32."""
        return session.run(None, {"hidden": np.ascontiguousarray(hidden, np.float32), **self.feed})[0]


# --------------------------------------------------------------------------- graph surgery


def _inits(model) -> dict[str, Any]:
    return {t.name: t for t in model.graph.initializer}


def _array(init) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(init)


def _head_node(model, vocab: int):
    """The weight node of the output projection: a MatMul/Gemm/MatMulInteger on a (.., vocab) constant."""
    inits = _inits(model)
    found = [n for n in model.graph.node if n.op_type in _WEIGHT_OPS and n.input[1] in inits
             and vocab in tuple(inits[n.input[1]].dims)]
    if len(found) != 1:
        raise ValueError(f"expected one LM-head node with a {vocab}-wide weight, found {len(found)}")
    return found[0]


def _read_head(model, node, vocab: int) -> tuple[LmHead, str]:
    """(the head's weights, the float hidden-state tensor feeding it)."""
    inits, graph = _inits(model), model.graph
    producers = {o: n for n in graph.node for o in n.output}
    out = producers["logits"]
    bias = next((_array(inits[i]).astype(np.float32).reshape(-1) for i in out.input
                 if out.op_type == "Add" and i in inits), np.zeros(vocab, np.float32))
    if node.op_type == "MatMulInteger":
        x, scale, per_token = _quantized_input(producers, node)
        scale_mul = next(n for n in graph.node if n.op_type == "Mul" and scale in n.input)
        w_scale = next(_array(inits[i]) for i in scale_mul.input if i in inits).astype(np.float32)
        zero = _array(inits[node.input[3]]) if len(node.input) > 3 and node.input[3] else np.zeros(vocab, np.int32)
        return LmHead("int8", _array(inits[node.input[1]]), bias, np.broadcast_to(w_scale, (vocab,)).copy(),
                      np.broadcast_to(zero, (vocab,)).copy(), per_token), x
    weight = _array(inits[node.input[1]]).astype(np.float32)
    if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
        weight = weight.T
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = bias + _array(inits[node.input[2]]).astype(np.float32).reshape(-1)
    return LmHead("float", np.ascontiguousarray(weight), bias), node.input[0]


def _quantized_input(producers: dict, node) -> tuple[str, str, bool]:
    """(float input, its scale tensor, per token?) of an int8 MatMulInteger: fed by DynamicQuantizeLinear, or by
    per_token_activations' chain x -> Div(x, scale) -> Round -> Add(zero point) -> Clip -> Cast(uint8)."""
    quant = producers[node.input[0]]
    if quant.op_type == "DynamicQuantizeLinear":
        return quant.input[0], quant.output[1], False
    chain = [quant]
    for op in ("Clip", "Add", "Round", "Div"):
        chain.append(producers.get(chain[-1].input[0]))
        if chain[-1] is None or chain[-1].op_type != op:
            raise ValueError(f"int8 LM head fed by {quant.op_type}, expected DynamicQuantizeLinear or the per-token "
                             "chain of labkit.engines.ort_int8.per_token_activations")
    divide = chain[-1]
    return divide.input[0], divide.input[1], True


def _prune(model) -> None:
    """Drop nodes and initializers that no graph output needs any more (nodes are in topological order)."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    used = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used)


def split_lm_head(model, vocab: int, d_model: int) -> tuple[Any, LmHead]:
    """(the graph returning HIDDEN instead of logits, the head it no longer computes); edits `model`."""
    from onnx import TensorProto, helper

    head, hidden = _read_head(model, _head_node(model, vocab), vocab)
    graph = model.graph
    graph.node.append(helper.make_node("Identity", [hidden], [HIDDEN], name="shortlist_last_hidden"))
    outputs = [helper.make_tensor_value_info(HIDDEN, TensorProto.FLOAT, ["batch", d_model]) if o.name == "logits"
               else o for o in graph.output]
    del graph.output[:]
    graph.output.extend(outputs)
    _prune(model)
    return model, head


# --------------------------------------------------------------------------- the stripped directory


def strip_into(parent: Path | str, directory: Path, table_file: Path) -> None:
    """Write `parent`'s graphs into `directory` (a staging directory) with head-less decoders, the head as
    lm_head.npz and the shortlist `table_file` beside them: what ShortlistStepper.from_dir runs."""
    import onnx

    parent = Path(parent)
    meta = read_sidecar(parent)
    graph_of = {name: graph for graph, name in meta["files"].items()}
    shape = meta["model"]

    def transform(src: Path, dst: Path) -> None:
        if graph_of[src.name] == "encoder":
            shutil.copyfile(src, dst)
            return
        model, head = split_lm_head(onnx.load(str(src)), shape["vocab_size"], shape["d_model"])
        onnx.save(model, str(dst))
        if graph_of[src.name] == "decoder_with_past":
            head.save(dst.parent / HEAD_FILE)

    shutil.copyfile(table_file, directory / SHORTLIST_FILE)
    derive_into(parent, directory, transform, shortlist={"table": str(table_file), "head": HEAD_FILE,
                                                         "parent": str(parent), "output": HIDDEN})


def ensure_shortlisted(preset: Preset, bundle: Bundle, parent: Path | str) -> Path:
    """`parent` (an ONNX directory: fp32 or int8) with head-less decoders, its head and the preset's shortlist:
    <artifacts>/<preset>/<parent name>-sl, rebuilt when the parent or the shortlist change."""
    parent = Path(parent)
    table_file = ensure_shortlist(preset, bundle) / SHORTLIST_FILE
    out = preset_dir(preset.name) / f"{parent.name}-sl"
    recipe = {"parent_sha256": digest(parent / SIDECAR), "shortlist_sha256": digest(table_file)}
    return ensure(out, SIDECAR, recipe, lambda tmp: strip_into(parent, tmp, table_file),
                  valid=lambda p: (p / HEAD_FILE).exists())


# --------------------------------------------------------------------------- steppers


@dataclass
class ShortlistState(OrtState):
    head: CandidateHead | None = None  # this batch's candidate columns
    buffer: np.ndarray | None = None  # (rows, vocab) of -inf, candidate columns written every step
    allowed: np.ndarray | None = None  # (rows, C): each row's own candidates among the batch's (per-row rule)


def _with_head(state: OrtState, head: CandidateHead | None, allowed: np.ndarray | None = None) -> ShortlistState:
    values = {f.name: getattr(state, f.name) for f in fields(OrtState)}
    return ShortlistState(**values, head=head, allowed=allowed)


def own_candidates(table: Shortlist, sources: list[list[int]], ids: np.ndarray) -> np.ndarray:
    """(rows, len(ids)) bool: which of the batch's candidate `ids` each row's own source makes candidates."""
    return np.stack([np.isin(ids, table.candidates([src])) for src in sources])


def scatter(logits: np.ndarray, ids: np.ndarray, state: Any, vocab: int) -> torch.Tensor:
    """Candidate logits (rows, C) into the state's (rows, vocab) buffer of -inf at columns `ids`.

    The buffer is numpy (single-threaded fancy indexing) seen by the decode loop as a tensor (no copy)."""
    rows = logits.shape[0]
    if state.buffer is None or state.buffer.shape[0] != rows:
        state.buffer = np.full((rows, vocab), -np.inf, dtype=np.float32)
    state.buffer[:, ids] = logits
    return torch.from_numpy(state.buffer)


class ShortlistStepper(OrtStepper):
    """OrtStepper over head-less decoders: logits only for the batch's candidate ids (see module doc)."""

    def __init__(self, sessions: dict[str, Any], meta: dict, head: LmHead, table: Shortlist):
        if meta.get("shortlist", {}).get("output") != HIDDEN:
            raise ValueError("not a shortlisted ONNX directory (its sidecar has no 'shortlist' section); "
                             "make one with labkit.engines.shortlist_ort.ensure_shortlisted")
        super().__init__(sessions, meta, io="numpy")
        self.head, self.table = head, table
        # per-token int8 keeps rows apart; each row then also decodes over its own candidates only, so a
        # sentence's tokens never depend on its batch mates (the per-tensor recipes share the batch's set)
        self.per_row = head.per_token
        self.head_session = head_session(head.kind, head.weight.dtype, head.per_token)

    @classmethod
    def from_dir(cls, directory: Path | str, threads: int = 1, optimization: str = "all", spin: bool = True,
                 **_) -> ShortlistStepper:
        directory = Path(directory)
        meta = read_sidecar(directory)
        head, table = LmHead.load(directory / HEAD_FILE), load_shortlist(directory / SHORTLIST_FILE)
        return cls(load_sessions(directory, threads, optimization, spin=spin), meta, head, table)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ShortlistState:
        sources = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        head = self.head.gather(self.table.candidates(sources))
        allowed = own_candidates(self.table, sources, head.ids) if self.per_row else None
        return _with_head(super().encode(input_ids, attention_mask), head, allowed)

    def step(self, tokens: torch.Tensor, state: ShortlistState) -> tuple[torch.Tensor, ShortlistState]:
        hidden, state = super().step(tokens, state)
        logits = state.head.logits(self.head_session, hidden.numpy())
        if state.allowed is not None:
            logits = np.where(state.allowed, logits, np.float32(-np.inf))
        return scatter(logits, state.head.ids, state, self._vocab), state

    def select(self, state: ShortlistState, index: torch.Tensor) -> ShortlistState:
        allowed = None if state.allowed is None else state.allowed[index.numpy()]
        return _with_head(super().select(state, index), state.head, allowed)


@dataclass
class MaskedState:
    inner: Any
    ids: torch.Tensor  # candidate ids of the batch


class MaskedStepper:
    """The oracle: a full-vocabulary stepper whose logits outside the batch's candidates are set to -inf."""

    def __init__(self, inner, table: Shortlist):
        self.inner, self.table = inner, table
        self.start_id, self.eos_id, self.pad_id = inner.start_id, inner.eos_id, inner.pad_id

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> MaskedState:
        sources = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        ids = torch.from_numpy(self.table.candidates(sources))
        return MaskedState(self.inner.encode(input_ids, attention_mask), ids)

    def step(self, tokens: torch.Tensor, state: MaskedState) -> tuple[torch.Tensor, MaskedState]:
        logits, inner = self.inner.step(tokens, state.inner)
        masked = torch.full_like(logits, -float("inf"))
        masked[:, state.ids] = logits[:, state.ids]
        return masked, MaskedState(inner, state.ids)

    def select(self, state: MaskedState, index: torch.Tensor) -> MaskedState:
        return MaskedState(self.inner.select(state.inner, index), state.ids)
