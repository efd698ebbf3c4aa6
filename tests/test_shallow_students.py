"""Deep-encoder, shallow-decoder students: layer choice, naming, the cached seq-KD build, the cost
of one decoder step (forced lengths) and the students' ledger records.

The tiny fixture has 2+2 layers, so its shallow student is 2-1. Step costs are checked on a fake
clock whose latency is known by hand (never a real speed threshold).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from labkit.compress import distill
from labkit.config import PRESETS, Preset
from labkit.core.translator import Result, StepperTranslator
from labkit.lab import nb03_distillation
from labkit.measure import ledger
from labkit.measure.quality import Scores
from labkit.measure.timing import Measurement

CI = Preset.from_name("ci")
TINY_BUDGET = distill.DistillBudget(steps=4, batch_size=16, lr=1e-3, warmup=1, eval_every=2, train_sentences=200,
                                    dev_sentences=8, seq_kd_sentences=24, bleu_gap_target=1.5)


@pytest.mark.parametrize("n,k,expected", [(6, 1, (5,)), (6, 2, (2, 5)), (2, 1, (1,)), (4, 2, (0, 3))])
def test_shallow_layers_keep_the_top_layer(n, k, expected):
    assert distill.shallow_layers(n, k) == expected
    assert expected[-1] == n - 1  # the layer whose output the LM head reads


def test_every_preset_has_a_shallow_budget():
    for name, preset in PRESETS.items():
        shallow, deep = preset.distill_shallow, preset.distill
        assert isinstance(shallow, distill.DistillBudget), name
        assert shallow.steps >= deep.steps and shallow.bleu_gap_target == deep.bleu_gap_target, name
        # the same number of seq-KD sources as the 6-4 students: one cached set of teacher translations
        assert shallow.seq_kd_sentences == deep.seq_kd_sentences, name
    assert PRESETS["opus-mt-shape"].distill_shallow.steps == 0  # random weights: built, not trained


def test_ensure_shallow_builds_a_seq_kd_student_once(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_ARTIFACTS", str(tmp_path))
    path = distill.ensure_shallow(CI, tiny_bundle, 1, budget=TINY_BUDGET, progress=False)
    assert path == tmp_path / "ci" / "student-2-1"  # encoder-decoder layers of the student
    meta = json.loads((path / "bundle.json").read_text())
    d = meta["distillation"]
    assert d["decoder_layer_map"] == [1] and d["encoder_layer_map"] is None and d["seq_kd"] is True
    assert d["steps"] == 4 and d["train_pairs"] > 0 and meta["artifact"]["recipe"]["seq_kd"] is True
    assert (tmp_path / "ci" / "seqkd-teacher" / "pairs.tsv").exists()  # trained on the teacher's translations

    def no_training(*args, **kwargs):
        raise AssertionError("a cached student with the same recipe must not be retrained")

    monkeypatch.setattr(distill, "train_student", no_training)
    assert distill.ensure_shallow(CI, tiny_bundle, 1, budget=TINY_BUDGET, progress=False) == path
    with pytest.raises(ValueError, match="keeps 2 decoder layers, not 1"):
        distill.ensure_shallow(CI, tiny_bundle, 1, layers=(0, 1), budget=TINY_BUDGET)


def test_shallow_name():
    class Fake:
        def __init__(self, name):
            self.name = name
            self.model = type("M", (), {"config": type("C", (), {"encoder_layers": 6})()})()

    assert distill.shallow_name(Fake("teacher"), 2) == "student-6-2"
    assert distill.shallow_name(Fake("pruned-25pct"), 1) == "student-6-1-from-pruned-25pct"


def test_step_costs_by_hand(tiny_bundle, monkeypatch):
    """Fake stage timings: decode takes tokens * layers ms, encode 5 ms. With 32 forced tokens the
    teacher (2 decoder layers) costs 2 ms per step, the 1-layer student 1 ms: ratio 0.5. Every model
    is called warm-up + passes x sentences times, with the forced length."""
    student = distill.make_student(tiny_bundle, (1,), name="student-2-1")
    seen = []

    def fake_run(self, texts, force=None):
        layers, tokens = self.bundle.model.config.decoder_layers, self.decode_cfg.forced_length
        seen.append((self.bundle.name, tokens))
        return Result(texts, [[1] * tokens], {"encode": 5.0, "decode": float(tokens * layers)})

    monkeypatch.setattr(StepperTranslator, "run", fake_run)
    preset = CI.with_(bench_warmup=1, bench_repeats=2)
    costs = nb03_distillation.step_costs({"teacher": tiny_bundle, "student-2-1": student}, preset, ["a", "b"], 32)
    assert list(costs["ms per step"]) == pytest.approx([2.0, 1.0])
    assert list(costs["encode ms"]) == pytest.approx([5.0, 5.0])
    assert list(costs["step ratio"]) == pytest.approx([1.0, 0.5])
    assert list(costs["calls"]) == [4, 4] and len(seen) == 2 * (1 + 4) and {t for _, t in seen} == {32}
    assert seen[2:4] == [("teacher", 32), ("student-2-1", 32)]  # models take turns sentence by sentence


def test_shallow_records_carry_the_step_cost_and_the_gate(tiny_bundle, tmp_path, monkeypatch):
    """Teacher 98 BLEU, student 90 (gap 8 > 1.5): failed, honestly; no reference record (section 4 wrote it)."""
    import pandas as pd

    student = distill.make_student(tiny_bundle, (1,), name="student-2-1")
    student.meta["distillation"].update(history=[{"step": 0, "dev_bleu": 0.0}, {"step": 4, "dev_bleu": 30.0}],
                                        final_dev_bleu=30.0, steps=4, dev_sentences=8, seq_kd=True,
                                        loss_weights={"alpha": 0.7, "beta": 0.2, "gamma": 0.1})
    bundles = {"teacher": tiny_bundle, "student-2-1": student}
    scores = {"teacher": Scores(98.0, 99.0, "sig", 200), "student-2-1": Scores(90.0, 95.0, "sig", 200)}
    latency = {"teacher": Measurement((10.0,) * 3, 1), "student-2-1": Measurement((6.0,) * 3, 1)}
    table = nb03_distillation.comparison_table(bundles, latency, scores, {"teacher": ["a"], "student-2-1": ["b"]})
    costs = pd.DataFrame({"ms per step": [2.0, 0.5], "step ratio": [1.0, 0.25]}, index=["teacher", "student-2-1"])
    (record,) = nb03_distillation.shallow_records(tiny_bundle, {"student-2-1": student}, table, latency, scores, costs,
                                                  preset="ci", budget=TINY_BUDGET, sentences=200)
    ledger.append(tmp_path / "ledger.jsonl", record)  # valid under the ledger schema
    assert record["technique"] == "distillation" and record["parent"] == "teacher"
    assert record["status"] == "failed" and "8.00 BLEU" in record["reason"]
    assert record["decode_step_ms"] == 0.5 and record["decode_step_ratio"] == 0.25
    assert record["teacher_decode_step_ms"] == 2.0 and record["latency_ratio"] == 0.6
    assert record["seq_kd"] is True and record["decoder_layers"] == 1


def test_budget_override_is_part_of_the_recipe(tiny_bundle, tmp_path, monkeypatch):
    """A different shallow budget rebuilds the student (the recipe holds the budget)."""
    monkeypatch.setenv("LABKIT_ARTIFACTS", str(tmp_path))
    calls = []
    real = distill.train_student

    def counting(*args, **kwargs):
        calls.append(kwargs.get("name"))
        return real(*args, **kwargs)

    monkeypatch.setattr(distill, "train_student", counting)
    small = dataclasses.replace(TINY_BUDGET, steps=0)
    distill.ensure_shallow(CI, tiny_bundle, 1, budget=small, progress=False)
    distill.ensure_shallow(CI, tiny_bundle, 1, budget=dataclasses.replace(small, lr=2e-3), progress=False)
    assert calls == ["student-2-1", "student-2-1"]
