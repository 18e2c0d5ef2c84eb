"""Train every architecture on a cluster with one command: submitit jobs, preemption-safe.

A job specification (TOML, see ``jobs/train_all.toml``) names the stamp store, the
architectures, the training options (``[train]``, with ``[overrides.<arch>]`` per
architecture) and the Slurm request (``[slurm]``). :func:`launch` submits one job per
architecture as one Slurm job array (``submitit``'s ``map_array``) — or runs the same jobs
through submitit's local executor where there is no Slurm — and appends what it submitted
to ``RUNS/launch-manifest.json``. Each job is a :class:`stampbatch.slurm.train_job.TrainJob`,
which checkpoints and is requeued from the host on preemption or time-out (see
:mod:`stampbatch.slurm.train_job`); following the jobs is :mod:`stampbatch.slurm.job_status`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import secrets
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import JobPaths

from stampbatch.config import from_mapping, load_toml
from stampbatch.errors import LaunchError, StampbatchError, UsageError
from stampbatch.fileio import COMPACT_TIMESTAMP, jsonable, telling_line, utc_now
from stampbatch.slurm.job_status import (
    append_manifest,
    latest_jobs,
    manifest_lock,
    manifest_path,
    read_manifest,
    statuses_of,
)
from stampbatch.slurm.train_job import TrainJob, host_requeue_lines
from stampbatch.train.config import TrainConfig

SUBMITIT_DIR = "submitit"  # RUNS/submitit/<launch id>/<job id>/: sbatch script, pickles, logs
# What submitit's Slurm jobs need in every batch script, set by us so that the --dry-run
# script (sbatch_script) and the submitted one agree; tests/slurm/test_launch.py compares the two.
REQUEUE_SIGNAL = "USR2"  # submitit's job checkpoints and requeues on this signal
ARRAY_PARALLELISM = 256  # array tasks running at once at most (--array=0-N%M)
WCKEY = "submitit"  # --wckey of every job (submitit's default, kept)
EXECUTORS = ("auto", "slurm", "local")
CONTAINER_RUNTIMES = ("apptainer", "singularity")
# Environment defaults of every job (a value set when launching wins): quiet TensorFlow,
# oneDNN on (twice as fast on the CPUs measured).
JOB_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "1"}

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


_SLURM_TIME = re.compile(r"(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?")


def slurm_minutes(text: str) -> int:
    """A time limit as Slurm reads it, in whole minutes (rounded up): a bare number is
    minutes ("30" is half an hour, not 30 s), then MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    m = _SLURM_TIME.fullmatch(text.strip())
    if not m:
        raise ValueError(f"expected a Slurm time limit (minutes, MM:SS, HH:MM:SS or "
                         f"D-HH:MM:SS), got {text!r}")
    a = int(m.group("a"))                            # always there; b and c are optional
    d, b, c = (int(x) if x is not None else None for x in m.group("d", "b", "c"))
    if d is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        seconds = ((d * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = (a * 60 + (b or 0)) * 60 + c           # (the pattern gives c only after b)
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # a bare number: minutes
        seconds = a * 60
    if seconds < 1:
        raise ValueError(f"time limit must be positive, got {text!r}")
    return -(-seconds // 60)


def spec_from_mapping(data: Mapping[str, Any], source: str = "job file") -> LaunchSpec:
    """Build and check a :class:`LaunchSpec` from a parsed TOML mapping."""
    return from_mapping(LaunchSpec, data, source)


def load_spec(path: Path | str) -> LaunchSpec:
    """Read a job specification (TOML); a misspelt key is answered with the valid ones."""
    return spec_from_mapping(load_toml(path), str(path))


def apply_options(spec: LaunchSpec, *, data: Path | None = None,
                  architectures: Sequence[str] | None = None, epochs: int | None = None,
                  runs: Path | None = None, executor: str | None = None,
                  time_min: int | None = None) -> LaunchSpec:
    """The spec with command-line options applied; they win over the file (``time_min``:
    the [slurm] time limit in minutes).

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
    if time_min is not None:
        changes["slurm"] = dataclasses.replace(spec.slurm, time_min=time_min)
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
    from stampbatch.train import models

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


def slurm_parameters(spec: LaunchSpec, folder: Path | str | None = None) -> dict[str, Any]:
    """The ``submitit.SlurmExecutor`` parameters (its own names) of every job.

    With the jobs' submitit ``folder`` (``.../<launch id>/%j``), the batch script also gets
    the lines that requeue a job from the host (:func:`train_job.host_requeue_lines`).
    """
    s = spec.slurm
    requeue_setup, requeue_teardown = ([], []) if folder is None else \
        host_requeue_lines(Path(folder).parent)
    params: dict[str, Any] = {
        "job_name": s.job_name,
        "time": s.time_min,
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": s.cpus_per_task,
        "mem": _mem(s.mem_gb),
        "signal_delay_s": s.signal_delay_s,
        "array_parallelism": ARRAY_PARALLELISM,
        "wckey": WCKEY,
        "setup": [*(f"export {k}=${{{k}:-{v}}}" for k, v in JOB_ENVIRONMENT.items()),
                  *requeue_setup, *s.setup],
    }
    if requeue_teardown:
        params["teardown"] = requeue_teardown
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(s, name):
            params[name] = getattr(s, name)
    if s.gpus_per_job:
        params["gpus_per_node"] = s.gpus_per_job
    if s.extra_sbatch:
        params["additional_parameters"] = dict(parse_sbatch_option(x) for x in s.extra_sbatch)
    return params


def job_command(python: str, folder: Path | str) -> str:
    """What each job runs: submitit's job runner, which loads the pickled call from
    ``folder`` (the command submitit's Slurm executor puts in its batch script)."""
    return " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])


def job_logs(folder: Path | str, count: int) -> tuple[str, str]:
    """The stdout and stderr paths of ``count`` jobs in ``folder`` (``%t``: the task),
    as submitit names them; several jobs form one array, task a of array A named A_a."""
    paths = JobPaths(folder)  # absolute; submitit's log names (job_status reads them too)
    stdout, stderr = str(paths.stdout), str(paths.stderr)
    if count > 1:
        stdout, stderr = stdout.replace("%j", "%A_%a"), stderr.replace("%j", "%A_%a")
    return stdout, stderr


def sbatch_directives(spec: LaunchSpec, count: int, folder: Path | str) -> dict[str, str | bool]:
    """The ``#SBATCH`` options (sbatch's long names) of ``count`` jobs whose submitit folder
    is ``folder``: :func:`slurm_parameters` (what the executor is given) in sbatch's
    spelling, plus the array, the signal and the log paths. ``True`` is a bare flag."""
    params = slurm_parameters(spec, folder)
    extra = params.pop("additional_parameters", {})
    delay = params.pop("signal_delay_s")
    parallel = params.pop("array_parallelism")
    for name in ("setup", "teardown"):
        params.pop(name, None)
    directives: dict[str, str | bool] = {k.replace("_", "-"): str(v) for k, v in params.items()}
    directives["signal"] = f"{REQUEUE_SIGNAL}@{delay}"
    if count > 1:  # one job array
        directives["array"] = f"0-{count - 1}%{min(count, parallel)}"
    stdout, stderr = job_logs(folder, count)
    directives["output"] = stdout.replace("%t", "0")
    directives["error"] = stderr.replace("%t", "0")
    directives["open-mode"] = "append"  # a requeued job appends to its logs
    directives.update(extra)
    return directives


def sbatch_script(spec: LaunchSpec, plans: Sequence[JobPlan], folder: Path | str) -> str:
    """The sbatch script :func:`launch` submits for ``plans`` (one array task each when
    there are several), from the same parameters: the ``launch --dry-run`` text."""
    params = slurm_parameters(spec, folder)
    directives = sbatch_directives(spec, len(plans), folder)
    stdout, stderr = job_logs(folder, len(plans))
    srun = shlex.join(["srun", "--unbuffered", "--output", stdout, "--error", stderr])
    lines = ["#!/bin/bash", "", "# Parameters"]
    lines += [f"#SBATCH --{k}" if v is True else f"#SBATCH --{k}={shlex.quote(str(v))}"
              for k, v in directives.items()]
    lines += ["", "# setup", *params["setup"]]
    lines += ["", "# command", "export SUBMITIT_EXECUTOR=slurm",
              f"{srun} {job_command(job_python(spec, plans), folder)}", ""]
    if params.get("teardown"):
        lines += ["", "# teardown", *params["teardown"]]
    return "\n".join(lines) + "\n"


def _make_executor(kind: str, folder: Path, spec: LaunchSpec,
                   plans: Sequence[JobPlan]) -> submitit.core.core.PicklingExecutor:
    python = job_python(spec, plans)
    s = spec.slurm
    if kind == "slurm":
        ex: Any = submitit.SlurmExecutor(folder, max_num_timeout=s.max_requeues, python=python)
        ex.update_parameters(**slurm_parameters(spec, folder))
    else:
        # The local controller inherits this process's environment (submitit's own "setup"
        # for local jobs goes through a shell whose pid may not survive an exec).
        for name, value in JOB_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        ex = submitit.LocalExecutor(folder, max_num_timeout=s.max_requeues, python=python)
        ex.update_parameters(timeout_min=s.time_min, gpus_per_node=s.gpus_per_job,
                             signal_delay_s=s.signal_delay_s)
    return ex


def _absolute_paths(spec: LaunchSpec) -> LaunchSpec:
    """The spec with every path absolute (what the jobs were given)."""
    def absolute(p: Any) -> str:
        return str(Path(p).expanduser().absolute())

    overrides = {a: {**t, **({"data": absolute(t["data"])} if "data" in t else {})}
                 for a, t in spec.overrides.items()}
    return dataclasses.replace(spec, runs=Path(absolute(spec.runs)), overrides=overrides,
                               data=Path(absolute(spec.data)) if spec.data else None)


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
    lock = manifest_lock(runs)
    try:
        with lock:  # one launch at a time per runs directory
            record = _submit(spec, plans, kind, runs, spec_file)
    except BaseException:
        if runs in created:  # leave no trace of a launch that did not happen
            lock.path.unlink(missing_ok=True)
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return record


def _submit(spec: LaunchSpec, plans: Sequence[JobPlan], kind: str, runs: Path,
            spec_file: Path | str | None) -> dict[str, Any]:
    archs = {p.arch for p in plans}
    manifest = read_manifest(runs)
    busy = [s for s in statuses_of(latest_jobs(manifest)) if s.arch in archs and s.active]
    if busy:
        b = busy[0]
        raise UsageError(f"{b.run_dir}: job {b.job_id} of an earlier launch is still "
                         f"{b.state}; wait for it (stampbatch status {runs}) or cancel it")
    launch_id = utc_now(COMPACT_TIMESTAMP) + "-" + secrets.token_hex(3)
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
                          f"{telling_line(exc)}") from exc
    entries = []
    for plan, job in zip(plans, jobs):
        entries.append({
            "arch": plan.arch, "job_id": job.job_id, "run_dir": str(plan.run_dir),
            "data": str(plan.data), "stdout": str(job.paths.stdout),
            "stderr": str(job.paths.stderr), "config": dataclasses.asdict(plan.config),
        })
    record = {
        "id": launch_id, "submitted_at": utc_now(), "executor": kind,
        "folder": str(folder), "spec_file": str(Path(spec_file).absolute()) if spec_file else None,
        "spec": jsonable(_absolute_paths(spec)),
        "host": os.uname().nodename, "jobs": entries,
    }
    try:
        append_manifest(runs, record, locked_by_caller=True)
    except (OSError, StampbatchError) as exc:
        ids = ", ".join(f"{e['arch']} {e['job_id']}" for e in entries)
        raise LaunchError(f"submitted {ids} but could not write {manifest_path(runs)}: "
                          f"{telling_line(exc)}") from exc
    return record
