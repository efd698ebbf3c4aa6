"""Where a run's artifacts live, and the builders that make each notebook standalone.

Everything a run produces goes under `<root>/<preset>/` where root is
$LABKIT_ARTIFACTS (the runner sets it) or `artifacts/` at the repository root,
so a notebook opened interactively from notebooks/ writes to the same place as
a headless run. Each `ensure_*` builds its artifact if missing and returns its
path; builders live next to their technique (labkit.prune, labkit.distill, ...).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS_ENV = "LABKIT_ARTIFACTS"


def root() -> Path:
    return Path(os.environ.get(ARTIFACTS_ENV) or REPO_ROOT / "artifacts")


def preset_dir(preset: str) -> Path:
    """artifacts/<preset>, created on first use: preset_dir("ci") -> <root>/ci."""
    path = root() / preset
    path.mkdir(parents=True, exist_ok=True)
    return path


def commit_dir(tmp: Path | str, out: Path | str) -> None:
    """Move a fully written directory `tmp` into place at `out`, replacing any old one.

    The old directory is renamed aside first and deleted only after the new one is in place, so a
    crash leaves either the old artifact or the new one at `out` (plus a `.old` leftover), never an
    empty path or a half-written one. tmp=".x.tmp", out="x": x -> .x.old-<pid>, .x.tmp -> x, rm .x.old-<pid>.
    """
    tmp, out = Path(tmp), Path(out)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)  # put the old artifact back
        raise
    shutil.rmtree(old, ignore_errors=True)


def teacher_for(preset):
    """The preset's parent model as a Bundle (the embedded teacher, a hub model, or opus-mt-shape)."""
    from labkit.config import Preset
    from labkit.models import load_model

    preset = Preset.from_name(preset) if isinstance(preset, str) else preset
    bundle = load_model(preset.model)
    bundle.meta.setdefault("name", "teacher")
    return bundle


def ensure_teacher() -> Path:
    """The committed teacher; it is not rebuilt on the fly (that takes ~40 min on 2 cores)."""
    from labkit.models import SIDECAR, TEACHER_DIR

    if not (TEACHER_DIR / SIDECAR).exists():
        raise FileNotFoundError(f"{TEACHER_DIR} is missing: restore it from git or run "
                                "`python -m labkit.train teacher`")
    return TEACHER_DIR
