"""Notebook 02's study: the pruning sweep, plan comparison, recovery, ledger records, slider, figures.

    results = sweep(teacher, preset, budget)          # one row per (group, method, fraction)
    records = ledger_records(results, "02_head_pruning")

The mechanism (importance, plans, structural removal) lives in labkit.compress.prune and
labkit.core.heads; this module measures it. Left out: anything a later notebook needs.
"""

from __future__ import annotations

import torch

from labkit.compress.prune import (
    GROUPS,
    calibration_pairs,
    choose_heads,
    ensure_pruned,
    prune_bundle,
    prune_schedule,
    variant_name,
)
from labkit.config import PruneBudget
from labkit.core.bundle import load_bundle
from labkit.core.data import load_split
from labkit.core.decode import DecodeConfig, TorchStepper, greedy
from labkit.core.heads import attention_modules, check_plan, gated, normalize_plan, plan_json, plan_size, total_heads
from labkit.core.translator import translator_for
from labkit.measure import ledger, timing
from labkit.measure.gates import MASKED_PARITY_ATOL, masked_parity_gate, recovery_gate
from labkit.measure.plots import series_colors
from labkit.measure.progress import bar as progress_bar
from labkit.measure.quality import evaluate, latency
from labkit.measure.replay import measurement


def bench_preset(preset, budget: PruneBudget):
    """The preset with the pruning budget's bench sizes (every point, teacher included, uses it)."""
    return preset.with_(bench_sentences=budget.bench_sentences or preset.bench_sentences,
                        bench_repeats=budget.bench_repeats or preset.bench_repeats)


def eval_data(preset, budget: PruneBudget):
    """(test pairs for BLEU, sentences for latency) of this preset and budget."""

    n = budget.eval_sentences if budget.eval_sentences is not None else preset.eval_sentences
    pairs = load_split("test", limit=n) if preset.quality and n != 0 else []
    texts = [p.zh for p in load_split("test", limit=bench_preset(preset, budget).bench_sentences)]
    return pairs, texts


@measurement
def measure_point(bundle, preset, pairs, texts, timed: bool = True) -> dict:
    """BLEU/chrF on `pairs` (skipped when empty) and batch-1 latency on `texts` of one model."""

    translator = translator_for(bundle, preset)
    out = {"params": bundle.params, "size_mb": round(bundle.size_mb, 3), "bleu": None, "chrf": None}
    if pairs:
        scores, _ = evaluate(translator, pairs, batch_size=preset.batch_size, progress=False)  # callers have a bar
        out |= scores.as_metrics()
    if timed:
        threads = torch.get_num_threads()
        m = latency(translator, texts, preset, label=bundle.name)
        torch.set_num_threads(threads)  # latency pins preset.threads; scoring keeps the caller's
        out |= {"latency_ms": timing.as_latency(m), "latency_q1": timing.percentile(m.times_ms, 0.25),
                "latency_q3": timing.percentile(m.times_ms, 0.75), "noisy": m.noisy}
    return out


def masked_parity(teacher, pruned, plan: dict, texts: list[str], atol: float = MASKED_PARITY_ATOL) -> dict:
    """Ledger gate: `pruned` must equal `teacher` with the same heads gated to zero.

    Compares teacher-forced logits along the masked model's greedy output and the greedy
    tokens themselves (dynamic KV cache) on `texts`.
    """

    enc = teacher.tokenizer(texts, return_tensors="pt", padding=True)
    cfg, start = DecodeConfig(max_new_tokens=32), teacher.model.config.decoder_start_token_id
    with gated(teacher.model, plan):
        ref_ids = greedy(TorchStepper(teacher.model), enc["input_ids"], enc["attention_mask"], cfg)
        width = 1 + max(map(len, ref_ids))
        dec = torch.tensor([[start, *ids] + [start] * (width - 1 - len(ids)) for ids in ref_ids])
        with torch.inference_mode():
            ref = teacher.model(**enc, decoder_input_ids=dec).logits
    with torch.inference_mode():
        diff = float((pruned.model(**enc, decoder_input_ids=dec).logits - ref).abs().max())
    same = greedy(TorchStepper(pruned.model), enc["input_ids"], enc["attention_mask"], cfg) == ref_ids
    return masked_parity_gate(diff, same, len(texts), atol)





