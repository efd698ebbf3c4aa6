"""The `labkit` command: `labkit run --preset P [--only 00,01]` runs the notebooks headless.

Subcommands live in COMMANDS (name -> (add_arguments, handler, help)): `run`, `bench`
(labkit.lab.bench: engines timed in their own processes), `gpu-check` (labkit.lab.gpu_check), `serve`
and `loadtest` (labkit.serve, the optional `serve` extra: without it they say how to install it).
Left out on purpose: configuration files and environment-variable options (a preset
name is the one knob; everything else has a flag with a default).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from labkit.config import PRESETS
from labkit.core.data import DATA_DIR


def known_presets() -> list[str]:
    """Preset names from labkit.config.PRESETS."""
    return sorted(PRESETS)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, help="ci, workshop, opus-mt-zh-en, opus-mt-shape, ...")
    parser.add_argument("--only", help="comma-separated notebook numbers, e.g. 00,01")
    parser.add_argument("--notebooks-dir", default=None, help="where NN_name.ipynb live (default: the lab's notebooks/)")
    parser.add_argument("--out", default=None, help="artifacts root (default $LABKIT_ARTIFACTS or artifacts/); output goes to <out>/<preset>/")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    parser.add_argument("--timeout-per-cell", type=float, default=None, help="seconds; default none")


def run(args: argparse.Namespace) -> int:
    """Handler of `labkit run`: 0 when every notebook passed, 1 on a failed notebook, 2 on bad input."""
    from labkit.lab.runner import RunnerError, run_notebooks

    presets = known_presets()
    if args.preset not in presets:
        print(f"labkit run: unknown preset {args.preset!r}; known: {', '.join(presets)}", file=sys.stderr)
        return 2
    try:
        results = run_notebooks(
            args.preset, only=args.only, notebooks_dir=args.notebooks_dir, out_root=args.out,
            kernel=args.kernel, timeout_per_cell=args.timeout_per_cell,
        )  # fmt: skip
    except RunnerError as exc:
        print(f"labkit run: {exc}", file=sys.stderr)
        return 2
    if results and not results[-1].ok:
        print(f"labkit run: notebook {results[-1].describe()}", file=sys.stderr)
        print(f"labkit run: executed copy with the traceback: {results[-1].output}", file=sys.stderr)
        return 1
    return 0


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from labkit.lab import bench_threads
    from labkit.lab.bench import add_arguments

    add_arguments(parser)
    bench_threads.add_tune_argument(parser)


def bench(args: argparse.Namespace) -> int:
    """Handler of `labkit bench` (labkit.lab.bench.main): 0 ok, 1 a worker failed, 2 bad input;
    `--tune-threads`: the thread-settings trial (labkit.lab.bench_threads) instead."""
    from labkit.lab import bench_threads
    from labkit.lab.bench import bench_command

    if getattr(args, "tune_threads", False) and args.preset in PRESETS:
        return bench_threads.tune_command(args)
    return bench_command(args)


def _serve_command(adder: str, handler: str) -> tuple[Callable, Callable]:
    """(add arguments, handle) of a `labkit.serve` command, imported when it is chosen; without the optional
    `serve` extra (fastapi, uvicorn, prometheus-client, httpx) the command says how to install it."""

    def attr(name: str):
        module = "labkit.serve.loadtest" if "loadtest" in name else "labkit.serve.server"
        try:
            return getattr(importlib.import_module(module), name), None
        except ImportError as exc:
            return None, f"{exc} (install the serve extra: pip install -e '.[serve]')"

    def add(parser: argparse.ArgumentParser) -> None:
        add_arguments, _ = attr(adder)
        if add_arguments is None:
            parser.add_argument("rest", nargs=argparse.REMAINDER)
        else:
            add_arguments(parser)

    def handle(args: argparse.Namespace) -> int:
        command, missing = attr(handler)
        if command is None:
            print(f"labkit {args.command}: {missing}", file=sys.stderr)
            return 2
        return command(args)

    return add, handle


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("build", "check"),
                        help="build: download the pinned sources and rewrite data/; check: verify the committed files")
    parser.add_argument("--out", default=str(DATA_DIR), help="the corpus directory (default: the lab's data/)")
    parser.add_argument("--sources", default=None, help="where downloaded sources are kept (default artifacts/sources)")


def data_command(args: argparse.Namespace) -> int:
    """Handler of `labkit data`: 0 ok, 1 a check failed or a source could not be had."""
    from pathlib import Path

    from labkit.core import corpus

    out = Path(args.out)

    if args.action == "check":
        problems = corpus.check(out)
        for line in problems:
            print(f"labkit data check: {line}", file=sys.stderr)
        print("corpus ok: every file matches corpus.json and no split holds a held-out sentence" if not problems
              else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    try:
        manifest = corpus.build(out, args.sources and Path(args.sources))
    except (RuntimeError, ValueError) as exc:
        print(f"labkit data build: {exc}", file=sys.stderr)
        return 1
    for name, digest in manifest["files"].items():
        print(f"{name}  sha256 {digest}")
    print("  ".join(f"{k} {v['pairs']} pairs" for k, v in manifest["splits"].items()))
    return 0


def add_gpu_check_arguments(parser: argparse.ArgumentParser) -> None:
    from labkit.lab import gpu_check

    gpu_check.add_gpu_check_arguments(parser)


def gpu_check_command(args: argparse.Namespace) -> int:
    from labkit.lab import gpu_check

    return gpu_check.gpu_check_command(args)


Handler = Callable[[argparse.Namespace], int]
# name -> (add its arguments, handle it, help). Each command imports what it needs when it is chosen, so
# `labkit --help` answers without importing torch.
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler, str]] = {
    "run": (add_run_arguments, run, "execute the lab notebooks in order with papermill"),
    "data": (add_data_arguments, data_command,
             "build the Chinese-English corpus in data/ from its pinned sources, or check the committed one"),
    "bench": (add_bench_arguments, bench,
              "time translation engines, each in its own process, with ratios vs torch eager"),
    "gpu-check": (add_gpu_check_arguments, gpu_check_command,
                  "on a CUDA machine: the torch GPU rung and TensorRT engines, gated and timed, in one JSON"),
    "serve": (*_serve_command("add_serve_arguments", "serve_command"),
              "serve a gated translator over HTTP with dynamic batching (FastAPI; --backend ray: Ray Serve)"),
    "loadtest": (*_serve_command("add_loadtest_arguments", "loadtest_command"),
                 "closed- and open-loop load against a local `labkit serve`: QPS, p50/p95/p99, batch sizes"),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `labkit` parser. With `argv`, only the command it names gets its arguments (and imports);
    without, every command does."""
    chosen = next((a for a in argv if a in COMMANDS), None) if argv is not None else None
    parser = argparse.ArgumentParser(prog="labkit", description="Inference-optimization lab tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_command_arguments, handler, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if argv is None or name == chosen:
            add_command_arguments(command)
        command.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `labkit` console script and `python -m labkit`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    return args.handler(args)
