"""ONNX Runtime backend: the three exported graphs behind labkit.decode's Stepper interface.

    stepper = OrtStepper.from_dir(ensure_onnx("ci"), threads=2)
    Translator(bundle, stepper).translate(["我喜欢猫。"])

Any directory with the `labkit.export` layout works (the fp32 export, quantized or
optimized copies made with `labkit.export.derive`). The encoder runs once per
batch; the first decoder step returns the self-attention K/V and the
cross-attention K/V, which later steps feed back, so cross-attention keys and
values are computed once per source. `io` chooses how the cache travels between
steps: "numpy" (InferenceSession.run: outputs become numpy arrays) or "ortvalue"
(run_with_ort_values: outputs stay ORT-owned and are fed back without a
conversion). Beam search reorders every cache tensor with `select`.

Left out: GPU I/O binding and device-resident caches (the CUDA provider works
through `providers`, but the cache round-trips through host memory), and
in-graph cache buffers of fixed capacity (the graphs concatenate past and new
K/V, as Hugging Face's do).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
IO_MODES = ("numpy", "ortvalue")


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("labkit.runtime needs ONNX Runtime: `pip install onnxruntime` "
                          "(or onnxruntime-gpu on a CUDA machine)") from exc
    return onnxruntime


# --------------------------------------------------------------------------- sessions


def session_options(threads: int = 1, optimization: str = "all", profile: bool = False):
    """Intra-op threads pinned, no inter-op parallelism (one request at a time), chosen graph optimizations."""
    ort = _ort()
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization must be one of {OPTIMIZATION_LEVELS}, got {optimization!r}")
    level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
             "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
             "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
             "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = level
    opts.enable_profiling = profile
    opts.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
    return opts


def load_session(path: Path, threads: int = 1, optimization: str = "all",
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)):
    """One InferenceSession; a corrupt or unreadable file raises a RuntimeError naming it."""
    ort = _ort()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; re-export with labkit.export.export")
    try:
        return ort.InferenceSession(str(path), session_options(threads, optimization), providers=list(providers))
    except Exception as exc:  # ORT raises its own pybind exception types (InvalidProtobuf, Fail, ...)
        raise RuntimeError(f"ONNX Runtime cannot load {path}: {exc.__class__.__name__}: {str(exc)[:300]}. "
                           "The file is corrupt or incomplete; re-export it (labkit.export.export)") from exc


def load_sessions(directory: Path | str, threads: int = 1, optimization: str = "all",
                  providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> dict[str, Any]:
    """{graph: InferenceSession} for encoder, decoder, decoder_with_past of an export directory."""
    from labkit.export import read_sidecar

    directory = Path(directory)
    meta = read_sidecar(directory)
    return {graph: load_session(directory / name, threads, optimization, providers)
            for graph, name in meta["files"].items()}


# --------------------------------------------------------------------------- stepper


@dataclass
class OrtState:
    mask: np.ndarray  # (rows, S) int64 source mask
    encoder: np.ndarray | None  # (rows, S, D) until the first step has turned it into cross K/V
    past: list | None = None  # self-attention K/V per layer (k0, v0, k1, v1, ...): numpy or OrtValue
    cross: list | None = None  # cross-attention K/V per layer, computed once per source


def _numpy(value) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


class OrtStepper:
    """Stepper over encoder / decoder / decoder_with_past InferenceSessions."""

    def __init__(self, sessions: dict[str, Any], meta: dict, io: str = "numpy"):
        if io not in IO_MODES:
            raise ValueError(f"io must be one of {IO_MODES}, got {io!r}")
        self.sessions, self.meta, self.io = sessions, meta, io
        shape = meta["model"]
        self.start_id, self.eos_id, self.pad_id = shape["start_id"], shape["eos_id"], shape["pad_id"]
        self.n_layers = shape["decoder_layers"]
        self._outputs = {g: [o.name for o in s.get_outputs()] for g, s in sessions.items()}
        self._inputs = {g: [i.name for i in s.get_inputs()] for g, s in sessions.items()}

    @classmethod
    def from_dir(cls, directory: Path | str, threads: int = 1, optimization: str = "all", io: str = "numpy",
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> "OrtStepper":
        """OrtStepper.from_dir(ensure_onnx("ci"), threads=2) — any labkit ONNX directory."""
        from labkit.export import read_sidecar

        meta = read_sidecar(directory)
        return cls(load_sessions(directory, threads, optimization, providers), meta, io)

    def _run(self, graph: str, feed: dict[str, Any]) -> list:
        if self.io == "numpy":
            return self.sessions[graph].run(self._outputs[graph], {k: _numpy(v) for k, v in feed.items()})
        ort = _ort()
        values = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v)
                  for k, v in feed.items()}
        return self.sessions[graph].run_with_ort_values(self._outputs[graph], values)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> OrtState:
        ids, mask = input_ids.numpy().astype(np.int64), attention_mask.numpy().astype(np.int64)
        (hidden,) = self.sessions["encoder"].run(None, {"input_ids": ids, "attention_mask": mask})
        return OrtState(mask, hidden)

    def step(self, tokens: torch.Tensor, state: OrtState) -> tuple[torch.Tensor, OrtState]:
        n = 2 * self.n_layers
        if state.cross is None:  # first step: the whole prefix, no past; cross K/V come out once
            feed = {"input_ids": tokens.numpy().astype(np.int64), "encoder_attention_mask": state.mask,
                    "encoder_hidden_states": state.encoder}
            out = self._run("decoder", feed)
            state = replace(state, encoder=None, past=out[1:1 + n], cross=out[1 + n:])
        else:
            names = self._inputs["decoder_with_past"]
            values = [tokens[:, -1:].numpy().astype(np.int64), state.mask, *state.past, *state.cross]
            out = self._run("decoder_with_past", dict(zip(names, values)))
            state = replace(state, past=out[1:])
        return torch.from_numpy(_numpy(out[0])).float(), state

    def select(self, state: OrtState, index: torch.Tensor) -> OrtState:
        """Rows `index` of every cached tensor (beam expansion and reorder); copies, as HF's reorder does."""
        idx = index.numpy()

        def take(values):
            return None if values is None else [np.take(_numpy(v), idx, axis=0) for v in values]

        return OrtState(state.mask[idx], None if state.encoder is None else state.encoder[idx],
                        take(state.past), take(state.cross))


