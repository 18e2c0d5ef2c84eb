"""Score candidate stamp files with trained models on Dask: probabilities and occlusion maps.

The work is split into chunks of rows aligned with the files' HDF5 chunking. Each Dask task
reads one chunk, normalises it, scores it with every model that still needs it and computes
occlusion maps for the rows that qualify (``none``, ``all`` or ``above:P`` = P(source) >= P).
Workers load each model once per process (:class:`ModelPlugin`, a distributed worker
plugin, backed by :func:`stampbatch.inference.cached_predictor`).

Exactly once, crash-safe (nothing here trusts a process to finish):

* The driver records every finished chunk durably in a journal directory beside the target
  file, ``<target>.stampbatch-journal/<model>/``: one ``.npz`` per chunk, written under a
  temporary name, fsynced and renamed, plus a ``manifest.json`` (model sha256, chunking,
  occlusion settings, stamp count). A rerun after a kill at any moment (SIGKILL included)
  skips journaled chunks and computes only the rest; chunk boundaries are fixed by the
  manifest, so the results are identical to an uninterrupted run.
* When all chunks of a file are journaled, ``/scores/<model>`` is written in one pass from
  the journal (group created ``complete=False``, committed with provenance attributes),
  fsynced, and only then the journal is deleted. A kill during that pass leaves the group
  incomplete; the next run rewrites it from the still-present journal.
* The candidate stamps are only ever read. Scores go into the candidate file (new objects
  appended; ``/stamps`` is never rewritten) or, with ``out_dir``, into a side file.
* An exclusive ``flock`` on ``<target>.stampbatch.lock`` for the whole run refuses a second
  scorer on the same file instead of interleaving.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import fcntl
import glob
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stampbatch import __version__, inference, store
from stampbatch.errors import StampbatchError, UsageError
from stampbatch.inference import ModelSource, ModelSpec
from stampbatch.occlusion import occlusion_maps
from stampbatch.preprocess import normalize_with_mask

JOURNAL_SUFFIX = ".stampbatch-journal"
LOCK_SUFFIX = ".stampbatch.lock"
JOURNAL_FORMAT = 1
PLUGIN_NAME = "stampbatch-models"
DEFAULT_CHUNK_SIZE = 4096


class ScoreError(StampbatchError):
    """Scoring cannot proceed; the one-line message names the file and the problem."""


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class OcclusionMode:
    """Which rows get an occlusion map: ``none``, ``all`` or ``above:P`` (P(source) >= P)."""

    kind: str = "none"
    threshold: float | None = None

    @classmethod
    def parse(cls, text: str) -> OcclusionMode:
        text = str(text).strip()
        if text in ("none", "all"):
            return cls(text)
        if text.startswith("above:"):
            try:
                value = float(text.split(":", 1)[1])
            except ValueError:
                value = float("nan")
            if not 0.0 <= value <= 1.0:
                raise UsageError(f"occlusion {text!r}: the threshold must be a probability "
                                 "between 0 and 1 (e.g. above:0.5)")
            return cls("above", value)
        raise UsageError(f"occlusion {text!r}: choose none, all or above:P (e.g. above:0.5)")

    def __str__(self) -> str:
        return self.kind if self.kind != "above" else f"above:{self.threshold:g}"

    def select(self, probability: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Boolean mask of the rows that get a map (never the unscorable ones)."""
        if self.kind == "none":
            return np.zeros(len(probability), dtype=bool)
        if self.kind == "all":
            return valid.copy()
        return valid & (probability >= self.threshold)


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
    start_timeout: float = 600.0     # seconds to wait for the first worker
    job_extra: tuple[str, ...] = ()

    @property
    def jobs(self) -> int:
        return self.gpus if self.gpus > 0 else self.workers


# --------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class ChunkTask:
    """Rows [start, stop) of one candidate file, to score with ``models``."""

    path: str
    start: int
    stop: int
    models: tuple[ModelSpec, ...]
    occlusion: OcclusionMode
    patch: int


@dataclass
class ChunkResult:
    """One model's scores of one chunk: P(source) for every row, maps for some rows."""

    probability: np.ndarray          # float32 (n,), NaN for unscorable stamps
    occlusion_rows: np.ndarray       # int64 (m,), absolute row numbers, increasing
    occlusion_maps: np.ndarray       # float32 (m, H, W)


