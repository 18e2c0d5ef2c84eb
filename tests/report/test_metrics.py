"""Metrics: every number checked against scikit-learn or its definition."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_score,
    recall_score,
    roc_auc_score,
)

from stampbatch.report.metrics import (
    bin_labels,
    compute_metrics,
    expected_calibration_error,
    group_metrics,
    operating_point,
    reliability,
)


def test_compute_metrics_against_scikit_learn():
    rng = np.random.default_rng(5)
    labels = np.r_[np.zeros(400, int), np.ones(200, int)]
    prob = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0, 1)
    snr = np.where(labels == 1, rng.uniform(3, 100, 600), 0.0)
    kind = np.where(labels == 1, "source", np.where(np.arange(600) % 2, "streak", "background"))
    m = compute_metrics(labels, prob, snr=snr, kind=kind, target_fpr=0.05)
    pred = (prob >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(labels, prob))
    assert m["precision"] == pytest.approx(precision_score(labels, pred))
    assert m["recall"] == pytest.approx(recall_score(labels, pred))
    assert m["confusion_matrix"] == confusion_matrix(labels, pred).tolist()
    op = m["operating_point"]
    neg, pos = prob[labels == 0], prob[labels == 1]
    assert op["fpr"] == pytest.approx(np.mean(neg >= op["threshold"])) and op["fpr"] <= 0.05
    assert op["completeness"] == pytest.approx(np.mean(pos >= op["threshold"]))
    # the lowest such threshold: the next lower score would exceed the target FPR
    lower = prob[prob < op["threshold"]].max()
    assert np.mean(neg >= lower) > 0.05
    cvs = m["completeness_vs_snr"]
    assert cvs["bin_edges"] == [3, 5, 7, 10, 15, 20, 30, 50, 100]
    assert sum(cvs["counts"]) == 200
    s_pos = snr[labels == 1]
    in_bin = (s_pos >= 10) & (s_pos < 15)
    assert cvs["counts"][3] == in_bin.sum()
    assert cvs["completeness"][3] == pytest.approx(np.mean(pos[in_bin] >= 0.5))
    assert cvs["completeness_at_operating_point"][3] == pytest.approx(
        np.mean(pos[in_bin] >= op["threshold"]))
    bright = s_pos >= 7
    assert cvs["above_snr"]["count"] == bright.sum()
    assert cvs["above_snr"]["completeness_at_operating_point"] == pytest.approx(
        np.mean(pos[bright] >= op["threshold"]))
    assert set(m["fpr_by_kind"]) == {"background", "streak"}
    streak = (labels == 0) & (kind == "streak")
    assert m["fpr_by_kind"]["streak"] == pytest.approx(np.mean(prob[streak] >= 0.5))
    assert m["negatives_by_kind"] == {"background": 200, "streak": 200}
    json.dumps(m, allow_nan=False)  # plain JSON


def test_compute_metrics_on_hand_made_arrays():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    prob = np.array([0.1, 0.2, 0.6, 0.3, 0.4, 0.7, 0.8, 0.9])
    snr = np.array([0, 0, 0, 0, 4.0, 4.5, 8.0, 200.0])  # 200: outside the bins
    m = compute_metrics(labels, prob, snr=snr, target_fpr=0.25)
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    assert m["accuracy"] == 0.75 and m["precision"] == 0.75 and m["recall"] == 0.75
    assert m["roc_auc"] == pytest.approx(15 / 16)  # one (neg 0.6 > pos 0.4) of 16 pairs wrong
    # lowest threshold with FPR <= 0.25: 0.4 (only the negative at 0.6 passes it)
    assert m["operating_point"] == {"target_fpr": 0.25, "threshold": 0.4, "fpr": 0.25,
                                    "completeness": 1.0}
    cvs = m["completeness_vs_snr"]
    assert cvs["counts"] == [2, 0, 1, 0, 0, 0, 0, 0]
    assert cvs["completeness"] == [0.5, None, 1.0, None, None, None, None, None]
    assert cvs["completeness_at_operating_point"][0] == 1.0
    assert "fpr_by_kind" not in m
    # a target below any achievable FPR: nothing selected, threshold above every score
    strict = operating_point(np.array([0, 1, 0]), np.array([0.9, 0.9, 0.1]), 0.1)
    assert strict["threshold"] > 0.9 and strict["fpr"] == 0 and strict["completeness"] == 0


def test_compute_metrics_refuses_one_class_and_nan():
    with pytest.raises(ValueError, match="both classes"):
        compute_metrics(np.ones(4), np.full(4, 0.7))
    with pytest.raises(ValueError, match="finite"):
        compute_metrics(np.array([0, 1]), np.array([np.nan, 0.5]))




def test_expected_calibration_error_follows_its_definition():
    rng = np.random.default_rng(3)
    p = rng.random(5000)
    y = (rng.random(5000) < p).astype(int)  # calibrated by construction
    assert expected_calibration_error(y, p) < 0.03
    # by hand: 15 equal-width bins, sum_b n_b/N |mean y - mean p|
    idx = np.minimum((p * 15).astype(int), 14)
    by_hand = sum(abs(y[idx == b].mean() - p[idx == b].mean()) * (idx == b).mean()
                  for b in range(15) if (idx == b).any())
    assert expected_calibration_error(y, p) == pytest.approx(by_hand)
    over = np.where(p > 0.5, 1.0, 0.0)  # over-confident: ECE is the mean |p - y| gap
    assert expected_calibration_error(y, over) == pytest.approx(np.mean(np.abs(over - y)))
    rel = reliability(y, p)
    assert sum(rel["counts"]) == 5000 and len(rel["bin_edges"]) == 16
    assert rel["ece"] == pytest.approx(by_hand)
    assert reliability(np.array([1, 0]), np.array([1.0, 0.0]))["ece"] == 0.0


def test_group_metrics_match_scikit_learn_per_group():
    rng = np.random.default_rng(9)
    n = 3000
    y = (rng.random(n) < 0.4).astype(int)
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)
    g = rng.choice(np.array(["science", "difference", "coadd"]), n)
    g[(g == "coadd") & (y == 1)] = "science"  # one group without sources
    thr = {"p05": 0.5, "fpr1": 0.8}
    out = group_metrics(y, p, g, thr)
    assert set(out) == {"science", "difference", "coadd"}
    for name, row in out.items():
        sel = g == name
        assert row["n"] == sel.sum() and row["n_sources"] == (y[sel] == 1).sum()
        if row["n_sources"]:
            assert row["roc_auc"] == pytest.approx(roc_auc_score(y[sel], p[sel]))
            assert row["completeness_fpr1"] == pytest.approx(
                recall_score(y[sel], (p[sel] >= 0.8).astype(int)))
        else:
            assert row["roc_auc"] is None and row["completeness_p05"] is None
        neg = sel & (y == 0)
        assert row["fpr_p05"] == pytest.approx(np.mean(p[neg] >= 0.5))


def test_bin_labels():
    v = np.array([0.5, 3.0, 4.0, 6.0, 10.0, 20.0, np.nan])
    assert bin_labels(v, [2, 4, 6, 10]).tolist() == ["<2", "2-4", "4-6", "6-10", "6-10", ">10",
                                                      "none"]


def test_thresholds_and_reliability_are_part_of_the_metrics():
    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(3000, int), np.ones(1000, int)]
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.15), 0, 1)
    m = compute_metrics(y, p)
    assert set(m["thresholds"]) == {"0.01", "0.001"}
    for key, target in (("0.01", 0.01), ("0.001", 0.001)):
        assert m["thresholds"][key] == operating_point(y, p, target)
        assert m["thresholds"][key]["fpr"] <= target
    assert m["ece"] == pytest.approx(expected_calibration_error(y, p))
