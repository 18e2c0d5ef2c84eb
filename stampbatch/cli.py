"""The ``stampbatch`` command line: one sub-command per stage.

Each group of sub-commands lives in ``stampbatch.commands.<group>`` and registers its
parsers; heavy libraries (TensorFlow, Dask) are imported only inside the commands that
need them, so ``--help`` and ``inspect`` start fast. Every expected failure ends as one
line on stderr and exit code 1 (bad data) or 2 (usage); never a traceback, unless
``STAMPBATCH_DEBUG=1`` asks for one.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from stampbatch import __version__
from stampbatch.errors import StampbatchError

# Groups listed first appear first in --help; any other module in stampbatch.commands follows.
COMMAND_ORDER = ("data", "train", "launch", "score")


def command_groups() -> list[str]:
    """The modules of ``stampbatch.commands``, in help order."""
    import pkgutil

    from stampbatch import commands

    found = [m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    return sorted(found, key=lambda n: (COMMAND_ORDER.index(n) if n in COMMAND_ORDER else 99, n))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stampbatch",
        description="Train CNN classifiers on 21x21 image stamps and score survey-scale "
                    "candidate sets (HDF5) on a laptop or a Slurm cluster.",
    )
    parser.add_argument("--version", action="version", version=f"stampbatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in command_groups():
        module = importlib.import_module(f"stampbatch.commands.{group}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = os.environ.get("STAMPBATCH_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except StampbatchError as exc:
        if debug:
            raise
        print(f"stampbatch {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"stampbatch {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, MemoryError) as exc:
        if debug:
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"stampbatch {args.command}: error: {text}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
