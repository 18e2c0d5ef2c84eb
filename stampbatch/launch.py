"""Train every architecture on a cluster with one command: submitit jobs, preemption-safe.

A job specification (TOML, see ``jobs/train_all.toml``) names the stamp store, the
architectures, the training options (``[train]``, with ``[overrides.<arch>]`` per
architecture) and the Slurm request (``[slurm]``). :func:`launch` submits one job per
architecture as one Slurm job array (``submitit``'s ``map_array``) — or runs the same jobs
through submitit's local executor where there is no Slurm — and appends what it submitted
to ``RUNS/launch-manifest.json``. Each job is a :class:`TrainJob`, a
``submitit.helpers.Checkpointable``: on preemption or time-out Slurm sends USR2, submitit
calls :meth:`TrainJob.checkpoint`, requeues the job, and the requeued job calls
``train.train_run`` again, which resumes from the run directory's epoch checkpoint with
the history intact.

:func:`job_statuses` reads the manifest back and asks the scheduler afresh (``squeue``
for jobs still in the queue, then ``sacct`` for those that have left it) for each job's state; the run
directory (``train.run_state``) gives the epoch and best validation metrics, the submitit
log the error line of a failed job. :func:`wait_for_jobs` follows them with a live status
line, :func:`collect` gathers the finished runs into the side-by-side report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import submitit
from submitit.core.utils import JobPaths
from submitit.slurm.slurm import SlurmInfoWatcher, _make_sbatch_string

from stampbatch.config import from_mapping, load_toml
from stampbatch.errors import StampbatchError, UsageError
from stampbatch.train import TrainConfig

MANIFEST_NAME = "launch-manifest.json"
MANIFEST_VERSION = 1
SUBMITIT_DIR = "submitit"  # RUNS/submitit/<launch id>/<job id>/: sbatch script, pickles, logs
EVENTS_NAME = "launch.log"  # in each run directory: one line per job start, checkpoint, end
EXECUTORS = ("auto", "slurm", "local")
CONTAINER_RUNTIMES = ("apptainer", "singularity")
# Environment defaults of every job (a value set when launching wins): quiet TensorFlow,
# oneDNN on (twice as fast on the CPUs measured).
JOB_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "1"}
# Slurm states of a job that is not over yet (submitit's list, plus the rarer ones).
ACTIVE_STATES = frozenset({
    "SUBMITTED", "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
    "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "PREEMPTED", "READY", "STAGE_OUT", "SIGNALING",
})
# A job accounting has never heard of is "SUBMITTED" this long, then "UNKNOWN" (purged).
_UNSEEN_GRACE_S = 300.0


class LaunchError(StampbatchError):
    """Jobs could not be submitted, followed or collected (one line: what and where)."""


# --------------------------------------------------------------------------- specification


@dataclass
class SlurmSpec:
    """The Slurm request of every training job (one array task per architecture)."""

    partition: str | None = None  # partition (-p); none: the cluster's default partition
    account: str | None = None  # account to charge (-A)
    qos: str | None = None  # quality of service (--qos)
    time_min: int = 120  # time limit per job, minutes (--time); a job that reaches it requeues
    cpus_per_task: int = 4  # CPU cores per job (--cpus-per-task)
    mem_gb: float = 16.0  # memory per job, GB (--mem)
    gpus_per_job: int = 0  # GPUs per job (--gpus-per-node); 0 trains on the CPUs
    constraint: str | None = None  # node features required (--constraint), e.g. "a100"
    extra_sbatch: list[str] = field(default_factory=list)  # more "--key=value" sbatch lines
    setup: list[str] = field(default_factory=list)  # shell lines run first, e.g. "module load apptainer"
    python: str | None = None  # Python command of the jobs outside a container (default: this one)
    container_image: str | None = None  # run each job inside this image (.sif or docker://...)
    container_binds: list[str] = field(default_factory=list)  # extra "SRC[:DEST]" bind mounts
    container_runtime: str = "apptainer"  # apptainer or singularity
    container_python: str = "python3"  # Python command inside the image
    max_requeues: int = 3  # time-outs a job is requeued after (every USR2 counts if time_min <= 10)
    signal_delay_s: int = 90  # USR2 (checkpoint and requeue) this long before the time limit
    job_name: str = "stampbatch-train"  # Slurm job name (--job-name)

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        for name in ("time_min", "cpus_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"[slurm] {name} must be at least 1, got {getattr(self, name)}")
        if not self.mem_gb > 0:
            raise ValueError(f"[slurm] mem_gb must be positive, got {self.mem_gb}")
        for name in ("gpus_per_job", "max_requeues", "signal_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"[slurm] {name} must be 0 or more, got {getattr(self, name)}")
        if self.signal_delay_s >= 60 * self.time_min:
            raise ValueError(f"[slurm] signal_delay_s ({self.signal_delay_s}) must be shorter "
                             f"than the time limit ({self.time_min} min)")
        for line in self.extra_sbatch:
            parse_sbatch_option(line)
        if self.container_runtime not in CONTAINER_RUNTIMES:
            raise ValueError(f"[slurm] container_runtime must be one of "
                             f"{', '.join(CONTAINER_RUNTIMES)}, got {self.container_runtime!r}")
        for bind in self.container_binds:
            if not bind or "," in bind:
                raise ValueError(f"[slurm] container_binds entries are single 'SRC[:DEST]' "
                                 f"mounts, got {bind!r}")
        if self.container_image is not None and not self.container_image.strip():
            raise ValueError("[slurm] container_image is empty")
        if not self.job_name or any(c.isspace() for c in self.job_name):
            raise ValueError(f"[slurm] job_name must be one word, got {self.job_name!r}")


@dataclass
class LaunchSpec:
    """What to train and where: one training job per architecture.

    Relative paths (``data``, ``runs``) are taken from the current directory.
    """

    data: Path | None = None  # labelled HDF5 stamp store every job trains on
    architectures: list[str] = field(default_factory=list)  # one job each; empty: all registered
    runs: Path = Path("runs")  # gets one run directory per architecture and the manifest
    epochs: int | None = None  # epochs for every architecture (over [train] epochs)
    executor: str = "auto"  # slurm, local, or auto (slurm when sbatch is on PATH)
    train: TrainConfig = field(default_factory=TrainConfig)  # training options of every job
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # [overrides.<arch>]
    slurm: SlurmSpec = field(default_factory=SlurmSpec)  # the Slurm request of every job

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work (stores checked later)."""
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, "
                             f"got {self.executor!r}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        seen = set()
        for arch in self.architectures:
            if arch in seen:
                raise ValueError(f"architecture '{arch}' is listed twice")
            seen.add(arch)
        valid = sorted({f.name for f in dataclasses.fields(TrainConfig)} | {"data"})
        for arch, table in self.overrides.items():
            if not isinstance(table, Mapping):
                raise ValueError(f"[overrides.{arch}] must be a table of [train] options")
            unknown = sorted(set(table) - set(valid))
            if unknown:
                raise ValueError(f"[overrides.{arch}]: unknown option(s) {unknown}; "
                                 f"valid options are {valid}")
            if not isinstance(table.get("data", ""), (str, Path)):
                raise ValueError(f"[overrides.{arch}]: data must be a path, got "
                                 f"{table['data']!r}")


