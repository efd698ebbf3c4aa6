"""ONNX Runtime stepper: greedy and beam over three sessions must equal Hugging Face `generate`.

Oracle: `model.generate` on the tiny teacher (greedy and beam, with length
penalty), and the PyTorch Translator's texts. Session options and error
messages are checked directly.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from labkit import data, export, runtime
from labkit.decode import DecodeConfig, TorchStepper, decode, strip
from labkit.runtime import OrtStepper


@pytest.fixture(scope="module")
def setup(tiny_bundle_dir, tmp_path_factory):
    from labkit.models import load_bundle

    bundle = load_bundle(tiny_bundle_dir)
    out = export.export(bundle, tmp_path_factory.mktemp("rt") / "onnx", exporters=("torchscript",))
    texts = [p.zh for p in data.load_split("test", limit=16)]
    return bundle, out, texts, bundle.tokenizer(texts, return_tensors="pt", padding=True)


def generate_ids(model, enc, **kwargs) -> list[list[int]]:
    out = model.generate(**enc, do_sample=False, **kwargs)
    return [strip(row[1:].tolist(), TorchStepper(model)) for row in out]


@pytest.mark.parametrize("io", runtime.IO_MODES)
@pytest.mark.parametrize("beams,length_penalty,early_stopping", [(1, 1.0, False), (4, 1.0, False),
                                                                 (4, 0.6, False), (3, 1.0, True)])
def test_matches_generate(setup, io, beams, length_penalty, early_stopping):
    bundle, out, _, enc = setup
    stepper = OrtStepper.from_dir(out, threads=1, io=io)
    cfg = DecodeConfig(max_new_tokens=24, num_beams=beams, length_penalty=length_penalty,
                       early_stopping=early_stopping)
    ours = decode(stepper, enc["input_ids"], enc["attention_mask"], cfg)
    assert ours == generate_ids(bundle.model, enc, num_beams=beams, max_new_tokens=24,
                                length_penalty=length_penalty, early_stopping=early_stopping)


def test_translator_texts_equal_torch(setup):
    from labkit.pipeline import Translator

    bundle, out, texts, _ = setup
    ort_texts = Translator(bundle, OrtStepper.from_dir(out)).translate(texts + ["", "  "])
    assert ort_texts == Translator(bundle).translate(texts + ["", "  "])
    assert len(set(ort_texts)) > 4


def test_select_reorders_every_cached_tensor(setup):
    bundle, out, _, enc = setup
    stepper = OrtStepper.from_dir(out)
    state = stepper.encode(enc["input_ids"][:3], enc["attention_mask"][:3])
    _, state = stepper.step(torch.full((3, 1), stepper.start_id), state)
    picked = stepper.select(state, torch.tensor([2, 0, 0]))
    for before, after in zip(state.past + state.cross, picked.past + picked.cross):
        np.testing.assert_array_equal(after, before[[2, 0, 0]])
    np.testing.assert_array_equal(picked.mask, state.mask[[2, 0, 0]])


def test_first_step_returns_cross_kv_once(setup):
    """After the first step the encoder states are dropped: cross K/V replace them."""
    bundle, out, _, enc = setup
    stepper = OrtStepper.from_dir(out)
    state = stepper.encode(enc["input_ids"][:2], enc["attention_mask"][:2])
    assert state.encoder is not None and state.cross is None
    _, state = stepper.step(torch.full((2, 1), stepper.start_id), state)
    assert state.encoder is None and len(state.cross) == len(state.past) == 4
    assert state.past[0].shape[2] == 1 and state.cross[0].shape[2] == enc["input_ids"].shape[1]


def test_session_options():
    opts = runtime.session_options(threads=2, optimization="basic")
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    with pytest.raises(ValueError, match="optimization must be one of"):
        runtime.session_options(optimization="max")


def test_bad_io_mode_is_an_error(setup):
    with pytest.raises(ValueError, match="io must be one of"):
        OrtStepper.from_dir(setup[1], io="gpu")


def test_missing_onnxruntime_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        runtime.session_options()
