"""Every error class of stampbatch, in one place.

``StampbatchError`` and its subclasses are the expected failures: the command line turns
each into one line on stderr and a non-zero exit (``exit_code``). ``Locked`` is what
``fileio.FileLock`` raises when another process holds a lock; callers turn it into their
own one-line error. This module imports nothing of stampbatch, so any module can import it.
"""

from __future__ import annotations


class StampbatchError(Exception):
    """Base of every expected failure: bad input, bad configuration, a failed job.

    The message is one line that names the file (or option) and what is wrong.
    """

    exit_code = 1


class UsageError(StampbatchError):
    """The command line or a configuration file asks for something invalid (exit 2)."""

    exit_code = 2


class Locked(Exception):
    """Another process holds the lock; ``holder`` is what it wrote there (its pid)."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (``timeout``, ``scancel``, a Slurm time limit); ``cli`` raises it from
    its signal handler so that SIGTERM unwinds like Ctrl-C."""


class SimulationStopped(Exception):
    """A simulation whose ``stop`` event was set ends here (internal: raised in the threads of
    :func:`stampbatch.sim.simulate.iter_blocks` once it is closed early, never retrieved)."""


# ---------------------------------------------------------------- files and stores


class FileError(StampbatchError, ValueError):
    """A file cannot be written where asked; the message names it and says why."""


class StoreError(StampbatchError, ValueError):
    """A stamp store (or an array meant to become one) is unusable; the message is one line."""


# ---------------------------------------------------------------- making stores


class SimConfigError(UsageError, ValueError):
    """Simulator settings that cannot work (a ValueError, so config loading reports it)."""


class FetchError(StampbatchError):
    """An input array, an ingest or a download failed; the message is one line naming the file."""


class MetaError(StampbatchError):
    """A metadata table or column is unusable; the message is one line naming the file."""


class KbmodError(StampbatchError):
    """A KBMOD Results file cannot be used; the one-line message names the file and problem."""


class TableDataError(KbmodError):
    """Rows of the table found unusable while reading it (null, ragged, unreadable)."""


# ---------------------------------------------------------------- training and its jobs


class TrainError(StampbatchError):
    """Training cannot start or go on (bad store, bad split, a clashing run directory)."""


class LaunchError(StampbatchError):
    """Jobs could not be submitted, followed or collected (one line: what and where)."""


# ---------------------------------------------------------------- scoring


class ModelError(StampbatchError):
    """A model file cannot be used for scoring; the message names the file and the problem."""


class ScoreError(StampbatchError):
    """Scoring cannot proceed; the one-line message names the file and the problem."""


class ClusterStartError(ScoreError):
    """The Dask cluster never came up (no scheduler, sbatch refused, no worker in time):
    nothing was computed, so the caller removes what it prepared for the run."""


# ---------------------------------------------------------------- reading runs back


class EvaluateError(StampbatchError):
    """The run or the store cannot be evaluated (missing model, no truth, one class)."""


class ReportError(StampbatchError):
    """A report cannot be written (no runs, unreadable directory); one-line message."""


class PlotError(StampbatchError, ValueError):
    """Data handed to a plot function cannot be drawn; the message names the target file."""
