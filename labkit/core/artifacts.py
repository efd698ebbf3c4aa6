"""Where a run's artifacts live, and the one shape every built artifact has.

Everything a run produces goes under `<root>/<preset>/` where root is $LABKIT_ARTIFACTS (the
runner sets it) or `artifacts/` at the repository root, so a notebook opened interactively from
notebooks/ writes to the same place as a headless run.

Every builder (`ensure_onnx`, `ensure_quantized`, `ensure_blocks`, `ensure_ct2`, `ensure_pruned`,
`ensure_student`, `ensure_seq_kd`) is one call of `ensure`, in the spirit of CTranslate2's
`Converter.convert`: a staging directory next to the target, a sidecar whose `artifact` section
holds the schema and the full recipe (settings plus the digests of every parent), and one atomic
commit. A cached artifact is reused exactly when its recorded recipe equals the one asked for, so
a changed parent or setting rebuilds it and nothing else does:

    path = ensure(out, "onnx.json", {"opset": 18, "parent": fingerprint(model)}, build=lambda tmp: ...)

Left out: garbage collection of stale artifacts (`make clean`), and locking between two processes
building the same artifact at once (the second commit wins; both are whole).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]  # labkit/core/artifacts.py -> the repository
ARTIFACTS_ENV = "LABKIT_ARTIFACTS"
ARTIFACT_SCHEMA = "labkit.artifact/1"
ARTIFACT_KEY = "artifact"  # the sidecar section `ensure` writes and reads


def root() -> Path:
    return Path(os.environ.get(ARTIFACTS_ENV) or REPO_ROOT / "artifacts")


def preset_dir(preset: str) -> Path:
    """artifacts/<preset>, created on first use: preset_dir("ci") -> <root>/ci."""
    path = root() / preset
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json_atomic(path: Path | str, data) -> None:
    """Write JSON via a temporary file in the same directory and a rename, so readers never see half a file."""
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


@contextlib.contextmanager
def staging(out: Path | str) -> Iterator[Path]:
    """A fresh directory next to `out`, committed to `out` (commit_dir) when the block ends, deleted if it raises.

        with staging("artifacts/ci/onnx-teacher") as tmp:
            (tmp / "encoder_model.onnx").write_bytes(...)   # nothing at the target changes until here
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tmp.chmod(0o755)  # mkdtemp makes it private; an artifact is a normal, shareable directory
    try:
        yield tmp
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def jsonable(obj: Any) -> Any:
    """What `obj` reads back as from JSON (tuples -> lists, Paths -> strings), so recipes compare equal."""
    return json.loads(json.dumps(obj, default=str))


def digest(path: Path | str) -> str:
    """sha256 of a file (a parent's sidecar, which lists its files' sizes and its own recipe)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_json(path: Path | str) -> dict | None:
    """A JSON object from `path`; None when it is missing, corrupt or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def recorded_recipe(out: Path | str, sidecar: str) -> dict | None:
    """The recipe `ensure` recorded for the artifact at `out`, None when there is none."""
    section = (read_json(Path(out) / sidecar) or {}).get(ARTIFACT_KEY)
    if not isinstance(section, dict) or section.get("schema") != ARTIFACT_SCHEMA:
        return None
    return section.get("recipe")


def ensure(out: Path | str, sidecar: str, recipe: Mapping[str, Any], build: Callable[[Path], None],
           valid: Callable[[Path], bool] = lambda path: True) -> Path:
    """`out`, built by `build(tmp)` unless it already holds exactly `recipe` and `valid(out)` holds.

    `build` writes every file, its own `sidecar` included, into the staging directory `tmp`;
    `ensure` adds the sidecar's `artifact` section ({schema, recipe}) and commits `tmp` to `out`
    atomically. A build that raises leaves the old artifact (or nothing) in place, never half of one.
    """
    out, recipe = Path(out), jsonable(recipe)
    if recorded_recipe(out, sidecar) == recipe and valid(out):
        return out
    with staging(out) as tmp:
        build(tmp)
        meta = read_json(tmp / sidecar)
        if meta is None:
            raise RuntimeError(f"the builder of {out} did not write its sidecar {sidecar}")
        write_json_atomic(tmp / sidecar, {**meta, ARTIFACT_KEY: {"schema": ARTIFACT_SCHEMA, "recipe": recipe}})
    return out
