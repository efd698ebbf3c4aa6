"""`labkit bench`: end-to-end translation speed of several engines, each in its own process.

    labkit bench --preset opus-mt-shape --variants torch,ort-fp32,ort-int8,ct2-int8
    df = run_bench("ci", ["torch", "ort-int8", "ct2-int8"])    # the same from a notebook

First every variant is built and checked against its parent (`check_variants`, from
labkit.engines.variants, which `labkit serve` gates with too),
before any timing: ort-fp32 by the export's parity gate, int8 and CTranslate2
variants by `labkit.measure.gates.variant_gate` on the preset's gate sentences (BLEU
drop on quality presets, token agreement at the forced length on speed-only
ones; float32 conversions must reproduce their parent's tokens). A variant that
fails its gate is recorded as failed and not timed, so it never shows a speedup
(its artifact may not even exist, and a number next to it would invite use); a
variant whose engine is not installed (CTranslate2) is recorded as skipped with
the reason. Gates a caller already measured (notebook 05) can be passed in.

Every gated variant then runs in a fresh `python -m labkit.lab.bench --worker
VARIANT --artifact PATH` process (two engines in one process distort each
other's thread pools and allocators), on exactly the artifact that passed, on
the same sentences with the same intra-op thread count. A worker first
translates the bench sentences once at batch 1 and returns the ids, which the
parent compares with the PyTorch baseline (agreement), then measures batch-1
end-to-end latency (p50/p95 over the preset's repeats) and sentences/s at batch
16, and prints one JSON line. Speed-only presets decode a fixed number of tokens
(preset.forced_length), so every engine does the same work. The memory bandwidth is measured once
per run in its own process at the same thread count, and every timed row gets the roofline columns
(bytes of weights per token of what it ran, the bound, achieved GB/s, % of the limit: labkit.lab.bench_roofline).

`--shapes 6-6,6-2,6-1` times the same variants on several layer shapes of the preset's model
(`bundle_for(preset, "shape-6-2")`: the first 6 encoder and 2 decoder layers, untrained, speed
only; a bundle name such as student-6-2 works too), one after another in one run, every speedup
against torch eager on the first shape (`run_shapes`).

`--device cuda` times the GPU rung and TensorRT engines instead (labkit.lab.gpu_check).
Left out: GPU engines in worker processes, concurrency and serving
(labkit.serve), and memory per variant beyond each worker's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from labkit.config import PRESETS, Preset
from labkit.core.artifacts import REPO_ROOT
from labkit.core.bundle import Bundle, bundle_for, bundle_key, parse_shape, shape_key
from labkit.core.data import load_split
from labkit.engines.variants import (  # building and gating live with the engines; this module times
    VARIANTS,
    Check,
    build_translator,
    check_variants,
    ledger_variant,
    parse_variants,
)
from labkit.lab import gpu_check, nb06_tensorrt
from labkit.lab.bench_roofline import COLUMNS as ROOFLINE_COLUMNS
from labkit.lab.bench_roofline import add_roofline, roofline_metrics
from labkit.lab.bench_roofline import footer as roofline_footer
from labkit.measure import ledger, roofline, timing
from labkit.measure.ledger import json_number
from labkit.measure.quality import agreement, bench_texts, latency, throughput
from labkit.measure.replay import measurement
from labkit.measure.timing import CommandError

if TYPE_CHECKING:
    import pandas as pd


BASELINE = "torch"
DEFAULT_VARIANTS = ("torch", "ort-fp32", "ort-int8", "ct2-int8")
# Where the default int8 recipe keeps the LM head in float because nothing could be measured (random
# weights), the bench also shows what quantizing it buys; on quality presets the default is measured.
SPEED_ONLY_EXTRA = ("ort-int8-all",)


def default_variants(preset) -> tuple[str, ...]:
    """DEFAULT_VARIANTS, plus SPEED_ONLY_EXTRA on speed-only presets (opus-mt-shape)."""

    preset = Preset.from_name(preset) if isinstance(preset, str) else preset
    return DEFAULT_VARIANTS + (() if preset.quality else SPEED_ONLY_EXTRA)


@dataclass(frozen=True)
class BenchSpec:
    batch_size: int = 16  # sentences per call for throughput
    throughput_sentences: int = 32  # test sentences translated per throughput pass
    timeout_s: float = 1800.0  # per worker, including its model load


SPEC = BenchSpec()
# ONNX Runtime's idle intra-op threads sleep instead of spinning in bench workers: on shared cores spinning
# cost ort-int8 2.3x at batch 1 (`labkit bench --preset opus-mt-shape --tune-threads`, labkit.lab.bench_threads).
ORT_SPIN = False


# --------------------------------------------------------------------------- primitives


def bench_inputs(preset) -> tuple[list[str], list[str]]:
    """(latency sentences, throughput sentences): the first N of the test split, for every variant."""

    return bench_texts(preset), [p.zh for p in load_split("test", limit=SPEC.throughput_sentences)]


# --------------------------------------------------------------------------- worker (child process)


def worker(variant: str, preset_name: str, threads: int, bundle_name: str = "teacher",
           artifact: str | None = None, spin: bool = ORT_SPIN, inter_threads: int = 1) -> dict[str, Any]:
    """Load one variant (the gated `artifact`), translate, time; the dict is the child's one JSON line.

    `spin` (ONNX Runtime) and `inter_threads` (CTranslate2) are the engines' own thread settings."""

    timing.pin_threads(threads)
    preset = Preset.from_name(preset_name).with_(threads=threads)
    start = time.perf_counter()
    translator = build_translator(variant, preset, threads, bundle_for(preset, bundle_name), artifact,
                                  spin=spin, inter_threads=inter_threads)
    load_s = time.perf_counter() - start
    texts, batch_texts = bench_inputs(preset)
    ids = [translator.run([t]).ids[0] for t in texts]  # also the first warm-up
    m = latency(translator, texts, preset, label=variant)
    sps = throughput(translator, batch_texts, preset, batch_size=SPEC.batch_size)
    return {"variant": variant, "threads": threads, "load_s": load_s, "p50": m.p50, "p95": m.p95,
            "iqr": m.iqr, "n": m.n, "noisy": m.noisy, "sentences_per_s": sps,
            "peak_rss_mb": timing.peak_rss_mb(), "ids": ids, "spin": spin, "inter_threads": inter_threads,
            "tokens": sum(len(i) for i in ids) / max(1, len(ids))}


