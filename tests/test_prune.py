"""Head pruning: the masked model is the oracle for the pruned one.

Oracles: a structurally pruned model must equal the unpruned model with the same heads
gated to zero (logits to 1e-5, identical greedy and beam tokens through the dynamic KV
cache); the gate gradient must equal a finite difference of the loss; parameter counts
follow by hand from the shapes; a saved pruned bundle reloads bit for bit, generation
config included. Fractions: `heads_removed_frac` is of ALL heads, `group_frac` of the group's.
"""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch

from labkit.compress import prune
from labkit.config import Preset
from labkit.core import data
from labkit.core.bundle import load_bundle, start_row_norm
from labkit.core.decode import DecodeConfig, TorchStepper, decode
from labkit.core.heads import (
    ATTENTION_KINDS,
    HeadGates,
    gate_values,
    gated,
    head_counts,
    merge_plans,
    model_plan,
    normalize_plan,
    plan_json,
    plan_size,
    prune_heads,
)
from labkit.lab.nb02_pruning import (
    compare_plans,
    head_slider,
    importance_figure,
    largest_safe,
    masked_parity,
    pruning_records,
    recovery,
    sweep,
    sweep_figure,
    sweep_point,
)
from labkit.measure import ledger

CI = Preset.from_name("ci")

SOURCES = ["他去了北京。", "我喜欢猫。", "他们明天会去学校吗？", "我的朋友没有买三本书。"]
# tiny fixture: 2 encoder + 2 decoder layers, 4 heads of head_dim 16 (d_model 64)
PLANS = {
    "encoder": {"encoder_self": {0: [1, 3], 1: [0]}},
    "decoder_self": {"decoder_self": {1: [0, 1, 2]}},  # leaves layer 1 one head
    "cross": {"cross": {0: [2], 1: [0, 3]}},
    "mixed": {"encoder_self": {1: [2]}, "decoder_self": {0: [3]}, "cross": {1: [1, 2, 3]}},
}


def encoded(bundle):
    return bundle.tokenizer(SOURCES, return_tensors="pt", padding=True)


def logits(model, enc):
    start = model.config.decoder_start_token_id
    dec = torch.tensor([[start, 12, 30, 7, 45]] * enc["input_ids"].shape[0])
    with torch.inference_mode():
        return model(**enc, decoder_input_ids=dec).logits


def tokens(model, enc, cache="dynamic", beams=1):
    cfg = DecodeConfig(max_new_tokens=24, num_beams=beams)
    return decode(TorchStepper(model, cache=cache), enc["input_ids"], enc["attention_mask"], cfg)


def test_pruning_zero_heads_changes_nothing(tiny_bundle):
    enc = encoded(tiny_bundle)
    before, params = logits(tiny_bundle.model, enc), tiny_bundle.params
    pruned = prune.prune_bundle(tiny_bundle, {"cross": {0: []}})
    assert torch.equal(logits(pruned.model, enc), before)
    assert pruned.params == params and pruned.meta["heads_removed"] == 0
    with gated(tiny_bundle.model, {}):
        assert torch.equal(logits(tiny_bundle.model, enc), before)


@pytest.mark.parametrize("name", PLANS)
def test_pruned_model_equals_gated_model(tiny_bundle, name):
    plan, enc = PLANS[name], encoded(tiny_bundle)
    pruned = prune.prune_bundle(tiny_bundle, plan).model
    with gated(tiny_bundle.model, plan):
        masked_logits = logits(tiny_bundle.model, enc)
        masked = {(c, b): tokens(tiny_bundle.model, enc, c, b) for c in ("dynamic", "none") for b in (1, 3)}
    torch.testing.assert_close(logits(pruned, enc), masked_logits, atol=1e-5, rtol=0)
    for (cache, beams), ids in masked.items():
        assert tokens(pruned, enc, cache, beams) == ids, (cache, beams)
    assert not torch.allclose(masked_logits, logits(tiny_bundle.model, enc), atol=1e-3)  # the heads mattered


