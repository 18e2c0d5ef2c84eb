"""Figures for training runs and scored candidates, written as PNG files a person can open.

Every function builds its own :class:`matplotlib.figure.Figure` on an Agg canvas (no pyplot,
no global state), writes one PNG atomically (temporary file beside the target, then a rename)
and returns the path. Safe to call from several threads or Dask workers at once.

Images follow the astronomical convention ``origin="lower"``: stamp pixel ``[i, j]`` (row i,
column j) is drawn at x = j, y = i, and every map laid over a stamp uses the same extent and
origin, so ``map[i, j]`` lies exactly over ``stamp[i, j]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator, ScalarFormatter

from stampbatch import fileio
from stampbatch.errors import PlotError

DPI = 110
CLASS_NAMES = ("no source", "source")
WILSON_Z = 1.0  # error bars: 68 % (one sigma) Wilson score interval
STRETCH_PERCENTILES = (1.0, 99.5)
OVERLAY_MAX_ALPHA = 0.8


# ---------------------------------------------------------------- helpers


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def write_atomically(path: Path | str, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, then rename it onto ``path``.

    :func:`stampbatch.fileio.write_atomic` (file and directory fsynced, umask honoured);
    a missing parent directory is created; an OS failure is a :class:`PlotError`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return fileio.write_atomic(path, write, fail=_cannot_write)
    except OSError as exc:
        raise PlotError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _cannot_write(path: Path, problem: str) -> PlotError:
    return PlotError(f"{path}: cannot write: {problem}")


def _save(fig: Figure, path: Path | str) -> Path:
    """Write ``fig`` to ``path`` as PNG, atomically."""
    return write_atomically(path, lambda fh: fig.savefig(fh, format="png", dpi=DPI))


def _fail(path: Path | str, problem: str) -> PlotError:
    return PlotError(f"{path}: cannot plot: {problem}")


def _as_stamps(stamps: Any, path: Path | str) -> np.ndarray:
    arr = np.asarray(stamps, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise _fail(path, f"stamps must be (N, H, W) or (N, H, W, 1), got shape {arr.shape}")
    return arr


def _floats(values: Any) -> np.ndarray:
    """1-D float array; JSON ``null`` (None) becomes NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def normalise_confusion(matrix: Any) -> np.ndarray:
    """Row-normalise a confusion matrix of counts (rows = true class): each row sums to 1.

    A row with no stamps has no defined fractions and comes back as NaN.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"confusion matrix must be square, got shape {m.shape}")
    if np.any(~np.isfinite(m)) or np.any(m < 0):
        raise ValueError("confusion matrix counts must be finite and non-negative")
    totals = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, m / np.where(totals > 0, totals, 1.0), np.nan)


def wilson_interval(successes: Any, trials: Any, z: float = WILSON_Z) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval (lower, upper) for binomial fractions; NaN where trials == 0."""
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1.0 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = np.where(n > 0, np.clip(centre - half, 0.0, 1.0), np.nan)
    hi = np.where(n > 0, np.clip(centre + half, 0.0, 1.0), np.nan)
    return lo, hi


def snr_bin_centres(bin_edges: Any) -> np.ndarray:
    """Geometric centres of SNR bins (the middle of each bin on a log axis)."""
    edges = _floats(bin_edges)
    if edges.ndim != 1 or edges.size < 2 or np.any(edges <= 0) or np.any(np.diff(edges) <= 0):
        raise ValueError(f"SNR bin edges must be positive and increasing, got {edges.tolist()}")
    return np.sqrt(edges[:-1] * edges[1:])