def _row(group: str, method: str, frac: float, plan: dict, model_heads: int, group_heads: int,
         metrics: dict) -> dict:
    """One results row. `target_frac` is the sweep's target, a fraction of the group's heads."""
    n = plan_size(plan)
    return {"group": group, "method": method, "target_frac": frac, "heads_removed": n,
            "heads_total": model_heads, "heads_removed_frac": n / model_heads,
            "group_heads": group_heads, "group_frac": n / group_heads, "plan": plan_json(plan),
            "variant": variant_name(group, n / model_heads), "parent": "teacher", **metrics}


@measurement
def sweep(teacher, preset, budget: PruneBudget, groups: dict | None = None, progress: bool = True):
    """Prune `teacher` along importance order; one DataFrame row per (group, method, fraction).

    The teacher is measured once, first, with the same texts and repeats (its rows have
    0 heads removed in every group); `speedup` = teacher p50 / point p50. One-shot rows
    (budget.compare_one_shot) carry BLEU only. The fractions of a per-kind group are of
    that kind's heads (`group_frac`); `heads_removed_frac` is of all heads.
    """
    import pandas as pd

    groups = groups or {g: k for g, k in GROUPS.items() if g == "overall" or budget.type_fractions}
    bp, calib = bench_preset(preset, budget), calibration_pairs(budget)
    pairs, texts = eval_data(preset, budget)
    base = measure_point(teacher, bp, pairs, texts)
    methods = [("iterative", budget.iterative, True)]
    if budget.compare_one_shot and budget.iterative:
        methods.append(("one-shot", False, False))
    model_heads, rows = total_heads(teacher.model), []
    # One bar for the whole sweep (a cell shows at most one), over its pruned points; the postfix says where it is.
    points = sum(len(budget.fractions if g == "overall" else (0.0, *budget.type_fractions)) for g in groups)
    outer = progress_bar(points * len(methods), "pruning sweep", unit="point", disable=not progress)
    for group, kinds in groups.items():
        group_heads = total_heads(teacher.model, kinds)
        fracs = budget.fractions if group == "overall" else (0.0, *budget.type_fractions)
        for method, iterative, timed in methods:
            outer.set_postfix_str(f"{group} {method}")
            plans = prune_schedule(teacher.model, teacher.tokenizer, calib, fracs, kinds,
                                   batch_size=budget.calibration_batch, iterative=iterative)
            for frac, plan in plans.items():
                name = variant_name(group, plan_size(plan) / model_heads)
                rows.append(_row(group, method, frac, plan, model_heads, group_heads,
                                 _measure_plan(teacher, plan, name, bp, pairs, texts, timed) if plan else base))
                outer.update()
    outer.close()
    return with_speedup(pd.DataFrame(rows))


def _measure_plan(teacher, plan, name, preset, pairs, texts, timed=True) -> dict:
    """Prune, check against the masked teacher (the gate), then score and time."""
    pruned = prune_bundle(teacher, plan, name)
    gate = masked_parity(teacher, pruned, plan, texts)
    return {**measure_point(pruned, preset, pairs, texts, timed), "gate": gate}


def with_speedup(results):
    """Adds `speedup` = teacher p50 / point p50 (the teacher: the row with 0 heads removed)."""
    p50 = results["latency_ms"].map(lambda l: l["p50"] if isinstance(l, dict) else float("nan"))
    teacher = p50[results["heads_removed"] == 0]
    results["speedup"] = (teacher.iloc[0] / p50) if len(teacher) else float("nan")
    return results


