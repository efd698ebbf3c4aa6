"""Serving: a gated translator behind HTTP, with dynamic batching, caches, limits and metrics.

batcher (asyncio micro-batcher) <- service (limits, caches) <- app (FastAPI routes, the page)
<- server (`labkit serve`); loadtest (`labkit loadtest`), process (a server in a child process),
ray_app (the same app on Ray Serve). Needs the `serve` extra; Ray the `ray` extra.
"""
