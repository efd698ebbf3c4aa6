"""ONNX Runtime backend: the three exported graphs behind labkit.core.decode's Stepper interface.

    stepper = OrtStepper.from_dir(ensure_onnx("ci"), threads=2)
    StepperTranslator(bundle, stepper).translate(["我喜欢猫。"])

Any directory with the `labkit.engines.onnx_export` layout works (the fp32 export, quantized or
optimized copies made with `labkit.engines.onnx_export.derive`). The encoder runs once per
batch; the first decoder step returns the self-attention K/V and the
cross-attention K/V, which later steps feed back, so cross-attention keys and
values are computed once per source. `io` chooses how the cache travels between
steps:

- "numpy" (the default): InferenceSession.run, outputs become numpy arrays;
- "ortvalue": run_with_ort_values, outputs stay ORT-owned and are fed back as they are;
- "binding": IOBinding. Inputs are bound as OrtValues, outputs to ORT-allocated
  CPU values that become the next step's past without a numpy round trip; the
  source mask and cross-attention K/V are bound once per source and reused every
  step; logits go into a preallocated (rows, vocab) buffer. Beam search's
  `select` copies nothing for the identity and only the self-attention K/V when
  beams reorder within their source.

All three give the same tokens. On CPU, binding is not faster than numpy for the
teacher (a few percent slower per sentence, timed paired and interleaved; notebook 04
sweeps the modes): `run` already wraps numpy inputs and returns outputs without
copying, so what binding saves in ORT's native code its ~25 Python bind calls per
step spend again. It is the mechanism a GPU provider needs to keep a cache on the device.

Left out: device-resident caches (binding targets host memory; the CUDA provider
works through `providers`, but the cache round-trips through the host),
preallocated self-attention K/V of fixed capacity (the graphs concatenate past
and new K/V, as Hugging Face's do, so each step's present is a new shape that ORT
allocates), and reusing encoder-output buffers across batches (their shape changes
with every source length).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labkit.core.data import iter_batches
from labkit.core.translator import translator_for
from labkit.engines.onnx_graphs import read_sidecar
from labkit.measure.quality import latency
from labkit.measure.replay import measurement

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
IO_MODES = ("numpy", "ortvalue", "binding")
DEFAULT_IO = "numpy"  # OrtStepper, translator(), labkit bench: "binding" measured no faster on CPU (docstring)
_LOGITS_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}  # preallocatable logits


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("labkit.engines.ort needs ONNX Runtime: `pip install onnxruntime` "
                          "(or onnxruntime-gpu on a CUDA machine)") from exc
    return onnxruntime


# --------------------------------------------------------------------------- sessions


def session_options(threads: int = 1, optimization: str = "all", profile: bool = False, spin: bool = True):
    """Intra-op threads pinned, no inter-op parallelism (one request at a time), chosen graph optimizations.

    `spin=False` makes idle intra-op threads sleep instead of busy-waiting for the next op: slower
    by a hair on an idle machine, far faster where the cores are shared (a server's event loop and
    tokenizer threads, other processes): measured on the ci teacher, int8, 2 threads, 2 busy cores:
    8-15 sentences/s at batch 1 spinning, 83-88 not.
    """
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
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def load_session(path: Path, threads: int = 1, optimization: str = "all",
                 providers: tuple[str, ...] = ("CPUExecutionProvider",), spin: bool = True):
    """One InferenceSession; a corrupt or unreadable file raises a RuntimeError naming it."""
    ort = _ort()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; re-export with labkit.engines.onnx_export.export")
    try:
        return ort.InferenceSession(str(path), session_options(threads, optimization, spin=spin),
                                    providers=list(providers))
    except Exception as exc:  # ORT raises its own pybind exception types (InvalidProtobuf, Fail, ...)
        raise RuntimeError(f"ONNX Runtime cannot load {path}: {exc.__class__.__name__}: {str(exc)[:300]}. "
                           "The file is corrupt or incomplete; re-export it (labkit.engines.onnx_export.export)") from exc


def load_sessions(directory: Path | str, threads: int = 1, optimization: str = "all",
                  providers: tuple[str, ...] = ("CPUExecutionProvider",), spin: bool = True) -> dict[str, Any]:
    """{graph: InferenceSession} for encoder, decoder, decoder_with_past of an export directory."""

    directory = Path(directory)
    meta = read_sidecar(directory)
    return {graph: load_session(directory / name, threads, optimization, providers, spin)
            for graph, name in meta["files"].items()}


# --------------------------------------------------------------------------- stepper


@dataclass
class OrtState:
    mask: np.ndarray  # (rows, S) int64 source mask
    encoder: Any | None  # (rows, S, D) numpy or OrtValue, until the first step has turned it into cross K/V
    past: list | None = None  # self-attention K/V per layer (k0, v0, k1, v1, ...): numpy or OrtValue
    cross: list | None = None  # cross-attention K/V per layer, computed once per source
    sources: np.ndarray | None = None  # source row of each row; rows of one source share mask and cross K/V
    binding: Any = None  # io="binding": decoder_with_past IOBinding, mask and cross K/V already bound
    logits: np.ndarray | None = None  # io="binding": (rows, V) buffer ORT writes every step's logits into


def _numpy(value) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()  # OrtValue.numpy() is a view on CPU


def _ortvalue(array: np.ndarray):
    """Wraps the numpy buffer (no copy); the OrtValue keeps the array alive."""
    return _ort().OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def _take(values: list | None, idx: np.ndarray, wrap: bool) -> list | None:
    """Rows idx of every tensor (one copy each); wrap=True returns OrtValues, for binding."""
    if values is None:
        return None
    rows = [np.take(_numpy(v), idx, axis=0) for v in values]
    return [_ortvalue(r) for r in rows] if wrap else rows


class OrtStepper:
    """Stepper over encoder / decoder / decoder_with_past InferenceSessions."""

    def __init__(self, sessions: dict[str, Any], meta: dict, io: str = DEFAULT_IO):
        if io not in IO_MODES:
            raise ValueError(f"io must be one of {IO_MODES}, got {io!r}")
        self.sessions, self.meta, self.io = sessions, meta, io
        shape = meta["model"]
        self.start_id, self.eos_id, self.pad_id = shape["start_id"], shape["eos_id"], shape["pad_id"]
        self.n_layers = shape["decoder_layers"]
        self._outputs = {g: [o.name for o in s.get_outputs()] for g, s in sessions.items()}
        self._inputs = {g: [i.name for i in s.get_inputs()] for g, s in sessions.items()}
        self._vocab = shape["vocab_size"]
        if io == "binding":  # logits of a known dtype go into a preallocated buffer; others ORT allocates
            self._logits_type = _LOGITS_TYPES.get(sessions["decoder_with_past"].get_outputs()[0].type)

    @classmethod
    def from_dir(cls, directory: Path | str, threads: int = 1, optimization: str = "all", io: str = DEFAULT_IO,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",), spin: bool = True) -> OrtStepper:
        """OrtStepper.from_dir(ensure_onnx("ci"), threads=2) — any labkit ONNX directory (spin: session_options)."""
        meta = read_sidecar(directory)
        return cls(load_sessions(directory, threads, optimization, providers, spin), meta, io)

    def _run(self, graph: str, feed: dict[str, Any]) -> list:
        if self.io == "numpy":
            return self.sessions[graph].run(self._outputs[graph], {k: _numpy(v) for k, v in feed.items()})
        ort = _ort()
        values = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v)
                  for k, v in feed.items()}
        return self.sessions[graph].run_with_ort_values(self._outputs[graph], values)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> OrtState:
        ids, mask = input_ids.numpy().astype(np.int64), attention_mask.numpy().astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": mask}
        if self.io == "binding":
            (hidden,) = self._run_bound("encoder", self._binding("encoder"), feed)  # stays an ORT-owned OrtValue
        else:
            (hidden,) = self.sessions["encoder"].run(None, feed)
        return OrtState(mask, hidden, sources=np.arange(len(ids)))

    def step(self, tokens: torch.Tensor, state: OrtState) -> tuple[torch.Tensor, OrtState]:
        if self.io == "binding":
            return self._step_bound(tokens, state)
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
        """Rows `index` of every cached tensor (beam expansion and reorder); copies, as HF's reorder does.

        io="binding" copies only what changes: nothing for the identity, and only the
        self-attention K/V when every row keeps its source (beam reorders within a
        source's beams), since mask and cross K/V are the same for all rows of a source.
        """
        idx = index.numpy()
        before = state.sources if state.sources is not None else np.arange(len(state.mask))
        sources = before[idx]
        if self.io != "binding":
            return OrtState(state.mask[idx], None if state.encoder is None else _numpy(state.encoder)[idx],
                            _take(state.past, idx, False), _take(state.cross, idx, False), sources)
        if np.array_equal(idx, np.arange(len(state.mask))):
            return state
        past = _take(state.past, idx, wrap=True)
        if state.cross is not None and np.array_equal(sources, before):
            return replace(state, past=past)  # mask, cross K/V and logits buffer stay bound
        encoder = None if state.encoder is None else _take([state.encoder], idx, wrap=True)[0]
        cross = _take(state.cross, idx, wrap=True)
        state = OrtState(state.mask[idx], encoder, past, cross, sources)
        return state if cross is None else self._with_past(state)

    # ----------------------------------------------------------------------- io="binding"

    def _binding(self, graph: str, logits: np.ndarray | None = None):
        """A fresh IOBinding of `graph`; `logits`, when given, is the buffer ORT writes logits into."""
        binding = self.sessions[graph].io_binding()
        if logits is not None:
            binding.bind_output("logits", "cpu", 0, logits.dtype, logits.shape, logits.ctypes.data)
        return binding

    def _run_bound(self, graph: str, binding, inputs: dict[str, Any], preallocated: bool = False) -> list:
        """Bind `inputs` (numpy or OrtValue), give every output a fresh ORT-allocated CPU value, run.

        Outputs are rebound before every run because ORT would otherwise write into the
        values it returned last time, which are this step's past. A preallocated logits
        buffer stays bound.
        """
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, _ortvalue(value) if isinstance(value, np.ndarray) else value)
        for name in self._outputs[graph]:
            if not (preallocated and name == "logits"):
                binding.bind_output(name, "cpu")
        self.sessions[graph].run_with_iobinding(binding)
        return binding.get_outputs()

    def _logits_buffer(self, rows: int) -> np.ndarray | None:
        return None if self._logits_type is None else np.empty((rows, self._vocab), self._logits_type)

    def _with_past(self, state: OrtState, logits: np.ndarray | None = None) -> OrtState:
        """A decoder_with_past binding with mask, cross K/V and logits buffer bound once, for every later step."""
        logits = logits if logits is not None else self._logits_buffer(len(state.mask))
        binding = self._binding("decoder_with_past", logits)
        names = self._inputs["decoder_with_past"][2 + 2 * self.n_layers:]
        binding.bind_ortvalue_input("encoder_attention_mask", _ortvalue(state.mask))
        for name, value in zip(names, state.cross):
            binding.bind_ortvalue_input(name, value)
        return replace(state, binding=binding, logits=logits)

    def _step_bound(self, tokens: torch.Tensor, state: OrtState) -> tuple[torch.Tensor, OrtState]:
        """One step with IOBinding; the returned logits alias the state's buffer until its next step."""
        n = 2 * self.n_layers
        if state.cross is None:
            logits = self._logits_buffer(len(state.mask))
            feed = {"input_ids": tokens.numpy().astype(np.int64), "encoder_attention_mask": state.mask,
                    "encoder_hidden_states": state.encoder}
            out = self._run_bound("decoder", self._binding("decoder", logits), feed, logits is not None)
            state = self._with_past(replace(state, encoder=None, past=out[1:1 + n], cross=out[1 + n:]), logits)
        else:
            names = self._inputs["decoder_with_past"]
            feed = dict(zip([names[0], *names[2:2 + n]], [tokens[:, -1:].numpy().astype(np.int64), *state.past]))
            out = self._run_bound("decoder_with_past", state.binding, feed, state.logits is not None)
            state = replace(state, past=out[1:])
        logits = state.logits if state.logits is not None else _numpy(out[0])
        return torch.from_numpy(logits).float(), state


# --------------------------------------------------------------------------- translators and measurement


def translator(directory: Path | str, bundle, preset, *, threads: int | None = None, optimization: str = "all",
               io: str = DEFAULT_IO, num_beams: int = 1):
    """A Translator over an export directory, decoding as the preset says (tokenizer from `bundle`)."""

    stepper = OrtStepper.from_dir(directory, threads=threads or preset.threads, optimization=optimization, io=io)
    return translator_for(bundle, preset, stepper, num_beams=num_beams)


@measurement
def translate_ids(translator, texts: list[str], batch_size: int = 16) -> tuple[list[list[int]], list[str]]:
    """Generated ids and texts for `texts`, in batches (the ids feed evaluate.agreement)."""

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
    io: str = DEFAULT_IO

    @property
    def label(self) -> str:
        return f"ort {self.optimization}/{self.io}"


SESSION_CONFIGS = (SessionConfig("disable", "numpy"), SessionConfig("basic", "numpy"),
                   SessionConfig("all", "numpy"), SessionConfig("all", "ortvalue"), SessionConfig("all", "binding"))


@measurement
def session_sweep(directory: Path | str, bundle, preset, texts: list[str],
                  configs: tuple[SessionConfig, ...] = SESSION_CONFIGS) -> dict[str, Any]:
    """{label: Measurement} of batch-1 latency (labkit.measure.quality.latency) per session setting."""

    return {c.label: latency(translator(directory, bundle, preset, optimization=c.optimization, io=c.io),
                             texts, preset, label=c.label) for c in configs}
