"""The translate box, driven without a browser: set the text, call the handler, read the output."""

from __future__ import annotations

import html

import pytest

from labkit.core.decode import DecodeConfig
from labkit.core.translator import STAGES, StepperTranslator
from labkit.lab import widgets


@pytest.fixture()
def translator(tiny_bundle):
    return StepperTranslator(tiny_bundle, decode=DecodeConfig(max_new_tokens=12))


def test_handler_translates_each_line_and_shows_timings(translator):
    box = widgets.TranslateBox(translator)
    box.text.value = "我喜欢猫。\n\n他昨天去了北京。\n"
    result = box.on_translate()
    expected = translator.translate(["我喜欢猫。", "他昨天去了北京。"])
    assert result.texts == expected
    for text in expected:
        assert f"<b>{html.escape(text)}</b>" in box.output.value
    table = widgets.timings_table(result)
    assert table["stage"].tolist() == list(STAGES) and (table["ms"] > 0).all()
    assert table["% of time"].sum() == pytest.approx(100)
    assert "stage timings" in box.output.value


def test_a_new_translation_replaces_the_timings_on_screen(translator):
    box = widgets.TranslateBox(translator, text="我喜欢猫。")
    box.on_translate()
    first = box.output.value
    box.text.value = "我们有三本书。"
    second = box.on_translate()
    assert box.output.value != first and "我喜欢猫" not in box.output.value
    assert f"({second.total_ms:.1f} ms in all)" in box.output.value  # the timings of the translation shown


def test_button_click_runs_the_handler(translator):
    box = widgets.TranslateBox(translator, text="我们有三本书。")
    box.button.click()
    assert box.result is not None and box.result.texts == translator.translate(["我们有三本书。"])


def test_empty_box_explains_itself(translator):
    box = widgets.TranslateBox(translator, text="   ")
    result = box.on_translate()
    assert result.texts == [""] and "empty input" in box.output.value


@pytest.mark.parametrize("text,lines", [("a\n\n b \n", ["a", " b "]), ("", [""]), ("一", ["一"])])
def test_split_lines(text, lines):
    assert widgets.split_lines(text) == lines
