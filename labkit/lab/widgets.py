"""A translate box for notebooks: type Chinese, press Translate, see the English and the stage timings.

    box = TranslateBox(translator)
    box.show()                      # Textarea + button + output, rendered by Jupyter
    box.text.value = "我喜欢猫。"
    box.on_translate()              # what the button does; tests and headless runs call it directly

Each non-empty line of the box is one input sentence; they are translated as one batch,
so the timings are the batch's. Headless (papermill) the widgets construct and display as
plain objects; `on_translate` renders the same output as HTML text either way.
Left out: live translation while typing (every keystroke would queue a model call).
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from labkit.core.translator import Result


def split_lines(text: str) -> list[str]:
    """Input sentences of the box: 'a\\n\\n b \\n' -> ['a', ' b '] (blank lines dropped, the rest as typed)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines or [text]  # an empty box is still one (empty) input, so the notes explain it


def timings_table(result: Result) -> pd.DataFrame:
    """The stage timings of one run: columns stage, ms, "% of time" (of the stages' sum)."""
    import pandas as pd

    total = result.total_ms or 1.0
    return pd.DataFrame([{"stage": s, "ms": ms, "% of time": 100 * ms / total} for s, ms in result.timings_ms.items()])


def render(sources: list[str], result: Result) -> str:
    """HTML for a run: one row per input (source, translation, notes) and the timing table."""
    cell = 'style="text-align:left; vertical-align:top; overflow-wrap:anywhere"'
    rows = "".join(
        f"<tr><td {cell}>{html.escape(src)}</td><td {cell}><b>{html.escape(out)}</b></td>"
        f"<td {cell}>{html.escape('; '.join(notes))}</td></tr>"
        for src, out, notes in zip(sources, result.texts, result.notes))
    table = timings_table(result).round({"ms": 2, "% of time": 1}).to_html(index=False)
    # a fixed layout wraps long sources and notes inside the page instead of widening it
    return (f'<table style="table-layout:fixed; width:100%"><colgroup><col style="width:30%"><col style="width:35%">'
            f'<col style="width:35%"></colgroup><tr><th>source</th><th>translation</th><th>notes</th></tr>{rows}</table>'
            f"<p>stage timings for this batch ({result.total_ms:.1f} ms in all):</p>{table}")


class TranslateBox:
    """Textarea + Translate button + HTML output, wired to a Translator."""

    def __init__(self, translator, text: str = "今天天气很好。\n他乘小船过河。"):
        import ipywidgets as w

        self.translator = translator
        # no description label: with one, a 100 % wide box plus its label is wider than the cell and scrolls
        self.text = w.Textarea(value=text, placeholder="Chinese, one sentence per line",
                               layout=w.Layout(width="auto", height="6em"))
        self.button = w.Button(description="Translate", button_style="primary")
        self.output = w.HTML()
        self.result: Result | None = None
        self.button.on_click(lambda _button: self.on_translate())
        self.widget = w.VBox([self.text, self.button, self.output])

    def on_translate(self) -> Result:
        """Translate the box's lines, show them with notes and timings; returns the Result."""
        sources = split_lines(self.text.value)
        self.result = self.translator.run(sources)
        self.output.value = render(sources, self.result)
        return self.result

    def show(self) -> None:
        from IPython.display import display

        display(self.widget)
