"""CTranslate2 as the peer engine: convert a bundle, translate with its own C++ search.

    out = ensure_ct2("ci", "teacher", "int8")       # artifacts/ci/ct2-teacher-int8
    peer = Ct2Translator(out, threads=2)
    peer.translate(["我喜欢猫。"])                   # same shape as labkit.core.translator.Translator
    peer.generate([[ids...]])                        # token ids, for agreement with labkit.core.decode

Conversion uses CTranslate2's stock Marian loader whenever the model is a faithful
Marian model: its decoder-start (<pad>) embedding row is zero (as in real opus-mt
checkpoints and every bundle labkit trains, labkit.compress.training.pin_start_row)
and <pad> is the last id. The stock loader drops <pad> from the vocabulary and starts
the decoder from a zero vector, which equals Transformers only when that row is zero.
A model with a non-zero start row (one trained elsewhere with tied embeddings, where
the LM head's gradient trains the row; labkit's teacher before its zero-start fine-tune)
gets `PadStartMarianLoader` instead: it keeps <pad> and starts from its embedding, as
`generate` does, and <pad> is suppressed during search, as labkit.core.decode does.
`ct2.json` says which loader a conversion used.

Models whose vocabulary is larger than their tokenizer's (opus-mt-shape: 65 001
rows, the teacher's ~1 700 pieces) get placeholder tokens for the missing ids,
so ids round-trip through CTranslate2's string vocabulary unchanged.

Left out: beam-search parity (CTranslate2's beam bookkeeping differs from
`generate`'s; only greedy is checked token for token), GPU devices, and
CTranslate2's own tokenization (the bundle's tokenizer is used on both sides).
The Python package is the `peer` extra and is imported only when needed.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from labkit.config import Preset
from labkit.core.artifacts import ensure, preset_dir, staging, write_json_atomic
from labkit.core.bundle import Bundle, bundle_key, fingerprint, start_row_norm
from labkit.core.decode import DecodeConfig
from labkit.core.translator import Translator, decode_config

SCHEMA = "labkit.ct2/1"
SIDECAR = "ct2.json"
COMPUTE_TYPES = ("float32", "int8")  # int8: int8 weights and GEMMs, float32 elsewhere (CPU)
COMPUTE_TYPES_SHORT = {"float32": "fp32", "int8": "int8"}  # as in variant names: ct2-fp32, ct2-int8
VOCABULARY_FILE = "shared_vocabulary.json"  # written by CTranslate2's converter


def require_ctranslate2():
    """The ctranslate2 module, or an ImportError that says how to get it."""
    try:
        import ctranslate2
    except ImportError as exc:
        raise ImportError("CTranslate2 is the optional peer engine: install it with "
                          "`pip install 'labkit[peer]'` (or `pip install ctranslate2`)") from exc
    return ctranslate2


def missing_reason() -> str | None:
    """None when CTranslate2 imports; else why not, with the install hint (the reason a skip records)."""
    try:
        require_ctranslate2()
    except ImportError as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------- primitives


def vocabulary(bundle) -> list[str]:
    """Token string per model id, one per row of the embedding matrix, all distinct.

    Ids the tokenizer lacks become '<unused_{id}>'; the model's <pad> id gets '<pad>'.
    teacher (vocab 1 690) -> the tokenizer's pieces in id order, '<pad>' last.
    """
    cfg = bundle.model.config
    size = bundle.model.get_output_embeddings().out_features
    known = {i: t for t, i in bundle.tokenizer.get_vocab().items() if i < size}
    tokens = [known.get(i, f"<unused_{i}>") for i in range(size)]
    pad = cfg.pad_token_id
    if tokens[pad] != "<pad>":  # the tokenizer's own <pad> sits at another id (opus-mt-shape)
        tokens = [f"<unused_{i}>" if t == "<pad>" else t for i, t in enumerate(tokens)]
        tokens[pad] = "<pad>"
    if len(set(tokens)) != len(tokens):
        raise ValueError("the tokenizer maps several ids to one piece; CTranslate2 needs distinct tokens")
    return tokens


def file_mb(directory: Path) -> float:
    """Bytes of the model weights in a CTranslate2 directory, in MiB."""
    return (Path(directory) / "model.bin").stat().st_size / 2**20


def _pad_start_loader():
    """CTranslate2's MarianMTLoader, starting the decoder from the <pad> embedding (see module doc)."""
    from ctranslate2.converters.transformers import BartLoader, MarianMTLoader

    class PadStartMarianLoader(MarianMTLoader):
        def get_model_spec(self, model):
            model.config.normalize_before = False  # Marian is post-norm, no embedding LayerNorm
            model.config.normalize_embedding = False
            return BartLoader.get_model_spec(self, model)  # keeps the <pad> rows

        def set_decoder(self, spec, decoder):
            BartLoader.set_decoder(self, spec, decoder)  # start_from_zero_embedding stays False

        def set_config(self, config, model, tokens):
            cfg = model.config
            config.eos_token = tokens[cfg.eos_token_id]
            config.unk_token = "<unk>" if "<unk>" in tokens else tokens[cfg.eos_token_id]
            config.decoder_start_token = tokens[cfg.decoder_start_token_id]

    return PadStartMarianLoader()


