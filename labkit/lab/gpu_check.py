"""`labkit gpu-check`: on a CUDA machine, the torch GPU rung and (where tensorrt imports) the engines, in one JSON.

    labkit gpu-check --preset opus-mt-shape --out gpu-check.json     # on the GPU machine, within 8 minutes
    labkit gpu-check --dry-run --preset ci --sentences 2             # anywhere: the CPU side of the same plan

Every variant is gated before it is timed, skipped with its reason when it cannot run, and none starts
after the time budget (preset.trt.gpu_budget_s). The steps:
1. environment: torch, CUDA device and compute capability, tensorrt (or why not);
2. the torch rung (labkit.engines.torch_cuda): fp32 eager, fp16 eager, fp16 with a static cache replayed as
   a CUDA graph; tokens vs the CPU fp32 model (fp32) or vs fp32 eager (fp16: BLEU drop on quality presets,
   agreement on speed-only ones); batch 1, one sentence at a time, timed with CUDA events;
3. TensorRT: notebook 06's Part 1 graphs, engines from those that passed, engine outputs vs ONNX Runtime
   fp32 on real decode feeds, tokens and BLEU through TrtStepper, the same timing.
Speedups are ratios to torch fp32 eager from the same run. A dry run (--dry-run, or no CUDA device) runs
on the CPU what needs no CUDA: fp32 eager and the static-cache step without capture, gated the same way
and timed with perf_counter, labelled device "cpu"; everything else is skipped with the reason.
Left out: several GPUs, beam search timing, and the int8 engines' calibration on the GPU.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from labkit.config import PRESETS, Preset
from labkit.core.artifacts import preset_dir, write_json_atomic
from labkit.core.bundle import bundle_for
from labkit.core.decode import TorchStepper
from labkit.core.translator import decode_config, translator_for
from labkit.engines import tensorrt, torch_cuda
from labkit.engines.onnx_graphs import read_sidecar
from labkit.engines.ort import load_sessions
from labkit.engines.ort_int8 import evaluate_translator, gate_pairs
from labkit.engines.trt_verify import ATOL, RTOL, compare, decode_feeds
from labkit.lab import nb06_tensorrt as nb06
from labkit.measure.gates import MIN_FP32_AGREEMENT, agreement_gate, gate, variant_gate
from labkit.measure.quality import bench_texts
from labkit.measure.timing import Measurement, as_latency, environment, measure

SCHEMA = "labkit.gpu-check/1"
STATIC_DRY_RUN = "torch-fp32-static"  # dry run only: the cudagraph variant's step, fp32, eager on the CPU
TARGETS = {"torch-cuda-fp16-cudagraph": 3.0, "trt-engine-fp16": 5.0}  # the aims: x faster than fp32 eager


class Clock:
    """The time budget: `left()` says whether a new step may start, `why()` what to record when not."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> bool:
        return time.perf_counter() - self.start < self.budget_s

    def why(self) -> str:
        return f"not started: the time budget of {self.budget_s:g} s was spent"


def row(variant: str, status: str, reason: str | None = None, **fields) -> dict:
    """One result row: {variant, status, reason, gate, latency_ms, ...}; a skipped row carries no numbers."""
    return {"variant": variant, "status": status, "reason": reason, **fields}


# --------------------------------------------------------------------------- timing and gates


def time_translator(translator, texts: list[str], preset, device: str, label: str) -> dict:
    """Batch-1 latency over `texts` (each decoded gpu_warmup + gpu_repeats times): the ledger's latency_ms."""
    budget, times = preset.trt, []
    for text in texts:
        def once(text=text):
            return translator.run([text])

        if device == "cuda":
            times += torch_cuda.cuda_times(once, budget.gpu_warmup, budget.gpu_repeats)
        else:
            times += measure(once, warmup=budget.gpu_warmup, repeats=budget.gpu_repeats).times_ms
    return as_latency(Measurement(tuple(times), threads=torch.get_num_threads(), label=label))


def rung_gate(variant: str, result: dict, parents: dict, preset) -> dict:
    """fp32 variants reproduce the CPU fp32 model's tokens; fp16 ones face the lossy gate vs GPU fp32 eager."""
    if "fp32" in variant:  # result["agreement"] was counted against the CPU fp32 model's ids
        return agreement_gate(result["agreement"], MIN_FP32_AGREEMENT, len(result["ids"]), "the CPU fp32 model")
    return variant_gate(result, parents["torch-fp32-eager"], "fp16", preset, parent_name="torch fp32 eager")


# --------------------------------------------------------------------------- the torch rung


def rung_variants(device: str) -> list[str]:
    """What the rung runs on this device: all of RUNG on CUDA; on the CPU the fp32 ones plus the static step."""
    return list(torch_cuda.RUNG) if device == "cuda" else ["torch-fp32-eager", STATIC_DRY_RUN]


