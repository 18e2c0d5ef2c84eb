"""Source profiles on stamp pixels: PSFs, trails, Sérsic galaxies, saturated stars.

Every renderer is vectorised over stamps: length-n parameter arrays in, a float32
(n, H, W) array out. Shapes have unit total flux on the infinite plane, so light falling
off the stamp is lost. Pixel ``(i, j)`` has its centre at offset ``(j - (W-1)/2,
i - (H-1)/2)`` from the stamp centre: ``dx`` runs along columns, ``dy`` along rows.

* PSF: Gaussian (integrated over pixels exactly, with erf) or Moffat
  ``(1 + r^2/alpha^2)^-beta`` (2x2-point Gauss-Legendre per pixel, better than 0.4 % of
  the peak at FWHM 2 px); either optionally elliptical (ellipticity ``e = (a-b)/(a+b)`` of
  its isophotes, major axis at ``pa``; the FWHM is the geometric mean of the axes' FWHMs, so
  area and peak stay those of the round profile; 2x2 Gauss-Legendre per pixel), as every
  real PSF is a little (guiding, wind shake, optics: ``e`` ~ 0.02-0.1 on the ground).
* Trail: a PSF dragged along a segment (streaks of objects off the trajectory).
* Sérsic galaxy: ``I(r) = I_e exp(-b_n ((r/r_e)^(1/n) - 1))`` on elliptical radii
  ``r^2 = x'^2 + (y'/q)^2`` (``x'`` along the major axis at position angle ``pa``; ``r_e``
  is the half-light semi-major axis), normalised by its analytic total flux
  ``2 pi q r_e^2 n e^b_n b_n^(-2n) Gamma(2n)``, sampled on a 3x3 sub-pixel grid and
  convolved with the stamp's PSF by FFT (Ciotti & Bertin 1999 for ``b_n``).
* Saturation: pixels above the full-well level are clipped to it, and the charge above it
  bleeds along the column (up and down from the saturated core) until spent.
* Diffraction spikes: thin cross-shaped wings along the pixel axes of bright stars.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

# 2-point Gauss-Legendre nodes on a unit pixel (equal weights 1/2): exact for cubics.
_GL2 = (-0.5 / math.sqrt(3.0), 0.5 / math.sqrt(3.0))
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
SERSIC_OVERSAMPLE = 3  # sub-pixels per pixel and axis for galaxies
SERSIC_PAD = 3  # px rendered beyond each stamp edge before the PSF convolution
SERSIC_BATCH = 1024  # galaxies convolved at once (memory: ~40 kB per galaxy)


def pixel_offsets(size: int) -> np.ndarray:
    """Offsets of the pixel centres from the stamp centre along one axis."""
    return np.arange(size, dtype=np.float64) - (size - 1) / 2.0


def _gaussian_pixels(shape: tuple[int, int], dx: np.ndarray, dy: np.ndarray,
                     fwhm: np.ndarray) -> np.ndarray:
    """Pixel-integrated unit-flux Gaussians, exact: separable products of erf differences."""
    from scipy.special import erf

    h, w = shape
    scale = (math.sqrt(2.0) * fwhm / FWHM_PER_SIGMA)[:, None]
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
    xs = [((pixel_offsets(w)[None, :] + o - dx[:, None]) ** 2 * inv_a2).astype(np.float32)
          for o in _GL2]
    ys = [((pixel_offsets(h)[None, :] + o - dy[:, None]) ** 2 * inv_a2).astype(np.float32)
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


def _axes(ellip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Major and minor axis scale of an elliptical profile of ellipticity (a-b)/(a+b),
    relative to the round one of the same area (their product is 1)."""
    ratio = np.sqrt((1.0 + ellip) / (1.0 - ellip))
    return ratio, 1.0 / ratio


