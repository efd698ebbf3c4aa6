"""The whole greedy/beam loop inside ONNX Runtime: one BeamSearch node over the lab's own graphs.

    loop = ensure_loop(preset, bundle)                       # artifacts/ci/ort-loop-teacher
    LoopTranslator(loop, bundle.tokenizer, decode_config(preset)).translate(["我喜欢猫。"])  # ['I like cats.']

labkit.core.decode drives three sessions from Python, one `run` per token. Here ONNX Runtime's
com.microsoft `BeamSearch` contrib operator (encoder-decoder mode, `model_type=1`, the layout its
T5/BART converters write) runs the loop in C++: one `run` per batch. Its two subgraphs are the
export directory's own graphs (fp32 from labkit.engines.onnx_export, or an int8 copy from
labkit.engines.ort_int8), renamed and retyped rather than exported again, so the loop and the Python
loop run exactly the same weights and ops:

    encoder subgraph  encoder_input_ids, encoder_attention_mask, decoder_input_ids (int32)
                      = encoder graph -> decoder (first step) graph
                      -> logits (B,1,V), encoder_hidden_states, present_key/value_self_i, present_key/value_cross_i
    decoder subgraph  input_ids (B,1), encoder_attention_mask (int32), past_key/value_self_i, past_key/value_cross_i
                      = decoder_with_past graph -> logits (B,1,V), present_key/value_self_i

Marian's differences from T5 need nothing from the operator: the decoder_with_past graph already
derives the sinusoidal position from the past length and adds `final_logits_bias` and the embedding
scale. Greedy is BeamSearch with num_beams=1 (ORT's GreedySearch runs decoder-only models only).

How labkit.core.decode's rules map onto the operator (checked token for token by the tests):
- never <pad>: `vocab_mask` 0 at pad, applied after log-softmax as decode.constrain does;
- </s> forced at max_new_tokens: max_length = max_new_tokens (start token included), so at most
  max_new_tokens - 1 tokens; a beam cut there is scored as if it had ended with a forced </s> (log-prob 0)
  over the same length, which is how the operator finalizes open beams;
- forced_length (speed presets): </s> masked too, max_length = forced_length + 1: every row runs
  exactly forced_length steps, the same work as the Python loop;
- length penalty: both divide a finished beam's log-prob by its generated length (with </s>);
- greedy is exact: one beam on the early-stopping model stops a row at its first </s>.

Beam search (K > 1) is not always identical, for two reasons in the operator (ORT 1.32 CPU,
contrib_ops/cpu/transformers/beam_search_scorer.cc), both reproduced token for token by a Python
simulation on the tiny teacher's 24 test sentences:
- its stopping test bounds the running beams by the best of the step's 2K candidates, </s> ones
  included (transformers 4.x's rule), where transformers 5 and labkit.core.decode use the best running
  beam; so it may search on after Python stopped and keep a later, better-normalized hypothesis.
  labkit.core.decode with `DecodeConfig(stop_rule="candidates")` reproduces the operator exactly;
- batched, that test reads `next_scores.subspan(batch * num_beams, 2 * num_beams)` (the wrong rows for
  every batch after the first) and finished batches feed score-0 pad beams into those rows, so a
  sentence's beam result depends on its batch neighbours. LoopTranslator therefore runs beam search
  one sentence per call; greedy stays batched (the early-stopping model never reads those scores).

Left out: sampling, int64 outputs (the operator speaks int32), and weight sharing between the two
subgraphs or the two models (each keeps its copy, as the Python loop's decoder and decoder_with_past
sessions do).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from labkit.config import Preset
from labkit.core.artifacts import digest, ensure, preset_dir, read_json, write_json_atomic
from labkit.core.bundle import Bundle, bundle_key
from labkit.core.decode import DecodeConfig, strip
from labkit.core.translator import DEFAULT_MAX_INPUT_TOKENS, Translator, decode_config
from labkit.engines.onnx_export import ensure_onnx
from labkit.engines.onnx_graphs import SIDECAR, kv_names, read_sidecar
from labkit.engines.ort import load_session
from labkit.engines.ort_int8 import ensure_quantized

SCHEMA = "labkit.ort-loop/1"
LOOP_SIDECAR = "loop.json"
LOOP_FILES = {False: "loop_model.onnx", True: "loop_model_early_stop.onnx"}  # early_stopping attribute -> file
INLINE_LIMIT_MB = 1800  # protobuf's hard limit is 2 GB; above this the weights go to a side file
MS_DOMAIN = "com.microsoft"


# --------------------------------------------------------------------------- primitives: names and small nodes


def self_names(prefix: str, n_layers: int) -> list[str]:
    """self_names("past", 1) -> ['past_key_self_0', 'past_value_self_0'] (the lab's and ORT's names agree)."""
    return kv_names(prefix, n_layers)


def ort_cross_names(prefix: str, n_layers: int) -> list[str]:
    """ort_cross_names("past", 1) -> ['past_key_cross_0', 'past_value_cross_0'] (the lab's: cross_key_0, ...)."""
    return [f"{prefix}_{kind}_cross_{i}" for i in range(n_layers) for kind in ("key", "value")]


def lab_cross_names(n_layers: int) -> list[str]:
    return [f"cross_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def _value(name: str, elem_type: int, dims: list) -> object:
    import onnx

    return onnx.helper.make_tensor_value_info(name, elem_type, dims)


def _cast64(src: str, dst: str):
    import onnx

    return onnx.helper.make_node("Cast", [src], [dst], to=onnx.TensorProto.INT64, name=f"cast_{dst}")


def _identity(src: str, dst: str):
    import onnx

    return onnx.helper.make_node("Identity", [src], [dst], name=f"id_{dst}")


def _unsqueeze_logits(src: str, axes: str):
    """(B, V) -> (B, 1, V): the operator reads the last position of (B, T, V) logits."""
    import onnx

    return onnx.helper.make_node("Unsqueeze", [src, axes], ["logits"], name="unsqueeze_logits")


def _axes_initializer(name: str):
    import onnx

    return onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), name)


