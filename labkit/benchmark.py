"""`labkit bench`: end-to-end translation speed of several engines, each in its own process.

    labkit bench --preset opus-mt-shape --variants torch,ort-fp32,ort-int8,ct2-int8
    df = run_bench("ci", ["torch", "ort-int8", "ct2-int8"])    # the same from a notebook

Every variant runs in a fresh `python -m labkit.benchmark --worker VARIANT` process
(two engines in one process distort each other's thread pools and allocators)
on the same sentences with the same intra-op thread count. A worker first
translates the bench sentences once at batch 1 and returns the ids, which the
parent compares with the PyTorch baseline (agreement), then measures batch-1
end-to-end latency (p50/p95 over the preset's repeats) and sentences/s at
batch 16, and prints one JSON line. Speed-only presets decode a fixed number of
tokens (preset.forced_length), so every engine does the same work.

Artifacts (ONNX export, int8 copies, CTranslate2 conversions) are built by the
parent before any timing, so no worker measures a build. Left out: GPU engines
(TensorRT has its own notebook), concurrency and serving (labkit.serve), and
memory per variant beyond each worker's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Variant:
    backend: str  # torch | onnxruntime | ctranslate2
    technique: str  # ledger technique of its record
    precision: str
    parent: str | None  # the variant it is compared with
    what: str  # one line for the table


VARIANTS: dict[str, Variant] = {
    "torch": Variant("torch", "baseline", "fp32", None, "PyTorch eager, Hugging Face KV cache"),
    "ort-fp32": Variant("onnxruntime", "onnx", "fp32", "torch", "ONNX Runtime, exported graphs"),
    "ort-int8": Variant("onnxruntime", "quantization", "int8", "ort-fp32",
                        "ONNX Runtime, optimized + dynamic int8 (labkit.quantize 'dynamic')"),
    "ort-int8-qdq": Variant("onnxruntime", "quantization", "int8", "ort-fp32",
                            "ONNX Runtime, static symmetric QDQ int8 (labkit.quantize 'qdq')"),
    "ct2-fp32": Variant("ctranslate2", "peer", "fp32", "torch", "CTranslate2 float32"),
    "ct2-int8": Variant("ctranslate2", "peer", "int8", "torch", "CTranslate2 int8"),
}
BASELINE = "torch"
DEFAULT_VARIANTS = ("torch", "ort-fp32", "ort-int8", "ct2-int8")


@dataclass(frozen=True)
class BenchSpec:
    batch_size: int = 16  # sentences per call for throughput
    throughput_sentences: int = 32  # test sentences translated per throughput pass
    timeout_s: float = 1800.0  # per worker, including its model load


SPEC = BenchSpec()


# --------------------------------------------------------------------------- primitives


def parse_variants(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """'torch, ort-int8' -> ['torch', 'ort-int8']; unknown names raise with the known ones."""
    names = [v.strip() for v in text.split(",")] if isinstance(text, str) else list(text)
    names = [v for v in names if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown variant(s) {unknown or names}; known: {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def artifact_for(variant: str, preset, bundle_name: str = "teacher"):
    """Build (if missing) what `variant` runs and return its path (None for torch)."""
    if variant == "torch":
        return None
    if variant == "ort-fp32":
        from labkit.export import ensure_onnx

        return ensure_onnx(preset, bundle_name)
    if variant.startswith("ort-int8"):
        from labkit.quantize import ensure_quantized

        return ensure_quantized(preset, "qdq" if variant.endswith("qdq") else "dynamic", bundle_name)
    from labkit.peer import COMPUTE_TYPES_SHORT, ensure_ct2

    compute_type = {short: full for full, short in COMPUTE_TYPES_SHORT.items()}[VARIANTS[variant].precision]
    return ensure_ct2(preset, bundle_name, compute_type)


def build_translator(variant: str, preset, threads: int, bundle_name: str = "teacher"):
    """The Translator-shaped object of `variant`, decoding as the preset says."""
    from labkit.pipeline import translator_for

    if VARIANTS[variant].backend == "ctranslate2":
        from labkit.peer import Ct2Translator
        from labkit.pipeline import decode_config

        return Ct2Translator(artifact_for(variant, preset, bundle_name), threads=threads,
                             decode=decode_config(preset))
    from labkit.export import bundle_for

    bundle = bundle_for(preset.name, bundle_name)
    stepper = None
    if variant != "torch":
        from labkit.runtime import OrtStepper

        stepper = OrtStepper.from_dir(artifact_for(variant, preset, bundle_name), threads=threads)
    # opus-mt-shape emits ids past the teacher tokenizer's pieces; the Translator drops them with a note.
    return translator_for(bundle, preset, stepper)


def bench_inputs(preset) -> tuple[list[str], list[str]]:
    """(latency sentences, throughput sentences): the first N of the test split, for every variant."""
    from labkit.data import load_split
    from labkit.evaluate import bench_texts

    return bench_texts(preset), [p.zh for p in load_split("test", limit=SPEC.throughput_sentences)]


# --------------------------------------------------------------------------- worker (child process)



def worker(variant: str, preset_name: str, threads: int, bundle_name: str = "teacher") -> dict[str, Any]:
    """Load one variant, check it, time it; the dict is the child's one JSON line."""
    from labkit import bench
    from labkit.config import Preset
    from labkit.evaluate import latency, throughput

    bench.pin_threads(threads)
    preset = Preset.from_name(preset_name).with_(threads=threads)
    start = time.perf_counter()
    translator = build_translator(variant, preset, threads, bundle_name)
    load_s = time.perf_counter() - start
    texts, batch_texts = bench_inputs(preset)
    ids = [translator.run([t]).ids[0] for t in texts]  # also the first warm-up
    m = latency(translator, texts, preset, label=variant)
    sps = throughput(translator, batch_texts, preset, batch_size=SPEC.batch_size)
    return {"variant": variant, "threads": threads, "load_s": load_s, "p50": m.p50, "p95": m.p95,
            "iqr": m.iqr, "n": m.n, "noisy": m.noisy, "sentences_per_s": sps,
            "peak_rss_mb": bench.peak_rss_mb(), "ids": ids,
            "tokens": sum(len(i) for i in ids) / max(1, len(ids))}