# --------------------------------------------------------------------------- orchestration (parent)


def run_variant(variant: str, preset_name: str, threads: int, bundle_name: str = "teacher",
                artifact: str | None = None, env_extra: Mapping[str, str] | None = None,
                worker_args: tuple = ()) -> dict[str, Any]:
    """One worker process: `python -m labkit.lab.bench --worker VARIANT ...` -> its JSON result.

    `env_extra` (e.g. OMP_WAIT_POLICY) and `worker_args` (e.g. ("--no-spin",)) are thread-setting trials."""
    import os

    env = dict(os.environ)
    env.update({var: str(threads) for var in timing.THREAD_ENV_VARS})
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "labkit.lab.bench", "--worker", variant, "--preset", preset_name,
            "--threads", threads, "--bundle", bundle_name, *(["--artifact", artifact] if artifact else []),
            *worker_args]
    return timing.time_command(argv, timeout=SPEC.timeout_s, env=env)


def agreement_with(result: dict, baseline: dict | None) -> float | None:
    """Fraction of bench sentences whose ids equal the baseline's ([[1,2],[3]] vs [[1,2],[4]] -> 0.5)."""
    if baseline is None:
        return None

    return agreement(result["ids"], baseline["ids"])


@measurement
def run_bench(preset: Preset, bundle: Bundle, variants=None, threads: int | None = None,
              write_ledger: bool = True, notebook: str = "labkit-bench", progress: bool = True,
              gates: Mapping[str, dict] | None = None, bandwidth: roofline.Bandwidth | None = None) -> pd.DataFrame:
    """Gate every variant, then time those that passed, each in its own process; one row per variant.

    Columns: variant, status (ok | failed | skipped), gate, gate_passed, reason, backend,
    precision, model, p50_ms, p95_ms, noisy, speedup (torch p50 / p50), sentences_per_s,
    throughput_ratio, agreement (ids equal to torch's at batch 1), load_s, peak_rss_mb. Failed
    and skipped rows are not timed: their numbers are NaN. Ratios are NaN without a torch row.
    `gates` ({variant: gate}) are gates the caller measured on the same artifacts (notebook 05).
    `variants` default to `default_variants(preset)`. Workers load the bundle again by its key.
    Roofline columns (labkit.lab.bench_roofline) use `bandwidth`, else one measured here in its own
    process; `df.attrs["bandwidth"]` holds it.
    """
    threads = threads or preset.threads
    variants = parse_variants(variants or default_variants(preset))
    checks = check_variants(preset, variants, bundle, gates)  # every gate before any timing
    results = {}
    bw = bandwidth
    if bw is None and any(c.status == "ok" for c in checks.values()):
        bw = roofline.bandwidth_in_process(threads)
    if progress and bw is not None:
        print(f"bench {preset.name}: {bw}", file=sys.stderr, flush=True)
    for v, check in checks.items():
        if progress:
            state = f"({threads} threads) ..." if check.status == "ok" else f"not timed, {check.status}: {check.reason}"
            print(f"bench {preset.name}: {v} {state}", file=sys.stderr, flush=True)
        if check.status == "ok":
            results[v] = run_variant(v, preset.name, threads, bundle_key(bundle), check.artifact)
    df = add_roofline(results_frame(results, checks).assign(model=bundle.name), checks, bundle, bw)
    if write_ledger:
        write_records(df, preset, notebook, bundle.name)
    return df


