"""Notebook 07's last section: the decode loop moved into ONNX Runtime, gated and timed against the Python loop.

    gates = loop_gates(preset, bundle, texts)                 # greedy + beam 4 vs labkit.core.decode
    measured = time_loops(preset, bundle, texts)              # batch-1 latency, same graphs, same run
    table = loop_table(measured)                              # p50/p95, ms per decode step, speedup
    loop_records(table, gates, model=bundle.name)             # ledger records with their gates

Both engines run the same fp32 graphs (labkit.engines.onnx_export's directory, which
labkit.engines.ort_loop assembles into one BeamSearch model), so the difference is the loop alone:
per-step Python, numpy conversions and session dispatch. Left out: the int8 loop (labkit bench
--variants ort-int8-loop) and batch > 1 throughput (labkit bench).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from labkit.core.translator import StepperTranslator, decode_config
from labkit.engines.onnx_export import ensure_onnx
from labkit.engines.ort import OrtStepper, translate_ids
from labkit.engines.ort_loop import LoopTranslator, ensure_loop
from labkit.measure import timing
from labkit.measure.gates import loop_gate
from labkit.measure.ledger import make_record
from labkit.measure.plots import PALETTE
from labkit.measure.quality import agreement, latency
from labkit.measure.replay import measurement

ENGINES = ("python loop", "in-engine loop")


@dataclass(frozen=True)
class LoopGates:
    """What the loop's tokens are worth, per decoding: gate dicts and the sentences that differ."""

    gates: dict[str, dict]  # "greedy" / "beam 4" -> {name, passed, detail}
    same_rule: dict[str, float]  # "beam 4" -> agreement with labkit.core.decode(stop_rule="candidates")
    differing: dict[str, list[int]]  # decoding -> indices of sentences whose tokens differ


def python_translator(preset, bundle, num_beams: int = 1, stop_rule: str = "running",
                      threads: int = 1) -> StepperTranslator:
    """labkit.core.decode over the preset's fp32 graphs (the loop model's own graphs)."""
    cfg = dataclasses.replace(decode_config(preset, num_beams), stop_rule=stop_rule)
    return StepperTranslator(bundle, OrtStepper.from_dir(ensure_onnx(preset, bundle), threads=threads), cfg)


def loop_translator_for(preset, bundle, num_beams: int = 1, threads: int = 1) -> LoopTranslator:
    return LoopTranslator(ensure_loop(preset, bundle), bundle.tokenizer, decode_config(preset, num_beams), threads)


@measurement
def loop_gates(preset, bundle, texts: list[str], beams: tuple[int, ...] = (1, 4)) -> LoopGates:
    """Tokens of the in-engine loop vs labkit.core.decode on `texts`, greedy and beam (one thread each).

    Beam search is also compared with the Python loop under the operator's own stopping rule
    (labkit.engines.ort_loop's docstring), which says whether a difference is that rule or a bug.
    """
    gates, same_rule, differing = {}, {}, {}
    for k in beams:
        name = "greedy" if k == 1 else f"beam {k}"
        ours, _ = translate_ids(loop_translator_for(preset, bundle, k), texts, preset.batch_size)
        ref, _ = translate_ids(python_translator(preset, bundle, k), texts, preset.batch_size)
        differing[name] = [i for i, (a, b) in enumerate(zip(ours, ref)) if a != b]
        note = f"{preset.name}, {name}, {len(texts)} sentences"
        if k > 1:
            rule, _ = translate_ids(python_translator(preset, bundle, k, "candidates"), texts, preset.batch_size)
            same_rule[name] = agreement(ours, rule)
            note += (f"; with the operator's stopping rule (stop_rule='candidates') identical on "
                     f"{round(same_rule[name] * len(texts))}/{len(texts)}; differing sentences {differing[name][:20]}")
        gates[name] = loop_gate(ours, ref, "labkit.core.decode", note)
    return LoopGates(gates, same_rule, differing)