@dataclass(frozen=True)
class JobPlan:
    """One architecture's training job, fully resolved (absolute paths, merged options)."""

    arch: str
    data: Path
    run_dir: Path
    config: TrainConfig


def parse_sbatch_option(line: str) -> tuple[str, str | bool]:
    """``"--key=value"`` -> ``("key", "value")``; ``"--flag"`` -> ``("flag", True)``."""
    text = line.strip()
    if text.startswith("#SBATCH"):
        text = text[len("#SBATCH"):].strip()
    if not re.fullmatch(r"--[A-Za-z][A-Za-z0-9-]*(=.*)?", text):
        raise ValueError(f"[slurm] extra_sbatch entries look like '--key=value' or '--flag', "
                         f"got {line!r}")
    key, sep, value = text[2:].partition("=")
    return key, (value if sep else True)


def spec_from_mapping(data: Mapping[str, Any], source: str = "job file") -> LaunchSpec:
    """Build and check a :class:`LaunchSpec` from a parsed TOML mapping."""
    return from_mapping(LaunchSpec, data, source)


def load_spec(path: Path | str) -> LaunchSpec:
    """Read a job specification (TOML); a misspelt key is answered with the valid ones."""
    return spec_from_mapping(load_toml(path), str(path))


def apply_options(spec: LaunchSpec, *, data: Path | None = None,
                  architectures: Sequence[str] | None = None, epochs: int | None = None,
                  runs: Path | None = None, executor: str | None = None) -> LaunchSpec:
    """The spec with command-line options applied; they win over the file.

    ``epochs`` from the command line applies to every architecture, per-architecture
    ``[overrides]`` included (a quick test run means every job stops early).
    """
    changes: dict[str, Any] = {}
    if data is not None:
        changes["data"] = Path(data)
    if architectures:
        changes["architectures"] = list(architectures)
    if runs is not None:
        changes["runs"] = Path(runs)
    if executor is not None:
        changes["executor"] = executor
    if epochs is not None:
        changes["epochs"] = epochs
        changes["overrides"] = {a: {k: v for k, v in t.items() if k != "epochs"}
                                for a, t in spec.overrides.items()}
    new = dataclasses.replace(spec, **changes)
    try:
        new.validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return new