# --------------------------------------------------------------------------- orchestration (parent)


def run_variant(variant: str, preset_name: str, threads: int, bundle_name: str = "teacher") -> dict[str, Any]:
    """One worker process: `python -m labkit.benchmark --worker VARIANT ...` -> its JSON result."""
    import os

    from labkit import bench
    from labkit.artifacts import REPO_ROOT

    env = dict(os.environ)
    env.update({var: str(threads) for var in bench.THREAD_ENV_VARS})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "labkit.benchmark", "--worker", variant, "--preset", preset_name,
            "--threads", threads, "--bundle", bundle_name]
    return bench.time_command(argv, timeout=SPEC.timeout_s, env=env)


def agreement_with(result: dict, baseline: dict | None) -> float | None:
    """Fraction of bench sentences whose ids equal the baseline's ([[1,2],[3]] vs [[1,2],[4]] -> 0.5)."""
    if baseline is None:
        return None
    from labkit.evaluate import agreement

    return agreement(result["ids"], baseline["ids"])


def run_bench(preset, variants=DEFAULT_VARIANTS, threads: int | None = None, bundle_name: str = "teacher",
              write_ledger: bool = True, notebook: str = "labkit-bench", progress: bool = True) -> pd.DataFrame:
    """Time each variant in its own process; one row per variant with ratios against torch.

    Columns: variant, backend, precision, p50_ms, p95_ms, noisy, speedup (torch p50 / p50),
    sentences_per_s, throughput_ratio, agreement (ids equal to torch's at batch 1), load_s,
    peak_rss_mb. Ratios are NaN when torch is not among the variants.
    """
    import pandas as pd

    from labkit.config import Preset

    preset = Preset.from_name(preset) if isinstance(preset, str) else preset
    threads = threads or preset.threads
    variants = parse_variants(variants)
    for v in variants:  # build outside the timed processes
        artifact_for(v, preset, bundle_name)
    results = {}
    for v in variants:
        if progress:
            print(f"bench {preset.name}: {v} ({threads} threads) ...", file=sys.stderr, flush=True)
        results[v] = run_variant(v, preset.name, threads, bundle_name)
    df = results_frame(results)
    if write_ledger:
        write_records(df, preset, notebook, bundle_name)
    return df


