"""Distillation: layer selection, exact copies, the KD loss, a short run, caching, seq-KD data.

The tiny fixture has 2+2 layers, so students here keep 1 of 2 decoder layers (or all of
them, where the oracle is the teacher itself). The notebook's checks (gap gate, training
check, comparison table, ledger records) are tested here on hand-made numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from labkit.compress import distill
from labkit.compress.training import collate, encode_pairs
from labkit.config import Preset
from labkit.core import data
from labkit.core.bundle import bundle_for, load_bundle, start_row_norm
from labkit.core.decode import DecodeConfig, TorchStepper, decode
from labkit.core.inputs import cut_loops
from labkit.lab import nb03_distillation
from labkit.measure import gates, ledger

CI = Preset.from_name("ci")

TINY_BUDGET = distill.DistillBudget(steps=40, batch_size=32, lr=2e-3, warmup=5, eval_every=40,
                                    train_sentences=2000, dev_sentences=8, seq_kd_sentences=16,
                                    bleu_gap_target=100.0)


def batch_of(bundle, n=16, split="dev"):
    pairs = data.load_split(split, limit=n)
    return collate(encode_pairs(bundle.tokenizer, pairs), bundle.tokenizer.pad_token_id)


def logits(bundle, batch):
    with torch.inference_mode():
        return bundle.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"]).logits


@pytest.mark.parametrize("strategy,n,k,expected", [
    ("alternate", 6, 4, (0, 2, 4, 5)),
    ("ends", 6, 4, (0, 1, 4, 5)),
    ("bottom", 6, 4, (0, 1, 2, 5)),
    ("alternate", 6, 3, (0, 2, 4)),
    ("ends", 6, 3, (0, 1, 5)),
    ("alternate", 2, 1, (0,)),
    ("bottom", 2, 1, (1,)),
    ("ends", 6, 6, (0, 1, 2, 3, 4, 5)),
    ((1, 3), 6, 2, (1, 3)),
])
def test_select_layers(strategy, n, k, expected):
    assert distill.select_layers(strategy, n, k) == expected


@pytest.mark.parametrize("strategy,n,k", [("alternate", 6, 7), ("alternate", 6, 0), ("middle", 6, 4),
                                          ((3, 1), 6, 2), ((0, 6), 6, 2), ((2, 2), 6, 2)])
def test_select_layers_refuses(strategy, n, k):
    with pytest.raises(ValueError):
        distill.select_layers(strategy, n, k)


@pytest.mark.parametrize("step,expected", [(0, 4.0), (2, 2.5), (4, 1.0), (9, 1.0)])
def test_temperature_schedule_endpoints(step, expected):
    """Linear from 4 at step 0 to 1 at the last step (4 of 5), then held."""
    assert distill.temperature_at(step, 5, 4.0, 1.0) == pytest.approx(expected)
    assert distill.temperature_at(0, 1) == 1.0  # a one-step run is all "end"


def test_soft_kl_by_hand():
    """p_teacher = (1/2, 1/2), p_student = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).

    At T = 2 the logits are 2 * log p (so softmax(z / T) = p) and the T^2 factor makes it 4x.
    """
    p, q = torch.tensor([[[0.5, 0.5]]]), torch.tensor([[[0.25, 0.75]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert distill.soft_kl(q.log(), p.log(), mask, 1.0).item() == pytest.approx(0.5 * math.log(4 / 3))
    assert distill.soft_kl(2 * q.log(), 2 * p.log(), mask, 2.0).item() == pytest.approx(2 * math.log(4 / 3))
    assert distill.soft_kl(p.log(), p.log(), mask, 3.0).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("encoder", [None, (0, 1)])
def test_identity_student_reproduces_teacher_exactly(tiny_bundle, encoder):
    """Keeping every layer is a plain copy: identical logits, identical greedy output."""
    student = distill.make_student(tiny_bundle, (0, 1), encoder)
    batch = batch_of(tiny_bundle)
    assert torch.equal(logits(student, batch), logits(tiny_bundle, batch))
    assert student.meta["distillation"]["decoder_layer_map"] == [0, 1]
    assert student.model.model.shared is not tiny_bundle.model.model.shared  # a copy, not a view


@pytest.mark.parametrize("decoder,encoder,mse_positive", [
    ((1,), None, True),
    ((0,), None, False),  # layer 0 sees the same input as the teacher's layer 0: same output
    ((0, 1), (1,), True),  # encoder shrunk: its states are matched too
])
def test_kd_loss_is_zero_for_the_teacher_itself_and_positive_for_a_smaller_student(tiny_bundle, decoder, encoder,
                                                                                    mse_positive):
    batch = batch_of(tiny_bundle)
    same = distill.KDLoss(tiny_bundle.model, (0, 1))
    parts = same.components(distill.make_student(tiny_bundle, (0, 1)).model.eval(), batch, 1.0)
    assert parts["kl"].item() == pytest.approx(0.0, abs=1e-6) and parts["mse"].item() == 0.0
    student = distill.make_student(tiny_bundle, decoder, encoder)
    loss = distill.KDLoss(tiny_bundle.model, decoder, encoder)
    parts = loss.components(student.model.eval(), batch, 1.0)
    assert parts["kl"].item() > 1e-3
    assert (parts["mse"].item() > 1e-3) if mse_positive else parts["mse"].item() == 0.0
    weighted = 0.7 * parts["kl"] + 0.2 * parts["mse"] + 0.1 * parts["ce"]
    assert parts["loss"].item() == pytest.approx(weighted.item())


def test_dropping_layers_keeps_cached_decoding_exact(tiny_bundle):
    """The kept decoder layer is renumbered to cache slot 0: cached greedy == uncached == generate."""
    student = distill.make_student(tiny_bundle, (1,))
    assert student.model.config.decoder_layers == 1
    assert [layer.encoder_attn.layer_idx for layer in student.model.model.decoder.layers] == [0]
    enc = student.tokenizer([p.zh for p in data.load_split("dev", limit=6)], return_tensors="pt", padding=True)
    cfg = DecodeConfig(max_new_tokens=20)
    cached = decode(TorchStepper(student.model, "dynamic"), enc["input_ids"], enc["attention_mask"], cfg)
    uncached = decode(TorchStepper(student.model, "none"), enc["input_ids"], enc["attention_mask"], cfg)
    with torch.inference_mode():
        out = student.model.generate(**enc, num_beams=1, do_sample=False, max_new_tokens=20)
    reference = [[i for i in row if i not in (student.model.config.pad_token_id, 0)] for row in out[:, 1:].tolist()]
    assert cached == uncached == reference


def test_short_distillation_lowers_the_kd_loss(tiny_bundle):
    """40 steps on the KD loss: the held-out KL and MSE at T = 1 go down; the history has every step."""
    student = distill.make_student(tiny_bundle, (1,))
    held_out = batch_of(tiny_bundle, 32, "test")
    probe = distill.KDLoss(tiny_bundle.model, (1,))
    before = probe.components(student.model.eval(), held_out, 1.0)
    result = distill.distill(tiny_bundle, student, data.load_split("train", limit=2000),
                             data.load_split("dev", limit=8), TINY_BUDGET, progress=False)
    after = probe.components(result.student.model.eval(), held_out, 1.0)
    assert after["kl"].item() < 0.9 * before["kl"].item()
    assert after["mse"].item() < before["mse"].item()
    assert [r["step"] for r in result.losses] == list(range(1, 41))
    assert result.losses[0]["temperature"] == 4.0 and result.losses[-1]["temperature"] == 1.0
    assert [r["step"] for r in result.history] == [0, 40]
    assert start_row_norm(result.student.model) == 0.0  # the tied LM head's gradient did not move it


def test_student_saves_and_reloads_with_identical_logits(tiny_bundle, tmp_path):
    student = distill.make_student(tiny_bundle, (1,), name="student-bottom")
    student.save(tmp_path / "s")
    again = load_bundle(tmp_path / "s")
    batch = batch_of(tiny_bundle)
    assert torch.equal(logits(again, batch), logits(student, batch))
    assert again.model.config.decoder_layers == 1 and again.params == student.params < tiny_bundle.params
    assert again.meta["distillation"]["decoder_layer_map"] == [1]


def test_seq_kd_data_is_the_teachers_greedy_output(tiny_bundle):
    """Oracle: Hugging Face generate(num_beams=1), detokenized, repetition loops cut as every Translator does."""
    pairs = data.load_split("train", limit=12)
    seq = distill.seq_kd_pairs(tiny_bundle, pairs, batch_size=5, max_new_tokens=32)
    enc = tiny_bundle.tokenizer([p.zh for p in pairs], return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = tiny_bundle.model.generate(**enc, num_beams=1, do_sample=False, max_new_tokens=32)
    expected = [cut_loops(e)[0] for e in tiny_bundle.tokenizer.batch_decode(out, skip_special_tokens=True)]
    assert [p.en for p in seq] == [e for e in expected if e.strip()]
    assert [p.zh for p in seq] == [p.zh for p, e in zip(pairs, expected) if e.strip()]
    assert [p.en for p in seq] != [p.en for p in pairs[: len(seq)]]  # not the references


def test_ensure_student_builds_once_and_records_its_recipe(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_ARTIFACTS", str(tmp_path))
    budget = dataclasses.replace(TINY_BUDGET, steps=4, eval_every=2)
    path = distill.ensure_student(CI, tiny_bundle, "bottom", decoder_layers=1, budget=budget, progress=False)
    assert path == tmp_path / "ci" / "student-bottom"
    meta = json.loads((path / "bundle.json").read_text())
    d = meta["distillation"]
    assert d["teacher"] == "teacher" and d["decoder_layer_map"] == [1] and d["steps"] == 4
    assert d["loss_weights"] == {"alpha": 0.7, "beta": 0.2, "gamma": 0.1}
    assert [r["step"] for r in d["history"]] == [0, 2, 4] and math.isfinite(d["final_dev_bleu"])
    assert len(d["loss_curve"]) == 4 and meta["artifact"]["recipe"]["budget"]["steps"] == 4

    def no_training(*args, **kwargs):
        raise AssertionError("a cached student was rebuilt")

    monkeypatch.setattr(distill, "train_student", no_training)
    assert distill.ensure_student(CI, tiny_bundle, "bottom", decoder_layers=1, budget=budget) == path
    with pytest.raises(AssertionError, match="rebuilt"):  # a different recipe is a different student
        distill.ensure_student(CI, tiny_bundle, "bottom", decoder_layers=1,
                               budget=dataclasses.replace(budget, steps=5))


def test_a_pruned_teacher_gives_a_pruned_student_that_reloads(tiny_bundle, tmp_path):
    """Heads removed from teacher decoder layer 1 stay removed in the student's layer 0."""
    from labkit.compress import prune
    from labkit.core.heads import head_counts

    plan = {"decoder_self": {1: [0, 2]}, "cross": {0: [1], 1: [3]}, "encoder_self": {0: [1]}}
    pruned = prune.prune_bundle(tiny_bundle, plan, "pruned")
    student = distill.make_student(pruned, (1,))
    assert student.meta["head_plan"] == {"encoder_self": {"0": [1]}, "decoder_self": {"0": [0, 2]},
                                         "cross": {"0": [3]}}
    assert head_counts(student.model) == {"encoder_self": [3, 4], "decoder_self": [2], "cross": [3]}
    student.save(tmp_path / "s")
    again = load_bundle(tmp_path / "s")
    batch = batch_of(tiny_bundle)
    assert torch.equal(logits(again, batch), logits(student, batch))
    identity = distill.make_student(pruned, (0, 1))  # and keeping every layer is the pruned teacher
    assert torch.equal(logits(identity, batch), logits(pruned, batch))


