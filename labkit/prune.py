"""Attention-head pruning: gradient importance (Michel et al. 2019), structural removal, sweeps.

    scores = head_importance(model, tokenizer, calibration_pairs(budget))  # {kind: (layers, heads)}
    plan = choose_heads(scores, 12, kinds=("decoder_self",))               # the 12 least important
    pruned = prune_bundle(teacher, plan)                                   # smaller, not masked
    pruned.save(path); load_bundle(path)                                   # re-prunes, then loads

Importance. Each head h of each attention module gets a gate xi_h that multiplies the
head's output before `out_proj` (a forward pre-hook, so the real Marian modules run
unchanged). I_h = sum over calibration batches of |dL/dxi_h| at xi = 1, L the token
cross-entropy, then divided by the L2 norm of its layer's scores, as in the paper and
its code (the absolute value is taken per batch, not per sentence, as that code does).
Encoder self-attention, decoder self-attention and cross-attention are scored
separately ("kinds"); after the per-layer normalisation they are comparable, so an
"overall" ranking mixes them. Iterative pruning recomputes importance after each
round with the removed heads gated to zero, which equals the pruned model exactly.

Structure. Removing a head deletes its rows of q/k/v and its columns of out_proj
(`transformers.pytorch_utils.prune_linear_layer`) and lowers `num_heads`. Marian's
forward infers the head count from shapes (`view(..., -1, head_dim)`), and every
decoder layer keeps its own KV-cache tensors, so layers may differ in head count and
`labkit.decode.TorchStepper` decodes them with its dynamic cache unchanged.
`embed_dim` stays the model width: it is the module's input/output size, which
pruning does not change. Removed heads are remembered per module in `pruned_heads`
(original indices), so plans compose and re-applying one is a no-op.

Plans are JSON-able: {"encoder_self": {layer: [heads]}, "decoder_self": {...},
"cross": {...}}, 0-based layers and heads of the *unpruned* model. A pruned bundle
stores its plan in `meta["head_plan"]`; `load_pruned` rebuilds from config, re-prunes
and loads the safetensors (from_pretrained refuses the changed shapes).

Fractions. `heads_removed_frac` is always a fraction of ALL the model's heads (the teacher
has 144), so points of different groups compare by cost; `group_frac` is the fraction of
the pruned group's own heads (half of the 48 cross-attention heads: group_frac 0.5,
heads_removed_frac 1/6). Variant names use the first: pruned-25pct, pruned-17pct-cross.

Left out on purpose: removing *all* heads of an attention module (every module keeps
at least one head; a headless module would need a different forward and a cache layer
that is never written), pruning FFN neurons or whole layers (labkit.distill removes
layers), and head masks at training time (recovery fine-tunes the pruned model).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

ATTENTION_KINDS = ("encoder_self", "decoder_self", "cross")
SHORT = {"encoder_self": "enc", "decoder_self": "dec", "cross": "cross"}  # variant-name prefixes
# Groups a sweep prunes: every kind together ("overall") and each kind alone.
GROUPS = {"overall": ATTENTION_KINDS, **{k: (k,) for k in ATTENTION_KINDS}}

# The hand-picked experiment of the lab's first version: decoder self-attention layers
# 3..6 lose heads 5..7 (1-based), written 0-based: 4 layers x 3 heads = 12 heads.
SEED_PLAN = {"decoder_self": {layer: [4, 5, 6] for layer in range(2, 6)}}


@dataclass(frozen=True)
class PruneBudget:
    calibration_sentences: int = 256  # training pairs whose loss gradients rank the heads
    calibration_batch: int = 16  # sentences per gradient; |grad| accumulates per batch
    fractions: tuple[float, ...] = (0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5)  # overall sweep points
    type_fractions: tuple[float, ...] = (0.25, 0.5)  # points when one attention kind is pruned alone
    iterative: bool = True  # recompute importance after each round (the paper); False = one-shot
    compare_one_shot: bool = True  # also score the one-shot ranking (BLEU only) for comparison
    eval_sentences: int | None = None  # test pairs scored per point; None = the preset's
    bench_sentences: int | None = None  # sentences per latency measurement; None = the preset's
    bench_repeats: int | None = None  # passes over them; None = the preset's
    finetune_steps: int = 0  # recovery fine-tune of one overall point, and of the cached bundle (0 = off)
    finetune_frac: float | None = None  # the overall sweep fraction fine-tuned; None = the most pruned
    finetune_batch: int = 32
    finetune_lr: float = 3e-4
    slider_sentences: int = 40  # test pairs the interactive slider scores per move
    slider_bench_sentences: int = 4  # sentences it times, 1 pass: a quick look, not a measurement
    seed: int = 0  # calibration sample


PRUNE_BUDGETS: dict[str, PruneBudget] = {
    # ~90 s on 2 cores for the whole notebook: fewer points, a smaller BLEU subset. 60 recovery
    # steps (~15 s, 1 thread) bring the 25 % point from ~7 BLEU below the teacher to within 0.5.
    "ci": PruneBudget(calibration_sentences=128, fractions=(0.0, 0.1, 0.25, 0.4, 0.5),
                      type_fractions=(0.25, 0.5), compare_one_shot=False, eval_sentences=100,
                      bench_sentences=8, bench_repeats=2, finetune_steps=60, finetune_frac=0.25,
                      slider_sentences=24),
    "workshop": PruneBudget(calibration_sentences=512, eval_sentences=None, finetune_steps=300),
    "opus-mt-zh-en": PruneBudget(calibration_sentences=128, calibration_batch=8,
                                 type_fractions=(0.5,), compare_one_shot=False, eval_sentences=200),
    # random weights: importance is meaningless, the sweep is about speed only
    "opus-mt-shape": PruneBudget(calibration_sentences=16, calibration_batch=8,
                                 fractions=(0.0, 0.25, 0.5), type_fractions=(), compare_one_shot=False,
                                 slider_sentences=0),
}


def budget_for(preset_name: str) -> PruneBudget:
    if preset_name not in PRUNE_BUDGETS:
        raise KeyError(f"no pruning budget for preset {preset_name!r}; known: {', '.join(PRUNE_BUDGETS)}")
    return PRUNE_BUDGETS[preset_name]


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

    def __enter__(self) -> "HeadGates":
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


# --------------------------------------------------------------------------- importance


def normalize_per_layer(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each layer's scores divided by their L2 norm: [[3, 4]] -> [[0.6, 0.8]]."""
    return {k: s / (s.norm(dim=-1, keepdim=True) + 1e-20) for k, s in scores.items()}


