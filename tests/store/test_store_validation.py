"""Store validation: every malformed store is refused in one line naming the file and the part."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from stampbatch import cli, store
from stampbatch.errors import StoreError


def _store(tmp_path, name="s.h5", n=40, labels=True, compression=None):
    path = tmp_path / name
    rng = np.random.default_rng(0)
    stamps = rng.normal(size=(n, 21, 21)).astype(np.float32)
    lab = (np.arange(n) % 2).astype(np.int8) if labels else None
    store.create_store(path, stamps, lab, {"snr": np.linspace(3, 30, n)}, compression=compression)
    return path


def needs_missing_filter(path):
    """Rewrite the gzip filter id in the file's filter pipeline message to an unregistered one
    (200): HDF5 then needs a plugin that is not installed, as with a Blosc-compressed survey
    file on a machine without hdf5plugin."""
    data = bytearray(path.read_bytes())
    at = data.find(b"deflate\x00")
    assert at > 8 and data[at - 8:at - 6] == b"\x01\x00"
    data[at - 8:at - 6] = (200).to_bytes(2, "little")
    path.write_bytes(bytes(data))


def _edit(path, fn):
    with h5py.File(path, "r+") as h5:
        if isinstance(h5.get("scores", getlink=True), h5py.ExternalLink):
            del h5["scores"]  # as in another program's file: /scores held in the file itself
        fn(h5)


CASES = {
    "scores_dataset": (lambda h5: h5.create_dataset("scores", data=np.zeros(3)),
                       "/scores is a dataset"),
    "scalar_stamp_shape": (lambda h5: h5.attrs.__setitem__("stamp_shape", 21),
                           "attribute 'stamp_shape' is 21"),
    "string_stamp_shape": (lambda h5: h5.attrs.__setitem__("stamp_shape", "21x21"),
                           "attribute 'stamp_shape'"),
    "string_schema": (lambda h5: h5.attrs.__setitem__("stampbatch_schema", "one"),
                      "attribute 'stampbatch_schema' is 'one'"),
    "float_schema": (lambda h5: h5.attrs.__setitem__("stampbatch_schema", 1.5),
                     "attribute 'stampbatch_schema' is 1.5"),
    "string_snr": (lambda h5: (h5["meta"].__delitem__("snr"),
                               h5["meta"].create_dataset("snr", data=np.array([b"high"] * 40))),
                   "/meta/snr has dtype"),
    "complete_scores_without_probability": (
        lambda h5: h5.create_group("scores/m").attrs.__setitem__("complete", True),
        "/scores/m is marked complete but has no 'probability'"),
    "model_is_dataset": (lambda h5: h5.create_dataset("scores/m", data=np.zeros(40)),
                         "/scores/m is a dataset"),
    "meta_dataset": (lambda h5: (h5.__delitem__("meta"), h5.create_dataset("meta", data=[1])),
                     "/meta is a dataset"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_store_is_refused_naming_file_and_part(tmp_path, case):
    path = _store(tmp_path)
    edit, expected = CASES[case]
    _edit(path, edit)
    with pytest.raises(StoreError) as info:
        store.open_store(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


@pytest.mark.parametrize("case", sorted(CASES))
def test_inspect_says_one_line(tmp_path, capsys, case):
    path = _store(tmp_path)
    edit, expected = CASES[case]
    _edit(path, edit)
    before = path.read_bytes()
    assert cli.main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and str(path) in err
    assert path.read_bytes() == before


@pytest.mark.parametrize("bad", [2, -1])
def test_inspect_refuses_labels_other_than_0_and_1(tmp_path, capsys, bad):
    path = _store(tmp_path)
    _edit(path, lambda h5: h5["labels"].__setitem__(3, bad))
    assert cli.main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: /labels must be 0 or 1; found [{bad}]" in err


def test_missing_hdf5_filter_is_named_by_inspect(tmp_path, capsys):
    path = _store(tmp_path, compression="gzip")
    needs_missing_filter(path)
    assert cli.main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert "/stamps needs HDF5 filter 200" in err and "not installed" in err
    assert "compression none" not in err


def test_incomplete_scores_group_is_still_readable(tmp_path):
    path = _store(tmp_path)
    _edit(path, lambda h5: h5.create_group("scores/m").attrs.__setitem__("complete", False))
    assert store.open_store(path).scored_models == ("m",)
