"""What a finished training leaves: temperature calibration folded into the model, the test-split
metrics (metrics.json), predictions and figures."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stampbatch import fileio, store
from stampbatch.errors import TrainError
from stampbatch.report.metrics import compute_metrics
from stampbatch.train.config import TrainConfig
from stampbatch.train.dataset import (
    Stores,
    predict_rows,
)
from stampbatch.train.models import count_macs
from stampbatch.train.preprocess import normalize_with_mask
from stampbatch.train.rundir import (
    DATA_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PREDICTIONS_FILE,
    read_json,
)


def calibrate_model(model, stores: Stores, val_rows: np.ndarray) -> dict[str, Any]:
    """Fit temperature scaling on the validation split and fold it into ``model``."""
    from stampbatch.report.metrics import expected_calibration_error
    from stampbatch.train import calibration as calibrate

    margins, labels = calibrate.store_logit_margin(model, stores, val_rows)
    temperature = calibrate.fit_temperature(margins, labels)
    calibrate.fold_temperature(model, temperature)
    out: dict[str, Any] = {"method": "temperature scaling on the validation split",
                           "temperature": temperature, "n_val": int(len(labels))}
    if len(labels):
        out["ece_val_before"] = expected_calibration_error(labels, calibrate.sigmoid(margins))
        out["ece_val_after"] = expected_calibration_error(
            labels, calibrate.sigmoid(margins / temperature))
    return out


def write_evaluation(model, store_path: Stores, arch: str, out_dir: Path, config: TrainConfig,
                     info, split: dict[str, np.ndarray], data: str, state: dict[str, Any],
                     t_start: float, calibration: dict[str, Any], *,
                     figures: bool = True) -> dict[str, Any]:
    """Predict the test split and write the run's metrics.json (last), predictions and
    figures; returns the metrics."""
    from stampbatch.report import plots

    test = split["test"]
    prob, labels, finite = predict_rows(model, store_path, test)
    buf_rows = {"rows": test, "labels": labels, "probability": prob, "finite": finite}
    _save_npz(out_dir / PREDICTIONS_FILE, buf_rows)
    meta = _pooled_meta(store_path, (store.META_SNR, store.META_KIND))
    snr = meta[store.META_SNR][test][finite] if store.META_SNR in meta else None
    kind = meta[store.META_KIND][test][finite] if store.META_KIND in meta else None
    y, p = labels[finite], prob[finite]
    try:
        scores = compute_metrics(y, p, snr=snr, kind=kind, target_fpr=config.target_fpr)
    except ValueError as exc:
        raise TrainError(f"{store_path}: cannot evaluate the test split ({exc})") from exc
    metrics: dict[str, Any] = {
        "architecture": arch, "data": data, "n_train": len(split["train"]),
        "n_val": len(split["val"]), "n_test": len(test),
        "n_test_unscorable": int((~finite).sum()),
        "epochs_run": int(state["epoch"]), "epochs": config.epochs,
        "stopped_early": bool(state.get("stopped_early", False)),
        "best_epoch": state.get("best_epoch"),
        "parameters": int(model.count_params()), "macs_per_stamp": count_macs(model),
        **scores,
        "best_val_loss": state.get("best_val_loss"),
        "best_val_accuracy": state.get("best_val_accuracy"),
        "stores": read_json(out_dir / DATA_FILE)["stores"],
        "calibration": {**calibration, "ece_test_after": scores["ece"],
                        "ece_test_before": _ece_uncalibrated(y, p, calibration["temperature"])},
    }
    if figures:
        _figures(plots, scores, state, store_path, test[finite], y, p, out_dir,
                 f"{arch} ({out_dir.name})", config.seed)
    # the model this record describes: scoring, --threshold fpr:F and evaluate check it
    metrics["model_sha256"] = fileio.sha256_file(out_dir / MODEL_FILE)
    metrics["wall_time_s"] = time.monotonic() - t_start  # t_start moved back by earlier calls
    fileio.write_json_atomic(out_dir / METRICS_FILE, metrics)  # last: marks the run as done
    return json.loads(json.dumps(fileio.jsonable(metrics)))


def _figures(plots, scores: dict[str, Any], state: dict[str, Any], store_path: Stores,
             rows: np.ndarray, y: np.ndarray, p: np.ndarray, out_dir: Path, title: str,
             seed: int) -> None:
    """The run directory's FIGURES, from the test split's scores."""
    plots.plot_confusion_matrix(np.asarray(scores["confusion_matrix"]),
                                out_dir / "confusion_matrix.png", title=f"{title}: test split")
    plots.plot_history(state["history"], out_dir / "history.png", title=title)
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    op = scores["operating_point"]
    plots.plot_roc(fpr, tpr, out_dir / "roc.png", auc=scores["roc_auc"],
                   operating_point=(op["fpr"], op["completeness"]), title=f"{title}: ROC")
    _plot_completeness(plots, scores, out_dir / "completeness_snr.png", title)
    _plot_examples(plots, store_path, rows, y, p, out_dir / "examples.png", title, seed)


def _pooled_meta(stores: Stores, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Metadata columns that every store has, concatenated in global-row order."""
    have = [c for c in columns if all(c in info.meta_columns for info in stores.infos)]
    parts = [store.read_meta(p, have) for p in stores.paths] if have else []
    return {c: np.concatenate([part[c].astype(str) if part[c].dtype.kind in "SUO" else part[c]
                               for part in parts]) for c in have}