def shape_bundle_name(text: str) -> str:
    """A --shapes entry -> a bundle name: '6-2' -> 'shape-6-2'; anything else is a bundle name as is."""
    shape = parse_shape(text.strip())
    return shape_key(*shape) if shape else text.strip()


def run_shapes(preset: Preset, shapes, variants=None, threads: int | None = None, write_ledger: bool = True,
               notebook: str = "labkit-bench", progress: bool = True) -> pd.DataFrame:
    """run_bench on each shape (['6-6', '6-2'] or bundle names) in turn; one frame with a `shape` column.

    Every speedup and throughput ratio is against torch eager on the FIRST shape, timed in this run
    (NaN without its torch row); agreement stays per shape (another shape decodes other tokens).
    Ledger records of the other shapes are named apart ('bench-ort-int8-shape-6-2') and say the baseline.
    """
    import pandas as pd

    names = [shape_bundle_name(s) for s in shapes]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--shapes needs distinct shapes or bundle names, got {list(shapes)}")
    bundles = {name: bundle_for(preset, name) for name in names}
    frames = [run_bench(preset, b, variants, threads, write_ledger=False, progress=progress).assign(shape=name)
              for name, b in bundles.items()]
    df = pd.concat(frames, ignore_index=True)
    base = df[(df["shape"] == names[0]) & (df["variant"] == BASELINE) & (df["status"] == "ok")]
    p50, sps = (base["p50_ms"].iloc[0], base["sentences_per_s"].iloc[0]) if len(base) else (float("nan"),) * 2
    df["speedup"], df["throughput_ratio"] = p50 / df["p50_ms"], df["sentences_per_s"] / sps
    df["info"] = [{**(info or {}), "shape": shape, "speedup_baseline": f"{BASELINE} on {names[0]}"}
                  for info, shape in zip(df["info"], df["shape"])]
    if write_ledger:
        for i, (name, bundle) in enumerate(bundles.items()):
            suffix = "" if i == 0 and bundle_key(bundle) == "teacher" else f"-{bundle_key(bundle)}"
            write_records(df[df["shape"] == name], preset, notebook, bundle.name, variant_suffix=suffix)
    return df


_TIMED = ("p50_ms", "p95_ms", "n", "noisy", "speedup", "sentences_per_s", "throughput_ratio", "agreement",
          "tokens", "threads", "load_s", "peak_rss_mb", "ids")


def results_frame(results: dict[str, dict], checks: Mapping[str, Check] | None = None) -> pd.DataFrame:
    """Worker results and gate checks -> the bench table (see run_bench); rows in `checks` order.

    Without `checks` every result counts as passed (status ok, no gate).
    """
    import pandas as pd

    checks = checks if checks is not None else {v: Check("ok") for v in results}
    base = results.get(BASELINE)
    rows = []
    for v, check in checks.items():
        row = {"variant": v, "status": check.status, "gate": check.gate and check.gate["name"],
               "gate_passed": None if check.gate is None else bool(check.gate["passed"]),
               "reason": check.reason, "backend": VARIANTS[v].backend, "precision": VARIANTS[v].precision,
               "gate_detail": check.gate and check.gate["detail"], "info": check.info,
               **dict.fromkeys(_TIMED, float("nan"))}
        r = results.get(v)
        if r is not None:
            row |= {"p50_ms": r["p50"], "p95_ms": r["p95"], "n": r["n"], "noisy": r["noisy"],
                    "speedup": base["p50"] / r["p50"] if base else float("nan"),
                    "sentences_per_s": r["sentences_per_s"],
                    "throughput_ratio": r["sentences_per_s"] / base["sentences_per_s"] if base else float("nan"),
                    "agreement": agreement_with(r, base), "tokens": r["tokens"], "threads": r["threads"],
                    "load_s": r["load_s"], "peak_rss_mb": r["peak_rss_mb"], "ids": r["ids"]}
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in ("gate", "gate_passed", "reason", "gate_detail"):  # pandas stores a missing text as NaN
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    return df


