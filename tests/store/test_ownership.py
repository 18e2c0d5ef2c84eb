"""Scores bound to their stamps (issue 26): every file shows only scores computed from its own
stamps, whatever the working directory, copies, renames, overwrites or broken folders.

Built on real HDF5 files and the real score writer (no model: the numbers are made up, the
ownership is what is under test); the scorer-level cases are in tests/score/test_score.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO

from stampbatch import cli, store
from stampbatch.errors import StoreError

N = 100


def make(path: Path, n: int = N, seed: int = 0) -> np.ndarray:
    stamps = np.random.default_rng(seed).normal(size=(n, 21, 21)).astype(np.float32)
    store.create_store(path, stamps, chunk_rows=32)
    return stamps


def scores(path: Path, model: str, value: float, n: int = N) -> np.ndarray:
    """Write made-up complete scores of ``model`` for ``path``; returns the probabilities."""
    p = np.linspace(0, value, n, dtype=np.float32)
    with store.ScoreWriter(path, model, n, (21, 21), chunk_rows=32) as w:
        w.write_probability(0, p)
        w.append_occlusion(np.array([1]), np.full((1, 21, 21), value, np.float32))
        w.commit({"model_sha256": "ab" * 32, "architecture": "vgg6"})
    return p


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_same_named_folder_in_the_working_directory_is_never_read(tmp_path, monkeypatch):
    """HDF5 falls back to the working directory for a relative external link: the store id in
    the link's path means the fallback can only ever find this store's own folder."""
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    make(tmp_path / "A" / "cand.h5", seed=1)
    scores(tmp_path / "A" / "cand.h5", "m", 0.9)
    make(tmp_path / "B" / "cand.h5", seed=2)             # the same name and count, unscored
    monkeypatch.chdir(tmp_path / "A")                     # holds cand.h5.scores/ of A
    with h5py.File(tmp_path / "B" / "cand.h5", "r") as h5:  # plain h5py
        assert list(h5["scores"]) == []
    shutil.rmtree(tmp_path / "B" / "cand.h5.scores")      # even with B's own folder gone
    with h5py.File(tmp_path / "B" / "cand.h5", "r") as h5:
        assert "m" not in h5.get("scores", {})  # the link dangles: nothing, not A's scores
    assert store.list_scores(tmp_path / "B" / "cand.h5") == []
    monkeypatch.chdir(tmp_path)
    with h5py.File("A/cand.h5", "r") as h5:
        assert list(h5["scores"]) == ["m"]


def test_a_fresh_store_is_walked_by_plain_h5py(tmp_path):
    path = tmp_path / "cand.h5"
    make(path)
    seen: list[str] = []
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda name, _obj: seen.append(name))
        h5.visititems_links(lambda name, _link: seen.append(name))
        assert isinstance(h5["scores"], h5py.Group) and list(h5["scores"]) == []
    assert "stamps" in seen and "scores" in seen


def test_a_copy_scored_with_another_model_leaves_the_original_unchanged(tmp_path):
    orig, copy = tmp_path / "cand.h5", tmp_path / "copy.h5"
    make(orig)
    p = scores(orig, "m", 0.5)
    shutil.copy(orig, copy)
    before, folder = orig.read_bytes(), tree(tmp_path / "cand.h5.scores")
    q = scores(copy, "other", 0.7)
    assert store.list_scores(orig) == ["m"]
    assert store.list_scores(copy) == ["m", "other"]      # keeps what it showed
    np.testing.assert_array_equal(store.read_scores(copy, "m").probability, p)
    np.testing.assert_array_equal(store.read_scores(copy, "other").probability, q)
    assert orig.read_bytes() == before and tree(tmp_path / "cand.h5.scores") == folder
    assert store.store_id(copy) != store.store_id(orig)
    assert store.scores_dir(copy).parent == tmp_path / "copy.h5.scores"


def test_a_copy_with_changed_stamps_never_changes_what_the_original_shows(tmp_path):
    orig, copy = tmp_path / "cand.h5", tmp_path / "copy.h5"
    make(orig)
    p = scores(orig, "m", 0.5)
    shutil.copy(orig, copy)
    with h5py.File(copy, "r+") as h5:
        h5["stamps"][0] += 1.0
    assert store.list_scores(copy) == []                  # the original's scores: not its own
    assert "belong to other stamps" in store.check_scores(copy).problems["m"]
    with pytest.raises(StoreError, match="belong to other stamps"):
        store.read_scores(copy, "m")
    q = scores(copy, "m", 0.3)
    np.testing.assert_array_equal(store.read_scores(orig, "m").probability, p)
    np.testing.assert_array_equal(store.read_scores(copy, "m").probability, q)


@pytest.mark.parametrize("n_new", [N, 60])
def test_an_overwritten_store_starts_with_no_scores(tmp_path, n_new):
    path = tmp_path / "cand.h5"
    make(path, seed=1)
    scores(path, "m", 0.9)
    old = store.scores_dir(path)
    make_over = np.random.default_rng(2).normal(size=(n_new, 21, 21)).astype(np.float32)
    store.create_store(path, make_over, overwrite=True)
    info = store.open_store(path)
    assert info.n_stamps == n_new and info.scored_models == ()
    assert store.list_scores(path) == [] and not store.check_scores(path).problems
    assert not old.exists() and [q.name for q in (tmp_path / "cand.h5.scores").iterdir()] \
        == [store.store_id(path)]                         # retired, nothing left behind
    with h5py.File(path, "r") as h5:
        assert list(h5["scores"]) == []
    scores(path, "m", 0.2, n=n_new)
    assert store.list_scores(path) == ["m"]


def test_a_killed_retirement_is_finished_by_the_next_sweep(tmp_path):
    path = tmp_path / "cand.h5"
    make(path)
    leftover = tmp_path / "cand.h5.scores" / ".retired-0123-abcd"
    leftover.mkdir()
    (leftover / "model-m.h5").write_bytes(b"x")
    store.sweep_partial(path)
    assert not leftover.exists()


def test_rename_then_recreate_keeps_the_renamed_files_scores(tmp_path):
    """The per-night workflow: mv r.h5 r_night1.h5; simulate r.h5; score r.h5."""
    r, night = tmp_path / "r.h5", tmp_path / "r_night1.h5"
    make(r, seed=1)
    p = scores(r, "m", 0.5)
    r.rename(night)
    before = night.read_bytes()
    make(r, seed=2)
    scores(r, "m", 0.8)
    np.testing.assert_array_equal(store.read_scores(night, "m").probability, p)
    assert night.read_bytes() == before
    assert store.read_scores(r, "m").probability[-1] == np.float32(0.8)


def test_a_file_moved_alone_is_reported_by_inspect(tmp_path, capsys, monkeypatch):
    """Also from a working directory that holds the original's folder: the scorer must not
    call it up to date (it would only read the original's scores through HDF5's fallback)."""
    path = tmp_path / "cand.h5"
    make(path)
    scores(path, "m", 0.5)
    (tmp_path / "elsewhere").mkdir()
    moved = tmp_path / "elsewhere" / "cand.h5"
    shutil.copy(path, moved)
    monkeypatch.chdir(tmp_path)
    assert store.score_status(moved, "m") is None and store.list_scores(moved) == []
    assert cli.main(["inspect", str(moved)]) == 1
    out, err = capsys.readouterr()
    assert "scores: none" not in out
    assert str(moved) in err and "moved without `cand.h5.scores/`?" in err
    assert "stampbatch pack" in err and "score --force" in err


def _truncate_index(path):
    index = store.scores_dir(path) / "index.h5"
    index.write_bytes(index.read_bytes()[:100])


def _garbage_model(path):
    store.scores_file(path, "m").write_bytes(b"not hdf5 at all" * 10)


def _index_is_a_folder(path):
    index = store.scores_dir(path) / "index.h5"
    index.unlink()
    index.mkdir()


def _scores_is_a_file(path):
    root = path.with_name(path.name + ".scores")
    shutil.rmtree(root)
    root.write_bytes(b"x")


def _model_deleted(path):
    store.scores_file(path, "m").unlink()


BROKEN = {"truncated index": (_truncate_index, "index.h5 is unreadable"),
          "garbage model file": (_garbage_model, "model-m.h5 is unreadable"),
          "index replaced by a folder": (_index_is_a_folder, "is a folder, not the scores index"),
          ".scores replaced by a file": (_scores_is_a_file, "is a file, not the scores folder"),
          "model file deleted": (_model_deleted, "model-m.h5 is missing")}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_scores_folder_is_reported_never_none(tmp_path, capsys, case):
    path = tmp_path / "cand.h5"
    make(path)
    scores(path, "m", 0.5)
    breaking, expected = BROKEN[case]
    breaking(path)
    assert cli.main(["inspect", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "scores: none" not in out and expected in err and str(path) in err
    assert "score --force" in err
    assert store.list_scores(path) == []                  # readers never raise on it
    with pytest.raises(StoreError) as info:                # ... unless the model is asked for
        store.read_scores(path, "m")
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_a_garbage_model_file_stays_reported_when_another_model_is_scored(tmp_path):
    path = tmp_path / "cand.h5"
    make(path)
    scores(path, "m", 0.5)
    _garbage_model(path)
    scores(path, "other", 0.4)
    report = store.check_scores(path)
    assert list(report.owned) == ["other"] and "unreadable" in report.problems["m"]
    with h5py.File(store.scores_dir(path) / "index.h5", "r") as idx:
        assert sorted(idx) == ["m", "other"]
    store.repair_scores(path)                             # what --force runs on a broken index
    scores(path, "m", 0.6)                                # and the model rescored
    assert store.list_scores(path) == ["m", "other"]


def test_a_model_named_index_never_collides_with_the_layout(tmp_path):
    path = tmp_path / "cand.h5"
    make(path)
    p = scores(path, "index", 0.5)
    scores(path, "other", 0.2)
    assert store.list_scores(path) == ["index", "other"]
    np.testing.assert_array_equal(store.read_scores(path, "index").probability, p)
    with h5py.File(path, "r") as h5:
        np.testing.assert_array_equal(h5["scores/index/probability"][:], p)


def test_appended_stamps_show_no_scores_and_can_be_rescored(tmp_path):
    path = tmp_path / "cand.h5"
    make(path)
    scores(path, "m", 0.5)
    with h5py.File(path, "r+") as h5:
        h5["stamps"].resize(N + 20, axis=0)
        h5["stamps"][N:] = 1.0
    info = store.open_store(path)                          # no longer refused
    assert info.n_stamps == N + 20 and info.scored_models == ()
    assert "belong to other stamps" in store.check_scores(path).problems["m"]
    scores(path, "m", 0.7, n=N + 20)
    assert store.read_scores(path, "m").probability.shape == (N + 20,)


def test_a_foreign_file_keeps_owner_mode_times_and_xattrs_and_hard_links_are_refused(tmp_path):
    """Another program's file gets its link by copy-and-swap, keeping what ls -l and getfattr
    show; a hard-linked one is left untouched (the planner then scores it to a side file)."""
    path = tmp_path / "cand.h5"
    with h5py.File(path, "w") as h5:
        h5["stamps"] = np.random.default_rng(0).normal(size=(N, 21, 21)).astype(np.float32)
        h5.attrs["stampbatch_schema"] = 1
        h5.attrs["stamp_shape"] = np.array([21, 21])
    os.chmod(path, 0o640)
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_500_000_000_000_000_000))
    try:
        os.setxattr(path, "user.survey", b"night-1")
    except OSError:
        pytest.skip("no user xattrs on this file system")
    if os.geteuid() == 0:
        os.chown(path, 1234, 2345)
    st = os.stat(path)
    scores(path, "m", 0.5)
    after = os.stat(path)
    assert after.st_ino != st.st_ino                       # it was swapped …
    assert (after.st_mode, after.st_uid, after.st_gid, after.st_mtime_ns) \
        == (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)   # (reading moves atime anyway)
    assert os.getxattr(path, "user.survey") == b"night-1"  # … keeping all of that
    assert store.list_scores(path) == ["m"]
    linked = tmp_path / "linked.h5"
    with h5py.File(linked, "w") as h5:
        h5["stamps"] = np.zeros((N, 21, 21), np.float32)
        h5.attrs["stampbatch_schema"] = 1
        h5.attrs["stamp_shape"] = np.array([21, 21])
    os.link(linked, tmp_path / "other-name.h5")
    before = linked.read_bytes()
    with pytest.raises(StoreError, match="has 2 hard links.*--out DIR"):
        scores(linked, "m", 0.5)
    assert linked.read_bytes() == before and os.stat(linked).st_nlink == 2


_WRITER = """
import sys
import time
import numpy as np
from stampbatch import store
path, model, value = sys.argv[1], sys.argv[2], float(sys.argv[3])
for attempt in range(1200):          # a second writer on one file is refused: wait for it
    try:
        with store.ScoreWriter(path, model, 100, (21, 21), chunk_rows=32) as w:
            w.write_probability(0, np.full(100, value, np.float32))
            w.commit({"model_sha256": "ab" * 32})
        sys.exit(0)
    except store.StoreError as exc:
        if "locked" not in str(exc):
            raise
        time.sleep(0.05)
sys.exit(3)
"""


def test_two_writers_at_once_on_a_file_and_its_copy_lose_nothing(tmp_path):
    """Each file gets a folder of its own, so neither can lose the other's index update, and
    the original never shows the copy's scores."""
    orig, copy = tmp_path / "cand.h5", tmp_path / "copy.h5"
    make(orig)
    scores(orig, "base", 0.1)
    shutil.copy(orig, copy)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(p), m, v], env=env)
             for p, m, v in ((orig, "a", "0.25"), (copy, "b", "0.75"), (orig, "c", "0.5"))]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert store.list_scores(orig) == ["a", "base", "c"]  # never the copy's "b"
    assert {"b", "base"} <= set(store.list_scores(copy))  # (a, c if done before its swap)
    assert store.read_scores(copy, "b").probability[0] == np.float32(0.75)
