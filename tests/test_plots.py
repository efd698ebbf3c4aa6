"""Figures from results: the traces a reader expects, error bars that show the spread, the Pareto frontier."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import pytest

from labkit.core.translator import STAGES
from labkit.measure import ledger, plots

ENV = {"cpu": "test cpu", "cores": 2, "threads": 2, "gpu": None, "versions": {}, "git": None}


def stage_table(decode_ms: float) -> pd.DataFrame:
    ms = {"normalize": 0.1, "tokenize": 0.4, "encode": 1.5, "decode": decode_ms, "detokenize": 0.2}
    total = sum(ms.values())
    cats = {"normalize": "preprocessing", "tokenize": "tokenizer", "encode": "model inference",
            "decode": "model inference", "detokenize": "postprocessing"}
    return pd.DataFrame([{"stage": s, "category": cats[s], "ms": ms[s], "pct": 100 * ms[s] / total} for s in ms])


def timing_table(key: str, values: list[int], p50: list[float]) -> pd.DataFrame:
    return pd.DataFrame({key: values, "input_tokens": values, "output_tokens": [40] * len(values),
                         "p50_ms": p50, "q1_ms": [p - 1 for p in p50], "q3_ms": [p + 2 for p in p50],
                         "p95_ms": [p + 5 for p in p50], "speedup": [p50[0] / p for p in p50]})


def test_stage_bar_has_one_trace_per_stage_with_percent_labels():
    fig = plots.stage_bar({"teacher": stage_table(20.0), "opus-mt-shape": stage_table(500.0)})
    assert isinstance(fig, go.Figure) and fig.layout.barmode == "stack"
    assert [t.name for t in fig.data] == list(STAGES)
    decode = fig.data[STAGES.index("decode")]
    assert list(decode.y) == ["teacher", "opus-mt-shape"]
    assert decode.text[0] == f"20 ms ({100 * 20 / 22.2:.0f}%)"
    assert sum(t.x[1] for t in fig.data) == pytest.approx(100)


def test_stage_bar_by_category():
    fig = plots.stage_bar(stage_table(20.0), by="category")
    assert [t.name for t in fig.data] == ["preprocessing", "tokenizer", "model inference", "postprocessing"]
    with pytest.raises(ValueError):
        plots.stage_bar(stage_table(1.0), by="op")


def test_latency_and_thread_figures_carry_iqr_error_bars():
    curve = timing_table("length", [4, 16, 32], [10.0, 12.0, 20.0])
    fig = plots.latency_vs_length({"teacher": curve})
    assert [t.name for t in fig.data] == ["teacher"]
    assert list(fig.data[0].error_y.array) == [2, 2, 2] and list(fig.data[0].error_y.arrayminus) == [1, 1, 1]
    threads = timing_table("threads", [1, 2], [20.0, 12.0])
    fig = plots.thread_scaling({"teacher": threads, "shape": threads})
    assert [t.name for t in fig.data] == ["teacher", "shape"] and list(fig.data[0].x) == [1, 2]


def test_operator_bar_puts_the_largest_on_top():
    table = pd.DataFrame({"op": ["aten::addmm", "aten::bmm"], "calls": [10, 4], "self_cpu_ms": [5.0, 2.0],
                          "self_pct": [60.0, 24.0]})
    fig = plots.operator_bar(table)
    assert list(fig.data[0].y) == ["aten::bmm", "aten::addmm"]  # plotly draws the last row on top


@pytest.mark.parametrize("latency,quality,frontier", [
    ([10, 20, 15, 30], [50, 60, 40, 61], [0, 1, 3]),  # point 2 is slower and worse than 0
    ([5], [1], [0]),
    ([10, 10, 12], [50, 55, 55], [1]),  # ties: the better of equal latency; equal quality later is not better
    ([], [], []),
])
def test_pareto_frontier(latency, quality, frontier):
    assert plots.pareto_frontier(latency, quality) == frontier


def _ledger(tmp_path):
    path = tmp_path / "ledger.jsonl"
    lat = lambda p50: {"p50": p50, "p95": p50 * 1.2, "n": 10}  # noqa: E731
    records = [
        dict(variant="teacher", technique="baseline", metrics={"bleu": 70.0, "latency_ms": lat(40.0)}),
        dict(variant="pruned-25", technique="pruning", metrics={"bleu": 69.0, "latency_ms": lat(30.0)}),
        dict(variant="pruned-50", technique="pruning", metrics={"bleu": 60.0, "latency_ms": lat(35.0)}),
        dict(variant="ort-int8", technique="quantization", metrics={"bleu": 68.0, "latency_ms": lat(15.0)}),
        dict(variant="teacher-profile", technique="profiling", metrics={"latency_ms": lat(41.0)}),
        dict(variant="trt-fp16", technique="tensorrt", status="skipped", reason="no CUDA device"),
    ]
    for r in records:
        ledger.append(path, ledger.make_record(notebook="nb", env=ENV, **r))
    return ledger.read(path)


def test_pareto_from_the_ledger(tmp_path):
    fig = plots.pareto(_ledger(tmp_path))
    names = [t.name for t in fig.data]
    assert names == ["Pareto frontier", "baseline", "pruning", "quantization"]  # no profiling, no skipped
    frontier = fig.data[0]  # drawn first, under the markers, and thick enough to see
    assert list(frontier.x) == [15.0, 30.0, 40.0] and list(frontier.y) == [68.0, 69.0, 70.0]
    pruning = fig.data[2]
    assert list(pruning.text) == ["pruned-25", ""]  # only frontier points and the teacher are labelled
    assert list(pruning.customdata) == ["pruned-25", "pruned-50"]  # the rest on hover
    assert list(pruning.error_x.array) == pytest.approx([6.0, 7.0])  # up to p95
    assert fig.data[3].textposition[0] == "middle right" and fig.data[1].textposition[0] == "middle left"


def test_pareto_keeps_a_slow_outlier_off_the_axis_and_names_it(tmp_path):
    path = tmp_path / "ledger.jsonl"
    lat = lambda p50: {"p50": p50, "p95": p50 * 1.2, "n": 10}  # noqa: E731
    points = [("teacher", 70.0, 40.0), ("slow", 60.0, 2000.0)] + [(f"p{i}", 69.0 - i, 30.0 + i) for i in range(12)]
    for variant, bleu, p50 in points:
        ledger.append(path, ledger.make_record(notebook="nb", env=ENV, variant=variant, technique="pruning",
                                               metrics={"bleu": bleu, "latency_ms": lat(p50)}))
    fig = plots.pareto(ledger.read(path))
    assert 10 ** fig.layout.xaxis.range[1] < 2000.0
    assert "slow 2,000 ms" in fig.layout.annotations[0].text


def test_speedup_bar_only_same_run_speedups_against_the_teacher():
    table = pd.DataFrame({"variant": ["a", "b", "kv", "c"], "technique": ["pruning", "onnx", "kv-cache", "peer"],
                          "status": ["ok", "ok", "ok", "failed"], "speedup": [1.5, 3.0, 1.2, 9.0],
                          "speedup_vs": ["teacher", "teacher", "kv-dynamic", "teacher"],
                          "latency_p50_ms": [10.0, 5.0, None, 2.0], "noisy": [False, True, False, False]})
    fig = plots.speedup_bar(table)
    bars = {t.name: (list(t.y), list(t.text)) for t in fig.data}
    assert bars == {"pruning": (["a"], ["1.50x"]), "onnx": (["b"], ["3.00x (noisy)"])}
    assert fig.data[0].marker.color == fig.data[0].marker.color == plots.TECHNIQUE_COLORS["pruning"]


def test_series_colors_are_one_palette_in_first_seen_order():
    colors = plots.series_colors(["overall", "cross", "overall"])
    assert colors == {"overall": plots.PALETTE[0], "cross": plots.PALETTE[1]}


def test_pareto_of_an_empty_ledger_is_an_empty_figure():
    fig = plots.pareto(pd.DataFrame(columns=ledger.COLUMNS))
    assert isinstance(fig, go.Figure) and len(fig.data) == 0


def test_latency_hist_marks_p50_and_p95():
    from labkit.measure.timing import Measurement

    m = Measurement(tuple(float(x) for x in range(1, 101)), threads=1)
    fig = plots.latency_hist({"teacher": m})
    assert [t.name for t in fig.data] == ["teacher"] and len(fig.data[0].x) == 100
    assert [round(s.x0, 2) for s in fig.layout.shapes] == [round(m.p50, 2), round(m.p95, 2)]
