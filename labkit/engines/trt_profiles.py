"""TensorRT optimization profiles for the three graphs, derived from a preset, and the commands that use them.

An engine with dynamic shapes runs any shape between a profile's `min` and `max` and is tuned for its
`opt`. Every dynamic axis of labkit's graphs has one range (the names are labkit.engines.onnx_export's
dynamic axes): batch 1..preset.batch_size, source 1..the translator's input limit, past 0..the decode
limit, and the opt point at the median test sentence (batch 1, its source length, half its output
length: the middle of its decode).

    axes = profile_axes(preset, tokenizer, meta["model"])  # Axes(batch=Dim(1, 1, 16), source=Dim(1, 12, 256), ...)
    graph_profile("encoder", axes, meta["model"])  # {'input_ids': {'min': [1, 1], 'opt': [1, 12], 'max': [16, 256]}, ...}
    trtexec_command("encoder", "encoder_model.onnx", profile)  # 'trtexec --onnx=encoder_model.onnx --stronglyTyped ...'

`write_profiles` puts the profiles and the exact `trtexec` and `polygraphy run --trt --onnxrt` commands
in `tensorrt.json` next to the graphs. Left out: several profiles per engine (one per batch bucket)
and beam search's batch x beams rows beyond max batch (pass max_rows).
"""

from __future__ import annotations

import json
import shlex
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from labkit.core.artifacts import write_json_atomic
from labkit.core.data import load_split
from labkit.core.translator import DEFAULT_MAX_INPUT_TOKENS
from labkit.engines.onnx_graphs import dynamic_axes, io_names, read_sidecar

SCHEMA = "labkit.trt-profiles/1"
FILE = "tensorrt.json"
WORKSPACE_MB = 4096  # builder scratch memory; ample for these graphs, and TensorRT only uses what a tactic needs
TIMING_CACHE = "timing.cache"  # shared by the three builds of a directory: a rebuild skips kernel timing


