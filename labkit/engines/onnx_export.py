"""Export a bundle to the three ONNX graphs (labkit.engines.onnx_graphs), gate on parity, cache per preset.

    out = export(load_teacher(), "artifacts/ci/onnx-teacher")
    json.loads((out / "onnx.json").read_text())["parity"]["passed"]  # -> True

Both exporters are tried (dynamo first, then TorchScript); the parity gate compares every
output of every graph with PyTorch on shapes unlike the export's. `derive` makes quantized or
optimized copies with the same layout. Left out: fp16 export (labkit.engines.onnx_fp16),
merged decoders with an If node, and exporting generation itself (the loop stays in
labkit.core.decode).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from labkit.config import Preset
from labkit.core.artifacts import ARTIFACT_KEY, ensure, preset_dir, staging
from labkit.core.bundle import Bundle, bundle_key, fingerprint
from labkit.core.decode import cache_kwargs, output_cache
from labkit.engines.onnx_graphs import (
    EXTERNAL_DATA_MB,
    FILES,
    GRAPH_MODULES,
    GRAPHS,
    OPSET,
    SCHEMA,
    SIDECAR,
    _dynamo_shapes,
    dynamic_axes,
    example_inputs,
    file_sizes,
    io_names,
    model_shape,
    read_sidecar,
    write_sidecar,
)
from labkit.engines.ort import load_sessions
from labkit.measure import plots

EXPORTERS = ("dynamo", "torchscript")  # tried in this order

@contextlib.contextmanager
def _quiet(*loggers: str):
    """Raise these loggers to ERROR for the duration (the dynamo exporter logs every skipped
    torchvision op and prints progress lines on each export)."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def export_graph(module: nn.Module, args: tuple, path: Path, graph: str, n_layers: int,
                 exporter: str, opset: int = OPSET) -> None:
    """Write one graph to `path` with the named exporter ('dynamo' or 'torchscript')."""
    inputs, outputs = io_names(graph, n_layers)
    with torch.no_grad(), warnings.catch_warnings(), _quiet("torch.onnx", "torch.export", "onnxscript"):
        warnings.simplefilter("ignore")  # exporter chatter (TracerWarning, deprecations) is not actionable
        if exporter == "dynamo":
            program = torch.onnx.export(module, args, dynamo=True, input_names=inputs, output_names=outputs,
                                        opset_version=opset, dynamic_shapes=_dynamo_shapes(graph, n_layers),
                                        optimize=True, verbose=False)
            program.save(str(path), external_data=False)
        elif exporter == "torchscript":
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=inputs, output_names=outputs,
                              opset_version=opset, dynamic_axes=dynamic_axes(graph, n_layers),
                              do_constant_folding=True)
        else:
            raise ValueError(f"unknown exporter {exporter!r}; known: {EXPORTERS}")


