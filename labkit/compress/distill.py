"""Knowledge distillation: a shallower student initialised from its teacher's own layers.

    teacher = load_teacher()
    student = make_student(teacher, select_layers("alternate", 6, 4))   # decoder layers 0, 2, 4, 5
    result = distill(teacher, student, train, dev, Preset.from_name("ci").distill)      # result.losses, result.history
    path = ensure_student("ci", "alternate")   # the same, cached under artifacts/ci/student-alternate
    ensure_student("ci", teacher=bundle_for("ci", "pruned-25pct"), encoder_layers=4)  # pruned, both stacks cut
    # comparing and recording students: labkit.lab.nb03_distillation

The loss, per target token, plugs into `labkit.compress.training.fit(..., loss_fn=KDLoss(...))`:

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
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from labkit.compress.training import fit, greedy_bleu, label_smoothed_ce
from labkit.config import DistillBudget, Preset
from labkit.core import data
from labkit.core.artifacts import ensure, preset_dir, write_json_atomic
from labkit.core.bundle import SIDECAR, Bundle, fingerprint, keep_layers
from labkit.core.decode import DecodeConfig
from labkit.core.heads import model_plan, plan_json
from labkit.core.translator import StepperTranslator
from labkit.measure.quality import translate_all

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
    """`loss_fn` for `labkit.compress.training.fit`: the KD loss, with one history row per call (= step).

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


def thin_history(history: list[dict], max_points: int = 200) -> list[dict]:
    """Average consecutive rows so a curve has at most `max_points` points (step = last of window).

    thin_history([{'step': 1, 'kl': 2.0}, {'step': 2, 'kl': 4.0}], 1) -> [{'step': 2, 'kl': 3.0}]
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
    """The teacher's greedy translations (labkit.core.decode's loop: the same tokens as `generate`)."""

    # Similar lengths per batch: less padding, and fewer rows waiting for the longest one.
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    translator = StepperTranslator(teacher, decode=DecodeConfig(max_new_tokens=max_new_tokens))
    hyps = translate_all(translator, [sources[i] for i in order], batch_size, desc="teacher translations")
    out = [""] * len(sources)
    for i, hyp in zip(order, hyps):
        out[i] = hyp
    return out


def seq_kd_pairs(teacher: Bundle, pairs: list[data.Pair], **kwargs) -> list[data.Pair]:
    """Sources paired with the teacher's translations (empty translations dropped)."""
    hyps = teacher_translations(teacher, [p.zh for p in pairs], **kwargs)
    return [data.Pair(p.zh, h) for p, h in zip(pairs, hyps) if h.strip()]


SEQ_KD_SIDECAR = "seqkd.json"


def ensure_seq_kd(preset: Preset, teacher: Bundle, n: int) -> Path:
    """<artifacts>/<preset>/seqkd-<teacher>/pairs.tsv: the teacher's greedy translations of the first `n`
    training sources (sequence-level KD data), rebuilt when the teacher's weights or `n` change."""
    out = preset_dir(preset.name) / f"seqkd-{teacher.name}"
    recipe = {"teacher": teacher.name, "teacher_fingerprint": fingerprint(teacher.model), "sources": n,
              "decoding": "greedy"}

    def build(tmp: Path) -> None:
        data.write_tsv(seq_kd_pairs(teacher, data.load_split("train", limit=n)), tmp / "pairs.tsv")
        write_json_atomic(tmp / SEQ_KD_SIDECAR, {"pairs": "pairs.tsv"})

    return ensure(out, SEQ_KD_SIDECAR, recipe, build) / "pairs.tsv"


# --------------------------------------------------------------------------- training


@dataclass
class DistillResult:
    student: Bundle
    history: list[dict]  # dev BLEU: {'step', 'loss', 'dev_bleu'}, step 0 = before training
    losses: list[dict] = field(default_factory=list)  # KDLoss.history: one row per step


def distill(teacher: Bundle, student: Bundle, train: list[data.Pair], dev: list[data.Pair],
            budget: DistillBudget, kd: KDConfig = KDConfig(), *, seed: int = 0,
            progress: bool = True) -> DistillResult:
    """Train `student` (in place) against `teacher` with the KD loss for budget.steps steps."""

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


def ensure_student(preset: Preset, teacher: Bundle, strategy: str | Sequence[int] = "alternate", *,
                   decoder_layers: int = 4, encoder_layers: int | None = None, seq_kd: bool = False,
                   kd: KDConfig = KDConfig(), budget: DistillBudget | None = None, progress: bool = True,
                   name: str | None = None) -> Path:
    """Build (if missing or stale) and cache a distilled student under preset_dir(preset).

    The recipe (teacher and its weight fingerprint, layer maps, loss weights, budget) decides:
    a cached student is reused exactly when it is the same. `name` overrides the directory name
    (default: student_name(...)).
    ensure_student(ci, teacher, "ends") -> artifacts/ci/student-ends
    """
    budget = budget or preset.distill
    cfg = teacher.model.config
    decoder_map = select_layers(strategy, cfg.decoder_layers, decoder_layers)
    encoder_map = (select_layers(strategy, cfg.encoder_layers, encoder_layers)
                   if encoder_layers is not None else None)
    recipe = {"teacher": teacher.name, "teacher_fingerprint": fingerprint(teacher.model),
              "decoder_layer_map": decoder_map, "encoder_layer_map": encoder_map,
              "seq_kd": seq_kd, "kd": asdict(kd), "budget": asdict(budget)}
    path = preset_dir(preset.name) / (name or student_name(strategy, encoder_layers, seq_kd, teacher.name))

    def build(tmp: Path) -> None:
        result = train_student(preset, teacher, decoder_map, encoder_map, budget, kd, seq_kd=seq_kd,
                               name=path.name, progress=progress)
        result.student.meta["distillation"]["strategy"] = strategy if isinstance(strategy, str) else "explicit"
        result.student.write(tmp)

    return ensure(path, SIDECAR, recipe, build)


