"""labkit: the library behind the inference optimization lab. What a notebook cell types:

    >>> import labkit
    >>> teacher = labkit.load_teacher()              # the committed Chinese-English Marian model
    >>> translator = labkit.Translator(teacher)      # PyTorch, greedy, KV cache
    >>> translator.translate(["今天天气很好。"])
    ['The weather today is fine today.']
    >>> pairs = labkit.load_split("test", limit=20)
    >>> scores, outputs = labkit.evaluate(translator, pairs)    # sacreBLEU BLEU/chrF, every reference
    >>> round(scores.bleu) > 10
    True
    >>> labkit.bleu_drop_gate(scores.bleu - 0.4, scores.bleu)["passed"]   # a lossy variant within 1 BLEU
    True
    >>> timing = labkit.latency(translator, [p.zh for p in pairs[:2]], labkit.PRESETS["ci"])
    >>> timing.p50 > 0                                # ms per sentence: median, p95, spread in `timing`
    True

Names, by what they are for:
  load a model   load_teacher, load_model (a preset's model), load_bundle (a saved variant), Bundle
  translate      Translator (a bundle behind PyTorch; engines in labkit.engines), translator_for, DecodeConfig
  data           load_split ('train', 'dev', 'test'), Pair
  measure        evaluate, score (BLEU/chrF), latency, measure (any callable), environment, Measurement
  gate           bleu_drop_gate, agreement_gate, agreement (token-level), gate, MAX_BLEU_DROP
  presets        Preset, PRESETS;  run the notebooks: run_notebooks

The subpackages are layers, each importing only those to its left: config <- core (data, inputs,
bundle, decode, translator) <- measure (timing, quality, gates, ledger, plots, report) <- compress
(teacher, prune, distill) and engines (onnx, ort, ct2, tensorrt, shortlist) <- serve and lab (the
notebooks' helpers, bench) <- cli. Names here are imported on first use, so `import labkit` needs
neither torch nor any optional engine.
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
    "Pair": "labkit.core.data",
    "load_split": "labkit.core.data",
    "DecodeConfig": "labkit.core.decode",
    "translator_for": "labkit.core.translator",
    "evaluate": "labkit.measure.quality",
    "score": "labkit.measure.quality",
    "latency": "labkit.measure.quality",
    "agreement": "labkit.measure.quality",
    "Measurement": "labkit.measure.timing",
    "measure": "labkit.measure.timing",
    "environment": "labkit.measure.timing",
    "gate": "labkit.measure.gates",
    "bleu_drop_gate": "labkit.measure.gates",
    "agreement_gate": "labkit.measure.gates",
    "MAX_BLEU_DROP": "labkit.measure.gates",
    "run_notebooks": "labkit.lab.runner",
}
_RENAMED = {"Translator": ("labkit.core.translator", "StepperTranslator")}

__all__ = sorted([*_EXPORTS, *_RENAMED])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _RENAMED:
        module, attr = _RENAMED[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