def _prefixed(path: Path, prefix: str):
    """A graph loaded with every internal name prefixed, so two graphs can live in one subgraph."""
    import onnx
    from onnx import compose

    model = onnx.load(str(path))
    return model, compose.add_prefix(model, prefix).graph


# --------------------------------------------------------------------------- transforms: the two subgraphs


def encoder_subgraph(encoder_path: Path, decoder_path: Path, shape: dict):
    """Encoder + first decoder step as the operator's encoder subgraph (old T5 layout: logits first)."""
    import onnx

    f32, i32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
    n, heads, hd, vocab = shape["decoder_layers"], shape["heads"][0], shape["head_dim"], shape["vocab_size"]
    _, enc = _prefixed(encoder_path, "e_")
    _, dec = _prefixed(decoder_path, "d_")
    glue = [_cast64("encoder_input_ids", "e_input_ids"), _cast64("encoder_attention_mask", "e_attention_mask"),
            _identity("e_attention_mask", "d_encoder_attention_mask"), _cast64("decoder_input_ids", "d_input_ids")]
    bridge = [_identity("e_encoder_hidden_states", "d_encoder_hidden_states")]
    tail = [_unsqueeze_logits("d_logits", "unsqueeze_axes"),
            _identity("e_encoder_hidden_states", "encoder_hidden_states")]
    tail += [_identity(f"d_{a}", b) for a, b in zip(self_names("present", n), self_names("present", n))]
    tail += [_identity(f"d_{a}", b) for a, b in zip(lab_cross_names(n), ort_cross_names("present", n))]
    inputs = [_value("encoder_input_ids", i32, ["batch", "source"]),
              _value("encoder_attention_mask", i32, ["batch", "source"]),
              _value("decoder_input_ids", i32, ["batch", 1])]
    outputs = [_value("logits", f32, ["batch", 1, vocab]),
               _value("encoder_hidden_states", f32, ["batch", "source", shape["d_model"]])]
    outputs += [_value(name, f32, ["batch", heads, 1, hd]) for name in self_names("present", n)]
    outputs += [_value(name, f32, ["batch", heads, "source", hd]) for name in ort_cross_names("present", n)]
    return onnx.helper.make_graph(glue + list(enc.node) + bridge + list(dec.node) + tail, "marian encoder and first step",
                                  inputs, outputs,
                                  [*enc.initializer, *dec.initializer, _axes_initializer("unsqueeze_axes")])


