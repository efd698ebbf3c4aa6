"""Typed presets: one name selects the model and every budget of a run.

    >>> Preset.from_name("ci").eval_sentences
    100
    >>> Preset.from_name("ci").prune.finetune_steps   # notebook 02's recovery fine-tune on ci
    30

Presets are registry entries (`PRESETS`), never copied dicts: a notebook's `PRESET = "ci"`
parameter becomes `Preset.from_name(PRESET)`, and every stage reads its budget from it
(`preset.prune`, `preset.distill`, `preset.quant`, `preset.kv`, `preset.profile`, `preset.trt`,
`preset.serve`, `preset.shortlist`; `preset.distill_shallow` for the shallow-decoder students). An unknown name is a KeyError that lists the known ones. Left out: configuration
files (a preset is code, reviewed like code) and per-machine overrides (use `preset.with_(...)` in
a notebook).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class ModelSpec:
    """Where a preset's model comes from: kind teacher | marian | opus-mt-shape."""

    kind: str
    name_or_path: str | None = None  # hub id or local directory for kind 'marian'



# ---------------------------------------------------------------- budgets, one dataclass per stage


@dataclass(frozen=True)
class ProfileBudget:
    """How much profiling one model gets in notebook 01."""

    sentences: int  # bench sentences timed one by one for the stage breakdown
    warmup: int  # untimed calls before each measurement
    repeats: int  # timed calls per sentence, per input length and per thread count
    lengths: tuple[int, ...] | None = None  # source lengths in tokens; None = the preset's profile_lengths
    thread_counts: tuple[int, ...] | None = None  # None = the preset's thread_counts
    top_ops: int = 15  # rows of the operator table


@dataclass(frozen=True)
class PruneBudget:
    """Notebook 02: head importance, the pruning sweep and the recovery fine-tune."""

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


@dataclass(frozen=True)
class DistillBudget:
    """Notebook 03: how long one student trains, and on what."""

    steps: int  # optimizer steps; 0 builds the student without training (speed-only presets)
    batch_size: int
    lr: float  # peak AdamW learning rate (the student starts from trained weights: lower than from scratch)
    warmup: int
    eval_every: int  # dev BLEU every this many steps: the recovery curve
    train_sentences: int | None  # training pairs used (None: the whole train split)
    dev_sentences: int  # dev pairs scored for the recovery curve
    seq_kd_sentences: int  # source sentences the teacher translates for sequence-level KD
    bleu_gap_target: float  # the aim for teacher BLEU - student BLEU: a ledger gate (over it: status "failed")


@dataclass(frozen=True)
class QuantBudget:
    """Notebook 05: calibration, the gates' sentences and the engines timed."""

    calibration_sentences: int  # training sentences decoded by the fp32 graphs to record calibration feeds
    calibration_batch: int  # sentences per calibration batch
    keep_every: int  # keep every k-th decoder-with-past feed (bounds calibration memory and time)
    eval_sentences: int  # test sentences every gate and the sensitivity study score (quality presets)
    method: str = "minmax"  # default calibration method of the qdq recipe
    methods: tuple[str, ...] = ("minmax", "entropy", "percentile")  # compared in notebook 05 (entropy ~1 min)
    percentile: float = 99.999  # for method "percentile"
    # engines notebook 05 times in their own processes (labkit bench variants); each costs a
    # process start and a model load, so ci times the dynamic recipe against its parent and the peer
    bench_variants: tuple[str, ...] = ("ort-fp32", "ort-int8", "ort-int8-qdq", "ct2-fp32", "ct2-int8")


@dataclass(frozen=True)
class Setting:
    """One decoding shape notebook 07 times: beams and batch rows."""

    num_beams: int = 1
    batch: int = 1

    @property
    def label(self) -> str:
        return f"{'greedy' if self.num_beams == 1 else f'beam {self.num_beams}'}, batch {self.batch}"


@dataclass(frozen=True)
class KvBudget:
    """Notebook 07: the per-position cost of each KV-cache mode."""

    tokens: int = 128  # forced decode length: positions 1..tokens are timed
    repeats: int = 3  # timed decodes per (mode, setting); the per-position median is plotted
    warmup: int = 1  # untimed decodes first
    settings: tuple[Setting, ...] = (Setting(1, 1), Setting(4, 1), Setting(1, 8))
    none_settings: tuple[Setting, ...] = (Setting(1, 1), Setting(4, 1), Setting(1, 8))  # O(n^2) mode: trim here
    model: str = "opus-mt-shape"  # ModelSpec kind of the model timed (realistic shape)


