"""Model bundles: a Marian model, its tokenizer and metadata that travel together.

A bundle on disk is a directory: Hugging Face `config.json` + `model.safetensors`,
the Marian tokenizer files (source.spm, target.spm, vocab.json) and `bundle.json`,
the sidecar that says what the model is and how it was made. Loaders never parse
meaning out of file names; they read the sidecar.

Sources: the embedded teacher (`data/teacher`), any Marian directory or hub id
(`load_marian`), and `build_opus_mt_shape`, the opus-mt-zh-en architecture with
random weights for offline speed work. `bundle_for(preset, "shape-6-2")` is the preset's model
cut to its first 6 encoder and 2 decoder layers (untrained: speed only, e.g. the shallow-decoder
shape next to the 6-6 one in `labkit bench --shapes 6-6,6-2`). Left out: non-Marian architectures.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from labkit.config import ModelSpec, Preset
from labkit.core.artifacts import ARTIFACT_KEY, preset_dir, staging
from labkit.core.data import DATA_DIR
from labkit.core.heads import load_pruned

TEACHER_DIR = DATA_DIR / "teacher"
SIDECAR = "bundle.json"
BUNDLE_SCHEMA = "labkit.bundle/1"

# Helsinki-NLP/opus-mt-zh-en's config.json, the values that fix its shape and decoding.
OPUS_MT_ZH_EN_CONFIG = dict(
    vocab_size=65001, d_model=512, encoder_layers=6, decoder_layers=6,
    encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
    decoder_ffn_dim=2048, activation_function="swish", max_position_embeddings=512,
    scale_embedding=True, pad_token_id=65000, decoder_start_token_id=65000, eos_token_id=0,
    forced_eos_token_id=0, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
    share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
)


@dataclass
class Bundle:
    """A model, its tokenizer and its sidecar metadata (name, parent, how it was derived)."""

    model: transformers.MarianMTModel  # noqa: F821
    tokenizer: transformers.MarianTokenizer  # noqa: F821
    meta: dict = field(default_factory=dict)
    path: Path | None = None  # the directory it was loaded from, if any: what `bundle_for` finds it by

    @property
    def name(self) -> str:
        return self.meta.get("name", "model")

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def size_mb(self) -> float:
        """Parameter bytes in MB at the model's current dtype (tied weights counted once)."""
        seen, total = set(), 0
        for p in self.model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total / 2**20

    def write(self, directory: Path | str, dtype: torch.dtype | None = None) -> None:
        """Write model, tokenizer and sidecar into an existing (staging) directory; `save` commits it."""
        directory = Path(directory)
        model = copy.deepcopy(self.model).to(dtype) if dtype is not None else self.model
        with quiet_weight_bars():
            model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        meta = {"schema": BUNDLE_SCHEMA, **self.meta, "params": self.params,
                "storage_dtype": str(dtype or next(self.model.parameters()).dtype)}
        meta.pop(ARTIFACT_KEY, None)  # the recipe it was built from belongs to the old directory, not a copy
        (directory / SIDECAR).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        for f in directory.iterdir():
            f.chmod(0o644)  # some writers create private files; a bundle is shareable data

    def save(self, path: Path | str, dtype: torch.dtype | None = None) -> Path:
        """Write the bundle atomically: a staging directory renamed into place."""
        with staging(path) as tmp:
            self.write(tmp, dtype)
        return Path(path)


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the weights, so a cached student knows whether its teacher changed."""
    h = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:12]


def start_row_norm(model: torch.nn.Module) -> float:
    """L2 norm of the decoder's start-token embedding row: 0 in real Marian checkpoints, which (like
    CTranslate2) start decoding from a zero vector; labkit.compress.training keeps it there."""
    return float(model.get_decoder().embed_tokens.weight.detach()[model.config.decoder_start_token_id].norm())


@contextlib.contextmanager
def quiet_weight_bars():
    """Without transformers' "Loading weights" / "Writing model shards" bars: a local bundle loads in well under
    a second, and a notebook cell should show its own progress bar, not one per model it touches."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_bundle(path: Path | str) -> Bundle:
    """Load a bundle saved by `Bundle.save` (fp32 in memory whatever the storage dtype).

    Structural changes recorded in the sidecar (e.g. pruned heads) are re-applied
    before the weights load, so shapes match exactly.
    """
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    path = Path(path)
    sidecar = path / SIDECAR
    if not sidecar.exists():
        raise FileNotFoundError(f"{path} is not a labkit bundle: {SIDECAR} is missing")
    meta = json.loads(sidecar.read_text())
    if meta.get("schema") != BUNDLE_SCHEMA:
        raise ValueError(f"{sidecar}: schema {meta.get('schema')!r}, expected {BUNDLE_SCHEMA!r}")
    with quiet_weight_bars():
        if meta.get("head_plan"):
            model = load_pruned(path, meta["head_plan"])
        else:
            config = MarianConfig.from_pretrained(path)
            model = MarianMTModel.from_pretrained(path, config=config, dtype=torch.float32)
    tokenizer = MarianTokenizer.from_pretrained(path)
    model.eval()
    meta.pop("schema", None)
    return Bundle(model, tokenizer, meta, path=path)


