"""Artifact paths and the directory swap every builder (bundles, ONNX exports, CTranslate2 models) uses."""

from __future__ import annotations

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
