"""Inputs people type, on every engine: one table, the same outputs and notes from torch, ORT and CTranslate2.

Oracles: rows the model must not see have exact expected outputs; rows the model translates must
equal the translation of their cleaned form (the emoji row equals '我喜欢猫。' plus the emoji passed
through), so nothing a user typed besides Chinese is turned into words. ORT runs a TorchScript
export of the tiny fixture; CTranslate2 runs when installed.
"""

from __future__ import annotations

import importlib.util

import pytest

from labkit.core import inputs
from labkit.core.decode import DecodeConfig
from labkit.core.inputs import normalize, prepare, split_symbols, to_simplified
from labkit.core.translator import StepperTranslator
from labkit.engines import ct2, onnx_export
from labkit.engines.ort import OrtStepper
from labkit.measure import quality

LONG = "我们有三本书。" * 14286  # 100 002 characters
CFG = DecodeConfig(max_new_tokens=16)
ENGINES = ["torch", "ort", pytest.param("ct2", marks=pytest.mark.skipif(
    importlib.util.find_spec("ctranslate2") is None, reason="CTranslate2 is not installed (pip install 'labkit[peer]')"))]

# id, input, expected output (str: exact; ("same", text): equals the translation of `text`; with
# optional prefix/suffix), a fragment every note list of that row must contain
TABLE = [
    ("traditional", "我們喜歡貓。", ("same", "我们喜欢猫。", "", ""), "converted 3 Traditional character(s)"),
    ("punctuation", "！？。，、", "!?.,,", "no translatable content"),
    ("arabic", "مرحبا بالعالم", "مرحبا بالعالم", "no Chinese characters: returned unchanged"),
    ("english", "Hello, how are you?", "Hello, how are you?", "no Chinese characters: returned unchanged"),
    ("emoji-inside", "我喜欢🐱猫。", ("same", "我喜欢猫。", "", " 🐱"), "inside the text put after"),
    ("emoji-edges", "🐱我喜欢猫。👍", ("same", "我喜欢猫。", "🐱 ", " 👍"), "kept around the translation"),
    ("emoji-only", "🐱👍", "", "dropped symbol(s) '🐱👍'"),
    ("none", None, "", "not text (NoneType): nothing to translate"),
    ("bytes", "我喜欢猫。".encode(), ("same", "我喜欢猫。", "", ""), "decoded 15 bytes as UTF-8"),
    ("bad-bytes", b"\xff\xfe", "", "bytes that are not UTF-8"),
    ("control", "我喜欢\x07猫。\x00", ("same", "我喜欢猫。", "", ""), "removed 2 control character(s)"),
    ("long", LONG, ("same", LONG, "", ""), "truncated from"),
    ("unknown-char", "我喜欢鱀。", ("same", "我喜欢鱀。", "", ""), "outside the model's vocabulary become <unk>"),
    ("empty", "", "", "empty input: nothing to translate"),
]


@pytest.fixture(scope="module")
def engines(tiny_bundle_dir, tmp_path_factory):
    """Engine name -> a builder of its translator for the tiny fixture (built lazily, once)."""
    from labkit.core.bundle import load_bundle

    bundle, out, made = load_bundle(tiny_bundle_dir), tmp_path_factory.mktemp("inputs"), {}
    builders = {
        "torch": lambda: StepperTranslator(bundle, decode=CFG),
        "ort": lambda: StepperTranslator(bundle, OrtStepper.from_dir(
            onnx_export.export(bundle, out / "onnx", exporters=("torchscript",))), decode=CFG),
        "ct2": lambda: ct2.Ct2Translator(ct2.convert(bundle, out / "ct2"), decode=CFG),
    }

    def get(name):
        if name not in made:
            made[name] = builders[name]()
        return made[name]

    return get


@pytest.mark.parametrize("engine", ENGINES)
def test_the_bad_input_table(engines, engine):
    translator = engines(engine)
    result = translator.run([row[1] for row in TABLE])
    assert len(result.texts) == len(result.notes) == len(TABLE)
    for (name, _, expected, fragment), text, notes in zip(TABLE, result.texts, result.notes):
        assert any(fragment in n for n in notes), f"{name}: {notes}"
        if isinstance(expected, str):
            assert text == expected, name
        else:
            _, clean, prefix, suffix = expected
            (alone,) = translator.translate([clean])
            assert alone and text == prefix + alone + suffix, name


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_says_the_same_as_torch(engines, engine):
    inputs = [row[1] for row in TABLE]
    got, want = engines(engine).run(inputs), engines("torch").run(inputs)
    assert got.texts == want.texts and got.notes == want.notes


