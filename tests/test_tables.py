"""Tables as notebooks show them: rounded, short headers, wrapping text, and the output check agrees."""

import numpy as np
import pandas as pd
import pytest

from labkit.lab import outputs
from labkit.measure import tables


@pytest.mark.parametrize("x, shown", [(23.4567, "23.46"), (2.1e-06, "2.1e-06"), (3.4e38, "3.4e+38"), (0.0, "0"),
                                      (float("nan"), "—"), (15187456, "15,187,456"), (np.float64(0.96875), "0.97"),
                                      (np.int64(5), "5"), (True, "True"), ("ok", "ok")])
def test_numbers_show_their_digits_and_small_ones_stay_readable(x, shown):
    assert tables.number(x) == shown


def test_ledger_names_become_words():
    assert [tables.short_name(c) for c in ("metrics.latency_ms.p50", "metrics.bleu", "decode_step_ratio")] == \
        ["p50 ms", "bleu", "decode step ratio"]


def test_a_fitted_ledger_table_passes_the_output_check_that_its_raw_form_fails():
    df = pd.DataFrame({"status": ["failed"] * 3, "metrics.bleu": [17.724736, 15.83, 0.83],
                       "metrics.latency_ms.p50": [70.618488, 42.734999, 193.063916], "gate.passed": [False] * 3,
                       "reason": ["teacher - student = 3.28 BLEU on 100 test sentences, more than the 1.5 allowed"] * 3},
                      index=["student-alternate", "student-6-2", "student-6-1"])

    def problems(frame) -> list[str]:  # a DataFrame or a Styler, as a notebook output
        return outputs.table_problems({"outputs": [{"data": {"text/html": frame.to_html()}}]})

    assert any("unrounded" in p for p in problems(df)) and any("wide" in p for p in problems(df))
    fitted = tables.tidy(df).to_html()
    assert problems(tables.tidy(df)) == [] and "17.72" in fitted and "p50 ms" in fitted
    assert "overflow-wrap" in fitted  # the long reason wraps instead of widening the table


def test_a_repeated_index_becomes_a_column():
    df = pd.DataFrame({"graphs": ["fp16", "fp16", "int8"], "check": ["a", "b", "c"]}).set_index("graphs")
    html = tables.tidy(df).to_html()
    assert "fp16" in html and ">graphs<" in html
