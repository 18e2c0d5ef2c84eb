"""The submitit launcher: job files, command-line options, the sbatch script, the manifest,
and real training jobs — through submitit's local executor, and on the real single-node
Slurm of tests/slurm/up.sh (marked ``slurm``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, gaussian_stamps

from stampbatch import cli, store
from stampbatch.errors import UsageError
from stampbatch.slurm import job_status, launch, train_job
from stampbatch.train import loop as train

ALL_ARCHS = ["simple", "simple_bn", "vgg6", "resnet50"]


def make_store(path: Path, n: int = 300, *, seed: int = 1, **kwargs) -> Path:
    labels = (np.arange(n) % 2).astype(np.int8)
    store.create_store(path, gaussian_stamps(n, seed=seed, sources=labels == 1), labels,
                       **kwargs)
    return path


def make_corrupt_store(path: Path) -> Path:
    """A store whose header, labels and schema are sound but one gzip chunk of /stamps is
    garbage (a damaged copy): it passes the launch-time check and fails inside the job."""
    make_store(path, 300, chunk_rows=100, compression="gzip")
    with h5py.File(path, "r") as h5:
        chunk = h5["stamps"].id.get_chunk_info(1)
    with open(path, "r+b") as fh:
        fh.seek(chunk.byte_offset + chunk.size // 4)
        fh.write(b"\xff" * (chunk.size // 2))
    return path


@pytest.fixture
def train_store(tmp_path) -> Path:
    return make_store(tmp_path / "train.h5")


def job_file(tmp_path: Path, data: Path, archs: list[str], *, executor: str = "slurm",
             epochs: int = 1, time_min: int = 10, extra: str = "", slurm: str = "") -> Path:
    """A job file for tiny test jobs: 1 CPU, 1 GB, no early stopping, time limit far from
    reached (submitit's USR2 may come 60 s early: keep the limit well above the run)."""
    path = tmp_path / "job.toml"
    path.write_text(f"""
data = "{data}"
architectures = {json.dumps(archs)}
runs = "{tmp_path / 'runs'}"
epochs = {epochs}
executor = "{executor}"

[train]
batch_size = 64
patience = 0

{extra}

[slurm]
partition = "debug"
time_min = {time_min}
signal_delay_s = 30
cpus_per_task = 1
mem_gb = 1
{slurm}
""")
    return path


def read_manifest(runs: Path) -> dict:
    return json.loads((runs / job_status.MANIFEST_NAME).read_text())


def assert_complete_run(run_dir: Path, arch: str, epochs: int) -> dict:
    for name in ("model.keras", "metrics.json", "history.json", "config.toml", "split.npz"):
        assert (run_dir / name).is_file(), f"{run_dir / name} missing"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["architecture"] == arch
    assert metrics["epochs_run"] == epochs
    assert 0.0 <= metrics["accuracy"] <= 1.0
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history["loss"]) == epochs
    return metrics


# --------------------------------------------------------------------------- job files


def test_shipped_job_file_resolves(tmp_path, train_store):
    spec = launch.load_spec(REPO / "jobs" / "train_all.toml")
    assert spec.architectures == ALL_ARCHS
    assert spec.slurm.gpus_per_job == 1 and spec.slurm.container_image
    spec = launch.apply_options(spec, data=train_store, runs=tmp_path / "runs")
    plans = launch.resolve(spec)
    assert [p.arch for p in plans] == ALL_ARCHS
    by_arch = {p.arch: p for p in plans}
    # top-level epochs (30) over [train]; [overrides.resnet50] over both
    assert by_arch["vgg6"].config.epochs == 30 and by_arch["vgg6"].config.batch_size == 256
    assert by_arch["resnet50"].config.epochs == 20
    assert by_arch["resnet50"].config.batch_size == 128
    assert by_arch["simple"].run_dir == (tmp_path / "runs" / "simple").absolute()
    assert all(p.data == train_store.absolute() for p in plans)


@pytest.mark.parametrize("text, bad, valid", [
    ("epoch = 3", "epoch", "epochs"),
    ("[slurm]\ngpus = 1", "gpus", "gpus_per_job"),
    ("[slurm]\ntime = 60", "time", "time_min"),
    ("[train]\nlr = 0.1", "lr", "learning_rate"),
    ("[overrides.vgg6]\nlr = 0.1", "lr", "learning_rate"),
])
def test_misspelt_key_lists_the_valid_ones(tmp_path, text, bad, valid):
    path = tmp_path / "job.toml"
    path.write_text(text + "\n")
    with pytest.raises(UsageError) as err:
        launch.load_spec(path)
    message = str(err.value)
    assert f"unknown option(s) ['{bad}']" in message
    assert f"'{valid}'" in message
    assert "\n" not in message