def _task_threads() -> tuple[int, int]:
    """(inference threads per call, occlusion pipelines per task) in this worker process.

    A worker runs ``nthreads`` tasks at once, so each call of the model gets
    cores // nthreads intra-op threads. Occlusion maps are split over ``nthreads``
    pipelines inside the task too, so a chunk alone on a worker still uses every core;
    when all tasks compute maps this oversubscribes by at most nthreads x (measured cost on
    2 cores: 3 %).
    """
    try:
        from distributed import get_worker

        nthreads = max(1, get_worker().state.nthreads)
    except (ImportError, ValueError):
        return 1, 1
    return max(1, _cores() // nthreads), nthreads


def score_chunk(task: ChunkTask) -> dict[str, ChunkResult]:
    """Read, normalise and score one chunk with every model of the task (runs on a worker)."""
    normalised, valid = normalize_with_mask(store.read_stamps(task.path, task.start, task.stop))
    threads, pipelines = _task_threads()
    h, w = normalised.shape[1:]
    results: dict[str, ChunkResult] = {}
    for spec in task.models:
        predict = inference.cached_predictor(spec, threads)
        p = predict(normalised)
        p[~valid] = np.nan
        rows = np.flatnonzero(task.occlusion.select(p, valid))
        maps = (occlusion_maps(normalised[rows], predict, task.patch, threads=pipelines)
                if len(rows) else np.empty((0, h, w), dtype=np.float32))
        results[spec.name] = ChunkResult(p, (rows + task.start).astype(np.int64), maps)
    return results


try:
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPluginBase
except ImportError:  # pragma: no cover - distributed is a dependency
    _WorkerPluginBase = object


class ModelPlugin(_WorkerPluginBase):
    """Loads every model once when a worker starts (or joins later), before its first task."""

    name = PLUGIN_NAME
    idempotent = False

    def __init__(self, specs: Sequence[ModelSpec]) -> None:
        self.specs = tuple(specs)

    async def setup(self, worker) -> None:  # noqa: ANN001 - distributed.Worker
        loop = asyncio.get_running_loop()
        threads = max(1, _cores() // max(1, worker.state.nthreads))
        for spec in self.specs:   # off the event loop: a TensorFlow load takes seconds
            await loop.run_in_executor(None, inference.cached_predictor, spec, threads)


# --------------------------------------------------------------------------- inputs


def expand_candidates(items: Iterable[str | Path]) -> list[Path]:
    """Paths from a list of files, globs and ``@list.txt`` files (one path per line, # comments).

    A glob that matches nothing and a list file that does not exist are kept as given, so
    the caller reports them as missing. Duplicates are dropped, order kept.
    """
    out: list[Path] = []
    for item in items:
        text = str(item)
        if text.startswith("@"):
            list_file = Path(text[1:])
            if not list_file.is_file():
                raise UsageError(f"{list_file}: no such list file (given as {text})")
            base = list_file.parent
            for line in list_file.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    p = Path(line)
                    out.extend(expand_candidates([p if p.is_absolute() else base / p]))
        elif any(ch in text for ch in "*?[") and not Path(text).exists():
            matches = sorted(glob.glob(text))
            out.extend(Path(m) for m in matches) if matches else out.append(Path(text))
        else:
            out.append(Path(text))
    seen: set[str] = set()
    unique = []
    for p in out:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def read_only_reason(path: Path) -> str | None:
    """Why ``path`` must not be written, or None. Mode bits count even for root."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if not st.st_mode & 0o222:
        return "is read-only (no write permission bits)"
    with contextlib.suppress(OSError):
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "is on a read-only file system"
    if not os.access(path, os.W_OK):
        return "is not writable by this user"
    return None


def _dir_problem(directory: Path) -> str | None:
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return f"directory {directory} is on a read-only file system"
    except OSError as exc:
        return f"directory {directory} is not usable ({exc.strerror})"
    if not os.access(directory, os.W_OK):
        return f"directory {directory} is not writable"
    return None


def _chunk_rows(chunk_size: int, file_chunk_rows: int) -> int:
    """Rows per task: a multiple of the file's HDF5 chunk rows, close to ``chunk_size``."""
    file_chunk_rows = max(1, int(file_chunk_rows))
    return max(1, round(chunk_size / file_chunk_rows)) * file_chunk_rows


# --------------------------------------------------------------------------- lock


class TargetLock:
    """An exclusive, non-blocking flock on ``<target>.stampbatch.lock`` held for a whole run."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.path = target.with_name(target.name + LOCK_SUFFIX)
        self._fd: int | None = None

    def acquire(self) -> None:
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ScoreError(f"{self.target}: cannot create the lock file {self.path} "
                                 f"({exc.strerror}); use --out DIR") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                finally:
                    os.close(fd)
                raise ScoreError(f"{self.target} is being scored by another stampbatch process "
                                 f"(pid {holder}); refusing to interleave") from None
            # The holder before us may have unlinked the file after we opened it: retry.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fd = fd
                return
            os.close(fd)
        raise ScoreError(f"{self.target}: could not take the lock {self.path}")

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------- journal


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Write via ``write(fh)`` to a temporary name beside ``path``, fsync, rename onto it."""
    with store.atomic_path(path, overwrite=True, suffix=path.suffix) as tmp, open(tmp, "wb") as fh:
        write(fh)


def _disk_error(exc: OSError, target: Path, what: str, journal: Path) -> ScoreError:
    import errno

    reason = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (
        exc.strerror or " ".join(str(exc).split()) or type(exc).__name__)
    return ScoreError(f"{target}: {reason} while writing {what}; finished chunks are kept in "
                      f"{journal} and the candidate stamps are untouched; fix it and rerun")


class Journal:
    """Durable record of the finished chunks of one (target file, model)."""

    MANIFEST = "manifest.json"
    _CHECKED = ("format", "model_sha256", "n_stamps", "chunk_rows", "occlusion",
                "occlusion_patch", "stamp_shape")

    def __init__(self, target: Path, model: str) -> None:
        self.target = target
        self.root = target.with_name(target.name + JOURNAL_SUFFIX)
        self.dir = self.root / model

    @staticmethod
    def _name(start: int, stop: int) -> str:
        return f"chunk-{start:012d}-{stop:012d}.npz"

    def manifest(self) -> dict[str, Any] | None:
        path = self.dir / self.MANIFEST
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def mismatch(self, manifest: dict[str, Any]) -> str | None:
        """What differs between the journal on disk and ``manifest`` (None: it can resume)."""
        old = self.manifest()
        if old is None:
            return None
        for key in self._CHECKED:
            if old.get(key) != manifest.get(key):
                return f"{key} {old.get(key)!r} (journal) vs {manifest.get(key)!r} (now)"
        return None

    def start(self, manifest: dict[str, Any]) -> None:
        """Create the journal (or keep a matching one)."""
        if self.manifest() is not None:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            text = json.dumps(manifest, indent=1, sort_keys=True).encode()
            _write_atomic(self.dir / self.MANIFEST, lambda fh: fh.write(text))
        except OSError as exc:
            raise _disk_error(exc, self.target, "the journal manifest", self.dir) from exc

    def wipe(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.root.rmdir()

    def done(self) -> dict[int, int]:
        """Finished chunks: start → stop."""
        out = {}
        if self.dir.is_dir():
            for p in self.dir.glob("chunk-*.npz"):
                with contextlib.suppress(ValueError):
                    _, a, b = p.stem.split("-")
                    out[int(a)] = int(b)
        return out

    def record(self, start: int, stop: int, result: ChunkResult) -> None:
        def write(fh: Any) -> None:
            np.savez(fh, probability=result.probability, rows=result.occlusion_rows,
                     maps=result.occlusion_maps)

        try:
            _write_atomic(self.dir / self._name(start, stop), write)
        except OSError as exc:
            raise _disk_error(exc, self.target, f"the journal chunk {start}..{stop}",
                              self.dir) from exc

    def load(self, start: int, stop: int) -> ChunkResult:
        path = self.dir / self._name(start, stop)
        try:
            with np.load(path, allow_pickle=False) as z:
                return ChunkResult(z["probability"], z["rows"], z["maps"])
        except (OSError, ValueError, KeyError) as exc:
            raise ScoreError(f"{path}: unreadable journal chunk ({exc}); rerun with --force "
                             "to rescore from scratch") from exc


# --------------------------------------------------------------------------- planning


@dataclass
class ModelWork:
    """One model's work on one file."""

    spec: ModelSource | ModelSpec
    journal: Journal
    todo: set[int] = field(default_factory=set)      # chunk starts still to compute


@dataclass
class FileWork:
    """One candidate file: where its scores go and what remains to do."""

    candidates: Path
    target: Path
    n_stamps: int
    stamp_shape: tuple[int, int]
    chunk_rows: int
    lock: TargetLock
    models: dict[str, ModelWork] = field(default_factory=dict)
    side_file: bool = False

    def chunks(self) -> list[tuple[int, int]]:
        return [(lo, min(lo + self.chunk_rows, self.n_stamps))
                for lo in range(0, self.n_stamps, self.chunk_rows)]


@dataclass
class ModelSummary:
    name: str
    sha256: str
    backend: str
    stamps: int = 0
    above_half: int = 0
    unscorable: int = 0
    maps: int = 0


@dataclass
class ScoreSummary:
    """What a run did."""

    files: list[Path] = field(default_factory=list)
    targets: list[Path] = field(default_factory=list)
    models: dict[str, ModelSummary] = field(default_factory=dict)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    up_to_date: list[tuple[Path, str]] = field(default_factory=list)
    stamps_scored: int = 0          # stamp rows computed in this run (each with every model)
    wall_s: float = 0.0
    scheduler: str = ""

    @property
    def stamps_per_s(self) -> float:
        return self.stamps_scored / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def unscorable(self) -> int:
        return max((m.unscorable for m in self.models.values()), default=0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": [str(p) for p in self.files], "targets": [str(p) for p in self.targets],
            "models": {k: asdict(v) for k, v in self.models.items()},
            "skipped": [[str(p), r] for p, r in self.skipped],
            "up_to_date": [[str(p), m] for p, m in self.up_to_date],
            "stamps_scored": self.stamps_scored, "wall_s": self.wall_s,
            "stamps_per_s": self.stamps_per_s, "scheduler": self.scheduler,
        }


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Planner:
    def __init__(self, skip_bad: bool, log: Callable[[str], None]) -> None:
        self.skip_bad = skip_bad
        self.log = log
        self.skipped: list[tuple[Path, str]] = []

    def bad(self, path: Path, problem: str | StampbatchError) -> None:
        message = str(problem)
        if not self.skip_bad:
            if isinstance(problem, StampbatchError):
                raise problem
            raise ScoreError(f"{path}: {message}")
        self.skipped.append((path, message))
        self.log(f"skipping {path}: {message}")


def _manifest(fw: FileWork, spec: ModelSpec, occlusion: OcclusionMode, patch: int,
              backend: str) -> dict[str, Any]:
    return {
        "format": JOURNAL_FORMAT, "model": spec.name, "model_sha256": spec.sha256,
        "model_file": spec.keras_path, "source": str(fw.candidates.resolve()),
        "n_stamps": fw.n_stamps, "chunk_rows": fw.chunk_rows, "occlusion": str(occlusion),
        "occlusion_patch": patch if occlusion.kind != "none" else 0,
        "stamp_shape": list(fw.stamp_shape), "backend": backend,
        "started_at": _utc_now(),
    }


def _utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- Dask


@contextlib.contextmanager
def _dask_client(scheduler: str | None, slurm: SlurmOptions | None,
                 n_workers: int | None, threads_per_worker: int | None,
                 log: Callable[[str], None]):
    """A distributed Client: joined, on Slurm workers, or on a LocalCluster for this machine."""
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise ScoreError(f"cannot reach the Dask scheduler at {scheduler} ({exc})") from exc
        try:
            yield client, f"Dask scheduler {scheduler}"
        finally:
            client.close()
        return
    if slurm is not None:
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
        walltime_s = _walltime_seconds(slurm.walltime)
        if walltime_s > 900:   # retire before Slurm kills the job; adapt() submits a new one
            worker_args = ["--lifetime", f"{walltime_s - 300}s", "--lifetime-stagger", "60s"]
        cluster = SLURMCluster(
            queue=slurm.partition, account=slurm.account, cores=slurm.cores, processes=1,
            memory=slurm.memory, walltime=slurm.walltime, job_extra_directives=extra,
            job_script_prologue=env, python=sys.executable, interface=slurm.interface,
            log_directory=slurm.log_directory, job_name="stampbatch-score",
            silence_logs="error", worker_extra_args=worker_args,
        )
        client = None
        try:
            cluster.adapt(minimum_jobs=slurm.jobs, maximum_jobs=slurm.jobs)
            client = Client(cluster)
            log(f"waiting for Slurm workers ({slurm.jobs} job(s) of {slurm.cores} cores"
                + (", 1 GPU each" if slurm.gpus else "") + ")")
            try:
                client.wait_for_workers(1, timeout=slurm.start_timeout)
            except TimeoutError as exc:
                raise ScoreError(f"no Slurm worker started within {slurm.start_timeout:.0f} s "
                                 f"(partition {slurm.partition or 'default'}); check squeue"
                                 ) from exc
            yield client, f"Slurm ({slurm.jobs} job(s) x {slurm.cores} cores)"
        finally:
            if client is not None:
                client.close()
            cluster.close()
        return
    cores = _cores()
    if threads_per_worker is None:
        threads_per_worker = max(1, cores // n_workers) if n_workers else min(cores, 4)
    threads = threads_per_worker
    workers = n_workers or max(1, cores // threads)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR)
    client = Client(cluster)
    try:
        yield client, f"local Dask cluster ({workers} worker(s) x {threads} threads)"
    finally:
        client.close()
        cluster.close()


def _walltime_seconds(text: str) -> int:
    """Slurm walltime ``[D-]HH:MM:SS`` (or ``MM:SS``) in seconds."""
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days and len(parts) < 3:        # D-HH and D-HH:MM
        parts += [0] * (3 - len(parts))
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, sec = parts[-3:]
    return (int(days) if days else 0) * 86400 + h * 3600 + m * 60 + sec


def _raise_open_file_limit() -> None:
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _total_threads(client) -> int:  # noqa: ANN001
    try:
        return max(1, sum(client.nthreads().values()))
    except Exception:  # noqa: BLE001 - a scheduler between workers: assume a few
        return 2


# --------------------------------------------------------------------------- the run


def score_files(
    candidates: Sequence[str | Path],
    models: Sequence[str | Path],
    *,
    name: str | None = None,
    occlusion: str | OcclusionMode = "none",
    patch: int = 5,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    out_dir: str | Path | None = None,
    backend: str = "auto",
    force: bool = False,
    skip_bad: bool = False,
    client: Any = None,
    scheduler: str | None = None,
    slurm: SlurmOptions | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = _log_stderr,
) -> ScoreSummary:
    """Score candidate files with models; write ``/scores/<model>`` to each (or a side file).

    ``candidates``: files, globs or ``@list.txt``. ``models``: run directories or .keras files.
    ``client``: an existing distributed Client (else ``scheduler``, ``slurm`` or a
    LocalCluster sized for this machine). Returns a :class:`ScoreSummary`.
    """
    t0 = time.monotonic()
    occ = occlusion if isinstance(occlusion, OcclusionMode) else OcclusionMode.parse(occlusion)
    if patch < 1:
        raise UsageError(f"occlusion patch must be a positive number of pixels, got {patch}")
    if chunk_size < 1:
        raise UsageError(f"chunk size must be positive, got {chunk_size}")
    if not models:
        raise UsageError("give at least one model (--model RUN_DIR_OR_FILE)")
    if name is not None and len(models) > 1:
        raise UsageError("--name applies to one model only; got "
                         f"{len(models)} models")
    if scheduler is not None and slurm is not None:
        raise UsageError("--scheduler and --slurm exclude each other")
    planner = _Planner(skip_bad, log)
    summary = ScoreSummary()
    _raise_open_file_limit()      # one lock per target file is held for the whole run

    # 1. models: found, named, hashed (no TensorFlow yet)
    sources: list[ModelSource] = [inference.resolve_model(m, name) for m in models]
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"two models would share the name {dupes[0]!r} (/scores/{dupes[0]}); "
                         "score them in separate runs with --name")

    # 2. candidate files: exist, are stores, targets writable
    paths = expand_candidates(candidates)
    if not paths:
        raise UsageError("no candidate files given")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ScoreError(f"{out}: cannot create the output directory "
                             f"({exc.strerror})") from exc
    files: list[FileWork] = []
    targets_seen: dict[str, Path] = {}
    for path in paths:
        if not path.exists():
            planner.bad(path, "no such file")
            continue
        try:
            info = store.open_store(path)
        except StampbatchError as exc:
            planner.bad(path, exc)
            continue
        if info.is_score_file:
            planner.bad(path, "is a score side file, not a candidate file")
            continue
        target = store.score_target(path, out)
        key = os.path.realpath(target)
        if key in targets_seen:
            planner.bad(path, f"writes to the same side file {target} as {targets_seen[key]}; "
                              "score them into different --out directories")
            continue
        if out is None:
            reason = read_only_reason(path)
            if reason is not None:
                planner.bad(path, f"{reason}; write the scores to a side file with --out DIR")
                continue
        problem = _dir_problem(target.parent)
        if problem is not None:
            planner.bad(path, f"{problem} (the journal and lock live beside "
                              f"{target.name}); use --out DIR")
            continue
        targets_seen[key] = path
        fw = FileWork(path, target, info.n_stamps, info.stamp_shape,
                      _chunk_rows(chunk_size, info.chunk_rows), TargetLock(target),
                      side_file=out is not None)
        files.append(fw)

    with contextlib.ExitStack() as stack:
        # 3. lock every target for the whole run
        locked: list[FileWork] = []
        for fw in files:
            try:
                fw.lock.acquire()
            except ScoreError as exc:
                planner.bad(fw.candidates, exc)
                continue
            stack.callback(fw.lock.release)
            locked.append(fw)
        files = locked

        # 4. what is already done, what must be (re)done
        prepared: dict[str, ModelSpec] = {}
        for fw in files:
            if fw.side_file and fw.target.exists():
                try:
                    attrs = store.read_attrs(fw.target)
                except StampbatchError as exc:
                    planner.bad(fw.candidates, exc)
                    fw.models.clear()
                    continue
                src = str(attrs.get("source_file", ""))
                if src and src != str(fw.candidates.resolve()):
                    planner.bad(fw.candidates, f"side file {fw.target} belongs to {src}")
                    continue
            for src in sources:
                journal = Journal(fw.target, src.name)
                status = store.score_status(fw.target, src.name) if fw.target.exists() else None
                has_journal = journal.manifest() is not None
                if status is not None and not has_journal:
                    old_sha = str(status.get("model_sha256", ""))
                    if old_sha != src.sha256 and not force:
                        planner.bad(fw.candidates, ScoreError(
                            f"{fw.target}: /scores/{src.name} was made by a different model "
                            f"file (sha256 {old_sha[:12]}, now {src.sha256[:12]}); use --force "
                            "to replace it or --name to score under another name"))
                        fw.models.clear()
                        break
                    if not force:
                        summary.up_to_date.append((fw.target, src.name))
                        log(f"{fw.target}: already scored by {src.name} (sha256 {old_sha[:12]}, "
                            f"occlusion {status.get('occlusion_mode', 'none')}); nothing to do "
                            "(--force rescores)")
                        continue
                fw.models[src.name] = ModelWork(src, journal)
        skipped = {p for p, _ in planner.skipped}
        for fw in files:
            if not fw.models or fw.candidates in skipped:
                fw.lock.release()          # nothing to do here: let others have the file
        files = [fw for fw in files if fw.models and fw.candidates not in skipped]

        # 5. prepare the models that have work (ONNX export once, output checks)
        needed = {mw.spec.name: mw.spec for fw in files for mw in fw.models.values()}
        gpu = slurm is not None and slurm.gpus > 0
        for src in sources:
            if src.name in needed:
                prepared[src.name] = inference.prepare_model(src, backend, gpu=gpu)
        for spec in prepared.values():
            summary.models[spec.name] = ModelSummary(spec.name, spec.sha256, spec.backend)

        # 6. shapes, journals, side files
        ready: list[FileWork] = []
        for fw in files:
            shape_problem = next((f"stamps are {fw.stamp_shape[0]}x{fw.stamp_shape[1]} but model "
                                  f"{prepared[n].name} ({prepared[n].keras_path}) takes "
                                  f"{prepared[n].stamp_shape[0]}x{prepared[n].stamp_shape[1]}"
                                  for n in fw.models
                                  if tuple(prepared[n].stamp_shape) != tuple(fw.stamp_shape)),
                                 None)
            if shape_problem is None and occ.kind != "none" and patch > min(fw.stamp_shape):
                shape_problem = (f"occlusion patch {patch} is larger than the "
                                 f"{fw.stamp_shape[0]}x{fw.stamp_shape[1]} stamps")
            if shape_problem is not None:
                planner.bad(fw.candidates, shape_problem)
                continue
            ok = True
            for mname, mw in fw.models.items():
                spec = prepared[mname]
                mw.spec = spec
                manifest = _manifest(fw, spec, occ, patch, spec.backend)
                diff = mw.journal.mismatch(manifest)
                if diff is not None:
                    if not force:
                        planner.bad(fw.candidates, ScoreError(
                            f"{fw.target}: an unfinished run of {mname} with other settings is "
                            f"journaled in {mw.journal.dir} ({diff}); rerun with those settings "
                            "or use --force to discard it"))
                        ok = False
                        break
                    mw.journal.wipe()
                all_chunks = {lo for lo, _ in fw.chunks()}
                mw.todo = all_chunks - set(mw.journal.done())
            if not ok:
                continue
            ready.append(fw)
        files = ready
        for fw in files:
            try:
                if fw.side_file and not fw.target.exists():
                    store.create_score_file(fw.target, fw.candidates, fw.n_stamps,
                                            fw.stamp_shape)
                for mname, mw in fw.models.items():
                    mw.journal.start(_manifest(fw, prepared[mname], occ, patch,
                                               prepared[mname].backend))
            except StampbatchError as exc:
                planner.bad(fw.candidates, exc)
        files = [fw for fw in files if fw.candidates not in {p for p, _ in planner.skipped}]
        summary.files = [fw.candidates for fw in files]
        summary.targets = [fw.target for fw in files]

        # 7. compute what is missing, journal it, write each file when complete
        remaining: dict[int, int] = {}
        total = 0
        for fw in files:
            starts = set().union(*(mw.todo for mw in fw.models.values()))
            remaining[id(fw)] = len(starts)
            total += sum(min(lo + fw.chunk_rows, fw.n_stamps) - lo for lo in starts)
            if not starts:                 # everything journaled before: just write it
                _finalise(fw, prepared, occ, patch, summary)
        tasks = ((fw, task) for fw in files if remaining[id(fw)]
                 for task in _chunk_tasks(fw, prepared, occ, patch))
        if total:
            with contextlib.ExitStack() as dstack:
                if client is None:
                    client, summary.scheduler = dstack.enter_context(
                        _dask_client(scheduler, slurm, n_workers, threads_per_worker, log))
                else:
                    summary.scheduler = "given Dask client"
                _run(client, tasks, total, remaining, prepared, occ, patch, planner, summary,
                     progress)
        summary.skipped = planner.skipped
    summary.wall_s = time.monotonic() - t0
    return summary


def _chunk_tasks(fw: FileWork, prepared: dict[str, ModelSpec], occ: OcclusionMode,
                 patch: int) -> Iterator[ChunkTask]:
    """The chunks of one file that some model still needs, in row order."""
    path = str(fw.candidates.resolve())
    for lo, hi in fw.chunks():
        specs = tuple(prepared[m] for m, mw in fw.models.items() if lo in mw.todo)
        if specs:
            yield ChunkTask(path, lo, hi, specs, occ, patch)


def _run(client, tasks, total, remaining, prepared, occ, patch, planner, summary,  # noqa: ANN001
         progress) -> None:
    """Submit chunk tasks in a bounded window; journal results; finalise finished files."""
    from distributed import as_completed

    from stampbatch.progress import Progress

    specs = sorted(prepared.values(), key=lambda s: s.name)
    token = uuid.uuid4().hex[:8]
    plugin_name = f"{PLUGIN_NAME}-{token}"       # runs sharing a client do not clash
    client.register_plugin(ModelPlugin(specs), name=plugin_name)
    counter = iter(range(1 << 62))
    owner: dict[str, tuple[Any, ChunkTask]] = {}
    bad_files: set[int] = set()
    done = as_completed()

    def submit_more() -> None:
        window = max(4, 3 * _total_threads(client))
        while len(owner) < window:
            item = next(tasks, None)
            if item is None:
                return
            fw, task = item
            if id(fw) in bad_files:
                continue
            key = f"stampbatch-score-{token}-{next(counter)}"
            fut = client.submit(score_chunk, task, key=key, pure=False, retries=1)
            owner[fut.key] = (fw, task)
            done.add(fut)

    with Progress(total, "scoring", "stamps", enabled=progress) as bar:
        try:
            submit_more()
            for fut in done:
                fw, task = owner.pop(fut.key)
                try:
                    result = fut.result()
                except StampbatchError as exc:
                    failure: StampbatchError = exc
                except Exception as exc:  # noqa: BLE001 - worker errors come in every type
                    text = " ".join(str(exc).split())[:300] or type(exc).__name__
                    failure = ScoreError(f"{task.path}: scoring rows {task.start}..{task.stop} "
                                         f"failed ({text})")
                else:
                    failure = None
                fut.release()
                if failure is not None:
                    if id(fw) in bad_files:
                        continue
                    planner.bad(fw.candidates, failure)     # raises unless --skip-bad
                    bad_files.add(id(fw))
                    summary.files = [p for p in summary.files if p != fw.candidates]
                    summary.targets = [p for p in summary.targets if p != fw.target]
                    submit_more()
                    continue
                if id(fw) in bad_files:
                    continue
                for mname, res in result.items():
                    fw.models[mname].journal.record(task.start, task.stop, res)
                    fw.models[mname].todo.discard(task.start)
                bar.update(task.stop - task.start)
                summary.stamps_scored += task.stop - task.start
                remaining[id(fw)] -= 1
                if remaining[id(fw)] == 0:
                    _finalise(fw, prepared, occ, patch, summary)
                submit_more()
        finally:
            for fut_key in list(owner):
                with contextlib.suppress(Exception):
                    client.cancel([fut_key])
            with contextlib.suppress(Exception):
                client.unregister_worker_plugin(plugin_name)


def _check_space(target: Path, journal: Journal, model: str) -> None:
    """Refuse to start writing /scores when the disk cannot hold it.

    HDF5 does not survive running out of space mid-write (the library may even crash the
    process), so the driver checks first: the journal's size is the data to be written.
    """
    need = sum(p.stat().st_size for p in journal.dir.glob("chunk-*.npz"))
    need = int(need * 1.1) + (1 << 20)        # chunk indexes and metadata
    st = os.statvfs(target.parent)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise ScoreError(f"{target}: disk full: /scores/{model} needs about {need / 1e6:,.1f} MB, "
                         f"{free / 1e6:,.1f} MB free; finished chunks are kept in {journal.dir} "
                         "and the candidate stamps are untouched; free space and rerun")


def _finalise(fw: FileWork, prepared: dict[str, ModelSpec], occ: OcclusionMode, patch: int,
              summary: ScoreSummary) -> None:
    """Write every journaled model of one file into /scores/<model>, then drop the journals."""
    for mname, mw in fw.models.items():
        spec = prepared[mname]
        done = mw.journal.done()
        expected = dict(fw.chunks())
        if done != expected:
            missing = sorted(set(expected) - set(done))[:3]
            raise ScoreError(f"{fw.target}: journal {mw.journal.dir} is incomplete (chunks "
                             f"starting at {missing} missing); rerun")
        ms = summary.models[mname]
        n_nan = n_above = n_maps = 0
        _check_space(fw.target, mw.journal, mname)
        try:
            with store.ScoreWriter(fw.target, mname, fw.n_stamps, fw.stamp_shape,
                                   chunk_rows=fw.chunk_rows) as writer:
                for lo in sorted(done):
                    res = mw.journal.load(lo, done[lo])
                    writer.write_probability(lo, res.probability)
                    writer.append_occlusion(res.occlusion_rows, res.occlusion_maps)
                    p = res.probability
                    n_nan += int(np.isnan(p).sum())
                    n_above += int((p >= 0.5).sum())
                    n_maps += len(res.occlusion_rows)
                writer.commit({
                    "model_sha256": spec.sha256, "model_file": spec.keras_path,
                    "architecture": spec.architecture, "stampbatch_version": __version__,
                    "scored_at": _utc_now(), "occlusion_mode": str(occ),
                    "occlusion_patch": int(patch) if occ.kind != "none" else 0,
                    "chunk_rows": int(fw.chunk_rows), "backend": spec.backend,
                    "n_unscorable": int(n_nan), "source_file": str(fw.candidates.resolve()),
                })
            with open(fw.target, "rb") as fh:
                os.fsync(fh.fileno())
        except StampbatchError:
            raise
        except (OSError, RuntimeError) as exc:
            raise _disk_error(exc, fw.target, f"/scores/{mname}", mw.journal.dir) from exc
        mw.journal.wipe()
        ms.stamps += fw.n_stamps
        ms.above_half += n_above
        ms.unscorable += n_nan
        ms.maps += n_maps
