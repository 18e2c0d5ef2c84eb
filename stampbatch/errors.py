"""Errors that the command line turns into one line on stderr and a non-zero exit."""

from __future__ import annotations


class StampbatchError(Exception):
    """Base of every expected failure: bad input, bad configuration, a failed job.

    The message is one line that names the file (or option) and what is wrong.
    """

    exit_code = 1


class UsageError(StampbatchError):
    """The command line or a configuration file asks for something invalid (exit 2)."""

    exit_code = 2
