"""Notebook 08's study: serial vs static vs continuous batching (and the cache), per engine, against
CTranslate2's own batching, under load.

    checks = gate_engines(preset, teacher_for(preset))   # each engine gated against its parent first
    df = serving_sweep(preset, checks)                # one server per (engine, mode), closed loop per concurrency
    qps_table(df); serving_targets(df); serving_records(df, checks, preset, slo_ms=500)
    plot_serving(df, slo_ms=500).show(); plot_batch_sizes(df).show()

Every server is a `labkit serve` child on a free loopback port, started all at once (their
start-ups overlap), measured one at a time (`labkit.serve.loadtest`), and stopped by PID even
when something fails. Modes (MODES): `serial` serves one sentence per model call, `static`
batches up to the budget's max_batch_size and decodes each batch until its longest sentence ends,
`continuous` lets sentences join and leave the running batch at every decode step
(labkit.serve.continuous_batcher), `continuous+cache` adds the translation cache, and `ct2` is CTranslate2's
own batching (labkit.serve.ct2_runner), for CTranslate2 engines only (`modes_for`). All use the
tokenizer cache and the same Zipf-drawn texts, so repeated sentences exist in every run and only
the cache mode can skip them.

Left out: the Ray backend (tests/test_serve_ray.py runs it; one machine shows nothing a second
process would not) and tuning max_batch_size/max_wait_ms (parameters of the notebook).
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from labkit.config import Preset, ServeBudget
from labkit.core.bundle import Bundle
from labkit.core.data import load_split
from labkit.engines.rows import identity_gate
from labkit.engines.variants import VARIANTS, Check, ancestors, build_translator, check_variants
from labkit.measure.gates import exactly_once_gate
from labkit.measure.ledger import make_record
from labkit.measure.plots import series_colors
from labkit.measure.progress import bar as progress_bar
from labkit.measure.replay import measurement
from labkit.serve.crosscheck import compare_rows
from labkit.serve.engine import invariance, row_stepper
from labkit.serve.loadtest import LoadPoint, LoadSpec, TextPool, closed_loop, crosscheck, open_loop, points_frame
from labkit.serve.process import ServerProcess

if TYPE_CHECKING:
    import pandas as pd

NOTEBOOK = "08_serving"
MODES = {  # mode -> (max_batch_size or None for the budget's, `labkit serve --batching`, translation cache entries)
    "serial": (1, "static", 0),
    "static": (None, "static", 0),
    "continuous": (None, "continuous", 0),
    "continuous+cache": (None, "continuous", 4096),
    "ct2": (None, "ct2", 0),
}
PEER_MODES = ("ct2",)  # what a CTranslate2 engine is served with: its own batching
FASTEST = "fastest"  # TARGET_ENGINE: read the aims on the engine that served the most sentences/s
LAME_DUCK_S = 0.5  # the notebook's servers get no traffic when stopped: a short lame duck is enough
READY_TIMEOUT_S = 600  # several servers load at once on 2 cores


# --------------------------------------------------------------------------- servers


def check_parameters(preset: Preset, engine: str, concurrency: int) -> None:
    """Stop at once, naming what this preset measures, when the notebook's target engine or concurrency is not
    part of its sweep (the targets would otherwise fail much later, with a KeyError in an assertion)."""
    budget = preset.serve
    if engine != FASTEST and engine not in budget.engines:
        raise ValueError(f"TARGET_ENGINE {engine!r} is not served on preset {preset.name!r}; it serves "
                         f"{', '.join(budget.engines)} (Preset.serve.engines in labkit.config), or say "
                         f"{FASTEST!r}: the one that served the most sentences/s")
    if concurrency not in budget.concurrency:
        raise ValueError(f"TARGET_CONCURRENCY {concurrency} is not measured on preset {preset.name!r}; it measures "
                         f"{', '.join(map(str, budget.concurrency))} clients (Preset.serve.concurrency)")


@measurement
def gate_engines(preset: Preset, bundle: Bundle, engines: tuple[str, ...] | None = None) -> dict[str, Check]:
    """Build and gate each engine (and its parents) once: {engine: Check}; only "ok" ones are served."""
    engines = engines or preset.serve.engines
    chain = [v for e in engines for v in ancestors(e)]
    checks = check_variants(preset, list(dict.fromkeys(chain)), bundle)
    return {e: checks[e] for e in engines}


def serve_threads(preset: Preset) -> int:
    """Intra-op threads of every server's model: the budget's, else one core less than the preset's, so the
    HTTP loop, tokenization and the load generator keep a core (measured on 2 cores, ci teacher, ort-int8
    continuous at 8 clients: 121 sentences/s with 1 model thread, 79 with 2). Every engine gets the same."""
    return preset.serve.threads or max(1, preset.threads - 1)


def modes_for(engine: str, modes: tuple[str, ...]) -> tuple[str, ...]:
    """The modes an engine is served in: CTranslate2 engines with their own batching, the others as asked."""
    if VARIANTS[engine].backend == "ctranslate2":
        return PEER_MODES
    return tuple(m for m in modes if m not in PEER_MODES)


def server_args(preset: Preset, engine: str, check: Check, mode: str) -> list[str]:
    """`labkit serve` arguments for one (engine, mode): the gated artifact, batching and cache."""
    batch, batching, cache = MODES[mode]
    budget = preset.serve
    args = ["--preset", preset.name, "--engine", engine, "--threads", str(serve_threads(preset)),
            "--max-batch-size", str(batch or budget.max_batch_size), "--max-wait-ms", str(budget.max_wait_ms),
            "--batching", batching, "--translation-cache", str(cache), "--max-queue", "4096",
            "--lame-duck-s", str(LAME_DUCK_S)]
    return args + (["--artifact", check.artifact] if check.artifact else [])


def _measure(server: ServerProcess, pool: TextPool, budget: ServeBudget, mode: str) -> list[LoadPoint]:
    spec = LoadSpec(duration_s=budget.duration_s, warmup_s=budget.warmup_s)
    points = closed_loop(server.url, pool, budget.concurrency, spec)
    if mode == "continuous" and budget.rates:  # open loop: what independent users see (one mode is enough)
        points += open_loop(server.url, pool, budget.rates, spec)
    return points


@measurement
def serving_sweep(preset: Preset, checks: dict[str, Check], modes: tuple[str, ...] | None = None,
                  progress: bool = True) -> pd.DataFrame:
    """Closed-loop points (and open-loop ones for `continuous`) per gated engine and mode; one row per point.

    Columns: engine, mode, points_frame's (mode is renamed loop), plus the LoadPoint itself.
    """
    import pandas as pd

    budget, modes = preset.serve, modes or preset.serve.modes
    runs = [(e, m) for e, c in checks.items() if c.status == "ok" for m in modes_for(e, modes)]
    pool = TextPool.from_split("test", limit=budget.pool_sentences, zipf=budget.zipf or None)
    frames = []
    with ExitStack() as stack:
        servers = {}
        for engine, mode in runs:  # launched together: their imports and model loads overlap
            servers[engine, mode] = ServerProcess.launch(server_args(preset, engine, checks[engine], mode),
                                                         threads=serve_threads(preset))
            stack.callback(servers[engine, mode].stop)  # stopped by PID, also when a point fails
        bar = progress_bar(len(servers) * len(budget.concurrency), "serving sweep", unit="point",
                           disable=not progress)
        bar.set_postfix_str(f"starting {len(servers)} servers")
        for server in servers.values():
            server.wait_ready(READY_TIMEOUT_S)
        for (engine, mode), server in servers.items():
            bar.set_postfix_str(f"{engine} {mode}")
            points = _measure(server, pool, budget, mode)
            frame = points_frame(points, engine=engine).rename(columns={"mode": "loop"})
            frames.append(frame.assign(mode=mode, point=points))
            server.stop()
            bar.update(len(budget.concurrency))
        bar.close()
    return pd.concat(frames, ignore_index=True)


@measurement
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
    mode = modes_for(engine, ("continuous",))[0]
    with ServerProcess.start(server_args(preset, engine, checks[engine], mode), READY_TIMEOUT_S,
                             threads=serve_threads(preset)) as server:
        return pd.DataFrame(compare_rows(*crosscheck(server.url, texts, users, preset.serve.locust_s)))


@measurement
def continuous_gates(preset: Preset, checks: dict[str, Check], bundle: Bundle, sentences: int = 48,
                     max_rows: int = 8, also: tuple[str, ...] = ("ort-int8",)) -> pd.DataFrame:
    """Each served engine with a row stepper: its tokens under continuous batching with staggered arrivals vs
    its own batch-1 decodes on `sentences` test sentences (`labkit.engines.rows.identity_gate`).

    Batch-invariant engines must be identical (`required`); `also` adds engines that are not served here
    but teach the contrast (ort-int8: per-tensor activation scales depend on the rows that share a step).
    """
    import pandas as pd

    extra = [e for e in also if e not in checks]
    checks = {**checks, **(gate_engines(preset, bundle, tuple(extra)) if extra else {})}
    rows_out = []
    texts = [p.zh for p in load_split("test", limit=sentences)]
    for engine, check in checks.items():
        if check.status != "ok" or VARIANTS[engine].backend == "ctranslate2":
            continue
        threads = serve_threads(preset)
        translator = build_translator(engine, preset, threads, bundle, check.artifact, spin=False)
        rows = [translator.token_ids(t)[0] for t in texts]
        gate = identity_gate(row_stepper(engine, bundle, check.artifact, threads), translator.stepper, rows,
                             translator.decode_cfg, max_rows=max_rows)
        rows_out.append({"engine": engine, "identical": f"{gate['identical']}/{gate['sentences']}",
                         "mean rows per step": round(gate["mean_rows"], 1), "required": invariance(engine)[0],
                         "passed": gate["passed"]})
    return pd.DataFrame(rows_out)


# --------------------------------------------------------------------------- tables


def closed(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["loop"] == "closed"].assign(concurrency=lambda d: d["load"].astype(int))


def qps_table(df: pd.DataFrame, slo_ms: float | None = None) -> pd.DataFrame:
    """The closed-loop table, one row per (engine, mode, clients), rounded: sentences/s, p50/p95 (ms), the
    useful-step fraction (decoder row-steps of rows still decoding), mean batch, /healthz p95, goodput.
    Answers lost or duplicated and Little's law are in `load_table`."""
    c = closed(df)
    out = pd_frame({
        "engine": c["engine"], "mode": c["mode"], "clients": c["concurrency"],
        "sentences/s": c["sentences_per_s"].round(1), "p50 ms": c["p50_ms"].round(0), "p95 ms": c["p95_ms"].round(0),
        "useful steps": c["useful_fraction"].round(2), "mean batch": c["mean_batch_size"].round(1),
        "healthz p95 ms": c["healthz_p95_ms"].round(1)})
    if slo_ms is not None:
        out[f"goodput@{slo_ms:g}ms"] = [round(p.goodput(slo_ms), 1) for p in c["point"]]
    return out


