"""One rank of the teacher DDP check (tests/test_teacher_ddp.py); also runs alone as the 1-process reference.

    python -m torch.distributed.run --nproc_per_node 2 ... tests/ddp_worker.py --tokenizer T --work W --out O
    python tests/ddp_worker.py --tokenizer T --work W --out O          # world size 1, same data and seed

Trains the `tiny` teacher recipe (dropout 0) for `--steps` steps on train[:--train] and dev[:--dev] of the
committed corpus and writes `O/rank{R}.pt`: this rank's final parameters (the model `train` built,
captured here because `train` returns only its state) and its per-step losses.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--dev", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, help="override the recipe's max_tokens")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from labkit.compress import teacher
    from labkit.core import data

    built = []
    build_model = teacher.model_for

    def capture(*a, **k):
        model = build_model(*a, **k)
        built.append(model)
        return model

    teacher.model_for = capture  # train() looks the name up in its module at call time

    recipe = replace(teacher.RECIPES["tiny"], eval_sentences=args.dev,
                     **({"max_tokens": args.max_tokens} if args.max_tokens else {}))
    world = teacher.init_world("cpu")
    state = teacher.train(recipe, args.tokenizer, args.work, train_pairs=data.load_split("train")[: args.train],
                          dev_pairs=data.load_split("dev")[: args.dev], world=world, max_steps=args.steps,
                          progress=False)
    (model,) = built
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"rank": world.rank, "world_size": world.size, "step": state["step"], "losses": state["losses"],
                "params": {k: v.detach().clone() for k, v in model.state_dict().items()}},
               args.out / f"rank{world.rank}.pt")
    if world.size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    print(f"rank {world.rank}/{world.size}: {state['step']} steps, pid {os.getpid()}", flush=True)


if __name__ == "__main__":
    main()