def head_importance(model, tokenizer, pairs, *, batch_size: int = 16, mask: dict | None = None,
                    normalize: bool = True) -> dict[str, torch.Tensor]:
    """Accumulated |dL/d gate| per head: {kind: tensor (layers, original heads)}, >= 0.

    Heads in `mask` (and heads already pruned) are gated to zero and score 0, so
    iterative pruning can rank the remaining heads of a partly pruned model.
    """
    from labkit.data import iter_batches
    from labkit.train import collate, encode_pairs, label_smoothed_ce

    values = gate_values(model, check_plan(model, mask or {}))
    live = {k: v > 0 for k, v in values.items()}
    for v in values.values():
        v.requires_grad_(True)
    total = {k: torch.zeros_like(v) for k, v in values.items()}
    was_training = model.training
    model.eval()  # no dropout: the gradient should describe the model that will translate
    try:
        with HeadGates(model, values):
            for chunk in iter_batches(encode_pairs(tokenizer, pairs), batch_size):
                batch = collate(chunk, tokenizer.pad_token_id)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               labels=batch["labels"]).logits
                loss = label_smoothed_ce(logits, batch["labels"], 0.0)
                # grad w.r.t. the gates only: no weight gradients are computed or stored
                for kind, g in zip(values, torch.autograd.grad(loss, list(values.values()))):
                    total[kind] += g.abs()
    finally:
        model.train(was_training)
    scores = {k: torch.where(live[k], total[k], 0.0) for k in total}
    return normalize_per_layer(scores) if normalize else scores


def ranking(scores: dict[str, torch.Tensor], kinds=ATTENTION_KINDS) -> list[tuple[str, int, int]]:
    """(kind, layer, head) from least to most important; ties break by kind, layer, head order."""
    items = [(float(s[l, h]), ATTENTION_KINDS.index(kind), l, h, kind)
             for kind in kinds for s in [scores[kind]] for l in range(s.shape[0]) for h in range(s.shape[1])]
    return [(kind, l, h) for _, _, l, h, kind in sorted(items)]


def choose_heads(scores: dict[str, torch.Tensor], n: int, kinds=ATTENTION_KINDS, plan: dict | None = None,
                 min_heads: int = 1) -> dict[str, dict[int, list[int]]]:
    """`plan` plus the `n` least important heads not in it, each module keeping >= `min_heads`.

    Raises ValueError when fewer than `n` heads can go.
    """
    plan = normalize_plan(plan)
    removed = {(k, l): len(h) for k, layers in plan.items() for l, h in layers.items()}
    taken = {(k, l, h) for k, layers in plan.items() for l, hs in layers.items() for h in hs}
    extra: dict[str, dict[int, list[int]]] = {}
    for kind, layer, head in ranking(scores, kinds):
        if n <= 0:
            break
        width = scores[kind].shape[1]
        if (kind, layer, head) in taken or width - removed.get((kind, layer), 0) <= min_heads:
            continue
        extra.setdefault(kind, {}).setdefault(layer, []).append(head)
        removed[(kind, layer)] = removed.get((kind, layer), 0) + 1
        n -= 1
    if n > 0:
        raise ValueError(f"{n} more heads requested than can be removed with {min_heads} kept per module")
    return merge_plans(plan, extra)