def robust_limits(stamps: np.ndarray, percentiles: tuple[float, float] = STRETCH_PERCENTILES
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per-stamp display limits (low, high) at the given percentiles, vectorised over stamps."""
    flat = stamps.reshape(stamps.shape[0], -1).astype(np.float64)
    lo, hi = np.nanpercentile(flat, percentiles, axis=1)
    narrow = ~(hi > lo)  # nearly constant stamps (a lone bright pixel): use the full range
    if narrow.any():
        lo = np.where(narrow, np.nanmin(flat, axis=1), lo)
        hi = np.where(narrow, np.nanmax(flat, axis=1), hi)
        flat_rows = ~(hi > lo)  # constant (or all-NaN) stamps: widen so imshow has a range
        lo = np.where(flat_rows, np.nan_to_num(lo) - 0.5, lo)
        hi = np.where(flat_rows, np.nan_to_num(hi) + 0.5, hi)
    return lo, hi


def misclassified_first(labels: np.ndarray | None, probabilities: np.ndarray) -> np.ndarray:
    """Display order: stamps misclassified at P = 0.5 first (most confidently wrong first),
    then the rest in their original order. Without labels: highest P(source) first."""
    p = np.asarray(probabilities, dtype=np.float64)
    idx = np.arange(p.size)
    if labels is None:
        return np.lexsort((idx, -p))
    truth = np.asarray(labels).astype(int)
    wrong = (p >= 0.5).astype(int) != truth
    error = np.abs(p - truth)
    # lexsort: last key is primary. wrong first, then by error (only among wrong), then index.
    return np.lexsort((idx, np.where(wrong, -error, 0.0), ~wrong))


def occlusion_drop(maps: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Drop in P(source) when the patch around each pixel is hidden, (N, H, W).

    ``maps`` are occlusion maps as :func:`stampbatch.score.occlusion.occlusion_maps` gives them:
    1 − P(source) of the stamp with the patch hidden; ``probabilities`` are P(source) of the
    intact stamps. drop = P − P(hidden) = map − (1 − P): positive where hiding the pixels
    lowers the score, 0 where they do not matter.
    """
    m = np.asarray(maps, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1, *([1] * (m.ndim - 1)))
    return m - (1.0 - p)


def occlusion_overlay_rgba(importance: np.ndarray, *, cmap: str = "Reds",
                           max_alpha: float = OVERLAY_MAX_ALPHA) -> np.ndarray:
    """RGBA (H, W, 4) overlay of an importance map on the scale 0 (irrelevant) to 1 (carries
    the whole detection): colour and opacity rise with it, 0 fully transparent, 1 at
    ``max_alpha``; values outside [0, 1] are clipped, NaN is transparent.
    ``rgba[i, j]`` describes ``importance[i, j]`` (no transposition).
    """
    m = np.asarray(importance, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"importance map must be 2-D, got shape {m.shape}")
    level = np.clip(np.nan_to_num(m, nan=0.0), 0.0, 1.0)
    rgba = colormaps[cmap](level)
    rgba[..., 3] = level * max_alpha
    return rgba


def _stamp_extent(shape: tuple[int, ...]) -> tuple[float, float, float, float]:
    h, w = shape[-2], shape[-1]
    return (-0.5, w - 0.5, -0.5, h - 0.5)


def _class_name(label: int, class_names: Sequence[str] = CLASS_NAMES) -> str:
    return class_names[label] if 0 <= label < len(class_names) else str(label)


# ---------------------------------------------------------------- training figures


def plot_confusion_matrix(matrix: np.ndarray, path: Path, *, title: str = "",
                          class_names: Sequence[str] = CLASS_NAMES) -> Path:
    """Confusion matrix (rows = true class): row-normalised fractions in colour, counts written in."""
    try:
        fractions = normalise_confusion(matrix)
    except ValueError as exc:
        raise _fail(path, str(exc)) from None
    counts = np.asarray(matrix, dtype=np.float64)
    k = counts.shape[0]
    names = [str(n) for n in class_names][:k] + [str(i) for i in range(len(class_names), k)]
    fig = _figure(4.8, 4.0)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(fractions), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, label="fraction of true class")
    for i in range(k):
        for j in range(k):
            frac = fractions[i, j]
            text = "n/a" if np.isnan(frac) else f"{frac:.3f}"
            colour = "white" if np.isfinite(frac) and frac > 0.6 else "black"
            ax.text(j, i, f"{text}\n({int(round(counts[i, j])):,})", ha="center", va="center",
                    color=colour, fontsize=10)
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted class (P ≥ 0.5)")
    ax.set_ylabel("true class")
    ax.set_title(title or f"Confusion matrix (N = {int(counts.sum()):,})")
    return _save(fig, path)


