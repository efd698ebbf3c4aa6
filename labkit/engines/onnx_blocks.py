"""Which ONNX node belongs to which block of the Marian model, and the graph edits int8 needs first.

    blocks = node_blocks(onnx.load("decoder_model.onnx"))   # {node name: "cross-attn", ...}
    weight_nodes(model, ("ffn",))                           # the MatMuls whose weights are the FFN's
    untie_lm_head(model)                                    # the LM head gets its own MatMul weight

A block (`BLOCKS`) is matched on the PyTorch module path each exporter records for a node (the
dynamo exporter's `pkg.torch.onnx.name_scopes` metadata, or TorchScript's node names). Only weight
MatMuls (and the embedding Gather) belong to a block: attention-score MatMuls multiply two
activations. Left out: quantizing anything (labkit.engines.ort_int8 does).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

BLOCKS = ("encoder-self-attn", "decoder-self-attn", "cross-attn", "ffn", "lm-head", "embeddings")
# DESIGN: "Start with MatMul only; keep embeddings/LM head in float unless measured safe".
BODY_BLOCKS = ("encoder-self-attn", "decoder-self-attn", "cross-attn", "ffn")
SCOPE_KEY = "pkg.torch.onnx.name_scopes"  # the dynamo exporter's module path per node


# --------------------------------------------------------------------------- primitives: which node is what


def metadata_scope(node) -> str | None:
    """The module path the dynamo exporter records on a node, dot-joined (None if absent).

    "['', 'model.model.encoder.layers.0.fc1', 'linear_4']" -> ".model.model.encoder.layers.0.fc1.linear_4"
    """
    for prop in node.metadata_props:
        if prop.key == SCOPE_KEY:
            return ".".join(s.strip(" '\"") for s in prop.value.strip("[]").split(","))
    return None


def node_scopes(model) -> dict[str, str]:
    """Module path per node name: exporter metadata, else the Linear bias its output meets, else the name.

    TorchScript names nodes '/q_proj/MatMul' in both self- and cross-attention; the bias
    added to its output ('model.model.decoder.layers.1.encoder_attn.q_proj.bias') says which.
    """
    consts = _initializers(model)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    scopes = {}
    for node in model.graph.node:
        scope = metadata_scope(node)
        if scope is None:
            nearby = [i for c in consumers.get(node.output[0], []) for i in c.input]
            biases = [i for i in nearby if i in consts and i.endswith(".bias") and "norm" not in i]
            weights = [i for i in node.input if i in consts and i.endswith(".weight")]
            scope = (biases or weights or [node.name.replace("/", ".")])[0]
        scopes[node.name] = scope
    return scopes


def block_of(scope: str) -> str | None:
    """Which BLOCKS entry a module path belongs to (None: not a block weight).

    'model.model.decoder.layers.1.encoder_attn.q_proj' -> 'cross-attn'; '...fc2.bias' -> 'ffn';
    'model.model.shared.weight' (the tied embedding) -> 'embeddings'
    """
    if "lm_head" in scope:
        return "lm-head"
    if "embed_tokens" in scope or "shared" in scope:
        return "embeddings"
    if ".encoder_attn." in scope:
        return "cross-attn"
    if ".fc1" in scope or ".fc2" in scope:
        return "ffn"
    if ".self_attn." in scope:
        return "encoder-self-attn" if "encoder.layers." in scope else "decoder-self-attn"
    return None


def _initializers(model) -> set[str]:
    return {t.name for t in model.graph.initializer}


def node_blocks(model) -> dict[str, str]:
    """{node name: block} for the nodes holding weights: MatMul with a constant B, embedding Gather."""
    consts, scopes = _initializers(model), node_scopes(model)
    blocks = {}
    for node in model.graph.node:
        constant = (node.op_type == "MatMul" and node.input[1] in consts) or \
                   (node.op_type == "Gather" and node.input[0] in consts)
        block = block_of(scopes[node.name]) if constant else None
        if block is not None and (node.op_type == "MatMul") != (block == "embeddings"):
            blocks[node.name] = block  # a Gather is only ever an embedding lookup, a MatMul never
    return blocks


def weight_nodes(model, blocks: Iterable[str]) -> list[str]:
    """Names of the weight nodes of `blocks` in one graph, in graph order."""
    wanted = set(blocks)
    unknown = wanted - set(BLOCKS)
    if unknown:
        raise ValueError(f"unknown blocks {sorted(unknown)}; known: {BLOCKS}")
    return [name for name, block in node_blocks(model).items() if block in wanted]


def block_counts(model) -> dict[str, int]:
    """Weight nodes per block in one graph: {'ffn': 4, 'lm-head': 1, ...}."""
    found = list(node_blocks(model).values())
    return {b: found.count(b) for b in BLOCKS}


# --------------------------------------------------------------------------- primitives: graph edits


def untie_lm_head(model):
    """Gemm(x, W, transB=1) on a shared initializer W -> MatMul(x, W^T) on its own copy (+ Add C).

    The exporters fold the tied head into a Gemm over the embedding matrix; the dynamic
    quantizer has no Gemm kernel, and quantizing a shared matrix would change the embedding
    lookup too. Costs one more copy of the matrix in the fp32 file, a quarter of it in int8.
    """
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        simple = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or node.input[1] not in inits or not simple:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        name = f"{node.input[1]}.untied_t"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), name))
        has_bias = len(node.input) > 2 and node.input[2]
        out = node.output[0] + ("_matmul" if has_bias else "")
        matmul = helper.make_node("MatMul", [node.input[0], name], [out], name=node.name + "_matmul")
        matmul.metadata_props.extend(node.metadata_props)
        nodes.append(matmul)
        if has_bias:
            nodes.append(helper.make_node("Add", [out, node.input[2]], [node.output[0]], name=node.name + "_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def ort_optimize(src: Path, dst: Path, shape: dict) -> None:
    """ONNX Runtime's transformer optimizer for BART-like graphs (fuses Add+LayerNorm, ...)."""
    from onnxruntime.transformers.optimizer import optimize_model

    heads = shape["heads"]
    uniform = len(set(heads)) == 1  # pruned models: let the optimizer infer shapes per node
    opt = optimize_model(str(src), model_type="bart", num_heads=heads[0] if uniform else 0,
                         hidden_size=shape["d_model"] if uniform else 0, opt_level=0)
    opt.save_model_to_file(str(dst))


def _untie_file(src: Path, dst: Path) -> None:
    import onnx

    onnx.save(untie_lm_head(onnx.load(str(src))), str(dst))
