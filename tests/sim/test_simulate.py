"""The stamp simulator: reproducibility, class/kind mix, SNR definition, shapes, store output."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from stampbatch import store
from stampbatch.cli import main
from stampbatch.config import from_mapping, to_toml
from stampbatch.errors import SimConfigError, SimulationStopped, UsageError
from stampbatch.sim import simulate
from stampbatch.sim.simulate import SimConfig, simulate_stamps
from stampbatch.train.preprocess import normalize

CENTRE = 10  # pixel index of the centre of a 21x21 stamp
# The physics of the centre signal is checked on isolated sources (no field, no defects);
# the field, galaxies, saturation and backgrounds have their own tests below.
OLD = simulate.neighbour_free_config


@pytest.fixture(scope="module")
def batch() -> simulate.SimulatedBatch:
    """20,000 neighbour-free stamps (shared: simulating takes ~1 s)."""
    return simulate_stamps(20_000, OLD(), np.random.default_rng(123))


def _background(meta: dict[str, np.ndarray]) -> np.ndarray:
    return np.where(meta["sky_subtracted"], 0.0, meta["sky"])


def _residual(b: simulate.SimulatedBatch, sel: np.ndarray) -> np.ndarray:
    """(stamp - background level) / sigma for the selected stamps."""
    m = b.meta
    return (b.stamps[sel] - _background(m)[sel, None, None]) / m["sigma"][sel, None, None]


def _binomial_ok(count: int, n: int, p: float, z: float = 4.5) -> bool:
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


# --------------------------------------------------------------------------- config


def test_default_config_is_valid_and_round_trips_through_toml_and_json():
    cfg = SimConfig()
    cfg.validate()
    assert from_mapping(SimConfig, json.loads(cfg.to_json()), "json") == cfg
    import tomllib

    assert from_mapping(SimConfig, tomllib.loads(to_toml(cfg)), "toml") == cfg


@pytest.mark.parametrize(("changes", "words"), [
    ({"source_fraction": -0.1}, "source_fraction must lie in [0, 1]"),
    ({"moffat_fraction": 1.5}, "moffat_fraction must lie in [0, 1]"),
    ({"snr_min": 50.0, "snr_max": 10.0}, "snr_min (50.0) must not exceed snr_max (10.0)"),
    ({"snr_min": 0.0}, "snr_min must be > 0"),
    ({"offcentre_fraction": 0.5, "hot_pixel_fraction": 0.4, "streak_fraction": 0.3},
     "exceeds 1"),
    ({"fwhm_min": 7.0}, "fwhm_min (7.0) must not exceed fwhm_max (6.0)"),
    ({"moffat_beta_min": 1.0}, "moffat_beta_min must be > 1"),
    ({"sky_min": 0.0}, "sky_min must be > 0"),
    ({"n_coadd_min": 0}, "n_coadd_min must be >= 1"),
    ({"stamp_shape": (3, 21)}, "stamp_shape must be two integers >= 5"),
    ({"stamp_shape": (11, 11)}, "offcentre_min_distance = 6.0 px does not fit a 11x11 stamp"),
    ({"snr_max": float("nan")}, "snr_max must be finite"),
    ({"max_centre_offset": 7.0}, "offcentre_min_distance (6.0) must exceed max_centre_offset"),
    ({"field_margin": -1.0}, "field_margin must be >= 0"),
    ({"field_margin": 1e6}, "field_margin must be at most 1024 px"),
    ({"field_snr_max": 1e7}, "field_snr_max must be at most 1e+06"),
])
def test_bad_settings_are_refused_with_the_setting_named(changes, words):
    cfg = dataclasses.replace(SimConfig(), **changes)
    with pytest.raises(SimConfigError, match=None) as info:
        cfg.validate()
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(SimConfigError):
        simulate_stamps(10, cfg, np.random.default_rng(0))


def test_bad_settings_from_a_file_name_the_file():
    with pytest.raises(UsageError, match=r"sim.toml: snr_min \(5.0\) must not exceed"):
        from_mapping(SimConfig, {"snr_min": 5.0, "snr_max": 4.0}, "sim.toml")


# --------------------------------------------------------------------------- reproducibility


def test_same_seed_same_stamps_and_different_seed_different_stamps():
    a = simulate_stamps(500, SimConfig(), np.random.default_rng(7))
    b = simulate_stamps(500, SimConfig(), np.random.default_rng(7))
    c = simulate_stamps(500, SimConfig(), np.random.default_rng(8))
    np.testing.assert_array_equal(a.stamps, b.stamps)
    np.testing.assert_array_equal(a.labels, b.labels)
    for k in a.meta:
        np.testing.assert_array_equal(a.meta[k], b.meta[k])
    assert not np.array_equal(a.stamps, c.stamps)
    assert not np.array_equal(a.meta["snr"], c.meta["snr"])


def _read_all(path: Path) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    info = store.open_store(path)
    stamps = store.read_stamps(path)
    labels = store.read_labels(path) if info.labelled else None
    return stamps, labels, store.read_meta(path)


def test_file_contents_depend_on_seed_config_and_n_only(tmp_path, monkeypatch):
    monkeypatch.setattr(simulate, "SIM_BLOCK_ROWS", 512)  # several blocks, cheaply
    n = 1500
    a = simulate.write_simulated(tmp_path / "a.h5", n, seed=5, chunk_rows=64, workers=1,
                                 progress=False)
    b = simulate.write_simulated(tmp_path / "b.h5", n, seed=5, chunk_rows=4096, workers=3,
                                 progress=False)
    c = simulate.write_simulated(tmp_path / "c.h5", n, seed=6, progress=False)
    assert (a.chunk_rows, b.chunk_rows) == (64, n)
    sa, la, ma = _read_all(a.path)
    sb, lb, mb = _read_all(b.path)
    sc, _, _ = _read_all(c.path)
    np.testing.assert_array_equal(sa, sb)
    np.testing.assert_array_equal(la, lb)
    assert sorted(ma) == sorted(mb)
    for k in ma:
        np.testing.assert_array_equal(ma[k], mb[k])
    assert not np.array_equal(sa, sc)
    # Block b of the file is simulate_stamps with the block's own generator.
    second = simulate_stamps(512, SimConfig(), simulate.block_rng(5, 1))
    np.testing.assert_array_equal(sa[512:1024], second.stamps)
    np.testing.assert_array_equal(la[512:1024], second.labels)
    # Blocks are independent streams: no two blocks repeat the same noise.
    assert not np.array_equal(sa[:512], sa[512:1024])


# --------------------------------------------------------------------------- classes and kinds


def test_labels_kinds_and_configured_fractions(batch):
    m, n = batch.meta, len(batch)
    cfg = OLD()
    assert batch.stamps.shape == (n, 21, 21) and batch.stamps.dtype == np.float32
    assert batch.labels.dtype == np.int8 and set(np.unique(batch.labels)) == {0, 1}
    np.testing.assert_array_equal(batch.labels == 1, m["kind"] == "source")
    assert set(np.unique(m["kind"])) == set(simulate.KINDS) - {"dipole"}
    n_pos = int(batch.labels.sum())
    assert _binomial_ok(n_pos, n, cfg.source_fraction)
    n_neg = n - n_pos
    expected = {"offcentre": cfg.offcentre_fraction, "hot_pixel": cfg.hot_pixel_fraction,
                "cosmic_ray": cfg.cosmic_ray_fraction, "streak": cfg.streak_fraction}
    expected["background"] = 1.0 - sum(expected.values())
    for kind, p in expected.items():
        assert _binomial_ok(int((m["kind"] == kind).sum()), n_neg, p), kind
    assert _binomial_ok(int(m["sky_subtracted"].sum()), n, cfg.sky_subtracted_fraction)
    assert _binomial_ok(int((m["noise_corr"] > 0).sum()), n, cfg.correlated_noise_fraction)
    assert _binomial_ok(int(np.isfinite(m["psf_beta"]).sum()), n, cfg.moffat_fraction)
    for name, col in m.items():
        assert col.shape == (n,), name


def test_fractions_follow_the_config():
    cfg = OLD(source_fraction=0.2, offcentre_fraction=0.0, hot_pixel_fraction=1.0,
                    cosmic_ray_fraction=0.0, streak_fraction=0.0)
    b = simulate_stamps(4000, cfg, np.random.default_rng(1))
    assert _binomial_ok(int(b.labels.sum()), 4000, 0.2)
    assert set(np.unique(b.meta["kind"])) == {"source", "hot_pixel"}
    none = simulate_stamps(300, OLD(source_fraction=0.0), np.random.default_rng(2))
    assert none.labels.sum() == 0 and "source" not in set(none.meta["kind"])


def test_snr_is_log_uniform_over_the_range_and_zero_for_background(batch):
    m = batch.meta
    bg = m["kind"] == "background"
    np.testing.assert_array_equal(m["snr"][bg], 0.0)
    np.testing.assert_array_equal(m["flux"][bg], 0.0)
    assert np.isnan(m["dx"][bg]).all() and np.isnan(m["dy"][bg]).all()
    snr = m["snr"][~bg].astype(np.float64)
    assert snr.min() >= 3.0 and snr.max() <= 100.0
    u = (np.log(snr) - np.log(3.0)) / (np.log(100.0) - np.log(3.0))  # uniform on [0, 1]
    assert abs(u.mean() - 0.5) < 0.015
    np.testing.assert_allclose(np.quantile(u, [0.1, 0.25, 0.5, 0.75, 0.9]),
                               [0.1, 0.25, 0.5, 0.75, 0.9], atol=0.02)
    assert (snr < 5).mean() > 0.1  # faint ones are really there, not just bright ones


def test_fwhm_and_beta_ranges(batch):
    m = batch.meta
    assert m["psf_fwhm"].min() >= 2.0 and m["psf_fwhm"].max() <= 6.0
    assert m["psf_fwhm"].min() < 2.1 and m["psf_fwhm"].max() > 5.9
    beta = m["psf_beta"][np.isfinite(m["psf_beta"])]
    assert beta.min() >= 2.5 and beta.max() <= 5.0


# --------------------------------------------------------------------------- SNR definition


def _shapes(b: simulate.SimulatedBatch, sel: np.ndarray) -> np.ndarray:
    """The unit-flux shape of each selected stamp's injected signal, re-rendered from meta."""
    m = b.meta
    kinds = m["kind"][sel]
    out = np.zeros((int(sel.sum()), 21, 21), np.float32)
    psf = np.isin(kinds, ("source", "offcentre"))
    out[psf] = simulate.render_psf((21, 21), m["dx"][sel][psf], m["dy"][sel][psf],
                                   m["psf_fwhm"][sel][psf], m["psf_beta"][sel][psf],
                                   m["psf_e"][sel][psf], m["psf_pa"][sel][psf])
    st = kinds == "streak"
    out[st] = simulate.render_trail((21, 21), m["dx"][sel][st], m["dy"][sel][st],
                                    m["psf_fwhm"][sel][st], m["trail_length"][sel][st],
                                    m["trail_angle"][sel][st].astype(np.float64))
    hot = np.flatnonzero(kinds == "hot_pixel")
    rows = np.rint(m["dy"][sel][hot]).astype(int) + CENTRE
    cols = np.rint(m["dx"][sel][hot]).astype(int) + CENTRE
    out[hot, rows, cols] = 1.0
    return out


