"""The Translator: stages, bad input, order, truncation."""

from __future__ import annotations

import pytest

from labkit.core import data
from labkit.core.decode import DecodeConfig
from labkit.core.inputs import LOOP_NOTE
from labkit.core.translator import STAGES, StepperTranslator

BAD = ["", "   \t\n", "我喜欢猫。" * 1000, "Hello, how are you?", "我喜欢🐱\x07猫。", "\x00\x01\x02", "他去了北京。"]


@pytest.fixture()
def translator(tiny_bundle):
    return StepperTranslator(tiny_bundle, decode=DecodeConfig(max_new_tokens=12))


def test_bad_input_batch_gives_one_output_per_input_in_order(translator):
    result = translator.run(BAD)
    assert len(result.texts) == len(result.notes) == len(result.ids) == len(BAD)
    assert result.texts[0] == result.texts[1] == result.texts[5] == ""
    assert "empty input: nothing to translate" in result.notes[0]
    assert any(n.startswith("truncated from") for n in result.notes[2])
    assert any("no Chinese" in n for n in result.notes[3]) and result.texts[3] == BAD[3]  # returned, not invented
    assert "removed 1 control character(s)" in result.notes[4]
    # the well-formed input translates as it would alone: batching and bad neighbours change nothing
    alone = translator.run([BAD[6]])
    assert result.texts[6] == alone.texts[0] and result.notes[6] == alone.notes[0]
    assert all(n.startswith(LOOP_NOTE) for n in result.notes[6])  # the tiny model may loop; nothing else is said


def test_truncation_respects_the_limit(tiny_bundle):
    translator = StepperTranslator(tiny_bundle, decode=DecodeConfig(max_new_tokens=4), max_input_tokens=16)
    result = translator.run(["我喜欢猫。" * 50])
    assert result.notes[0] and result.notes[0][0].endswith("to 16 tokens")


def test_every_stage_is_timed(translator):
    result = translator.run(["他去了北京。", "我们有三本书。"])
    assert set(result.timings_ms) == set(STAGES)
    assert all(v > 0 for v in result.timings_ms.values())
    assert result.total_ms == pytest.approx(sum(result.timings_ms.values()))


def test_all_empty_batch_skips_the_model(translator):
    result = translator.run(["", " "])
    assert result.texts == ["", ""] and result.timings_ms["encode"] == 0.0


def test_a_bare_string_is_a_clear_error(translator):
    with pytest.raises(TypeError, match="list of strings"):
        translator.translate("我喜欢猫。")


def test_batch_equals_one_by_one(translator):
    texts = [p.zh for p in data.load_split("test", limit=8)]
    assert translator.translate(texts) == [translator.translate([t])[0] for t in texts]


def test_ids_past_the_tokenizer_vocabulary_are_dropped_with_a_note(translator):
    known = len(translator.tokenizer)
    valid = translator.tokenizer("我喜欢猫。", add_special_tokens=False)["input_ids"][:2]
    (text,), notes = translator.detokenize([[valid[0], known + 7, valid[1]]])
    assert text == translator.tokenizer.decode(valid, skip_special_tokens=True)
    assert notes[0] and "outside the tokenizer" in notes[0][0]


def test_items_that_are_not_text_give_an_empty_output_with_a_note(translator):
    result = translator.run(["我喜欢猫。", None, 42])
    assert result.texts[1:] == ["", ""] and result.texts[0]
    assert result.notes[1] == ["not text (NoneType): nothing to translate"] and "int" in result.notes[2][0]


def test_the_stages_one_by_one_equal_run(translator):
    """token_ids -> generate -> detokenize (how labkit.serve schedules them) gives run()'s output,
    for any batch composition: rows padded together with longer ones decode the same."""
    texts = [p.zh for p in data.load_split("test", limit=6)]
    expected = translator.run(texts)
    rows = [translator.token_ids(t)[0] for t in texts]
    generated = translator.generate(rows[::-1])[::-1]  # another order: other padding partners
    assert generated == expected.ids
    assert translator.detokenize(generated)[0] == expected.texts
    beam2 = StepperTranslator(translator.bundle, decode=DecodeConfig(max_new_tokens=12, num_beams=2))
    assert translator.generate(rows[:2], beams=2) == beam2.run(texts[:2]).ids


def test_token_ids_note_a_cut_text(translator):
    ids, notes = translator.token_ids("我喜欢猫。" * 80)
    assert len(ids) == translator.max_input_tokens and notes and notes[0].startswith("truncated from")
    assert translator.token_ids("我喜欢猫。")[1] == []



def test_a_looping_decode_comes_out_once_with_a_note(translator):
    tok = translator.tokenizer
    phrase = tok(text_target="put on his", add_special_tokens=False)["input_ids"]
    start = tok(text_target="I", add_special_tokens=False)["input_ids"]
    (text,), notes = translator.detokenize([start + phrase * 4])
    assert text == tok.decode(start + phrase, skip_special_tokens=True)
    assert notes[0] and notes[0][0].startswith("the decoder repeated")
