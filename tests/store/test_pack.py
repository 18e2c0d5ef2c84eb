"""stampbatch pack: one self-contained file per scored store, bit-identical to the linked scores.

The scores are written by the scorer's own write path (journal, commit, index: the
process tests/fault_child.py runs, with deterministic stand-in results), so no model is
trained here except for the one test that runs the real ``score`` command on a packed file.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import gaussian_stamps

from stampbatch import cli, store

sys.path.insert(0, str(Path(__file__).parent.parent))
import fault_child  # noqa: E402

N, ROWS = 700, 128


def _scored(path: Path, *, models=("m1", "m2"), compression=None) -> Path:
    """A labelled store with metadata, scored by each model through the scorer's write path."""
    rng = np.random.default_rng(5)
    labels = (np.arange(N) % 2).astype(np.int8)
    meta = {"snr": rng.random(N).astype(np.float32) * 20,
            "kind": np.where(labels == 1, "source", "background")}
    path.parent.mkdir(parents=True, exist_ok=True)
    store.create_store(path, gaussian_stamps(N, seed=2, sources=labels == 1), labels, meta,
                       chunk_rows=ROWS, compression=compression)
    for seed, model in enumerate(models, start=3):
        fault_child.run(path, model, ROWS, seed)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _attrs(obj) -> list:
    return sorted((k, np.asarray(v).tobytes()) for k, v in obj.attrs.items())


def _everything(path: Path, *, follow: bool = False) -> dict:
    """Every dataset's bytes, dtype, shape and attributes and every group's attributes.
    ``follow=False``: as plain h5py's ``visititems`` walks the file (it does not follow
    external links: a linked store's scores are not in it); ``follow=True``: each member
    opened by name, so a linked store's scores are read through its links."""
    seen: dict = {}

    def record(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset):
            seen[name] = (obj.dtype.str, obj.shape, obj[()].tobytes(), _attrs(obj))
        else:
            seen[name] = _attrs(obj)

    def walk(group: h5py.Group, prefix: str) -> None:
        for key in group:
            obj = group[key]              # the group's own .name is "/" across a link
            record(prefix + key, obj)
            if isinstance(obj, h5py.Group):
                walk(obj, f"{prefix}{key}/")

    with h5py.File(path, "r") as h5:
        seen["/"] = _attrs(h5)
        walk(h5, "") if follow else h5.visititems(record)
    return seen


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_packed_file_holds_everything_bit_for_bit_after_the_original_is_gone(tmp_path,
                                                                             monkeypatch):
    """Packed, shipped to another directory, original and sidecar deleted: plain h5py from a
    third working directory lists every dataset and reads the same bits as the linked store."""
    src = _scored(tmp_path / "here" / "cand.h5", compression="gzip")
    linked = _everything(src, follow=True)
    assert {"scores/m1/probability", "scores/m2/occlusion", "meta/kind", "labels",
            "stamps"} <= set(linked)
    scores = {m: store.read_scores(src, m) for m in ("m1", "m2")}
    assert all(len(s.occlusion_index) > 10 for s in scores.values())
    before = _files(src.parent)
    assert cli.main(["pack", str(src)]) == 0
    packed = src.with_name("cand.packed.h5")
    after = _files(src.parent)
    assert after.pop(packed.name) and after == before         # the original is not changed

    ship = tmp_path / "elsewhere" / "cand.h5"               # "another machine"
    ship.parent.mkdir()
    shutil.copyfile(packed, ship)
    shutil.rmtree(tmp_path / "here")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with h5py.File(ship, "r") as h5:
        links = []
        h5.visititems_links(lambda name, link: links.append((name, type(link).__name__)))
        assert not [n for n, kind in links if kind != "HardLink"]      # no external link
        assert isinstance(h5["scores"], h5py.Group)
    assert _everything(ship) == linked                       # values, dtypes, attributes
    assert _everything(ship, follow=True) == linked
    assert store.list_scores(ship) == ["m1", "m2"]
    for model, before in scores.items():
        after = store.read_scores(ship, model)
        for field in ("probability", "occlusion_index", "occlusion"):
            assert getattr(after, field).tobytes() == getattr(before, field).tobytes()
        assert after.attrs == before.attrs
        assert store.score_status(ship, model) == before.attrs


def test_packing_is_idempotent_and_refuses_to_overwrite(tmp_path, capsys):
    src = _scored(tmp_path / "cand.h5")
    first = store.pack(src)
    assert first.path == tmp_path / "cand.packed.h5" and first.models == ("m1", "m2")
    digest = _sha(first.path)
    again = store.pack(first.path, tmp_path / "twice.h5")    # a packed file packs to itself
    assert _sha(again.path) == digest
    assert cli.main(["pack", str(src)]) == 1
    err = capsys.readouterr().err
    assert err == (f"stampbatch pack: error: {first.path}: already exists (pass --overwrite to "
                   "replace it)\n")
    assert cli.main(["pack", str(src), "--overwrite"]) == 0
    assert _sha(first.path) == digest
    out_dir = tmp_path / "ship"
    out_dir.mkdir()
    assert cli.main(["pack", str(src), str(first.path), "--out", str(out_dir / "x.h5")]) == 2
    assert "--out names one file; 2 inputs given" in capsys.readouterr().err
    assert cli.main(["pack", str(src), "--out-dir", str(tmp_path), "--overwrite"]) == 1
    assert capsys.readouterr().err == (f"stampbatch pack: error: {src}: is the input itself; "
                                       "choose another output\n")
    assert cli.main(["pack", str(src), "--out-dir", str(out_dir)]) == 0
    assert _sha(out_dir / "cand.h5") == digest
    leftovers = [p.name for p in tmp_path.rglob(".*")]
    assert leftovers == []


