"""Injection into real backgrounds: composition, carried metadata, SNR measured back."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stampbatch import store
from stampbatch.cli import main
from stampbatch.inject import measure_snr, robust_sigma, write_injected
from stampbatch.simulate import SimConfig, render_psf, simulate_stamps


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """'Real' backgrounds: simulated negatives (fields, gradients, correlated noise) kept as
    a candidate file with a per-stamp image type, as `ingest --meta` would write them."""
    path = tmp_path_factory.mktemp("inject") / "random_trajectories.h5"
    cfg = dataclasses.replace(SimConfig(), source_fraction=0.0, bad_column_fraction=0.0,
                              masked_fraction=0.0, detector_edge_fraction=0.0)
    b = simulate_stamps(3000, cfg, np.random.default_rng(40))
    types = np.array(["science", "difference", "coadd"])[np.arange(3000) % 3]
    store.create_store(path, b.stamps, None, {"image_type": types}, chunk_rows=512)
    return path


def test_positives_negatives_and_hard_negatives(real, tmp_path):
    cfg = dataclasses.replace(SimConfig(), offcentre_fraction=0.3, snr_min=5.0)
    info = write_injected(tmp_path / "inj.h5", real, config=cfg, seed=2, progress=False)
    labels = store.read_labels(info.path)
    meta = store.read_meta(info.path)
    stamps = store.read_stamps(info.path)
    bg = store.read_stamps(real)
    kinds = meta["kind"]
    assert (labels == (kinds == "source")).all()
    assert (kinds == "source").sum() == (kinds == "background").sum() == 3000
    assert abs((kinds == "offcentre").sum() / 3000 - 0.3) < 0.04
    neg = kinds == "background"
    np.testing.assert_array_equal(stamps[neg], bg[meta["background_row"][neg]])  # untouched
    np.testing.assert_array_equal(meta["image_type"], np.array(
        ["science", "difference", "coadd"])[meta["background_row"] % 3])
    pos = kinds == "source"
    assert np.hypot(meta["dx"][pos], meta["dy"][pos]).max() <= 0.5 + 1e-6
    off = kinds == "offcentre"
    assert np.hypot(meta["dx"][off], meta["dy"][off]).min() > cfg.offcentre_min_distance
    assert meta["snr"][pos].min() >= 5.0 and (meta["snr"][neg] == 0).all()


def test_injected_snr_is_recovered_with_the_stamps_own_robust_noise(real, tmp_path):
    info = write_injected(tmp_path / "snr.h5", real, seed=3, progress=False)
    meta = store.read_meta(info.path)
    pos = meta["kind"] == "source"
    stamps = store.read_stamps(info.path)[pos]
    bg = store.read_stamps(real)[meta["background_row"][pos]]
    shapes = render_psf((21, 21), meta["dx"][pos], meta["dy"][pos], meta["psf_fwhm"][pos],
                        meta["psf_beta"][pos])
    requested = meta["snr"][pos].astype(np.float64)
    # by construction: the added light, filtered, over the background's robust sigma
    added = np.einsum("nij,nij->n", shapes.astype(np.float64), stamps - bg.astype(np.float64))
    fwhm = meta["psf_fwhm"][pos]
    exact = added / (robust_sigma(bg, fwhm) * np.sqrt(np.einsum("nij,nij->n", shapes, shapes)))
    np.testing.assert_allclose(exact, requested, rtol=1e-3)
    # measured back with the same estimator, each stamp against its own median and robust
    # sigma, less what the estimator reads on the untouched background (its field, gradient)
    measured = measure_snr(stamps, shapes, fwhm) - measure_snr(bg, shapes, fwhm)
    for lo, hi in ((3, 10), (10, 30), (30, 100)):
        sel = (requested >= lo) & (requested < hi)
        ratio = measured[sel].mean() / requested[sel].mean()
        assert abs(ratio - 1.0) < 0.05, (lo, hi, ratio)
    assert abs(np.median(measured / requested) - 1.0) < 0.05
    bright = requested >= 20
    assert np.percentile(np.abs(measured[bright] / requested[bright] - 1), 90) < 0.05


def test_cli_simulate_with_backgrounds(real, tmp_path, capsys):
    out = tmp_path / "cli.h5"
    assert main(["simulate", str(out), "--backgrounds", str(real), "--n", "500", "--quiet"]) == 0
    assert "injected into" in capsys.readouterr().out
    labels = store.read_labels(out)
    assert labels.sum() == 500 and store.open_store(out).n_stamps >= 1000
    assert main(["simulate", str(tmp_path / "x.h5"), "--backgrounds", str(real), "--candidates",
                 "--quiet"]) == 2
    assert "--backgrounds writes a labelled store" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()