def _variant_stepper(bundle, variant: str, device: str, capacity: int):
    if variant == STATIC_DRY_RUN:
        model = torch_cuda.rung_model(bundle.model, "torch-fp32-eager", device)
        return torch_cuda.GraphStepper(model, capacity, graphs=False)
    return torch_cuda.rung_stepper(torch_cuda.rung_model(bundle.model, variant, device), variant, capacity)


def run_rung(bundle, preset, device: str, texts: list[str], clock: Clock, gate_sentences: int | None = None) -> list[dict]:
    """Gate (on the first `gate_sentences` gate pairs), then time, each rung variant; the CUDA-only ones are
    skipped on the CPU with the reason."""
    pairs = gate_pairs(preset)[:gate_sentences]
    capacity = (preset.forced_length or preset.max_new_tokens) + 1  # + the start token
    parents = {"cpu": evaluate_translator(translator_for(bundle, preset, TorchStepper(bundle.model)), preset, pairs)}
    rows = [row(nb06.RUNG_VARIANT[v], "skipped", "no CUDA device (dry run on the CPU)")
            for v in torch_cuda.RUNG if v not in rung_variants(device)]
    for variant in rung_variants(device):
        name = nb06.RUNG_VARIANT.get(variant, variant)
        if not clock.left():
            rows.append(row(name, "skipped", clock.why()))
            continue
        translator = translator_for(bundle, preset, _variant_stepper(bundle, variant, device, capacity))
        result = evaluate_translator(translator, preset, pairs, parents["cpu"]["ids"])
        parents[variant] = result
        g = rung_gate(variant, result, parents, preset)
        latency = time_translator(translator, texts, preset, device, name) if g["passed"] else None
        rows.append(row(name, "ok" if g["passed"] else "failed", None if g["passed"] else g["detail"], gate=g,
                        device=device, bleu=result["bleu"], agreement=result["agreement"], latency_ms=latency))
        del translator
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- TensorRT


def engine_row(kind: str, part1, bundle, preset, texts: list[str], clock: Clock, log) -> dict:
    """Build one engine set from a passed graph set, compare it with ORT fp32, gate its tokens, time it."""
    name, directory = nb06.ENGINE_VARIANT[kind], part1.dir(kind)
    plans = tensorrt.ensure_engines(directory, part1.gates[kind], log)
    meta = read_sidecar(directory)
    runners = {g: tensorrt.TrtRunner(p) for g, p in plans.items()}
    sessions = {g: tensorrt.EngineSession(r, g, meta["model"]) for g, r in runners.items()}
    pairs = gate_pairs(preset)
    feeds = decode_feeds(part1.graphs.parent, bundle.tokenizer, [p.zh for p in pairs[:preset.trt.parity_sentences]],
                         decode_config(preset))
    parity = compare(load_sessions(part1.graphs.parent), sessions, feeds, ATOL[kind], RTOL[kind])
    stepper = tensorrt.TrtStepper.from_dir(directory)
    result = evaluate_translator(translator_for(bundle, preset, stepper), preset, pairs, part1.fp32["ids"])
    tokens = variant_gate(result, part1.fp32, kind, preset, parent_name="ONNX Runtime fp32")
    w = parity["worst"]
    g = gate(f"trt-engine-{kind}", parity["passed"] and tokens["passed"],
             f"vs ONNX Runtime fp32: worst {w['graph']}.{w['output']} max|Δ| {w['max_abs']:.3g} "
             f"({w['ratio']:.2f} x allowed); {tokens['detail']}")
    latency = time_translator(translator_for(bundle, preset, stepper), texts, preset, "cuda", name) \
        if g["passed"] and clock.left() else None
    return row(name, "ok" if g["passed"] else "failed", None if g["passed"] else g["detail"], gate=g, device="cuda",
               bleu=result["bleu"], agreement=result["agreement"], latency_ms=latency,
               engines={k: str(p) for k, p in plans.items()})


def run_tensorrt(bundle, preset, device: str, texts: list[str], clock: Clock, gate_sentences: int | None = None,
                 log=print) -> list[dict]:
    """The engine rows: skipped with the reason without CUDA/tensorrt, or a failed graph; else built and gated."""
    reason = tensorrt.engines_unavailable() if device == "cuda" else "no CUDA device (dry run on the CPU)"
    if reason:
        return [row(nb06.ENGINE_VARIANT[k], "skipped", reason) for k in nb06.KINDS]
    part1 = nb06.run_part1(preset, bundle)
    rows = []
    for kind in nb06.KINDS:
        why = nb06.engine_reason(part1, kind) or (None if clock.left() else clock.why())
        rows.append(row(nb06.ENGINE_VARIANT[kind], "skipped", why) if why else
                    engine_row(kind, part1, bundle, preset, texts, clock, log))
    return rows


