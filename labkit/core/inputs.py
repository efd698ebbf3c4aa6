"""Inputs people type, made ready for a zh->en model: what goes to the model, what is passed through.

    prepare("我們喜歡貓。")   # source '我们喜欢猫。', note 'converted 3 Traditional character(s) to Simplified'
    prepare("！？。，、")     # source '' (model skipped), output '!?.,,', note 'no translatable content ...'
    prepare("Hello!")         # source '', output 'Hello!', note 'no Chinese characters: returned unchanged ...'
    prepare("🐱我喜欢猫。")   # source '我喜欢猫。', prefix '🐱' (put back before the translation)

The teacher and its corpus are Simplified-only, so Traditional text is converted with OpenCC (t2s).
Emoji and other symbols never reach the model (it would turn them into words): those at the edges
of the text stay at that edge of the output, those inside it follow the translation, with a note.
A translator does not invent: text with no Chinese is returned as it came unless `force=True`, and
text with nothing to translate (punctuation, symbols) gives its punctuation in ASCII. On the way out,
`cut_loops` undoes a small model's repetition loops ("put on his put on his put on his").
Left out: other scripts' conversions (Japanese kanji are treated as Chinese), sentence splitting.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache

import opencc

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\ufeff]")
_HAN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
# CJK punctuation NFKC leaves alone, as its ASCII counterpart (full-width forms NFKC maps itself).
ASCII_PUNCT = str.maketrans({"。": ".", "、": ",", "「": '"', "」": '"', "『": '"', "』": '"', "《": '"',
                             "》": '"', "〈": "'", "〉": "'", "【": "[", "】": "]", "〔": "(", "〕": ")",
                             "…": "...", "—": "-", "～": "~", "・": "-", "·": "-", "“": '"', "”": '"',
                             "‘": "'", "’": "'"})


@dataclass
class Prepared:
    """One input made ready: `source` goes to the model ('' = the model is skipped and `output` is the
    result); `prefix`/`suffix` are symbols put back around the translation; `notes` say what was done."""

    source: str
    output: str = ""
    prefix: str = ""
    suffix: str = ""
    notes: list[str] = field(default_factory=list)

    def wrap(self, translation: str) -> str:
        """The translation with the passed-through symbols around it."""
        return " ".join(part for part in (self.prefix, translation, self.suffix) if part)


def is_symbol(ch: str) -> bool:
    """Emoji, pictographs and other symbols a translation model cannot translate (ASCII is never one)."""
    if ch.isascii():
        return False
    cat = unicodedata.category(ch)
    # So: emoji/pictographs; Sk: skin-tone modifiers; Co/Cn: private use/unassigned; Mn in FE00-FE0F and
    # tag characters: emoji variation selectors and flag tags, meaningless without their emoji.
    return cat in ("So", "Sk", "Co", "Cn") or "\ufe00" <= ch <= "\ufe0f" or "\U000e0000" <= ch <= "\U000e007f"


@lru_cache(maxsize=1)
def _t2s() -> opencc.OpenCC:
    return opencc.OpenCC("t2s")  # loads its dictionaries once


def to_simplified(text: str) -> tuple[str, int]:
    """Text in Simplified characters and how many characters changed: '我們喜歡貓' -> ('我们喜欢猫', 3)."""
    converted = _t2s().convert(text)
    if len(converted) == len(text):
        return converted, sum(a != b for a, b in zip(text, converted))
    return converted, max(1, abs(len(converted) - len(text)))  # a phrase rewrite: at least one changed


def normalize(text) -> tuple[str, list[str]]:
    """NFKC, control characters removed, whitespace collapsed; notes say what happened.

    '  我\\x07喜欢 猫 ' -> ('我喜欢 猫', ['removed 1 control character(s)'])
    None -> ('', ['not text (NoneType): nothing to translate'])
    b'\\xe7\\x8c\\xab' -> ('猫', ['decoded 3 bytes as UTF-8'])
    """
    notes = []
    if isinstance(text, bytes | bytearray):
        try:
            decoded = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            return "", [f"bytes that are not UTF-8 ({len(text)} bytes): nothing to translate"]
        notes.append(f"decoded {len(text)} bytes as UTF-8")
        text = decoded
    if not isinstance(text, str):  # a None or number from a data frame: one empty output, not a crash
        return "", [f"not text ({type(text).__name__}): nothing to translate"]
    cleaned, n = _CONTROL.subn("", unicodedata.normalize("NFKC", text))
    if n:
        notes.append(f"removed {n} control character(s)")
    cleaned = " ".join(cleaned.split())
    if not cleaned:
        notes.append("empty input: nothing to translate")
    return cleaned, notes


def split_symbols(text: str) -> tuple[str, str, str, list[str]]:
    """(prefix symbols, text without symbols, suffix symbols, symbols from inside the text).

    '🐱 我喜欢猫。👍' -> ('🐱', '我喜欢猫。', '👍', []);  '我喜欢🐱猫。' -> ('', '我喜欢猫。', '', ['🐱'])
    """
    chars = list(text)
    start = 0
    while start < len(chars) and (is_symbol(chars[start]) or chars[start].isspace()):
        start += 1
    end = len(chars)
    while end > start and (is_symbol(chars[end - 1]) or chars[end - 1].isspace()):
        end -= 1
    inner = chars[start:end]
    inside = "".join(c for c in inner if is_symbol(c))
    body = " ".join("".join(c for c in inner if not is_symbol(c)).split())
    return "".join(chars[:start]).strip(), body, "".join(chars[end:]).strip(), ([inside] if inside else [])


def has_words(text: str) -> bool:
    """Letters or digits anywhere (Chinese counts): something a model could translate."""
    return any(unicodedata.category(c)[0] in "LN" for c in text)


def prepare(text, force: bool = False) -> Prepared:
    """What the model sees for one input, and what is passed through (see the module doc).

    force=True sends text without Chinese characters to the model anyway (its output may be invented).
    """
    cleaned, notes = normalize(text)
    if not cleaned:
        return Prepared("", "", notes=notes)
    if _HAN.search(cleaned):
        simplified, changed = to_simplified(cleaned)
        if changed:
            notes.append(f"converted {changed} Traditional character(s) to Simplified")
            cleaned = simplified
    prefix, body, suffix, inside = split_symbols(cleaned)
    if not has_words(body):
        punct = "".join(body.translate(ASCII_PUNCT).split())
        kept = f" {punct!r}" if punct else " ''"
        notes.append(f"no translatable content (punctuation/symbols only): returned its punctuation as ASCII{kept}"
                     + (f", dropped symbol(s) {prefix + ''.join(inside) + suffix!r}" if prefix or inside or suffix
                        else ""))
        return Prepared("", punct, notes=notes)
    if not _HAN.search(body) and not force:
        notes.append("no Chinese characters: returned unchanged (force=True translates it anyway)")
        return Prepared("", cleaned, notes=notes)
    if not _HAN.search(body):
        notes.append("no Chinese characters: translated anyway (force=True); the output may be invented")
    if prefix or suffix:
        notes.append(f"symbol(s) kept around the translation: {prefix + suffix!r}")
    if inside:
        notes.append(f"symbol(s) from inside the text put after the translation: {inside[0]!r}")
        suffix = " ".join(s for s in (inside[0], suffix) if s)
    return Prepared(body, prefix=prefix, suffix=suffix, notes=notes)


# --------------------------------------------------------------------------- outputs

WORD_LOOP = re.compile(r"\b((?:\S+\s+){1,4}?)\1{2,}")  # a 1-4 word phrase three times in a row
PIECE_LOOP = re.compile(r"([a-z]{2,3})\1{2,}")  # "Onlylyly": a piece of a word three times in a row
LOOP_NOTE = "the decoder repeated "


def cut_loops(text: str) -> tuple[str, list[str]]:
    """A small model's classic failure, undone: each phrase said three or more times in a row is kept once,
    and an unfinished repeat at the end (where decoding ran out of steps) is dropped, with a note each.

    'I put on his put on his put on his put on' -> ('I put on his', ['the decoder repeated "put on his" 3 times'])
    'Onlylyly you.' -> ('Only you.', [...]);  'I like cats.' -> ('I like cats.', [])
    """
    notes = []
    out = text + " "
    while m := WORD_LOOP.search(out):
        phrase, rest = m.group(1), out[m.end():]
        if phrase.startswith(rest.rstrip()):
            rest = ""  # the loop ran to the end of the output, cut mid-phrase
        notes.append(f"{LOOP_NOTE}{phrase.strip()!r} {(m.end() - m.start()) // len(phrase)} times")
        out = out[:m.start()] + phrase + rest
    while m := PIECE_LOOP.search(out):
        notes.append(f"{LOOP_NOTE}{m.group(1)!r} {(m.end() - m.start()) // len(m.group(1))} times")
        out = out[:m.start()] + m.group(1) + out[m.end():]
    return out.strip() if notes else text, notes
