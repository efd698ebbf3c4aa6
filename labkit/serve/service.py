"""The translation service behind the HTTP app: limits, caches, then the micro-batcher.

    service = TranslationService(translator, "teacher/ort-int8", ServeConfig())
    await service.start()
    reply = await service.translate(["我喜欢猫。", "  "], beams=1)
    [t.text for t in reply.translations]     # -> ['I like cats.', '']
    reply.translations[1].notes              # -> ['empty input: nothing to translate']
    await service.close()                    # drains what is queued

Per request: every text is cut to `max_chars` (with a note), prepared like the Translator does
(labkit.core.inputs.prepare) and tokenized through an LRU (in a thread of its own, so the
event loop and the model thread keep going); empty texts are answered at once; the rest are
looked up in an LRU of finished translations keyed by normalized text + model + decoding settings,
and the misses go to the batcher (labkit.serve.batcher) under one deadline for the request.
A translator plugs in with four methods: `token_ids(text) -> (ids, notes)`, `generate(rows,
beams)`, `detokenize(rows) -> (texts, notes)` and a `decode_cfg` (labkit's Translator and
Ct2Translator have them).

Left out: HTTP (labkit.serve.app), building the translator (labkit.engines.variants), and
sharing caches between processes (each replica keeps its own).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from labkit.core.inputs import prepare as prepare_input
from labkit.serve.batcher import BatchConfig, Closed, MicroBatcher, QueueFull
from labkit.serve.cache import LRU
from labkit.serve.metrics import Metrics

__all__ = ["Closed", "DeadlineExceeded", "Limits", "QueueFull", "Reply", "ServeConfig", "Translation",
           "TranslationService"]


@dataclass(frozen=True)
class Limits:
    max_texts: int = 32  # texts per request; more is refused (422 naming `texts`)
    max_chars: int = 1000  # characters per text; longer text is cut here, with a note
    max_beams: int = 4  # beams a request may ask for (1 = greedy)
    deadline_s: float = 30.0  # per request, queueing included; past it the answer is 504


@dataclass(frozen=True)
class ServeConfig:
    batch: BatchConfig = field(default_factory=BatchConfig)
    limits: Limits = field(default_factory=Limits)
    token_cache: int = 4096  # tokenized sentences kept (LRU); 0 turns it off
    translation_cache: int = 4096  # finished translations kept (LRU); 0 turns it off


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed before its sentences were translated (HTTP 504)."""


class Runner(Protocol):
    """Where sentences go to be batched: MicroBatcher here, a Ray Serve batch method in a replica."""

    queue_depth: int

    async def start(self) -> None: ...

    def submit(self, rows: list[list[int]], beams: int = 1) -> list: ...  # awaitables of batcher.Done

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Tokenized:
    cleaned: str  # what the model translates ('' = nothing goes to the model; `output` is the answer)
    ids: tuple[int, ...]  # source token ids (empty when cleaned is '')
    notes: tuple[str, ...]  # what limits, input preparation and tokenization did
    output: str = ""  # the answer when the model is skipped (punctuation as ASCII, text without Chinese)
    prefix: str = ""  # symbols passed through around the translation (labkit.core.inputs)
    suffix: str = ""

    def wrap(self, translation: str) -> str:
        return " ".join(part for part in (self.prefix, translation, self.suffix) if part)


@dataclass(frozen=True)
class Translation:
    text: str
    notes: list[str]
    cached: bool  # served from the translation cache, no model call
    batch_size: int | None = None  # sentences in the model call that translated it
    queue_ms: float | None = None
    model_ms: float | None = None


@dataclass(frozen=True)
class Reply:
    translations: list[Translation]
    total_ms: float
    prepare_ms: float  # limits + normalization + tokenization of the whole request


