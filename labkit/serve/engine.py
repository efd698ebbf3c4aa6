"""Which translator a server runs: an engine by name, or the fastest one whose gate passes.

    served = load_served(argparse.Namespace(preset="ci", engine="auto", bundle="teacher", ...))
    served.engine, served.why, served.invariance     # what /readyz reports
    engine_order("ci")     # -> ('ort-int8', 'ct2-int8', 'ort-fp32', 'torch', ...) without bench records

`--engine` takes every variant of labkit.engines.variants (the registry `labkit bench` times), for
any bundle of the preset (`--bundle student-6-2`).

`auto` tries engines fastest first: the ledger's latest `labkit bench` numbers decide when
there are some, else the order measured on this machine (SERVING_ORDER). A variant is built if
missing and gated against its parent (labkit.engines.variants.check_chain) before it serves; a
failed gate or a missing engine moves `auto` to the next and makes a named engine an error.
`--artifact` skips the gate for a directory the caller already gated (the notebook gates once,
then starts several servers on it). ONNX Runtime's idle threads sleep instead of spinning
(labkit.engines.ort.session_options: the event loop and tokenizer threads need those cores);
for PyTorch the same is OMP_WAIT_POLICY=PASSIVE, which must be set before torch loads
(labkit.serve.process sets it for the servers it starts).

Batch invariance (`INVARIANCE`): a served sentence should get the same tokens whatever shares its
batch. fp32 engines and CTranslate2 int8 (per-row activation scales) do; ONNX Runtime's dynamic int8
quantizes activations with one scale per tensor, over the whole batch, so a sentence's answer can
change with its batch mates (measured: `labkit.serve.engine.invariance_probe`). `auto` skips an
engine that is not invariant when the server batches (max batch size > 1); a named one is served
with a warning at start-up and in /readyz.

Left out: hot-swapping models in a running server.
"""

from __future__ import annotations

import argparse
import logging
import random
from dataclasses import dataclass
from typing import Any

from labkit.config import Preset
from labkit.core.bundle import Bundle, bundle_for, load_bundle
from labkit.core.data import load_split
from labkit.core.translator import translator_for
from labkit.engines import variants
from labkit.engines.rows import TorchRowStepper, ensure_rows, row_stepper_from_dir
from labkit.measure import ledger
from labkit.measure.timing import pin_threads

log = logging.getLogger("labkit.serve")
ENGINES = tuple(variants.VARIANTS)
# Fastest first, as measured here (DESIGN: opus-mt shape, batch 1, 2 threads: ORT int8 240 ms,
# CTranslate2 int8 345, ORT fp32 480, PyTorch 760); a ledger with bench records overrides it.
SERVING_ORDER = ("ort-int8", "ort-int8-token", "ct2-int8", "ort-fp32", "torch")
INVARIANT_INT8 = {  # int8 engines whose activation scales never span rows, and why
    "ct2-int8": "int8 with per-row activation scales (CTranslate2)",
    "ct2-int8-vmap": "int8 with per-row activation scales (CTranslate2)",
    "ort-int8-qdq": "int8 with calibrated static activation scales",
    "ort-int8-token": "int8 with one activation scale per token (labkit.engines.ort_int8.per_token_activations)",
    "ort-int8-token-sl": "int8 with one activation scale per token, each sentence over its own shortlist candidates",
}
WARM_TEXTS = 16  # test sentences the model translates before /readyz says ready


def invariance(engine: str) -> tuple[bool, str]:
    """(batch-invariant?, why) for an engine of the registry."""
    v = variants.VARIANTS[engine]
    if v.precision == "fp32":
        return True, "fp32: a row's arithmetic does not depend on the other rows (up to summation order)"
    if engine in INVARIANT_INT8:
        return True, INVARIANT_INT8[engine]
    return False, ("dynamic int8 quantizes activations with one scale per tensor over the whole batch: "
                   "a sentence's tokens can change with what shares its batch")


def measured_order(preset_name: str, bundle_name: str | None = None) -> tuple[str, ...]:
    """Engines by the p50 of their latest ok `labkit bench` record, fastest first; () without records."""
    path = ledger.ledger_path(preset_name)
    if not path.exists():
        return ()
    df = ledger.read(path)
    df = df[df["variant"].isin([variants.ledger_variant(e) for e in ENGINES])]
    if bundle_name is not None and "model" in df:
        df = df[df["model"].astype(str).str.contains(bundle_name, regex=False)]
    df = ledger.latest(df)
    df = df[(df["status"] == "ok") & df["metrics.latency_ms.p50"].notna()].sort_values("metrics.latency_ms.p50")
    return tuple(v.removeprefix("bench-") for v in df["variant"])


