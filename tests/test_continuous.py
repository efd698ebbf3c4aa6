"""Continuous batching: every sentence gets its batch-1 greedy tokens, whoever joins or leaves meanwhile.

The oracle is the static greedy loop at batch 1 (itself checked against HF generate in test_decode.py);
arrivals are staggered so sentences join at different positions of the running rows.
"""

from __future__ import annotations

import pytest
import torch

from labkit.core import data
from labkit.core.continuous import (
    ContinuousDecoder,
    RowState,
    keep_rows,
    merge_rows,
    pad_sources,
    run_staggered,
    staggered_arrivals,
)
from labkit.core.decode import DecodeConfig, TorchStepper
from labkit.engines.ort import OrtStepper
from labkit.engines.ort_int8 import quantize_dir
from labkit.engines.rows import (
    OrtRowStepper,
    TorchRowStepper,
    batch1_reference,
    ensure_rows,
    identity_gate,
    rows_dir,
)

CFG = DecodeConfig(max_new_tokens=24)


@pytest.fixture(scope="module")
def rows(tiny_module_bundle) -> list[list[int]]:
    tok = tiny_module_bundle.tokenizer
    return [tok(p.zh)["input_ids"] for p in data.load_split("test", limit=24)]


@pytest.fixture(scope="module")
def reference(tiny_module_bundle, rows) -> list[list[int]]:
    return batch1_reference(TorchStepper(tiny_module_bundle.model), rows, CFG)


def _state(lengths: list[int], width: int, source: list[int]) -> RowState:
    """A state whose K/V hold the row number everywhere, masks left-padded / right-padded as given."""
    b = len(lengths)
    mask = torch.zeros(b, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1
    src = torch.zeros(b, max(source), dtype=torch.long)
    for i, n in enumerate(source):
        src[i, :n] = 1
    fill = torch.arange(b, dtype=torch.float)[:, None, None, None]
    return RowState(torch.tensor(lengths), mask, [fill.expand(b, 2, width, 3).clone()],
                    [fill.expand(b, 2, max(source), 3).clone()], src)


def test_merge_left_pads_caches_and_right_pads_sources():
    merged = merge_rows(_state([2], 2, [3]), _state([4, 1], 4, [5, 2]))
    assert merged.self_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]
    assert merged.cross_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert merged.past[0].shape == (3, 2, 4, 3) and merged.cross[0].shape == (3, 2, 5, 3)
    assert merged.past[0][0, 0, :2].abs().sum() == 0  # padding is zeros, masked


def test_keep_trims_columns_no_remaining_row_uses():
    state = _state([4, 1, 2], 4, [5, 2, 3])
    kept = keep_rows(state, torch.tensor([1, 2]))
    assert kept.self_mask.tolist() == [[0, 1], [1, 1]]
    assert kept.cross_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert kept.past[0][:, 0, 0, 0].tolist() == [1.0, 2.0]
    assert kept.lengths.tolist() == [1, 2]


