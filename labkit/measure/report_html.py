"""The forwardable report: `artifacts/<preset>/report.html`, one self-contained page that opens offline.

    path = report_html.write(df, "ci", artifacts.preset_dir("ci"))   # df: report.load(ledger path)
    report_html.screenshot(path, path.with_suffix(".png"))         # headless Chromium, 1400 px wide

The page: a headline (the teacher against the fastest variant whose gate passed, same run), the
Pareto plot and a speedup bar chart (plotly, its JavaScript inlined: no CDN), one section per
notebook with only the columns it measured (run id and time, the command that reproduces it,
failed and skipped variants with their reasons), and the environment. It fits 1400 px without
horizontal scrolling. Numbers come from `labkit.measure.report` (which run, which speedup).
Left out: history across runs, styling themes, PDF export.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

from labkit.core.artifacts import REPO_ROOT
from labkit.measure import plots, report

if TYPE_CHECKING:
    import pandas as pd

TITLES = {
    "00_setup_and_baseline": "00 · Baseline", "01_profiling": "01 · Profiling", "02_head_pruning": "02 · Head pruning",
    "03_distillation": "03 · Distillation", "04_onnx_export": "04 · ONNX export",
    "05_int8_quantization": "05 · INT8 quantization", "06_tensorrt": "06 · TensorRT",
    "07_kv_cache_decoding": "07 · KV-cache decoding (whole 128-token decodes)", "08_serving": "08 · Serving",
    "labkit-bench": "labkit bench · engines in their own processes",
}  # fmt: skip
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
main{max-width:1320px;margin:0 auto;padding:16px 24px}
h1{font-size:26px;margin:8px 0 2px}h2{font-size:19px;margin:28px 0 6px;border-bottom:1px solid #ddd}
.meta,.cmd{color:#555;font-size:13px}.cmd code{background:#eee;padding:1px 5px;border-radius:3px}
#headline{background:#fff;border-left:6px solid #009E73;padding:12px 18px;font-size:17px;margin:14px 0;
 box-shadow:0 1px 3px #0002}
#headline .big{font-size:30px;font-weight:600}
table{border-collapse:collapse;width:100%;font-size:13px;background:#fff;table-layout:auto}
th,td{border-bottom:1px solid #e5e5e5;padding:4px 6px;text-align:right;vertical-align:top}
th{background:#f0f0f0;position:sticky;top:0}
td.t,th.t{text-align:left;overflow-wrap:anywhere;max-width:26em}
tr.failed td{background:#fff0f0}tr.skipped td{background:#f6f6f6;color:#666}
.noisy{color:#b35900;font-weight:600}.figure{background:#fff;margin:10px 0;box-shadow:0 1px 3px #0002}
ul.problems li{margin:2px 0}
"""
TEXT = ("variant", "engine", "gate", "status", "reason")
# (header, table column(s), format) in display order; a column no row of a section fills is left out.
COLUMNS = (
    ("variant", "variant", "{}"),
    ("engine", "engine", "{}"),
    ("latency p50 / p95 (ms)", ("latency_p50_ms", "latency_p95_ms"), "{:,.1f} / {:,.1f}"),
    ("decode p50 / p95 (s, whole decode)", ("decode_p50_ms", "decode_p95_ms"), None),
    ("speedup", "speedup", None),
    ("BLEU", "bleu", "{:.2f}"),
    ("chrF", "chrf", "{:.2f}"),
    ("agreement", "agreement", "{:.3f}"),
    ("size (MB)", "size_mb", "{:,.1f}"),
    ("peak RSS (MB)", "peak_rss_mb", "{:,.0f}"),
    ("sentences/s", "sentences_per_s", "{:,.1f}"),
    ("tokens/s", "tokens_per_s", "{:,.1f}"),
    ("QPS", "qps", "{:,.1f}"),
    ("tokenize (ms)", "tokenize_ms", "{:.2f}"),
    ("gate", "gate", "{}"),
    ("status", "status", "{}"),
    ("reason", "reason", "{}"),
)


def _present(x) -> bool:
    return x is not None and x == x and x != ""


