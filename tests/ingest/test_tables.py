"""``ingest --meta TABLE.csv`` and extra .npz keys: per-stamp metadata of real stamps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import gaussian_stamps

from stampbatch import store
from stampbatch.cli import main
from stampbatch.errors import MetaError
from stampbatch.ingest import arrays as fetch
from stampbatch.ingest.tables import MAX_STRING_BYTES

TYPES = ["science", "difference", "single_epoch", "coadd"]


@pytest.fixture
def arrays(tmp_path: Path) -> dict[str, Path]:
    """30 source and 20 noise stamps as .npy files."""
    np.save(tmp_path / "src.npy", gaussian_stamps(30, seed=3, sources=np.ones(30, bool)))
    np.save(tmp_path / "nse.npy", gaussian_stamps(20, seed=4))
    return {"sources": tmp_path / "src.npy", "noise": tmp_path / "nse.npy"}


def _table(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.write_text("\n".join(",".join(str(c) for c in r) for r in [header, *rows]) + "\n")
    return path


def test_table_columns_land_in_meta_in_store_order(tmp_path: Path, arrays) -> None:
    rows = [[TYPES[i % 4], f"{3 + i * 0.5}", i * 7, "" if i == 4 else f"{i}.25"]
            for i in range(50)]
    table = _table(tmp_path / "m.csv", ["image_type", "snr", "field", "seeing"], rows)
    out = tmp_path / "o.h5"
    rc = main(["ingest", str(out), "--sources", str(arrays["sources"]), "--noise",
               str(arrays["noise"]), "--meta", str(table), "--chunk-rows", "8"])
    assert rc == 0
    meta = store.read_meta(out)
    assert set(meta) == {"image_type", "snr", "field", "seeing", "kind", "source_row"}
    assert list(meta["image_type"]) == [TYPES[i % 4] for i in range(50)]
    np.testing.assert_allclose(meta["snr"], 3 + np.arange(50) * 0.5)
    assert meta["field"].dtype == np.int64 and list(meta["field"]) == [i * 7 for i in range(50)]
    assert np.isnan(meta["seeing"][4]) and meta["seeing"][5] == 5.25
    assert list(meta["kind"][:30]) == ["source"] * 30 and list(meta["source_row"][30:]) == list(
        range(20))
    assert store.read_attrs(out)["ingested_meta"] == str(table.resolve())


def test_extra_npz_keys_become_meta(tmp_path: Path) -> None:
    stamps = gaussian_stamps(12, seed=1)
    snr = np.linspace(3, 40, 12)
    np.savez(tmp_path / "c.npz", stamps=stamps, snr=snr, image_type=np.array(TYPES * 3),
             pixel_scale=np.float64(0.27))  # not 1-D: not per-stamp, left out
    info = fetch.ingest(tmp_path / "c.h5", candidates=tmp_path / "c.npz")  # the one 3-D key
    assert set(info.meta_columns) == {"snr", "image_type", "source_row"}
    meta = store.read_meta(tmp_path / "c.h5")
    np.testing.assert_array_equal(meta["snr"], snr)
    assert list(meta["image_type"]) == TYPES * 3
    np.testing.assert_array_equal(store.read_stamps(tmp_path / "c.h5"), stamps)


def test_labelled_npz_keys_join_and_table_adds_columns(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", stamps=gaussian_stamps(6, seed=1), depth=np.arange(6))
    np.savez(tmp_path / "n.npz", stamps=gaussian_stamps(4, seed=2), depth=np.full(4, 0.5))
    table = _table(tmp_path / "m.csv", ["survey"], [["ztf"]] * 6 + [["decam"]] * 4)
    fetch.ingest(tmp_path / "o.h5", sources=tmp_path / "s.npz", noise=tmp_path / "n.npz",
                 key="stamps", meta=table)
    meta = store.read_meta(tmp_path / "o.h5")
    np.testing.assert_array_equal(meta["depth"], [0, 1, 2, 3, 4, 5, .5, .5, .5, .5])
    assert list(meta["survey"]) == ["ztf"] * 6 + ["decam"] * 4


BAD_TABLES = [
    (["image_type"], [["science"]] * 49, "m.csv: has 49 data rows, expected 50"),
    (["a", "b"], [[1, 2]] * 7 + [[1]] + [[1, 2]] * 42, "m.csv: row 8 has 1 cells, the header has 2"),
    (["snr"], [[5.0]] * 11 + [["high"]] + [[5.0]] * 38,
     "m.csv: column 'snr' row 12: 'high' is not a number"),
    (["note"], [["x"]] * 3 + [["y" * (MAX_STRING_BYTES + 1)]] + [["x"]] * 46,
     f"m.csv: column 'note' row 4: text longer than {MAX_STRING_BYTES} bytes"),
    (["kind"], [["star"]] * 50, "m.csv: column 'kind' is written by ingest itself"),
    (["a", "a"], [[1, 2]] * 50, "m.csv: column 'a' appears twice in the header"),
    (["x", ""], [[1, 2]] * 50, "m.csv: header column 2 has no name"),
    (["x/y"], [[1]] * 50, "m.csv: column name 'x/y' is not usable"),
    (["snr"], [["faint"]] * 50, "m.csv: column 'snr' must hold numbers, found text"),
]


@pytest.mark.parametrize("header,rows,message", BAD_TABLES)
def test_bad_tables_are_one_line_errors_and_write_nothing(tmp_path: Path, arrays, capsys,
                                                           header, rows, message) -> None:
    table = _table(tmp_path / "m.csv", header, rows)
    out = tmp_path / "o.h5"
    rc = main(["ingest", str(out), "--sources", str(arrays["sources"]), "--noise",
               str(arrays["noise"]), "--meta", str(table)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and message in err[0], err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "m.csv", "nse.npy", "src.npy"]


def test_unreadable_tables(tmp_path: Path, arrays) -> None:
    kw = {"sources": arrays["sources"], "noise": arrays["noise"]}
    (tmp_path / "e.csv").write_text("\n\n")
    with pytest.raises(MetaError, match=r"e\.csv: is empty; expected a header row"):
        fetch.ingest(tmp_path / "o.h5", meta=tmp_path / "e.csv", **kw)
    (tmp_path / "b.csv").write_bytes(b"name\n" + b"\xff\xfe\n" * 50)
    with pytest.raises(MetaError, match=r"b\.csv: is not UTF-8 text"):
        fetch.ingest(tmp_path / "o.h5", meta=tmp_path / "b.csv", **kw)
    with pytest.raises(MetaError, match=r"none\.csv: no such file"):
        fetch.ingest(tmp_path / "o.h5", meta=tmp_path / "none.csv", **kw)
    assert not (tmp_path / "o.h5").exists()


def test_bad_npz_keys(tmp_path: Path) -> None:
    stamps = gaussian_stamps(6, seed=1)
    np.savez(tmp_path / "short.npz", stamps=stamps, snr=np.ones(5))
    with pytest.raises(fetch.FetchError, match=r"short\.npz\[snr\]: has 5 values but .* holds 6"):
        fetch.ingest(tmp_path / "o.h5", candidates=tmp_path / "short.npz")
    np.savez(tmp_path / "s.npz", stamps=stamps, depth=np.arange(6))
    np.savez(tmp_path / "n.npz", stamps=stamps, seeing=np.arange(6))
    with pytest.raises(MetaError, match=r"n\.npz: has metadata keys \['seeing'\], but .*s\.npz"):
        fetch.ingest(tmp_path / "o.h5", sources=tmp_path / "s.npz", noise=tmp_path / "n.npz")
    np.savez(tmp_path / "t.npz", stamps=stamps, depth=np.array(["a"] * 6))
    with pytest.raises(MetaError, match=r"t\.npz: key 'depth' holds text but in .*s\.npz"):
        fetch.ingest(tmp_path / "o.h5", sources=tmp_path / "s.npz", noise=tmp_path / "t.npz")
    table = _table(tmp_path / "m.csv", ["depth"], [[1]] * 6)
    with pytest.raises(MetaError, match=r"m\.csv: column\(s\) \['depth'\] are also keys"):
        fetch.ingest(tmp_path / "o.h5", candidates=tmp_path / "s.npz", meta=table)
    np.savez(tmp_path / "two.npz", a=stamps, b=stamps)
    with pytest.raises(fetch.FetchError, match="holds 2 arrays .*choose one with --key"):
        fetch.ingest(tmp_path / "o.h5", candidates=tmp_path / "two.npz")
    assert not (tmp_path / "o.h5").exists()
