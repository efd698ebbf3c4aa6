"""Run the lab's notebooks headless, in order, with papermill; stop at the first failure.

`run_notebooks("ci")` executes `notebooks/NN_*.ipynb` with the parameter PRESET="ci", writes
each executed copy to `artifacts/ci/notebooks/`, a status file `artifacts/ci/runs.json`, and
prints a status/duration table. The kernel gets LABKIT_PRESET, LABKIT_RUN_ID (one id for the
whole sequence, so its ledger records group together) and LABKIT_ARTIFACTS.

A notebook whose `needs` in notebooks/requirements.toml are absent here (a GPU, TensorRT, a
browser, the network) is skipped with the reason instead of failing; `optional` needs only
change which of its parts record a skip.

Left out on purpose: running notebooks in parallel (they build on each other's artifacts and
share the CPU that is being measured), retries, and resuming after a failure (run again with
`only=` from the failed notebook on).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from labkit.config import PRESETS
from labkit.core import artifacts
from labkit.core.artifacts import ARTIFACTS_ENV, write_json_atomic
from labkit.measure import ledger, timing
from labkit.measure import replay as replay_mod

REQUIREMENTS = "requirements.toml"  # next to the notebooks
NOTEBOOK_NAME = re.compile(r"^(\d{2})_\w[\w.-]*\.ipynb$")  # NN_name.ipynb
RUNS_SCHEMA = "labkit.runs/1"


class RunnerError(ValueError):
    """The run was asked for something that does not exist (a notebook prefix, a directory)."""


class NotebookFailed(RuntimeError):
    """A notebook failed; raised by `run_notebooks(check=True)`. `.results` holds what ran."""

    def __init__(self, results: list[NotebookResult]):
        self.results = results
        super().__init__(results[-1].describe())


@dataclass(frozen=True)
class CellFailure:
    """Where and how a notebook failed."""

    ename: str  # exception class name, e.g. "ValueError"
    evalue: str  # exception message
    cell_index: int | None = None  # 0-based index in the source notebook, as in nb.cells[i]
    exec_count: int | None = None  # the "In [k]" number in the executed copy
    first_line: str = ""  # first non-empty source line of the failing cell

    def describe(self) -> str:
        """E.g. cell 2 (In [4]) `raise ValueError('boom')`: ValueError: boom"""
        where = [] if self.cell_index is None else [f"cell {self.cell_index}"]
        where += [] if self.exec_count is None else [f"(In [{self.exec_count}])"]
        where += [f"`{self.first_line}`:"] if self.first_line else []
        return " ".join([*where, f"{self.ename}: {self.evalue}"])


@dataclass(frozen=True)
class NotebookResult:
    """Outcome of one notebook: status "ok", "failed" or "skipped", wall time, where the executed copy is."""

    name: str  # notebook stem, e.g. "00_setup_and_baseline"
    status: str
    duration_s: float
    output: Path  # executed copy (also written when the notebook failed, for debugging)
    error: CellFailure | None = None
    reason: str | None = None  # why it was skipped

    @property
    def ok(self) -> bool:
        """Nothing went wrong: it ran through, or it was skipped for a stated reason."""
        return self.status in ("ok", "skipped")

    def describe(self) -> str:
        """One line: "01_b ok", "01_b failed at cell 3 (In [4]) ..." or "01_b failed: DeadKernelError: ..."."""
        if self.status == "skipped":
            return f"{self.name} skipped: {self.reason}"
        if self.ok:
            return f"{self.name} ok"
        located = self.error.cell_index is not None or self.error.exec_count is not None
        return f"{self.name} failed{' at' if located else ':'} {self.error.describe()}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"output": str(self.output)}  # asdict turns `error` into a dict too


# ---------------------------------------------------------------- primitives


def discover(notebooks_dir: str | Path) -> list[Path]:
    """The lab's notebooks in `notebooks_dir`, ordered by number: NN_name.ipynb, nothing else."""
    folder = Path(notebooks_dir)
    if not folder.is_dir():
        raise RunnerError(f"notebook directory {folder} does not exist")
    found = [p for p in folder.iterdir() if p.is_file() and NOTEBOOK_NAME.match(p.name)]
    return sorted(found, key=lambda p: (int(p.name[:2]), p.name))


def requirements(notebooks_dir: str | Path) -> dict[str, dict[str, list[str]]]:
    """{notebook stem: {"needs": [...], "optional": [...]}} from requirements.toml ({} when there is none)."""
    path = Path(notebooks_dir) / REQUIREMENTS
    if not path.exists():
        return {}
    table = tomllib.loads(path.read_text())
    for stem, entry in table.items():
        unknown = (set(entry.get("needs", [])) | set(entry.get("optional", []))) - set(timing.CAPABILITIES)
        if unknown:
            raise RunnerError(f"{path}: {stem} names unknown capabilities {sorted(unknown)}; "
                              f"known: {', '.join(timing.CAPABILITIES)}")
    return table


