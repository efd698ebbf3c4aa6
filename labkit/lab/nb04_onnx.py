"""Notebook 04's study: the `onnx-fp32` record, gated on parity and token agreement, timed in own processes.

    record = onnx_record(bundle, meta, parity, agreement, n, 0.99, speed, scores, size, sweep)

Exporting and the parity check live in labkit.engines.onnx_export, the rule in labkit.measure.gates.
Left out: the session sweep itself (labkit.engines.ort.session_sweep).
"""

from __future__ import annotations

from labkit.core.bundle import Bundle, bundle_key
from labkit.engines.ort import SessionConfig
from labkit.measure import ledger
from labkit.measure.gates import onnx_parity_gate


def _latency(row) -> dict:
    return {"p50": float(row.p50_ms), "p95": float(row.p95_ms), "n": int(row.n)}


def onnx_record(bundle: Bundle, meta: dict, parity: dict, same: float, n: int,
                min_agreement: float, speed, scores, size_mb: float, sweep: dict, quality: bool = True) -> dict:
    """The `onnx` record of an export: `speed` is labkit bench's frame (indexed by variant, torch and ort-fp32
    timed in their own processes); the in-process session sweep travels as an extra, marked as such."""
    ort_row, torch_row = speed.loc["ort-fp32"], speed.loc["torch"]
    key = bundle_key(bundle)
    gate = onnx_parity_gate(parity, same, n, min_agreement if quality else 0.0)
    metrics = {"agreement": round(same, 4), "latency_ms": _latency(ort_row),
               "sentences_per_s": round(float(ort_row.sentences_per_s), 3), "size_mb": round(size_mb, 3),
               **(scores.as_metrics() if scores else {})}
    return ledger.make_record(
        notebook="04_onnx_export", variant="onnx-fp32" if key == "teacher" else f"onnx-fp32-{key}",
        technique="onnx", parent=key, backend="onnxruntime", precision="fp32", model=bundle.name,
        metrics=metrics, gate=gate, exporter=meta["exporter"], opset=meta["opset"], session=SessionConfig().label,
        parity_max_abs=parity["graphs"], own_process=True, torch_latency_ms=_latency(torch_row),
        speedup=round(float(ort_row.speedup), 3), in_process_session_p50_ms={k: round(m.p50, 3) for k, m in sweep.items()})
