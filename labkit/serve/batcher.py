"""Dynamic batching: an asyncio micro-batcher that turns concurrent sentences into model batches.

    batcher = MicroBatcher(stages, BatchConfig(max_batch_size=16, max_wait_ms=10))
    await batcher.start()
    futures = batcher.submit([[52, 7, 0], [9, 0]], beams=1)   # token ids, one row per sentence
    done = await asyncio.gather(*futures)                     # Done(text, ids, notes, batch_size, ...)
    await batcher.close()                                     # finishes every sentence already queued

Sentences from any number of requests wait in one queue. An idle model takes what is queued at
once; after each model call the next batch is held open until `max_batch_size` sentences wait or
`max_wait_ms` passed (see `_wait_for_batch` for why). The batch is filled with the sentences
closest in length to the oldest one (less padding; the oldest always goes, so nothing starves)
and the model runs in a worker thread so the event loop keeps accepting requests.
Detokenization runs in a second thread while the model already computes the next batch;
tokenization happened before `submit` (labkit.serve.service, in a third thread), so the three
stages overlap. Each future gets its own sentence's result. `max_batch_size=1` is serial serving.

Left out: the model itself (`Stages`: any object with `generate` and `detokenize`), caches and
request limits (labkit.serve.service), and priorities (first come, first served).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int = 16  # sentences per model call; 1 = serial serving, one sentence at a time
    max_wait_ms: float = 10.0  # how long a batch is held open for company after the model returns
    max_queue: int = 512  # sentences waiting for the model; a request that would pass it is refused (503)
    length_groups: bool = True  # fill a batch with sentences close in length to the oldest (less padding)

    def __post_init__(self):
        if self.max_batch_size < 1 or self.max_queue < 1 or self.max_wait_ms < 0:
            raise ValueError(f"invalid batching settings: {self}")


class Stages(Protocol):
    """What the batcher needs from a translator (labkit.core.translator.Translator has both)."""

    def generate(self, rows: list[list[int]], beams: int) -> list[list[int]]: ...  # source ids -> output ids

    def detokenize(self, rows: list[list[int]]) -> tuple[list[str], list[list[str]]]: ...  # -> texts, notes


class QueueFull(RuntimeError):
    """The queue holds `max_queue` sentences: come back later (HTTP 503 with Retry-After)."""


class Closed(RuntimeError):
    """The batcher is draining for shutdown and takes no new sentences."""


@dataclass
class Job:
    ids: list[int]  # the sentence's source token ids; their count is its length for grouping
    beams: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None  # continuous batching: when its row joined the running batch


@dataclass(frozen=True)
class Done:
    text: str
    ids: list[int]  # generated token ids
    notes: list[str]  # what detokenization did (e.g. ids outside the vocabulary dropped)
    batch_size: int  # sentences in the model call that translated it
    queue_ms: float  # submit -> its batch started
    model_ms: float  # the model call of its batch


# --------------------------------------------------------------------------- primitives


def select_batch(pending: list[Job], max_size: int, by_length: bool = True) -> list[Job]:
    """The next batch: the oldest job, then the same-beam jobs closest to it in length.

    Lengths (oldest first) [5, 30, 6, 29, 4], max_size 3 -> lengths [5, 6, 4] (the 30s wait,
    but at most until they are the oldest). Ties go to the older job; without `by_length`, FIFO.
    """
    oldest = pending[0]
    same = [j for j in pending if j.beams == oldest.beams]
    if len(same) <= max_size:
        return same
    rest = same[1:]
    if by_length:
        order = sorted(range(len(rest)), key=lambda i: (abs(len(rest[i].ids) - len(oldest.ids)), i))
        rest = [rest[i] for i in sorted(order[: max_size - 1])]
    return [oldest] + rest[: max_size - 1]


def new_jobs(rows: list[list[int]], beams: int, waiting: int, max_queue: int) -> list[Job]:
    """One request's sentences as jobs on the running loop, all or none: QueueFull when `waiting` sentences plus
    these would pass `max_queue`."""
    if waiting + len(rows) > max_queue:
        raise QueueFull(f"{waiting} sentences queued (limit {max_queue})")
    loop = asyncio.get_running_loop()
    return [Job(list(r), beams, loop.create_future()) for r in rows]


def row_steps(generated: list[list[int]]) -> tuple[int, int]:
    """(useful, computed) decoder row-steps of a static greedy batch: every row runs until the longest ends.

    Outputs of 3 and 1 tokens (+ </s> each): useful 4 + 2 = 6, computed 2 rows x 4 steps = 8.
    """
    useful = sum(len(g) + 1 for g in generated)
    return useful, len(generated) * (max(len(g) for g in generated) + 1)


def resolve(job: Job, value=None, error: BaseException | None = None) -> None:
    """Set a job's result once; a job whose request gave up (deadline) is already cancelled."""
    if job.future.done():
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(value)


# --------------------------------------------------------------------------- runtime