def results_frame(results: dict[str, dict]) -> pd.DataFrame:
    """Worker results -> the bench table (see run_bench)."""
    import pandas as pd

    base = results.get(BASELINE)
    rows = []
    for v, r in results.items():
        rows.append({"variant": v, "backend": VARIANTS[v].backend, "precision": VARIANTS[v].precision,
                     "p50_ms": r["p50"], "p95_ms": r["p95"], "n": r["n"], "noisy": r["noisy"],
                     "speedup": base["p50"] / r["p50"] if base else float("nan"),
                     "sentences_per_s": r["sentences_per_s"],
                     "throughput_ratio": r["sentences_per_s"] / base["sentences_per_s"] if base else float("nan"),
                     "agreement": agreement_with(r, base), "tokens": r["tokens"], "threads": r["threads"],
                     "load_s": r["load_s"], "peak_rss_mb": r["peak_rss_mb"], "ids": r["ids"]})
    return pd.DataFrame(rows)


def ledger_variant(variant: str) -> str:
    """Ledger name of a bench row: 'ort-int8' -> 'bench-ort-int8' (notebook records keep theirs)."""
    return f"bench-{variant}"


def write_records(df: pd.DataFrame, preset, notebook: str = "labkit-bench", bundle_name: str = "teacher") -> list[dict]:
    """One ledger record per bench row (technique from VARIANTS; metrics latency, sentences/s, agreement)."""
    from labkit import ledger

    records = []
    for row in df.itertuples(index=False):
        spec = VARIANTS[row.variant]
        metrics = {"latency_ms": {"p50": row.p50_ms, "p95": row.p95_ms, "n": int(row.n)},
                   "sentences_per_s": row.sentences_per_s, "peak_rss_mb": row.peak_rss_mb,
                   "agreement": None if row.agreement is None or row.agreement != row.agreement else row.agreement}
        record = ledger.make_record(
            notebook=notebook, variant=ledger_variant(row.variant), technique=spec.technique,
            metrics=metrics, parent=ledger_variant(spec.parent) if spec.parent else None,
            backend=spec.backend, precision=spec.precision, model=bundle_name,
            bench={"speedup_vs_torch": _finite(row.speedup), "throughput_ratio": _finite(row.throughput_ratio),
                   "batch_size": SPEC.batch_size, "threads": int(row.threads), "noisy": bool(row.noisy),
                   "forced_length": preset.forced_length, "own_process": True})
        records.append(ledger.append(ledger.ledger_path(preset.name), record))
    return records


def _finite(x: float) -> float | None:
    return None if x != x else float(x)  # NaN (no torch row) is not JSON


def format_table(df: pd.DataFrame) -> str:
    """The printed table: one line per variant, ratios against torch eager."""
    cols = ["variant", "p50_ms", "p95_ms", "speedup", "sentences_per_s", "throughput_ratio", "agreement", "noisy"]
    return df[cols].to_string(index=False, float_format=lambda x: f"{x:.2f}")


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, help="ci, workshop, opus-mt-zh-en, opus-mt-shape")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the preset's)")
    parser.add_argument("--bundle", default="teacher", help="bundle name under the preset's artifacts")
    parser.add_argument("--no-ledger", action="store_true", help="print only; write no ledger records")


def main(args: argparse.Namespace) -> int:
    """Handler of `labkit bench`: 0 on success, 2 on bad input, 1 when a worker failed."""
    from labkit.bench import CommandError
    from labkit.config import PRESETS

    if args.preset not in PRESETS:
        print(f"labkit bench: unknown preset {args.preset!r}; known: {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    try:
        variants = parse_variants(args.variants)
    except ValueError as exc:
        print(f"labkit bench: {exc}", file=sys.stderr)
        return 2
    try:
        df = run_bench(args.preset, variants, threads=args.threads, bundle_name=args.bundle,
                       write_ledger=not args.no_ledger)
    except (CommandError, FileNotFoundError, ConnectionError) as exc:
        print(f"labkit bench: {exc}", file=sys.stderr)
        return 1
    print(format_table(df))
    return 0


def _worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.benchmark")
    parser.add_argument("--worker", required=True, choices=list(VARIANTS))
    parser.add_argument("--preset", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--bundle", default="teacher")
    args = parser.parse_args(argv)
    result = worker(args.worker, args.preset, args.threads, args.bundle)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
