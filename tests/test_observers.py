"""The physics observers of ``benchmarks/observers.py``: statistics with known distributions."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from observers import observer_statistics  # noqa: E402

from stampbatch.sim.profiles import render_psf  # noqa: E402

N, FWHM, SIGMA = 1500, 3.0, 10.0


def _meta(n: int) -> dict:
    return {"psf_fwhm": np.full(n, FWHM), "psf_beta": np.full(n, np.nan), "psf_e": np.zeros(n),
            "psf_pa": np.zeros(n), "sigma": np.full(n, SIGMA)}


def _stamps(rng, centre_snr: float, neighbour_snr: float, sky: float = 500.0) -> np.ndarray:
    """White-noise stamps on a sky level, a Gaussian PSF of the given matched-filter SNR at the
    centre, and a neighbour 1.3 FWHM away."""
    psf0 = render_psf((21, 21), np.zeros(1), np.zeros(1), np.array([FWHM]))[0].astype(np.float64)
    norm = np.sqrt((psf0**2).sum())
    near = render_psf((21, 21), np.array([1.3 * FWHM]), np.array([0.4]), np.array([FWHM]))[0]
    signal = centre_snr * SIGMA / norm * psf0 + neighbour_snr * SIGMA / norm * near
    return sky + signal[None] + rng.normal(0.0, SIGMA, (N, 21, 21))


def test_the_matched_filter_reads_the_snr_a_source_was_drawn_at():
    rng = np.random.default_rng(1)
    empty = observer_statistics(_stamps(rng, 0.0, 0.0), _meta(N))["matched_filter"]
    assert abs(empty.mean()) < 0.1 and abs(empty.std() - 1.0) < 0.08      # N(0, 1) on empty sky
    five = observer_statistics(_stamps(rng, 5.0, 0.0), _meta(N))["matched_filter"]
    # the sky (a constant and a plane) is fitted too and takes the PSF's projection on it
    psf = render_psf((21, 21), np.zeros(1), np.zeros(1), np.array([FWHM]))[0].ravel().astype(float)
    yy, xx = np.mgrid[0:21, 0:21]
    sky = np.stack([np.ones(441), xx.ravel(), yy.ravel()], axis=1).astype(float)
    left = psf - sky @ np.linalg.lstsq(sky, psf, rcond=None)[0]
    expected = 5.0 * np.sqrt((left**2).sum() / (psf**2).sum())
    assert 4.8 < expected < 5.0
    assert abs(five.mean() - expected) < 0.08 and abs(five.std() - 1.0) < 0.08


def test_the_deblender_fits_a_bright_neighbour_the_matched_filter_mistakes_for_a_source():
    rng = np.random.default_rng(2)
    empty = observer_statistics(_stamps(rng, 0.0, 150.0), _meta(N))
    five = observer_statistics(_stamps(rng, 5.0, 150.0), _meta(N))
    # the neighbour's wing lifts the matched filter of every empty stamp far above the noise
    assert empty["matched_filter"].mean() > 5.0
    # fitted jointly, the neighbour's light is not the centre's: noise-like on empty stamps,
    # the source's SNR less what it shares with the neighbour where there is one
    assert abs(empty["deblender"].mean()) < 0.3 and empty["deblender"].std() < 1.3
    assert 3.0 < five["deblender"].mean() < 5.2
    assert np.median(empty["sources_found"]) == 1