def load_teacher(path: Path | str = TEACHER_DIR) -> Bundle:
    """The embedded zh→en teacher committed under data/teacher."""
    path = Path(path)
    if not (path / SIDECAR).exists():
        raise FileNotFoundError(
            f"the lab's teacher is missing at {path}: restore it with `git checkout -- data/teacher`, or "
            "train one with `python -m labkit.compress.teacher` (README: 'The corpus and the teacher')")
    return load_bundle(path)


HUB_PROBE_TIMEOUT_S = 5.0  # one quick reachability check instead of minutes of per-file retries
HUB_OFFLINE_HINT = ("It needs internet the first time; offline, download it elsewhere "
                    "(`huggingface-cli download Helsinki-NLP/opus-mt-zh-en --local-dir DIR`) and pass DIR, "
                    "or use preset 'opus-mt-shape' for speed work with the same architecture")


def _looks_like_path(name_or_path: str) -> bool:
    """'./models/opus', '/data/m', '~/m' are paths; 'Helsinki-NLP/opus-mt-zh-en' is a hub id."""
    return name_or_path.startswith((".", "/", "~")) or os.sep + os.sep in name_or_path or name_or_path.count("/") > 1


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached (offline mode, DNS, refused, timeout), or None when it answers."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return f"{url.hostname}:{port} is unreachable ({exc.__class__.__name__}: {exc})"
    return None


def _from_pretrained(name_or_path: str, **kwargs):
    from transformers import MarianMTModel, MarianTokenizer

    tokenizer = MarianTokenizer.from_pretrained(name_or_path, **kwargs)
    return tokenizer, MarianMTModel.from_pretrained(name_or_path, dtype=torch.float32, **kwargs)


def load_marian(name_or_path: str) -> Bundle:
    """Any Marian model from a local directory or the Hugging Face hub.

    A local directory loads as is; a hub id loads from the local cache when it is there, else it is
    downloaded. Offline, a hub id fails within seconds with a ConnectionError that says what to do
    instead (huggingface_hub alone would retry every file for minutes); a mistyped local path is a
    FileNotFoundError, not a network error.
    """
    if Path(name_or_path).expanduser().exists():
        tokenizer, model = _from_pretrained(str(Path(name_or_path).expanduser()))
    elif _looks_like_path(name_or_path):
        raise FileNotFoundError(f"no model directory at {name_or_path!r} (and it is not a hub id like "
                                "'Helsinki-NLP/opus-mt-zh-en')")
    else:
        try:
            tokenizer, model = _from_pretrained(name_or_path, local_files_only=True)
        except (OSError, TypeError, ValueError):  # not cached (a missing file surfaces as any of these)
            why = hub_unreachable()
            if why:
                raise ConnectionError(f"cannot download {name_or_path!r} from the Hugging Face hub: {why}. "
                                      + HUB_OFFLINE_HINT) from None
            try:
                tokenizer, model = _from_pretrained(name_or_path)
            except (OSError, TypeError, ValueError) as exc:
                raise ConnectionError(f"could not load {name_or_path!r} from the Hugging Face hub "
                                      f"({exc.__class__.__name__}: {str(exc)[:200]}). " + HUB_OFFLINE_HINT) from exc
    model.eval()
    return Bundle(model, tokenizer, {"name": Path(name_or_path).name, "source": name_or_path})


