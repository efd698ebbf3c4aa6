"""report.html: self-contained (no CDN), one section per notebook with its own columns, and it
renders in headless Chromium at 1400 px with the headline and both figures, without horizontal scrolling."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from labkit.measure import ledger, report, report_html

ENV = {"cpu": "test cpu", "cores": 2, "threads": 2, "gpu": None, "versions": {"torch": "2"}, "git": "abc123"}


def lat(p50, p95=None):
    return {"p50": p50, "p95": p95 or p50 * 1.2, "n": 20}


@pytest.fixture()
def ledger_df(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RUN_ID", "run-a")
    path = tmp_path / "ci" / "ledger.jsonl"

    def rec(**f):
        return ledger.make_record(env=ENV, **f)

    ledger.append(path, rec(notebook="00_setup_and_baseline", variant="teacher", technique="baseline",
                            backend="torch", precision="fp32", metrics={"bleu": 99.0, "latency_ms": lat(26.0, 614.0),
                                                                        "size_mb": 12.0}))
    ledger.append_all(path, [rec(
        notebook="02_head_pruning", variant=f"pruned-{k}pct-with-a-long-descriptive-name", technique="pruning",
        parent="teacher", backend="torch", precision="fp32", teacher_latency_ms=lat(26.0),
        metrics={"bleu": 99.0 - k / 10, "chrf": 99.0, "latency_ms": lat(26.0 - k / 5), "size_mb": 12.0 - k / 10},
        gate={"name": "pruned-equals-masked", "passed": True, "detail": "max |diff| 1e-6"}) for k in range(0, 60, 5)])
    ledger.append_all(path, [
        rec(notebook="05_int8_quantization", variant="ct2-int8", technique="peer", parent="teacher",
            backend="ctranslate2", precision="int8", metrics={"bleu": 98.9, "latency_ms": lat(6.5), "size_mb": 3.1},
            gate={"name": "bleu-drop<=1.0", "passed": True, "detail": "0.1"}),
        rec(notebook="05_int8_quantization", variant="onnx-int8-qdq", technique="quantization", parent="onnx-fp32",
            metrics={"bleu": 60.0}, gate={"name": "bleu-drop<=1.0", "passed": False,
                                          "detail": "BLEU dropped 39.0 points " + "because of a reason " * 8})])
    ledger.append(path, rec(notebook="06_tensorrt", variant="trt-fp16", technique="tensorrt", status="skipped",
                            reason="no CUDA device: TensorRT needs an NVIDIA GPU"))
    ledger.append_all(path, [rec(notebook="07_kv_cache_decoding", variant=f"kv-{m}", technique="kv-cache",
                                 forced_length=128, parent=None if m == "dynamic" else "kv-dynamic",
                                 metrics={"latency_ms": lat(ms), "tokens_per_s": 60.0})
                             for m, ms in (("dynamic", 2100.0), ("static", 1700.0))])
    return report.load(path)


def test_page_is_self_contained_with_a_section_per_notebook(ledger_df, tmp_path):
    page = report_html.write(ledger_df, "ci", tmp_path / "out").read_text()
    assert not re.search(r"<script[^>]+src=", page), "plotly.js must be inline: the report opens offline"
    assert page.count('class="plotly-graph-div"') == 2
    for nb in ("00_setup_and_baseline", "02_head_pruning", "05_int8_quantization", "06_tensorrt", "07_kv_cache_decoding"):
        assert f'id="nb-{nb}"' in page and f"--only {nb[:2]}" in page
    assert "4.00x" in page and "ct2-int8" in page.split('id="headline"')[1].split("</div>")[0]
    kv = page.split('id="nb-07_kv_cache_decoding"')[1].split("</section>")[0]
    assert "decode p50 / p95 (s, whole decode)" in kv and "latency p50" not in kv  # units stay apart
    assert "BLEU" not in kv  # a column no row of the section fills is left out
    teacher = page.split('id="nb-00_setup_and_baseline"')[1].split("</section>")[0]
    assert "noisy" in teacher  # p95 614 ms over p50 26 ms is flagged where it is shown
    assert "trt-fp16: skipped (no CUDA device" in page and "onnx-int8-qdq: failed" in page


CHROMIUM = Path(report_html.CHROMIUM).exists() and Path(report_html.CHROMEDRIVER).exists()


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM, reason="needs Debian's chromium + chromium-driver (apt-get install chromium chromium-driver)")
def test_renders_in_headless_chromium_at_1400px(ledger_df, tmp_path):
    pytest.importorskip("selenium", reason="pip install selenium (the test extra)")
    page = report_html.write(ledger_df, "ci", tmp_path / "out")
    shot = page.with_name("report.png")
    info = report_html.screenshot(page, shot)
    assert info["inner_width"] == 1400 and info["scroll_width"] <= 1400, info
    assert info["headline"].startswith("4.00x faster than the teacher") and "ct2-int8" in info["headline"]
    assert info["figures"] == 2
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
