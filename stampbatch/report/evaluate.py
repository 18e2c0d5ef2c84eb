"""Evaluate a trained run on any labelled store, overall and per group of stamps.

``stampbatch evaluate RUN --data LABELLED.h5 [--by COLUMN ...]`` scores every stamp of the
store with ``RUN/model.keras`` and writes ``RUN/eval/<store>/evaluation.json`` with:

* ROC AUC, the confusion matrix at P >= 0.5, expected calibration error and the
  reliability diagram (:mod:`stampbatch.report.metrics`);
* completeness and false-positive rate at the *run's* thresholds for 1 % and 0.1 % FPR
  (fixed on the run's own test split, so a shifted store shows how they transfer), and
  completeness by SNR bin at each of them;
* per group of every ``--by`` column (default: each text or boolean ``/meta`` column with
  at most ``MAX_GROUPS`` distinct values, plus binned neighbour distance, SNR and half-light
  radius where the store has them): stamps, sources, ROC AUC, completeness and false-positive rate
  at each threshold.

The truth comes from ``/labels`` or, for a candidate file, ``/meta/true_label``. Figures
(ROC, reliability, completeness against SNR, confusion matrix) go beside the JSON.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stampbatch import fileio, store
from stampbatch.errors import EvaluateError
from stampbatch.report.metrics import (
    MAX_GROUPS,
    SNR_BIN_EDGES,
    TARGET_FPRS,
    bin_labels,
    binned_completeness,
    compute_metrics,
    group_metrics,
    operating_point,
)
from stampbatch.train.rundir import DATA_FILE, METRICS_FILE, MODEL_FILE, SPLIT_FILE

EVAL_DIR = "eval"
EVALUATION_FILE = "evaluation.json"
FIGURES = ("roc.png", "reliability.png", "completeness_snr.png", "confusion_matrix.png")
# Numeric columns grouped in bins rather than by value.
BINNED_COLUMNS: dict[str, tuple[float, ...]] = {
    store.META_NN_DISTANCE: (0.0, 4.0, 6.0, 8.0, 10.0, 15.0),
    store.META_SNR: SNR_BIN_EDGES,
    store.META_HALF_LIGHT_RADIUS: (0.0, 0.75, 1.5, 3.0, 5.0),
}


def run_thresholds(run_dir: Path) -> dict[str, float]:
    """The run's P thresholds for each target FPR of its test split (``"fpr_0.01"`` ...)."""
    path = Path(run_dir) / METRICS_FILE
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EvaluateError(f"{path}: unreadable ({exc}); is {run_dir} a finished run?") from None
    found = metrics.get("thresholds") or {}
    out = {f"fpr_{k}": float(v["threshold"]) for k, v in found.items()}
    op = metrics.get("operating_point")
    if not out and isinstance(op, dict):  # runs from before thresholds were stored
        out[f"fpr_{op['target_fpr']:g}"] = float(op["threshold"])
    if not out:
        raise EvaluateError(f"{path}: holds no thresholds")
    return out


def store_truth(path: Path) -> np.ndarray:
    """Labels of a store: ``/labels``, else ``/meta/true_label``."""
    info = store.open_store(path, check_labels_values=True)
    if info.labelled:
        return store.read_labels(path).astype(np.int64)
    if store.META_TRUE_LABEL in info.meta_columns:
        return store.read_meta(path, [store.META_TRUE_LABEL])[store.META_TRUE_LABEL].astype(np.int64)
    raise EvaluateError(f"{path}: has neither /labels nor /meta/{store.META_TRUE_LABEL}; "
                        f"evaluation needs the truth")


def group_columns(path: Path, by: Sequence[str] | None) -> dict[str, np.ndarray]:
    """Group labels per column: the requested ones, or every few-valued /meta column and
    the binned ones the store has."""
    info = store.open_store(path)
    names = list(by) if by else list(info.meta_columns)
    missing = [c for c in names if c not in info.meta_columns]
    if missing:
        raise EvaluateError(f"{path}: no /meta column {', '.join(missing)} (has: "
                            f"{', '.join(info.meta_columns) or 'none'})")
    meta = store.read_meta(path, names) if names else {}
    out: dict[str, np.ndarray] = {}
    for name in names:
        values = meta[name]
        if name in BINNED_COLUMNS:
            out[name] = bin_labels(values, BINNED_COLUMNS[name])
        elif (by or np.asarray(values).dtype.kind in "SUOb") and len(np.unique(values)) <= MAX_GROUPS:
            out[name] = np.asarray(values).astype(str)
        elif by:
            raise EvaluateError(f"{path}: /meta/{name} has more than {MAX_GROUPS} distinct "
                                f"values; group by a column with few values")
    return out