def _check_store(path: Path) -> None:
    from stampbatch import store

    info = store.open_store(path)
    if not info.labelled:
        raise UsageError(f"{path}: has no /labels (a candidate file?); training needs a "
                         f"labelled store")


def resolve(spec: LaunchSpec, source: str = "job file") -> list[JobPlan]:
    """One :class:`JobPlan` per architecture: names checked against the registry, options
    merged ([train] < top-level epochs < [overrides.<arch>]), stores opened and validated."""
    from stampbatch import models

    if spec.data is None:
        raise UsageError(f"{source}: no data store; set 'data' in the job file or pass --data")
    known = models.architecture_names()
    archs = list(spec.architectures) or known
    for name in [*archs, *spec.overrides]:
        if name not in known:
            where = "[overrides]" if name not in archs else "architectures"
            raise UsageError(f"{source}: {where}: unknown architecture '{name}'; known "
                             f"architectures: {', '.join(known)}")
    base = dataclasses.asdict(spec.train)
    if spec.epochs is not None:
        base["epochs"] = spec.epochs
    runs = spec.runs.expanduser().absolute()
    plans = []
    checked: set[Path] = set()
    for arch in archs:
        table = dict(spec.overrides.get(arch, {}))
        data = Path(table.pop("data", spec.data)).expanduser().absolute()
        if data not in checked:
            _check_store(data)
            checked.add(data)
        config = from_mapping(TrainConfig, {**base, **table}, f"{source} [overrides.{arch}]")
        plans.append(JobPlan(arch, data, runs / arch, config))
    return plans


def choose_executor(requested: str) -> str:
    """``slurm`` or ``local``: ``auto`` is Slurm when ``sbatch`` is on PATH."""
    if requested == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if requested == "slurm":
        missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
        if missing:
            raise UsageError(f"executor slurm: {' and '.join(missing)} not found on PATH "
                             f"(no Slurm here? use --executor local)")
    elif requested != "local":
        raise UsageError(f"unknown executor {requested!r}; choose from {', '.join(EXECUTORS)}")
    return requested


# --------------------------------------------------------------------------- submission


def job_python(spec: LaunchSpec, plans: Sequence[JobPlan]) -> str:
    """The shell command that starts Python in each job: the container wrapper, if any.

    Inside a container the runs directory and the stores' directories are bound at the
    same paths, so the job sees the files the manifest names.
    """
    s = spec.slurm
    if s.container_image is None:
        return s.python or shlex.quote(sys.executable)
    binds: list[str] = []
    auto = [spec.runs.expanduser().absolute(), *(p.data.parent for p in plans)]
    for bind in [*(str(p) for p in auto), *s.container_binds]:
        if bind not in binds:
            binds.append(bind)
    words = [s.container_runtime, "exec"]
    if s.gpus_per_job > 0:
        words.append("--nv")
    image = s.container_image
    if "://" not in image:  # a local image file: the jobs may start in another directory
        image = str(Path(image).expanduser().absolute())
    words += ["--bind", ",".join(binds), image, s.container_python]
    return shlex.join(words)


