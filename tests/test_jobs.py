"""The shipped Slurm job templates in jobs/, run for real.

``jobs/score_array.sbatch`` and ``jobs/score_survey.sbatch`` are submitted to the local
single-node Slurm (tests/slurm/up.sh) against small candidate files and a tiny trained model,
and the scores must land in every file, equal to those of a plain local ``stampbatch score``.
The container branch of the array template runs with a stand-in ``apptainer`` that records
its arguments and runs the command it was given.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stampbatch import store

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
ARRAY = REPO / "jobs" / "score_array.sbatch"
SURVEY = REPO / "jobs" / "score_survey.sbatch"
SIZES = {"cands a.h5": 300, "cands_b.h5": 250}     # a space in a name on purpose


def env_with_venv(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAMPBATCH_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env.update(TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="1", MPLBACKEND="Agg")
    env.update(extra)
    return env


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run([str(VENV_BIN / "stampbatch"), *args], cwd=cwd, env=env_with_venv(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"stampbatch {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A `simple` network trained for one epoch on 300 simulated stamps (a run directory)."""
    work = tmp_path_factory.mktemp("model")
    cli("simulate", "train.h5", "--n", "300", "--seed", "11", "--quiet", cwd=work)
    cli("train", "--data", "train.h5", "--arch", "simple", "--out", "tiny", "--epochs", "1",
        "--batch-size", "64", "--quiet", cwd=work)
    assert (work / "tiny" / "model.keras").is_file()
    return work / "tiny"


@pytest.fixture(scope="module")
def expected(tiny_model, tmp_path_factory) -> dict[str, np.ndarray]:
    """P(source) of each candidate file from a plain local `stampbatch score` (side files)."""
    work = tmp_path_factory.mktemp("expected")
    for seed, (name, n) in enumerate(SIZES.items()):
        cli("simulate", name, "--n", str(n), "--seed", str(100 + seed), "--candidates",
            "--quiet", cwd=work)
    cli("score", *SIZES, "--model", str(tiny_model), "--out", "side", "--workers", "1",
        "--quiet", cwd=work)
    out = {}
    for name in SIZES:
        side = store.score_target(work / name, work / "side")
        out[name] = store.read_scores(side, tiny_model.name, with_maps=False).probability
    return {"dir": work, **out}


def candidate_dir(tmp_path: Path, expected) -> Path:
    """Fresh copies of the candidate files in tmp_path/survey, listed in tmp_path/list.txt."""
    survey = tmp_path / "survey"
    survey.mkdir()
    for name in SIZES:
        shutil.copy(expected["dir"] / name, survey / name)
    # Relative to the list's directory, with a comment and a blank line, as `score @list` reads.
    (tmp_path / "list.txt").write_text(
        "# candidate files of the test survey\n\n"
        + "".join(f"  survey/{name}   # {n} stamps\n" for name, n in SIZES.items()))
    return survey


def assert_scored(survey: Path, model: Path, expected) -> None:
    for name, n in SIZES.items():
        assert store.list_scores(survey / name) == [model.name], name
        p = store.read_scores(survey / name, model.name, with_maps=False).probability
        assert p.shape == (n,)
        np.testing.assert_allclose(p, expected[name], rtol=0, atol=1e-5)