def _check_names(path: Path, graph: str, n_layers: int) -> None:
    """The exported graph must expose exactly our names, in order (exporters may drop unused inputs)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    got = ([i.name for i in proto.graph.input], [o.name for o in proto.graph.output])
    want = io_names(graph, n_layers)
    if list(got) != list(want):
        raise RuntimeError(f"{path.name}: exported names {got} differ from {want}")


def externalize(path: Path, threshold_mb: float | None = EXTERNAL_DATA_MB) -> bool:
    """Move weights to `<file>.data` when the graph is larger than threshold_mb (None: always).

    ONNX files are protobufs capped at 2 GB; ORT finds the side file by the relative
    location stored in the graph, so the directory can move as a whole.
    """
    import onnx

    if threshold_mb is not None and path.stat().st_size < threshold_mb * 2**20:
        return False
    proto = onnx.load(str(path))
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return True


def export_one(model: nn.Module, graph: str, path: Path, exporters: tuple[str, ...] = EXPORTERS,
               opset: int = OPSET) -> str:
    """Export one graph, falling back through `exporters`; returns the one that worked."""
    n = len(model.model.decoder.layers)
    module = GRAPH_MODULES[graph](model).eval()
    errors = []
    for exporter in exporters:
        try:
            export_graph(module, example_inputs(graph, model), path, graph, n, exporter, opset)
            _check_names(path, graph, n)
            return exporter
        except Exception as exc:  # noqa: BLE001 - any exporter failure means: try the next one
            errors.append(f"{exporter}: {exc.__class__.__name__}: {str(exc)[:300]}")
            path.unlink(missing_ok=True)
    raise RuntimeError(f"every exporter failed for {graph}:\n" + "\n".join(errors))


def write_export(bundle, directory: Path, *, exporters: tuple[str, ...] = EXPORTERS, opset: int = OPSET,
                 external_data_mb: float | None = EXTERNAL_DATA_MB, check: bool = True) -> dict:
    """Export `bundle`'s three graphs and their sidecar into `directory` (a staging directory); the sidecar.

    `external_data_mb=None` always writes weights to side files. With `check`, the parity result
    (`parity`) goes into the sidecar, passed or not.
    """
    model = bundle.model.eval()
    used, seconds = {}, {}
    for graph in GRAPHS:
        start = time.perf_counter()
        used[graph] = export_one(model, graph, directory / FILES[graph], exporters, opset)
        externalize(directory / FILES[graph], external_data_mb)
        seconds[graph] = round(time.perf_counter() - start, 1)
    n = len(model.model.decoder.layers)
    meta = {"schema": SCHEMA, "files": dict(FILES), "file_bytes": file_sizes(directory),
            "inputs": {g: io_names(g, n)[0] for g in GRAPHS},
            "outputs": {g: io_names(g, n)[1] for g in GRAPHS},
            "exporter": used, "export_seconds": seconds, "opset": opset, "precision": "fp32",
            "model": model_shape(model), "source": {"name": bundle.name, "meta": bundle.meta},
            "versions": _versions(), "parity": None}
    write_sidecar(directory, meta)
    if check:
        meta["parity"] = parity(model, directory)
        write_sidecar(directory, meta)
    return meta


def _check_parity(out: Path, meta: dict) -> None:
    if not meta["parity"]["passed"]:
        raise AssertionError(f"ONNX parity gate failed for {out}: {meta['parity']['worst']}")


def export(bundle, out: Path | str, *, exporters: tuple[str, ...] = EXPORTERS, opset: int = OPSET,
           external_data_mb: float | None = EXTERNAL_DATA_MB, check: bool = True) -> Path:
    """Export `bundle` to the three graphs in directory `out` (atomically) and gate on parity.

    With `check`, a failed gate raises after writing (the directory stays for inspection, marked passed=false).
    """
    out = Path(out)
    with staging(out) as tmp:
        meta = write_export(bundle, tmp, exporters=exporters, opset=opset, external_data_mb=external_data_mb,
                            check=check)
    if check:
        _check_parity(out, meta)
    return out


def _versions() -> dict:
    import onnx

    versions = {"torch": torch.__version__, "onnx": onnx.__version__}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return versions




def derive_into(src: Path | str, directory: Path, transform: Callable[[Path, Path], None], **updates) -> dict:
    """Write transform(src_file, directory/file) for every graph of `src` and a sidecar copied from src's,
    with `updates` merged in and fresh file sizes; returns that sidecar. For quantized or optimized copies,
    which OrtStepper.from_dir then runs unchanged."""
    src = Path(src)
    meta = read_sidecar(src)
    for name in meta["files"].values():
        transform(src / name, directory / name)
        if not (directory / name).exists():
            raise FileNotFoundError(f"transform did not write {directory / name}")
    meta = {**meta, **updates, "file_bytes": file_sizes(directory), "derived_from": str(src)}
    meta.pop(ARTIFACT_KEY, None)  # the parent's recipe is not the copy's
    write_sidecar(directory, meta)
    return meta


def derive(src: Path | str, out: Path | str, transform: Callable[[Path, Path], None], **updates) -> Path:
    """A new export directory whose graphs are transform(src_file, out_file), written atomically.

        derive(onnx_dir, int8_dir, lambda a, b: quantize_dynamic(a, b), precision="int8")
    """
    with staging(out) as tmp:
        derive_into(src, tmp, transform, **updates)
    return Path(out)


# --------------------------------------------------------------------------- parity gate


@dataclass(frozen=True)
class ParityCase:
    """Shapes for one parity check; none of them equals the export example (2, 5, past 3, target 2)."""

    batch: int
    source: int
    past: int
    pad_last: int = 0  # padded source positions in row 0
    target: int = 1  # prefix length fed to the first-step decoder


PARITY_CASES = (ParityCase(1, 7, 0), ParityCase(3, 11, 1, pad_last=4), ParityCase(4, 3, 9, pad_last=1, target=3))
# fp32 graphs differ from PyTorch by ~1e-6 (teacher, tiny test model and opus-mt-shape, both exporters:
# max |Δ| 1.4e-6 to 3.3e-6, i.e. <= 5e-7 * (1 + max|ref|)), so 1e-5 + 1e-5 * max|ref| leaves a ~20x
# margin, while scaling one encoder fc1 weight matrix by 1.001 (max |Δ| 4e-4) fails by ~9x. The rtol
# term scales with the output's largest magnitude, not elementwise, so near-zero entries do not
# demand a relative precision fp32 matmuls cannot give.
PARITY_ATOL = 1e-5
PARITY_RTOL = 1e-5


def reference_outputs(model: nn.Module, graph: str, args: tuple) -> list[torch.Tensor]:
    """The PyTorch model's own answer for a graph's inputs (HF forward, not our re-implementation)."""
    from transformers.modeling_outputs import BaseModelOutput

    with torch.no_grad():
        if graph == "encoder":
            return [model.get_encoder()(input_ids=args[0], attention_mask=args[1]).last_hidden_state]
        enc = BaseModelOutput(last_hidden_state=args[2]) if graph == "decoder" else None
        cache = _hf_cache(model, args) if graph == "decoder_with_past" else None
        if graph == "decoder_with_past":  # HF needs encoder states only for shapes once cross K/V are cached
            b, s = args[1].shape
            enc = BaseModelOutput(last_hidden_state=torch.zeros(b, s, model.config.d_model))
        past_len = 0 if cache is None else cache.get_seq_length()
        out = model(encoder_outputs=enc, attention_mask=args[1], decoder_input_ids=args[0],
                    **cache_kwargs(model, cache), use_cache=True,
                    cache_position=torch.arange(past_len, past_len + args[0].shape[1]))
    self_kv = [t for layer in output_cache(out).self_attention_cache.layers for t in (layer.keys, layer.values)]
    cross_kv = [t for layer in output_cache(out).cross_attention_cache.layers for t in (layer.keys, layer.values)]
    logits = out.logits[:, -1]
    return [logits, *self_kv, *cross_kv] if graph == "decoder" else [logits, *self_kv]


def _hf_cache(model: nn.Module, args: tuple):
    """Flat past/cross tensors -> an EncoderDecoderCache that HF's forward accepts."""
    from transformers import DynamicCache, EncoderDecoderCache

    n = len(model.model.decoder.layers)
    cache = args[2:]
    self_cache, cross_cache = DynamicCache(), DynamicCache()
    for i in range(n):
        if cache[2 * i].shape[2]:  # empty past: leave the layer uninitialised, as HF does
            self_cache.update(cache[2 * i].clone(), cache[2 * i + 1].clone(), i)
        cross_cache.update(cache[2 * n + 2 * i], cache[2 * n + 2 * i + 1], i)
    return EncoderDecoderCache(self_cache, cross_cache)