def test_matched_filter_snr_equals_the_stored_snr_white_noise():
    """With white noise and no source shot noise the filter statistic is N(snr, 1)."""
    cfg = OLD(source_fraction=0.5, correlated_noise_fraction=0.0, source_shot_noise=False,
                    offcentre_fraction=0.3, hot_pixel_fraction=0.3, cosmic_ray_fraction=0.0,
                    streak_fraction=0.4)
    b = simulate_stamps(8000, cfg, np.random.default_rng(11))
    m = b.meta
    for kind in ("source", "offcentre", "hot_pixel", "streak"):
        sel = m["kind"] == kind
        z = simulate.matched_filter_snr(b.stamps[sel], _shapes(b, sel), m["sigma"][sel],
                                        _background(m)[sel])
        d = z - m["snr"][sel]
        k = int(sel.sum())
        assert abs(d.mean()) < 4.0 / math.sqrt(k), (kind, d.mean())
        assert abs(d.std() - 1.0) < 0.08, (kind, d.std())
        np.testing.assert_array_equal(m["snr_eff"][sel], m["snr"][sel])


def test_matched_filter_snr_with_every_effect_on(batch):
    """Default settings (shot noise, correlated noise): the mean response still equals snr."""
    m = batch.meta
    sel = m["kind"] == "source"
    z = simulate.matched_filter_snr(batch.stamps[sel], _shapes(batch, sel), m["sigma"][sel],
                                    _background(m)[sel])
    assert abs(z.mean() / m["snr"][sel].mean() - 1.0) < 0.01
    for lo, hi in ((3, 6), (6, 20), (20, 100)):  # and within each SNR range
        r = sel[sel] & (m["snr"][sel] >= lo) & (m["snr"][sel] < hi)
        assert abs(z[r].mean() / m["snr"][sel][r].mean() - 1.0) < 0.03, (lo, hi)


def test_snr_eff_is_the_significance_against_correlated_noise():
    cfg = OLD(source_fraction=1.0, correlated_noise_fraction=1.0, source_shot_noise=False)
    b = simulate_stamps(6000, cfg, np.random.default_rng(12))
    m = b.meta
    sel = np.ones(len(b), bool)
    z = simulate.matched_filter_snr(b.stamps, _shapes(b, sel), m["sigma"], _background(m))
    ratio = m["snr_eff"] / m["snr"]
    assert ratio.max() < 0.95 and ratio.min() > 0.4  # correlation costs significance
    z_true = z * ratio  # the statistic in units of its real noise
    assert abs((z_true - m["snr_eff"]).mean()) < 0.06
    assert abs((z_true - m["snr_eff"]).std() - 1.0) < 0.05


# --------------------------------------------------------------------------- noise


def test_background_noise_level_sky_and_correlation(batch):
    m = batch.meta
    bg = m["kind"] == "background"
    for corr in (True, False):  # per-pixel sigma as stored, white or correlated
        res = _residual(batch, bg & ((m["noise_corr"] > 0) == corr))
        assert abs(res.mean()) < 0.01 and abs(res.std() - 1.0) < 0.01, corr
    sub = bg & m["sky_subtracted"]
    assert abs(batch.stamps[sub].mean() / m["sigma"][sub].mean()) < 0.05  # sky removed
    kept = bg & ~m["sky_subtracted"]
    np.testing.assert_allclose(batch.stamps[kept].mean(axis=(1, 2)), m["sky"][kept],
                               atol=float(4 * m["sigma"][kept].max() / 21))
    sky_exp = m["sky"] / m["n_coadd"]
    np.testing.assert_allclose(m["sigma"] ** 2, m["n_coadd"] * (sky_exp + m["read_noise"] ** 2),
                               rtol=1e-4)
    # Neighbouring pixels correlate by 2c/(1+2c^2) on resampled stamps, not at all otherwise.
    for corr in (True, False):
        sel = bg & ((m["noise_corr"] > 0) == corr)
        r = _residual(batch, sel)
        measured = (r[:, :, 1:] * r[:, :, :-1]).mean()
        c = m["noise_corr"][sel].astype(np.float64)
        expected = (2 * c / (1 + 2 * c**2)).mean()
        assert abs(measured - expected) < 0.02, (corr, measured, expected)


def test_source_shot_noise_adds_the_signal_to_the_variance():
    """At the peak pixel of identical bright sources the variance is sigma^2 + signal."""
    fixed = dict(source_fraction=1.0, snr_min=100.0, snr_max=100.0, fwhm_min=2.0,
                 fwhm_max=2.0, moffat_fraction=0.0, max_centre_offset=0.0, sky_min=50.0,
                 sky_max=50.0, read_noise_min=3.0, read_noise_max=3.0, n_coadd_min=4,
                 n_coadd_max=4, correlated_noise_fraction=0.0, sky_subtracted_fraction=1.0)
    for shot in (True, False):
        b = simulate_stamps(4000, OLD(source_shot_noise=shot, **fixed),
                            np.random.default_rng(5))
        peak = b.stamps[:, CENTRE, CENTRE].astype(np.float64)
        sigma, signal = float(b.meta["sigma"][0]), peak.mean()
        expected = math.sqrt(sigma**2 + signal) if shot else sigma
        assert signal > 3 * sigma**2  # the shot noise dominates there
        assert abs(peak.std() / expected - 1.0) < 0.05, shot


# --------------------------------------------------------------------------- geometry