def test_parameter_count_and_head_counts_by_hand(tiny_bundle):
    """A head of width 16 in d_model 64 owns q/k/v rows (3 x (16*64 + 16)) and out_proj columns (64*16):
    4*64*16 + 3*16 = 4144 parameters; PLANS['mixed'] removes 5 heads -> 20720."""
    pruned = prune.prune_bundle(tiny_bundle, PLANS["mixed"])
    assert tiny_bundle.params - pruned.params == 5 * 4144
    assert head_counts(pruned.model) == {"encoder_self": [4, 3], "decoder_self": [3, 4], "cross": [4, 1]}
    assert model_plan(pruned.model) == normalize_plan(PLANS["mixed"])


def test_save_and_reload_is_exact(tiny_bundle, tmp_path):
    enc = encoded(tiny_bundle)
    pruned = prune.prune_bundle(tiny_bundle, PLANS["mixed"], name="pruned-test")
    pruned.save(tmp_path / "p")
    again = load_bundle(tmp_path / "p")
    assert torch.equal(logits(again.model, enc), logits(pruned.model, enc))
    assert tokens(again.model, enc) == tokens(pruned.model, enc)
    assert again.meta["head_plan"] == plan_json(PLANS["mixed"]) and again.params == pruned.params
    assert model_plan(again.model) == normalize_plan(PLANS["mixed"])


def test_plans_compose_and_reapplying_is_a_no_op(tiny_bundle):
    enc = encoded(tiny_bundle)
    once = prune.prune_bundle(tiny_bundle, PLANS["mixed"])
    first = prune.prune_bundle(tiny_bundle, {"cross": {1: [1, 3]}, "decoder_self": {0: [3]}})
    twice = prune.prune_bundle(first, PLANS["mixed"])  # adds encoder 1/2 and cross 1/2 only
    assert torch.equal(logits(twice.model, enc), logits(once.model, enc))
    assert twice.meta["head_plan"] == once.meta["head_plan"]
    prune_heads(twice.model, PLANS["mixed"])
    assert twice.model.num_parameters() == once.model.num_parameters()


@pytest.mark.parametrize("plan, match", [
    ({"cross": {0: [0, 1, 2, 3]}}, "at least one"),
    ({"encoder_self": {2: [0]}}, "out of range"),
    ({"decoder_self": {0: [4]}}, "out of range"),
    ({"self": {0: [0]}}, "unknown attention kind"),
])
def test_bad_plans_are_refused(tiny_bundle, plan, match):
    with pytest.raises(ValueError, match=match):
        prune_heads(tiny_bundle.model, plan)


def test_importance_shape_sign_and_layer_norm(tiny_bundle):
    pairs = data.load_split("train", limit=32)
    scores = prune.head_importance(tiny_bundle.model, tiny_bundle.tokenizer, pairs, batch_size=8)
    assert {k: tuple(v.shape) for k, v in scores.items()} == {k: (2, 4) for k in ATTENTION_KINDS}
    for s in scores.values():
        assert bool((s >= 0).all()) and torch.isfinite(s).all()
        torch.testing.assert_close(s.norm(dim=-1), torch.ones(2))
    assert not any(p.grad is not None for p in tiny_bundle.model.parameters())  # gates only


def test_masked_importance_equals_importance_of_the_pruned_model(tiny_bundle):
    pairs, plan = data.load_split("train", limit=16), PLANS["mixed"]
    masked = prune.head_importance(tiny_bundle.model, tiny_bundle.tokenizer, pairs, mask=plan, normalize=False)
    pruned = prune.prune_bundle(tiny_bundle, plan).model
    direct = prune.head_importance(pruned, tiny_bundle.tokenizer, pairs, normalize=False)
    for kind in ATTENTION_KINDS:
        torch.testing.assert_close(direct[kind], masked[kind], atol=1e-6, rtol=1e-4)
    assert float(masked["cross"][1, 1:].abs().sum()) == 0.0  # removed heads score zero