def gate_passed(results):
    """Per row: False only where a gate ran and failed (the teacher's rows have no gate)."""
    if "gate" not in results:
        return results["heads_removed"].map(lambda _: True)
    return results["gate"].map(lambda g: not isinstance(g, dict) or bool(g["passed"]))


def compare_plans(teacher, preset, budget: PruneBudget, plans: dict[str, dict], scores=None):
    """Named plans measured side by side, e.g. a hand-picked choice vs the importance-guided one.

    The group is the one attention kind a plan touches ("overall" when it mixes kinds).
    With `scores`, `importance_removed` sums the (normalized) importance of the removed
    heads: the smaller, the less the choice should hurt.
    """
    import pandas as pd

    bp = bench_preset(preset, budget)
    pairs, texts = eval_data(preset, budget)
    model_heads, rows = total_heads(teacher.model), []
    for name, plan in plans.items():
        plan = check_plan(teacher.model, plan)
        group = next(iter(plan)) if len(plan) == 1 else "overall"
        group_heads = total_heads(teacher.model, GROUPS[group])
        row = _row(group, name, plan_size(plan) / group_heads, plan, model_heads, group_heads,
                   _measure_plan(teacher, plan, name, bp, pairs, texts))
        row["variant"] = name
        if scores is not None:
            row["importance_removed"] = sum(float(scores[k][l, h]) for k, layers in plan.items()
                                            for l, hs in layers.items() for h in hs)
        rows.append(row)
    return pd.DataFrame(rows)


def sweep_point(results, frac: float, group: str = "overall"):
    """The iterative sweep row of `group` at target fraction `frac`; KeyError when the sweep has none."""
    rows = results[(results["group"] == group) & (results["method"] == "iterative")
                   & (results["target_frac"] - frac).abs().lt(1e-9)]
    if rows.empty:
        raise KeyError(f"the sweep has no {group} point at {frac:g}; its fractions: "
                       f"{sorted(results.loc[results['group'] == group, 'target_frac'].unique())}")
    return rows.iloc[0]


def largest_safe(results, max_drop: float = 1.0, group: str = "overall",
                 methods: tuple[str, ...] = ("iterative", "iterative+finetune")) -> dict:
    """The most-pruned point of `group` whose BLEU is within `max_drop` of the teacher's.

    Points whose gate failed never qualify. `methods` picks the rows considered: by default the
    iterative sweep and any recovered (fine-tuned) point; on a tie the point without fine-tuning
    wins (it is the cheaper model to make). Returns {"heads_removed_frac" (of all heads),
    "variant", "method", "finetuned", "bleu", "teacher_bleu", "bleu_drop", "latency_ratio"
    (point p50 / teacher p50: < 1 is faster), "speedup"}; the teacher itself when nothing qualifies.
    """
    rows = results[(results["group"] == group) & results["method"].isin(methods) & gate_passed(results)]
    teacher = rows[rows["heads_removed"] == 0].iloc[0]
    if teacher["bleu"] is None or teacher["bleu"] != teacher["bleu"]:
        return {"heads_removed_frac": None, "variant": None, "reason": "BLEU is n/a for this preset"}
    ok = rows[teacher["bleu"] - rows["bleu"] <= max_drop].assign(finetuned=lambda r: r["method"] != "iterative")
    best = ok.sort_values(["heads_removed_frac", "finetuned"], ascending=[True, False]).iloc[-1]
    ratio = best["latency_ms"]["p50"] / teacher["latency_ms"]["p50"]
    return {"heads_removed_frac": float(best["heads_removed_frac"]), "variant": best["variant"],
            "method": best["method"], "finetuned": bool(best["finetuned"]),
            "bleu": float(best["bleu"]), "teacher_bleu": float(teacher["bleu"]),
            "bleu_drop": float(teacher["bleu"] - best["bleu"]), "latency_ratio": ratio, "speedup": 1 / ratio}




