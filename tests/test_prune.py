"""Head pruning: the masked model is the oracle for the pruned one.

Oracles: a structurally pruned model must equal the unpruned model with the same heads
gated to zero (logits to 1e-5, identical greedy and beam tokens through the dynamic KV
cache); the gate gradient must equal a finite difference of the loss; parameter counts
follow by hand from the shapes; a saved pruned bundle reloads bit for bit.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from labkit import data, ledger, prune
from labkit.config import Preset
from labkit.decode import DecodeConfig, TorchStepper, decode
from labkit.models import load_bundle

SOURCES = ["他去了北京。", "我喜欢猫。", "他们明天会去学校吗？", "我的朋友没有买三本书。"]
# tiny fixture: 2 encoder + 2 decoder layers, 4 heads of head_dim 8 (d_model 32)
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
    with prune.gated(tiny_bundle.model, {}):
        assert torch.equal(logits(tiny_bundle.model, enc), before)


@pytest.mark.parametrize("name", PLANS)
def test_pruned_model_equals_gated_model(tiny_bundle, name):
    plan, enc = PLANS[name], encoded(tiny_bundle)
    pruned = prune.prune_bundle(tiny_bundle, plan).model
    with prune.gated(tiny_bundle.model, plan):
        masked_logits = logits(tiny_bundle.model, enc)
        masked = {(c, b): tokens(tiny_bundle.model, enc, c, b) for c in ("dynamic", "none") for b in (1, 3)}
    torch.testing.assert_close(logits(pruned, enc), masked_logits, atol=1e-5, rtol=0)
    for (cache, beams), ids in masked.items():
        assert tokens(pruned, enc, cache, beams) == ids, (cache, beams)
    assert not torch.allclose(masked_logits, logits(tiny_bundle.model, enc), atol=1e-3)  # the heads mattered


def test_parameter_count_and_head_counts_by_hand(tiny_bundle):
    """A head of width 8 in d_model 32 owns q/k/v rows (3 x (8*32 + 8)) and out_proj columns (32*8):
    4*32*8 + 3*8 = 1048 parameters; PLANS['mixed'] removes 5 heads -> 5240."""
    pruned = prune.prune_bundle(tiny_bundle, PLANS["mixed"])
    assert tiny_bundle.params - pruned.params == 5 * 1048
    assert prune.head_counts(pruned.model) == {"encoder_self": [4, 3], "decoder_self": [3, 4], "cross": [4, 1]}
    assert prune.model_plan(pruned.model) == prune.normalize_plan(PLANS["mixed"])


def test_save_and_reload_is_exact(tiny_bundle, tmp_path):
    enc = encoded(tiny_bundle)
    pruned = prune.prune_bundle(tiny_bundle, PLANS["mixed"], name="pruned-test")
    pruned.save(tmp_path / "p")
    again = load_bundle(tmp_path / "p")
    assert torch.equal(logits(again.model, enc), logits(pruned.model, enc))
    assert tokens(again.model, enc) == tokens(pruned.model, enc)
    assert again.meta["head_plan"] == prune.plan_json(PLANS["mixed"]) and again.params == pruned.params
    assert prune.model_plan(again.model) == prune.normalize_plan(PLANS["mixed"])


def test_plans_compose_and_reapplying_is_a_no_op(tiny_bundle):
    enc = encoded(tiny_bundle)
    once = prune.prune_bundle(tiny_bundle, PLANS["mixed"])
    first = prune.prune_bundle(tiny_bundle, {"cross": {1: [1, 3]}, "decoder_self": {0: [3]}})
    twice = prune.prune_bundle(first, PLANS["mixed"])  # adds encoder 1/2 and cross 1/2 only
    assert torch.equal(logits(twice.model, enc), logits(once.model, enc))
    assert twice.meta["head_plan"] == once.meta["head_plan"]
    prune.prune_heads(twice.model, PLANS["mixed"])
    assert twice.model.num_parameters() == once.model.num_parameters()


@pytest.mark.parametrize("plan, match", [
    ({"cross": {0: [0, 1, 2, 3]}}, "at least one"),
    ({"encoder_self": {2: [0]}}, "out of range"),
    ({"decoder_self": {0: [4]}}, "out of range"),
    ({"self": {0: [0]}}, "unknown attention kind"),
])
def test_bad_plans_are_refused(tiny_bundle, plan, match):
    with pytest.raises(ValueError, match=match):
        prune.prune_heads(tiny_bundle.model, plan)


def test_importance_shape_sign_and_layer_norm(tiny_bundle):
    pairs = data.load_split("train", limit=32)
    scores = prune.head_importance(tiny_bundle.model, tiny_bundle.tokenizer, pairs, batch_size=8)
    assert {k: tuple(v.shape) for k, v in scores.items()} == {k: (2, 4) for k in prune.ATTENTION_KINDS}
    for s in scores.values():
        assert bool((s >= 0).all()) and torch.isfinite(s).all()
        torch.testing.assert_close(s.norm(dim=-1), torch.ones(2))
    assert not any(p.grad is not None for p in tiny_bundle.model.parameters())  # gates only


def test_masked_importance_equals_importance_of_the_pruned_model(tiny_bundle):
    pairs, plan = data.load_split("train", limit=16), PLANS["mixed"]
    masked = prune.head_importance(tiny_bundle.model, tiny_bundle.tokenizer, pairs, mask=plan, normalize=False)
    pruned = prune.prune_bundle(tiny_bundle, plan).model
    direct = prune.head_importance(pruned, tiny_bundle.tokenizer, pairs, normalize=False)
    for kind in prune.ATTENTION_KINDS:
        torch.testing.assert_close(direct[kind], masked[kind], atol=1e-6, rtol=1e-4)
    assert float(masked["cross"][1, 1:].abs().sum()) == 0.0  # removed heads score zero


def test_gate_gradient_matches_a_finite_difference(tiny_bundle):
    """|dL/dxi| from autograd vs |L(xi + e) - L(xi - e)| / 2e with the other gates at 1 (float64)."""
    from labkit.train import collate, encode_pairs, label_smoothed_ce

    model, tok = tiny_bundle.model.double(), tiny_bundle.tokenizer
    pairs = data.load_split("train", limit=6)
    grads = prune.head_importance(model, tok, pairs, batch_size=len(pairs), normalize=False)
    batch = collate(encode_pairs(tok, pairs), tok.pad_token_id)

    def loss_at(kind, layer, head, value):
        values = {k: v.double() for k, v in prune.gate_values(model).items()}  # 1 + eps exactly
        values[kind][layer, head] = value
        with prune.HeadGates(model, values), torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return float(label_smoothed_ce(out.logits, batch["labels"], 0.0))

    eps = 1e-4
    for kind, layer, head in [("encoder_self", 0, 1), ("decoder_self", 1, 3), ("cross", 0, 0)]:
        fd = abs(loss_at(kind, layer, head, 1 + eps) - loss_at(kind, layer, head, 1 - eps)) / (2 * eps)
        assert float(grads[kind][layer, head]) == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_choose_heads_takes_the_least_important_and_keeps_one_per_module():
    """encoder layer 0 scores [.1, .2, .3, .9]: three heads go before any other, the 4th never."""
    scores = {k: torch.full((1, 4), 0.5) for k in prune.ATTENTION_KINDS}
    scores["encoder_self"] = torch.tensor([[0.1, 0.2, 0.3, 0.05]])
    scores["cross"] = torch.tensor([[0.4, 0.6, 0.7, 0.8]])
    assert prune.choose_heads(scores, 2) == {"encoder_self": {0: [0, 3]}}
    assert prune.choose_heads(scores, 4) == {"encoder_self": {0: [0, 1, 3]}, "cross": {0: [0]}}
    assert prune.choose_heads(scores, 1, kinds=("cross",), plan={"cross": {0: [0]}}) == {"cross": {0: [0, 1]}}
    with pytest.raises(ValueError, match="more heads"):
        prune.choose_heads(scores, 10)


def test_plan_json_round_trip():
    plan = {"cross": {"1": [3, 1, 1]}, "encoder_self": {0: []}}
    as_json = prune.plan_json(plan)
    assert as_json == {"encoder_self": {}, "decoder_self": {}, "cross": {"1": [1, 3]}}
    assert prune.normalize_plan(json.loads(json.dumps(as_json))) == {"cross": {1: [1, 3]}}
    assert prune.plan_size(prune.merge_plans(plan, {"cross": {1: [2]}})) == 3


@pytest.mark.parametrize("iterative", [True, False])
def test_schedule_is_nested_and_hits_the_fractions(tiny_bundle, iterative):
    pairs = data.load_split("train", limit=16)
    plans = prune.prune_schedule(tiny_bundle.model, tiny_bundle.tokenizer, pairs, (0.5, 0.0, 0.25),
                                 ("decoder_self", "cross"), iterative=iterative)
    assert list(plans) == [0.0, 0.25, 0.5]
    assert [prune.plan_size(p) for p in plans.values()] == [0, 4, 8]  # of 16 decoder-side heads
    assert prune.merge_plans(plans[0.25], plans[0.5]) == plans[0.5]
    assert "encoder_self" not in plans[0.5]


def test_sweep_writes_valid_ledger_records(tiny_bundle, tmp_path):
    preset = Preset.from_name("ci").with_(bench_warmup=0, threads=1)  # 2 threads crawl on a busy 2-core box
    budget = dataclasses.replace(prune.budget_for("ci"), calibration_sentences=16, fractions=(0.0, 0.25),
                                 type_fractions=(0.5,), eval_sentences=6, bench_sentences=2, bench_repeats=1)
    groups = {"overall": prune.ATTENTION_KINDS, "cross": ("cross",)}
    results = prune.sweep(tiny_bundle, preset, budget, groups=groups, progress=False)
    assert len(results) == 4 and results["bleu"].notna().all()
    records = prune.ledger_records(results, notebook="02_head_pruning")
    path = tmp_path / "ledger.jsonl"
    for r in records:
        ledger.append(path, r)
    df = ledger.read(path)
    assert list(df["variant"]) == ["pruned-0pct", "pruned-25pct", "pruned-cross-50pct"]
    assert list(df["heads_removed_frac"]) == [0.0, 0.25, 0.5]
    assert set(df["technique"]) == {"pruning"} and set(df["parent"]) == {"teacher"}
    assert (df["metrics.params"].iloc[1:] < df["metrics.params"].iloc[0]).all()
    best = prune.largest_safe(results, max_drop=1000.0)
    assert best["variant"] == "pruned-25pct" and best["heads_removed_frac"] == 0.25


def test_ensure_pruned_builds_once_and_reloads(tiny_bundle, tmp_path, monkeypatch):
    import labkit.artifacts

    monkeypatch.setenv(labkit.artifacts.ARTIFACTS_ENV, str(tmp_path))
    calls = []
    monkeypatch.setattr(labkit.artifacts, "teacher_for", lambda preset: calls.append(preset) or tiny_bundle)
    small = dataclasses.replace(prune.budget_for("ci"), calibration_sentences=16)
    monkeypatch.setitem(prune.PRUNE_BUDGETS, "ci", small)
    path = prune.ensure_pruned("ci", 0.25)
    assert path == tmp_path / "ci" / "pruned-25pct" and prune.ensure_pruned("ci", 0.25) == path
    assert calls == ["ci"]  # the second call found the cache
    again = load_bundle(path)
    assert again.meta["heads_removed"] == 6 and again.meta["heads_removed_frac"] == 0.25  # of 24 heads
    expected = prune.prune_schedule(tiny_bundle.model, tiny_bundle.tokenizer, prune.calibration_pairs(small),
                                    (0.0, 0.1, 0.25))[0.25]
    assert prune.normalize_plan(again.meta["head_plan"]) == expected