# --------------------------------------------------------------------------- translators and measurement


def translator(directory: Path | str, bundle, preset, *, threads: int | None = None, optimization: str = "all",
               io: str = "numpy", num_beams: int = 1):
    """A Translator over an export directory, decoding as the preset says (tokenizer from `bundle`)."""
    from labkit.pipeline import translator_for

    stepper = OrtStepper.from_dir(directory, threads=threads or preset.threads, optimization=optimization, io=io)
    return translator_for(bundle, preset, stepper, num_beams=num_beams)


def translate_ids(translator, texts: list[str], batch_size: int = 16) -> tuple[list[list[int]], list[str]]:
    """Generated ids and texts for `texts`, in batches (the ids feed evaluate.agreement)."""
    from labkit.data import iter_batches

    ids, out = [], []
    for batch in iter_batches(texts, batch_size):
        result = translator.run(batch)
        ids += result.ids
        out += result.texts
    return ids, out


@dataclass(frozen=True)
class SessionConfig:
    """One ORT setting to time: graph optimization level and how the cache travels between steps."""

    optimization: str = "all"
    io: str = "numpy"

    @property
    def label(self) -> str:
        return f"ort {self.optimization}/{self.io}"


SESSION_CONFIGS = (SessionConfig("disable", "numpy"), SessionConfig("basic", "numpy"),
                   SessionConfig("all", "numpy"), SessionConfig("all", "ortvalue"))


def session_sweep(directory: Path | str, bundle, preset, texts: list[str],
                  configs: tuple[SessionConfig, ...] = SESSION_CONFIGS) -> dict[str, Any]:
    """{label: Measurement} of batch-1 latency (labkit.evaluate.latency) per session setting."""
    from labkit.evaluate import latency

    return {c.label: latency(translator(directory, bundle, preset, optimization=c.optimization, io=c.io),
                             texts, preset, label=c.label) for c in configs}
