"""Injection into real backgrounds: training stamps the way surveys make them.

``stampbatch simulate OUT.h5 --backgrounds REAL.h5`` takes real stamps with no source at the
centre (a labelled store's negatives, or every stamp of a candidate file — for example
random trajectories of a real search, ingested with ``stampbatch ingest``) and writes, for
each background stamp:

* a positive: a PSF-convolved point source injected at the centre (within
  ``max_centre_offset`` px), of matched-filter SNR drawn log-uniformly in ``[snr_min,
  snr_max]`` *against the stamp's own robust noise* ``sigma = 0.7413 (p75 - p25)`` (the
  estimator the normalisation uses) over its pixels beyond 2 FWHM from the centre:
  ``flux = SNR * sigma / sqrt(sum P**2)``;
* the untouched background as a negative;
* for ``offcentre_fraction`` of them, another copy with the source injected farther than
  ``offcentre_min_distance`` px from the centre, as a hard negative.

PSFs follow the simulator's settings (FWHM range, Gaussian/Moffat mix), or the store's
``/meta/psf_fwhm`` where it has one. Real stamps' units are unknown, so no shot noise is
added (the real noise is already there). :func:`measure_snr` is the estimator the SNR is
defined with: the matched filter against the stamp's median and robust sigma (both
beyond 2 FWHM); its reading on an injected stamp less its reading on the untouched
background (the field's own light) recovers the requested SNR to 5 % (the test shows).
Every ``/meta`` column of the background store is carried over, so real groups (image
type, field) stay with their stamps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stampbatch import store
from stampbatch.errors import SimConfigError
from stampbatch.progress import Progress
from stampbatch.sim.profiles import render_psf
from stampbatch.train.preprocess import SIGMA_G_COEFF

INJECT_KINDS = ("source", "background", "offcentre")
_KIND_BYTES = f"S{max(map(len, INJECT_KINDS))}"
BLOCK_ROWS = 8192
NOISE_RADIUS_FWHM = 2.0  # the noise is measured beyond this many FWHM from the centre


def _outer(stamps: np.ndarray, fwhm: np.ndarray | None) -> np.ndarray:
    """The stamps (float64) with the pixels within ``NOISE_RADIUS_FWHM * fwhm`` of the
    centre set to NaN — never more than the inner three quarters of the pixels."""
    x = np.array(stamps, dtype=np.float64)
    if fwhm is None:
        return x
    n, h, w = x.shape
    r = np.hypot(*np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2,
                              indexing="ij"))
    cap = np.quantile(r, 0.75)
    radius = np.minimum(NOISE_RADIUS_FWHM * np.asarray(fwhm, np.float64), cap)
    x[r[None] < radius[:, None, None]] = np.nan
    return x


def robust_sigma(stamps: np.ndarray, fwhm: np.ndarray | None = None) -> np.ndarray:
    """Per-stamp robust noise ``0.7413 * (p75 - p25)`` (NaN ignored), float64; with ``fwhm``
    over the pixels beyond ``NOISE_RADIUS_FWHM`` FWHM from the centre, where a centred
    source barely reaches."""
    flat = _outer(stamps, fwhm).reshape(len(stamps), -1)
    p25, p75 = np.nanpercentile(flat, [25, 75], axis=1)
    return SIGMA_G_COEFF * (p75 - p25)


def measure_snr(stamps: np.ndarray, shapes: np.ndarray, fwhm: np.ndarray) -> np.ndarray:
    """Matched-filter SNR of known unit shapes on each stamp, against the stamp's own median
    and robust sigma beyond the source (:func:`robust_sigma`):
    ``sum P (x - median) / (sigma sqrt(sum P**2))``."""
    x = np.asarray(stamps, dtype=np.float64)
    p = np.asarray(shapes, dtype=np.float64)
    outer = _outer(x, fwhm).reshape(len(x), -1)
    med = np.nanmedian(outer, axis=1)[:, None, None]
    resp = np.nansum(p * (x - med), axis=(1, 2))
    return resp / (robust_sigma(x, fwhm) * np.sqrt(np.einsum("nij,nij->n", p, p)))


def background_rows(path: Path) -> tuple[np.ndarray, int]:
    """Rows usable as backgrounds, and how many were left out because they hold a source:
    a labelled store's negatives, else every row; in both, not the rows whose
    ``/meta/true_label`` says a source is at the centre (a real search's candidates with
    their truth: injecting into them would teach that a central source is noise)."""
    info = store.open_store(path)
    negatives = store.read_labels(path) == 0 if info.labelled \
        else np.ones(info.n_stamps, dtype=bool)
    keep = negatives.copy()
    if store.META_TRUE_LABEL in info.meta_columns:
        truth = np.asarray(store.read_meta(path, [store.META_TRUE_LABEL])[store.META_TRUE_LABEL])
        keep &= truth.astype(np.float64) != 1
    return np.flatnonzero(keep), int(negatives.sum() - keep.sum())


def usable_backgrounds(raw: np.ndarray, fwhm: np.ndarray | None) -> np.ndarray:
    """Which stamps can take an injection: finite pixels with noise to measure beyond the
    centre (an all-NaN or flat stamp gives no SNR scale: its "positive" would hold no
    source). Quietly: the NaN-ignoring percentiles of an all-NaN stamp are not a warning."""
    import warnings

    ok = np.isfinite(raw).any(axis=(1, 2))
    sigma = np.full(len(raw), np.nan)
    if ok.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sigma[ok] = robust_sigma(raw[ok], None if fwhm is None else fwhm[ok])
    return ok & np.isfinite(sigma) & (sigma > 0)


def _inject_block(rng: np.random.Generator, raw: np.ndarray, config, fwhm: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Positives, negatives and off-centre negatives made from one block of backgrounds."""
    n, h, w = raw.shape
    fwhm = rng.uniform(config.fwhm_min, config.fwhm_max, n) if fwhm is None else fwhm
    beta = np.where(rng.random(n) < config.moffat_fraction,
                    rng.uniform(config.moffat_beta_min, config.moffat_beta_max, n), np.nan)
    snr = np.exp(rng.uniform(math.log(config.snr_min), math.log(config.snr_max), n))
    r = config.max_centre_offset * np.sqrt(rng.random(n))
    theta = rng.uniform(0.0, 2.0 * np.pi, n)
    dx, dy = r * np.cos(theta), r * np.sin(theta)
    off = rng.random(n) < config.offcentre_fraction
    from stampbatch.sim.scene import positions_outside

    odx, ody = positions_outside(rng, int(off.sum()), (h, w), config.offcentre_min_distance)
    dx = np.concatenate([dx, np.full(n, np.nan), odx])
    dy = np.concatenate([dy, np.full(n, np.nan), ody])
    src = np.concatenate([np.arange(n), np.arange(n), np.flatnonzero(off)])
    kind = np.repeat(np.arange(3), [n, n, int(off.sum())])
    snr_all = np.where(kind == 1, 0.0, np.concatenate([snr, snr, snr[off]]))
    stamps = raw[src].astype(np.float32)
    sigma = robust_sigma(raw, fwhm)[src]
    flux = np.zeros(len(src))
    inj = np.flatnonzero(kind != 1)
    if inj.size:
        unit = render_psf((h, w), dx[inj], dy[inj], fwhm[src[inj]], beta[src[inj]])
        norm = np.sqrt(np.einsum("nij,nij->n", unit, unit, dtype=np.float64))
        flux[inj] = snr_all[inj] * sigma[inj] / norm
        stamps[inj] += unit * flux[inj].astype(np.float32)[:, None, None]
    meta = {"snr": snr_all.astype(np.float32), "kind": np.asarray(INJECT_KINDS)[kind],
            "dx": dx.astype(np.float32), "dy": dy.astype(np.float32),
            "flux": flux.astype(np.float32), "sigma": sigma.astype(np.float32),
            "psf_fwhm": fwhm[src].astype(np.float32), "psf_beta": beta[src].astype(np.float32)}
    return stamps, (kind == 0).astype(np.int8), meta, src


