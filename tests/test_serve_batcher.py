"""The micro-batcher on a fake model: batches form, each sentence gets its own answer, nothing is lost.

The fake "translates" a row of ids by reversing it, so every answer is checkable by hand and a
mix-up between sentences of one batch cannot go unnoticed.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from labkit.serve.batcher import BatchConfig, Closed, Job, MicroBatcher, QueueFull, select_batch


class FakeStages:
    """generate: reversed ids (after `delay_s`); detokenize: ids joined with '-'. Records every call."""

    def __init__(self, delay_s: float = 0.0, detokenize_s: float = 0.0, fail_on: int | None = None):
        self.delay_s, self.detokenize_s, self.fail_on = delay_s, detokenize_s, fail_on
        self.batches: list[list[list[int]]] = []
        self.spans: list[tuple[str, float, float]] = []  # (stage, start, end)
        self.lock = threading.Lock()

    def generate(self, rows, beams):
        start = time.perf_counter()
        with self.lock:
            self.batches.append([list(r) for r in rows])
        if self.fail_on is not None and any(self.fail_on in r for r in rows):
            raise RuntimeError("model failed")
        time.sleep(self.delay_s)
        self.spans.append(("generate", start, time.perf_counter()))
        return [list(reversed(r)) + [beams] for r in rows]

    def detokenize(self, rows):
        start = time.perf_counter()
        time.sleep(self.detokenize_s)
        self.spans.append(("detokenize", start, time.perf_counter()))
        return ["-".join(map(str, r)) for r in rows], [[] for _ in rows]


def expected(row, beams=1) -> str:
    return "-".join(map(str, list(reversed(row)) + [beams]))


def run(coro):
    return asyncio.run(coro)


def jobs(lengths, beams=None):
    loop = asyncio.new_event_loop()
    try:
        return [Job([7] * n, (beams or [1] * len(lengths))[i], loop.create_future(), enqueued=i)
                for i, n in enumerate(lengths)]
    finally:
        loop.close()


# --------------------------------------------------------------------------- select_batch (pure)


def test_select_batch_takes_the_oldest_then_the_closest_lengths():
    pending = jobs([5, 30, 6, 29, 4])
    assert [len(j.ids) for j in select_batch(pending, 3)] == [5, 6, 4]  # the docstring's example
    assert [len(j.ids) for j in select_batch(pending, 3, by_length=False)] == [5, 30, 6]
    assert select_batch(pending, 10) == pending  # everything fits: nothing to choose


def test_select_batch_never_mixes_beam_settings():
    pending = jobs([5, 5, 5, 5], beams=[1, 4, 1, 4])
    assert [j.beams for j in select_batch(pending, 4)] == [1, 1]


# --------------------------------------------------------------------------- the loop


async def _submit_many(batcher, rows_per_request, beams=1):
    async def one(rows):
        return [d.text for d in await asyncio.gather(*batcher.submit(rows, beams))]

    return await asyncio.gather(*(one(rows) for rows in rows_per_request))


@pytest.mark.parametrize("max_batch", [1, 4, 16])
def test_every_sentence_gets_its_own_answer_in_order(max_batch):
    requests = [[[i, j, 100 + i] for j in range(1 + i % 3)] for i in range(40)]  # 40 requests, 1-3 sentences

    async def main():
        stages = FakeStages(delay_s=0.002)
        batcher = MicroBatcher(stages, BatchConfig(max_batch_size=max_batch, max_wait_ms=5))
        await batcher.start()
        answers = await _submit_many(batcher, requests)
        await batcher.close()
        return stages, answers

    stages, answers = run(main())
    assert answers == [[expected(r) for r in rows] for rows in requests]
    sent = sorted(tuple(r) for b in stages.batches for r in b)
    assert sent == sorted(tuple(r) for rows in requests for r in rows), "a sentence was lost or run twice"
    assert max(len(b) for b in stages.batches) <= max_batch
    if max_batch == 1:
        assert all(len(b) == 1 for b in stages.batches)  # serial serving
    else:
        assert max(len(b) for b in stages.batches) > 1, "concurrent sentences were never batched"


def test_an_idle_model_starts_at_once_a_busy_one_waits_at_most_max_wait_for_company():
    async def main():
        stages = FakeStages(delay_s=0.02)
        batcher = MicroBatcher(stages, BatchConfig(max_batch_size=8, max_wait_ms=100))
        await batcher.start()
        start = time.perf_counter()
        first = batcher.submit([[1]])  # the model is idle: no waiting tax
        await asyncio.sleep(0.005)
        second = batcher.submit([[2]])  # arrives while [1] is in the model
        await asyncio.gather(*first)
        first_s = time.perf_counter() - start
        await asyncio.sleep(0.005)
        third = batcher.submit([[3]])  # within max_wait of the model's return: joins [2]
        await asyncio.gather(*second, *third)
        await batcher.close()
        return stages, first_s

    stages, first_s = run(main())
    assert stages.batches == [[[1]], [[2], [3]]]
    assert first_s < 0.08  # 20 ms of model: [1] did not wait the 100 ms max_wait on an idle model


def test_closed_loop_clients_that_arrive_in_two_waves_end_up_in_one_batch():
    """8 clients, 4 of them a little late: the first batch has 4, but once the model is free the
    batch waits max_wait_ms for the 4 just answered, so the two waves merge instead of alternating
    at 4 sentences per call forever."""

    async def main():
        stages = FakeStages(delay_s=0.06)
        batcher = MicroBatcher(stages, BatchConfig(max_batch_size=8, max_wait_ms=20))
        await batcher.start()

        async def client(i):
            for _ in range(6):
                await asyncio.gather(*batcher.submit([[i]]))
                await asyncio.sleep(0.002)  # the answer's way back and the next request's way in

        async def late(i):
            await asyncio.sleep(0.035)  # after the first batch left (20 ms), while it is in the model
            await client(i)

        await asyncio.gather(*(client(i) for i in range(4)), *(late(i) for i in range(4, 8)))
        await batcher.close()
        return [len(b) for b in stages.batches]

    sizes = run(main())
    assert sizes[0] == 4 and set(sizes[1:-1]) == {8}, sizes  # the late wave has one round left at the end


def test_a_full_queue_refuses_the_whole_request_and_keeps_serving():
    async def main():
        stages = FakeStages(delay_s=0.05)
        batcher = MicroBatcher(stages, BatchConfig(max_batch_size=1, max_wait_ms=0, max_queue=3))
        await batcher.start()
        accepted = batcher.submit([[1], [2], [3]])
        with pytest.raises(QueueFull):
            batcher.submit([[4]])
        assert batcher.queue_depth == 3  # the refused request left nothing behind
        done = [d.text for d in await asyncio.gather(*accepted)]
        later = [d.text for d in await asyncio.gather(*batcher.submit([[5]]))]
        await batcher.close()
        return done, later

    done, later = run(main())
    assert done == [expected([1]), expected([2]), expected([3])] and later == [expected([5])]


def test_close_drains_what_is_queued_and_refuses_new_work():
    async def main():
        stages = FakeStages(delay_s=0.01)
        batcher = MicroBatcher(stages, BatchConfig(max_batch_size=2, max_wait_ms=50))
        await batcher.start()
        futures = batcher.submit([[i] for i in range(7)])
        await batcher.close()  # at once: every queued sentence is still translated
        with pytest.raises(Closed):
            batcher.submit([[9]])
        return [f.result().text for f in futures]

    assert run(main()) == [expected([i]) for i in range(7)]


def test_a_failing_model_call_fails_its_own_sentences_only():
    async def main():
        stages = FakeStages(fail_on=13)
        batcher = MicroBatcher(stages, BatchConfig(max_batch_size=1))
        await batcher.start()
        bad, good = batcher.submit([[13]]), batcher.submit([[2]])
        results = await asyncio.gather(*bad, *good, return_exceptions=True)
        await batcher.close()
        return results

    bad, good = run(main())
    assert isinstance(bad, RuntimeError) and good.text == expected([2])


def test_a_request_that_gave_up_is_not_sent_to_the_model():
    async def main():
        stages = FakeStages(delay_s=0.05)
        batcher = MicroBatcher(stages, BatchConfig(max_batch_size=1, max_wait_ms=0))
        await batcher.start()
        busy = batcher.submit([[1]])
        await asyncio.sleep(0.01)  # [1] is in the model now
        gave_up = batcher.submit([[2]])
        gave_up[0].cancel()  # its deadline passed while it waited
        await asyncio.gather(*busy, *batcher.submit([[3]]))
        await batcher.close()
        return stages.batches

    assert run(main()) == [[[1]], [[3]]]


def test_detokenizing_one_batch_overlaps_the_model_on_the_next():
    async def main():
        stages = FakeStages(delay_s=0.05, detokenize_s=0.05)
        batcher = MicroBatcher(stages, BatchConfig(max_batch_size=1, max_wait_ms=0))
        await batcher.start()
        await asyncio.gather(*batcher.submit([[1], [2], [3]]))
        await batcher.close()
        return stages.spans

    spans = run(main())
    generate = [(a, b) for stage, a, b in spans if stage == "generate"]
    detok = [(a, b) for stage, a, b in spans if stage == "detokenize"]
    assert any(d0 < g1 and g0 < d1 for d0, d1 in detok for g0, g1 in generate), spans


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError):
        BatchConfig(max_batch_size=0)
    with pytest.raises(ValueError):
        BatchConfig(max_wait_ms=-1)
