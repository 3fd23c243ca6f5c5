"""The ``ringmaster`` command: ``bench {queue,ns,lmo,optim} | simulate | train | inspect sm90``.

Each subcommand lives in ``ringmaster_kernels/commands/<name>.py`` exposing
``add_arguments(parser)``, optionally ``check(args)`` (every flag checked before any
work; a ValueError naming the flag becomes argparse's usage error, so every bad flag
reads ``ringmaster <command>: error: --flag ...``) and ``run(args) -> int``; modules
import lazily so that ``ringmaster bench queue`` does not pay for importing Triton.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (command path, module, help)
COMMANDS = [
    (("bench", "queue"), "bench_queue", "C++ gradient queue throughput and wake-up latency"),
    (("bench", "ns"), "bench_ns", "batched Newton-Schulz: Triton vs torch twin (eager, compiled)"),
    (("bench", "lmo"), "bench_lmo", "norm-ball LMOs and the fused momentum/LMO/update step"),
    (("bench", "optim"), "bench_optim", "one optimizer step: ours vs torch.optim.Muon vs compiled twin"),
    (("simulate",), "simulate", "virtual-time simulation of heterogeneous async workers"),
    (("train",), "train", "train a small byte-level GPT with async workers"),
    (("inspect",), "inspect_sm90", "compile every kernel variant x config for a GPU and read its machine code"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringmaster", description=__doc__.splitlines()[0])
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, module, help_text in COMMANDS:
        if len(path) == 1:
            sub = top.add_parser(path[0], help=help_text)
        else:
            if path[0] not in groups:
                group_parser = top.add_parser(path[0], help=f"{path[0]} subcommands")
                groups[path[0]] = group_parser.add_subparsers(dest="subcommand", required=True)
            sub = groups[path[0]].add_parser(path[1], help=help_text)
        sub.set_defaults(_module=module, _parser=sub)
        _load(module).add_arguments(sub)
        show_defaults(sub)
    return parser


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append ``(default: ...)`` to the help of every option that has a default (in nested
    subcommands too), also of those without a help text, which argparse's
    ArgumentDefaultsHelpFormatter skips."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):  # e.g. simulate quadratic | sweep
            for child in action.choices.values():
                show_defaults(child)
            continue
        if not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS):
            continue
        text = action.help or ""
        if "%(default)" not in text:
            action.help = f"{text} (default: %(default)s)".strip()


def _load(module: str):
    return importlib.import_module(f"ringmaster_kernels.commands.{module}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = _load(args._module)
    check = getattr(module, "check", None)
    if check is not None:
        try:
            check(args)
        except ValueError as exc:
            args._parser.error(str(exc))
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
