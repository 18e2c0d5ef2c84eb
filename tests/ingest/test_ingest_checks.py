"""Ingest refuses data that would silently become wrong stamps (issue 9)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stampbatch import cli
from stampbatch.ingest import arrays as fetch


def _npy(path: Path, arr: np.ndarray) -> Path:
    np.save(path, arr)
    return path


def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(["ingest", *argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("row", [0, 7, 29])
def test_float64_beyond_float32_range_is_refused_naming_file_and_row(tmp_path, capsys, row):
    arr = np.random.default_rng(0).normal(size=(30, 21, 21))
    arr[row, 3, 3] = -1e300
    src = _npy(tmp_path / "big.npy", arr)
    before = src.read_bytes()
    rc, err = _run(capsys, str(tmp_path / "out.h5"), "--candidates", str(src))
    assert rc == 1
    assert err == (f"stampbatch ingest: error: {src}: row {row} holds values beyond the float32 "
                   f"range (|x| > 3.4e+38); stamps are stored as float32\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npy"]
    assert src.read_bytes() == before


def test_float64_beyond_float32_range_in_an_npz_with_flat_rows(tmp_path):
    arr = np.zeros((10, 441))
    arr[4, 0] = 1e39
    np.savez(tmp_path / "c.npz", stamps=arr)
    with pytest.raises(fetch.FetchError, match=r"c\.npz\[stamps\]: row 4 holds values beyond"):
        fetch.ingest(tmp_path / "o.h5", candidates=tmp_path / "c.npz")
    assert not (tmp_path / "o.h5").exists()


def test_ordinary_float64_still_ingests(tmp_path):
    arr = np.random.default_rng(1).normal(size=(12, 441)) * 1e30
    info = fetch.ingest(tmp_path / "o.h5", candidates=_npy(tmp_path / "c.npy", arr))
    assert info.n_stamps == 12 and info.stamp_shape == (21, 21)


@pytest.mark.parametrize("shape", [(40, 1), (40, 4), (40, 1, 1), (40, 3, 21)])
def test_arrays_of_tiny_stamps_are_refused(tmp_path, capsys, shape):
    src = _npy(tmp_path / "col.npy", np.ones(shape, np.float32))
    rc, err = _run(capsys, str(tmp_path / "out.h5"), "--candidates", str(src))
    assert rc == 1 and err.count("\n") == 1
    assert f"{src}: has shape {shape}" in err and "too small" in err
    assert not (tmp_path / "out.h5").exists()


def test_same_file_as_sources_and_noise_is_refused(tmp_path, capsys):
    src = _npy(tmp_path / "s.npy", np.ones((10, 21, 21), np.float32))
    link = tmp_path / "also-s.npy"
    link.symlink_to(src)
    for noise in (src, link):
        rc, err = _run(capsys, str(tmp_path / "out.h5"), "--sources", str(src), "--noise", str(noise))
        assert rc == 1
        assert err == (f"stampbatch ingest: error: {noise}: is given as both --sources and --noise; "
                       f"every stamp would be stored twice with opposite labels\n")
    assert not (tmp_path / "out.h5").exists()
