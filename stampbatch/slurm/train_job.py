"""One architecture's training as a submitit job, and requeueing it from the host.

:class:`TrainJob` is a ``submitit.helpers.Checkpointable``: on preemption or time-out Slurm
sends USR2, submitit calls :meth:`TrainJob.checkpoint` and then ``scontrol requeue``; the
requeued job calls ``train.train_run`` again, which resumes from the run directory's epoch
checkpoint with the history intact.

Requeueing from the host. Inside a container image there is no Slurm client (or one that
cannot reach the controller: no munge socket, no ``slurm.conf``), so submitit's in-process
``scontrol requeue`` would fail and the job would simply die at its time limit. Every job
that :func:`stampbatch.slurm.launch.launch` submits therefore gets ``STAMPBATCH_REQUEUE_REQUEST``
(a file path in the launch's submitit folder, which the container sees at the same path):
the job puts a stand-in ``scontrol`` first on its PATH that writes the requested job id to
that file, and the batch script on the host (:func:`host_requeue_lines`, run after ``srun``
returns) calls the host's ``scontrol requeue`` for it. The same path is used with and
without a container, so both are the same tested code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from pathlib import Path

import submitit

from stampbatch.fileio import telling_line, utc_now
from stampbatch.train.config import TrainConfig

EVENTS_NAME = "launch.log"  # in each run directory: one line per job start, checkpoint, end
REQUEUE_ENV = "STAMPBATCH_REQUEUE_REQUEST"  # file the job writes, the batch script reads
EXIT_GRACE_S = 10  # after a checkpoint the job process ends within this, hung or not
# The stand-in scontrol inside the job: only "requeue JOBID" is handed to the host.
_SCONTROL_STANDIN = r"""#!/bin/sh
# stampbatch: hands "scontrol requeue JOBID" to the batch script on the host
req=${STAMPBATCH_REQUEUE_REQUEST:-}
if [ "$1" = requeue ] && [ -n "$2" ] && [ -n "$req" ]; then
    printf '%s\n' "$2" > "$req.tmp" && mv -f "$req.tmp" "$req" && exit 0
fi
echo "scontrol $*: no Slurm client inside the job (stampbatch requeues from the host)" >&2
exit 1
"""


def host_requeue_lines(launch_folder: Path | str) -> tuple[list[str], list[str]]:
    """(setup, teardown) lines of the batch script: export the request path
    (``<launch folder>/requeue-$SLURM_JOB_ID``) before ``srun``; after it, requeue the job
    with the host's ``scontrol`` when the job asked for it."""
    folder = str(Path(launch_folder) / "requeue-")
    escaped = "".join("\\" + c if c in '\\"$`' else c for c in folder)
    quoted = f'"{escaped}${{SLURM_JOB_ID}}"'
    setup = [f"export {REQUEUE_ENV}={quoted}", f"rm -f {quoted}"]
    teardown = [
        f"if [ -s {quoted} ]; then",
        f"    _sb_job=$(cat {quoted}); rm -f {quoted}",
        # said before: a requeue that works ends this script at once, and what it would
        # print after may never reach the log (seen in a suite run)
        '    echo "stampbatch: requeueing job $_sb_job from the host" >&2',
        '    if ! scontrol requeue "$_sb_job"; then',
        '        echo "stampbatch: error: scontrol requeue $_sb_job failed on the host" >&2',
        "    fi",
        "fi",
    ]
    return setup, teardown


def route_requeue_to_host() -> Path | None:
    """Put the stand-in ``scontrol`` first on this process's PATH when the batch script
    asked for host-side requeueing (``STAMPBATCH_REQUEUE_REQUEST`` set); return its folder."""
    if not os.environ.get(REQUEUE_ENV):
        return None
    folder = Path(tempfile.mkdtemp(prefix="stampbatch-requeue-"))
    shim = folder / "scontrol"
    shim.write_text(_SCONTROL_STANDIN)
    shim.chmod(0o755)
    os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    return folder


def log_event(run_dir: Path, text: str) -> None:
    """One line in the run directory's launch.log (never fails the job)."""
    with contextlib.suppress(OSError):
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / EVENTS_NAME, "a") as fh:
            fh.write(f"{utc_now()} {text}\n")


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
        from stampbatch.train import loop as train

        self._started = time.time()     # for checkpoint(): has this job timed out?
        route_requeue_to_host()
        state = train.run_state(run_dir)
        plural = "s" if config.epochs != 1 else ""
        start = (f"resuming at epoch {state['epoch']}/{config.epochs}"
                 if state["epoch"] else f"starting {arch}, {config.epochs} epoch{plural}")
        log_event(run_dir, f"{_job_label()}: {start}")
        try:
            metrics = train.train_run(Path(data), arch, Path(run_dir), config, progress=True)
        except Exception as exc:
            log_event(run_dir, f"{_job_label()}: failed: {telling_line(exc)}")
            raise
        log_event(run_dir, f"{_job_label()}: done after {metrics.get('epochs_run')} epochs")
        return metrics

    def checkpoint(self, data: Path, arch: str, run_dir: Path,
                   config: TrainConfig) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or time-out, before it requeues the job."""
        from stampbatch.train import loop as train

        with contextlib.suppress(Exception):
            epoch = train.run_state(run_dir)["epoch"]
            log_event(run_dir, f"{_job_label()}: interrupted after epoch {epoch}; requeueing")
        # submitit saves what this returns, asks for the requeue and exits. TensorFlow can hang
        # that exit (seen: 1 exit in 5 stuck until the time limit killed the job, which was
        # then never requeued from the host). SIGALRM's default action ends the process
        # EXIT_GRACE_S from now whatever Python is doing; the epoch checkpoint is on disk.
        # Not when submitit will refuse the requeue (timed out more often than max_requeues
        # allows): it then raises out of the training loop to record the job's failure, and
        # that unwinding (keras, tf.data's generator) may take longer than the grace.
        if self._will_requeue():
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(EXIT_GRACE_S)
        return submitit.helpers.DelayedSubmission(self, data, arch, run_dir, config)

    def _will_requeue(self) -> bool:
        """Whether submitit requeues the job after this checkpoint, decided as it does
        (``SignalHandler.checkpoint_and_try_requeue``): a time-out uses one of the job's
        remaining time-outs, a preemption none; none left means no requeue. True when unknown."""
        try:
            current = submitit.helpers.DelayedSubmission.load(
                submitit.JobEnvironment().paths.submitted_pickle)
            limit_s = float(current._timeout_min) * 60
            countdown = int(current._timeout_countdown)
        except Exception:  # noqa: BLE001 - not inside a submitit job, or an unreadable pickle
            return True
        ran_s = time.time() - getattr(self, "_started", time.time())
        timed_out = ran_s >= min(0.8 * limit_s, limit_s - 600)
        return countdown - int(timed_out) >= 0

