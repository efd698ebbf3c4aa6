"""Gates: the checks an optimized variant must pass against its parent before it is timed, and one status rule.

    g = bleu_drop_gate(bleu=30.4, parent_bleu=31.5)   # {'name': 'bleu-drop<=1.0', 'passed': False, 'detail': ...}
    status_of([g, None])                                # ('failed', 'BLEU 30.40 vs the fp32 parent 31.50: ...')

A gate is the ledger's `{name, passed, detail}` dict: `detail` says what was compared, on how many
sentences, against which threshold, so a failed record explains itself. Every builder here takes
numbers that were already measured (the measuring lives with the technique: export parity in
labkit.engines.onnx_export, masked-head logits in labkit.lab.nb02_pruning, ...), so one module holds
every threshold and every wording. `status_of` is the one rule that turns gates into a record's
status: any failed gate makes it "failed", with the failed gates' details as the reason; a gate
that did not run (None) neither passes nor fails. Left out: statistical tests on BLEU differences.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from labkit.measure.quality import agreement

MAX_BLEU_DROP = 1.0  # a lossy variant losing more than this vs its parent failed
MIN_FP32_AGREEMENT = 0.95  # a float32 engine reproduces its parent's greedy tokens (a rare near-tie may flip)
# Speed-only presets: random weights make BLEU meaningless, so int8 is held to its parent's tokens at the
# forced length; the random parent repeats a token or two, so this catches broken graphs, not lost quality.
MIN_SPEED_AGREEMENT = 0.9
MASKED_PARITY_ATOL = 1e-5
# A shortlist is a lossy step like int8: on a real teacher it changes a word in ~1 sentence in 7 (a piece outside
# the batch's candidates), so it is held to the same BLEU drop as the int8 recipes; its token agreement is reported.
MAX_SHORTLIST_BLEU_DROP = MAX_BLEU_DROP

Gate = dict[str, Any]


def gate(name: str, passed: bool, detail: str) -> Gate:
    """The ledger's gate record: gate("onnx-parity", True, "worst max|Δ| 2e-06 ...")."""
    return {"name": name, "passed": bool(passed), "detail": detail}


def status_of(gates: Iterable[Mapping[str, Any] | None]) -> tuple[str, str | None]:
    """("failed", the failed gates' details joined by "; ") when any gate failed, else ("ok", None).

    [{"passed": True, ...}, None] -> ("ok", None); [{"passed": False, "detail": "gap 1.8"}] -> ("failed", "gap 1.8")
    """
    failed = [g.get("detail") or g.get("name") for g in gates if g is not None and g.get("passed") is False]
    return ("failed", "; ".join(failed)) if failed else ("ok", None)


# ---------------------------------------------------------------- quality gates (lossy steps)


def bleu_drop_gate(bleu: float, parent_bleu: float, max_drop: float = MAX_BLEU_DROP, parent: str = "the fp32 parent",
                   same: float | None = None, n: int | None = None) -> Gate:
    """BLEU may fall at most `max_drop` below the parent's: bleu 30.4, parent_bleu 31.5 -> drop 1.1 -> failed."""
    drop = parent_bleu - bleu
    detail = f"BLEU {bleu:.2f} vs {parent} {parent_bleu:.2f}: drop {drop:.2f} (max {max_drop})"
    if same is not None:
        detail += f"; token ids identical to {parent}'s on {round(same * n)}/{n} sentences"
    return gate(f"bleu-drop<={max_drop}", drop <= max_drop, detail)


def bleu_gap_gate(teacher_bleu: float | None, student_bleu: float | None, target: float, sentences: int,
                  preset: str) -> Gate | None:
    """A student may trail its teacher by at most `target` BLEU; None when BLEU is n/a.

    bleu_gap_gate(98.8, 97.0, 1.5, 200, "ci")["passed"] -> False (a gap of 1.80 > 1.5)
    """
    if teacher_bleu is None or student_bleu is None:
        return None
    gap = teacher_bleu - student_bleu
    return gate("bleu_gap", gap <= target, f"teacher - student = {gap:.2f} BLEU on {sentences} test sentences "
                                           f"(target <= {target:g} for preset {preset})")


