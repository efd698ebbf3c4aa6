"""KV-cache decoding modes for the PyTorch backend, and what each costs per generated token.

Three ways to produce token t+1 (`MODES`, all exact: same tokens as `generate`):

    none     recompute the whole prefix every step (TorchStepper cache="none"):
             step t runs every decoder layer over t tokens, so per-token cost grows O(t)
    dynamic  Hugging Face's DynamicCache (TorchStepper cache="dynamic"): keeps K/V and
             appends with torch.cat, which re-allocates and copies the whole cache each step
    static   PreallocatedCache below: K/V buffers of a fixed capacity allocated once,
             the new position written in place; attention reads a view of the filled prefix

In every cached mode cross-attention K/V are computed once per source (the cross
half of the EncoderDecoderCache) and reused at every step. `position_costs` times
every step of a forced-length decode, so the notebook can plot time per step
against position for each mode, greedy vs beam, batch 1 vs 8.

    stepper = StaticStepper(model, capacity=129)
    decode(stepper, ids, mask, DecodeConfig(forced_length=128))

Left out: paged / block caches (serving many requests of different lengths),
quantized caches, and torch.compile of the fixed-shape variant.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from labkit.decode import DecodeConfig, TorchStepper, decode, strip

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError:  # transformers < 5 has no layer classes; labkit needs 5.x anyway
    Cache, CacheLayerMixin = object, object

# --------------------------------------------------------------------------- the preallocated cache


class PreallocatedLayer(CacheLayerMixin):
    """One layer's self-attention K/V in buffers of `capacity` positions, filled in place.

    update() copies the new positions into the buffer and returns views of the
    filled prefix [0, length): nothing is re-allocated while decoding, and
    attention only reads positions that exist.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.k_buf = self.v_buf = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        # empty, not zeros: positions >= length are never read
        self.k_buf = key_states.new_empty(b, h, self.capacity, d)
        self.v_buf = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache capacity {self.capacity} exceeded at position {end}; "
                             "create the stepper with capacity >= tokens to generate + 1")
        self.k_buf[:, :, start:end] = key_states
        self.v_buf[:, :, start:end] = value_states
        self.length = end
        self.keys, self.values = self.k_buf[:, :, :end], self.v_buf[:, :, :end]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0  # as a dynamic cache: the mask covers the filled prefix only

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam reorder of the filled prefix, back into the same buffers (a new pair if the row count changes)."""
        if not self.length:
            return
        n = self.length
        keys, values = self.k_buf[:, :, :n].index_select(0, beam_idx), self.v_buf[:, :, :n].index_select(0, beam_idx)
        if keys.shape[0] != self.k_buf.shape[0]:
            self.lazy_initialization(keys, values)
        self.k_buf[:, :, :n], self.v_buf[:, :, :n] = keys, values
        self.keys, self.values = self.k_buf[:, :, :n], self.v_buf[:, :, :n]

    def reset(self) -> None:
        self.length = 0


class PreallocatedCache(Cache):
    """A self-attention cache of `n_layers` PreallocatedLayers; pair it with a DynamicCache for cross K/V."""

    def __init__(self, n_layers: int, capacity: int):
        super().__init__(layers=[PreallocatedLayer(capacity) for _ in range(n_layers)])


# --------------------------------------------------------------------------- steppers


class StaticStepper(TorchStepper):
    """TorchStepper whose self-attention cache is preallocated (capacity positions) and written in place.

    capacity defaults to the model's position limit, which no decode can exceed;
    pass forced_length + 1 (the start token takes a position) to allocate less.
    """

    def __init__(self, model, capacity: int | None = None):
        super().__init__(model, cache="dynamic")
        self.cache_mode = "static"
        self.capacity = capacity or model.config.max_position_embeddings

    def _new_cache(self):
        from transformers import DynamicCache, EncoderDecoderCache

        n = len(self.model.model.decoder.layers)
        return EncoderDecoderCache(PreallocatedCache(n, self.capacity), DynamicCache())


def make_stepper(model, mode: str, capacity: int | None = None):
    """The stepper for one cache mode: make_stepper(model, "static", capacity=129)."""
    if mode == "static":
        return StaticStepper(model, capacity)
    if mode in ("none", "dynamic"):
        return TorchStepper(model, cache=mode)
    raise ValueError(f"unknown cache mode {mode!r}; known: {MODES}")


MODES = ("none", "dynamic", "static")


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


@dataclass(frozen=True)
class Setting:
    """One decoding shape to time: beams and batch rows."""

    num_beams: int = 1
    batch: int = 1

    @property
    def label(self) -> str:
        return f"{'greedy' if self.num_beams == 1 else f'beam {self.num_beams}'}, batch {self.batch}"


@dataclass(frozen=True)
class KvBudget:
    tokens: int = 128  # forced decode length: positions 1..tokens are timed
    repeats: int = 3  # timed decodes per (mode, setting); the per-position median is plotted
    warmup: int = 1  # untimed decodes first
    settings: tuple[Setting, ...] = (Setting(1, 1), Setting(4, 1), Setting(1, 8))
    none_settings: tuple[Setting, ...] = (Setting(1, 1), Setting(4, 1), Setting(1, 8))  # O(n^2) mode: trim here
    model: str = "opus-mt-shape"  # ModelSpec kind of the model timed (realistic shape)


KV_BUDGETS = {
    # ci: ~60 s on 2 cores; the no-cache mode only greedy batch 1 (it is the O(n^2) one)
    "ci": KvBudget(tokens=128, repeats=1, warmup=0, settings=(Setting(1, 1), Setting(4, 1), Setting(1, 8)),
                   none_settings=(Setting(1, 1),)),
    "workshop": KvBudget(tokens=192, repeats=3),
    "opus-mt-zh-en": KvBudget(tokens=128, repeats=3),
    "opus-mt-shape": KvBudget(tokens=128, repeats=3),
}


def budget_for(preset_name: str) -> KvBudget:
    return KV_BUDGETS.get(preset_name, KvBudget())


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


def summarize(rows: list[dict]) -> "pd.DataFrame":  # noqa: F821
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


def ledger_records(summary, gate: dict[str, bool], *, model: str, notebook: str = "07_kv_cache_decoding",
                   setting: str = "greedy, batch 1") -> list[dict]:
    """One `kv-cache` record per mode (variant kv-<mode>): latency of a whole forced-length decode
    in `setting`, tokens/s, the per-token slope, and every setting's numbers under `settings`.

    gate: {"<mode>, beams <k>": same tokens as the dynamic cache, "<mode>, generate beams <k>": same
    tokens as Hugging Face generate}; a mode's gate passes when all of its entries do.
    """
    from labkit.ledger import make_record

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
            gate={"name": "same-tokens-as-generate-and-across-modes", "passed": bool(checks) and all(checks.values()),
                  "detail": ", ".join(f"{k}: {'same' if v else 'DIFFERENT'}" for k, v in checks.items())},
            per_token_slope_ms=round(float(main.slope_ms_per_position), 5), growth=round(float(main.growth), 3),
            forced_length=int(main.tokens), setting=setting, settings=settings))
    return records


# --------------------------------------------------------------------------- plots


def plot_position_costs(rows: list[dict]) -> Any:
    """Time per step vs position: one panel per setting, one line per mode (median over repeats,
    error bars q1..q3 when there are several)."""
    import pandas as pd
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

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
