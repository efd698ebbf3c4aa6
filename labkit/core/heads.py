"""Attention-head structure of a Marian model: which heads exist, plans, gates, structural removal.

    plan = {"decoder_self": {2: [4, 5]}}            # 0-based layers and heads of the unpruned model
    with gated(model, plan): ...                      # those heads contribute nothing (the oracle)
    prune_heads(model, plan)                          # q/k/v rows and out_proj columns removed
    load_pruned(path, plan)                           # rebuild, re-prune, load weights

Removing a head deletes its rows of q/k/v and its columns of out_proj
(`transformers.pytorch_utils.prune_linear_layer`) and lowers `num_heads`; it equals gating
that head to zero exactly. Removed heads are remembered per module in `pruned_heads`
(original indices), so plans compose and re-applying one is a no-op. A pruned bundle stores
its plan in `meta["head_plan"]`; `load_pruned` rebuilds from config, re-prunes and loads the
safetensors (from_pretrained refuses the changed shapes).

Left out: deciding which heads to remove (labkit.compress.prune) and removing all heads of a
module (every module keeps at least one head).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

ATTENTION_KINDS = ("encoder_self", "decoder_self", "cross")


# --------------------------------------------------------------------------- modules and plans


def attention_modules(model) -> dict[str, list[torch.nn.Module]]:
    """The MarianAttention modules of each kind, in layer order."""
    enc, dec = model.model.encoder, model.model.decoder
    return {"encoder_self": [layer.self_attn for layer in enc.layers],
            "decoder_self": [layer.self_attn for layer in dec.layers],
            "cross": [layer.encoder_attn for layer in dec.layers]}


def original_heads(model, kind: str) -> int:
    """Heads per module of `kind` before any pruning (from the config)."""
    cfg = model.config
    return cfg.encoder_attention_heads if kind == "encoder_self" else cfg.decoder_attention_heads


def kept_heads(attn, n_heads: int) -> list[int]:
    """Original indices of the heads a module still has: pruned_heads {1, 3} of 4 -> [0, 2]."""
    gone = getattr(attn, "pruned_heads", set())
    return [h for h in range(n_heads) if h not in gone]


def head_counts(model) -> dict[str, list[int]]:
    """Live heads per layer: {"encoder_self": [8, 8, ...], ...}."""
    return {kind: [attn.num_heads for attn in mods] for kind, mods in attention_modules(model).items()}


def total_heads(model, kinds=ATTENTION_KINDS) -> int:
    """Heads of the unpruned model in `kinds` (teacher: 6 layers x 8 heads x 3 kinds = 144)."""
    mods = attention_modules(model)
    return sum(len(mods[k]) * original_heads(model, k) for k in kinds)


def normalize_plan(plan: dict | None) -> dict[str, dict[int, list[int]]]:
    """Int layers, sorted unique heads, no empty entries: {"cross": {"1": [2, 0, 2]}} -> {"cross": {1: [0, 2]}}."""
    plan = plan or {}
    unknown = set(plan) - set(ATTENTION_KINDS)
    if unknown:
        raise ValueError(f"unknown attention kind(s) {sorted(unknown)} in head plan; known: {ATTENTION_KINDS}")
    out: dict[str, dict[int, list[int]]] = {}
    for kind in ATTENTION_KINDS:  # canonical order, so equal plans compare and print equal
        cleaned = {int(l): sorted({int(h) for h in heads}) for l, heads in plan.get(kind, {}).items() if heads}
        if cleaned:
            out[kind] = dict(sorted(cleaned.items()))
    return out


def plan_json(plan: dict | None) -> dict[str, dict[str, list[int]]]:
    """The plan as JSON writes it (string layer keys, every kind present)."""
    norm = normalize_plan(plan)
    return {kind: {str(layer): heads for layer, heads in norm.get(kind, {}).items()} for kind in ATTENTION_KINDS}


def merge_plans(a: dict | None, b: dict | None) -> dict[str, dict[int, list[int]]]:
    """Union of two plans: {"cross": {0: [1]}} + {"cross": {0: [2]}} -> {"cross": {0: [1, 2]}}."""
    out = {k: {l: list(h) for l, h in layers.items()} for k, layers in normalize_plan(a).items()}
    for kind, layers in normalize_plan(b).items():
        for layer, heads in layers.items():
            out.setdefault(kind, {}).setdefault(layer, []).extend(heads)
    return normalize_plan(out)


def plan_size(plan: dict | None) -> int:
    """Number of heads a plan removes."""
    return sum(len(h) for layers in normalize_plan(plan).values() for h in layers.values())


def model_plan(model) -> dict[str, dict[int, list[int]]]:
    """What has been structurally removed from `model` so far (empty for an unpruned model)."""
    return normalize_plan({kind: {i: sorted(getattr(attn, "pruned_heads", ())) for i, attn in enumerate(mods)}
                           for kind, mods in attention_modules(model).items()})


def check_plan(model, plan: dict) -> dict[str, dict[int, list[int]]]:
    """Normalized plan, or ValueError for a layer/head out of range or a module left headless."""
    mods, norm = attention_modules(model), normalize_plan(plan)
    for kind, layers in merge_plans(norm, model_plan(model)).items():
        n = original_heads(model, kind)
        for layer, heads in layers.items():
            if not 0 <= layer < len(mods[kind]):
                raise ValueError(f"{kind} layer {layer} out of range (0..{len(mods[kind]) - 1})")
            if heads[0] < 0 or heads[-1] >= n:
                raise ValueError(f"{kind} layer {layer}: heads {heads} out of range (0..{n - 1})")
            if len(heads) >= n:
                raise ValueError(f"{kind} layer {layer}: the plan removes all {n} heads; "
                                 "every attention module keeps at least one")
    return norm


# --------------------------------------------------------------------------- gates


def gate_values(model, plan: dict | None = None) -> dict[str, torch.Tensor]:
    """Gate tensors (layers, original heads): 1, and 0 where `plan` or earlier pruning removed a head."""
    mods = attention_modules(model)
    values = {k: torch.ones(len(mods[k]), original_heads(model, k)) for k in ATTENTION_KINDS}
    for kind, layers in merge_plans(plan, model_plan(model)).items():
        for layer, heads in layers.items():
            values[kind][layer, heads] = 0.0
    return values


def _gate_input(gates: torch.Tensor, layer: int, kept: torch.Tensor, module, args):
    """Forward pre-hook on out_proj: (..., heads*head_dim) input scaled head by head."""
    x = args[0]
    g = gates[layer, kept].to(x.dtype)
    return ((x.unflatten(-1, (len(kept), -1)) * g[:, None]).flatten(-2), *args[1:])


class HeadGates:
    """Context manager multiplying each head's output by `values[kind][layer, head]`.

        with HeadGates(model, gate_values(model, plan)):   # those heads contribute nothing
            logits = model(...).logits

    `values` may require grad: the gradient w.r.t. a gate is the head importance.
    Works on pruned models too (a removed head has no output to gate).
    """

    def __init__(self, model, values: dict[str, torch.Tensor] | None = None):
        self.model = model
        self.values = values if values is not None else gate_values(model)
        self._handles: list = []

    def __enter__(self) -> HeadGates:
        for kind, mods in attention_modules(self.model).items():
            n = original_heads(self.model, kind)
            for layer, attn in enumerate(mods):
                kept = torch.tensor(kept_heads(attn, n))
                hook = partial(_gate_input, self.values[kind], layer, kept)
                self._handles.append(attn.out_proj.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def gated(model, plan: dict) -> HeadGates:
    """The heads of `plan` gated to zero (the masked oracle a pruned model must equal)."""
    return HeadGates(model, gate_values(model, check_plan(model, plan)))




# --------------------------------------------------------------------------- structural pruning


def prune_attention(attn, heads, n_heads: int) -> None:
    """Remove `heads` (original indices) from one MarianAttention, in place.

    q/k/v lose the heads' output rows, out_proj their input columns; a head that is
    already gone is skipped, so re-applying a plan changes nothing.
    """
    from transformers.pytorch_utils import prune_linear_layer

    done = getattr(attn, "pruned_heads", set())
    kept = kept_heads(attn, n_heads)
    new = set(heads) - done
    if not new:
        return
    if len(new) >= len(kept):
        raise ValueError(f"removing heads {sorted(new)} would leave the module with no head")
    keep = torch.tensor([i for i, h in enumerate(kept) if h not in new])
    index = (keep[:, None] * attn.head_dim + torch.arange(attn.head_dim)).flatten()
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attn, name, prune_linear_layer(getattr(attn, name), index, dim=0))
    attn.out_proj = prune_linear_layer(attn.out_proj, index, dim=1)
    attn.num_heads = len(keep)
    attn.pruned_heads = done | new


def prune_heads(model, plan: dict):
    """Physically remove the heads of `plan` from `model` (in place); returns the model."""
    mods = attention_modules(model)
    for kind, layers in check_plan(model, plan).items():
        for layer, heads in layers.items():
            prune_attention(mods[kind][layer], heads, original_heads(model, kind))
    return model



def load_pruned(path: Path | str, head_plan: dict):
    """Rebuild a pruned MarianMTModel from `path`: config (+ generation config) -> fresh model -> prune -> weights.

    Keys the checkpoint leaves out are the tied embeddings/LM head and the sinusoidal
    positions (recomputed at construction); anything else missing is an error.
    """
    from safetensors.torch import load_file
    from transformers import GenerationConfig, MarianConfig, MarianMTModel

    path = Path(path)
    model = MarianMTModel(MarianConfig.from_pretrained(path))
    if (path / "generation_config.json").exists():  # from_pretrained reads it; a rebuild must too (bad_words_ids)
        model.generation_config = GenerationConfig.from_pretrained(path)
    prune_heads(model, head_plan)
    state = load_file(path / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    derived = {"lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
               "model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"}
    if unexpected or set(missing) - derived:
        raise ValueError(f"{path}: checkpoint does not match the pruned model "
                         f"(missing {sorted(set(missing) - derived)}, unexpected {sorted(unexpected)})")
    model.tie_weights()
    return model.float().eval()
