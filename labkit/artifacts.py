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


def teacher_for(preset):
    """The preset's parent model as a Bundle (the embedded teacher, a hub model, or opus-mt-shape)."""
    from labkit.config import Preset
    from labkit.models import load_model

    preset = Preset.from_name(preset) if isinstance(preset, str) else preset
    bundle = load_model(preset.model)
    bundle.meta.setdefault("name", "teacher")
    return bundle


def bundle_for(preset, name: str = "teacher"):
    """A bundle by name: "teacher" is the preset's model, anything else a bundle directory under
    artifacts/<preset> that an earlier notebook cached (what distillation, export and bench start from).

    bundle_for("ci", "pruned-25pct") loads the head-pruned teacher notebook 02 caches; a missing
    one is an error that lists what is there and says how to make it.
    """
    from labkit.models import SIDECAR, load_bundle

    if name == "teacher":
        return teacher_for(preset)
    preset_name = preset if isinstance(preset, str) else preset.name
    path = preset_dir(preset_name) / name
    if not (path / SIDECAR).exists():
        there = sorted(p.parent.name for p in path.parent.glob(f"*/{SIDECAR}"))
        raise FileNotFoundError(
            f"no bundle {name!r} under {path.parent} (there: {', '.join(there) or 'none'}); build it first: "
            f"notebook 02 / labkit.prune.ensure_pruned caches pruned-<pct>pct (pruned-<pct>pct-ft when its budget "
            "fine-tunes), notebook 03 / labkit.distill.ensure_student caches student-<strategy>")
    return load_bundle(path)


def ensure_teacher() -> Path:
    """The committed teacher; it is not rebuilt on the fly (that takes ~40 min on 2 cores)."""
    from labkit.models import SIDECAR, TEACHER_DIR

    if not (TEACHER_DIR / SIDECAR).exists():
        raise FileNotFoundError(f"{TEACHER_DIR} is missing: restore it from git or run "
                                "`python -m labkit.train teacher`")
    return TEACHER_DIR