def keep_layers(stack: torch.nn.Module, keep) -> None:
    """Keep only layers `keep` of an encoder/decoder stack, in place, renumbering their caches.

    Decoder attentions index the KV cache by `layer_idx`; kept layers must be 0..k-1 again.
    """
    stack.layers = torch.nn.ModuleList([stack.layers[i] for i in keep])
    for new_idx, layer in enumerate(stack.layers):
        for attn in (getattr(layer, "self_attn", None), getattr(layer, "encoder_attn", None)):
            if attn is not None and getattr(attn, "layer_idx", None) is not None:
                attn.layer_idx = new_idx


def cut_layers(model: torch.nn.Module, encoder_layers: int, decoder_layers: int) -> torch.nn.Module:
    """Keep the first `encoder_layers` / `decoder_layers` layers of a Marian model, in place (a speed
    shape: which layers stay does not matter for speed; trained students choose theirs in
    labkit.compress.distill). Asking for more layers than the model has is a ValueError."""
    cfg = model.config
    if not (1 <= encoder_layers <= cfg.encoder_layers and 1 <= decoder_layers <= cfg.decoder_layers):
        raise ValueError(f"a {encoder_layers}-{decoder_layers} shape does not fit in a "
                         f"{cfg.encoder_layers}-{cfg.decoder_layers} model (encoder-decoder layers, each >= 1)")
    keep_layers(model.model.encoder, range(encoder_layers))
    keep_layers(model.model.decoder, range(decoder_layers))
    cfg.encoder_layers, cfg.decoder_layers = encoder_layers, decoder_layers
    return model


def build_opus_mt_shape(seed: int = 0, decoder_layers: int = 6, encoder_layers: int = 6) -> Bundle:
    """The opus-mt-zh-en architecture with random weights: realistic speed, meaningless output.

    The tokenizer is the teacher's (ids stay below its vocabulary, which costs the
    same as any other ids); decoding must be forced to a fixed length. Fewer layers
    (build_opus_mt_shape(decoder_layers=2): the deep-encoder, shallow-decoder shape) are the
    6-6 model's first layers, so every shape of one seed shares the same encoder and embeddings.
    """
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(seed)
    model = MarianMTModel(MarianConfig(**OPUS_MT_ZH_EN_CONFIG)).eval()
    tokenizer = load_teacher().tokenizer
    meta = {"name": "opus-mt-shape", "derived_from": "Helsinki-NLP/opus-mt-zh-en config",
            "random_weights": True, "seed": seed}
    if (encoder_layers, decoder_layers) != (model.config.encoder_layers, model.config.decoder_layers):
        cut_layers(model, encoder_layers, decoder_layers)
        meta.update(name=shape_key(encoder_layers, decoder_layers), derived_from="opus-mt-shape")
    return Bundle(model, tokenizer, meta)


SHAPE_KEY = re.compile(r"^shape-(\d+)-(\d+)$")


def shape_key(encoder_layers: int, decoder_layers: int) -> str:
    """The bundle name of a layer shape: shape_key(6, 2) -> 'shape-6-2'."""
    return f"shape-{encoder_layers}-{decoder_layers}"


def parse_shape(text: str) -> tuple[int, int] | None:
    """'6-2' or 'shape-6-2' -> (6, 2) (encoder, decoder layers); anything else -> None."""
    m = SHAPE_KEY.match(text if text.startswith("shape-") else f"shape-{text}")
    return (int(m.group(1)), int(m.group(2))) if m else None


