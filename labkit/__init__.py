"""labkit: the library behind the inference optimization lab.

Modules (one concept each): data, lexicon, train, models, config, decode, pipeline,
evaluate, profiling, bench, ledger, plots, widgets, report, prune, distill, export,
runtime, quantize, peer, benchmark, runner, artifacts. Names below are re-exported
lazily so `import labkit` stays fast and needs neither torch nor optional engines.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Preset": "labkit.config",
    "PRESETS": "labkit.config",
    "Bundle": "labkit.models",
    "load_bundle": "labkit.models",
    "load_teacher": "labkit.models",
    "load_model": "labkit.models",
    "build_opus_mt_shape": "labkit.models",
    "DecodeConfig": "labkit.decode",
    "TorchStepper": "labkit.decode",
    "Translator": "labkit.pipeline",
    "translator_for": "labkit.pipeline",
    "Measurement": "labkit.bench",
    "measure": "labkit.bench",
    "environment": "labkit.bench",
    "run_notebooks": "labkit.runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")
