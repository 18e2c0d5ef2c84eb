"""The field population of a stamp: the other stars and galaxies around the centre.

A survey cut-out is a window on a sky full of sources. Per stamp, field sources are a
Poisson process of surface density ``rho`` (sources per 100 px^2, drawn log-uniformly per
stamp between a sparse high-latitude and a crowded low-latitude value) over the stamp's
area, minus a disc of radius ``r_min`` around the centre: the label is decided by what sits
at the centre, so field sources stay outside the centring tolerance (by default farther
than the larger of 3 px and one FWHM — blends of about 1-2 FWHM). Drawn as a Poisson
number over the whole rectangle with positions uniform on it and those inside the disc
dropped, the count is exactly Poisson with mean ``rho * (H*W - pi r_min^2) / 100``, and the
distance ``d`` of the nearest one to the centre has ``P(d > r) = exp(-rho pi (r^2 -
r_min^2) / 100)`` for ``r_min <= r <= min(H, W)/2``.

Fluxes follow a power-law number count ``N(>S) ∝ S^-a`` (``a`` ≈ 0.6 for stars at faint
magnitudes; 0.5-0.6 for galaxies), truncated to ``[snr_min, snr_max]`` and expressed as the
point-source SNR (flux times the norm of the stamp's centred PSF over the noise sigma).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class FieldSources:
    """A flat catalogue of field sources: ``stamp[k]`` is the stamp source ``k`` lies on."""

    stamp: np.ndarray  # int64
    dx: np.ndarray  # px from the stamp centre, along columns
    dy: np.ndarray  # px, along rows
    snr: np.ndarray  # point-source SNR (see module docstring)

    def __len__(self) -> int:
        return len(self.stamp)


def power_law_snr(rng: np.random.Generator, k: int, lo: float, hi: float,
                  slope: float) -> np.ndarray:
    """``k`` values with ``N(>S) ∝ S^-slope`` truncated to [lo, hi] (inverse CDF)."""
    u = rng.random(k)
    tail = (hi / lo) ** (-slope)
    return lo * (1.0 - u * (1.0 - tail)) ** (-1.0 / slope)


def expected_count(density: np.ndarray, r_min: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Mean number of field sources per stamp (density per 100 px^2, disc inside the stamp)."""
    return density / 100.0 * (shape[0] * shape[1] - math.pi * np.asarray(r_min) ** 2)


def _scatter(rng: np.random.Generator, per_px: np.ndarray, height: float,
             width: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Poisson process of ``per_px`` sources per px^2 (per stamp) over a height x width
    rectangle centred on each stamp: (stamp index, dx, dy) of every source."""
    counts = rng.poisson(per_px * height * width)
    stamp = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    dx = rng.uniform(-width / 2.0, width / 2.0, stamp.size)
    dy = rng.uniform(-height / 2.0, height / 2.0, stamp.size)
    return stamp, dx, dy


def draw_field(rng: np.random.Generator, density: np.ndarray, r_min: np.ndarray,
               shape: tuple[int, int], snr_min: float, snr_max: float,
               slope: float) -> FieldSources:
    """Field sources of every stamp (vectorised: one Poisson draw per stamp, no loop)."""
    stamp, dx, dy = _scatter(rng, np.asarray(density) / 100.0, shape[0], shape[1])
    keep = np.hypot(dx, dy) >= np.asarray(r_min)[stamp]
    stamp, dx, dy = stamp[keep], dx[keep], dy[keep]
    snr = power_law_snr(rng, stamp.size, snr_min, snr_max, slope)
    return FieldSources(stamp=stamp, dx=dx, dy=dy, snr=snr)


def draw_margin(rng: np.random.Generator, density: np.ndarray, shape: tuple[int, int],
                margin: float, snr_min: float, snr_max: float, slope: float,
                bright_from: float) -> FieldSources:
    """The field's sources *beyond* the stamp's edge, within ``margin`` px of it, that are
    bright enough (point-source SNR >= ``bright_from``) for their wings, halos and spikes to
    reach into the stamp: the same Poisson process and number count as :func:`draw_field`'s
    (counted from ``snr_min``), restricted to that frame and that flux range. A real cut-out
    is a window on the sky, and a saturated star just outside it still lights its edge."""
    h, w = shape
    lo = max(bright_from, snr_min)
    if margin <= 0 or lo >= snr_max or not np.any(density):
        empty = np.zeros(0)
        return FieldSources(stamp=np.zeros(0, dtype=np.int64), dx=empty, dy=empty, snr=empty)
    tail = (snr_max / snr_min) ** (-slope)
    share = ((lo / snr_min) ** (-slope) - tail) / (1.0 - tail)  # of the count above snr_min
    stamp, dx, dy = _scatter(rng, np.asarray(density) / 100.0 * share, h + 2.0 * margin,
                             w + 2.0 * margin)
    out = (np.abs(dx) >= w / 2.0) | (np.abs(dy) >= h / 2.0)
    stamp, dx, dy = stamp[out], dx[out], dy[out]
    snr = power_law_snr(rng, stamp.size, lo, snr_max, slope)
    return FieldSources(stamp=stamp, dx=dx, dy=dy, snr=snr)


def nearest(field: FieldSources, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per stamp: number of field sources, distance of the nearest to the centre and its
    SNR (NaN where the stamp has none)."""
    count = np.bincount(field.stamp, minlength=n)
    dist = np.full(n, np.nan)
    snr = np.full(n, np.nan)
    if len(field):
        r = np.hypot(field.dx, field.dy)
        order = np.lexsort((r, field.stamp))  # by stamp, nearest first
        first = order[np.r_[True, field.stamp[order][1:] != field.stamp[order][:-1]]]
        dist[field.stamp[first]] = r[first]
        snr[field.stamp[first]] = field.snr[first]
    return count, dist, snr
