"""The ONNX graphs of a Marian bundle (encoder, first decoder step, decoder step with past), their names and sidecar.

Three graphs with flat tensor inputs and outputs, so any runtime (ONNX Runtime,
TensorRT, a quantizer) can drive them without knowing Hugging Face cache objects:

    encoder_model.onnx            input_ids (B,S) int64, attention_mask (B,S) int64
                                  -> encoder_hidden_states (B,S,D)
    decoder_model.onnx            input_ids (B,T), encoder_attention_mask (B,S), encoder_hidden_states (B,S,D)
                                  -> logits (B,V) of the last position,
                                     present_key_self_{i}, present_value_self_{i} (B,H_i,T,d_head),
                                     cross_key_{i}, cross_value_{i} (B,H_i,S,d_head)
    decoder_with_past_model.onnx  input_ids (B,1), encoder_attention_mask (B,S),
                                  past_key_self_{i}, past_value_self_{i} (B,H_i,P,d_head),
                                  cross_key_{i}, cross_value_{i} (B,H_i,S,d_head)
                                  -> logits (B,V), present_key_self_{i}, present_value_self_{i} (B,H_i,P+1,d_head)

A fourth graph, `decoder_rows` (DecoderRowsGraph: positions (B,) and self_mask (B,P) added, so every
row sits at its own position over a left-padded cache), is exported on demand for continuous
batching (labkit.engines.rows), not as part of an export directory.

Batch, source length, target length and past length are dynamic; the head count
H_i may differ per layer (pruned models). The decoder graphs are the Marian
decoder written over explicit K/V tensors (`decoder_layer` below), not Hugging
Face's cache classes: that keeps the graphs small and exportable by both
exporters; the parity gate (`parity`) proves they compute what the PyTorch
model computes. An export directory is written atomically and carries
`onnx.json` (see `SIDECAR_FIELDS`); `labkit.engines.ort.OrtStepper.from_dir` runs any
directory with that layout, including quantized copies made with `derive`.

    out = export(load_teacher(), "artifacts/ci/onnx-teacher")
    json.loads((out / "onnx.json").read_text())["parity"]["passed"]  # -> True

Left out: fp16 export, past-length-1 "merged" decoders with an If node, and
exporting generation itself (the loop stays in labkit.core.decode).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

OPSET = 18  # pinned: both exporters and ORT's quantization tools support it
SCHEMA = "labkit.onnx/1"
SIDECAR = "onnx.json"
GRAPHS = ("encoder", "decoder", "decoder_with_past")
FILES = {"encoder": "encoder_model.onnx", "decoder": "decoder_model.onnx",
         "decoder_with_past": "decoder_with_past_model.onnx"}
EXTERNAL_DATA_MB = 1024  # above this a graph's weights go to a side file (protobuf's hard limit is 2 GB)
SIDECAR_FIELDS = {
    "schema": "labkit.onnx/1",
    "files": "graph -> file name (encoder, decoder, decoder_with_past)",
    "file_bytes": "file name -> size, checked on load (truncated copies fail loudly)",
    "inputs / outputs": "graph -> ordered tensor names",
    "exporter": "graph -> 'dynamo' | 'torchscript'",
    "opset": "ONNX opset of the graphs",
    "precision": "fp32 for exports; derived directories say what they hold (e.g. int8)",
    "model": "layers, heads per layer, head_dim, d_model, vocab, start/eos/pad ids",
    "source": "the bundle's name and sidecar metadata",
    "parity": "max |Δ| per graph output vs PyTorch on unseen shapes, tolerance, passed",
}


# --------------------------------------------------------------------------- primitives



def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, H*d) -> (B, H, T, d); H is inferred, so pruned layers with fewer heads just work."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d) -> (B, T, H*d)."""
    return x.transpose(1, 2).flatten(2)


def attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention written out (MatMul, Add, Softmax, MatMul), then out_proj.

    Spelled out rather than F.scaled_dot_product_attention so both exporters emit
    the plain pattern ORT's attention fusion and quantizer recognise.
    """
    scores = torch.matmul(q * attn.scaling, k.transpose(-1, -2))
    if bias is not None:
        scores = scores + bias
    return attn.out_proj(merge_heads(torch.matmul(scores.softmax(-1), v)))


def padding_bias(mask: torch.Tensor) -> torch.Tensor:
    """Additive key mask (B, S) of 1/0 -> (B, 1, 1, S) of 0/-inf-ish: [[1, 0]] -> [[[[0, -3.4e38]]]]."""
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def causal_bias(t: int | torch.SymInt) -> torch.Tensor:
    """(T, T) additive mask hiding future positions: t=2 -> [[0, -3.4e38], [0, 0]]."""
    full = torch.full((t, t), torch.finfo(torch.float32).min)
    return torch.triu(full, diagonal=1)


def embed(stack: nn.Module, input_ids: torch.Tensor, start: int | torch.SymInt = 0) -> torch.Tensor:
    """Scaled token embedding + sinusoidal positions start..start+T (Marian encoder and decoder)."""
    positions = torch.arange(input_ids.shape[1]) + start
    return stack.embed_tokens(input_ids) * stack.embed_scale + stack.embed_positions.weight[positions]


def project_kv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of x for one attention module, each (B, H, T, d)."""
    return split_heads(attn.k_proj(x), attn.head_dim), split_heads(attn.v_proj(x), attn.head_dim)


def feed_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Post-norm FFN block: LN(x + fc2(act(fc1(x))))."""
    return layer.final_layer_norm(x + layer.fc2(layer.activation_fn(layer.fc1(x))))


def encoder_layer(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    attn = layer.self_attn
    k, v = project_kv(attn, x)
    x = layer.self_attn_layer_norm(x + attend(attn, split_heads(attn.q_proj(x), attn.head_dim), k, v, bias))
    return feed_forward(layer, x)


def decoder_layer(layer: nn.Module, x: torch.Tensor, self_bias: torch.Tensor | None,
                  past: tuple[torch.Tensor, torch.Tensor] | None,
                  cross: tuple[torch.Tensor, torch.Tensor], cross_bias: torch.Tensor):
    """One post-norm Marian decoder layer over explicit caches -> (x, (present_k, present_v)).

    `past` holds the self-attention K/V of earlier positions (None on the first
    step); the new positions' K/V are appended, so `present` covers all of them.
    """
    attn = layer.self_attn
    k, v = project_kv(attn, x)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    x = layer.self_attn_layer_norm(x + attend(attn, split_heads(attn.q_proj(x), attn.head_dim), k, v, self_bias))
    cross_attn = layer.encoder_attn
    q = split_heads(cross_attn.q_proj(x), cross_attn.head_dim)
    x = layer.encoder_attn_layer_norm(x + attend(cross_attn, q, cross[0], cross[1], cross_bias))
    return feed_forward(layer, x), (k, v)


def last_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> logits (B, V) of the last position, with Marian's final_logits_bias."""
    return model.lm_head(hidden[:, -1]) + model.final_logits_bias[0]


# --------------------------------------------------------------------------- graph modules


class EncoderGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        encoder = self.model.model.encoder
        x, bias = embed(encoder, input_ids), padding_bias(attention_mask)
        for layer in encoder.layers:
            x = encoder_layer(layer, x, bias)
        return x


class DecoderGraph(nn.Module):
    """First step: the whole (short) prefix, no past; also returns cross-attention K/V for reuse."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, encoder_attention_mask, encoder_hidden_states):
        decoder = self.model.model.decoder
        x = embed(decoder, input_ids)
        self_bias, cross_bias = causal_bias(input_ids.shape[1]), padding_bias(encoder_attention_mask)
        presents, crosses = [], []
        for layer in decoder.layers:
            cross = project_kv(layer.encoder_attn, encoder_hidden_states)
            x, present = decoder_layer(layer, x, self_bias, None, cross, cross_bias)
            presents += present
            crosses += cross
        return (last_logits(self.model, x), *presents, *crosses)


class DecoderWithPastGraph(nn.Module):
    """One new token; past self-attention K/V and cross K/V come in as flat tensors, per layer k, v."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, encoder_attention_mask, *cache):
        decoder = self.model.model.decoder
        n = len(decoder.layers)
        past, cross = cache[: 2 * n], cache[2 * n:]
        x = embed(decoder, input_ids, start=past[0].shape[2])
        cross_bias = padding_bias(encoder_attention_mask)
        presents = []
        for i, layer in enumerate(decoder.layers):
            # one query attends to every earlier position: no causal mask needed
            x, present = decoder_layer(layer, x, None, past[2 * i: 2 * i + 2],
                                       cross[2 * i: 2 * i + 2], cross_bias)
            presents += present
        return (last_logits(self.model, x), *presents)