def _case_args(graph: str, model: nn.Module, case: ParityCase, seed: int) -> tuple:
    return example_inputs(graph, model, batch=case.batch, source=case.source, past=case.past,
                          target=case.target, pad_last=case.pad_last, seed=seed)


def parity(model: nn.Module, directory: Path | str, cases: tuple[ParityCase, ...] = PARITY_CASES,
           atol: float = PARITY_ATOL, rtol: float = PARITY_RTOL, threads: int = 1) -> dict:
    """max |Δ| of every output of every graph vs the PyTorch model, on shapes unlike the export's.

    Returns {"graphs": {graph: {output: max_abs}}, "worst": {...}, "passed": bool, ...}.
    An output passes when max|Δ| <= atol + rtol * max|reference|.
    """

    sessions = load_sessions(directory, threads=threads)
    result: dict[str, dict[str, float]] = {g: {} for g in GRAPHS}
    worst = {"graph": None, "output": None, "max_abs": 0.0, "ratio": 0.0}
    passed = True
    for c, case in enumerate(cases):
        for graph in GRAPHS:
            args = _case_args(graph, model, case, seed=100 + c)
            ref = reference_outputs(model, graph, args)
            names = [o.name for o in sessions[graph].get_outputs()]
            feed = {i.name: a.numpy() for i, a in zip(sessions[graph].get_inputs(), args)}
            got = sessions[graph].run(None, feed)
            for name, r, o in zip(names, ref, got):
                if tuple(r.shape) != tuple(o.shape):
                    raise AssertionError(f"{graph}.{name}: shape {o.shape} vs PyTorch {tuple(r.shape)} ({case})")
                delta = float((torch.from_numpy(o) - r).abs().max()) if r.numel() else 0.0
                limit = atol + rtol * (float(r.abs().max()) if r.numel() else 0.0)
                result[graph][name] = max(result[graph].get(name, 0.0), delta)
                passed &= delta <= limit
                if delta / limit > worst["ratio"]:
                    worst = {"graph": graph, "output": name, "max_abs": delta, "ratio": delta / limit}
    return {"graphs": result, "worst": worst, "passed": bool(passed), "atol": atol, "rtol": rtol,
            "cases": [case.__dict__ for case in cases]}


