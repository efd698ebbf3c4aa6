"""The conda environment mirrors pyproject; `import labkit` stays light and GPU-free."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[ ]", spec, maxsplit=1)[0].lower()


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"]) + project["optional-dependencies"]["peer"] \
        + project["optional-dependencies"]["test"]
    pip_lines = [line.strip()[2:] for line in (ROOT / "environment.yml").read_text().splitlines()
                 if line.strip().startswith("- ") and line.startswith("      ")]
    pip = {requirement_name(s): s for s in pip_lines if not s.startswith("-e")}
    for spec in wanted:
        name = requirement_name(spec)
        assert name in pip, f"environment.yml lacks {spec}"
        if name != "torch":  # the env pins the CPU wheel exactly
            assert pip[name] == spec, f"environment.yml has {pip[name]!r}, pyproject {spec!r}"
    assert pip["torch"] == "torch==2.13.0"
    assert set(pip) == {requirement_name(s) for s in wanted}, "environment.yml has extras pyproject lacks"


def test_import_labkit_needs_no_optional_dependency():
    # Every module imports without TensorRT or CTranslate2: they load only when a backend is used.
    code = ("import sys, pkgutil, importlib, labkit; "
            "[importlib.import_module(f'labkit.{m.name}') for m in pkgutil.iter_modules(labkit.__path__) if m.name != '__main__']; "
            "bad = [m for m in ('tensorrt', 'ctranslate2') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