def test_positives_are_centred_and_peak_at_the_centre(batch):
    m = batch.meta
    pos = m["kind"] == "source"
    assert np.hypot(m["dx"][pos], m["dy"][pos]).max() <= 0.5 + 1e-6
    bright = pos & (m["snr"] > 30) & (m["psf_fwhm"] < 4)
    res = _residual(batch, bright)
    peak = res.reshape(len(res), -1).argmax(axis=1)
    rows, cols = np.divmod(peak, 21)
    assert np.abs(rows - CENTRE).max() <= 1 and np.abs(cols - CENTRE).max() <= 1
    assert (rows == CENTRE).mean() > 0.7 and (cols == CENTRE).mean() > 0.7


def test_offcentre_negatives_are_far_from_the_centre(batch):
    m = batch.meta
    off = m["kind"] == "offcentre"
    r = np.hypot(m["dx"][off], m["dy"][off])
    assert r.min() > 6.0 and r.max() <= math.hypot(10.5, 10.5)
    assert (np.abs(m["dx"][off]) <= 10.5).all() and (np.abs(m["dy"][off]) <= 10.5).all()
    bright = off & (m["snr"] > 40)
    res = _residual(batch, bright)
    rows, cols = np.divmod(res.reshape(len(res), -1).argmax(axis=1), 21)
    assert (np.hypot(rows - CENTRE, cols - CENTRE) > 5.0).all()


def test_hot_pixels_are_single_pixels(batch):
    m = batch.meta
    hot = (m["kind"] == "hot_pixel") & (m["snr"] > 20)
    res = _residual(batch, hot)
    flat = res.reshape(len(res), -1)
    above = flat > m["snr"][hot, None] / 2
    assert (above.sum(axis=1) == 1).all()
    rows, cols = np.divmod(flat.argmax(axis=1), 21)
    np.testing.assert_array_equal(cols - CENTRE, m["dx"][hot].astype(int))
    np.testing.assert_array_equal(rows - CENTRE, m["dy"][hot].astype(int))
    assert np.abs(m["dx"][hot]).max() <= 3 and np.abs(m["dy"][hot]).max() <= 3
    # The rest of the stamp is plain noise: no PSF wings around the spike.
    flat[np.arange(len(flat)), flat.argmax(axis=1)] = 0.0
    assert np.abs(flat).max() < 6.5


def test_cosmic_rays_are_short_sharp_tracks(batch):
    m = batch.meta
    cr = (m["kind"] == "cosmic_ray") & (m["snr"] > 40)
    res = _residual(batch, cr)
    hits = res > 8.0
    counts = hits.sum(axis=(1, 2))
    assert counts.min() >= 1 and counts.max() <= 3
    assert (counts > 1).any() and (counts == 1).any()
    for stamp_hits in hits[counts > 1]:  # a straight, connected track
        r, c = np.nonzero(stamp_hits)
        assert max(np.ptp(r), np.ptp(c)) == len(r) - 1
    away = ~hits
    for _ in range(2):  # pixels two steps from any track pixel hold plain noise
        grown = hits.copy()
        grown[:, 1:] |= hits[:, :-1]
        grown[:, :-1] |= hits[:, 1:]
        grown[:, :, 1:] |= hits[:, :, :-1]
        grown[:, :, :-1] |= hits[:, :, 1:]
        hits = grown
    assert np.abs(res[~hits & away]).max() < 6.5


def test_streaks_are_trailed_and_not_centred(batch):
    m = batch.meta
    st = m["kind"] == "streak"
    assert np.hypot(m["dx"][st], m["dy"][st]).min() >= 3.0
    assert m["trail_length"][st].min() >= 8 and m["trail_length"][st].max() <= 40
    assert (m["trail_length"][~st] == 0).all() and np.isnan(m["trail_angle"][~st]).all()
    # A rendered trail is elongated along its angle, with unit flux when it fits the stamp.
    t = simulate.render_trail((81, 81), np.array([0.0]), np.array([0.0]), np.array([3.0]),
                              np.array([20.0]), np.array([np.pi / 2]))[0]
    assert abs(t.sum() - 1.0) < 1e-3
    yy, xx = np.mgrid[-40:41, -40:41]
    var_y, var_x = (t * yy**2).sum(), (t * xx**2).sum()
    sigma2 = (3.0 / 2.3548) ** 2 + 1 / 12
    assert abs(var_y - (20.0**2 / 12 + sigma2)) < 0.05 and abs(var_x - sigma2) < 0.05


def _moments(img: np.ndarray) -> tuple[float, float, float, float]:
    """Unweighted flux, ellipticity (a-b)/(a+b), position angle and sqrt(lambda1 lambda2) of
    the second moments (the pixel's 1/12 px^2 taken out)."""
    h, w = img.shape
    yy, xx = np.mgrid[:h, :w] - np.array([(h - 1) / 2, (w - 1) / 2])[:, None, None]
    f = img.astype(np.float64)
    flux = f.sum()
    mx, my = (f * xx).sum() / flux, (f * yy).sum() / flux
    qxx = (f * (xx - mx) ** 2).sum() / flux - 1 / 12
    qyy = (f * (yy - my) ** 2).sum() / flux - 1 / 12
    qxy = (f * (xx - mx) * (yy - my)).sum() / flux
    half, diff = (qxx + qyy) / 2, math.hypot((qxx - qyy) / 2, qxy)
    a, b = math.sqrt(half + diff), math.sqrt(half - diff)
    return flux, (a - b) / (a + b), 0.5 * math.atan2(2 * qxy, qxx - qyy), a * b


@pytest.mark.parametrize("beta", [np.nan, 4.0])
@pytest.mark.parametrize(("ellip", "pa"), [(0.05, 0.3), (0.15, 2.0), (0.3, -0.7)])
def test_elliptical_psf_has_the_asked_ellipticity_angle_and_area(beta, ellip, pa):
    """Second moments of an elliptical PSF: (a-b)/(a+b) and the major axis's angle as asked,
    unit flux, and the same area (sqrt of the moments' determinant) as the round PSF of
    that FWHM — the FWHM is the axes' geometric mean."""
    shape = (151, 151)
    one = np.array
    img = simulate.render_psf(shape, one([0.3]), one([-0.2]), one([4.0]), one([beta]),
                              one([ellip]), one([pa]))[0]
    flux, e, angle, area = _moments(img)
    round_flux, _, _, round_area = _moments(
        simulate.render_psf(shape, one([0.3]), one([-0.2]), one([4.0]), one([beta]))[0])
    assert flux == pytest.approx(round_flux, abs=2e-4)
    assert e == pytest.approx(ellip, rel=0.02)
    assert math.remainder(angle - pa, math.pi) == pytest.approx(0.0, abs=0.01)
    assert area == pytest.approx(round_area, rel=0.01)
    # nearly round: the same pixels as the exact round renderer (2x2 Gauss-Legendre there)
    tiny = simulate.render_psf((21, 21), one([0.0]), one([0.0]), one([2.5]), one([beta]),
                               one([1e-9]), one([pa]))[0]
    exact = simulate.render_psf((21, 21), one([0.0]), one([0.0]), one([2.5]), one([beta]))[0]
    assert np.abs(tiny - exact).max() < 2e-3 * exact.max()


def test_galaxies_and_every_source_of_a_stamp_share_its_elliptical_psf():
    """A round galaxy convolved with an elliptical PSF comes out elongated along the PSF's
    axis with its flux kept; the simulator records psf_e in [0, max] uniformly and every
    stamp of a round-PSF config (the neighbour-free one) has psf_e = 0."""
    from stampbatch.sim.profiles import render_sersic

    g = render_sersic((61, 61), [0.0], [0.0], [1.0], [1.0], [1.0], [0.0], [3.0], [np.nan],
                      [0.2], [1.1])[0]
    flux, e, angle, _ = _moments(g)
    assert flux == pytest.approx(1.0, abs=2e-3)
    assert 0.05 < e < 0.2 and math.remainder(angle - 1.1, math.pi) == pytest.approx(0, abs=0.02)
    m = simulate_stamps(4000, SimConfig(psf_ellipticity_max=0.2), np.random.default_rng(3)).meta
    assert m["psf_e"].min() >= 0 and m["psf_e"].max() <= 0.2
    assert abs(np.median(m["psf_e"]) - 0.1) < 0.01
    assert (simulate_stamps(200, simulate.neighbour_free_config(),
                            np.random.default_rng(3)).meta["psf_e"] == 0).all()
    with pytest.raises(simulate.SimConfigError, match="psf_ellipticity_max"):
        SimConfig(psf_ellipticity_max=0.6).validate()


