"""The engine variants the lab builds, each gated against its parent before anyone uses it.

    check = check_chain(preset, "ort-int8", bundle)     # builds ort-fp32 and ort-int8 if missing, gates both
    check.status, check.gate["detail"]                    # 'ok', 'BLEU 99.24 vs ort-fp32 99.24: drop 0.00 ...'
    translator = build_translator("ort-int8", preset, 2, bundle, artifact=check.artifact)

VARIANTS names every variant (torch, ort-fp32, ort-int8, ort-int8-token (per-token activation scales), ort-int8-all, ort-int8-qdq, ct2-fp32,
ct2-int8; ort-int8-sl, ort-int8-all-sl, ort-int8-token-sl and ct2-int8-vmap, the same engines decoding over a
vocabulary shortlist; ort-fp32-loop, ort-int8-loop and ort-int8-all-loop, the decode loop inside the engine) with its backend,
precision and parent. `check_variant(s)` builds what a variant runs
(ONNX export, int8 quantization, CTranslate2 conversion: cached artifacts) and gates it: ort-fp32
by the export's parity, int8 and CTranslate2 by labkit.measure.gates.variant_gate on the preset's
gate sentences against the parent's translations, the in-engine loops by identical tokens to their
parent's Python loop over the same graphs (labkit.measure.gates.loop_gate). A failed parent fails its children; a missing
engine (CTranslate2) is a skip with the install hint. `labkit bench` times what passed; `labkit
serve` serves it.

Left out: timing (labkit.lab.bench) and GPU engines (TensorRT has its own modules).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from labkit.config import Preset
from labkit.core.bundle import Bundle, bundle_key
from labkit.core.translator import decode_config, translator_for
from labkit.engines.ct2 import COMPUTE_TYPES_SHORT, Ct2Translator, ensure_ct2, missing_reason
from labkit.engines.onnx_export import ensure_onnx
from labkit.engines.onnx_graphs import read_sidecar
from labkit.engines.ort import OrtStepper
from labkit.engines.ort_int8 import (
    ALL_BLOCKS_BASIS,
    BLOCKS,
    ensure_per_token,
    ensure_quantized,
    evaluate_translator,
    gate_pairs,
    recipe_of,
)
from labkit.engines.ort_loop import LoopTranslator, ensure_loop
from labkit.engines.shortlist import (
    MaskedCt2Translator,
    Shortlist,
    candidate_stats,
    ensure_ct2_vmap,
    load_shortlist,
    shortlist_dir,
)
from labkit.engines.shortlist_ort import MaskedStepper, ShortlistStepper, ensure_shortlisted
from labkit.measure.gates import loop_gate, onnx_parity_gate, shortlist_gate, variant_gate
from labkit.measure.quality import agreement


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
                        "ONNX Runtime, optimized + dynamic int8 (labkit.engines.ort_int8 'dynamic')"),
    "ort-int8-token": Variant("onnxruntime", "quantization", "int8", "ort-fp32",
                              "ort-int8 with one activation scale per token: answers independent of the batch"),
    "ort-int8-all": Variant("onnxruntime", "quantization", "int8", "ort-fp32",
                            "ONNX Runtime, dynamic int8 of every block, LM head and embeddings included"),
    "ort-int8-qdq": Variant("onnxruntime", "quantization", "int8", "ort-fp32",
                            "ONNX Runtime, static symmetric QDQ int8 (labkit.engines.ort_int8 'qdq')"),
    "ort-fp32-loop": Variant("onnxruntime", "kv-cache", "fp32", "ort-fp32",
                             "ONNX Runtime BeamSearch operator: ort-fp32's graphs, the decode loop in the engine"),
    "ort-int8-loop": Variant("onnxruntime", "kv-cache", "int8", "ort-int8",
                             "ONNX Runtime BeamSearch operator: ort-int8's graphs, the decode loop in the engine"),
    "ort-int8-all-loop": Variant("onnxruntime", "kv-cache", "int8", "ort-int8-all",
                                 "ONNX Runtime BeamSearch operator: ort-int8-all's graphs, the decode loop in the engine"),
    "ct2-fp32": Variant("ctranslate2", "peer", "fp32", "torch", "CTranslate2 float32"),
    "ct2-int8": Variant("ctranslate2", "peer", "int8", "torch", "CTranslate2 int8"),
    "ort-int8-sl": Variant("onnxruntime", "shortlist", "int8", "ort-int8",
                           "ort-int8, logits only for the batch's shortlist candidates (labkit.engines.shortlist)"),
    "ort-int8-all-sl": Variant("onnxruntime", "shortlist", "int8", "ort-int8-all",
                               "ort-int8-all, logits only for the batch's shortlist candidates"),
    "ort-int8-token-sl": Variant("onnxruntime", "shortlist", "int8", "ort-int8-token",
                                 "ort-int8-token over the shortlist, each sentence over its own candidates: "
                                 "answers independent of the batch"),
    "ct2-int8-vmap": Variant("ctranslate2", "shortlist", "int8", "ct2-int8",
                             "CTranslate2 int8 with the same shortlist as its vocabulary map (use_vmap)"),
}
SHORTLIST_OF = {"ort-int8-sl": "ort-int8", "ort-int8-all-sl": "ort-int8-all",  # shortlisted ORT variant -> parent
                "ort-int8-token-sl": "ort-int8-token"}


@dataclass(frozen=True)
class Check:
    """What a variant's gate said before anything was timed; only status "ok" is timed."""
    status: str  # ok | failed (gate not passed) | skipped (engine not installed, or parent not ok)
    gate: dict | None = None  # {name, passed, detail}; None for the baseline and for skips
    reason: str | None = None  # why failed or skipped
    artifact: str | None = None  # what the worker loads (None: torch, or nothing was built)
    info: dict = field(default_factory=dict)  # gate-subset metrics, the int8 recipe


