"""Physics observers on a labelled simulated store: how well can *any* method do without a network?

    PYTHONPATH=. .venv/bin/python benchmarks/observers.py STORE.h5 [--run RUN] [--n N] [--json OUT]

Two observers that know each stamp's PSF and sky noise (``/meta``) but not its field:

* **matched filter**: the least-squares amplitude of a PSF at the centre (with a constant
  and a plane for the sky) over its standard error — optimal on an empty sky;
* **deblender**: the field's sources found one at a time (the most significant PSF peak
  outside the central disc of radius ``CENTRE_RADIUS_FWHM`` FWHM, sub-pixel refined, while
  it passes ``DETECT_SIGMA``), then one joint least-squares fit of a PSF at the centre, a PSF
  at every source found, a constant and a plane; the statistic is the centre amplitude over
  its standard error, so light shared between the centre and a neighbour counts once — a
  PSF-photometry pipeline's forced photometry at the centre.

With ``--run`` the run's network is scored on the same stamps. The tables: ROC AUC over the
store, and SNR 3-5 sources against empty (``background``) stamps with the same number of
field sources — the comparison the ninth session's quality breakdown made for the network,
against which the deblender says whether a practical observer does better on a crowded stamp.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from quality_breakdown import load_model, probabilities, subset_auc  # noqa: E402
from scipy.signal import fftconvolve  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from stampbatch import store  # noqa: E402
from stampbatch.report.evaluate import store_truth  # noqa: E402
from stampbatch.sim.profiles import render_psf  # noqa: E402

CENTRE_RADIUS_FWHM = 0.6   # peaks within this many FWHM of the centre are the centre's
CENTRE_RADIUS_MIN = 1.5    # ... and never closer than this, px
DETECT_SIGMA = 4.0         # a field source is fitted while its peak passes this significance
MAX_SOURCES = 20           # at most this many field sources per stamp
N_FIELD_BINS = (0, 1, 2, 4, 8, 13, 20, np.inf)
META = ("psf_fwhm", "psf_beta", "psf_e", "psf_pa", "sigma", "snr", "kind", "n_field")


def _sky_templates(n: int, shape: tuple[int, int]) -> np.ndarray:
    """A constant and a plane (x, y), (n, 3, H*W)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([np.ones(h * w), (xx.ravel() - (w - 1) / 2) / w, (yy.ravel() - (h - 1) / 2) / h])
    return np.broadcast_to(base, (n, 3, h * w))


