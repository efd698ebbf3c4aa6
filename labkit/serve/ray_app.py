"""Scale-out: the same app, translator and batching settings as a Ray Serve deployment.

    labkit serve --preset ci --engine ort-int8 --backend ray --replicas 2     # a local Ray cluster
    ray start --head --port 6379 --num-cpus 2                                 # or: a cluster of machines,
    ray start --address HEAD_IP:6379 --num-cpus 2                             #     one line per worker
    labkit serve --preset ci --backend ray --ray-address HEAD_IP:6379 --replicas 4

Each replica is one Ray worker process holding one translator. Ray Serve's `@serve.batch`
collects sentences from concurrent requests up to the same `max_batch_size` / `max_wait_ms`
the local micro-batcher uses; the replica runs its HTTP routes with labkit.serve.app (the same
limits, caches, page and /metrics, per replica); autoscaling adds replicas, up to `--replicas`,
when the ongoing requests per replica pass the batch size. Ray's proxy listens on `--host`/
`--port`. `max_ongoing_requests` is kept >= max_batch_size, or Ray caps batches at its default
of 5. Ray is the optional extra `[ray]`, imported only when this backend runs.

Left out: a scheduler of our own (Ray's is used as is), GPUs, and model sharing between
replicas (each loads its own copy; the artifacts must exist on, or be buildable by, every node).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import threading
import time

from labkit.core.artifacts import REPO_ROOT
from labkit.measure.timing import usable_cores
from labkit.serve.app import create_app
from labkit.serve.batcher import Done
from labkit.serve.engine import load_translator, warm_texts
from labkit.serve.service import ServeConfig, TranslationService

APP_NAME = "labkit"


def require_ray():
    """(ray, ray.serve), or an ImportError that says how to get them."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ImportError("the Ray Serve backend is the optional extra [ray]: "
                          "pip install 'labkit[ray]' (or pip install 'ray[serve]')") from exc
    return ray, serve


class RayRunner:
    """The service's runner inside a replica: each sentence goes through the @serve.batch method."""

    queue_depth = 0  # Ray's router holds the queue; a replica does not see it

    def __init__(self, batched):
        self.batched = batched

    async def start(self) -> None:
        pass

    def submit(self, rows: list[list[int]], beams: int = 1) -> list:
        return [self.batched((tuple(r), beams)) for r in rows]

    async def close(self) -> None:
        pass


def translate_batch(translator, items: list[tuple[tuple[int, ...], int]]) -> tuple[list[Done], float]:
    """Generate + detokenize one Ray batch, grouped by beams; (results in order, model seconds)."""
    out: list[Done | None] = [None] * len(items)
    start = time.perf_counter()
    for beams in sorted({b for _, b in items}):
        idx = [i for i, (_, b) in enumerate(items) if b == beams]
        t0 = time.perf_counter()
        generated = translator.generate([list(items[i][0]) for i in idx], beams)
        model_ms = (time.perf_counter() - t0) * 1e3
        texts, notes = translator.detokenize(generated)
        for i, ids, text, note in zip(idx, generated, texts, notes):
            out[i] = Done(text, ids, note, len(items), 0.0, model_ms)
    return out, time.perf_counter() - start


def deployment(args: argparse.Namespace, config: ServeConfig, cpus_per_replica: float):
    """The Ray Serve application: a deployment class built here so `ray` is imported only now."""
    _, serve = require_ray()
    batch = config.batch

    @serve.deployment(
        name="translator",
        max_ongoing_requests=max(2 * batch.max_batch_size, 8),  # >= max_batch_size, or batches stop at 5
        max_queued_requests=batch.max_queue,  # Ray answers 503 beyond it, as the local queue does
        autoscaling_config={"min_replicas": 1, "max_replicas": max(1, args.replicas),
                            "target_ongoing_requests": batch.max_batch_size},
        ray_actor_options={"num_cpus": cpus_per_replica},
    )
    @serve.ingress()
    class TranslatorReplica:
        def __init__(self):
            self.translator, self.model_id = load_translator(args)
            self.metrics = None

        @serve.batch(max_batch_size=batch.max_batch_size, batch_wait_timeout_s=batch.max_wait_ms / 1e3)
        async def generate(self, items: list) -> list:
            results, seconds = await asyncio.to_thread(translate_batch, self.translator, items)
            if self.metrics is not None:
                self.metrics.observe_batch(len(items), seconds)
            return results

        def _service(self, metrics) -> TranslationService:
            self.metrics = metrics
            service = TranslationService(self.translator, f"{self.model_id}@ray", config, metrics,
                                         runner=RayRunner(self.generate))
            service.warm(warm_texts(), batch.max_batch_size)
            return service

        def __serve_build_asgi_app__(self):
            return create_app(self._service)

    return TranslatorReplica.bind()


def run_ray(args: argparse.Namespace, config: ServeConfig) -> int:
    """`labkit serve --backend ray`: start (or join) Ray, deploy, serve until SIGTERM/SIGINT, shut down."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray, serve = require_ray()
    threads = str(args.threads or 2)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": threads, "RAY_USAGE_STATS_ENABLED": "0"}
    if args.ray_address:
        ray.init(address=args.ray_address, runtime_env={"env_vars": env})
    else:  # a one-machine cluster on loopback, no dashboard (saves a process and a port)
        ray.init(num_cpus=usable_cores(), include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": env})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(deployment(args, config, args.replica_cpus), name=APP_NAME, route_prefix="/")
        print(f"labkit serve (ray): http://{args.host}:{args.port}", flush=True)
        stop.wait()
    finally:
        serve.shutdown()  # replicas finish the requests they hold first
        ray.shutdown()
    return 0