def load_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per closed-loop point: requests answered, errors, lost, duplicated, L measured (in flight) and λ·W."""
    c = closed(df)
    return pd_frame({
        "engine": c["engine"], "mode": c["mode"], "clients": c["concurrency"], "requests": c["requests"],
        "errors": c["errors"].map(lambda e: sum(e.values())), "lost": c["lost"], "duplicated": c["duplicated"],
        "in flight": [round(p.in_flight, 2) for p in c["point"]],
        "λ·W": [round(p.littles_law_clients, 2) for p in c["point"]]})


def pd_frame(columns: dict) -> pd.DataFrame:
    """A frame of fresh 0..n rows from columns (Series from a filtered frame, or lists)."""
    import pandas as pd

    return pd.DataFrame({k: list(v) for k, v in columns.items()})


def _at(df: pd.DataFrame, engine: str, mode: str, clients: int):
    c = closed(df)
    hit = c[(c["engine"] == engine) & (c["mode"] == mode) & (c["concurrency"] == clients)]
    return None if hit.empty else hit.iloc[0]


def _ratio(a, b, column: str = "sentences_per_s") -> float | None:
    if a is None or b is None or not b[column]:
        return None
    return round(float(a[column] / b[column]), 2)


def fastest_engine(df: pd.DataFrame, concurrency: int) -> str:
    """The engine (CTranslate2, the peer, aside) whose continuous batching served the most sentences/s at
    `concurrency` clients: the fastest gated recipe, since only engines that passed their gate are served."""
    c = closed(df)
    c = c[(c["mode"] == "continuous") & (c["concurrency"] == concurrency)]
    if c.empty:
        raise ValueError(f"no continuous-batching point at {concurrency} clients to pick the fastest engine from")
    return str(c.loc[c["sentences_per_s"].idxmax(), "engine"])


def fastest_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per client count: the engine that served the most sentences/s with continuous batching, and by how much
    it beat each other served engine (ratios of sentences/s measured in this run)."""
    c = closed(df)
    c = c[c["mode"] == "continuous"]
    rows = []
    for clients, g in c.groupby("concurrency"):
        best = g.loc[g["sentences_per_s"].idxmax()]
        rows.append({"clients": clients, "fastest": best["engine"], "sentences/s": round(float(best["sentences_per_s"]), 1)}
                    | {f"× {e}": round(float(best["sentences_per_s"] / r["sentences_per_s"]), 2)
                       for e, r in g.set_index("engine").iterrows() if e != best["engine"]})
    return pd_frame({k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)})


