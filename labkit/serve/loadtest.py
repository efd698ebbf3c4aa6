"""`labkit loadtest`: closed-loop and open-loop load against a local translation service.

    pool = TextPool.from_split("test", limit=200)
    points = closed_loop("http://127.0.0.1:8000", pool, [1, 2, 8], LoadSpec(duration_s=5, warmup_s=1))
    points[0].rps, points[0].sentences_per_s, points[0].p95_ms, points[0].mean_batch_size
    open_loop(url, pool, [2.0, 5.0], spec)       # Poisson arrivals at 2 and 5 requests/s

Closed loop: `concurrency` clients, each sending its next request when the last one is answered
(a fixed population: what a benchmark of N users is). Open loop: requests arrive at random
(exponential gaps) at a given rate, whether or not earlier ones were answered (what independent
users do; it shows queueing that a closed loop hides). Per point, over a window that starts after
`warmup_s`: requests and sentences per second (answers completed inside the window), p50/p95/p99
latency of those answers, errors by status, the mean batch size and cache hit rate the server
reports on /metrics over the same window, and /healthz latency probed throughout. Every request
carries an id that the answer must echo: `lost` counts requests never answered (transport errors,
timeouts), `duplicated` answers whose id was already seen or was not the request's. Load is
bounded in time (`warmup_s + duration_s`, then the stragglers' `timeout_s`) and in count
(`max_requests`), and goes to loopback addresses only.

Left out: ramps, multiple client machines, and HTTP/2.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import httpx

from labkit.core.data import load_split
from labkit.measure.timing import percentile
from labkit.serve.crosscheck import LocustResult, compare_rows, run_locust
from labkit.serve.metrics import parse as parse_metrics
from labkit.serve.process import require_loopback

if TYPE_CHECKING:
    import pandas as pd

HEALTH_PROBE_S = 0.1  # /healthz every 100 ms while load runs


@dataclass(frozen=True)
class LoadSpec:
    duration_s: float = 5.0  # the measured window per point
    warmup_s: float = 1.0  # load before the window; its answers are not counted
    texts_per_request: int = 1
    timeout_s: float = 60.0  # client-side limit per request; a timeout counts as lost
    max_requests: int = 20_000  # hard cap per point, whatever the duration
    max_outstanding: int = 256  # open loop: arrivals beyond this many unanswered are dropped (counted)
    seed: int = 0


@dataclass
class TextPool:
    """Texts to send: uniform over the pool, or Zipf-weighted (`zipf` = s) to model repeated queries."""

    texts: list[str]
    zipf: float | None = None
    seed: int = 0

    def __post_init__(self):
        if not self.texts:
            raise ValueError("an empty text pool")
        self._rng = random.Random(self.seed)
        self._cycle = itertools.cycle(self.texts)
        self._weights = None if self.zipf is None else [1 / (i + 1) ** self.zipf for i in range(len(self.texts))]

    @classmethod
    def from_split(cls, split: str = "test", limit: int | None = None, zipf: float | None = None,
                   seed: int = 0) -> TextPool:
        return cls([p.zh for p in load_split(split, limit=limit)], zipf, seed)

    def take(self, n: int) -> list[str]:
        if self._weights is None:
            return [next(self._cycle) for _ in range(n)]
        return self._rng.choices(self.texts, self._weights, k=n)


@dataclass(frozen=True)
class Sample:
    start: float
    end: float
    status: int | str  # HTTP status, or the transport error's name
    sentences: int
    echoed: bool  # the answer carried this request's id and one translation per text
    request_id: str
    answers: tuple[tuple[str, str], ...] = ()  # (source, translation) pairs of an ok answer


@dataclass
class LoadPoint:
    mode: str  # closed | open
    load: float  # clients (closed) or requests/s offered (open)
    duration_s: float
    sent: int
    answered: int
    lost: int  # sent, never answered (transport error, client timeout)
    duplicated: int  # answers with an id already seen or not their request's
    dropped: int  # open loop: arrivals not sent because max_outstanding were unanswered
    requests: int  # ok answers completed inside the window
    sentences: int
    errors: dict = field(default_factory=dict)  # status -> count, inside the window (503, 504, ...)
    rps: float = 0.0
    sentences_per_s: float = 0.0
    p50_ms: float = float("nan")
    p95_ms: float = float("nan")
    p99_ms: float = float("nan")
    mean_ms: float = float("nan")
    mean_batch_size: float = float("nan")  # from /metrics over the window
    batch_sizes: dict = field(default_factory=dict)  # histogram bucket (le) -> model calls, over the window
    cache_hit_rate: float = float("nan")  # translation cache, from /metrics over the window
    useful_fraction: float = float("nan")  # decoder row-steps of rows still decoding / all computed (/metrics)
    healthz_p50_ms: float = float("nan")
    healthz_p95_ms: float = float("nan")
    healthz_max_ms: float = float("nan")
    answers: dict = field(default_factory=dict, repr=False)  # source -> first translation seen
    latencies_ms: list = field(default_factory=list, repr=False)  # of the ok answers inside the window

    in_flight: float = float("nan")  # time-average of requests outstanding during the window (measured L)

    @property
    def littles_law_clients(self) -> float:
        """λ·W: the requests in the system Little's law implies from throughput and mean latency
        (close to `in_flight` when the window is long against the latencies)."""
        return self.rps * self.mean_ms / 1e3

    def goodput(self, slo_ms: float) -> float:
        """Requests/s answered within `slo_ms` (ok answers inside the window only)."""
        return sum(1 for x in self.latencies_ms if x <= slo_ms) / self.duration_s


# --------------------------------------------------------------------------- primitives


def useful_window(before: dict, after: dict) -> float:
    """Useful-step fraction between two /metrics scrapes (NaN when no greedy decoding happened)."""
    def delta(kind):
        key = (("kind", kind),)
        return (after.get("labkit_decode_row_steps_total", {}).get(key, 0.0)
                - before.get("labkit_decode_row_steps_total", {}).get(key, 0.0))

    useful, padding = delta("useful"), delta("padding")
    return useful / (useful + padding) if useful + padding else float("nan")


def batch_window(before: dict, after: dict) -> tuple[float, dict, float]:
    """(mean batch size, {le: model calls}, translation-cache hit rate) between two /metrics scrapes."""
    def delta(name, labels=()):
        return after.get(name, {}).get(labels, 0.0) - before.get(name, {}).get(labels, 0.0)

    calls, total = delta("labkit_batch_size_count"), delta("labkit_batch_size_sum")
    buckets, previous = {}, 0.0
    for labels in sorted(after.get("labkit_batch_size_bucket", {}), key=lambda k: float(dict(k)["le"])):
        cumulative = delta("labkit_batch_size_bucket", labels)
        buckets[dict(labels)["le"]] = cumulative - previous
        previous = cumulative
    hits = delta("labkit_cache_lookups_total", (("cache", "translation"), ("result", "hit")))
    misses = delta("labkit_cache_lookups_total", (("cache", "translation"), ("result", "miss")))
    mean = total / calls if calls else float("nan")
    return mean, buckets, hits / (hits + misses) if hits + misses else float("nan")


def summarize(mode: str, load: float, samples: list[Sample], window: tuple[float, float],
              metrics_before: dict, metrics_after: dict, health_ms: list[float], dropped: int = 0) -> LoadPoint:
    """Samples of one point -> its LoadPoint (see the module docstring for what counts where)."""
    start, end = window
    duration = end - start
    inside = [s for s in samples if start <= s.end <= end]
    ok = [s for s in inside if s.status == 200 and s.echoed]
    lat = [(s.end - s.start) * 1e3 for s in ok]
    errors: dict = {}
    for s in inside:
        if s.status != 200:
            errors[str(s.status)] = errors.get(str(s.status), 0) + 1
    ids = [s.request_id for s in samples if isinstance(s.status, int)]
    mean_batch, buckets, hit_rate = batch_window(metrics_before, metrics_after)
    answers: dict = {}
    for s in samples:
        for src, out in s.answers:
            answers.setdefault(src, out)
    point = LoadPoint(
        mode, load, duration, sent=len(samples), answered=len(ids),
        lost=sum(1 for s in samples if not isinstance(s.status, int)),
        duplicated=(len(ids) - len(set(ids))) + sum(1 for s in samples if s.status == 200 and not s.echoed),
        dropped=dropped, requests=len(ok), sentences=sum(s.sentences for s in ok), errors=errors,
        rps=len(ok) / duration, sentences_per_s=sum(s.sentences for s in ok) / duration,
        mean_batch_size=mean_batch, batch_sizes=buckets, cache_hit_rate=hit_rate, answers=answers,
        useful_fraction=useful_window(metrics_before, metrics_after),
        latencies_ms=lat)
    # L measured directly: the time each request spent outstanding inside the window, per second
    point.in_flight = sum(max(0.0, min(s.end, end) - max(s.start, start)) for s in samples) / duration
    if lat:
        point.p50_ms, point.p95_ms, point.p99_ms = (percentile(lat, q) for q in (0.5, 0.95, 0.99))
        point.mean_ms = sum(lat) / len(lat)
    if health_ms:
        point.healthz_p50_ms, point.healthz_p95_ms = percentile(health_ms, 0.5), percentile(health_ms, 0.95)
        point.healthz_max_ms = max(health_ms)
    return point


# --------------------------------------------------------------------------- one request, probes


async def send(client: httpx.AsyncClient, texts: list[str], request_id: str) -> Sample:
    start = time.perf_counter()
    try:
        r = await client.post("/v1/translate", json={"texts": texts, "beams": 1, "id": request_id})
    except httpx.HTTPError as exc:
        return Sample(start, time.perf_counter(), type(exc).__name__, len(texts), False, request_id)
    end = time.perf_counter()
    if r.status_code != 200:
        return Sample(start, end, r.status_code, len(texts), False, request_id)
    try:
        body = r.json()
    except ValueError:
        return Sample(start, end, "invalid-json", len(texts), False, request_id)
    echoed = body.get("id") == request_id and len(body.get("translations", ())) == len(texts)
    return Sample(start, end, 200, len(texts), echoed, request_id,
                  tuple(zip(texts, body.get("translations", ()))) if echoed else ())


async def scrape(client: httpx.AsyncClient) -> dict:
    r = await client.get("/metrics")
    r.raise_for_status()
    return parse_metrics(r.text)


async def probe_health(client: httpx.AsyncClient, until: float, out: list[float]) -> None:
    """GET /healthz every HEALTH_PROBE_S until `until`; milliseconds per answer into `out`."""
    while time.perf_counter() < until:
        start = time.perf_counter()
        try:
            (await client.get("/healthz")).raise_for_status()
            out.append((time.perf_counter() - start) * 1e3)
        except httpx.HTTPError:
            out.append(float("inf"))  # not answering is the worst latency there is
        await asyncio.sleep(HEALTH_PROBE_S)


async def _window_metrics(client: httpx.AsyncClient, window: tuple[float, float]) -> tuple[dict, dict]:
    """/metrics scraped at the window's start and end."""
    await asyncio.sleep(max(0.0, window[0] - time.perf_counter()))
    before = await scrape(client)
    await asyncio.sleep(max(0.0, window[1] - time.perf_counter()))
    return before, await scrape(client)


