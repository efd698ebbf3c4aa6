"""Participant notebooks from the instructor's: solution regions become stubs, nothing else changes.

    labkit workshop build                     # notebooks/ -> workshop/ (committed; a test checks for drift)
    labkit workshop status run/               # which exercises pass in a participant's executed notebooks

An instructor notebook (notebooks/NN_name.ipynb, complete, what `make test` runs) marks each exercise's
solution the way nbgrader does:

    def kd_loss(student_logits, teacher_logits, T):
        ### BEGIN SOLUTION
        # hint: T^2 * KL(teacher || student) on logits divided by T; F.kl_div(student_log_p, teacher_log_p, ...)
        s = F.log_softmax(student_logits / T, dim=-1)
        ...
        ### END SOLUTION
    kd_loss = exercises.check_kd_loss(kd_loss)

The participant's copy keeps everything outside the markers and replaces the region by
`raise NotImplementedError("<the hint>")` at the marker's indentation; outputs and execution counts are
dropped. The build is deterministic (same input, same bytes), so a test can require that rebuilding
changes nothing (no drift) and that no solution line appears in workshop/ (no leaks).
Left out: nbgrader's grading database and hidden tests (the checks are for learning, not grades).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from labkit.core.artifacts import REPO_ROOT
from labkit.lab.exercises import EXERCISES, NOT_DONE, PASSED, VERDICT_PREFIX, WRONG

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
HINT = re.compile(r"^\s*# hint:\s*(.+)$")
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
WORKSHOP_DIR = REPO_ROOT / "workshop"
DEFAULT_HINT = "your code here (the markdown above says what to write)"


class WorkshopError(ValueError):
    """A notebook whose solution markers cannot be turned into a stub (unpaired, nested, outside code)."""


@dataclass(frozen=True)
class Region:
    cell: int  # index of the code cell
    begin: int  # line index of the BEGIN marker in that cell
    end: int  # line index of the END marker
    indent: str
    hint: str
    solution: list[str]  # the lines between the markers, hint line included

    @property
    def stub(self) -> str:
        """The line that replaces the region in the participant's copy."""
        return f"{self.indent}raise NotImplementedError({json.dumps(self.hint, ensure_ascii=False)})"


def _lines(cell: dict) -> list[str]:
    src = cell.get("source", "")
    return ("".join(src) if isinstance(src, list) else src).split("\n")


def regions(nb: dict, name: str = "notebook") -> list[Region]:
    """The solution regions of a notebook, in order; unpaired or nested markers are a WorkshopError."""
    found = []
    for k, cell in enumerate(nb["cells"]):
        lines = _lines(cell)
        marked = [i for i, line in enumerate(lines) if line.strip() in (BEGIN, END)]
        if marked and cell["cell_type"] != "code":
            raise WorkshopError(f"{name}: cell {k} is {cell['cell_type']}; solution markers belong in code cells")
        start = None
        for i in marked:
            is_begin = lines[i].strip() == BEGIN
            if is_begin == (start is not None):
                raise WorkshopError(f"{name}: cell {k} line {i + 1}: {lines[i].strip()!r} without its "
                                    f"{'END' if start is not None else 'BEGIN'}")
            if is_begin:
                start = i
                continue
            body = lines[start + 1:i]
            hint = next((m.group(1).strip() for line in body if (m := HINT.match(line))), DEFAULT_HINT)
            indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
            found.append(Region(k, start, i, indent, hint, body))
            start = None
        if start is not None:
            raise WorkshopError(f"{name}: cell {k} line {start + 1}: {BEGIN!r} without its END")
    return found


def participant_notebook(nb: dict, name: str = "notebook") -> dict:
    """The participant's copy: each solution region replaced by its stub, no outputs or execution counts, the
    metadata kept. Unpaired or nested markers are a WorkshopError."""
    by_cell: dict[int, list[Region]] = {}
    for region in regions(nb, name):
        by_cell.setdefault(region.cell, []).append(region)
    cells = []
    for k, cell in enumerate(nb["cells"]):
        cell = dict(cell)
        if cell["cell_type"] == "code":
            lines = _lines(cell)
            for region in reversed(by_cell.get(k, [])):  # from the bottom, so earlier line numbers stay valid
                lines[region.begin:region.end + 1] = [region.stub]
            cell["source"] = _as_source("\n".join(lines))
            cell["outputs"], cell["execution_count"] = [], None
        cells.append(cell)
    return {**nb, "cells": cells}


