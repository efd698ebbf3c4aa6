"""Record a notebook's measurements once; replay them when the same code runs again (a cassette).

The participant notebooks (workshop/) are the instructor's with the exercises stubbed out. Unfinished,
every exercise falls back to the library's reference, so a participant notebook runs exactly the
instructor's measurements. Proving headless that it runs to the end should not cost a second full
sequence of timings and BLEU scores, so the runner records and replays them, like vcrpy's cassettes
record HTTP calls:

    labkit run --preset ci                                   # LABKIT_MEASUREMENTS=record
    labkit run --preset ci --notebooks-dir workshop --replay # LABKIT_MEASUREMENTS=replay

Functions decorated with `@measurement` (timings, BLEU scoring, sweeps: the expensive calls a notebook
makes) append their result to `<artifacts>/<preset>/measurements/<notebook>.pkl` when recording. When
replaying, a call returns the earliest recorded result of the same function in the same notebook whose
arguments looked the same (`signature`: plain values as they are, sizes of collections, type names of the
rest) and that was not replayed yet; without one it is measured now and counted as a miss. Recorded calls
a replay never makes (work that a cached artifact holds the second time) are passed over. Only the
outermost decorated call is recorded (a sweep, not the latencies inside it).

Honesty: a replayed run writes nothing to the ledger (`ledger.append` checks `replaying()`), says in
its first output that its numbers were measured by the recorded run, and leaves
`<notebook>.replay.json` (hits, misses, the recorded run's id) for a test to read.
Interactive sessions (no LABKIT_MEASUREMENTS) neither record nor replay.
Left out: replaying across code versions (a cassette belongs to the artifacts root it was recorded in).
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from labkit.core.artifacts import root as artifacts_root
from labkit.core.artifacts import write_json_atomic

MODE_ENV = "LABKIT_MEASUREMENTS"  # "record" | "replay"; anything else: off
NOTEBOOK_ENV = "LABKIT_NOTEBOOK"  # the runner sets the notebook's stem, e.g. "02_head_pruning"
PRESET_ENV = "LABKIT_PRESET"
RUN_ID_ENV = "LABKIT_RUN_ID"
SCHEMA = "labkit.cassette/1"

F = TypeVar("F", bound=Callable[..., Any])

_state = threading.local()  # .depth: decorated calls in progress on this thread


def mode() -> str | None:
    value = os.environ.get(MODE_ENV)
    return value if value in ("record", "replay") and os.environ.get(NOTEBOOK_ENV) else None


def replaying() -> bool:
    return mode() == "replay"


def cassette_path(notebook: str | None = None, preset: str | None = None) -> Path:
    """<artifacts>/<preset>/measurements/<notebook>.pkl, e.g. .../ci/measurements/02_head_pruning.pkl"""
    notebook = notebook or os.environ[NOTEBOOK_ENV]
    preset = preset or os.environ.get(PRESET_ENV, "ci")
    return artifacts_root() / preset / "measurements" / f"{notebook}.pkl"


def signature(args: tuple, kwargs: dict) -> str:
    """What the arguments look like, stable across processes: signature((3, "ci", [1, 2]), {}) -> "3, 'ci', list[2]"."""

    def one(x: Any) -> str:
        if x is None or isinstance(x, (bool, int, float, str)):
            return repr(x)
        if isinstance(x, (list, tuple, dict, set, frozenset)):
            return f"{type(x).__name__}[{len(x)}]"
        if callable(x) and hasattr(x, "__qualname__"):  # a participant's function is not the library's
            return f"{getattr(x, '__module__', '?')}.{x.__qualname__}"
        name = getattr(x, "name", None)
        return f"{type(x).__name__}({name})" if isinstance(name, str) else type(x).__name__

    return ", ".join([one(a) for a in args] + [f"{k}={one(v)}" for k, v in sorted(kwargs.items())])


class Cassette:
    """One notebook's recorded calls: {function: [(signature, result), ...]} in call order."""

    def __init__(self, path: Path):
        self.path = path
        self.calls: dict[str, list[tuple[str, Any]]] = {}
        self.run_id = os.environ.get(RUN_ID_ENV, "")
        self.used: dict[str, set[int]] = {}
        self.hits = self.misses = 0
        self.announced = False

    @classmethod
    def load(cls, path: Path) -> Cassette:
        cassette = cls(path)
        if path.exists():
            with path.open("rb") as f:
                data = pickle.load(f)  # written by this lab's own record mode, in the artifacts root
            if data.get("schema") == SCHEMA:
                cassette.calls, cassette.run_id = data["calls"], data["run_id"]
        return cassette

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as f:
                pickle.dump({"schema": SCHEMA, "run_id": self.run_id, "calls": self.calls}, f)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def record(self, name: str, sig: str, result: Any) -> None:
        try:
            pickle.dumps(result)
        except Exception as exc:  # noqa: BLE001 - an unpicklable result is measured again when replaying
            print(f"labkit: {name}'s result cannot be recorded ({exc}); a replay will measure it", file=sys.stderr)
            return
        self.calls.setdefault(name, []).append((sig, result))
        self.save()

    def next(self, name: str, sig: str) -> tuple[bool, Any]:
        """(True, result) for the earliest unreplayed recorded call of `name` with this signature, else (False,
        None). Calls the recording made and this run skips (work a cached artifact already holds) are passed over."""
        used = self.used.setdefault(name, set())
        for k, (recorded_sig, result) in enumerate(self.calls.get(name, [])):
            if k not in used and recorded_sig == sig:
                used.add(k)
                self.hits += 1
                return True, result
        self.misses += 1
        return False, None

    def report(self) -> None:
        write_json_atomic(self.path.with_suffix(".replay.json"),
                          {"recorded_run_id": self.run_id, "hits": self.hits, "misses": self.misses})


_cassettes: dict[Path, Cassette] = {}


def _cassette(fresh: bool) -> Cassette:
    """The process's cassette for this notebook; recording starts from an empty one."""
    path = cassette_path()
    if path not in _cassettes:
        _cassettes[path] = Cassette(path) if fresh else Cassette.load(path)
    return _cassettes[path]


def _replayed(cassette: Cassette, name: str, sig: str) -> tuple[bool, Any]:
    hit, result = cassette.next(name, sig)
    if hit and not cassette.announced:
        cassette.announced = True
        print(f"(replay) the measurements in this notebook were recorded by run {cassette.run_id} and are "
              "replayed, not measured again; this run writes nothing to the ledger", file=sys.stderr)
    if not hit:
        print(f"(replay) {name}({sig}) was not recorded: measuring it now", file=sys.stderr)
    cassette.report()
    return hit, result


def measurement(fn: F) -> F:
    """Decorate an expensive measuring function so the runner can record and replay its result."""
    name = f"{fn.__module__}.{fn.__qualname__}"

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        current = mode()
        depth = getattr(_state, "depth", 0)
        if current is None or depth:
            return fn(*args, **kwargs)
        sig = signature(args, kwargs)
        if current == "replay":
            hit, result = _replayed(_cassette(fresh=False), name, sig)
            if hit:
                return result
        _state.depth = depth + 1
        try:
            result = fn(*args, **kwargs)
        finally:
            _state.depth = depth
        if current == "record":
            _cassette(fresh=True).record(name, sig, result)
        return result

    return wrapper  # type: ignore[return-value]