@measurement
def recovery(teacher, results, preset, budget: PruneBudget, progress: bool = False):
    """One overall sweep point, fine-tuned for budget.finetune_steps and measured again.

    The point is budget.finetune_frac (None: the most pruned). The fine-tuned bundle is the
    one `ensure_pruned` caches for later notebooks (built here if missing), so what is measured
    here is what they load. One row like the sweep's (method "iterative+finetune", variant
    "<point>-ft", parent the pruned point); empty when the budget has no fine-tune steps. The
    gate: BLEU must not fall below the pruned-only point's (recovery should only help).
    """
    import pandas as pd

    if not budget.finetune_steps:
        return pd.DataFrame()
    point = _recovery_point(results, budget)
    tuned = load_bundle(ensure_pruned(preset, teacher, point["target_frac"], budget=budget,
                                      progress=progress))
    if normalize_plan(tuned.meta["head_plan"]) != normalize_plan(point["plan"]):
        raise RuntimeError(f"the cached {tuned.name} does not have the sweep's plan for {point['variant']}")
    pairs, texts = eval_data(preset, budget)
    metrics = measure_point(tuned, bench_preset(preset, budget), pairs, texts)
    run = tuned.meta["recovery_finetune"]
    gate = recovery_gate(point["bleu"], metrics["bleu"], run["steps"])
    row = _row("overall", "iterative+finetune", point["target_frac"], point["plan"], point["heads_total"],
               point["group_heads"], {**metrics, "gate": gate, "finetune_steps": run["steps"],
                                      "finetune_s": run["wall_time_s"], "history": run["history"]})
    teacher_p50 = results.loc[results["heads_removed"] == 0, "latency_ms"].iloc[0]["p50"]  # timed in the sweep
    return pd.DataFrame([row | {"variant": tuned.name, "parent": point["variant"],
                                "speedup": teacher_p50 / metrics["latency_ms"]["p50"]}])


def _recovery_point(results, budget: PruneBudget):
    if budget.finetune_frac is not None:
        return sweep_point(results, budget.finetune_frac)
    rows = results[(results["group"] == "overall") & (results["method"] == "iterative")]
    return rows.sort_values("heads_removed_frac").iloc[-1]


# --------------------------------------------------------------------------- handler


def pruning_records(results, notebook: str) -> list[dict]:
    """One `pruning` record per timed point (the 0 % point once: the teacher measured in this run).

    `results` may concatenate several frames (sweep, compare_plans, recovery); the teacher
    is the timed row with 0 heads removed. Extra keys: heads_removed_frac (of ALL heads),
    group_frac (of the pruned group's heads), heads_removed, heads_total, attention (the group),
    head_plan, teacher_latency_ms and speedup (teacher p50 / point p50, same run). The gate is
    the pruned-equals-masked check (recovery-not-worse for a fine-tuned point); a failed gate
    makes the record status "failed" with the gate's detail as reason (`ledger.make_record`). Each
    row names its parent: the teacher, or for a recovered point the pruned point it started from.
    """

    timed = results[results["latency_ms"].map(lambda l: isinstance(l, dict))]
    teacher = timed[timed["heads_removed"] == 0].iloc[0]["latency_ms"]
    records, seen = [], set()
    for _, row in timed.iterrows():
        variant = variant_name("overall", 0.0) if row["heads_removed"] == 0 else row["variant"]
        if variant in seen:
            continue
        seen.add(variant)
        metrics = {"bleu": ledger.json_number(row["bleu"]), "chrf": ledger.json_number(row["chrf"]),
                   "latency_ms": row["latency_ms"],
                   "params": int(row["params"]), "size_mb": float(row["size_mb"])}
        if isinstance(row.get("bleu_signature"), str):
            metrics["bleu_signature"] = row["bleu_signature"]
        extra = {"finetune_steps": int(row["finetune_steps"]), "finetune_s": ledger.json_number(row.get("finetune_s"))} \
            if ledger.json_number(row.get("finetune_steps")) else {}
        gate = row["gate"] if isinstance(row.get("gate"), dict) else None
        records.append(ledger.make_record(
            notebook=notebook, variant=variant, technique="pruning", backend="torch", precision="fp32",
            parent=row["parent"], metrics=metrics, gate=gate,
            heads_removed_frac=round(float(row["heads_removed_frac"]), 4),
            group_frac=round(float(row["group_frac"]), 4), heads_removed=int(row["heads_removed"]),
            heads_total=int(row["heads_total"]), attention=row["group"], head_plan=row["plan"],
            teacher_latency_ms=teacher, speedup=round(teacher["p50"] / row["latency_ms"]["p50"], 4), **extra))
    return records




