"""Tests for stampbatch.report.plots: every figure is a real PNG, helpers give the right numbers,
occlusion maps are drawn over the stamp without transposition."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from stampbatch.errors import StampbatchError
from stampbatch.report import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EDGES = [3, 5, 7, 10, 15, 20, 30, 50, 100]


def _stamps(n: int, seed: int = 0, shape: tuple[int, int] = (21, 21)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 1.0, size=(n, *shape)).astype(np.float32)


def assert_png(path: Path, min_size: tuple[int, int] = (200, 200)) -> np.ndarray:
    """The file is a complete PNG of a non-trivial size with drawn content; return pixels."""
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] >= min_size[0] and pixels.shape[1] >= min_size[1]
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
    assert not list(path.parent.glob(".*.partial"))  # no temporary file left behind
    return pixels


# ---------------------------------------------------------------- helpers on values


def test_normalise_confusion_rows_sum_to_one():
    fractions = plots.normalise_confusion([[90, 10], [5, 15]])
    np.testing.assert_allclose(fractions, [[0.9, 0.1], [0.25, 0.75]])
    np.testing.assert_allclose(fractions.sum(axis=1), [1.0, 1.0])


def test_normalise_confusion_empty_row_is_nan_not_division_error():
    fractions = plots.normalise_confusion(np.array([[0, 0], [3, 1]]))
    assert np.isnan(fractions[0]).all()
    np.testing.assert_allclose(fractions[1], [0.75, 0.25])


@pytest.mark.parametrize("bad", [[[1, 2, 3], [4, 5, 6]], [[1, -1], [0, 2]], [[np.nan, 1], [1, 1]]])
def test_normalise_confusion_refuses_bad_matrices(bad):
    with pytest.raises(ValueError):
        plots.normalise_confusion(bad)


def test_wilson_interval_values():
    lo, hi = plots.wilson_interval([5, 0, 10, 0], [10, 10, 10, 0], z=1.0)
    # p = 0.5, n = 10, z = 1: centre 0.5, half-width sqrt(0.025 + 0.0025) / 1.1
    half = np.sqrt(0.25 / 10 + 1 / 400) / 1.1
    np.testing.assert_allclose([lo[0], hi[0]], [0.5 - half, 0.5 + half])
    # no successes: the interval still has width, (z^2/n) / (1 + z^2/n) = 0.1 / 1.1
    assert lo[1] == pytest.approx(0.0, abs=1e-12) and hi[1] == pytest.approx(0.1 / 1.1)
    assert hi[2] == pytest.approx(1.0) and lo[2] == pytest.approx(1 / 1.1)
    assert np.isnan(lo[3]) and np.isnan(hi[3])  # empty bin: undefined


def test_snr_bin_centres_are_geometric():
    np.testing.assert_allclose(plots.snr_bin_centres([1, 4, 100]), [2.0, 20.0])
    with pytest.raises(ValueError):
        plots.snr_bin_centres([5, 3, 10])


def test_misclassified_first_order():
    labels = np.array([1, 0, 1, 0, 1])
    p = np.array([0.9, 0.6, 0.2, 0.1, 0.45])  # rows 1, 2, 4 wrong; errors 0.6, 0.8, 0.55
    assert plots.misclassified_first(labels, p).tolist() == [2, 1, 4, 0, 3]
    assert plots.misclassified_first(None, p).tolist() == [0, 1, 4, 2, 3]


def test_robust_limits_per_stamp_and_constant_stamps():
    lone = np.zeros((21, 21), np.float32)
    lone[4, 4] = 7.0
    stamps = np.stack([np.arange(441, dtype=np.float32).reshape(21, 21),
                       np.full((21, 21), 3.0, np.float32), lone])
    lo, hi = plots.robust_limits(stamps, (1.0, 99.0))
    np.testing.assert_allclose([lo[0], hi[0]], np.percentile(np.arange(441), [1, 99]))
    assert lo[1] < 3.0 < hi[1]  # constant: widened around the value
    assert (lo[2], hi[2]) == (0.0, 7.0)  # lone bright pixel: full range


def test_occlusion_overlay_is_not_transposed():
    importance = np.zeros((21, 21))
    importance[3, 15] = 1.0
    rgba = plots.occlusion_overlay_rgba(importance)
    assert rgba.shape == (21, 21, 4)
    assert rgba[3, 15, 3] == pytest.approx(plots.OVERLAY_MAX_ALPHA)
    alpha = rgba[..., 3].copy()
    alpha[3, 15] = 0.0
    assert np.all(alpha == 0.0)  # everything else, (15, 3) included, fully transparent
    assert rgba[3, 15, 0] > rgba[3, 15, 2]  # red


def test_occlusion_overlay_alpha_ramps_with_importance():
    importance = np.linspace(-0.2, 1.2, 21 * 21).reshape(21, 21)
    alpha = plots.occlusion_overlay_rgba(importance)[..., 3]
    assert alpha[importance <= 0].max() == 0.0  # occluding raised P: transparent
    assert np.all(np.diff(alpha.ravel()) >= 0)
    np.testing.assert_allclose(alpha[importance >= 1], plots.OVERLAY_MAX_ALPHA)
    half = np.argmin(np.abs(importance - 0.5))
    assert alpha.ravel()[half] == pytest.approx(0.5 * plots.OVERLAY_MAX_ALPHA, abs=0.01)


def test_occlusion_drop_from_one_minus_p_maps():
    # maps hold 1 - P(hidden); P(intact) = 0.9, hiding pixel [3, 15] brings P to 0.2
    maps = np.full((2, 21, 21), 0.1)
    maps[0, 3, 15] = 0.8
    drop = plots.occlusion_drop(maps, np.array([0.9, 0.5]))
    assert drop[0, 3, 15] == pytest.approx(0.7)
    np.testing.assert_allclose(np.delete(drop[0].ravel(), 3 * 21 + 15), 0.0, atol=1e-12)
    np.testing.assert_allclose(drop[1], -0.4)  # hiding raised P from 0.5 to 0.9


# ---------------------------------------------------------------- figures


def test_plot_confusion_matrix(tmp_path):
    out = plots.plot_confusion_matrix(np.array([[90, 10], [5, 95]]), tmp_path / "cm.png",
                                      title="vgg6")
    assert out == tmp_path / "cm.png"
    assert_png(out)


def test_plot_confusion_matrix_bad_input_names_file(tmp_path):
    with pytest.raises(plots.PlotError, match="cm.png"):
        plots.plot_confusion_matrix(np.array([1, 2, 3]), tmp_path / "cm.png")
    assert not (tmp_path / "cm.png").exists()


def test_plot_history(tmp_path):
    history = {"loss": [0.7, 0.5, 0.45], "accuracy": [0.5, 0.7, 0.8],
               "val_loss": [0.6, 0.5, 0.55], "val_accuracy": [0.6, 0.75, 0.7]}
    assert_png(plots.plot_history(history, tmp_path / "history.png", title="run"),
               min_size=(300, 600))
    with pytest.raises(plots.PlotError, match="history"):
        plots.plot_history({}, tmp_path / "empty.png")


@pytest.mark.parametrize("log_x", [False, True])
def test_plot_roc(tmp_path, log_x):
    fpr = np.linspace(0, 1, 30) ** 3
    tpr = np.sqrt(np.linspace(0, 1, 30))
    out = plots.plot_roc(fpr, tpr, tmp_path / "roc.png", auc=0.91, operating_point=(0.01, 0.4),
                         log_x=log_x)
    assert_png(out)


def test_plot_completeness_with_extra_and_empty_bin(tmp_path):
    completeness = [0.1, 0.3, 0.6, 0.8, 0.9, 0.95, None, 1.0]  # JSON null for an empty bin
    counts = [50, 60, 40, 30, 20, 20, 0, 5]
    out = plots.plot_completeness(EDGES, completeness, counts, tmp_path / "c.png",
                                  extra={"operating point": [0.05, 0.2, 0.5, 0.7, 0.85, 0.9,
                                                             None, 1.0]})
    assert_png(out)
    with pytest.raises(plots.PlotError, match="SNR bins"):
        plots.plot_completeness(EDGES, [0.5] * 3, [10] * 3, tmp_path / "bad.png")


def test_plot_completeness_comparison(tmp_path):
    record = {"bin_edges": EDGES, "completeness": [0.2] * 8, "counts": [10] * 8,
              "threshold": 0.5, "completeness_at_operating_point": [0.1] * 8}
    other = {"bin_edges": [3, 10, 100], "completeness": [0.4, 0.9], "counts": [5, 5],
             "threshold": 0.5}
    assert_png(plots.plot_completeness_comparison({"a": record, "b<&>": other},
                                                  tmp_path / "cmp.png"))
    with pytest.raises(plots.PlotError):
        plots.plot_completeness_comparison({}, tmp_path / "none.png")


def test_plot_stamp_grid(tmp_path):
    labels = (np.arange(40) % 2).astype(np.int8)
    p = np.where(labels == 1, 0.8, 0.1)
    p[[3, 4]] = [0.9, 0.2]  # two mistakes
    out = plots.plot_stamp_grid(_stamps(40)[..., None], labels, p, tmp_path / "grid.png",
                                max_stamps=12, title="examples")
    pixels = assert_png(out)
    assert pixels.shape[1] > pixels.shape[0]  # 8 columns wide, 2 rows
    assert_png(plots.plot_stamp_grid(_stamps(3), None, [0.1, 0.9, 0.5], tmp_path / "u.png",
                                     max_stamps=32), min_size=(150, 300))
    with pytest.raises(plots.PlotError, match="labels"):
        plots.plot_stamp_grid(_stamps(4), np.zeros(3), np.zeros(4), tmp_path / "x.png")


def test_plot_occlusion_writes_png(tmp_path):
    stamps = _stamps(6)
    p = np.linspace(0.05, 0.95, 6)
    maps = np.broadcast_to(1 - p[:, None, None], stamps.shape).copy()
    maps[:, 8:13, 8:13] = 0.95  # hiding the centre destroys the detection
    maps[1, 0, 0] = 0.0  # and here hiding raises P (negative drop)
    out = plots.plot_occlusion(stamps, maps, p, [1, 4], tmp_path / "occ.png")
    assert_png(out, min_size=(500, 800))


def test_plot_occlusion_rejects_misaligned_input(tmp_path):
    with pytest.raises(plots.PlotError, match="do not match"):
        plots.plot_occlusion(_stamps(4), np.zeros((3, 21, 21)), np.zeros(4), [0],
                             tmp_path / "o.png")
    with pytest.raises(plots.PlotError, match="rows"):
        plots.plot_occlusion(_stamps(4), np.zeros((4, 21, 21)), np.zeros(4), [4],
                             tmp_path / "o.png")
    assert not (tmp_path / "o.png").exists()


def _pixel_at(fig, ax, x: float, y: float) -> np.ndarray:
    """RGB (0-255) of the rendered figure at data coordinates (x, y) of ``ax``."""
    buf = np.asarray(fig.canvas.buffer_rgba())
    dx, dy = ax.transData.transform((x, y))
    return buf[int(round(buf.shape[0] - dy)), int(round(dx)), :3].astype(int)


def test_plot_occlusion_hot_pixel_drawn_over_the_same_stamp_pixel(tmp_path):
    """A map hot only at [3, 15] shows red where stamp pixel [3, 15] is, not at [15, 3]."""
    stamp = np.zeros((1, 21, 21), np.float32)
    stamp[0, 3, 15] = 5.0  # the stamp's own bright pixel at the same place
    omap = np.full((1, 21, 21), 0.1, np.float32)  # 1 - P everywhere: hiding changes nothing
    omap[0, 3, 15] = 1.0  # ... except at [3, 15], where P(source) drops from 0.9 to 0
    fig = plots._occlusion_figure(stamp, omap, np.array([0.9]), [0], tmp_path / "o.png", "")
    fig.canvas.draw()
    ax_stamp, ax_over, ax_map = fig.axes[:3]
    # origin="lower": stamp[i, j] is at x = j, y = i
    bright = _pixel_at(fig, ax_stamp, 15, 3)
    assert bright.min() > 200  # white stamp pixel
    assert _pixel_at(fig, ax_stamp, 3, 15).max() < 60  # dark elsewhere
    hot = _pixel_at(fig, ax_over, 15, 3)
    assert hot[0] > 100 and hot[0] > hot[1] + 60 and hot[0] > hot[2] + 60  # red
    cold = _pixel_at(fig, ax_over, 3, 15)  # the transposed position is untouched grey
    assert abs(cold[0] - cold[1]) < 10 and abs(cold[0] - cold[2]) < 10
    mapped = _pixel_at(fig, ax_map, 15, 3)
    assert mapped[0] > mapped[2] + 60
    # the same data, extent and origin for the stamp and the overlay
    (im_stamp,), (im_under, im_over) = ax_stamp.images, ax_over.images
    assert im_stamp.get_extent() == im_over.get_extent() == im_under.get_extent()
    assert im_stamp.origin == im_over.origin == "lower"
    assert im_over.get_array()[3, 15, 3] > 0.7 and im_over.get_array()[15, 3, 3] < 1e-6


def test_overwrite_is_atomic_and_keeps_permissions(tmp_path):
    path = tmp_path / "sub" / "cm.png"  # missing directory is created
    plots.plot_confusion_matrix(np.eye(2) * 10, path)
    first = path.read_bytes()
    plots.plot_confusion_matrix(np.array([[1, 9], [9, 1]]), path)
    assert path.read_bytes() != first
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == ["cm.png"]


def test_unwritable_target_is_plot_error(tmp_path):
    (tmp_path / "cm.png").mkdir()  # a directory where the PNG should go
    with pytest.raises(StampbatchError, match="cm.png"):
        plots.plot_confusion_matrix(np.eye(2), tmp_path / "cm.png")
    assert list(tmp_path.iterdir()) == [tmp_path / "cm.png"]


def test_concurrent_plots_from_threads(tmp_path):
    """No pyplot state: figures drawn at once from several threads all come out whole."""
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            plots.plot_stamp_grid(_stamps(8, seed=k), np.arange(8) % 2, np.full(8, 0.3),
                                  tmp_path / f"g{k}.png", max_stamps=8)
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in range(4):
        assert_png(tmp_path / f"g{k}.png", min_size=(100, 300))
