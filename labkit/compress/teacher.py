"""Train the lab's teacher on the real corpus: the recipe of a real NMT system, resumable, on 1..N processes.

    python -m labkit.compress.teacher tokenizer --out artifacts/teacher-tok      # sentencepiece + vocab
    python -m labkit.compress.teacher train --recipe small --tokenizer artifacts/teacher-tok --work runs/small
    torchrun --nproc_per_node 2 -m labkit.compress.teacher train --recipe small ...   # DDP, one data shard per rank
    python -m labkit.compress.teacher export --work runs/small --out data/teacher     # averaged bundle

The recipe (`TeacherRecipe`): label-smoothed cross-entropy, Adam (0.9, 0.98) with linear warm-up and
inverse-square-root decay, dropout, batches of at most `max_tokens` tokens built from length-sorted pools,
Tatoeba oversampled so the long LibreOffice paragraphs do not take over the updates, dev BLEU (greedy,
sacreBLEU, all references) every `eval_every` steps, early stopping after `patience` evaluations
without a gain, and at the end the average of the last `average` checkpoints' weights (kept when it
beats the best single checkpoint on dev). A run writes `work/state.pt` (model, optimizer, step, data
order, history) at every evaluation, atomically, so a killed run continues from there; `work/log.jsonl`
holds one line per evaluation.

Under torchrun each rank draws the same global batches (same seed) and takes every `world`-th
example of each, padded on its own; the loss is the sum over the rank's tokens divided by the global
token count times the world size, so DDP's gradient average equals one process over the whole batch.
Left out: mixed-precision on CPU, back-translation and other data augmentation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from labkit.compress.training import (
    TeacherConfig,
    build_tokenizer,
    encode_pairs,
    freeze_positions,
    greedy_scores,
    pin_start_row,
)
from labkit.compress.training import build_model as build_marian
from labkit.core import data
from labkit.core.bundle import TEACHER_DIR, Bundle, load_bundle

STATE = "state.pt"
LOG = "log.jsonl"


@dataclass(frozen=True)
class TeacherRecipe:
    d_model: int = 256
    encoder_layers: int = 6
    decoder_layers: int = 6
    heads: int = 8  # 6 layers x 8 heads keep pruning and 6->4 / 6->2 distillation meaningful
    ffn: int = 1024
    src_vocab: int = 8000  # sentencepiece pieces per side; the joint Marian vocabulary is their union
    tgt_vocab: int = 8000
    zh_coverage: float = 0.9995  # rare Han characters become <unk> rather than a piece each
    max_positions: int = 256
    max_len: int = 128  # tokens per side; longer pairs are cut
    dropout: float = 0.2
    label_smoothing: float = 0.1
    lr: float = 7e-4  # peak, reached at the end of warm-up
    warmup: int = 2000
    max_tokens: int = 8192  # source + target tokens (padding included) per global batch
    max_steps: int = 30000
    eval_every: int = 1000
    patience: int = 6  # evaluations without a dev-BLEU gain before stopping
    average: int = 5  # last checkpoints averaged at the end
    tatoeba_weight: int = 2  # each Tatoeba pair appears this many times per epoch
    eval_sentences: int = 1000
    seed: int = 0

    @classmethod
    def from_name(cls, name: str) -> TeacherRecipe:
        if name not in RECIPES:
            raise KeyError(f"unknown teacher recipe {name!r}; known: {', '.join(RECIPES)}")
        return RECIPES[name]


RECIPES = {
    "small": TeacherRecipe(),
    "mid": TeacherRecipe(d_model=384, ffn=1536, dropout=0.25),
    "base": TeacherRecipe(d_model=512, ffn=2048, dropout=0.3, lr=5e-4, warmup=4000),
    # seconds on a CPU: the tests' and the DDP check's model
    "tiny": TeacherRecipe(d_model=32, encoder_layers=2, decoder_layers=2, heads=4, ffn=64, src_vocab=3000,
                          tgt_vocab=400, dropout=0.0, warmup=10, max_tokens=512, max_steps=20, eval_every=10,
                          patience=2, average=2, eval_sentences=20),
}


# --------------------------------------------------------------------------- primitives


def inverse_sqrt_lr(step: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak` at `warmup`, then peak * sqrt(warmup / step): (0, 1, 4) -> 0.25, (15, 1, 4) -> 0.5."""
    step += 1
    return peak * min(step / warmup, math.sqrt(warmup / step))


