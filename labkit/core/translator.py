"""The Translator base: normalize → tokenize → encode → decode → detokenize, each stage timed, for every engine.

    translator = StepperTranslator(load_teacher())
    translator.translate(["我喜欢猫。"])          # -> ['I like cats.']
    result = translator.run(["", "我喜欢猫。"])   # result.texts, result.timings_ms, result.notes

`Translator` is the base every engine shares: a `labkit.core.decode.Stepper` backend (PyTorch by
default, ONNX Runtime in labkit.engines.ort) plugs into `StepperTranslator`; CTranslate2, which
runs its own search, subclasses `Translator` directly. Bad input never raises: empty or whitespace-only
text (or an item that is not a string at all) gives an empty translation, control characters are dropped, over-long
input is truncated to the model's limit, text without Chinese is translated as
is; each of these is said in `notes`, one list per input, in order.
Left out: sentence splitting of long documents, and caching (labkit.serve).
"""

from __future__ import annotations

import re
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from labkit.core.decode import DecodeConfig, Stepper, TorchStepper, decode

STAGES = ("normalize", "tokenize", "encode", "decode", "detokenize")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\ufeff]")
_HAN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
DEFAULT_MAX_INPUT_TOKENS = 256


@dataclass
class Result:
    texts: list[str]
    ids: list[list[int]]  # generated token ids per input (empty for empty input)
    timings_ms: dict[str, float]  # stage -> wall milliseconds for the whole batch
    notes: list[list[str]] = field(default_factory=list)  # what was done to each input, in order

    @property
    def total_ms(self) -> float:
        return sum(self.timings_ms.values())


def normalize(text: str) -> tuple[str, list[str]]:
    """NFKC, control characters removed, whitespace collapsed; notes say what happened.

    '  我\\x07喜欢 猫 ' -> ('我喜欢 猫', ['removed 1 control character(s)'])
    None -> ('', ['not text (NoneType): nothing to translate'])
    """
    if not isinstance(text, str):  # a None or number from a data frame: one empty output, not a crash
        return "", [f"not text ({type(text).__name__}): nothing to translate"]
    notes = []
    text = unicodedata.normalize("NFKC", text)
    cleaned, n = _CONTROL.subn("", text)
    if n:
        notes.append(f"removed {n} control character(s)")
    cleaned = " ".join(cleaned.split())
    if not cleaned:
        notes.append("empty input: nothing to translate")
    elif not _HAN.search(cleaned):
        notes.append("no Chinese characters: the model may not translate this meaningfully")
    return cleaned, notes


class Translator:
    """What every engine shares: normalize -> tokenize -> generate -> detokenize, timed, notes per input.

    An engine subclass implements only `_generate(batch, timings) -> ids per row` (and records its
    "encode"/"decode" time there); the base handles bad input, truncation and vocabulary notes the
    same way for every engine, so torch, ONNX Runtime and CTranslate2 say the same things.
    """

    def __init__(self, tokenizer, decode: DecodeConfig | None = None, max_input_tokens: int | None = None,
                 max_positions: int = DEFAULT_MAX_INPUT_TOKENS):
        self.tokenizer = tokenizer
        self.decode_cfg = decode or DecodeConfig()
        self.max_input_tokens = max_input_tokens or min(max_positions, DEFAULT_MAX_INPUT_TOKENS)

    def translate(self, texts: list[str]) -> list[str]:
        return self.run(texts).texts

    def run(self, texts: list[str]) -> Result:
        if isinstance(texts, str):
            raise TypeError("translate a list of strings, e.g. translator.translate(['我喜欢猫。'])")
        timings = dict.fromkeys(STAGES, 0.0)
        with _timed(timings, "normalize"):
            cleaned, notes = zip(*(normalize(t) for t in texts)) if texts else ((), ())
            notes = [list(n) for n in notes]
            todo = [i for i, t in enumerate(cleaned) if t]
        ids: list[list[int]] = [[] for _ in texts]
        outputs = ["" for _ in texts]
        if todo:
            with _timed(timings, "tokenize"):
                batch = self._tokenize([cleaned[i] for i in todo], [notes[i] for i in todo])
            generated = self._generate(batch, timings)
            with _timed(timings, "detokenize"):
                decoded = self._detokenize(generated, [notes[i] for i in todo])
            for i, gen, text in zip(todo, generated, decoded):
                ids[i], outputs[i] = gen, text
        return Result(outputs, ids, timings, notes)

    def _generate(self, batch: dict[str, torch.Tensor], timings: dict[str, float]) -> list[list[int]]:
        """Generated ids per row (no start token, no </s>) for a padded batch; adds to timings' encode/decode."""
        raise NotImplementedError

    def _detokenize(self, generated: list[list[int]], notes: list[list[str]]) -> list[str]:
        """Text per row; ids past the tokenizer's vocabulary are dropped, with a note.

        Only a model whose embedding is larger than its tokenizer (opus-mt-shape: 65 001 rows,
        random weights, the teacher's ~1 700 pieces) emits such ids; sentencepiece would raise.
        """
        known = len(self.tokenizer)
        for row, note in zip(generated, notes):
            unknown = sum(t >= known for t in row)
            if unknown:
                note.append(f"{unknown} generated ids outside the tokenizer's {known}-piece vocabulary dropped")
        rows = [[t for t in row if t < known] for row in generated]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def _tokenize(self, texts: list[str], notes: list[list[str]]) -> dict[str, torch.Tensor]:
        """Pad to the longest; truncate past max_input_tokens and note it on that input."""
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_input_tokens,
                             padding=True, return_tensors="pt", return_overflowing_tokens=False,
                             return_length=False)
        for text, note, row in zip(texts, notes, enc["attention_mask"]):
            if int(row.sum()) >= self.max_input_tokens:
                full = len(self.tokenizer(text, verbose=False)["input_ids"])
                if full > self.max_input_tokens:
                    note.append(f"truncated from {full} to {self.max_input_tokens} tokens")
        return enc


class StepperTranslator(Translator):
    """A bundle behind any `labkit.core.decode.Stepper` (PyTorch by default, ONNX Runtime in
    labkit.engines.ort), decoded by the one greedy/beam loop."""

    def __init__(self, bundle, stepper: Stepper | None = None, decode: DecodeConfig | None = None,
                 max_input_tokens: int | None = None):
        limit = getattr(bundle.model.config, "max_position_embeddings", DEFAULT_MAX_INPUT_TOKENS)
        super().__init__(bundle.tokenizer, decode, max_input_tokens, limit)
        self.bundle = bundle
        self.stepper = stepper if stepper is not None else TorchStepper(bundle.model)

    def _generate(self, batch: dict[str, torch.Tensor], timings: dict[str, float]) -> list[list[int]]:
        with _timed(timings, "encode"):
            state = self.stepper.encode(batch["input_ids"], batch["attention_mask"])
        with _timed(timings, "decode"):
            return decode(self.stepper, batch["input_ids"], batch["attention_mask"], self.decode_cfg, state)


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] += (time.perf_counter() - start) * 1e3


def decode_config(preset, num_beams: int = 1) -> DecodeConfig:
    """The preset's decoding: speed-only presets force a fixed output length."""
    return DecodeConfig(max_new_tokens=preset.max_new_tokens, num_beams=num_beams,
                        forced_length=preset.forced_length)


def translator_for(bundle, preset, stepper: Stepper | None = None, num_beams: int = 1) -> StepperTranslator:
    """A StepperTranslator decoding as the preset says: translator_for(bundle, Preset.from_name('ci'))."""
    return StepperTranslator(bundle, stepper, decode_config(preset, num_beams))
