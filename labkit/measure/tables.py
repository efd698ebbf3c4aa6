"""Tables as a notebook shows them: rounded, short headers, text that wraps instead of pushing off the page.

    tables.tidy(ledger.latest(df, names)[["variant", "metrics.bleu", "metrics.latency_ms.p50", "reason"]])
    # variant | bleu | p50 ms | reason   (23.4567 -> 23.46, 2.1e-06 stays readable, long reasons wrap)

The ledger's dotted names ("metrics.latency_ms.p50") are for code; a reader wants "p50 ms". A number
shows `digits` decimals, except a small non-zero one (parity errors, 2e-06), which shows in scientific
notation instead of rounding to 0.00. Text cells and headers wrap at `wrap_ch` characters, so a reason or
a sentence no longer widens the table past JupyterLab's panel (labkit.lab.outputs checks the estimate).
Left out: column selection (the caller knows which columns tell the story).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    from pandas.io.formats.style import Styler

WRAP_CH = 24  # a wrapped text column's width in characters (labkit.lab.outputs estimates with the same)
SHORT = {"latency_ms.p50": "p50 ms", "latency_ms.p95": "p95 ms", "latency_ms.n": "timed calls",
         "gate.passed": "gate passed", "gate.detail": "gate", "tokens_per_s": "tokens/s",
         "sentences_per_s": "sentences/s", "peak_rss_mb": "peak RSS MB", "size_mb": "size MB"}


def short_name(column) -> str:
    """'metrics.latency_ms.p50' -> 'p50 ms', 'metrics.bleu' -> 'bleu', 'decode_step_ratio' -> 'decode step ratio'."""
    name = str(column).removeprefix("metrics.")
    return SHORT.get(name, name.replace("_", " ").replace(".", " "))


def number(x, digits: int = 2) -> str:
    """number(23.4567) -> '23.46'; number(2.1e-06) -> '2.1e-06'; number(3.4e38) -> '3.4e+38'; number(0.0) -> '0';
    number(nan) -> '—'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if hasattr(x, "item"):  # a numpy scalar
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, float) and abs(x) >= 1e9:
        return f"{x:.1e}"
    if isinstance(x, int) or float(x).is_integer():
        return f"{int(x):,}" if abs(x) >= 10_000 else str(int(x))
    if abs(x) < 10 ** -digits:
        return f"{x:.1e}"
    return f"{x:,.{digits}f}" if abs(x) >= 10_000 else f"{x:.{digits}f}"


def tidy(df: pd.DataFrame, digits: int = 2, wrap_ch: int = WRAP_CH, rename: bool = True) -> Styler:
    """`df` as a Styler: short headers, numbers by `number`, text and headers wrapping at `wrap_ch`; an index
    that repeats (the same variant from two notebooks) is shown as a column."""
    import numpy as np

    df = df.rename(columns=short_name) if rename else df
    if not df.index.is_unique:  # a Styler needs unique labels: a repeated index becomes a column
        df = df.reset_index(drop=df.index.name is None and not any(df.index.names))
    numeric = [c for c in df.columns if df[c].dtype.kind in "fiu"]
    styler = df.style.format({c: (lambda x, d=digits: number(x, d)) for c in numeric}, na_rep="—")
    styler = styler.format_index(lambda x: number(x, digits) if isinstance(x, (float, np.floating)) else x)
    wrap = {"max-width": f"{wrap_ch}ch", "overflow-wrap": "anywhere", "white-space": "normal"}
    return (styler.set_properties(**wrap)
            .set_table_styles([{"selector": "th", "props": [(k, v) for k, v in wrap.items()]}], overwrite=False))
