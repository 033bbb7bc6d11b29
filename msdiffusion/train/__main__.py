"""`python -m msdiffusion.train` / `accelerate launch [...] -m msdiffusion.train`: the flags of `msdiff train`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from ..cli import UserInputError
    from .cli import add_train_arguments, run_train

    parser = argparse.ArgumentParser(
        prog="python -m msdiffusion.train",
        description="Train an MS-Diffusion adapter (the same flags as `msdiff train`; see docs/training.md).",
    )
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_train(args)
    except UserInputError as error:
        print(f"msdiffusion.train: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