def shape_of(base: Bundle, encoder_layers: int, decoder_layers: int) -> Bundle:
    """`base` cut to a layer shape (untrained, speed only), named shape-E-D so its artifacts are
    cached apart; the base itself when the shape is its own (its artifacts are the base's)."""
    cfg = base.model.config
    if (encoder_layers, decoder_layers) == (cfg.encoder_layers, cfg.decoder_layers):
        return base
    model = cut_layers(copy.deepcopy(base.model), encoder_layers, decoder_layers)
    meta = {"name": shape_key(encoder_layers, decoder_layers), "derived_from": bundle_key(base),
            "speed_shape": {"encoder_layers": encoder_layers, "decoder_layers": decoder_layers,
                            "trained": False}, "random_weights": bool(base.meta.get("random_weights"))}
    return Bundle(model.eval(), base.tokenizer, meta)


def load_model(spec: ModelSpec) -> Bundle:
    """The bundle a preset names."""
    if spec.kind == "teacher":
        return load_teacher(spec.name_or_path or TEACHER_DIR)
    if spec.kind == "opus-mt-shape":
        return build_opus_mt_shape()
    if spec.kind == "marian":
        return load_marian(spec.name_or_path)
    raise ValueError(f"unknown model kind {spec.kind!r}")


def teacher_for(preset):
    """The preset's parent model as a Bundle (the embedded teacher, a hub model, or opus-mt-shape)."""
    preset = Preset.from_name(preset) if isinstance(preset, str) else preset
    bundle = load_model(preset.model)
    bundle.meta.setdefault("name", "teacher")
    bundle.meta["preset_model"] = preset.name  # its artifacts are named "teacher": onnx-teacher, ct2-teacher-int8
    return bundle


def bundle_key(bundle: Bundle) -> str:
    """The name a bundle's artifacts and `bundle_for` use: "teacher" for the preset's own model, else the
    directory it was loaded from (artifacts/<preset>/pruned-25pct -> "pruned-25pct"), else its name."""
    if bundle.meta.get("preset_model"):
        return "teacher"
    return bundle.path.name if bundle.path is not None else bundle.name


def bundle_for(preset, name: str = "teacher"):
    """A bundle by name: "teacher" is the preset's model, anything else a bundle directory under
    artifacts/<preset> that an earlier notebook cached (what distillation, export and bench start from).

    bundle_for("ci", "pruned-25pct") loads the head-pruned teacher notebook 02 caches;
    bundle_for("opus-mt-shape", "shape-6-2") is the preset's model with 2 decoder layers (built, not cached,
    speed only: see shape_of); a missing one is an error that lists what is there and says how to make it.
    """
    if name == "teacher":
        return teacher_for(preset)
    shape = parse_shape(name) if name.startswith("shape-") else None
    if shape is not None:
        return shape_of(teacher_for(preset), *shape)
    preset_name = preset if isinstance(preset, str) else preset.name
    path = preset_dir(preset_name) / name
    if not (path / SIDECAR).exists():
        there = sorted(p.parent.name for p in path.parent.glob(f"*/{SIDECAR}"))
        raise FileNotFoundError(
            f"no bundle {name!r} under {path.parent} (there: {', '.join(there) or 'none'}); build it first: "
            f"notebook 02 / labkit.compress.prune.ensure_pruned caches pruned-<pct>pct (pruned-<pct>pct-ft when its budget "
            "fine-tunes), notebook 03 / labkit.compress.distill.ensure_student caches student-<strategy>")
    return load_bundle(path)


def ensure_teacher() -> Path:
    """The committed teacher; it is not rebuilt on the fly (training one takes hours on 2 cores)."""
    if not (TEACHER_DIR / SIDECAR).exists():
        raise FileNotFoundError(f"{TEACHER_DIR} is missing: restore it with `git checkout -- data/teacher`, or "
                                "train one with `python -m labkit.compress.teacher` (README)")
    return TEACHER_DIR
