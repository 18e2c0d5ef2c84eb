"""Backgrounds and artefacts of real cut-outs, vectorised over stamps.

* Noise: white, or pixel-correlated as in resampled (warped) co-adds: white noise
  convolved with ``[c, 1, c] x [c, 1, c]`` and renormalised so the per-pixel sigma is
  unchanged (neighbouring pixels then correlate by ``2c / (1 + 2c^2)`` along each axis).
* Sky: a level (science stamps) plus a linear gradient across the stamp; on sky-subtracted
  stamps an imperfectly removed residual (an offset and a gradient, in units of the
  stamp's noise).
* Difference-image residuals: a source subtracted with a misregistered, slightly
  mis-scaled template leaves ``(1 + eps) P(x - d/2) - P(x + d/2)`` — a dipole for a shift
  ``d``, a faint positive or negative copy for a flux mismatch ``eps``.
* Detector defects: a bad column (dead: zero; hot: a high constant) and masked pixels
  (a small block set to zero, or to NaN where a store carries masks as NaN).
* The detector's edge: a stamp cut within half a stamp of it has no data beyond (NaN).
"""

from __future__ import annotations

import numpy as np

from stampbatch.sim.profiles import pixel_offsets, render_psf


def correlated_noise(rng: np.random.Generator, c: np.ndarray,
                     shape: tuple[int, int]) -> np.ndarray:
    """Unit-variance noise convolved with [c,1,c] x [c,1,c] (no edge effects: drawn padded)."""
    h, w = shape
    z = rng.standard_normal((len(c), h + 2, w + 2), dtype=np.float32)
    cc = c.astype(np.float32)[:, None, None]
    u = z[:, :, 1:-1] + cc * (z[:, :, :-2] + z[:, :, 2:])
    v = u[:, 1:-1, :] + cc * (u[:, :-2, :] + u[:, 2:, :])
    v /= 1.0 + 2.0 * cc**2  # the 2-D kernel's sum of squares is (1 + 2c^2)^2
    return v


