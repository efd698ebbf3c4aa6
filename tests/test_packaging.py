"""The conda environment mirrors pyproject; `import labkit` stays light and GPU-free."""

from __future__ import annotations

import os
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
    extras = project["optional-dependencies"]
    wanted = list(project["dependencies"]) + extras["peer"] + extras["graphs"] + extras["serve"] + extras["test"]
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
    # Every module imports without TensorRT, CTranslate2 or ModelOpt: they load only when a backend is used.
    code = ("import sys, pkgutil, importlib, labkit; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(labkit.__path__, 'labkit.') "
            "if not m.name.endswith('__main__')]; "
            "bad = [m for m in ('tensorrt', 'ctranslate2', 'modelopt', 'polygraphy') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_environment_yml_pins_the_python_pyproject_requires():
    floor = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    pins = re.findall(r"^\s*- python\s*=+\s*([\d.]+)\s*$", (ROOT / "environment.yml").read_text(), re.M)
    assert pins, "environment.yml names no python version"
    major_minor = tuple(int(x) for x in pins[0].split(".")[:2])
    assert major_minor >= tuple(int(x) for x in floor.lstrip(">=").split(".")[:2]), (pins, floor)


def test_hardware_markers_skip_with_a_reason(tmp_path):
    """A `cuda` / `tensorrt` test skips where the hardware is absent (and runs where it is)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from conftest import hardware_missing
    finally:
        sys.path.pop(0)
    missing = hardware_missing()
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_hw.py").write_text(
        "import pytest\n"
        "@pytest.mark.cuda\ndef test_cuda():\n    pass\n"
        "@pytest.mark.tensorrt\ndef test_trt():\n    pass\n"
        "def test_plain():\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path),
                           "-o", "markers=cuda\n tensorrt", "-o", "addopts="],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"})  # the outer run's options
    out = proc.stdout
    assert proc.returncode == 0, out[-2000:]
    assert f"{3 - len(missing)} passed" in out, out[-2000:]
    for marker, reason in missing.items():
        assert f"{marker}: {reason}" in out, out[-2000:]