def kd_gain_gate(before: float | None, after: float | None, steps: int, dev_sentences: int) -> Gate | None:
    """Did training help? Dev BLEU after `steps` must be >= at step 0 (a diverged run ends lower); None untrained."""
    if not steps or before is None or after is None:
        return None
    return gate("kd-improves-dev-bleu", after >= before,
                f"dev BLEU {before:.2f} at step 0 -> {after:.2f} after {steps} steps ({dev_sentences} dev sentences)")


def recovery_gate(before: float | None, after: float | None, steps: int) -> Gate:
    """A recovery fine-tune may only help: BLEU after >= before (passes when BLEU is n/a)."""
    return gate("recovery-not-worse", before is None or after is None or after >= before,
                f"BLEU {before} -> {after} after {steps} fine-tune steps")


# ---------------------------------------------------------------- token gates (exact or near-exact steps)


def agreement_gate(same: float, minimum: float, n: int, parent: str = "the fp32 parent", note: str = "") -> Gate:
    """Token agreement: same 47/48, minimum 0.95 -> passed, "token ids identical to torch's on 47/48 sentences"."""
    detail = f"token ids identical to {parent}'s on {round(same * n)}/{n} sentences (min {minimum:.0%})"
    return gate(f"agreement>={minimum}", same >= minimum, detail + (f"; {note}" if note else ""))


def variant_gate(result: Mapping, parent: Mapping, precision: str, preset, parent_name: str = "the fp32 parent") -> Gate:
    """Gate an engine variant against its parent; both are {"ids", "bleu"} results on the same gate sentences.

    fp32 (a conversion, e.g. CTranslate2 float32): tokens equal the parent's (agreement >= MIN_FP32_AGREEMENT).
    Lossy (int8, fp16) on quality presets: BLEU drop <= MAX_BLEU_DROP. Lossy on speed-only presets:
    agreement >= MIN_SPEED_AGREEMENT at the forced length, and the detail says how little that proves.
    """
    same, n = agreement(result["ids"], parent["ids"]), len(parent["ids"])
    if precision == "fp32":
        return agreement_gate(same, MIN_FP32_AGREEMENT, n, parent_name)
    if preset.quality:
        return bleu_drop_gate(result["bleu"], parent["bleu"], MAX_BLEU_DROP, parent_name, same=same, n=n)
    distinct = len({t for row in parent["ids"] for t in row})
    note = (f"speed-only preset (random weights, no BLEU): greedy forced to {preset.forced_length} tokens; the "
            f"parent's output holds {distinct} distinct token(s), so this catches a broken graph, not lost quality")
    return agreement_gate(same, MIN_SPEED_AGREEMENT, n, parent_name, note)


def loop_gate(ids: list[list[int]], parent_ids: list[list[int]], parent: str = "the Python loop",
              note: str = "") -> Gate:
    """An in-engine decode loop runs its parent's graphs, so it must give its parent's tokens on every
    sentence: ids [[5, 7], [9]] vs [[5, 7], [9, 3]] -> 1/2 identical -> failed (agreement_gate at 100 %)."""
    n = len(parent_ids)
    why = "same graphs, loop moved into the engine: every sentence must match"
    return agreement_gate(agreement(ids, parent_ids) if n else 0.0, 1.0, n, parent, f"{why}; {note}" if note else why)


def same_tokens_gate(checks: Mapping[str, bool], name: str = "same-tokens-as-generate-and-across-modes") -> Gate:
    """Every named comparison gave identical tokens: {"static, beams 1": True, ...}; an empty set fails."""
    return gate(name, bool(checks) and all(checks.values()),
                ", ".join(f"{k}: {'same' if v else 'DIFFERENT'}" for k, v in checks.items()) or "nothing compared")