def prune_schedule(model, tokenizer, pairs, fractions, kinds=ATTENTION_KINDS, *, batch_size: int = 16,
                   iterative: bool = True) -> dict[float, dict]:
    """{fraction: plan} removing that fraction of the heads in `kinds`, rounds in increasing order.

    Iterative: importance is recomputed before each round with the heads removed so far
    gated off (Michel et al. 2019, sec. 5); one-shot: ranked once on the unpruned model.
    Plans are nested: each round adds to the previous one.
    """
    total = total_heads(model, kinds)
    plan: dict = {}
    plans, scores = {}, None
    for frac in sorted(set(fractions)):
        need = round(frac * total) - plan_size(plan)
        if need > 0:
            if scores is None or iterative:
                scores = head_importance(model, tokenizer, pairs, batch_size=batch_size, mask=plan)
            plan = choose_heads(scores, need, kinds, plan)
        plans[frac] = plan
    return plans


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


def prune_bundle(bundle, plan: dict, name: str | None = None):
    """A pruned copy of `bundle` whose sidecar records the plan (the original is untouched)."""
    from labkit.models import Bundle

    model = prune_heads(copy.deepcopy(bundle.model), plan)
    full = merge_plans(plan, model_plan(bundle.model))
    frac = plan_size(full) / total_heads(model)
    meta = {"name": name or variant_name("overall", frac), "derived_from": bundle.name,
            "technique": "head pruning (Michel et al. 2019 gradient importance)",
            "head_plan": plan_json(full), "heads_removed": plan_size(full),
            "heads_removed_frac": round(frac, 4)}
    return Bundle(model.eval(), bundle.tokenizer, meta)


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


# --------------------------------------------------------------------------- measuring


def calibration_pairs(budget: PruneBudget):
    """A seeded random sample of the training split (the paper scores heads on training data)."""
    from labkit.data import load_split

    pairs = load_split("train")
    return random.Random(budget.seed).sample(pairs, min(budget.calibration_sentences, len(pairs)))


def bench_preset(preset, budget: PruneBudget):
    """The preset with the pruning budget's bench sizes (every point, teacher included, uses it)."""
    return preset.with_(bench_sentences=budget.bench_sentences or preset.bench_sentences,
                        bench_repeats=budget.bench_repeats or preset.bench_repeats)


def eval_data(preset, budget: PruneBudget):
    """(test pairs for BLEU, sentences for latency) of this preset and budget."""
    from labkit.data import load_split

    n = budget.eval_sentences if budget.eval_sentences is not None else preset.eval_sentences
    pairs = load_split("test", limit=n) if preset.quality and n != 0 else []
    texts = [p.zh for p in load_split("test", limit=bench_preset(preset, budget).bench_sentences)]
    return pairs, texts


def measure_point(bundle, preset, pairs, texts, timed: bool = True) -> dict:
    """BLEU/chrF on `pairs` (skipped when empty) and batch-1 latency on `texts` of one model."""
    from labkit import bench
    from labkit.evaluate import evaluate, latency
    from labkit.pipeline import translator_for

    translator = translator_for(bundle, preset)
    out = {"params": bundle.params, "size_mb": round(bundle.size_mb, 3), "bleu": None, "chrf": None}
    if pairs:
        scores, _ = evaluate(translator, pairs, batch_size=preset.batch_size)
        out |= scores.as_metrics()
    if timed:
        threads = torch.get_num_threads()
        m = latency(translator, texts, preset, label=bundle.name)
        torch.set_num_threads(threads)  # latency pins preset.threads; scoring keeps the caller's
        out |= {"latency_ms": bench.as_latency(m), "latency_q1": bench.percentile(m.times_ms, 0.25),
                "latency_q3": bench.percentile(m.times_ms, 0.75), "noisy": m.noisy}
    return out


