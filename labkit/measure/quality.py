"""Quality and speed of a Translator, measured the same way in every notebook.

`score` is sacreBLEU corpus BLEU (13a tokenization, the default) and chrF, with
the BLEU signature so numbers are reproducible. `latency` times batch-1,
end-to-end translation per sentence with warm-up, repeats and pinned threads
from the preset; `throughput` times whole batches. `agreement` is the token-level
gate for optimized variants. Left out: COMET and other learned metrics (they
need models from a hub).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from labkit.core.data import Pair, iter_batches, load_split
from labkit.core.inputs import LOOP_NOTE, PIECE_LOOP, WORD_LOOP
from labkit.measure import timing
from labkit.measure.progress import track
from labkit.measure.replay import measurement


@dataclass(frozen=True)
class Scores:
    bleu: float
    chrf: float
    signature: str
    n: int

    def as_metrics(self) -> dict:
        """The ledger's metric keys: {'bleu', 'chrf', 'bleu_signature'}."""
        return {"bleu": round(self.bleu, 2), "chrf": round(self.chrf, 2), "bleu_signature": self.signature}


def reference_streams(refs: list[str] | list[tuple[str, ...]]) -> list[list[str | None]]:
    """sacreBLEU's reference streams: one reference per sentence, or several (None where one has fewer).

    ['a', 'b'] -> [['a', 'b']];  [('a', 'a2'), ('b',)] -> [['a', 'b'], ['a2', None]]
    """
    multi = [(r,) if isinstance(r, str) else tuple(r) for r in refs]
    n = max((len(r) for r in multi), default=1)
    return [[r[k] if k < len(r) else None for r in multi] for k in range(n)]


def score(hyps: list[str], refs: list[str] | list[tuple[str, ...]]) -> Scores:
    """Corpus BLEU and chrF against one or several references per sentence (Tatoeba's test split has up
    to 8): score(['a b c d'], ['a b c d']).bleu == 100.0 == score(['a b c d'], [('x y', 'a b c d')]).bleu."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    streams = reference_streams(refs)
    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(hyps, streams)
    c = chrf.corpus_score(hyps, streams)
    return Scores(b.score, c.score, str(bleu.get_signature()), len(hyps))


def degenerate(text: str) -> str | None:
    """Why an output is not a translation, or None: empty, or caught in a repetition loop (what
    `labkit.core.inputs.cut_loops` undoes, so a Translator's output never loops; this checks any text).

    '' -> 'empty';  'put on his put on his put on his' -> 'repeats "put on his "';  'Onlylyly' -> 'repeats "ly"';
    'I like cats.' -> None
    """
    if not text.strip():
        return "empty"
    for pattern in (WORD_LOOP, PIECE_LOOP):
        if m := pattern.search(text + " " if pattern is WORD_LOOP else text):
            return f"repeats {m.group(1)!r}"
    return None


def translate_all(translator, texts: list[str], batch_size: int = 16, desc: str = "translate",
                  notes: list[list[str]] | None = None, progress: bool = True) -> list[str]:
    """Translate in batches with a progress bar (`progress=False` inside a loop that has its own); order is
    kept. A `notes` list gets each sentence's notes (truncation, unknown characters, a repetition loop cut)."""
    out: list[str] = []
    batches = list(iter_batches(texts, batch_size))
    for batch in track(batches, desc, disable=not progress or len(batches) < 4):
        if notes is None:
            out += translator.translate(batch)
        else:
            result = translator.run(batch)
            out += result.texts
            notes += result.notes
    return out


@measurement
def evaluate(translator, pairs: list[Pair], batch_size: int = 16, notes: list[list[str]] | None = None,
             progress: bool = True) -> tuple[Scores, list[str]]:
    """BLEU/chrF of `translator` on `pairs` (every reference each pair has), and its hypotheses; a `notes`
    list gets each sentence's notes."""
    hyps = translate_all(translator, [p.zh for p in pairs], batch_size, desc="evaluate", notes=notes,
                         progress=progress)
    return score(hyps, [p.references for p in pairs]), hyps


def looped_sentences(notes: list[list[str]]) -> list[int]:
    """Indices of the sentences whose decoder looped (the loop was cut: `labkit.core.inputs.cut_loops`' note).

    [[], ["the decoder repeated 'ly' 3 times"], ["truncated from 300 to 256 tokens"]] -> [1]
    """
    return [i for i, row in enumerate(notes) if any(n.startswith(LOOP_NOTE) for n in row)]


def agreement(ids_a: list[list[int]], ids_b: list[list[int]]) -> float:
    """Fraction of sentences whose token ids are identical: [[1,2],[3]] vs [[1,2],[4]] -> 0.5."""
    if len(ids_a) != len(ids_b):
        raise ValueError(f"{len(ids_a)} vs {len(ids_b)} sentences")
    return sum(a == b for a, b in zip(ids_a, ids_b)) / max(1, len(ids_a))


@measurement
def latency(translator, texts: list[str], preset, label: str = "") -> timing.Measurement:
    """Batch-1 end-to-end latency: each call translates the next sentence of `texts`.

    Sentences cycle, so p50/p95 cover the input-length mix; warm-up, repeats
    (passes over `texts`) and threads come from the preset.
    """
    timing.pin_threads(preset.threads)
    cycle = itertools.cycle(texts)
    return timing.measure(lambda: translator.translate([next(cycle)]), warmup=preset.bench_warmup,
                         repeats=len(texts) * preset.bench_repeats, label=label)


@measurement
def throughput(translator, texts: list[str], preset, batch_size: int = 16) -> float:
    """Sentences per second translating `texts` in batches of `batch_size` (median pass)."""
    timing.pin_threads(preset.threads)
    batches = list(iter_batches(texts, batch_size))
    m = timing.measure(lambda: [translator.translate(b) for b in batches], warmup=1,
                      repeats=max(1, preset.bench_repeats))
    return len(texts) / (m.p50 / 1e3)


def bench_texts(preset, split: str = "test") -> list[str]:
    """The fixed sentences every latency measurement of a preset uses (first N of the split)."""

    return [p.zh for p in load_split(split, limit=preset.bench_sentences)]


def eval_pairs(preset, split: str = "test") -> list[Pair]:
    """The preset's evaluation subset of the test split (all of it when eval_sentences is None)."""

    return load_split(split, limit=preset.eval_sentences)
