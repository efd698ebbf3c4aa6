"""Stage breakdown, operator table, latency vs length and thread effect, on fakes and the tiny model."""

from __future__ import annotations

import os

import pytest
import torch

from labkit.config import Preset
from labkit.core import data
from labkit.core.decode import DecodeConfig
from labkit.core.translator import STAGES, Result, StepperTranslator
from labkit.measure import profiling

FIXED = {"normalize": 1.0, "tokenize": 2.0, "encode": 3.0, "decode": 10.0, "detokenize": 4.0}


class FixedTimings:
    """A translator whose stages always take FIXED ms: the breakdown must return them exactly."""

    def run(self, texts):
        return Result(["x"] * len(texts), [[1]] * len(texts), dict(FIXED), [[] for _ in texts])


@pytest.fixture()
def translator(tiny_bundle):
    return StepperTranslator(tiny_bundle, decode=DecodeConfig(max_new_tokens=12))


def test_stage_breakdown_reports_the_stage_timers_exactly():
    """FIXED sums to 20 ms: pct = 5, 10, 15, 50, 20; model inference = encode + decode = 13 ms, 65 %."""
    table = profiling.stage_breakdown(FixedTimings(), ["a", "b"], warmup=1, repeats=3)
    assert table["stage"].tolist() == list(STAGES)
    assert table.set_index("stage")["ms"].to_dict() == FIXED
    assert table["pct"].tolist() == pytest.approx([5, 10, 15, 50, 20])
    assert table.attrs["latency"]["n"] == 6 and table.attrs["sentences"] == 2
    cats = profiling.by_category(table).set_index("category")
    assert cats.index.tolist() == ["preprocessing", "tokenizer", "model inference", "postprocessing"]
    assert cats.loc["model inference", "ms"] == 13.0 and cats.loc["model inference", "pct"] == pytest.approx(65)
    assert profiling.stages_metric(table)["decode"] == {"ms": 10.0, "pct": 50.0}


def test_stage_breakdown_on_the_tiny_model_adds_up(translator):
    texts = [p.zh for p in data.load_split("test", limit=3)]
    table = profiling.stage_breakdown(translator, texts, warmup=1, repeats=3)
    assert (table["ms"] > 0).all() and table["pct"].sum() == pytest.approx(100)
    # stages run inside the timed call, so they explain most of it and never much more
    assert 0.7 < profiling.coverage(table) < 1.1
    assert set(profiling.stages_metric(table)) == set(STAGES)


def test_operator_table_lists_torch_ops_by_self_time(translator):
    table = profiling.operator_table(translator, "他昨天去了北京。", top=5)
    assert len(table) == 5 and table["op"].str.startswith("aten::").any()
    assert table["self_cpu_ms"].is_monotonic_decreasing
    assert (table["self_pct"] <= 100).all() and table.attrs["wall_ms"] > 0


@pytest.mark.parametrize("tokens", [4, 9, 20])
def test_text_of_length_hits_the_token_count(tiny_bundle, tokens):
    corpus = [p.zh for p in data.load_split("test", limit=5)]
    text = profiling.text_of_length(tiny_bundle.tokenizer, corpus, tokens)
    got = len(tiny_bundle.tokenizer(text)["input_ids"])
    assert tokens - 1 <= got <= tokens  # sentencepiece may merge across the cut


def test_length_curve_with_forced_length(tiny_bundle):
    translator = StepperTranslator(tiny_bundle, decode=DecodeConfig(forced_length=5))
    corpus = [p.zh for p in data.load_split("test", limit=5)]
    curve = profiling.length_curve(translator, corpus, (4, 16), warmup=0, repeats=2)
    assert curve["length"].tolist() == [4, 16] and (curve["output_tokens"] == 5).all()
    assert (curve["q1_ms"] <= curve["p50_ms"]).all() and (curve["p50_ms"] <= curve["q3_ms"]).all()
    assert (curve["n"] == 2).all()


def test_thread_effect_restores_threads_and_environment(translator, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    table = profiling.thread_effect(translator, ["我喜欢猫。"], (2, 1), warmup=0, repeats=2)
    assert table["threads"].tolist() == [2, 1] and table["speedup"].iloc[0] == 1.0
    assert torch.get_num_threads() == 1 and "OMP_NUM_THREADS" not in os.environ


def test_thread_effect_restores_threads_on_error():
    class Broken:
        def translate(self, texts):
            raise RuntimeError("boom")

    torch.set_num_threads(1)
    with pytest.raises(RuntimeError, match="boom"):
        profiling.thread_effect(Broken(), ["x"], (2,), warmup=0, repeats=1)
    assert torch.get_num_threads() == 1


def test_budgets():
    ci = Preset.from_name("ci")
    assert ci.profile_for("ci") == ci.profile
    assert ci.profile_for("opus-mt-shape").sentences <= ci.profile.sentences  # the forced 40-token side is costly
    with pytest.raises(KeyError, match="its own model or 'opus-mt-shape'"):
        ci.profile_for("workshop")