def plot_history(history: Mapping[str, Sequence[float]], path: Path, *, title: str = "") -> Path:
    """Loss and accuracy per epoch (epoch 1 first), training and validation."""
    panels = (("loss", "loss (categorical cross-entropy)"), ("accuracy", "accuracy"))
    if not any(len(history.get(key, ())) for key, _ in panels):
        raise _fail(path, "history has no 'loss' or 'accuracy' values")
    fig = _figure(9.0, 3.8)
    axes = fig.subplots(1, 2)
    for ax, (key, label) in zip(axes, panels, strict=True):
        for prefix, name, style in (("", "train", "-o"), ("val_", "validation", "-s")):
            values = _floats(history.get(prefix + key, ()))
            if values.size:
                ax.plot(np.arange(1, values.size + 1), values, style, ms=3, label=name)
        val = _floats(history.get("val_loss", ()))
        if val.size and np.isfinite(val).any():
            best = int(np.nanargmin(val)) + 1
            ax.axvline(best, color="grey", ls=":", lw=1, label=f"best val loss (epoch {best})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("loss")
    axes[1].set_title("accuracy")
    fig.suptitle(title or "Training history")
    return _save(fig, path)


def plot_roc(fpr: np.ndarray, tpr: np.ndarray, path: Path, *, auc: float,
             operating_point: tuple[float, float] | None = None, title: str = "",
             log_x: bool = False) -> Path:
    """ROC curve (completeness against false-positive rate), AUC in the legend, operating point
    marked; ``log_x`` puts the false-positive rate on a log axis to show the low-FPR end."""
    x = np.asarray(fpr, dtype=np.float64).ravel()
    y = np.asarray(tpr, dtype=np.float64).ravel()
    if x.size != y.size or x.size < 2:
        raise _fail(path, f"fpr and tpr must have the same length >= 2, got {x.size} and {y.size}")
    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot()
    if log_x:
        positive = x > 0
        floor = float(x[positive].min()) if positive.any() else 1e-6
        x = np.where(positive, x, floor)
        ax.set_xscale("log")
        ax.set_xlim(floor, 1.0)
    else:
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="chance")
        ax.set_xlim(0.0, 1.0)
    ax.plot(x, y, lw=2, label=f"ROC (AUC = {auc:.4f})")
    if operating_point is not None:
        op_fpr, op_tpr = (float(v) for v in operating_point)
        if log_x and op_fpr <= 0:
            op_fpr = ax.get_xlim()[0]
        ax.plot([op_fpr], [op_tpr], "o", ms=8, mfc="none", mec="C3", mew=2,
                label=f"operating point (FPR {op_fpr:.3g}, TPR {op_tpr:.3f})")
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false-positive rate" + (" (log)" if log_x else ""))
    ax.set_ylabel("true-positive rate (completeness)")
    ax.set_title(title or "ROC curve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reliability(record: Mapping[str, Any], path: Path, *, title: str = "") -> Path:
    """Reliability diagram from :func:`stampbatch.report.metrics.reliability`: fraction of sources
    against mean P per bin (the diagonal is perfect calibration), stamps per bin below."""
    counts = _floats(record.get("counts", ()))
    if counts.size == 0:
        raise _fail(path, "reliability record has no bins")
    mean_p = np.array([np.nan if v is None else v for v in record["mean_probability"]], float)
    frac = np.array([np.nan if v is None else v for v in record["fraction_sources"]], float)
    edges = _floats(record["bin_edges"])
    fig = _figure(5.0, 5.6)
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    ok = np.isfinite(mean_p)
    top.plot(mean_p[ok], frac[ok], "-o", ms=4, label="test stamps")
    top.set_ylabel("fraction with a source")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="upper left")
    top.set_title(title or f"Reliability (ECE {record.get('ece', float('nan')):.4f})")
    bottom.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="C0", alpha=0.6)
    bottom.set_yscale("log")
    bottom.set_xlabel("predicted P(source)")
    bottom.set_ylabel("stamps")
    return _save(fig, path)


