"""Following launched jobs without a scheduler: the launch manifest, sacct parsing, the
status table and its pending reasons, error lines from job logs. (Real Slurm jobs are
followed in tests/slurm/test_launch.py.)"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from stampbatch import cli
from stampbatch.slurm import job_status

# --------------------------------------------------------------------------- the manifest


def _append_many(runs: str, worker: int, count: int) -> None:
    for i in range(count):
        job_status.append_manifest(Path(runs), {"id": f"{worker}-{i}", "jobs": []})


def test_manifest_appends_are_atomic_and_never_lost(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(runs), w, 10)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ids = [r["id"] for r in job_status.read_manifest(runs)["launches"]]
    assert sorted(ids) == sorted(f"{w}-{i}" for w in range(4) for i in range(10))
    for w in range(4):  # each writer's launches in its own order
        mine = [i for i in ids if i.startswith(f"{w}-")]
        assert mine == [f"{w}-{i}" for i in range(10)]
    before = (runs / job_status.MANIFEST_NAME).read_bytes()
    with pytest.raises(TypeError):
        job_status.append_manifest(runs, {"id": "bad", "jobs": [object()]})
    assert (runs / job_status.MANIFEST_NAME).read_bytes() == before
    assert sorted(p.name for p in runs.iterdir() if "partial" in p.name) == []
    (runs / job_status.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(job_status.LaunchError, match="unreadable launch manifest"):
        job_status.read_manifest(runs)


def test_sacct_output_is_read_without_submitit():
    text = ("JobID|State\n12_0|COMPLETED\n12_0.batch|COMPLETED\n12_0.0|COMPLETED\n"
            "12_1|CANCELLED by 0\n12_[2-3]|PENDING\n13|TIMEOUT\n\n")
    assert job_status._parse_sacct(text) == {"12_0": "COMPLETED", "12_1": "CANCELLED",
                                             "13": "TIMEOUT"}


def test_status_table_shows_the_pending_reason(tmp_path):
    common = dict(executor="slurm", epoch=0, epochs=3, best_val_accuracy=None,
                  best_val_loss=None, run_dir=tmp_path, log=tmp_path / "1_0_log.err",
                  stdout=tmp_path / "1_0_log.out")
    waiting = job_status.JobStatus(arch="simple", job_id="1_0", state="PENDING",
                                   reason="Priority", **common)
    stuck = job_status.JobStatus(arch="vgg6", job_id="1_1", state="PENDING",
                                 reason="PartitionConfig", error="job 1_1 can never start",
                                 **common)
    assert not waiting.never_starts and stuck.never_starts
    table = job_status.format_status([waiting, stuck]).splitlines()
    assert table[1].split()[:5] == ["simple", "1_0", "PENDING", "(Priority)", "0/3"]
    assert table[2].split()[:4] == ["vgg6", "1_1", "PENDING", "(PartitionConfig)"]
    assert table[3] == "  error: job 1_1 can never start"


def test_error_line_of_a_job_log(tmp_path):
    log = tmp_path / "12_0_0_log.err"
    log.write_text(
        "submitit INFO (2026-01-01 00:00:00,000) - Starting with JobEnvironment(...)\n"
        "E0000 00:00:1795641704.838074 cuda_platform.cc:52] failed call to cuInit: CUDA error\n"
        "Traceback (most recent call last):\n"
        '  File "/x/train.py", line 1, in train_run\n'
        "    raise ValueError('first')\n"
        "ValueError: first\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "Traceback (most recent call last):\n"
        '  File "/x/launch.py", line 2, in __call__\n'
        "stampbatch.train.loop.TrainError: /data/train.h5: every label is 0 (no-source)\n"
        "  with a second line\n"
        "srun: error: vm: task 0: Exited with exit code 1\n")
    assert job_status._error_line(log) == "TrainError: /data/train.h5: every label is 0 (no-source)"
    with open(log, "a") as fh:
        fh.write("slurmstepd-vm: error: *** JOB 12 ON vm CANCELLED AT 2026-01-01T00:00:09 ***\n"
                 "E0000 00:00:1795641709.1 cuda_platform.cc:52] failed call to cuInit: error\n")
    assert job_status._error_line(log, killed=True).startswith("slurmstepd-vm: error: *** JOB 12")
    assert job_status._error_line(log).startswith("TrainError:")  # the job raised: its exception
    log.write_text("slurmstepd: error: Detected 1 oom-kill event(s) in StepId=12.0.\n"
                   "I0000 cudart_stub.cc:31] Could not find cuda drivers\n")
    assert job_status._error_line(log).startswith("slurmstepd: error: Detected 1 oom-kill")
    assert job_status._error_line(tmp_path / "missing.err") is None


def test_error_line_skips_unindented_traceback_markers(tmp_path):
    """What a job log held when SIGUSR2 (a time limit) landed inside contextlib's __exit__:
    Python 3.11 printed that frame's carets at column 0, and the status said '^^^^^^'."""
    log = tmp_path / "580_0_log.err"
    log.write_text(
        "Traceback (most recent call last):\n"
        '  File "/x/fileio.py", line 177, in write_atomic\n'
        "    with atomic_path(path, overwrite=True, suffix=path.suffix, fail=fail) as tmp, \\\n"
        '  File "/usr/lib/python3.11/contextlib.py", line 144, in __exit__\n'
        "    next(self.gen)\n"
        "^^^^^^^^^^^^^^^^^^\n"
        '  File "/x/fileio.py", line 105, in fsync_file\n'
        "    os.fsync(fh.fileno())\n"
        "  ~~~~~~~~^^^^^^^^^^^^^\n"
        '  File "/x/submitit/core/job_environment.py", line 227, in checkpoint_and_try_requeue\n'
        "    raise utils.UncompletedJobError(message)\n"
        "submitit.core.utils.UncompletedJobError: Job not requeued because: timed-out too many "
        "times.\n"
        "srun: error: vm: task 0: Exited with exit code 1\n")
    assert job_status._error_line(log) == ("UncompletedJobError: Job not requeued because: "
                                           "timed-out too many times.")


def test_status_and_collect_without_runs(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    assert cli.main(["status", str(tmp_path / "runs")]) == 2
    assert "no launch-manifest.json" in capsys.readouterr().err
    assert cli.main(["collect", str(tmp_path / "runs")]) == 1
    assert "no finished runs yet" in capsys.readouterr().err
    assert cli.main(["status", str(tmp_path / "nowhere")]) == 2