def parity_gate(teacher, pruned, plan: dict, texts: list[str], atol: float = 1e-5) -> dict:
    """Ledger gate: `pruned` must equal `teacher` with the same heads gated to zero.

    Compares teacher-forced logits along the masked model's greedy output and the greedy
    tokens themselves (dynamic KV cache) on `texts`.
    """
    from labkit.decode import DecodeConfig, TorchStepper, greedy

    enc = teacher.tokenizer(texts, return_tensors="pt", padding=True)
    cfg, start = DecodeConfig(max_new_tokens=32), teacher.model.config.decoder_start_token_id
    with gated(teacher.model, plan):
        ref_ids = greedy(TorchStepper(teacher.model), enc["input_ids"], enc["attention_mask"], cfg)
        width = 1 + max(map(len, ref_ids))
        dec = torch.tensor([[start, *ids] + [start] * (width - 1 - len(ids)) for ids in ref_ids])
        with torch.inference_mode():
            ref = teacher.model(**enc, decoder_input_ids=dec).logits
    with torch.inference_mode():
        diff = float((pruned.model(**enc, decoder_input_ids=dec).logits - ref).abs().max())
    same = greedy(TorchStepper(pruned.model), enc["input_ids"], enc["attention_mask"], cfg) == ref_ids
    return {"name": "pruned-equals-masked", "passed": bool(diff <= atol and same),
            "detail": f"max |logit diff| {diff:.1e} (tolerance {atol:g}) and greedy tokens "
                      f"{'identical' if same else 'DIFFERENT'} vs the teacher with the same heads gated "
                      f"to zero, on {len(texts)} sentences"}


def variant_name(group: str, frac: float, finetuned: bool = False) -> str:
    """Ledger variant of a point; `frac` is of ALL heads, the suffix names the group that lost them.

    ("overall", 0.25) -> pruned-25pct; ("cross", 24 / 144) -> pruned-17pct-cross;
    ("overall", 0.25, finetuned=True) -> pruned-25pct-ft (the recovered point is a different model).
    """
    pct = round(100 * frac)
    name = f"pruned-{pct}pct" if group == "overall" else f"pruned-{pct}pct-{SHORT[group]}"
    return name + ("-ft" if finetuned else "")


def _row(group: str, method: str, frac: float, plan: dict, model_heads: int, group_heads: int,
         metrics: dict) -> dict:
    """One results row. `target_frac` is the sweep's target, a fraction of the group's heads."""
    n = plan_size(plan)
    return {"group": group, "method": method, "target_frac": frac, "heads_removed": n,
            "heads_total": model_heads, "heads_removed_frac": n / model_heads,
            "group_heads": group_heads, "group_frac": n / group_heads, "plan": plan_json(plan),
            "variant": variant_name(group, n / model_heads), "parent": "teacher", **metrics}


