"""The launch manifest and following launched training jobs: scheduler states, pending
reasons, logs, the report.

:func:`job_statuses` reads a runs directory's launch manifest back and asks the scheduler
afresh (``squeue`` for jobs still in the queue, then ``sacct`` for those that have left it)
for each job's state; the run directory (``train.run_state``) gives the epoch and best
validation metrics, the submitit log the error line of a failed job. :func:`wait_for_jobs`
follows them with a live status line, :func:`collect` gathers the finished runs into the
side-by-side report.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from submitit.core.utils import JobPaths

from stampbatch.errors import LaunchError
from stampbatch.fileio import TIMESTAMP_FORMAT, FileLock, jsonable, write_json_atomic
from stampbatch.train.rundir import METRICS_FILE

MANIFEST_NAME = "launch-manifest.json"  # in the runs directory: every launch and its jobs
MANIFEST_VERSION = 1
# Slurm states of a job that is not over yet (submitit's list, plus the rarer ones).
ACTIVE_STATES = frozenset({
    "SUBMITTED", "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
    "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "PREEMPTED", "READY", "STAGE_OUT", "SIGNALING",
})
# Pending reasons that waiting cannot cure: the request exceeds what the partition's nodes
# have or allow (PartitionConfig: more CPUs/memory/GPUs than any node), or names an account,
# QOS or constraint the cluster refuses. Slurm keeps such a job PENDING forever.
NEVER_STARTS = {
    "PartitionConfig": "requests more CPUs, memory or GPUs than any node of the partition has",
    "PartitionNodeLimit": "requests more nodes than the partition allows",
    "PartitionTimeLimit": "requests a longer time limit than the partition allows",
    "BadConstraints": "requests node features no node has",
    "InvalidAccount": "names an account Slurm does not know",
    "InvalidQOS": "names a QOS Slurm does not know",
    "AccountNotAllowed": "uses an account the partition does not allow",
    "QOSNotAllowed": "uses a QOS the partition does not allow",
}
# A job accounting has never heard of is "SUBMITTED" this long, then "UNKNOWN" (purged).
_UNSEEN_GRACE_S = 300.0


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
    reason: str = ""  # Slurm's reason for a pending job (Resources, Priority, PartitionConfig...)

    @property
    def active(self) -> bool:
        """Queued or running (or requeued): not over yet."""
        return self.state in ACTIVE_STATES

    @property
    def never_starts(self) -> bool:
        """Pending for a reason waiting cannot cure (no node or partition can take it)."""
        return self.state == "PENDING" and self.reason in NEVER_STARTS

    @property
    def completed(self) -> bool:
        return self.state == "COMPLETED"


def latest_jobs(manifest: Mapping[str, Any]) -> list[tuple[dict, dict]]:
    """(launch, job) for the latest job of each architecture, in first-launch order."""
    latest: dict[str, tuple[dict, dict]] = {}
    for record in manifest.get("launches", []):
        for job in record.get("jobs", []):
            latest[job["arch"]] = (record, job)
    return list(latest.values())


def _parse_sacct(text: str) -> dict[str, str]:
    """``sacct --parsable2 -o JobID,State`` output -> {job id: first word of its state};
    steps (``123_0.batch``) and unexpanded array ranges (``123_[0-3]``) are skipped."""
    states: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        jid, _, state = line.strip().partition("|")
        if jid and state and "." not in jid and "[" not in jid:
            states[jid] = state.split()[0]
    return states


def _slurm_states(job_ids: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Fresh scheduler (state, pending reason) of each job: squeue (the controller's own
    view) for jobs still queued or running, then sacct (accounting, no reason) for those
    that have left the queue. Accounting lags the controller, by tens of seconds on a loaded
    machine, so it is not trusted for live jobs."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    states: dict[str, tuple[str, str]] = {}
    mains = sorted({i.split("_")[0] for i in ids})
    if shutil.which("squeue"):
        try:
            out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(mains)],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            out = None
        # squeue exits non-zero when some ids have left the queue; the others are still listed.
        for line in (out.stdout.splitlines() if out is not None else []):
            jid, _, rest = line.strip().partition("|")
            state, _, reason = rest.partition("|")
            if jid in ids and state:
                reason = reason.strip()
                states[jid] = (state.split()[0], "" if reason == "None" else reason)
    missing = [i for i in ids if i not in states]
    if missing and shutil.which("sacct"):
        try:
            out = subprocess.run(["sacct", "-o", "JobID,State", "--parsable2", "-j",
                                  ",".join(sorted({i.split("_")[0] for i in missing}))],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0:
            for jid, state in _parse_sacct(out.stdout).items():
                if jid in missing:
                    states[jid] = (state, "")
    return states


def _local_state(job_id: str) -> str:
    """RUNNING while the local job's controller process lives, else EXITED."""
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


# A traceback line that only points at code (Python 3.11+): carets and tildes.
_MARKERS = re.compile(r"[\^~]+")