@pytest.mark.parametrize("text, expected", [
    ('epochs = "ten"', "expected an integer, got 'ten'"),
    ('architectures = "vgg6"', "expected a list"),
    ("[slurm]\nmem_gb = \"lots\"", "expected a number"),
    ("[slurm]\ngpus_per_job = 1.5", "expected an integer"),
    ('[slurm]\nextra_sbatch = ["-N 2"]', "'--key=value'"),
    ("[slurm]\ncpus_per_task = 0", "cpus_per_task must be at least 1"),
    ('[slurm]\ncontainer_runtime = "docker"', "apptainer, singularity"),
    ("[slurm]\ntime_min = 1\nsignal_delay_s = 90", "must be shorter than the time limit"),
    ('executor = "pbs"', "executor must be one of auto, slurm, local"),
    ("[train]\nmomentum = 1.5", "momentum must be in [0, 1)"),
    ('architectures = ["vgg6", "vgg6"]', "listed twice"),
    ("[overrides.vgg6]\ndata = 5", "data must be a path"),
])
def test_bad_values_are_one_line_usage_errors(tmp_path, text, expected):
    path = tmp_path / "job.toml"
    path.write_text(text + "\n")
    with pytest.raises(UsageError) as err:
        launch.load_spec(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_architecture_lists_known_ones(tmp_path, train_store):
    spec = launch.LaunchSpec(data=train_store, architectures=["vgg7"])
    with pytest.raises(UsageError, match="unknown architecture 'vgg7'; known architectures: "
                                         "simple, simple_bn, vgg6, resnet50"):
        launch.resolve(spec)
    spec = launch.LaunchSpec(data=train_store, architectures=["vgg6"],
                             overrides={"vgg66": {"epochs": 2}})
    with pytest.raises(UsageError, match=r"\[overrides\]: unknown architecture 'vgg66'"):
        launch.resolve(spec)


def test_stores_are_checked_before_anything_is_submitted(tmp_path, train_store):
    with pytest.raises(UsageError, match="no data store"):
        launch.resolve(launch.LaunchSpec(architectures=["simple"]))
    missing = tmp_path / "missing.h5"
    with pytest.raises(store.StoreError, match=f"{missing}: no such file"):
        launch.resolve(launch.LaunchSpec(data=missing, architectures=["simple"]))
    notes = tmp_path / "notes.h5"
    notes.write_text("not hdf5")
    spec = launch.LaunchSpec(data=train_store, architectures=["simple", "vgg6"],
                             overrides={"vgg6": {"data": str(notes)}})
    with pytest.raises(store.StoreError, match=f"{notes}: not an HDF5 file"):
        launch.resolve(spec)
    candidates = tmp_path / "candidates.h5"
    store.create_store(candidates, gaussian_stamps(20))
    with pytest.raises(UsageError, match=f"{candidates}: has no /labels"):
        launch.resolve(launch.LaunchSpec(data=candidates, architectures=["simple"]))
    assert not (tmp_path / "runs").exists()


def test_options_override_the_file(tmp_path, train_store):
    other = make_store(tmp_path / "other.h5", 100, seed=2)
    spec = launch.spec_from_mapping({
        "data": str(train_store), "architectures": ["simple", "vgg6"], "epochs": 3,
        "train": {"epochs": 5, "learning_rate": 0.05},
        "overrides": {"vgg6": {"epochs": 7, "learning_rate": 0.001, "data": str(other)}},
    })
    plans = {p.arch: p for p in launch.resolve(spec)}
    assert plans["simple"].config.epochs == 3 and plans["simple"].config.learning_rate == 0.05
    assert plans["vgg6"].config.epochs == 7 and plans["vgg6"].config.learning_rate == 0.001
    assert plans["vgg6"].data == other.absolute() and plans["simple"].data == train_store
    # --epochs applies to every architecture, per-architecture overrides included
    cli_spec = launch.apply_options(spec, epochs=1, architectures=["vgg6"], runs=tmp_path / "r",
                                    data=other, executor="local")
    plans = launch.resolve(cli_spec)
    assert [(p.arch, p.config.epochs, p.config.learning_rate) for p in plans] == \
        [("vgg6", 1, 0.001)]
    assert cli_spec.runs == tmp_path / "r" and cli_spec.executor == "local"
    assert cli_spec.data == other
    assert spec.epochs == 3 and spec.overrides["vgg6"]["epochs"] == 7  # the original is kept
    with pytest.raises(UsageError, match="executor must be one of"):
        launch.apply_options(spec, executor="pbs")


def test_executor_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert launch.choose_executor("auto") == "local"
    assert launch.choose_executor("local") == "local"
    with pytest.raises(UsageError, match="sbatch and srun not found on PATH"):
        launch.choose_executor("slurm")
    for name in ("sbatch", "srun"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    assert launch.choose_executor("auto") == "slurm"


# --------------------------------------------------------------------------- dry run


def test_dry_run_prints_gpu_time_limit_and_container(tmp_path, train_store, capsys):
    image = tmp_path / "stampbatch.sif"
    path = job_file(tmp_path, train_store, ["simple", "vgg6"], time_min=45, slurm=f"""
gpus_per_job = 1
account = "astro"
qos = "normal"
constraint = "a100"
extra_sbatch = ["--mail-type=FAIL", "--exclusive"]
setup = ["module load apptainer"]
container_image = "{image}"
container_binds = ["/scratch:/data"]
""")
    text = path.read_text()
    assert cli.main(["launch", str(path), "--dry-run"]) == 0
    captured = capsys.readouterr()
    script = captured.out
    assert script.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --time=45", "#SBATCH --array=0-1%2",
                 "#SBATCH --partition=debug", "#SBATCH --account=astro", "#SBATCH --qos=normal",
                 "#SBATCH --constraint=a100", "#SBATCH --mem=1G", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --mail-type=FAIL", "#SBATCH --exclusive", "#SBATCH --signal=USR2@30",
                 "module load apptainer"):
        assert line + "\n" in script
    runs = (tmp_path / "runs").absolute()
    wrapper = (f"apptainer exec --nv --bind {runs},{train_store.parent},/scratch:/data "
               f"{image} python3 -u -m submitit.core._submit")
    assert wrapper in script
    assert "task 0: simple" in captured.err and "task 1: vgg6" in captured.err
    assert not runs.exists()  # nothing submitted, nothing written

    # no GPU asked: no --gres/--gpus line and no --nv; singularity as the runtime
    path.write_text(text.replace("gpus_per_job = 1", "container_runtime = \"singularity\""))
    assert cli.main(["launch", str(path), "--dry-run", "--arch", "simple"]) == 0
    script = capsys.readouterr().out
    assert "gpus" not in script and "gres" not in script and "--array" not in script
    assert f"singularity exec --bind {runs}," in script and "--nv" not in script


def test_dry_run_script_requeues_from_the_host_after_srun(tmp_path, train_store, capsys):
    path = job_file(tmp_path, train_store, ["simple"])
    assert cli.main(["launch", str(path), "--dry-run", "--time", "90"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --time=90\n" in script  # a bare number is minutes, as sbatch reads it
    folder = (tmp_path / "runs").absolute() / launch.SUBMITIT_DIR / "LAUNCH_ID"
    request = f'"{folder}/requeue-${{SLURM_JOB_ID}}"'
    lines = script.splitlines()
    srun = next(i for i, ln in enumerate(lines) if ln.startswith("srun "))
    assert lines.index(f"export {train_job.REQUEUE_ENV}={request}") < srun
    check = lines.index(f"if [ -s {request} ]; then")
    assert check > srun and 'if ! scontrol requeue "$_sb_job"; then' in map(str.strip, lines[check:])


@pytest.mark.parametrize("text, minutes", [
    ("30", 30), ("0:30", 1), ("1:00", 1), ("2:30:00", 150), ("1-0", 1440), ("1-2:30", 1590),
    ("0-0:0:59", 1), ("  45 ", 45),
])
def test_slurm_time_limits_read_as_slurm_reads_them(text, minutes):
    assert launch.slurm_minutes(text) == minutes


@pytest.mark.parametrize("text", ["", "abc", "1h", "-5", "0", "0:00", "1.5", "1:2:3:4"])
def test_bad_time_limit_is_a_usage_error(tmp_path, train_store, text, capsys):
    path = job_file(tmp_path, train_store, ["simple"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["launch", str(path), "--dry-run", f"--time={text}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--time" in err[-1] and ("Slurm time limit" in err[-1] or "positive" in err[-1])


def sbatch_directives_of(script: str) -> dict[str, str | bool]:
    """The ``#SBATCH`` options of a batch script as sbatch reads them (``True``: a flag)."""
    found: dict[str, str | bool] = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH"):
            (word,) = shlex.split(line[len("#SBATCH"):])
            key, sep, value = word.removeprefix("--").partition("=")
            assert key not in found, f"--{key} given twice"
            found[key] = value if sep else True
    return found


def script_commands(script: str) -> list[str]:
    """The lines a batch script runs (comments, directives and blank lines left out)."""
    return [line for line in script.splitlines() if line.strip() and not line.startswith("#")]


def test_dry_run_directives_come_from_the_spec(tmp_path, train_store):
    """The --dry-run script is our own rendering of the executor's parameters: each
    [slurm] setting appears once, as sbatch spells it, with the array and the log paths."""
    spec = launch.load_spec(job_file(tmp_path, train_store, ["simple", "vgg6"], slurm="""
gpus_per_job = 2
qos = "normal"
extra_sbatch = ["--mail-type=FAIL", "--exclusive"]
"""))
    folder = tmp_path / "we ird" / "%j"
    script = launch.sbatch_script(spec, launch.resolve(spec), folder)
    logs = f"{tmp_path}/we ird/%A_%a/%A_%a_0_log"
    assert sbatch_directives_of(script) == {
        "job-name": "stampbatch-train", "partition": "debug", "qos": "normal", "time": "10",
        "nodes": "1", "ntasks-per-node": "1", "cpus-per-task": "1", "mem": "1G",
        "gpus-per-node": "2", "signal": "USR2@30", "array": "0-1%2", "wckey": "submitit",
        "output": logs + ".out", "error": logs + ".err", "open-mode": "append",
        "mail-type": "FAIL", "exclusive": True}
    assert sbatch_directives_of(script) == launch.sbatch_directives(spec, 2, folder)
    assert script.endswith("\n") and not script.endswith("\n\n")
    one = launch.sbatch_script(spec, launch.resolve(spec)[:1], folder)
    assert "array" not in sbatch_directives_of(one)  # one job: no array, logs by job id
    assert sbatch_directives_of(one)["output"] == f"{tmp_path}/we ird/%j/%j_0_log.out"
    (command,) = [line for line in script_commands(one) if line.startswith("srun ")]
    assert shlex.split(command)[:6] == ["srun", "--unbuffered", "--output",
                                        f"{tmp_path}/we ird/%j/%j_%t_log.out", "--error",
                                        f"{tmp_path}/we ird/%j/%j_%t_log.err"]
    assert shlex.split(command)[-4:] == ["-u", "-m", "submitit.core._submit", str(folder)]


def test_no_private_submitit_name_is_imported_or_called():
    """launch --dry-run renders its own script: no module of stampbatch imports a private
    submitit name or module (``from submitit.x import _y``, ``import submitit.x._y``) or
    reaches one through an attribute (``submitit.x._y``). Other private reads (attributes of
    objects submitit returns) are not visible to this check."""
    import ast

    found = []
    for path in sorted((REPO / "stampbatch").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("submitit"):
                names = [*node.module.split("."), *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [p for a in node.names if a.name.startswith("submitit")
                         for p in a.name.split(".")]
            elif isinstance(node, ast.Attribute):
                chain = [node.attr]
                inner = node.value
                while isinstance(inner, ast.Attribute):
                    chain.append(inner.attr)
                    inner = inner.value
                if isinstance(inner, ast.Name) and inner.id == "submitit":
                    names = chain
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {private[0]}")
    assert found == []


@pytest.mark.slurm
def test_slurm_accepts_the_generated_script(slurm_cluster, tmp_path, train_store):
    """sbatch --test-only accepts the --dry-run script (our own rendering), the container
    wrapper and extra sbatch options included, and refuses more GPUs than the node has."""
    path = job_file(tmp_path, train_store, ["simple", "vgg6"], slurm=f"""
gpus_per_job = 1
extra_sbatch = ["--mail-type=FAIL", "--comment=dry run"]
setup = ["echo set up"]
container_image = "{tmp_path / 'image.sif'}"
""")
    spec = launch.load_spec(path)
    script = tmp_path / "job.sh"
    script.write_text(launch.sbatch_script(spec, launch.resolve(spec), tmp_path / "%j"))
    ok = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "to start at" in ok.stderr
    too_many = script.read_text().replace("--gpus-per-node=1", "--gpus-per-node=3")
    script.write_text(too_many)
    refused = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True,
                             text=True)
    assert refused.returncode != 0


@pytest.mark.slurm
@pytest.mark.parametrize("archs", [["simple", "vgg6"], ["simple"]], ids=["array", "one-job"])
def test_dry_run_script_equals_the_submitted_one(slurm_cluster, tmp_path, train_store, archs):
    """A real submission through submitit (held, then cancelled: nothing runs) writes the
    batch script it gave sbatch; the --dry-run rendering of the same spec and folder has the
    same #SBATCH options and runs the same lines, so the two cannot drift apart."""
    path = job_file(tmp_path, train_store, archs, slurm=f"""
gpus_per_job = 1
extra_sbatch = ["--hold", "--mail-type=FAIL"]
setup = ["echo set up"]
container_image = "{tmp_path / 'image.sif'}"
container_binds = ["/scratch:/data"]
""")
    spec = launch.load_spec(path)
    record = launch.launch(spec, spec_file=path)
    try:
        submitted = sorted(Path(record["folder"]).parent.rglob("*_submission.sh"))
        assert len(submitted) == 1, submitted
        real = submitted[0].read_text()
    finally:
        subprocess.run(["scancel", record["jobs"][0]["job_id"].split("_")[0]], check=True)
    ours = launch.sbatch_script(spec, launch.resolve(spec), record["folder"])
    assert sbatch_directives_of(ours) == sbatch_directives_of(real)
    assert script_commands(ours) == script_commands(real)
    assert ("array" in sbatch_directives_of(real)) == (len(archs) > 1)


@pytest.mark.slurm
def test_slurm_refusal_is_one_line_and_leaves_nothing(slurm_cluster, tmp_path, train_store,
                                                      capsys):
    path = job_file(tmp_path, train_store, ["simple", "vgg6"], slurm="gpus_per_job = 3")
    assert cli.main(["launch", str(path)]) == 1  # the node has 2 (fake) GPUs
    err = capsys.readouterr().err
    assert err == ("stampbatch launch: error: slurm submission of 2 job(s) failed: sbatch: "
                   "error: Batch job submission failed: Requested node configuration is not "
                   "available\n")
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- local executor


@pytest.mark.slow
def test_local_executor_trains_and_reports_a_failed_job(tmp_path, train_store, capsys):
    """Two real local training jobs, one on a damaged store (~55 s: a full small training
    and the failed job's TensorFlow start-up)."""
    bad = make_corrupt_store(tmp_path / "damaged.h5")
    path = job_file(tmp_path, train_store, ["simple", "simple_bn"], executor="local",
                    extra=f'[overrides.simple_bn]\ndata = "{bad}"')
    runs = tmp_path / "runs"
    t0 = time.monotonic()
    code = cli.main(["launch", str(path), "--wait", "--poll", "0.5"])
    elapsed = time.monotonic() - t0
    out, err = capsys.readouterr()
    assert code == 1, err
    assert "1 of 2 job(s) did not complete: simple_bn (FAILED)" in err
    assert "launched 2 job(s) (local)" in out

    assert_complete_run(runs / "simple", "simple", 1)
    assert (runs / "report.html").is_file()
    record = read_manifest(runs)["launches"][0]
    assert record["executor"] == "local"
    assert [j["arch"] for j in record["jobs"]] == ["simple", "simple_bn"]
    assert record["jobs"][1]["data"] == str(bad)

    statuses = {s.arch: s for s in job_status.job_statuses(runs)}
    assert statuses["simple"].state == "COMPLETED" and statuses["simple"].error is None
    failed = statuses["simple_bn"]
    assert failed.state == "FAILED"
    assert failed.error == "OSError: Can't synchronously read data (filter returned failure " \
                           "during read)"
    assert failed.log.is_file() and failed.log == Path(record["jobs"][1]["stderr"])
    assert f"  error: {failed.error}" in out and str(failed.log) in out
    assert train.run_state(runs / "simple_bn")["status"] == "failed"
    print(f"local launch of 2 tiny jobs: {elapsed:.1f} s")


# --------------------------------------------------------------------------- real Slurm


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_trains_two_architectures(slurm_cluster, tmp_path, train_store, capsys):
    """Two real training jobs on the real Slurm, one fake GPU each (~25 s: two TensorFlow
    start-ups and trainings side by side)."""
    # one (fake) GPU each: the node has two, so both run at once; TensorFlow falls back to CPU
    path = job_file(tmp_path, train_store, ["simple", "vgg6"], slurm="gpus_per_job = 1")
    runs = tmp_path / "runs"
    t0 = time.monotonic()
    assert cli.main(["launch", str(path)]) == 0  # returns at once
    submit_s = time.monotonic() - t0
    assert submit_s < 15
    out = capsys.readouterr().out
    record = read_manifest(runs)["launches"][0]
    assert record["executor"] == "slurm"
    array_id = record["jobs"][0]["job_id"].split("_")[0]
    assert [(j["arch"], j["job_id"]) for j in record["jobs"]] == \
        [("simple", f"{array_id}_0"), ("vgg6", f"{array_id}_1")]
    assert f"simple {array_id}_0, vgg6 {array_id}_1" in out
    assert record["jobs"][1]["run_dir"] == str((runs / "vgg6").absolute())
    assert record["spec"]["data"] == str(train_store)
    assert record["submitted_at"].endswith("Z") and record["folder"].endswith("/%j")

    statuses = job_status.wait_for_jobs(record, poll_s=1.0, timeout_s=300)
    assert [s.state for s in statuses] == ["COMPLETED", "COMPLETED"]
    for arch in ("simple", "vgg6"):
        assert_complete_run(runs / arch, arch, 1)
        assert f"job {array_id}_" in (runs / arch / train_job.EVENTS_NAME).read_text()

    # sacct lags the controller: the final state must still come back from the scheduler
    deadline = time.monotonic() + 30
    while job_status._slurm_states([f"{array_id}_0", f"{array_id}_1"]) != \
            {f"{array_id}_0": ("COMPLETED", ""), f"{array_id}_1": ("COMPLETED", "")}:
        assert time.monotonic() < deadline, "sacct never reported COMPLETED"
        time.sleep(1)
    tres = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,AllocTRES", "-j", array_id],
                          capture_output=True, text=True, check=True).stdout
    assert tres.count("gres/gpu=1") == 2, tres  # the GPU request was really scheduled
    assert cli.main(["status", str(runs)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["ARCH", "JOB", "STATE", "EPOCH"]
    for line, (arch, task) in zip(table[1:], [("simple", 0), ("vgg6", 1)]):
        words = line.split()
        assert words[:4] == [arch, f"{array_id}_{task}", "COMPLETED", "1/1"]
        best = train.run_state(runs / arch)["best_val_accuracy"]
        assert words[4] == f"{best:.4f}"
        assert words[-1].endswith(f"{array_id}_{task}_0_log.err") and Path(words[-1]).is_file()
    assert cli.main(["collect", str(runs)]) == 0
    assert "report: " in capsys.readouterr().out
    assert "vgg6" in (runs / "report.html").read_text()
    print(f"slurm: 2 tiny jobs submitted in {submit_s:.1f} s, done in "
          f"{time.monotonic() - t0:.1f} s")


FAKE_APPTAINER = REPO / "tests" / "slurm" / "fake-apptainer"


def read_loss(run_dir: Path) -> list[float] | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((run_dir / "history.json").read_text())["loss"]
    return None


@dataclasses.dataclass
class WatchedJob:
    """A launched one-job training run, its history followed in the background from its
    submission to its end (``follow_in_background``): every distinct loss history seen."""
    record: dict
    run_dir: Path
    epochs: int
    launched_at: float
    seen: list[list[float]] = dataclasses.field(default_factory=list)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: str | None = None
    # preemption only: the epoch checkpointed before it, the refusal of a second launch of
    # the same architecture, when the urgent job came, and its id
    committed: int = 0
    second_launch: str = ""
    preempted_at: float = 0.0
    urgent_job: str = ""
    # the freeze (see freeze): seconds from the submission to it and to Slurm's USR2
    frozen_at: float = 0.0
    signalled_at: float = 0.0
    hold_error: str | None = None

    def wait(self, timeout_s: float) -> list[list[float]]:
        assert self.done.wait(timeout_s), f"job still running after {timeout_s} s"
        assert self.error is None, self.error
        assert self.hold_error is None, self.hold_error
        return self.seen


def follow_in_background(jobs: list[WatchedJob], timeout_s: float) -> None:
    """One thread polling every job of ``jobs`` (its history.json and its Slurm state) until
    each ends, recording every distinct loss history it sees."""
    def poll() -> None:
        deadline = time.monotonic() + timeout_s
        active = list(jobs)
        try:
            while active:
                for job in list(active):
                    loss = read_loss(job.run_dir)
                    if loss is not None and (not job.seen or loss != job.seen[-1]):
                        job.seen.append(loss)
                    status = job_status.statuses_of([(job.record, job.record["jobs"][0])])[0]
                    if not status.active:
                        active.remove(job)
                        job.done.set()
                    elif time.monotonic() > deadline:
                        raise AssertionError(f"job still {status.state} after {timeout_s} s")
                time.sleep(0.5)
        except BaseException as exc:  # reported by each test still waiting
            for job in active:
                job.error = f"following the job failed: {exc!r}"
                job.done.set()

    threading.Thread(target=poll, name="follow-slurm-jobs", daemon=True).start()


USR2 = 1 << (signal.SIGUSR2 - 1)  # its bit in /proc/PID/status's pending-signal masks


def job_python(job_id: str) -> list[int]:
    """The job's Python process (submitit's ``_submit``, the task of step 0; the container
    stand-in execs it), from ``scontrol listpids``; empty while the job is not running. Not
    the batch step's srun, whose command line names it too: a stopped srun loses its step."""
    out = subprocess.run(["scontrol", "listpids", job_id], capture_output=True,
                         text=True).stdout
    pids = []
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 3 or fields[2] == "batch":
            continue
        with contextlib.suppress(OSError, ValueError):
            argv = Path(f"/proc/{fields[0]}/cmdline").read_bytes().split(b"\0")
            if Path(os.fsdecode(argv[0])).name.startswith("python") and \
                    b"submitit.core._submit" in argv:
                pids.append(int(fields[0]))
    return pids


def waiting_frozen(pid: int) -> bool:
    """Whether process ``pid`` is still stopped with no USR2 pending. Slurm sends SIGCONT
    with the signals it delivers (its time limit's and preemption's USR2 included), so the
    process may run again before USR2 is seen pending: either ends the wait."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except FileNotFoundError:  # it ran again and ended
        return False
    status = dict(line.split(":", 1) for line in lines if ":" in line)
    pending = int(status["ShdPnd"], 16) | int(status["SigPnd"], 16)
    return status["State"].split()[0] == "T" and not pending & USR2


def freeze(job: WatchedJob) -> list[int]:
    """SIGSTOP the job's Python: it holds its allocation but no CPU, like a job whose
    training is slower than its time limit, so real limits and preemptions can be waited
    for with a few epochs of training instead of minutes of it."""
    pids = job_python(job.record["jobs"][0]["job_id"])
    assert pids, f"no Python process of job {job.record['jobs'][0]['job_id']}"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while not all(waiting_frozen(pid) for pid in pids):  # SIGSTOP is delivered asynchronously
        assert time.monotonic() < deadline, f"job {job.record['jobs'][0]['job_id']} never stopped"
        time.sleep(0.01)
    job.frozen_at = time.monotonic() - job.launched_at
    return pids


def thaw_on_usr2(job: WatchedJob, pids: list[int], timeout_s: float) -> None:
    """Wait until Slurm's USR2 (the time limit's or the preemption's) has come for every
    frozen process (``waiting_frozen``), then SIGCONT them: each wakes into the signal in the
    middle of an epoch, as a running job takes it. ``job.signalled_at``: when it came."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if not any(waiting_frozen(pid) for pid in pids):
                job.signalled_at = time.monotonic() - job.launched_at
                return
            assert time.monotonic() < deadline, f"no USR2 within {timeout_s} s of the freeze"
            time.sleep(0.1)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def hold_until_signalled(jobs: list[WatchedJob], after_epoch: int, timeout_s: float) -> None:
    """In one background thread per job: once its run directory has checkpointed
    ``after_epoch``, freeze the job until Slurm's USR2 is pending, then let it take it."""
    def hold(job: WatchedJob) -> None:
        try:
            deadline = time.monotonic() + timeout_s
            while train.run_state(job.run_dir)["epoch"] < after_epoch:
                assert time.monotonic() < deadline, f"epoch {after_epoch} never checkpointed"
                time.sleep(0.1)
            thaw_on_usr2(job, freeze(job), deadline - time.monotonic())
        except BaseException as exc:  # reported by the test waiting for the job
            job.hold_error = f"holding the job failed: {exc!r}"

    for job in jobs:
        threading.Thread(target=hold, args=(job,), name="hold-slurm-job", daemon=True).start()


def wait_for_idle_node(timeout_s: float = 900) -> None:
    """The preemption tests take the whole node (the urgent job preempts every job on it):
    wait until no job of any earlier test is left in the queue rather than rely on order."""
    deadline = time.monotonic() + timeout_s
    while True:
        queue = subprocess.run(["squeue", "-h", "-o", "%i %P %T"], capture_output=True,
                               text=True, check=True).stdout.strip()
        if not queue:
            return
        assert time.monotonic() < deadline, f"the Slurm node never became idle: {queue}"
        time.sleep(1.0)


def launch_tiny(tmp_path: Path, data: Path, *, epochs: int, time_min: int,
                slurm: str = "", path_prefix: Path | None = None) -> WatchedJob:
    path = job_file(tmp_path, data, ["simple"], epochs=epochs, time_min=time_min, slurm=slurm)
    with pytest.MonkeyPatch.context() as mp:
        if path_prefix is not None:  # the container stand-in's "apptainer", for sbatch's env
            mp.setenv("PATH", f"{path_prefix}:{os.environ['PATH']}")
        t0 = time.monotonic()
        record = launch.launch(launch.load_spec(path), spec_file=path)
    return WatchedJob(record, tmp_path / "runs" / "simple", epochs, t0)


def container_lines(tmp_path: Path) -> tuple[str, Path]:
    """[slurm] lines that run each job in the container stand-in, and the directory holding
    its "apptainer" (``launch_tiny`` puts it on PATH for the submission): its jobs run in a
    mount namespace without any Slurm client or munge socket."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").symlink_to(FAKE_APPTAINER)
    image = tmp_path / "stampbatch.sif"
    image.write_bytes(b"")
    return f'container_image = "{image}"\ncontainer_python = "{sys.executable}"\n', bin_dir


TIMELIMIT_EPOCHS = 6  # the requeued allocation trains the epochs after the freeze: seconds


@pytest.fixture(scope="session")
def timelimit_jobs(slurm_cluster, tmp_path_factory) -> dict[str, WatchedJob]:
    """The three ``--time=2`` jobs, submitted together so that their waits overlap: a host
    and a container job that must requeue (``max_requeues = 20``) and one that may not
    (``max_requeues = 0``). Each is frozen once it has checkpointed epoch 1 (``freeze``) and
    let go when the time limit's USR2 is pending: the limit is real and lands mid-epoch,
    without minutes of training sized to outlast it (that cost ~390 CPU-s per suite run).
    Two run at once on the node's 2 CPUs, the third waits for a slot."""
    root = tmp_path_factory.mktemp("timelimit")
    data = make_store(root / "train.h5", 6000)
    jobs = {}
    for name in ("host", "container", "exhausted"):
        work = root / name
        work.mkdir()
        lines, bin_dir = container_lines(work) if name == "container" else ("", None)
        requeues = "max_requeues = 0\n" if name == "exhausted" else "max_requeues = 20\n"
        jobs[name] = launch_tiny(work, data, epochs=TIMELIMIT_EPOCHS, time_min=2,
                                 slurm=requeues + lines, path_prefix=bin_dir)
    hold_until_signalled(list(jobs.values()), after_epoch=1, timeout_s=900)
    follow_in_background([jobs["host"], jobs["container"]], 900)
    return jobs


def assert_resumed_run(record: dict, run_dir: Path, epochs: int, seen: list[list[float]],
                       container: bool) -> str:
    """The job completed all epochs once each, every history seen on the way is a prefix of
    the final one, and it was interrupted and resumed from the host; returns launch.log."""
    status = job_status.wait_for_jobs(record, poll_s=1.0, timeout_s=120)[0]
    assert status.state == "COMPLETED", status.error
    metrics = assert_complete_run(run_dir, "simple", epochs)
    assert metrics["epochs_run"] == epochs
    final = json.loads((run_dir / "history.json").read_text())["loss"]
    for partial in seen:  # continuous: epochs trained before an interruption are kept
        assert final[:len(partial)] == partial
    events = (run_dir / train_job.EVENTS_NAME).read_text()
    assert "interrupted after epoch" in events, events
    resumed = re.findall(r"\(restart (\d+)\): resuming at epoch (\d+)/", events)
    assert resumed, events
    log = status.log.read_text()
    assert re.search(r"^stampbatch: requeueing job \S+ from the host$", log, re.M), log[-3000:]
    assert "resuming from epoch" in log
    submitted = next(Path(record["folder"]).parent.rglob("*_submission.sh")).read_text()
    assert ("apptainer exec" in submitted) == container
    return events


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timelimit
@pytest.mark.parametrize("container", [False, True], ids=["host", "container"])
def test_slurm_time_limit_requeues_and_resumes(timelimit_jobs, container):
    """Waits out real ``--time=2`` limits (~2-4 min, shared with the other timelimit_jobs).

    A real time limit: --time=2 with USR2 30 s before it (Slurm sends it 70-90 s after the
    start here); the job, frozen after epoch 1 until then, takes the signal mid-epoch,
    checkpoints, requeues and trains the remaining epochs in its next allocation."""
    job = timelimit_jobs["container" if container else "host"]
    seen = job.wait(900)
    assert job.signalled_at > job.frozen_at > 0  # USR2 came while it trained (frozen)
    events = assert_resumed_run(job.record, job.run_dir, job.epochs, seen, container)
    assert re.search(r"interrupted after epoch [1-5];", events), events
    print(f"time limit ({'container' if container else 'host'}): frozen at "
          f"{job.frozen_at:.0f} s, USR2 at {job.signalled_at:.0f} s, "
          f"{events.count('interrupted after epoch')} requeue(s), done in "
          f"{time.monotonic() - job.launched_at:.0f} s")


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timelimit
def test_slurm_exhausted_requeues_end_with_one_line_naming_the_log(timelimit_jobs, capsys):
    """Waits out a real ``--time=2`` limit (~2-4 min, overlapping the other timelimit_jobs)."""
    job = timelimit_jobs["exhausted"]  # frozen past --time=2's USR2, max_requeues = 0
    status = job_status.wait_for_jobs(job.record, poll_s=1.0, timeout_s=900)[0]
    assert job.hold_error is None, job.hold_error
    assert job.signalled_at > job.frozen_at > 0
    assert status.state == "FAILED"
    assert "(max_requeues = 0)" in status.error and str(status.log) in status.error
    assert re.match(rf"stopped at epoch \d+/{job.epochs}: preempted or timed out again",
                    status.error)
    assert cli.main(["status", str(job.run_dir.parent)]) == 1
    out = capsys.readouterr().out
    assert f"  error: {status.error}" in out
    assert "timed-out too many times" in status.log.read_text()


@pytest.fixture(scope="session")
def preempted_jobs(slurm_cluster, tmp_path_factory) -> dict[str, WatchedJob]:
    """Real preemption of a host and a container job at once: both train (8 epochs of 6000
    stamps) until each has checkpointed epoch 2 and is frozen there (``freeze``), a second
    launch of the same architecture is tried, then one job in partition 'urgent' (higher
    priority tier) asks for both CPUs and Slurm sends both USR2 (preempt_send_user_signal),
    which each takes mid-epoch when let go, and requeues them. Waits first for the node to be
    idle: the urgent job would preempt any other test's job too."""
    wait_for_idle_node()
    root = tmp_path_factory.mktemp("preempt")
    data = make_store(root / "train.h5", 6000)
    jobs: dict[str, WatchedJob] = {}
    for name in ("host", "container"):
        work = root / name
        work.mkdir()
        lines, bin_dir = container_lines(work) if name == "container" else ("", None)
        jobs[name] = launch_tiny(work, data, epochs=8, time_min=10, slurm=lines,
                                 path_prefix=bin_dir)
    frozen: dict[str, list[int]] = {}
    deadline = time.monotonic() + 300
    while len(frozen) < len(jobs):  # each frozen as soon as it has checkpointed epoch 2
        for name, job in jobs.items():
            if name not in frozen and train.run_state(job.run_dir)["epoch"] >= 2:
                frozen[name] = freeze(job)
                job.seen = [loss] if (loss := read_loss(job.run_dir)) else []
                job.committed = train.run_state(job.run_dir)["epoch"]  # before preemption
        assert time.monotonic() < deadline, f"epoch 2 never checkpointed: {sorted(frozen)}"
        time.sleep(0.1)
    for job in jobs.values():  # a second launch of the same architecture must not race it
        spec_file = job.run_dir.parent.parent / "job.toml"
        with pytest.raises(UsageError) as again:
            launch.launch(launch.load_spec(spec_file), spec_file=spec_file)
        job.second_launch = str(again.value)
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-c", "2", "--mem=1G",
                             "-o", "/dev/null", "--wrap", "sleep 5"],
                            capture_output=True, text=True, check=True).stdout.strip()
    for job in jobs.values():
        job.preempted_at = time.monotonic() - job.launched_at
        job.urgent_job = urgent
    threads = [threading.Thread(target=thaw_on_usr2, args=(job, frozen[name], 120))
               for name, job in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for job in jobs.values():
        assert job.signalled_at > job.preempted_at, "the preemption's USR2 never came"
    follow_in_background(list(jobs.values()), 900)
    return jobs


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timelimit
@pytest.mark.parametrize("container", [False, True], ids=["host", "container"])
def test_slurm_preempted_job_resumes_from_its_checkpoint(preempted_jobs, container):
    """Waits for a real preemption and requeue (~1-2 min, host and container together)."""
    job = preempted_jobs["container" if container else "host"]
    assert re.search("job .* of an earlier launch is still", job.second_launch), \
        job.second_launch
    seen = job.seen + job.wait(900)
    events = assert_resumed_run(job.record, job.run_dir, job.epochs, seen, container)
    resumed_at = [int(e) for _, e in re.findall(r"\(restart (\d+)\): resuming at epoch "
                                                r"(\d+)/", events)]
    assert job.committed >= 2 and resumed_at[0] >= job.committed  # no checkpointed epoch redone
    state = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j",
                            job.urgent_job],
                           capture_output=True, text=True).stdout.split()
    assert state[:1] in (["COMPLETED"], []), state  # accounting may lag; never a failure
    print(f"preemption ({'container' if container else 'host'}) after {job.preempted_at:.0f} s, "
          f"{events.count('interrupted after epoch')} interruption(s), done in "
          f"{time.monotonic() - job.launched_at:.0f} s")


@pytest.mark.slurm
def test_job_no_node_can_take_stops_wait_with_one_line(slurm_cluster, tmp_path, train_store,
                                                       capsys):
    # 8 CPUs on a 2-CPU node: sbatch accepts it, Slurm keeps it PENDING (PartitionConfig)
    path = job_file(tmp_path, train_store, ["simple"])
    path.write_text(path.read_text().replace("cpus_per_task = 1", "cpus_per_task = 8"))
    runs = tmp_path / "runs"
    t0 = time.monotonic()
    waited = subprocess.run([sys.executable, "-m", "stampbatch", "launch", str(path), "--wait",
                             "--poll", "1"], capture_output=True, text=True, timeout=120)
    try:
        job_id = read_manifest(runs)["launches"][0]["jobs"][0]["job_id"]
        assert waited.returncode == 1
        err = waited.stderr.strip().splitlines()
        assert err[-1] == (
            f"stampbatch launch: error: job {job_id} can never start: PENDING (PartitionConfig): "
            f"the request (8 CPUs, 1.0 GB, 0 GPUs, 10 min, partition debug) requests more CPUs, "
            f"memory or GPUs than any node of the partition has; change [slurm] in the job file, "
            f"then scancel {job_id} and launch again")
        assert "simple PENDING (PartitionConfig)" in waited.stderr  # the live status line
        assert cli.main(["status", str(runs)]) == 1
        out = capsys.readouterr().out
        row = out.splitlines()[1].split()
        assert row[:4] == ["simple", job_id, "PENDING", "(PartitionConfig)"]
        assert f"  error: job {job_id} can never start: PENDING (PartitionConfig)" in out
    finally:
        subprocess.run(["scancel", str(read_manifest(runs)["launches"][0]["jobs"][0]["job_id"])],
                       check=False)
    print(f"never-starting job reported in {time.monotonic() - t0:.1f} s")


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_failing_job_leaves_the_other_intact(slurm_cluster, tmp_path, train_store,
                                                   capsys):
    """~20 s: two real Slurm jobs, each a fresh TensorFlow process; one trains, the other
    fails."""
    bad = make_corrupt_store(tmp_path / "damaged.h5")
    path = job_file(tmp_path, train_store, ["simple", "vgg6"],
                    extra=f'[overrides.vgg6]\ndata = "{bad}"')
    runs = tmp_path / "runs"
    assert cli.main(["launch", str(path), "--wait", "--poll", "1"]) == 1
    out, err = capsys.readouterr()
    assert "1 of 2 job(s) did not complete: vgg6 (FAILED)" in err

    assert_complete_run(runs / "simple", "simple", 1)
    assert not (runs / "vgg6" / "metrics.json").exists()
    record = read_manifest(runs)["launches"][0]
    log = Path(record["jobs"][1]["stderr"])
    error = "OSError: Can't synchronously read data (filter returned failure during read)"
    assert f"  error: {error}" in out and str(log) in out
    assert error in log.read_text()

    assert cli.main(["status", str(runs)]) == 1  # a failed job: non-zero
    table = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]
            if not line.startswith("  ")}
    assert rows["simple"][2] == "COMPLETED" and rows["vgg6"][2] == "FAILED"
    assert rows["vgg6"][-1] == str(log)
    assert f"  error: {error}" in table
    assert cli.main(["collect", str(runs)]) == 0
    collected = capsys.readouterr().out
    assert "not completed:" in collected and "vgg6 job" in collected and error in collected


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_cancelled_job_is_reported_with_slurms_message(slurm_cluster, tmp_path,
                                                             train_store):
    path = job_file(tmp_path, train_store, ["simple"], epochs=50)
    record = launch.launch(launch.load_spec(path), spec_file=path)
    job_id = record["jobs"][0]["job_id"]
    deadline = time.monotonic() + 120
    while job_status.statuses_of([(record, record["jobs"][0])])[0].state != "RUNNING":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], check=True)
    status = job_status.wait_for_jobs(record, poll_s=1.0, timeout_s=120)[0]
    assert status.state == "CANCELLED"
    # slurmstepd writes its verdict as it tears the step down, which can be a moment after
    # the state reads CANCELLED (srun's own line comes first under load): wait for it.
    deadline = time.monotonic() + 30
    while not (status.error or "").startswith("slurmstepd") and time.monotonic() < deadline:
        time.sleep(1.0)
        status = job_status.statuses_of([(record, record["jobs"][0])])[0]
    # Slurm's verdict, not the lines the job went on logging during KillWait
    assert status.error.startswith("slurmstepd")
    assert re.search(rf"\*\*\* (JOB {job_id}|STEP {job_id}\.0) ON \S+ CANCELLED AT ",
                     status.error), status.error
    print(f"cancelled job's error line: {status.error}")
    assert not (tmp_path / "runs" / "simple" / "metrics.json").exists()