def decoder_subgraph(with_past_path: Path, shape: dict):
    """The decoder_with_past graph as the operator's decoder subgraph (int32 ids and mask, ORT's cache names)."""
    import onnx

    f32, i32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
    n, heads, hd, vocab = shape["decoder_layers"], shape["heads"][0], shape["head_dim"], shape["vocab_size"]
    _, dec = _prefixed(with_past_path, "p_")
    glue = [_cast64("input_ids", "p_input_ids"), _cast64("encoder_attention_mask", "p_encoder_attention_mask")]
    glue += [_identity(name, f"p_{name}") for name in self_names("past", n)]
    glue += [_identity(a, f"p_{b}") for a, b in zip(ort_cross_names("past", n), lab_cross_names(n))]
    tail = [_unsqueeze_logits("p_logits", "unsqueeze_axes")]
    tail += [_identity(f"p_{name}", name) for name in self_names("present", n)]
    # input_ids' second dim is the literal 1: the operator then feeds only the newest token
    inputs = [_value("input_ids", i32, ["batch", 1]), _value("encoder_attention_mask", i32, ["batch", "source"])]
    inputs += [_value(name, f32, ["batch", heads, "past", hd]) for name in self_names("past", n)]
    inputs += [_value(name, f32, ["batch", heads, "source", hd]) for name in ort_cross_names("past", n)]
    outputs = [_value("logits", f32, ["batch", 1, vocab])]
    outputs += [_value(name, f32, ["batch", heads, "past+1", hd]) for name in self_names("present", n)]
    return onnx.helper.make_graph(glue + list(dec.node) + tail, "marian decoder step", inputs, outputs,
                                  [*dec.initializer, _axes_initializer("unsqueeze_axes")])


LOOP_INPUTS = ("input_ids", "max_length", "min_length", "num_beams", "num_return_sequences", "length_penalty",
               "repetition_penalty", "vocab_mask", "", "attention_mask")


