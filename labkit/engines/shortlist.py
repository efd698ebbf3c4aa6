"""A lexical shortlist: which target pieces a batch may emit, from co-occurrence on the training pairs.

    path = ensure_shortlist(preset, bundle)               # artifacts/<preset>/shortlist-<bundle>/shortlist.json
    table = load_shortlist(path)
    table.candidates([[53, 210, 0]])                     # sorted ids: specials + frequent + each piece's top-k

In the spirit of Marian/Bergamot lexical shortlists and CTranslate2's vocabulary map: for every
source piece s, the k target pieces t with the highest Dice coefficient 2·c(s,t) / (c(s) + c(t)),
counted per sentence pair (a piece counts once per sentence) on the training split tokenized with
the bundle's tokenizer, keeping pairs seen in at least `min_cooc` sentences; plus the N most
frequent target pieces and the specials (</s>, <pad>, <unk>). A batch's candidate set is the union
over its source pieces. Dice rather than p(t|s): p(t|s) ranks the frequent pieces (which the N
frequent ones cover anyway) above a piece's actual translation; a word aligner (fast_align,
eflomal) would sharpen the lists but needs a compiled tool, and the gates below say whether
co-occurrence is enough. `write_vmap` writes the same table as CTranslate2's vocabulary map
(`vmap.txt`: "source<TAB>target target ..." per source piece, one line with an empty source for
the always-candidates), so the peer runs with the same restriction (`ensure_ct2_vmap`).

On speed-only presets (opus-mt-shape: random weights, the teacher's tokenizer) the table comes from
the teacher's corpus with the same tokenizer, so its candidate-set sizes are what this corpus gives,
but ids >= the tokenizer's ~1 700 pieces are never candidates. Left out: n-gram keys (the vmap
format allows them), alignment-based tables, and per-sentence (rather than per-batch) sets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labkit.config import Preset, ShortlistBudget
from labkit.core.artifacts import digest, ensure, preset_dir, write_json_atomic
from labkit.core.bundle import Bundle, bundle_key
from labkit.core.data import DATA_DIR, SPLIT_FILES, Pair, iter_batches, load_split
from labkit.engines.ct2 import SIDECAR as CT2_SIDECAR
from labkit.engines.ct2 import VOCABULARY_FILE, Ct2Translator, ensure_ct2

SCHEMA = "labkit.shortlist/1"
SIDECAR = "shortlist.json"
VMAP_FILE = "vmap.txt"  # the name CTranslate2 looks for in a model directory


@dataclass(frozen=True)
class Shortlist:
    """Top-k target ids per source id, and the ids that are always candidates."""

    lists: dict[int, tuple[int, ...]]  # source id -> target ids, best first
    always: tuple[int, ...]  # specials + the most frequent target pieces
    vocab_size: int  # rows of the model's output layer (ids at or above it never occur)

    def candidates(self, sources: Iterable[Iterable[int]]) -> np.ndarray:
        """Sorted, unique target ids a batch of source rows may emit: always ∪ lists of every piece.

        lists {5: (7, 8)}, always (0, 1) -> candidates([[5, 1]]) = [0, 1, 7, 8]
        """
        ids = set(self.always)
        for row in sources:
            for s in row:
                ids.update(self.lists.get(int(s), ()))
        return np.fromiter(sorted(ids), dtype=np.int64)


# --------------------------------------------------------------------------- primitives: counting


def _presence(rows: Sequence[Sequence[int]], vocab: int):
    """Binary sentence x piece matrix (scipy CSR): which pieces occur in which sentence."""
    from scipy import sparse

    indptr, indices = [0], []
    for row in rows:
        uniq = sorted({int(i) for i in row if 0 <= int(i) < vocab})
        indices += uniq
        indptr.append(len(indices))
    data = np.ones(len(indices), dtype=np.int32)
    return sparse.csr_matrix((data, np.array(indices, dtype=np.int64), np.array(indptr)), shape=(len(rows), vocab))


def dice_table(src_rows: Sequence[Sequence[int]], tgt_rows: Sequence[Sequence[int]], vocab: int, k: int,
               min_cooc: int = 1, exclude: Iterable[int] = ()) -> dict[int, tuple[int, ...]]:
    """{source id: its k target ids by Dice, ties by co-occurrence count then id}; pairs seen in fewer than
    `min_cooc` sentences are dropped, `exclude` (the specials) never listed.

    src [[1], [1], [2]], tgt [[5], [5, 6], [6]], k=1 -> {1: (5,), 2: (6,)} (Dice(1,5) = 2·2/(2+2) = 1)
    """
    src, tgt = _presence(src_rows, vocab), _presence(tgt_rows, vocab)
    cooc = (src.T @ tgt).tocoo()  # c(s, t): sentences holding both
    c_src, c_tgt = np.asarray(src.sum(0)).ravel(), np.asarray(tgt.sum(0)).ravel()
    banned = set(int(i) for i in exclude)
    keep = (cooc.data >= min_cooc) & ~np.isin(cooc.col, list(banned))
    s, t, c = cooc.row[keep], cooc.col[keep], cooc.data[keep]
    dice = 2.0 * c / (c_src[s] + c_tgt[t])
    order = np.lexsort((t, -c, -dice, s))  # by source, then best first
    table: dict[int, list[int]] = {}
    for i in order:
        best = table.setdefault(int(s[i]), [])
        if len(best) < k:
            best.append(int(t[i]))
    return {key: tuple(v) for key, v in table.items()}


def most_frequent(tgt_rows: Sequence[Sequence[int]], vocab: int, n: int, exclude: Iterable[int] = ()) -> tuple[int, ...]:
    """The n target ids in the most sentences (ties by id): [[5, 6], [5]], n=1 -> (5,)."""
    counts = np.asarray(_presence(tgt_rows, vocab).sum(0)).ravel()
    counts[list(exclude)] = 0
    order = np.lexsort((np.arange(vocab), -counts))
    return tuple(int(i) for i in order[:n] if counts[i] > 0)


def specials(tokenizer, model_config) -> tuple[int, ...]:
    """</s>, <pad> (the decoder start) and <unk>: ids a decode needs whatever the source says."""
    ids = {model_config.eos_token_id, model_config.pad_token_id, model_config.decoder_start_token_id}
    if tokenizer.unk_token_id is not None:
        ids.add(tokenizer.unk_token_id)
    return tuple(sorted(int(i) for i in ids))


def build_shortlist(src_rows, tgt_rows, vocab: int, budget: ShortlistBudget, special_ids: Iterable[int]) -> Shortlist:
    """The table from tokenized sentence pairs (ids): Dice top-k per source piece, frequent pieces, specials."""
    special_ids = tuple(special_ids)
    lists = dice_table(src_rows, tgt_rows, vocab, budget.k, budget.min_cooc, special_ids)
    frequent = most_frequent(tgt_rows, vocab, budget.frequent, special_ids)
    return Shortlist(lists, tuple(sorted(set(special_ids) | set(frequent))), vocab)


# --------------------------------------------------------------------------- the artifact


def tokenize_pairs(tokenizer, pairs: Sequence[Pair]) -> tuple[list[list[int]], list[list[int]]]:
    """(source ids, target ids) per pair, as the translator and the training loss see them."""
    src = tokenizer([p.zh for p in pairs], truncation=True, max_length=256)["input_ids"]
    tgt = tokenizer(text_target=[p.en for p in pairs], truncation=True, max_length=256)["input_ids"]
    return src, tgt


def shortlist_dir(preset: str, bundle_name: str = "teacher") -> Path:
    """<artifacts>/<preset>/shortlist-<bundle_name>."""
    return preset_dir(preset) / f"shortlist-{bundle_name}"


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer's piece -> id map: a changed vocabulary rebuilds the table."""
    import hashlib

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def ensure_shortlist(preset: Preset, bundle: Bundle) -> Path:
    """The preset's shortlist for `bundle` (its tokenizer and output size), rebuilt exactly when the budget,
    the training split or the tokenizer change. A second or two for the 40 000 embedded pairs."""
    budget, model = preset.shortlist, bundle.model
    vocab = model.get_output_embeddings().out_features
    out = shortlist_dir(preset.name, bundle_key(bundle))
    recipe = {"budget": vars(budget), "train_sha256": digest(DATA_DIR / SPLIT_FILES["train"]), "vocab_size": vocab,
              "tokenizer_sha256": tokenizer_digest(bundle.tokenizer), "specials": specials(bundle.tokenizer, model.config)}

    def build(tmp: Path) -> None:
        pairs = load_split("train", limit=budget.train_sentences)
        src, tgt = tokenize_pairs(bundle.tokenizer, pairs)
        table = build_shortlist(src, tgt, vocab, budget, recipe["specials"])
        save_shortlist(table, tmp / SIDECAR, sentences=len(pairs), method="dice")

    return ensure(out, SIDECAR, recipe, build, valid=lambda path: _readable(path / SIDECAR))


