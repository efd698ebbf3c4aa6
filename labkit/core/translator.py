"""The Translator base: normalize → tokenize → encode → decode → detokenize, each stage timed, for every engine.

    translator = StepperTranslator(load_teacher())
    translator.translate(["我喜欢猫。"])          # -> ['I like cats.']
    result = translator.run(["", "我喜欢猫。"])   # result.texts, result.timings_ms, result.notes

`Translator` is the base every engine shares: a `labkit.core.decode.Stepper` backend (PyTorch by
default, ONNX Runtime in labkit.engines.ort) plugs into `StepperTranslator`; CTranslate2, which
runs its own search, subclasses `Translator` directly. Bad input never raises and every engine treats
it the same way (labkit.core.inputs.prepare): empty, whitespace-only or non-text items give an empty
translation, bytes are decoded as UTF-8, control characters are dropped, Traditional characters become
Simplified, emoji and symbols are passed through around the translation, punctuation-only input gives
its ASCII punctuation, text without Chinese comes back unchanged (unless `force=True`), characters
outside the vocabulary are counted, over-long input is truncated to the model's limit; an output caught
in a repetition loop keeps the repeated phrase once (`cut_loops`); each of these is said in `notes`, one
list per input, in order. The stages are also public one by one
(`token_ids`, `generate`, `detokenize`) for callers that schedule them themselves (labkit.serve).
Left out: sentence splitting of long documents, and caching (labkit.serve).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from labkit.core.decode import DecodeConfig, Stepper, TorchStepper, decode
from labkit.core.inputs import Prepared, cut_loops, prepare

STAGES = ("normalize", "tokenize", "encode", "decode", "detokenize")
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


class Translator:
    """What every engine shares: normalize -> tokenize -> generate -> detokenize, timed, notes per input.

    An engine subclass implements only `_generate(batch, timings, cfg) -> ids per row` (and records its
    "encode"/"decode" time there); the base handles bad input, truncation and vocabulary notes the
    same way for every engine, so torch, ONNX Runtime and CTranslate2 say the same things.
    """

    def __init__(self, tokenizer, decode: DecodeConfig | None = None, max_input_tokens: int | None = None,
                 max_positions: int = DEFAULT_MAX_INPUT_TOKENS, force: bool = False):
        self.tokenizer = tokenizer
        self.decode_cfg = decode or DecodeConfig()
        self.max_input_tokens = max_input_tokens or min(max_positions, DEFAULT_MAX_INPUT_TOKENS)
        self.force = force  # translate text without Chinese characters too (else it is returned unchanged)

    def translate(self, texts: list[str], force: bool | None = None) -> list[str]:
        return self.run(texts, force).texts

    def run(self, texts: list[str], force: bool | None = None) -> Result:
        """One output per input, in order; `force` overrides the translator's own for this call."""
        if isinstance(texts, str | bytes):
            raise TypeError("translate a list of strings, e.g. translator.translate(['我喜欢猫。'])")
        force = self.force if force is None else force
        timings = dict.fromkeys(STAGES, 0.0)
        with _timed(timings, "normalize"):
            prepared: list[Prepared] = [prepare(t, force) for t in texts]
            todo = [i for i, p in enumerate(prepared) if p.source]
        ids: list[list[int]] = [[] for _ in texts]
        outputs = [p.output for p in prepared]
        notes = [p.notes for p in prepared]
        if todo:
            with _timed(timings, "tokenize"):
                rows = []
                for i in todo:
                    row, more = self.token_ids(prepared[i].source)
                    rows.append(row)
                    notes[i] += more
                batch = self.pad(rows)
            generated = self._generate(batch, timings, self.decode_cfg)
            with _timed(timings, "detokenize"):
                decoded, more = self.detokenize(generated)
            for i, gen, text, note in zip(todo, generated, decoded, more):
                ids[i], outputs[i] = gen, prepared[i].wrap(text)
                notes[i] += note
        return Result(outputs, ids, timings, notes)

    # The stages one by one, for callers that schedule them (labkit.serve tokenizes each request
    # as it arrives, batches sentences from many requests, and detokenizes beside the next batch).

    def token_ids(self, text: str) -> tuple[list[int], list[str]]:
        """Source ids of one prepared text (ending in </s>), cut to max_input_tokens, with notes on
        characters outside the vocabulary and on truncation.

        '我喜欢猫。' -> ([ids..., 0], []); a 300-token text -> (256 ids, ['truncated from 300 to 256 tokens'])
        """
        notes = []
        unknown = self.unknown_characters(text)
        if unknown:
            shown = "".join(dict.fromkeys(unknown))[:10]  # in the order they appear: '意思', not '思意'
            notes.append(f"{len(unknown)} character(s) outside the model's vocabulary become <unk>: {shown!r}")
        ids = self.tokenizer(text, truncation=True, max_length=self.max_input_tokens)["input_ids"]
        if len(ids) >= self.max_input_tokens:
            full = len(self.tokenizer(text, verbose=False)["input_ids"])
            if full > self.max_input_tokens:
                notes.append(f"truncated from {full} to {self.max_input_tokens} tokens")
        return ids, notes

    def pad(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Rows of source ids -> input_ids and attention_mask, padded to the longest (the tokenizer's side)."""
        return self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")

    def generate(self, rows: list[list[int]], beams: int | None = None) -> list[list[int]]:
        """Generated ids (no start token, no </s>) for rows of source ids of any lengths; `beams`
        overrides the decoding's beam count for this call."""
        cfg = self.decode_cfg if beams in (None, self.decode_cfg.num_beams) else replace(self.decode_cfg, num_beams=beams)
        return self._generate(self.pad(rows), dict.fromkeys(STAGES, 0.0), cfg)

    def detokenize(self, generated: list[list[int]]) -> tuple[list[str], list[list[str]]]:
        """(text, notes) per row; ids past the tokenizer's vocabulary are dropped, and repetition loops cut
        (`cut_loops`), each with a note.

        Only a model whose embedding is larger than its tokenizer (opus-mt-shape: 65 001 rows,
        random weights, the teacher's ~1 700 pieces) emits such ids; sentencepiece would raise.
        """
        known = len(self.tokenizer)
        notes: list[list[str]] = [[] for _ in generated]
        for row, note in zip(generated, notes):
            unknown = sum(t >= known for t in row)
            if unknown:
                note.append(f"{unknown} generated ids outside the tokenizer's {known}-piece vocabulary dropped")
        rows = [[t for t in row if t < known] for row in generated]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        for k, text in enumerate(texts):
            texts[k], more = cut_loops(text)
            notes[k] += more
        return texts, notes

    def _generate(self, batch: dict[str, torch.Tensor], timings: dict[str, float],
                  cfg: DecodeConfig) -> list[list[int]]:
        """Generated ids per row (no start token, no </s>) for a padded batch, decoding as `cfg` says;
        adds to timings' encode/decode."""
        raise NotImplementedError

    def unknown_characters(self, text: str) -> str:
        """The characters of `text` (in order, repeats kept) the tokenizer maps to <unk>.

        Sentencepiece keeps an unknown span as one piece ('歡貓' in '我們喜歡貓'), so pieces are counted by
        their characters.
        """
        unk = self.tokenizer.unk_token_id
        pieces = self.tokenizer.tokenize(text)
        return "".join(p.replace("\u2581", "") for p, i in zip(pieces, self.tokenizer.convert_tokens_to_ids(pieces))
                       if i == unk)


class StepperTranslator(Translator):
    """A bundle behind any `labkit.core.decode.Stepper` (PyTorch by default, ONNX Runtime in
    labkit.engines.ort), decoded by the one greedy/beam loop."""

    def __init__(self, bundle, stepper: Stepper | None = None, decode: DecodeConfig | None = None,
                 max_input_tokens: int | None = None, force: bool = False):
        limit = getattr(bundle.model.config, "max_position_embeddings", DEFAULT_MAX_INPUT_TOKENS)
        super().__init__(bundle.tokenizer, decode, max_input_tokens, limit, force)
        self.bundle = bundle
        self.stepper = stepper if stepper is not None else TorchStepper(bundle.model)

    def _generate(self, batch: dict[str, torch.Tensor], timings: dict[str, float],
                  cfg: DecodeConfig) -> list[list[int]]:
        with _timed(timings, "encode"):
            state = self.stepper.encode(batch["input_ids"], batch["attention_mask"])
        with _timed(timings, "decode"):
            return decode(self.stepper, batch["input_ids"], batch["attention_mask"], cfg, state)


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