def needs_pad_start(bundle) -> bool:
    """True where CTranslate2's stock Marian loader would decode something else than Transformers:
    a non-zero decoder-start row, or a <pad> that is not the last id (the stock loader drops the last row)."""
    cfg = bundle.model.config
    last = bundle.model.get_output_embeddings().out_features - 1
    return start_row_norm(bundle.model) > 0 or cfg.pad_token_id != last or cfg.decoder_start_token_id != last


def _stock_loader(bundle):
    """CTranslate2's own MarianMTLoader, given labkit's id-preserving vocabulary (<pad> dropped, as it does)."""
    from ctranslate2.converters.transformers import MarianMTLoader

    class StockMarianLoader(MarianMTLoader):
        def set_config(self, config, model, tokens):
            super().set_config(config, model, bundle.tokenizer)

        def set_vocabulary(self, spec, tokens):
            super().set_vocabulary(spec, tokens[:-1])  # the <pad> row _remove_pad_weights dropped

    return StockMarianLoader()


def _converter(bundle):
    """A ctranslate2 Converter for an in-memory bundle (no Transformers round trip through disk)."""
    from ctranslate2.converters.converter import Converter

    class BundleConverter(Converter):
        def _load(self):
            # A deep copy: the spec holds views of the weights, and int8 quantization rewrites
            # them in place, which would corrupt the caller's model.
            model = copy.deepcopy(bundle.model)
            tokens = vocabulary(bundle)
            loader = _pad_start_loader() if needs_pad_start(bundle) else _stock_loader(bundle)
            spec = loader.get_model_spec(model)
            loader.set_config(spec.config, model, tokens)
            loader.set_vocabulary(spec, tokens)
            return spec

    return BundleConverter()


# --------------------------------------------------------------------------- transform


def convert_into(bundle, directory: Path, quantization: str = "float32") -> None:
    """Write `bundle` as a CTranslate2 model into `directory` (a staging directory), weights stored as
    `quantization`, with the tokenizer and `ct2.json` (what it was made from): `Ct2Translator` needs nothing else."""
    require_ctranslate2()
    if quantization not in COMPUTE_TYPES:
        raise ValueError(f"quantization must be one of {COMPUTE_TYPES}, got {quantization!r}")
    import ctranslate2

    start = time.perf_counter()
    _converter(bundle).convert(str(directory), quantization=quantization, force=True)
    bundle.tokenizer.save_pretrained(directory)
    cfg = bundle.model.config
    meta = {"schema": SCHEMA, "quantization": quantization, "ctranslate2": ctranslate2.__version__,
            "loader": "PadStartMarianLoader" if needs_pad_start(bundle) else "MarianMTLoader",
            "start": ("decoder starts from the <pad> embedding; <pad> suppressed in search" if needs_pad_start(bundle)
                      else "decoder starts from a zero vector (stock); <pad> dropped from the vocabulary"),
            "ids": {"start": cfg.decoder_start_token_id, "eos": cfg.eos_token_id, "pad": cfg.pad_token_id},
            "max_positions": cfg.max_position_embeddings,
            "convert_seconds": round(time.perf_counter() - start, 1),
            "source": {"name": bundle.name, "meta": bundle.meta}}
    write_json_atomic(directory / SIDECAR, meta)


def convert(bundle, out: Path | str, quantization: str = "float32") -> Path:
    """Write `bundle` as a CTranslate2 model in `out` (atomically), weights stored as `quantization`."""
    with staging(out) as tmp:
        convert_into(bundle, tmp, quantization)
    return Path(out)


def read_ct2_sidecar(directory: Path | str) -> dict:
    path = Path(directory) / SIDECAR
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a labkit CTranslate2 directory ({SIDECAR} is missing); "
                                "create it with labkit.engines.ct2.convert or ensure_ct2")
    meta = json.loads(path.read_text())
    if meta.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {meta.get('schema')!r}, expected {SCHEMA!r}")
    return meta


# --------------------------------------------------------------------------- runtime


def search_options(cfg: DecodeConfig, pad_token: str | None) -> dict:
    """labkit.core.decode's stopping rules as CTranslate2 options (`pad_token` None: not in the vocabulary).

    generate forces </s> at step max_new_tokens, so at most max_new_tokens - 1 real tokens;
    forced_length=40 -> exactly 40 tokens (</s> banned until then).
    """
    opts = {"beam_size": cfg.num_beams, "length_penalty": cfg.length_penalty, "return_scores": False}
    if pad_token is not None:
        opts["suppress_sequences"] = [[pad_token]]
    if cfg.forced_length is not None:
        return opts | {"min_decoding_length": cfg.forced_length, "max_decoding_length": cfg.forced_length}
    return opts | {"max_decoding_length": cfg.max_new_tokens - 1}