def engine_order(preset_name: str, bundle_name: str | None = None,
                 measured: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Measured engines fastest first, then the rest of SERVING_ORDER (`measured`: measured_order's, if read)."""
    measured = measured_order(preset_name, bundle_name) if measured is None else measured
    return measured + tuple(e for e in SERVING_ORDER if e not in measured)


@dataclass(frozen=True)
class Served:
    """The translator a server runs and what /readyz says about it."""

    translator: Any
    model_id: str
    engine: str
    artifact: str | None  # the gated directory (None: PyTorch)
    bundle: Bundle | None
    threads: int
    why: str  # why this engine
    gate: str | None  # its gate's verdict
    invariance: tuple[bool, str]

    def describe(self) -> dict:
        return {"engine": self.engine, "why": self.why, "gate": self.gate,
                "batch_invariant": self.invariance[0], "batch_invariance": self.invariance[1]}


def gated_translator(preset: Preset, engine: str, threads: int, bundle: Bundle, artifact: str | None = None,
                     batching: bool = True, inter_threads: int = 1) -> Served:
    """The Served `engine`, or the fastest gated one when engine is 'auto'.

    A variant whose gate fails (or whose engine is not installed) is never served: 'auto' moves
    on to the next; a named engine raises with the gate's reason. With `batching`, 'auto' also
    skips engines whose answers depend on their batch mates (`invariance`).
    """
    model_id = f"{preset.name}/{bundle.name}"

    def build(candidate: str, path):
        if variants.VARIANTS[candidate].backend == "ctranslate2":  # inter translators share the threads
            return variants.build_translator(candidate, preset, max(1, threads // inter_threads), bundle, path,
                                             inter_threads=inter_threads)
        return variants.build_translator(candidate, preset, threads, bundle, path, spin=False)

    if artifact is not None or engine == "torch":
        translator = build(engine, artifact)
        why = "named on the command line" + (" (--artifact: gated by the caller)" if artifact else "")
        return Served(translator, f"{model_id}/{engine}", engine, artifact, bundle, threads, why, None,
                      invariance(engine))
    measured = measured_order(preset.name, bundle.name)
    candidates = engine_order(preset.name, bundle.name, measured) if engine == "auto" else (engine,)
    reasons = []
    for candidate in candidates:
        invariant = invariance(candidate)
        if engine == "auto" and batching and not invariant[0]:
            reasons.append(f"{candidate} skipped: not batch-invariant ({invariant[1]})")
            continue
        check = variants.check_chain(preset, candidate, bundle)
        if check.status == "ok":
            translator = build(candidate, check.artifact)
            order = "the ledger's `labkit bench` p50" if candidate in measured else "the default order (SERVING_ORDER)"
            why = ("named on the command line" if engine != "auto"
                   else f"auto: the fastest by {order} whose gate passes" + (f"; {'; '.join(reasons)}" if reasons else ""))
            gate = (check.gate or {}).get("detail")
            return Served(translator, f"{model_id}/{candidate}", candidate, check.artifact, bundle, threads, why,
                          gate, invariant)
        reasons.append(f"{candidate} {check.status}: {check.reason}")
        log.warning("not serving %s", reasons[-1])
    raise RuntimeError("no engine passed its gate: " + "; ".join(reasons))


def load_served(args: argparse.Namespace) -> Served:
    """What the `labkit serve` arguments ask for, gated; threads pinned first."""
    preset = Preset.from_name(args.preset)
    preset = preset.with_(threads=args.threads or preset.threads)
    pin_threads(preset.threads)
    if args.bundle_dir:  # a bundle directory served as is with PyTorch (tests, experiments)
        bundle = load_bundle(args.bundle_dir)
        return Served(translator_for(bundle, preset), f"{args.bundle_dir}/torch", "torch", None, bundle,
                      preset.threads, "--bundle-dir: served with PyTorch", None, invariance("torch"))
    bundle = bundle_for(preset, args.bundle)
    batching = getattr(args, "max_batch_size", 2) > 1
    inter = getattr(args, "inter_threads", None)
    if inter is None:  # CTranslate2's throughput advice: parallel translators when it batches on its own
        inter = 2 if batching and getattr(args, "batching", "auto") in ("auto", "ct2") and preset.threads >= 2 else 1
    return gated_translator(preset, args.engine, preset.threads, bundle, args.artifact, batching, inter)


def load_translator(args: argparse.Namespace):
    """(translator, model id) as the `labkit serve` arguments say (Ray replicas)."""
    served = load_served(args)
    return served.translator, served.model_id


# ONNX Runtime engines with a rows graph (the shortlisted ones: their parent's, without the LM head)
ROW_ENGINES = ("ort-fp32", "ort-int8", "ort-int8-token", "ort-int8-all", "ort-int8-sl", "ort-int8-all-sl",
               "ort-int8-token-sl")


def row_stepper(engine: str, bundle: Bundle, artifact: str | None, threads: int):
    """The continuous-batching stepper of a served engine (labkit.engines.rows), or ValueError saying why not."""
    if engine == "torch":
        return TorchRowStepper(bundle.model)
    if engine in ROW_ENGINES:
        return row_stepper_from_dir(artifact, ensure_rows(artifact, bundle), threads, spin=False)
    raise ValueError(f"{engine} has no continuous batching here (torch, {', '.join(ROW_ENGINES)} do); "
                     "serve it with --batching static")


def invariance_probe(translator, rows: list[list[int]], probes: int = 5, batches: int = 20,
                     max_mates: int = 15, seed: int = 0) -> dict:
    """Each of `probes` sentences alone and inside `batches` random mixed batches: how many answers changed.

    The mates come from rows[probes:]; the probe sits at a random position of its batch.
    """
    rng = random.Random(seed)
    changed, trials, examples = 0, 0, []
    for probe in rows[:probes]:
        alone = translator.generate([probe], 1)[0]
        for _ in range(batches):
            mates = rng.sample(rows[probes:], rng.randint(1, min(max_mates, len(rows) - probes)))
            at = rng.randint(0, len(mates))
            got = translator.generate(mates[:at] + [probe] + mates[at:], 1)[at]
            trials += 1
            if got != alone:
                changed += 1
                examples.append({"alone": alone, "batched": got, "batch": len(mates) + 1})
    return {"trials": trials, "changed": changed, "invariant": changed == 0, "examples": examples[:3]}


def warm_texts() -> list[str]:
    return [p.zh for p in load_split("test", limit=WARM_TEXTS)]
