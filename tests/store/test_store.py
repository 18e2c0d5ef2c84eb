"""The HDF5 stamp store: schema, atomic creation, validation of bad files, chunked reads, scores."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from stampbatch import store
from stampbatch.errors import StoreError

REPO = Path(__file__).resolve().parents[2]


def make_store(path, n=100, labelled=True, chunk_rows=32, **kw):
    rng = np.random.default_rng(0)
    stamps = rng.normal(size=(n, 21, 21)).astype(np.float32)
    labels = (np.arange(n) % 2).astype(np.int8) if labelled else None
    meta = {"snr": np.linspace(3, 100, n).astype(np.float32),
            "kind": np.where(np.arange(n) % 2, "source", "background")}
    info = store.create_store(path, stamps, labels, meta, chunk_rows=chunk_rows, **kw)
    return info, stamps, labels, meta


def test_create_and_validate_round_trip(tmp_path):
    path = tmp_path / "train.h5"
    info, stamps, labels, meta = make_store(path)
    assert info.n_stamps == 100 and info.stamp_shape == (21, 21) and info.labelled
    assert info.meta_columns == ("kind", "snr") and info.chunk_rows == 32
    with h5py.File(path) as h5:  # the schema of ARCHITECTURE.md, checked by name once here
        assert h5.attrs["stampbatch_schema"] == 1
        assert list(h5.attrs["stamp_shape"]) == [21, 21]
        assert h5["stamps"].dtype == np.float32 and h5["stamps"].chunks == (32, 21, 21)
        assert h5["labels"].dtype == np.int8
    np.testing.assert_array_equal(store.read_stamps(path), stamps)
    np.testing.assert_array_equal(store.read_labels(path), labels)
    got = store.read_meta(path)
    np.testing.assert_array_equal(got["kind"], meta["kind"])
    assert got["kind"].dtype.kind == "U"
    assert not list(tmp_path.glob(".*partial*")), "temporary file left behind"


@pytest.mark.parametrize("compression", ["lzf", "gzip"])
def test_compression(tmp_path, compression):
    info, stamps, _, _ = make_store(tmp_path / "c.h5", compression=compression)
    assert info.compression == compression
    np.testing.assert_array_equal(store.read_stamps(tmp_path / "c.h5"), stamps)


def test_read_rows_in_any_order_with_repeats(tmp_path):
    path = tmp_path / "s.h5"
    _, stamps, labels, _ = make_store(path, n=100)
    rows = np.array([99, 0, 50, 50, 3])
    got, lab = store.read_rows(path, rows)
    np.testing.assert_array_equal(got, stamps[rows])
    np.testing.assert_array_equal(lab, labels[rows])
    sparse = np.array([1, 90])
    np.testing.assert_array_equal(store.read_rows(path, sparse)[0], stamps[sparse])
    with pytest.raises(StoreError, match="out of range"):
        store.read_rows(path, np.array([100]))


@pytest.mark.parametrize("compression", [None, "lzf"])
def test_read_rows_scattered_over_many_chunks(tmp_path, compression):
    """A training window: rows scattered over the store, dense in some chunks and two per
    chunk at its ends in others (read by an HDF5 selection, not the covering slice),
    repeated, in any order; equal to the rows in memory."""
    path = tmp_path / "s.h5"
    _, stamps, labels, _ = make_store(path, n=6000, chunk_rows=256, compression=compression)
    rng = np.random.default_rng(3)
    dense = rng.choice(np.arange(0, 1200), 1000, replace=False)
    ends = (np.arange(8, 23)[:, None] * 256 + [1, 250]).ravel()  # span 250 > 64 x 2 rows
    rows = rng.permutation(np.r_[dense, ends, dense[:50], ends[:3], [5999, 0]])
    got, lab = store.read_rows(path, rows)
    np.testing.assert_array_equal(got, stamps[rows])
    np.testing.assert_array_equal(lab, labels[rows])
    spread = rng.choice(6000, 300, replace=False)  # sparser than 1 in 4 overall: by blocks
    np.testing.assert_array_equal(store.read_rows(path, spread)[0], stamps[spread])


def test_streaming_writer_appends_batches(tmp_path):
    path = tmp_path / "w.h5"
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 10, 21, 21)).astype(np.float32)
    with store.StoreWriter(path, labelled=False, chunk_rows=4, attrs={"seed": 5}) as w:
        w.append(a, meta={"x": np.arange(10)})
        w.append(b, meta={"x": np.arange(10, 20)})
    info = store.open_store(path)
    assert info.n_stamps == 20 and not info.labelled
    np.testing.assert_array_equal(store.read_stamps(path), np.concatenate([a, b]))
    np.testing.assert_array_equal(store.read_meta(path)["x"], np.arange(20))
    assert store.read_attrs(path)["seed"] == 5


def test_a_failed_write_leaves_nothing_and_never_touches_an_existing_file(tmp_path):
    path = tmp_path / "w.h5"
    with pytest.raises(RuntimeError):
        with store.StoreWriter(path, labelled=False) as w:
            w.append(np.zeros((5, 21, 21), np.float32))
            raise RuntimeError("killed half way")
    assert not path.exists() and list(tmp_path.iterdir()) == []
    make_store(path)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="already exists"):
        make_store(path)
    assert path.read_bytes() == before
    make_store(path, n=10, overwrite=True)
    assert store.open_store(path).n_stamps == 10


def test_writer_rejects_inconsistent_batches(tmp_path):
    path = tmp_path / "w.h5"
    with pytest.raises(StoreError, match="metadata columns changed"):
        with store.StoreWriter(path, labelled=False) as w:
            w.append(np.zeros((2, 21, 21)), meta={"a": [1, 2]})
            w.append(np.zeros((2, 21, 21)), meta={"b": [1, 2]})
    with pytest.raises(StoreError, match="labels are required"):
        with store.StoreWriter(path, labelled=True) as w:
            w.append(np.zeros((2, 21, 21)))
    with pytest.raises(StoreError, match="no stamps were written"):
        with store.StoreWriter(path, labelled=False):
            pass
    assert not path.exists()


@pytest.mark.parametrize(
    "stamps, labels, message",
    [
        (np.zeros((4, 21, 20)), None, None),
        (np.zeros((4, 441)), None, "expected \\(N, H, W\\)"),
        (np.zeros((0, 21, 21)), None, "empty"),
        (np.array([[["a"]]]), None, "numeric"),
        (np.zeros((4, 21, 21)), np.array([0, 1, 1]), "labels have shape"),
        (np.zeros((4, 21, 21)), np.array([0, 1, 2, 1]), "labels must be 0 or 1; found \\[2\\]"),
        (np.zeros((4, 21, 21)), np.array([0.5, 1, 0, 1]), "expected integers"),
    ],
)
def test_bad_arrays_are_refused_before_writing(tmp_path, stamps, labels, message):
    path = tmp_path / "bad.h5"
    if message is None:  # a non-square but consistent stamp shape is fine
        assert store.create_store(path, stamps).stamp_shape == (21, 20)
        return
    with pytest.raises(StoreError, match=message):
        store.create_store(path, stamps, labels)
    assert not path.exists()


def test_object_arrays_are_refused(tmp_path):
    stamps = np.empty((2, 21, 21), dtype=object)
    with pytest.raises(StoreError, match="Python objects"):
        store.create_store(tmp_path / "o.h5", stamps)


def test_destination_in_missing_or_unwritable_directory(tmp_path, readonly_dir):
    with pytest.raises(StoreError, match="does not exist"):
        store.create_store(tmp_path / "nope" / "x.h5", np.zeros((2, 21, 21)))
    ro = readonly_dir()
    with pytest.raises(StoreError) as err:
        store.create_store(ro / "x.h5", np.zeros((2, 21, 21)))
    assert str(err.value) == f"{ro / 'x.h5'}: directory {ro} is not writable"
    assert list(ro.iterdir()) == []


# ---------------------------------------------------------------- validation of bad files


def corrupt(path, how):
    if how == "not_hdf5":
        path.write_text("stamps,labels\n1,2\n")
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    else:
        with h5py.File(path, "r+") as h5:
            if how == "no_stamps":
                del h5["stamps"]
            elif how == "wrong_dtype":
                del h5["stamps"]
                h5["stamps"] = np.zeros((100, 21, 21), np.float64)
            elif how == "wrong_shape":
                del h5["stamps"]
                h5["stamps"] = np.zeros((100, 20, 20), np.float32)
            elif how == "labels_length":
                del h5["labels"]
                h5["labels"] = np.zeros(99, np.int8)
            elif how == "meta_length":
                del h5["meta/snr"]
                h5["meta/snr"] = np.zeros(3)
            elif how == "no_schema":
                del h5.attrs["stampbatch_schema"]
            elif how == "future_schema":
                h5.attrs["stampbatch_schema"] = 2
            elif how == "empty":
                del h5["stamps"]
                del h5["labels"]
                for k in list(h5["meta"]):
                    del h5["meta"][k]
                h5["stamps"] = np.zeros((0, 21, 21), np.float32)


@pytest.mark.parametrize(
    "how, message",
    [
        ("not_hdf5", "not an HDF5 file"),
        ("truncated", "unreadable or truncated HDF5 file"),
        ("no_stamps", "has no /stamps dataset"),
        ("wrong_dtype", "/stamps has dtype float64, expected float32"),
        ("wrong_shape", "/stamps has shape \\(100, 20, 20\\), expected \\(N, 21, 21\\)"),
        ("labels_length", "/labels has shape \\(99,\\), expected \\(100,\\)"),
        ("meta_length", "/meta/snr has shape \\(3,\\), expected \\(100,\\)"),
        ("no_schema", "not a stampbatch store"),
        ("future_schema", "schema version 2 is not supported"),
        ("empty", "/stamps is empty"),
    ],
)
def test_bad_files_get_one_line_errors_naming_the_file(tmp_path, how, message):
    path = tmp_path / "bad.h5"
    make_store(path)
    corrupt(path, how)
    with pytest.raises(StoreError, match=message) as err:
        store.open_store(path)
    text = str(err.value)
    assert text.startswith(str(path)) and "\n" not in text


def test_label_values_checked_on_request(tmp_path):
    path = tmp_path / "s.h5"
    make_store(path)
    with h5py.File(path, "r+") as h5:
        h5["labels"][5] = 3
    store.open_store(path)  # structure is fine
    with pytest.raises(StoreError, match="found \\[3\\]"):
        store.open_store(path, check_labels_values=True)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(StoreError, match="no such file"):
        store.open_store(tmp_path / "absent.h5")
    with pytest.raises(StoreError, match="is a directory"):
        store.open_store(tmp_path)


def test_unlabelled_store_refuses_read_labels(tmp_path):
    make_store(tmp_path / "c.h5", labelled=False)
    with pytest.raises(StoreError, match="has no /labels"):
        store.read_labels(tmp_path / "c.h5")


# ---------------------------------------------------------------- scores


def write_scores(path, model, n, rows, attrs=None):
    p = np.linspace(0, 1, n, dtype=np.float32)
    with store.ScoreWriter(path, model, n, (21, 21), chunk_rows=32) as w:
        for start in range(0, n, 32):
            w.write_probability(start, p[start:start + 32])
            sel = rows[(rows >= start) & (rows < start + 32)]
            w.append_occlusion(sel, np.stack([np.full((21, 21), r, np.float32) for r in sel])
                               if len(sel) else np.zeros((0, 21, 21)))
        w.commit(attrs or {"model_sha256": "ab" * 32, "architecture": "vgg6"})
    return p


def test_score_group_round_trip_and_stamps_untouched(tmp_path):
    path = tmp_path / "cand.h5"
    _, stamps, _, _ = make_store(path, labelled=False)
    rows = np.array([3, 40, 41, 99])
    p = write_scores(path, "vgg6", 100, rows)
    assert store.list_scores(path) == ["vgg6"]
    s = store.read_scores(path, "vgg6")
    np.testing.assert_array_equal(s.probability, p)
    np.testing.assert_array_equal(s.occlusion_index, rows)
    assert s.occlusion.shape == (4, 21, 21) and s.occlusion[2, 0, 0] == 41
    assert s.attrs["architecture"] == "vgg6" and s.attrs["complete"] is True
    assert store.score_status(path, "vgg6")["model_sha256"] == "ab" * 32
    assert list(store.read_occlusion(path, "vgg6", [41, 5])) == [41]
    np.testing.assert_array_equal(store.read_stamps(path), stamps)
    assert store.open_store(path).scored_models == ("vgg6",)


def test_incomplete_scores_are_not_reported_and_are_replaced(tmp_path):
    path = tmp_path / "cand.h5"
    make_store(path, labelled=False)
    before = path.read_bytes()
    w = store.ScoreWriter(path, "m", 100, (21, 21))
    w.write_probability(0, np.ones(10, np.float32))
    w.close()  # a crash before commit: nothing under the real names, candidate untouched
    assert store.list_scores(path) == [] and store.score_status(path, "m") is None
    folder = tmp_path / "cand.h5.scores" / store.store_id(path)
    assert path.read_bytes() == before and [p.name for p in folder.iterdir()] == ["index.h5"]
    assert list(tmp_path.glob(".*")) == []
    with pytest.raises(StoreError, match="has no scores for model 'm'"):
        store.read_scores(path, "m")
    # a group left incomplete by an older stampbatch is reported, never read, then replaced
    with h5py.File(path, "r+") as h5:
        del h5["scores"]
        h5.create_group("scores/m").attrs["complete"] = False
    assert store.list_scores(path) == [] and store.score_status(path, "m") is None
    with pytest.raises(StoreError, match="incomplete"):
        store.read_scores(path, "m")
    with pytest.raises(StoreError, match="incomplete"):
        store.read_occlusion(path, "m", [1])
    write_scores(path, "m", 100, np.array([1]))
    assert store.list_scores(path) == ["m"]


def test_scores_are_an_external_link_that_resolves_from_anywhere(tmp_path, monkeypatch):
    """A new store carries the /scores link from birth: scoring never writes its bytes.
    Readers find /scores/<model>/... through the links, from any directory, via symlinks."""
    d = tmp_path / "survey dir"
    d.mkdir()
    path = d / "cand.h5"
    _, stamps, _, _ = make_store(path, labelled=False)
    with h5py.File(path, "r") as h5:
        link = h5.get("scores", getlink=True)
    sid = store.store_id(path)
    assert isinstance(link, h5py.ExternalLink) \
        and link.filename == f"cand.h5.scores/{sid}/index.h5"
    born = path.read_bytes()
    write_scores(path, "m", 100, np.array([1, 2]))
    write_scores(path, "other", 100, np.array([3]))
    other = (d / "cand.h5.scores" / sid / "model-other.h5").read_bytes()
    p = write_scores(path, "m", 100, np.array([7]), attrs={"model_sha256": "cd" * 32})
    assert path.read_bytes() == born                        # the candidate is never written
    assert (d / "cand.h5.scores" / sid / "model-other.h5").read_bytes() == other
    # moved elsewhere and read from another working directory, through a symlink too
    moved = tmp_path / "moved"
    shutil.move(d, moved)
    (tmp_path / "alias.h5").symlink_to(moved / "cand.h5")
    monkeypatch.chdir("/")
    for where in (moved / "cand.h5", tmp_path / "alias.h5"):
        s = store.read_scores(where, "m")
        np.testing.assert_array_equal(s.probability, p)
        assert s.occlusion_index.tolist() == [7] and s.attrs["model_sha256"] == "cd" * 32
        with h5py.File(where, "r") as h5:                    # plain h5py finds the schema
            np.testing.assert_array_equal(h5["scores/m/probability"][:], p)
    np.testing.assert_array_equal(store.read_stamps(moved / "cand.h5"), stamps)
    (moved / "cand.h5.scores" / sid / "model-m.h5").unlink()    # a missing scores file:
    assert store.list_scores(moved / "cand.h5") == ["other"]          # not shown, but reported
    assert store.open_store(moved / "cand.h5").scored_models == ("other",)
    assert "model-m.h5 is missing" in store.check_scores(moved / "cand.h5").problems["m"]


def test_a_store_made_elsewhere_gets_the_link_once_by_copy_and_swap(tmp_path):
    """A file without the /scores link (another program, an older stampbatch with a /scores
    group) is converted once: copied, linked, renamed over; its old scores are kept."""
    path = tmp_path / "cand.h5"
    rng = np.random.default_rng(3)
    stamps = rng.normal(size=(50, 21, 21)).astype(np.float32)
    with h5py.File(path, "w") as h5:
        h5["stamps"] = stamps
        h5.attrs["stampbatch_schema"] = 1
        h5.attrs["stamp_shape"] = np.array([21, 21])
        old = h5.create_group("scores/legacy")
        old["probability"] = np.linspace(0, 1, 50, dtype=np.float32)
        old["occlusion_index"] = np.array([4], dtype=np.int64)
        old["occlusion"] = np.ones((1, 21, 21), np.float32)
        old.attrs["complete"] = True
        old.attrs["model_sha256"] = "ef" * 32
    assert store.list_scores(path) == ["legacy"]
    p = write_scores(path, "m", 50, np.array([1]))
    assert store.list_scores(path) == ["legacy", "m"]
    np.testing.assert_array_equal(store.read_scores(path, "m").probability, p)
    legacy = store.read_scores(path, "legacy")
    assert legacy.attrs["model_sha256"] == "ef" * 32 and legacy.occlusion_index.tolist() == [4]
    np.testing.assert_array_equal(store.read_stamps(path), stamps)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["cand.h5", "cand.h5.scores"]
    born = path.read_bytes()
    write_scores(path, "n", 50, np.array([2]))
    assert path.read_bytes() == born                        # converted once, never again


def test_side_score_file(tmp_path):
    cand = tmp_path / "cand.h5"
    make_store(cand, labelled=False)
    out = tmp_path / "out"
    out.mkdir()
    side = store.score_target(cand, out)
    assert side == out / "cand.scores.h5"
    assert store.score_target(cand, None) == cand
    store.create_score_file(side, cand, 100, (21, 21))
    write_scores(side, "m", 100, np.array([2]))
    info = store.open_store(side)
    assert info.is_score_file and info.n_stamps == 100 and info.scored_models == ("m",)
    assert store.read_attrs(side)["source_file"] == str(cand.resolve())


def test_second_writer_in_another_process_is_refused(tmp_path):
    path = tmp_path / "cand.h5"
    make_store(path, labelled=False)
    code = ("import sys\nfrom stampbatch import store\n"
            "try:\n"
            f"    store.ScoreWriter({str(path)!r}, 'other', 100, (21, 21))\n"
            "except store.StoreError as e:\n    print(e); sys.exit(3)\n")
    with store.ScoreWriter(path, "m", 100, (21, 21)):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 3, out.stderr
    assert out.stdout.strip() == (f"{path}: is locked by another process (pid {os.getpid()}; "
                                  "is a scorer still running on it?)")


def test_copy_of_a_store_validates(tmp_path):
    make_store(tmp_path / "a.h5")
    shutil.copy(tmp_path / "a.h5", tmp_path / "b.h5")
    assert store.open_store(tmp_path / "b.h5").n_stamps == 100


def test_new_store_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        make_store(tmp_path / "p.h5")
    finally:
        os.umask(old)
    assert (tmp_path / "p.h5").stat().st_mode & 0o777 == 0o644