def test_pad_sources_worked_example():
    ids, mask = pad_sources([[5, 6, 0], [7, 0]], pad_id=9)
    assert ids.tolist() == [[5, 6, 0], [7, 0, 9]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_staggered_arrivals_start_at_zero_and_never_go_back():
    steps = staggered_arrivals(30, every=3, seed=1)
    assert steps[0] == 0 and steps == sorted(steps) and steps[-1] > 30


@pytest.mark.parametrize("max_rows", [1, 3, 8])
def test_torch_continuous_equals_batch1_with_staggered_arrivals(tiny_module_bundle, rows, reference, max_rows):
    gate = identity_gate(TorchRowStepper(tiny_module_bundle.model), reference, rows, CFG, max_rows=max_rows)
    assert gate["passed"], gate["detail"]
    assert gate["max_rows"] == max_rows and 1 <= gate["mean_rows"] <= max_rows
    if max_rows > 1:
        assert gate["mean_rows"] > 1.5  # rows really shared steps


def test_everyone_at_once_and_the_length_limit(tiny_module_bundle, rows):
    cfg = DecodeConfig(max_new_tokens=3)
    want = batch1_reference(TorchStepper(tiny_module_bundle.model), rows[:6], cfg)
    decoder = ContinuousDecoder(TorchRowStepper(tiny_module_bundle.model), cfg, max_rows=4)
    assert run_staggered(decoder, rows[:6], [0] * 6) == want
    assert all(len(w) <= 2 for w in want)  # the third token is the forced </s>
    assert decoder.counters.admitted == decoder.counters.finished == 6 and not decoder.busy


def test_finished_rows_leave_at_once(tiny_module_bundle, rows):
    """Each step computes only rows still decoding: the work is the sum of the output lengths."""
    decoder = ContinuousDecoder(TorchRowStepper(tiny_module_bundle.model), CFG, max_rows=16)
    outs = run_staggered(decoder, rows[:8], [0] * 8)
    assert decoder.counters.row_steps == sum(len(o) + 1 for o in outs)


def test_settings_continuous_batching_cannot_honour_are_refused(tiny_module_bundle):
    stepper = TorchRowStepper(tiny_module_bundle.model)
    with pytest.raises(ValueError, match="greedily"):
        ContinuousDecoder(stepper, DecodeConfig(num_beams=2))
    with pytest.raises(ValueError, match="forced_length"):
        ContinuousDecoder(stepper, DecodeConfig(forced_length=8))
    with pytest.raises(ValueError, match="no source ids"):
        ContinuousDecoder(stepper).add("x", [])


def test_ort_rows_graph_is_built_once_and_matches_batch1(tiny_module_bundle, tiny_onnx_dir, rows, reference):
    out = ensure_rows(tiny_onnx_dir, tiny_module_bundle)
    assert out == rows_dir(tiny_onnx_dir)
    stamp = (out / "decoder_rows_model.onnx").stat().st_mtime_ns
    assert ensure_rows(tiny_onnx_dir, tiny_module_bundle) == out
    assert (out / "decoder_rows_model.onnx").stat().st_mtime_ns == stamp  # cached, not rebuilt
    stepper = OrtRowStepper.from_dir(tiny_onnx_dir, out)
    gate = identity_gate(stepper, OrtStepper.from_dir(tiny_onnx_dir), rows, CFG, max_rows=6)
    assert gate["passed"], gate["detail"]
    assert gate["outputs"] == reference  # and ORT fp32 agrees with PyTorch


def test_ort_int8_rows_graph_is_quantized_like_its_directory(tiny_module_bundle, tiny_onnx_dir, rows, tmp_path):
    int8 = quantize_dir(tiny_onnx_dir, tmp_path / "int8")
    out = ensure_rows(int8, tiny_module_bundle)
    import json

    side = json.loads((out / "rows.json").read_text())
    assert side["nodes_quantized"] > 0
    stepper = OrtRowStepper.from_dir(int8, out)
    gate = identity_gate(stepper, OrtStepper.from_dir(int8), rows[:8], CFG, max_rows=1)
    assert gate["passed"], gate["detail"]  # batch 1 throughout: int8 per-tensor scales see one row


def test_the_teacher_decodes_the_same_tokens_with_staggered_arrivals():
    """The committed teacher, 48 test sentences joining a running batch of up to 8 at staggered steps:
    every sentence's tokens are its batch-1 greedy decode (PyTorch fp32)."""
    from labkit.core.bundle import load_teacher

    torch.set_num_threads(2)
    teacher = load_teacher()
    tok = teacher.tokenizer
    teacher_rows = [tok(p.zh)["input_ids"] for p in data.load_split("test", limit=48)]
    cfg = DecodeConfig(max_new_tokens=64)
    gate = identity_gate(TorchRowStepper(teacher.model), TorchStepper(teacher.model), teacher_rows, cfg, max_rows=8)
    assert gate["passed"], gate["detail"]
    assert gate["mean_rows"] > 2


def test_per_token_int8_answers_the_same_whatever_shares_its_batch(tiny_module_bundle, tiny_onnx_dir, rows, tmp_path):
    """The served int8 recipe: one sentence alone and inside 20 different mixed batches gives the same tokens,
    and continuous batching (rows joining and leaving every step) gives every sentence its batch-1 tokens."""
    from labkit.config import Preset
    from labkit.engines.onnx_export import derive
    from labkit.engines.ort import translator as ort_translator
    from labkit.engines.ort_int8 import per_token_activations, recipe_of
    from labkit.serve.engine import invariance_probe

    int8 = quantize_dir(tiny_onnx_dir, tmp_path / "int8")
    token = derive(int8, tmp_path / "token", per_token_activations,
                   quantization={**recipe_of(int8), "per_token": True})
    translator = ort_translator(token, tiny_module_bundle, Preset.from_name("ci"))
    probe = invariance_probe(translator, rows, probes=3, batches=20)
    assert probe["trials"] == 60 and probe["changed"] == 0, probe["examples"]
    gate = identity_gate(OrtRowStepper.from_dir(token, ensure_rows(token, tiny_module_bundle)), OrtStepper.from_dir(token),
                         rows, CFG, max_rows=6)
    assert gate["passed"], gate["detail"]


@pytest.fixture(scope="module")
def token_shortlisted(tiny_module_bundle, tiny_onnx_dir, tmp_path_factory):
    """ort-int8-token-sl on the tiny model: every block int8 with per-token scales (LM head included), then the
    head cut off and a shortlist from the training split beside it."""
    from labkit.config import ShortlistBudget
    from labkit.engines import shortlist as sl
    from labkit.engines.onnx_blocks import BLOCKS
    from labkit.engines.onnx_export import derive
    from labkit.engines.ort_int8 import per_token_activations, recipe_of
    from labkit.engines.shortlist_ort import strip_into

    work = tmp_path_factory.mktemp("token-sl")
    int8 = quantize_dir(tiny_onnx_dir, work / "int8", "dynamic", BLOCKS)
    token = derive(int8, work / "token", per_token_activations, quantization={**recipe_of(int8), "per_token": True})
    src, tgt = sl.tokenize_pairs(tiny_module_bundle.tokenizer, data.load_split("train", limit=2000))
    vocab = tiny_module_bundle.model.get_output_embeddings().out_features
    table = sl.build_shortlist(src, tgt, vocab, ShortlistBudget(k=10, frequent=20),
                               sl.specials(tiny_module_bundle.tokenizer, tiny_module_bundle.model.config))
    sl.save_shortlist(table, work / sl.SIDECAR)
    (work / "token-sl").mkdir()
    strip_into(token, work / "token-sl", work / sl.SIDECAR)
    return token, work / "token-sl", table


def test_the_per_token_shortlist_keeps_each_sentence_to_its_own_candidates(tiny_module_bundle, token_shortlisted, rows):
    """Its logits are the parent's at each row's own candidates (the head's int8 arithmetic copied op for op)
    and -inf elsewhere; so a batch decodes every sentence as the parent masked to that sentence's candidates
    decodes it alone."""
    import numpy as np

    from labkit.core.decode import decode
    from labkit.engines.shortlist_ort import MaskedStepper, ShortlistStepper

    token, stripped, table = token_shortlisted
    short, full = ShortlistStepper.from_dir(stripped), OrtStepper.from_dir(token)
    assert short.head.per_token and short.per_row
    ids, mask = pad_sources(rows[:4], short.pad_id)
    s_state, f_state = short.encode(ids, mask), full.encode(ids, mask)
    tokens = torch.full((4, 1), short.start_id)
    got, _ = short.step(tokens, s_state)
    want, _ = full.step(tokens, f_state)
    for r, src in enumerate(rows[:4]):
        own = table.candidates([src])
        assert torch.equal(got[r, own], want[r, own])
        assert torch.isinf(got[r, np.setdiff1d(np.arange(got.shape[1]), own)]).all()
    batched = decode(short, ids, mask, CFG)
    alone = [decode(MaskedStepper(full, table), torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), CFG)[0]
             for r in rows[:4]]
    assert batched == alone


