"""Workshop exercises and the checks that teach: the participant writes the key lines, a check says what is wrong.

    def kd_loss(student_logits, teacher_logits, T):
        raise NotImplementedError("T^2 * KL(teacher || student) at temperature T")   # the participant's stub
    kd_loss = exercises.check_kd_loss(kd_loss)
    # exercise kd-loss: not done yet (NotImplementedError): the notebook goes on with the library's version

Each `Exercise` holds the library's reference, small fixed inputs, and the plausible wrong answers that
workshops meet, each with its hint. `verdict(exercise, fn)` runs `fn` on every input and compares with the
reference: equal on all → passed; equal to a known wrong answer on all → that answer's hint ("the loss is
T^2 = 4x too small: multiply the KL term by T^2"); otherwise the first input where it differs, with what
was expected. An unfinished exercise (the stub raises NotImplementedError) is "not done yet". Whatever
the verdict, the check returns a function the rest of the notebook can trust: the participant's when it
passed, else the reference, so one stuck participant still runs the whole notebook.

Every verdict is printed on one line that starts `exercise <name>: <status>`, which is what
`labkit workshop status` reads back from executed notebooks. Left out: timing limits and grading scores
(nbgrader's territory); checks are for learning, nothing is recorded.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from labkit.compress.distill import soft_kl
from labkit.compress.prune import normalize_per_layer
from labkit.engines.trt_graphs import FP16_MAX
from labkit.measure import plots
from labkit.serve.batcher import Job, select_batch

PASSED, NOT_DONE, WRONG = "passed", "not done yet", "wrong"
VERDICT_PREFIX = "exercise "


@dataclass(frozen=True)
class Exercise:
    name: str
    notebook: str  # "03" — where it lives
    minutes: int  # what it should take a participant
    task: str  # what to write, in one sentence (the stub's message)
    reference: Callable
    cases: Sequence[tuple]  # positional arguments, small and fixed
    wrong: Sequence[tuple[Callable, str]] = ()  # (a plausible wrong answer, the hint that corrects it)
    close: Callable[[Any, Any], bool] = field(default=lambda a, b: _close(a, b))


@dataclass(frozen=True)
class Verdict:
    exercise: str
    status: str  # passed | not done yet | wrong
    message: str

    def __str__(self) -> str:
        mark = {PASSED: "✓", NOT_DONE: "…", WRONG: "✗"}[self.status]
        return f"{VERDICT_PREFIX}{self.exercise}: {self.status} {mark} {self.message}".rstrip()


def _close(a, b, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    """Numbers, arrays, tensors, and tuples/lists/sets/dicts of them, equal within tolerance."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x for x in (a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rtol, atol) for k in a)
    if isinstance(a, set | frozenset) or isinstance(b, set | frozenset):
        return isinstance(a, set | frozenset) and isinstance(b, set | frozenset) and a == b
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_close(x, y, rtol, atol) for x, y in zip(a, b))
    try:
        a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    except (TypeError, ValueError):
        return a == b
    return a_arr.shape == b_arr.shape and bool(np.allclose(a_arr, b_arr, rtol=rtol, atol=atol))


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return np.array2string(value, precision=4, threshold=8, suppress_small=True).replace("\n", "")
    if isinstance(value, float):
        return f"{value:.6g}"
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def verdict(exercise: Exercise, fn: Callable | None) -> Verdict:
    """Run `fn` on the exercise's inputs and say what is right or wrong with it (nothing is printed)."""
    if fn is None:
        return Verdict(exercise.name, NOT_DONE, "(no function given)")
    outputs = []
    for args in exercise.cases:
        try:
            outputs.append(fn(*_copy(args)))
        except NotImplementedError:
            return Verdict(exercise.name, NOT_DONE, f"— {exercise.task} (about {exercise.minutes} min)")
        except Exception as exc:  # the participant's code: any error is feedback, not a crash
            return Verdict(exercise.name, WRONG, f"it raised {type(exc).__name__}: {exc} on inputs {_short(args)}")
    expected = [exercise.reference(*_copy(args)) for args in exercise.cases]
    if all(exercise.close(out, exp) for out, exp in zip(outputs, expected)):
        return Verdict(exercise.name, PASSED, f"on {len(exercise.cases)} inputs")
    for wrong_fn, hint in exercise.wrong:
        if all(exercise.close(out, _try(wrong_fn, args)) for out, args in zip(outputs, exercise.cases)):
            return Verdict(exercise.name, WRONG, hint)
    k = next(i for i, (out, exp) in enumerate(zip(outputs, expected)) if not exercise.close(out, exp))
    return Verdict(exercise.name, WRONG, f"for inputs {_short(exercise.cases[k])} it returned {_short(outputs[k])}, "
                                         f"expected {_short(expected[k])}")


