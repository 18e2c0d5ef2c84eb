"""``stampbatch evaluate``: numbers equal scikit-learn's, computed independently here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import gaussian_stamps
from sklearn.metrics import confusion_matrix, recall_score, roc_auc_score

from stampbatch import cli, store
from stampbatch.errors import EvaluateError
from stampbatch.report.evaluate import evaluate_run
from stampbatch.train.loop import TrainConfig, train_run

keras = pytest.importorskip("keras")
IMAGE_TYPES = np.array(["science", "difference", "single_epoch", "coadd"])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A `simple` network trained for two epochs on 400 labelled stamps."""
    work = tmp_path_factory.mktemp("evaluate")
    labels = (np.arange(400) % 2).astype(np.int8)
    stamps = gaussian_stamps(400, seed=3, sources=labels == 1)
    store.create_store(work / "train.h5", stamps, labels, chunk_rows=64)
    train_run(work / "train.h5", "simple", work / "run", TrainConfig(epochs=2, batch_size=32),
              progress=False)
    return work / "run"


def real_format_store(path: Path, n: int = 600, *, labelled: bool = True) -> Path:
    """Stamps as `ingest` writes them, with per-stamp groups in /meta (image type, SNR,
    neighbour distance); faint sources so that the scores overlap."""
    rng = np.random.default_rng(12)
    labels = (rng.random(n) < 0.4).astype(np.int8)
    stamps = gaussian_stamps(n, seed=13, sources=labels == 1)
    noise = rng.normal(0, 1.5, stamps.shape).astype(np.float32)
    meta = {store.META_IMAGE_TYPE: IMAGE_TYPES[np.arange(n) % 4],
            store.META_SNR: np.where(labels == 1, rng.uniform(3, 60, n), 0.0),
            store.META_NN_DISTANCE: np.where(rng.random(n) < 0.5, rng.uniform(3, 14, n), np.nan)}
    if labelled:
        store.create_store(path, stamps + noise, labels, meta, chunk_rows=128)
    else:
        meta[store.META_TRUE_LABEL] = labels
        store.create_store(path, stamps + noise, None, meta, chunk_rows=128)
    return path