def sweep(teacher, preset, budget: PruneBudget, groups: dict | None = None, progress: bool = True):
    """Prune `teacher` along importance order; one DataFrame row per (group, method, fraction).

    The teacher is measured once, first, with the same texts and repeats (its rows have
    0 heads removed in every group); `speedup` = teacher p50 / point p50. One-shot rows
    (budget.compare_one_shot) carry BLEU only. The fractions of a per-kind group are of
    that kind's heads (`group_frac`); `heads_removed_frac` is of all heads.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    groups = groups or {g: k for g, k in GROUPS.items() if g == "overall" or budget.type_fractions}
    bp, calib = bench_preset(preset, budget), calibration_pairs(budget)
    pairs, texts = eval_data(preset, budget)
    base = measure_point(teacher, bp, pairs, texts)
    methods = [("iterative", budget.iterative, True)]
    if budget.compare_one_shot and budget.iterative:
        methods.append(("one-shot", False, False))
    model_heads, rows = total_heads(teacher.model), []
    for group, kinds in groups.items():
        group_heads = total_heads(teacher.model, kinds)
        fracs = budget.fractions if group == "overall" else (0.0, *budget.type_fractions)
        for method, iterative, timed in methods:
            plans = prune_schedule(teacher.model, teacher.tokenizer, calib, fracs, kinds,
                                   batch_size=budget.calibration_batch, iterative=iterative)
            for frac, plan in tqdm(plans.items(), desc=f"{group} {method}", disable=not progress):
                name = variant_name(group, plan_size(plan) / model_heads)
                rows.append(_row(group, method, frac, plan, model_heads, group_heads,
                                 _measure_plan(teacher, plan, name, bp, pairs, texts, timed) if plan else base))
    return with_speedup(pd.DataFrame(rows))


def _measure_plan(teacher, plan, name, preset, pairs, texts, timed=True) -> dict:
    """Prune, check against the masked teacher (the gate), then score and time."""
    pruned = prune_bundle(teacher, plan, name)
    gate = parity_gate(teacher, pruned, plan, texts)
    return {**measure_point(pruned, preset, pairs, texts, timed), "gate": gate}


def with_speedup(results):
    """Adds `speedup` = teacher p50 / point p50 (the teacher: the row with 0 heads removed)."""
    p50 = results["latency_ms"].map(lambda l: l["p50"] if isinstance(l, dict) else float("nan"))
    teacher = p50[results["heads_removed"] == 0]
    results["speedup"] = (teacher.iloc[0] / p50) if len(teacher) else float("nan")
    return results


def gate_passed(results):
    """Per row: False only where a gate ran and failed (the teacher's rows have no gate)."""
    if "gate" not in results:
        return results["heads_removed"].map(lambda _: True)
    return results["gate"].map(lambda g: not isinstance(g, dict) or bool(g["passed"]))


def compare_plans(teacher, preset, budget: PruneBudget, plans: dict[str, dict], scores=None):
    """Named plans measured side by side, e.g. a hand-picked choice vs the importance-guided one.

    The group is the one attention kind a plan touches ("overall" when it mixes kinds).
    With `scores`, `importance_removed` sums the (normalized) importance of the removed
    heads: the smaller, the less the choice should hurt.
    """
    import pandas as pd

    bp = bench_preset(preset, budget)
    pairs, texts = eval_data(preset, budget)
    model_heads, rows = total_heads(teacher.model), []
    for name, plan in plans.items():
        plan = check_plan(teacher.model, plan)
        group = next(iter(plan)) if len(plan) == 1 else "overall"
        group_heads = total_heads(teacher.model, GROUPS[group])
        row = _row(group, name, plan_size(plan) / group_heads, plan, model_heads, group_heads,
                   _measure_plan(teacher, plan, name, bp, pairs, texts))
        row["variant"] = name
        if scores is not None:
            row["importance_removed"] = sum(float(scores[k][l, h]) for k, layers in plan.items()
                                            for l, hs in layers.items() for h in hs)
        rows.append(row)
    return pd.DataFrame(rows)


def sweep_point(results, frac: float, group: str = "overall"):
    """The iterative sweep row of `group` at target fraction `frac`; KeyError when the sweep has none."""
    rows = results[(results["group"] == group) & (results["method"] == "iterative")
                   & (results["target_frac"] - frac).abs().lt(1e-9)]
    if rows.empty:
        raise KeyError(f"the sweep has no {group} point at {frac:g}; its fractions: "
                       f"{sorted(results.loc[results['group'] == group, 'target_frac'].unique())}")
    return rows.iloc[0]


def largest_safe(results, max_drop: float = 1.0, group: str = "overall",
                 methods: tuple[str, ...] = ("iterative", "iterative+finetune")) -> dict:
    """The most-pruned point of `group` whose BLEU is within `max_drop` of the teacher's.

    Points whose gate failed never qualify. `methods` picks the rows considered: by default the
    iterative sweep and any recovered (fine-tuned) point; on a tie the point without fine-tuning
    wins (it is the cheaper model to make). Returns {"heads_removed_frac" (of all heads),
    "variant", "method", "finetuned", "bleu", "teacher_bleu", "bleu_drop", "latency_ratio"
    (point p50 / teacher p50: < 1 is faster), "speedup"}; the teacher itself when nothing qualifies.
    """
    rows = results[(results["group"] == group) & results["method"].isin(methods) & gate_passed(results)]
    teacher = rows[rows["heads_removed"] == 0].iloc[0]
    if teacher["bleu"] is None or teacher["bleu"] != teacher["bleu"]:
        return {"heads_removed_frac": None, "variant": None, "reason": "BLEU is n/a for this preset"}
    ok = rows[teacher["bleu"] - rows["bleu"] <= max_drop].assign(finetuned=lambda r: r["method"] != "iterative")
    best = ok.sort_values(["heads_removed_frac", "finetuned"], ascending=[True, False]).iloc[-1]
    ratio = best["latency_ms"]["p50"] / teacher["latency_ms"]["p50"]
    return {"heads_removed_frac": float(best["heads_removed_frac"]), "variant": best["variant"],
            "method": best["method"], "finetuned": bool(best["finetuned"]),
            "bleu": float(best["bleu"]), "teacher_bleu": float(teacher["bleu"]),
            "bleu_drop": float(teacher["bleu"] - best["bleu"]), "latency_ratio": ratio, "speedup": 1 / ratio}


def recover(bundle, budget: PruneBudget, dev_sentences: int = 50, progress: bool = False) -> list[dict]:
    """Short recovery fine-tune of a pruned bundle in place (label-smoothed CE, labkit.train.fit).

    Renames the bundle "<name>-ft" and records steps, lr, history and wall time in its meta.
    """
    import time

    from labkit.data import load_split
    from labkit.train import fit

    start, steps = time.perf_counter(), budget.finetune_steps
    train = load_split("train")  # a seeded sample: each pair seen about once, no time tokenizing the rest
    train = random.Random(budget.seed + 1).sample(train, min(len(train), steps * budget.finetune_batch))
    history = fit(bundle.model, bundle.tokenizer, train, load_split("dev", limit=dev_sentences),
                  steps=steps, batch_size=budget.finetune_batch, lr=budget.finetune_lr,
                  warmup=max(1, steps // 10), eval_every=steps, seed=budget.seed, progress=progress)
    bundle.meta |= {"name": bundle.name + "-ft", "recovery_finetune": {
        "steps": steps, "batch_size": budget.finetune_batch, "lr": budget.finetune_lr, "history": history,
        "wall_time_s": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads()}}
    return history


def recovery(teacher, results, preset, budget: PruneBudget, progress: bool = False):
    """One overall sweep point, fine-tuned for budget.finetune_steps and measured again.

    The point is budget.finetune_frac (None: the most pruned). The fine-tuned bundle is the
    one `ensure_pruned` caches for later notebooks (built here if missing), so what is measured
    here is what they load. One row like the sweep's (method "iterative+finetune", variant
    "<point>-ft", parent the pruned point); empty when the budget has no fine-tune steps. The
    gate: BLEU must not fall below the pruned-only point's (recovery should only help).
    """
    import pandas as pd
    from labkit.models import load_bundle

    if not budget.finetune_steps:
        return pd.DataFrame()
    point = _recovery_point(results, budget)
    tuned = load_bundle(ensure_pruned(preset.name, point["target_frac"], teacher=teacher, budget=budget,
                                      progress=progress))
    if normalize_plan(tuned.meta["head_plan"]) != normalize_plan(point["plan"]):
        raise RuntimeError(f"the cached {tuned.name} does not have the sweep's plan for {point['variant']}")
    pairs, texts = eval_data(preset, budget)
    metrics = measure_point(tuned, bench_preset(preset, budget), pairs, texts)
    run = tuned.meta["recovery_finetune"]
    gained = None if metrics["bleu"] is None else metrics["bleu"] - point["bleu"]
    gate = {"name": "recovery-not-worse", "passed": bool(gained is None or gained >= 0),
            "detail": f"BLEU {point['bleu']} -> {metrics['bleu']} after {run['steps']} fine-tune steps"}
    row = _row("overall", "iterative+finetune", point["target_frac"], point["plan"], point["heads_total"],
               point["group_heads"], {**metrics, "gate": gate, "finetune_steps": run["steps"],
                                      "finetune_s": run["wall_time_s"], "history": run["history"]})
    teacher_p50 = results.loc[results["heads_removed"] == 0, "latency_ms"].iloc[0]["p50"]  # timed in the sweep
    return pd.DataFrame([row | {"variant": tuned.name, "parent": point["variant"],
                                "speedup": teacher_p50 / metrics["latency_ms"]["p50"]}])


def _recovery_point(results, budget: PruneBudget):
    if budget.finetune_frac is not None:
        return sweep_point(results, budget.finetune_frac)
    rows = results[(results["group"] == "overall") & (results["method"] == "iterative")]
    return rows.sort_values("heads_removed_frac").iloc[-1]


# --------------------------------------------------------------------------- handler


def ledger_records(results, notebook: str) -> list[dict]:
    """One `pruning` record per timed point (the 0 % point once: the teacher measured in this run).

    `results` may concatenate several frames (sweep, compare_plans, recovery); the teacher
    is the timed row with 0 heads removed. Extra keys: heads_removed_frac (of ALL heads),
    group_frac (of the pruned group's heads), heads_removed, heads_total, attention (the group),
    head_plan, teacher_latency_ms and speedup (teacher p50 / point p50, same run). The gate is
    the pruned-equals-masked check (recovery-not-worse for a fine-tuned point); a failed gate
    makes the record status "failed" with the gate's detail as reason (`ledger.make_record`). Each
    row names its parent: the teacher, or for a recovered point the pruned point it started from.
    """
    from labkit import ledger

    timed = results[results["latency_ms"].map(lambda l: isinstance(l, dict))]
    teacher = timed[timed["heads_removed"] == 0].iloc[0]["latency_ms"]
    records, seen = [], set()
    for _, row in timed.iterrows():
        variant = variant_name("overall", 0.0) if row["heads_removed"] == 0 else row["variant"]
        if variant in seen:
            continue
        seen.add(variant)
        metrics = {"bleu": ledger.json_number(row["bleu"]), "chrf": ledger.json_number(row["chrf"]),
                   "latency_ms": row["latency_ms"],
                   "params": int(row["params"]), "size_mb": float(row["size_mb"])}
        if isinstance(row.get("bleu_signature"), str):
            metrics["bleu_signature"] = row["bleu_signature"]
        extra = {"finetune_steps": int(row["finetune_steps"]), "finetune_s": ledger.json_number(row.get("finetune_s"))} \
            if ledger.json_number(row.get("finetune_steps")) else {}
        gate = row["gate"] if isinstance(row.get("gate"), dict) else None
        records.append(ledger.make_record(
            notebook=notebook, variant=variant, technique="pruning", backend="torch", precision="fp32",
            parent=row["parent"], metrics=metrics, gate=gate,
            heads_removed_frac=round(float(row["heads_removed_frac"]), 4),
            group_frac=round(float(row["group_frac"]), 4), heads_removed=int(row["heads_removed"]),
            heads_total=int(row["heads_total"]), attention=row["group"], head_plan=row["plan"],
            teacher_latency_ms=teacher, speedup=round(teacher["p50"] / row["latency_ms"]["p50"], 4), **extra))
    return records


def pruning_recipe(teacher, budget: PruneBudget, frac: float) -> dict:
    """What a cached pruned bundle depends on: the teacher's weights, the rounds, calibration, fine-tune."""
    from labkit.models import fingerprint, jsonable

    rounds = ([f for f in budget.fractions if f < frac] + [frac]) if budget.iterative else [frac]
    finetune = ({"steps": budget.finetune_steps, "batch": budget.finetune_batch, "lr": budget.finetune_lr}
                if budget.finetune_steps else None)
    return jsonable({"teacher": teacher.name, "teacher_fingerprint": fingerprint(teacher.model),
                     "fraction": frac, "rounds": rounds, "iterative": budget.iterative,
                     "calibration_sentences": budget.calibration_sentences,
                     "calibration_batch": budget.calibration_batch, "seed": budget.seed, "finetune": finetune})


def ensure_pruned(preset: str, frac: float = 0.25, *, teacher=None, budget: PruneBudget | None = None,
                  progress: bool = False) -> Path:
    """<artifacts>/<preset>/pruned-25pct: the teacher with `frac` of all heads removed; built if missing or stale.

    The rounds are the budget's sweep fractions up to `frac`, so the plan is the one the
    notebook's sweep measures at that point; with budget.finetune_steps the bundle is also
    fine-tuned to recover and cached under its own name (pruned-25pct-ft). The sidecar's
    `pruning.recipe` (teacher fingerprint, rounds, calibration, fine-tune) must match for a
    cached bundle to be reused, as labkit.distill.ensure_student does.
    """
    from labkit.artifacts import preset_dir, teacher_for
    from labkit.models import cached_recipe

    budget = budget or budget_for(preset)
    teacher = teacher if teacher is not None else teacher_for(preset)
    recipe = pruning_recipe(teacher, budget, frac)
    n = total_heads(teacher.model)
    name = variant_name("overall", round(frac * n) / n)  # the sweep point's name; recover() appends -ft
    path = preset_dir(preset) / (name + "-ft" if budget.finetune_steps else name)
    if cached_recipe(path, "pruning") == recipe:
        return path
    plan = prune_schedule(teacher.model, teacher.tokenizer, calibration_pairs(budget), recipe["rounds"],
                          batch_size=budget.calibration_batch, iterative=budget.iterative)[frac]
    bundle = prune_bundle(teacher, plan, name)
    bundle.meta |= {"preset": preset, "pruning": {"recipe": recipe}}
    if budget.finetune_steps:
        recover(bundle, budget, progress=progress)
    bundle.save(path)
    return path


def head_slider(teacher, preset, budget: PruneBudget, scores: dict[str, torch.Tensor]):
    """An ipywidgets slider: prune the k least important heads (one-shot ranking), show BLEU and latency.

    BLEU on budget.slider_sentences test pairs, latency on budget.slider_bench_sentences x 1
    pass (a quick look, not a measurement to report). The callback runs once when displayed,
    so a headless run shows the default point.
    """
    import ipywidgets as widgets
    from labkit.data import load_split

    bp = preset.with_(bench_sentences=budget.slider_bench_sentences, bench_repeats=1, bench_warmup=1)
    pairs = eval_data(preset, budget)[0][: budget.slider_sentences]
    texts = [p.zh for p in load_split("test", limit=bp.bench_sentences)]
    total = total_heads(teacher.model)
    most = total - sum(len(m) for m in attention_modules(teacher.model).values())

    def show(k: int) -> None:
        m = measure_point(prune_bundle(teacher, choose_heads(scores, k)), bp, pairs, texts)
        bleu = "n/a" if m["bleu"] is None else f"{m['bleu']:.1f}"
        print(f"{k}/{total} heads removed ({k / total:.0%}): BLEU {bleu} on {len(pairs)} sentences, "
              f"latency p50 {m['latency_ms']['p50']:.1f} ms on {len(texts)} sentences x {bp.bench_repeats} "
              f"pass, {m['params']:,} parameters")

    slider = widgets.IntSlider(value=round(0.25 * total), min=0, max=most, description="heads removed",
                               continuous_update=False, style={"description_width": "initial"})
    return widgets.VBox([slider, widgets.interactive_output(show, {"k": slider})])


# --------------------------------------------------------------------------- figures


def importance_figure(scores: dict[str, torch.Tensor]):
    """Layer x head heat maps of normalized importance, one per attention kind (plotly)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(scores), subplot_titles=[k.replace("_", " ") for k in scores],
                        horizontal_spacing=0.06)
    zmax = max(float(s.max()) for s in scores.values())
    for col, (kind, s) in enumerate(scores.items(), start=1):
        layers, heads = s.shape
        fig.add_trace(go.Heatmap(z=s.numpy(), x=[f"h{h + 1}" for h in range(heads)],
                                 y=[f"L{l + 1}" for l in range(layers)], zmin=0, zmax=zmax,
                                 coloraxis="coloraxis", hovertemplate="%{y} %{x}: %{z:.3f}<extra></extra>"),
                      row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title="Head importance |dL/d gate|, L2-normalized per layer", height=360,
                      coloraxis={"colorscale": "Viridis", "colorbar": {"title": "importance"}})
    return fig


SWEEP_PANELS = (("bleu", "BLEU"), ("chrf", "chrF"), ("latency", "latency p50 (ms, batch 1)"))


def _sweep_traces(rows, name: str, dash: str | None, mode: str = "lines+markers") -> dict:
    """{panel: Scatter} of one line; x is % of ALL heads, hover adds % of the group's heads."""
    import plotly.graph_objects as go

    style = dict(name=name, legendgroup=name, mode=mode, line={"dash": dash},
                 marker={"size": 10 if mode == "markers" else 6}, customdata=100 * rows["group_frac"],
                 hovertemplate="%{x:.0f} % of all heads (%{customdata:.0f} % of the group's): %{y:.2f}"
                               "<extra>" + name + "</extra>")
    x = 100 * rows["heads_removed_frac"]
    traces = {"bleu": go.Scatter(x=x, y=rows["bleu"], **style),
              "chrf": go.Scatter(x=x, y=rows["chrf"], showlegend=False, **style)}
    lat = rows[rows["latency_ms"].map(lambda l: isinstance(l, dict))]
    if len(lat):
        p50 = lat["latency_ms"].map(lambda l: l["p50"])
        traces["latency"] = go.Scatter(
            x=100 * lat["heads_removed_frac"], y=p50, showlegend=False,
            error_y={"type": "data", "symmetric": False, "array": lat["latency_q3"] - p50,
                     "arrayminus": p50 - lat["latency_q1"]}, **(style | {"customdata": 100 * lat["group_frac"]}))
    return traces


def sweep_figure(results, max_drop: float = 1.0):
    """BLEU, chrF and batch-1 latency (p50, IQR bars) vs % of ALL heads removed, one line per group/method.

    Per-kind groups end where their kind is exhausted (half of one kind's heads is 1/6 of all
    of them); a recovered (fine-tuned) point is a separate marker, not part of any line.
    """
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(SWEEP_PANELS), subplot_titles=[t for _, t in SWEEP_PANELS])
    for (group, method), rows in results.groupby(["group", "method"], sort=False):
        if method not in ("iterative", "one-shot", "iterative+finetune"):
            continue
        rows = rows.sort_values("heads_removed_frac")
        finetuned = method == "iterative+finetune"
        name = (group if method == "iterative" else f"{group} ({method})" if not finetuned
                else f"{group}, recovered ({int(rows['finetune_steps'].iloc[0])} fine-tune steps)")
        traces = _sweep_traces(rows, name, "dot" if method == "one-shot" else None,
                               "markers" if finetuned else "lines+markers")
        for col, (panel, _) in enumerate(SWEEP_PANELS, start=1):
            if panel in traces:
                fig.add_trace(traces[panel], row=1, col=col)
    teacher_bleu = results.loc[results["heads_removed"] == 0, "bleu"]
    if teacher_bleu.notna().any():
        fig.add_hline(y=float(teacher_bleu.iloc[0]) - max_drop, line_dash="dash", line_color="gray",
                      annotation_text=f"teacher - {max_drop:g} BLEU", row=1, col=1)
    fig.update_xaxes(title="% of all heads removed")
    fig.update_layout(title="Importance-ordered head pruning", height=420)
    return fig