def skip_reason(needs: list[str]) -> str | None:
    """Why a notebook with these hard `needs` cannot run here: "cuda: needs an NVIDIA GPU (none found)"."""
    missing = [f"{need}: {why}" for need in needs if (why := timing.unavailable(need))]
    return "; ".join(missing) or None


def select(paths: list[Path], only: str | Iterable[str] | None) -> list[Path]:
    """Keep notebooks whose number is in `only`, in run order. "00,01", ["1"] and ["01"] all work.

    only=["01"], paths=[00_a, 01_b, 02_c] -> [01_b]; only=["07"] with no 07 -> RunnerError
    """
    if only is None:
        return paths
    wanted = [s.strip() for s in (only.split(",") if isinstance(only, str) else only) if s.strip()]
    numbers = {int(p.name[:2]) for p in paths}
    unknown = [w for w in wanted if not w.isdigit() or int(w) not in numbers]
    if unknown:
        known = ", ".join(p.name[:2] for p in paths) or "none"
        raise RunnerError(f"unknown notebook prefix(es) {unknown}; available: {known}")
    return [p for p in paths if int(p.name[:2]) in {int(w) for w in wanted}]


def source_index(notebook: Path, source: str, near: int) -> int | None:
    """Index of the cell with `source` in the source notebook (closest to `near` if repeated).

    papermill's own index counts the cell it injects, and the executed copy also gains
    error-banner cells, so matching the source text is the one index a reader can use.
    """
    import nbformat

    cells = nbformat.read(notebook, as_version=4).cells
    matches = [i for i, cell in enumerate(cells) if cell.source == source]
    return min(matches, key=lambda i: abs(i - near), default=None)


def cell_failure(exc: BaseException, notebook: Path) -> CellFailure:
    """Turn papermill's PapermillExecutionError (or any other exception) into a CellFailure."""
    if hasattr(exc, "cell_index") and hasattr(exc, "ename"):
        source = exc.source or ""
        first = next((line.strip() for line in source.splitlines() if line.strip()), "")
        index = source_index(notebook, source, exc.cell_index)
        return CellFailure(exc.ename, exc.evalue, index, exc.exec_count, first)
    # Kernel death, timeouts, a missing kernel: papermill does not attribute these to a cell.
    lines = str(exc).strip().splitlines()
    return CellFailure(type(exc).__name__, lines[0] if lines else "")


def status_table(results: list[NotebookResult]) -> str:
    """A status/duration table, one row per notebook that ran."""
    width = max([len("notebook"), *(len(r.name) for r in results)])
    lines = [f"{'notebook':<{width}}  status  duration"]
    lines += [f"{r.name:<{width}}  {r.status:<7} {r.duration_s:7.1f} s" + (f"  ({r.reason})" if r.reason else "")
              for r in results]
    return "\n".join(lines)