def serving_targets(df: pd.DataFrame, engine: str = "ort-int8-token", concurrency: int = 8,
                    peer: str = "ct2-int8") -> list[dict]:
    """The issue's aims, one row each: what was measured, whether it was met, and how to read it.

    Read at `concurrency` clients and at the sweep's highest concurrency, on `engine` (continuous vs
    serial and static) and against `peer` (CTranslate2's own batching). An aim whose points were not
    measured says so (measured None, met None) instead of failing.
    """
    top = int(closed(df)["concurrency"].max())
    cont, serial = _at(df, engine, "continuous", concurrency), _at(df, engine, "serial", concurrency)
    cont_top, static_top = _at(df, engine, "continuous", top), _at(df, engine, "static", top)
    rows = []

    def aim(text, measured, met, reading):
        rows.append({"aim": text, "measured": measured, "met": met, "reading": reading})

    speedup = _ratio(cont, serial)
    aim(f"{engine} continuous ≥ 4× serial sentences/s at {concurrency} clients", speedup,
        None if speedup is None else speedup >= 4,
        "how much one model call shared by many sentences saves over one call per sentence")
    p95 = None if cont is None or serial is None else (round(float(cont.p95_ms)), round(float(serial.p95_ms)))
    aim(f"{engine} continuous p95 ≤ serial p95 at {concurrency} clients", p95, None if p95 is None else p95[0] <= p95[1],
        "(continuous, serial) ms: batching must not buy throughput with the tail")
    vs_static = _ratio(cont_top, static_top)
    aim(f"{engine} continuous ≥ 1.5× static at {top} clients", vs_static,
        None if vs_static is None else vs_static >= 1.5,
        "what freeing finished rows at once and admitting newcomers mid-batch is worth")
    for clients in dict.fromkeys((concurrency, top)):
        vs_peer = _ratio(_at(df, engine, "continuous", clients), _at(df, peer, "ct2", clients))
        aim(f"{engine} continuous ≥ 1.3× {peer}'s own batching at {clients} clients", vs_peer,
            None if vs_peer is None else vs_peer >= 1.3,
            "labkit's Python decode loop against CTranslate2's C++ one, same model threads and service around both")
    health = None if cont_top is None else round(float(cont_top.healthz_p95_ms), 1)
    aim(f"/healthz p95 ≤ 50 ms at {top} clients ({engine} continuous)", health,
        None if health is None else health <= 50, "an orchestrator's liveness probe answered while the model is saturated")
    lost, dup = int(df["lost"].sum()), int(df["duplicated"].sum())
    aim("nothing lost or duplicated, every point of every run", (lost, dup), lost == 0 and dup == 0,
        "(lost, duplicated) requests: must be (0, 0) whatever the machine's load")
    return rows


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
            "useful_fraction": _num(p.useful_fraction), "healthz_p95_ms": _num(p.healthz_p95_ms, 2),
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
        for mode in modes_for(engine, preset.serve.modes):
            common = dict(notebook=NOTEBOOK, variant=f"serve-{engine}-{mode}", technique="serving",
                          backend=spec.backend, precision=spec.precision,
                          model=preset.model.name_or_path or preset.model.kind,
                          parent=None if mode in ("serial", *PEER_MODES) else f"serve-{engine}-serial")
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
                serving={"max_batch_size": MODES[mode][0] or preset.serve.max_batch_size, "batching": MODES[mode][1],
                         "max_wait_ms": preset.serve.max_wait_ms, "translation_cache": MODES[mode][2],
                         "threads": serve_threads(preset), "duration_s": preset.serve.duration_s,
                         "warmup_s": preset.serve.warmup_s, "zipf": preset.serve.zipf},
                points=[_point_summary(p, slo_ms) for p in points]))
    return records