def _setup_snr_axis(ax: Any, edges: np.ndarray) -> None:
    ax.set_xscale("log")
    ax.set_xlim(edges[0], edges[-1])
    ax.xaxis.set_major_locator(FixedLocator(edges.tolist()))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("SNR")
    ax.set_ylabel("completeness")
    ax.set_ylim(0.0, 1.08)
    ax.grid(alpha=0.3)


def _completeness_curve(ax: Any, edges: np.ndarray, completeness: Any, counts: Any | None,
                        label: str, colour: str, *, annotate: bool, marker: str = "o") -> None:
    centres = snr_bin_centres(edges)
    c = _floats(completeness)
    if c.size != centres.size:
        raise ValueError(f"{label}: {c.size} completeness values for {centres.size} SNR bins")
    if counts is None:
        ax.plot(centres, c, "--" + marker, color=colour, ms=4, label=label)
        return
    n = _floats(counts)
    if n.size != centres.size:
        raise ValueError(f"{label}: {n.size} counts for {centres.size} SNR bins")
    c = np.where(n > 0, c, np.nan)
    lo, hi = wilson_interval(np.round(c * n), n)
    yerr = np.vstack([np.clip(c - lo, 0, None), np.clip(hi - c, 0, None)])
    ax.errorbar(centres, c, yerr=np.nan_to_num(yerr), fmt="-" + marker, color=colour, ms=5,
                capsize=3, label=label)
    if annotate:  # sources per bin, in a row above the curves
        ax.set_ylim(0.0, 1.17)
        for xc, nc in zip(centres, n, strict=True):
            ax.text(xc, 1.115, f"n={int(nc):,}" if np.isfinite(nc) else "n=?", ha="center",
                    va="center", fontsize=7, color=colour)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")


def plot_completeness(bin_edges: Sequence[float], completeness: Sequence[float],
                      counts: Sequence[float], path: Path, *,
                      extra: Mapping[str, Sequence[float]] | None = None, title: str = "") -> Path:
    """Completeness of true sources against SNR (log x, geometric bin centres), with 68 %
    Wilson binomial error bars and the number of sources per bin; ``extra`` adds other
    completeness curves over the same bins (e.g. at the operating threshold), by label."""
    try:
        edges = _floats(bin_edges)
        snr_bin_centres(edges)
        fig = _figure(6.4, 4.4)
        ax = fig.add_subplot()
        _setup_snr_axis(ax, edges)
        _completeness_curve(ax, edges, completeness, counts,
                            "completeness (68 % Wilson interval)", "C0", annotate=True)
        for i, (label, values) in enumerate((extra or {}).items(), start=1):
            _completeness_curve(ax, edges, values, None, str(label), f"C{i}", annotate=False,
                                marker="s")
    except ValueError as exc:
        raise _fail(path, str(exc)) from None
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "Completeness against SNR")
    return _save(fig, path)


