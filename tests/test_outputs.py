"""The checks over executed notebooks find each class of defect a participant would see, and pass clean cells."""

from __future__ import annotations

import json

from labkit.lab import outputs


def widget_bar(desc):
    return {"output_type": "display_data", "metadata": {},
            "data": {"application/vnd.jupyter.widget-view+json": {"model_id": "x"},
                     "text/plain": f"{desc}:   0%|          | 0/4 [00:00<?, ?it/s]"}}


def cell(*outs):
    return {"cell_type": "code", "source": "", "metadata": {}, "outputs": list(outs)}


def html(table):
    return {"output_type": "display_data", "metadata": {}, "data": {"text/html": table, "text/plain": "t"}}


def plot(*traces):
    return {"output_type": "display_data", "metadata": {}, "data": {"application/vnd.plotly.v1+json": {"data": list(traces)}}}


def test_stacked_progress_bars_are_found_widget_or_text():
    assert outputs.CHECKS["progress bars"](cell(widget_bar("sweep"))) == []
    assert outputs.CHECKS["progress bars"](cell(widget_bar("sweep"), widget_bar("evaluate"))) == [
        "2 progress bars (at most one per cell): sweep, evaluate"]
    text = {"output_type": "stream", "name": "stderr",
            "text": "train:  10%|#  | 1/10\rtrain:  20%|## | 2/10\rWriting:  0%| | 0/1\n"}
    assert outputs.progress_bars(cell(text)) == ["train", "Writing"]


def test_raw_reprs_are_found_and_numbers_pass():
    dump = {"output_type": "execute_result", "metadata": {}, "execution_count": 1,
            "data": {"text/plain": "PruneBudget(calibration_sentences=64, calibration_batch=16, fractions=(0.0,))"}}
    numpy = {"output_type": "stream", "name": "stdout", "text": "{'speedup': np.float64(1.657)}\n"}
    fine = {"output_type": "stream", "name": "stdout", "text": "speedup 1.66x (f(x=1) is fine)\n"}
    assert len(outputs.raw_reprs(cell(dump, numpy, fine))) == 2
    assert outputs.raw_reprs(cell(fine)) == []


def test_unrounded_and_wide_tables_are_found():
    narrow = "<table><tr><th>a</th><th>b</th></tr><tr><td>1.25</td><td>x</td></tr></table>"
    assert outputs.table_problems(cell(html(narrow))) == []
    unrounded = narrow.replace("1.25", "4958.024742")
    assert outputs.table_problems(cell(html(unrounded))) == ["unrounded numbers such as 4958.024742"]
    wide = "<table><tr>" + "".join(f"<th>column number {i}</th>" for i in range(12)) + "</tr></table>"
    assert outputs.table_problems(cell(html(wide)))[0].startswith("a table about")


def test_series_without_their_own_colour_are_found():
    coloured = {"type": "scatter", "name": "torch", "line": {"color": "#0072B2"}}
    bare = {"type": "scatter", "name": "ort"}
    hidden = {"type": "scatter", "name": "ort", "showlegend": False}
    assert outputs.uncoloured_series(cell(plot(coloured, hidden))) == []
    assert outputs.uncoloured_series(cell(plot(coloured, bare))) == ["ort"]


def test_output_problems_names_the_cell_and_the_command_exits_nonzero_on_a_problem(tmp_path, capsys):
    nb = {"cells": [{"cell_type": "markdown", "source": "x", "metadata": {}},
                    cell(widget_bar("a"), widget_bar("b"))], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "02_x.ipynb"
    path.write_text(json.dumps(nb))
    assert outputs.output_problems(path) == ["cell 1: 2 progress bars (at most one per cell): a, b"]
    assert outputs.report_problems([str(tmp_path)]) == 1
    assert "1 problem(s)" in capsys.readouterr().out
    path.write_text(json.dumps({**nb, "cells": nb["cells"][:1]}))
    assert outputs.report_problems([str(tmp_path)]) == 0


def test_a_table_whose_cells_wrap_is_not_too_wide():
    long = "<table><tr><th>source</th><th>translation</th></tr><tr><td>x</td><td>" + "word " * 300 + "</td></tr></table>"
    assert outputs.table_problems(cell(html(long)))[0].startswith("a table about")
    wrapped = '<style>td {white-space: pre-wrap}</style>' + long
    assert outputs.table_problems(cell(html(wrapped))) == []
