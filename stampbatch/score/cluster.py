"""Where the scoring tasks run: a Dask client from one :class:`ClusterOptions`.

Three places: a running scheduler (``scheduler``), Slurm jobs started through
dask-jobqueue (``slurm``), or a LocalCluster sized for this machine (the default). No
dashboard unless asked for (``dashboard=":8787"``), so two runs never fight over a port,
and the local workers log only CRITICAL: a failing task becomes the scorer's one-line
error, not a "Compute Failed … Traceback" block on the console.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from stampbatch import fileio
from stampbatch.errors import ClusterStartError, UsageError

START_TIMEOUT = 120.0   # seconds a scheduler or the first Slurm worker may take to answer
_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d{1,2}))?(?::(\d{1,2}))?$")


@dataclass(frozen=True)
class SlurmOptions:
    """Workers as Slurm jobs through dask-jobqueue: one worker process per job."""

    workers: int = 1                 # jobs (ignored when gpus > 0: one job per GPU)
    gpus: int = 0
    cores: int = 4                   # CPU cores (= worker threads) per job
    memory: str = "4GB"
    partition: str | None = None
    account: str | None = None
    walltime: str = "01:00:00"
    log_directory: str | None = None
    interface: str | None = None
    start_timeout: float = 120.0     # seconds to wait for the first worker (--start-timeout)
    job_extra: tuple[str, ...] = ()

    @property
    def jobs(self) -> int:
        return self.gpus if self.gpus > 0 else self.workers


@dataclass(frozen=True)
class ClusterOptions:
    """Which Dask cluster scores: joined, on Slurm, or local (the default)."""

    scheduler: str | None = None         # address of a running scheduler
    slurm: SlurmOptions | None = None
    n_workers: int | None = None         # local worker processes
    threads_per_worker: int | None = None
    dashboard: str | None = None         # e.g. ":8787"; None: no dashboard
    in_process: bool | None = None       # threads of this process, no Dask; None: auto
    start_timeout: float = START_TIMEOUT  # seconds to reach --scheduler (Slurm: its own)

    def __post_init__(self) -> None:
        if self.scheduler is not None and self.slurm is not None:
            raise UsageError("--scheduler and --slurm exclude each other")


def walltime_seconds(text: str) -> int:
    """A Slurm time limit in seconds, read as Slurm reads it.

    ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M`` and ``D-H:M:S``: a bare number is minutes.
    """
    m = _WALLTIME.match(str(text).strip())
    if m is None:
        raise UsageError(f"expected a Slurm time limit like 30, 01:00:00 or 1-00:00:00, "
                         f"got {text!r}")
    days, first, second, third = m.groups()
    if days is not None:        # D-H, D-H:M, D-H:M:S
        h, mi, s = int(first), int(second or 0), int(third or 0)
        return int(days) * 86400 + h * 3600 + mi * 60 + s
    if third is not None:       # H:M:S
        return int(first) * 3600 + int(second) * 60 + int(third)
    return int(first) * 60 + int(second or 0)   # M or M:S


# Work up to this many stamp evaluations (stamps x models; an occlusion map counts as
# tasks.MAP_EVALUATIONS) runs on threads of the scoring process when no cluster is asked for: starting a local
# Dask worker process costs ~1-2 s, a few seconds of work on two cores at ~70 k stamps/s.
# Measured on 500 k vgg6 stamps the thread path was no slower (BENCHMARKS.md), so the limit
# only keeps very long runs on worker processes (isolated, restartable with retries).
IN_PROCESS_MAX_WORK = 4_000_000


def local_shape(options: ClusterOptions) -> tuple[int, int]:
    """(worker processes, threads per worker) of a local cluster for these options."""
    cores = fileio.cores()
    threads = options.threads_per_worker
    if threads is None:
        threads = max(1, cores // options.n_workers) if options.n_workers else min(cores, 4)
    return options.n_workers or max(1, cores // threads), threads


def in_process_threads(options: ClusterOptions, work: int) -> int | None:
    """Threads to score on inside this process, or None for a Dask cluster.

    Auto (``in_process=None``): in-process when no scheduler, Slurm, worker count or
    dashboard is asked for and ``work`` (stamp evaluations) is at most :data:`IN_PROCESS_MAX_WORK`. As
    many threads as one local worker has, each model call as many intra-op threads as on
    that worker, so the results are the same bit for bit and the cores are used once.
    """
    if options.scheduler is not None or options.slurm is not None or options.in_process is False:
        return None
    if options.in_process is None and (options.n_workers is not None or options.dashboard
                                       or work > IN_PROCESS_MAX_WORK):
        return None
    return local_shape(options)[1]


def total_threads(client: Any) -> int:
    """Worker threads the client can use now (a guess of 2 while none are connected)."""
    try:
        return max(1, int(sum(client.nthreads().values())))
    except Exception:  # noqa: BLE001 - a scheduler between workers: assume a few
        return 2


@contextlib.contextmanager
def dask_client(options: ClusterOptions,
                log: Callable[[str], None]) -> Iterator[tuple[Any, str]]:
    """Yield (distributed Client, a description of where it runs); close it afterwards."""
    if options.scheduler is not None:
        with _joined(options.scheduler, options.start_timeout) as pair:
            yield pair
    elif options.slurm is not None:
        with _on_slurm(options.slurm, log) as pair:
            yield pair
    else:
        with _local(options) as pair:
            yield pair


@contextlib.contextmanager
def _joined(address: str, timeout: float) -> Iterator[tuple[Any, str]]:
    from distributed import Client

    try:
        client = Client(address, timeout=f"{timeout:g}s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise ClusterStartError(f"cannot reach the Dask scheduler at {address} within "
                                f"{timeout:g} s ({fileio.one_line(exc)})") from exc
    try:
        yield client, f"Dask scheduler {address}"
    finally:
        client.close()


@contextlib.contextmanager
def _local(options: ClusterOptions) -> Iterator[tuple[Any, str]]:
    from distributed import Client, LocalCluster

    workers, threads = local_shape(options)
    # The scheduler always serves HTTP (health routes), on 8787 unless told: a free port
    # then, so a second cluster on the machine never prints "Port 8787 is already in use".
    cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                           dashboard_address=options.dashboard or ":0",
                           scheduler_kwargs=None if options.dashboard else {"dashboard": False},
                           silence_logs=logging.CRITICAL)
    client = Client(cluster)
    try:
        yield client, f"local Dask cluster ({workers} worker(s) x {threads} threads)"
    finally:
        client.close()
        cluster.close()


@contextlib.contextmanager
def _on_slurm(slurm: SlurmOptions, log: Callable[[str], None]) -> Iterator[tuple[Any, str]]:
    from distributed import Client

    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise UsageError("--slurm needs dask-jobqueue (pip install dask-jobqueue)") from exc
    extra = list(slurm.job_extra)
    if slurm.gpus > 0:
        extra.append("--gres=gpu:1")
    env = [f"export {k}={os.environ.get(k, v)}" for k, v in
           (("TF_CPP_MIN_LOG_LEVEL", "2"), ("TF_ENABLE_ONEDNN_OPTS", "1"))]
    worker_args = []
    limit_s = walltime_seconds(slurm.walltime)
    if limit_s > 900:   # retire before Slurm kills the job; adapt() submits a new one
        worker_args = ["--lifetime", f"{limit_s - 300}s", "--lifetime-stagger", "60s"]
    failures: list[str] = []
    catch = _SubmitFailures(failures)
    logging.getLogger("tornado.application").addFilter(catch)
    cluster = None
    client = None
    started = False
    try:
        cluster = SLURMCluster(
            queue=slurm.partition, account=slurm.account, cores=slurm.cores, processes=1,
            memory=slurm.memory, walltime=_hms(limit_s), job_extra_directives=extra,
            job_script_prologue=env, python=sys.executable, interface=slurm.interface,
            log_directory=slurm.log_directory, job_name="stampbatch-score",
            silence_logs="error", worker_extra_args=worker_args,
            # no dashboard (a second run would find 8787 taken and warn about it)
            scheduler_options={"dashboard": False, "dashboard_address": ":0"},
        )
        cluster.adapt(minimum_jobs=slurm.jobs, maximum_jobs=slurm.jobs)
        client = Client(cluster)
        log(f"waiting for Slurm workers ({slurm.jobs} job(s) of {slurm.cores} cores"
            + (", 1 GPU each" if slurm.gpus else "") + f"; at most {slurm.start_timeout:g} s)")
        _wait_for_a_worker(client, slurm, failures)
        started = True
        yield client, f"Slurm ({slurm.jobs} job(s) x {slurm.cores} cores)"
    finally:
        try:
            if client is not None:
                client.close()
            if cluster is not None:
                _close_slurm_cluster(cluster, hung=not started)
        finally:
            logging.getLogger("tornado.application").removeFilter(catch)


class _SubmitFailures(logging.Filter):
    """Keep dask-jobqueue's failed ``sbatch`` calls (logged by tornado as a traceback from a
    background task) off the console, and their stderr for the one-line error."""

    def __init__(self, found: list[str]) -> None:
        super().__init__()
        self.found = found

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        text = str(exc or "")
        if not (isinstance(exc, RuntimeError) and "Command:" in text):
            return True
        stderr = text.split("stderr:", 1)[-1] if "stderr:" in text else text
        self.found.append(" ".join(stderr.split()) or "sbatch failed with no message")
        return False


def _wait_for_a_worker(client: Any, slurm: SlurmOptions, failures: list[str]) -> None:
    """Until the first worker connects: a failed ``sbatch`` ends the wait at once with its own
    error; no worker within ``start_timeout`` ends it with the cause as far as known."""
    import time

    deadline = time.monotonic() + slurm.start_timeout
    while True:
        if failures:
            raise ClusterStartError(f"Slurm refused the worker job: {failures[0][:300]}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise ClusterStartError(
                f"no Slurm worker started within {slurm.start_timeout:g} s (partition "
                f"{slurm.partition or 'default'}): the job is pending or sbatch has not "
                "returned (is the Slurm controller answering? try squeue); "
                "--start-timeout sets the limit")
        try:
            client.wait_for_workers(1, timeout=min(1.0, left))
            return
        except TimeoutError:
            continue


def _close_slurm_cluster(cluster: Any, *, hung: bool) -> None:
    """Cancel the jobs and stop the scheduler. After a start that failed (``hung``), first
    end our own ``sbatch`` children still waiting for a controller that does not answer
    (closing would wait for them), and mark the jobs whose sbatch never returned or failed:
    distributed's close asserts that every job it created has started or failed."""
    from distributed.core import Status

    if hung:  # one pass, no wait: the close must not find them still running
        _end_children("sbatch", wait_s=0.0)
    _mark_unsubmitted_failed(cluster, Status)
    with contextlib.suppress(TimeoutError, OSError, RuntimeError):
        cluster.close(timeout=10)
    if hung:  # one still ending, or one dask-jobqueue started while the first were killed
        _end_children("sbatch")