def _elliptical_pixels(shape: tuple[int, int], dx: np.ndarray, dy: np.ndarray,
                       fwhm: np.ndarray, beta: np.ndarray, ellip: np.ndarray,
                       pa: np.ndarray) -> np.ndarray:
    """Pixel-integrated (2x2 Gauss-Legendre) unit-flux elliptical Gaussians (beta NaN) or
    Moffats: the round profile's scale stretched by ``_axes(ellip)`` along and across ``pa``."""
    moffat = beta > 1.0  # NaN compares False: Gaussian
    if moffat.any() and not moffat.all():
        out = np.empty((len(dx), *shape), dtype=np.float32)
        for sel in (moffat, ~moffat):
            out[sel] = _elliptical_pixels(shape, dx[sel], dy[sel], fwhm[sel], beta[sel],
                                          ellip[sel], pa[sel])
        return out
    h, w = shape
    is_moffat = bool(moffat.all())
    if is_moffat:      # Moffat alpha, norm (beta-1)/(pi alpha_a alpha_b)
        scale = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
        norm = (beta - 1.0) / np.pi / scale**2
    else:              # Gaussian sigma, norm 1/(2 pi sigma_a sigma_b)
        scale = fwhm / FWHM_PER_SIGMA
        norm = 0.5 / np.pi / scale**2
    major, minor = _axes(ellip)

    def col(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, dtype=np.float32)[:, None, None]

    c, s, inv_a, inv_b = col(np.cos(pa)), col(np.sin(pa)), col(1.0 / (scale * major)), \
        col(1.0 / (scale * minor))
    neg_beta = -col(beta)
    acc = np.zeros((len(dx), h, w), dtype=np.float32)
    for oy in _GL2:
        y = (pixel_offsets(h)[None, :, None] + oy - dy[:, None, None]).astype(np.float32)
        for ox in _GL2:
            x = (pixel_offsets(w)[None, None, :] + ox - dx[:, None, None]).astype(np.float32)
            u = (x * c + y * s) * inv_a
            v = (y * c - x * s) * inv_b
            q = u * u + v * v
            acc += np.exp(neg_beta * np.log1p(q)) if is_moffat else np.exp(np.float32(-0.5) * q)
    acc *= col(0.25 * norm)
    return acc


def render_psf(shape: tuple[int, int], dx: np.ndarray, dy: np.ndarray, fwhm: np.ndarray,
               beta: np.ndarray | None = None, ellip: np.ndarray | None = None,
               pa: np.ndarray | None = None) -> np.ndarray:
    """Unit-flux PSFs centred at (dx, dy) px from the stamp centre, float32 (n, H, W).

    ``beta`` > 1 gives a Moffat profile, NaN (or ``beta=None``) a Gaussian; ``ellip``
    (``(a-b)/(a+b)``, 0 or None: round) and ``pa`` (radians from +x) make it elliptical. All
    are length-n arrays (one PSF per stamp). Flux falling off the stamp is lost, so the sum
    is below 1 for wide or off-centre PSFs.
    """
    dx = np.atleast_1d(np.asarray(dx, dtype=np.float64))
    dy = np.atleast_1d(np.asarray(dy, dtype=np.float64))
    fwhm = np.broadcast_to(np.asarray(fwhm, dtype=np.float64), dx.shape)
    if beta is None:
        beta = np.full(dx.shape, np.nan)
    beta = np.broadcast_to(np.asarray(beta, dtype=np.float64), dx.shape)
    shape = (int(shape[0]), int(shape[1]))
    if ellip is not None and np.any(np.asarray(ellip) > 0):
        ellip = np.broadcast_to(np.asarray(ellip, dtype=np.float64), dx.shape)
        pa = np.broadcast_to(np.asarray(0.0 if pa is None else pa, dtype=np.float64), dx.shape)
        out = np.empty((len(dx), *shape), dtype=np.float32)
        tilted = ellip > 0
        out[tilted] = _elliptical_pixels(shape, dx[tilted], dy[tilted], fwhm[tilted],
                                         beta[tilted], ellip[tilted], pa[tilted])
        if (~tilted).any():
            out[~tilted] = render_psf(shape, dx[~tilted], dy[~tilted], fwhm[~tilted],
                                      beta[~tilted])
        return out
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
    sigma = np.sqrt((np.asarray(fwhm, np.float64) / FWHM_PER_SIGMA) ** 2 + 1.0 / 12.0)
    length = np.asarray(length, np.float64)
    c, s = np.cos(angle), np.sin(angle)
    x = pixel_offsets(w)[None, None, :] - np.asarray(dx, np.float64)[:, None, None]
    y = pixel_offsets(h)[None, :, None] - np.asarray(dy, np.float64)[:, None, None]
    c, s = c[:, None, None], s[:, None, None]
    along = (x * c + y * s).astype(np.float32)
    across = (y * c - x * s).astype(np.float32)
    sig = sigma[:, None, None].astype(np.float32)
    half = (0.5 * length)[:, None, None].astype(np.float32)
    r2s = np.float32(math.sqrt(2.0)) * sig
    steps = erf((along + half) / r2s) - erf((along - half) / r2s)
    norm = (0.5 / (length * sigma * math.sqrt(2.0 * math.pi))).astype(np.float32)
    return (steps * np.exp(-0.5 * (across / sig) ** 2)) * norm[:, None, None]


