"""TensorRT engines from labkit's TensorRT-ready graphs, and a Stepper that decodes with them (needs CUDA + tensorrt).

    engines_unavailable()                                # None where engines can be built, else why not
    plans = ensure_engines(fp16_dir, gate)           # {graph: .plan}; a stale or foreign engine is rebuilt, saying why
    stepper = TrtStepper.from_dir(fp16_dir)          # behind labkit.core.decode's greedy and beam search

Build, with the TensorRT >= 10 API only: the ONNX parser fills a *strongly typed* network (every tensor
keeps the graph's type, so fp16 and int8 come from the graph; no BuilderFlag.FP16/INT8, no calibrator,
no EXPLICIT_BATCH), one optimization profile per engine from the directory's `tensorrt.json`
(labkit.engines.trt_profiles), a workspace limit, a timing cache the directory's builds share, and
`build_serialized_network`. Each engine has a sidecar `<graph>.plan.json` (TensorRT version, GPU name and
compute capability, profile, workspace, ONNX digest); `stale_reason` compares it with the machine and
the graph, and the engine is rebuilt when anything differs, with that reason printed.

TrtStepper keeps everything on the device, on one CUDA stream: inputs and outputs are torch CUDA tensors
bound by name (`set_input_shape`, `set_tensor_address`, `execute_async_v3`). Cross-attention K/V come
out of the first decoder step once per source; self-attention K/V live in two preallocated buffers per
layer and kind, swapped every step (the graphs concatenate past and new K/V, so the engine reads `past`
from one buffer and writes `present` into the other); only logits are copied back. The stepper talks to
engines through `TrtRunner`, so its buffer logic is tested on the CPU with ONNX Runtime standing in.

Left out: CUDA graphs around execute_async_v3, several profiles per engine, fp16 I/O tensors, and
engine refitting.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from labkit.core.artifacts import write_json_atomic
from labkit.engines.onnx_graphs import read_sidecar
from labkit.engines.trt_profiles import WORKSPACE_MB, engine_file, read_profiles

SCHEMA = "labkit.trt-engine/1"
INSTALL_HINT = "pip install -e '.[trt]' on a machine with an NVIDIA GPU and CUDA"


# --------------------------------------------------------------------------- where engines can exist


def engines_unavailable() -> str | None:
    """Why engines cannot be built here, or None: 'no CUDA device (...); tensorrt is not installed (...)'."""
    reasons = []
    if not torch.cuda.is_available():
        reasons.append("no CUDA device (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("tensorrt") is None:
        reasons.append(f"tensorrt is not installed ({INSTALL_HINT})")
    return "; ".join(reasons) or None


def _trt():
    try:
        import tensorrt
    except ImportError as exc:
        raise ImportError(f"TensorRT engines need the tensorrt package: {INSTALL_HINT}") from exc
    return tensorrt


# --------------------------------------------------------------------------- identity and staleness


def onnx_digest(path: Path) -> str:
    """sha256 of a graph file and its external-data side file, if any."""
    h = hashlib.sha256(Path(path).read_bytes())
    side = Path(str(path) + ".data")
    if side.exists():
        h.update(side.read_bytes())
    return h.hexdigest()


def device_identity() -> dict:
    """{'gpu': 'NVIDIA H200', 'compute_capability': '9.0'} of CUDA device 0."""
    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def engine_identity(onnx_path: Path, profile: dict, workspace_mb: int, trt_version: str, device: dict) -> dict:
    """Everything an engine depends on: change any of it and the engine must be rebuilt."""
    return {"schema": SCHEMA, "tensorrt": trt_version, **device, "onnx_sha256": onnx_digest(onnx_path),
            "profile": profile, "workspace_mb": workspace_mb, "strongly_typed": True}


def stale_reason(stored: dict | None, wanted: dict) -> str | None:
    """Why a stored engine cannot be reused for `wanted`, or None when it can.

    stored tensorrt 10.3.0, wanted 10.8.0 -> 'built with TensorRT 10.3.0, this is 10.8.0'; engines are
    specific to the TensorRT version and the GPU's compute capability, and say nothing about a graph or
    profile other than their own.
    """
    if stored is None:
        return "no engine yet"
    if stored.get("schema") != wanted["schema"]:
        return f"sidecar schema {stored.get('schema')!r}, expected {wanted['schema']!r}"
    if stored.get("tensorrt") != wanted["tensorrt"]:
        return f"built with TensorRT {stored.get('tensorrt')}, this is {wanted['tensorrt']}"
    if (stored.get("gpu"), stored.get("compute_capability")) != (wanted["gpu"], wanted["compute_capability"]):
        return (f"built for {stored.get('gpu')} (sm {stored.get('compute_capability')}), this is "
                f"{wanted['gpu']} (sm {wanted['compute_capability']})")
    if stored.get("onnx_sha256") != wanted["onnx_sha256"]:
        return "the ONNX graph changed since the build"
    for key in ("profile", "workspace_mb", "strongly_typed"):
        if stored.get(key) != wanted[key]:
            return f"the {key.replace('_', ' ')} changed since the build"
    return None


def read_engine_sidecar(plan: Path) -> dict | None:
    """The sidecar of an engine file; None when the engine or sidecar is missing or unreadable."""
    side = Path(str(plan) + ".json")
    if not Path(plan).exists() or not side.exists():
        return None
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError:
        return None


# --------------------------------------------------------------------------- build


def build_engine(onnx_path: Path, plan: Path, profile: dict, workspace_mb: int = WORKSPACE_MB,
                 timing_cache: Path | None = None) -> float:
    """Parse `onnx_path` into a strongly typed network, build with one profile, write `plan`; seconds taken."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external weights are found
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: " + "; ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    opt = builder.create_optimization_profile()
    for name, dims in profile.items():
        opt.set_shape(name, dims["min"], dims["opt"], dims["max"])
    config.add_optimization_profile(opt)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.exists() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (see the log above)")
    _write_atomic(plan, bytes(serialized))
    if timing_cache is not None:
        _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return seconds


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def ensure_engine(directory: Path, graph: str, log: Callable[[str], None] = print) -> Path:
    """One graph's engine in `directory`, built when missing or stale (the reason goes to `log`)."""
    trt = _trt()
    directory = Path(directory)
    meta, stored = read_sidecar(directory), read_profiles(directory)
    onnx_path = directory / meta["files"][graph]
    plan = directory / engine_file(meta["files"][graph])
    wanted = engine_identity(onnx_path, stored["profiles"][graph], stored["workspace_mb"], trt.__version__,
                             device_identity())
    reason = stale_reason(read_engine_sidecar(plan), wanted)
    if reason is None:
        return plan
    log(f"building {plan.name} ({reason})")
    seconds = build_engine(onnx_path, plan, stored["profiles"][graph], stored["workspace_mb"],
                           directory / stored["timing_cache"])
    write_json_atomic(Path(str(plan) + ".json"), {**wanted, "build_seconds": round(seconds, 1)})
    return plan


