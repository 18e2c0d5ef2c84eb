"""A quiet console: healthy runs print no ERROR/WARNING lines from TensorFlow, absl or CUDA."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stampbatch import console

NOISE = re.compile(r"ERROR|E0000|W0000|WARNING")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # prove the quiet comes from stampbatch, not the caller
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "stampbatch", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_simulate_inspect_train_score_print_no_library_errors_or_warnings(tmp_path):
    """Every command of a user's day as a real process, its stderr read whole (~90 s: each
    step is a fresh process importing TensorFlow, and one trains a model)."""
    steps = [
        ["simulate", "train.h5", "--n", "600", "--seed", "1"],
        ["simulate", "cands.h5", "--n", "200", "--seed", "2", "--candidates"],
        ["inspect", "train.h5", "cands.h5"],
        ["train", "--data", "train.h5", "--arch", "simple", "--out", "run", "--epochs", "1"],
        ["score", "cands.h5", "--model", "run", "--workers", "1", "--occlusion", "above:0.9"],
        # TensorFlow in the Dask worker processes too (quiet through the worker preload)
        ["score", "cands.h5", "--model", "run", "--workers", "1", "--backend", "tf", "--out", "tf"],
        ["inspect", "cands.h5"],
    ]
    for args in steps:
        err = _run(args, tmp_path).stderr
        loud = [line for line in err.splitlines() if NOISE.search(line)]
        assert loud == [], f"stampbatch {' '.join(args)} printed:\n" + "\n".join(loud)
    # --verbose hands the library logs back (TensorFlow's start-up lines at least).
    verbose = _run(["--verbose", "models"], tmp_path).stderr
    assert re.search(r"^[IWE]\d{4} |absl", verbose, re.M), verbose


def test_inspect_and_simulate_do_not_import_tensorflow(tmp_path):
    code = ("import sys\nfrom stampbatch import cli\n"
            "assert cli.main(['simulate', 's.h5', '--n', '50', '--quiet']) == 0\n"
            "assert cli.main(['inspect', 's.h5']) == 0\n"
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_the_import_hook_is_removed_and_the_dask_preload_undone():
    import builtins

    before = builtins.__import__
    with console.quiet_tensorflow_imports():
        assert os.environ.get("DASK_DISTRIBUTED__WORKER__PRELOAD") == '["stampbatch.console"]'
        assert builtins.__import__ is not before or "tensorflow" in sys.modules
    assert builtins.__import__ is before
    assert "DASK_DISTRIBUTED__WORKER__PRELOAD" not in os.environ


def test_startup_filter_keeps_real_errors():
    text = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            "I0000 00:00:1796034103.372532    4793 port.cc:153] oneDNN custom operations are on.\n"
            "I0000 00:00:1796034103.373097    4793 cudart_stub.cc:31] Could not find cuda drivers\n"
            "E0000 00:00:1796034105.206106    4793 cuda_platform.cc:52] failed call to cuInit: x\n"
            "E0000 00:00:1796034105.206106    4793 op_kernel.cc:1] a real failure\n"
            "something else\n")
    assert console.filter_startup_lines(text) == (
        "E0000 00:00:1796034105.206106    4793 op_kernel.cc:1] a real failure\nsomething else\n")