def filter_noise(unit: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Noise sigma (in units of the per-pixel sigma) of the filter ``unit`` on noise made by
    :func:`correlated_noise`: ``sqrt(sum((K * P)**2))`` over the padded grid, K the kernel."""
    n, h, w = unit.shape
    p = np.zeros((n, h + 4, w + 4), dtype=np.float32)
    p[:, 2:-2, 2:-2] = unit
    cc = c.astype(np.float32)[:, None, None]
    u = p[:, :, 1:-1] + cc * (p[:, :, :-2] + p[:, :, 2:])
    v = u[:, 1:-1, :] + cc * (u[:, :-2, :] + u[:, 2:, :])
    v /= 1.0 + 2.0 * cc**2
    return np.sqrt(np.einsum("nij,nij->n", v, v, dtype=np.float64))


def noise(rng: np.random.Generator, noise_corr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Unit-variance background noise per stamp: white where ``noise_corr`` is 0."""
    n = len(noise_corr)
    out = np.empty((n, *shape), dtype=np.float32)
    corr = noise_corr > 0
    if (~corr).any():
        out[~corr] = rng.standard_normal((int((~corr).sum()), *shape), dtype=np.float32)
    if corr.any():
        out[corr] = correlated_noise(rng, noise_corr[corr], shape)
    return out


def plane(shape: tuple[int, int], offset: np.ndarray, slope: np.ndarray,
          angle: np.ndarray) -> np.ndarray:
    """``offset + slope * (distance along angle)`` on each stamp's pixels, float32 (n, H, W)."""
    h, w = shape
    x = pixel_offsets(w)[None, None, :]
    y = pixel_offsets(h)[None, :, None]
    along = x * np.cos(angle)[:, None, None] + y * np.sin(angle)[:, None, None]
    return (offset[:, None, None] + slope[:, None, None] * along).astype(np.float32)


def subtraction_residual(shape: tuple[int, int], dx: np.ndarray, dy: np.ndarray,
                         fwhm: np.ndarray, beta: np.ndarray, shift_x: np.ndarray,
                         shift_y: np.ndarray, mismatch: np.ndarray) -> np.ndarray:
    """What a unit-flux point source leaves in a difference image (see module docstring)."""
    plus = render_psf(shape, dx + 0.5 * shift_x, dy + 0.5 * shift_y, fwhm, beta)
    minus = render_psf(shape, dx - 0.5 * shift_x, dy - 0.5 * shift_y, fwhm, beta)
    plus *= (1.0 + mismatch).astype(np.float32)[:, None, None]
    return plus - minus


def bad_columns(rng: np.random.Generator, stamps: np.ndarray, rows: np.ndarray,
                hot_level: np.ndarray) -> np.ndarray:
    """Turn one random column of each stamp in ``rows`` dead (0) or hot (``hot_level``).

    Returns the column index per stamp (-1 where none). Half are dead, half hot.
    """
    n, _, w = stamps.shape
    col = np.full(n, -1, dtype=np.int16)
    if rows.size:
        col[rows] = rng.integers(0, w, rows.size)
        value = np.where(rng.random(rows.size) < 0.5, 0.0, hot_level[rows]).astype(np.float32)
        stamps[rows, :, col[rows]] = value[:, None]
    return col


def mask_pixels(rng: np.random.Generator, stamps: np.ndarray, rows: np.ndarray,
                max_size: int, use_nan: np.ndarray) -> np.ndarray:
    """Set a random block of 1 to ``max_size`` px a side in each stamp of ``rows`` to 0 (or
    NaN where ``use_nan``); returns the number of masked pixels per stamp."""
    n, h, w = stamps.shape
    count = np.zeros(n, dtype=np.int16)
    if not rows.size:
        return count
    size_y = rng.integers(1, max_size + 1, rows.size)
    size_x = rng.integers(1, max_size + 1, rows.size)
    y0 = rng.integers(0, h, rows.size)
    x0 = rng.integers(0, w, rows.size)
    yy = np.arange(h)[None, :, None]
    xx = np.arange(w)[None, None, :]
    block = ((yy >= y0[:, None, None]) & (yy < (y0 + size_y)[:, None, None])
             & (xx >= x0[:, None, None]) & (xx < (x0 + size_x)[:, None, None]))
    fill = np.where(use_nan[rows], np.nan, 0.0).astype(np.float32)
    sub = stamps[rows]
    np.copyto(sub, np.broadcast_to(fill[:, None, None], sub.shape), where=block)
    stamps[rows] = sub
    count[rows] = block.sum(axis=(1, 2))
    return count


def detector_edge(rng: np.random.Generator, stamps: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Cut each stamp of ``rows`` at a detector edge: on a random side, the outer 1 to
    ``side // 2`` columns (or rows) hold no data (NaN) — a stamp centred on the detector,
    up to half a stamp from its edge (at ``side // 2`` the centre pixel is the last on the
    chip). Returns the number of pixels cut per stamp."""
    n, h, w = stamps.shape
    count = np.zeros(n, dtype=np.int16)
    if not rows.size:
        return count
    side = rng.integers(0, 4, rows.size)           # 0: left, 1: right, 2: bottom, 3: top
    vertical = side < 2
    depth = np.where(vertical, rng.integers(1, w // 2 + 1, rows.size),
                     rng.integers(1, h // 2 + 1, rows.size))
    yy = np.arange(h)[None, :, None]
    xx = np.arange(w)[None, None, :]
    d = depth[:, None, None]
    s = side[:, None, None]
    cut = (((s == 0) & (xx < d)) | ((s == 1) & (xx >= w - d))
           | ((s == 2) & (yy < d)) | ((s == 3) & (yy >= h - d)))
    sub = stamps[rows]
    sub[cut] = np.nan
    stamps[rows] = sub
    count[rows] = cut.sum(axis=(1, 2))
    return count