def test_gate_gradient_matches_a_finite_difference(tiny_bundle):
    """|dL/dxi| from autograd vs |L(xi + e) - L(xi - e)| / 2e with the other gates at 1 (float64)."""
    from labkit.compress.training import collate, encode_pairs, label_smoothed_ce

    model, tok = tiny_bundle.model.double(), tiny_bundle.tokenizer
    pairs = data.load_split("train", limit=6)
    grads = prune.head_importance(model, tok, pairs, batch_size=len(pairs), normalize=False)
    batch = collate(encode_pairs(tok, pairs), tok.pad_token_id)

    def loss_at(kind, layer, head, value):
        values = {k: v.double() for k, v in gate_values(model).items()}  # 1 + eps exactly
        values[kind][layer, head] = value
        with HeadGates(model, values), torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return float(label_smoothed_ce(out.logits, batch["labels"], 0.0))

    eps = 1e-4
    for kind, layer, head in [("encoder_self", 0, 1), ("decoder_self", 1, 3), ("cross", 0, 0)]:
        fd = abs(loss_at(kind, layer, head, 1 + eps) - loss_at(kind, layer, head, 1 - eps)) / (2 * eps)
        assert float(grads[kind][layer, head]) == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_choose_heads_takes_the_least_important_and_keeps_one_per_module():
    """encoder layer 0 scores [.1, .2, .3, .9]: three heads go before any other, the 4th never."""
    scores = {k: torch.full((1, 4), 0.5) for k in ATTENTION_KINDS}
    scores["encoder_self"] = torch.tensor([[0.1, 0.2, 0.3, 0.05]])
    scores["cross"] = torch.tensor([[0.4, 0.6, 0.7, 0.8]])
    assert prune.choose_heads(scores, 2) == {"encoder_self": {0: [0, 3]}}
    assert prune.choose_heads(scores, 4) == {"encoder_self": {0: [0, 1, 3]}, "cross": {0: [0]}}
    assert prune.choose_heads(scores, 1, kinds=("cross",), plan={"cross": {0: [0]}}) == {"cross": {0: [0, 1]}}
    with pytest.raises(ValueError, match="more heads"):
        prune.choose_heads(scores, 10)


def test_plan_json_round_trip():
    plan = {"cross": {"1": [3, 1, 1]}, "encoder_self": {0: []}}
    as_json = plan_json(plan)
    assert as_json == {"encoder_self": {}, "decoder_self": {}, "cross": {"1": [1, 3]}}
    assert normalize_plan(json.loads(json.dumps(as_json))) == {"cross": {1: [1, 3]}}
    assert plan_size(merge_plans(plan, {"cross": {1: [2]}})) == 3


@pytest.mark.parametrize("iterative", [True, False])
def test_schedule_is_nested_and_hits_the_fractions(tiny_bundle, iterative):
    pairs = data.load_split("train", limit=16)
    plans = prune.prune_schedule(tiny_bundle.model, tiny_bundle.tokenizer, pairs, (0.5, 0.0, 0.25),
                                 ("decoder_self", "cross"), iterative=iterative)
    assert list(plans) == [0.0, 0.25, 0.5]
    assert [plan_size(p) for p in plans.values()] == [0, 4, 8]  # of 16 decoder-side heads
    assert merge_plans(plans[0.25], plans[0.5]) == plans[0.5]
    assert "encoder_self" not in plans[0.5]


# Sweep-level tests share one small sweep of the tiny fixture (24 heads: 2 layers x 4 heads x 3 kinds).
TINY_PRESET = Preset.from_name("ci").with_(bench_warmup=0, threads=1)  # 2 threads crawl on a busy 2-core box
TINY_BUDGET = dataclasses.replace(
    Preset.from_name("ci").prune, calibration_sentences=16, fractions=(0.0, 0.25), type_fractions=(0.5,),
    eval_sentences=6, bench_sentences=2, bench_repeats=1, finetune_steps=3, finetune_frac=0.25,
    finetune_batch=8, slider_sentences=3, slider_bench_sentences=2)
GROUPS = {"overall": ATTENTION_KINDS, "cross": ("cross",)}


@pytest.fixture(scope="module")
def swept(tiny_bundle_dir):
    teacher = load_bundle(tiny_bundle_dir)
    return teacher, sweep(teacher, TINY_PRESET, TINY_BUDGET, groups=GROUPS, progress=False)


