"""Oracle tests: labkit's decoding loops against Hugging Face `generate`, token for token."""

from __future__ import annotations

import pytest

from labkit.core import data
from labkit.core.decode import DecodeConfig, TorchStepper, decode, strip


@pytest.fixture(scope="module")
def batch(tiny_bundle_dir):
    from labkit.core.bundle import load_bundle

    bundle = load_bundle(tiny_bundle_dir)
    texts = [p.zh for p in data.load_split("test", limit=16)]
    enc = bundle.tokenizer(texts, return_tensors="pt", padding=True)
    return bundle, enc


def hf_generate(model, enc, **kwargs) -> list[list[int]]:
    out = model.generate(**enc, do_sample=False, **kwargs)
    stepper = TorchStepper(model)
    return [strip(row[1:].tolist(), stepper) for row in out]


@pytest.mark.parametrize("cache", ["none", "dynamic"])
@pytest.mark.parametrize("beams,length_penalty,early_stopping", [
    (1, 1.0, False), (4, 1.0, False), (4, 0.6, False), (3, 1.0, True)])
def test_matches_generate(batch, cache, beams, length_penalty, early_stopping):
    bundle, enc = batch
    cfg = DecodeConfig(max_new_tokens=24, num_beams=beams, length_penalty=length_penalty,
                       early_stopping=early_stopping)
    ours = decode(TorchStepper(bundle.model, cache=cache), enc["input_ids"], enc["attention_mask"], cfg)
    ref = hf_generate(bundle.model, enc, num_beams=beams, max_new_tokens=24,
                      length_penalty=length_penalty, early_stopping=early_stopping)
    assert ours == ref


def test_outputs_vary_so_the_oracle_means_something(batch):
    bundle, enc = batch
    ids = decode(TorchStepper(bundle.model), enc["input_ids"], enc["attention_mask"], DecodeConfig(max_new_tokens=24))
    assert len({tuple(i) for i in ids}) > 4


@pytest.mark.parametrize("beams", [1, 2])
def test_forced_length_emits_exactly_n_tokens(batch, beams):
    bundle, enc = batch
    cfg = DecodeConfig(forced_length=7, num_beams=beams)
    ids = decode(TorchStepper(bundle.model), enc["input_ids"][:3], enc["attention_mask"][:3], cfg)
    assert [len(i) for i in ids] == [7, 7, 7]


def test_length_limit_ends_with_forced_eos(batch):
    """At max_new_tokens HF forces </s>; we strip it, so no row is longer than the limit - 1."""
    bundle, enc = batch
    ids = decode(TorchStepper(bundle.model), enc["input_ids"], enc["attention_mask"], DecodeConfig(max_new_tokens=3))
    assert max(len(i) for i in ids) <= 2


def test_strip_cuts_at_eos_and_drops_pad():
    stepper = type("S", (), {"eos_id": 0, "pad_id": 9})()
    assert strip([5, 7, 0, 9, 3], stepper) == [5, 7]
    assert strip([5, 9, 7], stepper) == [5, 7]


def test_unknown_cache_mode_is_an_error(tiny_bundle):
    with pytest.raises(ValueError, match="cache must be one of"):
        TorchStepper(tiny_bundle.model, cache="paged")
