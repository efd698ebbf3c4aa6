"""The training primitives every model of the lab shares: tokenizers, the Marian shape rules, `fit`.

    build_tokenizer(pairs, out_dir)      # source/target sentencepiece + the opus-mt vocabulary layout
    fit(model, tokenizer, train, dev, steps=..., batch_size=..., lr=..., warmup=..., eval_every=...)
    python -m labkit.compress.training teacher --config tiny --steps 200 --out /tmp/t   # a quick small model

The lab's teacher is trained by labkit.compress.teacher (the full NMT recipe, resumable, torchrun);
`fit` is the short loop distillation (labkit.compress.distill, through its `loss_fn` argument) and the
tests' tiny fixture use. Left out: mixed precision and several processes (labkit.compress.teacher has them).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from labkit.core import data
from labkit.core.bundle import TEACHER_DIR, Bundle, load_bundle, start_row_norm
from labkit.measure.progress import bar as progress_bar
from labkit.measure.quality import reference_streams

SPECIALS = ("</s>", "<unk>")  # ids 0 and 1, as in opus-mt; <pad> is appended last


@dataclass(frozen=True)
class TeacherConfig:
    d_model: int = 128
    encoder_layers: int = 6
    decoder_layers: int = 6
    heads: int = 8  # per attention; 6 layers x 8 heads make pruning and 6->4 distillation meaningful
    ffn: int = 512
    src_vocab: int = 4000  # sentencepiece pieces for Chinese
    tgt_vocab: int = 2000
    zh_coverage: float = 0.999  # the rarest Chinese characters become <unk> (coverage 1.0 needs a piece each)
    max_positions: int = 256
    dropout: float = 0.1
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 300
    label_smoothing: float = 0.1
    eval_every: int = 500
    eval_sentences: int = 200
    seed: int = 0

    @classmethod
    def from_name(cls, name: str) -> TeacherConfig:
        if name not in TEACHER_CONFIGS:
            raise KeyError(f"unknown teacher config {name!r}; known: {', '.join(TEACHER_CONFIGS)}")
        return TEACHER_CONFIGS[name]


TEACHER_CONFIGS = {
    "teacher": TeacherConfig(),
    # a few-second model for tests: same shape rules, tiny sizes
    # d_model 64 and 1 000 target pieces: at 32 / 300 a few hundred steps on real sentences give one output
    # ('I') for almost every input, and the oracle tests need outputs that vary
    "tiny": TeacherConfig(d_model=64, encoder_layers=2, decoder_layers=2, heads=4, ffn=128,
                          src_vocab=3000, tgt_vocab=1000,  # 6 000 Tatoeba pairs hold ~2 300 characters steps=150, batch_size=32, lr=3e-3,
                          warmup=30, eval_every=75, eval_sentences=40),
}


# --------------------------------------------------------------------------- tokenizer


def _train_spm(texts: list[str], prefix: Path, vocab_size: int, coverage: float = 1.0) -> Path:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(prefix), vocab_size=vocab_size,
        model_type="unigram", character_coverage=coverage, hard_vocab_limit=False,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2, num_threads=2)
    spm_path = prefix.with_suffix(".spm")
    prefix.with_suffix(".model").replace(spm_path)
    prefix.with_suffix(".vocab").unlink()
    return spm_path


def _joint_vocab(*spm_paths: Path) -> dict[str, int]:
    """</s>=0, <unk>=1, every piece of both models once, then <pad> last.

    Pad last and decoder_start = pad is the opus-mt layout that CTranslate2's
    converter expects.
    """
    import sentencepiece as spm

    pieces = list(SPECIALS)
    seen = set(pieces)
    for path in spm_paths:
        sp = spm.SentencePieceProcessor(model_file=str(path))
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if piece not in seen and not sp.is_unknown(i) and not sp.is_control(i):
                pieces.append(piece)
                seen.add(piece)
    pieces.append("<pad>")
    return {p: i for i, p in enumerate(pieces)}


def build_tokenizer(pairs: list[data.Pair], out_dir: Path, src_vocab: int = 1000,
                    tgt_vocab: int = 800, zh_coverage: float = 1.0):
    """Train source/target sentencepiece models and wrap them in a MarianTokenizer (`zh_coverage` < 1
    leaves the rarest Chinese characters to <unk>)."""
    from transformers import MarianTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = _train_spm([p.zh for p in pairs], out_dir / "source", src_vocab, zh_coverage)
    tgt = _train_spm([p.en for p in pairs], out_dir / "target", tgt_vocab)
    (out_dir / "vocab.json").write_text(json.dumps(_joint_vocab(src, tgt), ensure_ascii=False))
    return MarianTokenizer(str(src), str(tgt), str(out_dir / "vocab.json"), model_max_length=256)


# --------------------------------------------------------------------------- model


def build_model(cfg: TeacherConfig, tokenizer):
    """A MarianMTModel of the configured shape (scale_embedding=True: without it, it won't learn)."""
    from transformers import MarianConfig, MarianMTModel

    pad = tokenizer.pad_token_id
    config = MarianConfig(
        vocab_size=len(tokenizer), d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers, encoder_attention_heads=cfg.heads,
        decoder_attention_heads=cfg.heads, encoder_ffn_dim=cfg.ffn, decoder_ffn_dim=cfg.ffn,
        activation_function="swish", max_position_embeddings=cfg.max_positions,
        scale_embedding=True, pad_token_id=pad, decoder_start_token_id=pad,
        eos_token_id=tokenizer.eos_token_id, forced_eos_token_id=tokenizer.eos_token_id,
        dropout=cfg.dropout, attention_dropout=0.0, activation_dropout=0.0)
    torch.manual_seed(cfg.seed)
    model = MarianMTModel(config)
    model.generation_config.bad_words_ids = [[pad]]
    model.generation_config.num_beams = 1
    return model


# --------------------------------------------------------------------------- training


def encode_pairs(tokenizer, pairs: list[data.Pair], max_len: int = 128) -> list[tuple[list[int], list[int]]]:
    """Token ids of each pair (both sides end with </s>)."""
    src = tokenizer([p.zh for p in pairs], truncation=True, max_length=max_len)["input_ids"]
    tgt = tokenizer(text_target=[p.en for p in pairs], truncation=True, max_length=max_len)["input_ids"]
    return list(zip(src, tgt))


def length_batches(examples: list, batch_size: int, rng: random.Random) -> list[list]:
    """Shuffle, sort within pools of 50 batches by length (less padding), shuffle the batches."""
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    pool = batch_size * 50
    batches = []
    for i in range(0, len(idx), pool):
        chunk = sorted(idx[i:i + pool], key=lambda j: len(examples[j][0]))
        batches += [[examples[j] for j in chunk[k:k + batch_size]] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch; labels use -100 where padded so the loss ignores them."""
    def pad(seqs, value):
        width = max(len(s) for s in seqs)
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs])

    input_ids = pad([s for s, _ in batch], pad_id)
    labels = pad([t for _, t in batch], -100)
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(), "labels": labels}


def label_smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=-100, label_smoothing=smoothing)


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10 %: lr_at(0, 1, 10, 100) == 0.1."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def greedy_scores(model, tokenizer, pairs: list[data.Pair], *, device="cpu", batch_size: int = 50,
                  max_new_tokens: int = 96) -> tuple[float, float]:
    """(BLEU, chrF) of HF greedy generate on `pairs`, every reference used (a training-time check; the
    lab's metric is `measure.quality.evaluate` on a Translator)."""
    import sacrebleu

    model.eval()
    hyps = []
    with torch.inference_mode():
        for batch in data.iter_batches(pairs, batch_size):
            enc = tokenizer([p.zh for p in batch], return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, num_beams=1, do_sample=False, max_new_tokens=max_new_tokens, max_length=None)
            hyps += tokenizer.batch_decode(out, skip_special_tokens=True)
    refs = reference_streams([p.references for p in pairs])
    return sacrebleu.corpus_bleu(hyps, refs).score, sacrebleu.corpus_chrf(hyps, refs).score


def greedy_bleu(model, tokenizer, pairs: list[data.Pair], batch_size: int = 50) -> float:
    """Corpus BLEU of HF greedy generate on `pairs`."""
    return greedy_scores(model, tokenizer, pairs, batch_size=batch_size)[0]


def freeze_positions(model) -> None:
    """Keep Marian's sinusoidal position tables out of training (in place).

    transformers 5 leaves them `requires_grad=True` but never saves them (`_keys_to_ignore_on_save`;
    a load recomputes them), so a fine-tune that moved them would be measured on one model and
    saved as another: a few steps at lr 2e-3 already change the tiny fixture's greedy output.
    """
    for stack in (model.model.encoder, model.model.decoder):
        stack.embed_positions.weight.requires_grad_(False)


def pin_start_row(model) -> None:
    """Zero the decoder-start (<pad>) embedding row, in place: Marian and CTranslate2 start decoding from
    a zero vector, so a model is faithful to them only while this row is zero.

    With tied embeddings the LM head's gradient trains the row; `fit` zeroes it again after every
    step, so teachers, pruned and distilled bundles all keep it at zero.
    """
    start = model.config.decoder_start_token_id
    tables = {id(e.weight): e.weight for e in (model.get_input_embeddings(), model.get_decoder().embed_tokens)}
    with torch.no_grad():
        for weight in tables.values():
            weight[start].zero_()


def fit(model, tokenizer, train: list[data.Pair], dev: list[data.Pair], *, steps: int,
        batch_size: int, lr: float, warmup: int, eval_every: int, seed: int = 0,
        loss_fn: Callable | None = None, label_smoothing: float = 0.1,
        progress: bool = True) -> list[dict]:
    """Train `model` for `steps` optimizer steps; return the history of loss and dev BLEU.

    `loss_fn(model, batch) -> loss` replaces the default label-smoothed CE
    (distillation plugs its KD loss in here). Marian's sinusoidal position tables stay frozen
    (`freeze_positions`): what is saved must be what was trained and measured. The decoder-start
    row stays at zero (`pin_start_row`), as Marian runtimes assume.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    torch.set_flush_denormal(True)  # tiny gradients turn denormal and slow CPU matmuls several-fold
    examples = encode_pairs(tokenizer, train)
    freeze_positions(model)
    pin_start_row(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    history, batches, step = [], [], 0
    bar = progress_bar(steps, "train", disable=not progress)
    running = None
    while step < steps:
        if not batches:
            batches = length_batches(examples, batch_size, rng)
        batch = collate(batches.pop(), tokenizer.pad_token_id)
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, warmup, steps)
        if loss_fn is None:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).logits
            loss = label_smoothed_ce(logits, batch["labels"], label_smoothing)
        else:
            loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        pin_start_row(model)  # AdamW's momentum and weight decay would move it off zero again
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}")
        if step % eval_every == 0 or step == steps:
            bleu = greedy_bleu(model, tokenizer, dev)
            history.append({"step": step, "loss": running, "dev_bleu": bleu})
            bar.write(f"step {step}: loss {running:.3f}  dev BLEU {bleu:.1f}")
    bar.close()
    model.eval()
    return history


def train_teacher(cfg: TeacherConfig, out: Path, *, train: list[data.Pair] | None = None,
                  dev: list[data.Pair] | None = None, command: str = "", progress: bool = True,
                  storage_dtype: torch.dtype = torch.float16) -> Bundle:
    """Tokenizers + model + training; writes a bundle with a sidecar that says how."""
    train = train if train is not None else data.load_split("train")
    dev = (dev if dev is not None else data.load_split("dev"))[: cfg.eval_sentences]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(train, Path(tmp), cfg.src_vocab, cfg.tgt_vocab, cfg.zh_coverage)
        model = build_model(cfg, tokenizer)
        history = fit(model, tokenizer, train, dev, steps=cfg.steps, batch_size=cfg.batch_size,
                      lr=cfg.lr, warmup=cfg.warmup, eval_every=cfg.eval_every, seed=cfg.seed,
                      label_smoothing=cfg.label_smoothing, progress=progress)
        meta = {
            "name": "teacher", "derived_from": None, "technique": "trained from scratch",
            "training": {"command": command, "config": asdict(cfg), "train_pairs": len(train),
                         "wall_time_s": round(time.perf_counter() - start, 1),
                         "final_dev_bleu": round(history[-1]["dev_bleu"], 2), "history": history,
                         "torch": torch.__version__, "threads": torch.get_num_threads()},
        }
        bundle = Bundle(model, tokenizer, meta)
        bundle.save(out, dtype=storage_dtype)
    return bundle


@dataclass(frozen=True)
class ZeroStartTune:
    """A short fine-tune that brings a trained model's decoder-start row to zero (`pin_start_row`)."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 30
    label_smoothing: float = 0.1
    eval_sentences: int = 200
    seed: int = 1


def zero_start_finetune(bundle: Bundle, tune: ZeroStartTune = ZeroStartTune(), *, command: str = "",
                        progress: bool = True) -> dict:
    """Zero the start row of `bundle` and fine-tune it (in place) to recover; the record is appended to
    bundle.meta["training"]["fine_tunes"] and returned."""
    start, before = time.perf_counter(), start_row_norm(bundle.model)
    train = random.Random(tune.seed).sample(data.load_split("train"), tune.steps * tune.batch_size)
    history = fit(bundle.model, bundle.tokenizer, train, data.load_split("dev")[: tune.eval_sentences],
                  steps=tune.steps, batch_size=tune.batch_size, lr=tune.lr, warmup=tune.warmup,
                  eval_every=tune.steps, seed=tune.seed, label_smoothing=tune.label_smoothing, progress=progress)
    record = {"purpose": "decoder-start (<pad>) embedding row pinned at zero, as Marian/CTranslate2 assume",
              "command": command, "config": asdict(tune), "start_row_norm_before": round(before, 4),
              "start_row_norm_after": start_row_norm(bundle.model), "wall_time_s": round(time.perf_counter() - start, 1),
              "final_dev_bleu": round(history[-1]["dev_bleu"], 2), "history": history,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    bundle.meta.setdefault("training", {}).setdefault("fine_tunes", []).append(record)
    return record


def train_command(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labkit.compress.training", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("teacher", help="train a teacher on the committed corpus")
    t.add_argument("--config", default="teacher", choices=list(TEACHER_CONFIGS))
    t.add_argument("--steps", type=int)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--out", type=Path, required=True, help="where to write it (the lab's teacher: labkit.compress.teacher)")
    z = sub.add_parser("zero-start", help="fine-tune a bundle with its decoder-start row pinned at zero")
    z.add_argument("--bundle", type=Path, default=TEACHER_DIR)
    z.add_argument("--steps", type=int, default=ZeroStartTune.steps)
    z.add_argument("--lr", type=float, default=ZeroStartTune.lr)
    z.add_argument("--threads", type=int, default=1)
    z.add_argument("--out", type=Path, help="where to write it (default: over --bundle)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python -m labkit.compress.training " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.what == "zero-start":
        bundle = load_bundle(args.bundle)
        record = zero_start_finetune(bundle, ZeroStartTune(steps=args.steps, lr=args.lr), command=command)
        bundle.save(args.out or args.bundle, dtype=torch.float16)
        print(json.dumps({k: record[k] for k in ("start_row_norm_before", "wall_time_s", "final_dev_bleu")}))
        return 0
    cfg = TeacherConfig.from_name(args.config)
    if args.steps:
        from dataclasses import replace
        cfg = replace(cfg, steps=args.steps, eval_every=min(cfg.eval_every, args.steps))
    bundle = train_teacher(cfg, args.out, command=command)
    print(json.dumps(bundle.meta["training"]["history"][-1]))
    return 0


if __name__ == "__main__":
    sys.exit(train_command())