def _fit(templates: np.ndarray, used: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares amplitudes of each stamp's used templates (n, k, P) and their variance
    factors diag((A^T A)^-1) (times sigma^2: the variance); unused templates get 0."""
    a = templates * used[:, :, None]
    gram = np.einsum("nkp,nlp->nkl", a, a)
    k = gram.shape[1]
    gram = gram + np.eye(k)[None] * (~used)[:, :, None]        # unused: identity rows, amplitude 0
    rhs = np.einsum("nkp,np->nk", a, data)
    inv = np.linalg.inv(gram)
    return np.einsum("nkl,nl->nk", inv, rhs), np.diagonal(inv, axis1=1, axis2=2)


def _psfs(shape, dx, dy, m: dict, rows: np.ndarray) -> np.ndarray:
    """Each stamp's PSF (Gaussian where ``psf_beta`` is NaN) at (dx, dy), flattened, float64."""
    return render_psf(shape, dx, dy, m["psf_fwhm"][rows], m["psf_beta"][rows], m["psf_e"][rows],
                      m["psf_pa"][rows]).reshape(len(rows), -1).astype(np.float64)


def _parabola_offset(centre: np.ndarray, minus: np.ndarray, plus: np.ndarray) -> np.ndarray:
    """Sub-pixel offset of the vertex of the parabola through three samples, within +-0.5
    (0 where the samples do not make a maximum)."""
    den = minus - 2 * centre + plus
    ok = np.isfinite(den) & (den < 0)
    return np.clip(np.where(ok, 0.5 * (minus - plus) / np.where(ok, den, -1.0), 0.0), -0.5, 0.5)


def observer_statistics(stamps: np.ndarray, meta: dict) -> dict[str, np.ndarray]:
    """The matched filter's and the deblender's statistic for every stamp (n, H, W)."""
    n, h, w = stamps.shape
    x = np.array(stamps, dtype=np.float64).reshape(n, -1)
    bad = ~np.isfinite(x) | (np.abs(x) >= 1e30)
    med = np.nanmedian(np.where(bad, np.nan, x), axis=1)
    x = np.where(bad, med[:, None], x)                          # masked pixels: the sky
    sigma = meta["sigma"].astype(np.float64)
    rows = np.arange(n)
    centre = _psfs((h, w), np.zeros(n), np.zeros(n), meta, rows)
    sky = _sky_templates(n, (h, w))
    base = np.concatenate([centre[:, None], sky], axis=1)
    used = np.ones((n, 4), dtype=bool)
    amp, var = _fit(base, used, x)
    out = {"matched_filter": amp[:, 0] / (sigma * np.sqrt(var[:, 0]))}
    # the deblender: find the field's sources one at a time on the residual of the last fit
    yy, xx = np.mgrid[0:h, 0:w]
    r_px = np.hypot(xx - (w - 1) / 2, yy - (h - 1) / 2).ravel()
    fwhm = meta["psf_fwhm"].astype(np.float64)
    outside = r_px[None] > np.maximum(CENTRE_RADIUS_FWHM * fwhm, CENTRE_RADIUS_MIN)[:, None]
    templates = base
    residual = x - np.einsum("nk,nkp->np", amp, templates)
    norm_c = np.sqrt((centre**2).sum(axis=1))
    active = np.ones(n, dtype=bool)
    kernel = centre.reshape(n, h, w)[:, ::-1, ::-1]
    for _ in range(MAX_SOURCES):
        # significance of a PSF at every pixel: the matched filter of the residual
        mf = fftconvolve(residual.reshape(n, h, w), kernel, mode="same", axes=(1, 2)).reshape(n, -1)
        signif = np.where(outside, mf / (norm_c * sigma)[:, None], -np.inf)
        peak = signif.argmax(axis=1)
        active &= signif[rows, peak] >= DETECT_SIGMA
        if not active.any():
            break
        py, px = np.divmod(peak, w)
        s2 = signif.reshape(n, h, w)
        c = s2[rows, py, px]
        ox = _parabola_offset(c, s2[rows, py, np.clip(px - 1, 0, w - 1)],
                              s2[rows, py, np.clip(px + 1, 0, w - 1)])
        oy = _parabola_offset(c, s2[rows, np.clip(py - 1, 0, h - 1), px],
                              s2[rows, np.clip(py + 1, 0, h - 1), px])
        dx, dy = px + ox - (w - 1) / 2, py + oy - (h - 1) / 2
        new = _psfs((h, w), dx, dy, meta, rows) * active[:, None]
        templates = np.concatenate([templates, new[:, None]], axis=1)
        used = np.concatenate([used, active[:, None]], axis=1)
        amp, var = _fit(templates, used, x)
        residual = x - np.einsum("nk,nkp->np", amp * used, templates)
    out["deblender"] = amp[:, 0] / (sigma * np.sqrt(var[:, 0]))
    out["sources_found"] = used[:, 4:].sum(axis=1)
    return out


def tables(y: np.ndarray, scores: dict[str, np.ndarray], meta: dict) -> dict:
    """ROC AUC of each observer over the store, and SNR 3-5 sources against empty stamps by
    field sources on the stamp."""
    kind = np.asarray(meta["kind"]).astype(str)
    faint = (y == 1) & (meta["snr"] >= 3) & (meta["snr"] < 5)
    empty = (y == 0) & (kind == "background")
    out: dict = {}
    for name, s in scores.items():
        ok = np.isfinite(s)
        row = {"roc_auc": float(roc_auc_score(y[ok], s[ok])), "faint_by_n_field": {}}
        for a, b in zip(N_FIELD_BINS[:-1], N_FIELD_BINS[1:]):
            g = (meta["n_field"] >= a) & (meta["n_field"] < b) & ok
            pos, neg = faint & g, empty & g
            if pos.any() and neg.any():
                row["faint_by_n_field"][f"{a}-{b}"] = subset_auc(s, pos, neg)
        out[name] = row
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", type=Path)
    parser.add_argument("--run", type=Path, help="also score RUN's network on the same stamps")
    parser.add_argument("--n", type=int, help="only the first N stamps")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    y = store_truth(args.store)
    info = store.open_store(args.store)
    missing = [c for c in META if c not in info.meta_columns]
    if missing:
        print(f"{args.store}: not a simulated store (no /meta {', '.join(missing)})", file=sys.stderr)
        return 2
    n = len(y) if args.n is None else min(args.n, len(y))
    meta = {k: v[:n] for k, v in store.read_meta(args.store, META).items()}
    stamps = store.read_stamps(args.store)[:n]
    y = y[:n]
    scores: dict[str, np.ndarray] = {}
    for start in range(0, n, 2000):
        part = observer_statistics(stamps[start:start + 2000],
                                   {k: v[start:start + 2000] for k, v in meta.items()})
        for k, v in part.items():
            scores.setdefault(k, []).append(v)
    scores = {k: np.concatenate(v) for k, v in scores.items()}
    found = scores.pop("sources_found")
    if args.run is not None:
        scores["network"] = probabilities(load_model(args.run), args.store, n)
    result = tables(y, scores, meta)
    result["sources_found_median_by_n_field"] = {
        f"{a}-{b}": float(np.median(found[(meta["n_field"] >= a) & (meta["n_field"] < b)]))
        for a, b in zip(N_FIELD_BINS[:-1], N_FIELD_BINS[1:])
        if ((meta["n_field"] >= a) & (meta["n_field"] < b)).any()}
    print(f"{args.store} ({n} stamps)")
    for name, row in result.items():
        if name.startswith("sources_found"):
            continue
        print(f"  {name:<15} AUC {row['roc_auc']:.4f}   SNR 3-5 against empty stamps by field sources: "
              + ", ".join(f"{k} {v:.3f}" for k, v in row["faint_by_n_field"].items()))
    print("  field sources found by the deblender (median) by field sources placed: "
          + ", ".join(f"{k} {v:g}" for k, v in result["sources_found_median_by_n_field"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
