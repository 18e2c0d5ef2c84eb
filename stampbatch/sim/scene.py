"""The scene of each simulated stamp: what lies on it, and how it is observed.

Used by :func:`stampbatch.sim.simulate.simulate_stamps`, which describes the model (the
settings are :class:`stampbatch.sim.config.SimConfig`). Vectorised over stamps throughout:
:func:`conditions` draws every stamp's class, kind, profile, background and observing
conditions; a :class:`Scene` accumulates the noiseless signal of the centre source
(:func:`centre_sources`), the hard negatives (:func:`hard_negatives`) and the field
(:func:`field_population`); :func:`observe` adds noise with each signal's shot noise, the
sky, saturation and detector defects.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np

from stampbatch import store
from stampbatch.errors import SimulationStopped
from stampbatch.sim import backgrounds
from stampbatch.sim.config import HARD_FRACTIONS, SimConfig
from stampbatch.sim.field import FieldSources, draw_field, draw_margin
from stampbatch.sim.profiles import (
    pixel_offsets,
    render_psf,
    render_sersic,
    render_spikes,
    render_trail,
    saturate,
)

KINDS = ("source", "background", "offcentre", "hot_pixel", "cosmic_ray", "streak", "dipole")
PROFILES = ("none", "point", "galaxy", "saturated")
BACKGROUNDS = ("science", "sky_subtracted", "difference")
# What lies beside the centre source besides the field: an isolated source beyond the
# centring disc, a streak of another moving object, a hot pixel or a cosmic-ray hit near the
# centre. Drawn with the same probabilities in both classes (see :func:`_companions`), so
# none is evidence about the label.
COMPANIONS = ("none", "offcentre", "streak", "hot_pixel", "cosmic_ray")
_SOURCE, _BACKGROUND, _OFFCENTRE, _HOT, _COSMIC, _STREAK, _DIPOLE = range(len(KINDS))
_NONE, _POINT, _GALAXY, _SATURATED = range(len(PROFILES))
_SCIENCE, _SKYSUB, _DIFFERENCE = range(len(BACKGROUNDS))
_NO_COMPANION, _OFFCENTRE_COMPANION, _STREAK_COMPANION, _HOT_COMPANION, _COSMIC_COMPANION = \
    range(len(COMPANIONS))
# A negative's hard kind -> the companion it is (the same thing beside a positive's source).
_KIND_COMPANION = {_OFFCENTRE: _OFFCENTRE_COMPANION, _STREAK: _STREAK_COMPANION,
                   _HOT: _HOT_COMPANION, _COSMIC: _COSMIC_COMPANION}


# Shapes rendered between two checks for a stop (:meth:`Scene.check`): a fraction of a
# second. Renderers work stamp by stamp, so a piece renders exactly as the whole would.
RENDER_ROWS = 4096


def log_uniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    return np.exp(rng.uniform(math.log(lo), math.log(hi), n))


def positions_outside(rng: np.random.Generator, n: int, shape: tuple[int, int],
                       r_min: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Uniform positions over the stamp area farther than ``r_min`` px from the centre.

    Rejection sampling by rounds (not per stamp); validate() keeps the acceptance >= 21 %.
    """
    h, w = shape
    r_min = np.broadcast_to(np.asarray(r_min, dtype=np.float64), (n,))
    dx, dy = np.empty(n), np.empty(n)
    todo = np.arange(n)
    while todo.size:
        x = rng.uniform(-w / 2.0, w / 2.0, todo.size)
        y = rng.uniform(-h / 2.0, h / 2.0, todo.size)
        ok = np.hypot(x, y) > r_min[todo]
        dx[todo[ok]], dy[todo[ok]] = x[ok], y[ok]
        todo = todo[~ok]
    return dx, dy