# --------------------------------------------------------------------------- plots


def series_of(df: pd.DataFrame) -> list[str]:
    """'engine mode' names of the sweep's runs, in run order (one colour each, the same in every panel)."""
    return list(dict.fromkeys(f"{e} {m}" for e, m in zip(df["engine"], df["mode"])))


def plot_serving(df: pd.DataFrame, slo_ms: float) -> Any:
    """2x2: sentences/s, p95, goodput vs clients, and the latency-throughput curve; a line per (engine, mode),
    coloured from the shared palette (the same colour in every panel and the legend)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    c = closed(df)
    colors = series_colors(series_of(c))
    fig = make_subplots(rows=2, cols=2, horizontal_spacing=0.1, vertical_spacing=0.14, subplot_titles=(
        "sentences/s vs clients", "p95 latency vs clients", "latency vs throughput (one marker per client count)",
        f"goodput: requests/s within {slo_ms:g} ms"))
    dash = {"serial": "dot", "static": "dash", "continuous": "solid", "continuous+cache": "dashdot", "ct2": "longdash"}
    for (engine, mode), g in c.groupby(["engine", "mode"], sort=False):
        name = f"{engine} {mode}"
        kw = dict(name=name, legendgroup=name, line=dict(color=colors[name], dash=dash.get(mode, "solid")),
                  marker=dict(color=colors[name]))
        good = [p.goodput(slo_ms) for p in g["point"]]
        fig.add_trace(go.Scatter(x=g.concurrency, y=g.sentences_per_s, mode="lines+markers", **kw), row=1, col=1)
        fig.add_trace(go.Scatter(x=g.concurrency, y=g.p95_ms, mode="lines+markers", showlegend=False, **kw),
                      row=1, col=2)
        fig.add_trace(go.Scatter(x=g.sentences_per_s, y=g.p50_ms, mode="lines+markers", showlegend=False,
                                 customdata=g.concurrency, hovertemplate="%{customdata} clients<br>%{x:.1f} sent/s, "
                                 "p50 %{y:.0f} ms", **kw), row=2, col=1)
        fig.add_trace(go.Scatter(x=g.concurrency, y=good, mode="lines+markers", showlegend=False, **kw), row=2, col=2)
    for row, col, x, y in ((1, 1, "clients", "sentences/s"), (1, 2, "clients", "ms"), (2, 1, "sentences/s", "p50 ms"),
                           (2, 2, "clients", "requests/s")):
        fig.update_xaxes(title_text=x, row=row, col=col)
        fig.update_yaxes(title_text=y, rangemode="tozero", row=row, col=col)
    fig.update_layout(height=760, title="Serving under closed-loop load (one text per request)",
                      legend=dict(orientation="h", y=-0.12))
    return fig


def plot_batch_sizes(df: pd.DataFrame, max_batch_size: int | None = None) -> Any:
    """Model calls per batch-size bucket (from /metrics) at each batched run's highest client count, buckets up to
    the largest batch the servers may form."""
    import plotly.graph_objects as go

    c = closed(df)
    batched = c[c["mode"] != "serial"]
    colors = series_colors(series_of(batched))
    fig = go.Figure()
    for (engine, mode), g in batched.groupby(["engine", "mode"], sort=False):
        top = g.loc[g["concurrency"].idxmax()]
        buckets = {le: n for le, n in top["batch_sizes"].items()
                   if le != "+Inf" and (max_batch_size is None or float(le) <= max_batch_size)}
        fig.add_trace(go.Bar(x=[f"≤{float(le):g}" for le in buckets], y=list(buckets.values()),
                             name=f"{engine} {mode}, {top.concurrency} clients", marker_color=colors[f"{engine} {mode}"]))
    fig.update_layout(title="Rows per model call (labkit_batch_size; continuous: per decoder step)",
                      xaxis_title="rows", yaxis_title="model calls", barmode="group")
    return fig
