"""The lab's sentence pairs: the committed splits, loaders for other corpora, batching.

    load_split("test", limit=200)         # [Pair(zh='我们试试看!', en="Let's try something.", refs=(...)), ...]
    read_parallel("a.zh", "a.en")         # any line-aligned parallel text
    list(iter_batches([1, 2, 3], 2))      # [[1, 2], [3]]

The committed corpus (data/train.tsv.gz, dev.tsv, test.tsv) is built from real parallel text by
labkit.core.corpus. Left out: tokenization (the bundle's tokenizer does it) and any download
(load_sacrebleu_testset needs the network once).
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from labkit.core.artifacts import REPO_ROOT

DATA_DIR = REPO_ROOT / "data"
SPLITS = ("train", "dev", "test")


SPLIT_FILES = {"train": "train.tsv.gz", "dev": "dev.tsv", "test": "test.tsv"}


@dataclass(frozen=True)
class Pair:
    """One source sentence, its reference translation, any further references, and where it came from."""

    zh: str
    en: str
    refs: tuple[str, ...] = ()  # more English references (Tatoeba dev/test sentences have up to 8)
    origin: str = ""

    @property
    def references(self) -> tuple[str, ...]:
        return (self.en, *self.refs)


def format_line(pair: Pair) -> str:
    """The corpus line of a pair: origin, Chinese, then every reference, tab-separated."""
    return "\t".join((pair.origin, pair.zh, *pair.references)) + "\n"


def parse_line(line: str, where: str = "") -> Pair:
    """The inverse of format_line: 'tatoeba\t猫\tA cat.\tThe cat.' -> Pair('猫', 'A cat.', ('The cat.',), 'tatoeba')."""
    parts = line.rstrip("\n").split("\t")
    if len(parts) < 3 or not all(parts[1:]):
        raise ValueError(f"{where}: expected origin<TAB>zh<TAB>en[<TAB>en...], got {len(parts)} column(s)")
    return Pair(parts[1], parts[2], tuple(parts[3:]), parts[0])


# --------------------------------------------------------------------------- files


def write_tsv(pairs: Iterable[Pair], path: Path) -> None:
    """Write `zh<TAB>en` lines atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(f"{p.zh}\t{p.en}\n" for p in pairs), encoding="utf-8")
    tmp.replace(path)


def read_tsv(path: Path | str, limit: int | None = None) -> list[Pair]:
    """Read `source<TAB>target` lines; a malformed line is an error naming the line."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if limit is not None and len(pairs) >= limit:
                break
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2:
                raise ValueError(f"{path}:{i}: expected 2 tab-separated columns, got {len(parts)}")
            pairs.append(Pair(*parts))
    return pairs


def read_parallel(src_path: Path | str, tgt_path: Path | str, limit: int | None = None) -> list[Pair]:
    """Read a line-aligned pair of plain-text files (one sentence per line)."""
    src = Path(src_path).read_text(encoding="utf-8").splitlines()
    tgt = Path(tgt_path).read_text(encoding="utf-8").splitlines()
    if len(src) != len(tgt):
        raise ValueError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}")
    return [Pair(s, t) for s, t in zip(src, tgt)][:limit]


def load_split(split: str, limit: int | None = None, data_dir: Path = DATA_DIR) -> list[Pair]:
    """The committed corpus split ('train', 'dev' or 'test'); dev and test pairs carry all references."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    path = Path(data_dir) / SPLIT_FILES[split]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; rebuild the corpus with `labkit data build`")
    pairs = []
    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
        for i, line in enumerate(f, 1):
            if limit is not None and len(pairs) >= limit:
                break
            pairs.append(parse_line(line, f"{path}:{i}"))
    return pairs


def load_sacrebleu_testset(name: str = "wmt20", langpair: str = "zh-en",
                           limit: int | None = None) -> list[Pair]:
    """A named sacreBLEU test set (downloads on first use; needs internet once).

    >>> load_sacrebleu_testset("wmt20", "zh-en")[:1]   # doctest: +SKIP
    """
    from sacrebleu.dataset import DATASETS

    if name not in DATASETS:
        raise ValueError(f"sacreBLEU has no test set {name!r}")
    dataset = DATASETS[name]
    try:
        dataset.process_to_text(langpair)
        src, ref = dataset.get_files(langpair)[:2]
    except Exception as exc:  # network errors surface as many exception types
        raise ConnectionError(
            f"could not fetch sacreBLEU test set {name}/{langpair} ({exc}); it needs internet "
            "the first time, or use read_tsv/read_parallel on local files") from exc
    return read_parallel(src, ref, limit)


def iter_batches(items: list, size: int) -> Iterator[list]:
    """[1,2,3,4,5], 2 -> [1,2], [3,4], [5]."""
    for i in range(0, len(items), size):
        yield items[i:i + size]