def decode_steps(translator, texts: list[str], preset) -> list[int]:
    """Decoder steps per sentence: generated tokens plus the </s> step (forced-length runs have none)."""
    ids, _ = translate_ids(translator, texts, preset.batch_size)
    return [len(row) + (0 if preset.forced_length else 1) for row in ids]


@measurement
def time_loops(preset, bundle, texts: list[str]) -> dict[str, tuple[timing.Measurement, list[int]]]:
    """{engine: (batch-1 latency Measurement, decoder steps per sentence)}, greedy, the preset's threads,
    both engines in this process one after the other (one run, so their ratio is comparable)."""
    engines = {ENGINES[0]: python_translator(preset, bundle, threads=preset.threads),
               ENGINES[1]: loop_translator_for(preset, bundle, threads=preset.threads)}
    return {name: (latency(t, texts, preset, label=name), decode_steps(t, texts, preset)) for name, t in engines.items()}


def loop_table(measured: dict[str, tuple[timing.Measurement, list[int]]]):
    """One row per engine: p50/p95/IQR of batch-1 latency, noise flag, mean ms per decoder step, speedup."""
    import pandas as pd

    rows = []
    for name, (m, steps) in measured.items():
        mean_steps = sum(steps) / len(steps)
        rows.append({"engine": name, "p50_ms": m.p50, "p95_ms": m.p95, "iqr_ms": m.iqr, "noisy": m.noisy, "n": m.n,
                     "threads": m.threads, "steps_per_sentence": mean_steps, "ms_per_step": m.mean / mean_steps})
    table = pd.DataFrame(rows)
    table["speedup_vs_python"] = table["p50_ms"].iloc[0] / table["p50_ms"]
    return table


def loop_records(table, gates: LoopGates, *, model: str, precision: str = "fp32",
                 notebook: str = "07_kv_cache_decoding") -> list[dict]:
    """The in-engine loop's ledger records: greedy latency with the greedy gate; beam with its own gate."""
    loop = table.set_index("engine").loc[ENGINES[1]]
    python = table.set_index("engine").loc[ENGINES[0]]
    common = dict(notebook=notebook, technique="kv-cache", backend="onnxruntime", precision=precision, model=model,
                  parent=f"ort-{precision}")
    greedy = make_record(variant=f"ort-{precision}-loop", gate=gates.gates["greedy"], **common,
                         metrics={"latency_ms": {"p50": float(loop.p50_ms), "p95": float(loop.p95_ms), "n": int(loop.n)},
                                  "tokens_per_s": round(1e3 / float(loop.ms_per_step), 2)},
                         python_loop_latency_ms={"p50": float(python.p50_ms), "p95": float(python.p95_ms)},
                         speedup_vs_python_loop=round(float(loop.speedup_vs_python), 3),
                         ms_per_step={"python": round(float(python.ms_per_step), 4),
                                      "engine": round(float(loop.ms_per_step), 4)}, noisy=bool(loop.noisy))
    beam = [make_record(variant=f"ort-{precision}-loop-{name.replace(' ', '')}", gate=g, **common,
                        same_as_operator_rule=gates.same_rule.get(name), differing_sentences=gates.differing[name])
            for name, g in gates.gates.items() if name != "greedy"]
    return [greedy, *beam]


def plot_loops(table) -> Any:
    """Batch-1 latency p50 per engine, bars to p95, and mean ms per decoder step as text."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(
        x=table["engine"], y=table["p50_ms"], marker_color=[PALETTE[0], PALETTE[1]][: len(table)],
        error_y=dict(type="data", symmetric=False, array=(table["p95_ms"] - table["p50_ms"]).tolist(),
                     arrayminus=[0] * len(table)),
        text=[f"{r.ms_per_step:.2f} ms/step" + (" (noisy)" if r.noisy else "") for r in table.itertuples()],
        textposition="outside"))
    fig.update_layout(title="The same graphs, the loop in Python vs in ONNX Runtime (batch 1, greedy)",
                      yaxis_title="latency p50 (ms), bar to p95", xaxis_title="")
    return fig
