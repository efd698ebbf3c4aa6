"""Where a run's artifacts live, and the builders that make each notebook standalone.

Everything a run produces goes under `<root>/<preset>/` where root is
$LABKIT_ARTIFACTS (the runner sets it) or `artifacts/` at the repository root,
so a notebook opened interactively from notebooks/ writes to the same place as
a headless run. Each `ensure_*` builds its artifact if missing and returns its
path; builders live next to their technique (labkit.compress.prune, labkit.compress.distill, ...).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # labkit/core/artifacts.py -> the repository
ARTIFACTS_ENV = "LABKIT_ARTIFACTS"


def root() -> Path:
    return Path(os.environ.get(ARTIFACTS_ENV) or REPO_ROOT / "artifacts")


def preset_dir(preset: str) -> Path:
    """artifacts/<preset>, created on first use: preset_dir("ci") -> <root>/ci."""
    path = root() / preset
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json_atomic(path: Path | str, data) -> None:
    """Write JSON via a temporary file in the same directory and a rename, so readers never see half a file."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def commit_dir(tmp: Path | str, out: Path | str) -> None:
    """Move a fully written directory `tmp` into place at `out`, replacing any old one.

    The old directory is renamed aside first and deleted only after the new one is in place, so a
    crash leaves either the old artifact or the new one at `out` (plus a `.x.old.*` leftover), never
    an empty path or a half-written one: x -> .x.old.<random>, tmp -> x, rm .x.old.<random>.
    """
    import tempfile

    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
        os.replace(out, old)  # onto the empty placeholder mkdtemp made
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)  # put the old artifact back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