def test_a_pruned_teacher_distils_into_a_shrunk_seq_kd_student_that_reloads(tiny_bundle, tmp_path, monkeypatch):
    """Notebook 03 with TEACHER = a pruned bundle, ENCODER_LAYERS = 1 (of 2), SEQ_KD = True, for 4 steps.

    "bottom" keeps layer 1 of 2 in both stacks, so the student has the pruned teacher's layer-1
    heads, renumbered to layer 0. Oracle for the reload: its greedy dev BLEU, recomputed from
    disk, equals the one measured in memory right after training.
    """
    from labkit.compress import prune
    from labkit.compress.training import greedy_bleu
    from labkit.core.heads import head_counts

    monkeypatch.setenv("LABKIT_ARTIFACTS", str(tmp_path))
    plan = {"encoder_self": {1: [1, 2]}, "decoder_self": {0: [3], 1: [0, 2]}, "cross": {1: [3]}}
    pruned = prune.prune_bundle(tiny_bundle, plan, "pruned-x")
    budget = dataclasses.replace(TINY_BUDGET, steps=4, eval_every=4, seq_kd_sentences=16)
    path = distill.ensure_student(CI, pruned, "bottom", decoder_layers=1, encoder_layers=1, seq_kd=True,
                                  budget=budget, progress=False)
    assert path == tmp_path / "ci" / "student-bottom-enc1-seqkd-from-pruned-x"
    student = load_bundle(path)
    assert (student.model.config.encoder_layers, student.model.config.decoder_layers) == (1, 1)
    assert head_counts(student.model) == {"encoder_self": [2], "decoder_self": [2], "cross": [3]}
    assert student.meta["head_plan"] == {"encoder_self": {"0": [1, 2]}, "decoder_self": {"0": [0, 2]},
                                         "cross": {"0": [3]}}
    d = student.meta["distillation"]
    assert d["teacher"] == "pruned-x" and d["seq_kd"] and d["steps"] == 4
    assert d["encoder_layer_map"] == [1] and d["decoder_layer_map"] == [1]
    assert 0 < d["train_pairs"] <= 16 and (tmp_path / "ci" / "seqkd-pruned-x" / "pairs.tsv").exists()
    dev = data.load_split("dev", limit=budget.dev_sentences)
    assert round(greedy_bleu(student.model, student.tokenizer, dev), 3) == d["final_dev_bleu"]
    assert student.params < pruned.params


