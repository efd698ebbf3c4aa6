"""Typed presets: one name selects the model and every budget of a run.

    >>> Preset.from_name("ci").eval_sentences
    200

Presets are registry entries (`PRESETS`), never copied dicts: a notebook's
`PRESET = "ci"` parameter becomes `Preset.from_name(PRESET)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class ModelSpec:
    """Where a preset's model comes from: kind teacher | marian | opus-mt-shape."""

    kind: str
    name_or_path: str | None = None  # hub id or local directory for kind 'marian'


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelSpec  # which model the whole sequence optimizes
    quality: bool = True  # False: random weights, BLEU is meaningless and decoding is forced
    forced_length: int | None = None  # decode exactly this many tokens (speed-only presets)
    eval_sentences: int | None = 200  # test-split sentences scored for BLEU; None = all
    bench_sentences: int = 24  # sentences timed per latency measurement
    bench_warmup: int = 3
    bench_repeats: int = 5  # passes over the bench sentences; p50/p95 come from all of them
    threads: int = 2  # intra-op threads pinned for every measurement
    profile_lengths: tuple[int, ...] = (4, 8, 16, 32, 64)  # source lengths for latency-vs-length
    thread_counts: tuple[int, ...] = (1, 2)
    batch_size: int = 16  # sentences per batch for quality evaluation
    max_new_tokens: int = 64
    extra: dict = field(default_factory=dict)  # per-issue budgets (pruning, distillation, ...)

    @classmethod
    def from_name(cls, name: str) -> "Preset":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return PRESETS[name]

    def with_(self, **changes) -> "Preset":
        """A modified copy, e.g. preset.with_(eval_sentences=50) in a notebook experiment."""
        return replace(self, **changes)


TEACHER = ModelSpec(kind="teacher")
OPUS_MT_ZH_EN = ModelSpec("marian", "Helsinki-NLP/opus-mt-zh-en")
OPUS_MT_SHAPE = ModelSpec(kind="opus-mt-shape")

PRESETS: dict[str, Preset] = {
    "ci": Preset("ci", TEACHER, eval_sentences=200, bench_sentences=16, bench_repeats=3,
                 profile_lengths=(4, 16, 32), thread_counts=(1, 2)),
    "workshop": Preset("workshop", TEACHER, eval_sentences=None, bench_sentences=64,
                       bench_repeats=10, profile_lengths=(4, 8, 16, 32, 64, 96),
                       thread_counts=(1, 2, 4)),
    "opus-mt-zh-en": Preset("opus-mt-zh-en", OPUS_MT_ZH_EN, eval_sentences=500,
                            bench_sentences=32, bench_repeats=5),
    "opus-mt-shape": Preset("opus-mt-shape", OPUS_MT_SHAPE, quality=False, forced_length=40,
                            eval_sentences=0, bench_sentences=8, bench_repeats=3,
                            profile_lengths=(8, 16, 32, 64)),
}