def head_slider(teacher, preset, budget: PruneBudget, scores: dict[str, torch.Tensor]):
    """An ipywidgets slider: prune the k least important heads (one-shot ranking), show BLEU and latency.

    BLEU on budget.slider_sentences test pairs, latency on budget.slider_bench_sentences x 1
    pass (a quick look, not a measurement to report). The callback runs once when displayed,
    so a headless run shows the default point.
    """
    import ipywidgets as widgets

    bp = preset.with_(bench_sentences=budget.slider_bench_sentences, bench_repeats=1, bench_warmup=1)
    pairs = eval_data(preset, budget)[0][: budget.slider_sentences]
    texts = [p.zh for p in load_split("test", limit=bp.bench_sentences)]
    total = total_heads(teacher.model)
    most = total - sum(len(m) for m in attention_modules(teacher.model).values())

    seen: dict[int, dict] = {}  # each k is measured once: going back to a position is instant

    def show(k: int) -> None:
        if k not in seen:
            seen[k] = measure_point(prune_bundle(teacher, choose_heads(scores, k)), bp, pairs, texts)
        m = seen[k]
        bleu = "n/a" if m["bleu"] is None else f"{m['bleu']:.1f}"
        print(f"{k}/{total} heads removed ({k / total:.0%}): BLEU {bleu} on {len(pairs)} sentences, "
              f"latency p50 {m['latency_ms']['p50']:.1f} ms on {len(texts)} sentences x {bp.bench_repeats} "
              f"pass, {m['params']:,} parameters\n(a quick look: so few timings are noisy, differences of tens of "
              "ms can be chance; the sweep's figure above has the measured latencies)")

    # A wide track with the value beside it: the default ~100 px track cannot pick one head out of 96.
    slider = widgets.IntSlider(value=round(0.25 * total), min=0, max=most, description="heads removed",
                               continuous_update=False, readout=True, style={"description_width": "initial"},
                               layout=widgets.Layout(width="min(100%, 720px)"))
    return widgets.VBox([slider, widgets.interactive_output(show, {"k": slider})])


# --------------------------------------------------------------------------- figures


