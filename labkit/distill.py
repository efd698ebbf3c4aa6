"""Knowledge distillation: a shallower student initialised from its teacher's own layers.

    teacher = load_teacher()
    student = make_student(teacher, select_layers("alternate", 6, 4))   # decoder layers 0, 2, 4, 5
    result = distill(teacher, student, train, dev, budget_for("ci"))      # result.losses, result.history
    path = ensure_student("ci", "alternate")   # the same, cached under artifacts/ci/student-alternate
    ensure_student("ci", teacher=artifacts.bundle_for("ci", "pruned-25pct"), encoder_layers=4)  # pruned, both stacks cut
    records = ledger_records(teacher, students, comparison_table(...), ...)   # gap gate -> status

The loss, per target token, plugs into `labkit.train.fit(..., loss_fn=KDLoss(...))`:

    alpha * T^2 * KL(p_teacher(T) || p_student(T))       soft targets (Hinton et al. 2015)
  + beta  * MSE(student layer i, teacher layer map[i])   hidden states of the copied layers
  + gamma * CE(student, reference)                       the references themselves

with alpha, beta, gamma = 0.7, 0.2, 0.1 and the temperature T annealed linearly from 4 to 1:
soft targets early (the teacher's ranking of wrong words carries most of its knowledge), sharp
targets at the end (the distribution greedy decoding actually uses). Sequence-level KD (Kim &
Rush 2016) trains on the teacher's greedy translations instead of the references
(`seq_kd=True`); the word-level terms still apply on top, as in their best setting.

Students are the teacher's modules as they are (a deep copy with decoder, and optionally
encoder, layers dropped), so a head-pruned teacher gives a head-pruned student whose
`head_plan` (read off its kept modules) names its own, renumbered layers. Left out: width shrinking (d_model, FFN),
randomly initialised students, attention-map matching (TinyBERT), multi-teacher ensembles
and generating seq-KD targets with beam search (greedy is what Kim & Rush found sufficient
and what the lab decodes with).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from labkit import data as corpus
from labkit.artifacts import write_json_atomic
from labkit.ledger import json_number
from labkit.models import SIDECAR, Bundle, cached_recipe, fingerprint, jsonable, load_bundle

STRATEGIES = ("alternate", "ends", "bottom")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class KDConfig:
    """The loss: weights of its three terms and the temperature schedule."""

    alpha: float = 0.7  # soft-target KL at temperature T (times T^2)
    beta: float = 0.2  # MSE between copied layers' hidden states
    gamma: float = 0.1  # cross-entropy on the references (or on the teacher's outputs with seq-KD)
    t_start: float = 4.0  # temperature at the first step
    t_end: float = 1.0  # temperature at the last step
    label_smoothing: float = 0.1  # on the CE term, as the teacher was trained


@dataclass(frozen=True)
class DistillBudget:
    """How long one student trains, and on what; one entry per preset in DISTILL_BUDGETS."""

    steps: int  # optimizer steps; 0 builds the student without training (speed-only presets)
    batch_size: int
    lr: float  # peak AdamW learning rate (the student starts from trained weights: lower than from scratch)
    warmup: int
    eval_every: int  # dev BLEU every this many steps: the recovery curve
    train_sentences: int | None  # training pairs used (None: the whole train split)
    dev_sentences: int  # dev pairs scored for the recovery curve
    seq_kd_sentences: int  # source sentences the teacher translates for sequence-level KD
    bleu_gap_target: float  # the aim for teacher BLEU - student BLEU: a ledger gate (over it: status "failed")


DISTILL_BUDGETS: dict[str, DistillBudget] = {
    # Fits the ~90 s notebook budget on 2 cores. The cut students start at ~65 dev BLEU and most
    # of the recovery happens in the first few dozen steps, so a short run shows the curve.
    "ci": DistillBudget(steps=30, batch_size=32, lr=5e-4, warmup=5, eval_every=10,
                        train_sentences=1000, dev_sentences=40, seq_kd_sentences=960,
                        bleu_gap_target=1.5),
    "workshop": DistillBudget(steps=2000, batch_size=32, lr=5e-4, warmup=100, eval_every=250,
                              train_sentences=None, dev_sentences=200, seq_kd_sentences=20000,
                              bleu_gap_target=1.5),
    # The real opus-mt model: a short fine-tune on the embedded corpus (77 M parameters on CPU).
    "opus-mt-zh-en": DistillBudget(steps=300, batch_size=16, lr=5e-5, warmup=30, eval_every=100,
                                   train_sentences=4800, dev_sentences=100, seq_kd_sentences=4800,
                                   bleu_gap_target=3.0),
    # Random weights: the student is a speed shape only, so it is built, not trained.
    "opus-mt-shape": DistillBudget(steps=0, batch_size=16, lr=0.0, warmup=0, eval_every=1,
                                   train_sentences=0, dev_sentences=0, seq_kd_sentences=0,
                                   bleu_gap_target=float("inf")),
}


def budget_for(preset: str) -> DistillBudget:
    if preset not in DISTILL_BUDGETS:
        raise KeyError(f"no distillation budget for preset {preset!r}; known: {', '.join(DISTILL_BUDGETS)}")
    return DISTILL_BUDGETS[preset]


# --------------------------------------------------------------------------- primitives


def select_layers(strategy: str | Sequence[int], n: int, k: int) -> tuple[int, ...]:
    """Which of a teacher's `n` layers a `k`-layer student keeps, bottom to top.

    select_layers("alternate", 6, 4) -> (0, 2, 4, 5)  every other layer, topped up from the top
    select_layers("ends", 6, 4)      -> (0, 1, 4, 5)  the first and the last blocks
    select_layers("bottom", 6, 4)    -> (0, 1, 2, 5)  the bottom layers plus the last one
    select_layers((0, 3), 6, 2)      -> (0, 3)        an explicit choice, checked
    """
    if not isinstance(strategy, str):
        keep = tuple(int(i) for i in strategy)
        if not keep or list(keep) != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= n:
            raise ValueError(f"layer map {keep} must be increasing, distinct ids in [0, {n})")
        return keep
    if not 1 <= k <= n:
        raise ValueError(f"a student keeps 1..{n} of the teacher's {n} layers, not {k}")
    if strategy == "alternate":
        keep = list(range(0, n, 2))[:k]
        keep += [i for i in range(n - 1, -1, -1) if i not in keep][: k - len(keep)]
    elif strategy == "ends":
        keep = list(range((k + 1) // 2)) + list(range(n - k // 2, n))
    elif strategy == "bottom":
        keep = list(range(k - 1)) + [n - 1]
    else:
        raise ValueError(f"unknown layer strategy {strategy!r}; known: {', '.join(STRATEGIES)} or a tuple")
    return tuple(sorted(keep))


def temperature_at(step: int, steps: int, start: float = 4.0, end: float = 1.0) -> float:
    """Linear anneal from `start` at step 0 to `end` at the last step (steps - 1).

    temperature_at(0, 5) == 4.0, temperature_at(2, 5) == 2.5, temperature_at(4, 5) == 1.0
    """
    if steps <= 1:
        return end
    frac = min(1.0, max(0, step) / (steps - 1))
    return start + (end - start) * frac


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over tokens where `mask`.

    Identical logits give 0. The T^2 keeps the gradient's size independent of T
    (soft-target gradients scale as 1/T^2; Hinton et al. 2015, section 2).
    """
    s = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def hidden_mse(student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
               layer_map: Sequence[int], mask: torch.Tensor) -> torch.Tensor:
    """MSE between student layer i's output and teacher layer layer_map[i]'s, mean over layers.

    States are Hugging Face `hidden_states` tuples: index 0 is the embedding output, index
    i + 1 the output of layer i. Only positions where `mask` is True count (no padding).
    """
    losses = [F.mse_loss(student_states[i + 1][mask], teacher_states[j + 1][mask])
              for i, j in enumerate(layer_map)]
    return torch.stack(losses).mean()