def recovered_row(results, bleu=None):
    """A hand-made fine-tuned copy of the 25 % point (what `recovery` returns), for table-level tests."""
    point = results[results["variant"] == "pruned-25pct"]
    return point.assign(method="iterative+finetune", variant="pruned-25pct-ft", parent="pruned-25pct",
                        bleu=point["bleu"] if bleu is None else bleu, finetune_steps=3,
                        gate=[{"name": "recovery-not-worse", "passed": True, "detail": "by hand"}])


def test_sweep_fractions_are_of_all_heads_and_its_records_are_valid(swept, tmp_path):
    """Overall 25 % = 6 of 24 heads; half the cross-attention heads = 4 of 8 = 1/6 of all 24."""
    _, results = swept
    assert len(results) == 4 and results["bleu"].notna().all() and results["chrf"].notna().all()
    path = tmp_path / "ledger.jsonl"
    for record in pruning_records(results, notebook="02_head_pruning"):
        ledger.append(path, record)
    df = ledger.read(path)
    assert list(df["variant"]) == ["pruned-0pct", "pruned-25pct", "pruned-17pct-cross"]
    assert list(df["heads_removed"]) == [0, 6, 4] and set(df["heads_total"]) == {24}
    assert list(df["heads_removed_frac"]) == [0.0, 0.25, 0.1667]
    assert list(df["group_frac"]) == [0.0, 0.25, 0.5]
    assert set(df["technique"]) == {"pruning"} and set(df["parent"]) == {"teacher"} and set(df["status"]) == {"ok"}
    gates = [r["gate"] for r in df["record"] if r["gate"]]
    assert len(gates) == 2 and all(g["passed"] and "tolerance 1e-05" in g["detail"] for g in gates)
    assert (df["metrics.params"].iloc[1:] < df["metrics.params"].iloc[0]).all()
    best = largest_safe(results, max_drop=1000.0)
    assert best["variant"] == "pruned-25pct" and best["heads_removed_frac"] == 0.25 and not best["finetuned"]


def test_a_failed_gate_is_recorded_failed_and_never_offered_as_the_answer(swept):
    _, results = swept
    broken = results.copy()
    row = broken.index[broken["variant"] == "pruned-25pct"][0]
    broken.at[row, "gate"] = {**broken.at[row, "gate"], "passed": False, "detail": "max |logit diff| 3.0e-02"}
    records = {r["variant"]: r for r in pruning_records(broken, notebook="02_head_pruning")}
    assert records["pruned-25pct"]["status"] == "failed"
    assert records["pruned-25pct"]["reason"] == "max |logit diff| 3.0e-02"
    assert records["pruned-17pct-cross"]["status"] == "ok" and records["pruned-0pct"]["status"] == "ok"
    assert largest_safe(broken, max_drop=1000.0)["variant"] == "pruned-0pct"  # only the teacher is left


def test_largest_safe_counts_a_recovered_point_and_prefers_no_fine_tune_on_a_tie(swept):
    _, results = swept
    teacher_bleu = float(results.loc[results["heads_removed"] == 0, "bleu"].iloc[0])
    lossy = results.assign(bleu=results["bleu"].where(results["variant"] != "pruned-25pct", teacher_bleu - 5))
    both = pd.concat([lossy, recovered_row(results, teacher_bleu - 0.5)], ignore_index=True)
    best = largest_safe(both, 1.0)
    assert best["variant"] == "pruned-25pct-ft" and best["finetuned"] and best["method"] == "iterative+finetune"
    assert best["bleu_drop"] == pytest.approx(0.5) and best["heads_removed_frac"] == 0.25
    assert best["speedup"] == pytest.approx(1 / best["latency_ratio"])
    assert largest_safe(both, 1.0, methods=("iterative",))["variant"] == "pruned-0pct"
    tie = pd.concat([results, recovered_row(results)], ignore_index=True)
    assert largest_safe(tie, 1000.0)["variant"] == "pruned-25pct"  # the same heads without fine-tuning