class Ct2Translator(Translator):
    """CTranslate2 behind the shared Translator: `.translate(texts)`, `.run(texts) -> Result`.

    Timings: normalize, tokenize, decode, detokenize. CTranslate2 encodes and decodes in one
    call, so `encode` is 0 and its time is inside `decode`.
    """

    def __init__(self, directory: Path | str, threads: int = 1, compute_type: str | None = None,
                 decode: DecodeConfig | None = None, max_input_tokens: int | None = None, force: bool = False,
                 inter_threads: int = 1, use_vmap: bool = False):
        ctranslate2 = require_ctranslate2()
        from transformers import MarianTokenizer

        self.directory = Path(directory)
        self.meta = read_ct2_sidecar(self.directory)
        super().__init__(MarianTokenizer.from_pretrained(self.directory), decode, max_input_tokens,
                         self.meta["max_positions"], force)
        self.compute_type = compute_type or self.meta["quantization"]
        self.threads = threads
        self.engine = ctranslate2.Translator(str(self.directory), device="cpu", compute_type=self.compute_type,
                                             intra_threads=threads, inter_threads=inter_threads)
        self.tokens = json.loads((self.directory / VOCABULARY_FILE).read_text())
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        pad = self.meta["ids"]["pad"]
        self.options = search_options(self.decode_cfg, self.tokens[pad] if pad < len(self.tokens) else None)
        if use_vmap:  # restrict every batch's output layer to the model directory's vocabulary map
            if not (self.directory / "vmap.txt").exists():
                raise FileNotFoundError(f"{self.directory}/vmap.txt is missing: use_vmap needs a vocabulary map "
                                        "(labkit.engines.shortlist.ensure_ct2_vmap writes one)")
            self.options["use_vmap"] = True

    def generate(self, input_ids: list[list[int]], beams: int | None = None) -> list[list[int]]:
        """Source ids (with </s>, no padding) -> generated ids (no start token, no </s>); `beams`
        overrides the decoding's beam count for this call. CTranslate2 takes ragged rows: no padding."""
        results = self.engine.translate_batch(self.source_tokens(input_ids), **self.options_for(beams))
        return [[self.ids[t] for t in r.hypotheses[0]] for r in results]

    def source_tokens(self, input_ids: list[list[int]]) -> list[list[str]]:
        """Source ids as the token strings CTranslate2 takes."""
        return [[self.tokens[i] for i in row] for row in input_ids]

    def options_for(self, beams: int | None) -> dict:
        """translate_batch options decoding as configured, with `beams` (None: the configured count)."""
        return self.options if beams in (None, self.decode_cfg.num_beams) else self.options | {"beam_size": beams}

    def _generate(self, batch, timings: dict[str, float], cfg: DecodeConfig) -> list[list[int]]:
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        start = time.perf_counter()
        generated = self.generate(rows, cfg.num_beams)
        timings["decode"] += (time.perf_counter() - start) * 1e3
        return generated


# --------------------------------------------------------------------------- handler


def ct2_dir(preset: str, bundle_name: str = "teacher", compute_type: str = "int8") -> Path:
    """Where ensure_ct2 keeps a conversion: <artifacts>/<preset>/ct2-<bundle_name>-<compute_type>."""

    return preset_dir(preset) / f"ct2-{bundle_name}-{compute_type}"


def ensure_ct2(preset: Preset, bundle: Bundle, compute_type: str = "int8") -> Path:
    """The preset's CTranslate2 conversion of `bundle`, weights stored as `compute_type`; converted again
    exactly when the bundle's weights, the compute type or CTranslate2's version change (a second for the
    teacher, ~20 s for opus-mt-shape on 2 cores)."""
    require_ctranslate2()
    import ctranslate2

    out = ct2_dir(preset.name, bundle_key(bundle), compute_type)
    recipe = {"source": bundle.name, "source_fingerprint": fingerprint(bundle.model), "quantization": compute_type,
              "ctranslate2": ctranslate2.__version__}
    return ensure(out, SIDECAR, recipe, lambda tmp: convert_into(bundle, tmp, compute_type),
                  valid=lambda path: (path / "model.bin").exists())


def ct2_translator(preset: Preset, bundle: Bundle, compute_type: str = "int8",
                   threads: int | None = None) -> Ct2Translator:
    """A Ct2Translator decoding as the preset says (forced length on speed-only presets)."""
    return Ct2Translator(ensure_ct2(preset, bundle, compute_type), threads=threads or preset.threads,
                         compute_type=compute_type, decode=decode_config(preset))