# --------------------------------------------------------------------------- building students


def keep_layers(stack: torch.nn.Module, keep: Sequence[int]) -> None:
    """Keep only layers `keep` of an encoder/decoder stack, in place, renumbering their caches.

    Decoder attentions index the KV cache by `layer_idx`; kept layers must be 0..k-1 again.
    """
    stack.layers = torch.nn.ModuleList([stack.layers[i] for i in keep])
    for new_idx, layer in enumerate(stack.layers):
        for attn in (getattr(layer, "self_attn", None), getattr(layer, "encoder_attn", None)):
            if attn is not None and getattr(attn, "layer_idx", None) is not None:
                attn.layer_idx = new_idx


def make_student(teacher: Bundle, decoder_layers: Sequence[int],
                 encoder_layers: Sequence[int] | None = None, name: str = "student") -> Bundle:
    """The teacher with only `decoder_layers` (and `encoder_layers`, if given) kept.

    Everything else (embeddings, tied LM head, final_logits_bias, pruned attention shapes) is
    a copy of the teacher's, so keeping every layer reproduces the teacher exactly.
    """
    model = copy.deepcopy(teacher.model)
    cfg = model.config
    teacher_dec, teacher_enc = cfg.decoder_layers, cfg.encoder_layers
    select_layers(decoder_layers, teacher_dec, len(decoder_layers))  # validates
    keep_layers(model.model.decoder, decoder_layers)
    cfg.decoder_layers = len(decoder_layers)
    if encoder_layers is not None:
        select_layers(encoder_layers, teacher_enc, len(encoder_layers))
        keep_layers(model.model.encoder, encoder_layers)
        cfg.encoder_layers = len(encoder_layers)
    meta = {"name": name, "derived_from": teacher.name, "technique": "distillation",
            "distillation": {"teacher": teacher.name,
                             "teacher_layers": {"encoder": teacher_enc, "decoder": teacher_dec},
                             "decoder_layer_map": list(decoder_layers),
                             "encoder_layer_map": list(encoder_layers) if encoder_layers is not None else None}}
    if teacher.meta.get("head_plan"):
        from labkit.prune import model_plan, plan_json

        # Read off the kept modules themselves (renumbered layers), so load_bundle re-prunes exactly.
        meta["head_plan"] = plan_json(model_plan(model))
        meta["distillation"]["teacher_head_plan"] = teacher.meta["head_plan"]
    return Bundle(model.eval(), teacher.tokenizer, meta)


