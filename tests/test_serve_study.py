"""Notebook 08's tables, targets and ledger records from hand-made load points (no servers).

The numbers are chosen so every derived value can be checked by hand: serial at 8 clients serves
10 sentences/s, continuous batching 40 (static 20, CTranslate2's own 25), so continuous is 4.0x serial,
2.0x static and 1.6x the peer.
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from labkit.config import Preset
from labkit.engines.variants import Check
from labkit.lab import nb08_serving as nb08
from labkit.serve.loadtest import LoadPoint, points_frame

CI = Preset.from_name("ci")
ALL_MODES = CI.with_(serve=dataclasses.replace(CI.serve, modes=("serial", "static", "continuous", "continuous+cache")))


def point(load, rps, p50, p95, batch, lost=0, hit=float("nan"), health=5.0, useful=1.0) -> LoadPoint:
    p = LoadPoint("closed", load, 2.0, sent=int(rps * 2), answered=int(rps * 2) - lost, lost=lost, duplicated=0,
                  dropped=0, requests=int(rps * 2), sentences=int(rps * 2), rps=rps, sentences_per_s=rps,
                  p50_ms=p50, p95_ms=p95, p99_ms=p95 + 1, mean_ms=p50, mean_batch_size=batch, cache_hit_rate=hit,
                  useful_fraction=useful, healthz_p50_ms=health, healthz_p95_ms=health, healthz_max_ms=health,
                  latencies_ms=[p50] * int(rps * 2))
    p.in_flight = float(load)
    return p


def sweep(lost: int = 0) -> pd.DataFrame:
    runs = {("ort-int8", "serial"): [point(1, 9, 100, 120, 1.0), point(8, 10, 800, 900, 1.0)],
            ("ort-int8", "static"): [point(1, 9, 105, 125, 1.0), point(8, 20, 400, 600, 7.0, useful=0.5)],
            ("ort-int8", "continuous"): [point(1, 9, 105, 125, 1.0), point(8, 40, 200, 300, 7.5, lost=lost)],
            ("ort-int8", "continuous+cache"): [point(1, 90, 2, 5, float("nan"), hit=1.0, health=float("inf")),
                                               point(8, 400, 20, 30, float("nan"), hit=1.0)],
            ("ct2-int8", "ct2"): [point(1, 12, 80, 90, 1.0), point(8, 25, 300, 350, 4.0)]}
    frames = [points_frame(ps, engine=e).rename(columns={"mode": "loop"}).assign(mode=m, point=ps)
              for (e, m), ps in runs.items()]
    return pd.concat(frames, ignore_index=True)


def test_aims_read_continuous_against_serial_static_and_the_peer():
    rows = {r["aim"].split(" at ")[0] if "healthz" not in r["aim"] else "healthz": r
            for r in nb08.serving_targets(sweep(), "ort-int8", 8)}
    assert rows["ort-int8 continuous ≥ 4× serial sentences/s"]["measured"] == pytest.approx(4.0)
    assert rows["ort-int8 continuous ≥ 4× serial sentences/s"]["met"]
    assert rows["ort-int8 continuous p95 ≤ serial p95"]["measured"] == (300, 900)
    assert rows["ort-int8 continuous ≥ 1.5× static"]["measured"] == pytest.approx(2.0)
    assert rows["ort-int8 continuous ≥ 1.3× ct2-int8's own batching"]["measured"] == pytest.approx(1.6)
    assert rows["healthz"]["measured"] == 5.0 and rows["healthz"]["met"]
    everything = nb08.serving_targets(sweep(), "ort-int8", 8)[-1]
    assert everything["measured"] == (0, 0) and everything["met"]
    broken = nb08.serving_targets(sweep(lost=1), "ort-int8", 8)[-1]
    assert broken["measured"] == (1, 0) and not broken["met"]


def test_an_aim_whose_points_were_not_measured_says_so():
    only_serial = sweep()[lambda d: d["mode"] == "serial"]
    rows = nb08.serving_targets(only_serial, "ort-int8", 8)
    assert rows[0]["measured"] is None and rows[0]["met"] is None


def test_ct2_engines_are_served_with_their_own_batching_only():
    assert nb08.modes_for("ct2-int8", ("serial", "static", "continuous")) == ("ct2",)
    assert nb08.modes_for("ort-int8", ("serial", "continuous", "ct2")) == ("serial", "continuous")
    args = nb08.server_args(CI, "ort-int8", Check("ok", artifact="/x"), "continuous")
    assert args[args.index("--batching") + 1] == "continuous" and args[-2:] == ["--artifact", "/x"]


def test_tables_have_goodput_useful_steps_and_littles_law_columns():
    table = nb08.qps_table(sweep(), slo_ms=150)
    row = table[(table["mode"] == "continuous") & (table["clients"] == 8)].iloc[0]
    assert row["goodput@150ms"] == 0.0  # every answer took 200 ms
    assert table[(table["mode"] == "static") & (table["clients"] == 8)]["useful steps"].iloc[0] == 0.5
    assert table[(table["mode"] == "serial") & (table["clients"] == 1)]["goodput@150ms"].iloc[0] == 9
    assert len(table.columns) <= 10  # fits the page
    load = nb08.load_table(sweep())
    row = load[(load["mode"] == "continuous") & (load["clients"] == 8)].iloc[0]
    assert row["λ·W"] == pytest.approx(40 * 0.2) and row["in flight"] == 8


def test_records_are_valid_json_even_without_model_calls_or_a_health_answer():
    """A cache that answered everything has no batch size (NaN), a probe that failed an infinite
    latency: the ledger gets None for both, never NaN."""
    checks = {"ort-int8": Check("ok", {"name": "bleu-drop<=1.0", "passed": True, "detail": "drop 0.00"})}
    records = nb08.serving_records(sweep(), checks, ALL_MODES, slo_ms=500)
    by = {r["variant"]: r for r in records}
    cached = by["serve-ort-int8-continuous+cache"]
    assert cached["points"][0]["mean_batch_size"] is None and cached["points"][0]["healthz_max_ms"] is None
    cont = by["serve-ort-int8-continuous"]
    assert cont["metrics"]["qps"] == 40 and cont["concurrency"] == 8 and cont["serving"]["batching"] == "continuous"
    assert cont["parent"] == "serve-ort-int8-serial"
    assert all(r["gate"]["passed"] and r["status"] == "ok" for r in records)
    lost = nb08.serving_records(sweep(lost=1), checks, CI, slo_ms=500)
    failed = {r["variant"]: r for r in lost}["serve-ort-int8-continuous"]
    assert failed["status"] == "failed" and "1 lost" in failed["reason"]


def test_an_engine_that_failed_its_gate_is_recorded_failed_and_not_measured():
    gate = {"name": "bleu-drop<=1.0", "passed": False, "detail": "BLEU 90 vs 99: drop 9"}
    records = nb08.serving_records(sweep().iloc[0:0], {"ort-int8": Check("failed", gate, gate["detail"])}, CI, 500)
    assert {r["status"] for r in records} == {"failed"} and all(r["metrics"] is None for r in records)
    assert all("drop 9" in r["reason"] for r in records)


def test_a_target_the_sweep_does_not_measure_stops_the_notebook_at_once():
    ci = Preset.from_name("ci")
    nb08.check_parameters(ci, "ort-int8-token", 8)
    nb08.check_parameters(ci, nb08.FASTEST, 8)  # read on whichever served the most sentences/s
    with pytest.raises(ValueError, match=r"TARGET_CONCURRENCY 4 is not measured on preset 'ci'; it measures 1, 8, 32"):
        nb08.check_parameters(ci, "torch", 4)
    with pytest.raises(ValueError, match="TARGET_ENGINE 'ct2' is not served"):
        nb08.check_parameters(ci, "ct2", 8)


def test_the_fastest_engine_is_read_from_continuous_batching_and_the_peer_is_not_a_candidate():
    df = sweep()
    torch_runs = df[df["engine"] == "ort-int8"].assign(engine="torch")
    torch_runs = torch_runs.assign(sentences_per_s=torch_runs["sentences_per_s"] / 2)
    both = pd.concat([df, torch_runs], ignore_index=True)
    assert nb08.fastest_engine(both, 8) == "ort-int8"  # ct2's own batching (25/s) is the peer, not a candidate
    table = nb08.fastest_table(both)
    assert list(table["clients"]) == [1, 8] and set(table["fastest"]) == {"ort-int8"}
    assert table.loc[table["clients"] == 8, "× torch"].iloc[0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no continuous-batching point at 32 clients"):
        nb08.fastest_engine(both, 32)
