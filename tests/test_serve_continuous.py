"""The continuous batcher in the service: sentences arriving at any time get their batch-1 answers.

The oracle is the tiny model's own static greedy loop at batch 1; requests arrive while others
decode, so they join running batches at different positions.
"""

from __future__ import annotations

import asyncio

import pytest

from labkit.config import Preset
from labkit.core.data import load_split
from labkit.core.translator import translator_for
from labkit.engines.rows import TorchRowStepper
from labkit.serve.batcher import BatchConfig, Closed, QueueFull, row_steps
from labkit.serve.continuous_batcher import ContinuousBatcher
from labkit.serve.metrics import Metrics, parse

TEXTS = [p.zh for p in load_split("test", limit=20)]


@pytest.fixture(scope="module")
def translator(tiny_module_bundle):
    return translator_for(tiny_module_bundle, Preset.from_name("ci"))


@pytest.fixture(scope="module")
def rows(translator) -> list[list[int]]:
    return [translator.token_ids(t)[0] for t in TEXTS]


@pytest.fixture(scope="module")
def alone(translator, rows) -> list[list[int]]:
    return [translator.generate([r], 1)[0] for r in rows]


def _batcher(translator, **config) -> tuple[ContinuousBatcher, Metrics]:
    metrics = Metrics()
    return ContinuousBatcher(translator, TorchRowStepper(translator.bundle.model), BatchConfig(**config),
                             metrics.observe_batch, metrics.observe_work), metrics


def test_row_steps_worked_example():
    assert row_steps([[5, 6, 7], [8]]) == (6, 8)


def test_staggered_requests_get_their_batch1_answers(translator, rows, alone):
    async def main():
        batcher, metrics = _batcher(translator, max_batch_size=4)
        await batcher.start()
        futures = []
        for i, r in enumerate(rows):
            futures += batcher.submit([r])
            await asyncio.sleep(0.003 * (i % 3))  # arrivals while others decode
        done = await asyncio.gather(*futures)
        await batcher.close()
        return done, metrics

    done, metrics = asyncio.run(main())
    assert [d.ids for d in done] == alone
    assert [d.text for d in done] == translator.detokenize(alone)[0]
    assert max(d.batch_size for d in done) > 1  # they did share steps
    steps = parse(metrics.render().decode())["labkit_decode_row_steps_total"]
    assert steps[(("kind", "padding"),)] == 0 and steps[(("kind", "useful"),)] > len(rows)


def test_beam_requests_are_decoded_between_steps(translator, rows):
    async def main():
        batcher, _ = _batcher(translator, max_batch_size=4)
        await batcher.start()
        greedy = batcher.submit(rows[:3])
        beams = batcher.submit(rows[3:5], beams=2)
        done = await asyncio.gather(*greedy, *beams)
        await batcher.close()
        return done

    done = asyncio.run(main())
    assert [d.ids for d in done[3:]] == translator.generate(rows[3:5], 2)


def test_close_finishes_everything_submitted_and_refuses_new_work(translator, rows, alone):
    async def main():
        batcher, _ = _batcher(translator, max_batch_size=2)
        await batcher.start()
        futures = batcher.submit(rows[:6])
        await batcher.close()
        assert all(f.done() for f in futures)
        with pytest.raises(Closed):
            batcher.submit(rows[:1])
        return [f.result().ids for f in futures]

    assert asyncio.run(main()) == alone[:6]


def test_a_full_queue_refuses_the_whole_request(translator, rows):
    async def main():
        batcher, _ = _batcher(translator, max_batch_size=1, max_queue=3)
        await batcher.start()
        first = batcher.submit(rows[:3])
        with pytest.raises(QueueFull):
            batcher.submit(rows[3:5])
        await asyncio.gather(*first)
        await batcher.close()

    asyncio.run(main())


class Broken:
    """A row stepper whose first step fails: the sentences it held fail, later ones are served."""

    def __init__(self, inner):
        self.inner, self.failed = inner, False
        self.start_id, self.eos_id, self.pad_id = inner.start_id, inner.eos_id, inner.pad_id

    def start(self, ids, mask):
        if not self.failed:
            self.failed = True
            raise RuntimeError("model failed")
        return self.inner.start(ids, mask)

    def step(self, tokens, state):
        return self.inner.step(tokens, state)


def test_a_failing_step_fails_its_sentences_and_the_service_goes_on(translator, rows, alone):
    async def main():
        batcher = ContinuousBatcher(translator, Broken(TorchRowStepper(translator.bundle.model)), BatchConfig())
        await batcher.start()
        first = batcher.submit(rows[:2])
        results = await asyncio.gather(*first, return_exceptions=True)
        later = await asyncio.gather(*batcher.submit(rows[2:4]))
        await batcher.close()
        return results, later

    results, later = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in results)
    assert [d.ids for d in later] == alone[2:4]


def test_every_registry_engine_is_servable_and_says_whether_it_is_batch_invariant():
    from labkit.engines.variants import VARIANTS
    from labkit.serve.engine import ENGINES, invariance

    assert set(ENGINES) == set(VARIANTS)
    verdicts = {e: invariance(e)[0] for e in ENGINES}
    assert verdicts["torch"] and verdicts["ort-fp32"] and verdicts["ct2-int8"] and verdicts["ort-int8-qdq"]
    assert not verdicts["ort-int8"] and not verdicts["ort-int8-all"] and not verdicts["ort-int8-sl"]
    assert verdicts["ort-int8-token"] and verdicts["ort-int8-token-sl"]  # per-token scales, each row its candidates
    assert "one scale per tensor" in invariance("ort-int8")[1]


def test_auto_skips_engines_whose_answers_depend_on_the_batch(monkeypatch, tiny_module_bundle):
    """With batching, `auto` passes over ort-int8 (not invariant) without building or gating it, and serves the
    same weights with per-token scales."""
    from labkit.engines import variants
    from labkit.serve import engine

    gated = []

    def check_chain(preset, candidate, bundle):
        gated.append(candidate)
        return variants.Check("ok", {"detail": "fake gate"}, artifact=None)

    monkeypatch.setattr(engine, "measured_order", lambda *a: ())
    monkeypatch.setattr(variants, "check_chain", check_chain)
    monkeypatch.setattr(variants, "build_translator", lambda *a, **k: "translator")
    served = engine.gated_translator(Preset.from_name("ci"), "auto", 1, tiny_module_bundle, batching=True)
    assert served.engine == "ort-int8-token" and gated == ["ort-int8-token"]
    assert "ort-int8 skipped: not batch-invariant" in served.why and served.invariance[0]
    served = engine.gated_translator(Preset.from_name("ci"), "auto", 1, tiny_module_bundle, batching=False)
    assert served.engine == "ort-int8"  # serial serving: one row per call, nothing to depend on
