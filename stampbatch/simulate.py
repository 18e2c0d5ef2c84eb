"""Simulated co-added stamps: centred point sources, pure background and hard negatives.

A shift-and-stack search co-adds ``n_coadd`` exposures along each candidate trajectory;
every trajectory yields one stamp (21x21 by default). Class 1 is a point source at the
stamp centre (within ``max_centre_offset`` px), class 0 is anything else: pure background
or a *hard negative* — an off-centre source, a hot pixel, a cosmic ray or a partial streak
of a moving object that does not follow the trajectory.

Units and noise model
---------------------
Stamps are in electrons (gain 1) and are the *sum* of ``n_coadd`` exposures. Each exposure
has a sky level ``s`` (e-/px) and read noise ``r`` (e-), so the co-add has sky ``n*s`` and
per-pixel background noise

    sigma = sqrt(n * (s + r**2))                      (Poisson sky + Gaussian read noise)

drawn as a Gaussian (the co-added sky is >= 150 e- with the defaults, where the Gaussian
approximation of Poisson noise is excellent). Sky-subtracted stamps (co-adds of difference
images) have the level ``n*s`` removed but keep its noise. A fraction of stamps has
pixel-correlated noise, as resampled (warped) co-adds do: white noise convolved with the
separable kernel ``[c, 1, c] x [c, 1, c]``, renormalised so the per-pixel sigma is
unchanged (neighbouring pixels then correlate by ``2c / (1 + 2c^2)`` along each axis:
0.51 for ``c = 0.3``, as bilinear resampling at a half-pixel shift). Injected signals get
their own Poisson (shot) noise, also Gaussian-approximated (``source_shot_noise``).

PSF
---
Per stamp a FWHM in ``[fwhm_min, fwhm_max]`` px and, with probability ``moffat_fraction``,
a Moffat profile ``(1 + r^2/alpha^2)^-beta`` (``beta`` in ``[moffat_beta_min,
moffat_beta_max]``), otherwise a Gaussian. PSFs are integrated over pixels (Gaussian
exactly, with erf; Moffat with 2x2-point Gauss-Legendre, better than 0.4 % of the peak at
FWHM 2 px) and have unit total flux on the infinite plane, so a wide PSF loses some flux
off the stamp edge. Pixel ``(i, j)`` has its centre at offset ``(j - (W-1)/2, i - (H-1)/2)``
from the stamp centre: ``dx`` runs along columns, ``dy`` along rows.

SNR (the meaning of the ``snr`` column)
---------------------------------------
The SNR of an injected signal of total flux ``F`` and unit-flux shape ``P`` (the PSF, a
trail, or a 1-3 px spike), as rendered on the stamp's pixels, is its matched-filter
(optimal, background-limited) SNR against the per-pixel background noise:

    SNR = F * sqrt(sum_i P_i**2) / sigma

It is the expected value of the matched-filter statistic
``sum_i P_i (stamp_i - background) / (sigma * sqrt(sum_i P_i**2))`` (see
:func:`matched_filter_snr`), so a stamp "of SNR 5" gives a PSF-filter response of 5 sigma
on average. The flux is chosen from the SNR drawn (log-uniform in ``[snr_min, snr_max]``):
``F = SNR * sigma / sqrt(sum P**2)``. It counts only what falls on the stamp. It ignores
the source's own shot noise (which lowers the real significance of the brightest
sources) and pixel correlation: on correlated-noise stamps (``noise_corr > 0``) the same
filter's output is noisier than ``sigma`` predicts, by up to ~2x for wide PSFs. Their
significance against the true noise of that filter is kept in ``snr_eff`` (equal to
``snr`` for white noise).

Kinds of stamp (``meta["kind"]``)
---------------------------------
* ``source`` (label 1): PSF centred within ``max_centre_offset`` px (uniform in that disc).
* ``background``: noise only.
* ``offcentre``: a PSF source more than ``offcentre_min_distance`` px from the centre
  (uniform over the rest of the stamp area).
* ``hot_pixel``: one pixel raised, within ``artefact_max_offset`` px (per axis) of the centre.
* ``cosmic_ray``: a sharp track of 1-3 adjacent pixels (any of 8 directions, amplitudes
  varying by up to 2x) starting within ``artefact_max_offset`` px of the centre; no PSF.
* ``streak``: a trailed PSF segment (length ``streak_length_min``-``streak_length_max``
  px, any angle) whose midpoint lies at least ``streak_min_offset`` px from the centre
  anywhere on the stamp; long ones can cross the whole stamp.

The hard-negative fractions are fractions *of the negatives*; the rest are background.

Metadata columns (:class:`SimulatedBatch` ``meta``, and ``/meta`` in the store)
-------------------------------------------------------------------------------
``snr`` (float32; 0 for background), ``snr_eff`` (float32, see above), ``kind`` (str),
``psf_fwhm`` (float32, px, every stamp: the co-add's seeing), ``psf_beta`` (float32; NaN
for a Gaussian PSF), ``dx``, ``dy`` (float32, px from the centre: PSF centre for
source/offcentre, the pixel for hot pixels, the first track pixel for cosmic rays, the
trail midpoint for streaks; NaN for background), ``flux`` (float32, e-; 0 for
background), ``sky`` (float32, the co-add's sky level before any subtraction),
``sky_subtracted`` (bool), ``sigma`` (float32, per-pixel background noise),
``read_noise`` (float32, per exposure), ``n_coadd`` (int16), ``noise_corr`` (float32,
kernel weight ``c``; 0 for white noise), ``trail_length`` (float32, px; 0 except
streaks), ``trail_angle`` (float32, radians from the +x axis; NaN except streaks).
Candidate files (no ``/labels``) also hold ``true_label`` (int8).
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

from stampbatch import store
from stampbatch.errors import UsageError
from stampbatch.progress import Progress

KINDS = ("source", "background", "offcentre", "hot_pixel", "cosmic_ray", "streak")
_KIND_BYTES = f"S{max(len(k) for k in KINDS)}"  # fixed width: later blocks never grow it
_SOURCE, _BACKGROUND, _OFFCENTRE, _HOT, _COSMIC, _STREAK = range(len(KINDS))

# Stamps simulated per random block. Block b draws from SeedSequence(seed, spawn_key=(b,)),
# i.e. SeedSequence(seed).spawn(...)[b], so a file's contents depend on (seed, config, n)
# only — not on the HDF5 chunk size. Changing this constant changes every simulated file.
SIM_BLOCK_ROWS = 16384

# 2-point Gauss-Legendre nodes on a unit pixel (equal weights 1/2): exact for cubics.
_GL2 = (-0.5 / math.sqrt(3.0), 0.5 / math.sqrt(3.0))
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


MAX_STAMP_SIDE = 1024  # a bigger stamp is a typo (one 1024x1024 stamp is 4 MiB)
MAX_SNR = 1e6  # far brighter sources overflow the float32 pixels


class SimConfigError(UsageError, ValueError):
    """Simulator settings that cannot work (a ValueError, so config loading reports it)."""


@dataclass
class SimConfig:
    """Settings of the stamp simulator; every field has a default and is checked by validate()."""

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
    sky_subtracted_fraction: float = 0.5  # fraction of co-adds of difference images (sky ~0)
    sky_min: float = 50.0  # sky per exposure, e-/px, log-uniform (must be > 0)
    sky_max: float = 5000.0  # sky per exposure, e-/px
    read_noise_min: float = 2.0  # read noise per exposure, e-, uniform
    read_noise_max: float = 10.0  # read noise per exposure, e-
    n_coadd_min: int = 3  # fewest exposures (nights) co-added along a trajectory
    n_coadd_max: int = 20  # most exposures co-added
    source_shot_noise: bool = True  # add the injected signal's own Poisson noise
    correlated_noise_fraction: float = 0.3  # fraction of resampled co-adds (correlated noise)
    noise_corr_min: float = 0.05  # neighbour weight c of the [c,1,c] noise kernel, lowest
    noise_corr_max: float = 0.3  # c = 0.3: neighbour correlation 0.51, as bilinear resampling
    offcentre_fraction: float = 0.15  # fraction of negatives with an off-centre source
    hot_pixel_fraction: float = 0.1  # fraction of negatives with a single hot pixel
    cosmic_ray_fraction: float = 0.1  # fraction of negatives with a 1-3 px cosmic-ray track
    streak_fraction: float = 0.1  # fraction of negatives with a partial streak
    offcentre_min_distance: float = 6.0  # off-centre sources lie farther than this, px
    artefact_max_offset: float = 3.0  # hot pixels/cosmic rays start within this, px per axis
    streak_length_min: float = 8.0  # shortest streak (trail) length, px
    streak_length_max: float = 40.0  # longest streak length, px
    streak_min_offset: float = 3.0  # streak midpoints lie at least this far from the centre, px

    def validate(self) -> None:
        """Raise SimConfigError (a ValueError) naming the first bad setting."""
        shape = tuple(self.stamp_shape)
        if len(shape) != 2 or not all(isinstance(v, int | np.integer) and 5 <= v <= MAX_STAMP_SIDE
                                      for v in shape):
            raise SimConfigError(f"stamp_shape must be two integers >= 5 and <= {MAX_STAMP_SIDE}, "
                                 f"got {self.stamp_shape!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SimConfigError(f"{f.name} must be finite, got {value}")
        fractions = ("source_fraction", "moffat_fraction", "sky_subtracted_fraction",
                     "correlated_noise_fraction", "offcentre_fraction", "hot_pixel_fraction",
                     "cosmic_ray_fraction", "streak_fraction")
        for name in fractions:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise SimConfigError(f"{name} must lie in [0, 1], got {value}")
        hard = sum(getattr(self, n) for n in fractions[4:])
        if hard > 1.0 + 1e-9:
            raise SimConfigError(
                f"offcentre_fraction + hot_pixel_fraction + cosmic_ray_fraction + "
                f"streak_fraction = {hard:g} exceeds 1 (they are fractions of the negatives)")
        self._check_range("snr", 0.0, strict=True)
        if self.snr_max > MAX_SNR:  # brighter overflows float32 electrons
            raise SimConfigError(f"snr_max must be at most {MAX_SNR:g}, got {self.snr_max:g}")
        self._check_range("fwhm", 0.0, strict=True)
        self._check_range("moffat_beta", 1.0, strict=True)
        self._check_range("sky", 0.0, strict=True)
        self._check_range("read_noise", 0.0, strict=False)
        self._check_range("n_coadd", 1, strict=False)
        self._check_range("noise_corr", 0.0, strict=False)
        self._check_range("streak_length", 0.0, strict=True)
        if not (isinstance(self.n_coadd_min, int) and isinstance(self.n_coadd_max, int)):
            raise SimConfigError("n_coadd_min and n_coadd_max must be integers")
        if self.noise_corr_max > 1.0:
            raise SimConfigError(f"noise_corr_max must be at most 1, got {self.noise_corr_max}")
        half = min(shape) / 2.0
        for name in ("max_centre_offset", "offcentre_min_distance", "artefact_max_offset",
                     "streak_min_offset"):
            if getattr(self, name) < 0:
                raise SimConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name, used in (("max_centre_offset", self.source_fraction > 0),
                           ("offcentre_min_distance", self.offcentre_fraction > 0),
                           ("artefact_max_offset", self.hot_pixel_fraction
                            + self.cosmic_ray_fraction > 0),
                           ("streak_min_offset", self.streak_fraction > 0)):
            if used and getattr(self, name) >= half:
                raise SimConfigError(f"{name} = {getattr(self, name)} px does not fit a "
                                     f"{shape[0]}x{shape[1]} stamp (must be < {half:g})")
        if self.offcentre_fraction > 0 and self.offcentre_min_distance <= self.max_centre_offset:
            raise SimConfigError(
                f"offcentre_min_distance ({self.offcentre_min_distance}) must exceed "
                f"max_centre_offset ({self.max_centre_offset}): off-centre negatives would "
                f"look like positives")

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


@dataclass
class SimulatedBatch:
    """Simulated stamps with their labels and per-stamp truth."""

    stamps: np.ndarray  # float32 (n, H, W), electrons
    labels: np.ndarray  # int8 (n,), 1 = centred source
    meta: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.stamps.shape[0])


# --------------------------------------------------------------------------- rendering


def _pixel_offsets(size: int) -> np.ndarray:
    """Offsets of the pixel centres from the stamp centre along one axis."""
    return np.arange(size, dtype=np.float64) - (size - 1) / 2.0


def _gaussian_pixels(shape: tuple[int, int], dx: np.ndarray, dy: np.ndarray,
                     fwhm: np.ndarray) -> np.ndarray:
    """Pixel-integrated unit-flux Gaussians, exact: separable products of erf differences."""
    from scipy.special import erf

    h, w = shape
    scale = (math.sqrt(2.0) * fwhm / _FWHM_PER_SIGMA)[:, None]
    ex = np.arange(w + 1, dtype=np.float64) - w / 2.0  # pixel edges, -w/2 .. w/2
    ey = np.arange(h + 1, dtype=np.float64) - h / 2.0
    px = 0.5 * np.diff(erf((ex[None, :] - dx[:, None]) / scale), axis=1)
    py = 0.5 * np.diff(erf((ey[None, :] - dy[:, None]) / scale), axis=1)
    return py.astype(np.float32)[:, :, None] * px.astype(np.float32)[:, None, :]


def _moffat_pixels(shape: tuple[int, int], dx: np.ndarray, dy: np.ndarray, fwhm: np.ndarray,
                   beta: np.ndarray) -> np.ndarray:
    """Pixel-integrated (2x2 Gauss-Legendre) unit-flux Moffat profiles."""
    h, w = shape
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    inv_a2 = (1.0 / alpha**2)[:, None]
    xs = [((_pixel_offsets(w)[None, :] + o - dx[:, None]) ** 2 * inv_a2).astype(np.float32)
          for o in _GL2]
    ys = [((_pixel_offsets(h)[None, :] + o - dy[:, None]) ** 2 * inv_a2).astype(np.float32)
          for o in _GL2]
    nbeta = (-beta).astype(np.float32)[:, None, None]
    acc = np.zeros((len(dx), h, w), dtype=np.float32)
    tmp = np.empty_like(acc)
    for y2 in ys:
        for x2 in xs:
            np.add(y2[:, :, None], x2[:, None, :], out=tmp)
            np.log1p(tmp, out=tmp)
            tmp *= nbeta
            np.exp(tmp, out=tmp)
            acc += tmp
    norm = (0.25 * (beta - 1.0) / (np.pi * alpha**2)).astype(np.float32)
    acc *= norm[:, None, None]
    return acc


def render_psf(shape: tuple[int, int], dx: np.ndarray, dy: np.ndarray, fwhm: np.ndarray,
               beta: np.ndarray | None = None) -> np.ndarray:
    """Unit-flux PSFs centred at (dx, dy) px from the stamp centre, float32 (n, H, W).

    ``beta`` > 1 gives a Moffat profile, NaN (or ``beta=None``) a Gaussian; all of
    ``dx, dy, fwhm, beta`` are length-n arrays (one PSF per stamp). Flux falling off the
    stamp is lost, so the sum is below 1 for wide or off-centre PSFs.
    """
    dx = np.atleast_1d(np.asarray(dx, dtype=np.float64))
    dy = np.atleast_1d(np.asarray(dy, dtype=np.float64))
    fwhm = np.broadcast_to(np.asarray(fwhm, dtype=np.float64), dx.shape)
    if beta is None:
        beta = np.full(dx.shape, np.nan)
    beta = np.broadcast_to(np.asarray(beta, dtype=np.float64), dx.shape)
    shape = (int(shape[0]), int(shape[1]))
    out = np.empty((len(dx), *shape), dtype=np.float32)
    moffat = beta > 1.0  # NaN compares False: Gaussian
    if moffat.all():
        return _moffat_pixels(shape, dx, dy, fwhm, beta)
    if not moffat.any():
        return _gaussian_pixels(shape, dx, dy, fwhm)
    g = ~moffat
    out[g] = _gaussian_pixels(shape, dx[g], dy[g], fwhm[g])
    out[moffat] = _moffat_pixels(shape, dx[moffat], dy[moffat], fwhm[moffat], beta[moffat])
    return out


def render_trail(shape: tuple[int, int], dx: np.ndarray, dy: np.ndarray, fwhm: np.ndarray,
                 length: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Unit-flux trailed Gaussian PSFs (a segment of ``length`` px at ``angle`` radians).

    Closed form: a Gaussian across the trail times an erf step along it. The pixel
    integral is approximated by sampling at pixel centres a Gaussian whose variance is
    widened by the pixel's 1/12 px^2, the box filter's second moment.
    """
    from scipy.special import erf

    h, w = shape
    sigma = np.sqrt((np.asarray(fwhm, np.float64) / _FWHM_PER_SIGMA) ** 2 + 1.0 / 12.0)
    length = np.asarray(length, np.float64)
    c, s = np.cos(angle), np.sin(angle)
    x = _pixel_offsets(w)[None, None, :] - np.asarray(dx, np.float64)[:, None, None]
    y = _pixel_offsets(h)[None, :, None] - np.asarray(dy, np.float64)[:, None, None]
    c, s = c[:, None, None], s[:, None, None]
    along = (x * c + y * s).astype(np.float32)
    across = (y * c - x * s).astype(np.float32)
    sig = sigma[:, None, None].astype(np.float32)
    half = (0.5 * length)[:, None, None].astype(np.float32)
    r2s = np.float32(math.sqrt(2.0)) * sig
    steps = erf((along + half) / r2s) - erf((along - half) / r2s)
    norm = (0.5 / (length * sigma * math.sqrt(2.0 * math.pi))).astype(np.float32)
    return (steps * np.exp(-0.5 * (across / sig) ** 2)) * norm[:, None, None]


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