def _try(fn: Callable, args: tuple):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a known wrong answer's own warnings are not the participant's
            return fn(*_copy(args))
    except Exception:  # a known wrong answer that cannot even run on this input matches nothing
        return _NOTHING


_NOTHING = object()


def _copy(args: tuple) -> tuple:
    """Fresh copies of mutable inputs, so a function that changes its arguments in place spoils nothing."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a.clone())
        elif isinstance(a, np.ndarray):
            out.append(a.copy())
        elif isinstance(a, list | dict):
            out.append(type(a)(a))
        else:
            out.append(a)
    return tuple(out)


def check_exercise(exercise: Exercise, fn: Callable | None) -> Callable:
    """Print the verdict; return `fn` when it passed, else the library's reference (so the notebook goes on)."""
    v = verdict(exercise, fn)
    print(str(v) + ("" if v.status == PASSED else "; the notebook goes on with the library's version"))
    return fn if v.status == PASSED else exercise.reference


# ================================================================== the exercises, notebook by notebook
# 01 — profiling: Amdahl's law bounds what speeding up one stage can give.


def amdahl_speedup(fraction: float, factor: float) -> float:
    """Whole-program speed-up when a stage taking `fraction` of the time becomes `factor` times faster."""
    return 1.0 / ((1.0 - fraction) + fraction / factor)


AMDAHL = Exercise(
    "amdahl", "01", 5, "return the whole translation's speed-up when one stage gets `factor` times faster",
    amdahl_speedup, cases=[(0.6, 3.0), (0.9, 10.0), (0.25, 2.0), (1.0, 4.0)],
    wrong=[(lambda f, s: s, "that is the stage's own speed-up: the other (1 - fraction) of the time does not get "
                            "faster"),
           (lambda f, s: 1.0 / (1.0 - f) if f < 1 else math.inf,
            "that is the bound for an infinitely fast stage: use `factor` (the stage still takes fraction/factor)"),
           (lambda f, s: (1.0 - f) + f / s, "that is the new time as a share of the old: the speed-up is its inverse"),
           (lambda f, s: 1.0 / (f + (1.0 - f) / s),
            "fraction and the rest are swapped: the stage that gets faster is the one taking `fraction`")])


# 02 — pruning: a head's importance is how much the loss moves when its gate moves.


def gate_importance(gate_grads: torch.Tensor) -> torch.Tensor:
    """(batches, layers, heads) gradients of the loss w.r.t. each head's gate -> (layers, heads) importance:
    |grad| summed over batches, each layer divided by its L2 norm (Michel et al. 2019)."""
    return normalize_per_layer({"heads": gate_grads.abs().sum(dim=0)})["heads"]


def _grads(seed: int, shape=(3, 2, 4)) -> torch.Tensor:
    layer_scale = 10.0 ** torch.arange(shape[1], dtype=torch.float32)[:, None]  # layers' gradients differ in size
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * layer_scale


