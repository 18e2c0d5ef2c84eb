"""The training job's requeue from the host: the stand-in scontrol and the batch-script lines.
(Real time limits and preemption are in tests/slurm/test_launch.py.)"""

from __future__ import annotations

import os
import subprocess

from stampbatch.slurm import train_job


def test_requeue_standin_receives_submitits_requeue_call(tmp_path, monkeypatch):
    """submitit requeues by running ``scontrol requeue <job id>`` found on PATH
    (``SlurmJobEnvironment._requeue``, private): the stand-in relies on exactly that."""
    request = tmp_path / "requeue-77"
    monkeypatch.setenv(train_job.REQUEUE_ENV, str(request))
    monkeypatch.setenv("PATH", os.environ["PATH"])  # restored after the test
    for name, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77",
                        "SLURM_JOB_NODELIST": "vm", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
                        "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1"}.items():
        monkeypatch.setenv(name, value)
    shim_dir = train_job.route_requeue_to_host()
    assert shim_dir is not None and os.environ["PATH"].startswith(str(shim_dir))
    import submitit

    env = submitit.JobEnvironment()
    assert hasattr(env, "_requeue"), "submitit's JobEnvironment._requeue is gone: requeueing " \
        "from the host (stampbatch.slurm.train_job) must follow submitit's new requeue path"
    env._requeue(1)
    assert request.read_text() == "77\n", "submitit no longer runs 'scontrol requeue JOBID'"
    refused = subprocess.run(["scontrol", "show", "job"], capture_output=True, text=True)
    assert refused.returncode == 1 and "no Slurm client inside the job" in refused.stderr


def test_host_requeue_lines_quote_the_folder(tmp_path):
    folder = tmp_path / 'we"ird $dir'
    setup, teardown = train_job.host_requeue_lines(folder)
    request = str(folder / "requeue-").replace('"', '\\"').replace("$", "\\$")
    assert setup[0] == f'export {train_job.REQUEUE_ENV}="{request}${{SLURM_JOB_ID}}"'
    env = train_job.REQUEUE_ENV
    script = "\n".join([*setup, f'mkdir -p "$(dirname "${env}")"', f'echo 5_1 > "${env}"',
                         "scontrol() { echo \"requeue asked: $*\"; }", *teardown])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                         env={**os.environ, "SLURM_JOB_ID": "42"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == "requeue asked: requeue 5_1\n"
    assert out.stderr == "stampbatch: requeueing job 5_1 from the host\n"
    assert not (folder / "requeue-42").exists()


def test_checkpoint_arms_the_exit_alarm_only_when_submitit_will_requeue(tmp_path, monkeypatch):
    """After a checkpoint submitit requeues unless the job timed out with no time-outs left;
    then it raises to record the failure, and the exit alarm must not cut that short (seen:
    killed by SIGALRM before the error reached the log)."""
    import signal
    import time

    import submitit

    for name, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "78",
                        "SLURM_JOB_NODELIST": "vm", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
                        "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1",
                        "SUBMITIT_FOLDER": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    job = train_job.TrainJob()
    pickle = submitit.JobEnvironment().paths.submitted_pickle

    def will_requeue(timeout_min: int, countdown: int, ran_s: float) -> bool:
        delayed = submitit.helpers.DelayedSubmission(job)
        delayed.set_timeout(timeout_min, countdown)
        pickle.parent.mkdir(parents=True, exist_ok=True)
        delayed.dump(pickle)
        job._started = time.time() - ran_s
        return job._will_requeue()

    assert not will_requeue(2, 0, 60)          # timed out, none left: the job ends
    assert will_requeue(2, 1, 60)              # timed out, one left
    assert will_requeue(120, 0, 600)           # preempted early in a long job: requeued
    assert not will_requeue(120, 0, 110 * 60)  # near the end of a long job: a time-out
    previous = signal.signal(signal.SIGALRM, signal.SIG_IGN)
    try:
        will_requeue(2, 0, 60)
        job.checkpoint(tmp_path / "d.h5", "simple", tmp_path / "run", None)
        assert signal.alarm(0) == 0            # no alarm pending
        will_requeue(2, 1, 60)
        job.checkpoint(tmp_path / "d.h5", "simple", tmp_path / "run", None)
        assert 0 < signal.alarm(0) <= train_job.EXIT_GRACE_S
    finally:
        signal.signal(signal.SIGALRM, previous)
