"""`labkit serve --backend ray`: the same app on a one-replica Ray Serve deployment, on loopback.

Translations must be the model's own, and the load test must come back the same way as against
the single-process server (nothing lost, batches formed, /metrics read). Skips where ray is not
installed (the optional `ray` extra; CI installs it).
"""

from __future__ import annotations

import importlib.util

import httpx
import pytest

from labkit.config import Preset
from labkit.core.bundle import load_bundle
from labkit.core.data import load_split
from labkit.core.translator import translator_for
from labkit.serve.loadtest import LoadSpec, TextPool, closed_loop
from labkit.serve.process import ServerProcess

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                 reason="ray is not installed (pip install -e '.[ray]')")]
TEXTS = [p.zh for p in load_split("test", limit=16)]
RAY_START_S = 300  # Ray's own processes take ~10 s on an idle 2-core machine, a minute on a busy one


def test_ray_serve_answers_like_the_model_and_batches_under_load(tiny_bundle_dir):
    translator = translator_for(load_bundle(tiny_bundle_dir), Preset.from_name("ci"))
    oracle = dict(zip(TEXTS, (translator.run([t]).texts[0] for t in TEXTS)))
    args = ["--preset", "ci", "--bundle-dir", str(tiny_bundle_dir), "--threads", "1", "--backend", "ray",
            "--max-batch-size", "8", "--replica-cpus", "1", "--translation-cache", "0"]
    server = ServerProcess.start(args, ready_timeout_s=RAY_START_S, threads=1)
    try:
        r = httpx.post(server.url + "/v1/translate", json={"texts": TEXTS[:4], "id": "a"}, timeout=60)
        assert r.status_code == 200 and r.json()["id"] == "a", r.text
        assert r.json()["translations"] == [oracle[t] for t in TEXTS[:4]]
        assert r.json()["model"].endswith("@ray")
        (point,) = closed_loop(server.url, TextPool(TEXTS), [6], LoadSpec(duration_s=3.0, warmup_s=1.0))
    finally:
        code = server.stop(timeout_s=120)
    assert code == 0, server.log_tail()
    assert point.requests > 0 and point.lost == point.duplicated == 0 and point.errors == {}
    assert point.mean_batch_size > 1, "@serve.batch never batched six concurrent clients"
    assert point.answers and all(oracle[src] == out for src, out in point.answers.items())
