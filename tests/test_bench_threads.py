"""labkit.lab.bench_threads: each trial becomes the worker flags that set it, and the worker reads them."""

from __future__ import annotations

from labkit.lab import bench, bench_threads


def test_trials_become_worker_flags():
    ort = bench_threads.TRIALS["onnxruntime"]
    assert [bench_threads.trial_args(t) for t in ort] == [("--spin", "on", "--inter-threads", 1),
                                                          ("--spin", "off", "--inter-threads", 1)]
    ct2 = bench_threads.TRIALS["ctranslate2"]
    assert {t.env.get("OMP_WAIT_POLICY") for t in ct2} == {None, "PASSIVE", "ACTIVE"}
    assert [t.inter for t in ct2] == [1, 1, 1, 2]


def test_worker_command_line_carries_the_settings(monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "worker", lambda *a, **k: seen.update(k) or {"ok": True})
    assert bench._worker_main(["--worker", "ort-int8", "--preset", "ci", "--threads", "2", "--spin", "on",
                               "--inter-threads", "2"]) == 0
    assert seen == {"spin": True, "inter_threads": 2}
    bench._worker_main(["--worker", "ort-int8", "--preset", "ci", "--threads", "2"])
    assert seen["spin"] is bench.ORT_SPIN is False  # the bench's chosen default: idle ORT threads sleep
