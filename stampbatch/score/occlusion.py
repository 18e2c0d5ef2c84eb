"""Occlusion maps: where in a stamp the network looks when it says "source".

For every stamp a k x k patch (k = 5 by default) is slid over every position of the
*normalised* stamp and set to 0 (the normalised floor, not an 8-bit grey); each occluded
variant is normalised again, as the reference does, and scored. The map value of a position
is 1 - P(source) of that variant: high where hiding the pixels destroys the detection.

Orientation and alignment: the (H-k+1) x (W-k+1) grid of patch positions is indexed
``grid[r, c]`` = the patch covering rows r..r+k-1 and columns c..c+k-1 (rows first, so a
source at pixel (y, x) lights up the map at (y, x), never at the transposed (x, y) as in the
reference notebook). Each value is placed at its patch centre (r + k//2, c + k//2) and the
k//2-pixel border that no patch centre reaches is padded:

* ``pad="edge"`` (default): with the value of the nearest patch centre. Every border pixel is
  covered by that patch, so the map stays meaningful for a source near the stamp's edge.
* ``pad="min"``: with the map's minimum, as the reference does (the border reads "unimportant").

Speed: the variants of many stamps are built at once as one broadcast multiply,
(n, 1, H*W) * (positions, H*W) keep-masks → (n*positions, H, W); normalised vectorised, and
scored in large batches. ``threads`` independent build → normalise → predict pipelines run
concurrently (numpy's sort and ONNX Runtime release the GIL), which overlaps the
normalisation of one batch with inference on another.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from stampbatch.train.preprocess import normalize_reference, normalize_with_mask

PADS = ("edge", "min")
VARIANTS_PER_BATCH = 8192      # variants scored per call of ``predict`` (≈ 14 MB of float32)


def grid_shape(stamp_shape: tuple[int, int], patch: int) -> tuple[int, int]:
    """Number of patch positions along rows and columns."""
    h, w = stamp_shape
    if patch < 1 or patch > min(h, w):
        raise ValueError(f"occlusion patch must be between 1 and {min(h, w)} pixels, got {patch}")
    return h - patch + 1, w - patch + 1


def keep_masks(stamp_shape: tuple[int, int], patch: int) -> np.ndarray:
    """(positions, H*W) float32: 0 inside the patch at each position, 1 elsewhere.

    Positions are in row-major order of the patch's top-left corner (r, c).
    """
    h, w = stamp_shape
    gr, gc = grid_shape(stamp_shape, patch)
    rr = np.arange(h)[None, :, None]
    cc = np.arange(w)[None, None, :]
    r0 = np.repeat(np.arange(gr), gc)[:, None, None]
    c0 = np.tile(np.arange(gc), gr)[:, None, None]
    inside = (rr >= r0) & (rr < r0 + patch) & (cc >= c0) & (cc < c0 + patch)
    return (~inside).astype(np.float32).reshape(gr * gc, h * w)


def pad_grid(grid: np.ndarray, stamp_shape: tuple[int, int], patch: int,
             pad: str = "edge") -> np.ndarray:
    """Place (n, gr, gc) grid values at their patch centres in (n, H, W) maps; pad the border."""
    if pad not in PADS:
        raise ValueError(f"unknown occlusion padding {pad!r}; choose from {', '.join(PADS)}")
    h, w = stamp_shape
    gr, gc = grid.shape[1:]
    top, left = patch // 2, patch // 2
    widths = ((0, 0), (top, h - gr - top), (left, w - gc - left))
    if pad == "edge":
        return np.pad(grid, widths, mode="edge").astype(np.float32, copy=False)
    out = np.empty((len(grid), h, w), dtype=np.float32)
    out[:] = grid.min(axis=(1, 2))[:, None, None]
    out[:, top:top + gr, left:left + gc] = grid
    return out


def _check(normalised: np.ndarray) -> np.ndarray:
    arr = np.asarray(normalised, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"stamps must be an (N, H, W) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("occlusion maps need finite normalised stamps (NaN/Inf found)")
    return arr


def occlusion_maps(
    normalised_stamps: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    patch: int = 5,
    batch_stamps: int | None = None,
    *,
    threads: int = 1,
    pad: str = "edge",
) -> np.ndarray:
    """Occlusion maps (N, H, W) float32 of normalised stamps (N, H, W), aligned pixel for pixel.

    ``predict`` maps normalised stamps (M, H, W, 1) to P(source) (M,); it is called with
    ``batch_stamps`` stamps' worth of variants at a time (default: ~8192 variants) and, with
    ``threads`` > 1, from several threads at once.
    """
    stamps = _check(normalised_stamps)
    n, h, w = stamps.shape
    gr, gc = grid_shape((h, w), patch)
    if pad not in PADS:
        raise ValueError(f"unknown occlusion padding {pad!r}; choose from {', '.join(PADS)}")
    positions = gr * gc
    keep = keep_masks((h, w), patch)
    per_batch = max(1, batch_stamps or VARIANTS_PER_BATCH // positions)
    flat = stamps.reshape(n, h * w)
    out = np.empty((n, h, w), dtype=np.float32)

    def run(lo: int) -> None:
        hi = min(lo + per_batch, n)
        variants = (flat[lo:hi, None, :] * keep[None]).reshape((hi - lo) * positions, h, w)
        renormalised, _ = normalize_with_mask(variants)
        p = np.asarray(predict(renormalised[..., None]), dtype=np.float32).reshape(-1)
        if p.shape != (len(variants),):
            raise ValueError(f"predict returned {p.shape} values for {len(variants)} stamps")
        grid = (1.0 - p).reshape(hi - lo, gr, gc)
        out[lo:hi] = pad_grid(grid, (h, w), patch, pad)

    starts = range(0, n, per_batch)
    if threads <= 1 or len(starts) <= 1:
        for lo in starts:
            run(lo)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for _ in pool.map(run, starts):
                pass
    return out


def occlusion_maps_reference(
    normalised_stamps: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    patch: int = 5,
    *,
    pad: str = "edge",
) -> np.ndarray:
    """The straightforward per-stamp loop (the notebook's method, orientation fixed).

    For each stamp and each position: copy, zero the patch, normalise with the per-stamp
    reference; one ``predict`` per stamp. Kept for tests and the benchmark.
    """
    stamps = _check(normalised_stamps)
    n, h, w = stamps.shape
    gr, gc = grid_shape((h, w), patch)
    maps = np.empty((n, h, w), dtype=np.float32)
    for i in range(n):
        variants = []
        for r in range(gr):
            for c in range(gc):
                v = stamps[i].copy()
                v[r:r + patch, c:c + patch] = 0.0
                variants.append(normalize_reference(v))
        p = np.asarray(predict(np.stack(variants)[..., None])).reshape(gr, gc)
        maps[i] = pad_grid((1.0 - p)[None], (h, w), patch, pad)[0]
    return maps
