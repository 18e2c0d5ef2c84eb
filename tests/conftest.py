"""Shared fixtures: small stamp arrays built on the fly, and the real local Slurm."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

# submitit configures logging when first imported (logging.config.dictConfig), which shuts
# down every handler that exists by then. If TensorFlow came first, absl's handler is among
# them, and it closes its stream when that is not the current sys.stderr: under pytest, the
# capture stream of an earlier test, so a later test that first imports submitit (any
# `launch`) ended the whole run ("lost sys.stderr") in orders that imported keras first
# (tests/test_models.py before tests/test_bad_input.py). Import it before any test can.
import submitit  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def gaussian_stamps(n: int, *, seed: int = 0, shape: tuple[int, int] = (21, 21),
                    amplitude: float = 8.0, sources: np.ndarray | None = None) -> np.ndarray:
    """Unit-noise stamps; rows flagged in ``sources`` get a centred Gaussian (sigma 1.5 px)."""
    rng = np.random.default_rng(seed)
    stamps = rng.normal(0.0, 1.0, size=(n, *shape)).astype(np.float32)
    if sources is not None:
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
        psf = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.5**2)).astype(np.float32)
        stamps[np.asarray(sources, bool)] += amplitude * psf
    return stamps


def write_labelled_store(path: Path, n: int = 300, *, seed: int = 1, nan_rows=()) -> Path:
    """A labelled store: half bright centred sources, ``snr`` and ``kind`` metadata
    (negatives cycle through background, offcentre, hot_pixel), optional unusable rows
    (``nan_rows``: a NaN at the centre, where no fill can stand in for the pixel)."""
    from stampbatch import store

    labels = (np.arange(n) % 2).astype(np.int8)
    stamps = gaussian_stamps(n, seed=seed, sources=labels == 1)
    stamps[list(nan_rows), stamps.shape[1] // 2, stamps.shape[2] // 2] = np.nan
    rng = np.random.default_rng(seed)
    snr = np.where(labels == 1, rng.uniform(3.0, 100.0, n), 0.0)
    kinds = np.array(["background", "offcentre", "hot_pixel"])
    kind = np.where(labels == 1, "source", kinds[np.arange(n) // 2 % 3])
    store.create_store(path, stamps, labels, {"snr": snr, "kind": kind}, chunk_rows=64)
    return path


@pytest.fixture
def labelled_arrays() -> tuple[np.ndarray, np.ndarray]:
    """300 stamps, half with a bright centred source: (stamps float32 (N,21,21), labels int8)."""
    labels = (np.arange(300) % 2).astype(np.int8)
    return gaussian_stamps(300, seed=1, sources=labels == 1), labels


def _slurm_ready() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = out.stdout.split()
    # "completing": a cancelled job is still within KillWait (5 s); the node is fine.
    return out.returncode == 0 and any(s.rstrip("*~#") in ("idle", "mixed", "allocated",
                                                           "completing") for s in states)


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """A running single-node Slurm (started with tests/slurm/up.sh when needed).

    In CI a cluster that cannot start fails the test; elsewhere the test is skipped with
    the reason, so a developer without root still runs everything else.
    """
    if not _slurm_ready() and os.geteuid() == 0:
        subprocess.run(["bash", str(REPO / "tests" / "slurm" / "up.sh")], check=False,
                       timeout=600)
    if not _slurm_ready():
        message = "the local Slurm is not running and tests/slurm/up.sh could not start it"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return "debug"


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory nobody can write to, root included: a read-only tmpfs mount when we are
    root (root ignores mode bits), mode 0555 otherwise. Yields (path, populate) where
    ``populate(src_files)`` copies files in first (the mount is remounted read-only after)."""
    target = tmp_path / "readonly"
    target.mkdir()
    mounted = False

    def populate(*files: Path) -> Path:
        nonlocal mounted
        if os.geteuid() == 0:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(target)], check=True)
            mounted = True
            for f in files:
                shutil.copy(f, target / Path(f).name)
            subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
        else:
            for f in files:
                shutil.copy(f, target / Path(f).name)
                (target / Path(f).name).chmod(0o444)
            target.chmod(0o555)
        return target

    yield populate
    if mounted:
        subprocess.run(["umount", str(target)], check=False)
    else:
        target.chmod(0o755)
