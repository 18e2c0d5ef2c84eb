"""Injection into real backgrounds: composition, carried metadata, SNR measured back."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stampbatch import store
from stampbatch.cli import main
from stampbatch.sim.inject import measure_snr, robust_sigma, write_injected
from stampbatch.sim.simulate import SimConfig, render_psf, simulate_stamps


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


def test_backgrounds_holding_a_source_or_no_pixels_are_left_out_and_counted(tmp_path, capsys):
    """Candidates with their truth (/meta/true_label 1: a source at the centre) are never
    written as label-0 backgrounds; all-NaN and flat stamps cannot take an injection (no
    noise to scale the SNR to): both are left out and counted, with no numpy warning."""
    import warnings

    rng = np.random.default_rng(7)
    stamps = rng.normal(size=(60, 21, 21)).astype(np.float32)
    truth = (np.arange(60) % 3 == 0).astype(np.int8)          # 20 hold a source
    stamps[[1, 2]] = np.nan                                    # no finite pixel
    stamps[4] = 3.0                                            # flat: no noise
    cands = tmp_path / "cands.h5"
    store.create_store(cands, stamps, None, {"true_label": truth})
    out = tmp_path / "inj.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["simulate", str(out), "--backgrounds", str(cands), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert (f"left out 23 background stamps of {cands}: 20 holding a source per "
            "/meta/true_label, 3 with no finite pixels or no noise to measure") in printed
    meta = store.read_meta(out)
    used = np.unique(meta["background_row"])
    assert used.tolist() == [r for r in range(60) if truth[r] == 0 and r not in (1, 2, 4)]
    assert np.isfinite(store.read_stamps(out)).all()
    assert (store.read_labels(out) == (meta["kind"] == "source")).all()


def test_backgrounds_that_cannot_be_used_or_are_the_output_are_refused(tmp_path, capsys):
    nan = tmp_path / "nan.h5"
    store.create_store(nan, np.full((30, 21, 21), np.nan, np.float32))
    sources = tmp_path / "sources.h5"
    store.create_store(sources, np.random.default_rng(1).normal(size=(8, 21, 21)).astype(
        np.float32), None, {"true_label": np.ones(8, np.int8)})
    (tmp_path / "link.h5").symlink_to(sources)
    listing = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    for argv, message in (
            ([str(tmp_path / "o.h5"), "--backgrounds", str(nan)],
             f"{nan}: none of its 30 background stamps has finite pixels"),
            ([str(tmp_path / "o.h5"), "--backgrounds", str(sources)],
             f"{sources}: holds no stamps without a source to inject into (8 hold one per "
             "/meta/true_label)"),
            ([str(sources), "--backgrounds", str(sources), "--overwrite"],
             f"{sources}: is the --backgrounds store itself"),
            ([str(tmp_path / "link.h5"), "--backgrounds", str(sources), "--overwrite"],
             "link.h5: is the --backgrounds store itself")):
        assert main(["simulate", *argv, "--quiet"]) == 1, argv
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and message in err, err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == listing
