"""The names a participant types: `import labkit` and `labkit --help` work as their docs say."""

from __future__ import annotations

import doctest
import subprocess
import sys

import labkit


def test_the_package_docstring_example_runs_on_the_committed_teacher():
    result = doctest.testmod(labkit, verbose=False, report=True)
    assert result.attempted >= 8
    assert result.failed == 0


def test_every_top_level_name_resolves_and_help_lists_only_them():
    assert dir(labkit) == sorted(labkit.__all__)
    for name in labkit.__all__:
        assert getattr(labkit, name) is not None, name
    assert labkit.Translator.__name__ == "StepperTranslator"  # it takes a bundle
    try:
        labkit.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


def _imports_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return set(out.split())


def test_import_labkit_and_labkit_help_do_not_import_torch():
    assert "torch" not in _imports_after("import labkit")
    modules = _imports_after(
        "import contextlib, io, labkit.cli\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    labkit.cli.main(['--help'])")
    assert "torch" not in modules and "labkit.cli" in modules


def test_labkit_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "labkit", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for command in ("run", "data", "bench", "gpu-check", "serve", "loadtest"):
        assert command in out.stdout