HEAD_IMPORTANCE = Exercise(
    "head-importance", "02", 10, "sum |gate gradient| over batches, then divide each layer by its L2 norm",
    gate_importance, cases=[(_grads(0),), (_grads(1),), (_grads(2, (4, 3, 2)),)],
    wrong=[(lambda g: (s := g.sum(0)) / (s.norm(dim=-1, keepdim=True) + 1e-20),
            "take |gradient| before summing: signed gradients of different batches cancel out"),
           (lambda g: g.abs().sum(0), "normalize each layer (divide by its L2 norm): the layers' gradients differ in "
                                      "scale, and heads are compared across layers"),
           (lambda g: (s := g.abs().sum(0)) / s.norm(),
            "normalize per layer (norm over dim=-1, keepdim=True), not by the norm of all layers together"),
           (lambda g: (s := g.abs().sum(0)) / s.sum(dim=-1, keepdim=True),
            "divide by the layer's L2 norm (`.norm(dim=-1, keepdim=True)`), not by its sum")])


# 03 — distillation: the soft-target loss.


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over rows (tokens)."""
    every_row = torch.ones(1, student_logits.shape[0], dtype=torch.bool)
    return soft_kl(student_logits[None], teacher_logits[None], every_row, T)


def _logits(seed: int, rows: int = 5, vocab: int = 7) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _kl_rev(s, t, T):
    return F.kl_div(F.log_softmax(t / T, -1), F.log_softmax(s / T, -1), log_target=True, reduction="batchmean") * T**2


KD_LOSS = Exercise(
    "kd-loss", "03", 10, "return T^2 * KL(teacher || student) on logits softened by T, averaged over rows",
    kd_loss, cases=[(_logits(0), _logits(1), 2.0), (_logits(2), _logits(3), 4.0), (_logits(4), _logits(5), 2.0)],
    wrong=[(lambda s, t, T: kd_loss(s, t, T) / T**2,
            "the loss is T^2 times too small (4x at T=2): multiply the KL term by T^2 so its gradient keeps its size"),
           (_kl_rev, "the KL runs the wrong way: it is KL(teacher || student); in F.kl_div(input, target) the "
                     "input is the student's log-probabilities and the target the teacher's"),
           (lambda s, t, T: F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                                     reduction="batchmean") * T**2,
            "soften both distributions: divide the logits by T before the softmax"),
           (lambda s, t, T: F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                                     reduction="mean") * T**2,
            "reduction='mean' also divides by the vocabulary size: use 'batchmean' (a sum per row, mean over rows)")])


# 04 — ONNX export: parity between two graphs' outputs.


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """The parity measure between two graphs' outputs: the largest |a - b| over every element."""
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def _pair(seed: int, bad: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(2, 3, 5)).astype(np.float32)
    b = a + rng.normal(scale=1e-6, size=a.shape).astype(np.float32)
    b.flat[7] -= bad  # one element far off (above or below its twin): a mean or a signed max misses it
    return a, b


PARITY = Exercise(
    "parity", "04", 5, "return the largest absolute difference between the two outputs, over every element",
    max_abs_diff, cases=[_pair(0, 0.5), _pair(1, -2.0), _pair(2, 1e-3)],
    wrong=[(lambda a, b: float(np.mean(np.abs(a - b))),
            "a mean hides one bad logit among thousands: parity is the worst element, np.max"),
           (lambda a, b: float(np.max(b - a)), "take the absolute value: an element can be off in either direction"),
           (lambda a, b: float(np.max(a - b)), "take the absolute value: an element can be off in either direction"),
           (lambda a, b: float(np.max(np.abs(a - b) / (np.abs(a) + 1e-12))),
            "that is a relative difference: the gate's tolerance is on the absolute one (atol)")])


