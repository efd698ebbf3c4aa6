"""Notebook 06's study: TensorRT-ready graphs checked on the CPU, their profiles and commands, and the records.

    part1 = run_part1(preset, bundle)           # fp16 + int8 graphs, range table, checks, gates, profiles
    reasons = part2_reasons(part1)              # {variant: why it cannot run here, or None}
    records = graph_records(part1, bundle) + skipped_records(reasons, bundle)

The mechanisms live in labkit.engines (trt_graphs, trt_verify, trt_profiles, tensorrt, torch_cuda) and
the GPU runs in labkit.lab.gpu_check; this module strings Part 1 together, draws its figure and writes
the ledger records (technique "tensorrt"). Left out: CPU timing of the graphs (notebooks 04 and 05 time
ONNX Runtime; ORT CPU runs fp16 mostly in fp32, so its fp16 speed says nothing about a GPU's).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from labkit.engines import tensorrt, torch_cuda
from labkit.engines.onnx_graphs import read_sidecar, size_mb
from labkit.engines.ort_int8 import evaluate_dir, gate_pairs
from labkit.engines.trt_graphs import DATA_MAX, FP16_MAX, TrtGraphs, ensure_trt_graphs, range_table
from labkit.engines.trt_profiles import profile_axes, write_profiles
from labkit.engines.trt_verify import ATOL, RTOL, GraphCheck, check_table, gate_of, verify_fp16, verify_int8
from labkit.measure import ledger, plots
from labkit.measure.replay import measurement

NOTEBOOK = "06_tensorrt"
KINDS = ("fp16", "int8")
GRAPH_VARIANT = {"fp16": "onnx-trt-fp16", "int8": "onnx-trt-int8"}  # the CPU-verified graphs
ENGINE_VARIANT = {"fp16": "trt-engine-fp16", "int8": "trt-engine-int8"}  # engines built from them (GPU)
RUNG_VARIANT = {v: f"{v.replace('torch-', 'torch-cuda-')}" for v in torch_cuda.RUNG}  # torch on the GPU


@dataclass(frozen=True)
class Part1:
    """What Part 1 made and measured: the graphs, the fp32 reference, every check, the gates, the profiles."""

    graphs: TrtGraphs
    fp32: dict  # evaluate_dir of the fp32 graphs on the gate sentences (ids, bleu, ...)
    checks: dict[str, list[GraphCheck]]  # kind -> checks, in the order they ran
    results: dict[str, dict]  # kind -> evaluate_dir of the copy
    gates: dict[str, dict]  # kind -> ledger gate
    profiles: dict[str, dict]  # kind -> tensorrt.json (only for graphs that passed)
    seconds: dict[str, float]

    def dir(self, kind: str):
        return self.graphs.fp16 if kind == "fp16" else self.graphs.int8

    def recipe(self, kind: str) -> dict:
        """How the `kind` graphs were made (the sidecar's fp16 or quantization recipe: tool, kept nodes, ...)."""
        meta = read_sidecar(self.dir(kind))
        return meta.get("fp16") or meta.get("quantization") or {}


@measurement
def run_part1(preset, bundle) -> Part1:
    """Build (or reuse) the fp16 and int8 graphs, check both, write profiles + commands next to those that passed."""
    seconds, start = {}, time.perf_counter()
    graphs = ensure_trt_graphs(preset, bundle)
    onnx_dir = graphs.parent
    seconds["graphs"], start = time.perf_counter() - start, time.perf_counter()
    fp32 = evaluate_dir(onnx_dir, bundle, preset, gate_pairs(preset))
    checks, results = {}, {}
    checks["fp16"], results["fp16"] = verify_fp16(onnx_dir, graphs.fp16, bundle, preset, graphs.keep, fp32)
    checks["int8"], results["int8"] = verify_int8(onnx_dir, graphs.int8, bundle, preset, fp32)
    gates = {kind: gate_of(kind, checks[kind]) for kind in KINDS}
    seconds["checks"], start = time.perf_counter() - start, time.perf_counter()
    axes = profile_axes(preset, bundle.tokenizer, read_sidecar(onnx_dir)["model"])
    profiles = {kind: write_profiles(graphs.fp16 if kind == "fp16" else graphs.int8, axes, ATOL[kind], RTOL[kind])
                for kind in KINDS if gates[kind]["passed"]}  # no commands for a graph no engine may come from
    seconds["profiles"] = time.perf_counter() - start
    return Part1(graphs, fp32, checks, results, gates, profiles, {k: round(v, 1) for k, v in seconds.items()})


# --------------------------------------------------------------------------- tables and the figure


def flagged_table(part1: Part1):
    """Flagged tensors grouped by graph, op and flag: how many, the largest |x|, one example."""
    df = range_table(part1.graphs.ranges)
    flagged = df[df["flag"] != ""]
    return (flagged.groupby(["graph", "op", "flag"], sort=False)
            .agg(tensors=("tensor", "size"), max_abs=("max_abs", "max"), example=("tensor", "first")).reset_index())


def largest_fitting(part1: Part1, top: int = 10):
    """The largest unflagged activations: how close the model comes to fp16's limits where it stays fp16."""
    df = range_table(part1.graphs.ranges)
    return df[(df["flag"] == "") & (df["op"] != "initializer")].head(top)


def sizes(part1: Part1) -> dict[str, float]:
    """MiB on disk of the fp32 export and its two copies (graph files + external data)."""
    return {"fp32": round(size_mb(part1.graphs.parent), 2), **{k: round(size_mb(part1.dir(k)), 2) for k in KINDS}}


def gate_table(part1: Part1):
    """Every check of both graph sets: graphs, check, where it ran, value, threshold, passed, detail."""
    return check_table([c for kind in KINDS for c in part1.checks[kind]])


def plot_ranges(part1: Part1):
    """Max |x| of every tensor per op type (log scale) against fp16's limits: what decided fp32 vs fp16."""
    import plotly.graph_objects as go

    df = range_table(part1.graphs.ranges)
    df = df[df["max_abs"] > 0]
    fig = go.Figure()
    for flag, group in df.groupby(df["flag"].replace("", "fits fp16")):
        fig.add_trace(go.Box(x=group["op"], y=group["max_abs"], name=flag, boxpoints="all", jitter=0.4,
                             hovertext=group["graph"] + ": " + group["tensor"]))
    for y, label in ((DATA_MAX, "512: fp16 step 0.5"), (FP16_MAX, "65504: fp16 max")):
        fig.add_hline(y=y, line_dash="dash", annotation_text=label)
    fig.update_layout(title="Largest |value| per tensor on the calibration sentences (fp32 graphs)",
                      yaxis_type="log", yaxis_title="max |x|", xaxis_title="producing op", boxmode="group")
    return plots.paint(fig)


# --------------------------------------------------------------------------- Part 2: what can run here


def engine_reason(part1: Part1, kind: str) -> str | None:
    """Why the `kind` engine cannot be built here (no GPU, no tensorrt, or a failed graph), else None."""
    if not part1.gates[kind]["passed"]:
        return f"its {kind} graph failed the CPU gate, so no engine is built from it: {part1.gates[kind]['detail']}"
    return tensorrt.engines_unavailable()


def rung_reason() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA device (torch.cuda.is_available() is False)"


def part2_reasons(part1: Part1) -> dict[str, str | None]:
    """{ledger variant: reason it cannot run here, or None} for every engine and torch GPU rung variant."""
    reasons = {ENGINE_VARIANT[k]: engine_reason(part1, k) for k in KINDS}
    return reasons | {RUNG_VARIANT[v]: rung_reason() for v in torch_cuda.RUNG}


# --------------------------------------------------------------------------- ledger


def graph_records(part1: Part1, bundle) -> list[dict]:
    """One record per graph set, parent onnx-fp32, with its gate, every check (and where it ran) and its recipe."""
    records = []
    for kind in KINDS:
        directory, result = part1.dir(kind), part1.results[kind]
        records.append(ledger.make_record(
            notebook=NOTEBOOK, variant=GRAPH_VARIANT[kind], technique="tensorrt", parent="onnx-fp32",
            backend="onnxruntime", precision=kind, model=bundle.name, gate=part1.gates[kind],
            metrics={"bleu": result["bleu"], "chrf": result["chrf"], "bleu_signature": result["bleu_signature"],
                     "agreement": result["agreement"], "size_mb": round(size_mb(directory), 3)},
            checks=[asdict(c) for c in part1.checks[kind]], eval_sentences=len(result["ids"]),
            parent_bleu=part1.fp32["bleu"], recipe=part1.recipe(kind),
            profiles_file=str(directory / "tensorrt.json") if kind in part1.profiles else None))
    return records


def skipped_rows(reasons: dict[str, str | None]) -> list[dict]:
    """gpu-check's row shape for the variants that cannot run here: {variant, status 'skipped', reason}."""
    return [{"variant": v, "status": "skipped", "reason": r} for v, r in reasons.items() if r is not None]


def part2_records(rows: list[dict], bundle, notebook: str = NOTEBOOK) -> list[dict]:
    """One record per Part 2 row (labkit.lab.gpu_check's shape): skipped ones with the reason and no number,
    run ones with their gate, tokens, BLEU, latency and speedup vs torch fp32 eager from the same run."""
    records = []
    for r in rows:
        ran = r["status"] != "skipped"
        metrics = {"bleu": r.get("bleu"), "agreement": r.get("agreement"),
                   **({"latency_ms": r["latency_ms"]} if r.get("latency_ms") else {})} if ran else None
        records.append(ledger.make_record(
            notebook=notebook, variant=r["variant"], technique="tensorrt", status=r["status"], reason=r.get("reason"),
            gate=r.get("gate"), metrics=metrics, model=bundle.name, device=r.get("device"),
            speedup_vs_fp32_eager=r.get("speedup_vs_fp32_eager"), **_identity(r["variant"])))
    return records


def commands(part1: Part1) -> str:
    """The trtexec and polygraphy commands of every graph that passed, as a shell script to run on a GPU machine."""
    lines = []
    for kind, record in part1.profiles.items():
        lines += [f"# {kind} graphs (strongly typed: the precision is the graph's)", f"cd {record['run_in']}"]
        for graph in record["trtexec"]:
            lines += [record["trtexec"][graph], record["polygraphy"][graph]]
    for kind in KINDS:
        if kind not in part1.profiles:
            lines.append(f"# {kind}: no commands, its graphs failed the CPU gate: {part1.gates[kind]['detail']}")
    return "\n".join(lines)


def _identity(variant: str) -> dict:
    """parent, backend and precision of a Part 2 variant: 'trt-engine-int8' -> onnx-trt-int8, tensorrt, int8."""
    if variant.startswith("trt-"):
        kind = variant.rsplit("-", 1)[1]
        return {"parent": GRAPH_VARIANT[kind], "backend": "tensorrt", "precision": kind}
    return {"parent": "teacher", "backend": "torch-cuda", "precision": "fp32" if "fp32" in variant else "fp16"}
