"""The runner executes tiny generated notebooks in order, stops at a failure and names the cell."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from labkit.lab import runner
from labkit.lab.runner import RunnerError

REPO = Path(__file__).resolve().parents[1]

GREET = [  # 00: reads the injected PRESET and reports what the kernel sees
    ("parameters", 'PRESET = "default"  # papermill replaces this'),
    (None, "import json, os, sys\n"
           "print(json.dumps({'preset': PRESET, 'env_preset': os.environ['LABKIT_PRESET'],\n"
           "                  'run_id': os.environ['LABKIT_RUN_ID'], 'python': sys.executable}))"),
]  # fmt: skip
BOOM = [  # 01: fails in its third cell
    ("parameters", 'PRESET = "default"'),
    (None, "x = 1"),
    (None, "\n# the failing cell\nraise ValueError(f'boom {PRESET}')"),
]
NEVER = [(None, "open('never_ran', 'w').close()")]  # 02: must not run after 01 fails


def write_notebook(path: Path, cells: list[tuple[str | None, str]]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for tag, source in cells:
        cell = nbformat.v4.new_code_cell(source)
        if tag:
            cell.metadata["tags"] = [tag]
        nb.cells.append(cell)
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A notebooks dir with 00 (ok), 01 (raises), 02 (never reached), plus files the runner ignores."""
    root = tmp_path_factory.mktemp("lab")
    nbs = root / "notebooks"
    nbs.mkdir()
    write_notebook(nbs / "00_greet.ipynb", GREET)
    write_notebook(nbs / "01_boom.ipynb", BOOM)
    write_notebook(nbs / "02_never.ipynb", NEVER)
    write_notebook(nbs / "scratch.ipynb", NEVER)  # not NN_name: ignored
    (nbs / "README.md").write_text("not a notebook")
    return root


def output_json(nb_path: Path) -> dict:
    """The JSON printed by the GREET notebook's second cell in the executed copy."""
    nb = nbformat.read(nb_path, as_version=4)
    cell = next(c for c in nb.cells if "sys.executable" in c.source)
    return json.loads(cell.outputs[0]["text"])


def test_discover_orders_by_number_and_ignores_other_files(lab):
    names = [p.name for p in runner.discover(lab / "notebooks")]
    assert names == ["00_greet.ipynb", "01_boom.ipynb", "02_never.ipynb"]


@pytest.mark.parametrize(
    "only, expected",
    [(None, ["00", "01", "02"]), ("01", ["01"]), ("02,00", ["00", "02"]), (["1", "02"], ["01", "02"])],
)
def test_select_by_prefix_keeps_run_order(lab, only, expected):
    picked = runner.select(runner.discover(lab / "notebooks"), only)
    assert [p.name[:2] for p in picked] == expected


@pytest.mark.parametrize("only", ["07", "00,xx", ["greet"]])
def test_unknown_prefix_is_a_clear_error(lab, only):
    with pytest.raises(RunnerError, match=r"unknown notebook prefix.*available: 00, 01, 02"):
        runner.select(runner.discover(lab / "notebooks"), only)


def test_missing_notebook_dir_is_a_clear_error(tmp_path):
    with pytest.raises(RunnerError, match="does not exist"):
        runner.run_notebooks("ci", notebooks_dir=tmp_path / "nope", out_root=tmp_path)


@pytest.fixture(scope="module")
def ok_run(lab):
    out = lab / "artifacts-ok"
    return out, runner.run_notebooks("ci", only=["00"], notebooks_dir=lab / "notebooks", out_root=out)


def test_ok_run_writes_executed_copy_with_injected_preset(ok_run):
    out, results = ok_run
    assert [(r.name, r.status) for r in results] == [("00_greet", "ok")]
    executed = out / "ci" / "notebooks" / "00_greet.ipynb"
    assert results[0].output == executed.resolve() and executed.exists()
    seen = output_json(executed)
    assert seen["preset"] == seen["env_preset"] == "ci"
    # The kernel must be this interpreter, or notebooks would import a different labkit/torch.
    assert os.path.realpath(seen["python"]) == os.path.realpath(sys.executable)
    assert not list(executed.parent.glob(".*partial*"))  # the temporary copy was renamed


def test_ok_run_writes_runs_json(ok_run):
    out, results = ok_run
    runs = json.loads((out / "ci" / "runs.json").read_text())
    assert runs["schema"] == "labkit.runs/1" and runs["preset"] == "ci" and runs["status"] == "ok"
    assert runs["selected"] == ["00_greet"]
    [entry] = runs["notebooks"]
    assert entry["name"] == "00_greet" and entry["status"] == "ok" and entry["error"] is None
    assert entry["duration_s"] == pytest.approx(results[0].duration_s)
    assert output_json(out / "ci" / "notebooks" / "00_greet.ipynb")["run_id"] == runs["run_id"]


@pytest.fixture(scope="module")
def failed_run(lab):
    out = lab / "artifacts-failed"
    return out, runner.run_notebooks("ci", notebooks_dir=lab / "notebooks", out_root=out)