# Which teacher decoder layers a shallow student keeps (6-layer teachers). One layer: the top one,
# whose output is what the LM head reads, so the hidden-state term pulls the same way as the KL term
# (a bottom layer would be pulled towards the teacher's layer-0 states, away from the output). Two
# layers: a middle one under the top one. Measured once on the ci teacher (60 word-level KD steps at
# lr 5e-4, dev BLEU on 60 sentences): (2, 5) 57, (0, 5) 45, (0, 1) 4; both 1-layer choices, (0,)
# and (5,), were still at 0 after 60 steps, so that choice rests on the argument above.
SHALLOW_LAYERS = {1: (5,), 2: (2, 5)}


def shallow_layers(teacher_decoder_layers: int, k: int) -> tuple[int, ...]:
    """The layers a k-layer shallow student keeps: SHALLOW_LAYERS for 6-layer teachers, else the
    bottom layers plus the top one (select_layers "bottom": (n - 1,) for k = 1, (0, n - 1) for k = 2).

    shallow_layers(6, 2) -> (2, 5); shallow_layers(6, 1) -> (5,); shallow_layers(2, 1) -> (1,)
    """
    if teacher_decoder_layers == 6 and k in SHALLOW_LAYERS:
        return SHALLOW_LAYERS[k]
    return select_layers("bottom", teacher_decoder_layers, k)


def shallow_name(teacher: Bundle, decoder_layers: int) -> str:
    """shallow_name(teacher, 2) -> 'student-6-2' (encoder-decoder layers; '-from-<teacher>' for another teacher)."""
    name = f"student-{teacher.model.config.encoder_layers}-{decoder_layers}"
    return name + (f"-from-{teacher.name}" if teacher.name != "teacher" else "")


def ensure_shallow(preset: Preset, teacher: Bundle, decoder_layers: int, *, layers: Sequence[int] | None = None,
                   kd: KDConfig = KDConfig(), budget: DistillBudget | None = None, progress: bool = True) -> Path:
    """A deep-encoder, shallow-decoder student (every encoder layer, `decoder_layers` decoder layers), trained
    with sequence-level KD plus the word-level terms on preset.distill_shallow; cached as student-6-<k>.

    ensure_shallow(ci, teacher, 1) -> artifacts/ci/student-6-1 (decoder layer 5 of the teacher's 6)
    """
    keep = tuple(layers) if layers is not None else shallow_layers(teacher.model.config.decoder_layers, decoder_layers)
    if len(keep) != decoder_layers:
        raise ValueError(f"layer map {keep} keeps {len(keep)} decoder layers, not {decoder_layers}")
    return ensure_student(preset, teacher, keep, decoder_layers=decoder_layers, seq_kd=True, kd=kd,
                          budget=budget or preset.distill_shallow, progress=progress,
                          name=shallow_name(teacher, decoder_layers))


def train_student(preset: Preset, teacher: Bundle, decoder_map: Sequence[int], encoder_map: Sequence[int] | None,
                  budget: DistillBudget, kd: KDConfig, *, seq_kd: bool = False, name: str = "student",
                  progress: bool = True) -> DistillResult:
    """make_student + distill on the preset's data, with the run recorded in the student's meta."""

    start = time.perf_counter()
    student = make_student(teacher, decoder_map, encoder_map, name=name)
    if seq_kd and budget.steps:
        train = data.read_tsv(ensure_seq_kd(preset, teacher, budget.seq_kd_sentences))
    else:
        train = data.load_split("train", limit=budget.train_sentences) if budget.steps else []
    dev = data.load_split("dev", limit=budget.dev_sentences) if budget.dev_sentences else []
    result = distill(teacher, student, train, dev, budget, kd, progress=progress)
    result.student.meta["distillation"].update(
        loss_weights={"alpha": kd.alpha, "beta": kd.beta, "gamma": kd.gamma},
        temperature={"start": kd.t_start, "end": kd.t_end, "schedule": "linear"},
        steps=budget.steps, batch_size=budget.batch_size, train_pairs=len(train), seq_kd=seq_kd,
        dev_sentences=len(dev), final_dev_bleu=_round(result.history[-1]["dev_bleu"]),
        teacher_dev_bleu=_round(greedy_bleu(teacher.model, teacher.tokenizer, dev)) if dev else None,
        history=[{k: _round(v) for k, v in row.items()} for row in result.history],
        loss_curve=thin_history(result.losses), wall_time_s=round(time.perf_counter() - start, 1),
        threads=torch.get_num_threads(), torch=torch.__version__)
    return result


def _round(x, digits: int = 3):
    return round(x, digits) if isinstance(x, float) else x
