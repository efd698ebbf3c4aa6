"""The vocabulary shortlist: the table against hand-computed top-k, the candidate union, the head-less
decoders against the full graphs (the oracle), CTranslate2's vocabulary map, bad artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from labkit.config import ShortlistBudget
from labkit.core.decode import DecodeConfig, decode
from labkit.engines import shortlist as sl
from labkit.engines.onnx_blocks import BLOCKS
from labkit.engines.ort import OrtStepper
from labkit.engines.ort_int8 import quantize_dir
from labkit.engines.shortlist_ort import MaskedStepper, ShortlistStepper, strip_into

# Toy corpus, ids as pieces. Sentences: src [1, 2] -> tgt [5, 6]; [1] -> [5]; [2, 3] -> [6, 7]; [3] -> [7, 8].
SRC = [[1, 2], [1], [2, 3], [3]]
TGT = [[5, 6], [5], [6, 7], [7, 8]]


def test_dice_table_matches_hand_computed_top_k():
    """c(1)=2, c(2)=2, c(3)=2; c(5)=2, c(6)=2, c(7)=2, c(8)=1.
    Dice(1,5)=2·2/4=1, Dice(1,6)=2·1/4=.5; Dice(2,6)=1, Dice(2,5)=Dice(2,7)=.5;
    Dice(3,7)=1, Dice(3,8)=2·1/3=.67, Dice(3,6)=.5."""
    assert sl.dice_table(SRC, TGT, 10, k=1) == {1: (5,), 2: (6,), 3: (7,)}
    assert sl.dice_table(SRC, TGT, 10, k=2) == {1: (5, 6), 2: (6, 5), 3: (7, 8)}  # ties: count, then id
    assert sl.dice_table(SRC, TGT, 10, k=3, min_cooc=2) == {1: (5,), 2: (6,), 3: (7,)}
    assert sl.dice_table(SRC, TGT, 10, k=1, exclude=[5]) == {1: (6,), 2: (6,), 3: (7,)}
    assert sl.most_frequent(TGT, 10, 2) == (5, 6)


def test_candidates_are_the_union_with_specials_and_frequent():
    table = sl.build_shortlist(SRC, TGT, 10, ShortlistBudget(k=1, frequent=1, min_cooc=1), special_ids=(0, 9))
    assert table.always == (0, 5, 9)
    got = table.candidates([[1, 2], [3]]).tolist()
    assert got == [0, 5, 6, 7, 9]
    assert set(table.always) <= set(got) and all(set(table.lists[s]) <= set(got) for s in (1, 2, 3))
    assert table.candidates([[4]]).tolist() == [0, 5, 9]  # an unseen piece adds nothing


def test_save_load_round_trip_and_bad_artifacts(tmp_path):
    table = sl.build_shortlist(SRC, TGT, 10, ShortlistBudget(k=2, frequent=1, min_cooc=1), (0,))
    sl.save_shortlist(table, tmp_path / sl.SIDECAR, method="dice")
    assert sl.load_shortlist(tmp_path) == table
    with pytest.raises(FileNotFoundError, match="ensure_shortlist"):
        sl.load_shortlist(tmp_path / "missing")
    (tmp_path / sl.SIDECAR).write_text('{"schema": "labkit.shortlist/1", "lists": ')
    with pytest.raises(ValueError, match="not a readable shortlist"):
        sl.load_shortlist(tmp_path)
    data = {"schema": sl.SCHEMA, "vocab_size": 4, "always": [0], "lists": {"1": [7]}}
    (tmp_path / sl.SIDECAR).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sl.load_shortlist(tmp_path)


def test_vmap_round_trips_as_ctranslate2_reads_it(tmp_path):
    tokens = ["</s>", "<unk>", "▁a", "▁b", "c", "d", "e", "<pad>"]
    table = sl.Shortlist({2: (4, 5), 3: (6,)}, (0, 1, 7), len(tokens))
    sl.write_vmap(table, tokens, tmp_path / "vmap.txt")
    lines = (tmp_path / "vmap.txt").read_text(encoding="utf-8").splitlines()
    assert lines == ["\t</s> <unk> <pad>", "▁a\tc d", "▁b\te"]  # "<n-gram>\tcandidate1 candidate2 ..."
    assert sl.read_vmap(tmp_path / "vmap.txt", tokens) == table
    with pytest.raises(ValueError, match="whitespace"):
        sl.write_vmap(table, [*tokens[:-1], "a b"], tmp_path / "bad.txt")


@pytest.fixture(scope="module")
def tiny_table(tiny_module_bundle):
    pairs = sl.load_split("train", limit=2000)
    src, tgt = sl.tokenize_pairs(tiny_module_bundle.tokenizer, pairs)
    vocab = tiny_module_bundle.model.get_output_embeddings().out_features
    specials = sl.specials(tiny_module_bundle.tokenizer, tiny_module_bundle.model.config)
    return sl.build_shortlist(src, tgt, vocab, ShortlistBudget(k=10, frequent=20), specials)


@pytest.fixture(scope="module", params=["fp32", "int8-all"])
def parent_and_stripped(request, tiny_onnx_dir, tiny_table, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"sl-{request.param}")
    parent = tiny_onnx_dir if request.param == "fp32" else quantize_dir(tiny_onnx_dir, work / "int8", "dynamic", BLOCKS)
    sl.save_shortlist(tiny_table, work / sl.SIDECAR)
    (work / "stripped").mkdir()
    strip_into(parent, work / "stripped", work / sl.SIDECAR)
    return request.param, parent, work / "stripped"


def _batch(bundle):
    return bundle.tokenizer(["我喜欢猫。", "今天天气很好，我们去公园散步吧。"], padding=True, return_tensors="pt")


def test_stepper_logits_equal_the_full_graph_at_the_candidates(tiny_module_bundle, parent_and_stripped):
    kind, parent, stripped = parent_and_stripped
    short, full = ShortlistStepper.from_dir(stripped), OrtStepper.from_dir(parent)
    assert short.head.kind == ("float" if kind == "fp32" else "int8")  # both head forms are exercised
    enc = _batch(tiny_module_bundle)
    s_state, f_state = short.encode(enc["input_ids"], enc["attention_mask"]), full.encode(enc["input_ids"], enc["attention_mask"])
    ids = s_state.head.ids
    assert len(ids) < short.meta["model"]["vocab_size"]
    tokens = torch.full((2, 1), short.start_id)
    for _ in range(4):
        got, s_state = short.step(tokens, s_state)
        want, f_state = full.step(tokens, f_state)
        torch.testing.assert_close(got[:, ids], want[:, ids], rtol=1e-4, atol=1e-4)
        outside = np.setdiff1d(np.arange(got.shape[1]), ids)
        assert torch.isinf(got[:, outside]).all()
        tokens = torch.cat([tokens, want.argmax(-1, keepdim=True)], dim=1)


@pytest.mark.parametrize("beams", [1, 3])
def test_shortlisted_decode_equals_the_masked_full_decode(tiny_module_bundle, tiny_table, parent_and_stripped, beams):
    _, parent, stripped = parent_and_stripped
    enc, cfg = _batch(tiny_module_bundle), DecodeConfig(max_new_tokens=12, num_beams=beams)
    got = decode(ShortlistStepper.from_dir(stripped), enc["input_ids"], enc["attention_mask"], cfg)
    want = decode(MaskedStepper(OrtStepper.from_dir(parent), tiny_table), enc["input_ids"], enc["attention_mask"], cfg)
    assert got == want


def test_a_plain_export_is_not_a_shortlisted_directory(tiny_onnx_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="lm_head.npz"):
        ShortlistStepper.from_dir(tiny_onnx_dir)


def test_ctranslate2_runs_the_vmap_on_the_tiny_model(tiny_module_bundle, tiny_table, tmp_path):
    pytest.importorskip("ctranslate2")
    from labkit.engines import ct2

    out = ct2.convert(tiny_module_bundle, tmp_path / "ct2", "float32")
    tokens = json.loads((out / ct2.VOCABULARY_FILE).read_text())
    sl.write_vmap(tiny_table, tokens, out / sl.VMAP_FILE)
    assert sl.read_vmap(out / sl.VMAP_FILE, tokens).lists == {s: t for s, t in tiny_table.lists.items() if t}
    cfg = DecodeConfig(max_new_tokens=16)
    rows = [tiny_module_bundle.tokenizer(t)["input_ids"] for t in ["我喜欢猫。", "他明天去北京。"]]
    got = ct2.Ct2Translator(out, decode=cfg, use_vmap=True).generate(rows)
    want = sl.MaskedCt2Translator(out, tiny_table, decode=cfg).generate(rows)
    assert got == want
    allowed = set(tiny_table.candidates(rows).tolist())
    assert all(t in allowed for row in got for t in row)
    with pytest.raises(FileNotFoundError, match="vmap.txt"):
        ct2.Ct2Translator(ct2.convert(tiny_module_bundle, tmp_path / "plain", "float32"), use_vmap=True)
