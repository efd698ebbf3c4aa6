"""Notebook 07's study: the cost of every decoding step per KV-cache mode, the exactness checks, records, plots.

    rows = position_costs(model, tokenizer, texts, preset.kv)   # ms per step, per mode and setting
    summary = summarize_positions(rows)                         # first/last/slope/growth per mode
    kv_records(summary, gate, model="opus-mt-shape")            # one kv-cache record per mode

The cache modes themselves live in labkit.engines.torch_cache. Left out: the ONNX Runtime cache
(notebook 04) and device-resident caches (notebook 06).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from labkit.config import KvBudget, Setting
from labkit.core.decode import DecodeConfig, TorchStepper, decode, strip
from labkit.engines.torch_cache import MODES, make_stepper
from labkit.measure.gates import same_tokens_gate
from labkit.measure.ledger import make_record
from labkit.measure.replay import measurement


class TimedStepper:
    """Wraps a Stepper and records the wall time of every step (plus the beam reorder that follows it)."""

    def __init__(self, inner):
        self.inner = inner
        self.start_id, self.eos_id, self.pad_id = inner.start_id, inner.eos_id, inner.pad_id
        self.step_ms: list[float] = []

    def encode(self, input_ids, attention_mask):
        return self.inner.encode(input_ids, attention_mask)

    def step(self, tokens, state):
        start = time.perf_counter()
        out = self.inner.step(tokens, state)
        self.step_ms.append((time.perf_counter() - start) * 1e3)
        return out

    def select(self, state, index):
        start = time.perf_counter()
        out = self.inner.select(state, index)
        if self.step_ms:  # the reorder after step t is part of producing token t
            self.step_ms[-1] += (time.perf_counter() - start) * 1e3
        return out


# --------------------------------------------------------------------------- measurement


def source_batch(tokenizer, texts: list[str], batch: int) -> dict[str, torch.Tensor]:
    """The first `batch` texts (cycled if fewer), tokenized and padded."""
    rows = [texts[i % len(texts)] for i in range(batch)]
    return tokenizer(rows, return_tensors="pt", padding=True)


def time_steps(model, mode: str, enc: dict, setting: Setting, tokens: int) -> tuple[list[float], list[list[int]]]:
    """One forced-length decode: per-step wall ms (position 1..tokens) and the generated ids."""
    stepper = TimedStepper(make_stepper(model, mode, capacity=tokens + 1))
    cfg = DecodeConfig(forced_length=tokens, num_beams=setting.num_beams)
    ids = decode(stepper, enc["input_ids"], enc["attention_mask"], cfg)
    return stepper.step_ms, ids


def decoder_positions(model, mode: str, enc: dict, tokens: int) -> list[int]:
    """How many positions the decoder stack runs over at each step of a forced-length greedy decode.

    The work a mode does, counted rather than timed (so a busy machine cannot blur it): no cache
    recomputes the prefix, [1, 2, ..., tokens]; a cache feeds only the new position, [1, 1, ..., 1].
    """
    seen: list[int] = []

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(int(ids.shape[1]) if ids is not None else int(kwargs["inputs_embeds"].shape[1]))

    handle = model.get_decoder().register_forward_pre_hook(count, with_kwargs=True)
    try:
        decode(make_stepper(model, mode, capacity=tokens + 1), enc["input_ids"][:1], enc["attention_mask"][:1],
               DecodeConfig(forced_length=tokens))
    finally:
        handle.remove()
    return seen


@measurement
def position_costs(model, tokenizer, texts: list[str], budget: KvBudget,
                   modes: tuple[str, ...] = MODES) -> list[dict]:
    """Rows {mode, setting, num_beams, batch, repeat, position, ms} for every timed step.

    Modes are interleaved within each setting and repeat, so a change in machine load
    (another job starting) shifts every mode alike instead of whichever ran last.
    """
    rows = []
    for setting in dict.fromkeys(budget.settings + budget.none_settings):
        enc = source_batch(tokenizer, texts, setting.batch)
        active = [m for m in modes if setting in (budget.none_settings if m == "none" else budget.settings)]
        for r in range(-budget.warmup, budget.repeats):
            for mode in active:
                ms, _ = time_steps(model, mode, enc, setting, budget.tokens)
                if r >= 0:
                    rows += [{"mode": mode, "setting": setting.label, "num_beams": setting.num_beams,
                              "batch": setting.batch, "repeat": r, "position": p + 1, "ms": t}
                             for p, t in enumerate(ms)]
    return rows


def slope(positions, ms) -> float:
    """Theil–Sen ms per step added per position: the O(n) term (≈0 when cost is flat).

    The median of all pairwise slopes, so a few steps slowed by another process (one timed
    decode on a busy machine) do not tilt the line the way they tilt a least-squares fit.
    positions [1, 2, 3, 4], ms [1, 2, 30, 4] -> 1.0 (least squares would say 6.7).
    """
    x, y = np.asarray(positions, float), np.asarray(ms, float)
    i, j = np.triu_indices(len(x), k=1)
    keep = x[j] != x[i]
    return float(np.median((y[j] - y[i])[keep] / (x[j] - x[i])[keep])) if keep.any() else 0.0


def summarize_positions(rows: list[dict]) -> pd.DataFrame:  # noqa: F821
    """Per (mode, setting): median step ms over the first and last eighth of positions, their ratio
    (`growth`: ~1 flat, ~n/8 for O(n)), the Theil–Sen slope, and whole-decode ms p50/p95."""
    import pandas as pd

    order = {m: i for i, m in enumerate(MODES)}
    df = pd.DataFrame(rows).sort_values("mode", key=lambda s: s.map(order), kind="stable")
    out = []
    for (mode, label), g in df.groupby(["mode", "setting"], sort=False):
        per_pos = g.groupby("position")["ms"].median()
        eighth = max(1, len(per_pos) // 8)
        totals = g.groupby("repeat")["ms"].sum()
        out.append({"mode": mode, "setting": label, "num_beams": int(g["num_beams"].iloc[0]),
                    "batch": int(g["batch"].iloc[0]), "tokens": len(per_pos),
                    "first_ms": float(per_pos.iloc[:eighth].median()),
                    "last_ms": float(per_pos.iloc[-eighth:].median()),
                    "slope_ms_per_position": slope(per_pos.index, per_pos.values),
                    "growth": float(per_pos.iloc[-eighth:].median() / per_pos.iloc[:eighth].median()),
                    "decode_ms_p50": float(totals.median()), "decode_ms_p95": float(totals.quantile(0.95)),
                    "n": len(totals)})
    return pd.DataFrame(out)


@measurement
def agree_across_modes(model, enc: dict, cfg: DecodeConfig, modes: tuple[str, ...] = MODES) -> dict[str, bool]:
    """Whether every mode generates the same ids as the dynamic cache (which matches generate)."""
    ref = decode(make_stepper(model, "dynamic"), enc["input_ids"], enc["attention_mask"], cfg)
    limit = (cfg.forced_length or cfg.max_new_tokens) + 1
    return {mode: decode(make_stepper(model, mode, capacity=limit), enc["input_ids"],
                         enc["attention_mask"], cfg) == ref for mode in modes}


def generate_ids(model, enc: dict, cfg: DecodeConfig) -> list[list[int]]:
    """Hugging Face `generate` with the same settings as `cfg`, ids stripped as labkit's decode strips them.

    Natural-length decoding only: `generate` has no exact equivalent of a forced length (Marian's
    generation config forces </s> at the limit), so compare forced-length decodes across modes instead.
    """
    if cfg.forced_length:
        raise ValueError("generate_ids compares natural-length decodes; forced_length has no generate equivalent")
    kwargs = {"num_beams": cfg.num_beams, "length_penalty": cfg.length_penalty, "do_sample": False,
              "early_stopping": cfg.early_stopping, "max_new_tokens": cfg.max_new_tokens}
    with torch.inference_mode():
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs)
    reference = TorchStepper(model)
    return [strip(row[1:].tolist(), reference) for row in out]


@measurement
def agree_with_generate(model, enc: dict, cfg: DecodeConfig, modes: tuple[str, ...] = MODES) -> dict[str, float]:
    """Per mode, the fraction of rows whose ids equal Hugging Face `generate`'s (1.0 = every row).

    The independent oracle for the modes: `agree_across_modes` only compares them with each other.
    """
    reference = generate_ids(model, enc, cfg)
    limit = cfg.max_new_tokens + 1
    out = {}
    for mode in modes:
        ids = decode(make_stepper(model, mode, capacity=limit), enc["input_ids"], enc["attention_mask"], cfg)
        out[mode] = sum(a == b for a, b in zip(ids, reference)) / len(reference)
    return out


def kv_records(summary, gate: dict[str, bool], *, model: str, notebook: str = "07_kv_cache_decoding",
                   setting: str = "greedy, batch 1") -> list[dict]:
    """One `kv-cache` record per mode (variant kv-<mode>): latency of a whole forced-length decode
    in `setting`, tokens/s, the per-token slope, and every setting's numbers under `settings`.

    gate: {"<mode>, beams <k>": same tokens as the dynamic cache, "<mode>, generate beams <k>": same
    tokens as Hugging Face generate}; a mode's gate passes when all of its entries do.
    """

    records = []
    for mode, g in summary.groupby("mode", sort=False):
        main = g[g["setting"] == setting].iloc[0]
        checks = {k: v for k, v in gate.items() if k.startswith(f"{mode},")}
        settings = {r.setting: {"decode_ms_p50": round(r.decode_ms_p50, 3), "first_ms": round(r.first_ms, 3),
                                "last_ms": round(r.last_ms, 3), "slope_ms_per_position": round(r.slope_ms_per_position, 5),
                                "growth": round(r.growth, 3)} for r in g.itertuples()}
        records.append(make_record(
            notebook=notebook, variant=f"kv-{mode}", technique="kv-cache", backend="torch", precision="fp32",
            model=model, parent=None if mode == "dynamic" else "kv-dynamic",
            metrics={"latency_ms": {"p50": float(main.decode_ms_p50), "p95": float(main.decode_ms_p95),
                                    "n": int(main.n)},
                     "tokens_per_s": round(float(main.tokens) / (main.decode_ms_p50 / 1e3), 2)},
            gate=same_tokens_gate(checks),
            per_token_slope_ms=round(float(main.slope_ms_per_position), 5), growth=round(float(main.growth), 3),
            forced_length=int(main.tokens), setting=setting, settings=settings))
    return records


# --------------------------------------------------------------------------- plots


def plot_position_costs(rows: list[dict]) -> Any:
    """Time per step vs position: one panel per setting, one line per mode (median over repeats,
    error bars q1..q3 when there are several)."""
    import pandas as pd
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    df = pd.DataFrame(rows)
    settings = list(dict.fromkeys(df["setting"]))
    fig = make_subplots(rows=1, cols=len(settings), subplot_titles=settings, shared_yaxes=False)
    colors = dict(zip(MODES, ("#d62728", "#1f77b4", "#2ca02c")))
    for col, label in enumerate(settings, start=1):
        for mode, g in df[df["setting"] == label].groupby("mode", sort=False):
            q = g.groupby("position")["ms"].quantile([0.25, 0.5, 0.75]).unstack()
            error = dict(type="data", array=(q[0.75] - q[0.5]).tolist(), arrayminus=(q[0.5] - q[0.25]).tolist(),
                         visible=bool(g["repeat"].nunique() > 1))
            fig.add_trace(go.Scatter(x=q.index.tolist(), y=q[0.5].tolist(), mode="lines", name=mode,
                                     legendgroup=mode, showlegend=col == 1, error_y=error,
                                     line_color=colors.get(mode)), row=1, col=col)
        fig.update_xaxes(title_text="decoder position", row=1, col=col)
        fig.update_yaxes(title_text="ms per step" if col == 1 else None, rangemode="tozero", row=1, col=col)
    fig.update_layout(title="Per-token cost vs position: no cache grows O(n), cached modes stay flat")
    return fig
