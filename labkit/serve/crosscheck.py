"""Cross-check of labkit's load generator against an independent one: locust, headless, same load.

    theirs = run_locust("http://127.0.0.1:8000", texts, users=8, duration_s=10)
    theirs.rps, theirs.p50_ms     # vs labkit.serve.loadtest.crosscheck's own closed loop at 8 clients

locust runs in its own process (`python -m locust --headless`, gevent must not share this
process) with `users` clients that each send their next request as soon as the last is
answered (`wait_time = constant(0)`: a closed loop, as labkit's), cycling through the same texts,
one text per request; its `--csv` stats give requests/s and p50/p95/p99. Differences to expect: locust counts its
whole run (spawning included, no warm-up excluded) and rounds response times to two significant
digits above 100 ms. Loopback only; locust is in the test extra and imported by nobody here.
`labkit.serve.loadtest.crosscheck` runs both and `compare_rows` puts them side by side.

Left out: locust's distributed mode, its web UI, and any load shape but a constant one.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from labkit.serve.process import require_loopback

LOCUSTFILE = '''
import itertools, json, os
from locust import FastHttpUser, constant, task

TEXTS = itertools.cycle(json.loads(os.environ["LABKIT_LOCUST_TEXTS"]))


class Translate(FastHttpUser):
    wait_time = constant(0)  # closed loop: the next request as soon as the last is answered

    @task
    def translate(self):
        with self.client.post("/v1/translate", json={"texts": [next(TEXTS)]}, catch_response=True) as r:
            if r.status_code != 200 or len(r.json().get("translations", ())) != 1:
                r.failure(f"status {r.status_code}")
'''


@dataclass(frozen=True)
class LocustResult:
    users: int
    duration_s: float
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


def read_locust_csv(path: Path | str) -> LocustResult:
    """The 'Aggregated' row of locust's <prefix>_stats.csv (users and duration filled by the caller)."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
    if not rows:
        raise RuntimeError(f"no Aggregated row in {path}: locust recorded no request")
    r = rows[0]
    return LocustResult(0, 0.0, int(r["Request Count"]), int(r["Failure Count"]), float(r["Requests/s"]),
                        float(r["50%"]), float(r["95%"]), float(r["99%"]))


def run_locust(url: str, texts: list[str], users: int, duration_s: float, timeout_s: float = 120.0) -> LocustResult:
    """locust headless against `url` for `duration_s`: its aggregated requests/s and percentiles."""
    url = require_loopback(url)
    with tempfile.TemporaryDirectory(prefix="labkit-locust-") as work:
        locustfile = Path(work) / "locustfile.py"
        locustfile.write_text(LOCUSTFILE)
        env = {**os.environ, "LABKIT_LOCUST_TEXTS": json.dumps(texts, ensure_ascii=False)}
        argv = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--host", url,
                "--users", str(users), "--spawn-rate", str(users), "--run-time", f"{duration_s:g}s",
                "--csv", str(Path(work) / "run"), "--only-summary", "--loglevel", "WARNING",
                "--stop-timeout", "30"]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration_s + timeout_s)
        stats = Path(work) / "run_stats.csv"
        if not stats.exists():
            raise RuntimeError(f"locust failed ({proc.returncode}): {proc.stderr[-2000:]}")
        result = read_locust_csv(stats)
    return LocustResult(users, duration_s, *[getattr(result, k) for k in
                                             ("requests", "failures", "rps", "p50_ms", "p95_ms", "p99_ms")])


def compare_rows(ours, theirs: LocustResult) -> list[dict]:
    """Two rows (labkit's loadtest.LoadPoint, locust) with the same columns, and locust / labkit."""
    mine = {"tool": "labkit loadtest", "clients": int(ours.load), "requests": ours.requests, "errors":
            sum(ours.errors.values()) + ours.lost, "rps": ours.rps, "p50_ms": ours.p50_ms, "p95_ms": ours.p95_ms,
            "p99_ms": ours.p99_ms}
    other = {"tool": "locust", "clients": theirs.users, "requests": theirs.requests, "errors": theirs.failures,
             "rps": theirs.rps, "p50_ms": theirs.p50_ms, "p95_ms": theirs.p95_ms, "p99_ms": theirs.p99_ms}
    ratio = {"tool": "locust / labkit", "clients": None, "requests": None, "errors": None,
             **{k: other[k] / mine[k] if mine[k] else float("nan") for k in ("rps", "p50_ms", "p95_ms", "p99_ms")}}
    return [mine, other, ratio]