@dataclass(frozen=True)
class TrtBudget:
    """Notebook 06 and `labkit gpu-check`: the true-fp16 subset, the int8 parity feeds, the GPU timing."""

    reference_sentences: int = 4  # greedy decodes run in true fp16 by onnx.reference (numpy: ~0.1 s a step)
    parity_sentences: int = 8  # test sentences whose real decode feeds the int8 parity check
    gpu_sentences: int = 8  # bench sentences timed one by one (batch 1) on the GPU
    gpu_warmup: int = 2  # untimed decodes of each sentence first
    gpu_repeats: int = 5  # timed decodes of each sentence
    gpu_budget_s: float = 480.0  # gpu-check starts no new step after this many seconds (8 minutes)


@dataclass(frozen=True)
class ServeBudget:
    """Notebook 08: which servers are started and how long each load point runs."""

    # variants served (each gated first): ort-int8's per-tensor scales make answers depend on the batch, ort-int8-token
    # is the same weights with per-token scales (batch-invariant, ~1.4x slower per call), ort-int8-token-sl that over
    # the vocabulary shortlist (each sentence its own candidates); ct2-int8 is the peer
    engines: tuple[str, ...] = ("torch", "ort-int8", "ort-int8-token", "ort-int8-token-sl", "ct2-int8")
    modes: tuple[str, ...] = ("serial", "static", "continuous", "continuous+cache")  # nb08_serving.MODES (ct2: its own)
    concurrency: tuple[int, ...] = (1, 2, 5, 8, 16, 32)  # closed-loop clients per point
    rates: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0)  # open-loop Poisson arrivals/s (continuous mode only)
    duration_s: float = 10.0  # measured window per point
    warmup_s: float = 2.0  # load before the window, not counted
    max_batch_size: int = 16  # sentences per model call in the batched modes
    max_wait_ms: float = 10.0  # how long a batch is held open for company
    pool_sentences: int = 400  # test sentences the requests draw from
    zipf: float = 1.1  # draw exponent: repeats the translation cache can catch (0 = uniform)
    locust_s: float = 10.0  # duration of the locust cross-check point (0 = skip it)
    threads: int | None = None  # each server's model threads (None: one less than the preset's; nb08.serve_threads)


@dataclass(frozen=True)
class ShortlistBudget:
    """The lexical shortlist (labkit.engines.shortlist): which target pieces a batch may emit."""

    k: int = 40  # target pieces kept per source piece, by Dice co-occurrence on the training pairs
    frequent: int = 100  # most frequent target pieces, always candidates (function words, punctuation)
    min_cooc: int = 1  # pairs seen in fewer training sentences are dropped (2 lost a rare word: 1 of 1 200 test sentences)
    train_sentences: int | None = None  # training pairs counted (None: the whole train split)
    batch: int = 16  # sentences per batch for the candidate-set statistics (the bench's batch)


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelSpec  # which model the whole sequence optimizes
    prune: PruneBudget
    distill: DistillBudget
    # the 6-2 / 6-1 shallow-decoder students of notebook 03: cut further from the teacher, they start
    # further away and train longer, on the teacher's own translations (sequence-level KD)
    distill_shallow: DistillBudget
    quant: QuantBudget
    profile: ProfileBudget  # notebook 01 on this preset's own model
    profile_shape: ProfileBudget  # notebook 01 on the opus-mt-shape side (a forced 40-token decode)
    kv: KvBudget = KvBudget()
    trt: TrtBudget = TrtBudget()  # notebook 06 and labkit gpu-check
    serve: ServeBudget = ServeBudget()  # notebook 08
    shortlist: ShortlistBudget = ShortlistBudget()  # notebook 05's vocabulary shortlist (every preset: same corpus)
    quality: bool = True  # False: random weights, BLEU is meaningless and decoding is forced
    forced_length: int | None = None  # decode exactly this many tokens (speed-only presets)
    eval_sentences: int | None = 200  # test-split sentences scored for BLEU; None = all
    bench_sentences: int = 24  # sentences timed per latency measurement
    bench_warmup: int = 3
    bench_repeats: int = 5  # passes over the bench sentences; p50/p95 come from all of them
    threads: int = 2  # intra-op threads pinned for every measurement
    profile_lengths: tuple[int, ...] = (4, 8, 16, 32, 64)  # source lengths for latency-vs-length
    thread_counts: tuple[int, ...] = (1, 2)
    batch_size: int = 16  # sentences per batch for quality evaluation
    max_new_tokens: int = 64
    extra: dict = field(default_factory=dict)  # budgets of work in progress, before they get a dataclass

    @classmethod
    def from_name(cls, name: str) -> Preset:
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return PRESETS[name]

    def summary(self) -> str:
        """One line for a notebook's first output (the whole dataclass is many lines of budgets):
        "preset ci: the lab's teacher; BLEU on 100 test sentences; 8 sentences x 2 passes timed on 2 threads"."""
        model = {"teacher": "the lab's teacher", "opus-mt-shape": "random weights in opus-mt-zh-en's shape"}.get(
            self.model.kind, self.model.name_or_path or self.model.kind)
        quality = (f"BLEU on {self.eval_sentences or 'all'} test sentences" if self.quality
                   else f"no BLEU (decoding forced to {self.forced_length} tokens)")
        return (f"preset {self.name}: {model}; {quality}; {self.bench_sentences} sentences x {self.bench_repeats} "
                f"passes timed on {self.threads} threads")

    def with_(self, **changes) -> Preset:
        """A modified copy, e.g. preset.with_(eval_sentences=50) in a notebook experiment."""
        return replace(self, **changes)

    def profile_for(self, profiled: str) -> ProfileBudget:
        """Notebook 01's budget for preset `profiled`'s model in a run of this preset (its own, or the shape)."""
        if profiled == self.name:
            return self.profile
        if profiled != "opus-mt-shape":
            raise KeyError(f"preset {self.name!r} profiles its own model or 'opus-mt-shape', not {profiled!r}")
        return self.profile_shape


