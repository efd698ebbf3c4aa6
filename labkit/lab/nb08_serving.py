"""Notebook 08's study: serial vs dynamic batching vs batching + cache, per engine, under load.

    checks = gate_engines(preset, teacher_for(preset))   # each engine gated against its parent first
    df = serving_sweep(preset, checks)                # one server per (engine, mode), closed loop per concurrency
    qps_table(df); serving_targets(df); serving_records(df, checks, preset, slo_ms=500)
    plot_serving(df, slo_ms=500).show(); plot_batch_sizes(df).show()

Every server is a `labkit serve` child on a free loopback port, started all at once (their
start-ups overlap), measured one at a time (`labkit.serve.loadtest`), and stopped by PID even
when something fails. Modes (MODES): `serial` serves one sentence per model call, `batched`
batches up to the budget's max_batch_size, `batched+cache` adds the translation cache; all use
the tokenizer cache and the same Zipf-drawn texts, so repeated sentences exist in every run
and only the last mode can skip them.

Left out: the Ray backend (tests/test_serve_ray.py runs it; one machine shows nothing a second
process would not) and tuning max_batch_size/max_wait_ms (parameters of the notebook).
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from labkit.config import Preset, ServeBudget
from labkit.core.bundle import Bundle
from labkit.engines.variants import VARIANTS, Check, ancestors, check_variants
from labkit.measure.gates import exactly_once_gate
from labkit.measure.ledger import make_record
from labkit.serve.crosscheck import compare_rows
from labkit.serve.loadtest import LoadPoint, LoadSpec, TextPool, closed_loop, crosscheck, open_loop, points_frame
from labkit.serve.process import ServerProcess

if TYPE_CHECKING:
    import pandas as pd

NOTEBOOK = "08_serving"
MODES = {  # mode -> (max_batch_size or None for the budget's, translation cache entries)
    "serial": (1, 0),
    "batched": (None, 0),
    "batched+cache": (None, 4096),
}
READY_TIMEOUT_S = 600  # several servers load at once on 2 cores


# --------------------------------------------------------------------------- servers


def check_parameters(preset: Preset, engine: str, concurrency: int) -> None:
    """Stop at once, naming what this preset measures, when the notebook's target engine or concurrency is not
    part of its sweep (the targets would otherwise fail much later, with a KeyError in an assertion)."""
    budget = preset.serve
    if engine not in budget.engines:
        raise ValueError(f"TARGET_ENGINE {engine!r} is not served on preset {preset.name!r}; it serves "
                         f"{', '.join(budget.engines)} (Preset.serve.engines in labkit.config)")
    if concurrency not in budget.concurrency:
        raise ValueError(f"TARGET_CONCURRENCY {concurrency} is not measured on preset {preset.name!r}; it measures "
                         f"{', '.join(map(str, budget.concurrency))} clients (Preset.serve.concurrency)")


def gate_engines(preset: Preset, bundle: Bundle, engines: tuple[str, ...] | None = None) -> dict[str, Check]:
    """Build and gate each engine (and its parents) once: {engine: Check}; only "ok" ones are served."""
    engines = engines or preset.serve.engines
    chain = [v for e in engines for v in ancestors(e)]
    checks = check_variants(preset, list(dict.fromkeys(chain)), bundle)
    return {e: checks[e] for e in engines}


def server_args(preset: Preset, engine: str, check: Check, mode: str) -> list[str]:
    """`labkit serve` arguments for one (engine, mode): the gated artifact, batching and cache."""
    batch, cache = MODES[mode]
    budget = preset.serve
    args = ["--preset", preset.name, "--engine", engine, "--threads", str(preset.threads),
            "--max-batch-size", str(batch or budget.max_batch_size), "--max-wait-ms", str(budget.max_wait_ms),
            "--translation-cache", str(cache), "--max-queue", "4096"]
    return args + (["--artifact", check.artifact] if check.artifact else [])


def _measure(server: ServerProcess, pool: TextPool, budget: ServeBudget, mode: str) -> list[LoadPoint]:
    spec = LoadSpec(duration_s=budget.duration_s, warmup_s=budget.warmup_s)
    points = closed_loop(server.url, pool, budget.concurrency, spec)
    if mode == "batched" and budget.rates:  # open loop: what independent users see (one mode is enough)
        points += open_loop(server.url, pool, budget.rates, spec)
    return points


def serving_sweep(preset: Preset, checks: dict[str, Check], modes: tuple[str, ...] | None = None,
                  progress: bool = True) -> pd.DataFrame:
    """Closed-loop points (and open-loop ones for `batched`) per gated engine and mode; one row per point.

    Columns: engine, mode, points_frame's (mode is renamed loop), plus the LoadPoint itself.
    """
    import pandas as pd

    budget, modes = preset.serve, modes or preset.serve.modes
    runs = [(e, m) for e, c in checks.items() if c.status == "ok" for m in modes]
    pool = TextPool.from_split("test", limit=budget.pool_sentences, zipf=budget.zipf or None)
    frames = []
    with ExitStack() as stack:
        servers = {}
        for engine, mode in runs:  # launched together: their imports and model loads overlap
            servers[engine, mode] = ServerProcess.launch(server_args(preset, engine, checks[engine], mode),
                                                         threads=preset.threads)
            stack.callback(servers[engine, mode].stop)  # stopped by PID, also when a point fails
        start = time.perf_counter()
        for server in servers.values():
            server.wait_ready(READY_TIMEOUT_S)
        if progress:
            print(f"{len(servers)} servers ready after {time.perf_counter() - start:.0f} s", flush=True)
        for (engine, mode), server in servers.items():
            if progress:
                print(f"serving {engine} {mode}: {len(budget.concurrency)} closed-loop points", flush=True)
            points = _measure(server, pool, budget, mode)
            frame = points_frame(points, engine=engine).rename(columns={"mode": "loop"})
            frames.append(frame.assign(mode=mode, point=points))
            server.stop()
    return pd.concat(frames, ignore_index=True)


def locust_crosscheck(preset: Preset, checks: dict[str, Check], engine: str, users: int) -> pd.DataFrame | str:
    """labkit's closed loop and locust at `users` clients on a batched `engine` server for the budget's
    locust_s (labkit.serve.crosscheck); a string saying why not when the budget or the machine has none."""
    import importlib.util

    import pandas as pd

    if preset.serve.locust_s <= 0:
        return f"no locust cross-check on preset {preset.name} (locust_s = 0; tests/test_serve_process.py runs one)"
    if importlib.util.find_spec("locust") is None:
        return "locust is not installed (pip install -e '.[test]')"
    if checks.get(engine) is None or checks[engine].status != "ok":
        return f"{engine} is not served here"
    texts = TextPool.from_split("test", limit=preset.serve.pool_sentences).texts
    with ServerProcess.start(server_args(preset, engine, checks[engine], "batched"), READY_TIMEOUT_S,
                             threads=preset.threads) as server:
        return pd.DataFrame(compare_rows(*crosscheck(server.url, texts, users, preset.serve.locust_s)))


# --------------------------------------------------------------------------- tables


def closed(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["loop"] == "closed"].assign(concurrency=lambda d: d["load"].astype(int))


def qps_table(df: pd.DataFrame, slo_ms: float | None = None) -> pd.DataFrame:
    """The closed-loop table: engine, mode, concurrency, req/s, sentences/s, p50/p95/p99, errors,
    lost, duplicated, mean batch size, cache hit rate, /healthz p50/max, requests in flight (L)
    measured and as λ·W, goodput."""
    c = closed(df)
    out = c[["engine", "mode", "concurrency", "rps", "sentences_per_s", "p50_ms", "p95_ms", "p99_ms", "errors",
             "lost", "duplicated", "mean_batch_size", "cache_hit_rate", "healthz_p50_ms", "healthz_max_ms"]].copy()
    out["error_kinds"] = out["errors"]  # {status or transport error: count}
    out["errors"] = out["errors"].map(lambda e: sum(e.values()))
    out["in_flight"] = [p.in_flight for p in c["point"]]  # L measured: mean requests outstanding
    out["lambda_W"] = [p.littles_law_clients for p in c["point"]]  # L as Little's law computes it
    if slo_ms is not None:
        out[f"goodput_rps@{slo_ms:g}ms"] = [p.goodput(slo_ms) for p in c["point"]]
    return out.reset_index(drop=True)


def serving_targets(df: pd.DataFrame, engine: str = "ort-int8", concurrency: int = 8) -> dict[str, Any]:
    """The issue's aims at one (engine, concurrency): batched vs serial sentences/s and p95, /healthz
    while saturated, and lost/duplicated answers over every point of every run."""
    c = closed(df)
    at = c[(c["engine"] == engine) & (c["concurrency"] == concurrency)].set_index("mode")
    broken = df[(df["lost"] > 0) | (df["duplicated"] > 0)]
    out: dict[str, Any] = {"engine": engine, "concurrency": concurrency,
                           "lost": int(df["lost"].sum()), "duplicated": int(df["duplicated"].sum()),
                           "broken_points": [f"{r.engine} {r.mode} {r.loop} {r.load:g}: {r.errors}"
                                             for r in broken.itertuples()]}
    if {"serial", "batched"} <= set(at.index):
        s, b = at.loc["serial"], at.loc["batched"]
        numbers = {"serial_sentences_per_s": s.sentences_per_s, "batched_sentences_per_s": b.sentences_per_s,
                   "batching_speedup": b.sentences_per_s / s.sentences_per_s if s.sentences_per_s else float("nan"),
                   "serial_p95_ms": s.p95_ms, "batched_p95_ms": b.p95_ms,
                   "batched_mean_batch": b.mean_batch_size, "healthz_max_ms_batched": b.healthz_max_ms}
        out |= {k: round(float(v), 3) for k, v in numbers.items()}  # plain floats: no np.float64(...) when shown
        out["speedup_target_4x_met"] = bool(out["batching_speedup"] >= 4)
        out["p95_not_worse_met"] = bool(b.p95_ms <= s.p95_ms)
        out["healthz_under_50ms_met"] = bool(b.healthz_max_ms < 50)
    return out


# --------------------------------------------------------------------------- ledger


def _num(x, digits: int = 3) -> float | None:
    """A number as the ledger holds it: None for NaN or inf (no model call, no answer, a failed probe)."""
    return round(float(x), digits) if x is not None and math.isfinite(x) else None


def _point_summary(p: LoadPoint, slo_ms: float) -> dict:
    return {"loop": p.mode, "load": p.load, "requests": p.requests, "rps": _num(p.rps),
            "sentences_per_s": _num(p.sentences_per_s), "p50_ms": _num(p.p50_ms, 2), "p95_ms": _num(p.p95_ms, 2),
            "p99_ms": _num(p.p99_ms, 2), "errors": p.errors, "sent": p.sent, "lost": p.lost,
            "duplicated": p.duplicated, "dropped": p.dropped, "mean_batch_size": _num(p.mean_batch_size),
            "cache_hit_rate": _num(p.cache_hit_rate), "in_flight": _num(p.in_flight),
            "healthz_max_ms": _num(p.healthz_max_ms, 2), "goodput_rps": _num(p.goodput(slo_ms))}


def _headline(group: pd.DataFrame, concurrency: int) -> LoadPoint:
    """The closed-loop point at `concurrency`, else the nearest one measured."""
    c = closed(group)
    return c.iloc[(c["concurrency"] - concurrency).abs().argsort().iloc[0]]["point"]


def serving_records(df: pd.DataFrame, checks: dict[str, Check], preset: Preset, slo_ms: float,
                    concurrency: int = 8) -> list[dict]:
    """One `serving` record per (engine, mode): qps, sentences/s and p50/p95 at `concurrency` (else the
    nearest point) as metrics, every point under `points`; a skipped/failed engine gets its reason."""
    records = []
    for engine, check in checks.items():
        spec = VARIANTS[engine]
        for mode in preset.serve.modes:
            common = dict(notebook=NOTEBOOK, variant=f"serve-{engine}-{mode}", technique="serving",
                          backend=spec.backend, precision=spec.precision,
                          model=preset.model.name_or_path or preset.model.kind,
                          parent=None if mode == "serial" else f"serve-{engine}-serial")
            group = df[(df["engine"] == engine) & (df["mode"] == mode)]
            if check.status != "ok" or group.empty:
                reason = check.reason or "not measured"
                records.append(make_record(**common, status="skipped" if check.status != "failed" else "failed",
                                           reason=f"{engine} not served: {reason}", gate=check.gate))
                continue
            head = _headline(group, concurrency)
            points = list(group["point"])
            gate = exactly_once_gate(sum(p.sent for p in points), sum(p.answered for p in points),
                                     sum(p.lost for p in points), sum(p.duplicated for p in points), len(points))
            records.append(make_record(
                **common, gate=gate, engine_gate=check.gate,
                metrics={"latency_ms": {"p50": head.p50_ms, "p95": head.p95_ms, "n": head.requests}
                         if head.requests else None, "qps": head.rps, "sentences_per_s": head.sentences_per_s},
                concurrency=int(head.load), p99_ms=_num(head.p99_ms, 2), slo_ms=slo_ms,
                serving={"max_batch_size": MODES[mode][0] or preset.serve.max_batch_size,
                         "max_wait_ms": preset.serve.max_wait_ms, "translation_cache": MODES[mode][1],
                         "threads": preset.threads, "duration_s": preset.serve.duration_s,
                         "warmup_s": preset.serve.warmup_s, "zipf": preset.serve.zipf},
                points=[_point_summary(p, slo_ms) for p in points]))
    return records


# --------------------------------------------------------------------------- plots


def plot_serving(df: pd.DataFrame, slo_ms: float) -> Any:
    """2x2: sentences/s, p95, goodput vs concurrency, and the latency-throughput curve; a line per (engine, mode)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    table = qps_table(df, slo_ms)
    good = f"goodput_rps@{slo_ms:g}ms"
    fig = make_subplots(rows=2, cols=2, subplot_titles=(
        "sentences/s vs concurrency", "p95 latency vs concurrency",
        "latency-throughput (p50; points: concurrency)", f"goodput: requests/s within {slo_ms:g} ms"))
    dash = {"serial": "dot", "batched": "solid", "batched+cache": "dash"}
    for (engine, mode), g in table.groupby(["engine", "mode"], sort=False):
        name, style = f"{engine} {mode}", dict(dash=dash.get(mode, "solid"))
        kw = dict(name=name, legendgroup=name, line=style)
        fig.add_trace(go.Scatter(x=g.concurrency, y=g.sentences_per_s, **kw), row=1, col=1)
        fig.add_trace(go.Scatter(x=g.concurrency, y=g.p95_ms, showlegend=False, **kw), row=1, col=2)
        fig.add_trace(go.Scatter(x=g.sentences_per_s, y=g.p50_ms, text=g.concurrency, mode="lines+markers+text",
                                 textposition="top center", showlegend=False, **kw), row=2, col=1)
        fig.add_trace(go.Scatter(x=g.concurrency, y=g[good], showlegend=False, **kw), row=2, col=2)
    for row, col, x, y in ((1, 1, "clients", "sentences/s"), (1, 2, "clients", "ms"), (2, 1, "sentences/s", "ms"),
                           (2, 2, "clients", "requests/s")):
        fig.update_xaxes(title_text=x, row=row, col=col)
        fig.update_yaxes(title_text=y, rangemode="tozero", row=row, col=col)
    fig.update_layout(height=750, title="Serving under closed-loop load (one text per request)")
    return fig


def plot_batch_sizes(df: pd.DataFrame) -> Any:
    """Model calls per batch-size bucket (from /metrics) at each batched run's highest concurrency."""
    import plotly.graph_objects as go

    c = closed(df)
    fig = go.Figure()
    for (engine, mode), g in c[c["mode"] != "serial"].groupby(["engine", "mode"], sort=False):
        top = g.loc[g["concurrency"].idxmax()]
        buckets = {le: n for le, n in top["batch_sizes"].items() if le != "+Inf"}
        fig.add_trace(go.Bar(x=[f"<={float(le):g}" for le in buckets], y=list(buckets.values()),
                             name=f"{engine} {mode}, {top.concurrency} clients"))
    fig.update_layout(title="Sentences per model call (histogram buckets of labkit_batch_size)",
                      xaxis_title="batch size", yaxis_title="model calls", barmode="group")
    return fig
