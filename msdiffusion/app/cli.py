"""The `msdiff` command.

Each command group lives next to the code it drives and contributes a `register(subparsers)`
function; this module only assembles them. Heavy imports (torch, diffusers) happen inside the
command handlers so that `msdiff --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import re
import sys
import warnings

from msdiffusion.errors import UserInputError, did_you_mean

# Modules that define `register(subparsers)`, in the order their commands appear in `--help`.
_SUBCOMMAND_MODULES: tuple[str, ...] = (
    "msdiffusion.app.commands",
    "msdiffusion.app.data_commands",
    "msdiffusion.app.train_commands",
    "msdiffusion.app.bench_commands",
    "msdiffusion.app.world_commands",
    "msdiffusion.app.page_command",
)


class Parser(argparse.ArgumentParser):
    """argparse, with a mistake told in one line (and where to look) instead of the whole usage, and no
    abbreviated flags: `--stage` would silently mean `--stages`, and a later flag could change its meaning."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from msdiffusion import __version__

    parser = Parser(
        prog="msdiff",
        description="MS-Diffusion: layout-guided multi-subject personalization on SDXL. "
        "Every command has its own --help.",
    )
    parser.add_argument(
        "--version", action="version", version=f"msdiff {__version__}", help="print the version and exit"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    _finish(parser)
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in help_text or not action.option_strings:
            return help_text
        return help_text + " (default: %(default)s)"


def _finish(parser: argparse.ArgumentParser) -> None:
    """One help style everywhere: defaults shown, and a description for every (sub)command."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, subparser in action.choices.items():
                if subparser.description is None and helps.get(name):
                    subparser.description = helps[name][0].upper() + helps[name][1:] + "."
                _finish(subparser)


DTYPE_CHOICES = ("fp32", "fp16", "bf16")


def dtype_name(text: str) -> str:
    """`--dtype` value: fp32, fp16, bf16 (auto where a command offers it), in any case."""
    return text.lower()


# A comma-separated list of numbers starting with a minus sign (a box such as -0.1,0.2,0.5,0.8).
_NEGATIVE_LIST = re.compile(r"^-\d*\.?\d+(,-?\d*\.?\d*)+$")


def _shield_negative_lists(argv: list[str]) -> list[str]:
    """argparse reads `-0.1,0.2,...` as an unknown option; with a leading space it is a value (argparse's own
    rule for words containing a space), so the command can check the box and name what is wrong with it."""
    return [" " + word if _NEGATIVE_LIST.match(word) else word for word in argv]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(_shield_negative_lists(list(sys.argv[1:] if argv is None else argv)))
    if extras:  # told by the command that was given, with its closest option
        command = _chosen_parser(parser, args)
        options = [o for action in command._actions for o in action.option_strings]
        hint = next((did_you_mean(word.split("=")[0], options) for word in extras if word.startswith("--")), "")
        command.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.getLogger("transformers.utils.import_utils").addFilter(_DROP_TORCHVISION_FALLBACK)
    if getattr(args, "quiet", False):
        quiet_libraries(import_them=False)  # the command imports them when it needs them, then calls this again
    original_showwarning = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        # A user of the command needs the message, not the library line that raised it.
        print(f"msdiff {args.command}: warning: {message}", file=sys.stderr)

    warnings.showwarning = one_line
    try:
        return int(args.func(args) or 0)
    except UserInputError as error:
        print(f"msdiff {args.command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = original_showwarning


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command parser that `args` went through last (`msdiff world build`'s, say)."""
    while True:
        action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, action.dest, None) if action else None
        if name is None or name not in action.choices:
            return parser
        parser = action.choices[name]


class _DropTorchvisionFallback(logging.Filter):
    """transformers warns on every run that torchvision is absent and it uses the PIL image processors;
    those are the ones this project uses on purpose (they match the released preprocessing)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


_DROP_TORCHVISION_FALLBACK = _DropTorchvisionFallback()


def quiet_libraries(import_them: bool = True) -> None:
    """No loading bars or info lines from diffusers, transformers and the hub client (`--quiet`).

    `import_them=False` only sets what is read at import time and silences the libraries already imported.
    """
    import os

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub when it is imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("huggingface_hub", "transformers", "diffusers"):
        if name in sys.modules or (import_them and importlib.util.find_spec(name) is not None):
            module = importlib.import_module(f"{name}.utils")
            disable = getattr(module, "disable_progress_bars", None) or getattr(
                module.logging, "disable_progress_bar", None
            )
            if disable is not None:
                disable()
            if hasattr(module, "logging") and hasattr(module.logging, "set_verbosity_error"):
                module.logging.set_verbosity_error()