def store_dir_name(path: Path) -> str:
    """The directory under RUN/eval/ for a store (its file stem, made safe)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem) or "store"


def evaluate_run(run_dir: Path | str, data: Path | str, by: Sequence[str] | None = None, *,
                 figures: bool = True) -> dict[str, Any]:
    """Evaluate ``run_dir``'s model on the labelled store ``data``; write and return the
    evaluation (see the module docstring)."""
    from stampbatch.train.dataset import predict_rows
    from stampbatch.train.loop import configure_tensorflow

    run_dir, data = Path(run_dir), Path(data)
    model_path = run_dir / MODEL_FILE
    if not model_path.is_file():
        raise EvaluateError(f"{run_dir}: no {MODEL_FILE} (not a finished run)")
    from stampbatch.score.inference import check_run_model

    verified = check_run_model(run_dir)  # else another model's thresholds would be applied
    thresholds = run_thresholds(run_dir)
    y_store = store_truth(data)
    rows = held_out_rows(run_dir, data, len(y_store))
    y_all = y_store if rows is None else y_store[rows]
    if len(np.unique(y_all)) < 2:
        raise EvaluateError(f"{data}: every stamp{' held out of training' if rows is not None else ''}"
                            f" has label {y_all[0]}; evaluation needs both classes")
    groups = {k: v if rows is None else v[rows] for k, v in group_columns(data, by).items()}
    if not verified:
        print(f"warning: {run_dir / METRICS_FILE}: records no sha256 of its model (a run from "
              "before they were recorded): its thresholds are used unchecked", file=sys.stderr)
    configure_tensorflow()
    import keras

    model = keras.models.load_model(model_path, safe_mode=True)
    prob, _, finite = predict_rows(model, data, np.arange(len(y_all)) if rows is None else rows)
    y, p = y_all[finite], prob[finite].astype(np.float64)
    _check_scorable(data, y, len(y_all))
    info = store.open_store(data)
    extra = store.read_meta(data, [c for c in (store.META_SNR, store.META_KIND)
                                   if c in info.meta_columns])
    if rows is not None:
        extra = {k: v[rows] for k, v in extra.items()}
    snr = extra.get(store.META_SNR)
    kind = extra.get(store.META_KIND)
    scores = compute_metrics(y, p, snr=None if snr is None else snr[finite],
                             kind=None if kind is None else kind[finite])
    here = {f"fpr_{t:g}": operating_point(y, p, t) for t in TARGET_FPRS}
    # Groups are measured at the run's thresholds and at this store's own ones ("here_").
    group_thresholds = {**thresholds, **{f"here_{k}": v["threshold"] for k, v in here.items()}}
    result: dict[str, Any] = {
        "run": str(run_dir.resolve()), "data": str(data.resolve()), "n": int(len(y_all)),
        # a store the run trained on: only its held-out test rows (split.npz) are evaluated
        "held_out_only": None if rows is None else {"split": "test", "n_store": len(y_store)},
        "n_unscorable": int((~finite).sum()), "n_sources": int((y == 1).sum()),
        **{k: scores[k] for k in ("roc_auc", "accuracy", "confusion_matrix", "ece",
                                  "reliability", "roc_curve")},
        "operating_points_here": here,
        "at_run_thresholds": _at_thresholds(y, p, thresholds,
                                            None if snr is None else snr[finite]),
        "auc_by_snr": None if snr is None else _auc_by_snr(y, p, snr[finite]),
        "groups": {name: group_metrics(y, p, g[finite], group_thresholds)
                   for name, g in groups.items()},
    }
    out_dir = run_dir / EVAL_DIR / store_dir_name(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    if figures:
        _figures(out_dir, result, scores, thresholds)
    path = fileio.write_json_atomic(out_dir / EVALUATION_FILE, result)
    saved: dict[str, Any] = json.loads(path.read_text())
    return saved


def held_out_rows(run_dir: Path, data: Path, n_stamps: int) -> np.ndarray | None:
    """The rows of ``data`` in the run's test split when ``data`` is one of the stores the
    run was trained on (its ``data.json``), else None. Evaluating a training store whole
    would report AUC over stamps the model was fitted to."""
    try:
        record = json.loads((run_dir / DATA_FILE).read_text())
        stores = [(Path(s["path"]), int(s["n_stamps"])) for s in record["stores"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    here = data.resolve()
    index = [i for i, (p, _) in enumerate(stores) if p == here or (
        p.exists() and here.exists() and p.samefile(here))]
    if not index:
        return None
    i = index[0]
    if stores[i][1] != n_stamps:
        raise EvaluateError(f"{data}: run {run_dir} trained on this store when it held "
                            f"{stores[i][1]:,} stamps; it holds {n_stamps:,} now, so its "
                            "held-out rows are unknown; evaluate on another store")
    split = run_dir / SPLIT_FILE
    try:
        with np.load(split, allow_pickle=False) as npz:
            test = np.asarray(npz["test"], dtype=np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise EvaluateError(f"{split}: unreadable ({type(exc).__name__}); {data} is a training "
                            "store of the run and its held-out rows are needed") from None
    lo = sum(n for _, n in stores[:i])
    return np.sort(test[(test >= lo) & (test < lo + n_stamps)] - lo)


def _check_scorable(data: Path, y: np.ndarray, n: int) -> None:
    """Refuse a store whose classifiable stamps cannot give an evaluation, saying why."""
    from stampbatch.train.preprocess import UNUSABLE

    if len(y) == 0:
        raise EvaluateError(f"{data}: none of its {n:,} stamps can be classified ({UNUSABLE}); "
                            "nothing to evaluate")
    if len(np.unique(y)) < 2:
        raise EvaluateError(f"{data}: its {len(y):,} classifiable stamps (of {n:,}) all have "
                            f"label {int(y[0])}; evaluation needs both classes")


def _at_thresholds(y: np.ndarray, p: np.ndarray, thresholds: dict[str, float],
                   snr: np.ndarray | None) -> dict[str, Any]:
    out = {}
    pos, neg = y == 1, y == 0
    for name, thr in thresholds.items():
        row: dict[str, Any] = {"threshold": thr, "completeness": float((p[pos] >= thr).mean()),
                               "fpr": float((p[neg] >= thr).mean())}
        if snr is not None:
            s = np.asarray(snr, np.float64)
            ok = pos & np.isfinite(s)
            comp, counts = binned_completeness(s[ok], p[ok] >= thr, np.asarray(SNR_BIN_EDGES))
            row["completeness_vs_snr"] = {"bin_edges": list(SNR_BIN_EDGES),
                                          "completeness": comp, "counts": counts}
        out[name] = row
    return out


def _auc_by_snr(y: np.ndarray, p: np.ndarray, snr: np.ndarray) -> dict[str, Any]:
    """ROC AUC of the sources in each SNR bin against all the negatives."""
    from sklearn.metrics import roc_auc_score

    s = np.asarray(snr, np.float64)
    labels = bin_labels(s, SNR_BIN_EDGES)
    neg = y == 0
    out: dict[str, Any] = {}
    for name in np.unique(labels[y == 1]):
        pos = (y == 1) & (labels == name)
        sel = pos | neg
        out[str(name)] = {"n_sources": int(pos.sum()),
                          "roc_auc": float(roc_auc_score(y[sel], p[sel])) if neg.any() else None}
    return out


def _figures(out_dir: Path, result: dict[str, Any], scores: dict[str, Any],
             thresholds: dict[str, float]) -> None:
    from stampbatch.report import plots

    title = f"{Path(result['run']).name} on {Path(result['data']).name}"
    first = next(iter(result["at_run_thresholds"].values()))
    plots.plot_roc(np.asarray(scores["roc_curve"]["fpr"]), np.asarray(scores["roc_curve"]["tpr"]),
                   out_dir / "roc.png", auc=scores["roc_auc"], log_x=True,
                   operating_point=(first["fpr"], first["completeness"]), title=title)
    plots.plot_reliability(result["reliability"], out_dir / "reliability.png",
                           title=f"{title}: reliability (ECE {result['ece']:.4f})")
    plots.plot_confusion_matrix(np.asarray(scores["confusion_matrix"]),
                                out_dir / "confusion_matrix.png", title=title)
    rows = {k: v for k, v in result["at_run_thresholds"].items() if "completeness_vs_snr" in v}
    if rows:
        edges = next(iter(rows.values()))["completeness_vs_snr"]["bin_edges"]
        first_key = next(iter(rows))
        plots.plot_completeness(
            edges, rows[first_key]["completeness_vs_snr"]["completeness"],
            rows[first_key]["completeness_vs_snr"]["counts"], out_dir / "completeness_snr.png",
            extra={f"at {k} (P >= {thresholds[k]:.3g})": v["completeness_vs_snr"]["completeness"]
                   for k, v in list(rows.items())[1:]},
            title=f"{title}: completeness at the run's {first_key} threshold")


def summary_lines(result: dict[str, Any], by: Sequence[str] = ()) -> list[str]:
    """A short text summary of an evaluation (for the command line)."""
    lines = []
    if result.get("held_out_only"):
        lines.append(f"{result['data']} is a training store of this run: only its "
                     f"{result['n']:,} held-out test stamps (of "
                     f"{result['held_out_only']['n_store']:,}) are evaluated")
    lines.append(f"{result['n']:,} stamps ({result['n_sources']:,} sources), ROC AUC "
                 f"{result['roc_auc']:.4f}, ECE {result['ece']:.4f}")
    for name, row in result["at_run_thresholds"].items():
        lines.append(f"  at the run's {name} threshold P >= {row['threshold']:.4g}: completeness "
                     f"{row['completeness']:.4f}, FPR {row['fpr']:.4f}")
    for col, groups in result["groups"].items():
        if by and col not in by:
            continue
        lines.append(f"  by {col}:")
        for value, row in groups.items():
            auc = "n/a" if row["roc_auc"] is None else f"{row['roc_auc']:.4f}"
            lines.append(f"    {value:<16} n {row['n']:>7,}  AUC {auc}")
    return lines