# --------------------------------------------------------------------------- inspection





def op_counts(directory: Path | str) -> pd.DataFrame:  # noqa: F821
    """Rows {graph, op, count}: how many nodes of each ONNX op type each graph has."""
    import collections

    import onnx
    import pandas as pd

    directory = Path(directory)
    meta = read_sidecar(directory)
    rows = []
    for graph, name in meta["files"].items():
        proto = onnx.load(str(directory / name), load_external_data=False)
        counts = collections.Counter(node.op_type for node in proto.graph.node)
        rows += [{"graph": graph, "op": op, "count": n} for op, n in counts.most_common()]
    return pd.DataFrame(rows)


def graph_summary(directory: Path | str) -> pd.DataFrame:  # noqa: F821
    """One row per graph: file size (with external data), node and op-type counts, exporter, I/O counts."""
    import pandas as pd

    directory = Path(directory)
    meta = read_sidecar(directory)
    ops = op_counts(directory)
    rows = []
    for graph, name in meta["files"].items():
        nbytes = sum(size for f, size in meta["file_bytes"].items() if f.startswith(name))
        g = ops[ops["graph"] == graph]
        rows.append({"graph": graph, "file": name, "size_mb": round(nbytes / 2**20, 2),
                     "nodes": int(g["count"].sum()), "op_types": len(g),
                     "top_ops": ", ".join(f"{r.op}×{r.count}" for r in g.head(5).itertuples()),
                     "exporter": meta["exporter"].get(graph) if isinstance(meta.get("exporter"), dict) else None,
                     "inputs": len(meta["inputs"][graph]), "outputs": len(meta["outputs"][graph])})
    return pd.DataFrame(rows)


def parity_table(result: dict) -> pd.DataFrame:  # noqa: F821
    """The parity result as rows {graph, output, max_abs}, worst first."""
    import pandas as pd

    rows = [{"graph": g, "output": o, "max_abs": d} for g, outs in result["graphs"].items() for o, d in outs.items()]
    return pd.DataFrame(rows).sort_values("max_abs", ascending=False, ignore_index=True)


def plot_op_counts(ops: pd.DataFrame, top: int = 12):  # noqa: F821
    """Grouped bars: node count per op type (the `top` most frequent overall), one color per graph."""
    import plotly.graph_objects as go

    order = ops.groupby("op")["count"].sum().sort_values(ascending=False).index[:top]
    fig = go.Figure()
    for graph, g in ops.groupby("graph", sort=False):
        g = g.set_index("op").reindex(order).fillna(0)
        fig.add_trace(go.Bar(name=graph, x=list(order), y=g["count"].tolist()))
    fig.update_layout(title="ONNX nodes per op type", barmode="group", yaxis_title="nodes", xaxis_title="op type")
    return plots.paint(fig)


# --------------------------------------------------------------------------- handler


def onnx_dir(preset: str, bundle_name: str = "teacher") -> Path:
    """Where ensure_onnx keeps a bundle's export: <artifacts>/<preset>/onnx-<bundle_name>."""
    return preset_dir(preset) / f"onnx-{bundle_name}"


def _passed(path: Path) -> bool:
    try:
        return bool((read_sidecar(path).get("parity") or {}).get("passed"))
    except (FileNotFoundError, ValueError):
        return False


def ensure_onnx(preset: Preset, bundle: Bundle, exporters: tuple[str, ...] = EXPORTERS) -> Path:
    """The preset's ONNX export of `bundle`, exported again exactly when the bundle's weights or the
    opset change, or when the directory no longer validates or failed its parity gate
    (a few seconds of CPU per graph for the teacher, more for opus-mt-shape).

        ensure_onnx(Preset.from_name("ci"), teacher)  # -> artifacts/ci/onnx-teacher
    """
    out = onnx_dir(preset.name, bundle_key(bundle))
    # Which exporter made the graphs is not part of their identity: whichever one did, parity vouches for it.
    recipe = {"source": bundle.name, "source_fingerprint": fingerprint(bundle.model), "opset": OPSET}
    ensure(out, SIDECAR, recipe, lambda tmp: write_export(bundle, tmp, exporters=exporters), valid=_passed)
    _check_parity(out, read_sidecar(out))
    return out
