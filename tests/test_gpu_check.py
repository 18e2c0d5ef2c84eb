"""benchmarks/gpu_check.sh: every step that needs no GPU, run for real with tiny sizes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.bench]


def test_gpu_check_cpu_dry_run_trains_scores_compares_and_reports(tmp_path):
    """The GPU check script's CPU dry run for real (~90 s: it trains, exports and scores, as
    it does on a GPU node, so the script a GPU session runs is proved here)."""
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run",
                           "--stamps", "3000", "--train", "500", "--maps", "12",
                           "--workdir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:] + out[-2000:]
    assert "vgg6: 2 epochs" in out
    assert "scored 3,000 stamps from 1 file(s)" in out and "12 occlusion maps" in out
    assert "GPU vs CPU probabilities on 3,000 stamps: max |diff| 0.00e+00" in out
    assert "-> OK" in out and "end to end: 3,000 stamps in" in out
    assert "occlusion: 12 maps in" in out and "GPU utilisation: n/a" in out
    assert list((tmp_path / "vgg6").glob("model.*.onnx"))


def test_gpu_check_refuses_unknown_options_and_a_machine_without_a_gpu(tmp_path):
    bad = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --nope" in bad.stderr
    env = dict(os.environ, PATH=f"{tmp_path}:/usr/bin:/bin")   # no nvidia-smi here
    real = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--workdir",
                           str(tmp_path / "w")], env=env, capture_output=True, text=True)
    assert real.returncode == 1 and "no nvidia-smi: not a GPU machine" in real.stderr
