"""The arithmetic of ``benchmarks/quality_breakdown.py``: where a run's ROC AUC is lost."""

import sys
from pathlib import Path

import numpy as np
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from quality_breakdown import (  # noqa: E402
    _auc_deficit,
    faint_against_empty,
    false_positives,
    streak_crosses_centre,
)

from stampbatch.sim.profiles import render_trail  # noqa: E402


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


def test_a_streak_crosses_the_centre_where_its_light_reaches_the_centre_pixel():
    rng = np.random.default_rng(5)
    n = 3000
    dx, dy = rng.uniform(-9, 9, n), rng.uniform(-9, 9, n)
    angle, length = rng.uniform(0, np.pi, n), rng.uniform(8, 40, n)
    fwhm = rng.uniform(2, 7, n)
    cross = streak_crosses_centre(dx, dy, angle, length, fwhm)
    assert 0.05 < cross.mean() < 0.5
    trail = render_trail((21, 21), dx, dy, fwhm, length, angle)
    # the centre pixel's share of the trail's peak brightness: at least about half the
    # across-profile (FWHM/2 off the line), less a softened end, where it crosses; where
    # it does not, the centre lies beyond the line's half maximum or past its end
    centre = trail[:, 10, 10] / trail.reshape(n, -1).max(axis=1)
    assert np.quantile(centre[cross], 0.05) > 0.3
    assert np.quantile(centre[~cross], 0.95) < 0.6
    assert np.median(centre[cross]) > 3 * np.median(centre[~cross])


def test_false_positives_are_counted_by_kind_and_streaks_by_geometry():
    kinds = np.array(["background"] * 90 + ["streak"] * 6 + ["dipole"] * 4 + ["source"] * 10)
    y = (kinds == "source").astype(int)
    p = np.zeros(len(y))
    p[:90] = np.linspace(0.0, 0.5, 90)
    p[90:93] = 0.95          # three streaks crossing the centre pass
    p[93:96] = 0.1           # three elsewhere do not
    p[96:100] = [0.9, 0.92, 0.2, 0.3]
    p[100:] = np.linspace(0.6, 0.99, 10)
    meta = {"kind": kinds.astype("S"), "dx": np.zeros(len(y)), "dy": np.zeros(len(y)),
            "trail_angle": np.zeros(len(y)), "trail_length": np.full(len(y), 10.0),
            "psf_fwhm": np.full(len(y), 4.0)}
    meta["dy"][93:96] = 5.0  # parallel to the line, 5 px off it: beyond FWHM/2
    out = false_positives(y, p, meta, thr=0.85)
    assert out["false_positives"] == 5 and out["n_negatives"] == 100
    assert out["by_kind"]["streak"] == {"negatives": 6, "false_positives": 3}
    assert out["by_kind"]["dipole"] == {"negatives": 4, "false_positives": 2}
    assert out["by_kind"]["background"] == {"negatives": 90, "false_positives": 0}
    st = out["streaks"]
    assert st["crossing_centre"] == 3 and st["crossing_pass"] == 1.0 and st["other_pass"] == 0.0
    # five false positives from the backgrounds alone: a threshold inside their top five
    w = out["without_streaks_and_dipoles"]
    assert np.sum(p[:90] > w["threshold"]) in (4, 5)
    assert w["completeness"] == np.mean(p[100:] > w["threshold"])


def test_faint_sources_are_compared_with_empty_stamps_of_their_own_group():
    rng = np.random.default_rng(11)
    n = 6000
    y = (rng.random(n) < 0.5).astype(int)
    kinds = np.array(["background", "streak", "dipole"])
    kind = np.where(y == 1, "source", kinds[rng.choice(3, n, p=[0.7, 0.15, 0.15])])
    snr = np.where(y == 1, rng.uniform(3, 20, n), 0.0)
    n_field = rng.integers(0, 25, n)
    correlated = rng.random(n) < 0.3
    meta = {"kind": kind, "snr": snr, "snr_eff": np.where(correlated, 0.6, 1.0) * snr,
            "n_field": n_field, "noise_corr": np.where(correlated, 0.5, 0.0),
            "background": rng.choice(np.array(["science", "difference"]), n),
            "companion": np.where(y == 1, rng.choice(np.array(["none", "streak"]), n), "none")}
    # faint sources lost in crowding and in correlated noise; streaks score like sources
    p = 1 / (1 + np.exp(-(y * (snr / 3 - 0.15 * n_field - 1.5 * correlated)
                          + 2.0 * (kind == "streak") + rng.normal(0, 1, n))))
    out = faint_against_empty(y, p, meta)
    faint = (y == 1) & (snr >= 3) & (snr < 5)
    empty = (y == 0) & (kind == "background")

    def auc(pos, neg):
        return roc_auc_score(np.r_[np.ones(pos.sum()), np.zeros(neg.sum())], np.r_[p[pos], p[neg]])

    assert out["all"]["roc_auc"] == auc(faint, empty)          # streaks and dipoles left out
    assert out["all"]["negatives"] == int(empty.sum())
    s = (n_field >= 8) & (n_field < 13)
    assert out["by_n_field"]["8-13"]["roc_auc"] == auc(faint & s, empty & s)
    assert out["by_n_field"]["0-1"]["roc_auc"] > out["by_n_field"]["20-inf"]["roc_auc"]
    white = out["no_field_by_noise"]["white"]
    corr = out["no_field_by_noise"]["correlated"]
    assert white["roc_auc"] > corr["roc_auc"] and white["ideal_roc_auc"] > corr["ideal_roc_auc"]
    sparse = n_field == 0
    sel = faint & sparse & (meta["companion"] == "streak")
    assert out["no_field_by_companion"]["streak"]["roc_auc"] == auc(sel, empty & sparse)
    assert np.isclose(out["no_field_by_companion"]["streak"]["ideal_roc_auc"],
                      np.mean(norm.cdf(meta["snr_eff"][sel] / np.sqrt(2))))
