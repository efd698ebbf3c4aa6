"""Plotly figures from results: functions from tables (or the ledger) to a `go.Figure`.

    fig = plots.stage_bar({"teacher": table})   # table from labkit.measure.profiling.stage_breakdown
    fig.show()

Every figure with repeated timings shows their spread: error bars span the interquartile
range (q1..q3) or reach to p95, as each function says. Only plotly.graph_objects is used
(plotly.express needs pandas at import time and hides the traces a test checks).
Left out: styling themes, saving images (needs kaleido), dashboards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from labkit.measure.profiling import by_category
from labkit.measure.report import comparable_scores, current

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

    from labkit.measure import timing

# The lab's one palette (colour-blind-safe Okabe-Ito + greys): every figure takes its colours from
# here, keyed by series name, so a series keeps its colour across panels and notebooks.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000",
           "#999999", "#882255")
STAGE_COLORS = {"normalize": "#999999", "tokenize": PALETTE[0], "encode": PALETTE[4], "decode": PALETTE[1],
                "detokenize": PALETTE[2], "preprocessing": "#999999", "tokenizer": PALETTE[0],
                "model inference": PALETTE[1], "postprocessing": PALETTE[2]}
TECHNIQUE_COLORS = {"baseline": "#000000", "pruning": PALETTE[0], "distillation": PALETTE[4],
                    "onnx": PALETTE[2], "quantization": PALETTE[1], "shortlist": "#117733", "tensorrt": PALETTE[3],
                    "kv-cache": PALETTE[9], "serving": PALETTE[5], "peer": "#999999", "profiling": PALETTE[6]}


def series_colors(names) -> dict[str, str]:
    """One palette colour per series name, in first-seen order: ['overall', 'cross'] -> {'overall': '#0072B2', ...}.

    Build it once per figure (or notebook) and pass it to every panel, so a series never changes colour.
    """
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(dict.fromkeys(names))}


def paint(fig, colors: Mapping[str, str] | None = None):
    """Give every trace without a colour its series' palette colour, by name, and return the figure.

    Traces of one name share a colour in every panel and one legend entry (plotly's own cycle colours
    them by position, so 'torch' in the second panel is not the legend's 'torch'):
    paint(fig) on traces named ['torch', 'ort', 'torch'] -> '#0072B2', '#D55E00', '#0072B2'.
    """
    colors = dict(colors or {})
    for name, colour in series_colors([t.name or "" for t in fig.data]).items():
        colors.setdefault(name, colour)
    shown = set()
    for trace in fig.data:
        name = trace.name or ""
        colour = colors[name]
        has_marker, has_line = hasattr(trace, "marker"), hasattr(trace, "line")
        if has_marker and trace.marker.color is None and not (has_line and trace.line.color is not None):
            trace.marker.color = colour
        if has_line and trace.line.color is None and trace.type != "bar":
            trace.line.color = colour
        if name and trace.legendgroup is None:
            trace.legendgroup = name
        if name in shown and trace.showlegend is None:
            trace.showlegend = False
        shown.add(name)
    return fig


def _go():
    import plotly.graph_objects as go

    return go


def _iqr_bars(table: pd.DataFrame) -> dict:
    """Asymmetric error bars from p50 down to q1 and up to q3."""
    return dict(type="data", symmetric=False, array=(table["q3_ms"] - table["p50_ms"]).tolist(),
                arrayminus=(table["p50_ms"] - table["q1_ms"]).tolist())


# ---------------------------------------------------------------- profiling figures


def stage_bar(tables: Mapping[str, pd.DataFrame] | pd.DataFrame, by: str = "stage",
              title: str = "Where the time goes (batch 1)") -> go.Figure:
    """Stacked horizontal bars, one per model, one trace per stage (or category).

    Each segment is labelled "12.3 ms (45%)"; bars are normalized to 100 % so models of
    very different speed compare (the ms stay in the labels and hover).
    `tables`: {model name: stage_breakdown table}; a bare table is named "model".
    """

    go = _go()
    tables = {"model": tables} if not isinstance(tables, Mapping) else tables
    if by == "category":
        tables = {name: by_category(t) for name, t in tables.items()}
    elif by != "stage":
        raise ValueError(f"by must be 'stage' or 'category', got {by!r}")
    names = list(tables)
    parts = list(dict.fromkeys(p for t in tables.values() for p in t[by]))
    fig = go.Figure()
    for part in parts:
        rows = [t.set_index(by).loc[part] if part in set(t[by]) else None for t in tables.values()]
        pct = [float(r["pct"]) if r is not None else 0.0 for r in rows]
        ms = [float(r["ms"]) if r is not None else 0.0 for r in rows]
        fig.add_trace(go.Bar(
            name=part, y=names, x=pct, orientation="h", marker_color=STAGE_COLORS.get(part),
            text=[f"{m:.3g} ms ({p:.0f}%)" if p >= 4 else "" for m, p in zip(ms, pct)],
            textposition="inside", customdata=ms,
            hovertemplate=f"{part}: %{{customdata:.3f}} ms (%{{x:.1f}}%)<extra>%{{y}}</extra>"))
    fig.update_layout(barmode="stack", title=title, xaxis_title="share of translation time (%)",
                      legend_title=by, height=180 + 60 * len(names))
    return fig


def latency_vs_length(curves: Mapping[str, pd.DataFrame],
                      title: str = "Latency vs input length (batch 1)") -> go.Figure:
    """p50 latency against source tokens, one line per model; error bars span the IQR.

    Hover shows p95 and the output length (which the teacher chooses and forced decoding fixes).
    """
    go = _go()
    fig = go.Figure()
    for name, t in curves.items():
        fig.add_trace(go.Scatter(
            name=name, x=t["input_tokens"], y=t["p50_ms"], mode="lines+markers", error_y=_iqr_bars(t),
            customdata=t[["p95_ms", "output_tokens"]].to_numpy(),
            hovertemplate="%{x} tokens in, %{customdata[1]} out<br>p50 %{y:.1f} ms, p95 "
                          "%{customdata[0]:.1f} ms<extra>" + name + "</extra>"))
    fig.update_layout(title=title, xaxis_title="source length (tokens, incl. </s>)",
                      yaxis_title="latency p50 (ms), bars: IQR", yaxis_type="log" if len(curves) > 1 else None)
    return paint(fig)


def thread_scaling(tables: Mapping[str, pd.DataFrame],
                   title: str = "Effect of intra-op threads (batch 1)") -> go.Figure:
    """p50 latency per thread count, one line per model; error bars span the IQR."""
    go = _go()
    fig = go.Figure()
    for name, t in tables.items():
        fig.add_trace(go.Scatter(
            name=name, x=t["threads"], y=t["p50_ms"], mode="lines+markers", error_y=_iqr_bars(t),
            customdata=t["speedup"], hovertemplate="%{x} threads: %{y:.1f} ms "
                                                   "(x%{customdata:.2f})<extra>" + name + "</extra>"))
    fig.update_layout(title=title, xaxis_title="intra-op threads", xaxis_dtick=1,
                      yaxis_title="latency p50 (ms), bars: IQR", yaxis_type="log" if len(tables) > 1 else None)
    return paint(fig)


def operator_bar(table: pd.DataFrame, title: str = "Top operators by self CPU time") -> go.Figure:
    """Horizontal bars of self CPU ms per torch operator, largest on top."""
    go = _go()
    t = table.sort_values("self_cpu_ms")
    fig = go.Figure(go.Bar(
        x=t["self_cpu_ms"], y=t["op"], orientation="h", name="self CPU",
        text=[f"{p:.0f}%" for p in t["self_pct"]], textposition="outside", customdata=t["calls"],
        hovertemplate="%{y}: %{x:.2f} ms self, %{customdata} calls<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="self CPU time (ms)", height=200 + 22 * len(t),
                      margin_l=260)
    return paint(fig)


def latency_hist(measurements: Mapping[str, timing.Measurement],
                 title: str = "Per-sentence latency (batch 1)") -> go.Figure:
    """Histogram of every timed call, one trace per measurement; dashed lines mark p50 and p95."""
    go = _go()
    fig = go.Figure()
    for name, m in measurements.items():
        fig.add_trace(go.Histogram(name=name, x=list(m.times_ms), opacity=0.7, nbinsx=40))
        for q, value in (("p50", m.p50), ("p95", m.p95)):
            fig.add_vline(x=value, line_dash="dash" if q == "p50" else "dot",
                          annotation_text=f"{name} {q} {value:.1f} ms", annotation_position="top")
    fig.update_layout(title=title, xaxis_title="latency (ms)", yaxis_title="calls", barmode="overlay")
    return paint(fig)


# ---------------------------------------------------------------- ledger figures


def pareto_frontier(latency: list[float], quality: list[float]) -> list[int]:
    """Indices of the points no other point beats on both axes, by increasing latency.

    latency=[10, 20, 15, 30], quality=[50, 60, 40, 61] -> [0, 1, 3]
    (point 2 is slower and worse than point 0).
    """
    order = sorted(range(len(latency)), key=lambda i: (latency[i], -quality[i]))
    frontier, best = [], float("-inf")
    for i in order:
        if quality[i] > best:
            frontier.append(i)
            best = quality[i]
    return frontier


def pareto_points(df: pd.DataFrame) -> pd.DataFrame:
    """The ok records with both latency p50 and BLEU among each notebook's latest complete run
    (`labkit.measure.report.current`); `metrics.bleu` is the score on the shared test subset
    (`labkit.measure.report.comparable_scores`). Whole-decode times (kv-cache) are left out."""

    if df.empty:
        return df
    latest = current(df)
    latest = latest[latest["technique"] != "kv-cache"]
    latest = latest.assign(**{"metrics.bleu": comparable_scores(latest)["bleu"]})
    keep = (latest["status"] == "ok") & latest["metrics.latency_ms.p50"].notna() & latest["metrics.bleu"].notna()
    return latest[keep]


def _x_range(p50: pd.Series, keep) -> tuple[float, float]:
    """A log-axis range (log10 units) spanning the points in `keep` and the bulk of the rest;
    a lone slow outlier (a busy machine) no longer squeezes every other point into a corner."""
    import math

    high = max(float(p50[keep].max()), float(p50.quantile(0.9)))
    return math.log10(float(p50.min()) / 1.3), math.log10(high * 1.3)


def pareto(df: pd.DataFrame, title: str = "Latency vs BLEU (each notebook's latest complete run)",
           named: tuple[str, ...] = ("teacher",)) -> go.Figure:
    """Scatter of variants from a ledger DataFrame (`labkit.measure.ledger.read`), one trace per technique.

    x: latency p50 (log) with an error bar up to p95; y: BLEU. The solid line joins the Pareto
    frontier (lower-left is fast, top is good). Only frontier points and the `named` baselines
    carry a label (the rest on hover), placed on the side that keeps it inside the plot; points
    slower than the chart's range are listed under it. Records without both numbers are left out.
    """
    go = _go()
    points = pareto_points(df)
    fig = go.Figure()
    if len(points):
        p50, bleu = points["metrics.latency_ms.p50"], points["metrics.bleu"]
        idx = pareto_frontier(p50.tolist(), bleu.tolist())
        on_front = points.index.isin(points.index[idx])
        front = points.iloc[idx]
        fig.add_trace(go.Scatter(name="Pareto frontier", x=front["metrics.latency_ms.p50"], y=front["metrics.bleu"],
                                 mode="lines", line=dict(color="#444444", width=3), opacity=0.6, hoverinfo="skip"))
        labelled = on_front | points["variant"].isin(named).to_numpy()
        low, high = _x_range(p50, labelled)
        middle = 10 ** ((low + high) / 2)
        for technique, group in points.groupby("technique", sort=False):
            g50, g95 = group["metrics.latency_ms.p50"], group["metrics.latency_ms.p95"]
            show = labelled[points.index.get_indexer(group.index)]
            fig.add_trace(go.Scatter(
                name=technique, legendgroup=technique, x=g50, y=group["metrics.bleu"], mode="markers+text",
                text=[v if s else "" for v, s in zip(group["variant"], show)], customdata=group["variant"],
                textposition=["middle right" if x < middle else "middle left" for x in g50],
                marker=dict(size=11, color=TECHNIQUE_COLORS.get(technique), line=dict(width=1, color="white")),
                error_x=dict(type="data", symmetric=False, array=(g95 - g50).tolist(), arrayminus=[0] * len(group),
                             thickness=1),
                hovertemplate="%{customdata}: %{x:.1f} ms p50, BLEU %{y:.2f}<extra>" + technique + "</extra>"))
        off = points[p50 > 10 ** high]
        if len(off):
            fig.add_annotation(text="off the chart (slower): " + ", ".join(
                f"{v} {x:,.0f} ms" for v, x in zip(off["variant"], off["metrics.latency_ms.p50"])),
                xref="paper", yref="paper", x=0, y=-0.22, showarrow=False, xanchor="left", font_size=11)
        fig.update_xaxes(range=[low, high])
    fig.update_layout(title=title, xaxis_title="latency p50 per sentence (ms, batch 1, log); bar to p95",
                      yaxis_title="BLEU (test subset)", xaxis_type="log", legend_title="technique",
                      margin=dict(b=110), height=520)
    return fig


def speedup_bar(table: pd.DataFrame, title: str = "Speedup over the teacher, measured in the same run") -> go.Figure:
    """Horizontal bars of `speedup` for rows of `labkit.measure.report.before_after` that are ok,
    per-sentence and measured against the teacher; coloured by technique, noisy ones marked."""
    go = _go()
    rows = table[(table["status"] == "ok") & (table["speedup_vs"] == "teacher") & table["speedup"].notna()
                 & table["latency_p50_ms"].notna()].sort_values("speedup")
    fig = go.Figure()
    for technique, group in rows.groupby("technique", sort=False):
        fig.add_trace(go.Bar(
            name=technique, y=group["variant"], x=group["speedup"], orientation="h",
            marker_color=TECHNIQUE_COLORS.get(technique), marker_pattern_shape=["/" if n else "" for n in group["noisy"]],
            text=[f"{s:.2f}x{' (noisy)' if n else ''}" for s, n in zip(group["speedup"], group["noisy"])],
            textposition="outside", cliponaxis=False, customdata=group["latency_p50_ms"],
            hovertemplate="%{y}: %{x:.2f}x (p50 %{customdata:.1f} ms)<extra>" + technique + "</extra>"))
    fig.add_vline(x=1.0, line_dash="dash", line_color="#444444", annotation_text="teacher")
    fig.update_layout(title=title, xaxis_title="teacher p50 / variant p50 (same run; hatched: noisy timing)",
                      yaxis=dict(categoryorder="array", categoryarray=rows["variant"].tolist()),
                      height=160 + 24 * max(len(rows), 1), legend_title="technique", margin=dict(r=90))
    return fig


# ---------------------------------------------------------------- the bandwidth limit


def roofline_chart(table: pd.DataFrame, gbps: float, spread: tuple[float, float] | None = None,
                   title: str = "ms per token vs MB of weights per token: the memory-bandwidth limit") -> go.Figure:
    """Each variant a point (x bytes_per_token_mb, y ms_per_token, labelled by `variant`), and the
    bound ms = MB / (GB/s) as a line (dotted lines at the bandwidth's p5/p95 `spread`). Log-log axes:
    a point on the line streams its weights at the measured bandwidth; one below it was miscounted."""
    go = _go()
    colors = series_colors(table["variant"])
    xs = [table["bytes_per_token_mb"].min() / 2, table["bytes_per_token_mb"].max() * 2]
    fig = go.Figure()
    for name, bw, dash in [(f"bound at {gbps:.1f} GB/s", gbps, "solid"),
                           *((f"bound at {g:.1f} GB/s (p{q})", g, "dot") for g, q in zip(spread or (), (5, 95)))]:
        fig.add_trace(go.Scatter(x=xs, y=[x / bw for x in xs], mode="lines", name=name,
                                 line=dict(color="#444444", dash=dash)))
    for row in table.itertuples(index=False):
        fig.add_trace(go.Scatter(x=[row.bytes_per_token_mb], y=[row.ms_per_token], mode="markers+text",
                                 name=row.variant, text=[row.variant], textposition="top center",
                                 marker=dict(color=colors[row.variant], size=11)))
    fig.update_layout(title=title, xaxis=dict(type="log", title="MB of weights read per decode step"),
                      yaxis=dict(type="log", title="ms per token (batch-1 p50 / tokens)"), height=480)
    return fig