class DecoderRowsGraph(nn.Module):
    """One new token per row, each row at its own position over a left-padded cache (continuous batching).

    positions (B,) is each row's position; self_mask (B, P) marks the real entries of the past (the new
    token is always real). With every row at position P and no padding it computes what
    DecoderWithPastGraph computes.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions, self_mask, encoder_attention_mask, *cache):
        decoder = self.model.model.decoder
        n = len(decoder.layers)
        past, cross = cache[: 2 * n], cache[2 * n:]
        x = decoder.embed_tokens(input_ids) * decoder.embed_scale + decoder.embed_positions.weight[positions][:, None]
        mask = torch.cat([self_mask, torch.ones_like(self_mask[:, :1])], dim=1)
        self_bias, cross_bias = padding_bias(mask), padding_bias(encoder_attention_mask)
        presents = []
        for i, layer in enumerate(decoder.layers):
            x, present = decoder_layer(layer, x, self_bias, past[2 * i: 2 * i + 2], cross[2 * i: 2 * i + 2], cross_bias)
            presents += present
        return (last_logits(self.model, x), *presents)


GRAPH_MODULES = {"encoder": EncoderGraph, "decoder": DecoderGraph, "decoder_with_past": DecoderWithPastGraph,
                 "decoder_rows": DecoderRowsGraph}


# --------------------------------------------------------------------------- names, shapes, examples


def kv_names(prefix: str, n_layers: int) -> list[str]:
    """kv_names("past", 2) -> [past_key_self_0, past_value_self_0, past_key_self_1, past_value_self_1]."""
    return [f"{prefix}_{kind}_self_{i}" for i in range(n_layers) for kind in ("key", "value")]


def cross_names(n_layers: int) -> list[str]:
    return [f"cross_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def io_names(graph: str, n_layers: int) -> tuple[list[str], list[str]]:
    """Ordered input and output names of one graph."""
    if graph == "encoder":
        return ["input_ids", "attention_mask"], ["encoder_hidden_states"]
    if graph == "decoder":
        return (["input_ids", "encoder_attention_mask", "encoder_hidden_states"],
                ["logits", *kv_names("present", n_layers), *cross_names(n_layers)])
    if graph == "decoder_with_past":
        return (["input_ids", "encoder_attention_mask", *kv_names("past", n_layers), *cross_names(n_layers)],
                ["logits", *kv_names("present", n_layers)])
    if graph == "decoder_rows":
        return (["input_ids", "positions", "self_mask", "encoder_attention_mask", *kv_names("past", n_layers),
                 *cross_names(n_layers)], ["logits", *kv_names("present", n_layers)])
    raise ValueError(f"unknown graph {graph!r}; known: {GRAPHS}")


def dynamic_axes(graph: str, n_layers: int) -> dict[str, dict[int, str]]:
    """Axis names per tensor (legacy exporter's form; the dynamo form is derived from it)."""
    inputs, outputs = io_names(graph, n_layers)
    axes = {"input_ids": {0: "batch", 1: "source" if graph == "encoder" else "target"},
            "attention_mask": {0: "batch", 1: "source"}, "encoder_attention_mask": {0: "batch", 1: "source"},
            "encoder_hidden_states": {0: "batch", 1: "source"}, "logits": {0: "batch"}}
    if graph in ("decoder_with_past", "decoder_rows"):
        axes["input_ids"] = {0: "batch"}  # exactly one new token
        axes["positions"], axes["self_mask"] = {0: "batch"}, {0: "batch", 1: "past"}
    for name in inputs + outputs:
        if name.startswith("cross_"):
            axes[name] = {0: "batch", 2: "source"}
        elif name.startswith("past_"):
            axes[name] = {0: "batch", 2: "past"}
        elif name.startswith("present_"):
            axes[name] = {0: "batch", 2: "target" if graph == "decoder" else "past+1"}
    return {name: axes[name] for name in inputs + outputs}


def model_shape(model: nn.Module) -> dict:
    """What a runtime needs to know about the model, e.g. heads per decoder layer for empty caches."""
    cfg, decoder = model.config, model.model.decoder
    return {"decoder_layers": len(decoder.layers), "encoder_layers": len(model.model.encoder.layers),
            "heads": [_heads(layer.self_attn) for layer in decoder.layers],
            "cross_heads": [_heads(layer.encoder_attn) for layer in decoder.layers],
            "head_dim": decoder.layers[0].self_attn.head_dim, "d_model": cfg.d_model,
            "vocab_size": model.lm_head.out_features, "start_id": cfg.decoder_start_token_id,
            "eos_id": cfg.eos_token_id, "pad_id": cfg.pad_token_id,
            "max_positions": cfg.max_position_embeddings}


def _heads(attn: nn.Module) -> int:
    """Heads of one attention module, from its weights (pruning leaves num_heads attributes behind)."""
    return attn.k_proj.out_features // attn.head_dim


def example_inputs(graph: str, model: nn.Module, batch: int = 2, source: int = 5, past: int = 3,
                   target: int = 2, pad_last: int = 0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random, valid inputs for one graph; `pad_last` masks the last source positions of row 0.

    Defaults are the export example (sizes >= 2, so no dimension is specialised to 0 or 1);
    parity runs other sizes.
    """
    g = torch.Generator().manual_seed(seed)
    shape = model_shape(model)
    vocab, d, hd = shape["vocab_size"], shape["d_model"], shape["head_dim"]
    mask = torch.ones(batch, source, dtype=torch.long)
    if pad_last:
        mask[0, source - pad_last:] = 0
    if graph == "encoder":
        ids = torch.randint(0, vocab, (batch, source), generator=g)
        return ids.masked_fill(mask == 0, shape["pad_id"]), mask
    if graph == "decoder":
        ids = torch.randint(0, vocab, (batch, target), generator=g)
        ids[:, 0] = shape["start_id"]
        return ids, mask, torch.randn(batch, source, d, generator=g)

    def kv(h: int, t: int) -> torch.Tensor:
        return torch.randn(batch, h, t, hd, generator=g)

    ids = torch.randint(0, vocab, (batch, 1), generator=g)
    pasts = [kv(h, past) for h in shape["heads"] for _ in range(2)]
    crosses = [kv(h, source) for h in shape["cross_heads"] for _ in range(2)]
    if graph == "decoder_rows":  # row 0 at the last position, row 1 two positions in (left padding)
        positions = torch.full((batch,), past, dtype=torch.long)
        self_mask = torch.ones(batch, past, dtype=torch.long)
        if batch > 1 and past > 2:
            positions[1] = 2
            self_mask[1, : past - 2] = 0
        return (ids, positions, self_mask, mask, *pasts, *crosses)
    return (ids, mask, *pasts, *crosses)


# --------------------------------------------------------------------------- export


def _dynamo_shapes(graph: str, n_layers: int) -> tuple:
    """dynamic_axes -> dynamo's per-input Dim spec (shared Dim objects tie equal axes)."""
    from torch.export import Dim

    dims: dict[str, Dim] = {}
    inputs, _ = io_names(graph, n_layers)
    axes = dynamic_axes(graph, n_layers)
    spec = []
    for name in inputs:
        spec.append({ax: dims.setdefault(label, Dim(label.replace("+", "_"), min=0, max=4096))
                     for ax, label in axes[name].items()})
    if graph == "decoder_with_past":  # *cache is one varargs tuple for torch.export
        return (spec[0], spec[1], tuple(spec[2:]))
    if graph == "decoder_rows":
        return (*spec[:4], tuple(spec[4:]))
    return tuple(spec)




def file_sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != SIDECAR}




# --------------------------------------------------------------------------- sidecar and derived copies


def write_sidecar(directory: Path, meta: dict) -> None:
    tmp = directory / f".{SIDECAR}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, directory / SIDECAR)


def read_sidecar(directory: Path | str) -> dict:
    """The sidecar of an export directory, validated: schema, files present with recorded sizes."""
    directory = Path(directory)
    path = directory / SIDECAR
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a labkit ONNX directory: {SIDECAR} is missing "
                                "(create one with labkit.engines.onnx_export.export or ensure_onnx)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is corrupt: {exc}") from None
    if meta.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {meta.get('schema')!r}, expected {SCHEMA!r}")
    for name, size in meta.get("file_bytes", {}).items():
        f = directory / name
        if not f.exists():
            raise FileNotFoundError(f"{f} is missing (listed in {SIDECAR}); re-export the directory")
        if f.stat().st_size != size:
            raise ValueError(f"{f} has {f.stat().st_size} bytes, {SIDECAR} says {size}: "
                             "truncated or replaced; re-export the directory")
    return meta




def size_mb(directory: Path | str) -> float:
    """Bytes of every graph and external-data file of an export directory, in MiB."""
    return sum(read_sidecar(directory)["file_bytes"].values()) / 2**20