def importance_figure(scores: dict[str, torch.Tensor]):
    """Layer x head heat maps of normalized importance, one per attention kind (plotly)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(scores), subplot_titles=[k.replace("_", " ") for k in scores],
                        horizontal_spacing=0.06)
    zmax = max(float(s.max()) for s in scores.values())
    for col, s in enumerate(scores.values(), start=1):
        layers, heads = s.shape
        fig.add_trace(go.Heatmap(z=s.numpy(), x=[f"h{h + 1}" for h in range(heads)],
                                 y=[f"L{l + 1}" for l in range(layers)], zmin=0, zmax=zmax,
                                 coloraxis="coloraxis", hovertemplate="%{y} %{x}: %{z:.3f}<extra></extra>"),
                      row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title="Head importance |dL/d gate|, L2-normalized per layer", height=360,
                      coloraxis={"colorscale": "Viridis", "colorbar": {"title": "importance"}})
    return fig


SWEEP_PANELS = (("bleu", "BLEU"), ("chrf", "chrF"), ("latency", "latency p50 (ms, batch 1)"))


def _sweep_traces(rows, name: str, dash: str | None, color: str, mode: str = "lines+markers") -> dict:
    """{panel: Scatter} of one line in `color` on every panel; x is % of ALL heads, hover adds % of the group's."""
    import plotly.graph_objects as go

    style = dict(name=name, legendgroup=name, mode=mode, line={"dash": dash, "color": color},
                 marker={"size": 12 if mode == "markers" else 6, "color": color,
                         "symbol": "star" if mode == "markers" else "circle"}, customdata=100 * rows["group_frac"],
                 hovertemplate="%{x:.0f} % of all heads (%{customdata:.0f} % of the group's): %{y:.2f}"
                               "<extra>" + name + "</extra>")
    x = 100 * rows["heads_removed_frac"]
    traces = {"bleu": go.Scatter(x=x, y=rows["bleu"], **style),
              "chrf": go.Scatter(x=x, y=rows["chrf"], showlegend=False, **style)}
    lat = rows[rows["latency_ms"].map(lambda l: isinstance(l, dict))]
    if len(lat):
        p50 = lat["latency_ms"].map(lambda l: l["p50"])
        traces["latency"] = go.Scatter(
            x=100 * lat["heads_removed_frac"], y=p50, showlegend=False,
            error_y={"type": "data", "symmetric": False, "array": lat["latency_q3"] - p50,
                     "arrayminus": p50 - lat["latency_q1"]}, **(style | {"customdata": 100 * lat["group_frac"]}))
    return traces


def sweep_figure(results, max_drop: float = 1.0):
    """BLEU, chrF and batch-1 latency (p50, IQR bars) vs % of ALL heads removed, one line per group/method.

    Per-kind groups end where their kind is exhausted (half of one kind's heads is 1/6 of all
    of them); a recovered (fine-tuned) point is a separate marker, not part of any line.
    """
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(SWEEP_PANELS), subplot_titles=[t for _, t in SWEEP_PANELS])
    colors = series_colors(GROUPS)  # a group keeps its colour on every panel; method changes the dash/marker
    for (group, method), rows in results.groupby(["group", "method"], sort=False):
        if method not in ("iterative", "one-shot", "iterative+finetune"):
            continue
        rows = rows.sort_values("heads_removed_frac")
        finetuned = method == "iterative+finetune"
        name = (group if method == "iterative" else f"{group} ({method})" if not finetuned
                else f"{group}, recovered ({int(rows['finetune_steps'].iloc[0])} fine-tune steps)")
        traces = _sweep_traces(rows, name, "dot" if method == "one-shot" else None, colors[group],
                               "markers" if finetuned else "lines+markers")
        for col, (panel, _) in enumerate(SWEEP_PANELS, start=1):
            if panel in traces:
                fig.add_trace(traces[panel], row=1, col=col)
    teacher_bleu = results.loc[results["heads_removed"] == 0, "bleu"]
    if teacher_bleu.notna().any():
        # the label sits at the left end, where no point is: the recovered star is at 25 % or more
        fig.add_hline(y=float(teacher_bleu.iloc[0]) - max_drop, line_dash="dash", line_color="gray",
                      annotation_text=f"teacher - {max_drop:g} BLEU", annotation_position="bottom left",
                      row=1, col=1)
    fig.update_xaxes(title="% of all heads removed")
    fig.update_layout(title="Importance-ordered head pruning", height=440, margin={"b": 90})
    fig.add_annotation(text="latency bars: the middle half of the timings (p25 to p75); overlapping bars "
                            "are differences the machine's noise can make", xref="paper", yref="paper",
                       x=1, y=-0.25, showarrow=False, xanchor="right", font={"size": 11, "color": "gray"})
    return fig