def _row_metrics(row) -> dict | None:
    """Latency, sentences/s, peak RSS and agreement of a timed row; None for an untimed one."""
    if row.status != "ok":
        return None
    return {"latency_ms": {"p50": row.p50_ms, "p95": row.p95_ms, "n": int(row.n)},
            "sentences_per_s": row.sentences_per_s, "peak_rss_mb": json_number(row.peak_rss_mb),
            "agreement": None if _absent(row.agreement) else float(row.agreement), **roofline_metrics(row)}


def write_records(df: pd.DataFrame, preset, notebook: str = "labkit-bench", bundle_name: str = "teacher",
                  variant_suffix: str = "") -> list[dict]:
    """One ledger record per bench row: status and gate as checked, metrics only for timed rows.

    `model` is the row's model column (the bundle's own name, e.g. 'opus-mt-shape'), else bundle_name.
    `variant_suffix` keeps another shape's rows apart ('bench-torch-shape-6-2').
    """

    records = []
    for row in df.itertuples(index=False):
        spec = VARIANTS[row.variant]
        gate = None if _absent(row.gate) else {"name": row.gate, "passed": bool(row.gate_passed),
                                               "detail": row.gate_detail}
        timed = row.status == "ok"
        record = ledger.make_record(
            notebook=notebook, variant=ledger_variant(row.variant) + variant_suffix, technique=spec.technique,
            metrics=_row_metrics(row), gate=gate, status=row.status, reason=None if timed else row.reason,
            parent=ledger_variant(spec.parent) + variant_suffix if spec.parent else None, backend=spec.backend,
            precision=spec.precision, model=getattr(row, "model", None) or bundle_name,
            **(getattr(row, "info", None) or {}),
            bench={"speedup_vs_torch": json_number(row.speedup) if timed else None,
                   "throughput_ratio": json_number(row.throughput_ratio) if timed else None,
                   "batch_size": SPEC.batch_size, "threads": int(row.threads) if timed else None,
                   "noisy": bool(row.noisy) if timed else None, "forced_length": preset.forced_length,
                   "own_process": True, "timed": timed})
        records.append(ledger.append(ledger.ledger_path(preset.name), record))
    return records


def _absent(x) -> bool:
    """None, or the NaN pandas puts in a text column for it."""
    return x is None or (isinstance(x, float) and x != x)


def bench_table(df: pd.DataFrame) -> str:
    """The printed table: one line per variant, ratios against torch eager, then each gate.

    Failed and skipped variants show FAILED / skipped and no numbers; the closing line names
    the fastest variant that passed its gate. With a `shape` column (run_shapes) rows are
    named '<shape> <variant>' and the baseline is torch eager on the first shape.
    """
    shaped = "shape" in df
    cols = [*(["shape"] if shaped else []), "variant", "status", "p50_ms", "p95_ms", "speedup", "sentences_per_s",
            "throughput_ratio", "agreement", "noisy", *(c for c in ROOFLINE_COLUMNS if c in df)]
    labels = (df["shape"] + " " + df["variant"]) if shaped else df["variant"]
    baseline = f"{df['shape'].iloc[0]} {BASELINE}" if shaped else BASELINE
    shown = df[cols].assign(status=df["status"].map({"ok": "ok", "failed": "FAILED", "skipped": "skipped"}))
    lines = [shown.to_string(index=False, na_rep="-", float_format=lambda x: f"{x:.2f}"), "",
             "gates (checked before timing):"]
    for label, row in zip(labels, df.itertuples(index=False)):
        if row.status == "skipped":
            lines.append(f"  {label}: skipped, not timed: {row.reason}")
        elif _absent(row.gate):
            lines.append(f"  {label}: {'baseline' if label == baseline else 'torch eager'}, no gate")
        else:
            verdict = "passed" if row.gate_passed else "FAILED, not timed"
            lines.append(f"  {label}: {row.gate} {verdict}: {row.gate_detail}")
    timed = (df["status"] == "ok") & df["speedup"].notna()
    if timed.any():
        best = df.loc[timed, "p50_ms"].idxmin()
        verdict = ("no optimized variant beats torch eager" if labels[best] == baseline
                   else f"fastest within its gate: {labels[best]} ({df.loc[best, 'speedup']:.2f}x "
                        f"torch eager{' on ' + df['shape'].iloc[0] if shaped else ''} at batch 1)")
        lines.append(verdict)
    return "\n".join(lines + roofline_footer(df))


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, help="ci, workshop, opus-mt-zh-en, opus-mt-shape")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, from: {', '.join(VARIANTS)} (default: {', '.join(DEFAULT_VARIANTS)}; "
                             f"speed-only presets add {', '.join(SPEED_ONLY_EXTRA)})")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the preset's)")
    parser.add_argument("--bundle", default="teacher", help="bundle name under the preset's artifacts")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated layer shapes (encoder-decoder, e.g. 6-6,6-2,6-1: the preset's model "
                             "cut to them, untrained, speed only) or bundle names, timed one after another in one "
                             "run; speedups are against torch eager on the first (replaces --bundle)")
    parser.add_argument("--no-ledger", action="store_true", help="print only; write no ledger records")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the torch GPU rung and, where tensorrt imports, the TensorRT engines "
                             "(labkit gpu-check's steps, each gated before it is timed) instead of the CPU engines")