def _cell(row: pd.Series, columns, fmt: str | None) -> str:
    """One formatted cell ('' when the row lacks the number); noisy timings are marked where shown."""
    if columns == "speedup":
        return "" if not _present(row["speedup"]) else f"{row['speedup']:.2f}x vs {html.escape(row['speedup_vs'])}"
    if isinstance(columns, tuple):
        values = [row[c] for c in columns]
        if not _present(values[0]):
            return ""
        text = (fmt or "{:,.2f} / {:,.2f}").format(*[v / 1000 if fmt is None else v for v in values])
        return text + (' <span class="noisy" title="IQR/median over 10 % or p95 over 3x p50">noisy</span>'
                       if row["noisy"] else "")
    value = row[columns]
    return html.escape(fmt.format(value)) if _present(value) else ""


def section_table(rows: pd.DataFrame) -> str:
    """An HTML table of one notebook's rows with only the columns that section measured."""
    rows = rows.assign(engine=[" ".join(str(v) for v in (b, p) if _present(v)) for b, p in
                               zip(rows["backend"], rows["precision"])])
    cells = {h: [_cell(r, cols, fmt) for _, r in rows.iterrows()] for h, cols, fmt in COLUMNS}
    cells = {h: v for h, v in cells.items() if any(v)}
    head = "".join(f'<th class="{"t" if h in TEXT else ""}">{html.escape(h)}</th>' for h in cells)
    body = "".join(
        f'<tr class="{html.escape(status)}">' + "".join(
            f'<td class="{"t" if h in TEXT else ""}">{v[i]}</td>' for h, v in cells.items()) + "</tr>"
        for i, status in enumerate(rows["status"]))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def command(notebook: str, preset: str) -> str:
    """The command that reproduces a section: `labkit run --preset ci --only 02` (or labkit bench)."""
    if notebook == "labkit-bench":
        return f"labkit bench --preset {preset}"
    return f"labkit run --preset {preset} --only {notebook[:2]}"


def _headline(table: pd.DataFrame) -> str:
    head = report.headline(table)
    if head is None:
        return ('<div id="headline">No headline yet: no variant with a passed gate was timed against the teacher '
                "in the same run. Run 00 and at least one optimization notebook.</div>")
    bleu = ("" if not _present(head["bleu_change"]) else
            f", BLEU {head['bleu_change']:+.2f} ({head['bleu']:.2f})")
    size = ("" if not _present(head["size_mb"]) else
            f", {head['size_mb']:.1f} MB" + (f" vs {head['teacher_size_mb']:.1f} MB" if _present(head["teacher_size_mb"]) else ""))
    noisy = ' <span class="noisy">(noisy timing: treat the ratio as approximate)</span>' if head["noisy"] else ""
    return (f'<div id="headline"><span class="big">{head["speedup"]:.2f}x</span> faster than the teacher: '
            f"<b>{html.escape(head['variant'])}</b> ({TITLES.get(head['notebook'], head['notebook'])}), "
            f"p50 {head['p50_ms']:.1f} ms per sentence{bleu}{size}; gate passed; teacher timed in the same run "
            f"<code>{html.escape(head['run_id'])}</code>.{noisy}</div>")


def _section(notebook: str, rows: pd.DataFrame, run: pd.Series, preset: str) -> str:
    when = f"{run['time']:%Y-%m-%d %H:%M} UTC"
    state = "" if run["complete"] else f' <b class="noisy">incomplete run: {html.escape(run["why"])}</b>'
    passed = (f"; {run['newer_incomplete']} later incomplete run(s) passed over" if run["newer_incomplete"] else "")
    problems = "".join(f"<li>{html.escape(p)}</li>" for p in report.problems(rows))
    return (f'<section id="nb-{html.escape(notebook)}"><h2>{html.escape(TITLES.get(notebook, notebook))}</h2>'
            f'<div class="meta">run <code>{html.escape(run["run_id"])}</code> at {when}, {run["records"]} records '
            f'({run["ok"]} ok, {run["failed"]} failed, {run["skipped"]} skipped){passed}.{state}</div>'
            f'<div class="cmd">reproduce: <code>{html.escape(command(notebook, preset))}</code></div>'
            + section_table(rows)
            + (f'<p>Failed or skipped:</p><ul class="problems">{problems}</ul>' if problems else "") + "</section>")


