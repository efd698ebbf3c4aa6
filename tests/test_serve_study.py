"""Notebook 08's tables, targets and ledger records from hand-made load points (no servers).

The numbers are chosen so every derived value can be checked by hand: serial at 8 clients serves
10 sentences/s, batched 40, so batching is 4.0x.
"""

from __future__ import annotations

import pandas as pd
import pytest

from labkit.config import Preset
from labkit.engines.variants import Check
from labkit.lab import nb08_serving as nb08
from labkit.serve.loadtest import LoadPoint, points_frame

CI = Preset.from_name("ci")


def point(load, rps, p50, p95, batch, lost=0, hit=float("nan"), health=5.0) -> LoadPoint:
    p = LoadPoint("closed", load, 2.0, sent=int(rps * 2), answered=int(rps * 2) - lost, lost=lost, duplicated=0,
                  dropped=0, requests=int(rps * 2), sentences=int(rps * 2), rps=rps, sentences_per_s=rps,
                  p50_ms=p50, p95_ms=p95, p99_ms=p95 + 1, mean_ms=p50, mean_batch_size=batch, cache_hit_rate=hit,
                  healthz_p50_ms=health, healthz_max_ms=health, latencies_ms=[p50] * int(rps * 2))
    p.in_flight = float(load)
    return p


def sweep(lost: int = 0) -> pd.DataFrame:
    runs = {("ort-int8", "serial"): [point(1, 9, 100, 120, 1.0), point(8, 10, 800, 900, 1.0)],
            ("ort-int8", "batched"): [point(1, 9, 105, 125, 1.0), point(8, 40, 200, 300, 7.5, lost=lost)],
            ("ort-int8", "batched+cache"): [point(1, 90, 2, 5, float("nan"), hit=1.0, health=float("inf")),
                                            point(8, 400, 20, 30, float("nan"), hit=1.0)]}
    frames = [points_frame(ps, engine=e).rename(columns={"mode": "loop"}).assign(mode=m, point=ps)
              for (e, m), ps in runs.items()]
    return pd.concat(frames, ignore_index=True)


def test_targets_read_batched_against_serial_at_the_concurrency():
    t = nb08.serving_targets(sweep(), "ort-int8", 8)
    assert t["batching_speedup"] == pytest.approx(4.0) and t["speedup_target_4x_met"]
    assert t["p95_not_worse_met"] and t["healthz_under_50ms_met"] and t["lost"] == 0 and t["broken_points"] == []
    broken = nb08.serving_targets(sweep(lost=1), "ort-int8", 8)
    assert broken["lost"] == 1 and broken["broken_points"] == ["ort-int8 batched closed 8: {}"]


def test_qps_table_has_goodput_and_littles_law_columns():
    table = nb08.qps_table(sweep(), slo_ms=150)
    row = table[(table["mode"] == "batched") & (table["concurrency"] == 8)].iloc[0]
    assert row["lambda_W"] == pytest.approx(40 * 0.2) and row["in_flight"] == 8
    assert row["goodput_rps@150ms"] == 0.0  # every answer took 200 ms
    assert table[(table["mode"] == "serial") & (table["concurrency"] == 1)]["goodput_rps@150ms"].iloc[0] == 9


def test_records_are_valid_json_even_without_model_calls_or_a_health_answer():
    """A cache that answered everything has no batch size (NaN), a probe that failed an infinite
    latency: the ledger gets None for both, never NaN."""
    checks = {"ort-int8": Check("ok", {"name": "bleu-drop<=1.0", "passed": True, "detail": "drop 0.00"})}
    records = nb08.serving_records(sweep(), checks, CI, slo_ms=500)
    by = {r["variant"]: r for r in records}
    cached = by["serve-ort-int8-batched+cache"]
    assert cached["points"][0]["mean_batch_size"] is None and cached["points"][0]["healthz_max_ms"] is None
    assert by["serve-ort-int8-batched"]["metrics"]["qps"] == 40 and by["serve-ort-int8-batched"]["concurrency"] == 8
    assert by["serve-ort-int8-batched"]["parent"] == "serve-ort-int8-serial"
    assert all(r["gate"]["passed"] and r["status"] == "ok" for r in records)
    lost = nb08.serving_records(sweep(lost=1), checks, CI, slo_ms=500)
    failed = {r["variant"]: r for r in lost}["serve-ort-int8-batched"]
    assert failed["status"] == "failed" and "1 lost" in failed["reason"]


def test_an_engine_that_failed_its_gate_is_recorded_failed_and_not_measured():
    gate = {"name": "bleu-drop<=1.0", "passed": False, "detail": "BLEU 90 vs 99: drop 9"}
    records = nb08.serving_records(sweep().iloc[0:0], {"ort-int8": Check("failed", gate, gate["detail"])}, CI, 500)
    assert {r["status"] for r in records} == {"failed"} and all(r["metrics"] is None for r in records)
    assert all("drop 9" in r["reason"] for r in records)


def test_a_target_the_sweep_does_not_measure_stops_the_notebook_at_once():
    ci = Preset.from_name("ci")
    nb08.check_parameters(ci, "ort-int8", 8)
    with pytest.raises(ValueError, match=r"TARGET_CONCURRENCY 4 is not measured on preset 'ci'; it measures 1, 8"):
        nb08.check_parameters(ci, "torch", 4)
    with pytest.raises(ValueError, match="TARGET_ENGINE 'ct2' is not served"):
        nb08.check_parameters(ci, "ct2", 8)