def cuda_bench(args: argparse.Namespace) -> int:
    """`labkit bench --device cuda`: labkit gpu-check's rows for the preset, printed and written to the ledger.

    These run one after another in this process (a GPU has no thread pool for two engines to fight over;
    the cache is emptied between variants), not in worker processes like the CPU engines."""
    if not torch.cuda.is_available():
        print("labkit bench --device cuda: no CUDA device here (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    preset = Preset.from_name(args.preset)
    report = gpu_check.run_check(preset, args.bundle)
    print(gpu_check.table(report))
    if not args.no_ledger:
        path = ledger.ledger_path(preset.name)
        for record in nb06_tensorrt.part2_records(report["rows"], bundle_for(preset, args.bundle), "labkit-bench"):
            ledger.append(path, record)
    return 1 if report["errors"] else 0


def bench_command(args: argparse.Namespace) -> int:
    """Handler of `labkit bench`: 0 when every variant was gated and the passing ones timed (failed
    and skipped variants are in the table and the ledger), 2 on bad input, 1 when a worker or a
    required import failed."""

    if args.preset not in PRESETS:
        print(f"labkit bench: unknown preset {args.preset!r}; known: {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    if getattr(args, "device", "cpu") == "cuda":
        return cuda_bench(args)
    try:
        variants = parse_variants(args.variants or default_variants(args.preset))
    except ValueError as exc:
        print(f"labkit bench: {exc}", file=sys.stderr)
        return 2
    try:
        preset = Preset.from_name(args.preset)
        if getattr(args, "shapes", None):
            df = run_shapes(preset, args.shapes.split(","), variants, threads=args.threads,
                            write_ledger=not args.no_ledger)
        else:
            df = run_bench(preset, bundle_for(preset, args.bundle), variants, threads=args.threads,
                           write_ledger=not args.no_ledger)
    except ValueError as exc:  # a shape that does not fit the model, a repeated shape
        print(f"labkit bench: {exc}", file=sys.stderr)
        return 2
    except (CommandError, FileNotFoundError, ConnectionError, ImportError) as exc:
        print(f"labkit bench: {exc}", file=sys.stderr)
        return 1
    print(bench_table(df))
    return 0


def _worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.lab.bench")
    parser.add_argument("--worker", required=True, choices=list(VARIANTS))
    parser.add_argument("--preset", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--bundle", default="teacher")
    parser.add_argument("--artifact", default=None, help="the gated directory to run (default: artifact_for)")
    parser.add_argument("--spin", choices=("on", "off"), default="on" if ORT_SPIN else "off",
                        help="ONNX Runtime: idle intra-op threads spin (on) or sleep (off)")
    parser.add_argument("--inter-threads", type=int, default=1, help="CTranslate2: batches run in parallel")
    args = parser.parse_args(argv)
    result = worker(args.worker, args.preset, args.threads, args.bundle, args.artifact, spin=args.spin == "on",
                    inter_threads=args.inter_threads)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