def layer_maps(student: Bundle) -> tuple[list[int], list[int] | None]:
    """(decoder_layer_map, encoder_layer_map or None) recorded in a student's meta."""
    d = student.meta["distillation"]
    return list(d["decoder_layer_map"]), (list(d["encoder_layer_map"]) if d.get("encoder_layer_map") else None)


# --------------------------------------------------------------------------- the loss


class KDLoss:
    """`loss_fn` for `labkit.train.fit`: the KD loss, with one history row per call (= step).

    kd = KDLoss(teacher.model, [0, 2, 4, 5], cfg=KDConfig(), steps=300)
    fit(student.model, tok, train, dev, steps=300, ..., loss_fn=kd)
    kd.history[0] -> {'step': 1, 'temperature': 4.0, 'kl': ..., 'mse': ..., 'ce': ..., 'loss': ...}
    """

    def __init__(self, teacher_model, decoder_map: Sequence[int], encoder_map: Sequence[int] | None = None,
                 cfg: KDConfig = KDConfig(), steps: int = 1):
        self.teacher = teacher_model.eval()
        self.decoder_map = list(decoder_map)
        self.encoder_map = list(encoder_map) if encoder_map is not None else None
        self.cfg = cfg
        self.steps = steps
        self.history: list[dict] = []

    def temperature(self) -> float:
        return temperature_at(len(self.history), self.steps, self.cfg.t_start, self.cfg.t_end)

    def components(self, model, batch: dict, temperature: float) -> dict[str, torch.Tensor]:
        """kl, mse, ce and their weighted sum `loss` on one batch (teacher without gradients)."""
        from labkit.train import label_smoothed_ce

        labels = batch["labels"]
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      decoder_input_ids=decoder_input_ids, output_hidden_states=self.cfg.beta > 0)
        with torch.no_grad():
            t = self.teacher(**inputs)
        s = model(**inputs)
        mask = labels != -100
        kl = soft_kl(s.logits, t.logits, mask, temperature)
        mse = torch.zeros((), dtype=kl.dtype)
        if self.cfg.beta > 0:
            mse = hidden_mse(s.decoder_hidden_states, t.decoder_hidden_states, self.decoder_map, mask)
            if self.encoder_map is not None:
                src = batch["attention_mask"].bool()
                enc = hidden_mse(s.encoder_hidden_states, t.encoder_hidden_states, self.encoder_map, src)
                mse = (mse * len(self.decoder_map) + enc * len(self.encoder_map)) / (
                    len(self.decoder_map) + len(self.encoder_map))
        ce = label_smoothed_ce(s.logits, labels, self.cfg.label_smoothing)
        loss = self.cfg.alpha * kl + self.cfg.beta * mse + self.cfg.gamma * ce
        return {"kl": kl, "mse": mse, "ce": ce, "loss": loss}

    def __call__(self, model, batch: dict) -> torch.Tensor:
        temperature = self.temperature()
        parts = self.components(model, batch, temperature)
        self.history.append({"step": len(self.history) + 1, "temperature": temperature,
                             **{k: float(v.detach()) for k, v in parts.items()}})
        return parts["loss"]