class TranslationService:
    def __init__(self, translator, model_id: str, config: ServeConfig = ServeConfig(),
                 metrics: Metrics | None = None, runner: Runner | None = None):
        self.translator, self.model_id, self.config = translator, model_id, config
        self.metrics = metrics or Metrics()
        self.tokens = LRU(config.token_cache)
        self.translations = LRU(config.translation_cache)
        self.runner = runner or MicroBatcher(translator, config.batch, self.metrics.observe_batch,
                                             self.metrics.observe_work)
        self.decoding = repr(getattr(translator, "decode_cfg", None))  # part of the cache key
        self.info: dict = {}  # what /readyz says about the engine and batching (labkit.serve.server)
        self._pre_pool = ThreadPoolExecutor(1, thread_name_prefix="labkit-tokenize")
        self.metrics.watch(lambda: self.runner.queue_depth,
                           {"tokenize": lambda: self.tokens.hit_rate, "translation": lambda: self.translations.hit_rate})

    async def start(self) -> None:
        await self.runner.start()

    async def close(self) -> None:
        await self.runner.close()
        self._pre_pool.shutdown(wait=True)

    def warm(self, texts: list[str], batch_size: int) -> None:
        """Run the model once at batch 1 and once at `batch_size` (first calls allocate; caches untouched)."""
        rows = [self.translator.token_ids(c)[0] for c in (prepare_input(t).source for t in texts) if c]
        for batch in (rows[:1], rows[:batch_size]):
            if batch:
                self.translator.detokenize(self.translator.generate(batch, 1))

    # ----------------------------------------------------------------- one request

    def prepare(self, text: str) -> Tokenized:
        """Limit, normalize and tokenize one text (the tokenizer's result comes from the LRU when seen)."""
        limit = self.config.limits.max_chars
        notes = []
        if len(text) > limit:
            notes.append(f"truncated from {len(text)} to {limit} characters")
            text = text[:limit]
        ready = prepare_input(text)  # the same preparation and notes as every Translator
        notes += ready.notes
        if not ready.source:
            return Tokenized("", (), tuple(notes), output=ready.output)
        hit = self.tokens.get(ready.source)
        if hit is None:
            ids, token_notes = self.translator.token_ids(ready.source)
            hit = (tuple(ids), tuple(token_notes))
            self.tokens.put(ready.source, hit)
        return Tokenized(ready.source, hit[0], tuple(notes) + hit[1], prefix=ready.prefix, suffix=ready.suffix)

    def _prepare_all(self, texts: list[str]) -> list[Tokenized]:
        hits = self.tokens.hits
        prepared = [self.prepare(t) for t in texts]
        lookups = sum(1 for p in prepared if p.cleaned)
        hits = self.tokens.hits - hits  # the only writer of this cache's counters is this one thread
        self.metrics.count_cache("tokenize", hits, lookups - hits)
        return prepared

    def _cache_key(self, cleaned: str, beams: int) -> tuple:
        return (cleaned, self.model_id, self.decoding, beams)

    def _from_cache(self, prepared: list[Tokenized], beams: int) -> tuple[list[Translation | None], list[int]]:
        """Answers for empty and cached texts; the indices still to translate."""
        out: list[Translation | None] = [None] * len(prepared)
        todo = []
        for i, p in enumerate(prepared):
            if not p.cleaned:
                out[i] = Translation(p.output, list(p.notes), cached=False)
                continue
            hit = self.translations.get(self._cache_key(p.cleaned, beams))
            if hit is None:
                todo.append(i)
            else:
                out[i] = Translation(p.wrap(hit[0]), list(p.notes) + list(hit[1]), cached=True)
        lookups = sum(1 for p in prepared if p.cleaned)
        self.metrics.count_cache("translation", lookups - len(todo), len(todo))
        return out, todo

    async def translate(self, texts: list[str], beams: int = 1) -> Reply:
        """Translate one request's texts, in order; raises QueueFull, Closed or DeadlineExceeded."""
        start = time.perf_counter()
        deadline = start + self.config.limits.deadline_s
        prepared = await asyncio.get_running_loop().run_in_executor(self._pre_pool, self._prepare_all, texts)
        prepare_ms = (time.perf_counter() - start) * 1e3
        out, todo = self._from_cache(prepared, beams)
        if todo:
            waiting = self.runner.submit([list(prepared[i].ids) for i in todo], beams)
            try:
                done = await asyncio.wait_for(asyncio.gather(*waiting), max(0.0, deadline - time.perf_counter()))
            except TimeoutError:
                raise DeadlineExceeded(f"not translated within the {self.config.limits.deadline_s:g} s deadline") from None
            for i, d in zip(todo, done):
                p = prepared[i]
                self.translations.put(self._cache_key(p.cleaned, beams), (d.text, tuple(d.notes)))
                out[i] = Translation(p.wrap(d.text), list(p.notes) + list(d.notes), False, d.batch_size, d.queue_ms,
                                     d.model_ms)
        self.metrics.sentences.inc(len(texts))
        return Reply(out, (time.perf_counter() - start) * 1e3, prepare_ms)
