"""Continuous batching in the server: sentences join the running decode at the next step, answers leave at once.

    runner = ContinuousBatcher(translator, TorchRowStepper(model), BatchConfig(max_batch_size=16))
    service = TranslationService(translator, "teacher/torch", config, runner=runner)

The same Runner shape as the micro-batcher (labkit.serve.batcher: `submit`, `start`, `close`,
`queue_depth`), so the service, caches, limits and HTTP app do not change. One model thread owns a
`labkit.core.continuous.ContinuousDecoder`: between two decoder steps it moves newly submitted
sentences into the decoder, which admits them as room frees up (`max_batch_size` rows); a sentence
that ends goes to the detokenize thread at once and its future resolves on the event loop. Requests
asking for beams are decoded by the translator's static loop between two steps (beam rows do not
free slots one by one), so they pause the running rows for one call.

Left out: preemption and priorities (first come, first admitted), and beam search inside the
running batch.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from labkit.core.continuous import ContinuousDecoder, RowStepper
from labkit.serve.batcher import BatchConfig, Closed, Done, Job, Stages, new_jobs, resolve


class ContinuousBatcher:
    def __init__(self, stages: Stages, stepper: RowStepper, config: BatchConfig | None = None,
                 on_step: Callable[[int, float], None] | None = None,
                 on_work: Callable[[int, int], None] | None = None):
        self.stages, self.config = stages, config or BatchConfig()
        self.on_step = on_step  # (rows, seconds) per decoder step, for /metrics' batch histograms
        self.on_work = on_work  # (useful row-steps, computed row-steps), for the useful-step fraction
        cfg = replace(stages.decode_cfg, num_beams=1)
        self.decoder = ContinuousDecoder(stepper, cfg, self.config.max_batch_size)
        self._cond = threading.Condition()
        self._incoming: list[Job] = []  # submitted, not yet handed to the decoder (guarded by _cond)
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._active: dict[int, Job] = {}  # id(job) -> job handed to the decoder, until it is answered
        self._post_pool = ThreadPoolExecutor(1, thread_name_prefix="labkit-detokenize")
        self._posted: list = []

    @property
    def queue_depth(self) -> int:
        """Sentences waiting for a row (not yet decoding)."""
        return len(self._incoming) + len(self.decoder.waiting)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="labkit-model", daemon=True)
        self._thread.start()

    def submit(self, rows: list[list[int]], beams: int = 1) -> list[asyncio.Future]:
        """Queue one request's sentences (all or none); one future per row. QueueFull, Closed as the micro-batcher."""
        if self._closing or self._thread is None:
            raise Closed("the translation service is shutting down" if self._closing else "batcher not started")
        jobs = new_jobs(rows, beams, self.queue_depth, self.config.max_queue)
        with self._cond:
            self._incoming.extend(jobs)
            self._cond.notify()
        return [j.future for j in jobs]

    async def close(self) -> None:
        """Take no new sentences, finish every submitted one, then stop the threads."""
        self._closing = True
        with self._cond:
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._posted:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in self._posted))
        self._post_pool.shutdown(wait=True)

    # ----------------------------------------------------------------- the model thread

    def _take(self) -> list[Job] | None:
        """What was submitted since the last step; None once closing and everything is done."""
        with self._cond:
            while not self._incoming and not self.decoder.busy:
                if self._closing:
                    return None
                self._cond.wait()
            taken, self._incoming = self._incoming, []
        return taken

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            beams = [j for j in taken if j.beams != 1 and not j.future.done()]
            for job in taken:
                if job.beams == 1 and not job.future.done():  # a request that gave up is not decoded
                    self._active[id(job)] = job
                    self.decoder.add(job, job.ids)
            if beams:
                self._static(beams)
            if self.decoder.busy:
                self._step()

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            finished = self.decoder.step()
        except Exception as exc:  # a failing step fails the rows it held, not the service
            self._fail_all(exc)
            return
        now = time.perf_counter()
        for row in self.decoder.running:
            if row.key.started is None:
                row.key.started = now
        calls = self.decoder.counters.last_calls
        if self.on_step is not None:  # one observation per decoder call (an admission's first step is one)
            for n in calls:
                self.on_step(n, (now - start) / len(calls))
        if self.on_work is not None:  # a finished row leaves at once: every computed row-step is useful
            self.on_work(sum(calls), sum(calls))
        for job, _ in finished:
            self._active.pop(id(job), None)
        if finished:
            batch = len(self.decoder.running) + len(finished)
            self._post([(job, ids, job.started or now, batch) for job, ids in finished], now)

    def _static(self, jobs: list[Job]) -> None:
        for beams in sorted({j.beams for j in jobs}):
            group = [j for j in jobs if j.beams == beams]
            start = time.perf_counter()
            try:
                generated = self.stages.generate([j.ids for j in group], beams)
            except Exception as exc:
                self._call(lambda g=group, e=exc: [resolve(j, error=e) for j in g])
                continue
            now = time.perf_counter()
            if self.on_step is not None:
                self.on_step(len(group), now - start)
            self._post([(j, ids, start, len(group)) for j, ids in zip(group, generated)], now)

    def _fail_all(self, exc: BaseException) -> None:
        """Every sentence the decoder held fails with `exc`; the decoder starts afresh for the next ones."""
        jobs, self._active = list(self._active.values()), {}
        old = self.decoder
        self.decoder = ContinuousDecoder(old.stepper, old.cfg, old.max_rows, old.admit_min)
        self._call(lambda: [resolve(j, error=exc) for j in jobs])

    def _post(self, finished: list[tuple[Job, list[int], float, int]], now: float) -> None:
        """Detokenize in the post thread, then resolve the futures on the event loop."""

        def finish():
            try:
                texts, notes = self.stages.detokenize([ids for _, ids, _, _ in finished])
            except Exception as exc:
                self._call(lambda e=exc: [resolve(j, error=e) for j, *_ in finished])
                return
            done = [(job, Done(text, ids, note, batch, (started - job.enqueued) * 1e3, (now - started) * 1e3))
                    for (job, ids, started, batch), text, note in zip(finished, texts, notes)]
            self._call(lambda: [resolve(job, d) for job, d in done])

        self._posted = [f for f in self._posted if not f.done()]
        self._posted.append(self._post_pool.submit(finish))

    def _call(self, fn: Callable[[], object]) -> None:
        self._loop.call_soon_threadsafe(fn)
