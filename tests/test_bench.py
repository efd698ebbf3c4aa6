"""Measurement statistics against numpy/statistics, the noise flag, pinned threads, own-process timing."""

import itertools
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from labkit.measure import timing
from labkit.measure.timing import CommandError, Measurement

# Ten timings with one outlier. Linear interpolation puts quantile q at position q*(n-1) = 9q:
#   p50: pos 4.5  -> 14 + 0.5*(15-14)   = 14.5
#   p95: pos 8.55 -> 18 + 0.55*(100-18) = 63.1
#   p25: pos 2.25 -> 12.25;  p75: pos 6.75 -> 16.75;  IQR = 4.5
#   mean = (10+11+...+18 + 100)/10 = (126 + 100)/10 = 22.6
#   IQR/median = 4.5/14.5 = 0.31 > 0.10 -> noisy
OUTLIER = (13.0, 10.0, 100.0, 11.0, 12.0, 14.0, 15.0, 16.0, 17.0, 18.0)
# Steady: median 102, IQR 103-101 = 2, 2/102 = 0.02 -> not noisy.
STEADY = (100.0, 104.0, 101.0, 103.0, 102.0)


@pytest.mark.parametrize("values", [OUTLIER, STEADY, (7.0,), (1.0, 2.0)])
@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.75, 0.95, 1.0])
def test_percentile_matches_numpy(values, q):
    assert timing.percentile(values, q) == pytest.approx(np.percentile(values, 100 * q))


def test_measurement_statistics_by_hand_and_by_oracle():
    m = Measurement(OUTLIER, threads=2)
    assert (m.n, m.p50, m.p95, m.iqr, m.mean) == pytest.approx((10, 14.5, 63.1, 4.5, 22.6))
    q1, q2, q3 = statistics.quantiles(OUTLIER, n=4, method="inclusive")
    assert (m.p50, m.iqr, m.mean) == pytest.approx((statistics.median(OUTLIER), q3 - q1, statistics.mean(OUTLIER)))


@pytest.mark.parametrize("times, noisy", [(OUTLIER, True), (STEADY, False), ((5.0,) * 4, False)])
def test_noisy_flag_and_its_warning(times, noisy):
    m = Measurement(times, threads=1, peak_rss_mb=100.0, label="decode")
    assert m.noisy is noisy
    text = str(m)
    assert text.startswith("decode") and "Median" in text and "IQR" in text and f"{m.n} measurements" in text
    assert ("noisy: the IQR is" in text) is noisy


def test_the_noise_explanation_is_said_once_per_process(monkeypatch):
    from labkit.measure import timing

    monkeypatch.setattr(timing, "_noise_explained", [False])
    first, second = str(Measurement(OUTLIER, threads=1)), str(Measurement(OUTLIER, threads=1))
    assert "ratios timed in the same run" in first and "What this means" not in second
    assert "noisy: the IQR is" in second


def test_measure_counts_warmup_and_repeats_with_a_fake_clock():
    """Every clock reading advances 1 ms and a sample is two consecutive readings: exactly 1.0 ms."""
    calls = []
    clock = itertools.count(step=0.001)  # 1 ms per reading; two readings per call
    m = timing.measure(lambda: calls.append(1), warmup=3, repeats=7, label="x", timer=lambda: next(clock))
    assert len(calls) == 10 and m.n == 7
    assert m.times_ms == pytest.approx((1.0,) * 7)
    assert m.label == "x" and m.threads == timing.current_threads()


def test_measure_keeps_going_until_min_time():
    clock = itertools.count(step=1 / 64)  # every sample is 15.625 ms, exact in binary
    m = timing.measure(lambda: None, warmup=0, repeats=2, min_time_s=0.1, timer=lambda: next(clock))
    assert m.n == 7  # 6 samples make 93.75 ms < 100 ms; the 7th reaches 109.375 ms


def test_measure_real_clock_and_sync_inside_timed_region():
    synced = []
    m = timing.measure(lambda: sum(range(1000)), warmup=1, repeats=5, sync=lambda: synced.append(1))
    assert m.n == 5 and len(synced) == 6 and all(t > 0 for t in m.times_ms)


def test_as_latency_and_ratio():
    slow, fast = Measurement(STEADY, threads=1), Measurement(tuple(t / 4 for t in STEADY), threads=1)
    assert timing.as_latency(fast) == {"p50": 25.5, "p95": pytest.approx(25.95), "n": 5,
                                      "iqr": pytest.approx(fast.iqr), "noisy": fast.noisy}
    assert timing.ratio(slow, fast) == pytest.approx(4.0)


def test_pin_threads_sets_torch_and_child_environment(monkeypatch):
    torch = pytest.importorskip("torch")
    for var in timing.THREAD_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    before = torch.get_num_threads()
    try:
        assert timing.pin_threads(1) == 1
        assert torch.get_num_threads() == 1 and timing.environment()["threads"] == 1
        child = timing.time_command([sys.executable, "-c",
                                    "import json, os; print(json.dumps({'omp': os.environ['OMP_NUM_THREADS']}))"],
                                   timeout=60)  # fmt: skip
        assert child["omp"] == "1"
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError):
        timing.pin_threads(0)


def test_environment_records_versions_without_importing_optional_engines():
    sys.modules.pop("tensorrt", None)
    sys.modules.pop("ctranslate2", None)
    env = timing.environment()
    assert set(env) == {"cpu", "cores", "threads", "gpu", "versions", "git"}
    assert env["versions"]["python"] == platform.python_version()
    assert set(env["versions"]) >= {"torch", "transformers", "onnxruntime", "ctranslate2", "tensorrt"}
    assert "tensorrt" not in sys.modules and "ctranslate2" not in sys.modules
    assert isinstance(env["cpu"], str) and env["cores"] >= 1


def test_environment_git_matches_git_itself():
    repo = Path(timing.__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    assert timing.environment()["git"] == (head.stdout.strip() if head.returncode == 0 else None)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_rss_matches_proc_high_water_mark():
    status = Path("/proc/self/status").read_text()
    hwm_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    assert timing.peak_rss_mb() == pytest.approx(hwm_kb / 1024, rel=0.05)


def test_time_command_parses_last_json_line_and_adds_wall_time():
    code = "import json; print('loading...'); print(json.dumps({'p50': 3.5, 'n': 4}))"
    result = timing.time_command([sys.executable, "-c", code], timeout=60)
    assert result["p50"] == 3.5 and result["n"] == 4 and result["wall_s"] > 0


@pytest.mark.parametrize(
    "code, timeout, message",
    [
        ("import sys; print('kaboom', file=sys.stderr); sys.exit(3)", 60, r"exit 3(.|\n)*kaboom"),
        ("import time, sys; print('stuck', file=sys.stderr, flush=True); time.sleep(30)", 1, r"timed out(.|\n)*stuck"),
        ("print('not json')", 60, "JSON object(.|\n)*not json"),
        ("print('[1, 2]')", 60, "JSON list"),
        ("print('{\"wall_s\": 1}')", 60, "reserved key"),
    ],
)
def test_time_command_failures_are_clear(code, timeout, message):
    with pytest.raises(CommandError, match=message):
        timing.time_command([sys.executable, "-c", code], timeout=timeout)