def save_shortlist(table: Shortlist, path: Path, **info) -> None:
    """The table as JSON (atomically), with `info` (how it was made) beside it."""
    write_json_atomic(path, {"schema": SCHEMA, **info, "vocab_size": table.vocab_size, "always": list(table.always),
                             "lists": {str(s): list(t) for s, t in sorted(table.lists.items())}})


def load_shortlist(path: Path | str) -> Shortlist:
    """A saved table (a shortlist directory or its shortlist.json); missing or corrupt -> a clear error."""
    path = Path(path)
    path = path / SIDECAR if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"no shortlist at {path}; build one with labkit.engines.shortlist.ensure_shortlist")
    try:
        data = json.loads(path.read_text())
        if data.get("schema") != SCHEMA:
            raise ValueError(f"schema {data.get('schema')!r}, expected {SCHEMA!r}")
        table = Shortlist({int(s): tuple(int(i) for i in t) for s, t in data["lists"].items()},
                          tuple(int(i) for i in data["always"]), int(data["vocab_size"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a readable shortlist ({exc}); delete it and rebuild it with "
                         "labkit.engines.shortlist.ensure_shortlist") from None
    bad = [i for t in (table.always, *table.lists.values()) for i in t if not 0 <= i < table.vocab_size]
    if bad:
        raise ValueError(f"{path}: ids {bad[:5]} outside the vocabulary of {table.vocab_size}; rebuild it")
    return table


def _readable(path: Path) -> bool:
    try:
        load_shortlist(path)
    except (OSError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------- statistics


def candidate_stats(table: Shortlist, tokenizer, pairs: Sequence[Pair], batch: int = 16) -> dict:
    """Candidate-set sizes (per sentence and per batch of `batch`) and coverage of the references' pieces.

    coverage: share of reference target pieces (</s> included) inside their own batch's set;
    sentences_covered: share of sentences whose whole reference is inside its sentence's own set.
    """
    src, tgt = tokenize_pairs(tokenizer, pairs)
    per_sentence = [table.candidates([s]) for s in src]
    sizes = np.array([len(c) for c in per_sentence])
    batch_sizes, inside, total = [], 0, 0
    for rows in iter_batches(list(range(len(src))), batch):
        cand = set(table.candidates([src[i] for i in rows]).tolist())
        batch_sizes.append(len(cand))
        for i in rows:
            inside += sum(t in cand for t in tgt[i])
            total += len(tgt[i])
    whole = [set(t) <= set(c.tolist()) for t, c in zip(tgt, per_sentence)]
    return {"sentences": len(pairs), "vocab_size": table.vocab_size, "sentence_sizes": sizes.tolist(),
            "batch_sizes": batch_sizes, "size_mean": float(sizes.mean()), "size_p95": float(np.percentile(sizes, 95)),
            "batch": batch, "batch_size_mean": float(np.mean(batch_sizes)),
            "batch_size_p95": float(np.percentile(batch_sizes, 95)),
            "coverage": inside / max(total, 1), "sentences_covered": float(np.mean(whole))}


# --------------------------------------------------------------------------- CTranslate2's vocabulary map


def write_vmap(table: Shortlist, tokens: Sequence[str], path: Path | str) -> None:
    """CTranslate2's vocabulary map: "source<TAB>t1 t2 ..." per source piece, "<TAB>always ..." first.

    `tokens` is the CTranslate2 model's vocabulary (id -> string). Pieces with a space or a tab
    cannot be written in this format: a ValueError names them.
    """
    bad = [t for t in tokens if " " in t or "\t" in t or "\n" in t]
    if bad:
        raise ValueError(f"vocabulary pieces {bad[:5]} contain whitespace; the vmap format cannot hold them")
    known = len(tokens)
    lines = ["\t" + " ".join(tokens[i] for i in table.always if i < known)]
    for s, ts in sorted(table.lists.items()):
        if s < known and ts:
            lines.append(tokens[s] + "\t" + " ".join(tokens[t] for t in ts if t < known))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_vmap(path: Path | str, tokens: Sequence[str]) -> Shortlist:
    """Parse a vmap file as CTranslate2 does (1-gram keys only) back into ids; the round-trip check."""
    ids = {t: i for i, t in enumerate(tokens)}
    lists, always = {}, ()
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        key, sep, rest = line.partition("\t")
        if not sep:
            raise ValueError(f"{path}:{n}: no tab: not a vocabulary map line")
        unknown = [t for t in [key] * bool(key) + rest.split() if t not in ids]
        if unknown:
            raise ValueError(f"{path}:{n}: pieces {unknown[:3]} are not in the model's vocabulary")
        targets = tuple(ids[t] for t in rest.split())
        if key:
            lists[ids[key]] = targets
        else:
            always = targets
    return Shortlist(lists, always, len(tokens))


def ensure_ct2_vmap(preset: Preset, bundle: Bundle, compute_type: str = "int8") -> Path:
    """ensure_ct2's conversion plus the shortlist as vmap.txt, in its own directory (files hard-linked,
    so no second copy of the weights): <artifacts>/<preset>/ct2-<bundle>-<compute_type>-vmap."""
    parent = ensure_ct2(preset, bundle, compute_type)
    table_dir = ensure_shortlist(preset, bundle)
    out = preset_dir(preset.name) / f"{parent.name}-vmap"
    recipe = {"parent_sha256": digest(parent / CT2_SIDECAR), "shortlist_sha256": digest(table_dir / SIDECAR)}

    def build(tmp: Path) -> None:
        for f in parent.iterdir():
            if f.is_file():
                _link_or_copy(f, tmp / f.name)
        tokens = json.loads((parent / VOCABULARY_FILE).read_text())
        write_vmap(load_shortlist(table_dir), tokens, tmp / VMAP_FILE)

    return ensure(out, CT2_SIDECAR, recipe, build, valid=lambda p: (p / VMAP_FILE).exists() and (p / "model.bin").exists())


def _link_or_copy(src: Path, dst: Path) -> None:
    import shutil

    try:
        os.link(src, dst)  # the parent may be rebuilt later: its files are replaced, these stay whole
    except OSError:
        shutil.copyfile(src, dst)


class MaskedCt2Translator(Ct2Translator):
    """The CTranslate2 oracle: the full-vocabulary model with every non-candidate token suppressed, per batch
    (the candidates CTranslate2's vocabulary map gives the same batch: the table's always ∪ each piece's list)."""

    def __init__(self, directory: Path | str, table: Shortlist, **options):
        super().__init__(directory, **options)
        self.table = table

    def generate(self, input_ids: list[list[int]], beams: int | None = None) -> list[list[int]]:
        keep = set(self.table.candidates(input_ids).tolist())
        suppress = [[t] for i, t in enumerate(self.tokens) if i not in keep]
        source = [[self.tokens[i] for i in row] for row in input_ids]
        options = self.options | {"suppress_sequences": self.options.get("suppress_sequences", []) + suppress}
        if beams not in (None, self.decode_cfg.num_beams):
            options["beam_size"] = beams
        results = self.engine.translate_batch(source, **options)
        return [[self.ids[t] for t in r.hypotheses[0]] for r in results]