def sersic_b(n: np.ndarray | float) -> np.ndarray:
    """``b_n`` such that ``r_e`` encloses half the light (Ciotti & Bertin 1999 series)."""
    n = np.asarray(n, dtype=np.float64)
    return 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n) + 46.0 / (25515.0 * n**2)


def _psf_transform(size: tuple[int, int], step: float, fwhm: np.ndarray,
                   beta: np.ndarray, ellip: np.ndarray | None = None,
                   pa: np.ndarray | None = None, *,
                   check: Callable[[], None] | None = None) -> np.ndarray:
    """The PSFs' discrete Fourier transforms on the sub-pixel grid (unit sum): Gaussian in
    closed form, Moffat sampled (centred on sample (0, 0)) and transformed; elliptical
    where ``ellip`` > 0 (as in :func:`render_psf`). ``check`` as in :func:`render_sersic`."""
    check = check or _go_on
    if ellip is None or not np.any(np.asarray(ellip) > 0):
        return _round_psf_transform(size, step, fwhm, beta)
    ellip = np.asarray(ellip, dtype=np.float64)
    pa = np.zeros_like(fwhm) if pa is None else np.asarray(pa, dtype=np.float64)
    major, minor = _axes(ellip)
    c = np.cos(pa).astype(np.float32)[:, None, None]
    s = np.sin(pa).astype(np.float32)[:, None, None]
    ky = np.fft.fftfreq(size[0], step)[None, :, None].astype(np.float32)
    kx = np.fft.rfftfreq(size[1], step)[None, None, :].astype(np.float32)
    sig2 = ((fwhm / FWHM_PER_SIGMA) ** 2)
    ka, kb = kx * c + ky * s, ky * c - kx * s         # along and across the major axis
    k2 = ka * ka * (sig2 * major**2).astype(np.float32)[:, None, None] \
        + kb * kb * (sig2 * minor**2).astype(np.float32)[:, None, None]
    out = np.exp(np.float32(-2.0 * np.pi**2) * k2).astype(np.complex64)
    moffat = np.flatnonzero(beta > 1.0)  # NaN compares False: Gaussian
    if moffat.size:
        check()
        gy = (np.fft.fftfreq(size[0], 1.0 / size[0]) * step)[None, :, None].astype(np.float32)
        gx = (np.fft.fftfreq(size[1], 1.0 / size[1]) * step)[None, None, :].astype(np.float32)
        cm, sm = c[moffat], s[moffat]
        ga, gb = gx * cm + gy * sm, gy * cm - gx * sm
        b = beta[moffat]
        alpha2 = (fwhm[moffat] / (2.0 * np.sqrt(2.0 ** (1.0 / b) - 1.0))) ** 2
        r2 = ga * ga / (alpha2 * major[moffat] ** 2).astype(np.float32)[:, None, None] \
            + gb * gb / (alpha2 * minor[moffat] ** 2).astype(np.float32)[:, None, None]
        img = np.power(1.0 + r2, (-b).astype(np.float32)[:, None, None])
        img /= img.sum(axis=(1, 2), keepdims=True)
        check()
        out[moffat] = np.fft.rfft2(img)
    return out