def _positions_outside(rng: np.random.Generator, n: int, shape: tuple[int, int],
                       r_min: float) -> tuple[np.ndarray, np.ndarray]:
    """Uniform positions over the stamp area farther than ``r_min`` px from the centre.

    Rejection sampling by rounds (not per stamp); validate() keeps the acceptance >= 21 %.
    """
    h, w = shape
    dx, dy = np.empty(n), np.empty(n)
    todo = np.arange(n)
    while todo.size:
        x = rng.uniform(-w / 2.0, w / 2.0, todo.size)
        y = rng.uniform(-h / 2.0, h / 2.0, todo.size)
        ok = np.hypot(x, y) > r_min
        dx[todo[ok]], dy[todo[ok]] = x[ok], y[ok]
        todo = todo[~ok]
    return dx, dy


def _pixels_near_centre(rng: np.random.Generator, n: int, size: int,
                        max_offset: float) -> np.ndarray:
    """Random pixel indices along one axis within ``max_offset`` px of the centre."""
    off = np.abs(_pixel_offsets(size))
    allowed = np.flatnonzero(off <= max(max_offset, off.min()))
    return allowed[rng.integers(0, len(allowed), n)]


def _correlated_noise(rng: np.random.Generator, c: np.ndarray,
                      shape: tuple[int, int]) -> np.ndarray:
    """Unit-variance noise convolved with [c,1,c] x [c,1,c] (no edge effects: drawn padded)."""
    h, w = shape
    z = rng.standard_normal((len(c), h + 2, w + 2), dtype=np.float32)
    cc = c.astype(np.float32)[:, None, None]
    u = z[:, :, 1:-1] + cc * (z[:, :, :-2] + z[:, :, 2:])
    v = u[:, 1:-1, :] + cc * (u[:, :-2, :] + u[:, 2:, :])
    v /= 1.0 + 2.0 * cc**2  # the 2-D kernel's sum of squares is (1 + 2c^2)^2
    return v