# --------------------------------------------------------------------------- the two loops


CLIENT_KEEPALIVE_S = 1.0  # idle connections are dropped well before the server's keep-alive ends


def _client(url: str, connections: int, spec: LoadSpec) -> httpx.AsyncClient:
    # The client gives up an idle connection long before the server does (labkit serve: 20 s,
    # uvicorn's default 5 s, httpx's default expiry also 5 s): reusing one the server is closing at
    # that instant fails as "server disconnected", which would count as a lost request.
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections,
                          keepalive_expiry=CLIENT_KEEPALIVE_S)
    return httpx.AsyncClient(base_url=url, timeout=spec.timeout_s, limits=limits)


async def _point(url: str, spec: LoadSpec, connections: int,
                 drive: Callable[[httpx.AsyncClient, float, list[Sample]], Awaitable[int]],
                 mode: str, load: float) -> LoadPoint:
    """Run `drive` (which sends until a deadline and returns arrivals dropped) with probes around it."""
    samples: list[Sample] = []
    health: list[float] = []
    async with _client(url, connections, spec) as client, _client(url, 4, spec) as side:
        t0 = time.perf_counter()
        window = (t0 + spec.warmup_s, t0 + spec.warmup_s + spec.duration_s)
        watch = asyncio.create_task(_window_metrics(side, window))
        health_task = asyncio.create_task(probe_health(side, window[1], health))
        dropped = await drive(client, window[1], samples)
        before, after = await watch
        await health_task
    return summarize(mode, load, samples, window, before, after, health, dropped)


