"""CTranslate2 peer: conversion keeps ids, float32 greedy equals labkit's greedy token for token.

Tests that run CTranslate2 are marked `requires_ct2` (skipped without the `peer` extra); the ones
about its absence and about what no engine runs (vocabulary, install hint) always run.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys

import pytest
import torch

from labkit.config import Preset
from labkit.core.bundle import TEACHER_DIR, Bundle, load_bundle, start_row_norm
from labkit.core.data import load_split
from labkit.core.decode import DecodeConfig, TorchStepper, greedy
from labkit.engines import ct2

requires_ct2 = pytest.mark.skipif(importlib.util.find_spec("ctranslate2") is None,
                                  reason="CTranslate2 is not installed (pip install 'labkit[peer]')")
SENTENCES = 60


@pytest.fixture(scope="module")
def fixture_ct2(tiny_bundle_dir, tmp_path_factory):
    from labkit.core.bundle import load_bundle

    out = tmp_path_factory.mktemp("ct2")
    bundle = load_bundle(tiny_bundle_dir)
    return bundle, {q: ct2.convert(bundle, out / q, q) for q in ct2.COMPUTE_TYPES}


def torch_greedy(bundle, texts, cfg):
    enc = bundle.tokenizer(texts, padding=True, return_tensors="pt")
    return greedy(TorchStepper(bundle.model), enc["input_ids"], enc["attention_mask"], cfg)


def source_ids(bundle, texts):
    return [bundle.tokenizer(t)["input_ids"] for t in texts]


@requires_ct2
@pytest.mark.parametrize("cfg", [DecodeConfig(max_new_tokens=64), DecodeConfig(max_new_tokens=8),
                                 DecodeConfig(forced_length=12)], ids=["max64", "max8", "forced12"])
def test_float32_greedy_equals_labkit_greedy(fixture_ct2, cfg):
    """The oracle: same ids as labkit.core.decode.greedy (= HF generate) on every test sentence.

    max8 makes most outputs hit the limit (generate emits 7 tokens, then a forced </s>);
    forced12 bans </s>, so every row has exactly 12 tokens.
    """
    bundle, dirs = fixture_ct2
    texts = [p.zh for p in load_split("test", limit=SENTENCES)]
    expected = torch_greedy(bundle, texts, cfg)
    got = ct2.Ct2Translator(dirs["float32"], decode=cfg).generate(source_ids(bundle, texts))
    assert got == expected
    if cfg.forced_length:
        assert {len(ids) for ids in got} == {cfg.forced_length}


@requires_ct2
def test_int8_is_smaller_and_obeys_the_length_rules(fixture_ct2):
    bundle, dirs = fixture_ct2
    assert ct2.file_mb(dirs["int8"]) < 0.6 * ct2.file_mb(dirs["float32"])
    texts = [p.zh for p in load_split("test", limit=10)]
    got = ct2.Ct2Translator(dirs["int8"], decode=DecodeConfig(forced_length=5)).generate(source_ids(bundle, texts))
    assert [len(ids) for ids in got] == [5] * 10
    pad = bundle.model.config.pad_token_id
    assert all(pad not in ids for ids in got)


@requires_ct2
@pytest.mark.parametrize("quantization", ct2.COMPUTE_TYPES)
def test_convert_leaves_the_bundle_untouched(tiny_bundle, tmp_path, quantization):
    """CTranslate2's int8 pass rewrites the weight arrays it is given in place; convert copies first."""
    before = {k: v.clone() for k, v in tiny_bundle.model.state_dict().items()}
    ct2.convert(tiny_bundle, tmp_path / quantization, quantization)
    assert all(torch.equal(v, before[k]) for k, v in tiny_bundle.model.state_dict().items())