def _independent(run: Path, data: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    from stampbatch.train.preprocess import normalize

    model = keras.models.load_model(run / "model.keras")
    p = model.predict(normalize(store.read_stamps(data))[..., None], verbose=0)[:, 1]
    info = store.open_store(data)
    y = (store.read_labels(data) if info.labelled
         else store.read_meta(data, ["true_label"])["true_label"]).astype(int)
    return y, p.astype(np.float64), store.read_meta(data)


@pytest.mark.parametrize("labelled", [True, False])
def test_evaluation_equals_scikit_learn(run, tmp_path, labelled):
    data = real_format_store(tmp_path / "real.h5", labelled=labelled)
    result = evaluate_run(run, data)
    y, p, meta = _independent(run, data)
    assert result["n"] == 600 and result["n_sources"] == y.sum()
    assert result["roc_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
    assert result["confusion_matrix"] == confusion_matrix(y, (p >= 0.5).astype(int)).tolist()
    metrics = json.loads((run / "metrics.json").read_text())
    for key, target in (("0.01", "fpr_0.01"), ("0.001", "fpr_0.001")):
        thr = metrics["thresholds"][key]["threshold"]
        row = result["at_run_thresholds"][target]
        assert row["threshold"] == thr
        assert row["completeness"] == pytest.approx(recall_score(y, (p >= thr).astype(int)))
        assert row["fpr"] == pytest.approx(np.mean(p[y == 0] >= thr))
    by_type = result["groups"][store.META_IMAGE_TYPE]
    assert set(by_type) == set(IMAGE_TYPES)
    for name, row in by_type.items():
        sel = meta[store.META_IMAGE_TYPE] == name
        assert row["n"] == sel.sum()
        assert row["roc_auc"] == pytest.approx(roc_auc_score(y[sel], p[sel]), abs=1e-6)
        thr = metrics["thresholds"]["0.01"]["threshold"]
        assert row["fpr_fpr_0.01"] == pytest.approx(np.mean(p[sel & (y == 0)] >= thr))
    by_dist = result["groups"][store.META_NN_DISTANCE]
    near = (meta[store.META_NN_DISTANCE] >= 4) & (meta[store.META_NN_DISTANCE] < 6)
    assert by_dist["4-6"]["n"] == near.sum()
    assert by_dist["none"]["n"] == np.isnan(meta[store.META_NN_DISTANCE]).sum()
    # ECE by its definition (15 equal-width bins)
    idx = np.minimum((p * 15).astype(int), 14)
    ece = sum(abs(y[idx == b].mean() - p[idx == b].mean()) * (idx == b).mean()
              for b in range(15) if (idx == b).any())
    assert result["ece"] == pytest.approx(ece, abs=1e-6)
    out = run / "eval" / "real"
    assert json.loads((out / "evaluation.json").read_text()) == result
    for name in ("roc.png", "reliability.png", "completeness_snr.png", "confusion_matrix.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name


def test_cli_evaluate_by_column_and_report(run, tmp_path, capsys):
    data = real_format_store(tmp_path / "blind.h5")
    assert cli.main(["evaluate", str(run), "--data", str(data), "--by", "image_type"]) == 0
    out = capsys.readouterr().out
    assert "ROC AUC" in out and "by image_type:" in out and "coadd" in out
    result = json.loads((run / "eval" / "blind" / "evaluation.json").read_text())
    assert set(result["groups"]) == {"image_type"}
    assert cli.main(["report", str(run.parent)]) == 0
    html = (run.parent / "report.html").read_text()
    assert "Evaluations" in html and "blind.h5" in html and "eval/blind/reliability.png" in html


def test_bad_inputs_are_one_line_errors(run, tmp_path, capsys):
    data = real_format_store(tmp_path / "r.h5")
    assert cli.main(["evaluate", str(run), "--data", str(data), "--by", "colour"]) == 1
    err = capsys.readouterr().err.strip()
    assert "no /meta column colour" in err and len(err.splitlines()) == 1
    stamps = gaussian_stamps(20, seed=1)
    store.create_store(tmp_path / "c.h5", stamps, None)
    with pytest.raises(EvaluateError, match="neither /labels nor /meta/true_label"):
        evaluate_run(run, tmp_path / "c.h5")
    with pytest.raises(EvaluateError, match="no model.keras"):
        evaluate_run(tmp_path, data)


def test_evaluate_by_a_column_of_an_ingested_table(run, tmp_path, capsys):
    """`ingest --meta TABLE.csv` then `evaluate --by image_type`: group AUCs equal sklearn's."""
    rng = np.random.default_rng(5)
    src = gaussian_stamps(120, seed=6, sources=np.ones(120, bool)) + rng.normal(0, 1.5, (120, 21, 21))
    nse = gaussian_stamps(80, seed=7) + rng.normal(0, 1.5, (80, 21, 21))
    np.save(tmp_path / "src.npy", src.astype(np.float32))
    np.save(tmp_path / "nse.npy", nse.astype(np.float32))
    types = IMAGE_TYPES[np.arange(200) % 4]
    (tmp_path / "m.csv").write_text("image_type\n" + "\n".join(types) + "\n")
    data = tmp_path / "real.h5"
    assert cli.main(["ingest", str(data), "--sources", str(tmp_path / "src.npy"), "--noise",
                     str(tmp_path / "nse.npy"), "--meta", str(tmp_path / "m.csv")]) == 0
    assert cli.main(["evaluate", str(run), "--data", str(data), "--by", "image_type",
                     "--no-figures"]) == 0
    assert "by image_type:" in capsys.readouterr().out
    result = json.loads((run / "eval" / "real" / "evaluation.json").read_text())
    y, p, _ = _independent(run, data)
    groups = result["groups"]["image_type"]
    for name in IMAGE_TYPES:
        sel = types == name
        assert groups[name]["roc_auc"] == pytest.approx(roc_auc_score(y[sel], p[sel]), abs=1e-9)


def test_a_replaced_model_is_refused_where_the_run_describes_it(run, tmp_path, capsys):
    """metrics.json records the sha256 of the model.keras it describes. A run whose
    model.keras was swapped for another architecture's model is refused by score, by
    --threshold fpr:F and by evaluate (one line naming the run's file); a run from before the
    hash (none recorded) still evaluates, with a warning."""
    import shutil

    from stampbatch import fileio, kbmod
    from stampbatch.train import models

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model_sha256"] == fileio.sha256_file(run / "model.keras")
    swapped = tmp_path / "swapped"
    shutil.copytree(run, swapped)
    models.build_model("vgg6").save(swapped / "model.keras")
    data = real_format_store(tmp_path / "r.h5", n=80)
    cands = tmp_path / "c.h5"
    store.create_store(cands, gaussian_stamps(20, seed=1), None)
    for argv in (["score", str(cands), "--model", str(swapped)],
                 ["score", str(cands), "--model", str(swapped / "model.keras")],
                 ["evaluate", str(swapped), "--data", str(data)]):
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1, err
        assert f"{swapped / 'model.keras'}: is not the model {swapped / 'metrics.json'}" in err
    with pytest.raises(Exception, match="is not the model"):
        kbmod.resolve_threshold("fpr:0.01", swapped)
    old = tmp_path / "old"
    shutil.copytree(run, old)
    del metrics["model_sha256"]
    (old / "metrics.json").write_text(json.dumps(metrics))
    assert cli.main(["evaluate", str(old), "--data", str(data), "--no-figures"]) == 0
    err = capsys.readouterr().err
    assert "records no sha256 of its model" in err and "used unchecked" in err


def test_a_training_store_is_evaluated_on_its_held_out_rows_only(run, tmp_path, capsys):
    """The store the run trained on: only its test-split rows (split.npz) count, and the
    command says so; AUC over those rows equals scikit-learn's on the same rows."""
    import shutil

    train = run.parent / "train.h5"
    test = np.sort(np.load(run / "split.npz")["test"])
    assert 0 < len(test) < 400
    assert cli.main(["evaluate", str(run), "--data", str(train), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert (f"{train.resolve()} is a training store of this run: only its {len(test)} "
            "held-out test stamps (of 400) are evaluated") in out
    result = json.loads((run / "eval" / "train" / "evaluation.json").read_text())
    assert result["n"] == len(test) and result["held_out_only"] == {"split": "test",
                                                                    "n_store": 400}
    model = keras.models.load_model(run / "model.keras")
    from stampbatch.train.preprocess import normalize

    p = model.predict(normalize(store.read_stamps(train)[test])[..., None], verbose=0)[:, 1]
    y = store.read_labels(train)[test]
    assert result["roc_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
    copy = tmp_path / "copy.h5"                     # the same stamps elsewhere: all of them
    shutil.copy(train, copy)
    assert evaluate_run(run, copy, figures=False)["n"] == 400
    grown = tmp_path / "grown"                      # the run's store, since grown
    shutil.copytree(run, grown)
    record = json.loads((grown / "data.json").read_text())
    record["stores"][0]["path"] = str(copy.resolve())
    record["stores"][0]["n_stamps"] = 300
    (grown / "data.json").write_text(json.dumps(record))
    with pytest.raises(EvaluateError, match="when it held 300 stamps; it holds 400 now"):
        evaluate_run(grown, copy, figures=False)


def test_a_store_with_nothing_classifiable_names_the_file_and_the_reason(run, tmp_path, capsys):
    labels = (np.arange(40) % 2).astype(np.int8)
    store.create_store(tmp_path / "nan.h5", np.full((40, 21, 21), np.nan, np.float32), labels)
    assert cli.main(["evaluate", str(run), "--data", str(tmp_path / "nan.h5")]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert f"{tmp_path / 'nan.h5'}: none of its 40 stamps can be classified" in err