def plot_completeness_comparison(runs: Mapping[str, Mapping[str, Any]], path: Path, *,
                                 title: str = "") -> Path:
    """Completeness against SNR for several runs side by side.

    ``runs`` maps a label (run name) to that run's ``completeness_vs_snr`` record from
    metrics.json: ``bin_edges``, ``completeness``, ``counts``, ``threshold`` and optionally
    ``completeness_at_operating_point``. Left panel: at each run's threshold (0.5); right panel
    (when any run has it): at each run's operating point (threshold for the target FPR).
    """
    if not runs:
        raise _fail(path, "no runs with completeness against SNR")
    with_op = any(r.get("completeness_at_operating_point") is not None for r in runs.values())
    fig = _figure(11.0 if with_op else 6.4, 4.6)
    axes = fig.subplots(1, 2 if with_op else 1, squeeze=False)[0]
    try:
        all_edges = [_floats(r["bin_edges"]) for r in runs.values()]
        span = np.array([min(e[0] for e in all_edges), max(e[-1] for e in all_edges)])
        markers = "osD^vP*X"
        for ax_i, ax in enumerate(axes):
            _setup_snr_axis(ax, all_edges[0] if len(runs) == 1 else span)
            if len(runs) > 1:  # edges differ between runs in general: plain log ticks
                ax.xaxis.set_major_locator(FixedLocator([3, 5, 7, 10, 20, 30, 50, 100, 200]))
                ax.set_xlim(*span)
            for i, (label, rec) in enumerate(runs.items()):
                key = "completeness" if ax_i == 0 else "completeness_at_operating_point"
                if rec.get(key) is None:
                    continue
                _completeness_curve(ax, _floats(rec["bin_edges"]), rec[key], rec.get("counts"),
                                    str(label), f"C{i % 10}", annotate=False,
                                    marker=markers[i % len(markers)])
            ax.legend(loc="lower right", fontsize=8)
    except (KeyError, ValueError) as exc:
        raise _fail(path, f"bad completeness record: {exc}") from None
    thresholds = {r.get("threshold") for r in runs.values()}
    thr = f"P ≥ {thresholds.pop():g}" if len(thresholds) == 1 and None not in thresholds else \
        "each run's threshold"
    axes[0].set_title(f"at {thr}")
    if with_op:
        axes[1].set_title("at the operating point (threshold for the target FPR)")
    fig.suptitle(title or "Completeness against SNR: comparison of runs")
    return _save(fig, path)


# ---------------------------------------------------------------- stamp figures


