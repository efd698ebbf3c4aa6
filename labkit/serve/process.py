"""A `labkit serve` in a child process on a free loopback port, stopped by its PID.

    with ServerProcess.start(["--preset", "ci", "--engine", "torch"]) as server:
        httpx.post(server.url + "/v1/translate", json={"texts": ["我喜欢猫。"]})
    # leaving the block sends SIGTERM to that PID (SIGKILL if it does not exit in time)

The child listens on 127.0.0.1 only; `start` returns once `/readyz` answers 200 and raises
with the tail of the child's log when it exits or does not get ready in time. On Linux the child gets
SIGTERM when the thread that launched it dies (`prctl(PR_SET_PDEATHSIG)`), so a server a notebook started
dies with the notebook's kernel, even one killed outright; launch from the thread that owns the server
(a notebook's main thread), since the signal follows that thread, not the whole process. Its output goes to
a log file, not a pipe, so a chatty server can never block on a full pipe (removed after a clean
exit, kept after a failure).
Left out: other hosts (loopback only, on purpose), restarting a crashed server, and the parent-death
signal outside Linux (there a killed kernel still leaves its servers running).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from labkit.core.artifacts import REPO_ROOT

HOST = "127.0.0.1"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (the OS picks it; a tiny race remains until bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def require_loopback(url: str) -> str:
    """The URL without a trailing slash, if its host is loopback; else ValueError (no traffic elsewhere)."""
    host = urlsplit(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"load tests go to this machine only (127.0.0.1, localhost, ::1), not {host!r}")
    return url.rstrip("/")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """In the child, before exec: ask Linux for SIGTERM when the launching thread dies; exit at once if the
    parent is already gone (it could die between fork and this call). Elsewhere: nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def child_env(threads: int | None = None) -> dict[str, str]:
    """The child's environment: this checkout's labkit first on PYTHONPATH, thread counts pinned,
    idle OpenMP threads sleeping (OMP_WAIT_POLICY=PASSIVE unless the caller set it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if threads:
        env.update({v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Idle OpenMP threads sleep instead of spinning: spinning cost PyTorch 7x in batch-1 throughput on
    # the ci teacher when the cores are shared (1.3 vs 10 sentences/s), as a server's always are.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def launch(cls, serve_args: list[str], threads: int | None = None,
               log_dir: str | Path | None = None) -> ServerProcess:
        """`python -m labkit serve <serve_args> --host 127.0.0.1 --port <free>`, not yet ready.

        Launch several, then `wait_ready` each: their start-ups (imports, model load) overlap.
        """
        port = free_port()
        log = Path(tempfile.mkstemp(prefix=f"labkit-serve-{port}-", suffix=".log", dir=log_dir)[1])
        argv = [sys.executable, "-m", "labkit", "serve", *serve_args, "--host", HOST, "--port", str(port)]
        with open(log, "wb") as out:
            parent = os.getpid()
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=child_env(threads),
                                    cwd=REPO_ROOT, preexec_fn=lambda: die_with_parent(parent))
        return cls(proc, port, log)

    @classmethod
    def start(cls, serve_args: list[str], ready_timeout_s: float = 180.0, threads: int | None = None,
              log_dir: str | Path | None = None) -> ServerProcess:
        """`launch`, then wait until /readyz says 200 (stopping the child if it never does)."""
        server = cls.launch(serve_args, threads, log_dir)
        try:
            server.wait_ready(ready_timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"labkit serve exited with {self.process.returncode}:\n{_tail(self.log)}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.2)
        raise TimeoutError(f"labkit serve not ready after {timeout_s:g} s:\n{_tail(self.log)}")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM to our child's PID (it drains), SIGKILL after `timeout_s`; its exit code."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process.returncode == 0:
            self.log.unlink(missing_ok=True)  # a clean exit leaves nothing to read; a failure keeps its log
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        return _tail(self.log, lines)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
