"""Argument types shared by the sub-commands: a bad value is a usage error (exit 2) that says
what was expected."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def positive_int(text: str) -> int:
    """An integer >= 1 (stamp counts, chunk sizes, epochs)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (GPU counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, seconds): inf, nan, 0 and negatives are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


SEED_MAX = 2**32 - 1  # what numpy's legacy seeding and scikit-learn accept


def seed(text: str) -> int:
    """A random seed: an integer from 0 to 2**32-1."""
    return int_between(0, SEED_MAX)(text)


def int_between(low: int, high: int):  # noqa: ANN201 - an argparse type
    """An argparse type: an integer from ``low`` to ``high`` (both included)."""
    wanted = (f"a positive integer (at most {high:,})" if low == 1
              else f"an integer from {low:,} to {high:,}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if not low <= value <= high:
            shown = f"{value:,}" if abs(value) < 10**30 else "a larger number"
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {shown}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def path_arg(text: str) -> Path:
    """A file or directory path: not empty, no NUL byte (which no file system allows)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    if "\0" in text:
        raise argparse.ArgumentTypeError("a path cannot contain a NUL byte")
    return Path(text)