@pytest.mark.parametrize("beta", [np.nan, 2.5, 4.0])
def test_render_psf_flux_centre_and_fwhm(beta):
    shape = (101, 101)
    psf = simulate.render_psf(shape, np.array([0.3, 0.0]), np.array([-0.2, 0.0]),
                              np.array([3.0, 10.0]), np.array([beta, beta]))
    assert psf.dtype == np.float32 and psf.shape == (2, *shape)
    yy, xx = np.mgrid[-50:51, -50:51]
    if np.isnan(beta):
        assert abs(psf[0].sum() - 1.0) < 1e-5
    else:  # the Moffat wings beyond the stamp carry (1 + R^2/alpha^2)^(1-beta) of the flux
        alpha = 3.0 / (2 * math.sqrt(2 ** (1 / beta) - 1))
        lost = (1 + 50.0**2 / alpha**2) ** (1 - beta)
        assert abs(psf[0].sum() - 1.0) < lost + 2e-3
    core = np.hypot(xx, yy) < 8
    cx = (psf[0] * xx * core).sum() / (psf[0] * core).sum()
    cy = (psf[0] * yy * core).sum() / (psf[0] * core).sum()
    assert abs(cx - 0.3) < 0.02 and abs(cy + 0.2) < 0.02
    # Half maximum of the wide (10 px) PSF along its central row, linearly interpolated.
    row = psf[1, 50].astype(np.float64)
    half = row.max() / 2
    right = np.flatnonzero(row[50:] < half)[0] + 50
    x_half = (right - 1) + (row[right - 1] - half) / (row[right - 1] - row[right])
    assert abs(2 * (x_half - 50) - 10.0) < 0.15


def test_high_snr_classes_separate_on_a_central_statistic(batch):
    """Sanity without a network: centred sources above SNR 20 stand out after normalisation."""
    m = batch.meta
    norm = normalize(batch.stamps)
    central = norm[:, CENTRE - 1:CENTRE + 2, CENTRE - 1:CENTRE + 2].sum(axis=(1, 2))
    src = central[(m["kind"] == "source") & (m["snr"] > 20)]
    bkg = central[m["kind"] == "background"]
    auc = (src[:, None] > bkg[None, :]).mean()
    assert auc > 0.99
    assert np.median(src) > 3 * np.median(bkg)


# --------------------------------------------------------------------------- store output


def test_write_simulated_makes_a_valid_labelled_store(tmp_path):
    cfg = SimConfig(snr_min=5.0, fwhm_max=4.0)
    info = simulate.write_simulated(tmp_path / "sim.h5", 700, config=cfg, seed=3,
                                    chunk_rows=256, progress=False)
    info = store.open_store(info.path, check_labels_values=True)
    assert info.n_stamps == 700 and info.labelled and info.stamp_shape == (21, 21)
    assert info.chunk_rows == 256
    assert {"snr", "snr_eff", "kind", "psf_fwhm", "dx", "dy", "sky", "sigma"} <= set(
        info.meta_columns)
    assert "true_label" not in info.meta_columns
    meta = store.read_meta(info.path)
    labels = store.read_labels(info.path)
    np.testing.assert_array_equal(labels == 1, meta["kind"] == "source")
    assert meta["snr"][meta["snr"] > 0].min() >= 5.0
    attrs = store.read_attrs(info.path)
    assert attrs["seed"] == 3
    assert from_mapping(SimConfig, json.loads(attrs["simulator_config"])) == cfg
    # Same stamps as simulating in memory with the first block's generator.
    mem = simulate_stamps(700, cfg, simulate.block_rng(3, 0))
    np.testing.assert_array_equal(store.read_stamps(info.path), mem.stamps)


def test_candidates_file_has_no_labels_and_keeps_the_truth(tmp_path):
    lab = simulate.write_simulated(tmp_path / "l.h5", 400, seed=9, progress=False)
    cand = simulate.write_simulated(tmp_path / "c.h5", 400, seed=9, candidates=True,
                                    progress=False)
    assert not cand.labelled and "true_label" in cand.meta_columns
    with pytest.raises(store.StoreError, match="has no /labels"):
        store.read_labels(cand.path)
    meta = store.read_meta(cand.path)
    np.testing.assert_array_equal(meta["true_label"], store.read_labels(lab.path))
    assert meta["true_label"].dtype == np.int8
    np.testing.assert_array_equal(store.read_stamps(cand.path), store.read_stamps(lab.path))
    np.testing.assert_array_equal(meta["kind"], store.read_meta(lab.path, ["kind"])["kind"])


def test_existing_file_is_refused_unless_overwrite(tmp_path):
    path = tmp_path / "sim.h5"
    simulate.write_simulated(path, 50, seed=1, progress=False)
    before = store.read_stamps(path)
    with pytest.raises(store.StoreError, match="already exists"):
        simulate.write_simulated(path, 60, seed=2, progress=False)
    np.testing.assert_array_equal(store.read_stamps(path), before)
    info = simulate.write_simulated(path, 60, seed=2, overwrite=True, progress=False)
    assert info.n_stamps == 60


