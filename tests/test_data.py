"""The embedded corpus: determinism, committed splits, held-out combinations, grammar coverage."""

from __future__ import annotations

import re

import pytest

from labkit.core import corpus as grammar
from labkit.core import data


@pytest.fixture(scope="module")
def corpus():
    return grammar.generate_corpus(seed=0)


def test_committed_splits_are_what_the_generator_writes(corpus):
    """`python -m labkit.compress.training corpus` re-creates data/*.tsv byte for byte."""
    for name in data.SPLITS:
        assert data.load_split(name) == corpus[name], name


def test_generation_is_deterministic_and_seeded():
    a = grammar.generate_corpus(seed=3, n_train=200, n_dev=20, n_test=50)
    b = grammar.generate_corpus(seed=3, n_train=200, n_dev=20, n_test=50)
    c = grammar.generate_corpus(seed=4, n_train=200, n_dev=20, n_test=50)
    assert a == b and a != c


def test_splits_are_disjoint_and_test_is_large(corpus):
    train = {p.zh for p in corpus["train"]}
    assert len(corpus["test"]) >= 1000
    assert not train & {p.zh for p in corpus["test"]}
    assert not train & {p.zh for p in corpus["dev"]}


def test_test_split_holds_combinations_training_never_sees(corpus):
    """Checked on the text, not on the generator's own bookkeeping: 'old pencil' ("Li Hua has this
    old pencil.") is in the test split and in no training sentence, and over a sixth of the test
    sentences hold such a pair."""
    unseen = grammar.unseen_pairs(corpus["test"], corpus["train"])
    assert ("old", "pencil") in set().union(*unseen)
    assert not any(re.search(r"\bold pencil\b", p.en) for p in corpus["train"])
    assert sum(bool(u) for u in unseen) >= len(corpus["test"]) // 6
    assert grammar.content_pairs("He has nine green notebooks.", grammar.english_content_words()) == {("green", "notebooks")}


def test_vocabulary_and_grammar_coverage(corpus):
    assert len(grammar.content_words()) >= 300
    zh = "\n".join(p.zh for p in corpus["train"])
    for marker in ["吗", "什么", "谁", "哪里", "比", "的", "因为", "所以", "但是", "了", "会", "正在", "不", "没",
                   "昨天", "明天", "上"]:
        assert marker in zh, marker
    lengths = [len(p.en.split()) for p in corpus["train"]]
    assert min(lengths) <= 3 and max(lengths) >= 20


@pytest.mark.parametrize("zh,en", [("三本书", "three books"), ("两只猫", "two cats"), ("一个苹果", "an apple"),
                                   ("五个孩子", "five children"), ("四只老鼠", "four mice")])
def test_numerals_measure_words_and_plural_agreement(corpus, zh, en):
    hits = [p for p in corpus["train"] if zh in p.zh]
    assert hits, zh
    assert all(en in p.en.lower() for p in hits)


@pytest.mark.parametrize("zh,en", [("她不", "She does not"), ("我不", "I do not"), ("他们不", "They do not"),
                                   ("他没", "He did not"), ("我们正在", "We are"), ("她正在", "She is"),
                                   ("我正在", "I am"), ("你们会", "You will")])
def test_verb_agreement(corpus, zh, en):
    """Subject + negation/aspect marker + verb: the English auxiliary agrees with the subject."""
    hits = [p for p in corpus["train"]
            if p.zh.startswith(zh) and p.zh[len(zh)] not in "会在有是比" and "吗" not in p.zh
            and "？" not in p.zh and not any(p.zh[len(zh):].startswith(a.pred) for a in grammar.ADJECTIVES)]
    assert len(hits) >= 10 and all(p.en.startswith(en + " ") for p in hits)


@pytest.mark.parametrize("fn,word,expected", [
    (grammar._plural, "box", "boxes"), (grammar._plural, "story", "stories"), (grammar._plural, "toy", "toys"),
    (grammar._third, "go", "goes"), (grammar._third, "cry", "cries"), (grammar._third, "have", "has"),
    (grammar._past, "study", "studied"), (grammar._past, "like", "liked"), (grammar._ing, "make", "making"),
    (grammar._comparative, "happy", "happier"), (grammar._comparative, "cute", "cuter")])
def test_inflection_rules(fn, word, expected):
    assert fn(word) == expected


def test_tsv_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("我\tI\nonly one column\n")
    with pytest.raises(ValueError, match=r"bad.tsv:2: expected 2"):
        data.read_tsv(path)


def test_parallel_files(tmp_path):
    (tmp_path / "a.zh").write_text("我\n你\n")
    (tmp_path / "a.en").write_text("I\nyou\n")
    assert data.read_parallel(tmp_path / "a.zh", tmp_path / "a.en") == [data.Pair("我", "I"), data.Pair("你", "you")]
    (tmp_path / "b.en").write_text("I\n")
    with pytest.raises(ValueError, match="has 2 lines"):
        data.read_parallel(tmp_path / "a.zh", tmp_path / "b.en")


def test_sacrebleu_testset_offline_is_a_clear_error(monkeypatch):
    from sacrebleu.dataset import DATASETS

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(type(DATASETS["wmt20"]), "process_to_text", offline)
    with pytest.raises(ConnectionError, match="needs internet"):
        data.load_sacrebleu_testset("wmt20", "zh-en")
    with pytest.raises(ValueError, match="no test set"):
        data.load_sacrebleu_testset("not-a-testset")


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split"):
        data.load_split("validation")