def _round_psf_transform(size: tuple[int, int], step: float, fwhm: np.ndarray,
                         beta: np.ndarray) -> np.ndarray:
    """:func:`_psf_transform` of round PSFs (the arithmetic of earlier releases, bit for bit)."""
    ky = np.fft.fftfreq(size[0], step)[:, None]
    kx = np.fft.rfftfreq(size[1], step)[None, :]
    sig2 = ((fwhm / FWHM_PER_SIGMA) ** 2).astype(np.float32)[:, None, None]
    k2 = (ky**2 + kx**2).astype(np.float32)[None]
    out = np.exp(np.float32(-2.0 * np.pi**2) * sig2 * k2).astype(np.complex64)
    moffat = np.flatnonzero(beta > 1.0)  # NaN compares False: Gaussian
    if moffat.size:
        gy = (np.fft.fftfreq(size[0], 1.0 / size[0]) * step)[:, None]
        gx = (np.fft.fftfreq(size[1], 1.0 / size[1]) * step)[None, :]
        r2 = (gy**2 + gx**2).astype(np.float32)[None]
        b = beta[moffat]
        alpha2 = (fwhm[moffat] / (2.0 * np.sqrt(2.0 ** (1.0 / b) - 1.0))) ** 2
        img = np.power(1.0 + r2 / alpha2.astype(np.float32)[:, None, None],
                       (-b).astype(np.float32)[:, None, None])
        img /= img.sum(axis=(1, 2), keepdims=True)
        out[moffat] = np.fft.rfft2(img)
    return out


def render_sersic(shape: tuple[int, int], dx: np.ndarray, dy: np.ndarray, r_e: np.ndarray,
                  n: np.ndarray, q: np.ndarray, pa: np.ndarray, fwhm: np.ndarray,
                  beta: np.ndarray | None = None, psf_ellip: np.ndarray | None = None,
                  psf_pa: np.ndarray | None = None, *,
                  check: Callable[[], None] | None = None) -> np.ndarray:
    """Unit-flux Sérsic galaxies convolved with each stamp's PSF, float32 (m, H, W).

    ``r_e`` (px) is the half-light semi-major axis, ``n`` the Sérsic index (1 exponential,
    4 de Vaucouleurs), ``q`` the axis ratio b/a, ``pa`` the major axis's angle from +x
    (radians); ``fwhm``/``beta``/``psf_ellip``/``psf_pa`` the PSF as in :func:`render_psf`.
    Done in batches of ``SERSIC_BATCH`` galaxies (vectorised within a batch); ``check``, if
    given, is called between the steps of each batch (it may raise to stop the rendering).
    """
    args = [np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in (dx, dy, r_e, n, q, pa, fwhm)]
    m = len(args[0])
    args = [np.broadcast_to(a, (m,)) for a in args]
    beta, psf_ellip, psf_pa = (np.full(m, fill) if a is None else np.broadcast_to(
        np.asarray(a, dtype=np.float64), (m,))
        for a, fill in ((beta, np.nan), (psf_ellip, 0.0), (psf_pa, 0.0)))
    h, w = int(shape[0]), int(shape[1])
    out = np.empty((m, h, w), dtype=np.float32)
    for lo in range(0, m, SERSIC_BATCH):
        sl = slice(lo, lo + SERSIC_BATCH)
        out[sl] = _sersic_batch((h, w), *(a[sl] for a in (*args, beta, psf_ellip, psf_pa)),
                                check=check or _go_on)
    return out


def _go_on() -> None:
    """The ``check`` of a rendering nobody stops."""


