"""Classification metrics of P(source) against true labels, shared by train, report, evaluate.

Vocabulary: *completeness* is the fraction of true sources selected (recall, TPR); the
*false-positive rate* the fraction of stamps without a source that are selected; an
*operating point* the threshold giving a target false-positive rate on the negatives.
*Expected calibration error* (ECE): the stamps are binned by P in ``n_bins`` equal-width
bins and ``ECE = sum_b (n_b / N) |mean(y)_b - mean(P)_b|`` — 0 for perfectly calibrated
probabilities. Everything is computed with scikit-learn where it has the metric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SNR_BIN_EDGES: tuple[float, ...] = (3, 5, 7, 10, 15, 20, 30, 50, 100)
SNR_SUMMARY_MIN = 7.0
ECE_BINS = 15
TARGET_FPRS = (0.01, 0.001)  # thresholds stored with every run
MAX_GROUPS = 30  # a /meta column with more distinct values is binned or skipped


def operating_point(labels: np.ndarray, probabilities: np.ndarray, target_fpr: float
                    ) -> dict[str, float]:
    """The lowest threshold whose false-positive rate (P >= threshold) is at most target_fpr.

    Returns ``{"target_fpr", "threshold", "fpr", "completeness"}``. When even the highest
    score of a negative is shared by too many negatives, the threshold lies just above all
    scores (nothing is selected).
    """
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(labels, probabilities, drop_intermediate=False)
    i = int(np.flatnonzero(fpr <= target_fpr)[-1])
    threshold = float(thr[i])
    if not math.isfinite(threshold):
        threshold = float(np.nextafter(np.float64(np.max(probabilities)), np.inf))
    return {"target_fpr": float(target_fpr), "threshold": threshold, "fpr": float(fpr[i]),
            "completeness": float(tpr[i])}


def thin_curve(fpr: np.ndarray, tpr: np.ndarray, max_points: int = 400) -> dict[str, list[float]]:
    """An ROC curve thinned to at most ``max_points`` points (for JSON)."""
    if len(fpr) > max_points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": [round(float(v), 6) for v in fpr], "tpr": [round(float(v), 6) for v in tpr]}


def binned_completeness(snr: np.ndarray, detected: np.ndarray, edges: np.ndarray
                        ) -> tuple[list[float | None], list[int]]:
    """Fraction detected per SNR bin (the last bin closed, as np.histogram) and the counts."""
    nb = len(edges) - 1
    idx = np.searchsorted(edges, snr, side="right") - 1
    idx[snr == edges[-1]] = nb - 1
    inside = (idx >= 0) & (idx < nb)
    counts = np.bincount(idx[inside], minlength=nb)
    hits = np.bincount(idx[inside], weights=detected[inside].astype(np.float64), minlength=nb)
    completeness = [float(h / c) if c else None for h, c in zip(hits, counts, strict=True)]
    return completeness, [int(c) for c in counts]


def reliability(labels: np.ndarray, probabilities: np.ndarray, n_bins: int = ECE_BINS
                ) -> dict[str, Any]:
    """Reliability diagram data: per equal-width P bin the count, mean P and fraction of
    sources (None for empty bins), and the expected calibration error."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y, minlength=n_bins)
    nz = counts > 0
    ece = float(np.abs(sum_y[nz] - sum_p[nz]).sum() / max(len(y), 1))
    return {"bin_edges": edges.tolist(), "counts": counts.tolist(),
            "mean_probability": [float(s / c) if c else None for s, c in zip(sum_p, counts)],
            "fraction_sources": [float(s / c) if c else None for s, c in zip(sum_y, counts)],
            "ece": ece}


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray,
                               n_bins: int = ECE_BINS) -> float:
    """ECE with ``n_bins`` equal-width bins (see the module docstring)."""
    return reliability(labels, probabilities, n_bins)["ece"]