def stock_greedy(model_dir, bundle, texts, out) -> list[list[int]]:
    """Greedy ids from CTranslate2's own TransformersConverter + Translator (nothing of labkit's)."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    tok = bundle.tokenizer
    engine = ctranslate2.Translator(TransformersConverter(str(model_dir)).convert(str(out)), device="cpu",
                                    intra_threads=1)
    got = []
    for start in range(0, len(texts), 64):
        res = engine.translate_batch([tok.convert_ids_to_tokens(s) for s in source_ids(bundle, texts[start:start + 64])],
                                     beam_size=1, max_decoding_length=63)
        got += [tok.convert_tokens_to_ids(r.hypotheses[0]) for r in res]
    return got


@requires_ct2
@pytest.mark.slow
def test_stock_converter_agrees_with_pytorch_on_the_committed_teacher(tmp_path):
    """The teacher is a faithful Marian model: CTranslate2's stock conversion (zero start vector, <pad>
    dropped) gives PyTorch's greedy tokens on >= 99 % of the whole test split, and labkit's own
    conversion uses that stock loader."""
    teacher = load_bundle(TEACHER_DIR)
    assert start_row_norm(teacher.model) == 0.0 and not ct2.needs_pad_start(teacher)
    texts = sorted((p.zh for p in load_split("test")), key=len)  # batches of similar length: less padding
    expected, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # as the fixtures do: a second thread on a busy 2-core machine is many times slower
    try:
        for start in range(0, len(texts), 32):
            expected += torch_greedy(teacher, texts[start:start + 32], DecodeConfig())
    finally:
        torch.set_num_threads(threads)
    got = stock_greedy(TEACHER_DIR, teacher, texts, tmp_path / "stock")
    same = sum(a == b for a, b in zip(got, expected)) / len(texts)
    print(f"stock CTranslate2 vs PyTorch greedy: {same:.2%} identical on {len(texts)} test sentences")
    assert same >= 0.99


@requires_ct2
def test_a_nonzero_start_row_needs_the_pad_start_loader(tiny_bundle_dir, tmp_path):
    """Why PadStartMarianLoader stays: a model whose start row is not zero (trained elsewhere with tied
    embeddings) decodes something else under the stock loader; labkit's conversion detects it, uses the
    pad-start loader and still equals PyTorch token for token. The fixture itself converts with the stock one."""
    bundle = load_bundle(tiny_bundle_dir)
    assert not ct2.needs_pad_start(bundle)
    assert ct2.read_ct2_sidecar(ct2.convert(bundle, tmp_path / "zero"))["loader"] == "MarianMTLoader"
    torch.manual_seed(0)
    with torch.no_grad():
        bundle.model.get_input_embeddings().weight[bundle.model.config.pad_token_id] = torch.randn(
            bundle.model.config.d_model)
    bundle.save(tmp_path / "nonzero", dtype=torch.float32)
    texts = [p.zh for p in load_split("test", limit=SENTENCES)]
    expected = torch_greedy(bundle, texts, DecodeConfig())
    stock = stock_greedy(tmp_path / "nonzero", bundle, texts, tmp_path / "stock")
    assert sum(a == b for a, b in zip(stock, expected)) < 0.5 * len(texts)
    assert ct2.needs_pad_start(bundle)
    out = ct2.convert(bundle, tmp_path / "labkit")
    assert ct2.read_ct2_sidecar(out)["loader"] == "PadStartMarianLoader"
    assert ct2.Ct2Translator(out).generate(source_ids(bundle, texts)) == expected


def test_vocabulary_pads_missing_ids_and_moves_pad(tiny_bundle):
    """A model with more rows than the tokenizer has pieces (opus-mt-shape's situation):
    tokenizer size n, model vocab n+3, pad id n+2 -> ids n, n+1 and the tokenizer's old <pad>
    slot become placeholders, '<pad>' sits at n+2."""
    from transformers import MarianConfig, MarianMTModel

    tok = tiny_bundle.tokenizer
    n = len(tok)
    cfg = MarianConfig(vocab_size=n + 3, d_model=16, encoder_layers=1, decoder_layers=1,
                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                       decoder_ffn_dim=16, pad_token_id=n + 2, decoder_start_token_id=n + 2, eos_token_id=0)
    tokens = ct2.vocabulary(Bundle(MarianMTModel(cfg), tok, {"name": "wide"}))
    assert len(tokens) == n + 3 and len(set(tokens)) == n + 3
    assert tokens[n + 2] == "<pad>"
    assert tokens[tok.pad_token_id] == f"<unused_{tok.pad_token_id}>"
    assert tokens[:2] == ["</s>", "<unk>"] and tokens[n] == f"<unused_{n}>"


@requires_ct2
def test_wide_vocabulary_round_trips_through_ct2(tiny_bundle, tmp_path):
    """Random-weight model with a padded vocabulary: float32 ct2 == labkit greedy at forced length."""
    from transformers import MarianConfig, MarianMTModel

    tok = tiny_bundle.tokenizer
    n = len(tok)
    torch.manual_seed(0)
    cfg = MarianConfig(vocab_size=n + 40, d_model=16, encoder_layers=1, decoder_layers=1,
                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                       decoder_ffn_dim=16, pad_token_id=n + 39, decoder_start_token_id=n + 39,
                       eos_token_id=0, scale_embedding=True, activation_function="swish")
    wide = Bundle(MarianMTModel(cfg).eval(), tok, {"name": "wide"})
    texts = [p.zh for p in load_split("test", limit=8)]
    dc = DecodeConfig(forced_length=10)
    got = ct2.Ct2Translator(ct2.convert(wide, tmp_path / "wide"), decode=dc).generate(source_ids(wide, texts))
    assert got == torch_greedy(wide, texts, dc)


@requires_ct2
def test_run_keeps_order_notes_and_stage_timings(fixture_ct2):
    _, dirs = fixture_ct2
    result = ct2.Ct2Translator(dirs["float32"]).run(["我喜欢猫。", "  ", "我喜欢猫。"])
    assert result.texts[1] == "" and result.texts[0] == result.texts[2] != ""
    assert result.notes[1] == ["empty input: nothing to translate"]
    assert set(result.timings_ms) >= {"normalize", "tokenize", "decode", "detokenize"}
    assert result.timings_ms["decode"] > 0
    with pytest.raises(TypeError):
        ct2.Ct2Translator(dirs["float32"]).run("我喜欢猫。")


BAD_INPUTS = ["", "   ", None, 42, "我喜欢\x07猫。", "Hello, how are you?", "我们有三本书。" * 200]


@requires_ct2
def test_every_engine_treats_bad_input_the_same_way(fixture_ct2):
    """The shared Translator base: CTranslate2 gives the same empty outputs and the same notes as the
    PyTorch translator (truncation of over-long input included), input by input, in order."""
    from labkit.core.translator import StepperTranslator

    bundle, dirs = fixture_ct2
    cfg = DecodeConfig(max_new_tokens=16)
    torch_result = StepperTranslator(bundle, decode=cfg).run(BAD_INPUTS)
    ct2_result = ct2.Ct2Translator(dirs["float32"], decode=cfg).run(BAD_INPUTS)
    assert ct2_result.notes == torch_result.notes
    assert any(n.startswith("truncated from") for n in ct2_result.notes[-1])
    assert [t == "" for t in ct2_result.texts] == [t == "" for t in torch_result.texts] == [
        True, True, True, True, False, False, False]


@requires_ct2
def test_stages_one_by_one_equal_run(fixture_ct2):
    """token_ids -> generate -> detokenize (how labkit.serve schedules them) gives run()'s output."""
    _, dirs = fixture_ct2
    translator = ct2.Ct2Translator(dirs["float32"])
    texts = [p.zh for p in load_split("test", limit=5)]
    expected = translator.run(texts)
    generated = translator.generate([translator.token_ids(t)[0] for t in texts])
    assert generated == expected.ids and translator.detokenize(generated)[0] == expected.texts


def test_missing_ctranslate2_says_how_to_install(monkeypatch):
    """Runs with or without CTranslate2: a None entry in sys.modules makes the import fail."""
    monkeypatch.setitem(sys.modules, "ctranslate2", None)
    with pytest.raises(ImportError, match=r"labkit\[peer\]"):
        ct2.require_ctranslate2()
    assert "labkit[peer]" in ct2.missing_reason()
    with pytest.raises(ImportError, match=r"labkit\[peer\]"):
        ct2.Ct2Translator("anywhere")


@requires_ct2
def test_missing_reason_is_none_when_installed():
    assert ct2.missing_reason() is None


@requires_ct2
def test_ensure_ct2_converts_again_for_a_changed_bundle(tiny_bundle_dir, tmp_path, monkeypatch):
    """Reused while the bundle is the same; a retrained bundle (new sidecar metadata) is converted again,
    and the swap leaves no old copy beside the new one."""
    monkeypatch.setenv("LABKIT_ARTIFACTS", str(tmp_path))
    shutil.copytree(tiny_bundle_dir, tmp_path / "ci" / "tiny")
    ci, tiny = Preset.from_name("ci"), load_bundle(tmp_path / "ci" / "tiny")
    out = ct2.ensure_ct2(ci, tiny, "float32")
    made = (out / ct2.SIDECAR).read_text()
    assert ct2.ensure_ct2(ci, tiny, "float32") == out and (out / ct2.SIDECAR).read_text() == made
    with torch.no_grad():  # other weights: a retrained bundle
        tiny.model.model.encoder.layers[0].fc1.bias[0] += 1e-3
    tiny.meta["retrained"] = True
    assert ct2.ensure_ct2(ci, tiny, "float32") == out
    assert ct2.read_ct2_sidecar(out)["source"]["meta"]["retrained"] is True
    assert ct2.Ct2Translator(out).translate(["我喜欢猫。"])[0]
    assert sorted(p.name for p in (tmp_path / "ci").iterdir()) == ["ct2-tiny-float32", "tiny"]


@requires_ct2
def test_the_served_int8_recipe_answers_the_same_whatever_shares_its_batch(fixture_ct2):
    """CTranslate2 int8 (what `labkit serve --engine auto` serves in int8 when batching) quantizes
    activations per row: each probe sentence alone and inside 20 different mixed batches, same tokens."""
    from labkit.serve.engine import invariance, invariance_probe

    bundle, dirs = fixture_ct2
    translator = ct2.Ct2Translator(dirs["int8"], decode=DecodeConfig(max_new_tokens=32))
    rows = [translator.token_ids(p.zh)[0] for p in load_split("test", limit=40)]
    probe = invariance_probe(translator, rows, probes=3, batches=20)
    assert probe["trials"] == 60 and probe["changed"] == 0, probe["examples"]
    assert invariance("ct2-int8")[0] and not invariance("ort-int8")[0]


@requires_ct2
def test_ct2s_own_batching_answers_every_sentence_as_ctranslate2_alone_does(fixture_ct2):
    """The peer runner (labkit.serve.ct2_runner): requests handed over while earlier ones run, two translators;
    each answer is CTranslate2's own for that sentence, and close() waits for everything accepted."""
    import asyncio

    from labkit.serve.batcher import BatchConfig, Closed
    from labkit.serve.ct2_runner import Ct2Runner

    _, dirs = fixture_ct2
    translator = ct2.Ct2Translator(dirs["int8"], decode=DecodeConfig(max_new_tokens=32), inter_threads=2)
    rows = [translator.token_ids(p.zh)[0] for p in load_split("test", limit=24)]
    alone = [translator.generate([r])[0] for r in rows]

    async def main():
        runner = Ct2Runner(translator, BatchConfig(max_queue=64))
        await runner.start()
        futures = []
        for i, r in enumerate(rows):
            futures += runner.submit([r])
            await asyncio.sleep(0.002 * (i % 2))
        late = runner.submit(rows[:2])
        await runner.close()
        with pytest.raises(Closed):
            runner.submit(rows[:1])
        return [f.result() for f in futures + late]

    done = asyncio.run(main())
    assert [d.ids for d in done] == alone + alone[:2]
    assert [d.text for d in done[:3]] == translator.detokenize(alone[:3])[0]
