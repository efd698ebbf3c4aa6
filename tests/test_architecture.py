"""labkit's shape stays as designed: one-way layers, no cycles, small modules, one name per thing, lint-clean."""

from __future__ import annotations

import ast
import collections
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "labkit"
BIN = Path(sys.executable).parent
MAX_MODULE_LINES = 600


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))


def test_import_contracts_hold():
    """import-linter: the layers contract and no cycles, function-local imports included."""
    lint = BIN / "lint-imports"
    if not lint.exists():
        pytest.fail(f"{lint} is missing: install the test extra (pip install -e '.[test]')")
    proc = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]


def test_ruff_is_clean():
    ruff = BIN / "ruff"
    if not ruff.exists():
        pytest.fail(f"{ruff} is missing: install the test extra (pip install -e '.[test]')")
    proc = subprocess.run([str(ruff), "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_small_and_says_its_job(path: Path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: split it by concept"
    doc = ast.get_docstring(ast.parse(text))
    assert doc and len(doc.splitlines()) >= 2, f"{path.name}: a one-line job and an example in the docstring"


def test_no_function_local_labkit_imports():
    """labkit imports its own modules at the top: a local import hides a cycle from the reader."""
    local = []
    for path in modules() + [PACKAGE / "__main__.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("labkit"):
                        local.append(f"{path.relative_to(ROOT)}:{sub.lineno}")
    assert not local, local


def test_module_and_public_names_are_unique():
    """No two modules, and no two public functions or classes, share a name for different things."""
    stems = collections.Counter(p.stem for p in modules())
    assert [s for s, n in stems.items() if n > 1] == []
    where = collections.defaultdict(list)
    for path in modules():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                where[node.name].append(str(path.relative_to(PACKAGE)))
    assert {n: w for n, w in where.items() if len(w) > 1} == {}