def sbatch(script: Path, args: list[str], tmp_path: Path, partition: str,
           options: list[str], **env: str) -> subprocess.CompletedProcess:
    """Submit and wait (sbatch --wait: exit status is the job's)."""
    export = ",".join(["ALL", f"PATH={VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                       *(f"{k}={v}" for k, v in env.items())])
    command = ["sbatch", "--wait", "--parsable", f"--partition={partition}",
               f"--chdir={tmp_path}", f"--export={export}", *options, str(script), *args]
    return subprocess.run(command, env=env_with_venv(), capture_output=True, text=True,
                          timeout=900)


def logs(paths) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()}" for p in sorted(paths))


# --------------------------------------------------------------------------- score_array


@pytest.mark.slurm
@pytest.mark.slow
def test_score_array_scores_every_file_on_slurm(slurm_cluster, tiny_model, expected, tmp_path):
    survey = candidate_dir(tmp_path, expected)
    out = sbatch(ARRAY, ["list.txt", str(tiny_model)], tmp_path, slurm_cluster,
                 ["--array=1-2", "--cpus-per-task=1", "--mem=2G", "--time=00:10:00",
                  f"--output={tmp_path}/array-%A_%a.out"], STAMPBATCH_IMAGE="")
    task_logs = list(tmp_path.glob("array-*.out"))
    assert out.returncode == 0, f"{out.stdout}{out.stderr}\n{logs(task_logs)}"
    job = out.stdout.strip().split(";")[0]
    assert sorted(p.name for p in task_logs) == [f"array-{job}_1.out", f"array-{job}_2.out"]
    text = logs(task_logs)
    for task, name in enumerate(SIZES, start=1):
        assert f"task {task} of job {job} on " in text and f"survey/{name}" in text
    assert "apptainer" not in text                   # the container part was off
    assert_scored(survey, tiny_model, expected)


@pytest.mark.slow
def test_score_array_container_branch(tiny_model, expected, tmp_path):
    """STAMPBATCH_IMAGE set: the task runs `apptainer exec --nv --bind ... IMAGE stampbatch ...`."""
    survey = candidate_dir(tmp_path, expected)
    image = tmp_path / "stampbatch.sif"
    image.write_bytes(b"")
    fake = tmp_path / "bin"
    fake.mkdir()
    record = tmp_path / "apptainer-args"
    # Stand-in apptainer: record the arguments, then run what follows the image.
    (fake / "apptainer").write_text(
        "#!/bin/bash\n"
        f'printf "%s\\n" "$@" > "{record}"\n'
        'shift; while [[ $1 == --* ]]; do [[ $1 == --bind ]] && shift; shift; done\n'
        'shift; exec "$@"\n')
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA A100 (UUID: x)'\n")
    for tool in fake.iterdir():
        tool.chmod(0o755)
    env = env_with_venv(SLURM_ARRAY_TASK_ID="2", STAMPBATCH_IMAGE=str(image),
                        STAMPBATCH_BINDS="/scratch,/project",
                        SLURM_CPUS_PER_TASK="2")
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    out = subprocess.run(["bash", str(ARRAY), "list.txt", str(tiny_model), "--occlusion",
                          "above:0.0"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    second = list(SIZES)[1]
    assert record.read_text().splitlines() == [
        "exec", "--nv", "--bind", str(tmp_path), "--bind", str(survey),
        "--bind", str(tiny_model.parent), "--bind", "/scratch", "--bind", "/project",
        str(image), "stampbatch", "score", f"./survey/{second}", "--model", str(tiny_model),
        "--workers", "1", "--threads-per-worker", "2", "--quiet", "--occlusion", "above:0.0"]
    assert store.list_scores(survey / second) == [tiny_model.name]
    assert store.list_scores(survey / list(SIZES)[0]) == []     # task 2 scored only its file
    scores = store.read_scores(survey / second, tiny_model.name)
    np.testing.assert_allclose(scores.probability, expected[second], rtol=0, atol=1e-5)
    assert len(scores.occlusion_index) == SIZES[second]          # the extra option arrived


def run_array_by_hand(tmp_path: Path, args: list[str], **env: str):
    environment = env_with_venv(**env)
    return subprocess.run(["bash", str(ARRAY), *args], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=60)


def test_score_array_refuses_bad_settings_with_one_line(tmp_path):
    (tmp_path / "list.txt").write_text("# only a comment\na.h5\n\n")
    (tmp_path / "run").mkdir()
    cases = [
        ({}, ["list.txt", "run"], "SLURM_ARRAY_TASK_ID is not set"),
        ({"SLURM_ARRAY_TASK_ID": "2"}, ["list.txt", "run"],
         "array task 2, but list.txt has 1 entries (submit --array=1-1)"),
        ({"SLURM_ARRAY_TASK_ID": "1"}, ["nope.txt", "run"], "list file nope.txt does not exist"),
        ({"SLURM_ARRAY_TASK_ID": "1"}, ["list.txt", "runs/x"], "model runs/x does not exist"),
        ({"SLURM_ARRAY_TASK_ID": "1", "STAMPBATCH_LIST": "nope.txt"}, [],
         "list file nope.txt does not exist"),
        ({"SLURM_ARRAY_TASK_ID": "1", "STAMPBATCH_IMAGE": str(tmp_path / "x.sif"),
          "STAMPBATCH_APPTAINER": "/nonexistent/apptainer"}, ["list.txt", "run"],
         "image " + str(tmp_path / "x.sif") + " does not exist"),
    ]
    for env, args, message in cases:
        out = run_array_by_hand(tmp_path, args, **env)
        assert out.returncode == 2, (env, args, out.stderr)
        lines = out.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"score_array: error: {message}"), lines


# --------------------------------------------------------------------------- score_survey


def test_score_survey_builds_the_dask_slurm_command(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    record = tmp_path / "args"
    (fake / "stampbatch").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{record}"\n')
    (fake / "sbatch").write_text("#!/bin/sh\nexit 0\n")
    for tool in fake.iterdir():
        tool.chmod(0o755)
    (tmp_path / "runs" / "vgg6").mkdir(parents=True)
    (tmp_path / "candidates.txt").write_text("a.h5\n")
    env = {"PATH": f"{fake}{os.pathsep}/usr/bin:/bin", "HOME": str(tmp_path)}

    def run(*args: str, **extra: str) -> list[str]:
        out = subprocess.run(["bash", str(SURVEY), *args], cwd=tmp_path, env={**env, **extra},
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return record.read_text().splitlines()

    assert run() == ["score", "@candidates.txt", "--model", "runs/vgg6", "--slurm", "--gpus", "4",
                     "--walltime", "04:00:00", "--cores", "4", "--memory", "16GB",
                     "--slurm-log-dir", "logs/dask-workers"]
    assert (tmp_path / "logs" / "dask-workers").is_dir()
    assert run("survey/*.h5", "runs/vgg6", "--occlusion", "above:0.9",
               STAMPBATCH_GPUS="0", STAMPBATCH_WORKERS="8", STAMPBATCH_PARTITION="cpu",
               STAMPBATCH_ACCOUNT="astro", STAMPBATCH_SCORE_OPTIONS="--out scores") == [
        "score", "survey/*.h5", "--model", "runs/vgg6", "--slurm", "--gpus", "0",
        "--walltime", "04:00:00", "--cores", "4", "--memory", "16GB",
        "--slurm-log-dir", "logs/dask-workers", "--workers", "8", "--partition", "cpu",
        "--account", "astro", "--out", "scores", "--occlusion", "above:0.9"]
    out = subprocess.run(["bash", str(SURVEY), "missing.txt", "runs/vgg6"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"score_survey: error: list file missing.txt does not exist (working directory "
        f"{tmp_path})"]


def sacct_rows(job_name: str, since: float) -> list[list[str]]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "--name", job_name, "-S",
                          time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 60)),
                          "-o", "JobID,State,AllocTRES,WorkDir"],
                         capture_output=True, text=True, timeout=30)
    return [line.split("|") for line in out.stdout.splitlines() if line]


@pytest.mark.slurm
@pytest.mark.slow
def test_score_survey_scores_every_file_with_gpu_workers(slurm_cluster, tiny_model, expected,
                                                         tmp_path):
    """The survey batch script end to end on the real Slurm (~40 s: a Dask scheduler job and
    its GPU worker jobs start, score every file and are cancelled)."""
    survey = candidate_dir(tmp_path, expected)
    started = time.time()
    out = sbatch(SURVEY, ["list.txt", str(tiny_model)], tmp_path, slurm_cluster,
                 ["--cpus-per-task=1", "--mem=2G", "--time=00:15:00",
                  f"--output={tmp_path}/survey-%j.out"],
                 STAMPBATCH_GPUS="1", STAMPBATCH_CORES="1", STAMPBATCH_MEMORY="2GB",
                 STAMPBATCH_WALLTIME="00:10:00", STAMPBATCH_PARTITION=slurm_cluster,
                 STAMPBATCH_LOG_DIR=str(tmp_path / "worker-logs"))
    job_log = list(tmp_path.glob("survey-*.out"))
    worker_logs = list((tmp_path / "worker-logs").glob("*"))
    assert out.returncode == 0, f"{out.stdout}{out.stderr}\n{logs(job_log + worker_logs)}"
    text = logs(job_log)
    assert "on Slurm (1 job(s) x 1 cores)" in text, text
    assert_scored(survey, tiny_model, expected)
    assert worker_logs, "the GPU worker job wrote no log"
    # The worker was a Slurm job of its own, granted one (fake) GPU. sacct lags: poll.
    deadline = time.time() + 60
    rows: list[list[str]] = []
    while time.time() < deadline:
        rows = [r for r in sacct_rows("stampbatch-score", started) if r[3] == str(tmp_path)]
        if rows and all(r[1] not in ("PENDING", "RUNNING") for r in rows):
            break
        time.sleep(2)
    assert len(rows) == 1, rows
    assert "gres/gpu=1" in rows[0][2], rows