def token_batches(lengths: list[int], max_tokens: int, rng: random.Random, pool: int = 100) -> list[list[int]]:
    """Indices grouped into batches of at most `max_tokens` padded tokens (a longer single example is its
    own batch): shuffle, sort pools of ~`pool` batches by length, cut, shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mean = max(1, sum(lengths) // max(1, len(lengths)))
    span = pool * max(1, max_tokens // mean)
    batches = []
    for i in range(0, len(order), span):
        chunk = sorted(order[i:i + span], key=lambda j: lengths[j])
        batch, width = [], 0
        for j in chunk:
            if batch and max(width, lengths[j]) * (len(batch) + 1) > max_tokens:
                batches.append(batch)
                batch, width = [], 0
            batch.append(j)
            width = max(width, lengths[j])
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def padded_batch(examples: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
    def pad(seqs, value):
        width = max(len(s) for s in seqs)
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs], device=device)

    input_ids = pad([s for s, _ in examples], pad_id)
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(),
            "labels": pad([t for _, t in examples], -100)}


def summed_loss(model, batch: dict, smoothing: float) -> tuple[torch.Tensor, int]:
    """Sum of label-smoothed token losses and the number of target tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   labels=batch["labels"]).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch["labels"].reshape(-1),
                           ignore_index=-100, label_smoothing=smoothing, reduction="sum")
    return loss, int((batch["labels"] != -100).sum())


def average_states(states: list[dict]) -> dict:
    """Element-wise mean of floating tensors of several state dicts (others taken from the last)."""
    out = {}
    for key, last in states[-1].items():
        out[key] = (torch.stack([s[key].float() for s in states]).mean(0).to(last.dtype)
                    if last.is_floating_point() else last)
    return out


