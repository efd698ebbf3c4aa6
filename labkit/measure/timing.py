"""Honest measurement: warm-up, repeats, median/p95/IQR, pinned threads, the environment.

One function (`measure`) times in-process callables; `time_command` times a peer engine in its
own process, because two engines in one process distort each other (thread pools, allocators).

Left out on purpose: CUDA events and automatic device synchronisation (pass `sync=` yourself,
e.g. `torch.cuda.synchronize`), statistical comparison of two measurements beyond `ratio`,
and per-measurement memory: `peak_rss_mb` is the process high-water mark, so measure memory of
one variant alone by running it in its own process.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labkit.core.bundle import hub_unreachable

NOISE_THRESHOLD = 0.10  # IQR/median above this is flagged, as torch.utils.benchmark does
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Distribution names to try per package; the first one installed wins.
PACKAGES = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "ctranslate2": ("ctranslate2",),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"),
}


class CommandError(RuntimeError):
    """A timed child process failed, timed out, or did not print its JSON result."""


# ---------------------------------------------------------------- primitives


def percentile(values: Sequence[float], q: float) -> float:
    """Percentile with linear interpolation between order statistics (numpy's default).

    values=[10, 20, 30, 40], q=0.5 -> position 0.5*3 = 1.5 -> 20 + 0.5*(30-20) = 25.0
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process so far, in MiB (None where neither source exists).

    Linux: /proc/self/status VmHWM, which belongs to this address space. getrusage's
    ru_maxrss survives exec there, so a worker started from a 700 MB Jupyter kernel
    would report the kernel's peak. Elsewhere ru_maxrss (macOS reports bytes).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_threads() -> int:
    """Intra-op threads torch uses now; the OMP setting or the core count without torch."""
    try:
        import torch
    except ImportError:
        return int(os.environ.get("OMP_NUM_THREADS", 0)) or usable_cores()
    return torch.get_num_threads()


def usable_cores() -> int:
    """Cores this process may run on (a container or `taskset` can allow fewer than exist)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def pin_threads(n: int) -> int:
    """Use `n` intra-op threads in torch and in processes started from here; returns `n`.

    The environment variables matter for children (`time_command`) and for libraries loaded
    later; a thread pool that already started keeps its size, which is why torch is set directly.
    """
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(n)
    try:
        import torch
    except ImportError:
        return n
    torch.set_num_threads(n)
    return n


# ---------------------------------------------------------------- environment


def cpu_name() -> str:
    """CPU model name, e.g. 'AMD EPYC 7B13' (platform.processor() is often empty on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def package_version(names: Sequence[str]) -> str | None:
    """Version of the first installed distribution in `names`, without importing it."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def git_commit(path: Path | None = None) -> str | None:
    """HEAD commit of the repository holding `path` (default: this package), or None."""
    where = path or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def gpu_name() -> str | None:
    """Name of CUDA device 0 as torch sees it, or None."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


@functools.cache
def _static_environment() -> dict[str, Any]:
    # Cached: none of this changes within a process, and git/metadata lookups cost ~10 ms.
    versions = {"python": platform.python_version()}
    versions |= {pkg: package_version(names) for pkg, names in PACKAGES.items()}
    return {
        "cpu": cpu_name(),
        "cores": usable_cores(),
        "gpu": gpu_name(),
        "versions": versions,
        "git": git_commit(),
    }


def environment() -> dict[str, Any]:
    """What a number was measured on: {cpu, cores, threads, gpu, versions, git}.

    Never imports tensorrt or ctranslate2 (versions come from package metadata), so it is safe
    on a machine where importing them would fail or initialise a GPU.
    """
    static = _static_environment()
    return {**static, "versions": dict(static["versions"]), "threads": current_threads()}


CAPABILITIES = ("cuda", "tensorrt", "browser", "network")  # what a notebook or test may need beyond a CPU


def unavailable(capability: str) -> str | None:
    """Why `capability` cannot be used here, or None when it can.

    unavailable("cuda") -> "needs an NVIDIA GPU (none found)" on a CPU-only machine. Never imports
    tensorrt (package metadata says whether it is installed) and probes the network once, briefly.
    """
    if capability == "cuda":
        return None if gpu_name() else "needs an NVIDIA GPU (none found)"
    if capability == "tensorrt":
        if not gpu_name():
            return "needs an NVIDIA GPU (none found)"
        return None if package_version(PACKAGES["tensorrt"]) else \
            "needs the tensorrt package (pip install -e '.[trt]' on a GPU machine)"
    if capability == "browser":
        found = [shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")]
        return None if any(found) else "needs Chromium (apt-get install -y chromium chromium-driver)"
    if capability == "network":
        why = hub_unreachable()
        return None if why is None else f"needs the Hugging Face hub ({why})"
    raise ValueError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")


# ---------------------------------------------------------------- measurement


@dataclass(frozen=True)
class Measurement:
    """Repeated timings of one thing. Statistics are derived from `times_ms`, never stored twice."""

    times_ms: tuple[float, ...]  # one entry per timed call, in call order
    threads: int  # intra-op threads while measuring
    peak_rss_mb: float | None = None  # process high-water mark after measuring
    label: str = ""

    @property
    def n(self) -> int:
        return len(self.times_ms)

    @property
    def p50(self) -> float:
        return percentile(self.times_ms, 0.50)

    @property
    def p95(self) -> float:
        return percentile(self.times_ms, 0.95)

    @property
    def iqr(self) -> float:
        return percentile(self.times_ms, 0.75) - percentile(self.times_ms, 0.25)

    @property
    def mean(self) -> float:
        return sum(self.times_ms) / self.n

    @property
    def noisy(self) -> bool:
        """True when IQR/median > 10 %: the spread is too large to trust small differences."""
        return self.p50 > 0 and self.iqr / self.p50 > NOISE_THRESHOLD

    def __str__(self) -> str:
        q1, q3 = percentile(self.times_ms, 0.25), percentile(self.times_ms, 0.75)
        rss = "n/a" if self.peak_rss_mb is None else f"{self.peak_rss_mb:.0f} MB"
        lines = [
            self.label or "Measurement",
            f"  Median: {self.p50:.3f} ms   p95: {self.p95:.3f} ms",
            f"  IQR:    {self.iqr:.3f} ms ({q1:.3f} to {q3:.3f})",
            f"  {self.n} measurements, {self.threads} threads, peak RSS {rss}",
        ]
        if self.noisy:
            lines.append(f"  noisy: the IQR is {100 * self.iqr / self.p50:.0f}% of the median" + _noise_note())
        return "\n".join(lines)


NOISE_NOTE = (
    "\n  What this means: other programs shared the CPU while these calls ran, so single timings"
    "\n  wander by more than 10 %. The median is still a fair summary, and the lab compares variants"
    "\n  only as ratios timed in the same run (both sides see the same machine), never across runs."
    "\n  Later noisy measurements in this notebook just say 'noisy'."
)
_noise_explained = [False]  # once per process, i.e. once per notebook kernel


def _noise_note() -> str:
    """The explanation of a noisy measurement the first time one is printed in this process, then ''."""
    if _noise_explained[0]:
        return ""
    _noise_explained[0] = True
    return NOISE_NOTE


def measure(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    repeats: int = 20,
    min_time_s: float = 0.0,
    label: str = "",
    sync: Callable[[], Any] | None = None,
    timer: Callable[[], float] = time.perf_counter,
) -> Measurement:
    """Time `fn()` after `warmup` untimed calls: at least `repeats` calls and `min_time_s` seconds.

    `sync` runs after every call inside the timed region (asynchronous devices return before the
    work is done). `timer` returns seconds, as in `timeit.Timer`; tests pass a fake clock.

    >>> m = measure(lambda: sum(range(1000)), repeats=5)   # doctest: +SKIP
    >>> m.n, m.p50 > 0
    (5, True)
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times: list[float] = []
    total_ms = 0.0
    while len(times) < repeats or total_ms < min_time_s * 1e3:
        start = timer()
        fn()
        if sync:
            sync()
        times.append((timer() - start) * 1e3)
        total_ms += times[-1]
    return Measurement(tuple(times), threads=current_threads(), peak_rss_mb=peak_rss_mb(), label=label)


def as_latency(m: Measurement) -> dict[str, float | int | bool]:
    """The ledger's `metrics.latency_ms` entry: {"p50", "p95", "n", "iqr", "noisy"}.

    The spread travels with the median so a report can flag a number measured on a busy machine.
    """
    return {"p50": m.p50, "p95": m.p95, "n": m.n, "iqr": m.iqr, "noisy": m.noisy}


def ratio(a: Measurement, b: Measurement) -> float:
    """Median of `a` over median of `b`: ratio(baseline, optimized) = 2.0 means twice as fast."""
    return a.p50 / b.p50


# ---------------------------------------------------------------- handler: own-process timing


def _tail(text: str | bytes | None, lines: int = 20) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").strip().splitlines()[-lines:])


def _last_json_line(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ValueError("no output on stdout")
    result = json.loads(lines[-1])
    if not isinstance(result, dict):
        raise ValueError(f"last stdout line is JSON {type(result).__name__}, not an object")
    return result


def time_command(
    argv: Sequence[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> dict[str, Any]:
    """Run `argv` in its own process; return the JSON object on its last stdout line + `wall_s`.

    The child owns the measurement (it warms up and times itself); `wall_s` is the parent's view
    including interpreter start and model load, for context only.

    argv=[sys.executable, "-c", "print('{\\"p50\\": 3.0}')"] -> {"p50": 3.0, "wall_s": 0.03}
    """
    argv = [str(a) for a in argv]
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        raise CommandError(
            f"command timed out after {timeout} s: {argv}\nstderr tail:\n{_tail(exc.stderr)}"
        ) from None
    wall_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise CommandError(
            f"command failed with exit {proc.returncode}: {argv}\nstderr tail:\n{_tail(proc.stderr)}"
        )
    try:
        result = _last_json_line(proc.stdout)
    except ValueError as exc:
        raise CommandError(
            f"command did not print a JSON object on its last stdout line ({exc}): {argv}\n"
            f"stdout tail:\n{_tail(proc.stdout, 5)}\nstderr tail:\n{_tail(proc.stderr)}"
        ) from None
    if "wall_s" in result:
        raise CommandError(f"child result uses the reserved key 'wall_s': {argv}")
    return {**result, "wall_s": wall_s}
