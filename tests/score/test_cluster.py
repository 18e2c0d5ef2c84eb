"""Where scoring runs when the cluster misbehaves: a Slurm controller that does not answer
(sbatch failing at once, or never returning) and a Dask scheduler address nobody listens on.
Real processes, a real ``sbatch`` program on PATH that behaves as sbatch does without a
controller, a real closed port: one line naming the cause, within the start-up limit plus
30 s, and no journal left behind. The real Slurm is not touched."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, gaussian_stamps

from stampbatch import store

LIMIT = 5      # --start-timeout of these runs (s)

REFUSING_SBATCH = """#!/bin/sh
echo "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)" >&2
exit 1
"""
# sbatch retrying a controller that never answers: it does not return (the process itself
# sleeps, so its name is sbatch as a real one's)
HANGING_SBATCH = f"#!{sys.executable}\nimport time\ntime.sleep(600)\n"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    import keras

    from stampbatch.train import models

    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    keras.utils.set_random_seed(0)
    models.build_model("simple").save(path)
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _score(tmp_path: Path, model: Path, extra: list[str], path_dir: Path | None = None):
    cands = tmp_path / "cands.h5"
    store.create_store(cands, gaussian_stamps(64, seed=4))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if path_dir is not None:
        env["PATH"] = f"{path_dir}{os.pathsep}{env['PATH']}"
    listing = sorted(p.name for p in tmp_path.iterdir())
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "stampbatch", "score", str(cands), "--model",
                           str(model), "--quiet", "--start-timeout", str(LIMIT), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr
    assert wall <= LIMIT + 30, wall
    assert sorted(p.name for p in tmp_path.iterdir()) == listing   # no journal, no scores
    err = [line for line in proc.stderr.splitlines() if not line.startswith("waiting for Slurm")]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return err[0]


def _fake(tmp_path: Path, text: str) -> Path:
    bin_dir = tmp_path.parent / f"{tmp_path.name}-bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(text)
    (bin_dir / "sbatch").chmod(0o755)
    return bin_dir


def test_sbatch_without_a_controller_is_one_line_with_its_own_error(tmp_path, model):
    """~30 s on 2 cores: the first run of the module exports the model to ONNX (cached)."""
    line = _score(tmp_path, model, ["--slurm"], _fake(tmp_path, REFUSING_SBATCH))
    assert line.endswith("Slurm refused the worker job: sbatch: error: Batch job submission "
                         "failed: Unable to contact slurm controller (connect failure)"), line


def test_sbatch_that_never_returns_ends_at_the_start_up_limit(tmp_path, model):
    line = _score(tmp_path, model, ["--slurm"], _fake(tmp_path, HANGING_SBATCH))
    assert f"no Slurm worker started within {LIMIT} s" in line and "--start-timeout" in line
    left = subprocess.run(["pgrep", "-f", str(tmp_path) + "-bin/sbatch"], capture_output=True,
                          text=True).stdout
    assert left == "", f"sbatch left running: {left}"


def test_a_scheduler_address_nobody_listens_on(tmp_path, model):
    port = _closed_port()
    line = _score(tmp_path, model, ["--scheduler", f"tcp://127.0.0.1:{port}"])
    assert f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port} within {LIMIT} s" in line


def test_start_timeout_is_checked(capsys):
    from stampbatch import cli

    for bad in ("0", "-3", "inf", "soon"):
        with pytest.raises(SystemExit) as exc:
            cli.main(["score", "x.h5", "--model", "m.keras", "--start-timeout", bad])
        assert exc.value.code == 2
        assert "argument --start-timeout" in capsys.readouterr().err


def test_sigterm_while_waiting_for_slurm_leaves_nothing_behind(tmp_path, model):
    """SIGTERM (scancel, timeout) while sbatch hangs: exit 143 in one line, no journal, no
    lock, no sbatch left running (it ended with an AssertionError and a journal before).
    Up to ~90 s on 2 loaded cores: the scorer imports TensorFlow and exports the model to
    ONNX before it asks Slurm."""
    import signal

    cands = tmp_path / "cands.h5"
    store.create_store(cands, gaussian_stamps(64, seed=4))
    bin_dir = _fake(tmp_path, HANGING_SBATCH)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen([sys.executable, "-m", "stampbatch", "score", str(cands), "--model",
                             str(model), "--slurm", "--quiet"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while not subprocess.run(["pgrep", "-f", f"{bin_dir}/sbatch"],
                                 capture_output=True).stdout:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:      # the old scorer hung here: do not leave it running
            proc.kill()
            proc.wait()
            found = subprocess.run(["pgrep", "-f", f"{bin_dir}/sbatch"], capture_output=True,
                                   text=True).stdout.split()
            for pid in found:            # this test's own fake sbatch, by its id
                os.kill(int(pid), signal.SIGKILL)
    assert proc.returncode == 143, err
    lines = [x for x in err.splitlines() if not x.startswith("waiting for Slurm")]
    assert lines == ["stampbatch score: terminated (SIGTERM)"], err
    # the store and the (empty) scores folder made with it: no journal, no lock, no partial
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cands.h5", "cands.h5.scores"]
    assert not subprocess.run(["pgrep", "-f", f"{bin_dir}/sbatch"], capture_output=True).stdout