def _sersic_batch(shape, dx, dy, r_e, n, q, pa, fwhm, beta, psf_ellip, psf_pa, *,
                  check: Callable[[], None]) -> np.ndarray:
    from scipy.special import gammaln

    check()
    h, w = shape
    os_, pad = SERSIC_OVERSAMPLE, SERSIC_PAD
    size = ((h + 2 * pad) * os_, (w + 2 * pad) * os_)
    step = 1.0 / os_
    # Sub-pixel centres, in px from the stamp centre.
    ys = (np.arange(size[0]) + 0.5) * step - (h + 2 * pad) / 2.0
    xs = (np.arange(size[1]) + 0.5) * step - (w + 2 * pad) / 2.0
    c, s = np.cos(pa)[:, None, None], np.sin(pa)[:, None, None]
    x = (xs[None, None, :] - dx[:, None, None]).astype(np.float32)
    y = (ys[None, :, None] - dy[:, None, None]).astype(np.float32)
    xp = x * c.astype(np.float32) + y * s.astype(np.float32)
    yp = (y * c.astype(np.float32) - x * s.astype(np.float32)) / q[:, None, None].astype(np.float32)
    # The n = 4 cusp is integrable but a sample exactly on it is not: radii below a
    # quarter sub-pixel take the value there (the cusp's mean over that sub-pixel).
    r = np.maximum(np.sqrt(xp * xp + yp * yp), np.float32(0.25 * step)) \
        / r_e[:, None, None].astype(np.float32)
    b = sersic_b(n)
    img = np.exp(-b[:, None, None].astype(np.float32)
                 * (np.power(r, (1.0 / n[:, None, None]).astype(np.float32)) - 1.0))
    log_total = (np.log(2.0 * np.pi * q * n) + 2.0 * np.log(r_e) + b - 2.0 * n * np.log(b)
                 + gammaln(2.0 * n))
    img *= (step * step * np.exp(-log_total)).astype(np.float32)[:, None, None]
    check()
    psf = _psf_transform(size, step, fwhm, beta, psf_ellip, psf_pa, check=check)
    check()
    transform = np.fft.rfft2(img)
    check()
    conv = np.fft.irfft2(transform * psf, s=size)
    check()
    binned = conv.reshape(len(dx), h + 2 * pad, os_, w + 2 * pad, os_).sum(axis=(2, 4))
    return binned[:, pad:pad + h, pad:pad + w]


def render_spikes(shape: tuple[int, int], dx: np.ndarray, dy: np.ndarray, fwhm: np.ndarray,
                  length: np.ndarray) -> np.ndarray:
    """Unit-flux diffraction-like spikes: a cross along the pixel axes through (dx, dy).

    Each arm falls off as ``exp(-|d| / length)`` along the axis and is a Gaussian of
    sigma ``0.25 * fwhm`` across it (sampled at pixel centres, then normalised on the
    infinite plane: four arms of ``length`` each).
    """
    h, w = shape
    x = pixel_offsets(w)[None, None, :] - np.asarray(dx, np.float64)[:, None, None]
    y = pixel_offsets(h)[None, :, None] - np.asarray(dy, np.float64)[:, None, None]
    sig = (0.25 * np.asarray(fwhm, np.float64))[:, None, None]
    ln = np.asarray(length, np.float64)[:, None, None]
    across_x = np.exp(-0.5 * (y / sig) ** 2) * np.exp(-np.abs(x) / ln)  # horizontal arms
    across_y = np.exp(-0.5 * (x / sig) ** 2) * np.exp(-np.abs(y) / ln)  # vertical arms
    norm = 2.0 * (2.0 * ln) * sig * math.sqrt(2.0 * math.pi)
    return ((across_x + across_y) / norm).astype(np.float32)


def saturate(stamps: np.ndarray, level: np.ndarray) -> np.ndarray:
    """Clip at the full-well ``level`` (per stamp) and bleed the excess charge along columns.

    In each column the charge above ``level`` is summed and spread, half up and half down,
    from the ends of the saturated run, filling pixels to ``level`` (the last one
    partly). Saturated pixels hold exactly ``level``. Returns a new array.
    """
    lev = np.asarray(level, np.float32)[:, None, None]
    over = stamps >= lev
    if not over.any():
        return stamps.copy()
    n, h, w = stamps.shape
    excess = np.maximum(stamps - lev, 0.0).sum(axis=1)  # (n, w) charge above full well
    has = over.any(axis=1)
    top = np.where(has, over.argmax(axis=1), h)
    bottom = np.where(has, h - 1 - over[:, ::-1, :].argmax(axis=1), -1)
    half = 0.5 * excess / np.maximum(lev[:, :, 0], 1e-30)  # pixels' worth, each way
    rows = np.arange(h)[None, :, None]
    d_up = top[:, None, :] - rows
    d_dn = rows - bottom[:, None, :]
    half = half[:, None, :]
    fill = np.where(d_up > 0, np.clip(half - (d_up - 1), 0.0, 1.0), 0.0) \
        + np.where(d_dn > 0, np.clip(half - (d_dn - 1), 0.0, 1.0), 0.0)
    out = stamps + (np.minimum(fill, 1.0) * np.maximum(lev - stamps, 0.0)).astype(np.float32)
    return np.where(over, lev, np.minimum(out, lev)).astype(np.float32)
