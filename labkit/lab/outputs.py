"""What a participant sees after Run All, checked by class of defect rather than instance by instance.

    problems = output_problems(Path("artifacts/ci/notebooks/02_head_pruning.ipynb"))
    # ['cell 7: 12 progress bars (at most one per cell): evaluate, pruning sweep, ...', ...]
    python -m labkit.lab.outputs artifacts/ci/notebooks     # every executed notebook, one line per problem

Classes (`CHECKS`): more than one progress bar in a cell (nested loops each drawing their own); raw reprs
in outputs (`np.float64(0.5)`, a dataclass's `Budget(a=1, b=2, ...)`); HTML tables with unrounded numbers
(five or more decimals) or wider than the page (estimated from their text at 7.5 px per character, a
wrapping column at most labkit.measure.tables.WRAP_CH characters, against a 1 055 px notebook panel);
plotted series without a colour of their own (plotly's default cycle gives a series a different colour
in each panel, so legends stop matching traces).
Left out: anything that needs a browser to measure (real widths, overlapping labels).
"""

from __future__ import annotations

import html as html_lib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from labkit.measure.tables import WRAP_CH

PAGE_PX = 1055  # JupyterLab's notebook panel at 1 400 px window width
CHAR_PX, CELL_PAD_PX = 7.5, 16
_BAR = re.compile(r"^(?P<desc>[^\r\n|]*?):?\s*\d+%\|")
_RAW_NUMPY = re.compile(r"\bnp\.(?:float|int|uint|bool)\w*\(")
_DATACLASS = re.compile(r"^\s*[A-Z]\w*\((?:\w+=[^,]+,\s*){2,}")
_LONG_DECIMAL = re.compile(r"^-?\d+\.\d{5,}$")
_ROW = re.compile(r"<tr.*?</tr>", re.S)
_CELL = re.compile(r"<t[hd][^>]*>(.*?)</t[hd]>", re.S)
_TAG = re.compile(r"<[^>]+>")


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else (value or "")


def progress_bars(cell: dict) -> list[str]:
    """Descriptions of the progress bars a cell drew (widget bars and text bars on stderr)."""
    bars = []
    for out in cell.get("outputs", []):
        data = out.get("data", {})
        if "application/vnd.jupyter.widget-view+json" in data and (m := _BAR.match(_text(data.get("text/plain")))):
            bars.append(m["desc"].strip() or "(no description)")
        elif out.get("output_type") == "stream" and out.get("name") == "stderr":
            seen = []
            for line in re.split(r"[\r\n]", _text(out.get("text"))):
                if (m := _BAR.match(line)) and (desc := m["desc"].strip() or "(no description)") not in seen:
                    seen.append(desc)
            bars += seen
    return bars


def _plain_outputs(cell: dict) -> list[str]:
    texts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            texts.append(_text(out.get("text")))
        elif "application/vnd.jupyter.widget-view+json" not in out.get("data", {}):
            texts.append(_text(out.get("data", {}).get("text/plain")))
    return texts


def raw_reprs(cell: dict) -> list[str]:
    """Lines that show a numpy scalar's or a dataclass's repr instead of a number or a table."""
    found = []
    for text in _plain_outputs(cell):
        for line in text.splitlines():
            if _RAW_NUMPY.search(line) or _DATACLASS.match(line):
                found.append(line.strip()[:80])
    return found


def _tables(cell: dict) -> list[tuple[list[list[str]], bool]]:
    """(rows of cell texts, whether its cells wrap: a pre-wrap or overflow-wrap style) per HTML table."""
    tables = []
    for out in cell.get("outputs", []):
        page = _text(out.get("data", {}).get("text/html"))
        wraps = "pre-wrap" in page or "overflow-wrap" in page
        for table in re.findall(r"<table.*?</table>", page, re.S):
            rows = [[html_lib.unescape(_TAG.sub("", c)).strip() for c in _CELL.findall(r)] for r in _ROW.findall(table)]
            tables.append(([r for r in rows if r], wraps))
    return tables


def table_problems(cell: dict) -> list[str]:
    """Unrounded numbers and estimated widths over the page, one line per table at fault. A table whose cells
    wrap (labkit.measure.tables.tidy) is estimated with each column at most WRAP_CH characters wide."""
    found = []
    for rows, wraps in _tables(cell):
        long = sorted({c for r in rows for c in r if _LONG_DECIMAL.match(c)})
        if long:
            found.append(f"unrounded numbers such as {long[0]}")
        width = [0] * max((len(r) for r in rows), default=0)
        for r in rows:
            for k, c in enumerate(r):
                width[k] = max(width[k], min(len(c), WRAP_CH) if wraps else len(c))
        px = sum(w * CHAR_PX + CELL_PAD_PX for w in width)
        if px > PAGE_PX:
            found.append(f"a table about {px:.0f} px wide ({len(width)} columns) in a {PAGE_PX} px page")
    return found


def uncoloured_series(cell: dict) -> list[str]:
    """Plotly traces shown in a legend without a colour of their own (marker or line colour)."""
    found = []
    for out in cell.get("outputs", []):
        fig = out.get("data", {}).get("application/vnd.plotly.v1+json")
        if not fig:
            continue
        for trace in fig.get("data", []):
            if trace.get("showlegend") is False or trace.get("type") in ("heatmap", "table", "indicator"):
                continue
            colour = (trace.get("marker") or {}).get("color") or (trace.get("line") or {}).get("color")
            if colour is None and trace.get("fillcolor") is None:
                found.append(str(trace.get("name") or trace.get("type") or "a trace"))
    return found


CHECKS: dict[str, Callable[[dict], list[str]]] = {
    "progress bars": lambda cell: [f"{len(b)} progress bars (at most one per cell): {', '.join(b)}"]
    if len(b := progress_bars(cell)) > 1 else [],
    "raw reprs": lambda cell: [f"raw repr: {line}" for line in raw_reprs(cell)],
    "tables": table_problems,
    "palette": lambda cell: [f"series without the palette's colour: {', '.join(s)}"]
    if (s := uncoloured_series(cell)) else [],
}


def output_problems(path: Path, checks: dict[str, Callable[[dict], list[str]]] = CHECKS) -> list[str]:
    """Every problem the checks find in an executed notebook, as 'cell N: ...' lines."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    return [f"cell {k}: {problem}" for k, cell in enumerate(nb["cells"]) if cell["cell_type"] == "code"
            for check in checks.values() for problem in check(cell)]


def report_problems(argv: list[str] | None = None) -> int:
    """`python -m labkit.lab.outputs DIR`: print every problem; exit status 1 when there is one."""
    directory = Path((argv if argv is not None else sys.argv[1:] or ["artifacts/ci/notebooks"])[0])
    found = 0
    for path in sorted(directory.glob("[0-9][0-9]_*.ipynb")):
        for problem in output_problems(path):
            print(f"{path.name} {problem}")
            found += 1
    print(f"{found} problem(s) in {directory}")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(report_problems())
