"""KV-cache modes: every mode must reproduce Hugging Face `generate` token for token.

Oracle: `model.generate` (greedy and beam). Properties checked by hand: the
preallocated cache never re-allocates while decoding (same data pointer), cross
K/V are projected once per source in cached modes and at every step without a
cache, and the timing wrapper records one entry per generated token.
"""

from __future__ import annotations

import pytest
import torch

from labkit.config import PRESETS, KvBudget, Setting
from labkit.core import data
from labkit.core.decode import DecodeConfig, TorchStepper, decode, strip
from labkit.engines import torch_cache
from labkit.lab import nb07_kv_cache


@pytest.fixture(scope="module")
def batch(tiny_bundle_dir):
    from labkit.core.bundle import load_bundle

    bundle = load_bundle(tiny_bundle_dir)
    texts = [p.zh for p in data.load_split("test", limit=12)]
    return bundle, bundle.tokenizer(texts, return_tensors="pt", padding=True)


def generate_ids(model, enc, **kwargs) -> list[list[int]]:
    out = model.generate(**enc, do_sample=False, **kwargs)
    return [strip(row[1:].tolist(), TorchStepper(model)) for row in out]


@pytest.mark.parametrize("mode", torch_cache.MODES)
@pytest.mark.parametrize("beams,length_penalty", [(1, 1.0), (4, 1.0), (3, 0.6)])
def test_every_mode_matches_generate(batch, mode, beams, length_penalty):
    bundle, enc = batch
    cfg = DecodeConfig(max_new_tokens=20, num_beams=beams, length_penalty=length_penalty)
    ours = decode(torch_cache.make_stepper(bundle.model, mode, capacity=21), enc["input_ids"], enc["attention_mask"], cfg)
    assert ours == generate_ids(bundle.model, enc, num_beams=beams, max_new_tokens=20, length_penalty=length_penalty)


def test_outputs_vary_so_the_oracle_means_something(batch):
    bundle, enc = batch
    ids = decode(torch_cache.StaticStepper(bundle.model), enc["input_ids"], enc["attention_mask"])
    assert len({tuple(i) for i in ids}) > 4


def test_static_cache_writes_in_place(batch):
    """Same buffers from the first to the last step (greedy: no reorder reallocates either)."""
    bundle, enc = batch
    stepper = torch_cache.StaticStepper(bundle.model, capacity=16)
    state = stepper.encode(enc["input_ids"][:2], enc["attention_mask"][:2])
    tokens = torch.full((2, 1), stepper.start_id)
    pointers = []
    for _ in range(5):
        _, state = stepper.step(tokens, state)
        layer = state.cache.self_attention_cache.layers[0]
        pointers.append((layer.k_buf.data_ptr(), layer.keys.data_ptr(), layer.length))
        tokens = torch.cat([tokens, tokens[:, -1:]], 1)
    assert {p[:2] for p in pointers} == {pointers[0][:2]}
    assert [p[2] for p in pointers] == [1, 2, 3, 4, 5]
    assert layer.k_buf.shape[2] == 16 and layer.keys.shape[2] == 5


def test_capacity_overflow_is_a_clear_error(batch):
    bundle, enc = batch
    with pytest.raises(ValueError, match="capacity 4 exceeded"):
        decode(torch_cache.StaticStepper(bundle.model, capacity=4), enc["input_ids"][:1], enc["attention_mask"][:1],
               DecodeConfig(forced_length=6))


@pytest.mark.parametrize("mode,expected_calls", [("none", 6), ("dynamic", 1), ("static", 1)])
def test_cross_attention_kv_once_per_source(batch, mode, expected_calls):
    """6 forced steps: cross-attention keys are projected once with a cache, every step without."""
    bundle, enc = batch
    calls = []
    hook = bundle.model.model.decoder.layers[0].encoder_attn.k_proj.register_forward_hook(
        lambda *a: calls.append(1))
    try:
        decode(torch_cache.make_stepper(bundle.model, mode, capacity=8), enc["input_ids"][:2],
               enc["attention_mask"][:2], DecodeConfig(forced_length=6))
    finally:
        hook.remove()
    assert len(calls) == expected_calls


