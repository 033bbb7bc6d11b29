"""The `msdiff` command.

Each command group lives next to the code it drives and contributes a `register(subparsers)`
function; this module only assembles them. Heavy imports (torch, diffusers) happen inside the
command handlers so that `msdiff --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

# Modules that define `register(subparsers)`, in the order their commands appear in `--help`.
_SUBCOMMAND_MODULES: tuple[str, ...] = ("msdiffusion.commands", "msdiffusion.data.cli", "msdiffusion.train.cli", "msdiffusion.bench.cli", "msdiffusion.world.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msdiff",
        description="MS-Diffusion: layout-guided multi-subject personalization on SDXL.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


# A comma-separated list of numbers starting with a minus sign (a box such as -0.1,0.2,0.5,0.8).
_NEGATIVE_LIST = re.compile(r"^-\d*\.?\d+(,-?\d*\.?\d*)+$")


def _shield_negative_lists(argv: list[str]) -> list[str]:
    """argparse reads `-0.1,0.2,...` as an unknown option; with a leading space it is a value (argparse's own
    rule for words containing a space), so the command can check the box and name what is wrong with it."""
    return [" " + word if _NEGATIVE_LIST.match(word) else word for word in argv]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_shield_negative_lists(list(sys.argv[1:] if argv is None else argv)))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserInputError as error:
        print(f"msdiff {args.command}: error: {error}", file=sys.stderr)
        return 2


class UserInputError(Exception):
    """A problem with what the user asked for; printed without a traceback."""


if __name__ == "__main__":
    # `python -m msdiffusion.cli`: run the imported module's main, so that there is one
    # UserInputError class (this file as __main__ would define a second one).
    from msdiffusion.cli import main as package_main

    sys.exit(package_main())