def test_continuous_batching_over_the_per_token_shortlist_is_batch_invariant(tiny_module_bundle, token_shortlisted, rows):
    """One sentence alone and inside 20 mixed batches (3 probes, 60 trials): the same tokens; continuous batching
    with staggered arrivals (its rows graph is the parent's without the head): every sentence's batch-1 tokens."""
    from labkit.config import Preset
    from labkit.core.translator import translator_for
    from labkit.engines.rows import ShortlistRowStepper, row_stepper_from_dir
    from labkit.engines.shortlist_ort import ShortlistStepper
    from labkit.serve.engine import invariance_probe

    token, stripped, _ = token_shortlisted
    translator = translator_for(tiny_module_bundle, Preset.from_name("ci"), ShortlistStepper.from_dir(stripped))
    probe = invariance_probe(translator, rows, probes=3, batches=20)
    assert probe["trials"] == 60 and probe["changed"] == 0, probe["examples"]
    stepper = row_stepper_from_dir(stripped, ensure_rows(stripped, tiny_module_bundle))
    assert isinstance(stepper, ShortlistRowStepper) and ensure_rows(stripped, tiny_module_bundle) == rows_dir(stripped)
    gate = identity_gate(stepper, ShortlistStepper.from_dir(stripped), rows, CFG, max_rows=6)
    assert gate["passed"], gate["detail"]
    assert gate["mean_rows"] > 1.5