@dataclass(frozen=True)
class Dim:
    """One dynamic axis of a profile: Dim(1, 12, 256) tunes for 12 and runs 1..256."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 0 <= self.min <= self.opt <= self.max:
            raise ValueError(f"a profile axis needs 0 <= min <= opt <= max, got {self}")


@dataclass(frozen=True)
class Axes:
    batch: Dim  # rows: sentences (x beams)
    source: Dim  # source tokens, </s> included
    target: Dim  # prefix fed to the first decoder step (labkit's loop feeds the start token only)
    past: Dim  # self-attention positions already cached

    def of(self, label: str) -> Dim:
        """A dynamic axis label of onnx_export.dynamic_axes -> its Dim ('past+1' is an output's)."""
        return {"batch": self.batch, "source": self.source, "target": self.target, "past": self.past}[label]


def median_lengths(preset, tokenizer, split: str = "test") -> tuple[int, int]:
    """Median (source tokens, output tokens) of the preset's test sentences, </s> included.

    Output length is the reference's on quality presets, the forced length on speed-only ones.
    """
    pairs = load_split(split, limit=preset.eval_sentences or None)
    if not pairs:
        raise ValueError(f"no {split} sentences to take a median from")
    source = statistics.median_low(len(ids) for ids in tokenizer([p.zh for p in pairs])["input_ids"])
    if preset.forced_length is not None:
        return source, preset.forced_length
    target = statistics.median_low(len(ids) for ids in tokenizer(text_target=[p.en for p in pairs])["input_ids"])
    return source, target


def profile_axes(preset, tokenizer, shape: dict, max_rows: int | None = None) -> Axes:
    """The preset's profile: batch 1..max_rows (default preset.batch_size), source 1..input limit,
    past 0..decode limit; opt = batch 1 and the median test sentence, halfway through its decode."""
    limit = preset.forced_length or preset.max_new_tokens
    max_source = min(shape["max_positions"], DEFAULT_MAX_INPUT_TOKENS)  # what the Translator truncates to
    source, target = median_lengths(preset, tokenizer)
    return Axes(batch=Dim(1, 1, max_rows or preset.batch_size), source=Dim(1, min(source, max_source), max_source),
                target=Dim(1, 1, limit), past=Dim(0, min(target // 2, limit), limit))


def input_dims(graph: str, name: str, shape: dict) -> list[str | int]:
    """One input's dims, dynamic ones by label: ('decoder_with_past', 'past_key_self_1') ->
    ['batch', heads[1], 'past', head_dim]."""
    axes = dynamic_axes(graph, shape["decoder_layers"])[name]
    layer = int(name.rsplit("_", 1)[1]) if name.startswith(("past_", "cross_")) else None
    if name.startswith(("past_", "cross_")):
        heads = shape["heads" if name.startswith("past_") else "cross_heads"][layer]
        static = [None, heads, None, shape["head_dim"]]
    elif name == "encoder_hidden_states":
        static = [None, None, shape["d_model"]]
    else:
        static = [None, 1] if graph == "decoder_with_past" and name == "input_ids" else [None, None]
    return [axes.get(i, s) for i, s in enumerate(static)]


def graph_profile(graph: str, axes: Axes, shape: dict) -> dict[str, dict[str, list[int]]]:
    """{input: {'min': dims, 'opt': dims, 'max': dims}} of one graph, in input order."""
    out = {}
    for name in io_names(graph, shape["decoder_layers"])[0]:
        dims = input_dims(graph, name, shape)
        out[name] = {k: [getattr(axes.of(d), k) if isinstance(d, str) else d for d in dims]
                     for k in ("min", "opt", "max")}
    return out


# --------------------------------------------------------------------------- commands


def _shapes(profile: dict, which: str, sep: str, fmt, quote: bool = False) -> str:
    items = (f"{name}:{fmt(p[which])}" for name, p in profile.items())
    return sep.join(shlex.quote(i) if quote else i for i in items)


def _x(dims: list[int]) -> str:
    return "x".join(map(str, dims))


def _brackets(dims: list[int]) -> str:
    return "[" + ",".join(map(str, dims)) + "]"





def engine_file(onnx_file: str) -> str:
    """encoder_model.onnx -> encoder_model.plan"""
    return Path(onnx_file).with_suffix(".plan").name


def trtexec_command(onnx_file: str, profile: dict, workspace_mb: int = WORKSPACE_MB) -> str:
    """Build one strongly typed engine from one graph: precision comes from the graph, so no --fp16/--int8."""
    return (f"trtexec --onnx={onnx_file} --stronglyTyped "
            f"--minShapes={_shapes(profile, 'min', ',', _x)} --optShapes={_shapes(profile, 'opt', ',', _x)} "
            f"--maxShapes={_shapes(profile, 'max', ',', _x)} --memPoolSize=workspace:{workspace_mb}M "
            f"--timingCacheFile={TIMING_CACHE} --saveEngine={engine_file(onnx_file)}")


def value_ranges(graph: str, shape: dict) -> dict[str, list[int]]:
    """Valid input values for random data: token ids below the vocabulary, masks all ones."""
    ranges = {"input_ids": [0, shape["vocab_size"] - 1]}
    for name in io_names(graph, shape["decoder_layers"])[0]:
        if name.endswith("attention_mask"):
            ranges[name] = [1, 1]
    return ranges


def polygraphy_command(graph: str, onnx_file: str, profile: dict, shape: dict, atol: float, rtol: float,
                       workspace_mb: int = WORKSPACE_MB) -> str:
    """Run one graph in TensorRT and in ONNX Runtime on the same random inputs (opt shapes) and compare."""
    # name:[dims] is shell-quoted: zsh, and bash with failglob, read unquoted brackets as a glob
    ranges = " ".join(shlex.quote(f"{n}:{_brackets(r)}") for n, r in value_ranges(graph, shape).items())
    return (f"polygraphy run {onnx_file} --trt --onnxrt --strongly-typed "
            f"--trt-min-shapes {_shapes(profile, 'min', ' ', _brackets, True)} "
            f"--trt-opt-shapes {_shapes(profile, 'opt', ' ', _brackets, True)} "
            f"--trt-max-shapes {_shapes(profile, 'max', ' ', _brackets, True)} "
            f"--input-shapes {_shapes(profile, 'opt', ' ', _brackets, True)} --val-range {ranges} "
            f"--pool-limit workspace:{workspace_mb}M --atol {atol:g} --rtol {rtol:g}")


def profiles_for(directory: Path | str, axes: Axes, atol: float, rtol: float) -> dict:
    """What `write_profiles` stores: the axes, each graph's profile and its two commands."""
    meta = read_sidecar(directory)
    shape = meta["model"]
    profiles = {g: graph_profile(g, axes, shape) for g in meta["files"]}
    return {"schema": SCHEMA, "precision": meta.get("precision"), "axes": asdict(axes), "profiles": profiles,
            "workspace_mb": WORKSPACE_MB, "timing_cache": TIMING_CACHE,
            "trtexec": {g: trtexec_command(f, profiles[g]) for g, f in meta["files"].items()},
            "polygraphy": {g: polygraphy_command(g, f, profiles[g], shape, atol, rtol)
                           for g, f in meta["files"].items()},
            "run_in": str(Path(directory).resolve())}


def write_profiles(directory: Path | str, axes: Axes, atol: float, rtol: float) -> dict:
    """Write `tensorrt.json` (profiles + commands) into an export directory, atomically; returns it."""
    record = profiles_for(directory, axes, atol, rtol)
    write_json_atomic(Path(directory) / FILE, record)
    return record


def read_profiles(directory: Path | str) -> dict:
    """The stored profiles of a directory; a clear error when `write_profiles` never ran there."""
    path = Path(directory) / FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: write it with labkit.engines.trt_profiles.write_profiles")
    record = json.loads(path.read_text())
    if record.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {record.get('schema')!r}, expected {SCHEMA!r}")
    return record
