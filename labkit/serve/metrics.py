"""The service's Prometheus metrics (prometheus-client), one registry per service.

    metrics = Metrics()
    metrics.requests.labels(status="200").inc()
    metrics.render()          # -> bytes in the Prometheus text format, what GET /metrics returns
    parse(text)["labkit_batch_size_sum"]   # -> {(): 42.0}: how the load test reads it back

Names: labkit_requests_total{status}, labkit_request_seconds (histogram), labkit_batch_size
(histogram of sentences per model call), labkit_model_seconds, labkit_queue_depth (sentences
waiting), labkit_inflight_requests, labkit_decode_row_steps_total{kind=useful|padding}, labkit_sentences_total, labkit_cache_lookups_total{cache,
result}, labkit_cache_hit_ratio{cache}. A registry of its own (not the global one) lets tests
and notebooks build several services in one process.
Left out: per-engine labels (one service serves one model) and process metrics.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("labkit_requests", "HTTP requests to /v1/translate by status", ["status"], registry=r)
        self.request_seconds = Histogram("labkit_request_seconds", "/v1/translate latency",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("labkit_batch_size", "sentences per model call", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.model_seconds = Histogram("labkit_model_seconds", "model call duration", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.row_steps = Counter("labkit_decode_row_steps", "decoder row-steps computed, by whether the row was "
                                 "still decoding (useful) or padding a finished row", ["kind"], registry=r)
        self.sentences = Counter("labkit_sentences", "sentences translated (cache hits included)", registry=r)
        self.cache_lookups = Counter("labkit_cache_lookups", "cache lookups", ["cache", "result"], registry=r)
        self.queue_depth = Gauge("labkit_queue_depth", "sentences waiting for the model", registry=r)
        self.inflight = Gauge("labkit_inflight_requests", "requests being served", registry=r)
        self.hit_ratio = Gauge("labkit_cache_hit_ratio", "hits / lookups since start", ["cache"], registry=r)

    def watch(self, queue_depth: Callable[[], float], hit_rates: dict[str, Callable[[], float]]) -> None:
        """Gauges read at scrape time from the batcher and the caches."""
        self.queue_depth.set_function(queue_depth)
        for name, fn in hit_rates.items():
            self.hit_ratio.labels(cache=name).set_function(fn)

    def observe_batch(self, sentences: int, model_s: float) -> None:
        self.batch_size.observe(sentences)
        self.model_seconds.observe(model_s)

    def observe_work(self, useful: int, computed: int) -> None:
        """Row-steps of one model call: useful / computed is the useful-step fraction."""
        self.row_steps.labels(kind="useful").inc(useful)
        self.row_steps.labels(kind="padding").inc(computed - useful)

    def count_cache(self, cache: str, hits: int, misses: int) -> None:
        if hits:
            self.cache_lookups.labels(cache=cache, result="hit").inc(hits)
        if misses:
            self.cache_lookups.labels(cache=cache, result="miss").inc(misses)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse(text: str) -> dict[str, dict[tuple, float]]:
    """Prometheus text -> {sample name: {sorted label items: value}} (prometheus-client's parser).

    'labkit_requests_total{status="200"} 3.0' -> {"labkit_requests_total": {(("status", "200"),): 3.0}}
    """
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out
