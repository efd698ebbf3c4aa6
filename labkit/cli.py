"""The `labkit` command: `labkit run --preset P [--only 00,01]` runs the notebooks headless.

Subcommands live in COMMANDS: each names the module holding its argument adder and handler, imported
only when that command is chosen, so `labkit --help` answers at once, without torch. `run`
(labkit.lab.runner), `data` (labkit.core.corpus), `bench` (labkit.lab.bench: engines timed in their own
processes), `workshop` (labkit.lab.workshop), `gpu-check` (labkit.lab.gpu_check), `serve` and `loadtest`
(labkit.serve, the optional `serve` extra: without it they say how to install it).
Left out on purpose: configuration files and environment-variable options (a preset
name is the one knob; everything else has a flag with a default).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # where the two functions live
    add_arguments: str
    handler: str
    help: str
    extra: str | None = None  # the pip extra the module needs, when it is optional

    def load(self, name: str) -> tuple[Callable | None, str | None]:
        """(the function, None), or (None, how to install the missing extra)."""
        try:
            return getattr(importlib.import_module(self.module), name), None
        except ImportError as exc:
            if self.extra is None:
                raise
            return None, f"{exc} (install the {self.extra} extra: pip install -e '.[{self.extra}]')"


COMMANDS: dict[str, Command] = {
    "run": Command("labkit.lab.runner", "add_run_arguments", "run_command",
                   "execute the lab notebooks in order with papermill"),
    "data": Command("labkit.core.corpus", "add_data_arguments", "data_command",
                    "build the Chinese-English corpus in data/ from its pinned sources, or check the committed one"),
    "bench": Command("labkit.lab.bench_threads", "add_bench_arguments", "bench_or_tune",
                     "time translation engines, each in its own process, with ratios vs torch eager"),
    "workshop": Command("labkit.lab.workshop", "add_workshop_arguments", "workshop_command",
                        "participant notebooks with exercise stubs from the instructor's (build, check), "
                        "and which exercises pass (status)"),
    "gpu-check": Command("labkit.lab.gpu_check", "add_gpu_check_arguments", "gpu_check_command",
                         "on a CUDA machine: the torch GPU rung and TensorRT engines, gated and timed, in one JSON"),
    "serve": Command("labkit.serve.server", "add_serve_arguments", "serve_command",
                     "serve a gated translator over HTTP with dynamic batching (FastAPI; --backend ray: Ray Serve)",
                     extra="serve"),
    "loadtest": Command("labkit.serve.loadtest", "add_loadtest_arguments", "loadtest_command",
                        "closed- and open-loop load against a local `labkit serve`: QPS, p50/p95/p99, batch sizes",
                        extra="serve"),
}


def dispatch(args: argparse.Namespace) -> int:
    """Run the chosen command's handler; a missing optional extra is exit status 2 with the install line."""
    handler, missing = COMMANDS[args.command].load(COMMANDS[args.command].handler)
    if handler is None:
        print(f"labkit {args.command}: {missing}", file=sys.stderr)
        return 2
    return handler(args)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `labkit` parser. With `argv`, only the command it names gets its arguments (and imports its
    module); without, every command does."""
    chosen = next((a for a in argv if a in COMMANDS), None) if argv is not None else None
    parser = argparse.ArgumentParser(prog="labkit", description="Inference-optimization lab tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sp = sub.add_parser(name, help=command.help, description=command.help)
        if argv is None or name == chosen:
            add_arguments, _ = command.load(command.add_arguments)
            if add_arguments is None:  # the handler will say which extra is missing
                sp.add_argument("rest", nargs=argparse.REMAINDER)
            else:
                add_arguments(sp)
        sp.set_defaults(handler=dispatch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `labkit` console script and `python -m labkit`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    return args.handler(args)
