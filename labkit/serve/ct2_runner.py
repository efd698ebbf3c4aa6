"""CTranslate2's own batching, served the way its documentation recommends for throughput.

    runner = Ct2Runner(ct2_translator, BatchConfig(max_batch_size=16), tokens_per_batch=1024)
    service = TranslationService(ct2_translator, "ci/teacher/ct2-int8", config, runner=runner)

CTranslate2's performance guide: several translators in one process (`inter_threads`, each with
`intra_threads`), large batches counted in tokens (`max_batch_size` with `batch_type="tokens"`), and
`translate_batch(..., asynchronous=True)` so a server hands over work without waiting. Here every
wake-up hands whatever is queued to `translate_batch` at once; CTranslate2 cuts it into batches
and runs them on its `inter_threads` workers while earlier ones are still running. A waiting thread
per call collects the results, detokenizes, and resolves the futures on the event loop. This is the
peer notebook 08 compares labkit's own batchers with: the same service, caches and HTTP around it.

Left out: beam requests mixed with greedy ones in one call (each call takes one beam setting).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from labkit.serve.batcher import BatchConfig, Done, Job, QueueRunner, resolve

TOKENS_PER_BATCH = 1024  # CTranslate2's documented example for batch_type="tokens"


class Ct2Runner(QueueRunner):
    task_name = "labkit-ct2"

    def __init__(self, translator, config: BatchConfig | None = None, tokens_per_batch: int = TOKENS_PER_BATCH,
                 on_batch: Callable[[int, float], None] | None = None):
        super().__init__(config or BatchConfig())
        self.translator, self.tokens_per_batch, self.on_batch = translator, tokens_per_batch, on_batch
        self._waiters = ThreadPoolExecutor(8, thread_name_prefix="labkit-ct2-wait")  # they only block on results

    def _shutdown(self) -> None:
        self._waiters.shutdown(wait=True)

    async def _loop(self) -> None:
        while True:
            while not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            jobs = [j for j in self._pending if not j.future.done()]
            self._pending = []
            for beams in sorted({j.beams for j in jobs}):
                self._hand_over([j for j in jobs if j.beams == beams], beams)
            await asyncio.sleep(0)  # let requests in before the next hand-over

    def _hand_over(self, jobs: list[Job], beams: int) -> None:
        t = self.translator
        start = time.perf_counter()
        results = t.engine.translate_batch(t.source_tokens([j.ids for j in jobs]), **t.options_for(beams),
                                           max_batch_size=self.tokens_per_batch, batch_type="tokens",
                                           asynchronous=True)
        self._track(asyncio.get_running_loop().run_in_executor(self._waiters, self._collect, jobs, results, start))

    def _collect(self, jobs: list[Job], results, start: float) -> None:
        """In a waiter thread: block on CTranslate2's results, detokenize, resolve on the loop."""
        loop = jobs[0].future.get_loop()
        try:
            ids = [[self.translator.ids[tok] for tok in r.result().hypotheses[0]] for r in results]
            texts, notes = self.translator.detokenize(ids)
        except Exception as exc:  # the engine's error goes to its own sentences
            loop.call_soon_threadsafe(lambda e=exc: [resolve(j, error=e) for j in jobs])
            return
        model_ms = (time.perf_counter() - start) * 1e3
        if self.on_batch is not None:
            self.on_batch(len(jobs), model_ms / 1e3)
        done = [Done(text, i, note, len(jobs), (start - j.enqueued) * 1e3, model_ms)
                for j, i, text, note in zip(jobs, ids, texts, notes)]
        loop.call_soon_threadsafe(lambda: [resolve(j, d) for j, d in zip(jobs, done)])
