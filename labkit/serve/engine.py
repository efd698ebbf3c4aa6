"""Which translator a server runs: an engine by name, or the fastest one whose gate passes.

    translator, model_id = load_translator(argparse.Namespace(preset="ci", engine="auto", ...))
    engine_order("ci")     # -> ('ort-int8', 'ct2-int8', 'ort-fp32', 'torch') without bench records

`auto` tries engines fastest first: the ledger's latest `labkit bench` numbers decide when
there are some, else the order measured on this machine (SERVING_ORDER). A variant is built if
missing and gated against its parent (labkit.engines.variants.check_chain) before it serves; a
failed gate or a missing engine moves `auto` to the next and makes a named engine an error.
`--artifact` skips the gate for a directory the caller already gated (the notebook gates once,
then starts several servers on it). ONNX Runtime's idle threads sleep instead of spinning
(labkit.engines.ort.session_options: the event loop and tokenizer threads need those cores);
for PyTorch the same is OMP_WAIT_POLICY=PASSIVE, which must be set before torch loads
(labkit.serve.process sets it for the servers it starts).

Left out: hot-swapping models in a running server.
"""

from __future__ import annotations

import argparse
import logging

from labkit.config import Preset
from labkit.core.bundle import Bundle, bundle_for, load_bundle
from labkit.core.data import load_split
from labkit.core.translator import translator_for
from labkit.engines import variants
from labkit.measure import ledger
from labkit.measure.timing import pin_threads

log = logging.getLogger("labkit.serve")
ENGINES = ("torch", "ort-fp32", "ort-int8", "ct2-int8")
# Fastest first, as measured here (DESIGN: opus-mt shape, batch 1, 2 threads: ORT int8 240 ms,
# CTranslate2 int8 345, ORT fp32 480, PyTorch 760); a ledger with bench records overrides it.
SERVING_ORDER = ("ort-int8", "ct2-int8", "ort-fp32", "torch")
WARM_TEXTS = 16  # test sentences the model translates before /readyz says ready


def measured_order(preset_name: str) -> tuple[str, ...]:
    """Engines by the p50 of their latest ok `labkit bench` record, fastest first; () without records."""
    path = ledger.ledger_path(preset_name)
    if not path.exists():
        return ()
    df = ledger.read(path)
    df = ledger.latest(df[df["variant"].isin([variants.ledger_variant(e) for e in ENGINES])])
    df = df[(df["status"] == "ok") & df["metrics.latency_ms.p50"].notna()].sort_values("metrics.latency_ms.p50")
    return tuple(v.removeprefix("bench-") for v in df["variant"])


def engine_order(preset_name: str) -> tuple[str, ...]:
    measured = measured_order(preset_name)
    return measured + tuple(e for e in SERVING_ORDER if e not in measured)


def gated_translator(preset: Preset, engine: str, threads: int, bundle: Bundle, artifact: str | None = None):
    """(translator, engine) for `engine`, or for the fastest gated one when engine is 'auto'.

    A variant whose gate fails (or whose engine is not installed) is never served: 'auto' moves
    on to the next; a named engine raises with the gate's reason.
    """
    if artifact is not None or engine == "torch":
        return variants.build_translator(engine, preset, threads, bundle, artifact, spin=False), engine
    candidates = engine_order(preset.name) if engine == "auto" else (engine,)
    reasons = []
    for candidate in candidates:
        check = variants.check_chain(preset, candidate, bundle)
        if check.status == "ok":
            translator = variants.build_translator(candidate, preset, threads, bundle, check.artifact, spin=False)
            return translator, candidate
        reasons.append(f"{candidate} {check.status}: {check.reason}")
        log.warning("not serving %s", reasons[-1])
    raise RuntimeError("no engine passed its gate: " + "; ".join(reasons))


def load_translator(args: argparse.Namespace):
    """(translator, model id) as the `labkit serve` arguments say; threads pinned first."""
    preset = Preset.from_name(args.preset)
    preset = preset.with_(threads=args.threads or preset.threads)
    pin_threads(preset.threads)
    if args.bundle_dir:  # a bundle directory served as is with PyTorch (tests, experiments)
        return translator_for(load_bundle(args.bundle_dir), preset), f"{args.bundle_dir}/torch"
    bundle = bundle_for(preset, args.bundle)
    translator, engine = gated_translator(preset, args.engine, preset.threads, bundle, args.artifact)
    return translator, f"{preset.name}/{args.bundle}/{engine}"


def warm_texts() -> list[str]:
    return [p.zh for p in load_split("test", limit=WARM_TEXTS)]