def write_injected(out: Path | str, backgrounds: Path | str, *, config=None, seed: int = 0,
                   n: int | None = None, chunk_rows: int = store.DEFAULT_CHUNK_ROWS,
                   compression: str | None = None, overwrite: bool = False,
                   progress: bool = True,
                   log: Callable[[str], None] | None = None) -> store.StoreInfo:
    """Write the labelled store of injections into ``backgrounds`` (module docstring); ``n``
    limits the backgrounds used (a seeded random subset). Stamps that hold a source (by
    their label or ``/meta/true_label``) or that cannot take an injection (no finite pixel,
    no noise) are left out, and ``log`` is told how many. Returns the new store's info."""
    from stampbatch.sim.simulate import SimConfig, block_rng

    config = SimConfig() if config is None else config
    out, backgrounds = Path(out), Path(backgrounds)
    try:
        config.validate()
    except SimConfigError as exc:
        raise SimConfigError(f"{out}: simulator settings: {exc}") from None
    info = store.open_store(backgrounds)
    if out.exists() and out.samefile(backgrounds):
        raise store.StoreError(f"{out}: is the --backgrounds store itself; write the injected "
                               "store to another file (it would replace its own input)")
    rows, with_source = background_rows(backgrounds)
    if n is not None and n < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, n, replace=False))
    if not len(rows):
        raise store.StoreError(f"{backgrounds}: holds no stamps without a source to inject into"
                               + (f" ({with_source:,} hold one per /meta/"
                                  f"{store.META_TRUE_LABEL})" if with_source else ""))
    unusable = 0
    extra = store.read_meta(backgrounds) if info.meta_columns else {}
    clash = sorted(set(extra) & {"snr", "kind", "dx", "dy", "flux", "sigma", "psf_fwhm",
                                 "psf_beta", "background_row"})
    extra = {("real_" + k if k in clash and k != "psf_fwhm" else k): v for k, v in extra.items()}
    attrs = {"simulator": "stampbatch.inject", "simulator_config": config.to_json(),
             "seed": int(seed), "backgrounds": str(backgrounds.resolve())}
    with store.StoreWriter(out, labelled=True, stamp_shape=info.stamp_shape,
                           chunk_rows=chunk_rows, compression=compression, overwrite=overwrite,
                           attrs=attrs) as writer, \
            Progress(len(rows), "inject", "backgrounds", enabled=progress) as bar:
        for b, lo in enumerate(range(0, len(rows), BLOCK_ROWS)):
            block = rows[lo:lo + BLOCK_ROWS]
            raw, _ = store.read_rows(backgrounds, block)
            fwhm = extra["psf_fwhm"][block].astype(np.float64) if "psf_fwhm" in extra else None
            usable = usable_backgrounds(raw, fwhm)
            if not usable.all():
                unusable += int((~usable).sum())
                block, raw = block[usable], raw[usable]
                fwhm = None if fwhm is None else fwhm[usable]
                if not len(block):
                    bar.update(int((~usable).sum()))
                    continue
            stamps, labels, meta, src = _inject_block(block_rng(seed, b), raw, config, fwhm)
            meta["kind"] = meta["kind"].astype(_KIND_BYTES)
            meta["background_row"] = block[src].astype(np.int64)
            for k, v in extra.items():
                if k != "psf_fwhm":
                    meta[k] = v[block][src]
            writer.append(stamps, labels, meta)
            bar.update(len(usable))
        if writer.n == 0:
            raise store.StoreError(f"{backgrounds}: none of its {len(rows):,} background stamps "
                                   "has finite pixels with noise to measure; nothing to inject "
                                   "into")
    dropped = [f"{with_source:,} holding a source per /meta/{store.META_TRUE_LABEL}"
               if with_source else "",
               f"{unusable:,} with no finite pixels or no noise to measure" if unusable else ""]
    if any(dropped) and log is not None:
        log(f"left out {with_source + unusable:,} background stamps of {backgrounds}: "
            + ", ".join(d for d in dropped if d))
    return store.open_store(out)