def _end_children(name: str, wait_s: float = 5.0) -> None:
    """SIGKILL our children running ``name`` until none is left running (a killed process
    still shows its command until the kernel has ended it; one may be started meanwhile),
    for at most ``wait_s`` seconds. Ended children are zombies without a command line,
    reaped by whoever started them."""
    import time

    deadline = time.monotonic() + wait_s
    while pids := _children_named(name):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)


def _mark_unsubmitted_failed(cluster: Any, status: Any) -> None:
    """Jobs still ``created`` (sbatch failed or never returned) become ``failed``. A helper of
    its own, so that no reference to a job outlives it: the cluster's list of jobs is weak,
    and a job that closed normally (dask-jobqueue leaves its status ``running``) must be
    gone from it when the cluster closes."""
    for job in list(getattr(cluster, "_created", ())):
        if getattr(job, "status", None) == status.created:
            job.status = status.failed


def _children_named(name: str) -> list[int]:
    """Process ids of this process's direct children running the command ``name`` (its
    process name, or the program or script in its first two arguments; from /proc)."""
    me, found = os.getpid(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")[:2]
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) < 2 or int(fields[1]) != me:
            continue
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        if comm == name or name.encode() in (os.path.basename(a) for a in argv):
            found.append(int(entry.name))
    return found


def _hms(seconds: int) -> str:
    """Seconds as Slurm's unambiguous ``D-HH:MM:SS``."""
    days, rest = divmod(int(seconds), 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{days}-{h:02d}:{m:02d}:{s:02d}"