async def closed_point(url: str, pool: TextPool, concurrency: int, spec: LoadSpec) -> LoadPoint:
    counter = itertools.count()

    async def user(client, stop_at, samples):
        while time.perf_counter() < stop_at:
            n = next(counter)
            if n >= spec.max_requests:
                return
            samples.append(await send(client, pool.take(spec.texts_per_request), f"c{concurrency}-{n}"))

    async def drive(client, stop_at, samples) -> int:
        await asyncio.gather(*(user(client, stop_at, samples) for _ in range(concurrency)))
        return 0

    return await _point(url, spec, concurrency, drive, "closed", concurrency)


async def open_point(url: str, pool: TextPool, rate: float, spec: LoadSpec) -> LoadPoint:
    rng = random.Random(spec.seed)

    async def drive(client, stop_at, samples) -> int:
        tasks: set[asyncio.Task] = set()
        dropped, n = 0, 0
        next_at = time.perf_counter()
        while n < spec.max_requests:
            next_at += rng.expovariate(rate)
            if next_at >= stop_at:
                break
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            if len(tasks) >= spec.max_outstanding:
                dropped += 1
                continue
            task = asyncio.create_task(send(client, pool.take(spec.texts_per_request), f"o{rate:g}-{n}"))
            task.add_done_callback(lambda t: (tasks.discard(t), samples.append(t.result())))
            tasks.add(task)
            n += 1
        if tasks:
            await asyncio.gather(*tasks)
        return dropped

    return await _point(url, spec, spec.max_outstanding, drive, "open", rate)