# --------------------------------------------------------------------------- the command


def add_gpu_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="opus-mt-shape", choices=sorted(PRESETS),
                        help="what to time: opus-mt-shape (default) is the real opus-mt architecture, random weights")
    parser.add_argument("--bundle", default="teacher", help="the preset's teacher or a bundle under artifacts/<preset>")
    parser.add_argument("--out", default=None, help="the JSON to write (default artifacts/<preset>/gpu-check.json)")
    parser.add_argument("--dry-run", action="store_true", help="run the CPU side only, even where CUDA exists")
    parser.add_argument("--sentences", type=int, default=None, help="bench sentences timed (default preset.trt)")
    parser.add_argument("--gate-sentences", type=int, default=None,
                        help="gate the torch rung on the first N gate sentences (default all of them)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no new step after this many seconds")


def add_speedups_vs_eager(rows: list[dict]) -> None:
    """Add speedup_vs_fp32_eager (same run, same device) to every timed row, in place."""
    base = next((r for r in rows if r["variant"] == "torch-cuda-fp32-eager" and r.get("latency_ms")), None)
    for r in rows:
        if base and r.get("latency_ms"):
            r["speedup_vs_fp32_eager"] = round(base["latency_ms"]["p50"] / r["latency_ms"]["p50"], 3)


def run_check(preset: Preset, bundle_name: str = "teacher", dry_run: bool = False, sentences: int | None = None,
              budget_s: float | None = None, gate_sentences: int | None = None, log=print) -> dict:
    """Every step of the check; an exception in one step is recorded (with its traceback) and the next runs."""
    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    clock = Clock(budget_s if budget_s is not None else preset.trt.gpu_budget_s)
    bundle = bundle_for(preset, bundle_name)
    texts = bench_texts(preset)[: sentences or preset.trt.gpu_sentences]
    report = {"schema": SCHEMA, "preset": preset.name, "bundle": bundle_name, "device": device,
              "dry_run": device == "cpu", "budget_s": clock.budget_s, "sentences_timed": len(texts),
              "decode": {"forced_length": preset.forced_length, "max_new_tokens": preset.max_new_tokens, "batch": 1},
              "environment": {**environment(), "cuda": tensorrt.device_identity() if device == "cuda" else None,
                              "tensorrt_missing": tensorrt.engines_unavailable()}, "rows": [], "errors": []}
    for step, fn in (("torch rung", run_rung), ("tensorrt", run_tensorrt)):
        try:
            report["rows"] += fn(bundle, preset, device, texts, clock, gate_sentences)
        except Exception as exc:  # noqa: BLE001 - one step's failure must not hide the others' results
            report["errors"].append({"step": step, "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()[-3000:]})
            log(f"gpu-check: {step} failed: {type(exc).__name__}: {exc}")
    add_speedups_vs_eager(report["rows"])
    report["targets"] = {v: {"aim_x": aim, "measured_x": next((r.get("speedup_vs_fp32_eager") for r in report["rows"]
                                                                if r["variant"] == v), None)} for v, aim in TARGETS.items()}
    report["seconds"] = round(time.perf_counter() - clock.start, 1)
    return report


def table(report: dict) -> str:
    """One line per row: variant, status, p50 (ms), speedup vs fp32 eager, and why not, where it did not run."""
    lines = []
    for r in report["rows"]:
        lat = r.get("latency_ms") or {}
        lines.append(f"{r['variant']:28s} {r['status']:8s} p50 {lat.get('p50', float('nan')):9.2f} ms  "
                     f"x{r.get('speedup_vs_fp32_eager', float('nan')):.2f}  {r.get('reason') or ''}")
    return "\n".join(lines + [f"{e['step']}: {e['error']}" for e in report["errors"]])


def gpu_check_command(args: argparse.Namespace) -> int:
    """Handler of `labkit gpu-check`: writes the JSON; 0 when every step ran (gates may fail), 1 on an error."""
    preset = Preset.from_name(args.preset)
    report = run_check(preset, args.bundle, args.dry_run, args.sentences, args.budget_s, args.gate_sentences)
    out = Path(args.out) if args.out else preset_dir(preset.name) / "gpu-check.json"
    write_json_atomic(out, report)
    print(table(report))
    print(f"gpu-check: {out} ({report['seconds']} s, device {report['device']})")
    return 1 if report["errors"] else 0


def read_report(path: Path | str) -> dict:
    report = json.loads(Path(path).read_text())
    if report.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {report.get('schema')!r}, expected {SCHEMA!r}")
    return report