def test_recovery_fine_tunes_the_cached_point_and_names_its_parent(swept, tmp_path, monkeypatch):
    import labkit.core.artifacts

    monkeypatch.setenv(labkit.core.artifacts.ARTIFACTS_ENV, str(tmp_path))
    teacher, results = swept
    recovered = recovery(teacher, results, TINY_PRESET, TINY_BUDGET)
    assert len(recovered) == 1
    row = recovered.iloc[0]
    assert row["variant"] == "pruned-25pct-ft" and row["parent"] == "pruned-25pct"
    assert row["method"] == "iterative+finetune" and row["finetune_steps"] == 3 and row["finetune_s"] > 0
    teacher_p50 = results.loc[results["heads_removed"] == 0, "latency_ms"].iloc[0]["p50"]
    assert row["speedup"] == pytest.approx(teacher_p50 / row["latency_ms"]["p50"])  # vs the sweep's teacher
    assert row["heads_removed"] == 6 and row["heads_removed_frac"] == 0.25
    assert row["gate"]["name"] == "recovery-not-worse"
    cached = load_bundle(tmp_path / "ci" / "pruned-25pct-ft")  # what later notebooks load is what was measured
    assert cached.meta["recovery_finetune"]["steps"] == 3
    point = sweep_point(results, 0.25)
    assert normalize_plan(cached.meta["head_plan"]) == normalize_plan(point["plan"])
    enc = encoded(teacher)
    assert not torch.equal(logits(cached.model, enc), logits(prune.prune_bundle(teacher, row["plan"]).model, enc))
    records = {r["variant"]: r for r in pruning_records(pd.concat([results, recovered], ignore_index=True),
                                                            notebook="02_head_pruning")}
    tuned = records["pruned-25pct-ft"]
    assert tuned["parent"] == "pruned-25pct" and records["pruned-25pct"]["parent"] == "teacher"
    assert tuned["finetune_steps"] == 3 and tuned["status"] == ("ok" if tuned["gate"]["passed"] else "failed")
    assert recovery(teacher, results, TINY_PRESET, dataclasses.replace(TINY_BUDGET, finetune_steps=0)).empty


def test_recover_trains_in_place_and_saves_what_it_trained(tiny_bundle, tmp_path):
    """Oracle for the save: the reloaded model's logits equal the fine-tuned one's in memory
    (transformers does not save the sinusoidal position tables, so they must not train)."""
    pruned = prune.prune_bundle(tiny_bundle, PLANS["mixed"], "pruned-x")
    before = {k: v.clone() for k, v in pruned.model.state_dict().items()}
    history = prune.recover(pruned, dataclasses.replace(TINY_BUDGET, finetune_steps=2, finetune_lr=2e-3),
                            dev_sentences=4)
    assert [h["step"] for h in history] == [2] and pruned.name == "pruned-x-ft"
    run = pruned.meta["recovery_finetune"]
    assert run["steps"] == 2 and run["lr"] == 2e-3 and run["wall_time_s"] >= 0
    assert any(not torch.equal(before[k], v) for k, v in pruned.model.state_dict().items())
    assert model_plan(pruned.model) == normalize_plan(PLANS["mixed"])  # shapes untouched
    assert start_row_norm(pruned.model) == 0.0  # still a faithful Marian model
    pruned.save(tmp_path / "ft")
    enc = encoded(tiny_bundle)
    assert torch.equal(logits(load_bundle(tmp_path / "ft").model, enc), logits(pruned.model, enc))