@contextlib.contextmanager
def environ(**variables: str) -> Iterator[None]:
    """Set environment variables for the duration (the kernel inherits them), then restore."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------- runtime


def execute(
    notebook: Path, output: Path, preset: str, *, kernel: str, timeout_per_cell: float | None
) -> NotebookResult:
    """Execute one notebook into `output` (via a temporary file, renamed when papermill is done)."""
    import papermill

    notebook, output = notebook.resolve(), output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    # papermill saves after every cell; the partial file keeps the real name free of half runs.
    partial = output.with_name(f".{output.stem}.partial.ipynb")
    start = time.perf_counter()
    error = None
    try:
        papermill.execute_notebook(
            notebook, partial, parameters={"PRESET": preset}, kernel_name=kernel,
            log_output=False, progress_bar=False, cwd=notebook.parent,
            execution_timeout=timeout_per_cell,
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - any failure is reported, KeyboardInterrupt is not
        error = cell_failure(exc, notebook)
    finally:
        if partial.exists():
            os.replace(partial, output)
    status = "ok" if error is None else "failed"
    return NotebookResult(notebook.stem, status, time.perf_counter() - start, output, error)


def runs_record(preset: str, run_id: str, started: str, selected: list[Path],
                results: list[NotebookResult]) -> dict[str, Any]:  # fmt: skip
    """Content of runs.json: what was asked, what ran, how it ended."""
    failed = any(not r.ok for r in results)
    done = len(results) == len(selected)
    return {
        "schema": RUNS_SCHEMA,
        "preset": preset,
        "run_id": run_id,
        "started": started,
        "updated": ledger.utc_now(),
        "status": "failed" if failed else ("ok" if done else "running"),
        "selected": [p.stem for p in selected],
        "notebooks": [r.to_json() for r in results],
    }


# ---------------------------------------------------------------- handler


def run_notebooks(
    preset: str,
    only: str | Iterable[str] | None = None,
    notebooks_dir: str | Path | None = None,
    out_root: str | Path | None = None,
    kernel: str = "python3",
    timeout_per_cell: float | None = None,
    *,
    replay: bool = False,
    check: bool = False,
) -> list[NotebookResult]:
    """Execute the selected notebooks in order; stop after the first failure.

    Returns one result per notebook that ran (the last one is the failure, if any); with
    `check=True` a failure raises NotebookFailed instead. runs.json is rewritten after each
    notebook, so an interrupted sequence still leaves its progress. Executed copies go to
    `<out>/<preset>/<the notebooks folder's name>/` (notebooks/, or workshop/ for the participant copies).

    Every notebook's measurements are recorded (labkit.measure.replay); `replay=True` replays those of an
    earlier run with the same artifacts root instead of measuring again, and writes no ledger record.
    """
    notebooks_dir = Path(notebooks_dir or artifacts.REPO_ROOT / "notebooks")
    out_root = Path(out_root or artifacts.root())
    selected = select(discover(notebooks_dir), only)
    needs = requirements(notebooks_dir)
    if not selected:
        raise RunnerError(f"no NN_name.ipynb notebooks in {notebooks_dir}")
    out_dir = out_root / preset
    executed = out_dir / notebooks_dir.resolve().name
    runs_file = out_dir / ("runs.json" if executed.name == "notebooks" else f"runs-{executed.name}.json")
    run_id = os.environ.get(ledger.RUN_ID_ENV) or ledger.new_run_id()
    started, results = ledger.utc_now(), []
    kernel_env = {"LABKIT_PRESET": preset, ledger.RUN_ID_ENV: run_id, ARTIFACTS_ENV: str(out_root.resolve()),
                  replay_mod.MODE_ENV: "replay" if replay else "record"}  # fmt: skip
    with environ(**kernel_env):
        for i, notebook in enumerate(selected, start=1):
            print(f"[{i}/{len(selected)}] {notebook.stem} ...", flush=True)
            output = executed / notebook.name
            why = skip_reason(needs.get(notebook.stem, {}).get("needs", []))
            if why:
                print(f"  skipped: {why}", flush=True)
                result = NotebookResult(notebook.stem, "skipped", 0.0, output, reason=why)
            else:
                with environ(**{replay_mod.NOTEBOOK_ENV: notebook.stem}):
                    if not replay:  # a notebook that measures nothing must not leave an older run's cassette
                        replay_mod.cassette_path().unlink(missing_ok=True)
                    result = execute(notebook, output, preset, kernel=kernel, timeout_per_cell=timeout_per_cell)
            results.append(result)
            write_json_atomic(runs_file, runs_record(preset, run_id, started, selected, results))
            if not result.ok:
                break
    print(status_table(results), flush=True)
    if not results[-1].ok:
        print(results[-1].describe(), flush=True)
        if check:
            raise NotebookFailed(results)
    return results


# --------------------------------------------------------------------------- `labkit run`


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, help="ci, workshop, opus-mt-zh-en, opus-mt-shape, ...")
    parser.add_argument("--only", help="comma-separated notebook numbers, e.g. 00,01")
    parser.add_argument("--notebooks-dir", default=None, help="where NN_name.ipynb live (default: the lab's notebooks/)")
    parser.add_argument("--out", default=None, help="artifacts root (default $LABKIT_ARTIFACTS or artifacts/); output goes to <out>/<preset>/")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    parser.add_argument("--timeout-per-cell", type=float, default=None, help="seconds; default none")
    parser.add_argument("--replay", action="store_true",
                        help="replay the measurements an earlier run recorded in the same artifacts root instead of "
                             "measuring again (e.g. the participant notebooks after the instructor's); no ledger records")


def run_command(args: argparse.Namespace) -> int:
    """Handler of `labkit run`: 0 when every notebook passed, 1 on a failed notebook, 2 on bad input."""
    presets = sorted(PRESETS)
    if args.preset not in presets:
        print(f"labkit run: unknown preset {args.preset!r}; known: {', '.join(presets)}", file=sys.stderr)
        return 2
    try:
        results = run_notebooks(
            args.preset, only=args.only, notebooks_dir=args.notebooks_dir, out_root=args.out,
            kernel=args.kernel, timeout_per_cell=args.timeout_per_cell, replay=args.replay,
        )  # fmt: skip
    except RunnerError as exc:
        print(f"labkit run: {exc}", file=sys.stderr)
        return 2
    if results and not results[-1].ok:
        print(f"labkit run: notebook {results[-1].describe()}", file=sys.stderr)
        print(f"labkit run: executed copy with the traceback: {results[-1].output}", file=sys.stderr)
        return 1
    return 0