def loop_model(onnx_dir: Path, early_stopping: bool = False):
    """The BeamSearch model over an export directory's graphs (any labkit.engines.onnx_export layout)."""
    import onnx

    meta, onnx_dir = read_sidecar(onnx_dir), Path(onnx_dir)
    shape, files = meta["model"], meta["files"]
    if len(set(shape["heads"])) > 1:
        raise ValueError(f"{onnx_dir}: the BeamSearch operator needs one head count for every layer, got {shape['heads']}")
    sources = [onnx.load(str(onnx_dir / files[g]), load_external_data=False) for g in files]
    node = onnx.helper.make_node(
        "BeamSearch", list(LOOP_INPUTS), ["sequences"], name="marian_beam_search", domain=MS_DOMAIN,
        eos_token_id=shape["eos_id"], pad_token_id=shape["pad_id"], decoder_start_token_id=shape["start_id"],
        no_repeat_ngram_size=0, early_stopping=int(early_stopping), model_type=1, vocab_size=shape["vocab_size"],
        encoder=encoder_subgraph(onnx_dir / files["encoder"], onnx_dir / files["decoder"], shape),
        decoder=decoder_subgraph(onnx_dir / files["decoder_with_past"], shape))
    i32, f32 = onnx.TensorProto.INT32, onnx.TensorProto.FLOAT
    inputs = [_value("input_ids", i32, ["batch", "source"])]
    inputs += [_value(name, i32, [1]) for name in ("max_length", "min_length", "num_beams", "num_return_sequences")]
    inputs += [_value(name, f32, [1]) for name in ("length_penalty", "repetition_penalty")]
    inputs += [_value("vocab_mask", i32, [shape["vocab_size"]]), _value("attention_mask", i32, ["batch", "source"])]
    graph = onnx.helper.make_graph([node], "marian loop", inputs,
                                   [_value("sequences", i32, ["batch", "num_return_sequences", "max_length"])])
    opsets = {}
    for src in sources:
        for imp in src.opset_import:
            opsets[imp.domain] = max(opsets.get(imp.domain, 0), imp.version)
    opsets[MS_DOMAIN] = max(opsets.get(MS_DOMAIN, 0), 1)
    model = onnx.helper.make_model(graph, producer_name="labkit.engines.ort_loop",
                                   opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = max(src.ir_version for src in sources)
    return model


def write_loop(onnx_dir: Path | str, directory: Path) -> dict:
    """Assemble both loop models of `onnx_dir` (early_stopping off and on) into `directory`; the sidecar."""
    import onnx

    model = loop_model(Path(onnx_dir))
    external = model.ByteSize() > INLINE_LIMIT_MB * 2**20
    for early, name in LOOP_FILES.items():
        for attr in model.graph.node[0].attribute:
            if attr.name == "early_stopping":
                attr.i = int(early)
        onnx.save_model(model, str(directory / name), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=name + ".data", size_threshold=1024)
    parent = read_sidecar(onnx_dir)
    meta = {"schema": SCHEMA, "files": {str(k).lower(): v for k, v in LOOP_FILES.items()},
            "file_bytes": {p.name: p.stat().st_size for p in directory.iterdir()}, "source": str(onnx_dir),
            "precision": parent.get("precision", "fp32"), "model": parent["model"], "external_data": external}
    write_json_atomic(directory / LOOP_SIDECAR, meta)
    return meta


# --------------------------------------------------------------------------- runtime


def read_loop_sidecar(directory: Path | str) -> dict:
    """The loop directory's sidecar; a missing, corrupt or truncated artifact raises naming what to rebuild."""
    directory = Path(directory)
    meta = read_json(directory / LOOP_SIDECAR)
    if meta is None or meta.get("schema") != SCHEMA:
        raise FileNotFoundError(f"{directory} holds no {SCHEMA} loop model ({LOOP_SIDECAR} missing or corrupt); "
                                "rebuild it with labkit.engines.ort_loop.ensure_loop")
    for name, size in meta["file_bytes"].items():
        if not (directory / name).exists() or (directory / name).stat().st_size != size:
            raise RuntimeError(f"{directory / name} is missing or truncated (expected {size} bytes); "
                               "rebuild it with labkit.engines.ort_loop.ensure_loop")
    return meta


def contrib_missing_reason() -> str | None:
    """Why this ONNX Runtime cannot run the loop (no com.microsoft BeamSearch kernel), or None."""
    try:
        import onnxruntime
    except ImportError:
        return "ONNX Runtime is not installed: `pip install onnxruntime`"
    build = getattr(onnxruntime, "get_build_info", lambda: "")()
    if "disable_contrib_ops" in build.lower():
        return f"this ONNX Runtime ({onnxruntime.__version__}) was built without contrib ops (BeamSearch)"
    return None


def load_loop_session(directory: Path | str, early_stopping: bool = True, threads: int = 1, spin: bool = True):
    """The loop's InferenceSession; a runtime without the BeamSearch contrib kernel raises saying so."""
    directory = Path(directory)
    read_loop_sidecar(directory)
    reason = contrib_missing_reason()
    if reason:
        raise RuntimeError(f"cannot run {directory}: {reason}")
    try:
        return load_session(directory / LOOP_FILES[early_stopping], threads, spin=spin)
    except RuntimeError as exc:
        if "not a registered function/op" in str(exc) or "Could not find an implementation" in str(exc):
            raise RuntimeError(f"ONNX Runtime has no {MS_DOMAIN} BeamSearch kernel for {directory}: install the "
                               "standard onnxruntime wheel (contrib ops included)") from exc
        raise


def loop_feed(input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: DecodeConfig, shape: dict) -> dict:
    """The operator's inputs for labkit.core.decode's rules (module docstring: how each one maps)."""
    mask = np.ones(shape["vocab_size"], dtype=np.int32)
    mask[shape["pad_id"]] = 0
    if cfg.forced_length is not None:
        mask[shape["eos_id"]] = 0
        max_length = cfg.forced_length + 1
    else:
        max_length = cfg.max_new_tokens

    def one(value, dtype):
        return np.array([value], dtype=dtype)

    return {"input_ids": input_ids.numpy().astype(np.int32), "max_length": one(max_length, np.int32),
            "min_length": one(0, np.int32), "num_beams": one(cfg.num_beams, np.int32),
            "num_return_sequences": one(1, np.int32), "length_penalty": one(cfg.length_penalty, np.float32),
            "repetition_penalty": one(1.0, np.float32), "vocab_mask": mask,
            "attention_mask": attention_mask.numpy().astype(np.int32)}


class LoopTranslator(Translator):
    """A Translator whose generate is ONNX Runtime calls that run encoding and every decode step in C++.

    Greedy: one call per batch, on the early-stopping model (with one beam the operator then stops a
    row at its first </s>, exactly greedy, whatever the other rows do). Beam search: one call per
    sentence, because the operator's batched stopping test reads its neighbours' scores (module
    docstring); a translation must not depend on which sentences share its batch. The stages before
    and after (bad input, truncation, detokenizing) are the base's, so it says the same things as every
    other engine. Encoding happens inside the same call: it is timed under "decode", "encode" stays 0.
    """

    def __init__(self, directory: Path | str, tokenizer, decode: DecodeConfig | None = None, threads: int = 1,
                 spin: bool = True, max_input_tokens: int | None = None, force: bool = False):
        self.directory, self.meta = Path(directory), read_loop_sidecar(directory)
        shape = self.meta["model"]
        super().__init__(tokenizer, decode, max_input_tokens, shape.get("max_positions", DEFAULT_MAX_INPUT_TOKENS),
                         force)
        self.threads, self.spin = threads, spin
        self.sessions = {True: load_loop_session(directory, True, threads, spin)}  # greedy's; beam's on first use
        self.eos_id, self.pad_id, self.start_id = shape["eos_id"], shape["pad_id"], shape["start_id"]

    def session(self, early_stopping: bool):
        if early_stopping not in self.sessions:
            self.sessions[early_stopping] = load_loop_session(self.directory, early_stopping, self.threads, self.spin)
        return self.sessions[early_stopping]

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: DecodeConfig) -> list[list[int]]:
        feed = loop_feed(input_ids, attention_mask, cfg, self.meta["model"])
        (sequences,) = self.session(cfg.num_beams == 1 or bool(cfg.early_stopping)).run(["sequences"], feed)
        return [strip(row[1:], self) for row in sequences[:, 0].tolist()]

    def _generate(self, batch: dict[str, torch.Tensor], timings: dict[str, float],
                  cfg: DecodeConfig) -> list[list[int]]:
        start = time.perf_counter()
        if cfg.num_beams == 1:
            out = self._run(batch["input_ids"], batch["attention_mask"], cfg)
        else:
            rows = [(ids[mask.bool()][None], mask[mask.bool()][None])
                    for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
            out = [self._run(ids, mask, cfg)[0] for ids, mask in rows]
        timings["decode"] += (time.perf_counter() - start) * 1e3
        return out


# --------------------------------------------------------------------------- handler


def loop_dir(preset: str, bundle_name: str = "teacher", precision: str = "fp32") -> Path:
    """Where ensure_loop keeps a loop model: <artifacts>/<preset>/ort-loop-<bundle>[-int8]."""
    return preset_dir(preset) / f"ort-loop-{bundle_name}{'' if precision == 'fp32' else f'-{precision}'}"


def ensure_loop(preset: Preset, bundle: Bundle, precision: str = "fp32", source: Path | str | None = None) -> Path:
    """The loop models over the preset's fp32 export (or its default int8 copy, or any `source` export
    directory, e.g. ort-int8-all's graphs, named by `precision`), rebuilt exactly when those graphs
    change (the recipe holds the digest of their sidecar).

        ensure_loop(Preset.from_name("ci"), teacher)            # -> artifacts/ci/ort-loop-teacher
        ensure_loop(Preset.from_name("ci"), teacher, "int8")    # over ensure_quantized's graphs
        ensure_loop(preset, teacher, "int8-all", source=path)   # -> artifacts/ci/ort-loop-teacher-int8-all
    """
    if source is not None:
        src = Path(source)
    elif precision in ("fp32", "int8"):
        src = ensure_onnx(preset, bundle) if precision == "fp32" else ensure_quantized(preset, bundle, "dynamic")
    else:
        raise ValueError(f"precision must be fp32 or int8 without a source directory, got {precision!r}")
    recipe = {"schema": SCHEMA, "files": list(LOOP_FILES.values()), "source": str(src),
              "source_sidecar_sha256": digest(Path(src) / SIDECAR)}

    def valid(path: Path) -> bool:
        try:
            read_loop_sidecar(path)
        except (FileNotFoundError, RuntimeError):
            return False
        return True

    return ensure(loop_dir(preset.name, bundle_key(bundle), precision), LOOP_SIDECAR, recipe,
                  lambda tmp: write_loop(src, tmp), valid)


def loop_translator(preset: Preset, bundle: Bundle, precision: str = "fp32", num_beams: int = 1,
                    threads: int | None = None) -> LoopTranslator:
    """ensure_loop + a LoopTranslator decoding as the preset says."""
    return LoopTranslator(ensure_loop(preset, bundle, precision), bundle.tokenizer,
                          decode_config(preset, num_beams), threads or preset.threads)