# --------------------------------------------------------------------------- building


def parse_variants(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """'torch, ort-int8' -> ['torch', 'ort-int8']; unknown names raise with the known ones."""
    names = [v.strip() for v in text.split(",")] if isinstance(text, str) else list(text)
    names = [v for v in names if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown variant(s) {unknown or names}; known: {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def artifact_for(variant: str, preset: Preset, bundle: Bundle):
    """Build (if missing or stale) what `variant` runs from `bundle` and return its path (None for torch)."""
    if variant == "torch":
        return None
    if variant == "ort-fp32":
        return ensure_onnx(preset, bundle)
    if variant in SHORTLIST_OF:
        return ensure_shortlisted(preset, bundle, artifact_for(SHORTLIST_OF[variant], preset, bundle))
    if variant == "ct2-int8-vmap":
        return ensure_ct2_vmap(preset, bundle, "int8")
    if variant.endswith("-loop"):
        # ort-fp32-loop -> "fp32", ort-int8-all-loop -> "int8-all": the loop over its parent's own graphs
        return ensure_loop(preset, bundle, variant[len("ort-"):-len("-loop")],
                           source=artifact_for(VARIANTS[variant].parent, preset, bundle))
    if variant == "ort-int8-all":
        # The LM head is the largest matrix of a 65k-vocabulary model: where int8 pays most, and
        # what the default recipe keeps in float until it is measured safe. Its own gate still applies.
        return ensure_quantized(preset, bundle, "dynamic", blocks=BLOCKS, tag="all", basis=ALL_BLOCKS_BASIS)
    if variant == "ort-int8-token":
        return ensure_per_token(preset, bundle)
    if variant.startswith("ort-int8"):
        return ensure_quantized(preset, bundle, "qdq" if variant.endswith("qdq") else "dynamic")
    compute_type = {short: full for full, short in COMPUTE_TYPES_SHORT.items()}[VARIANTS[variant].precision]
    return ensure_ct2(preset, bundle, compute_type)


def build_translator(variant: str, preset: Preset, threads: int, bundle: Bundle, artifact=None, spin: bool = True,
                     inter_threads: int = 1):
    """The Translator-shaped object of `variant`, decoding as the preset says.

    `artifact` is the directory to run (default: `artifact_for`, which builds it if missing);
    `spin=False` lets ONNX Runtime's idle threads sleep (labkit.engines.ort.session_options: servers);
    `inter_threads` is CTranslate2's count of batches run in parallel (labkit.lab.bench_threads tries both).
    """
    if variant != "torch" and artifact is None:
        artifact = artifact_for(variant, preset, bundle)
    if VARIANTS[variant].backend == "ctranslate2":
        return Ct2Translator(artifact, threads=threads, decode=decode_config(preset), inter_threads=inter_threads,
                             use_vmap=variant.endswith("vmap"))
    if variant.endswith("-loop"):
        return LoopTranslator(artifact, bundle.tokenizer, decode_config(preset), threads=threads, spin=spin)
    stepper = None
    if variant in SHORTLIST_OF:
        stepper = ShortlistStepper.from_dir(artifact, threads=threads, spin=spin)
    elif variant != "torch":
        stepper = OrtStepper.from_dir(artifact, threads=threads, spin=spin)
    # opus-mt-shape emits ids past the teacher tokenizer's pieces; the Translator drops them with a note.
    return translator_for(bundle, preset, stepper)


# --------------------------------------------------------------------------- gates (parent, before timing)


def variant_depth(variant: str) -> int:
    """Parents before children: torch 0, ort-fp32 and ct2-* 1, ort-int8* and ort-fp32-loop 2, ort-int8-loop 3."""
    parent = VARIANTS[variant].parent
    return 0 if parent is None else 1 + variant_depth(parent)


class Evaluations:
    """Each engine translates the gate sentences once, with one thread (a parent serves several children)."""

    def __init__(self, preset: Preset, bundle: Bundle, pairs: list | None = None):
        self.preset, self.bundle = preset, bundle
        self.pairs, self.results = pairs if pairs is not None else gate_pairs(preset), {}

    def __call__(self, variant: str, artifact=None) -> dict:
        if variant not in self.results:
            translator = build_translator(variant, self.preset, 1, self.bundle, artifact)
            self.results[variant] = evaluate_translator(translator, self.preset, self.pairs)
        return self.results[variant]

    def masked(self, variant: str, table: Shortlist, artifact=None) -> dict:
        """`variant` (a full-vocabulary parent) with its logits masked to the batch's candidates: the oracle."""
        artifact = artifact or artifact_for(variant, self.preset, self.bundle)
        if VARIANTS[variant].backend == "ctranslate2":
            translator = MaskedCt2Translator(artifact, table, threads=1, decode=decode_config(self.preset))
        else:
            translator = translator_for(self.bundle, self.preset, MaskedStepper(OrtStepper.from_dir(artifact), table))
        return evaluate_translator(translator, self.preset, self.pairs)


def shortlist_variant_gate(variant: str, artifact, evaluations: Evaluations, parent: Check | None) -> dict:
    """The shortlist gate (labkit.measure.gates.shortlist_gate) of `variant` against its full-vocabulary parent;
    speed-only presets compare with the parent masked to the same candidates."""
    preset, spec = evaluations.preset, VARIANTS[variant]
    parent_artifact = parent and parent.artifact
    result, base = evaluations(variant, artifact), evaluations(spec.parent, parent_artifact)
    table = load_shortlist(shortlist_dir(preset.name, bundle_key(evaluations.bundle)))
    stats = candidate_stats(table, evaluations.bundle.tokenizer, evaluations.pairs, preset.shortlist.batch)
    sizes = (f"candidates per sentence mean {stats['size_mean']:.0f} (p95 {stats['size_p95']:.0f}), per batch of "
             f"{stats['batch']} mean {stats['batch_size_mean']:.0f} (p95 {stats['batch_size_p95']:.0f}) of "
             f"{table.vocab_size}")
    same, n = agreement(result["ids"], base["ids"]), len(base["ids"])
    if not preset.quality:
        masked = agreement(result["ids"], evaluations.masked(spec.parent, table, parent_artifact)["ids"])
        sizes += ("; candidate sets from the teacher's corpus statistics with the same tokenizer, so realistic "
                  "for this corpus, and ids past its pieces are never candidates")
        return shortlist_gate(same, n, spec.parent, masked_same=masked, sizes=sizes)
    sizes += f"; reference pieces inside their batch's set {stats['coverage']:.2%}"
    return shortlist_gate(same, n, spec.parent, result["bleu"], base["bleu"], sizes=sizes)


def check_variant(variant: str, preset: Preset, evaluations: Evaluations, parent: Check | None = None,
                  gate: dict | None = None) -> Check:
    """Build `variant` and gate it against its parent: Check(status ok | failed | skipped, gate, ...).

    `parent` is the parent's own Check when it is benched too (a failed parent fails its children
    without building them); `gate` is one the caller already measured on the same artifact.
    """
    spec = VARIANTS[variant]
    if spec.parent is None:
        return Check("ok")
    if parent is not None and parent.status != "ok":
        why = f"its parent {spec.parent} {parent.status}: {parent.reason}"
        return Check(parent.status, {"name": "parent", "passed": False, "detail": why} if parent.status == "failed"
                     else None, why)
    if spec.backend == "ctranslate2":
        reason = missing_reason()
        if reason:
            return Check("skipped", reason=reason)
    try:
        artifact = artifact_for(variant, preset, evaluations.bundle)
    except AssertionError as exc:  # a gate inside the build: export parity, no int8-safe block
        name = "onnx-parity" if variant == "ort-fp32" else "build"
        return Check("failed", {"name": name, "passed": False, "detail": str(exc)}, str(exc))
    info = {"recipe": recipe_of(artifact)} if spec.technique == "quantization" else {}
    if variant == "ort-fp32":
        gate = onnx_parity_gate(read_sidecar(artifact)["parity"])
    elif gate is None and spec.technique == "shortlist":
        gate = shortlist_variant_gate(variant, artifact, evaluations, parent)
        result, base = evaluations(variant, artifact), evaluations(spec.parent, parent and parent.artifact)  # cached
        info["gate_metrics"] = {k: result[k] for k in ("bleu", "chrf")} | {
            "parent_bleu": base["bleu"], "sentences": len(base["ids"]), "agreement": agreement(result["ids"], base["ids"])}
    elif gate is None:
        result, base = evaluations(variant, artifact), evaluations(spec.parent, parent and parent.artifact)
        gate = (loop_gate(result["ids"], base["ids"], spec.parent) if variant.endswith("-loop")
                else variant_gate(result, base, spec.precision, preset, parent_name=spec.parent))
        info["gate_metrics"] = {k: result[k] for k in ("bleu", "chrf")} | {"parent_bleu": base["bleu"],
                                                                          "sentences": len(base["ids"])}
    passed = bool(gate["passed"])
    return Check("ok" if passed else "failed", dict(gate), None if passed else gate["detail"], str(artifact), info)


def check_variants(preset: Preset, variants, bundle: Bundle, gates: Mapping[str, dict] | None = None,
                   pairs: list | None = None) -> dict[str, Check]:
    """Build and gate every variant, parents first, before any timing; {variant: Check} in `variants` order.

    `pairs`: the gate sentences (default `gate_pairs(preset)`; notebook 05's shortlist section uses more)."""
    evaluations = Evaluations(preset, bundle, pairs)
    checks: dict[str, Check] = {}
    for v in sorted(variants, key=variant_depth):
        checks[v] = check_variant(v, preset, evaluations, checks.get(VARIANTS[v].parent),
                                  (gates or {}).get(v))
    return {v: checks[v] for v in variants}


def ledger_variant(variant: str) -> str:
    """Ledger name of a bench row: 'ort-int8' -> 'bench-ort-int8' (notebook records keep theirs)."""
    return f"bench-{variant}"


def ancestors(variant: str) -> list[str]:
    """The variant and its parents, root first: 'ort-int8' -> ['torch', 'ort-fp32', 'ort-int8']."""
    parent = VARIANTS[variant].parent
    return ([] if parent is None else ancestors(parent)) + [variant]


def check_chain(preset: Preset, variant: str, bundle: Bundle) -> Check:
    """Gate `variant` and every parent it descends from (a failed parent fails it); its Check."""
    return check_variants(preset, ancestors(variant), bundle)[variant]