def _in_disc(rng: np.random.Generator, n: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    r = radius * np.sqrt(rng.random(n))
    theta = rng.uniform(0.0, 2.0 * np.pi, n)
    return r * np.cos(theta), r * np.sin(theta)


def _pixels_near_centre(rng: np.random.Generator, n: int, size: int,
                        max_offset: float) -> np.ndarray:
    """Random pixel indices along one axis within ``max_offset`` px of the centre."""
    off = np.abs(pixel_offsets(size))
    allowed = np.flatnonzero(off <= max(max_offset, off.min()))
    return allowed[rng.integers(0, len(allowed), n)]


def conditions(rng: np.random.Generator, n: int, c: SimConfig) -> dict[str, np.ndarray]:
    """Per-stamp class, kind, profile, background and observing conditions."""
    labels = (rng.random(n) < c.source_fraction).astype(np.int8)
    edges = np.cumsum([getattr(c, name) for name in HARD_FRACTIONS])
    neg = np.array([_OFFCENTRE, _HOT, _COSMIC, _STREAK, _DIPOLE, _BACKGROUND], dtype=np.int8)
    drawn = neg[np.searchsorted(edges, rng.random(n), side="right")]
    kind = np.where(labels == 1, _SOURCE, drawn).astype(np.int8)
    sub = rng.random(n) < c.sky_subtracted_fraction
    diff = sub & (rng.random(n) < c.difference_fraction)
    # Subtraction residuals exist only in difference images, so dipole negatives add to them;
    # positives whose draw would have been a dipole are difference images too, so that the
    # kind of image says nothing about the label (without companions: the earlier simulator).
    diff |= (drawn if c.positive_companions else kind) == _DIPOLE
    sub |= diff
    background = np.where(diff, _DIFFERENCE, np.where(sub, _SKYSUB, _SCIENCE)).astype(np.int8)
    u = rng.random(n)
    profile = np.where(u < c.centre_galaxy_fraction, _GALAXY,
                       np.where(u < c.centre_galaxy_fraction + c.centre_saturated_fraction,
                                _SATURATED, _POINT)).astype(np.int8)
    profile[background == _DIFFERENCE] = _POINT
    profile[labels == 0] = _NONE
    n_coadd = rng.integers(c.n_coadd_min, c.n_coadd_max + 1, n)
    sky_exp = log_uniform(rng, c.sky_min, c.sky_max, n)
    read_noise = rng.uniform(c.read_noise_min, c.read_noise_max, n)
    sky = n_coadd * sky_exp
    level = np.where(sub, 0.0, sky)  # the background level the stamp keeps
    density = (log_uniform(rng, c.field_density_min, c.field_density_max, n)
               if c.field_density_max > 0 else np.zeros(n))
    fwhm = rng.uniform(c.fwhm_min, c.fwhm_max, n)
    if c.field_density_fwhm > 0:    # fewer sources reach field_snr_min through a wider PSF
        density = density * (fwhm / c.field_density_fwhm) ** -c.field_count_slope
    cond = {
        "labels": labels, "kind": kind, "background": background, "profile": profile,
        "fwhm": fwhm, "n_coadd": n_coadd, "sky": sky, "read_noise": read_noise, "level": level,
        "beta": np.where(rng.random(n) < c.moffat_fraction,
                         rng.uniform(c.moffat_beta_min, c.moffat_beta_max, n), np.nan),
        "sigma": np.sqrt(n_coadd * (sky_exp + read_noise**2)),
        "noise_corr": np.where(rng.random(n) < c.correlated_noise_fraction,
                               rng.uniform(c.noise_corr_min, c.noise_corr_max, n), 0.0),
        "snr": np.where(kind == _BACKGROUND, 0.0, log_uniform(rng, c.snr_min, c.snr_max, n)),
        "density": density,
        "field_r_min": np.maximum(c.field_min_distance, c.field_min_distance_fwhm * fwhm),
        "saturation": n_coadd * c.full_well - np.where(sub, sky, 0.0),
        "shift": rng.uniform(0.0, c.misregistration_max, n),
        "shift_angle": rng.uniform(0.0, 2.0 * np.pi, n),
        "mismatch": rng.uniform(-c.flux_mismatch_max, c.flux_mismatch_max, n),
    }
    cond["companion"], cond["companion_snr"] = _companions(rng, labels, drawn, c)
    if c.psf_ellipticity_max > 0:     # drawn last: a round-PSF config keeps its draws
        cond["psf_e"] = rng.uniform(0.0, c.psf_ellipticity_max, n)
        cond["psf_pa"] = rng.uniform(0.0, np.pi, n)
    else:
        cond["psf_e"], cond["psf_pa"] = np.zeros(n), np.zeros(n)
    return cond


def _companions(rng: np.random.Generator, labels: np.ndarray, drawn: np.ndarray,
                c: SimConfig) -> tuple[np.ndarray, np.ndarray]:
    """What lies beside the centre besides the field, per stamp, and a positive's companion
    SNR.

    ``drawn`` is every stamp's hard-kind draw (:func:`conditions`): a negative's companion is
    its own hard kind (an off-centre source, a streak, a hot pixel or a cosmic-ray hit near
    the centre; dipoles exist only without a source), and with ``positive_companions`` a
    positive carries the same thing beside its source — the one table of hard-kind
    probabilities serves both classes — at an SNR drawn like the negatives'. What lies
    beside the centre source must say nothing about the label: were these negative-only, "a
    bright source off the centre" or "a sharp pixel near the centre" would be a sign of the
    negative class, and a network could learn to doubt every centred source with a brighter
    neighbour, or with a cosmic ray or hot pixel beside it — which single exposures hold at
    their own rate whatever sits at the centre.
    """
    n = len(labels)
    companion = np.full(n, _NO_COMPANION, dtype=np.int8)
    carries = (labels == 0) | bool(c.positive_companions)
    for k, comp in _KIND_COMPANION.items():
        companion[carries & (drawn == k)] = comp
    snr = np.zeros(n)
    if c.positive_companions:
        snr = np.where(labels == 1, log_uniform(rng, c.snr_min, c.snr_max, n), 0.0)
    return companion, snr


class Scene:
    """The noiseless signal of every stamp, built up source by source, and its truth."""

    def __init__(self, n: int, shape: tuple[int, int], cond: dict[str, np.ndarray],
                 stop: threading.Event | None = None) -> None:
        self.stop = stop
        self.shape = shape
        self.cond = cond
        self.signal = np.zeros((n, *shape), dtype=np.float32)
        self.flux = np.zeros(n)
        self.snr_eff = cond["snr"].copy()
        self.centre: list[tuple[np.ndarray, np.ndarray]] = []  # (stamps, unit shapes) to place
        self.dx = np.full(n, np.nan)
        self.dy = np.full(n, np.nan)
        centred = self.psf(np.arange(n), np.zeros(n), np.zeros(n))
        self.psf_norm = np.sqrt(np.einsum("nij,nij->n", centred, centred, dtype=np.float64))
        self.psf_peak = centred.max(axis=(1, 2)).astype(np.float64)  # of a unit-flux star

    def check(self) -> None:
        """Raise :class:`~stampbatch.errors.SimulationStopped` if the ``stop`` event is set:
        called between the stages and between pieces of the heavy renders, so a stopped
        simulation ends within a fraction of a second rather than at the end of its block."""
        if self.stop is not None and self.stop.is_set():
            raise SimulationStopped

    def in_pieces(self, m: int, rows: int,
                  render: Callable[[slice], np.ndarray]) -> np.ndarray:
        """``m`` shapes rendered ``rows`` at a time (``render(piece)`` of consecutive slices),
        checking for a stop before each piece."""
        out = np.empty((m, *self.shape), dtype=np.float32)
        for lo in range(0, m, rows):
            self.check()
            piece = slice(lo, min(lo + rows, m))
            out[piece] = render(piece)
        return out

    def psf(self, idx: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        """Unit-flux PSFs of stamps ``idx`` at (dx, dy), :data:`RENDER_ROWS` at a time."""
        c = self.cond
        fwhm, beta, ellip, pa = (c[k][idx] for k in ("fwhm", "beta", "psf_e", "psf_pa"))
        return self.in_pieces(len(idx), RENDER_ROWS, lambda p: render_psf(
            self.shape, dx[p], dy[p], fwhm[p], beta[p], ellip[p], pa[p]))

    def residual_shift(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, a = self.cond["shift"][idx], self.cond["shift_angle"][idx]
        return s * np.cos(a), s * np.sin(a)

    def add(self, idx: np.ndarray, unit: np.ndarray) -> None:
        """A hard negative's signal: unit shapes scaled to the stamps' SNR against the sky."""
        flux, norm = self._sky_flux(idx, unit, self.cond["snr"][idx])
        self._put(idx, unit, flux, norm)

    def _sky_flux(self, idx: np.ndarray, unit: np.ndarray,
                  snr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The flux giving ``unit`` shapes a matched-filter SNR ``snr`` against the sky, and
        the shapes' norms."""
        norm = np.sqrt(np.einsum("nij,nij->n", unit, unit, dtype=np.float64))
        return snr * self.cond["sigma"][idx] / norm, norm

    def _put(self, idx: np.ndarray, unit: np.ndarray, flux: np.ndarray, norm: np.ndarray) -> None:
        """The signal of the stamps' own kind at ``flux``: its truth, and its significance
        against correlated noise (``snr_eff``)."""
        c = self.cond
        self.flux[idx] = flux
        corr = np.flatnonzero(c["noise_corr"][idx] > 0)
        if corr.size:
            self.snr_eff[idx[corr]] = c["snr"][idx[corr]] * norm[corr] / backgrounds.filter_noise(
                unit[corr], c["noise_corr"][idx[corr]])
        self.signal[idx] += unit * flux.astype(np.float32)[:, None, None]

    def add_companion(self, idx: np.ndarray, unit: np.ndarray) -> None:
        """A positive's off-centre companion at its own SNR; the stamp's truth (flux, offset)
        stays the centre source's."""
        flux, _ = self._sky_flux(idx, unit, self.cond["companion_snr"][idx])
        self.signal[idx] += unit * flux.astype(np.float32)[:, None, None]

    def place_centre(self, shot_noise: bool, max_snr: float) -> None:
        """Scale the centre sources to their SNR against the noise *where they lie*.

        A photometry pipeline's SNR is the flux over its error from the variance plane: the
        sky and read noise and the Poisson noise of all the other light under the source (a
        neighbour's wings, a bright star's halo), with saturated pixels and those their
        charge bleeds into carrying no information (a pipeline's SAT/BLEED mask). With
        inverse-variance weights the optimal SNR of a source of flux F and unit shape P is
        F * sqrt(sum P**2 / var) over the other pixels, var = sigma**2 + |other light|; on an
        empty sky this is the matched-filter SNR F sqrt(sum P**2) / sigma. So a source drawn
        at SNR 20 is a 20-sigma source wherever it sits, not one lost in the shot noise of a
        star it happens to lie on. Called once the field is on the stamps; capped at
        ``max_snr`` against the sky alone (float32 pixels).
        """
        c = self.cond
        for idx, unit in self.centre:
            self.check()
            other = self.signal[idx].astype(np.float64)
            sigma = c["sigma"][idx][:, None, None]
            var = sigma**2 + (np.abs(other) if shot_noise else 0.0)
            # Saturated and bled pixels of the other light (a pipeline's SAT/BLEED mask).
            total = (other + c["level"][idx][:, None, None]).astype(np.float32)
            clipped = ((saturate(total, c["saturation"][idx]) != total)
                       & (c["background"][idx] != _DIFFERENCE)[:, None, None])
            u = unit.astype(np.float64)
            weight = np.where(clipped, 0.0, u * u / var).sum(axis=(1, 2))
            norm = np.sqrt(np.einsum("nij,nij->n", u, u))
            f = np.minimum(c["snr"][idx] / np.sqrt(np.maximum(weight, 1e-300)),
                           max_snr * c["sigma"][idx] / norm)
            self._put(idx, unit, f, norm)
        self.centre = []

    def field_flux(self, stamp: np.ndarray, snr: np.ndarray) -> np.ndarray:
        """The total flux of field sources drawn at a point-source SNR on the given stamps:
        that of the stamp's centred PSF reaching ``snr`` against the sky."""
        return snr * self.cond["sigma"][stamp] / self.psf_norm[stamp]

    def addfield_population(self, stamp: np.ndarray, unit: np.ndarray, flux: np.ndarray) -> None:
        """Field sources: unit shapes at their total flux (several per stamp allowed)."""
        np.add.at(self.signal, stamp, unit * flux.astype(np.float32)[:, None, None])


def _galaxy_params(rng: np.random.Generator, k: int, c: SimConfig,
                   re_max: float) -> dict[str, np.ndarray]:
    return {"r_e": log_uniform(rng, c.galaxy_re_min, re_max, k),
            "n": np.where(rng.random(k) < c.galaxy_devaucouleurs_fraction, 4.0, 1.0),
            "q": rng.uniform(c.galaxy_axis_ratio_min, 1.0, k),
            "pa": rng.uniform(0.0, np.pi, k)}


def _shapes(scene: Scene, stamp: np.ndarray, dx: np.ndarray, dy: np.ndarray,
            galaxy: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Unit-flux shapes of point sources (or galaxies) on the given stamps; on difference
    images what their subtraction leaves (the misregistered, mis-scaled template)."""
    c = scene.cond
    fwhm, beta = c["fwhm"][stamp], c["beta"][stamp]
    psf_e, psf_pa = c["psf_e"][stamp], c["psf_pa"][stamp]

    def render(x: np.ndarray, y: np.ndarray, sel: np.ndarray) -> np.ndarray:
        if galaxy is None:
            return scene.psf(stamp[sel], x, y)
        return render_sersic(scene.shape, x, y, galaxy["r_e"][sel], galaxy["n"][sel],
                             galaxy["q"][sel], galaxy["pa"][sel], fwhm[sel], beta[sel],
                             psf_e[sel], psf_pa[sel], check=scene.check)

    out = np.empty((len(stamp), *scene.shape), dtype=np.float32)
    diff = c["background"][stamp] == _DIFFERENCE
    keep = np.flatnonzero(~diff)
    if keep.size:
        out[keep] = render(dx[keep], dy[keep], keep)
    sub = np.flatnonzero(diff)
    if sub.size:
        sx, sy = scene.residual_shift(stamp[sub])
        plus = render(dx[sub] + 0.5 * sx, dy[sub] + 0.5 * sy, sub)
        plus *= (1.0 + c["mismatch"][stamp[sub]]).astype(np.float32)[:, None, None]
        out[sub] = plus - render(dx[sub] - 0.5 * sx, dy[sub] - 0.5 * sy, sub)
    return out


def _saturated_centre_stars(rng: np.random.Generator, scene: Scene, idx: np.ndarray,
                            dx: np.ndarray, dy: np.ndarray, c: SimConfig) -> np.ndarray:
    """Saturated stars at (dx, dy) on stamps ``idx`` (positives' centre sources); returns
    their point-source SNR.

    The flux puts the unclipped peak at ``saturation_min``-``saturation_max`` times the
    headroom between the background level and the full well.
    """
    cond = scene.cond
    unit = _shapes(scene, idx, dx, dy)
    peak_unit = render_psf(scene.shape, dx, dy, cond["fwhm"][idx], cond["beta"][idx],
                           cond["psf_e"][idx], cond["psf_pa"][idx]).max(axis=(1, 2)).astype(
        np.float64)
    headroom = cond["saturation"][idx] - cond["level"][idx]
    flux = log_uniform(rng, c.saturation_min, c.saturation_max, idx.size) * headroom / peak_unit
    spiky = np.flatnonzero(rng.random(idx.size) < c.spike_fraction)
    if spiky.size:
        unit[spiky] += c.spike_strength * render_spikes(
            scene.shape, dx[spiky], dy[spiky], cond["fwhm"][idx[spiky]],
            np.full(spiky.size, c.spike_length))
    np.add.at(scene.signal, idx, unit * flux.astype(np.float32)[:, None, None])
    return flux * scene.psf_norm[idx] / cond["sigma"][idx]


def centre_sources(rng: np.random.Generator, scene: Scene, c: SimConfig,
                    truth: dict[str, np.ndarray]) -> None:
    """Positives at the centre: point sources, compact galaxies, saturated stars.

    Point sources and galaxies are scaled by :meth:`Scene.place_centre` once the field is on
    the stamp (their SNR is against the noise where they lie)."""
    cond = scene.cond
    profile = cond["profile"]
    for kind_id in (_POINT, _GALAXY):
        idx = np.flatnonzero(profile == kind_id)
        if not idx.size:
            continue
        scene.dx[idx], scene.dy[idx] = _in_disc(rng, idx.size, c.max_centre_offset)
        if kind_id == _POINT:  # new light: not in a difference image's template
            scene.centre.append((idx, scene.psf(idx, scene.dx[idx], scene.dy[idx])))
            continue
        gal = _galaxy_params(rng, idx.size, c, c.centre_galaxy_re_max)
        truth[store.META_HALF_LIGHT_RADIUS][idx] = gal["r_e"] * np.sqrt(gal["q"])  # circularised
        truth["sersic_n"][idx], truth["axis_ratio"][idx] = gal["n"], gal["q"]
        scene.centre.append((idx, _shapes(scene, idx, scene.dx[idx], scene.dy[idx], gal)))
    idx = np.flatnonzero(profile == _SATURATED)
    if idx.size:
        scene.dx[idx], scene.dy[idx] = _in_disc(rng, idx.size, c.max_centre_offset)
        snr = _saturated_centre_stars(rng, scene, idx, scene.dx[idx], scene.dy[idx], c)
        cond["snr"][idx] = scene.snr_eff[idx] = snr
        scene.flux[idx] = snr * cond["sigma"][idx] / scene.psf_norm[idx]


def hard_negatives(rng: np.random.Generator, scene: Scene, c: SimConfig,
                    truth: dict[str, np.ndarray]) -> None:
    """Off-centre sources, streaks, hot pixels, cosmic rays and subtraction residuals.

    Off-centre sources, streaks, hot pixels and cosmic rays are drawn for every stamp whose
    ``companion`` says so, positives included (at their own SNR,
    :meth:`Scene.add_companion`); for negatives they are the stamp's kind and its truth
    (offset, flux, trail)."""
    cond = scene.cond
    kind, companion, labels = cond["kind"], cond["companion"], cond["labels"]
    idx = np.flatnonzero(companion == _OFFCENTRE_COMPANION)
    if idx.size:
        dx, dy = positions_outside(rng, idx.size, scene.shape, c.offcentre_min_distance)
        unit = render_psf(scene.shape, dx, dy, cond["fwhm"][idx], cond["beta"][idx],
                          cond["psf_e"][idx], cond["psf_pa"][idx])
        _add_off_centre(scene, idx, unit, dx, dy, labels[idx] == 0)
    idx = np.flatnonzero(companion == _STREAK_COMPANION)
    if idx.size:
        dx, dy = positions_outside(rng, idx.size, scene.shape, c.streak_min_offset)
        length = rng.uniform(c.streak_length_min, c.streak_length_max, idx.size)
        angle = rng.uniform(0.0, np.pi, idx.size)
        neg = labels[idx] == 0
        truth["trail_length"][idx[neg]], truth["trail_angle"][idx[neg]] = length[neg], angle[neg]
        unit = render_trail(scene.shape, dx, dy, cond["fwhm"][idx], length, angle)
        _add_off_centre(scene, idx, unit, dx, dy, neg)
    idx = np.flatnonzero(kind == _DIPOLE)
    if idx.size:
        # A visible dipole: a shift of at least 0.1 px, and a flux mismatch too small to
        # leave what looks like a faint source at the centre (at most a quarter of the
        # dipole's own amplitude, ~shift / PSF sigma), which would be a positive.
        cond["shift"][idx] = np.maximum(cond["shift"][idx], 0.1)
        psf_sigma = cond["fwhm"][idx] / 2.3548
        cond["mismatch"][idx] = np.clip(cond["mismatch"][idx], -0.25 * cond["shift"][idx] / psf_sigma,
                                        0.25 * cond["shift"][idx] / psf_sigma)
        scene.dx[idx] = rng.uniform(-c.artefact_max_offset, c.artefact_max_offset, idx.size)
        scene.dy[idx] = rng.uniform(-c.artefact_max_offset, c.artefact_max_offset, idx.size)
        scene.add(idx, _shapes(scene, idx, scene.dx[idx], scene.dy[idx]))
    _sharp_artefacts(rng, scene, c)


def _add_off_centre(scene: Scene, idx: np.ndarray, unit: np.ndarray, dx: np.ndarray,
                    dy: np.ndarray, negative: np.ndarray) -> None:
    """A negative's hard kind (its truth: where it lies) or a positive's companion."""
    neg, pos = idx[negative], idx[~negative]
    if neg.size:
        scene.dx[neg], scene.dy[neg] = dx[negative], dy[negative]
        scene.add(neg, unit[negative])
    if pos.size:
        scene.add_companion(pos, unit[~negative])


def _sharp_artefacts(rng: np.random.Generator, scene: Scene, c: SimConfig) -> None:
    """Hot pixels and cosmic rays: 1-3 sharp pixels, no PSF. Track k of stamp i: pixel
    (row0 + k*sy, col0 + k*sx) for k < length, clipped to the stamp."""
    h, w = scene.shape
    companion = scene.cond["companion"]
    idx = np.flatnonzero((companion == _HOT_COMPANION) | (companion == _COSMIC_COMPANION))
    if not idx.size:
        return
    m = idx.size
    row0 = _pixels_near_centre(rng, m, h, c.artefact_max_offset)
    col0 = _pixels_near_centre(rng, m, w, c.artefact_max_offset)
    cosmic = companion[idx] == _COSMIC_COMPANION
    steps = np.array([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)])
    sy, sx = steps[rng.integers(0, 8, m)].T
    length = np.where(cosmic, rng.integers(1, 4, m), 1)
    amp = np.where(cosmic[:, None], rng.uniform(0.5, 1.0, (m, 3)), 1.0)
    k = np.arange(3)[None, :]
    rows = row0[:, None] + k * sy[:, None]
    cols = col0[:, None] + k * sx[:, None]
    on = (k < length[:, None]) & (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    amp = np.where(on, amp, 0.0)
    unit = np.zeros((m, h, w), dtype=np.float32)
    which = np.broadcast_to(np.arange(m)[:, None], on.shape)[on]
    unit[which, rows[on], cols[on]] = (amp / amp.sum(axis=1, keepdims=True))[on]
    negative = scene.cond["labels"][idx] == 0
    _add_off_centre(scene, idx, unit, pixel_offsets(w)[col0], pixel_offsets(h)[row0], negative)


def field_population(rng: np.random.Generator, scene: Scene, c: SimConfig) -> FieldSources:
    """The field population of every stamp; returns the catalogue of those on the stamp.

    One number count from the faintest source counted to the brightest: the stars whose
    unclipped peak passes the full-well headroom are its bright end, saturated and bled by
    :func:`observe`, so their rate follows the field's density and the count's slope as on
    the sky (a sparse field rarely holds one, a crowded one often), and the stars between
    the faint field and saturation are there too. Sources beyond the edge, within
    ``field_margin`` px and at SNR >= ``field_margin_snr_min``, add their wings, halos and
    spikes (:func:`stampbatch.sim.field.draw_margin`). Whether bright stars show
    diffraction-like spikes is the telescope's optics, drawn per stamp (``spike_fraction``);
    a saturating point star on such a stamp has them (in difference images the template
    removes them).
    """
    cond, n = scene.cond, len(scene.flux)
    fs = draw_field(rng, cond["density"], cond["field_r_min"], scene.shape, c.field_snr_min,
                    c.field_snr_max, c.field_count_slope)
    galaxy = rng.random(len(fs)) < c.field_galaxy_fraction
    spiky = rng.random(n) < c.spike_fraction
    _render_field(rng, scene, fs, galaxy, spiky, c)
    beyond = draw_margin(rng, cond["density"], scene.shape, c.field_margin, c.field_snr_min,
                         c.field_snr_max, c.field_count_slope, c.field_margin_snr_min)
    if len(beyond):
        _render_field(rng, scene, beyond, rng.random(len(beyond)) < c.field_galaxy_fraction,
                      spiky, c)
    return fs


def _render_field(rng: np.random.Generator, scene: Scene, fs: FieldSources,
                  galaxy: np.ndarray, spiky: np.ndarray, c: SimConfig) -> None:
    """Put a catalogue of field sources (point sources, or galaxies where ``galaxy``) on the
    stamps, with spikes on the saturating point stars of ``spiky`` stamps."""
    cond = scene.cond
    for sel in (np.flatnonzero(~galaxy), np.flatnonzero(galaxy)):
        scene.check()
        if not sel.size:
            continue
        params = (_galaxy_params(rng, sel.size, c, c.galaxy_re_max)
                  if galaxy[sel[0]] else None)
        stamp = fs.stamp[sel]
        unit = _shapes(scene, stamp, fs.dx[sel], fs.dy[sel], params)
        flux = scene.field_flux(stamp, fs.snr[sel])
        if params is None:
            headroom = cond["saturation"][stamp] - cond["level"][stamp]
            spikes = np.flatnonzero(spiky[stamp] & (cond["background"][stamp] != _DIFFERENCE)
                                    & (flux * scene.psf_peak[stamp] >= headroom))
            if spikes.size:
                unit[spikes] += c.spike_strength * render_spikes(
                    scene.shape, fs.dx[sel[spikes]], fs.dy[sel[spikes]],
                    cond["fwhm"][stamp[spikes]], np.full(spikes.size, c.spike_length))
        scene.addfield_population(stamp, unit, flux)


def observe(rng: np.random.Generator, scene: Scene, c: SimConfig,
             truth: dict[str, np.ndarray]) -> np.ndarray:
    """Noise (with the signals' shot noise), sky, saturation and detector defects."""
    cond, shape = scene.cond, scene.shape
    n = len(scene.flux)
    scene.check()
    sigma32 = cond["sigma"].astype(np.float32)[:, None, None]
    stamps = backgrounds.noise(rng, cond["noise_corr"], shape) * sigma32
    if c.source_shot_noise:
        stamps *= np.sqrt(1.0 + np.abs(scene.signal) / sigma32**2)
    stamps += scene.signal
    sub = cond["background"] != _SCIENCE
    offset = np.where(sub, rng.uniform(-1.0, 1.0, n) * c.residual_sky_max, 0.0)
    slope = rng.uniform(0.0, c.sky_gradient_max, n)
    stamps += backgrounds.plane(shape, cond["level"] + offset * cond["sigma"],
                                slope * cond["sigma"], rng.uniform(0.0, 2.0 * np.pi, n))
    truth["sky_gradient"] = slope
    over = np.flatnonzero((cond["background"] != _DIFFERENCE)
                          & (stamps.max(axis=(1, 2)) >= cond["saturation"]))
    if over.size:
        stamps[over] = saturate(stamps[over], cond["saturation"][over])
    hot = cond["level"] + cond["sigma"] * rng.uniform(10.0, 100.0, n)
    truth["bad_column"] = backgrounds.bad_columns(
        rng, stamps, np.flatnonzero(rng.random(n) < c.bad_column_fraction), hot)
    truth["n_masked"] = backgrounds.mask_pixels(
        rng, stamps, np.flatnonzero(rng.random(n) < c.masked_fraction), c.mask_max_size,
        rng.random(n) < c.masked_nan_fraction)
    if c.detector_edge_fraction > 0:   # drawn last: a config without edges keeps its draws
        truth["n_masked"] += backgrounds.detector_edge(
            rng, stamps, np.flatnonzero(rng.random(n) < c.detector_edge_fraction))
    return stamps