def test_teacher_bundle_is_the_preset_model_or_a_cached_bundle(tiny_bundle, tmp_path, monkeypatch):
    from labkit.compress import prune

    monkeypatch.setenv("LABKIT_ARTIFACTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="notebook 02"):
        bundle_for("ci", "pruned-25pct")
    prune.prune_bundle(tiny_bundle, {"cross": {0: [1]}}, "pruned-25pct").save(tmp_path / "ci" / "pruned-25pct")
    loaded = bundle_for("ci", "pruned-25pct")
    assert loaded.name == "pruned-25pct" and loaded.meta["heads_removed"] == 1
    assert bundle_for("ci").name == "teacher"  # the preset's own model


@pytest.mark.parametrize("teacher,student,passed", [(98.8, 97.4, True), (98.8, 97.0, False), (None, 97.0, None)])
def test_gap_gate(teacher, student, passed):
    """98.8 - 97.4 = 1.4 <= 1.5 passes; 1.8 fails; no BLEU (speed-only preset), no gate."""
    gate = gates.bleu_gap_gate(teacher, student, 1.5, 200, "ci")
    if passed is None:
        assert gate is None
    else:
        assert gate["name"] == "bleu_gap" and gate["passed"] is passed
        expected = f"{teacher - student:.2f} BLEU on 200 test sentences (target <= 1.5 for preset ci)"
        assert expected in gate["detail"]


def _kd_gain(run):
    return gates.kd_gain_gate(run["history"][0]["dev_bleu"], run["final_dev_bleu"], run["steps"], run["dev_sentences"])


def run_meta(before, after, steps=30):
    """The fields of a student's meta["distillation"] the checks read."""
    return {"history": [{"step": 0, "loss": None, "dev_bleu": before},
                        {"step": steps, "loss": 1.0, "dev_bleu": after}],
            "final_dev_bleu": after, "steps": steps, "dev_sentences": 40, "seq_kd": False,
            "loss_weights": {"alpha": 0.7, "beta": 0.2, "gamma": 0.1}}


def test_training_gate_fails_a_student_that_training_made_worse():
    assert _kd_gain(run_meta(65.0, 96.0))["passed"]
    assert _kd_gain(run_meta(65.0, 65.0))["passed"]
    worse = _kd_gain(run_meta(65.0, 40.0))
    assert not worse["passed"] and worse["detail"].startswith("dev BLEU 65.00 at step 0 -> 40.00 after 30 steps")
    assert _kd_gain(run_meta(None, None)) is None
    assert _kd_gain(run_meta(65.0, 65.0, steps=0)) is None


def test_comparison_table_and_records_mark_a_student_over_the_gap_failed(tiny_bundle, tmp_path):
    """Teacher 98 BLEU; students 97 (gap 1) and 95 (gap 3) against a 1.5 target: ok and failed.

    Latency p50s 10, 8, 6 ms -> ratios 1, 0.8, 0.6; 3 of 4 outputs identical -> agreement 0.75.
    """
    from labkit.measure.quality import Scores
    from labkit.measure.timing import Measurement

    students = {}
    for name in ("student-near", "student-far"):
        students[name] = distill.make_student(tiny_bundle, (1,), name=name)
        students[name].meta["distillation"].update(run_meta(60.0, 96.0))
    bundles = {"teacher": tiny_bundle, **students}
    scores = {name: Scores(bleu, bleu + 1, "nrefs:1|case:mixed|tok:13a", 200)
              for name, bleu in (("teacher", 98.0), ("student-near", 97.0), ("student-far", 95.0))}
    hyps = {"teacher": ["a", "b", "c", "d"], "student-near": ["a", "b", "c", "x"],
            "student-far": ["x", "b", "y", "z"]}
    latency = {"teacher": Measurement((10.0, 10.0, 12.0), 1), "student-near": Measurement((7.0, 8.0, 9.0), 1),
               "student-far": Measurement((6.0, 6.0, 6.0), 1)}
    table = nb03_distillation.comparison_table(bundles, latency, scores, hyps)
    assert table.loc["student-near", "BLEU gap"] == pytest.approx(1.0)
    assert table.loc["student-near", "same output as teacher"] == 0.75
    assert list(table["latency ratio"]) == pytest.approx([1.0, 0.8, 0.6])
    assert list(table["decoder layers"]) == [2, 1, 1] and list(table["encoder layers"]) == [2, 2, 2]

    budget = dataclasses.replace(TINY_BUDGET, bleu_gap_target=1.5)
    records = nb03_distillation.distillation_records(tiny_bundle, students, table, latency, scores, preset="ci", budget=budget,
                                     sentences=200)
    for record in records:  # valid under the ledger schema
        ledger.append(tmp_path / "ledger.jsonl", record)
    ref, near, far = records
    assert ref["variant"] == "distill-ref-teacher" and ref["technique"] == "baseline"
    assert ref["metrics"]["bleu"] == 98.0
    assert near["status"] == "ok" and near["gate"]["passed"] and near["parent"] == "teacher"
    assert near["bleu_gap"] == pytest.approx(1.0) and near["metrics"]["agreement"] == 0.75
    assert near["latency_ratio"] == 0.8 and near["training_check"]["passed"]
    assert far["status"] == "failed" and far["reason"] == far["gate"]["detail"] and "3.00 BLEU" in far["reason"]

    students["student-near"].meta["distillation"].update(run_meta(60.0, 50.0))  # training made it worse
    worse = nb03_distillation.distillation_records(tiny_bundle, students, table, latency, scores, preset="ci", budget=budget,
                                   sentences=200)[1]
    assert worse["status"] == "failed" and worse["gate"]["passed"]
    assert "60.00 at step 0 -> 50.00" in worse["reason"]

    bare = nb03_distillation.comparison_table(bundles, latency)  # a speed-only preset: no BLEU, no gap gate
    speed = nb03_distillation.distillation_records(tiny_bundle, students, bare, latency, None, preset="ci", budget=budget,
                                   sentences=0)
    assert bare["BLEU"].isna().all() and all(r["gate"] is None for r in speed[1:])