def _mem(gb: float) -> str:
    return f"{int(gb)}G" if float(gb).is_integer() else f"{int(round(gb * 1024))}M"


def slurm_parameters(spec: LaunchSpec) -> dict[str, Any]:
    """The ``submitit.SlurmExecutor`` parameters (its own names) of every job."""
    s = spec.slurm
    params: dict[str, Any] = {
        "job_name": s.job_name,
        "time": s.time_min,
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": s.cpus_per_task,
        "mem": _mem(s.mem_gb),
        "signal_delay_s": s.signal_delay_s,
        "setup": [*(f"export {k}=${{{k}:-{v}}}" for k, v in JOB_ENVIRONMENT.items()), *s.setup],
    }
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(s, name):
            params[name] = getattr(s, name)
    if s.gpus_per_job:
        params["gpus_per_node"] = s.gpus_per_job
    if s.extra_sbatch:
        params["additional_parameters"] = dict(parse_sbatch_option(x) for x in s.extra_sbatch)
    return params


def _submitit_command(python: str, folder: Path | str) -> str:
    # What submitit's executors run in each job (SlurmExecutor._submitit_command_str).
    return " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(spec: LaunchSpec, plans: Sequence[JobPlan], folder: Path | str) -> str:
    """The sbatch script :func:`launch` would submit for ``plans`` (one array task each)."""
    params = slurm_parameters(spec)
    count = len(plans) if len(plans) > 1 else None
    return _make_sbatch_string(command=_submitit_command(job_python(spec, plans), folder),
                               folder=folder, map_count=count, **params)


def _make_executor(kind: str, folder: Path, spec: LaunchSpec,
                   plans: Sequence[JobPlan]) -> submitit.core.core.PicklingExecutor:
    python = job_python(spec, plans)
    s = spec.slurm
    if kind == "slurm":
        ex: Any = submitit.SlurmExecutor(folder, max_num_timeout=s.max_requeues, python=python)
        ex.update_parameters(**slurm_parameters(spec))
    else:
        # The local controller inherits this process's environment (submitit's own "setup"
        # for local jobs goes through a shell whose pid may not survive an exec).
        for name, value in JOB_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        ex = submitit.LocalExecutor(folder, max_num_timeout=s.max_requeues, python=python)
        ex.update_parameters(timeout_min=s.time_min, gpus_per_node=s.gpus_per_job,
                             signal_delay_s=s.signal_delay_s)
    return ex


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "error" in ln.lower()] or lines
    return useful[-1] if useful else type(exc).__name__


def _absolute_paths(spec: LaunchSpec) -> LaunchSpec:
    """The spec with every path absolute (what the jobs were given)."""
    def absolute(p: Any) -> str:
        return str(Path(p).expanduser().absolute())

    overrides = {a: {**t, **({"data": absolute(t["data"])} if "data" in t else {})}
                 for a, t in spec.overrides.items()}
    return dataclasses.replace(spec, runs=Path(absolute(spec.runs)), overrides=overrides,
                               data=Path(absolute(spec.data)) if spec.data else None)


# Local jobs started by this process: their Popen objects tell running from finished.
_LOCAL_PROCESSES: dict[str, subprocess.Popen] = {}


def launch(spec: LaunchSpec, *, spec_file: Path | str | None = None,
           plans: Sequence[JobPlan] | None = None) -> dict[str, Any]:
    """Submit one job per architecture and append the launch to the manifest; returns the
    launch record (``id``, ``executor``, ``folder``, ``jobs``: arch, job_id, run_dir, logs).

    Returns as soon as the jobs are queued. Refuses to start a job for an architecture
    whose job from an earlier launch is still queued or running (both would write the same
    run directory).
    """
    source = str(spec_file) if spec_file is not None else "job file"
    plans = list(plans) if plans is not None else resolve(spec, source)
    kind = choose_executor(spec.executor)
    runs = spec.runs.expanduser().absolute()
    created = [d for d in (runs, runs / SUBMITIT_DIR) if not d.exists()]
    runs.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(runs):  # one launch at a time per runs directory
            record = _submit(spec, plans, kind, runs, spec_file)
    except BaseException:
        if runs in created:  # leave no trace of a launch that did not happen
            _lock_path(runs).unlink(missing_ok=True)
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return record