TEACHER = ModelSpec(kind="teacher")
OPUS_MT_ZH_EN = ModelSpec("marian", "Helsinki-NLP/opus-mt-zh-en")
OPUS_MT_SHAPE = ModelSpec(kind="opus-mt-shape")

# The opus-mt-shape side of notebook 01: its forced 40-token decode costs ~1 s a call on 2 idle
# cores (several on busy ones), so ci keeps that side to ~17 calls in all.
SHAPE_PROFILE = ProfileBudget(sentences=8, warmup=2, repeats=5)

PRESETS: dict[str, Preset] = {
    "ci": Preset(
        # The real teacher (d_model 256) costs ~4x the compute of the old synthetic one per token, and weak
        # ci students loop to max_new_tokens: subsets and steps are cut so the sequence fits ~12 min on 2 cores.
        "ci", TEACHER, eval_sentences=100, bench_sentences=8, bench_repeats=2,
        profile_lengths=(4, 16, 32), thread_counts=(1, 2),
        profile=ProfileBudget(sentences=8, warmup=2, repeats=5),  # fewer repeats made the stage-coverage check flaky
        profile_shape=ProfileBudget(sentences=1, warmup=1, repeats=2, lengths=(8, 32)),
        # ~90 s for notebook 02: three sweep points, one per-type point, a 64-sentence BLEU subset and a
        # 30-step recovery fine-tune of the 25 % point.
        prune=PruneBudget(calibration_sentences=64, fractions=(0.0, 0.25, 0.5), type_fractions=(0.5,),
                          compare_one_shot=False, eval_sentences=64, bench_sentences=4, bench_repeats=1,
                          finetune_steps=30, finetune_batch=16, finetune_frac=0.25, slider_sentences=16),
        # A short run shows the recovery curve; the gap gate honestly fails at this budget.
        distill=DistillBudget(steps=20, batch_size=32, lr=5e-4, warmup=5, eval_every=10,
                              train_sentences=1000, dev_sentences=24, seq_kd_sentences=480,
                              bleu_gap_target=1.5),
        # A 1- or 2-layer decoder cut from the teacher starts near 0 dev BLEU and needs thousands of
        # steps (workshop); ci trains each briefly on the 6-4 students' seq-KD data (shared cache) to
        # show the mechanics and the speed, and its gate honestly fails.
        distill_shallow=DistillBudget(steps=30, batch_size=32, lr=1e-3, warmup=10, eval_every=15,
                                      train_sentences=1000, dev_sentences=24, seq_kd_sentences=480,
                                      bleu_gap_target=1.5),
        quant=QuantBudget(calibration_sentences=16, calibration_batch=16, keep_every=4, eval_sentences=32,
                          methods=("minmax", "percentile"), bench_variants=("ort-fp32", "ort-int8", "ct2-int8")),
        # ~60 s on 2 cores; the no-cache mode only greedy batch 1 (it is the O(n^2) one)
        kv=KvBudget(tokens=128, repeats=1, warmup=0, settings=(Setting(1, 1), Setting(4, 1), Setting(1, 8)),
                    none_settings=(Setting(1, 1),)),
        # 10 servers (torch, ort-int8-token and its shortlist x serial, static, continuous; CTranslate2's own
        # batching) starting together, then 3 points each of 3 s after 1 s of warm-up (shorter windows swing by 2x
        # on a busy machine)
        serve=ServeBudget(engines=("torch", "ort-int8-token", "ort-int8-token-sl", "ct2-int8"),
                          modes=("serial", "static", "continuous"),
                          concurrency=(1, 8, 32), rates=(), duration_s=3.0, warmup_s=1.0, pool_sentences=200,
                          locust_s=0.0),
    ),
    "workshop": Preset(
        "workshop", TEACHER, eval_sentences=None, bench_sentences=64, bench_repeats=10,
        profile_lengths=(4, 8, 16, 32, 64, 96), thread_counts=(1, 2, 4),
        profile=ProfileBudget(sentences=32, warmup=3, repeats=10), profile_shape=SHAPE_PROFILE,
        prune=PruneBudget(calibration_sentences=512, eval_sentences=None, finetune_steps=300),
        distill=DistillBudget(steps=2000, batch_size=32, lr=5e-4, warmup=100, eval_every=250,
                              train_sentences=None, dev_sentences=200, seq_kd_sentences=20000,
                              bleu_gap_target=1.5),
        # the 6-4 student's steps at twice its learning rate, on the teacher's translations (seq-KD)
        distill_shallow=DistillBudget(steps=2000, batch_size=32, lr=1e-3, warmup=200, eval_every=500,
                                      train_sentences=None, dev_sentences=200, seq_kd_sentences=20000,
                                      bleu_gap_target=1.5),
        quant=QuantBudget(calibration_sentences=256, calibration_batch=16, keep_every=2, eval_sentences=500),
        kv=KvBudget(tokens=192, repeats=3),
    ),
    "opus-mt-zh-en": Preset(
        "opus-mt-zh-en", OPUS_MT_ZH_EN, eval_sentences=500, bench_sentences=32, bench_repeats=5,
        profile=ProfileBudget(sentences=16, warmup=3, repeats=5), profile_shape=SHAPE_PROFILE,
        prune=PruneBudget(calibration_sentences=128, calibration_batch=8, type_fractions=(0.5,),
                          compare_one_shot=False, eval_sentences=200),
        # The real opus-mt model: a short fine-tune on the committed corpus (77 M parameters on CPU).
        distill=DistillBudget(steps=300, batch_size=16, lr=5e-5, warmup=30, eval_every=100,
                              train_sentences=4800, dev_sentences=100, seq_kd_sentences=4800,
                              bleu_gap_target=3.0),
        distill_shallow=DistillBudget(steps=600, batch_size=16, lr=1e-4, warmup=60, eval_every=200,
                                      train_sentences=4800, dev_sentences=100, seq_kd_sentences=4800,
                                      bleu_gap_target=3.0),
        quant=QuantBudget(calibration_sentences=128, calibration_batch=8, keep_every=4, eval_sentences=300),
        kv=KvBudget(tokens=128, repeats=3),
    ),
    "opus-mt-shape": Preset(
        "opus-mt-shape", OPUS_MT_SHAPE, quality=False, forced_length=40, eval_sentences=0,
        bench_sentences=8, bench_repeats=3, profile_lengths=(8, 16, 32, 64),
        profile=SHAPE_PROFILE, profile_shape=SHAPE_PROFILE,
        # random weights: importance is meaningless, the sweep is about speed only
        prune=PruneBudget(calibration_sentences=16, calibration_batch=8, fractions=(0.0, 0.25, 0.5),
                          type_fractions=(), compare_one_shot=False, slider_sentences=0),
        # Random weights: the student is a speed shape only, so it is built, not trained.
        distill=DistillBudget(steps=0, batch_size=16, lr=0.0, warmup=0, eval_every=1,
                              train_sentences=0, dev_sentences=0, seq_kd_sentences=0,
                              bleu_gap_target=float("inf")),
        distill_shallow=DistillBudget(steps=0, batch_size=16, lr=0.0, warmup=0, eval_every=1,
                                      train_sentences=0, dev_sentences=0, seq_kd_sentences=0,
                                      bleu_gap_target=float("inf")),
        quant=QuantBudget(calibration_sentences=16, calibration_batch=8, keep_every=8, eval_sentences=0,
                          methods=("minmax",)),
        kv=KvBudget(tokens=128, repeats=3),
    ),
}