def ensure_engines(directory: Path, gate: dict, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Engines for every graph of a directory whose CPU gate passed; a failed gate builds nothing."""
    if not gate or not gate.get("passed"):
        raise ValueError(f"no engine is built from {directory}: its graphs failed their gate "
                         f"({(gate or {}).get('detail', 'no gate')})")
    reason = engines_unavailable()
    if reason:
        raise RuntimeError(f"cannot build TensorRT engines here: {reason}")
    return {g: ensure_engine(directory, g, log) for g in read_sidecar(directory)["files"]}


# --------------------------------------------------------------------------- running one engine


def output_shapes(graph: str, inputs: dict[str, tuple], shape: dict) -> dict[str, tuple]:
    """What each graph returns for these input shapes (labkit.engines.onnx_export's layout).

    decoder_with_past, input_ids (2, 1), past_key_self_0 (2, 8, 5, 16) -> present_key_self_0 (2, 8, 6, 16).
    """
    n, hd = shape["decoder_layers"], shape["head_dim"]
    if graph == "encoder":
        b, s = inputs["input_ids"]
        return {"encoder_hidden_states": (b, s, shape["d_model"])}
    b, s = inputs["encoder_attention_mask"]
    out = {"logits": (b, shape["vocab_size"])}
    t = inputs["input_ids"][1] if graph == "decoder" else inputs["past_key_self_0"][2] + 1
    for i in range(n):
        out |= {f"present_{k}_self_{i}": (b, shape["heads"][i], t, hd) for k in ("key", "value")}
    if graph == "decoder":
        for i in range(n):
            out |= {f"cross_{k}_{i}": (b, shape["cross_heads"][i], s, hd) for k in ("key", "value")}
    return out


class TrtRunner:
    """One engine and its execution context: bind torch tensors by name and run on a CUDA stream."""

    def __init__(self, plan: Path):
        trt = _trt()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT cannot load {plan}: rebuild it (labkit.engines.tensorrt.ensure_engines)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                  trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], stream: int) -> None:
        """Bind `inputs` (shapes and addresses) and `outputs` (addresses), check the output shapes, enqueue."""
        for name, tensor in inputs.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(f"{name} shape {tuple(tensor.shape)} is outside the engine's profile")
            self.context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in {**inputs, **outputs}.items():
            if self.dtypes[name] != tensor.dtype:  # the engine reads raw bytes: a wrong dtype is silent garbage
                raise TypeError(f"{name} is {tensor.dtype}, the engine's tensor is {self.dtypes[name]}")
        for name, tensor in outputs.items():
            if tuple(self.context.get_tensor_shape(name)) != tuple(tensor.shape):
                raise RuntimeError(f"engine says {name} is {tuple(self.context.get_tensor_shape(name))}, "
                                   f"labkit expects {tuple(tensor.shape)}")
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(stream):
            raise RuntimeError("execute_async_v3 failed (see the TensorRT log)")


class EngineSession:
    """A runner behind InferenceSession's run(names, feed), numpy in and out: so the engine can be
    compared with ONNX Runtime by the same code that compares graphs (labkit.engines.trt_verify.compare)."""

    def __init__(self, runner, graph: str, shape: dict, device: str = "cuda"):
        self.runner, self.graph, self.shape, self.device = runner, graph, shape, torch.device(device)

    def run(self, names, feed: dict) -> list:
        inputs = {k: torch.from_numpy(v).to(self.device) for k, v in feed.items()}
        shapes = output_shapes(self.graph, {k: tuple(v.shape) for k, v in feed.items()}, self.shape)
        outputs = {n: torch.empty(s, dtype=self.runner.dtypes.get(n, torch.float32), device=self.device)
                   for n, s in shapes.items()}
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        self.runner.run(inputs, outputs, stream)
        return [outputs[n].cpu().numpy() for n in (names or outputs)]  # .cpu() waits for the stream

    def get_inputs(self):
        return [_Named(n) for n in self.runner.inputs]

    def get_outputs(self):
        return [_Named(n) for n in self.runner.outputs]


class _Named:
    def __init__(self, name: str):
        self.name = name


# --------------------------------------------------------------------------- the stepper


class KvBuffers:
    """Self-attention K/V of every layer in two flat buffers per tensor: `present` of a step is written
    into the spare buffer while `past` is read from the other, then they swap. A buffer holds `capacity`
    positions; the first rows*heads*length*head_dim elements, viewed (rows, heads, length, head_dim),
    are a dense tensor an engine can read, whatever the length."""

    def __init__(self, names: list[str], heads: dict[str, int], rows: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.names, self.heads, self.rows, self.capacity, self.head_dim = names, heads, rows, capacity, head_dim
        self.front = {n: torch.empty(rows * heads[n] * capacity * head_dim, dtype=dtype, device=device)
                      for n in names}
        self.back = {n: torch.empty_like(t) for n, t in self.front.items()}
        self.length = 0

    def view(self, flat: torch.Tensor, name: str, length: int) -> torch.Tensor:
        if length > self.capacity:
            raise ValueError(f"KV capacity {self.capacity} exceeded at length {length}")
        return flat[: self.rows * self.heads[name] * length * self.head_dim].view(
            self.rows, self.heads[name], length, self.head_dim)

    def past(self) -> dict[str, torch.Tensor]:
        return {n: self.view(self.front[n], n, self.length) for n in self.names}

    def spare(self, length: int) -> dict[str, torch.Tensor]:
        return {n: self.view(self.back[n], n, length) for n in self.names}

    def swap(self, length: int) -> None:
        self.front, self.back, self.length = self.back, self.front, length

    def reordered(self, index: torch.Tensor) -> KvBuffers:
        """Rows `index` of the cache (beam expansion or reorder). Same row count: gathered into the spare
        buffers, which then swap in (no allocation); another row count: new buffers."""
        past = self.past()
        if len(index) == self.rows:
            for n in self.names:
                self.view(self.back[n], n, self.length).copy_(past[n].index_select(0, index))
            self.swap(self.length)
            return self
        sample = self.front[self.names[0]]
        out = KvBuffers(self.names, self.heads, len(index), self.capacity, self.head_dim, sample.dtype, sample.device)
        for n in self.names:
            out.view(out.front[n], n, self.length).copy_(past[n].index_select(0, index))
        out.length = self.length
        return out


@dataclass
class TrtState:
    mask: torch.Tensor  # (rows, S) on the device
    encoder: torch.Tensor | None  # (rows, S, D) until the first step turns it into cross K/V
    cross: dict[str, torch.Tensor] | None = None  # cross-attention K/V per layer, once per source
    kv: KvBuffers | None = None
    sources: torch.Tensor | None = None  # source row of each row (CPU): rows of one source share cross K/V
    extra: dict = field(default_factory=dict)


class TrtStepper:
    """Stepper over encoder / decoder / decoder_with_past engines (or anything with TrtRunner's `run`)."""

    def __init__(self, runners: dict[str, Any], meta: dict, device: str | torch.device = "cuda",
                 capacity: int | None = None, kv_dtype: torch.dtype = torch.float32):
        shape = meta["model"]
        self.runners, self.shape, self.device = runners, shape, torch.device(device)
        self.start_id, self.eos_id, self.pad_id = shape["start_id"], shape["eos_id"], shape["pad_id"]
        self.capacity = capacity or shape["max_positions"]
        self.kv_dtype = kv_dtype  # the graphs' present/past type (fp32 I/O: keep_io_types)
        n = shape["decoder_layers"]
        self.kv_names = [f"{k}_self_{i}" for i in range(n) for k in ("key", "value")]
        self.kv_heads = {f"{k}_self_{i}": shape["heads"][i] for i in range(n) for k in ("key", "value")}
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @classmethod
    def from_dir(cls, directory: Path | str, capacity: int | None = None) -> TrtStepper:
        """TrtStepper over the engines `ensure_engines` built in `directory` (on CUDA device 0)."""
        directory = Path(directory)
        meta = read_sidecar(directory)
        runners = {g: TrtRunner(directory / engine_file(f)) for g, f in meta["files"].items()}
        past_max = read_profiles(directory)["axes"]["past"]["max"]
        return cls(runners, meta, "cuda", capacity or past_max + 1)

    def _on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _run(self, graph: str, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        self.runners[graph].run(inputs, outputs, self.stream.cuda_stream if self.stream is not None else 0)

    def _empty(self, shapes: dict[str, tuple], dtype=torch.float32) -> dict[str, torch.Tensor]:
        return {n: torch.empty(s, dtype=dtype, device=self.device) for n, s in shapes.items()}

    @torch.inference_mode()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TrtState:
        with self._on_stream():
            ids, mask = input_ids.to(self.device, torch.int64), attention_mask.to(self.device, torch.int64)
            feed = {"input_ids": ids, "attention_mask": mask}
            out = self._empty(output_shapes("encoder", {k: tuple(v.shape) for k, v in feed.items()}, self.shape))
            self._run("encoder", feed, out)
        return TrtState(mask, out["encoder_hidden_states"], sources=torch.arange(len(ids)))

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, state: TrtState) -> tuple[torch.Tensor, TrtState]:
        with self._on_stream():
            if state.cross is None:
                state = self._first(tokens, state)
            else:
                self._next(tokens, state)
            logits = state.extra["logits"].to("cpu")  # the one copy back per step; waits for the stream
        return logits.float(), state

    def _first(self, tokens: torch.Tensor, state: TrtState) -> TrtState:
        """Whole prefix through the decoder engine; its present K/V land in the cache's spare buffers."""
        feed = {"input_ids": tokens.to(self.device, torch.int64), "encoder_attention_mask": state.mask,
                "encoder_hidden_states": state.encoder}
        shapes = output_shapes("decoder", {k: tuple(v.shape) for k, v in feed.items()}, self.shape)
        kv = KvBuffers(self.kv_names, self.kv_heads, len(tokens), self.capacity, self.shape["head_dim"],
                       self.kv_dtype, self.device)
        length = tokens.shape[1]
        out = {"logits": torch.empty(shapes["logits"], device=self.device)}
        out |= {f"present_{n}": t for n, t in kv.spare(length).items()}
        out |= self._empty({n: s for n, s in shapes.items() if n.startswith("cross_")}, self.kv_dtype)
        self._run("decoder", feed, out)
        kv.swap(length)
        cross = {n: t for n, t in out.items() if n.startswith("cross_")}
        return replace(state, encoder=None, cross=cross, kv=kv, extra={"logits": out["logits"]})

    def _next(self, tokens: torch.Tensor, state: TrtState) -> None:
        """One new token: past from the front buffers, present into the back ones, then swap."""
        kv = state.kv
        feed = {"input_ids": tokens[:, -1:].to(self.device, torch.int64), "encoder_attention_mask": state.mask}
        feed |= {f"past_{n}": t for n, t in kv.past().items()} | state.cross
        out = {"logits": state.extra["logits"]} | {f"present_{n}": t for n, t in kv.spare(kv.length + 1).items()}
        self._run("decoder_with_past", feed, out)
        kv.swap(kv.length + 1)

    @torch.inference_mode()
    def select(self, state: TrtState, index: torch.Tensor) -> TrtState:
        """Rows `index` of the state: nothing for the identity, K/V only while rows keep their source."""
        rows = len(state.mask)
        if len(index) == rows and torch.equal(index, torch.arange(rows)):
            return state
        sources = state.sources[index]
        with self._on_stream():
            idx = index.to(self.device)
            kv = state.kv.reordered(idx) if state.kv is not None else None
            if state.cross is not None and torch.equal(sources, state.sources):
                return replace(state, kv=kv, sources=sources)
            cross = None if state.cross is None else {n: t.index_select(0, idx) for n, t in state.cross.items()}
            encoder = None if state.encoder is None else state.encoder.index_select(0, idx)
            logits = {} if "logits" not in state.extra else {"logits": state.extra["logits"].index_select(0, idx)}
            return TrtState(state.mask.index_select(0, idx), encoder, cross, kv, sources, logits)