def _submit(spec: LaunchSpec, plans: Sequence[JobPlan], kind: str, runs: Path,
            spec_file: Path | str | None) -> dict[str, Any]:
    archs = {p.arch for p in plans}
    manifest = read_manifest(runs)
    busy = [s for s in statuses_of(_latest_jobs(manifest)) if s.arch in archs and s.active]
    if busy:
        b = busy[0]
        raise UsageError(f"{b.run_dir}: job {b.job_id} of an earlier launch is still "
                         f"{b.state}; wait for it (stampbatch status {runs}) or cancel it")
    launch_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)
    folder = runs / SUBMITIT_DIR / launch_id / "%j"
    executor = _make_executor(kind, folder, spec, plans)
    try:
        # submitit prints sbatch's stderr itself when sbatch fails; the error says it once
        with contextlib.redirect_stderr(io.StringIO()):
            jobs = executor.map_array(TrainJob(), [p.data for p in plans],
                                      [p.arch for p in plans], [p.run_dir for p in plans],
                                      [p.config for p in plans])
    except Exception as exc:  # sbatch refused (bad partition, too many GPUs, ...)
        shutil.rmtree(folder.parent, ignore_errors=True)  # the pickled calls
        raise LaunchError(f"{kind} submission of {len(plans)} job(s) failed: "
                          f"{_one_line(exc)}") from exc
    entries = []
    for plan, job in zip(plans, jobs):
        if kind == "local" and getattr(job, "_process", None) is not None:
            _LOCAL_PROCESSES[job.job_id] = job._process
        entries.append({
            "arch": plan.arch, "job_id": job.job_id, "run_dir": str(plan.run_dir),
            "data": str(plan.data), "stdout": str(job.paths.stdout),
            "stderr": str(job.paths.stderr), "config": dataclasses.asdict(plan.config),
        })
    record = {
        "id": launch_id, "submitted_at": _utc_now(), "executor": kind,
        "folder": str(folder), "spec_file": str(Path(spec_file).absolute()) if spec_file else None,
        "spec": _jsonable(_absolute_paths(spec)),
        "host": os.uname().nodename, "jobs": entries,
    }
    try:
        manifest["launches"].append(_jsonable(record))
        _write_manifest(runs, manifest)
    except (OSError, StampbatchError) as exc:
        ids = ", ".join(f"{e['arch']} {e['job_id']}" for e in entries)
        raise LaunchError(f"submitted {ids} but could not write {manifest_path(runs)}: "
                          f"{_one_line(exc)}") from exc
    return record


# --------------------------------------------------------------------------- the manifest


def manifest_path(runs_dir: Path | str) -> Path:
    return Path(runs_dir) / MANIFEST_NAME


def _lock_path(runs_dir: Path) -> Path:
    return runs_dir / f".{MANIFEST_NAME}.lock"


@contextlib.contextmanager
def _locked(runs_dir: Path):
    """Exclusive lock of a runs directory's manifest (POSIX advisory lock)."""
    with open(_lock_path(runs_dir), "a") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: no concurrent launches into one directory, then
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_manifest(runs_dir: Path | str) -> dict[str, Any]:
    """The manifest of ``runs_dir`` (``{"version", "launches": [...]}``); empty when absent."""
    path = manifest_path(runs_dir)
    if not path.exists():
        return {"version": MANIFEST_VERSION, "launches": []}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LaunchError(f"{path}: unreadable launch manifest ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("launches"), list):
        raise LaunchError(f"{path}: not a stampbatch launch manifest (no 'launches' list)")
    return data


def append_manifest(runs_dir: Path | str, record: Mapping[str, Any]) -> Path:
    """Append one launch to the manifest: under a lock, written to a temporary file that
    replaces the manifest only when complete (readers never see a partial manifest)."""
    runs_dir = Path(runs_dir)
    with _locked(runs_dir):
        data = read_manifest(runs_dir)
        data["launches"].append(_jsonable(record))
        return _write_manifest(runs_dir, data)


def _write_manifest(runs_dir: Path, data: Mapping[str, Any]) -> Path:
    from stampbatch.store import atomic_path

    path = manifest_path(runs_dir)
    text = json.dumps(data, indent=1) + "\n"  # fails before anything is written
    with atomic_path(path, overwrite=True, suffix=".json") as tmp:
        tmp.write_text(text)
    return path


# --------------------------------------------------------------------------- the job


def _log_event(run_dir: Path, text: str) -> None:
    """One line in the run directory's launch.log (never fails the job)."""
    with contextlib.suppress(OSError):
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / EVENTS_NAME, "a") as fh:
            fh.write(f"{_utc_now()} {text}\n")


