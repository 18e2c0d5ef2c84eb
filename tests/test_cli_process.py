"""The command line as a real process: SIGTERM cleans up like Ctrl-C; logs get one final line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _default_sigint() -> None:
    # A test runner started in the background by a shell without job control (``make test
    # &``, a CI wrapper) has SIGINT ignored, and a child inherits that: Python then installs
    # no KeyboardInterrupt handler and Ctrl-C could not be tested. A user's terminal has the
    # default, so the child gets it back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stampbatch", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _wait_for_partial(tmp_path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(tmp_path.glob(".*.partial.h5"))
        if found and found[0].stat().st_size > 0:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the command ended before writing: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no partial file appeared")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_signal_during_simulate_removes_the_hidden_partial_file(tmp_path, sig, code, word):
    """SIGTERM (timeout, scancel, a Slurm time limit) used to leave .out.h5.*.partial.h5 behind."""
    proc = _start(["simulate", "out.h5", "--n", "2000000", "--quiet"], tmp_path)
    _wait_for_partial(tmp_path, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert err.count("\n") == 1 and word in err and "Traceback" not in err


def test_ctrl_c_stops_simulate_within_a_fraction_of_a_block(tmp_path):
    """A closed simulation used to wait for the blocks its threads had in flight, up to one
    block's time (16,384 stamps), before its clean-up and exit; they now stop at their next
    check. One block's time is measured in the same run: from the start to the first block's
    stamps in the file. Without galaxies (their FFTs' checks: tests/sim) a block costs a
    third of the CPU; still 10-45 s of wall time on 2 busy cores: two blocks at once."""
    (tmp_path / "sim.toml").write_text("centre_galaxy_fraction = 0.0\nfield_galaxy_fraction = 0.0\n")
    start = time.monotonic()
    proc = _start(["simulate", "out.h5", "--n", "2000000", "--quiet", "--config", "sim.toml"],
                  tmp_path)
    partial = _wait_for_partial(tmp_path, proc)[0]
    empty = partial.stat().st_size
    deadline = start + 300
    while partial.stat().st_size < empty + 1_000_000:  # a block is 29 MB of stamps
        assert time.monotonic() < deadline and proc.poll() is None, proc.returncode
        time.sleep(0.02)
    block_s = time.monotonic() - start
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    stop_s = time.monotonic() - sent
    assert proc.returncode == 130, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim.toml"]
    assert stop_s < 0.1 * block_s, f"stopped in {stop_s:.2f} s; one block took {block_s:.2f} s"


def test_sigterm_during_ingest_removes_the_hidden_partial_file(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    np.save(tmp_path / "c.npy", rng.normal(size=(60_000, 441)).astype(np.float32))
    proc = _start(["ingest", "out.h5", "--candidates", "c.npy", "--chunk-rows", "64",
                   "--compression", "gzip"], tmp_path)
    _wait_for_partial(tmp_path, proc)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npy"]


def test_simulate_prints_its_final_progress_line_once_in_a_log(tmp_path):
    proc = _start(["simulate", "s.h5", "--n", "3000"], tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("simulate: 3,000/3,000 stamps (100.0%)"), err
    assert out == "wrote 3,000 labelled stamps to s.h5\n"