def _filter_noise(unit: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Noise sigma (in units of the per-pixel sigma) of the filter ``unit`` on noise made by
    :func:`_correlated_noise`: ``sqrt(sum((K * P)**2))`` over the padded grid, K the kernel."""
    n, h, w = unit.shape
    p = np.zeros((n, h + 4, w + 4), dtype=np.float32)
    p[:, 2:-2, 2:-2] = unit
    cc = c.astype(np.float32)[:, None, None]
    u = p[:, :, 1:-1] + cc * (p[:, :, :-2] + p[:, :, 2:])
    v = u[:, 1:-1, :] + cc * (u[:, :-2, :] + u[:, 2:, :])
    v /= 1.0 + 2.0 * cc**2
    return np.sqrt(np.einsum("nij,nij->n", v, v, dtype=np.float64))


def simulate_stamps(n: int, config: SimConfig | None = None,
                    rng: np.random.Generator | int | None = None) -> SimulatedBatch:
    """Simulate ``n`` co-added stamps in memory (vectorised over stamps).

    ``rng`` is a numpy Generator (or a seed). See the module docstring for the model, the
    SNR definition and the metadata columns.
    """
    config = SimConfig() if config is None else config
    config.validate()
    if n < 0:
        raise SimConfigError(f"number of stamps must be >= 0, got {n}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    shape = (int(config.stamp_shape[0]), int(config.stamp_shape[1]))
    h, w = shape

    # Classes and kinds.
    labels = (rng.random(n) < config.source_fraction).astype(np.int8)
    edges = np.cumsum([config.offcentre_fraction, config.hot_pixel_fraction,
                       config.cosmic_ray_fraction, config.streak_fraction])
    neg = np.array([_OFFCENTRE, _HOT, _COSMIC, _STREAK, _BACKGROUND], dtype=np.int8)
    kind = neg[np.searchsorted(edges, rng.random(n), side="right")]
    kind[labels == 1] = _SOURCE

    # Per-stamp observing conditions.
    fwhm = rng.uniform(config.fwhm_min, config.fwhm_max, n)
    beta = np.where(rng.random(n) < config.moffat_fraction,
                    rng.uniform(config.moffat_beta_min, config.moffat_beta_max, n), np.nan)
    n_coadd = rng.integers(config.n_coadd_min, config.n_coadd_max + 1, n)
    sky_exp = _log_uniform(rng, config.sky_min, config.sky_max, n)
    read_noise = rng.uniform(config.read_noise_min, config.read_noise_max, n)
    sky_subtracted = rng.random(n) < config.sky_subtracted_fraction
    noise_corr = np.where(rng.random(n) < config.correlated_noise_fraction,
                          rng.uniform(config.noise_corr_min, config.noise_corr_max, n), 0.0)
    snr = _log_uniform(rng, config.snr_min, config.snr_max, n)
    snr[kind == _BACKGROUND] = 0.0
    sky = n_coadd * sky_exp
    sigma = np.sqrt(n_coadd * (sky_exp + read_noise**2))

    # Background: white or correlated noise of per-pixel sigma (the sky level is added last).
    stamps = np.empty((n, h, w), dtype=np.float32)
    corr = noise_corr > 0
    if corr.all():
        stamps[:] = _correlated_noise(rng, noise_corr, shape)
    else:
        stamps[~corr] = rng.standard_normal((int((~corr).sum()), h, w), dtype=np.float32)
        if corr.any():
            stamps[corr] = _correlated_noise(rng, noise_corr[corr], shape)
    sigma32 = sigma.astype(np.float32)
    stamps *= sigma32[:, None, None]

    dx = np.full(n, np.nan)
    dy = np.full(n, np.nan)
    flux = np.zeros(n)
    trail_length = np.zeros(n)
    trail_angle = np.full(n, np.nan)
    snr_eff = snr.copy()

    def add_signal(idx: np.ndarray, unit: np.ndarray) -> None:
        """Scale unit-flux shapes to the drawn SNR and add them, with their shot noise.

        The stamp's noise there (sigma * z) is rescaled to sqrt(sigma^2 + signal) * z: the
        Gaussian approximation of sky + read + source noise, with the same correlation.
        """
        norm = np.sqrt(np.einsum("nij,nij->n", unit, unit, dtype=np.float64))
        f = snr[idx] * sigma[idx] / norm
        flux[idx] = f
        corr_rows = np.flatnonzero(corr[idx])
        if corr_rows.size:
            snr_eff[idx[corr_rows]] = snr[idx[corr_rows]] * norm[corr_rows] / _filter_noise(
                unit[corr_rows], noise_corr[idx[corr_rows]])
        unit *= f.astype(np.float32)[:, None, None]
        block = stamps[idx]
        if config.source_shot_noise:
            inv_var = (1.0 / sigma32[idx] ** 2)[:, None, None]
            block *= np.sqrt(1.0 + unit * inv_var)
        block += unit
        stamps[idx] = block

    # PSF sources: centred positives and off-centre negatives.
    idx_src = np.flatnonzero(kind == _SOURCE)
    r = config.max_centre_offset * np.sqrt(rng.random(idx_src.size))
    theta = rng.uniform(0.0, 2.0 * np.pi, idx_src.size)
    dx[idx_src], dy[idx_src] = r * np.cos(theta), r * np.sin(theta)
    idx_off = np.flatnonzero(kind == _OFFCENTRE)
    dx[idx_off], dy[idx_off] = _positions_outside(rng, idx_off.size, shape,
                                                  config.offcentre_min_distance)
    idx_psf = np.flatnonzero((kind == _SOURCE) | (kind == _OFFCENTRE))
    if idx_psf.size:
        add_signal(idx_psf, render_psf(shape, dx[idx_psf], dy[idx_psf], fwhm[idx_psf],
                                       beta[idx_psf]))

    # Streaks: trailed PSFs of objects that do not follow the trajectory.
    idx_str = np.flatnonzero(kind == _STREAK)
    if idx_str.size:
        dx[idx_str], dy[idx_str] = _positions_outside(rng, idx_str.size, shape,
                                                      config.streak_min_offset)
        trail_length[idx_str] = rng.uniform(config.streak_length_min, config.streak_length_max,
                                            idx_str.size)
        trail_angle[idx_str] = rng.uniform(0.0, np.pi, idx_str.size)
        add_signal(idx_str, render_trail(shape, dx[idx_str], dy[idx_str], fwhm[idx_str],
                                         trail_length[idx_str], trail_angle[idx_str]))

    # Hot pixels and cosmic rays: 1-3 sharp pixels, no PSF. Track k of stamp i: pixel
    # (row0 + k*sy, col0 + k*sx) for k < length, clipped to the stamp.
    idx_art = np.flatnonzero((kind == _HOT) | (kind == _COSMIC))
    if idx_art.size:
        m = idx_art.size
        row0 = _pixels_near_centre(rng, m, h, config.artefact_max_offset)
        col0 = _pixels_near_centre(rng, m, w, config.artefact_max_offset)
        cosmic = kind[idx_art] == _COSMIC
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
        add_signal(idx_art, unit)
        dx[idx_art] = _pixel_offsets(w)[col0]
        dy[idx_art] = _pixel_offsets(h)[row0]

    stamps += np.where(sky_subtracted, 0.0, sky).astype(np.float32)[:, None, None]
    meta = {
        "snr": snr.astype(np.float32),
        "kind": np.asarray(KINDS)[kind],
        "psf_fwhm": fwhm.astype(np.float32),
        "psf_beta": beta.astype(np.float32),
        "dx": dx.astype(np.float32),
        "dy": dy.astype(np.float32),
        "snr_eff": snr_eff.astype(np.float32),
        "flux": flux.astype(np.float32),
        "sky": sky.astype(np.float32),
        "sky_subtracted": sky_subtracted,
        "sigma": sigma.astype(np.float32),
        "read_noise": read_noise.astype(np.float32),
        "n_coadd": n_coadd.astype(np.int16),
        "noise_corr": noise_corr.astype(np.float32),
        "trail_length": trail_length.astype(np.float32),
        "trail_angle": trail_angle.astype(np.float32),
    }
    return SimulatedBatch(stamps=stamps, labels=labels, meta=meta)


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
            meta["kind"] = meta["kind"].astype(_KIND_BYTES)
            if candidates:
                meta["true_label"] = batch.labels
                writer.append(batch.stamps, None, meta)
            else:
                writer.append(batch.stamps, batch.labels, meta)
            bar.update(len(batch))
    return store.open_store(path)