def plot_stamp_grid(stamps: np.ndarray, labels: np.ndarray | None, probabilities: np.ndarray,
                    path: Path, *, max_stamps: int = 32, title: str = "") -> Path:
    """Grid of stamps (robust percentile stretch), misclassified at P = 0.5 first; each panel
    titled "true: source / P=0.93", in red when the prediction is wrong. ``labels`` may be None
    for unlabelled candidates (then the most probable sources come first)."""
    arr = _as_stamps(stamps, path)
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    n = arr.shape[0]
    if n == 0:
        raise _fail(path, "no stamps")
    if p.size != n:
        raise _fail(path, f"{p.size} probabilities for {n} stamps")
    truth = None
    if labels is not None:
        truth = np.asarray(labels).astype(int).ravel()
        if truth.size != n:
            raise _fail(path, f"{truth.size} labels for {n} stamps")
    if max_stamps < 1:
        raise _fail(path, f"max_stamps must be >= 1, got {max_stamps}")
    order = misclassified_first(truth, p)[:max_stamps]
    shown = arr[order]
    lo, hi = robust_limits(shown)
    ncols = min(8, order.size)
    nrows = -(-order.size // ncols)
    fig = _figure(1.75 * ncols, 1.85 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for k, ax in enumerate(axes):  # one panel per displayed stamp (at most max_stamps)
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= order.size:
            ax.set_axis_off()
            continue
        row = order[k]
        ax.imshow(shown[k], cmap="gray", origin="lower", vmin=lo[k], vmax=hi[k],
                  extent=_stamp_extent(shown.shape), interpolation="nearest")
        if truth is None:
            ax.set_title(f"#{row} / P={p[row]:.2f}", fontsize=8)
            continue
        wrong = int(p[row] >= 0.5) != truth[row]
        ax.set_title(f"true: {_class_name(truth[row])} / P={p[row]:.2f}", fontsize=7.5,
                     color="red" if wrong else "black")
        if wrong:
            for spine in ax.spines.values():
                spine.set_color("red")
                spine.set_linewidth(2)
    if truth is None:
        summary = f"{order.size} of {n} stamps, highest P(source) first"
    else:
        n_wrong = int(np.count_nonzero((p >= 0.5).astype(int) != truth))
        summary = (f"{order.size} of {n} stamps; {n_wrong} misclassified at P = 0.5"
                   + (" (shown first, in red)" if n_wrong else ""))
    fig.suptitle(f"{title}\n{summary}" if title else summary, fontsize=10)
    return _save(fig, path)


def _occlusion_figure(stamps: np.ndarray, maps: np.ndarray, probabilities: np.ndarray,
                      rows: Sequence[int], path: Path | str, title: str,
                      labels: Sequence[int] | None = None) -> Figure:
    arr = _as_stamps(stamps, path)
    m = _as_stamps(maps, path)
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    n = arr.shape[0]
    if m.shape != arr.shape:
        raise _fail(path, f"occlusion maps {m.shape} do not match stamps {arr.shape}")
    if p.size != n:
        raise _fail(path, f"{p.size} probabilities for {n} stamps")
    idx = np.asarray(list(rows), dtype=np.int64).ravel()
    if idx.size == 0:
        raise _fail(path, "no rows to show")
    if np.any(idx < 0) or np.any(idx >= n):
        raise _fail(path, f"rows must lie in [0, {n}), got {idx.min()}..{idx.max()}")
    names = idx if labels is None else np.asarray(list(labels), dtype=np.int64).ravel()
    if names.size != idx.size:
        raise _fail(path, f"{names.size} labels for {idx.size} rows")
    shown, p_shown = arr[idx], p[idx]
    drop = occlusion_drop(m[idx], p_shown)
    lo, hi = robust_limits(shown)
    extent = _stamp_extent(arr.shape)
    fig = _figure(10.5, 3.0 * idx.size + 0.5)
    axes = fig.subplots(idx.size, 3, squeeze=False)
    for k, row in enumerate(idx):  # one figure row per requested stamp
        ax_stamp, ax_over, ax_map = axes[k]
        for ax in axes[k]:
            ax.set_xlabel("x (pixel)")
            ax.set_ylabel("y (pixel)")
        for ax in (ax_stamp, ax_over):
            ax.imshow(shown[k], cmap="gray", origin="lower", extent=extent, vmin=lo[k],
                      vmax=hi[k], interpolation="nearest")
        ax_stamp.set_title(f"stamp {names[k]}: P(source) = {p[row]:.3f}", fontsize=9)
        ax_over.imshow(occlusion_overlay_rgba(drop[k]), origin="lower", extent=extent,
                       interpolation="nearest")
        ax_over.set_title("overlay: drop in P(source) (opaque = 1)", fontsize=9)
        finite = drop[k][np.isfinite(drop[k])]
        bound = max(float(np.abs(finite).max()) if finite.size else 0.0, 1e-3)
        im = ax_map.imshow(drop[k], cmap="RdBu_r", origin="lower", extent=extent,
                           vmin=-bound, vmax=bound, interpolation="nearest")
        fig.colorbar(im, ax=ax_map, label="drop in P(source)")
        ax_map.set_title("occlusion map: drop in P(source)\nwhen the patch is hidden", fontsize=9)
    fig.suptitle(title or "Occlusion maps: where the network looks")
    return fig


def plot_occlusion(stamps: np.ndarray, maps: np.ndarray, probabilities: np.ndarray,
                   rows: Sequence[int], path: Path, *, title: str = "",
                   labels: Sequence[int] | None = None) -> Path:
    """For each of ``rows``: the stamp; the stamp in grey with the occlusion map overlaid
    (transparent Reds, opacity rising with the drop in P(source) when the pixel's patch is
    hidden, on the absolute scale 0 to 1, so a map of a stamp the network rejects anyway stays
    transparent); and the map alone as the drop in P(source), with a colour bar.

    ``maps`` are as :func:`stampbatch.score.occlusion.occlusion_maps` gives them (1 − P(source) of
    the stamp with the patch hidden). ``stamps``, ``maps`` and ``probabilities`` (P(source) of
    the intact stamps) are aligned row for row (length N); ``rows`` picks which to show.
    ``map[i, j]`` is drawn exactly over ``stamp[i, j]``. ``labels`` are the stamp numbers the
    panels show (default: ``rows``), e.g. the rows of the candidate file the stamps came from.
    """
    return _save(_occlusion_figure(stamps, maps, probabilities, rows, path, title, labels), path)