def _ece_uncalibrated(y: np.ndarray, p: np.ndarray, temperature: float) -> float:
    """ECE of the probabilities before the temperature was folded in (margin times T)."""
    from stampbatch.report.metrics import expected_calibration_error
    from stampbatch.train.calibration import sigmoid

    q = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return expected_calibration_error(y, sigmoid(temperature * np.log(q / (1 - q))))


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    fileio.write_bytes_atomic(path, buf.getvalue())


def _plot_completeness(plots, scores: dict[str, Any], path: Path, title: str) -> None:
    cvs = scores.get("completeness_vs_snr")
    if cvs is None:  # no SNR in the store: completeness of all sources in one bin
        edges = [1.0, 1000.0]
        rec = scores["confusion_matrix"][1]
        n = rec[0] + rec[1]
        comp, counts = [rec[1] / n if n else None], [n]
        extra = {f"at FPR {scores['operating_point']['target_fpr']:g}":
                 [scores["operating_point"]["completeness"]]}
        plots.plot_completeness(edges, comp, counts, path, extra=extra,
                                title=f"{title}: no SNR in the store, all sources")
        return
    op = scores["operating_point"]
    plots.plot_completeness(
        cvs["bin_edges"], cvs["completeness"], cvs["counts"], path,
        extra={f"at FPR {op['target_fpr']:g} (P >= {op['threshold']:.3g})":
               cvs["completeness_at_operating_point"]},
        title=f"{title}: completeness of test sources (P >= 0.5)")


def _plot_examples(plots, store_path: Stores, rows: np.ndarray, y: np.ndarray, p: np.ndarray,
                   path: Path, title: str, seed: int, n: int = 32) -> None:
    rng = np.random.default_rng(seed)
    wrong = np.flatnonzero((p >= 0.5).astype(np.int64) != y)
    right = np.flatnonzero((p >= 0.5).astype(np.int64) == y)
    pick_wrong = rng.permutation(wrong)[: n // 2]
    pick = np.concatenate([pick_wrong, rng.permutation(right)[: n - len(pick_wrong)]])
    raw, _ = store_path.read(rows[pick])
    stamps, _ = normalize_with_mask(raw)
    plots.plot_stamp_grid(stamps, y[pick], p[pick], path, max_stamps=n,
                          title=f"{title}: test stamps (normalised)")
