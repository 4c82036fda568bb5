"""`b0-pm`: one entry point, a thin layer over the library.

Each subcommand lives in b0_pm.commands.<module> and exposes
`register(subparsers)`. Only the module that owns the command being run
is imported, and heavy imports stay inside each command's run function,
so that short-lived commands (call, status) start fast.
"""

import argparse
import importlib
import sys

from b0_pm import __version__

# Command name -> the module in b0_pm.commands that registers it.
COMMAND_MODULES = {
    "resolver": "resolver",
    "call": "call",
    "serve": "serve",
    "hub": "hub",
    "up": "up",
    "start": "client",
    "stop": "client",
    "status": "client",
    "list": "client",
    "hosts": "client",
    "logs": "client",
}

EXIT_USAGE = 2


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for `command` alone, or for every command when None."""
    parser = argparse.ArgumentParser(
        prog="b0-pm",
        description="BlueZero process manager, HUB, resolver and client tools.",
        epilog="Run 'b0-pm COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"b0-pm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    if command in COMMAND_MODULES:
        modules = [COMMAND_MODULES[command]]
    else:
        modules = dict.fromkeys(COMMAND_MODULES.values())
    for name in modules:
        importlib.import_module(f"b0_pm.commands.{name}").register(subparsers)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((word for word in argv if not word.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.func(args) or 0
