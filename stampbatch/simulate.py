"""Simulated survey stamps: a centred source or not, in a field of other sources.

A shift-and-stack search co-adds ``n_coadd`` exposures along each candidate trajectory;
every trajectory yields one stamp (21x21 by default), and every real cut-out lies in a
field of stars and galaxies. Class 1 is a source at the stamp centre (within
``max_centre_offset`` px); class 0 is anything else. **The label depends only on what sits
at the centre**: both classes carry the same field population (:mod:`stampbatch.field`),
the same backgrounds and detector defects (:mod:`stampbatch.backgrounds`), and negatives
may hold *hard negatives* — an off-centre source, a hot pixel, a cosmic ray, a partial
streak of a moving object, or a bright star badly subtracted in a difference image
(``dipole``). Source shapes come from :mod:`stampbatch.profiles`.

Units and noise model
---------------------
Stamps are in electrons (gain 1) and are the *sum* of ``n_coadd`` exposures of sky ``s``
(e-/px) and read noise ``r`` (e-), so the per-pixel background noise is

    sigma = sqrt(n * (s + r**2))                      (Poisson sky + Gaussian read noise)

drawn as a Gaussian, white or (a ``correlated_noise_fraction`` of stamps) correlated as in
resampled co-adds. Every signal adds its own shot noise (``source_shot_noise``): the noise
there is ``sqrt(sigma^2 + |signal|)`` times the same unit noise.

Kinds of background (``meta["background"]``)
--------------------------------------------
* ``science``: the sky level ``n*s`` kept, plus a gradient (up to ``sky_gradient_max``
  sigma per px), the full field population.
* ``sky_subtracted``: the level removed imperfectly (a residual offset up to
  ``residual_sky_max`` sigma and a gradient), the full field population.
* ``difference``: a difference image: the static field is subtracted with a template
  misregistered by up to ``misregistration_max`` px and mis-scaled by up to
  ``flux_mismatch_max``, so field sources leave dipole residuals; positives here are
  point sources (transients, moving objects).

Centre sources (``meta["profile"]``: ``point``, ``galaxy``, ``saturated``; ``none`` for
negatives): a PSF; a compact Sérsic galaxy (``centre_galaxy_fraction`` of the positives
outside difference images, half-light radius ``galaxy_re_min``-``centre_galaxy_re_max``
px); or a saturated star (``centre_saturated_fraction``), clipped at the co-add's full well
``n * full_well`` (less the sky where it was subtracted) with a bleed trail along its
column and, for ``spike_fraction`` of them, diffraction-like spikes. Field sources are
point sources or, for ``field_galaxy_fraction``, Sérsic galaxies; ``bright_star_fraction``
of the stamps also hold a saturated star somewhere outside the centring disc.

PSF: per stamp a FWHM in ``[fwhm_min, fwhm_max]`` px and, with probability
``moffat_fraction``, a Moffat profile (``beta`` in ``[moffat_beta_min, moffat_beta_max]``),
otherwise a Gaussian.

SNR (the meaning of the ``snr`` column)
---------------------------------------
The SNR of a signal of total flux ``F`` and unit-flux shape ``P`` as rendered on the
stamp is its matched-filter (optimal, background-limited) SNR, ``F * sqrt(sum P**2) /
sigma`` — the expectation of :func:`matched_filter_snr` for that shape. The flux is chosen
from the SNR drawn (log-uniform in ``[snr_min, snr_max]``). For a saturated centre star
it is that of the unclipped star. It ignores the source's own shot noise and pixel
correlation: the significance against the true noise of that filter on correlated-noise
stamps is ``snr_eff``. Field sources have a *point-source* SNR (their flux times the norm
of the stamp's centred PSF over sigma), drawn from the number counts.

Kinds of stamp (``meta["kind"]``)
---------------------------------
``source`` (label 1); ``background`` (nothing at the centre); ``offcentre`` (a PSF source
farther than ``offcentre_min_distance`` px); ``hot_pixel`` (one pixel within
``artefact_max_offset`` px per axis of the centre); ``cosmic_ray`` (a 1-3 px track starting
there); ``streak`` (a trailed PSF whose midpoint lies at least ``streak_min_offset`` px from
the centre); ``dipole`` (a difference-image residual of a star within
``artefact_max_offset`` px of the centre). Hard-negative fractions are fractions of the
negatives; the rest are ``background``.

Metadata columns (``/meta`` in the store; names in :mod:`stampbatch.store`)
---------------------------------------------------------------------------
``snr``, ``snr_eff``, ``kind``, ``profile``, ``background``, ``psf_fwhm``, ``psf_beta``
(NaN: Gaussian), ``dx``, ``dy`` (px from the centre of the signal that made the kind; NaN
for background), ``flux``, ``sky``, ``sky_subtracted``, ``sigma``, ``read_noise``,
``n_coadd``, ``noise_corr``, ``trail_length``, ``trail_angle``, ``half_light_radius``,
``sersic_n``, ``axis_ratio`` (centre galaxies; NaN otherwise), ``n_field`` (field sources
on the stamp, bright stars included), ``nn_distance`` and ``nn_snr`` (the field source
nearest the centre; NaN without one), ``field_density`` (per 100 px^2),
``saturation`` (the clip level in stamp units), ``bad_column`` (-1: none), ``n_masked``.
Candidate files (no ``/labels``) also hold ``true_label``.

:func:`neighbour_free_config` gives the simulator of earlier releases (no field, no
galaxies, no saturation, no sky residuals or defects) for comparisons.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stampbatch import backgrounds, store
from stampbatch.errors import UsageError
from stampbatch.field import FieldSources, draw_field, nearest
from stampbatch.profiles import (
    pixel_offsets,
    render_psf,
    render_sersic,
    render_spikes,
    render_trail,
    saturate,
)
from stampbatch.progress import Progress

__all__ = ["KINDS", "PROFILES", "BACKGROUNDS", "SimConfig", "SimConfigError", "SimulatedBatch",
           "matched_filter_snr", "neighbour_free_config", "render_psf", "render_trail",
           "simulate_stamps", "write_simulated", "block_rng", "iter_blocks"]

KINDS = ("source", "background", "offcentre", "hot_pixel", "cosmic_ray", "streak", "dipole")
PROFILES = ("none", "point", "galaxy", "saturated")
BACKGROUNDS = ("science", "sky_subtracted", "difference")
_KIND_BYTES = f"S{max(len(k) for k in KINDS + PROFILES + BACKGROUNDS)}"  # fixed width
_SOURCE, _BACKGROUND, _OFFCENTRE, _HOT, _COSMIC, _STREAK, _DIPOLE = range(len(KINDS))
_NONE, _POINT, _GALAXY, _SATURATED = range(len(PROFILES))
_SCIENCE, _SKYSUB, _DIFFERENCE = range(len(BACKGROUNDS))

# Stamps simulated per random block. Block b draws from SeedSequence(seed, spawn_key=(b,)),
# i.e. SeedSequence(seed).spawn(...)[b], so a file's contents depend on (seed, config, n)
# only — not on the HDF5 chunk size. Changing this constant changes every simulated file.
SIM_BLOCK_ROWS = 16384

_FRACTIONS = ("source_fraction", "moffat_fraction", "sky_subtracted_fraction",
              "difference_fraction", "correlated_noise_fraction", "field_galaxy_fraction",
              "galaxy_devaucouleurs_fraction", "centre_galaxy_fraction",
              "centre_saturated_fraction", "bright_star_fraction", "spike_fraction",
              "bad_column_fraction", "masked_fraction", "masked_nan_fraction",
              "offcentre_fraction", "hot_pixel_fraction", "cosmic_ray_fraction",
              "streak_fraction", "dipole_fraction")
_HARD = _FRACTIONS[-5:]


class SimConfigError(UsageError, ValueError):
    """Simulator settings that cannot work (a ValueError, so config loading reports it)."""


@dataclass
class SimConfig:
    """Settings of the stamp simulator; every field has a default and is checked by validate().

    Where the defaults come from: FWHM 2-6 px spans ZTF (1"/px, 2" seeing) to DECam
    (0.263"/px) in poor seeing; field densities 0.02-3 sources per 100 px^2 span ~1e4/deg^2
    at high latitude (ZTF depth) to ~1e7/deg^2 in the Galactic bulge (DECam pixels), i.e.
    ~0.1 to ~13 sources per 21x21 stamp, log-uniform; ``N(>S) ∝ S^-0.6`` (d log N / dm =
    0.24) is the faint star counts' slope away from the plane (Euclidean would be 1.5);
    galaxy half-light radii 0.5-4 px are faint galaxies at 0.26-1"/px; a
    full well of 1e5 e- per exposure is typical of thick CCDs.
    """

    stamp_shape: tuple[int, int] = (21, 21)  # stamp height, width in px
    source_fraction: float = 0.5  # fraction of stamps with a centred source (label 1)
    snr_min: float = 3.0  # lowest matched-filter SNR of injected signals (log-uniform)
    snr_max: float = 100.0  # highest matched-filter SNR of injected signals
    fwhm_min: float = 2.0  # narrowest PSF FWHM, px (ZTF-like seeing)
    fwhm_max: float = 6.0  # widest PSF FWHM, px (DECam in bad seeing)
    moffat_fraction: float = 0.5  # fraction of stamps with a Moffat PSF (rest Gaussian)
    moffat_beta_min: float = 2.5  # Moffat beta range (must exceed 1 for finite flux)
    moffat_beta_max: float = 5.0  # 4.765 is the Kolmogorov-turbulence value
    max_centre_offset: float = 0.5  # largest offset of a positive from the centre, px
    sky_subtracted_fraction: float = 0.6  # stamps with the sky level removed
    difference_fraction: float = 0.5  # of the sky-subtracted stamps: difference images
    sky_min: float = 50.0  # sky per exposure, e-/px, log-uniform (must be > 0)
    sky_max: float = 5000.0  # sky per exposure, e-/px
    read_noise_min: float = 2.0  # read noise per exposure, e-, uniform
    read_noise_max: float = 10.0  # read noise per exposure, e-
    n_coadd_min: int = 3  # fewest exposures (nights) co-added along a trajectory
    n_coadd_max: int = 20  # most exposures co-added
    source_shot_noise: bool = True  # add every signal's own Poisson noise
    correlated_noise_fraction: float = 0.3  # fraction of resampled co-adds (correlated noise)
    noise_corr_min: float = 0.05  # neighbour weight c of the [c,1,c] noise kernel, lowest
    noise_corr_max: float = 0.3  # c = 0.3: neighbour correlation 0.51, as bilinear resampling
    sky_gradient_max: float = 0.1  # sky gradient across a stamp, sigma per px (uniform 0..max)
    residual_sky_max: float = 0.5  # sky left after subtraction, sigma (uniform -max..max)
    misregistration_max: float = 0.3  # template shift of difference images, px (0..max)
    flux_mismatch_max: float = 0.05  # template flux-scaling error of difference images (+-)
    field_density_min: float = 0.02  # field sources per 100 px^2, sparsest (0 and 0: no field)
    field_density_max: float = 3.0  # most crowded; log-uniform per stamp in between
    field_snr_min: float = 2.0  # faintest field source, point-source SNR
    field_snr_max: float = 1000.0  # brightest (unsaturated) field source
    field_count_slope: float = 0.6  # N(>S) ∝ S^-slope
    field_min_distance: float = 3.0  # field sources lie at least this far from the centre, px
    field_min_distance_fwhm: float = 1.0  # ... and at least this many FWHM
    field_galaxy_fraction: float = 0.3  # fraction of field sources that are galaxies
    galaxy_re_min: float = 0.5  # galaxy half-light radius (semi-major), px, log-uniform
    galaxy_re_max: float = 4.0
    galaxy_devaucouleurs_fraction: float = 0.3  # Sérsic n = 4 (the rest n = 1, exponential)
    galaxy_axis_ratio_min: float = 0.3  # axis ratio b/a uniform in [min, 1]
    centre_galaxy_fraction: float = 0.25  # of positives outside difference images
    centre_galaxy_re_max: float = 2.0  # centre galaxies are compact: r_e up to this, px
    centre_saturated_fraction: float = 0.03  # of positives outside difference images
    bright_star_fraction: float = 0.05  # stamps with a saturated star in the field
    full_well: float = 1.0e5  # e- per exposure; the co-add saturates at n_coadd times this
    saturation_min: float = 1.2  # unclipped peak / full-well headroom of saturated stars
    saturation_max: float = 30.0  # (log-uniform)
    spike_fraction: float = 0.5  # of saturated stars: with diffraction-like spikes
    spike_strength: float = 0.03  # fraction of the star's flux in its spikes
    spike_length: float = 5.0  # e-folding length of a spike, px
    bad_column_fraction: float = 0.02  # stamps with a dead or hot column
    masked_fraction: float = 0.02  # stamps with a block of masked pixels
    masked_nan_fraction: float = 0.0  # of those: NaN instead of 0 (training skips NaN stamps)
    mask_max_size: int = 3  # masked blocks are 1..this px a side
    offcentre_fraction: float = 0.15  # fraction of negatives with an off-centre source
    hot_pixel_fraction: float = 0.1  # fraction of negatives with a single hot pixel
    cosmic_ray_fraction: float = 0.1  # fraction of negatives with a 1-3 px cosmic-ray track
    streak_fraction: float = 0.1  # fraction of negatives with a partial streak
    dipole_fraction: float = 0.1  # fraction of negatives with a subtraction residual
    offcentre_min_distance: float = 6.0  # off-centre sources lie farther than this, px
    artefact_max_offset: float = 3.0  # hot pixels/cosmic rays/dipoles within this, px per axis
    streak_length_min: float = 8.0  # shortest streak (trail) length, px
    streak_length_max: float = 40.0  # longest streak length, px
    streak_min_offset: float = 3.0  # streak midpoints lie at least this far from the centre, px

    def validate(self) -> None:
        """Raise SimConfigError (a ValueError) naming the first bad setting."""
        shape = tuple(self.stamp_shape)
        if len(shape) != 2 or not all(isinstance(v, int | np.integer) and v >= 5 for v in shape):
            raise SimConfigError(f"stamp_shape must be two integers >= 5, got {self.stamp_shape!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SimConfigError(f"{f.name} must be finite, got {value}")
        for name in _FRACTIONS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise SimConfigError(f"{name} must lie in [0, 1], got {value}")
        hard = sum(getattr(self, n) for n in _HARD)
        if hard > 1.0 + 1e-9:
            raise SimConfigError(f"{' + '.join(_HARD)} = {hard:g} exceeds 1 (they are fractions "
                                 f"of the negatives)")
        for stem, floor, strict in (("snr", 0.0, True), ("fwhm", 0.0, True),
                                    ("moffat_beta", 1.0, True), ("sky", 0.0, True),
                                    ("read_noise", 0.0, False), ("n_coadd", 1, False),
                                    ("noise_corr", 0.0, False), ("streak_length", 0.0, True),
                                    ("field_snr", 0.0, True), ("galaxy_re", 0.0, True),
                                    ("saturation", 1.0, True)):
            self._check_range(stem, floor, strict=strict)
        if not (isinstance(self.n_coadd_min, int) and isinstance(self.n_coadd_max, int)):
            raise SimConfigError("n_coadd_min and n_coadd_max must be integers")
        if self.noise_corr_max > 1.0:
            raise SimConfigError(f"noise_corr_max must be at most 1, got {self.noise_corr_max}")
        self._check_field_and_sizes(shape)

    def _check_field_and_sizes(self, shape: tuple[int, ...]) -> None:
        for name in ("sky_gradient_max", "residual_sky_max", "misregistration_max",
                     "flux_mismatch_max", "field_min_distance", "field_min_distance_fwhm",
                     "spike_strength", "max_centre_offset", "offcentre_min_distance",
                     "artefact_max_offset", "streak_min_offset", "field_density_min"):
            if getattr(self, name) < 0:
                raise SimConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("full_well", "spike_length", "field_count_slope"):
            if getattr(self, name) <= 0:
                raise SimConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not (isinstance(self.mask_max_size, int) and self.mask_max_size >= 1):
            raise SimConfigError(f"mask_max_size must be an integer >= 1, got {self.mask_max_size}")
        if self.field_density_max > 0 and self.field_density_min <= 0:
            raise SimConfigError("field_density_min must be > 0 when field_density_max > 0 "
                                 "(densities are log-uniform); set both to 0 for no field")
        if self.field_density_min > self.field_density_max:
            raise SimConfigError(f"field_density_min ({self.field_density_min}) must not exceed "
                                 f"field_density_max ({self.field_density_max})")
        if not self.galaxy_axis_ratio_min > 0 or self.galaxy_axis_ratio_min > 1:
            raise SimConfigError(f"galaxy_axis_ratio_min must lie in (0, 1], got "
                                 f"{self.galaxy_axis_ratio_min}")
        if self.centre_galaxy_re_max < self.galaxy_re_min:
            raise SimConfigError(f"centre_galaxy_re_max ({self.centre_galaxy_re_max}) must not "
                                 f"be below galaxy_re_min ({self.galaxy_re_min})")
        half = min(shape) / 2.0
        field_r = max(self.field_min_distance, self.field_min_distance_fwhm * self.fwhm_max)
        for name, value, used in (
                ("max_centre_offset", self.max_centre_offset, self.source_fraction > 0),
                ("offcentre_min_distance", self.offcentre_min_distance,
                 self.offcentre_fraction > 0),
                ("artefact_max_offset", self.artefact_max_offset,
                 self.hot_pixel_fraction + self.cosmic_ray_fraction + self.dipole_fraction > 0),
                ("streak_min_offset", self.streak_min_offset, self.streak_fraction > 0),
                ("field_min_distance (or field_min_distance_fwhm * fwhm_max)", field_r,
                 self.field_density_max > 0 or self.bright_star_fraction > 0)):
            if used and value >= half:
                raise SimConfigError(f"{name} = {value} px does not fit a "
                                     f"{shape[0]}x{shape[1]} stamp (must be < {half:g})")
        if self.offcentre_fraction > 0 and self.offcentre_min_distance <= self.max_centre_offset:
            raise SimConfigError(
                f"offcentre_min_distance ({self.offcentre_min_distance}) must exceed "
                f"max_centre_offset ({self.max_centre_offset}): off-centre negatives would "
                f"look like positives")
        if field_r <= self.max_centre_offset:
            raise SimConfigError(f"field_min_distance ({field_r:g} px) must exceed "
                                 f"max_centre_offset ({self.max_centre_offset}): field sources "
                                 f"would sit at the centre")

    def _check_range(self, stem: str, floor: float, *, strict: bool) -> None:
        lo, hi = getattr(self, f"{stem}_min"), getattr(self, f"{stem}_max")
        if (lo <= floor) if strict else (lo < floor):
            relation = ">" if strict else ">="
            raise SimConfigError(f"{stem}_min must be {relation} {floor:g}, got {lo}")
        if lo > hi:
            raise SimConfigError(f"{stem}_min ({lo}) must not exceed {stem}_max ({hi})")

    def to_json(self) -> str:
        """The settings as a JSON object (kept in the store's root attributes)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


NEIGHBOUR_FREE = {
    "sky_subtracted_fraction": 0.5, "difference_fraction": 0.0, "sky_gradient_max": 0.0,
    "residual_sky_max": 0.0, "field_density_min": 0.0, "field_density_max": 0.0,
    "centre_galaxy_fraction": 0.0, "centre_saturated_fraction": 0.0,
    "bright_star_fraction": 0.0, "bad_column_fraction": 0.0, "masked_fraction": 0.0,
    "dipole_fraction": 0.0,
}


def neighbour_free_config(**changes) -> SimConfig:
    """The earlier default simulator: isolated point sources on clean backgrounds."""
    return dataclasses.replace(SimConfig(), **{**NEIGHBOUR_FREE, **changes})


@dataclass
class SimulatedBatch:
    """Simulated stamps with their labels and per-stamp truth."""

    stamps: np.ndarray  # float32 (n, H, W), electrons
    labels: np.ndarray  # int8 (n,), 1 = centred source
    meta: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.stamps.shape[0])


def matched_filter_snr(stamps: np.ndarray, shapes: np.ndarray, sigma: np.ndarray,
                       background: np.ndarray | float = 0.0) -> np.ndarray:
    """The matched-filter statistic of each stamp for a known signal shape, in sigma units.

    ``sum_i P_i (stamp_i - background) / (sigma * sqrt(sum_i P_i**2))``; its expectation is
    the SNR this module defines, its spread 1 for white background noise.
    """
    stamps = np.asarray(stamps, np.float64)
    shapes = np.asarray(shapes, np.float64)
    bg = np.asarray(background, np.float64).reshape(-1, 1, 1) if np.ndim(background) else background
    resp = np.einsum("nij,nij->n", shapes, stamps - bg)
    return resp / (np.asarray(sigma, np.float64) * np.sqrt(np.einsum("nij,nij->n", shapes, shapes)))


# --------------------------------------------------------------------------- simulation


def _log_uniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
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


def _conditions(rng: np.random.Generator, n: int, c: SimConfig) -> dict[str, np.ndarray]:
    """Per-stamp class, kind, profile, background and observing conditions."""
    labels = (rng.random(n) < c.source_fraction).astype(np.int8)
    edges = np.cumsum([getattr(c, name) for name in _HARD])
    neg = np.array([_OFFCENTRE, _HOT, _COSMIC, _STREAK, _DIPOLE, _BACKGROUND], dtype=np.int8)
    kind = neg[np.searchsorted(edges, rng.random(n), side="right")]
    kind[labels == 1] = _SOURCE
    sub = rng.random(n) < c.sky_subtracted_fraction
    diff = sub & (rng.random(n) < c.difference_fraction)
    diff |= kind == _DIPOLE  # subtraction residuals exist only in difference images
    sub |= diff
    background = np.where(diff, _DIFFERENCE, np.where(sub, _SKYSUB, _SCIENCE)).astype(np.int8)
    u = rng.random(n)
    profile = np.where(u < c.centre_galaxy_fraction, _GALAXY,
                       np.where(u < c.centre_galaxy_fraction + c.centre_saturated_fraction,
                                _SATURATED, _POINT)).astype(np.int8)
    profile[background == _DIFFERENCE] = _POINT
    profile[labels == 0] = _NONE
    n_coadd = rng.integers(c.n_coadd_min, c.n_coadd_max + 1, n)
    sky_exp = _log_uniform(rng, c.sky_min, c.sky_max, n)
    read_noise = rng.uniform(c.read_noise_min, c.read_noise_max, n)
    sky = n_coadd * sky_exp
    level = np.where(sub, 0.0, sky)  # the background level the stamp keeps
    density = (_log_uniform(rng, c.field_density_min, c.field_density_max, n)
               if c.field_density_max > 0 else np.zeros(n))
    fwhm = rng.uniform(c.fwhm_min, c.fwhm_max, n)
    return {
        "labels": labels, "kind": kind, "background": background, "profile": profile,
        "fwhm": fwhm, "n_coadd": n_coadd, "sky": sky, "read_noise": read_noise, "level": level,
        "beta": np.where(rng.random(n) < c.moffat_fraction,
                         rng.uniform(c.moffat_beta_min, c.moffat_beta_max, n), np.nan),
        "sigma": np.sqrt(n_coadd * (sky_exp + read_noise**2)),
        "noise_corr": np.where(rng.random(n) < c.correlated_noise_fraction,
                               rng.uniform(c.noise_corr_min, c.noise_corr_max, n), 0.0),
        "snr": np.where(kind == _BACKGROUND, 0.0, _log_uniform(rng, c.snr_min, c.snr_max, n)),
        "density": density,
        "field_r_min": np.maximum(c.field_min_distance, c.field_min_distance_fwhm * fwhm),
        "saturation": n_coadd * c.full_well - np.where(sub, sky, 0.0),
        "shift": rng.uniform(0.0, c.misregistration_max, n),
        "shift_angle": rng.uniform(0.0, 2.0 * np.pi, n),
        "mismatch": rng.uniform(-c.flux_mismatch_max, c.flux_mismatch_max, n),
    }


class _Scene:
    """The noiseless signal of every stamp, built up source by source, and its truth."""

    def __init__(self, n: int, shape: tuple[int, int], cond: dict[str, np.ndarray]) -> None:
        self.shape = shape
        self.cond = cond
        self.signal = np.zeros((n, *shape), dtype=np.float32)
        self.flux = np.zeros(n)
        self.snr_eff = cond["snr"].copy()
        self.dx = np.full(n, np.nan)
        self.dy = np.full(n, np.nan)
        self.psf_norm = np.sqrt(np.einsum(
            "nij,nij->n", *(2 * [render_psf(shape, np.zeros(n), np.zeros(n), cond["fwhm"],
                                            cond["beta"])]), dtype=np.float64))

    def residual_shift(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, a = self.cond["shift"][idx], self.cond["shift_angle"][idx]
        return s * np.cos(a), s * np.sin(a)

    def add(self, idx: np.ndarray, unit: np.ndarray) -> None:
        """The centre (or hard-negative) signal: unit shapes scaled to the stamps' SNR."""
        c = self.cond
        norm = np.sqrt(np.einsum("nij,nij->n", unit, unit, dtype=np.float64))
        f = c["snr"][idx] * c["sigma"][idx] / norm
        self.flux[idx] = f
        corr = np.flatnonzero(c["noise_corr"][idx] > 0)
        if corr.size:
            self.snr_eff[idx[corr]] = c["snr"][idx[corr]] * norm[corr] / backgrounds.filter_noise(
                unit[corr], c["noise_corr"][idx[corr]])
        self.signal[idx] += unit * f.astype(np.float32)[:, None, None]

    def add_field(self, stamp: np.ndarray, unit: np.ndarray, snr: np.ndarray) -> None:
        """Field sources: unit shapes at a point-source SNR (several per stamp allowed)."""
        f = snr * self.cond["sigma"][stamp] / self.psf_norm[stamp]
        np.add.at(self.signal, stamp, unit * f.astype(np.float32)[:, None, None])


def _galaxy_params(rng: np.random.Generator, k: int, c: SimConfig,
                   re_max: float) -> dict[str, np.ndarray]:
    return {"r_e": _log_uniform(rng, c.galaxy_re_min, re_max, k),
            "n": np.where(rng.random(k) < c.galaxy_devaucouleurs_fraction, 4.0, 1.0),
            "q": rng.uniform(c.galaxy_axis_ratio_min, 1.0, k),
            "pa": rng.uniform(0.0, np.pi, k)}


def _shapes(scene: _Scene, stamp: np.ndarray, dx: np.ndarray, dy: np.ndarray,
            galaxy: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Unit-flux shapes of point sources (or galaxies) on the given stamps; on difference
    images what their subtraction leaves (the misregistered, mis-scaled template)."""
    c = scene.cond
    fwhm, beta = c["fwhm"][stamp], c["beta"][stamp]

    def render(x: np.ndarray, y: np.ndarray, sel: np.ndarray) -> np.ndarray:
        if galaxy is None:
            return render_psf(scene.shape, x, y, fwhm[sel], beta[sel])
        return render_sersic(scene.shape, x, y, galaxy["r_e"][sel], galaxy["n"][sel],
                             galaxy["q"][sel], galaxy["pa"][sel], fwhm[sel], beta[sel])

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


def _bright_stars(rng: np.random.Generator, scene: _Scene, idx: np.ndarray, dx: np.ndarray,
                  dy: np.ndarray, c: SimConfig) -> np.ndarray:
    """Saturating stars at (dx, dy) on stamps ``idx``; returns their point-source SNR.

    The flux puts the unclipped peak at ``saturation_min``-``saturation_max`` times the
    headroom between the background level and the full well.
    """
    cond = scene.cond
    unit = _shapes(scene, idx, dx, dy)
    peak_unit = render_psf(scene.shape, dx, dy, cond["fwhm"][idx], cond["beta"][idx]).max(
        axis=(1, 2)).astype(np.float64)
    headroom = cond["saturation"][idx] - cond["level"][idx]
    flux = _log_uniform(rng, c.saturation_min, c.saturation_max, idx.size) * headroom / peak_unit
    spiky = np.flatnonzero(rng.random(idx.size) < c.spike_fraction)
    if spiky.size:
        unit[spiky] += c.spike_strength * render_spikes(
            scene.shape, dx[spiky], dy[spiky], cond["fwhm"][idx[spiky]],
            np.full(spiky.size, c.spike_length))
    np.add.at(scene.signal, idx, unit * flux.astype(np.float32)[:, None, None])
    return flux * scene.psf_norm[idx] / cond["sigma"][idx]


def _centre_sources(rng: np.random.Generator, scene: _Scene, c: SimConfig,
                    truth: dict[str, np.ndarray]) -> None:
    """Positives at the centre: point sources, compact galaxies, saturated stars."""
    cond = scene.cond
    profile = cond["profile"]
    for kind_id in (_POINT, _GALAXY):
        idx = np.flatnonzero(profile == kind_id)
        if not idx.size:
            continue
        scene.dx[idx], scene.dy[idx] = _in_disc(rng, idx.size, c.max_centre_offset)
        if kind_id == _POINT:  # new light: not in a difference image's template
            scene.add(idx, render_psf(scene.shape, scene.dx[idx], scene.dy[idx],
                                      cond["fwhm"][idx], cond["beta"][idx]))
            continue
        gal = _galaxy_params(rng, idx.size, c, c.centre_galaxy_re_max)
        truth["half_light_radius"][idx] = gal["r_e"] * np.sqrt(gal["q"])  # circularised
        truth["sersic_n"][idx], truth["axis_ratio"][idx] = gal["n"], gal["q"]
        scene.add(idx, _shapes(scene, idx, scene.dx[idx], scene.dy[idx], gal))
    idx = np.flatnonzero(profile == _SATURATED)
    if idx.size:
        scene.dx[idx], scene.dy[idx] = _in_disc(rng, idx.size, c.max_centre_offset)
        snr = _bright_stars(rng, scene, idx, scene.dx[idx], scene.dy[idx], c)
        cond["snr"][idx] = scene.snr_eff[idx] = snr
        scene.flux[idx] = snr * cond["sigma"][idx] / scene.psf_norm[idx]


def _hard_negatives(rng: np.random.Generator, scene: _Scene, c: SimConfig,
                    truth: dict[str, np.ndarray]) -> None:
    """Off-centre sources, streaks, hot pixels, cosmic rays and subtraction residuals."""
    cond = scene.cond
    kind = cond["kind"]
    idx = np.flatnonzero(kind == _OFFCENTRE)
    if idx.size:
        scene.dx[idx], scene.dy[idx] = positions_outside(rng, idx.size, scene.shape,
                                                          c.offcentre_min_distance)
        scene.add(idx, render_psf(scene.shape, scene.dx[idx], scene.dy[idx], cond["fwhm"][idx],
                                  cond["beta"][idx]))
    idx = np.flatnonzero(kind == _STREAK)
    if idx.size:
        scene.dx[idx], scene.dy[idx] = positions_outside(rng, idx.size, scene.shape,
                                                          c.streak_min_offset)
        truth["trail_length"][idx] = rng.uniform(c.streak_length_min, c.streak_length_max,
                                                 idx.size)
        truth["trail_angle"][idx] = rng.uniform(0.0, np.pi, idx.size)
        scene.add(idx, render_trail(scene.shape, scene.dx[idx], scene.dy[idx], cond["fwhm"][idx],
                                    truth["trail_length"][idx], truth["trail_angle"][idx]))
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


def _sharp_artefacts(rng: np.random.Generator, scene: _Scene, c: SimConfig) -> None:
    """Hot pixels and cosmic rays: 1-3 sharp pixels, no PSF. Track k of stamp i: pixel
    (row0 + k*sy, col0 + k*sx) for k < length, clipped to the stamp."""
    h, w = scene.shape
    kind = scene.cond["kind"]
    idx = np.flatnonzero((kind == _HOT) | (kind == _COSMIC))
    if not idx.size:
        return
    m = idx.size
    row0 = _pixels_near_centre(rng, m, h, c.artefact_max_offset)
    col0 = _pixels_near_centre(rng, m, w, c.artefact_max_offset)
    cosmic = kind[idx] == _COSMIC
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
    scene.add(idx, unit)
    scene.dx[idx] = pixel_offsets(w)[col0]
    scene.dy[idx] = pixel_offsets(h)[row0]


def _field(rng: np.random.Generator, scene: _Scene, c: SimConfig) -> FieldSources:
    """The field population and bright stars of every stamp; returns the whole catalogue."""
    cond, n = scene.cond, len(scene.flux)
    fs = draw_field(rng, cond["density"], cond["field_r_min"], scene.shape, c.field_snr_min,
                    c.field_snr_max, c.field_count_slope)
    galaxy = rng.random(len(fs)) < c.field_galaxy_fraction
    for sel in (np.flatnonzero(~galaxy), np.flatnonzero(galaxy)):
        if not sel.size:
            continue
        params = (_galaxy_params(rng, sel.size, c, c.galaxy_re_max)
                  if galaxy[sel[0]] else None)
        unit = _shapes(scene, fs.stamp[sel], fs.dx[sel], fs.dy[sel], params)
        scene.add_field(fs.stamp[sel], unit, fs.snr[sel])
    bright = np.flatnonzero(rng.random(n) < c.bright_star_fraction)
    if bright.size:
        bdx, bdy = positions_outside(rng, bright.size, scene.shape, cond["field_r_min"][bright])
        bsnr = _bright_stars(rng, scene, bright, bdx, bdy, c)
        fs = FieldSources(stamp=np.concatenate([fs.stamp, bright]),
                          dx=np.concatenate([fs.dx, bdx]), dy=np.concatenate([fs.dy, bdy]),
                          snr=np.concatenate([fs.snr, bsnr]))
    return fs


def _observe(rng: np.random.Generator, scene: _Scene, c: SimConfig,
             truth: dict[str, np.ndarray]) -> np.ndarray:
    """Noise (with the signals' shot noise), sky, saturation and detector defects."""
    cond, shape = scene.cond, scene.shape
    n = len(scene.flux)
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
    return stamps


def simulate_stamps(n: int, config: SimConfig | None = None,
                    rng: np.random.Generator | int | None = None) -> SimulatedBatch:
    """Simulate ``n`` stamps in memory (vectorised over stamps).

    ``rng`` is a numpy Generator (or a seed). See the module docstring for the model, the
    SNR definition and the metadata columns.
    """
    config = SimConfig() if config is None else config
    config.validate()
    if n < 0:
        raise SimConfigError(f"number of stamps must be >= 0, got {n}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    shape = (int(config.stamp_shape[0]), int(config.stamp_shape[1]))
    cond = _conditions(rng, n, config)
    scene = _Scene(n, shape, cond)
    truth = {name: np.full(n, np.nan) for name in ("half_light_radius", "sersic_n", "axis_ratio")}
    truth["trail_length"] = np.zeros(n)
    truth["trail_angle"] = np.full(n, np.nan)
    _centre_sources(rng, scene, config, truth)
    _hard_negatives(rng, scene, config, truth)
    fs = _field(rng, scene, config)
    stamps = _observe(rng, scene, config, truth)
    n_field, nn_distance, nn_snr = nearest(fs, n)
    f32 = np.float32
    meta = {
        "snr": cond["snr"].astype(f32), "kind": np.asarray(KINDS)[cond["kind"]],
        "profile": np.asarray(PROFILES)[cond["profile"]],
        "background": np.asarray(BACKGROUNDS)[cond["background"]],
        "psf_fwhm": cond["fwhm"].astype(f32), "psf_beta": cond["beta"].astype(f32),
        "dx": scene.dx.astype(f32), "dy": scene.dy.astype(f32),
        "snr_eff": scene.snr_eff.astype(f32), "flux": scene.flux.astype(f32),
        "sky": cond["sky"].astype(f32), "sky_subtracted": cond["background"] != _SCIENCE,
        "sigma": cond["sigma"].astype(f32), "read_noise": cond["read_noise"].astype(f32),
        "n_coadd": cond["n_coadd"].astype(np.int16), "noise_corr": cond["noise_corr"].astype(f32),
        "n_field": n_field.astype(np.int16), "nn_distance": nn_distance.astype(f32),
        "nn_snr": nn_snr.astype(f32), "field_density": cond["density"].astype(f32),
        "saturation": cond["saturation"].astype(f32),
        **{k: (v.astype(f32) if v.dtype.kind == "f" else v) for k, v in truth.items()},
    }
    return SimulatedBatch(stamps=stamps, labels=cond["labels"], meta=meta)


def block_rng(seed: int, block: int) -> np.random.Generator:
    """The generator of simulation block ``block`` (SeedSequence(seed).spawn(...)[block])."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(block,)))


def iter_blocks(n: int, config: SimConfig, seed: int, *,
                workers: int = 1) -> Iterator[SimulatedBatch]:
    """The ``n`` stamps of (seed, config) as consecutive blocks of ``SIM_BLOCK_ROWS``.

    With ``workers`` > 1, blocks are simulated ahead in that many threads (numpy releases
    the GIL in the heavy loops) and still yielded in order; at most ``workers + 1`` blocks
    (the one yielded and those being simulated) are held at once, so memory stays bounded.
    The contents do not depend on ``workers``.
    """
    starts = range(0, n, SIM_BLOCK_ROWS)

    def make(block: int) -> SimulatedBatch:
        return simulate_stamps(min(SIM_BLOCK_ROWS, n - starts[block]), config,
                               block_rng(seed, block))

    if workers <= 1 or len(starts) == 1:
        yield from map(make, range(len(starts)))
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="simulate")
    try:
        pending: deque[Future[SimulatedBatch]] = deque()
        submitted = 0
        while submitted < len(starts) and len(pending) < workers:
            pending.append(pool.submit(make, submitted))
            submitted += 1
        while pending:
            batch = pending.popleft().result()
            if submitted < len(starts):
                pending.append(pool.submit(make, submitted))
                submitted += 1
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _default_workers() -> int:
    try:
        return max(1, min(4, len(os.sched_getaffinity(0))))
    except AttributeError:  # not on Linux
        return max(1, min(4, os.cpu_count() or 1))


def write_simulated(
    path: Path | str,
    n: int,
    *,
    config: SimConfig | None = None,
    seed: int = 0,
    candidates: bool = False,
    chunk_rows: int = store.DEFAULT_CHUNK_ROWS,
    compression: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> store.StoreInfo:
    """Simulate ``n`` stamps into a new HDF5 store, streamed in blocks (bounded memory).

    ``candidates=True`` writes an unlabelled candidate file; the truth stays in
    ``/meta`` (``true_label`` and the other columns) for evaluating completeness. The
    settings and seed go into the root attributes ``simulator_config`` (JSON) and
    ``seed``. The same (seed, config, n) gives identical contents whatever ``chunk_rows``
    or ``workers`` (threads simulating ahead; default: the usable cores, at most 4).
    The file appears only when complete; an existing one is refused unless ``overwrite``.
    """
    config = SimConfig() if config is None else config
    path = Path(path)
    try:
        config.validate()
    except SimConfigError as exc:
        raise SimConfigError(f"{path}: simulator settings: {exc}") from None
    if int(n) < 1:
        raise SimConfigError(f"{path}: number of stamps must be positive, got {n}")
    if int(seed) < 0:
        raise SimConfigError(f"{path}: seed must be >= 0, got {seed}")
    n, seed = int(n), int(seed)
    workers = _default_workers() if workers is None else max(1, int(workers))
    from stampbatch import __version__

    attrs = {
        "simulator": "stampbatch.simulate",
        "simulator_config": config.to_json(),
        "seed": seed,
        "simulator_block_rows": SIM_BLOCK_ROWS,
        "stampbatch_version": __version__,
    }
    with store.StoreWriter(path, labelled=not candidates, stamp_shape=tuple(config.stamp_shape),
                           chunk_rows=min(chunk_rows, n), compression=compression,
                           overwrite=overwrite, attrs=attrs) as writer, \
            Progress(n, "simulate", "stamps", enabled=progress) as bar, \
            contextlib.closing(iter_blocks(n, config, seed, workers=workers)) as blocks:
        for batch in blocks:
            meta = dict(batch.meta)
            for name in ("kind", "profile", "background"):
                meta[name] = meta[name].astype(_KIND_BYTES)
            if candidates:
                meta["true_label"] = batch.labels
                writer.append(batch.stamps, None, meta)
            else:
                writer.append(batch.stamps, batch.labels, meta)
            bar.update(len(batch))
    return store.open_store(path)