class QueueRunner:
    """What every event-loop runner shares: one queue of jobs, a task that serves it, all-or-none admission,
    and a close that finishes what was accepted. Subclasses write `_loop` (and `_shutdown` for their threads)."""

    task_name = "labkit-runner"

    def __init__(self, config: BatchConfig):
        self.config = config
        self._pending: list[Job] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._tasks: set[asyncio.Future] = set()  # work still finishing after the loop handed it on
        self._closing = False

    @property
    def queue_depth(self) -> int:
        """Sentences waiting for a model call."""
        return len(self._pending)

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name=self.task_name)

    def submit(self, rows: list[list[int]], beams: int = 1) -> list[asyncio.Future]:
        """Queue one request's sentences (all or none); one future per row, in order.

        Raises QueueFull when they would not fit, Closed while draining for shutdown.
        """
        if self._closing or self._task is None:
            raise Closed("the translation service is shutting down" if self._closing else "batcher not started")
        self._pending = [j for j in self._pending if not j.future.done()]  # drop jobs whose request gave up
        jobs = new_jobs(rows, beams, len(self._pending), self.config.max_queue)
        self._pending.extend(jobs)
        self._wakeup.set()
        return [j.future for j in jobs]

    async def close(self) -> None:
        """Take no new sentences, translate every queued one, then stop the threads."""
        self._closing = True
        if self._task is not None:
            self._wakeup.set()
            await self._task
        if self._tasks:
            await asyncio.gather(*self._tasks)
        self._shutdown()

    def _track(self, work: asyncio.Future) -> None:
        self._tasks.add(work)
        work.add_done_callback(self._tasks.discard)

    async def _loop(self) -> None:
        raise NotImplementedError

    def _shutdown(self) -> None:
        """Stop the runner's threads (after everything accepted was answered)."""


class MicroBatcher(QueueRunner):
    """One queue, one model thread, one detokenize thread; see the module docstring."""

    task_name = "labkit-batcher"

    def __init__(self, stages: Stages, config: BatchConfig | None = None,
                 on_batch: Callable[[int, float], None] | None = None,
                 on_work: Callable[[int, int], None] | None = None):
        super().__init__(config or BatchConfig())
        self.stages = stages
        self.on_batch = on_batch  # (sentences, model seconds) per model call, for /metrics
        self.on_work = on_work  # (useful, computed) decoder row-steps per greedy model call
        self._model_free_at = 0.0  # perf_counter() when the last model call returned (0: never ran)
        # One model thread: a model call already uses every core (intra-op threads); two would fight.
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="labkit-model")
        self._post_pool = ThreadPoolExecutor(1, thread_name_prefix="labkit-detokenize")

    def _shutdown(self) -> None:
        self._model_pool.shutdown(wait=True)
        self._post_pool.shutdown(wait=True)

    # ----------------------------------------------------------------- the loop

    async def _loop(self) -> None:
        while await self._wait_for_batch():
            batch = self._take()
            if batch:
                await self._run(batch)

    async def _wait_for_batch(self) -> bool:
        """Until a batch may leave (see the comment below); False once closed and drained."""
        while not self._pending:
            if self._closing:
                return False
            self._wakeup.clear()
            await self._wakeup.wait()
        # An idle model takes what is queued at once: no waiting tax at low load. A model that has
        # just returned holds the next batch open up to max_wait_ms for company: the sentences it
        # just answered come back as new requests within milliseconds (closed-loop clients, users
        # typing), and taking only those already queued splits N clients into two cohorts that
        # alternate at N/2 per model call forever (measured: 8 clients, mean batch 4.0).
        deadline = self._model_free_at + self.config.max_wait_ms / 1e3
        while len(self._pending) < self.config.max_batch_size and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        return True

    def _take(self) -> list[Job]:
        self._pending = [j for j in self._pending if not j.future.done()]
        if not self._pending:
            return []
        batch = select_batch(self._pending, self.config.max_batch_size, self.config.length_groups)
        taken = {id(j) for j in batch}
        self._pending = [j for j in self._pending if id(j) not in taken]
        return batch

    async def _run(self, batch: list[Job]) -> None:
        """The model call in its thread; detokenization is left to run beside the next one."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            generated = await loop.run_in_executor(self._model_pool, self.stages.generate,
                                                   [j.ids for j in batch], batch[0].beams)
        except Exception as exc:  # a failing model call fails its own sentences, not the service
            for job in batch:
                resolve(job, error=exc)
            return
        self._model_free_at = time.perf_counter()
        model_s = self._model_free_at - start
        if self.on_batch is not None:
            self.on_batch(len(batch), model_s)
        if self.on_work is not None and batch[0].beams == 1:
            self.on_work(*row_steps(generated))
        self._track(asyncio.create_task(self._finish(batch, generated, start, model_s)))

    async def _finish(self, batch: list[Job], generated: list[list[int]], start: float, model_s: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            texts, notes = await loop.run_in_executor(self._post_pool, self.stages.detokenize, generated)
        except Exception as exc:
            for job in batch:
                resolve(job, error=exc)
            return
        for job, ids, text, note in zip(batch, generated, texts, notes):
            resolve(job, Done(text, ids, note, len(batch), (start - job.enqueued) * 1e3, model_s * 1e3))