def test_failure_stops_the_sequence_and_names_the_cell(lab, failed_run):
    out, results = failed_run
    assert [(r.name, r.status) for r in results] == [("00_greet", "ok"), ("01_boom", "failed")]
    assert not (lab / "notebooks" / "never_ran").exists()
    error = results[-1].error
    assert (error.ename, error.evalue) == ("ValueError", "boom ci")
    assert error.first_line == "# the failing cell"
    assert error.cell_index == 2  # in the source notebook: parameters, x = 1, this cell
    assert error.exec_count == 4  # executed: parameters, injected parameters, x = 1, this cell
    assert results[-1].describe() == "01_boom failed at cell 2 (In [4]) `# the failing cell`: ValueError: boom ci"
    assert (out / "ci" / "notebooks" / "01_boom.ipynb").exists()  # kept for its traceback


def test_failure_is_recorded_in_runs_json(failed_run):
    out, _ = failed_run
    runs = json.loads((out / "ci" / "runs.json").read_text())
    assert runs["status"] == "failed"
    assert runs["selected"] == ["00_greet", "01_boom", "02_never"]
    assert [n["status"] for n in runs["notebooks"]] == ["ok", "failed"]
    assert runs["notebooks"][1]["error"]["ename"] == "ValueError"


def test_first_two_notebooks_share_a_run_id(failed_run):
    out, _ = failed_run
    runs = json.loads((out / "ci" / "runs.json").read_text())
    assert output_json(out / "ci" / "notebooks" / "00_greet.ipynb")["run_id"] == runs["run_id"]


def test_check_raises_notebook_failed(lab, tmp_path):
    with pytest.raises(runner.NotebookFailed, match="01_boom failed at cell 2"):
        runner.run_notebooks("ci", only="01", notebooks_dir=lab / "notebooks", out_root=tmp_path, check=True)


def test_failure_outside_a_cell_is_reported_without_one(lab, tmp_path):
    [result] = runner.run_notebooks("ci", only="00", notebooks_dir=lab / "notebooks", out_root=tmp_path,
                                    kernel="no-such-kernel")  # fmt: skip
    assert result.status == "failed" and result.error.cell_index is None
    assert result.describe().startswith("00_greet failed: NoSuchKernel")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "labkit", "run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_cli_exit_code_and_message_name_the_failed_notebook_and_cell(lab):
    proc = run_cli("--preset", "ci", "--only", "01", "--notebooks-dir", "notebooks", "--out", "cli-out", cwd=lab)
    assert proc.returncode == 1, proc.stderr
    assert "01_boom failed at cell 2 (In [4])" in proc.stderr and "ValueError: boom ci" in proc.stderr
    assert "01_boom   failed" in proc.stdout  # the status table
    assert (lab / "cli-out" / "ci" / "runs.json").exists()


@pytest.mark.parametrize("args, message", [(["--only", "09"], "unknown notebook prefix"),
                                           (["--notebooks-dir", "missing"], "does not exist")])  # fmt: skip
def test_cli_bad_input_exits_2(lab, args, message):
    proc = run_cli("--preset", "ci", "--notebooks-dir", "notebooks", *args, cwd=lab)
    assert proc.returncode == 2 and message in proc.stderr


def test_a_notebook_whose_needs_are_missing_is_skipped_with_the_reason(tmp_path, monkeypatch):
    """requirements.toml: 01 needs a capability this machine lacks -> skipped, said why; 02 still runs."""
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    write_notebook(nbs / "00_greet.ipynb", GREET)
    write_notebook(nbs / "01_gpu.ipynb", [(None, "raise RuntimeError('must not run')")])
    write_notebook(nbs / "02_after.ipynb", [(None, "x = 1")])
    (nbs / "requirements.toml").write_text('["01_gpu"]\nneeds = ["cuda"]\noptional = []\n')
    monkeypatch.setattr(runner.timing, "unavailable", lambda need: "needs an NVIDIA GPU (none found)")
    results = runner.run_notebooks("ci", notebooks_dir=nbs, out_root=tmp_path / "out")
    assert [r.status for r in results] == ["ok", "skipped", "ok"]
    assert results[1].reason == "cuda: needs an NVIDIA GPU (none found)" and results[1].ok
    runs = json.loads((tmp_path / "out" / "ci" / "runs-nbs.json").read_text())  # named after the folder run
    assert runs["status"] == "ok" and runs["notebooks"][1]["reason"].startswith("cuda:")


def test_requirements_name_only_known_capabilities(tmp_path):
    (tmp_path / "requirements.toml").write_text('["06_x"]\nneeds = ["quantum"]\n')
    with pytest.raises(RunnerError, match="unknown capabilities"):
        runner.requirements(tmp_path)
    assert set(runner.requirements(REPO / "notebooks")) >= {"06_tensorrt", "08_serving"}


def test_list_parameters_say_how_to_pass_them_with_papermill():
    """`-p NAME value` passes a string; a list or dict parameter needs `-y`, and its comment says so.
    (00's EXAMPLES are the box's demo inputs, not a knob to sweep.)"""
    import ast

    import nbformat

    for path in sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        for line in cell.source.splitlines():
            code, _, comment = line.partition("  # ")
            name, _, value = code.partition(" = ")
            if value and name != "EXAMPLES" and isinstance(ast.literal_eval(value), (list, dict, tuple)):
                assert "-y" in comment, f"{path.name}: {name} is a list; its comment must show papermill -y"