def summarize(history: list[dict], max_points: int = 200) -> list[dict]:
    """Average consecutive rows so a curve has at most `max_points` points (step = last of window).

    summarize([{'step': 1, 'kl': 2.0}, {'step': 2, 'kl': 4.0}], 1) -> [{'step': 2, 'kl': 3.0}]
    """
    if not history:
        return []
    size = -(-len(history) // max_points)
    out = []
    for i in range(0, len(history), size):
        window = history[i:i + size]
        row = {k: sum(r[k] for r in window) / len(window) for k in window[0] if k != "step"}
        out.append({"step": window[-1]["step"], **{k: round(v, 5) for k, v in row.items()}})
    return out


# --------------------------------------------------------------------------- sequence-level KD


def teacher_translations(teacher: Bundle, sources: list[str], *, batch_size: int = 64,
                         max_new_tokens: int = 64) -> list[str]:
    """The teacher's greedy translations (labkit.decode's loop: the same tokens as `generate`)."""
    from labkit.decode import DecodeConfig
    from labkit.evaluate import translate_all
    from labkit.pipeline import Translator

    # Similar lengths per batch: less padding, and fewer rows waiting for the longest one.
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    translator = Translator(teacher, decode=DecodeConfig(max_new_tokens=max_new_tokens))
    hyps = translate_all(translator, [sources[i] for i in order], batch_size, desc="teacher translations")
    out = [""] * len(sources)
    for i, hyp in zip(order, hyps):
        out[i] = hyp
    return out


def seq_kd_pairs(teacher: Bundle, pairs: list[corpus.Pair], **kwargs) -> list[corpus.Pair]:
    """Sources paired with the teacher's translations (empty translations dropped)."""
    hyps = teacher_translations(teacher, [p.zh for p in pairs], **kwargs)
    return [corpus.Pair(p.zh, h) for p, h in zip(pairs, hyps) if h.strip()]


def ensure_seq_kd_data(preset: str, teacher: Bundle, n: int) -> Path:
    """Teacher translations of the first `n` training sources, cached as TSV + JSON sidecar."""
    from labkit.artifacts import preset_dir

    path = preset_dir(preset) / f"seqkd-{teacher.name}.tsv"
    sidecar = path.with_suffix(".json")
    want = {"teacher": teacher.name, "teacher_fingerprint": fingerprint(teacher.model), "sources": n,
            "decoding": "greedy"}
    if path.exists() and sidecar.exists() and json.loads(sidecar.read_text()) == want:
        return path
    corpus.write_tsv(seq_kd_pairs(teacher, corpus.load_split("train", limit=n)), path)
    write_json_atomic(sidecar, want)
    return path


# --------------------------------------------------------------------------- training


@dataclass
class DistillResult:
    student: Bundle
    history: list[dict]  # dev BLEU: {'step', 'loss', 'dev_bleu'}, step 0 = before training
    losses: list[dict] = field(default_factory=list)  # KDLoss.history: one row per step


def distill(teacher: Bundle, student: Bundle, train: list[corpus.Pair], dev: list[corpus.Pair],
            budget: DistillBudget, kd: KDConfig = KDConfig(), *, seed: int = 0,
            progress: bool = True) -> DistillResult:
    """Train `student` (in place) against `teacher` with the KD loss for budget.steps steps."""
    from labkit.train import fit, greedy_bleu

    decoder_map, encoder_map = layer_maps(student)
    loss = KDLoss(teacher.model, decoder_map, encoder_map, kd, steps=budget.steps)
    history = [{"step": 0, "loss": None,
                "dev_bleu": greedy_bleu(student.model, student.tokenizer, dev) if dev else None}]
    if budget.steps:
        history += fit(student.model, student.tokenizer, train, dev, steps=budget.steps,
                       batch_size=budget.batch_size, lr=budget.lr, warmup=budget.warmup,
                       eval_every=budget.eval_every, seed=seed, loss_fn=loss, progress=progress)
    student.model.eval()
    return DistillResult(student, history, loss.history)


def student_name(strategy: str | Sequence[int], encoder_layers: int | None = None,
                 seq_kd: bool = False, teacher: str = "teacher") -> str:
    """student_name("alternate") -> 'student-alternate'; ((0, 3), 2, True) -> 'student-L0-3-enc2-seqkd'."""
    name = "student-" + (strategy if isinstance(strategy, str) else "L" + "-".join(map(str, strategy)))
    name += f"-enc{encoder_layers}" if encoder_layers is not None else ""
    name += "-seqkd" if seq_kd else ""
    return name + (f"-from-{teacher}" if teacher != "teacher" else "")


def ensure_student(preset: str, strategy: str | Sequence[int] = "alternate", *, decoder_layers: int = 4,
                   encoder_layers: int | None = None, seq_kd: bool = False, teacher: Bundle | None = None,
                   kd: KDConfig = KDConfig(), budget: DistillBudget | None = None,
                   progress: bool = True) -> Path:
    """Build (if missing or stale) and cache a distilled student under preset_dir(preset).

    The sidecar records the recipe (teacher and its weight fingerprint, layer maps, loss
    weights, budget); a cached student is reused only when the recipe is the same.
    ensure_student("ci", "ends") -> artifacts/ci/student-ends
    """
    from labkit import artifacts

    teacher = teacher if teacher is not None else artifacts.teacher_for(preset)
    budget = budget or budget_for(preset)
    cfg = teacher.model.config
    decoder_map = select_layers(strategy, cfg.decoder_layers, decoder_layers)
    encoder_map = (select_layers(strategy, cfg.encoder_layers, encoder_layers)
                   if encoder_layers is not None else None)
    recipe = jsonable({"teacher": teacher.name, "teacher_fingerprint": fingerprint(teacher.model),
                       "decoder_layer_map": decoder_map, "encoder_layer_map": encoder_map,
                       "seq_kd": seq_kd, "kd": asdict(kd), "budget": asdict(budget)})
    path = artifacts.preset_dir(preset) / student_name(strategy, encoder_layers, seq_kd, teacher.name)
    if cached_recipe(path) == recipe:
        return path
    result = train_student(preset, teacher, decoder_map, encoder_map, budget, kd, seq_kd=seq_kd,
                           name=path.name, progress=progress)
    result.student.meta["distillation"].update(recipe=recipe, strategy=strategy if isinstance(strategy, str) else "explicit")
    result.student.save(path)
    return path


def train_student(preset: str, teacher: Bundle, decoder_map: Sequence[int], encoder_map: Sequence[int] | None,
                  budget: DistillBudget, kd: KDConfig, *, seq_kd: bool = False, name: str = "student",
                  progress: bool = True) -> DistillResult:
    """make_student + distill on the preset's data, with the run recorded in the student's meta."""
    from labkit.train import greedy_bleu

    start = time.perf_counter()
    student = make_student(teacher, decoder_map, encoder_map, name=name)
    if seq_kd and budget.steps:
        train = corpus.read_tsv(ensure_seq_kd_data(preset, teacher, budget.seq_kd_sentences))
    else:
        train = corpus.load_split("train", limit=budget.train_sentences) if budget.steps else []
    dev = corpus.load_split("dev", limit=budget.dev_sentences) if budget.dev_sentences else []
    result = distill(teacher, student, train, dev, budget, kd, progress=progress)
    result.student.meta["distillation"].update(
        loss_weights={"alpha": kd.alpha, "beta": kd.beta, "gamma": kd.gamma},
        temperature={"start": kd.t_start, "end": kd.t_end, "schedule": "linear"},
        steps=budget.steps, batch_size=budget.batch_size, train_pairs=len(train), seq_kd=seq_kd,
        dev_sentences=len(dev), final_dev_bleu=_round(result.history[-1]["dev_bleu"]),
        teacher_dev_bleu=_round(greedy_bleu(teacher.model, teacher.tokenizer, dev)) if dev else None,
        history=[{k: _round(v) for k, v in row.items()} for row in result.history],
        loss_curve=summarize(result.losses), wall_time_s=round(time.perf_counter() - start, 1),
        threads=torch.get_num_threads(), torch=torch.__version__)
    return result


def _round(x, digits: int = 3):
    return round(x, digits) if isinstance(x, float) else x


# --------------------------------------------------------------------------- comparing and recording


def gap_gate(teacher_bleu: float | None, student_bleu: float | None, target: float, sentences: int,
             preset: str) -> dict | None:
    """Ledger gate "bleu_gap": teacher BLEU - student BLEU <= target; None when BLEU is n/a.

    gap_gate(98.8, 97.0, 1.5, 200, "ci")["passed"] -> False (a gap of 1.80 > 1.5)
    """
    if teacher_bleu is None or student_bleu is None:
        return None
    gap = teacher_bleu - student_bleu
    return {"name": "bleu_gap", "passed": bool(gap <= target),
            "detail": f"teacher - student = {gap:.2f} BLEU on {sentences} test sentences "
                      f"(target <= {target:g} for preset {preset})"}


def training_gate(run: dict) -> dict | None:
    """Did distilling help? The student's dev BLEU after training must be >= its step-0 BLEU.

    `run` is a student's meta["distillation"]. A cut student starts well below its teacher, so
    a run that diverged (too high a learning rate, a broken loss) ends below where it began.
    None without training or dev BLEU (speed-only presets).
    """
    before, after = run["history"][0]["dev_bleu"], run["final_dev_bleu"]
    if not run["steps"] or before is None or after is None:
        return None
    return {"name": "kd-improves-dev-bleu", "passed": bool(after >= before),
            "detail": f"dev BLEU {before:.2f} at step 0 -> {after:.2f} after {run['steps']} steps "
                      f"({run['dev_sentences']} dev sentences)"}


def comparison_table(bundles: dict[str, Bundle], latency: dict, scores: dict | None = None,
                     hyps: dict | None = None, reference: str = "teacher"):
    """Reference vs students, one row per bundle: layers, BLEU, chrF, BLEU gap, share of identical
    outputs, latency p50 and ratio to the reference's (same run), parameters.

    `latency` maps names to labkit.bench Measurements; `scores`/`hyps` (labkit.evaluate) are None
    for speed-only presets, and the quality columns then are too.
    """
    import pandas as pd
    from labkit.evaluate import agreement

    ref = latency[reference].p50
    return pd.DataFrame.from_dict({name: {
        "decoder layers": bundle.model.config.decoder_layers,
        "encoder layers": bundle.model.config.encoder_layers,
        "BLEU": scores[name].bleu if scores else None,
        "chrF": scores[name].chrf if scores else None,
        "BLEU gap": scores[reference].bleu - scores[name].bleu if scores else None,
        "same output as teacher": agreement(hyps[name], hyps[reference]) if hyps else None,
        "latency p50 ms": latency[name].p50,
        "latency ratio": latency[name].p50 / ref,
        "params": bundle.params,
    } for name, bundle in bundles.items()}, orient="index")


def _status(gates: list[dict | None]) -> dict:
    """status/reason ledger fields: any failed gate makes the record "failed", never "ok"."""
    failed = [g["detail"] for g in gates if g is not None and not g["passed"]]
    return {"status": "failed", "reason": "; ".join(failed)} if failed else {"status": "ok", "reason": None}


def ledger_records(teacher: Bundle, students: dict[str, Bundle], table, latency: dict, scores: dict | None,
                   *, preset: str, budget: DistillBudget, sentences: int,
                   notebook: str = "03_distillation") -> list[dict]:
    """The reference (distill-ref-<teacher>) measured in this run, then one `distillation` record per student.

    A student's gate is `gap_gate` against budget.bleu_gap_target; `training_check` is
    `training_gate`. Either failing makes the record status "failed" with the detail as reason.
    Parent: the bundle it was distilled from. Latency ratios are to the reference timed here.
    """
    from labkit import ledger
    from labkit.bench import as_latency

    quality = lambda name: scores[name].as_metrics() if scores else {}  # noqa: E731
    # A pruned reference is a pruning variant re-measured here; pruning records carry their fraction.
    pruned = ({k: teacher.meta[k] for k in ("heads_removed_frac", "head_plan")}
              if teacher.meta.get("head_plan") else {})
    ref = ledger.make_record(
        notebook=notebook, variant=f"distill-ref-{teacher.name}", model=teacher.name, backend="torch",
        precision="fp32", technique="pruning" if pruned else "baseline", reference_for="distillation",
        metrics={**quality(teacher.name), "latency_ms": as_latency(latency[teacher.name]),
                 "params": teacher.params, "size_mb": round(teacher.size_mb, 3)}, **pruned)
    records = [ref]
    for name, bundle in students.items():
        run, row = bundle.meta["distillation"], table.loc[name]
        gate = gap_gate(scores[teacher.name].bleu if scores else None, scores[name].bleu if scores else None,
                        budget.bleu_gap_target, sentences, preset)
        check = training_gate(run)
        records.append(ledger.make_record(
            notebook=notebook, variant=name, technique="distillation", parent=teacher.name, model=name,
            backend="torch", precision="fp32", gate=gate, **_status([gate, check]),
            metrics={**quality(name), "latency_ms": as_latency(latency[name]), "params": bundle.params,
                     "size_mb": round(bundle.size_mb, 3), "agreement": row["same output as teacher"]},
            decoder_layers=bundle.model.config.decoder_layers, encoder_layers=bundle.model.config.encoder_layers,
            layer_map=run["decoder_layer_map"], encoder_layer_map=run["encoder_layer_map"],
            strategy=run.get("strategy"), steps=run["steps"], seq_kd=run["seq_kd"],
            loss_weights=run["loss_weights"],
            step0_dev_bleu=run["history"][0]["dev_bleu"], final_dev_bleu=run["final_dev_bleu"],
            training_check=check, bleu_gap=json_number(row["BLEU gap"]),
            latency_ratio=round(float(row["latency ratio"]), 4),
            teacher_latency_ms=as_latency(latency[teacher.name])))
    return records


# --------------------------------------------------------------------------- figures


def loss_figure(curves: dict[str, list[dict]]):
    """Per-component loss curves (one panel per component, one line per student)."""
    import pandas as pd
    import plotly.express as px

    rows = [{"student": name, "step": r["step"], "component": comp, "value": r[comp]}
            for name, curve in curves.items() for r in curve for comp in ("loss", "kl", "mse", "ce")]
    fig = px.line(pd.DataFrame(rows), x="step", y="value", color="student", facet_col="component",
                  facet_col_wrap=4, title="Distillation loss by component (KL includes T², T anneals 4 → 1)")
    fig.update_yaxes(matches=None, showticklabels=True)
    return fig


def recovery_figure(histories: dict[str, list[dict]], teacher_bleu: float | None = None):
    """Dev BLEU vs training step per student, with the teacher's dev BLEU as a line."""
    import pandas as pd
    import plotly.express as px

    rows = [{"student": name, "step": r["step"], "dev BLEU": r["dev_bleu"]}
            for name, history in histories.items() for r in history if r["dev_bleu"] is not None]
    fig = px.line(pd.DataFrame(rows), x="step", y="dev BLEU", color="student", markers=True,
                  title="Recovery: dev BLEU of the 4-layer students while distilling")
    if teacher_bleu is not None:
        fig.add_hline(y=teacher_bleu, line_dash="dash", annotation_text="teacher")
    return fig