def test_compare_plans_names_the_group_and_both_fractions(tiny_bundle):
    """2 decoder self-attention heads: 2/8 of that kind, 2/24 of all; PLANS['mixed'] (5 heads) is 'overall'."""
    scores = {k: torch.rand(2, 4, generator=torch.Generator().manual_seed(i))
              for i, k in enumerate(ATTENTION_KINDS)}
    plans = {"pruned-dec-handpicked": {"decoder_self": {1: [2, 3]}}, "pruned-mixed": PLANS["mixed"]}
    rows = compare_plans(tiny_bundle, TINY_PRESET, TINY_BUDGET, plans, scores).set_index("variant")
    dec, mixed = rows.loc["pruned-dec-handpicked"], rows.loc["pruned-mixed"]
    assert dec["group"] == "decoder_self" and dec["heads_removed"] == 2
    assert dec["heads_removed_frac"] == pytest.approx(2 / 24) and dec["group_frac"] == pytest.approx(2 / 8)
    assert mixed["group"] == "overall"
    assert mixed["heads_removed_frac"] == mixed["group_frac"] == pytest.approx(5 / 24)
    removed = scores["decoder_self"][1, 2] + scores["decoder_self"][1, 3]
    assert dec["importance_removed"] == pytest.approx(float(removed))
    assert dec["gate"]["passed"] and mixed["gate"]["passed"]
    assert dec["params"] == tiny_bundle.params - 2 * 4144 and mixed["params"] == tiny_bundle.params - 5 * 4144  # see above


def test_head_slider_scores_and_times_the_chosen_k(tiny_bundle, capsys):
    """24 heads in 6 modules, each keeping one: the slider goes 0..18 and starts at a quarter (6)."""
    scores = prune.head_importance(tiny_bundle.model, tiny_bundle.tokenizer, data.load_split("train", limit=16))
    box = head_slider(tiny_bundle, TINY_PRESET, TINY_BUDGET, scores)
    slider = box.children[0]
    assert (slider.value, slider.min, slider.max) == (6, 0, 18)
    assert slider.readout and "720px" in slider.layout.width  # wide enough to pick one head, value shown
    shown = capsys.readouterr().out
    assert "6/24 heads removed (25%): BLEU" in shown and "on 3 sentences" in shown
    assert "on 2 sentences x 1 pass" in shown  # the slider's own quick timing, not the sweep's
    assert f"{prune.prune_bundle(tiny_bundle, prune.choose_heads(scores, 6)).params:,} parameters" in shown
    slider.value = 12
    assert "12/24 heads removed (50%)" in capsys.readouterr().out


def test_importance_figure_has_one_heat_map_per_kind():
    scores = {k: torch.rand(2, 4) for k in ATTENTION_KINDS}
    fig = importance_figure(scores)
    assert [t.type for t in fig.data] == ["heatmap"] * 3
    assert [a.text for a in fig.layout.annotations] == ["encoder self", "decoder self", "cross"]
    assert list(fig.data[2].y) == ["L1", "L2"] and list(fig.data[2].x) == ["h1", "h2", "h3", "h4"]
    torch.testing.assert_close(torch.tensor(fig.data[2].z, dtype=torch.float32), scores["cross"])


def test_sweep_figure_plots_bleu_chrf_and_latency_vs_the_share_of_all_heads(swept):
    _, results = swept
    fig = sweep_figure(pd.concat([results, recovered_row(results)], ignore_index=True))
    assert [a.text for a in fig.layout.annotations][:3] == ["BLEU", "chrF", "latency p50 (ms, batch 1)"]
    assert fig.layout.xaxis.title.text == fig.layout.xaxis3.title.text == "% of all heads removed"
    panels = {axis: {t.name: t for t in fig.data if t.xaxis == axis} for axis in ("x", "x2", "x3")}
    assert all(set(p) == {"overall", "cross", "overall, recovered (3 fine-tune steps)"} for p in panels.values())
    cross = results[results["group"] == "cross"]
    assert list(panels["x2"]["cross"].x) == pytest.approx([0.0, 100 / 6])  # half the cross heads = 1/6 of all
    assert list(panels["x2"]["cross"].y) == pytest.approx(list(cross["chrf"]))
    assert list(panels["x2"]["cross"].customdata) == pytest.approx([0.0, 50.0])  # % of the group, on hover
    assert panels["x3"]["cross"].y[1] == pytest.approx(cross["latency_ms"].iloc[1]["p50"])
    assert panels["x"]["overall, recovered (3 fine-tune steps)"].mode == "markers"
    for name in panels["x"]:  # one colour per series on every panel; the recovered point takes its group's
        colors = {p[name].line.color for p in panels.values()} | {p[name].marker.color for p in panels.values()}
        assert len(colors) == 1, (name, colors)
    assert panels["x"]["overall"].line.color == panels["x"]["overall, recovered (3 fine-tune steps)"].marker.color
    assert panels["x"]["overall"].line.color != panels["x"]["cross"].line.color


