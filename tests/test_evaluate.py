"""BLEU/chrF against the sacreBLEU command line, agreement and latency plumbing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from labkit.config import Preset
from labkit.measure import quality

HYPS = ["The cat is on the table.", "He went to Beijing yesterday.", "Where is she?", "They like apples."]
REFS = ["The cat is on the table.", "He went to Shanghai yesterday.", "Where is he?", "They like red apples."]


def test_score_matches_the_sacrebleu_cli(tmp_path):
    (tmp_path / "hyp.txt").write_text("\n".join(HYPS) + "\n")
    (tmp_path / "ref.txt").write_text("\n".join(REFS) + "\n")
    out = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "ref.txt"), "-i",
                          str(tmp_path / "hyp.txt"), "-m", "bleu", "chrf", "-b", "-f", "text", "-w", "4"],
                         capture_output=True, text=True, check=True).stdout.split()
    ours = quality.score(HYPS, REFS)
    assert ours.bleu == pytest.approx(float(out[0]), abs=0.01)
    assert ours.chrf == pytest.approx(float(out[1]), abs=0.01)
    assert ours.signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a")


def test_perfect_and_mismatched_lengths():
    assert quality.score(["a b c d"], ["a b c d"]).bleu == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        quality.score(["a", "b"], ["a"])


def test_agreement():
    assert quality.agreement([[1, 2], [3]], [[1, 2], [4]]) == 0.5
    with pytest.raises(ValueError):
        quality.agreement([[1]], [])


def test_latency_cycles_sentences_with_preset_repeats():
    calls = []
    fake = type("T", (), {"translate": lambda self, texts: calls.append(texts[0]) or ["x"]})()
    preset = Preset.from_name("ci").with_(bench_warmup=1, bench_repeats=2)
    m = quality.latency(fake, ["a", "b", "c"], preset)
    assert m.n == 6 and calls == ["a", "b", "c", "a", "b", "c", "a"]
    assert m.threads == preset.threads


def test_evaluate_on_tiny_bundle(tiny_bundle):
    from labkit.core.data import load_split
    from labkit.core.translator import StepperTranslator

    pairs = load_split("test", limit=8)
    scores, hyps = quality.evaluate(StepperTranslator(tiny_bundle), pairs, batch_size=4)
    assert len(hyps) == 8 and scores.n == 8 and 0.0 <= scores.bleu <= 100.0


def test_looped_sentences_are_the_ones_with_a_loop_note():
    notes = [[], ["the decoder repeated 'ly' 3 times"], ["truncated from 300 to 256 tokens"],
             ["converted 1 Traditional character(s) to Simplified", "the decoder repeated 'a b' 4 times"]]
    assert quality.looped_sentences(notes) == [1, 3]