def shortlist_gate(same: float, n: int, parent: str, bleu: float | None = None, parent_bleu: float | None = None,
                   masked_same: float | None = None, sizes: str = "") -> Gate:
    """A shortlisted decode against its full-vocabulary parent on the same sentences.

    Quality presets: BLEU drop <= MAX_SHORTLIST_BLEU_DROP (token agreement reported, not gated).
    Speed-only presets (bleu None): agreement with the real parent means nothing (random weights pick ids the
    corpus never shows), so the implementation is gated instead: tokens identical to the parent's decode with
    its logits masked to the same candidates (`masked_same`), on every sentence.
    """
    if bleu is None or parent_bleu is None:
        ok = masked_same is not None and masked_same >= 1.0
        detail = (f"speed-only preset: tokens identical to {parent} with logits masked to the same candidates on "
                  f"{round((masked_same or 0) * n)}/{n} sentences (must be all); agreement with unmasked {parent} "
                  f"{same:.2f} is not gated (random weights)")
        return gate("shortlist=masked-parent", ok, detail + (f"; {sizes}" if sizes else ""))
    drop = parent_bleu - bleu
    detail = (f"BLEU {bleu:.2f} vs {parent} {parent_bleu:.2f}: drop {drop:.2f} (max {MAX_SHORTLIST_BLEU_DROP}); token ids "
              f"identical to its full-vocabulary decode on {round(same * n)}/{n} sentences")
    if masked_same is not None:
        detail += f"; identical to {parent} masked to the same candidates on {round(masked_same * n)}/{n}"
    return gate(f"shortlist-bleu-drop<={MAX_SHORTLIST_BLEU_DROP}", drop <= MAX_SHORTLIST_BLEU_DROP,
                detail + (f"; {sizes}" if sizes else ""))


# ---------------------------------------------------------------- numeric gates (exports, structural edits)


def onnx_parity_gate(parity: Mapping, same: float | None = None, n: int | None = None,
                     minimum: float | None = None) -> Gate:
    """An export's recorded parity result (labkit.engines.onnx_export.parity) as a ledger gate.

    With `same` (token agreement of full greedy decodes on `n` sentences) it must also reach `minimum`.
    """
    worst = parity["worst"]
    detail = (f"worst max|Δ| {worst['max_abs']:.2e} ({worst['graph']}.{worst['output']}) vs PyTorch on "
              f"{len(parity['cases'])} unseen shapes (atol {parity['atol']}, rtol {parity['rtol']})")
    if same is None:
        return gate("onnx-parity", parity["passed"], detail)
    detail += f"; token agreement {same:.4f} on {n} sentences (min {minimum})"
    return gate("onnx-parity", parity["passed"] and same >= minimum, detail)


def masked_parity_gate(max_diff: float, same_tokens: bool, sentences: int, atol: float = MASKED_PARITY_ATOL) -> Gate:
    """A pruned model must equal its parent with the same heads gated to zero: logits within atol, same tokens."""
    return gate("pruned-equals-masked", max_diff <= atol and same_tokens,
                f"max |logit diff| {max_diff:.1e} (tolerance {atol:g}) and greedy tokens "
                f"{'identical' if same_tokens else 'DIFFERENT'} vs the teacher with the same heads gated "
                f"to zero, on {sentences} sentences")


# ---------------------------------------------------------------- serving


def exactly_once_gate(sent: int, answered: int, lost: int, duplicated: int, points: int) -> Gate:
    """Every request a load test sent got exactly one answer, its own: 120 sent, 120 answered, 0 lost, 0 duplicated."""
    detail = (f"{sent} requests sent over {points} load points, {answered} answered; {lost} lost (no answer), "
              f"{duplicated} duplicated or another request's")
    return gate("served-exactly-once", lost == 0 and duplicated == 0 and answered == sent, detail)