@pytest.mark.parametrize("engine", ENGINES)
def test_512_empties(engines, engine):
    result = engines(engine).run([""] * 512)
    assert result.texts == [""] * 512 and result.timings_ms["decode"] == 0.0
    assert all(n == ["empty input: nothing to translate"] for n in result.notes)


@pytest.mark.parametrize("engine", ENGINES)
def test_force_translates_text_without_chinese(engines, engine):
    translator = engines(engine)
    # Cyrillic: no Chinese, and outside the vocabulary (Latin letters are in it: the corpus has "Tom", "LibreOffice")
    plain, forced = translator.run(["Привет, как дела?"]), translator.run(["Привет, как дела?"], force=True)
    assert plain.ids == [[]] and forced.ids[0], "force must send the text to the model"
    assert "translated anyway" in forced.notes[0][0]
    assert any("outside the model's vocabulary" in n for n in forced.notes[0])


@pytest.mark.parametrize("text,expected", [
    ("  我\x07喜欢   猫 ", ("我喜欢 猫", ["removed 1 control character(s)"])),
    ("ＡＢＣ，", ("ABC,", [])),
    ("\u200b", ("", ["removed 1 control character(s)", "empty input: nothing to translate"])),
    (42, ("", ["not text (int): nothing to translate"])),
])
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_traditional_becomes_simplified_and_simplified_stays():
    assert to_simplified("我們喜歡貓。") == ("我们喜欢猫。", 3)
    assert to_simplified("我们喜欢猫。") == ("我们喜欢猫。", 0)
    assert prepare("我们喜欢猫。").notes == []


def test_symbols_split_at_the_edges_and_inside():
    assert split_symbols("🐱 我喜欢猫。👍") == ("🐱", "我喜欢猫。", "👍", [])
    assert split_symbols("我喜欢🐱猫。") == ("", "我喜欢猫。", "", ["🐱"])
    assert split_symbols("我❤️北京") == ("", "我北京", "", ["❤️"])  # the variation selector goes with it
    assert split_symbols("价格是$5。") == ("", "价格是$5。", "", [])  # ASCII is never a symbol


def test_prepare_skips_the_model_for_what_it_cannot_translate():
    assert prepare("「……」").output == '"......"' and prepare("「……」").source == ""
    assert prepare("2024").source == "" and prepare("2024").output == "2024"
    assert prepare("Hello", force=True).source == "Hello"


# --------------------------------------------------------------------------- repetition loops


@pytest.mark.parametrize("text, expected, repeated", [
    ("put on his put on his put on his", "put on his", "put on his"),
    ("I put on his put on his put on his put on", "I put on his", "put on his"),  # unfinished repeat dropped
    ("I put on his put on his put on his coat.", "I put on his coat.", "put on his"),
    ("He said no no no no to me.", "He said no to me.", "no"),
    ("Onlylyly you can do it.", "Only you can do it.", "ly"),
])
def test_cut_loops_keeps_a_repeated_phrase_once_with_a_note(text, expected, repeated):
    out, notes = inputs.cut_loops(text)
    assert out == expected
    assert len(notes) == 1 and notes[0].startswith(inputs.LOOP_NOTE) and repr(repeated) in notes[0]
    assert quality.degenerate(text) is not None and quality.degenerate(out) is None


@pytest.mark.parametrize("text", ["I like cats.", "It is a very, very, very good idea.", "Tom and Tom's dog.",
                                  "Mississippi is long.", ""])
def test_cut_loops_leaves_ordinary_sentences_alone(text):
    assert inputs.cut_loops(text) == (text, [])


def test_degenerate_names_the_failure():
    assert quality.degenerate("") == "empty" and quality.degenerate("  ") == "empty"
    assert quality.degenerate("a b a b a b") == "repeats 'a b '"
    assert quality.degenerate("I like cats.") is None
