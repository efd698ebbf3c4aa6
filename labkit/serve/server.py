"""`labkit serve`: one process, one gated translator, a batcher, uvicorn on a local port.

    labkit serve --preset ci --engine ort-int8 --host 127.0.0.1 --port 8000
    labkit serve --preset ci --max-batch-size 1          # serial serving, for comparison
    labkit serve --preset ci --backend ray               # the same app as a Ray Serve deployment

`--engine` is any variant of the registry (labkit.engines.variants; `auto`, the default, is the
fastest whose gate passes and whose answers do not depend on the batch: labkit.serve.engine).
`--batching`: continuous (labkit.serve.continuous_batcher; the default where the engine has a row stepper),
static (labkit.serve.batcher), or ct2 (CTranslate2's own, labkit.serve.ct2_runner). The model loads
and warms in a thread while the server already answers /healthz. SIGTERM starts a lame-duck period
(`lame_duck_server`), then drains requests in flight and exits 0.

Left out: process managers and multiple workers per port (scale out with `--backend ray`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable

from labkit.config import PRESETS
from labkit.engines.variants import VARIANTS
from labkit.serve import ray_app
from labkit.serve.app import create_app
from labkit.serve.batcher import BatchConfig
from labkit.serve.continuous_batcher import ContinuousBatcher
from labkit.serve.ct2_runner import TOKENS_PER_BATCH, Ct2Runner
from labkit.serve.engine import ENGINES, Served, load_served, row_stepper, warm_texts
from labkit.serve.metrics import Metrics
from labkit.serve.service import Limits, ServeConfig, TranslationService

log = logging.getLogger("labkit.serve")
# Idle keep-alive connections live this long: longer than clients keep theirs (httpx: 5 s), so a
# client never sends on a connection the server is closing at that moment (uvicorn's default: 5 s).
KEEP_ALIVE_S = 20
LAME_DUCK_S = 2.0  # default lame-duck period on SIGTERM: longer than a client's gap between two requests
ACCEPTED_GRACE_S = 0.5  # after the listener closes: time for requests on just-accepted connections to arrive


BATCHING = ("auto", "continuous", "static", "ct2")  # auto: continuous where the engine has a row stepper,
# CTranslate2's own batching for its engines, else static


def make_runner(served: Served, config: ServeConfig, metrics: Metrics, batching: str):
    """(runner or None for the service's static micro-batcher, the batching mode in words)."""
    is_ct2 = VARIANTS[served.engine].backend == "ctranslate2"
    if batching == "ct2" and not is_ct2:
        raise ValueError(f"--batching ct2 is CTranslate2's own batching; {served.engine} is not a CTranslate2 engine")
    if config.batch.max_batch_size == 1:
        return None, "serial (max batch size 1)"
    if is_ct2 and batching in ("auto", "ct2"):
        engine = served.translator.engine
        return Ct2Runner(served.translator, config.batch, on_batch=metrics.observe_batch), (
            f"ct2 (CTranslate2's own: translate_batch asynchronous, batch_type tokens, {TOKENS_PER_BATCH} tokens, "
            f"inter_threads {engine.num_translators}, intra_threads {served.translator.threads})")
    if batching == "static":
        return None, "static"
    try:
        stepper = row_stepper(served.engine, served.bundle, served.artifact, served.threads)
    except ValueError as exc:
        if batching == "continuous":
            raise
        return None, f"static ({exc})"
    runner = ContinuousBatcher(served.translator, stepper, config.batch, metrics.observe_batch, metrics.observe_work)
    return runner, "continuous"


def make_loader(args: argparse.Namespace, config: ServeConfig) -> Callable[[Metrics], TranslationService]:
    """What the app calls in a worker thread at start-up: build, gate, pick the batching, warm."""

    def load(metrics: Metrics) -> TranslationService:
        served = load_served(args)
        runner, batching = make_runner(served, config, metrics, getattr(args, "batching", "auto"))
        service = TranslationService(served.translator, served.model_id, config, metrics, runner=runner)
        service.info = {**served.describe(), "batching": batching, "max_batch_size": config.batch.max_batch_size}
        if not served.invariance[0] and config.batch.max_batch_size > 1:
            log.warning("%s is not batch-invariant: %s", served.engine, served.invariance[1])
        log.info("serving %s (%s), %s batching", served.engine, served.why, batching)
        service.warm(warm_texts(), config.batch.max_batch_size)
        return service

    return load


# --------------------------------------------------------------------------- command line


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    batch = BatchConfig(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue)
    limits = Limits(max_texts=args.max_texts, max_chars=args.max_chars, deadline_s=args.deadline_s)
    return ServeConfig(batch, limits, token_cache=args.token_cache, translation_cache=args.translation_cache)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    d, lim = BatchConfig(), Limits()
    parser.add_argument("--preset", default="ci", help=f"{', '.join(PRESETS)} (decoding, threads, artifacts)")
    parser.add_argument("--engine", default="auto", choices=("auto", *ENGINES),
                        help="the translator; auto = the fastest whose gate passes")
    parser.add_argument("--artifact", default=None, help="an already gated directory to serve with --engine")
    parser.add_argument("--bundle", default="teacher", help="bundle name under the preset's artifacts")
    parser.add_argument("--bundle-dir", default=None, help="serve this bundle directory with PyTorch instead")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the preset's)")
    parser.add_argument("--inter-threads", type=int, default=None,
                        help="CTranslate2: translators run in parallel, each with threads/inter intra threads "
                             "(default: 2 with --batching ct2/auto on 2+ threads, else 1)")
    parser.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="1 = serial serving")
    parser.add_argument("--batching", default="auto", choices=BATCHING,
                        help="continuous: rows join and leave at every decode step; static: whole batches; "
                             "auto: continuous where the engine supports it")
    parser.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms)
    parser.add_argument("--max-queue", type=int, default=d.max_queue, help="sentences waiting before 503")
    parser.add_argument("--token-cache", type=int, default=ServeConfig.token_cache, help="entries; 0 = off")
    parser.add_argument("--translation-cache", type=int, default=ServeConfig.translation_cache, help="entries; 0 = off")
    parser.add_argument("--max-texts", type=int, default=lim.max_texts, help="texts per request")
    parser.add_argument("--max-chars", type=int, default=lim.max_chars, help="characters per text (cut beyond)")
    parser.add_argument("--deadline-s", type=float, default=lim.deadline_s, help="per request, then 504")
    parser.add_argument("--backend", default="local", choices=("local", "ray"), help="ray: a Ray Serve deployment")
    parser.add_argument("--replicas", type=int, default=1, help="ray: most replicas the autoscaler may start")
    parser.add_argument("--ray-address", default=None, help="ray: join this cluster (default: start one here)")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="ray: CPUs reserved per replica (fractions ok)")
    parser.add_argument("--lame-duck-s", type=float, default=LAME_DUCK_S,
                        help="on SIGTERM: seconds of /readyz 503 and Connection: close before the listener closes")
    parser.add_argument("--log-level", default="warning")