def _check(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(np.int64).ravel()
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{len(y)} labels but {len(p)} probabilities")
    if not np.isfinite(p).all():
        raise ValueError("probabilities must be finite (drop unscorable stamps first)")
    if set(np.unique(y).tolist()) != {0, 1}:
        raise ValueError("labels must hold both classes (0 and 1)")
    return y, p


def compute_metrics(labels: np.ndarray, probabilities: np.ndarray, snr: np.ndarray | None = None,
                    kind: np.ndarray | None = None, target_fpr: float = 0.01,
                    bin_edges: Sequence[float] = SNR_BIN_EDGES) -> dict[str, Any]:
    """Classification metrics of P(source) against true labels (both classes must be present).

    At threshold 0.5 (P >= 0.5 is "source"): accuracy, precision, recall, confusion matrix
    (rows = true class 0/1, columns = predicted), completeness of the sources in SNR bins
    (``snr``: per-stamp SNR, used for label-1 stamps) and the false-positive rate of each
    kind of negative (``kind``: per-stamp string, used for label-0 stamps). Threshold-free:
    ROC AUC and a thinned ROC curve. At the operating point (the threshold giving
    FPR <= ``target_fpr`` on the negatives): completeness overall and per SNR bin.
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        precision_score,
        recall_score,
        roc_auc_score,
        roc_curve,
    )

    y, p = _check(labels, probabilities)
    pred = (p >= 0.5).astype(np.int64)
    fpr, tpr, _ = roc_curve(y, p)
    op = operating_point(y, p, target_fpr)
    out: dict[str, Any] = {
        "accuracy": float(accuracy_score(y, pred)),
        "roc_auc": float(roc_auc_score(y, p)),
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
        "confusion_matrix": confusion_matrix(y, pred, labels=[0, 1]).tolist(),
        "operating_point": op,
        "roc_curve": thin_curve(fpr, tpr),
        "thresholds": {f"{t:g}": operating_point(y, p, t) for t in TARGET_FPRS},
        "reliability": reliability(y, p),
        "ece": expected_calibration_error(y, p),
    }
    if snr is not None:
        out["completeness_vs_snr"] = _completeness_vs_snr(y, p, pred, snr, op["threshold"],
                                                          bin_edges)
    if kind is not None:
        out.update(_by_kind(y, pred, kind))
    return out


def _completeness_vs_snr(y: np.ndarray, p: np.ndarray, pred: np.ndarray, snr: np.ndarray,
                         threshold: float, bin_edges: Sequence[float]) -> dict[str, Any]:
    """Completeness of the sources per SNR bin, at 0.5 and at the operating point, and
    above :data:`SNR_SUMMARY_MIN`."""
    s = np.asarray(snr, dtype=np.float64).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{len(s)} SNR values for {len(y)} stamps")
    pos = (y == 1) & np.isfinite(s)
    edges = np.asarray(bin_edges, dtype=np.float64)
    comp, counts = binned_completeness(s[pos], pred[pos] == 1, edges)
    comp_op, _ = binned_completeness(s[pos], p[pos] >= threshold, edges)
    bright = pos & (s >= SNR_SUMMARY_MIN)
    n_bright = int(bright.sum())
    return {
        "bin_edges": [float(e) for e in edges], "completeness": comp, "counts": counts,
        "threshold": 0.5, "completeness_at_operating_point": comp_op,
        "above_snr": {
            "snr_min": SNR_SUMMARY_MIN, "count": n_bright,
            "completeness": float(pred[bright].mean()) if n_bright else None,
            "completeness_at_operating_point":
                float((p[bright] >= threshold).mean()) if n_bright else None,
        },
    }


def _by_kind(y: np.ndarray, pred: np.ndarray, kind: np.ndarray) -> dict[str, Any]:
    """False-positive rate and count of each kind of negative, completeness of each kind of
    source, at threshold 0.5."""
    k = np.asarray(kind).astype(str).ravel()
    if k.shape != y.shape:
        raise ValueError(f"{len(k)} kinds for {len(y)} stamps")
    neg, pos = y == 0, y == 1
    return {
        "fpr_by_kind": {str(name): float(pred[neg & (k == name)].mean())
                        for name in np.unique(k[neg])},
        "negatives_by_kind": {str(name): int((neg & (k == name)).sum())
                              for name in np.unique(k[neg])},
        "completeness_by_kind": {str(name): float(pred[pos & (k == name)].mean())
                                 for name in np.unique(k[pos])},
    }




def group_metrics(labels: np.ndarray, probabilities: np.ndarray, groups: np.ndarray,
                  thresholds: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """Per group value: counts, ROC AUC (both classes present, else None), and at each
    named threshold the completeness of its sources and the false-positive rate of its
    negatives (None where the group has none)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).astype(np.int64).ravel()
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    g = np.asarray(groups).astype(str).ravel()
    out: dict[str, dict[str, Any]] = {}
    for value in np.unique(g):
        sel = g == value
        ys, ps = y[sel], p[sel]
        pos, neg = ys == 1, ys == 0
        row: dict[str, Any] = {"n": int(sel.sum()), "n_sources": int(pos.sum()),
                               "n_negatives": int(neg.sum()),
                               "roc_auc": float(roc_auc_score(ys, ps)) if pos.any() and neg.any()
                               else None,
                               "mean_probability": float(ps.mean())}
        for name, thr in thresholds.items():
            row[f"completeness_{name}"] = float((ps[pos] >= thr).mean()) if pos.any() else None
            row[f"fpr_{name}"] = float((ps[neg] >= thr).mean()) if neg.any() else None
        out[str(value)] = row
    return out


def bin_labels(values: np.ndarray, edges: Sequence[float], missing: str = "none") -> np.ndarray:
    """Bin a numeric column into string labels ``"lo-hi"`` (the last bin closed, values
    outside the edges ``"<lo"`` / ``">hi"``, NaN ``missing``) for :func:`group_metrics`."""
    v = np.asarray(values, dtype=np.float64).ravel()
    e = np.asarray(edges, dtype=np.float64)
    names = [f"{e[i]:g}-{e[i + 1]:g}" for i in range(len(e) - 1)]
    idx = np.searchsorted(e, v, side="right") - 1
    idx[v == e[-1]] = len(e) - 2
    out = np.full(len(v), missing, dtype=object)
    inside = (idx >= 0) & (idx < len(e) - 1) & np.isfinite(v)
    out[inside] = np.asarray(names, dtype=object)[idx[inside]]
    out[np.isfinite(v) & (v < e[0])] = f"<{e[0]:g}"
    out[np.isfinite(v) & (v > e[-1])] = f">{e[-1]:g}"
    return out.astype(str)
