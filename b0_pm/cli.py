"""`b0-pm`: one entry point, a thin layer over the library.

Each subcommand lives in b0_pm.commands.<module> and exposes
`register(subparsers)`; heavy imports stay inside the command's run
function so that short-lived commands (call, status) start fast.
"""

import argparse
import importlib
import sys

from b0_pm import __version__

COMMAND_MODULES = (
    "resolver",
    "call",
    "serve",
    "hub",
    "up",
    "client",
)

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="b0-pm",
        description="BlueZero process manager, HUB, resolver and client tools.",
    )
    parser.add_argument("--version", action="version", version=f"b0-pm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"b0_pm.commands.{name}")
        except ModuleNotFoundError as exc:
            # A command module not written yet must not break the others.
            if exc.name != f"b0_pm.commands.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.func(args) or 0
