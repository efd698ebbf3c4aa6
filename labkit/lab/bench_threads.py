"""`labkit bench --tune-threads`: the engines' own thread settings, each tried in its own process.

    labkit bench --preset opus-mt-shape --tune-threads              # ort-int8 and ct2-int8, every setting
    df = tune_threads(preset, bundle, ["ct2-int8"], threads=2)     # the same from Python

Each trial is one bench worker (labkit.lab.bench.worker: batch-1 p50/p95 over the bench sentences,
sentences/s at batch 16) with one setting changed, after the variant passed its gate:
- ONNX Runtime: intra-op spinning on, or off (`session.intra_op.allow_spinning=0`, the bench's default).
- CTranslate2: `intra_threads` x `inter_threads` (2x1, or 1x2: two batches in parallel, one thread
  each) and the OpenMP wait policy of its thread pool (`OMP_WAIT_POLICY` unset, PASSIVE, ACTIVE).

What the bench uses, and why: ONNX Runtime without spinning (`labkit.lab.bench.ORT_SPIN`), CTranslate2
at intra = threads, inter = 1 with the OpenMP wait policy unset: each engine's fastest batch-1 setting
in this trial (PASSIVE's batch-16 edge, 10.5 vs 9.2 sentences/s, is inside the noise). Measured with `labkit bench --preset opus-mt-shape --tune-threads` (2 threads, 8 sentences x 3
passes at batch 1, 32 sentences at batch 16) on the shared 2-core machine while other jobs ran (load
average ~20, so every row but two is flagged noisy and the trials, run one after another, saw different
load): batch-1 p50 ms / sentences/s at batch 16 —
    ort-int8  spin 4009 / 1.54;  no spin 1711 / 2.10
    ct2-int8  OMP_WAIT_POLICY unset 376 / 9.24;  PASSIVE 807 / 10.53;  ACTIVE 1900 / 3.71;  intra 1 x inter 2 1724 / 4.49
Not spinning agrees with labkit.engines.ort.session_options' own measurement on busy cores; on an idle
machine it costs "a hair". inter = 2 halves the threads per batch and the bench sends one batch at a
time, so it can only lose. Rerun the trial on an idle machine before trusting the CTranslate2 ordering.
Left out: torch's OpenMP settings (the baseline runs as shipped), thread counts other than the
bench's (notebook 01 sweeps those), and core pinning (taskset).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from labkit.config import PRESETS, Preset
from labkit.core.bundle import Bundle, bundle_for, bundle_key
from labkit.engines.variants import VARIANTS, check_variants, parse_variants
from labkit.lab.bench import add_arguments, bench_command, run_variant
from labkit.measure.timing import CommandError

if TYPE_CHECKING:
    import argparse

    import pandas as pd

DEFAULT_TUNED = ("ort-int8", "ct2-int8")


@dataclass(frozen=True)
class Trial:
    setting: str  # what the table shows
    inter: int = 1  # CTranslate2 inter_threads; intra = threads // inter
    env: dict = field(default_factory=dict)  # extra environment of the worker
    spin: bool = True  # ONNX Runtime intra-op spinning


TRIALS = {
    "onnxruntime": (Trial("spin"), Trial("no spin (default)", spin=False)),
    "ctranslate2": (Trial("intra=T inter=1, OMP_WAIT_POLICY unset (default)"),
                    Trial("intra=T inter=1, OMP_WAIT_POLICY=PASSIVE", env={"OMP_WAIT_POLICY": "PASSIVE"}),
                    Trial("intra=T inter=1, OMP_WAIT_POLICY=ACTIVE", env={"OMP_WAIT_POLICY": "ACTIVE"}),
                    Trial("intra=T/2 inter=2", inter=2)),
}


def trial_args(trial: Trial) -> tuple:
    """Worker flags of a trial: Trial('no spin', spin=False) -> ('--spin', 'off', '--inter-threads', 1)."""
    return ("--spin", "on" if trial.spin else "off", "--inter-threads", trial.inter)


def tune_threads(preset: Preset, bundle: Bundle, variants=DEFAULT_TUNED, threads: int | None = None,
                 progress: bool = True) -> pd.DataFrame:
    """Every trial of every gated variant in its own process; one row per (variant, setting)."""
    import pandas as pd

    threads = threads or preset.threads
    variants = [v for v in parse_variants(variants) if VARIANTS[v].backend in TRIALS]
    rows = []
    for v, check in check_variants(preset, variants, bundle).items():
        if check.status != "ok":
            rows.append({"variant": v, "setting": f"not run: {check.status}: {check.reason}"})
            continue
        for trial in TRIALS[VARIANTS[v].backend]:
            intra = max(1, threads // trial.inter)
            if progress:
                print(f"tune-threads {preset.name}: {v} {trial.setting} ...", file=sys.stderr, flush=True)
            r = run_variant(v, preset.name, intra, bundle_key(bundle), check.artifact, trial.env, trial_args(trial))
            rows.append({"variant": v, "setting": trial.setting, "intra": intra, "inter": trial.inter,
                         "p50_ms": r["p50"], "p95_ms": r["p95"], "noisy": r["noisy"],
                         "sentences_per_s": r["sentences_per_s"]})
            if progress:  # a long trial on a busy machine still leaves its rows behind
                print(f"tune-threads {preset.name}: {rows[-1]}", file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def tune_command(args: argparse.Namespace) -> int:
    """Handler of `labkit bench --tune-threads`: prints the trial table; 1 when a worker failed."""
    preset = Preset.from_name(args.preset)
    try:
        df = tune_threads(preset, bundle_for(preset, args.bundle), args.variants or DEFAULT_TUNED, args.threads)
    except (CommandError, ValueError, ImportError) as exc:
        print(f"labkit bench --tune-threads: {exc}", file=sys.stderr)
        return 1
    print(df.to_string(index=False, na_rep="-", float_format=lambda x: f"{x:.2f}"))
    print(f"{preset.name}, {args.threads or preset.threads} threads; batch-1 p50/p95 over the bench sentences, "
          "sentences/s at batch 16; each row its own process, one setting changed")
    return 0


def add_tune_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tune-threads", action="store_true",
                        help="try the engines' thread settings (ORT spinning; CTranslate2 intra/inter threads, "
                             f"OMP_WAIT_POLICY), each in its own process (default variants: {', '.join(DEFAULT_TUNED)})")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """`labkit bench`'s arguments: the bench's own (labkit.lab.bench) and --tune-threads."""
    add_arguments(parser)
    add_tune_argument(parser)


def bench_or_tune(args: argparse.Namespace) -> int:
    """Handler of `labkit bench`: 0 ok, 1 a worker failed, 2 bad input; `--tune-threads`: the thread-settings
    trial instead."""
    if getattr(args, "tune_threads", False) and args.preset in PRESETS:
        return tune_command(args)
    return bench_command(args)