@pytest.mark.parametrize("beams", [1, 3])
def test_timed_stepper_records_one_entry_per_token(batch, beams):
    bundle, enc = batch
    ms, ids = nb07_kv_cache.time_steps(bundle.model, "static", enc, Setting(beams, 2), tokens=7)
    assert len(ms) == 7 and all(t > 0 for t in ms)
    assert [len(i) for i in ids] == [7] * enc["input_ids"].shape[0]


def test_slope_by_hand():
    """ms = 2 * position + 1 -> slope 2.0; a flat line -> 0."""
    assert nb07_kv_cache.slope([1, 2, 3, 4], [3, 5, 7, 9]) == pytest.approx(2.0)
    assert nb07_kv_cache.slope([1, 2, 3], [4, 4, 4]) == pytest.approx(0.0, abs=1e-12)


def test_position_costs_and_summary_shape(batch):
    bundle, _ = batch
    texts = [p.zh for p in data.load_split("test", limit=3)]
    budget = KvBudget(tokens=5, repeats=2, warmup=0, settings=(Setting(1, 1), Setting(2, 2)),
                              none_settings=(Setting(1, 1),))
    rows = nb07_kv_cache.position_costs(bundle.model, bundle.tokenizer, texts, budget)
    assert len(rows) == 5 * 2 * (1 + 2 + 2)  # tokens x repeats x (none: 1 setting, dynamic/static: 2)
    summary = nb07_kv_cache.summarize_positions(rows)
    assert len(summary) == 5 and set(summary["mode"]) == set(torch_cache.MODES)
    assert (summary["tokens"] == 5).all() and (summary["n"] == 2).all()
    assert nb07_kv_cache.plot_position_costs(rows).data  # one trace per (mode, setting)


def test_modes_agree_helper(batch):
    bundle, enc = batch
    assert nb07_kv_cache.agree_across_modes(bundle.model, enc, DecodeConfig(forced_length=6, num_beams=2)) == {
        "none": True, "dynamic": True, "static": True}


def test_every_preset_has_a_kv_budget_long_enough_to_show_the_growth():
    assert all(p.kv.tokens >= 128 for p in PRESETS.values())


@pytest.mark.parametrize("beams", [1, 4])
def test_agree_with_generate_is_an_independent_oracle(batch, beams, monkeypatch):
    """Every mode agrees with generate on the fixture; a broken mode is caught, not averaged away."""
    bundle, enc = batch
    cfg = DecodeConfig(max_new_tokens=20, num_beams=beams)
    assert nb07_kv_cache.agree_with_generate(bundle.model, enc, cfg) == {m: 1.0 for m in torch_cache.MODES}
    real = torch_cache.make_stepper

    def off_by_one(model, mode, capacity=None):
        stepper = real(model, mode, capacity)
        if mode == "static":
            step = stepper.step
            stepper.step = lambda tokens, state: (lambda out: (out[0].roll(1, dims=-1), out[1]))(step(tokens, state))
        return stepper

    monkeypatch.setattr(nb07_kv_cache, "make_stepper", off_by_one)
    broken = nb07_kv_cache.agree_with_generate(bundle.model, enc, cfg)
    assert broken["static"] < 0.5 and broken["dynamic"] == 1.0, broken


def test_slope_ignores_a_few_slow_steps():
    assert nb07_kv_cache.slope([1, 2, 3, 4], [1, 2, 30, 4]) == pytest.approx(1.0)
    flat = [5.0] * 64
    flat[10] = flat[40] = 50.0  # two steps hit by another process
    assert abs(nb07_kv_cache.slope(range(1, 65), flat)) < 1e-9
    assert nb07_kv_cache.slope(range(1, 65), [0.5 * p for p in range(1, 65)]) == pytest.approx(0.5)


@pytest.mark.parametrize("mode, expected", [("none", list(range(1, 9))), ("dynamic", [1] * 8), ("static", [1] * 8)])
def test_decoder_positions_count_the_work_of_each_mode(batch, mode, expected):
    """No cache reruns the decoder over the whole prefix at every step; a cache feeds one position."""
    bundle, enc = batch
    assert nb07_kv_cache.decoder_positions(bundle.model, mode, enc, tokens=8) == expected
