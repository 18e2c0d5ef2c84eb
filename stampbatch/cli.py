"""The ``stampbatch`` command line: one sub-command per stage.

Each group of sub-commands lives in ``stampbatch.commands.<group>`` and registers its
parsers; heavy libraries (TensorFlow, Dask) are imported only inside the commands that
need them, so ``--help``, ``inspect`` and ``simulate`` start fast and stay quiet. Every
failure ends as exactly one line on stderr and exit code 1 (bad data), 2 (usage) or 130
(interrupted); never a traceback, unless ``--verbose`` (or ``STAMPBATCH_DEBUG=1``) asks for one.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

from stampbatch import __version__
from stampbatch.errors import StampbatchError, Terminated
from stampbatch.fileio import one_line

# Groups listed first appear first in --help; any other module in stampbatch.commands follows.
COMMAND_ORDER = ("data", "train", "launch", "score", "pack")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (the usage itself is in --help)."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {text} (see '{self.prog} --help')\n")


def command_groups() -> list[str]:
    """The modules of ``stampbatch.commands``, in help order."""
    import pkgutil

    from stampbatch import commands

    found = [m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    return sorted(found, key=lambda n: (COMMAND_ORDER.index(n) if n in COMMAND_ORDER else 99, n))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="stampbatch",
        description="Train CNN classifiers on 21x21 image stamps and score survey-scale "
                    "candidate sets (HDF5) on a laptop or a Slurm cluster.",
    )
    parser.add_argument("--version", action="version", version=f"stampbatch {__version__}")
    verbose_help = "show library logs (TensorFlow, Dask) and a traceback on any error"
    parser.add_argument("--verbose", action="store_true", help=verbose_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in command_groups():
        module = importlib.import_module(f"stampbatch.commands.{group}")
        module.register(sub)
    for command in sub.choices.values():
        # Accepted after the command too; SUPPRESS keeps a top-level --verbose from being reset.
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                             help=verbose_help)
    return parser


def _terminate(signum: int, frame: object) -> NoReturn:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` and context manager removes its
    partial files (the hidden ``.*.partial.h5`` of simulate and ingest included). A second
    SIGTERM is ignored so that it cannot cut the clean-up short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(args.verbose) or os.environ.get("STAMPBATCH_DEBUG", "") not in ("", "0")
    prefix = f"stampbatch {args.command}: "
    previous = None
    if argv is None and threading.current_thread() is threading.main_thread():
        # the real command line, not an in-process call (tests, notebooks)
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        from stampbatch.console import quiet_tensorflow_imports

        with quiet_tensorflow_imports(verbose):
            return int(args.func(args) or 0)
    except StampbatchError as exc:
        if verbose:
            raise
        print(f"{prefix}error: {one_line(exc, limit=None)}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print(f"{prefix}terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"{prefix}interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, MemoryError) as exc:
        if verbose:
            raise
        print(f"{prefix}error: {one_line(exc, limit=None)}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug: one line here, the traceback with --verbose
        if verbose:
            raise
        print(f"{prefix}error: {type(exc).__name__}: {one_line(exc, limit=None)} (an unexpected failure; "
              f"rerun with --verbose for the traceback and report it)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