def _job_label() -> str:
    try:
        env = submitit.JobEnvironment()
        label = f"job {env.job_id} on {env.hostname}"
    except Exception:  # not inside a submitit job (called directly)
        label = f"process {os.getpid()}"
    restarts = os.environ.get("SLURM_RESTART_COUNT")
    return label + (f" (restart {restarts})" if restarts else "")


class TrainJob(submitit.helpers.Checkpointable):
    """One architecture's training as a job: ``train.train_run`` in the run directory.

    The run directory's epoch checkpoint is the job's state, so :meth:`checkpoint` only has
    to resubmit the same call: the requeued job resumes where the last epoch ended.
    """

    def __call__(self, data: Path, arch: str, run_dir: Path, config: TrainConfig) -> dict:
        from stampbatch import train

        state = train.run_state(run_dir)
        plural = "s" if config.epochs != 1 else ""
        start = (f"resuming at epoch {state['epoch']}/{config.epochs}"
                 if state["epoch"] else f"starting {arch}, {config.epochs} epoch{plural}")
        _log_event(run_dir, f"{_job_label()}: {start}")
        try:
            metrics = train.train_run(Path(data), arch, Path(run_dir), config, progress=True)
        except Exception as exc:
            _log_event(run_dir, f"{_job_label()}: failed: {_one_line(exc)}")
            raise
        _log_event(run_dir, f"{_job_label()}: done after {metrics.get('epochs_run')} epochs")
        return metrics

    def checkpoint(self, data: Path, arch: str, run_dir: Path,
                   config: TrainConfig) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or time-out, before it requeues the job."""
        from stampbatch import train

        with contextlib.suppress(Exception):
            epoch = train.run_state(run_dir)["epoch"]
            _log_event(run_dir, f"{_job_label()}: interrupted after epoch {epoch}; requeueing")
        return submitit.helpers.DelayedSubmission(self, data, arch, run_dir, config)


# --------------------------------------------------------------------------- following jobs


@dataclass
class JobStatus:
    """Where one training job stands: scheduler state, epoch, best metric, log."""

    arch: str
    job_id: str
    executor: str
    state: str  # SUBMITTED, PENDING, RUNNING, REQUEUED, COMPLETED, FAILED, CANCELLED, TIMEOUT...
    epoch: int
    epochs: int
    best_val_accuracy: float | None
    best_val_loss: float | None
    run_dir: Path
    log: Path  # the job's stderr (tracebacks, Slurm's messages)
    stdout: Path
    error: str | None = None  # the error line of a failed job

    @property
    def active(self) -> bool:
        """Queued or running (or requeued): not over yet."""
        return self.state in ACTIVE_STATES

    @property
    def completed(self) -> bool:
        return self.state == "COMPLETED"


def _latest_jobs(manifest: Mapping[str, Any]) -> list[tuple[dict, dict]]:
    """(launch, job) for the latest job of each architecture, in first-launch order."""
    latest: dict[str, tuple[dict, dict]] = {}
    for record in manifest.get("launches", []):
        for job in record.get("jobs", []):
            latest[job["arch"]] = (record, job)
    return list(latest.values())


def _slurm_states(job_ids: Iterable[str]) -> dict[str, str]:
    """Fresh scheduler states: squeue (the controller's own view) for jobs still queued or
    running, then sacct (accounting) for those that have left the queue. Accounting lags the
    controller, by tens of seconds on a loaded machine, so it is not trusted for live jobs."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    states: dict[str, str] = {}
    mains = sorted({i.split("_")[0] for i in ids})
    if shutil.which("squeue"):
        try:
            out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(mains)],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            out = None
        # squeue exits non-zero when some ids have left the queue; the others are still listed.
        for line in (out.stdout.splitlines() if out is not None else []):
            jid, _, state = line.strip().partition("|")
            if jid in ids and state:
                states[jid] = state.split()[0]
    missing = [i for i in ids if i not in states]
    if missing and shutil.which("sacct"):
        try:
            out = subprocess.run(["sacct", "-o", "JobID,State", "--parsable2", "-j",
                                  ",".join(sorted({i.split("_")[0] for i in missing}))],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0:
            for jid, info in SlurmInfoWatcher().read_info(out.stdout).items():
                if jid in missing and info.get("State"):
                    states[jid] = info["State"].split()[0]
    return states


def _local_state(job_id: str) -> str:
    """RUNNING while the local job's controller process lives, else EXITED."""
    proc = _LOCAL_PROCESSES.get(job_id)
    if proc is not None:
        return "RUNNING" if proc.poll() is None else "EXITED"
    try:
        pid = int(job_id)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return "EXITED"
    except PermissionError:
        pass
    proc_dir = Path("/proc") / str(pid)
    if proc_dir.exists():  # Linux: rule out a zombie and a recycled pid
        try:
            stat = (proc_dir / "stat").read_text()
            cmdline = (proc_dir / "cmdline").read_bytes()
        except OSError:
            return "EXITED"
        if stat.rpartition(")")[2].split()[0] == "Z" or b"submitit" not in cmdline:
            return "EXITED"
    return "RUNNING"


def _error_line(log: Path, *, killed: bool = False) -> str | None:
    """The error line of a failed job from its log.

    A job that raised: the exception line of the last Python traceback. A job Slurm killed
    (``killed``: cancelled, time limit, out of memory): Slurm's own ``slurmstepd: error``
    line first — the process may go on logging for a few seconds after it. Failing both,
    the last line that mentions an error.
    """
    try:
        with open(log, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 256 * 1024))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    slurm = [ln.strip() for ln in lines if re.match(r"\s*slurmstepd\S*: error:", ln)]
    if killed and slurm:
        return slurm[-1]
    last_tb = max((i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent")),
                  default=None)
    if last_tb is not None:
        for ln in lines[last_tb + 1:]:
            if ln.strip() and not ln[0].isspace():
                return re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*:)", "", ln.strip())
    if slurm:
        return slurm[-1]
    flagged = [ln.strip() for ln in lines
               if re.search(r"error|killed|cancelled|oom", ln, re.IGNORECASE)
               and " INFO " not in ln]
    return flagged[-1] if flagged else None


