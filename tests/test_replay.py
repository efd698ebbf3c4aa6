"""Recorded measurements replay in call order, only when the call looks the same, and never reach the ledger."""

from __future__ import annotations

import json
import pickle

import nbformat
import pytest

from labkit.lab import runner
from labkit.measure import ledger, replay
from labkit.measure.replay import measurement

CALLS: list[tuple] = []


@measurement
def timed(label: str, texts: list[str]) -> dict:
    CALLS.append(("timed", label, len(texts)))
    return {"label": label, "n": len(texts), "call": len(CALLS)}


@measurement
def sweep(points: int) -> list[dict]:
    CALLS.append(("sweep", points))
    return [timed(f"p{i}", ["a"] * i) for i in range(points)]


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A notebook's environment as the runner sets it, with a fresh process state."""
    monkeypatch.setenv("LABKIT_ARTIFACTS", str(tmp_path))
    monkeypatch.setenv(replay.PRESET_ENV, "ci")
    monkeypatch.setenv(replay.NOTEBOOK_ENV, "02_head_pruning")
    monkeypatch.setenv(replay.RUN_ID_ENV, "run-recorded")
    monkeypatch.setattr(replay, "_cassettes", {})
    CALLS.clear()

    def as_mode(value: str) -> None:
        monkeypatch.setenv(replay.MODE_ENV, value)
        monkeypatch.setattr(replay, "_cassettes", {})  # a new kernel
        CALLS.clear()

    return as_mode


def test_a_replay_returns_the_recorded_results_in_call_order_without_measuring(env, tmp_path):
    env("record")
    first, second = timed("teacher", ["x", "y"]), timed("student", ["x"])
    assert len(CALLS) == 2
    env("replay")
    assert timed("teacher", ["x", "y"]) == first and timed("student", ["x"]) == second
    assert CALLS == []  # nothing measured again
    report = json.loads((tmp_path / "ci" / "measurements" / "02_head_pruning.replay.json").read_text())
    assert report == {"recorded_run_id": "run-recorded", "hits": 2, "misses": 0}


def test_a_call_that_looks_different_is_measured_and_counted_as_a_miss(env, tmp_path):
    env("record")
    timed("teacher", ["x", "y"])
    env("replay")
    assert timed("teacher", ["x", "y", "z"])["n"] == 3  # three sentences now: measured, not replayed
    assert timed("teacher", ["x", "y"])["call"] == 1  # the recorded one is still next
    assert CALLS == [("timed", "teacher", 3)]
    report = json.loads((tmp_path / "ci" / "measurements" / "02_head_pruning.replay.json").read_text())
    assert (report["hits"], report["misses"]) == (1, 1)


def test_only_the_outermost_call_is_recorded(env):
    env("record")
    sweep(3)
    calls = pickle.loads(replay.cassette_path().read_bytes())["calls"]
    assert list(calls) == [f"{__name__}.sweep"]
    env("replay")
    assert [p["label"] for p in sweep(3)] == ["p0", "p1", "p2"] and CALLS == []


def test_a_participant_function_is_not_the_library_function_it_replaces():
    def reference(x):
        return x

    def mine(x):
        return x

    assert replay.signature((reference,), {}) != replay.signature((mine,), {})
    assert replay.signature((3, "ci", [1, 2], None), {"k": (1,)}) == "3, 'ci', list[2], None, k=tuple[1]"


def test_without_the_runner_nothing_is_recorded_or_replayed(env, monkeypatch):
    monkeypatch.delenv(replay.MODE_ENV, raising=False)
    timed("teacher", ["x"])
    assert replay.mode() is None and not replay.cassette_path().exists()
    env("replay")
    monkeypatch.delenv(replay.NOTEBOOK_ENV)  # no notebook: an interactive session
    assert replay.mode() is None


def test_a_replaying_run_writes_nothing_to_the_ledger(env, tmp_path):
    record = ledger.make_record(notebook="00_setup_and_baseline", variant="teacher", technique="baseline",
                                backend="torch", precision="fp32", metrics={"bleu": 25.0})
    path = tmp_path / "ledger.jsonl"
    env("replay")
    assert ledger.append(path, record)["variant"] == "teacher" and not path.exists()
    env("record")
    ledger.append(path, record)
    assert len(ledger.read(path)) == 1


def test_an_unpicklable_result_is_measured_again(env, capsys):
    @measurement
    def opens():
        CALLS.append("opens")
        return lambda: None

    env("record")
    opens()
    assert "cannot be recorded" in capsys.readouterr().err
    env("replay")
    opens()
    assert CALLS == ["opens"]


def write_notebook(path, sources):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, path)


MEASURES = [  # counts its real measurements in a file next to the notebook
    "from labkit.measure.replay import measurement\n\n"
    "@measurement\n"
    "def slow(n):\n"
    "    with open('measured.txt', 'a') as f:\n"
    "        f.write('x')\n"
    "    return n * 2",
    "assert slow(21) == 42",
]


def test_the_runner_records_and_replays_per_notebook(tmp_path):
    """`labkit run` records; `--replay` over a copy of the notebooks measures nothing and writes its executed
    copies under the copy's folder name."""
    for folder in ("notebooks", "workshop"):
        (tmp_path / folder).mkdir()
        write_notebook(tmp_path / folder / "00_measures.ipynb", MEASURES)
    out = tmp_path / "artifacts"
    assert runner.run_notebooks("ci", notebooks_dir=tmp_path / "notebooks", out_root=out)[-1].ok
    assert (tmp_path / "notebooks" / "measured.txt").read_text() == "x"
    results = runner.run_notebooks("ci", notebooks_dir=tmp_path / "workshop", out_root=out, replay=True)
    assert results[-1].ok and results[-1].output == out / "ci" / "workshop" / "00_measures.ipynb"
    assert not (tmp_path / "workshop" / "measured.txt").exists()  # replayed
    report = json.loads((out / "ci" / "measurements" / "00_measures.replay.json").read_text())
    assert (report["hits"], report["misses"]) == (1, 0)
    assert (out / "ci" / "runs-workshop.json").exists() and (out / "ci" / "notebooks" / "00_measures.ipynb").exists()


def test_recorded_calls_the_replay_does_not_make_are_passed_over(env):
    """The recording built an artifact (and measured inside it); the replay finds the artifact and skips that."""
    env("record")
    timed("block-a", ["x"])  # made only while the artifact was being built
    later = timed("variant", ["x", "y"])
    env("replay")
    assert timed("variant", ["x", "y"]) == later and CALLS == []