def _run(coro) -> LoadPoint:
    """asyncio.run in a thread of its own: works in a script and inside Jupyter's running loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def closed_loop(url: str, pool: TextPool, concurrencies, spec: LoadSpec = LoadSpec()) -> list[LoadPoint]:
    url = require_loopback(url)
    return [_run(closed_point(url, pool, int(c), spec)) for c in concurrencies]


def open_loop(url: str, pool: TextPool, rates, spec: LoadSpec = LoadSpec()) -> list[LoadPoint]:
    url = require_loopback(url)
    return [_run(open_point(url, pool, float(r), spec)) for r in rates]


def crosscheck(url: str, texts: list[str], users: int, duration_s: float) -> tuple[LoadPoint, LocustResult]:
    """This closed loop, then locust's (labkit.serve.crosscheck), at the same concurrency and length."""
    spec = LoadSpec(duration_s=duration_s, warmup_s=min(2.0, duration_s / 4))
    (ours,) = closed_loop(url, TextPool(texts), [users], spec)
    return ours, run_locust(url, texts, users, duration_s)


COLUMNS = ("mode", "load", "requests", "rps", "sentences_per_s", "p50_ms", "p95_ms", "p99_ms", "mean_ms",
           "mean_batch_size", "cache_hit_rate", "errors", "sent", "answered", "lost", "duplicated", "dropped",
           "useful_fraction", "healthz_p50_ms", "healthz_p95_ms", "healthz_max_ms", "in_flight")


def points_frame(points: list[LoadPoint], **labels) -> pd.DataFrame:
    """One row per point (COLUMNS, plus `labels` as constant columns, e.g. engine='ort-int8')."""
    import pandas as pd

    rows = [{**labels, **{k: asdict(p)[k] for k in COLUMNS}, "batch_sizes": p.batch_sizes} for p in points]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- command line


def _numbers(text: str | None, kind=float) -> list:
    return [kind(x) for x in text.split(",") if x.strip()] if text else []


def add_loadtest_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000 (loopback only)")
    parser.add_argument("--concurrency", default="1,2,5,8", help="closed loop: comma-separated client counts")
    parser.add_argument("--rates", default=None, help="open loop: comma-separated arrivals per second")
    parser.add_argument("--duration", type=float, default=LoadSpec.duration_s, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=LoadSpec.warmup_s, help="seconds of load before that")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--pool", type=int, default=200, help="test-split sentences to draw from")
    parser.add_argument("--zipf", type=float, default=None, help="draw with Zipf weights of this exponent (repeats)")
    parser.add_argument("--json", default=None, help="also write the points as JSON lines here")
    parser.add_argument("--locust", action="store_true",
                        help="cross-check: after each closed-loop point, locust headless at the same concurrency")


def _print_crosscheck(url: str, texts: list[str], concurrency: list[int], duration_s: float) -> int:
    """`--locust`: both tools per concurrency, side by side; the errors both saw."""
    import pandas as pd

    rows, errors = [], 0
    for users in concurrency:
        ours, theirs = crosscheck(url, texts, users, duration_s)
        rows += compare_rows(ours, theirs)
        errors += ours.lost + ours.duplicated + theirs.failures
    print(pd.DataFrame(rows).to_string(index=False, na_rep="", float_format=lambda x: f"{x:.2f}"))
    return errors


def loadtest_command(args: argparse.Namespace) -> int:
    """Handler of `labkit loadtest`: prints a table; 1 when a request was lost or duplicated, 2 on bad input."""
    try:
        url = require_loopback(args.url)
        concurrency, rates = _numbers(args.concurrency, int), _numbers(args.rates)
    except ValueError as exc:
        print(f"labkit loadtest: {exc}", file=sys.stderr)
        return 2
    spec = LoadSpec(duration_s=args.duration, warmup_s=args.warmup, texts_per_request=args.texts_per_request)
    pool = TextPool.from_split("test", limit=args.pool, zipf=args.zipf)
    if args.locust:
        broken = _print_crosscheck(url, pool.texts, concurrency, args.duration)
        return 1 if broken else 0
    points = closed_loop(url, pool, concurrency, spec) + open_loop(url, pool, rates, spec)
    print(points_frame(points).drop(columns=["batch_sizes"]).to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    if args.json:
        with open(args.json, "w") as out:
            for p in points:
                out.write(json.dumps({k: v for k, v in asdict(p).items() if k not in ("answers", "latencies_ms")}) + "\n")
    broken = sum(p.lost + p.duplicated for p in points)
    if broken:
        print(f"labkit loadtest: {broken} request(s) lost or duplicated", file=sys.stderr)
    return 1 if broken else 0