def _status_of(record: Mapping[str, Any], job: Mapping[str, Any], raw: str | None) -> JobStatus:
    from stampbatch import train

    run_dir = Path(job["run_dir"])
    folder = record["folder"]
    paths = JobPaths(folder, job_id=job["job_id"], task_id=0)
    try:
        rs = train.run_state(run_dir)
    except (OSError, ValueError):
        rs = {"status": "new", "epoch": 0, "epochs": 0}
    epochs = int(rs.get("epochs") or job.get("config", {}).get("epochs") or 0)
    if raw not in ACTIVE_STATES:  # on NFS, refresh the folder's cached attributes first
        with contextlib.suppress(OSError):
            paths.folder.chmod(paths.folder.stat().st_mode)
    finished = paths.result_pickle.exists()  # submitit writes it when the call returns/raises
    error = None
    if finished and rs.get("status") == "done":
        state = "COMPLETED"
    elif finished:
        state = "FAILED"
    elif raw in (None, ""):
        submitted = datetime.strptime(record["submitted_at"], "%Y-%m-%dT%H:%M:%SZ")
        age = time.time() - submitted.replace(tzinfo=UTC).timestamp()
        state = "SUBMITTED" if age < _UNSEEN_GRACE_S else "UNKNOWN"
    elif raw == "EXITED":  # a local job whose process ended without a result
        state = "FAILED"
    elif raw == "COMPLETED":  # the scheduler says done, but submitit wrote no result
        state = "COMPLETED" if rs.get("status") == "done" else "FAILED"
    else:
        state = raw
    if state not in ACTIVE_STATES and state not in ("COMPLETED", "UNKNOWN"):
        error = (_error_line(paths.stderr, killed=not finished) or rs.get("message")
                 or f"job ended {state} without an error message")
    return JobStatus(
        arch=job["arch"], job_id=job["job_id"], executor=record["executor"], state=state,
        epoch=int(rs.get("epoch") or 0), epochs=epochs,
        best_val_accuracy=rs.get("best_val_accuracy"), best_val_loss=rs.get("best_val_loss"),
        run_dir=run_dir, log=paths.stderr, stdout=paths.stdout, error=error,
    )


