"""The ONNX form made once at the end of training; scoring a fresh run never exports."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, gaussian_stamps

from stampbatch import fileio, store
from stampbatch.score import inference
from stampbatch.train import export
from stampbatch.train.loop import TrainConfig, train_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real training run (tiny vgg6, one epoch) through train_run, the hook included."""
    root = tmp_path_factory.mktemp("export")
    n = 256
    labels = (np.arange(n) % 2).astype(np.int8)
    data = root / "train.h5"
    store.create_store(data, gaussian_stamps(n, seed=2, sources=labels == 1), labels,
                       chunk_rows=64)
    out = root / "vgg6"
    train_run(data, "vgg6", out, TrainConfig(epochs=1, batch_size=32), progress=False)
    return out


def test_training_stores_a_verified_onnx_export_with_its_sha256(trained):
    sha = fileio.sha256_file(trained / "model.keras")
    onnx = trained / f"model.{sha[:12]}.onnx"
    info = json.loads((trained / f"model.{sha[:12]}.onnx.json").read_text())
    assert info["sha256"] == sha
    assert info["onnx_sha256"] == fileio.sha256_file(onnx)
    assert info["architecture"] == "vgg6" and 0.0 <= info["max_abs_diff"] <= 1e-5
    assert sorted(p.name for p in trained.glob("model.*.onnx*")) == [onnx.name, onnx.name + ".json"]


def test_scoring_a_fresh_run_performs_no_export_and_starts_no_dask(trained, tmp_path):
    """A separate scoring process: the export function would raise, and neither TensorFlow,
    tf2onnx nor Dask is imported (the file is small enough to score in-process)."""
    cand = tmp_path / "cand.h5"
    store.create_store(cand, gaussian_stamps(600, seed=5), chunk_rows=128)
    script = textwrap.dedent(f"""
        import sys
        from stampbatch.score import inference, run as score
        def boom(*a, **k):
            raise AssertionError("exported while scoring")
        inference._export_onnx = boom
        s = score.score_files([{str(cand)!r}], [{str(trained)!r}],
                              score.ScoreOptions(progress=False, log=lambda m: None))
        assert s.stamps_scored == 600 and s.scheduler.startswith("in-process"), s.scheduler
        assert s.models["vgg6"].backend == "onnx"
        loaded = sorted(m for m in ("tensorflow", "keras", "tf2onnx", "distributed")
                        if m in sys.modules)
        assert not loaded, loaded
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    p = store.read_scores(cand, "vgg6").probability
    assert p.shape == (600,) and np.all((p >= 0) & (p <= 1))


def test_a_model_from_elsewhere_is_exported_once_and_stale_exports_go(trained, tmp_path,
                                                                      monkeypatch):
    loose = tmp_path / "elsewhere.keras"
    loose.write_bytes((trained / "model.keras").read_bytes())
    calls = []
    real = inference._export_onnx
    monkeypatch.setattr(inference, "_export_onnx",
                        lambda *a: calls.append(1) or real(*a))
    src = inference.resolve_model(loose)
    first = inference.prepare_model(src, "auto")
    second = inference.prepare_model(src, "auto")
    assert len(calls) == 1 and first == second and first.backend == "onnx"
    # a run whose model.keras was replaced: the new export replaces the old one
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(loose.read_bytes())
    (run / "model.000000000000.onnx").write_bytes(b"old")
    (run / "model.000000000000.onnx.json").write_text("{}")
    onnx = export.export_for_scoring(run)
    assert onnx is not None and onnx.parent == run
    assert sorted(p.name for p in run.glob("model.*.onnx*")) == [onnx.name, onnx.name + ".json"]


def test_an_unexportable_model_warns_and_leaves_scoring_to_fall_back(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(b"\x80\x04 not a model")
    assert export.export_for_scoring(run) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no ONNX export for scoring" in err and "pickle" in err
