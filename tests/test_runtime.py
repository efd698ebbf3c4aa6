"""ONNX Runtime stepper: greedy and beam over three sessions must equal Hugging Face `generate`.

Oracle: `model.generate` on the tiny teacher (greedy and beam, with length
penalty), and the PyTorch Translator's texts, in every io mode (numpy,
ortvalue, binding); the numpy mode is the oracle for the others on longer
decodes. The binding mode's bookkeeping (ORT-owned values fed back, cross K/V
bound once, reorders only when needed) and session options and error messages
are checked directly.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from labkit.core import data
from labkit.core.decode import DecodeConfig, TorchStepper, decode, strip
from labkit.engines import onnx_export, ort
from labkit.engines.ort import OrtStepper


@pytest.fixture(scope="module")
def setup(tiny_bundle_dir, tmp_path_factory):
    from labkit.core.bundle import load_bundle

    bundle = load_bundle(tiny_bundle_dir)
    out = onnx_export.export(bundle, tmp_path_factory.mktemp("rt") / "onnx", exporters=("torchscript",))
    texts = [p.zh for p in data.load_split("test", limit=16)]
    return bundle, out, texts, bundle.tokenizer(texts, return_tensors="pt", padding=True)


def generate_ids(model, enc, **kwargs) -> list[list[int]]:
    out = model.generate(**enc, do_sample=False, **kwargs)
    return [strip(row[1:].tolist(), TorchStepper(model)) for row in out]


@pytest.mark.parametrize("io", ort.IO_MODES)
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


@pytest.mark.parametrize("beams", [1, 4])
def test_io_modes_give_identical_tokens(setup, beams):
    """Forced 40-token decodes of 16 rows: long pasts and many beam reorders, numpy mode as the oracle."""
    _, out, _, enc = setup
    cfg = DecodeConfig(num_beams=beams, forced_length=40)
    ids = {io: decode(OrtStepper.from_dir(out, io=io), enc["input_ids"], enc["attention_mask"], cfg)
           for io in ort.IO_MODES}
    assert all(len(row) == 40 for row in ids["numpy"])
    assert ids["binding"] == ids["numpy"] and ids["ortvalue"] == ids["numpy"]


@pytest.mark.parametrize("io", ort.IO_MODES)
def test_translator_texts_equal_torch(setup, io):
    from labkit.core.translator import StepperTranslator

    bundle, out, texts, _ = setup
    ort_texts = StepperTranslator(bundle, OrtStepper.from_dir(out, io=io)).translate(texts + ["", "  "])
    assert ort_texts == StepperTranslator(bundle).translate(texts + ["", "  "])
    assert len(set(ort_texts)) > 4


@pytest.mark.parametrize("io", ort.IO_MODES)
def test_select_reorders_every_cached_tensor(setup, io):
    bundle, out, _, enc = setup
    stepper = OrtStepper.from_dir(out, io=io)
    state = stepper.encode(enc["input_ids"][:3], enc["attention_mask"][:3])
    _, state = stepper.step(torch.full((3, 1), stepper.start_id), state)
    picked = stepper.select(state, torch.tensor([2, 0, 0]))
    for before, after in zip(state.past + state.cross, picked.past + picked.cross):
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before)[[2, 0, 0]])
    np.testing.assert_array_equal(picked.mask, state.mask[[2, 0, 0]])


@pytest.mark.parametrize("io", ort.IO_MODES)
def test_first_step_returns_cross_kv_once(setup, io):
    """After the first step the encoder states are dropped: cross K/V replace them."""
    bundle, out, _, enc = setup
    stepper = OrtStepper.from_dir(out, io=io)
    state = stepper.encode(enc["input_ids"][:2], enc["attention_mask"][:2])
    assert state.encoder is not None and state.cross is None
    _, state = stepper.step(torch.full((2, 1), stepper.start_id), state)
    assert state.encoder is None and len(state.cross) == len(state.past) == 4
    assert np.asarray(state.past[0]).shape[2] == 1
    assert np.asarray(state.cross[0]).shape[2] == enc["input_ids"].shape[1]


def beam_state(stepper, enc, sources: int = 2, beams: int = 3):
    """The state beam search has after expanding `sources` rows to `beams` each and one step."""
    state = stepper.encode(enc["input_ids"][:sources], enc["attention_mask"][:sources])
    state = stepper.select(state, torch.arange(sources).repeat_interleave(beams))
    _, state = stepper.step(torch.full((sources * beams, 1), stepper.start_id), state)
    return state


def test_binding_feeds_ort_values_back_and_binds_cross_kv_once(setup):
    """No numpy round trip: past is the previous step's ORT-owned outputs; cross K/V never move."""
    import onnxruntime as ort

    _, out, _, enc = setup
    stepper = OrtStepper.from_dir(out, io="binding")
    state = beam_state(stepper, enc, sources=2, beams=1)
    cross, binding = state.cross, state.binding
    tokens = torch.full((2, 1), stepper.start_id)
    for t in range(3):
        logits, state = stepper.step(torch.cat([tokens, torch.full((2, t + 1), 5)], 1), state)
        assert all(isinstance(v, ort.OrtValue) for v in state.past)
        assert state.cross is cross and state.binding is binding
        assert np.asarray(state.past[0]).shape[2] == t + 2
        assert logits.data_ptr() == state.logits.ctypes.data  # ORT wrote into the preallocated buffer


def test_binding_select_copies_only_what_changes(setup):
    _, out, _, enc = setup
    stepper = OrtStepper.from_dir(out, io="binding")
    state = beam_state(stepper, enc, sources=2, beams=3)
    assert stepper.select(state, torch.arange(6)) is state  # identity: nothing copied
    within = stepper.select(state, torch.tensor([2, 2, 0, 3, 5, 4]))  # every row keeps its source
    assert within.cross is state.cross and within.binding is state.binding
    np.testing.assert_array_equal(np.asarray(within.past[1]), np.asarray(state.past[1])[[2, 2, 0, 3, 5, 4]])
    across = stepper.select(state, torch.tensor([3, 3, 3]))  # fewer rows, other sources: everything moves
    assert across.binding is not state.binding and across.logits.shape[0] == 3
    np.testing.assert_array_equal(np.asarray(across.cross[0]), np.asarray(state.cross[0])[[3, 3, 3]])
    np.testing.assert_array_equal(across.mask, state.mask[[3, 3, 3]])


def test_rows_of_one_source_have_bitwise_equal_cross_kv(setup):
    """Why a within-source reorder may keep cross K/V: the first step computes them identically per beam."""
    _, out, _, enc = setup
    state = beam_state(OrtStepper.from_dir(out, io="binding"), enc, sources=4, beams=4)
    for value in state.cross:
        kv = np.asarray(value).reshape(4, 4, *np.asarray(value).shape[1:])
        assert (kv == kv[:, :1]).all()


def test_session_options():
    opts = ort.session_options(threads=2, optimization="basic")
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    with pytest.raises(ValueError, match="optimization must be one of"):
        ort.session_options(optimization="max")
    # a server lets idle intra-op threads sleep; measurements keep ORT's default (spinning)
    assert ort.session_options(spin=False).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # unset: ORT's default, spinning
        opts.get_session_config_entry("session.intra_op.allow_spinning")


def test_bad_io_mode_is_an_error(setup):
    with pytest.raises(ValueError, match="io must be one of"):
        OrtStepper.from_dir(setup[1], io="gpu")


def test_missing_onnxruntime_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        ort.session_options()