def _figures(df: pd.DataFrame, table: pd.DataFrame) -> str:
    """The Pareto plot and the speedup bars as plotly divs; the first carries plotly.js inline (offline)."""
    figs = [plots.pareto(df), plots.speedup_bar(table)]
    return "".join(
        f'<div class="figure">{fig.to_html(full_html=False, include_plotlyjs=i == 0, default_width="100%", config={"responsive": True, "displaylogo": False})}</div>'
        for i, fig in enumerate(figs))


def _environment(df: pd.DataFrame) -> str:
    envs = [r.get("env") for r in df["record"] if isinstance(r, dict) and r.get("env")] if len(df) else []
    if not envs:
        return "<p>No records yet.</p>"
    env = report.environment_table(envs[-1])
    rows = "".join(f'<tr><td class="t">{html.escape(str(a))}</td><td class="t">{html.escape(str(b))}</td>'
                   f'<td class="t">{html.escape(str(c))}</td></tr>' for a, b, c in env.itertuples(index=False))
    return f'<table><thead><tr><th class="t">item</th><th class="t">value</th><th class="t">meaning</th></tr></thead>{rows}</table>'


def page_html(df: pd.DataFrame, preset: str, generated: str | None = None) -> str:
    """The whole page for a ledger DataFrame (`report.load`); `generated` is the timestamp shown."""
    table = report.before_after(df)
    chosen = report.chosen_runs(df)
    order = sorted(chosen.index, key=lambda nb: (nb == "labkit-bench", nb))
    sections = "".join(_section(nb, table[table["notebook"] == nb], chosen.loc[nb], preset) for nb in order
                       if (table["notebook"] == nb).any())
    missing = "".join(f"<li>{html.escape(m)}</li>" for m in report.missing_steps(df, REPO_ROOT / "notebooks"))
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>labkit report: {html.escape(preset)}'
            f'</title><meta name="viewport" content="width=device-width"><style>{CSS}</style></head><body><main>'
            f"<h1>Inference optimization report · preset <code>{html.escape(preset)}</code></h1>"
            f'<div class="meta">generated {html.escape(generated or "")}; per notebook, its latest complete run '
            f"(every record it announced written, at least one ok); speedups only against a baseline timed in "
            f"the same run; batch-1 latency per sentence unless said otherwise.</div>"
            + _headline(table) + "<h2>Latency, quality and speedup</h2>" + _figures(df, table) + sections
            + (f'<h2>Not measured yet</h2><ul class="problems">{missing}</ul>' if missing else "")
            + "<h2>Environment</h2>" + _environment(df) + "</main></body></html>")


def write(df: pd.DataFrame, preset: str, directory: str | Path) -> Path:
    """Render and write `report.html` under `directory` atomically; returns its path."""
    import datetime as dt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".report.html.tmp"
    tmp.write_text(page_html(df, preset, f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"), encoding="utf-8")
    return tmp.replace(directory / "report.html")


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's chromium + chromium-driver


def screenshot(page: str | Path, png: str | Path, width: int = 1400, timeout_s: float = 60.0) -> dict:
    """Open `page` in headless Chromium at `width` px, wait for the figures, save a full-page PNG.

    Returns {"scroll_width", "headline", "figures"} (figures: plotly plots drawn). Needs selenium
    (pip install selenium) and Debian's chromium + chromium-driver (apt-get install chromium chromium-driver).
    """
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError as exc:
        raise RuntimeError("the screenshot needs selenium: pip install selenium") from exc
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},900", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(Path(page).resolve().as_uri())
        count = "return document.querySelectorAll('.js-plotly-plot .main-svg').length"
        WebDriverWait(driver, timeout_s).until(lambda d: d.execute_script(count) > 0)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(width, min(int(height) + 120, 16000))
        info = {"scroll_width": driver.execute_script("return document.documentElement.scrollWidth"),
                "headline": driver.execute_script("return document.getElementById('headline').innerText"),
                "figures": driver.execute_script("return document.querySelectorAll('.js-plotly-plot').length"),
                "inner_width": driver.execute_script("return window.innerWidth")}
        driver.save_screenshot(str(png))
        return info
    finally:
        driver.quit()
