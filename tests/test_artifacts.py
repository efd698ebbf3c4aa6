"""Artifact paths and the directory swap every builder (bundles, ONNX exports, CTranslate2 models) uses."""

from __future__ import annotations

import json
import os

import pytest

from labkit.core import artifacts


def test_commit_dir_never_deletes_the_old_artifact_first(tmp_path, monkeypatch):
    """The new directory replaces the old one by renames; if the second rename fails, the old
    artifact is put back, and nothing is left beside it either way."""
    out, new = tmp_path / "ct2", tmp_path / ".ct2.new"
    out.mkdir()
    (out / "model.bin").write_text("old")
    new.mkdir()
    (new / "model.bin").write_text("new")
    real_replace, calls = os.replace, []

    def failing_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_second)
    with pytest.raises(OSError, match="disk full"):
        artifacts.commit_dir(new, out)
    assert (out / "model.bin").read_text() == "old"
    monkeypatch.setattr(os, "replace", real_replace)
    artifacts.commit_dir(new, out)
    assert (out / "model.bin").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct2"]


def test_commit_dir_into_an_empty_place(tmp_path):
    new = tmp_path / ".x.tmp"
    new.mkdir()
    artifacts.commit_dir(new, tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_preset_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(artifacts.ARTIFACTS_ENV, str(tmp_path))
    assert artifacts.preset_dir("ci") == tmp_path / "ci" and (tmp_path / "ci").is_dir()


def _builder(calls: list, content: str):
    def build(tmp):
        calls.append(content)
        (tmp / "payload.txt").write_text(content)
        (tmp / "side.json").write_text(json.dumps({"schema": "test/1"}))
    return build


def test_ensure_builds_once_per_recipe_and_records_it(tmp_path):
    """Same recipe: reused. Another recipe (a changed parent digest): rebuilt. The sidecar keeps both
    the builder's own fields and the artifact section."""
    calls, out = [], tmp_path / "a"
    assert artifacts.ensure(out, "side.json", {"parent": "d1"}, _builder(calls, "one")) == out
    assert artifacts.ensure(out, "side.json", {"parent": "d1"}, _builder(calls, "two")) == out
    assert calls == ["one"] and (out / "payload.txt").read_text() == "one"
    artifacts.ensure(out, "side.json", {"parent": "d2"}, _builder(calls, "three"))
    assert calls == ["one", "three"] and (out / "payload.txt").read_text() == "three"
    meta = json.loads((out / "side.json").read_text())
    assert meta["schema"] == "test/1" and meta["artifact"] == {"schema": artifacts.ARTIFACT_SCHEMA,
                                                                "recipe": {"parent": "d2"}}
    assert artifacts.recorded_recipe(out, "side.json") == {"parent": "d2"}


def test_ensure_rebuilds_what_no_longer_validates(tmp_path):
    calls, out = [], tmp_path / "a"
    artifacts.ensure(out, "side.json", {"k": 1}, _builder(calls, "one"))
    artifacts.ensure(out, "side.json", {"k": 1}, _builder(calls, "two"), valid=lambda p: False)
    assert calls == ["one", "two"]


def test_a_failed_build_leaves_the_old_artifact_whole(tmp_path):
    calls, out = [], tmp_path / "a"
    artifacts.ensure(out, "side.json", {"k": 1}, _builder(calls, "old"))

    def broken(tmp):
        (tmp / "payload.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        artifacts.ensure(out, "side.json", {"k": 2}, broken)
    assert (out / "payload.txt").read_text() == "old" and artifacts.recorded_recipe(out, "side.json") == {"k": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"], "no staging directory left behind"


def test_a_builder_must_write_its_sidecar(tmp_path):
    with pytest.raises(RuntimeError, match="did not write its sidecar"):
        artifacts.ensure(tmp_path / "a", "side.json", {}, lambda tmp: (tmp / "x").write_text("x"))
    assert not (tmp_path / "a").exists()


def test_recipes_compare_as_json(tmp_path):
    """A tuple in the recipe reads back as a list: the same recipe, not a rebuild."""
    calls, out = [], tmp_path / "a"
    artifacts.ensure(out, "side.json", {"rounds": (0.1, 0.25)}, _builder(calls, "one"))
    artifacts.ensure(out, "side.json", {"rounds": [0.1, 0.25]}, _builder(calls, "two"))
    assert calls == ["one"]