def lame_duck_server(config, state, lame_duck_s: float):
    """A uvicorn.Server whose first SIGTERM/SIGINT starts a lame-duck period before the usual shutdown.

    During it `state.draining` is set (labkit.serve.app: /readyz 503, `Connection: close` on every
    response) and requests are still served; when it ends the listener closes, requests on connections
    accepted just before get `ACCEPTED_GRACE_S` to arrive, and uvicorn drains.
    A second signal during the period shuts down at once.
    """
    import uvicorn

    class LameDuckServer(uvicorn.Server):
        until: float | None = None

        def handle_exit(self, sig, frame) -> None:
            if self.until is None and not self.should_exit and lame_duck_s > 0:
                self._captured_signals.append(sig)
                state.draining = True
                self.until = time.monotonic() + lame_duck_s
                log.warning("signal %s: lame duck for %.1f s, then shutdown", sig, lame_duck_s)
                return
            state.draining = True
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if self.until is not None and time.monotonic() >= self.until:
                self.should_exit = True
            return await super().on_tick(counter)

        async def shutdown(self, sockets=None) -> None:
            # uvicorn closes the listener and then at once every connection without a request in progress,
            # which includes one accepted a moment ago whose request is still on the wire: its client reads
            # a reset (seen in tests/test_serve_process.py). Stop accepting first, let those requests
            # arrive and become in-flight, then shut down as usual (they are answered, then closed).
            for server in self.servers:
                server.close()
            await asyncio.sleep(ACCEPTED_GRACE_S)
            await super().shutdown(sockets)

    return LameDuckServer(config)


def _exit_cleanly_on_sigterm() -> None:
    """uvicorn drains on SIGTERM, then re-raises it: exit 0 then, not 'killed by signal 15'."""
    def handler(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)


def serve_command(args: argparse.Namespace) -> int:
    """Handler of `labkit serve`: 0 after a drained shutdown, 1 when the model failed to load, 2 on bad input."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.preset not in PRESETS:
        print(f"labkit serve: unknown preset {args.preset!r}; known: {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"labkit serve: {exc}", file=sys.stderr)
        return 2
    if args.backend == "ray":
        return ray_app.run_ray(args, config)
    failed: list[BaseException] = []
    server_box: list = []

    def on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        if server_box:
            server_box[0].should_exit = True

    import uvicorn

    app = create_app(make_loader(args, config), on_load_error)
    server = lame_duck_server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                             timeout_keep_alive=KEEP_ALIVE_S,
                                             timeout_graceful_shutdown=int(config.limits.deadline_s) + 5),
                              app.state.labkit, args.lame_duck_s)
    server_box.append(server)
    _exit_cleanly_on_sigterm()
    try:
        server.run()
    except SystemExit as exc:
        return 1 if failed else int(exc.code or 0)
    return 1 if failed else 0