def _as_source(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def dumps(nb: dict) -> str:
    """The project's notebook file format (nbformat's: one-space indent, UTF-8 as is, final newline)."""
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def participant_texts(src: Path = NOTEBOOKS_DIR) -> dict[str, str]:
    """{file name: the participant copy's bytes as text} for every NN_*.ipynb of `src`."""
    return {path.name: dumps(participant_notebook(json.loads(path.read_text(encoding="utf-8")), path.name))
            for path in sorted(src.glob("[0-9][0-9]_*.ipynb"))}


def build_participant_notebooks(src: Path = NOTEBOOKS_DIR, out: Path = WORKSHOP_DIR) -> list[Path]:
    """Write the participant copy of every NN_*.ipynb of `src` into `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in participant_texts(src).items():
        target = out / name
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            tmp = target.with_suffix(".ipynb.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(target)
        written.append(target)
    return written


def drift(src: Path = NOTEBOOKS_DIR, out: Path = WORKSHOP_DIR) -> list[str]:
    """What a rebuild would change in `out`: missing, stale or extra participant notebooks (empty: none)."""
    problems = []
    expected = participant_texts(src)
    for name, text in expected.items():
        target = out / name
        if not target.exists():
            problems.append(f"{name}: missing (run `labkit workshop build`)")
        elif target.read_text(encoding="utf-8") != text:
            problems.append(f"{name}: differs from its instructor notebook (run `labkit workshop build`)")
    problems += [f"{p.name}: no instructor notebook of that name" for p in sorted(out.glob("[0-9][0-9]_*.ipynb"))
                 if p.name not in expected]
    return problems


def leaks(src: Path = NOTEBOOKS_DIR, out: Path = WORKSHOP_DIR) -> list[str]:
    """Solution lines found in the participant notebooks: any code line of a region in the participant's copy of
    its cell, or (lines of 20 characters or more, which cannot be coincidences) anywhere in the notebook."""
    found = []
    for path in sorted(src.glob("[0-9][0-9]_*.ipynb")):
        target = out / path.name
        if not target.exists():
            continue
        participant = json.loads(target.read_text(encoding="utf-8"))
        every_line = {line.strip() for cell in participant["cells"] for line in _lines(cell)}
        for region in regions(json.loads(path.read_text(encoding="utf-8")), path.name):
            cell = participant["cells"][region.cell] if region.cell < len(participant["cells"]) else {"source": ""}
            same_cell = {line.strip() for line in _lines(cell)}
            for line in region.solution:
                code = line.strip()
                if code and not code.startswith("#") and (code in same_cell or (len(code) >= 20 and code in every_line)):
                    found.append(f"{path.name} cell {region.cell}: {code!r}")
    return found


def exercises_markdown() -> str:
    """The exercise table of workshop/README.md, from the registry (a test keeps the README in step):
    notebook, exercise, what the participant writes, minutes, and the mistakes its check names."""
    lines = ["| notebook | exercise | the participant writes | min | mistakes the check names |",
             "|---|---|---|---|---|"]
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    for e in EXERCISES.values():
        mistakes = "<br>".join(f"• {cell(hint)}" for hint in dict.fromkeys(h for _, h in e.wrong))
        lines.append(f"| {e.notebook} | `{e.name}` | {cell(e.task)} | {e.minutes} | {mistakes} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- status of executed notebooks

_VERDICT = re.compile(rf"^{VERDICT_PREFIX}(?P<name>[\w-]+): (?P<status>{PASSED}|{NOT_DONE}|{WRONG})\b(?P<rest>.*)$")


def status(directory: Path) -> list[dict]:
    """One row per exercise verdict printed in the executed notebooks of `directory` (the last one wins)."""
    rows: dict[tuple[str, str], dict] = {}
    for path in sorted(Path(directory).glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        for cell in nb["cells"]:
            for output in cell.get("outputs", []):
                text = output.get("text", "")
                for line in ("".join(text) if isinstance(text, list) else text).splitlines():
                    if m := _VERDICT.match(line):
                        rows[(path.name, m["name"])] = {"notebook": path.name, "exercise": m["name"],
                                                        "status": m["status"], "detail": m["rest"].strip(" ✓…✗;")}
    return list(rows.values())


# --------------------------------------------------------------------------- `labkit workshop`


def add_workshop_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("build", "check", "status"),
                        help="build: write workshop/ from notebooks/; check: fail on drift or leaked solutions; "
                             "status: which exercises pass in DIR's executed notebooks")
    parser.add_argument("dir", nargs="?", help="status: a directory of executed participant notebooks")


def workshop_command(args: argparse.Namespace) -> int:
    """Handler of `labkit workshop`: 0 ok, 1 drift or leaks found, 2 bad input."""
    try:
        if args.action == "build":
            for path in build_participant_notebooks():
                print(path)
            return 0
        if args.action == "check":
            problems = drift() + [f"solution leaked: {x}" for x in leaks()]
            for line in problems:
                print(f"labkit workshop check: {line}", file=sys.stderr)
            print("workshop ok: participant notebooks match the instructor's, no solution in them" if not problems
                  else f"{len(problems)} problem(s)")
            return 1 if problems else 0
    except WorkshopError as exc:
        print(f"labkit workshop: {exc}", file=sys.stderr)
        return 2
    if not args.dir:
        print("labkit workshop status: name the directory of executed notebooks, e.g. `labkit workshop status run/`",
              file=sys.stderr)
        return 2
    rows = status(args.dir)
    if not rows:
        print(f"no exercise verdicts in {args.dir}: run the participant notebooks first")
        return 0
    width = max(len(r["exercise"]) for r in rows)
    for r in rows:
        print(f"{r['notebook'][:2]}  {r['exercise']:<{width}}  {r['status']:<12}  {r['detail']}")
    passed = sum(r["status"] == "passed" for r in rows)
    print(f"{passed} of {len(rows)} exercises pass")
    return 0