def statuses_of(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> list[JobStatus]:
    """Fresh :class:`JobStatus` of (launch record, job entry) pairs: one scheduler query."""
    slurm_ids = [j["job_id"] for r, j in pairs if r["executor"] == "slurm"]
    states = _slurm_states(slurm_ids)
    out = []
    for record, job in pairs:
        if record["executor"] == "slurm":
            raw = states.get(job["job_id"])
        else:
            raw = _local_state(job["job_id"])
        out.append(_status_of(record, job, raw))
    return out


def job_statuses(runs_dir: Path | str) -> list[JobStatus]:
    """The latest job of each architecture launched into ``runs_dir``, with fresh states."""
    return statuses_of(_latest_jobs(read_manifest(runs_dir)))


def _fmt_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_status(statuses: Sequence[JobStatus]) -> str:
    """A table: arch, job id, state, epoch/epochs, best val accuracy and loss, log path;
    each failed job is followed by its error line."""
    if not statuses:
        return "no jobs launched here"
    rows = [("ARCH", "JOB", "STATE", "EPOCH", "BEST VAL ACC", "BEST VAL LOSS", "LOG")]
    for s in statuses:
        rows.append((s.arch, s.job_id, s.state, f"{s.epoch}/{s.epochs}",
                     _fmt_metric(s.best_val_accuracy), _fmt_metric(s.best_val_loss), str(s.log)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        if i and statuses[i - 1].error:
            lines.append(f"  error: {statuses[i - 1].error}")
    return "\n".join(line.rstrip() for line in lines)


def _status_line(statuses: Sequence[JobStatus], elapsed: float) -> str:
    parts = []
    for s in statuses:
        text = f"{s.arch} {s.state}"
        if s.epochs and s.state not in ("SUBMITTED", "PENDING"):
            text += f" {s.epoch}/{s.epochs}"
        parts.append(text)
    return " | ".join(parts) + f"  [{elapsed:,.0f} s]"


def wait_for_jobs(record: Mapping[str, Any], *, poll_s: float = 5.0,
                  timeout_s: float | None = None, stream: TextIO | None = None) -> list[JobStatus]:
    """Follow the jobs of one launch until none is queued or running; a live status line
    (state and epoch per architecture) goes to ``stream`` (stderr)."""
    stream = stream or sys.stderr
    tty = bool(getattr(stream, "isatty", lambda: False)())
    pairs = [(record, job) for job in record["jobs"]]
    start = time.monotonic()
    last = ""
    while True:
        statuses = statuses_of(pairs)
        elapsed = time.monotonic() - start
        line = _status_line(statuses, elapsed)
        key = line.rpartition("  [")[0]
        if tty:
            stream.write("\r\033[K" + line)
            stream.flush()
        elif key != last:
            stream.write(line + "\n")
            stream.flush()
        last = key
        if not any(s.active for s in statuses):
            if tty:
                stream.write("\n")
            return statuses
        if timeout_s is not None and elapsed > timeout_s:
            if tty:
                stream.write("\n")
            raise LaunchError(f"jobs of launch {record['id']} still not finished after "
                              f"{timeout_s:,.0f} s: " + line)
        time.sleep(poll_s)


def collect(runs_dir: Path | str) -> tuple[Path, list[JobStatus]]:
    """Write the side-by-side report of every finished run in ``runs_dir``; return its path
    and the launched jobs that have not completed (queued, running, failed)."""
    from stampbatch import report

    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise LaunchError(f"{runs_dir}: no such runs directory")
    finished = [d for d in runs_dir.iterdir() if (d / "metrics.json").is_file()]
    if not finished:
        raise LaunchError(f"{runs_dir}: no finished runs yet (no run directory has "
                          f"metrics.json); see stampbatch status {runs_dir}")
    path = report.write_report(runs_dir)
    unfinished = [s for s in job_statuses(runs_dir) if not s.completed]
    return path, unfinished