def data_digest(pairs: list[data.Pair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(data.format_line(p).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world(device: str | None = None) -> World:
    """One process, or the torchrun group (gloo on CPU, NCCL on CUDA) from its environment variables."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return World(rank, size, device)


def all_sum(value: float, world: World) -> float:
    if world.size == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device=world.device if world.device.startswith("cuda") else "cpu")
    torch.distributed.all_reduce(t)
    return float(t.item())


# --------------------------------------------------------------------------- training


def weighted(pairs: list[data.Pair], tatoeba_weight: int) -> list[data.Pair]:
    """Tatoeba pairs repeated `tatoeba_weight` times, the rest once (the epoch the batches are drawn from)."""
    return [p for p in pairs for _ in range(tatoeba_weight if p.origin == "tatoeba" else 1)]


def model_for(recipe: TeacherRecipe, tokenizer):
    cfg = TeacherConfig(d_model=recipe.d_model, encoder_layers=recipe.encoder_layers,
                        decoder_layers=recipe.decoder_layers, heads=recipe.heads, ffn=recipe.ffn,
                        max_positions=recipe.max_positions, dropout=recipe.dropout, seed=recipe.seed)
    return build_marian(cfg, tokenizer)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def train(recipe: TeacherRecipe, tokenizer_dir: Path, work: Path, *, train_pairs: list[data.Pair] | None = None,
          dev_pairs: list[data.Pair] | None = None, world: World | None = None, max_steps: int | None = None,
          progress: bool = True, bf16: bool | None = None, max_minutes: float | None = None,
          init: Path | None = None) -> dict:
    """Train (or resume) in `work`; returns the final state. Every rank calls this under torchrun.

    `max_minutes` ends training at the first evaluation after that much wall time (this call's), so a
    budgeted run still ends on a checkpoint; a later call resumes from it. `init` starts a new run from a
    bundle's weights (a continuation: its sidecar's training record is kept as the run's earlier stage)."""
    from torch.nn.parallel import DistributedDataParallel
    from tqdm.auto import tqdm
    from transformers import MarianTokenizer

    world = world or init_world()
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = MarianTokenizer.from_pretrained(str(tokenizer_dir))
    train_pairs = train_pairs if train_pairs is not None else data.load_split("train")
    dev_pairs = (dev_pairs if dev_pairs is not None else data.load_split("dev"))[: recipe.eval_sentences]
    max_steps = max_steps or recipe.max_steps
    bf16 = world.device.startswith("cuda") if bf16 is None else bf16
    epoch_pairs = weighted(train_pairs, recipe.tatoeba_weight)
    examples = encode_pairs(tokenizer, epoch_pairs, recipe.max_len)
    lengths = [len(s) + len(t) for s, t in examples]

    torch.manual_seed(recipe.seed)
    torch.set_flush_denormal(True)  # tiny gradients turn denormal and slow CPU matmuls several-fold
    model = model_for(recipe, tokenizer).to(world.device)
    freeze_positions(model)
    pin_start_row(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=recipe.lr,
                           betas=(0.9, 0.98), eps=1e-9)
    state = {"step": 0, "epoch": 0, "batch": 0, "history": [], "best": -1.0, "since_best": 0,
             "checkpoints": [], "wall_s": 0.0, "losses": [], "device": world.device, "world_size": world.size,
             "earlier_stages": []}
    if init is not None and not (work / STATE).exists():
        start = load_bundle(init)
        model.load_state_dict(start.model.state_dict())
        state["earlier_stages"] = [*start.meta["training"].get("earlier_stages", []),
                                   {k: v for k, v in start.meta["training"].items() if k != "earlier_stages"}]
    if (work / STATE).exists():
        saved = torch.load(work / STATE, map_location=world.device, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]
        state.pop("stopped", None)  # a budget or early stop ended the last call, not this one
        if world.main and progress:
            print(f"resuming from step {state['step']} ({work / STATE})", flush=True)
    net = DistributedDataParallel(model) if world.size > 1 else model

    bar = tqdm(total=max_steps, initial=state["step"], desc=f"train {recipe.d_model}", disable=not (progress and world.main),
               mininterval=5)
    started = time.perf_counter() - state["wall_s"]
    running = state.get("running_loss")  # the loss EMA carries on across a resume
    deadline = time.perf_counter() + 60 * max_minutes if max_minutes else math.inf
    batches = token_batches(lengths, recipe.max_tokens, random.Random(recipe.seed + state["epoch"]))
    stop = False
    while state["step"] < max_steps and not stop:
        if state["batch"] >= len(batches):
            state["epoch"] += 1
            state["batch"] = 0
            batches = token_batches(lengths, recipe.max_tokens, random.Random(recipe.seed + state["epoch"]))
        global_batch = batches[state["batch"]]
        state["batch"] += 1
        shard = global_batch[world.rank::world.size]
        net.train()
        for group in opt.param_groups:
            group["lr"] = inverse_sqrt_lr(state["step"], recipe.lr, recipe.warmup)
        tokens = all_sum(sum(len(examples[j][1]) for j in shard), world)
        # a rank with nothing this step (a global batch smaller than the world) still runs DDP's forward and
        # backward, on the batch's first example at weight 0: DDP only joins the all-reduce after its own forward
        batch = padded_batch([examples[j] for j in shard or global_batch[:1]], tokenizer.pad_token_id, world.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss_sum, _ = summed_loss(net, batch, recipe.label_smoothing)
        if not shard:
            loss_sum = loss_sum * 0
        loss = loss_sum * world.size / tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        pin_start_row(model)
        state["step"] += 1
        value = all_sum(float(loss_sum.detach()), world) / tokens
        running = value if running is None else 0.98 * running + 0.02 * value
        state["running_loss"] = running
        state["losses"].append(round(value, 6))
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}", best=f"{state['best']:.1f}")
        if state["step"] % recipe.eval_every == 0 or state["step"] == max_steps:
            stop = evaluate_and_checkpoint(model, opt, tokenizer, dev_pairs, recipe, state, world, work,
                                           running, time.perf_counter() - started, bar,
                                           out_of_time=time.perf_counter() > deadline)
    bar.close()
    return state


def evaluate_and_checkpoint(model, opt, tokenizer, dev_pairs, recipe: TeacherRecipe, state: dict, world: World,
                            work: Path, loss: float, wall_s: float, bar, out_of_time: bool = False) -> bool:
    """Rank 0: dev BLEU, checkpoint, log line, state file. Returns whether early stopping says stop."""
    stop = torch.zeros(1, device=world.device if world.device.startswith("cuda") else "cpu")
    if world.main:
        bleu, chrf = greedy_scores(model, tokenizer, dev_pairs, device=world.device, batch_size=100, max_new_tokens=128)
        state["wall_s"] = wall_s
        entry = {"step": state["step"], "epoch": state["epoch"], "loss": round(loss, 4), "dev_bleu": round(bleu, 2),
                 "dev_chrf": round(chrf, 2), "wall_s": round(wall_s, 1)}
        state["history"].append(entry)
        if bleu > state["best"]:
            state["best"], state["since_best"] = bleu, 0
            _save_atomic(model.state_dict(), work / "best.pt")
        else:
            state["since_best"] += 1
        ckpt = f"ckpt-{state['step']}.pt"
        _save_atomic(model.state_dict(), work / ckpt)
        state["checkpoints"].append(ckpt)
        for old in state["checkpoints"][:-recipe.average]:
            (work / old).unlink(missing_ok=True)
        state["checkpoints"] = state["checkpoints"][-recipe.average:]
        # why training ends goes into the saved state, so the exported bundle records it
        if state["since_best"] >= recipe.patience:
            state["stopped"] = f"early stop: no dev-BLEU gain in {recipe.patience} evaluations"
        elif out_of_time:
            state["stopped"] = "time budget"
        _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state,
                      "recipe": asdict(recipe)}, work / STATE)
        with open(work / LOG, "a") as f:
            f.write(json.dumps(entry) + "\n")
        bar.write(f"step {state['step']}: loss {loss:.3f}  dev BLEU {bleu:.2f}  chrF {chrf:.1f}  ({wall_s:.0f} s)")
        stop[0] = float("stopped" in state)
    if world.size > 1:
        torch.distributed.broadcast(stop, 0)
    return bool(stop.item())


def finish(recipe: TeacherRecipe, tokenizer_dir: Path, work: Path, out: Path, *, command: str = "",
           dev_pairs: list[data.Pair] | None = None, device: str = "cpu", extra: dict | None = None) -> Bundle:
    """Average the last checkpoints, keep whichever of (average, best single) scores higher on dev, save the
    bundle (fp16 storage) with the recipe, data digest, history and wall time in its sidecar."""
    from transformers import MarianTokenizer

    tokenizer = MarianTokenizer.from_pretrained(str(tokenizer_dir))
    saved = torch.load(work / STATE, map_location="cpu", weights_only=False)
    state = saved["state"]
    dev_pairs = (dev_pairs if dev_pairs is not None else data.load_split("dev"))[: recipe.eval_sentences]
    model = model_for(recipe, tokenizer).to(device)
    candidates = {"best": torch.load(work / "best.pt", map_location="cpu")}
    kept = [c for c in state["checkpoints"] if (work / c).exists()][-recipe.average:]  # --average may ask for fewer
    ckpts = [torch.load(work / c, map_location="cpu") for c in kept]
    if len(ckpts) > 1:
        candidates[f"average of last {len(ckpts)}"] = average_states(ckpts)
    scores = {}
    for name, weights in candidates.items():
        model.load_state_dict(weights)
        pin_start_row(model)
        scores[name] = greedy_scores(model, tokenizer, dev_pairs, device=device, batch_size=100, max_new_tokens=128)
    chosen = max(scores, key=lambda k: scores[k][0])
    model.load_state_dict(candidates[chosen])
    pin_start_row(model)
    model = model.to("cpu").eval()
    train_pairs = data.load_split("train")
    meta = {
        "name": "teacher", "derived_from": None, "technique": "trained from scratch",
        "training": {"command": command, "recipe": asdict(recipe), "train_pairs": len(train_pairs),
                     "train_digest": data_digest(train_pairs), "steps": state["step"], "epochs": state["epoch"],
                     "wall_time_s": round(state["wall_s"], 1), "stopped": state.get("stopped", "max_steps"),
                     "device": state.get("device"), "world_size": state.get("world_size"),
                     "earlier_stages": state.get("earlier_stages", []),
                     "history": state["history"],
                     "weights": chosen, "dev_scores": {k: {"bleu": round(v[0], 2), "chrf": round(v[1], 2)}
                                                      for k, v in scores.items()},
                     "final_dev_bleu": round(scores[chosen][0], 2), "torch": torch.__version__, **(extra or {})},
    }
    bundle = Bundle(model, tokenizer, meta)
    bundle.save(out, dtype=torch.float16)
    return bundle


def build_tokenizers(recipe: TeacherRecipe, out: Path, pairs: list[data.Pair] | None = None):
    pairs = pairs if pairs is not None else data.load_split("train")
    return build_tokenizer(pairs, out, recipe.src_vocab, recipe.tgt_vocab, zh_coverage=recipe.zh_coverage)


# --------------------------------------------------------------------------- command line


def teacher_command(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labkit.compress.teacher", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tokenizer", help="train the sentencepiece models and the joint vocabulary")
    t.add_argument("--recipe", default="small", choices=list(RECIPES))
    t.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("train", help="train or resume (also under torchrun)")
    r.add_argument("--recipe", default="small", choices=list(RECIPES))
    r.add_argument("--tokenizer", type=Path, required=True)
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--max-steps", type=int)
    r.add_argument("--max-minutes", type=float, help="stop at the first evaluation after this much wall time")
    r.add_argument("--threads", type=int, help="CPU threads per process (default: torch's)")
    r.add_argument("--init", type=Path, help="start from this bundle's weights (a continuation)")
    for name in ("lr", "warmup", "eval_every", "max_tokens", "eval_sentences", "average"):
        r.add_argument(f"--{name.replace('_', '-')}", type=float if name == "lr" else int,
                       help=f"override the recipe's {name}")
    r.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    e = sub.add_parser("export", help="average checkpoints and write the bundle")
    e.add_argument("--recipe", default="small", choices=list(RECIPES))
    e.add_argument("--tokenizer", type=Path, required=True)
    e.add_argument("--work", type=Path, required=True)
    e.add_argument("--out", type=Path, default=TEACHER_DIR)
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name in ("lr", "warmup", "eval_every", "max_tokens", "eval_sentences", "average"):
        e.add_argument(f"--{name.replace('_', '-')}", type=float if name == "lr" else int,
                       help=f"the recipe's {name} as overridden in training")
    args = ap.parse_args(argv)
    recipe = TeacherRecipe.from_name(args.recipe)
    overrides = {k: getattr(args, k, None) for k in ("lr", "warmup", "eval_every", "max_tokens", "eval_sentences", "average")}
    recipe = replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    command = "python -m labkit.compress.teacher " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.what == "tokenizer":
        tok = build_tokenizers(recipe, args.out)
        print(f"{len(tok)} pieces in the joint vocabulary -> {args.out}")
    elif args.what == "train":
        if args.threads:
            torch.set_num_threads(args.threads)
        world = init_world(args.device)
        state = train(recipe, args.tokenizer, args.work, world=world, max_steps=args.max_steps,
                      max_minutes=args.max_minutes, init=args.init)
        if world.main:
            print(json.dumps({"step": state["step"], "best_dev_bleu": round(state["best"], 2)}))
        if world.size > 1:
            torch.distributed.destroy_process_group()
    else:
        bundle = finish(recipe, args.tokenizer, args.work, args.out, command=command, device=args.device)
        print(json.dumps({k: bundle.meta["training"][k] for k in ("steps", "weights", "dev_scores")}))
    return 0


if __name__ == "__main__":
    sys.exit(teacher_command())