# 05 — int8: symmetric per-tensor quantization of a weight.


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Symmetric int8: scale = max|w| / 127, q = round(w / scale) clamped to [-127, 127]; returns (q, scale)."""
    scale = float(w.abs().max()) / 127.0
    q = torch.clamp(torch.round(w / scale), -127, 127).to(torch.int8)
    return q, scale


def _weight(seed: int, shape=(4, 6), shift: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) - shift


def _scale_max(w):
    scale = float(w.max()) / 127.0
    return torch.clamp(torch.round(w / scale), -127, 127).to(torch.int8), scale


INT8 = Exercise(
    "int8-quantize", "05", 10, "return (q, scale): scale = max|w| / 127, q = round(w / scale) clamped to [-127, 127], "
                               "as int8",
    quantize_int8, cases=[(_weight(0),), (_weight(1, shift=1.0),), (_weight(2, (3, 5)),)],
    wrong=[(lambda w: ((w / (s := float(w.abs().max()) / 127.0)).to(torch.int8), s),
            "round, don't truncate: .to(torch.int8) cuts toward zero and doubles the worst error"),
           (lambda w: (torch.clamp(torch.round(w / (s := float(w.abs().max()) / 255.0)), -127, 127).to(torch.int8), s),
            "symmetric int8 uses 127 steps per side: with max|w| / 255 the largest weights clip at ±127"),
           (_scale_max, "take the scale from max|w|, not max(w): a large negative weight clips at -127")])


def int8_error(w: torch.Tensor, q: torch.Tensor, scale: float) -> float:
    """The largest error of the round trip: max |w - q * scale| (at most scale / 2 when rounding is right)."""
    return float((w - q.float() * scale).abs().max())


# 06 — TensorRT precision: which tensors must stay fp32.

def overflowing_fp16(ranges: dict[str, tuple[float, float]], headroom: float = 1.0) -> set[str]:
    """Names of the tensors whose recorded range (low, high) does not fit fp16: max(|low|, |high|) * headroom
    above 65 504 (fp16's largest finite value)."""
    return {name for name, (lo, hi) in ranges.items() if max(abs(lo), abs(hi)) * headroom > FP16_MAX}


_RANGES = {"attn.softmax": (0.0, 1.0), "ffn.fc1": (-310.0, 288.0), "ln.pow": (0.0, 1.8e5),
           "attn.scores": (-9.1e4, 40.0), "logits": (-31.0, 25.0)}

KEEP_FP32 = Exercise(
    "keep-fp32", "06", 10, "return the set of names whose range overflows fp16 (max |value| * headroom > 65 504)",
    overflowing_fp16, cases=[(_RANGES, 1.0), (_RANGES, 1000.0), ({"a": (-7e4, 7e4)}, 1.0)],
    wrong=[(lambda r, h=1.0: {n for n, (lo, hi) in r.items() if hi * h > FP16_MAX},
            "a range's low end overflows too: compare max(|low|, |high|)"),
           (lambda r, h=1.0: {n for n, (lo, hi) in r.items() if max(abs(lo), abs(hi)) > FP16_MAX},
            "apply the headroom: a range seen in calibration can be exceeded by inputs never seen"),
           (lambda r, h=1.0: {n for n, (lo, hi) in r.items() if max(abs(lo), abs(hi)) * h > 127},
            "127 is int8's limit; fp16's largest finite value is 65 504")])


# 07 — KV cache: one cached decoder step feeds only the newest token, at the right position.


def cached_step_inputs(generated: list[int], past_length: int) -> tuple[list[int], int]:
    """(the token ids the decoder sees this step, the position of the first of them) with `past_length`
    tokens already in the cache: only the newest token, at position past_length (positions start at 0)."""
    return generated[-1:], past_length


CACHED_STEP = Exercise(
    "cached-step", "07", 10, "return ([the newest token], its position) when past_length tokens are cached",
    cached_step_inputs, cases=[([65000, 12, 7], 2), ([65000], 0), ([65000, 3, 3, 9, 4], 4)],
    wrong=[(lambda g, p: (list(g), 0), "feeding every token again is decoding without a cache: the cache already "
                                       "holds their keys and values; feed only the newest"),
           (lambda g, p: (g[-1:], p + 1), "off by one: positions count from 0, so with past_length tokens cached "
                                          "the new one is at position past_length")])


# 08 — serving: Little's law, and the micro-batcher's choice.


def clients_in_system(sentences_per_s: float, latency_ms: float) -> float:
    """Little's law: sentences in the system on average, L = throughput x latency (in seconds)."""
    return sentences_per_s * latency_ms / 1000.0


LITTLE = Exercise(
    "littles-law", "08", 5, "return L = throughput x latency, with the latency in seconds",
    clients_in_system, cases=[(40.0, 200.0), (12.5, 640.0), (3.0, 1500.0)],
    wrong=[(lambda x, w: x * w, "1000x too large: the latency is in milliseconds, the throughput per second"),
           (lambda x, w: x / (w / 1000.0), "multiply, don't divide: L = lambda x W"),
           (lambda x, w: w / 1000.0 / x, "multiply, don't divide: L = lambda x W")])


def choose_batch(lengths: list[int], max_size: int) -> list[int]:
    """Queue positions of the next batch (`lengths`: waiting sentences' token counts, oldest first): the oldest,
    then those closest to it in length (ties to the older), at most `max_size`, in queue order."""
    jobs = [Job(ids=[0] * n, beams=1, future=None) for n in lengths]
    chosen = {id(j) for j in select_batch(jobs, max_size)}
    return [i for i, j in enumerate(jobs) if id(j) in chosen]


CHOOSE_BATCH = Exercise(
    "choose-batch", "08", 10, "return the queue positions of the next batch: the oldest, then the closest in length",
    choose_batch, cases=[([5, 30, 6, 29, 4], 3), ([12, 3, 40, 11, 13, 12], 4), ([7, 8], 4), ([20, 2, 21, 3, 19], 2)],
    wrong=[(lambda lengths, m: list(range(min(m, len(lengths)))),
            "first come, first served pads short sentences to long ones: after the oldest, take the closest in length"),
           (lambda lengths, m: sorted(sorted(range(len(lengths)), key=lambda i: (lengths[i], i))[:m]),
            "the oldest sentence must always go, or a long sentence can wait forever; then the closest to *its* length"),
           (lambda lengths, m: sorted(sorted(range(len(lengths)), key=lambda i: (abs(lengths[i] - lengths[0]), -i))[:m]),
            "ties go to the older sentence (the smaller queue position)")])


# 09 — the story: the Pareto frontier of latency and BLEU.


def pareto_indices(latency: list[float], quality: list[float]) -> list[int]:
    """Indices of the points no other point beats on both axes (faster and at least as good), by latency."""
    return plots.pareto_frontier(latency, quality)


PARETO = Exercise(
    "pareto", "09", 10, "return the indices of the points no other point beats on both axes, fastest first",
    pareto_indices, cases=[([10, 20, 15, 30], [50, 60, 40, 61]), ([5, 7, 9, 11, 12], [30, 29, 33, 33, 40]),
                            ([3.0, 1.0, 2.0], [1.0, 3.0, 2.0])],
    wrong=[(lambda lat, q: sorted(range(len(lat)), key=lambda i: lat[i]),
            "a point slower *and* worse than another is not on the frontier: drop it"),
           (lambda lat, q: [i for i in sorted(range(len(lat)), key=lambda i: lat[i])
                            if all(q[i] >= q[j] for j in range(len(lat)) if lat[j] < lat[i])],
            "a slower point must be strictly better to be on the frontier: an equal BLEU at more latency is beaten")])


EXERCISES: dict[str, Exercise] = {e.name: e for e in (AMDAHL, HEAD_IMPORTANCE, KD_LOSS, PARITY, INT8, KEEP_FP32,
                                                      CACHED_STEP, LITTLE, CHOOSE_BATCH, PARETO)}


def _checker(exercise: Exercise) -> Callable[[Callable], Callable]:
    def checker(fn: Callable) -> Callable:
        return check_exercise(exercise, fn)

    checker.__name__ = checker.__qualname__ = "check_" + exercise.name.replace("-", "_")
    checker.__doc__ = (f"Notebook {exercise.notebook}'s exercise: {exercise.task}. Prints the verdict and "
                              "returns the function to go on with (`check_exercise`).")
    return checker


check_amdahl = _checker(AMDAHL)
check_head_importance = _checker(HEAD_IMPORTANCE)
check_kd_loss = _checker(KD_LOSS)
check_parity = _checker(PARITY)
check_int8_quantize = _checker(INT8)
check_keep_fp32 = _checker(KEEP_FP32)
check_cached_step = _checker(CACHED_STEP)
check_littles_law = _checker(LITTLE)
check_choose_batch = _checker(CHOOSE_BATCH)
check_pareto = _checker(PARETO)
