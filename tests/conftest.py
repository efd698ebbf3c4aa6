"""Shared fixtures: one tiny trained Marian bundle per test session.

Tiny (2+2 layers, d_model 64) and trained for a few seconds on the committed
corpus, so its greedy outputs vary with the input: oracle tests compare real
decodes rather than a constant token stream.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from labkit.compress.training import TeacherConfig, train_teacher
from labkit.core import data
from labkit.core.bundle import Bundle, load_bundle
from labkit.measure import timing

TINY_STEPS = 600


def hardware_missing() -> dict[str, str]:
    """Why each hardware marker cannot run here: {"cuda": "needs an NVIDIA GPU (none found)", ...}."""
    return {m: why for m in ("cuda", "tensorrt") if (why := timing.unavailable(m))}


def pytest_collection_modifyitems(config, items):
    """`cuda` and `tensorrt` tests skip, with the reason, where the hardware or package is absent."""
    missing = hardware_missing()
    for item in items:
        for marker in ("cuda", "tensorrt"):
            if marker in item.keywords and marker in missing:
                item.add_marker(pytest.mark.skip(reason=f"{marker}: {missing[marker]}"))


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory):
    torch.set_num_threads(1)
    cfg = dataclasses.replace(TeacherConfig.from_name("tiny"), steps=TINY_STEPS, eval_every=TINY_STEPS // 3)
    out = tmp_path_factory.mktemp("tiny") / "teacher"
    train_teacher(cfg, out, train=data.load_split("train", limit=6000), dev=data.load_split("dev", limit=20),
                  command="tests/conftest.py", progress=False, storage_dtype=torch.float32)
    return out


@pytest.fixture()
def tiny_bundle(tiny_bundle_dir) -> Bundle:
    """A fresh copy per test, so a test may prune or quantize it in place."""
    return load_bundle(tiny_bundle_dir)


@pytest.fixture(scope="module")
def tiny_module_bundle(tiny_bundle_dir) -> Bundle:
    """One copy of the tiny fixture per test module (for modules that only read it)."""
    torch.set_num_threads(1)
    return load_bundle(tiny_bundle_dir)


@pytest.fixture(scope="module")
def tiny_onnx_dir(tiny_module_bundle, tmp_path_factory):
    """The tiny fixture's TorchScript export (seconds; ModelOpt and TensorRT checks convert either exporter's graphs)."""
    from labkit.engines.onnx_export import export

    return export(tiny_module_bundle, tmp_path_factory.mktemp("onnx") / "fp32", exporters=("torchscript",))
