"""Participant notebooks: generated from the instructor's without drift or leaks, stubs that say "not done
yet", and every stub, filled with its solution, passes its check."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

from labkit import cli
from labkit.lab import exercises, workshop

NOTEBOOKS = sorted(workshop.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def _nb(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _run_cell(source: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, "<exercise cell>", "exec"), {"__name__": "__exercise__"})
    return out.getvalue()


EXERCISE_CELLS = [(path.name, r) for path in NOTEBOOKS for r in workshop.regions(_nb(path), path.name)]


def test_committed_participant_notebooks_have_no_drift_and_no_leaked_solution():
    assert workshop.drift() == []
    assert workshop.leaks() == []


def test_every_exercise_has_one_solution_region_and_one_check_call():
    assert len(EXERCISE_CELLS) >= 10
    called = [name for path in NOTEBOOKS for cell in _nb(path)["cells"] for name in exercises.EXERCISES
              if f"check_{name.replace('-', '_')}(" in "".join(cell["source"])]
    assert sorted(called) == sorted(exercises.EXERCISES)


@pytest.mark.parametrize("name, region", EXERCISE_CELLS, ids=[f"{n[:2]}-cell{r.cell}" for n, r in EXERCISE_CELLS])
def test_a_stub_is_not_done_yet_and_filled_with_its_solution_it_passes(name, region):
    participant = _nb(workshop.WORKSHOP_DIR / name)["cells"][region.cell]
    stub = "".join(participant["source"])
    assert "raise NotImplementedError(" in stub and "### BEGIN SOLUTION" not in stub
    assert ": not done yet" in _run_cell(stub)
    stub_line = next(line for line in stub.split("\n") if "raise NotImplementedError(" in line)
    filled = stub.replace(stub_line, "\n".join(region.solution))
    assert ": passed" in _run_cell(filled)


def test_the_build_is_deterministic_and_rewrites_nothing_when_nothing_changed(tmp_path):
    first = {p.name: p.read_bytes() for p in workshop.build_participant_notebooks(out=tmp_path)}
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = {p.name: p.read_bytes() for p in workshop.build_participant_notebooks(out=tmp_path)}
    assert first == again and mtimes == {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert all(not c.get("outputs") for p in tmp_path.iterdir() for c in _nb(p)["cells"])


def test_drift_and_leaks_are_found(tmp_path):
    out = tmp_path / "workshop"
    shutil.copytree(workshop.WORKSHOP_DIR, out)
    name, region = EXERCISE_CELLS[0]
    nb = _nb(out / name)
    leaked = next(line for line in region.solution if line.strip() and not line.strip().startswith("#"))
    nb["cells"][region.cell]["source"].append("\n" + leaked)
    (out / name).write_text(workshop.dumps(nb), encoding="utf-8")
    assert workshop.drift(out=out) == [f"{name}: differs from its instructor notebook (run `labkit workshop build`)"]
    assert workshop.leaks(out=out) == [f"{name} cell {region.cell}: {leaked.strip()!r}"]
    (out / "01_profiling.ipynb").unlink()
    assert "01_profiling.ipynb: missing (run `labkit workshop build`)" in workshop.drift(out=out)


@pytest.mark.parametrize("source, problem", [
    ("### BEGIN SOLUTION\nx = 1\n", "without its END"),
    ("x = 1\n### END SOLUTION\n", "without its BEGIN"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", "without its END"),
])
def test_unpaired_markers_are_a_clear_error(source, problem):
    nb = {"cells": [{"cell_type": "code", "source": source, "metadata": {}, "outputs": []}]}
    with pytest.raises(workshop.WorkshopError, match=problem):
        workshop.participant_notebook(nb, "bad.ipynb")


def test_status_reads_the_verdicts_of_executed_notebooks(tmp_path, capsys):
    def executed(lines):
        return {"cells": [{"cell_type": "code", "source": "", "metadata": {},
                           "outputs": [{"output_type": "stream", "name": "stdout", "text": lines}]}]}

    (tmp_path / "03_distillation.ipynb").write_text(json.dumps(executed(
        ["exercise kd-loss: wrong ✗ the loss is T^2 times too small; the notebook goes on\n"])))
    (tmp_path / "01_profiling.ipynb").write_text(json.dumps(executed(
        ["exercise amdahl: passed ✓ on 4 inputs\n", "decode is 80% of the time\n"])))
    rows = workshop.status(tmp_path)
    assert [(r["exercise"], r["status"]) for r in rows] == [("amdahl", "passed"), ("kd-loss", "wrong")]
    assert rows[1]["detail"].startswith("the loss is T^2 times too small")
    assert cli.main(["workshop", "status", str(tmp_path)]) == 0
    assert "1 of 2 exercises pass" in capsys.readouterr().out


def test_the_command_checks_the_committed_copies(capsys):
    assert cli.main(["workshop", "check"]) == 0
    assert "workshop ok" in capsys.readouterr().out


def test_the_workshop_readme_lists_every_exercise_as_the_registry_says():
    readme = (workshop.WORKSHOP_DIR / "README.md").read_text(encoding="utf-8")
    assert workshop.exercises_markdown() in readme