def test_bad_arguments_write_nothing(tmp_path):
    path = tmp_path / "sim.h5"
    with pytest.raises(SimConfigError, match=r"sim.h5: simulator settings: snr_min"):
        simulate.write_simulated(path, 10, config=SimConfig(snr_min=-1.0), progress=False)
    with pytest.raises(SimConfigError, match="number of stamps must be positive"):
        simulate.write_simulated(path, 0, progress=False)
    with pytest.raises(SimConfigError, match="seed must be >= 0"):
        simulate.write_simulated(path, 10, seed=-4, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failure_midway_leaves_no_file(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(simulate, "SIM_BLOCK_ROWS", 100)
    real = simulate.simulate_stamps
    calls = itertools.count()  # next() is atomic: safe from the simulation threads

    def failing(n, config, rng, **options):
        if next(calls) == 3:
            raise MemoryError("simulated failure in block 3")
        return real(n, config, rng, **options)

    monkeypatch.setattr(simulate, "simulate_stamps", failing)
    with pytest.raises(MemoryError, match="block 3"):
        simulate.write_simulated(tmp_path / "sim.h5", 1000, progress=False, workers=workers)
    assert list(tmp_path.iterdir()) == []


class _WatchedStop(threading.Event):
    """A stop event that notes, in the simulating thread's CPU time, each look at it."""

    def __init__(self) -> None:
        super().__init__()
        self.looks: list[float] = []

    def is_set(self) -> bool:
        self.looks.append(time.thread_time())
        return super().is_set()


def test_a_simulation_looks_for_a_stop_often_and_ends_once_it_is_set():
    """iter_blocks, closed early (an error, SIGTERM, Ctrl-C), sets ``stop`` for its blocks in
    flight rather than waiting for them (tests/test_cli_process.py times that): the default
    simulator, galaxies' FFTs included, must look at it every few percent of a block's work.
    Half a block (~6 CPU-s, up to 25 s of wall time on 2 busy cores): fewer stamps have too
    few pieces for a gap to be a small share of the whole."""
    simulate_stamps(64, SimConfig(), np.random.default_rng(3))  # the first use's imports
    stop = _WatchedStop()
    start = time.thread_time()
    simulate_stamps(8192, SimConfig(), np.random.default_rng(3), stop=stop)
    gaps = np.diff([start, *stop.looks, time.thread_time()])
    assert len(stop.looks) > 20 and gaps.max() < 0.1 * gaps.sum(), (len(gaps), gaps.max(), gaps.sum())
    stop.set()
    looked = len(stop.looks)
    with pytest.raises(SimulationStopped):
        simulate_stamps(8192, SimConfig(), np.random.default_rng(3), stop=stop)
    assert len(stop.looks) == looked + 1  # at its first look, before the first render


def test_progress_line_on_stderr(tmp_path, capsys):
    simulate.write_simulated(tmp_path / "p.h5", 100, progress=True)
    err = capsys.readouterr().err
    assert "simulate: 100/100 stamps (100.0%)" in err


# --------------------------------------------------------------------------- command line


def test_cli_simulate_and_inspect(tmp_path, capsys):
    out = tmp_path / "train.h5"
    assert main(["simulate", str(out), "--n", "600", "--seed", "4", "--quiet",
                 "--chunk-rows", "128"]) == 0
    assert f"wrote 600 labelled stamps to {out}" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "600 stamps of 21x21, chunks of 128" in text
    labels = store.read_labels(out)
    assert f"labels: {int(labels.sum())} source / {int((labels == 0).sum())} no source" in text
    assert "SNR of sources: 3." in text and "kinds: background" in text and "streak" in text

    cand = tmp_path / "cand.h5"
    cfg = tmp_path / "sim.toml"
    cfg.write_text("source_fraction = 0.1\nsnr_min = 10.0\n")
    assert main(["simulate", str(cand), "--n", "300", "--candidates", "--config", str(cfg),
                 "--quiet"]) == 0
    assert "wrote 300 candidate stamps" in capsys.readouterr().out
    assert main(["inspect", str(cand)]) == 0
    assert "unlabelled (candidate file)" in capsys.readouterr().out
    attrs = store.read_attrs(cand)
    assert json.loads(attrs["simulator_config"])["snr_min"] == 10.0


def test_cli_errors(tmp_path, capsys):
    out = tmp_path / "x.h5"
    cfg = tmp_path / "bad.toml"
    cfg.write_text("snr_min = 50.0\nsnr_max = 10.0\n")
    assert main(["simulate", str(out), "--n", "10", "--config", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and "snr_min (50.0) must not exceed snr_max (10.0)" in err
    cfg.write_text("snr_minimum = 5.0\n")
    assert main(["simulate", str(out), "--n", "10", "--config", str(cfg), "--quiet"]) == 2
    assert "unknown option(s) ['snr_minimum']" in capsys.readouterr().err
    assert not out.exists()
    assert main(["simulate", str(out), "--n", "10", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["simulate", str(out), "--n", "10", "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err


# --------------------------------------------------------------------------- the field


def _field_config(**changes) -> SimConfig:
    """Point-source fields only (cheap), fixed PSF so the exclusion radius is fixed."""
    base = dict(field_galaxy_fraction=0.0, field_margin=0.0, centre_galaxy_fraction=0.0,
                centre_saturated_fraction=0.0, fwhm_min=2.0, fwhm_max=2.0,
                field_density_min=1.0, field_density_max=1.0, field_density_fwhm=2.0)
    return dataclasses.replace(SimConfig(), **{**base, **changes})


@pytest.fixture(scope="module")
def crowded() -> simulate.SimulatedBatch:
    """20,000 stamps in fields of 1 source per 100 px^2 beyond 3 px."""
    return simulate_stamps(20_000, _field_config(), np.random.default_rng(31))


def test_neighbour_counts_are_poisson_for_the_configured_density(crowded):
    from scipy.stats import poisson

    m, n = crowded.meta, len(crowded)
    lam = 1.0 / 100.0 * (21 * 21 - math.pi * 3.0**2)  # density x area outside the 3 px disc
    counts = m["n_field"].astype(np.int64)
    assert abs(counts.sum() - n * lam) < 3 * math.sqrt(n * lam)
    for k in range(10):  # the whole distribution, bin by bin
        p = poisson.pmf(k, lam)
        assert abs((counts == k).sum() - n * p) < 3 * math.sqrt(n * p * (1 - p)) + 1, k
    np.testing.assert_allclose(m["field_density"], 1.0)
    # Both classes alike: the count does not depend on the label.
    for label in (0, 1):
        sel = crowded.labels == label
        assert abs(counts[sel].mean() - lam) < 3 * math.sqrt(lam / sel.sum())


def test_nearest_neighbour_distances_follow_the_poisson_law(crowded):
    m, n = crowded.meta, len(crowded)
    d = m["nn_distance"].astype(np.float64)
    assert np.nanmin(d) >= 3.0 - 1e-5  # never inside the exclusion disc (nor the centre's)
    for r in (3.5, 4.0, 5.0, 6.0, 8.0, 10.0):  # P(d <= r) = 1 - exp(-rho pi (r^2 - r_min^2))
        p = 1.0 - math.exp(-0.01 * math.pi * (r**2 - 9.0))
        hits = int((d <= r).sum())  # NaN (no neighbour) counts as farther
        assert abs(hits - n * p) < 3 * math.sqrt(n * p * (1 - p)) + 1, (r, hits / n, p)
    has = np.isfinite(d)
    assert (m["nn_snr"][has] >= 2.0).all() and np.isnan(m["nn_snr"][~has]).all()


def test_exclusion_radius_grows_with_the_psf_and_density_varies_per_stamp():
    cfg = _field_config(fwhm_min=2.0, fwhm_max=6.0, field_density_min=0.1, field_density_max=3.0,
                        field_density_fwhm=4.0)
    b = simulate_stamps(4000, cfg, np.random.default_rng(4))
    m = b.meta
    r_min = np.maximum(3.0, m["psf_fwhm"])
    has = np.isfinite(m["nn_distance"])
    assert (m["nn_distance"][has] >= r_min[has] - 1e-4).all()
    rho = m["field_density"].astype(np.float64)
    # the density drawn for the sky at the reference FWHM, seen through the stamp's PSF
    sky = rho * (m["psf_fwhm"].astype(np.float64) / 4.0) ** 0.6
    assert sky.min() >= 0.1 * (1 - 1e-5) and sky.max() <= 3.0 * (1 + 1e-5)
    # log-uniform: the median is the geometric mean of the range
    assert abs(np.median(sky) / math.sqrt(0.3) - 1.0) < 0.1
    lam = rho / 100.0 * (441 - math.pi * r_min**2)
    assert abs(m["n_field"].sum() - lam.sum()) < 3 * math.sqrt(lam.sum())


def test_fewer_field_sources_reach_the_snr_floor_through_a_wider_psf():
    """One sky (1 source per 100 px^2 above SNR 2 at FWHM 4 px) seen with a 2 px and a 6 px
    PSF: the counts above the floor scale as FWHM^-slope (a source's background-limited SNR
    falls as 1/FWHM), Poisson within 3 sigma over 20,000 stamps each."""
    counts = {}
    for f in (2.0, 6.0):
        cfg = _field_config(fwhm_min=f, fwhm_max=f, field_density_fwhm=4.0,
                            field_min_distance=6.0, field_count_slope=0.6)
        m = simulate_stamps(20_000, cfg, np.random.default_rng(int(f))).meta
        lam = (f / 4.0) ** -0.6 / 100.0 * (441 - math.pi * 6.0**2)
        np.testing.assert_allclose(m["field_density"], (f / 4.0) ** -0.6, rtol=1e-6)
        counts[f] = m["n_field"].astype(np.int64)
        assert abs(counts[f].sum() - 20_000 * lam) < 3 * math.sqrt(20_000 * lam), f
    assert counts[2.0].mean() / counts[6.0].mean() == pytest.approx(3.0 ** 0.6, rel=0.05)
    # the reference at 0: the density is the sky's at every FWHM, as in earlier releases
    flat = simulate_stamps(2000, _field_config(fwhm_min=6.0, fwhm_max=6.0,
                                               field_density_fwhm=0.0),
                           np.random.default_rng(1)).meta
    np.testing.assert_allclose(flat["field_density"], 1.0)


@pytest.mark.parametrize("slope", [0.6, 1.0])
def test_number_count_slope_is_recovered(slope):
    from stampbatch.sim.field import draw_field

    rng = np.random.default_rng(8)
    fs = draw_field(rng, np.full(20_000, 1.0), np.full(20_000, 3.0), (21, 21), 2.0, 1e12, slope)
    s = fs.snr
    alpha = len(s) / np.log(s / 2.0).sum()  # maximum likelihood for N(>S) ∝ S^-alpha
    assert abs(alpha - slope) < 3 * alpha / math.sqrt(len(s)), alpha
    # truncated: every value inside [lo, hi], and log N(>S) against log S has that slope
    t = draw_field(rng, np.full(20_000, 1.0), np.full(20_000, 3.0), (21, 21), 2.0, 100.0,
                   slope).snr
    assert t.min() >= 2.0 and t.max() <= 100.0
    grid = np.array([3.0, 10.0])
    n_above = np.array([(t > g).sum() for g in grid])
    tail = (100.0 / 2.0) ** -slope
    expected = ((grid / 2.0) ** -slope - tail) / (1 - tail) * len(t)
    np.testing.assert_allclose(n_above, expected, rtol=0.05)


def _bright_field_scene(n: int, seed: int, **changes):
    """Science stamps with fixed sky, exposures and a round Gaussian PSF (so the SNR at
    which a star saturates is one number), field only: (config, scene, catalogue)."""
    from stampbatch.sim import scene as sc

    cfg = _field_config(**{**dict(source_fraction=0.0, sky_subtracted_fraction=0.0,
                                  sky_min=500.0, sky_max=500.0, read_noise_min=5.0,
                                  read_noise_max=5.0, n_coadd_min=10, n_coadd_max=10,
                                  moffat_fraction=0.0, psf_ellipticity_max=0.0,
                                  bad_column_fraction=0.0, masked_fraction=0.0,
                                  offcentre_fraction=0.0, hot_pixel_fraction=0.0,
                                  cosmic_ray_fraction=0.0, streak_fraction=0.0,
                                  dipole_fraction=0.0, sky_gradient_max=0.0), **changes})
    rng = np.random.default_rng(seed)
    scene = sc.Scene(n, cfg.stamp_shape, sc.conditions(rng, n, cfg))
    return cfg, scene, sc.field_population(rng, scene, cfg), rng


def test_saturated_field_stars_are_the_bright_end_of_the_number_count():
    """No separate share of "bright stars": the field's own count, run on past saturation,
    gives the saturated stars at the rate it implies, and those stamps are clipped flat at
    the full well (with bleeds), the others never."""
    from stampbatch.sim import scene as sc

    n = 20_000
    cfg, scene, fs, rng = _bright_field_scene(n, 41)
    cond = scene.cond
    headroom = cond["saturation"][0] - cond["level"][0]
    s_sat = headroom * scene.psf_norm[0] / (scene.psf_peak[0] * cond["sigma"][0])
    assert 5e3 < s_sat < 1e5  # a star this bright saturates (the count goes on to 1e6)
    tail = (cfg.field_snr_max / cfg.field_snr_min) ** -cfg.field_count_slope
    share = ((s_sat / cfg.field_snr_min) ** -cfg.field_count_slope - tail) / (1 - tail)
    expected = share * len(fs)
    n_bright = int((fs.snr >= s_sat).sum())
    assert abs(n_bright - expected) < 3 * math.sqrt(expected), (n_bright, expected)
    truth = {"trail_length": np.zeros(n), "trail_angle": np.full(n, np.nan)}
    stamps = sc.observe(rng, scene, cfg, truth)
    peak = (scene.signal.max(axis=(1, 2)) + cond["level"]) / cond["saturation"]
    flat = (stamps == cond["saturation"].astype(np.float32)[:, None, None]).sum(axis=(1, 2))
    over, under = peak >= 1.02, peak < 0.95
    assert over.sum() > 100 and (flat[over] >= 1).all() and (flat[under] == 0).all()
    assert np.median(flat[peak >= 3.0]) >= 3  # far past the well: a core and a bleed


def test_bright_sources_beyond_the_edge_light_the_stamp():
    """The field goes on past the stamp's edge: sources within ``field_margin`` px of it and
    at SNR >= ``field_margin_snr_min`` are drawn from the same Poisson process and count,
    and their light reaches in, most at the edge."""
    from stampbatch.sim.field import draw_margin

    n, density, margin, bright = 20_000, 1.0, 10.0, 50.0
    rng = np.random.default_rng(43)
    m = draw_margin(rng, np.full(n, density), (21, 21), margin, 2.0, 1e6, 0.6, bright)
    tail = (1e6 / 2.0) ** -0.6
    share = ((bright / 2.0) ** -0.6 - tail) / (1 - tail)
    lam = density / 100.0 * ((21 + 2 * margin) ** 2 - 21**2) * share
    assert abs(len(m) - n * lam) < 3 * math.sqrt(n * lam), (len(m), n * lam)
    ax, ay = np.abs(m.dx), np.abs(m.dy)
    assert ((ax >= 10.5) | (ay >= 10.5)).all() and (ax <= 10.5 + margin).all()
    assert (ay <= 10.5 + margin).all() and m.snr.min() >= bright
    alpha = len(m) / np.log(m.snr / bright).sum()  # the count's slope, from its bright end
    assert abs(alpha - 0.6) < 3 * alpha / math.sqrt(len(m)) + 0.01, alpha
    # The same stamps with and without the margin: the on-stamp field is drawn first, so
    # the difference is the margin's light alone.
    _, with_margin, fs1, _ = _bright_field_scene(2000, 44, field_margin=margin)
    _, without, fs0, _ = _bright_field_scene(2000, 44, field_margin=0.0)
    np.testing.assert_array_equal(fs1.snr, fs0.snr)
    extra = (with_margin.signal - without.signal) / with_margin.cond["sigma"][:, None, None]
    assert extra.min() > -1e-3
    edge = np.ones((21, 21), bool)
    edge[2:-2, 2:-2] = False
    core = np.zeros((21, 21), bool)
    core[8:13, 8:13] = True
    assert extra[:, edge].mean() > 3 * extra[:, core].mean() > 0
    assert (extra[:, edge].max(axis=1) > 1.0).mean() > 0.1  # > 1 sigma on a tenth of them


def test_a_retired_option_is_refused_with_its_reason(tmp_path, capsys):
    cfg = tmp_path / "old.toml"
    cfg.write_text("bright_star_fraction = 0.05\n")
    out = tmp_path / "s.h5"
    assert main(["simulate", str(out), "--n", "10", "--config", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "old.toml" in err[0]
    assert "option 'bright_star_fraction' was removed: saturated field stars" in err[0]
    assert not out.exists()


def test_labels_depend_only_on_the_centre():
    """Field, background and defects are drawn alike for both classes (KS tests)."""
    from scipy.stats import ks_2samp

    b = simulate_stamps(6000, SimConfig(), np.random.default_rng(21))
    m, pos = b.meta, b.labels == 1
    for col in ("n_field", "field_density", "sky", "sigma", "psf_fwhm", "nn_snr"):
        x, y = m[col][pos], m[col][~pos]
        x, y = x[np.isfinite(x)], y[np.isfinite(y)]
        assert ks_2samp(x, y).pvalue > 1e-3, col
    plain = ~pos & (m["kind"] != "dipole")  # dipoles exist only in difference images
    for bg in simulate.BACKGROUNDS:
        k_pos, k_neg = int((m["background"][pos] == bg).sum()), int((m["background"][plain] == bg).sum())
        p = (k_pos + k_neg) / (pos.sum() + plain.sum())
        assert _binomial_ok(k_pos, int(pos.sum()), p), bg
    # every positive has its source within the centring tolerance, no negative has one there
    assert np.hypot(m["dx"][pos], m["dy"][pos]).max() <= 0.5 + 1e-6
    r_field = np.maximum(3.0, m["psf_fwhm"])
    has = np.isfinite(m["nn_distance"])
    assert (m["nn_distance"][has] >= r_field[has] - 1e-4).all()
    assert set(np.unique(m["profile"][~pos])) == {"none"}
    assert set(np.unique(m["profile"][pos])) == {"point", "galaxy", "saturated"}


def test_companions_and_sharp_artefacts_are_as_common_in_positives_as_in_negatives():
    """What lies beside the centre says nothing about the label: companions (an off-centre
    source, a streak, a hot pixel or cosmic ray near the centre) come with the same
    probabilities in both classes, and a positive's truth stays its centre source's."""
    cfg = SimConfig(masked_fraction=0.0, detector_edge_fraction=0.0)  # pixels, not defects
    b = simulate_stamps(20_000, cfg, np.random.default_rng(23))
    m, pos = b.meta, b.labels == 1
    kinds = ("offcentre", "streak", "hot_pixel", "cosmic_ray")
    for name in kinds:
        frac = getattr(cfg, f"{name}_fraction")
        for sel in (pos, ~pos):
            assert _binomial_ok(int((m["companion"][sel] == name).sum()), int(sel.sum()), frac, z=3.0), name
    # ... and the kind of image says nothing about the label either
    for image in ("science", "sky_subtracted", "difference"):
        share = float(np.mean(m["background"][~pos] == image))
        assert _binomial_ok(int((m["background"][pos] == image).sum()), int(pos.sum()), share,
                            z=3.5), image
    neg = ~pos
    for name in kinds:
        assert (m["companion"][neg & (m["kind"] == name)] == name).all()
    assert (m["companion"][neg & ~np.isin(m["kind"], kinds)] == "none").all()
    assert np.hypot(m["dx"][pos], m["dy"][pos]).max() <= cfg.max_centre_offset + 1e-6
    assert (m["trail_length"][pos] == 0).all()
    # the companions are there: a positive with an off-centre companion holds more light far
    # from the centre than one without (same field statistics otherwise)
    yy, xx = np.mgrid[-10:11, -10:11]
    far = np.hypot(yy, xx) > 6.5
    level = np.where(m["sky_subtracted"], 0.0, m["sky"])[:, None, None]
    light = ((b.stamps - level) / m["sigma"][:, None, None])[:, far].sum(axis=1)
    quiet = pos & (m["n_field"] == 0) & (m["background"] != "difference")
    with_c, without = quiet & (m["companion"] == "offcentre"), quiet & (m["companion"] == "none")
    assert np.median(light[with_c]) > np.median(light[without]) + 5.0
    # ... and the sharp ones: a positive with a hot pixel or cosmic ray beside its source
    # holds a pixel within 3 px of the centre that stands far above its 3x3 neighbours' median
    # (a PSF never does: FWHM >= 2 px), as the negatives of those kinds do
    near = b.stamps[:, 7:14, 7:14]
    pad = np.pad(near, ((0, 0), (1, 1), (1, 1)), mode="edge")
    ring = np.stack([pad[:, 1 + dy:8 + dy, 1 + dx:8 + dx] for dy in (-1, 0, 1)
                     for dx in (-1, 0, 1) if dy or dx])
    spike = ((near - np.median(ring, axis=0)) / m["sigma"][:, None, None]).max(axis=(1, 2))
    quiet = pos & (m["n_field"] == 0) & (m["snr"] < 10)
    for name in ("hot_pixel", "cosmic_ray"):
        with_a = quiet & (m["companion"] == name)
        assert with_a.sum() > 50
        assert np.median(spike[with_a]) > np.median(spike[quiet & (m["companion"] == "none")]) + 3.0
    assert np.median(spike[neg & (m["kind"] == "hot_pixel")]) > 5.0
    # the neighbour-free preset keeps the earlier simulator: companions only in negatives
    old = simulate_stamps(4000, OLD(), np.random.default_rng(24))
    assert (old.meta["companion"][old.labels == 1] == "none").all()


def test_centre_snr_is_against_the_noise_where_the_source_lies():
    """A centre source on a bright star's halo is scaled so that its optimal (inverse-variance
    weighted) matched-filter SNR, measured on the observed stamps against the sky, read and
    shot noise of the other light there, equals the SNR drawn (to 5 %); on an empty sky the
    flux is the matched-filter one, snr * sigma / ||P||."""
    from stampbatch.sim import scene as sc
    from stampbatch.sim.profiles import render_psf, saturate

    # About one bright field star per stamp, from well below to well above saturation.
    cfg = OLD(source_fraction=1.0, snr_min=8.0, snr_max=8.0, field_density_min=0.25,
              field_density_max=0.25, field_snr_min=3e3, field_snr_max=3e4, field_count_slope=0.2,
              field_galaxy_fraction=0.0, field_margin=0.0,
              correlated_noise_fraction=0.0, sky_subtracted_fraction=1.0, max_centre_offset=0.0,
              sky_gradient_max=0.0, residual_sky_max=0.0)
    rng = np.random.default_rng(25)
    n, shape = 3000, (21, 21)
    cond = sc.conditions(rng, n, cfg)
    scene = sc.Scene(n, shape, cond)
    idx = np.arange(n)
    zero = np.zeros(n)
    unit = render_psf(shape, zero, zero, cond["fwhm"], cond["beta"]).astype(np.float32)
    sc.field_population(rng, scene, cfg)  # the bright stars
    other = scene.signal.astype(np.float64).copy()
    scene.centre.append((idx, unit))
    scene.place_centre(True, simulate.MAX_SNR)
    truth = {"trail_length": np.zeros(n), "trail_angle": np.full(n, np.nan)}
    stamps = sc.observe(rng, scene, cfg, truth).astype(np.float64)
    sigma = cond["sigma"][:, None, None]
    var = sigma**2 + np.abs(other)
    # saturated and bled pixels (a pipeline's SAT/BLEED mask) carry no information
    sat = cond["saturation"].astype(np.float32)[:, None, None]
    total = (other + cond["level"][:, None, None]).astype(np.float32)
    bled = (saturate(total, cond["saturation"]) != total) | (stamps >= sat)
    usable = ~bled
    u = unit.astype(np.float64)
    w = np.where(usable, u / var, 0.0)
    estimate = ((stamps - other) * w).sum(axis=(1, 2)) / np.sqrt((u * w).sum(axis=(1, 2)))
    halo = (np.abs(other) * (u > 0.2 * u.max(axis=(1, 2), keepdims=True))).max(axis=(1, 2))
    on_halo = halo > 3 * cond["sigma"][:, None, None].ravel() ** 2  # shot noise dominates there
    assert on_halo.sum() > 300
    assert abs(estimate[on_halo].mean() / 8.0 - 1.0) < 0.05
    assert abs(estimate[on_halo].std() - 1.0) < 0.1  # the estimator is in sigma units
    # against the sky alone the same sources would be quoted brighter than 8 sigma
    sky_only = scene.flux * np.sqrt((u * u).sum(axis=(1, 2))) / cond["sigma"]
    assert np.median(sky_only[on_halo]) > 1.3 * 8.0
    # on an empty sky the flux is the matched-filter one
    empty = sc.Scene(4, shape, {k: v[:4] for k, v in cond.items()})
    empty.centre.append((np.arange(4), unit[:4]))
    empty.place_centre(True, simulate.MAX_SNR)
    norm = np.sqrt((u[:4] ** 2).sum(axis=(1, 2)))
    np.testing.assert_allclose(empty.flux, 8.0 * cond["sigma"][:4] / norm, rtol=1e-6)


def test_default_mixture_spans_fields_backgrounds_and_profiles():
    b = simulate_stamps(6000, SimConfig(), np.random.default_rng(22))
    m, n = b.meta, len(b)
    cfg = SimConfig()
    pos = b.labels == 1
    assert (m["n_field"] > 0).mean() > 0.5 and (m["n_field"] == 0).mean() > 0.1
    share = {k: (m["background"] == k).mean() for k in simulate.BACKGROUNDS}
    assert abs(share["science"] - (1 - cfg.sky_subtracted_fraction)) < 0.05, share
    outside_diff = pos & (m["background"] != "difference")
    assert abs((m["profile"][outside_diff] == "galaxy").mean() - cfg.centre_galaxy_fraction) < 0.04
    gal = m["profile"] == "galaxy"
    assert (m["half_light_radius"][gal] <= cfg.centre_galaxy_re_max + 1e-5).all()
    assert np.isnan(m["half_light_radius"][~gal]).all()
    assert set(np.unique(m["sersic_n"][gal])) == {1.0, 4.0}
    # no data (NaN) only where a mask or a detector's edge says so
    nan_pixels = np.isnan(b.stamps).sum(axis=(1, 2))
    assert (nan_pixels <= m["n_masked"]).all() and (nan_pixels > 0).any()
    assert _binomial_ok(int((m["bad_column"] >= 0).sum()), n, cfg.bad_column_fraction)


# --------------------------------------------------------------------------- profiles


def _half_light_radius(image: np.ndarray, q: float = 1.0, pa: float = 0.0, up: int = 7) -> float:
    """Semi-major axis of the ellipse (axis ratio q, angle pa, about the centre) enclosing
    half the unit flux; pixels split into up x up sub-pixels so the aperture edge is
    resolved."""
    h, w = image.shape
    fine = np.repeat(np.repeat(image.astype(np.float64), up, 0), up, 1) / up**2
    y = ((np.arange(h * up) + 0.5) / up - h / 2.0)[:, None]
    x = ((np.arange(w * up) + 0.5) / up - w / 2.0)[None, :]
    xp = x * math.cos(pa) + y * math.sin(pa)
    yp = (y * math.cos(pa) - x * math.sin(pa)) / q
    r = np.hypot(xp, yp).ravel()
    order = np.argsort(r)
    cum = np.cumsum(fine.ravel()[order])
    return float(np.interp(0.5, cum, r[order]))


@pytest.mark.parametrize("n", [1.0, 4.0])
@pytest.mark.parametrize(("r_e", "q", "pa"), [(1.5, 1.0, 0.0), (2.5, 1.0, 0.0), (4.0, 1.0, 0.0),
                                              (2.5, 0.5, 0.7), (4.0, 0.5, 2.0)])
def test_sersic_half_light_radius_is_recovered(n, r_e, q, pa):
    """r_e (the half-light semi-major axis) measured back on the pixels to 10 % (where the
    minor axis spans more than a pixel; below that the pixels themselves widen it)."""
    from stampbatch.sim.profiles import render_sersic

    img = render_sersic((101, 101), [0.0], [0.0], [r_e], [n], [q], [pa], [0.2])[0]
    assert abs(_half_light_radius(img, q, pa) / r_e - 1.0) < 0.10


def test_sersic_convolved_with_the_psf_keeps_its_flux_and_widens():
    from stampbatch.sim.profiles import render_psf, render_sersic

    for beta in (np.nan, 3.0):
        g = render_sersic((61, 61), [0.4], [-0.3], [1.5], [1.0], [0.6], [0.3], [3.0], [beta])[0]
        assert abs(g.sum() - 1.0) < 0.01
        psf = render_psf((61, 61), [0.4], [-0.3], [3.0], [beta])[0]
        assert g.max() < psf.max()  # extended: a lower peak than the PSF of the same flux
        rows, cols = np.indices(g.shape) - 30
        assert abs((g * cols).sum() - 0.4) < 0.02 and abs((g * rows).sum() + 0.3) < 0.02


def test_saturated_cores_are_flat_at_full_well_with_bleed_trails():
    cfg = dataclasses.replace(OLD(), source_fraction=1.0, centre_saturated_fraction=1.0,
                              sky_subtracted_fraction=0.3, spike_fraction=0.0,
                              saturation_min=3.0, saturation_max=30.0)
    b = simulate_stamps(400, cfg, np.random.default_rng(3))
    m = b.meta
    assert (m["profile"] == "saturated").all()
    sat = m["saturation"].astype(np.float32)
    np.testing.assert_array_equal(b.stamps.max(axis=(1, 2)), sat)
    np.testing.assert_array_equal(b.stamps[:, CENTRE, CENTRE], sat)  # the core is clipped
    n_sat = (b.stamps == sat[:, None, None]).sum(axis=(1, 2))
    assert (n_sat >= 2).all()
    # The excess charge bleeds along columns: more saturated pixels in the centre column
    # than in the centre row, and the full well follows n_coadd * full_well - sky.
    col = (b.stamps[:, :, CENTRE] == sat[:, None]).sum(axis=1)
    row = (b.stamps[:, CENTRE, :] == sat[:, None]).sum(axis=1)
    assert (col >= row).all() and (col > row).mean() > 0.8
    expected = m["n_coadd"] * cfg.full_well - np.where(m["sky_subtracted"], m["sky"], 0.0)
    np.testing.assert_allclose(m["saturation"], expected, rtol=1e-6)
    assert (m["snr"] > 100).all()  # the unclipped star's SNR


def test_difference_image_residuals_and_dipoles():
    cfg = dataclasses.replace(OLD(), source_fraction=0.0, dipole_fraction=1.0,
                              offcentre_fraction=0.0, hot_pixel_fraction=0.0,
                              cosmic_ray_fraction=0.0, streak_fraction=0.0, snr_min=30.0,
                              source_shot_noise=False, correlated_noise_fraction=0.0)
    b = simulate_stamps(500, cfg, np.random.default_rng(6))
    m = b.meta
    assert (m["kind"] == "dipole").all() and (m["background"] == "difference").all()
    res = (b.stamps - 0.0) / m["sigma"][:, None, None]
    assert (res.max(axis=(1, 2)) > 3).mean() > 0.95 and (res.min(axis=(1, 2)) < -3).mean() > 0.9
    # a residual has (nearly) no net flux: |sum| far below the star's flux
    assert np.median(np.abs(b.stamps.sum(axis=(1, 2))) / m["flux"]) < 0.1


def test_bad_columns_and_masked_pixels():
    b = simulate_stamps(300, OLD(bad_column_fraction=1.0), np.random.default_rng(7))
    m = b.meta
    assert (m["bad_column"] >= 0).all() and (m["n_masked"] == 0).all()
    columns = b.stamps[np.arange(300), :, m["bad_column"]]
    assert (np.ptp(columns, axis=1) == 0.0).all()  # one constant per column
    dead = columns[:, 0] == 0.0
    assert 0.35 < dead.mean() < 0.65  # dead (0) or hot (far above the background)
    hot_level = (columns[~dead, 0] - np.where(m["sky_subtracted"], 0.0, m["sky"])[~dead])
    assert (hot_level >= 10 * m["sigma"][~dead] - 1e-3).all()
    cfg = OLD(masked_fraction=1.0, masked_nan_fraction=0.5, mask_max_size=2)
    b = simulate_stamps(300, cfg, np.random.default_rng(7))
    m = b.meta
    nan_rows = np.isnan(b.stamps).any(axis=(1, 2))
    assert 0.35 < nan_rows.mean() < 0.65
    assert (np.isnan(b.stamps).sum(axis=(1, 2))[nan_rows] == m["n_masked"][nan_rows]).all()
    assert ((m["n_masked"] >= 1) & (m["n_masked"] <= 4)).all()


def test_stamps_cut_at_a_detector_edge_have_no_data_beyond_it():
    """A stamp centred within half a stamp of a CCD's edge: one side's outer 1..10 columns (or
    rows) are NaN, the centre pixel is always on the chip, and the rate is the configured one."""
    b = simulate_stamps(2000, OLD(detector_edge_fraction=0.5), np.random.default_rng(31))
    m = b.meta
    nan = np.isnan(b.stamps)
    cut = nan.any(axis=(1, 2))
    assert _binomial_ok(int(cut.sum()), 2000, 0.5)
    assert (nan.sum(axis=(1, 2)) == m["n_masked"]).all()
    assert not nan[:, 10, 10].any()
    cols, rows = nan.all(axis=1), nan.all(axis=2)      # (N, W): columns wholly NaN; rows
    depth = np.maximum(cols.sum(axis=1), rows.sum(axis=1))
    assert ((depth >= 1) & (depth <= 10))[cut].all()
    # the NaN region is exactly the outer `depth` columns or rows of one side
    left = cols[:, :10].sum(axis=1) == depth
    right = cols[:, 11:].sum(axis=1) == depth
    bottom = rows[:, :10].sum(axis=1) == depth
    top = rows[:, 11:].sum(axis=1) == depth
    side = np.stack([left, right, bottom, top], axis=1) & cut[:, None]
    assert (side.sum(axis=1)[cut] >= 1).all()
    assert (nan.sum(axis=(1, 2))[cut] == 21 * depth[cut]).all()
    for k in range(4):                                  # every side, about equally often
        assert 0.15 < side[cut, k].mean() < 0.35
    assert set(np.unique(depth[cut])) == set(range(1, 11))
    # stamps of either class are cut alike: the edge says nothing about the label
    assert abs(cut[b.labels == 1].mean() - cut[b.labels == 0].mean()) < 0.07


def test_neighbour_free_preset_is_the_old_simulator():
    b = simulate_stamps(2000, OLD(), np.random.default_rng(2))
    m = b.meta
    assert (m["n_field"] == 0).all() and set(np.unique(m["profile"])) <= {"none", "point"}
    assert set(np.unique(m["background"])) == {"science", "sky_subtracted"}
    assert (m["bad_column"] == -1).all() and (m["n_masked"] == 0).all()


@pytest.mark.parametrize("name", ["sim_neighbour_free.toml", "sim_shifted.toml"])
def test_benchmark_presets_load(name):
    from stampbatch.config import load_toml

    path = Path(__file__).resolve().parents[2] / "benchmarks" / name
    cfg = from_mapping(SimConfig, load_toml(path), str(path))
    cfg.validate()
    if name == "sim_neighbour_free.toml":
        assert cfg == simulate.neighbour_free_config()


def test_sources_in_difference_images_are_new_light_with_their_full_snr():
    """A positive in a difference image is a transient or a mover: its whole PSF is there
    (only the static field is subtracted), so the matched filter recovers its SNR."""
    cfg = OLD(sky_subtracted_fraction=1.0, difference_fraction=1.0, source_fraction=1.0,
              correlated_noise_fraction=0.0, source_shot_noise=False)
    b = simulate_stamps(3000, cfg, np.random.default_rng(14))
    m = b.meta
    assert (m["background"] == "difference").all() and (m["profile"] == "point").all()
    shapes = simulate.render_psf((21, 21), m["dx"], m["dy"], m["psf_fwhm"], m["psf_beta"],
                                 m["psf_e"], m["psf_pa"])
    z = simulate.matched_filter_snr(b.stamps, shapes, m["sigma"])
    d = z - m["snr"]
    assert abs(d.mean()) < 4.0 / math.sqrt(len(d)) and abs(d.std() - 1.0) < 0.08
