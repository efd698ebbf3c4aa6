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
    "Bundle": "labkit.core.bundle",
    "load_bundle": "labkit.core.bundle",
    "load_teacher": "labkit.core.bundle",
    "load_model": "labkit.core.bundle",
    "build_opus_mt_shape": "labkit.core.bundle",
    "DecodeConfig": "labkit.core.decode",
    "TorchStepper": "labkit.core.decode",
    "Translator": "labkit.core.translator",
    "translator_for": "labkit.core.translator",
    "Measurement": "labkit.measure.timing",
    "measure": "labkit.measure.timing",
    "environment": "labkit.measure.timing",
    "run_notebooks": "labkit.lab.runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")