def _error_line(log: Path, *, killed: bool = False) -> str | None:
    """The error line of a failed job from its log.

    A job that raised: the exception line of the last Python traceback (the first line
    after its header that is neither indented nor a column of ``^``/``~`` markers: Python
    3.11 sometimes prints a frame's markers unindented, e.g. under ``contextlib.__exit__``
    when a signal lands in it). A job Slurm killed
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
            if ln.strip() and not ln[0].isspace() and not _MARKERS.fullmatch(ln.strip()):
                return re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*:)", "", ln.strip())
    if slurm:
        return slurm[-1]
    flagged = [ln.strip() for ln in lines
               if re.search(r"error|killed|cancelled|oom", ln, re.IGNORECASE)
               and " INFO " not in ln]
    return flagged[-1] if flagged else None


def _status_of(record: Mapping[str, Any], job: Mapping[str, Any], raw: str | None,
               reason: str = "") -> JobStatus:
    from stampbatch.train import loop as train

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
        submitted = datetime.strptime(record["submitted_at"], TIMESTAMP_FORMAT)
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
        if "timed-out too many times" in error:  # submitit's countdown of requeues ran out
            limit = record.get("spec", {}).get("slurm", {}).get("max_requeues")
            error = (f"stopped at epoch {rs.get('epoch') or 0}/{epochs}: preempted or timed "
                     f"out again after {limit} requeue(s) (max_requeues = {limit}); raise "
                     f"[slurm] max_requeues or time_min and launch again to resume; log "
                     f"{paths.stderr}")
    elif state == "PENDING" and reason in NEVER_STARTS:
        error = (f"job {job['job_id']} can never start: PENDING ({reason}): "
                 f"{_request_text(record)} {NEVER_STARTS[reason]}; change [slurm] in the job "
                 f"file, then scancel {job['job_id']} and launch again")
    return JobStatus(
        arch=job["arch"], job_id=job["job_id"], executor=record["executor"], state=state,
        epoch=int(rs.get("epoch") or 0), epochs=epochs,
        best_val_accuracy=rs.get("best_val_accuracy"), best_val_loss=rs.get("best_val_loss"),
        run_dir=run_dir, log=paths.stderr, stdout=paths.stdout, error=error,
        reason=reason if state == "PENDING" else "",
    )


def _request_text(record: Mapping[str, Any]) -> str:
    """The Slurm request of a launch in words: "the request (8 CPUs, 32 GB, 1 GPU, partition
    debug)"."""
    s = record.get("spec", {}).get("slurm", {})
    words = [f"{s.get('cpus_per_task')} CPUs", f"{s.get('mem_gb')} GB",
             f"{s.get('gpus_per_job') or 0} GPUs", f"{s.get('time_min')} min"]
    words += [f"{k} {s[k]}" for k in ("partition", "account", "qos", "constraint") if s.get(k)]
    words += [str(x) for x in s.get("extra_sbatch") or []]
    return f"the request ({', '.join(words)})"


def statuses_of(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> list[JobStatus]:
    """Fresh :class:`JobStatus` of (launch record, job entry) pairs: one scheduler query."""
    slurm_ids = [j["job_id"] for r, j in pairs if r["executor"] == "slurm"]
    states = _slurm_states(slurm_ids)
    out = []
    for record, job in pairs:
        if record["executor"] == "slurm":
            raw, reason = states.get(job["job_id"], (None, ""))
            out.append(_status_of(record, job, raw, reason))
        else:
            out.append(_status_of(record, job, _local_state(job["job_id"])))
    return out


def job_statuses(runs_dir: Path | str) -> list[JobStatus]:
    """The latest job of each architecture launched into ``runs_dir``, with fresh states."""
    return statuses_of(latest_jobs(read_manifest(runs_dir)))


def _fmt_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_status(statuses: Sequence[JobStatus]) -> str:
    """A table: arch, job id, state, epoch/epochs, best val accuracy and loss, log path;
    each failed job is followed by its error line."""
    if not statuses:
        return "no jobs launched here"
    rows = [("ARCH", "JOB", "STATE", "EPOCH", "BEST VAL ACC", "BEST VAL LOSS", "LOG")]
    for s in statuses:
        state = f"{s.state} ({s.reason})" if s.reason else s.state
        rows.append((s.arch, s.job_id, state, f"{s.epoch}/{s.epochs}",
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
        text = f"{s.arch} {s.state}" + (f" ({s.reason})" if s.reason else "")
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
        stuck = [s for s in statuses if s.never_starts]
        if stuck:
            if tty:
                stream.write("\n")
            raise LaunchError(stuck[0].error or f"job {stuck[0].job_id} can never start")
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
    from stampbatch.report import html as report

    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise LaunchError(f"{runs_dir}: no such runs directory")
    finished = [d for d in runs_dir.iterdir() if (d / METRICS_FILE).is_file()]
    if not finished:
        raise LaunchError(f"{runs_dir}: no finished runs yet (no run directory has "
                          f"{METRICS_FILE}); see stampbatch status {runs_dir}")
    path = report.write_report(runs_dir)
    unfinished = [s for s in job_statuses(runs_dir) if not s.completed]
    return path, unfinished


# --------------------------------------------------------------------------- the manifest


def manifest_path(runs_dir: Path | str) -> Path:
    return Path(runs_dir) / MANIFEST_NAME


def _lock_path(runs_dir: Path) -> Path:
    """The lock file beside a runs directory's launch manifest."""
    return runs_dir / f".{MANIFEST_NAME}.lock"


def manifest_lock(runs_dir: Path) -> FileLock:
    """The lock of a runs directory's manifest (one launch, one append at a time): blocking,
    and its file stays (nothing is written into it)."""
    return FileLock(_lock_path(runs_dir), blocking=True, record=False, remove=False)


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


def append_manifest(runs_dir: Path | str, record: Mapping[str, Any], *,
                    locked_by_caller: bool = False) -> Path:
    """Append one launch to the manifest: under the runs directory's lock (taken here unless
    the caller holds it already), written to a temporary file that replaces the manifest only
    when complete (readers never see a partial manifest)."""
    runs_dir = Path(runs_dir)
    with contextlib.nullcontext() if locked_by_caller else manifest_lock(runs_dir):
        data = read_manifest(runs_dir)
        data["launches"].append(jsonable(record))
        return _write_manifest(runs_dir, data)


def _write_manifest(runs_dir: Path, data: Mapping[str, Any]) -> Path:
    return write_json_atomic(manifest_path(runs_dir), data)
