"""The HTTP service: FastAPI routes around a TranslationService, served by uvicorn.

    app = create_app(lambda metrics: TranslationService(translator, "teacher/torch", metrics=metrics))
    # POST /v1/translate {"texts": ["我喜欢猫。"], "beams": 1}
    #   -> {"translations": ["I like cats."], "notes": [[]], "cached": [false], "model": ..., "timings_ms": ...}
    # GET / (the two-column page), /healthz, /readyz, /metrics (Prometheus)

The model loads in a thread after the server starts, so `/healthz` answers at once and
`/readyz` turns 200 only once the model is loaded and warmed. Answers: 422 naming the field for
bad JSON, wrong types, too many texts or beams out of range; 503 with Retry-After while loading,
when the queue is full, or while draining for shutdown; 504 past the request's deadline.

Shutdown loses nothing (labkit.serve.server's SIGTERM handling): first a lame-duck period in which
`/readyz` answers 503 "draining" (load balancers stop sending), requests keep being answered, and
every response carries `Connection: close` (clients leave their keep-alive connections after the
answer instead of sending on one the server is about to close); then uvicorn closes the listener
(new connections are refused) and waits for requests in flight; the lifespan's end drains the
batcher, so every request that reached the server gets exactly one answer.

Left out: authentication, TLS, streaming, and sentence splitting of long documents.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, StrictInt, StrictStr

from labkit.serve.metrics import Metrics
from labkit.serve.service import Closed, DeadlineExceeded, QueueFull, Reply, TranslationService

log = logging.getLogger("labkit.serve")
TRANSLATE_PATH = "/v1/translate"
RETRY_AFTER_S = 1  # what a 503 tells the client to wait (a batch of the ci model takes < 1 s)
Loader = Callable[[Metrics], TranslationService]


class TranslateRequest(BaseModel):
    texts: list[StrictStr]  # strict: a number or null is a 422 naming texts.<i>, not a silent "None"
    beams: StrictInt = 1
    id: StrictStr | None = None  # echoed back, so a client can match answers to requests


def _invalid(field: str, message: str, value=None) -> JSONResponse:
    """A 422 shaped like FastAPI's own validation errors: {"detail": [{"loc", "msg", "type"}]}."""
    return JSONResponse({"detail": [{"loc": ["body", field], "msg": message, "type": "value_error",
                                     "input": value}]}, status_code=422)


def _unavailable(message: str, status: int = 503) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def reply_json(reply: Reply, model_id: str, request_id: str | None) -> dict:
    t = reply.translations
    model_ms = [x.model_ms for x in t if x.model_ms is not None]
    queue_ms = [x.queue_ms for x in t if x.queue_ms is not None]
    return {"id": request_id, "model": model_id, "translations": [x.text for x in t],
            "notes": [x.notes for x in t], "cached": [x.cached for x in t],
            "batch_sizes": [x.batch_size for x in t],
            "timings_ms": {"total": reply.total_ms, "prepare": reply.prepare_ms,
                           "queue": max(queue_ms, default=0.0), "model": max(model_ms, default=0.0)}}


class AppState:
    """What the routes share: the service once loaded, or why it is not."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.service: TranslationService | None = None
        self.error: str | None = None
        self.draining = False  # lame duck: /readyz 503, every response closes its connection


async def _load(state: AppState, load: Loader, on_error: Callable[[BaseException], None] | None) -> None:
    try:
        service = await asyncio.to_thread(load, state.metrics)  # seconds of CPU: keep the loop answering
        await service.start()
        state.service = service
        log.info("model %s ready", service.model_id)
    except Exception as exc:  # /readyz says why; the command line exits non-zero
        state.error = f"{type(exc).__name__}: {exc}"
        log.exception("loading the model failed")
        if on_error is not None:
            on_error(exc)


def create_app(load: Loader, on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The FastAPI app; `load(metrics)` builds the (warmed) service in a worker thread at start-up."""
    state = AppState(Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(_load(state, load, on_load_error))
        yield
        await loading
        if state.service is not None:
            await state.service.close()  # uvicorn already waited for requests in flight

    app = FastAPI(title="labkit translate", lifespan=lifespan)
    app.state.labkit = state
    _add_metrics_middleware(app, state.metrics)
    _add_routes(app, state)
    app.mount("/static", StaticFiles(packages=[("labkit.serve", "static")]), name="static")
    return app


def _add_metrics_middleware(app: FastAPI, metrics: Metrics) -> None:
    state: AppState = app.state.labkit

    @app.middleware("http")
    async def lame_duck(request: Request, call_next):
        response = await call_next(request)
        if state.draining:
            response.headers["Connection"] = "close"
        return response

    @app.middleware("http")
    async def count(request: Request, call_next):
        if request.url.path != TRANSLATE_PATH:
            return await call_next(request)
        start = time.perf_counter()
        metrics.inflight.inc()
        try:
            response = await call_next(request)
        finally:
            metrics.inflight.dec()
        metrics.requests.labels(status=str(response.status_code)).inc()
        metrics.request_seconds.observe(time.perf_counter() - start)
        return response


def _add_routes(app: FastAPI, state: AppState) -> None:
    @app.post(TRANSLATE_PATH)
    async def translate(body: TranslateRequest):
        service = state.service
        if service is None:
            return _unavailable(f"model failed to load: {state.error}" if state.error else "model loading")
        limits = service.config.limits
        if len(body.texts) > limits.max_texts:
            return _invalid("texts", f"at most {limits.max_texts} texts per request, got {len(body.texts)}")
        if not 1 <= body.beams <= limits.max_beams:
            return _invalid("beams", f"beams must be between 1 and {limits.max_beams}", body.beams)
        try:
            reply = await service.translate(body.texts, body.beams)
        except QueueFull as exc:
            return _unavailable(f"overloaded: {exc}")
        except Closed as exc:
            return _unavailable(str(exc))
        except DeadlineExceeded as exc:
            return _unavailable(str(exc), status=504)
        return reply_json(reply, service.model_id, body.id)

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if state.draining:
            return JSONResponse({"status": "draining", "detail": "shutting down: requests are still answered, "
                                 "send new ones elsewhere"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        if state.service is not None:  # the page reads the limits from here
            limits = state.service.config.limits
            return {"status": "ready", "model": state.service.model_id, "max_texts": limits.max_texts,
                    "max_chars": limits.max_chars, **state.service.info}
        status = "failed" if state.error else "loading"
        return JSONResponse({"status": status, "detail": state.error}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("labkit.serve").joinpath("static/index.html").read_text(encoding="utf-8")
