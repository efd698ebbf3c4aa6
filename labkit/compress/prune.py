"""Attention-head pruning: gradient importance (Michel et al. 2019), which heads go, the cached pruned bundle.

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

Structure (labkit.core.heads). Removing a head deletes its rows of q/k/v and its columns of
out_proj and equals gating it to zero; plans are JSON-able {kind: {layer: [heads]}} of the
*unpruned* model and a pruned bundle reloads from the plan in its sidecar. Notebook 02's sweep,
records, slider and figures are labkit.lab.nb02_pruning.

Fractions. `heads_removed_frac` is always a fraction of ALL the model's heads (the teacher
has 144), so points of different groups compare by cost; `group_frac` is the fraction of
the pruned group's own heads (half of the 48 cross-attention heads: group_frac 0.5,
heads_removed_frac 1/6). Variant names use the first: pruned-25pct, pruned-17pct-cross.

Left out on purpose: removing *all* heads of an attention module (every module keeps
at least one head; a headless module would need a different forward and a cache layer
that is never written), pruning FFN neurons or whole layers (labkit.compress.distill removes
layers), and head masks at training time (recovery fine-tunes the pruned model).
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import torch

from labkit.compress.training import collate, encode_pairs, fit, label_smoothed_ce
from labkit.config import Preset, PruneBudget
from labkit.core.artifacts import ensure, jsonable, preset_dir
from labkit.core.bundle import SIDECAR, Bundle, fingerprint
from labkit.core.data import iter_batches, load_split
from labkit.core.heads import (
    ATTENTION_KINDS,
    HeadGates,
    check_plan,
    gate_values,
    merge_plans,
    model_plan,
    normalize_plan,
    plan_json,
    plan_size,
    prune_heads,
    total_heads,
)
from labkit.measure.replay import measurement

SHORT = {"encoder_self": "enc", "decoder_self": "dec", "cross": "cross"}  # variant-name prefixes
# Groups a sweep prunes: every kind together ("overall") and each kind alone.
GROUPS = {"overall": ATTENTION_KINDS, **{k: (k,) for k in ATTENTION_KINDS}}

# The hand-picked experiment of the lab's first version: decoder self-attention layers
# 3..6 lose heads 5..7 (1-based), written 0-based: 4 layers x 3 heads = 12 heads.
SEED_PLAN = {"decoder_self": {layer: [4, 5, 6] for layer in range(2, 6)}}


# --------------------------------------------------------------------------- importance


def normalize_per_layer(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each layer's scores divided by their L2 norm: [[3, 4]] -> [[0.6, 0.8]]."""
    return {k: s / (s.norm(dim=-1, keepdim=True) + 1e-20) for k, s in scores.items()}


@measurement
def head_importance(model, tokenizer, pairs, *, batch_size: int = 16, mask: dict | None = None,
                    normalize: bool = True) -> dict[str, torch.Tensor]:
    """Accumulated |dL/d gate| per head: {kind: tensor (layers, original heads)}, >= 0.

    Heads in `mask` (and heads already pruned) are gated to zero and score 0, so
    iterative pruning can rank the remaining heads of a partly pruned model.
    """

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




def prune_bundle(bundle, plan: dict, name: str | None = None):
    """A pruned copy of `bundle` whose sidecar records the plan (the original is untouched)."""

    model = prune_heads(copy.deepcopy(bundle.model), plan)
    full = merge_plans(plan, model_plan(bundle.model))
    frac = plan_size(full) / total_heads(model)
    meta = {"name": name or variant_name("overall", frac), "derived_from": bundle.name,
            "technique": "head pruning (Michel et al. 2019 gradient importance)",
            "head_plan": plan_json(full), "heads_removed": plan_size(full),
            "heads_removed_frac": round(frac, 4)}
    return Bundle(model.eval(), bundle.tokenizer, meta)




# --------------------------------------------------------------------------- measuring


def calibration_pairs(budget: PruneBudget):
    """A seeded random sample of the training split (the paper scores heads on training data)."""

    pairs = load_split("train")
    return random.Random(budget.seed).sample(pairs, min(budget.calibration_sentences, len(pairs)))




def variant_name(group: str, frac: float, finetuned: bool = False) -> str:
    """Ledger variant of a point; `frac` is of ALL heads, the suffix names the group that lost them.

    ("overall", 0.25) -> pruned-25pct; ("cross", 24 / 144) -> pruned-17pct-cross;
    ("overall", 0.25, finetuned=True) -> pruned-25pct-ft (the recovered point is a different model).
    """
    pct = round(100 * frac)
    name = f"pruned-{pct}pct" if group == "overall" else f"pruned-{pct}pct-{SHORT[group]}"
    return name + ("-ft" if finetuned else "")



def recover(bundle, budget: PruneBudget, dev_sentences: int = 50, progress: bool = False) -> list[dict]:
    """Short recovery fine-tune of a pruned bundle in place (label-smoothed CE, labkit.compress.training.fit).

    Renames the bundle "<name>-ft" and records steps, lr, history and wall time in its meta.
    """
    import time


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




def pruning_recipe(teacher, budget: PruneBudget, frac: float) -> dict:
    """What a cached pruned bundle depends on: the teacher's weights, the rounds, calibration, fine-tune."""

    rounds = ([f for f in budget.fractions if f < frac] + [frac]) if budget.iterative else [frac]
    finetune = ({"steps": budget.finetune_steps, "batch": budget.finetune_batch, "lr": budget.finetune_lr}
                if budget.finetune_steps else None)
    return jsonable({"teacher": teacher.name, "teacher_fingerprint": fingerprint(teacher.model),
                     "fraction": frac, "rounds": rounds, "iterative": budget.iterative,
                     "calibration_sentences": budget.calibration_sentences,
                     "calibration_batch": budget.calibration_batch, "seed": budget.seed, "finetune": finetune})


def ensure_pruned(preset: Preset, teacher: Bundle, frac: float = 0.25, *, budget: PruneBudget | None = None,
                  progress: bool = False) -> Path:
    """<artifacts>/<preset>/pruned-25pct: the teacher with `frac` of all heads removed; built if missing or stale.

    The rounds are the budget's sweep fractions up to `frac`, so the plan is the one the
    notebook's sweep measures at that point; with budget.finetune_steps the bundle is also
    fine-tuned to recover and cached under its own name (pruned-25pct-ft). Rebuilt exactly when
    `pruning_recipe` (teacher fingerprint, rounds, calibration, fine-tune) changes.
    """
    budget = budget or preset.prune
    recipe = pruning_recipe(teacher, budget, frac)
    n = total_heads(teacher.model)
    name = variant_name("overall", round(frac * n) / n)  # the sweep point's name; recover() appends -ft
    path = preset_dir(preset.name) / (name + "-ft" if budget.finetune_steps else name)

    def build(tmp: Path) -> None:
        plan = prune_schedule(teacher.model, teacher.tokenizer, calibration_pairs(budget), recipe["rounds"],
                              batch_size=budget.calibration_batch, iterative=budget.iterative)[frac]
        bundle = prune_bundle(teacher, plan, name)
        bundle.meta["preset"] = preset.name
        if budget.finetune_steps:
            recover(bundle, budget, progress=progress)
        bundle.write(tmp)

    return ensure(path, SIDECAR, recipe, build)