def test_inspect_and_plot_occlusion_read_a_packed_file_as_the_linked_one(tmp_path, capsys):
    src = _scored(tmp_path / "cand.h5")
    packed = store.pack(src).path
    assert cli.main(["inspect", str(src)]) == 0
    linked = capsys.readouterr().out
    assert cli.main(["inspect", str(packed)]) == 0
    assert capsys.readouterr().out == linked.replace(str(src), str(packed))
    assert "scores/m1: 700 scored" in linked
    png = tmp_path / "p.png"
    assert cli.main(["plot-occlusion", str(packed), "--model", "m2", "--top", "3",
                     "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    rows = store.read_scores(packed, "m2").occlusion_index[:2].tolist()
    assert store.read_occlusion(packed, "m2", rows)[rows[1]].tobytes() == \
        store.read_occlusion(src, "m2", rows)[rows[1]].tobytes()


def test_incomplete_scores_are_left_out_and_named(tmp_path, capsys):
    src = _scored(tmp_path / "cand.h5")
    packed = store.pack(src).path
    with h5py.File(packed, "r+") as h5:     # as an interrupted run of an older stampbatch left
        h5["scores/m2"].attrs["complete"] = False
    again = tmp_path / "again.h5"
    assert cli.main(["pack", str(packed), "--out", str(again)]) == 0
    assert capsys.readouterr().out == (f"packed {packed} -> {again} (scores: m1); left out, "
                                       "incomplete (rerun score): m2\n")
    with h5py.File(again, "r") as h5:
        assert list(h5["scores"]) == ["m1"]
    assert store.read_scores(again, "m1").probability.tobytes() == \
        store.read_scores(src, "m1").probability.tobytes()


@pytest.mark.slow
def test_score_finds_a_packed_file_up_to_date(tmp_path, capsys):
    """The real scorer (a briefly trained model; TensorFlow's import and the training take
    most of the 20-45 s) scores a store, and on the packed file sees nothing left to do."""
    import keras

    from stampbatch.train import models, preprocess

    labels = (np.arange(400) % 2).astype(np.int8)
    x = preprocess.normalize(gaussian_stamps(400, seed=0, sources=labels == 1, amplitude=5.0))
    keras.utils.set_random_seed(0)
    model = models.build_model("simple")
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    model.fit(x[..., None], keras.utils.to_categorical(labels, 2), epochs=1, verbose=0)
    run = tmp_path / "simple"
    run.mkdir()
    model.save(run / "model.keras")
    (run / "config.toml").write_text('architecture = "simple"\n')
    src = tmp_path / "cand.h5"
    store.create_store(src, gaussian_stamps(300, seed=4), chunk_rows=128)
    assert cli.main(["score", str(src), "--model", str(run), "--occlusion", "above:0.3",
                     "--quiet"]) == 0
    packed = store.pack(src).path
    digest = _sha(packed)
    capsys.readouterr()
    assert cli.main(["score", str(packed), "--model", str(run), "--quiet"]) == 0
    assert f"up to date: {packed} /scores/simple" in capsys.readouterr().out
    assert _sha(packed) == digest
    assert store.read_scores(packed, "simple").probability.tobytes() == \
        store.read_scores(src, "simple").probability.tobytes()


def _bad_inputs(root: Path) -> dict[str, tuple[Path, str]]:
    """Each bad input and a piece of its one-line error."""
    root.mkdir()
    text = root / "notes.h5"
    text.write_text("not hdf5")
    plain = root / "plain.h5"
    with h5py.File(plain, "w") as h5:
        h5["x"] = np.zeros(3)
    unscored = root / "unscored.h5"
    store.create_store(unscored, gaussian_stamps(50, seed=1))
    alone = _scored(root / "alone" / "cand.h5", models=("m1",))   # moved without its folder
    shutil.rmtree(alone.with_name("cand.h5.scores"))
    garbage = _scored(root / "garbage" / "cand.h5")                # a model file overwritten
    model_file = next(p for p in garbage.with_name("cand.h5.scores").rglob("*.h5")
                      if "m2" in p.name)
    model_file.write_bytes(b"garbage" * 100)
    foreign = _scored(root / "foreign" / "cand.h5", models=("m1",))  # stamps rewritten in place
    with h5py.File(foreign, "r+") as h5:
        h5["stamps"][0] = h5["stamps"][0] + 1
    side = root / "side" / "cand.scores.h5"
    side.parent.mkdir()
    store.create_score_file(side, unscored, 50, (21, 21))
    return {"text": (text, "not an HDF5 file"),
            "plain": (plain, "not a stampbatch store"),
            "unscored": (unscored, "has no scores to pack"),
            "alone": (alone, "scores"),
            "garbage": (garbage, "m2"),
            "foreign": (foreign, "belong to other stamps"),
            "side": (side, "score side file"),
            "missing": (root / "gone.h5", "no such file")}


def test_bad_inputs_are_one_line_naming_the_file_and_nothing_is_written(tmp_path, capsys):
    cases = _bad_inputs(tmp_path / "in")
    good = _scored(tmp_path / "good" / "good.h5", models=("m1",))
    (tmp_path / "out").mkdir()
    for name, (path, needle) in cases.items():
        before = _files(tmp_path)
        code = cli.main(["pack", str(good), str(path), "--out-dir", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 1, (name, err)
        assert err.count("\n") == 1 and err.startswith(f"stampbatch pack: error: {path}:"), \
            (name, err)
        assert needle in err, (name, err)
        assert _files(tmp_path) == before, name               # not even the good file's output
