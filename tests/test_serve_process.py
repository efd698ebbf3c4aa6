"""`labkit serve` as a real process on a loopback port: the tiny model's answers, load, SIGTERM.

The oracle is the same model's Translator in this process: what the service answers under
concurrent load must be what `Translator.run` gives for that text.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from labkit.config import Preset
from labkit.core.bundle import load_bundle
from labkit.core.data import load_split
from labkit.core.translator import translator_for
from labkit.serve.loadtest import LoadSpec, TextPool, closed_loop, open_loop
from labkit.serve.metrics import parse
from labkit.serve.process import ServerProcess, require_loopback

pytestmark = pytest.mark.slow
TEXTS = [p.zh for p in load_split("test", limit=24)]


def serve_args(bundle_dir, *more) -> list[str]:
    return ["--preset", "ci", "--bundle-dir", str(bundle_dir), "--threads", "1", *more]


@pytest.fixture(scope="module")
def oracle(tiny_bundle_dir) -> dict[str, str]:
    translator = translator_for(load_bundle(tiny_bundle_dir), Preset.from_name("ci"))
    return dict(zip(TEXTS, (translator.run([t]).texts[0] for t in TEXTS)))


@pytest.fixture(scope="module")
def server(tiny_bundle_dir):
    with ServerProcess.start(serve_args(tiny_bundle_dir, "--max-batch-size", "8", "--translation-cache", "0"),
                             threads=1) as s:
        yield s


def test_answers_are_the_translators(server, oracle):
    r = httpx.post(server.url + "/v1/translate", json={"texts": TEXTS[:6]}, timeout=60)
    assert r.status_code == 200 and r.json()["translations"] == [oracle[t] for t in TEXTS[:6]]


def test_closed_loop_loses_nothing_and_batches(server, oracle):
    spec = LoadSpec(duration_s=2.0, warmup_s=0.5, timeout_s=60)
    (point,) = closed_loop(server.url, TextPool(TEXTS), [6], spec)
    assert point.requests > 0 and point.lost == 0 and point.duplicated == 0 and point.errors == {}
    assert point.sent == point.answered
    assert point.mean_batch_size > 1, "six clients never shared a model call"
    assert 0 < point.p50_ms <= point.p95_ms <= point.p99_ms
    assert point.healthz_max_ms < 1000, point.healthz_max_ms  # the loop stays free while the model runs
    # every answer is its own text's translation: batching with other sentences changed none of them
    assert point.answers and all(oracle[src] == out for src, out in point.answers.items())


def test_open_loop_keeps_up_with_a_low_rate(server):
    spec = LoadSpec(duration_s=1.5, warmup_s=0.3, timeout_s=60)
    (point,) = open_loop(server.url, TextPool(TEXTS, zipf=1.1), [10.0], spec)
    assert point.sent > 5 and point.lost == point.duplicated == point.dropped == 0 and point.errors == {}


def test_loadtest_command_prints_a_table_and_refuses_other_hosts(server, tmp_path):
    out = tmp_path / "points.jsonl"
    run = [sys.executable, "-m", "labkit", "loadtest", "--concurrency", "2", "--duration", "1", "--warmup", "0.2",
           "--pool", "10"]
    proc = subprocess.run([*run, "--url", server.url, "--json", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sentences_per_s" in proc.stdout and len(out.read_text().splitlines()) == 1
    refused = subprocess.run([*run, "--url", "http://192.0.2.1:8000"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "this machine only" in refused.stderr
    with pytest.raises(ValueError):
        require_loopback("http://example.com")


def _in_flight(url: str) -> float:
    return parse(httpx.get(url + "/metrics", timeout=10).text)["labkit_inflight_requests"][()]


def test_sigterm_drains_requests_in_flight_then_exits_0(tiny_bundle_dir, oracle):
    """Ten requests of eight texts, one sentence per model call (so they take a while); SIGTERM once
    they are in flight. Every accepted request is answered in full and correctly, the server exits 0;
    a request that had not connected yet is refused at the door, never half-answered."""
    server = ServerProcess.start(serve_args(tiny_bundle_dir, "--max-batch-size", "1", "--translation-cache", "0"),
                                 threads=1)
    try:
        answers: dict[int, httpx.Response | Exception] = {}

        def post(i):
            try:
                answers[i] = httpx.post(server.url + "/v1/translate", json={"texts": TEXTS[i:i + 8]}, timeout=120)
            except httpx.HTTPError as exc:
                answers[i] = exc

        threads = [threading.Thread(target=post, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while _in_flight(server.url) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        in_flight = _in_flight(server.url)
        os.kill(server.pid, signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert server.process.wait(120) == 0, server.log_tail()
    finally:
        server.stop()
    answered = {i: r for i, r in answers.items() if isinstance(r, httpx.Response)}
    refused = [r for r in answers.values() if not isinstance(r, httpx.Response)]
    assert in_flight >= 5 and len(answered) >= in_flight, (in_flight, answers)
    assert all(isinstance(r, httpx.ConnectError) for r in refused), refused
    for i, r in answered.items():  # accepted: answered in full, and correctly
        assert r.status_code == 200, r.text
        assert r.json()["translations"] == [oracle[t] for t in TEXTS[i:i + 8]]


def test_locust_and_labkit_loadtest_measure_the_same_server_alike(server):
    """The cross-check (labkit loadtest --locust): an independent load generator, same clients,
    same texts, one after the other. Loose bounds: they catch a load generator that miscounts
    (errors as answers, a wrong time base), not the run-to-run noise of a shared machine."""
    proc = subprocess.run([sys.executable, "-m", "labkit", "loadtest", "--url", server.url, "--concurrency", "4",
                           "--duration", "4", "--pool", "24", "--locust"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ratio = [line.split() for line in proc.stdout.splitlines() if line.strip().startswith("locust /")][0]
    rps, p50 = float(ratio[3]), float(ratio[4])  # 'locust / labkit' rps p50 p95 p99
    assert 1 / 3 < rps < 3 and 1 / 3 < p50 < 3, proc.stdout


def test_a_model_that_cannot_load_exits_1_with_the_reason(tmp_path):
    with pytest.raises(RuntimeError, match="exited with 1"):
        ServerProcess.start(["--preset", "ci", "--bundle-dir", str(tmp_path / "missing")], ready_timeout_s=120)


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting to be reaped (it no longer runs or listens)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_server_dies_with_the_process_that_started_it(tiny_bundle_dir):
    """What a killed notebook kernel does: the parent is SIGKILLed (no clean-up runs), the server follows."""
    code = ("import sys, time\nfrom labkit.serve.process import ServerProcess\n"
            f"s = ServerProcess.start({serve_args(tiny_bundle_dir)!r}, threads=1)\n"
            "print(s.pid, s.port, flush=True)\ntime.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = None
    try:
        pid, port = map(int, parent.stdout.readline().split())
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _gone(pid), "the server outlived the process that started it"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
    finally:
        parent.kill()
        if pid is not None and not _gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_under_keep_alive_load_answers_or_refuses_every_request(tiny_bundle_dir, oracle):
    """Eight clients on keep-alive connections send through the signal. During the lame duck /readyz
    says 503 "draining" and answers carry `Connection: close`; then the listener closes. Every request
    is answered (200) or refused at connect; none is reset or left without an answer."""
    server = ServerProcess.start(serve_args(tiny_bundle_dir, "--max-batch-size", "8", "--translation-cache", "0",
                                            "--lame-duck-s", "1.5"), threads=1)
    outcomes: list[tuple[str, str | None, float]] = []  # (status or error name, Connection header, time sent)
    lock = threading.Lock()
    stop_at = time.monotonic() + 60

    def client(k: int):
        with httpx.Client(base_url=server.url, timeout=60) as c:  # one keep-alive connection per client
            i = k
            while time.monotonic() < stop_at:
                sent = time.monotonic()
                try:
                    r = c.post("/v1/translate", json={"texts": [TEXTS[i % len(TEXTS)]]})
                    ok = r.status_code == 200 and r.json()["translations"] == [oracle[TEXTS[i % len(TEXTS)]]]
                    outcome = (str(r.status_code) if ok or r.status_code != 200 else "wrong", r.headers.get("connection"))
                except httpx.HTTPError as exc:
                    outcome = (type(exc).__name__, None)
                with lock:
                    outcomes.append((*outcome, sent))
                if outcome[0] == "ConnectError":
                    return
                i += 8

    try:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        os.kill(server.pid, signal.SIGTERM)
        ready = httpx.get(server.url + "/readyz", timeout=10)
        draining = time.monotonic()  # the server said so by now; an answer sent before may still keep its connection
        for t in threads:
            t.join(90)
        assert server.process.wait(60) == 0, server.log_tail()
    finally:
        server.stop()
    kinds = {o[0] for o in outcomes}
    assert kinds <= {"200", "ConnectError"}, [o for o in outcomes if o[0] not in ("200", "ConnectError")]
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    after = [o for o in outcomes if o[0] == "200" and o[2] > draining]
    assert after and all(o[1] == "close" for o in after)  # sent during the lame duck: answered, then let go
    assert sum(o[0] == "ConnectError" for o in outcomes) == 8  # each client ends at the closed door


def test_readyz_says_what_is_served_and_how(server):
    body = httpx.get(server.url + "/readyz", timeout=10).json()
    assert body["engine"] == "torch" and body["batching"] == "continuous" and body["batch_invariant"] is True
    assert body["max_batch_size"] == 8 and "PyTorch" in body["why"]


def test_healthz_stays_fast_while_32_clients_saturate_the_teacher():
    """The ci teacher served with PyTorch (nothing to export), 32 closed-loop clients for a few
    seconds: /healthz is probed every 100 ms throughout; its p95 must stay under 50 ms."""
    with ServerProcess.start(["--preset", "ci", "--engine", "torch", "--translation-cache", "0", "--threads", "2",
                              "--lame-duck-s", "0"], threads=2) as s:
        pool = TextPool.from_split("test", limit=200)
        (point,) = closed_loop(s.url, pool, [32], LoadSpec(duration_s=4, warmup_s=1))
    assert point.lost == 0 and point.duplicated == 0 and point.requests > 0
    assert point.mean_batch_size > 2  # the model was busy with many rows at once
    assert point.healthz_p95_ms <= 50, point
