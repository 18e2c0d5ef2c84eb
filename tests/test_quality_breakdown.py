"""The arithmetic of ``benchmarks/quality_breakdown.py``: where a run's ROC AUC is lost."""

import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from quality_breakdown import _auc_deficit  # noqa: E402


def test_the_auc_deficit_shares_add_up_to_one_minus_the_roc_auc():
    rng = np.random.default_rng(3)
    n = 4000
    y = (rng.random(n) < 0.5).astype(int)
    snr = np.where(y == 1, np.exp(rng.uniform(np.log(3), np.log(100), n)), 0.0)
    n_field = rng.integers(0, 30, n)
    # scores that rise with SNR and fall with crowding: continuous, so no ties
    p = 1 / (1 + np.exp(-(np.log1p(snr) - 0.05 * n_field + rng.normal(0, 1, n))))
    thr = float(np.quantile(p[y == 0], 0.99))
    out = _auc_deficit(y, p, snr, n_field, thr)
    assert abs(out["auc_deficit"] - (1 - roc_auc_score(y, p))) < 1e-12
    for table in ("auc_deficit_by_snr", "auc_deficit_by_n_field"):
        parts = out[table].values()
        assert abs(sum(r["deficit"] for r in parts) - out["auc_deficit"]) < 1e-12
        assert abs(sum(r["positives"] for r in parts) - 1.0) < 1e-12
    # faint sources lose more than bright ones, crowded stamps more than empty ones
    by_snr = out["auc_deficit_by_snr"]
    assert by_snr["3-5"]["deficit"] / by_snr["3-5"]["positives"] > \
        by_snr["50-inf"]["deficit"] / by_snr["50-inf"]["positives"]
    rows = out["by_n_field"]
    assert rows["0-1"]["roc_auc"] > rows["20-inf"]["roc_auc"]
    for lo, hi in (("0", "1"), ("8", "13")):
        s = (n_field >= int(lo)) & (n_field < int(hi))
        assert rows[f"{lo}-{hi}"]["roc_auc"] == roc_auc_score(y[s], p[s])
        assert rows[f"{lo}-{hi}"]["completeness"] == np.mean(p[s & (y == 1)] > thr)