def test_parity_gate_tolerance_is_the_oracles_1e5(tiny_bundle):
    """A uniform 5e-5 logit shift keeps every greedy token but must fail the gate (it passed at 1e-4)."""
    plan = PLANS["mixed"]
    pruned = prune.prune_bundle(tiny_bundle, plan)
    gate = masked_parity(tiny_bundle, pruned, plan, SOURCES)
    assert gate["passed"] and "tolerance 1e-05" in gate["detail"] and "identical" in gate["detail"]
    with torch.no_grad():
        pruned.model.final_logits_bias += 5e-5
    shifted = masked_parity(tiny_bundle, pruned, plan, SOURCES)
    assert not shifted["passed"] and "identical" in shifted["detail"]


def test_reloaded_pruned_bundle_keeps_its_generation_config(tiny_bundle, tmp_path):
    gen = tiny_bundle.model.generation_config
    assert gen.bad_words_ids == [[tiny_bundle.tokenizer.pad_token_id]]  # the teacher never emits pad
    prune.prune_bundle(tiny_bundle, PLANS["mixed"]).save(tmp_path / "p")
    again = load_bundle(tmp_path / "p").model.generation_config
    assert again.bad_words_ids == gen.bad_words_ids and again.num_beams == gen.num_beams


def test_ensure_pruned_reuses_only_the_same_recipe_and_names_a_fine_tuned_bundle_apart(tiny_bundle, tmp_path,
                                                                                      monkeypatch):
    import copy

    import labkit.core.artifacts

    monkeypatch.setenv(labkit.core.artifacts.ARTIFACTS_ENV, str(tmp_path))
    budget = dataclasses.replace(TINY_BUDGET, fractions=(0.0, 0.1, 0.25), finetune_steps=0)
    path = prune.ensure_pruned(CI, tiny_bundle, 0.25, budget=budget)
    assert path == tmp_path / "ci" / "pruned-25pct"
    again = load_bundle(path)
    assert again.name == "pruned-25pct"
    assert again.meta["heads_removed"] == 6 and again.meta["heads_removed_frac"] == 0.25
    expected = prune.prune_schedule(tiny_bundle.model, tiny_bundle.tokenizer, prune.calibration_pairs(budget),
                                    (0.0, 0.1, 0.25))[0.25]
    assert normalize_plan(again.meta["head_plan"]) == expected
    assert again.meta["artifact"]["recipe"] == prune.pruning_recipe(tiny_bundle, budget, 0.25)

    tuned = prune.ensure_pruned(CI, tiny_bundle, 0.25,
                                budget=dataclasses.replace(budget, finetune_steps=2))
    assert tuned == tmp_path / "ci" / "pruned-25pct-ft" and (path / "bundle.json").exists()  # both kept
    meta = load_bundle(tuned).meta
    assert meta["name"] == "pruned-25pct-ft" and meta["recovery_finetune"]["steps"] == 2
    assert meta["artifact"]["recipe"]["finetune"]["steps"] == 2 and meta["head_plan"] == again.meta["head_plan"]

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a cached pruned bundle was rebuilt")

    monkeypatch.setattr(prune, "prune_schedule", no_rebuild)
    assert prune.ensure_pruned(CI, tiny_bundle, 0.25, budget=budget) == path
    with pytest.raises(AssertionError, match="rebuilt"):  # other calibration data: maybe another plan
        prune.ensure_pruned(CI, tiny_bundle, 0.25,
                            budget=dataclasses.replace(budget, calibration_sentences=8))
    changed = copy.deepcopy(tiny_bundle)
    with torch.no_grad():
        changed.model.model.encoder.layers[0].fc1.bias[0] += 1.0
    with pytest.raises(AssertionError, match="rebuilt"):  # same name, other weights: a retrained teacher
        prune.ensure_pruned(CI, changed, 0.25, budget=budget)
