"""The bad-input table: every command and option at its edges.

Each row runs the CLI (in-process, ``cli.main``, stderr captured; a few rows as real
subprocesses) on a workspace of small real files and asserts what issue 9 asks of every odd
input: a non-zero exit, exactly one line on stderr, naming the file or option, no traceback,
and the workspace unchanged afterwards (inputs byte-identical, no partial output anywhere).

Rows are ``(id, argv, names)``; ``{in}``, ``{out}`` and ``{ro}`` in them stand for the input
directory, an empty writable output directory and a read-only directory holding
``cands.h5``. ``names`` is the text the error line must contain.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from stampbatch import cli, store

SHA = "ab" * 32

# --------------------------------------------------------------------------- the workspace


def _labelled(path: Path, n: int = 60, **kw) -> Path:
    rng = np.random.default_rng(0)
    labels = (np.arange(n) % 2).astype(np.int8)
    store.create_store(path, rng.normal(size=(n, 21, 21)).astype(np.float32), labels,
                       {"snr": np.linspace(3, 30, n), "kind": np.where(labels == 1, "source", "noise")},
                       **kw)
    return path


def _candidates(path: Path, n: int = 40) -> Path:
    store.create_store(path, np.random.default_rng(1).normal(size=(n, 21, 21)).astype(np.float32))
    return path


def _edited(src: Path, dest: Path, edit) -> Path:
    shutil.copy(src, dest)
    with h5py.File(dest, "r+") as h5:
        if isinstance(h5.get("scores", getlink=True), h5py.ExternalLink):
            del h5["scores"]  # as in another program's file: /scores held in the file itself
        edit(h5)
    return dest


def _arrays(d: Path) -> None:
    rng = np.random.default_rng(2)
    np.save(d / "sources.npy", rng.normal(size=(20, 21, 21)).astype(np.float32))
    np.save(d / "noise.npy", rng.normal(size=(20, 21, 21)).astype(np.float32))
    np.save(d / "cands.npy", rng.normal(size=(20, 441)).astype(np.float32))
    np.save(d / "pickled.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(d / "one_d.npy", np.zeros(441, np.float32))
    np.save(d / "four_d.npy", np.zeros((2, 21, 21, 1), np.float32))
    np.save(d / "col.npy", np.zeros((20, 1), np.float32))
    np.save(d / "empty_arr.npy", np.zeros((0, 441), np.float32))
    np.save(d / "text.npy", np.array(["a", "b"]))
    np.save(d / "complex.npy", np.zeros((3, 441), np.complex64))
    np.save(d / "small15.npy", np.zeros((20, 15, 15), np.float32))
    np.save(d / "nonsquare.npy", np.zeros((20, 440), np.float32))
    big = rng.normal(size=(20, 21, 21))
    big[3, 0, 0] = 1e300
    np.save(d / "big64.npy", big)
    np.savez(d / "multi.npz", a=np.zeros((3, 441), np.float32), b=np.zeros((3, 441), np.float32))
    np.savez(d / "one.npz", stamps=np.zeros((3, 441), np.float32))
    raw = (d / "sources.npy").read_bytes()
    (d / "truncated.npy").write_bytes(raw[: len(raw) // 2])
    (d / "truncated.npz").write_bytes((d / "one.npz").read_bytes()[:300])


def _stores(d: Path) -> None:
    lab = _labelled(d / "labelled.h5")
    cands = _candidates(d / "cands.h5")
    _labelled(d / "gzip_store.h5", compression="gzip")
    data = bytearray((d / "gzip_store.h5").read_bytes())
    at = data.find(b"deflate\x00")
    data[at - 8:at - 6] = (200).to_bytes(2, "little")  # needs HDF5 filter 200: not installed
    (d / "needs_filter.h5").write_bytes(bytes(data))
    (d / "gzip_store.h5").unlink()
    _edited(lab, d / "scores_dataset.h5", lambda h5: h5.create_dataset("scores", data=[1.0]))
    _edited(lab, d / "scalar_shape.h5", lambda h5: h5.attrs.__setitem__("stamp_shape", 21))
    _edited(lab, d / "string_schema.h5", lambda h5: h5.attrs.__setitem__("stampbatch_schema", "v1"))
    _edited(lab, d / "schema2.h5", lambda h5: h5.attrs.__setitem__("stampbatch_schema", 2))
    _edited(lab, d / "no_schema.h5", lambda h5: h5.attrs.__delitem__("stampbatch_schema"))
    _edited(lab, d / "string_snr.h5", lambda h5: (
        h5["meta"].__delitem__("snr"), h5["meta"].create_dataset("snr", data=[b"hi"] * 60)))
    _edited(lab, d / "scores_noprob.h5", lambda h5: h5.create_group("scores/m").attrs.__setitem__(
        "complete", True))
    _edited(lab, d / "labels2.h5", lambda h5: h5["labels"].__setitem__(5, 2))
    _edited(lab, d / "labels_neg.h5", lambda h5: h5["labels"].__setitem__(5, -1))
    _edited(lab, d / "short_labels.h5", lambda h5: (
        h5.__delitem__("labels"), h5.create_dataset("labels", data=np.zeros(59, np.int8))))
    _edited(lab, d / "float_labels.h5", lambda h5: (
        h5.__delitem__("labels"), h5.create_dataset("labels", data=np.zeros(60, np.float32))))
    _edited(lab, d / "short_meta.h5", lambda h5: h5["meta"].create_dataset("x", data=np.zeros(3)))
    _edited(lab, d / "no_stamps.h5", lambda h5: h5.__delitem__("stamps"))
    _edited(lab, d / "stamps64.h5", lambda h5: (
        h5.__delitem__("stamps"), h5.create_dataset("stamps", data=np.zeros((60, 21, 21)))))
    _edited(lab, d / "stamps_2d.h5", lambda h5: (
        h5.__delitem__("stamps"), h5.create_dataset("stamps", data=np.zeros((60, 441), np.float32))))
    with h5py.File(d / "plain.h5", "w") as h5:
        h5["x"] = [1, 2, 3]
    raw = lab.read_bytes()
    (d / "truncated.h5").write_bytes(raw[:4096])
    (d / "notes.txt").write_text("not a store\n")
    (d / "notes.h5").write_text("not a store\n")
    (d / "empty.h5").write_bytes(b"")
    shutil.copy(cands, d / "données é.h5")
    shutil.copy(cands, d / "with space.h5")
    (d / "link.h5").symlink_to(lab)
    (d / "broken.h5").symlink_to(d / "gone.h5")
    (d / "adir.h5").mkdir()
    store.create_score_file(d / "side.scores.h5", cands, 40, (21, 21))
    scored = _candidates(d / "scored.h5")
    rng = np.random.default_rng(3)
    with store.ScoreWriter(scored, "m", 40, (21, 21)) as w:
        w.write_probability(0, rng.uniform(size=40).astype(np.float32))
        w.append_occlusion(np.array([1, 2, 3]), rng.uniform(size=(3, 21, 21)).astype(np.float32))
        w.commit({"architecture": "simple"})
    nomaps = _candidates(d / "nomaps.h5")
    with store.ScoreWriter(nomaps, "m", 40, (21, 21)) as w:
        w.write_probability(0, rng.uniform(size=40).astype(np.float32))
        w.commit({"architecture": "simple"})


def _models_and_configs(d: Path) -> None:
    with zipfile.ZipFile(d / "fake.keras", "w") as zf:
        zf.writestr("config.json", "{}")
    (d / "pickle.keras").write_bytes(b"\x80\x04K\x01.")
    (d / "text.keras").write_text("hello")
    shutil.copy(d / "plain.h5", d / "legacy.h5")
    (d / "emptyrun").mkdir()
    (d / "bad.toml").write_text("epochs = = 3\n")
    (d / "unknown.toml").write_text("frobnicate = 3\n")
    (d / "data_list.toml").write_text('data = ["a", 3]\narchitecture = "simple"\n')
    (d / "epochs_str.toml").write_text(f'data = "{d / "labelled.h5"}"\narchitecture = "simple"\n'
                                       'epochs = "many"\n')
    (d / "lr_neg.toml").write_text(f'data = "{d / "labelled.h5"}"\narchitecture = "simple"\n'
                                   'learning_rate = -1.0\nbatch_size = 8\n')
    (d / "seed_neg.toml").write_text(f'data = "{d / "labelled.h5"}"\narchitecture = "simple"\n'
                                     'seed = -1\n')
    (d / "sim_unknown.toml").write_text("brightness = 3\n")
    (d / "sim_type.toml").write_text('streak_fraction = "lots"\n')
    (d / "sim_huge_stamp.toml").write_text("stamp_shape = [1000000, 1000000]\n")
    (d / "sim_huge_snr.toml").write_text("snr_max = 1e308\n")
    (d / "missing.list").write_text("gone1.h5\n# comment\ngone2.h5\n")
    (d / "empty.list").write_text("# nothing\n")
    (d / "runs").mkdir()
    (d / "launch_data_type.toml").write_text("data = 3\n")
    (d / "launch_epochs_type.toml").write_text('[train]\nepochs = "x"\n')
    (d / "notes.bin").write_bytes(b"\x00\x01")


def _kbmod_table(path: Path, n: int = 12, width: int = 25, **columns) -> None:
    """A KBMOD Results table as astropy writes it (trajectory columns, uuid, a co-add)."""
    from astropy.table import Table

    rng = np.random.default_rng(n)
    t = Table({c: rng.uniform(1, 9, n) for c in ("x", "y", "vx", "vy", "likelihood", "flux")})
    t["obs_count"] = np.full(n, 4)
    t["uuid"] = [f"{i:032x}" for i in range(n)]
    t["coadd_mean"] = rng.normal(size=(n, width, width)).astype(np.float32)
    t["user_class"] = ["real", "bogus", "maybe"] * (n // 3)
    for name, values in columns.items():
        t[name] = values
    t.meta["image_column_shapes"] = {"coadd_mean": [width, width]}
    t.write(path, overwrite=True)


def _kbmod_arrow(src: Path, dest: Path, edit) -> None:
    """``src`` changed at the Arrow level, as another tool would write it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(src)
    pq.write_table(edit(t, pa).replace_schema_metadata(t.schema.metadata), dest)


def _set(t, name, array):
    return t.set_column(t.column_names.index(name), name, array)


def _sweep2(d: Path) -> None:
    """Inputs of the second newcomer sweep (issue 29)."""
    rng = np.random.default_rng(29)
    store.create_store(d / "all_nan.h5", np.full((30, 21, 21), np.nan, np.float32))
    store.create_store(d / "all_sources.h5", rng.normal(size=(8, 21, 21)).astype(np.float32),
                       None, {"true_label": np.ones(8, np.int8)})
    kb = d / "kb.parquet"
    _kbmod_table(kb)
    _kbmod_table(d / "kb.ecsv")
    _kbmod_table(d / "kb_small.parquet", width=17)
    _kbmod_table(d / "kb_dup_uuid.ecsv", uuid=["same"] * 12)
    _kbmod_table(d / "kb_empty_uuid.ecsv", uuid=[f"{i}" if i != 5 else "" for i in range(12)])
    _kbmod_table(d / "kb_scored.parquet", prob_real=np.zeros(12, np.float32))
    _kbmod_table(d / "kb_cnn_class.ecsv", cnn_class=np.zeros(12, bool))
    rows = lambda t: t.column("coadd_mean").to_pylist()  # noqa: E731
    _kbmod_arrow(kb, d / "kb_dup_column.parquet", lambda t, pa: t.append_column("x", t["y"]))
    _kbmod_arrow(kb, d / "kb_no_uuid.parquet", lambda t, pa: t.drop_columns(["uuid"]))
    _kbmod_arrow(kb, d / "kb_nested.parquet", lambda t, pa: _set(t, "coadd_mean", pa.array(
        [np.asarray(r).reshape(25, 25).tolist() for r in rows(t)],
        pa.list_(pa.list_(pa.float32())))))
    _kbmod_arrow(kb, d / "kb_ragged.parquet", lambda t, pa: _set(t, "coadd_mean", pa.array(
        [r if i != 3 else r[:-1] for i, r in enumerate(rows(t))], pa.list_(pa.float32()))))
    _kbmod_arrow(kb, d / "kb_null_row.parquet", lambda t, pa: _set(t, "coadd_mean", pa.array(
        [r if i != 7 else None for i, r in enumerate(rows(t))], pa.list_(pa.float32(), 625))))
    _kbmod_arrow(kb, d / "kb_null_uuid.parquet", lambda t, pa: _set(t, "uuid", pa.array(
        [u if i != 2 else None for i, u in enumerate(t["uuid"].to_pylist())], pa.string())))
    (d / "kb_truncated.parquet").write_bytes(kb.read_bytes()[:-200])
    (d / "kb_empty.parquet").write_bytes(b"")
    (d / "kb_text.ecsv").write_text("not a table\n")
    (d / "kb.fits").write_bytes(b"SIMPLE  =")
    import json

    from stampbatch import fileio
    for name, sha in (("fakerun", fileio.sha256_file(d / "fake.keras")), ("swappedrun", SHA),
                      ("nometrics", None)):
        (d / name).mkdir()
        shutil.copy(d / "fake.keras", d / name / "model.keras")
        if sha is not None:
            (d / name / "metrics.json").write_text(json.dumps({
                "architecture": "simple", "model_sha256": sha,
                "thresholds": {"0.01": {"threshold": 0.9}}}))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad input")  # a space in every path
    inp, out, ro = root / "in", root / "out", root / "ro"
    for d in (inp, out, ro):
        d.mkdir()
    _arrays(inp)
    _stores(inp)
    _models_and_configs(inp)
    _sweep2(inp)
    mounted = False
    if os.geteuid() == 0:  # root ignores mode bits: a read-only tmpfs is read-only for root too
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(ro)],
                                 check=False).returncode == 0
    shutil.copy(inp / "cands.h5", ro / "cands.h5")
    shutil.copy(inp / "sources.npy", ro / "sources.npy")
    if mounted:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    else:
        for f in ro.iterdir():
            f.chmod(0o444)
        ro.chmod(0o555)
    yield {"in": str(inp), "out": str(out), "ro": str(ro), "root": root}
    if mounted:
        subprocess.run(["umount", str(ro)], check=False)
    else:
        ro.chmod(0o755)


def snapshot(root: Path) -> dict[str, object]:
    """Every path under root with its bytes' digest (files), target (links) or 'dir'."""
    found: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                found[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


# --------------------------------------------------------------------------- the rows

SIM = ["simulate", "{out}/s.h5"]
ING = ["ingest", "{out}/i.h5"]
FETCH = ["fetch", "http://127.0.0.1:9/f.bin", "{out}/f.bin", "--sha256", SHA]
TRAIN = ["train", "--data", "{in}/labelled.h5", "--arch", "simple", "--out", "{out}/run"]
SCORE = ["score", "{in}/cands.h5", "--model", "{in}/fake.keras"]
KB = ["ingest", "{out}/k.h5", "--kbmod"]
PLOT = ["plot-occlusion", "{in}/scored.h5", "--model", "m", "--out", "{out}/p.png"]

ROWS: list[tuple[str, list[str], str]] = [
    # ---- top level
    ("no-command", [], "COMMAND"),
    ("unknown-command", ["frobnicate"], "frobnicate"),
    ("unknown-option", ["inspect", "--frobnicate", "{in}/cands.h5"], "--frobnicate"),
    # ---- simulate
    ("sim-n-zero", [*SIM, "--n", "0"], "--n"),
    ("sim-n-negative", [*SIM, "--n", "-5"], "--n"),
    ("sim-n-float", [*SIM, "--n", "2.5"], "--n"),
    ("sim-n-exp", [*SIM, "--n", "1e6"], "--n"),
    ("sim-n-empty", [*SIM, "--n", ""], "--n"),
    ("sim-n-text", [*SIM, "--n", "many"], "--n"),
    ("sim-n-huge", [*SIM, "--n", "1" + "0" * 30], "--n"),
    ("sim-seed-negative", [*SIM, "--n", "10", "--seed", "-1"], "--seed"),
    ("sim-seed-huge", [*SIM, "--n", "10", "--seed", str(2**70)], "--seed"),
    ("sim-seed-text", [*SIM, "--n", "10", "--seed", "x"], "--seed"),
    ("sim-chunk-zero", [*SIM, "--n", "10", "--chunk-rows", "0"], "--chunk-rows"),
    ("sim-chunk-negative", [*SIM, "--n", "10", "--chunk-rows", "-3"], "--chunk-rows"),
    ("sim-compression-bad", [*SIM, "--n", "10", "--compression", "zstd"], "--compression"),
    ("sim-config-missing", [*SIM, "--n", "10", "--config", "{in}/gone.toml"], "gone.toml"),
    ("sim-config-dir", [*SIM, "--n", "10", "--config", "{in}/emptyrun"], "emptyrun"),
    ("sim-config-bad-toml", [*SIM, "--n", "10", "--config", "{in}/bad.toml"], "bad.toml"),
    ("sim-config-unknown", [*SIM, "--n", "10", "--config", "{in}/sim_unknown.toml"], "brightness"),
    ("sim-config-type", [*SIM, "--n", "10", "--config", "{in}/sim_type.toml"], "streak_fraction"),
    ("sim-config-huge-stamp", [*SIM, "--n", "10", "--config", "{in}/sim_huge_stamp.toml"],
     "stamp_shape"),
    ("sim-config-huge-snr", [*SIM, "--n", "10", "--config", "{in}/sim_huge_snr.toml"], "snr_max"),
    ("sim-config-binary", [*SIM, "--n", "10", "--config", "{in}/notes.bin"], "notes.bin"),
    ("sim-out-exists", ["simulate", "{in}/cands.h5", "--n", "10"], "cands.h5"),
    ("sim-out-dir", ["simulate", "{in}/adir.h5", "--n", "10"], "adir.h5"),
    ("sim-out-missing-dir", ["simulate", "{out}/nope/s.h5", "--n", "10"], "nope"),
    ("sim-out-readonly", ["simulate", "{ro}/s.h5", "--n", "10"], "s.h5"),
    ("sim-out-readonly-overwrite", ["simulate", "{ro}/cands.h5", "--n", "10", "--overwrite"],
     "cands.h5"),
    ("sim-out-empty", ["simulate", "", "--n", "10"], "OUT.h5"),
    ("sim-out-nul", ["simulate", "a\0b.h5", "--n", "10"], "OUT.h5"),
    ("sim-out-broken-link-overwrite", ["simulate", "{in}/broken.h5", "--n", "10", "--overwrite"],
     "broken.h5"),
    ("sim-out-unicode-missing-dir", ["simulate", "{out}/dossier é/s.h5", "--n", "10"], "dossier é"),
    ("sim-out-link", ["simulate", "{in}/link.h5", "--n", "10"], "link.h5"),
    ("sim-out-broken-link", ["simulate", "{in}/broken.h5", "--n", "10"], "broken.h5"),
    ("sim-bg-all-nan", [*SIM, "--backgrounds", "{in}/all_nan.h5"], "all_nan.h5"),
    ("sim-bg-all-sources", [*SIM, "--backgrounds", "{in}/all_sources.h5"], "true_label"),
    ("sim-bg-is-output", ["simulate", "{in}/labelled.h5", "--backgrounds", "{in}/labelled.h5",
                          "--overwrite"], "is the --backgrounds store itself"),
    ("sim-bg-link-is-output", ["simulate", "{in}/link.h5", "--backgrounds", "{in}/labelled.h5",
                               "--overwrite"], "link.h5"),
    # ---- ingest
    ("ing-nothing", [*ING], "--sources"),
    ("ing-sources-only", [*ING, "--sources", "{in}/sources.npy"], "--noise"),
    ("ing-candidates-and-sources", [*ING, "--candidates", "{in}/cands.npy", "--sources",
                                    "{in}/sources.npy"], "--candidates"),
    ("ing-missing", [*ING, "--candidates", "{in}/gone.npy"], "gone.npy"),
    ("ing-dir", [*ING, "--candidates", "{in}/emptyrun"], "emptyrun"),
    ("ing-text", [*ING, "--candidates", "{in}/notes.txt"], "notes.txt"),
    ("ing-empty-file", [*ING, "--candidates", "{in}/empty.h5"], "empty.h5"),
    ("ing-hdf5-input", [*ING, "--candidates", "{in}/cands.h5"], "cands.h5"),
    ("ing-pickled", [*ING, "--candidates", "{in}/pickled.npy"], "pickled.npy"),
    ("ing-1d", [*ING, "--candidates", "{in}/one_d.npy"], "one_d.npy"),
    ("ing-4d", [*ING, "--candidates", "{in}/four_d.npy"], "four_d.npy"),
    ("ing-column", [*ING, "--candidates", "{in}/col.npy"], "col.npy"),
    ("ing-empty-array", [*ING, "--candidates", "{in}/empty_arr.npy"], "empty_arr.npy"),
    ("ing-strings", [*ING, "--candidates", "{in}/text.npy"], "text.npy"),
    ("ing-complex", [*ING, "--candidates", "{in}/complex.npy"], "complex.npy"),
    ("ing-nonsquare", [*ING, "--candidates", "{in}/nonsquare.npy"], "nonsquare.npy"),
    ("ing-float64-overflow", [*ING, "--candidates", "{in}/big64.npy"], "big64.npy"),
    ("ing-truncated-npy", [*ING, "--candidates", "{in}/truncated.npy"], "truncated.npy"),
    ("ing-truncated-npz", [*ING, "--candidates", "{in}/truncated.npz"], "truncated.npz"),
    ("ing-npz-several", [*ING, "--candidates", "{in}/multi.npz"], "--key"),
    ("ing-npz-bad-key", [*ING, "--candidates", "{in}/one.npz", "--key", "nope"], "nope"),
    ("ing-same-file", [*ING, "--sources", "{in}/sources.npy", "--noise", "{in}/sources.npy"],
     "sources.npy"),
    ("ing-same-file-via-link", [*ING, "--sources", "{in}/sources.npy", "--noise",
                                "{ro}/../in/sources.npy"], "sources.npy"),
    ("ing-shape-mismatch", [*ING, "--sources", "{in}/sources.npy", "--noise", "{in}/small15.npy"],
     "small15.npy"),
    ("ing-out-exists", ["ingest", "{in}/cands.h5", "--candidates", "{in}/cands.npy"], "cands.h5"),
    ("ing-out-is-input", ["ingest", "{in}/cands.npy", "--candidates", "{in}/cands.npy",
                          "--overwrite"], "cands.npy"),
    ("ing-out-readonly", ["ingest", "{ro}/i.h5", "--candidates", "{in}/cands.npy"], "i.h5"),
    ("ing-out-missing-dir", ["ingest", "{out}/no dir/i.h5", "--candidates", "{in}/cands.npy"],
     "no dir"),
    ("ing-out-dir", ["ingest", "{in}/adir.h5", "--candidates", "{in}/cands.npy"], "adir.h5"),
    ("ing-chunk-zero", [*ING, "--candidates", "{in}/cands.npy", "--chunk-rows", "0"],
     "--chunk-rows"),
    ("ing-compression-bad", [*ING, "--candidates", "{in}/cands.npy", "--compression", "x"],
     "--compression"),
    ("ing-broken-link", [*ING, "--candidates", "{in}/broken.h5"], "broken.h5"),
    ("ing-unicode-missing", [*ING, "--candidates", "{in}/données.npy"], "données.npy"),
    # ---- fetch
    ("fetch-sha-short", ["fetch", "http://127.0.0.1:9/f", "{out}/f", "--sha256", "abc"], "--sha256"),
    ("fetch-sha-nonhex", ["fetch", "http://127.0.0.1:9/f", "{out}/f", "--sha256", "g" * 64],
     "--sha256"),
    ("fetch-sha-empty", ["fetch", "http://127.0.0.1:9/f", "{out}/f", "--sha256", ""], "--sha256"),
    ("fetch-sha-missing", ["fetch", "http://127.0.0.1:9/f", "{out}/f"], "--sha256"),
    ("fetch-ftp", ["fetch", "ftp://example.org/f", "{out}/f", "--sha256", SHA], "ftp://example.org"),
    ("fetch-file-url", ["fetch", "file:///etc/passwd", "{out}/f", "--sha256", SHA], "file:///"),
    ("fetch-no-scheme", ["fetch", "example.org/f", "{out}/f", "--sha256", SHA], "example.org/f"),
    ("fetch-empty-url", ["fetch", "", "{out}/f", "--sha256", SHA], "URL"),
    ("fetch-bad-port", ["fetch", "http://127.0.0.1:99999/f", "{out}/f", "--sha256", SHA],
     "127.0.0.1:99999"),
    ("fetch-timeout-inf", [*FETCH, "--timeout", "inf"], "--timeout"),
    ("fetch-timeout-nan", [*FETCH, "--timeout", "nan"], "--timeout"),
    ("fetch-timeout-zero", [*FETCH, "--timeout", "0"], "--timeout"),
    ("fetch-timeout-negative", [*FETCH, "--timeout", "-1"], "--timeout"),
    ("fetch-timeout-text", [*FETCH, "--timeout", "soon"], "--timeout"),
    ("fetch-retries-negative", [*FETCH, "--retries", "-1"], "--retries"),
    ("fetch-retries-text", [*FETCH, "--retries", "x"], "--retries"),
    ("fetch-dest-dir", ["fetch", "http://127.0.0.1:9/f", "{in}/emptyrun", "--sha256", SHA],
     "emptyrun"),
    ("fetch-dest-missing-dir", ["fetch", "http://127.0.0.1:9/f", "{out}/nope/f", "--sha256", SHA],
     "nope"),
    ("fetch-dest-readonly", ["fetch", "http://127.0.0.1:9/f", "{ro}/f", "--sha256", SHA], "ro"),
    ("fetch-dest-exists-other", ["fetch", "http://127.0.0.1:9/f", "{in}/notes.txt", "--sha256",
                                 SHA], "notes.txt"),
    ("fetch-refused", [*FETCH, "--retries", "0", "--quiet"], "127.0.0.1:9"),
    ("fetch-refused-password", ["fetch", "http://u:hunter2@127.0.0.1:9/f", "{out}/f",
                                "--sha256", SHA, "--retries", "0", "--quiet"], "u:***@127.0.0.1:9"),
    # ---- inspect
    ("insp-missing", ["inspect", "{in}/gone.h5"], "gone.h5"),
    ("insp-dir", ["inspect", "{in}/adir.h5"], "adir.h5"),
    ("insp-empty-file", ["inspect", "{in}/empty.h5"], "empty.h5"),
    ("insp-text", ["inspect", "{in}/notes.h5"], "notes.h5"),
    ("insp-npy", ["inspect", "{in}/sources.npy"], "sources.npy"),
    ("insp-truncated", ["inspect", "{in}/truncated.h5"], "truncated.h5"),
    ("insp-plain-hdf5", ["inspect", "{in}/plain.h5"], "plain.h5"),
    ("insp-no-schema", ["inspect", "{in}/no_schema.h5"], "no_schema.h5"),
    ("insp-schema2", ["inspect", "{in}/schema2.h5"], "schema2.h5"),
    ("insp-string-schema", ["inspect", "{in}/string_schema.h5"], "stampbatch_schema"),
    ("insp-scalar-shape", ["inspect", "{in}/scalar_shape.h5"], "stamp_shape"),
    ("insp-scores-dataset", ["inspect", "{in}/scores_dataset.h5"], "/scores"),
    ("insp-string-snr", ["inspect", "{in}/string_snr.h5"], "/meta/snr"),
    ("insp-scores-noprob", ["inspect", "{in}/scores_noprob.h5"], "/scores/m"),
    ("insp-labels-2", ["inspect", "{in}/labels2.h5"], "/labels"),
    ("insp-labels-neg", ["inspect", "{in}/labels_neg.h5"], "/labels"),
    ("insp-short-labels", ["inspect", "{in}/short_labels.h5"], "/labels"),
    ("insp-float-labels", ["inspect", "{in}/float_labels.h5"], "/labels"),
    ("insp-short-meta", ["inspect", "{in}/short_meta.h5"], "/meta/x"),
    ("insp-no-stamps", ["inspect", "{in}/no_stamps.h5"], "/stamps"),
    ("insp-stamps64", ["inspect", "{in}/stamps64.h5"], "/stamps"),
    ("insp-stamps-2d", ["inspect", "{in}/stamps_2d.h5"], "/stamps"),
    ("insp-filter", ["inspect", "{in}/needs_filter.h5"], "filter 200"),
    ("insp-broken-link", ["inspect", "{in}/broken.h5"], "broken.h5"),
    ("insp-unicode-missing", ["inspect", "{in}/données manquantes.h5"], "données manquantes.h5"),
    ("insp-second-bad", ["inspect", "{in}/cands.h5", "{in}/gone.h5"], "gone.h5"),
    ("insp-nothing", ["inspect"], "FILE.h5"),
    # ---- train
    ("train-no-out", ["train", "--data", "{in}/labelled.h5", "--arch", "simple"], "--out"),
    ("train-no-data", ["train", "--arch", "simple", "--out", "{out}/run"], "--data"),
    ("train-no-arch", ["train", "--data", "{in}/labelled.h5", "--out", "{out}/run"], "--arch"),
    ("train-arch-unknown", ["train", "--data", "{in}/labelled.h5", "--arch", "nope", "--out",
                            "{out}/run"], "nope"),
    ("train-arch-empty", ["train", "--data", "{in}/labelled.h5", "--arch", "", "--out",
                          "{out}/run"], "architecture"),
    ("train-epochs-zero", [*TRAIN, "--epochs", "0"], "--epochs"),
    ("train-epochs-negative", [*TRAIN, "--epochs", "-1"], "--epochs"),
    ("train-epochs-text", [*TRAIN, "--epochs", "ten"], "--epochs"),
    ("train-batch-zero", [*TRAIN, "--batch-size", "0"], "--batch-size"),
    ("train-batch-huge", [*TRAIN, "--batch-size", "1000000000"], "--batch-size"),
    ("train-batch-above-split", [*TRAIN, "--batch-size", "43"], "--batch-size"),
    ("train-batch-default-small-store", [*TRAIN], "--batch-size"),
    ("train-lr-zero", [*TRAIN, "--learning-rate", "0"], "--learning-rate"),
    ("train-lr-negative", [*TRAIN, "--learning-rate", "-0.1"], "--learning-rate"),
    ("train-lr-inf", [*TRAIN, "--learning-rate", "inf"], "--learning-rate"),
    ("train-lr-nan", [*TRAIN, "--learning-rate", "nan"], "--learning-rate"),
    ("train-lr-text", [*TRAIN, "--learning-rate", "fast"], "--learning-rate"),
    ("train-optimizer", [*TRAIN, "--optimizer", "rmsprop"], "--optimizer"),
    ("train-seed-negative", [*TRAIN, "--seed", "-1"], "--seed"),
    ("train-seed-huge", [*TRAIN, "--seed", str(2**32)], "--seed"),
    ("train-patience-negative", [*TRAIN, "--patience", "-1"], "--patience"),
    ("train-patience-text", [*TRAIN, "--patience", "x"], "--patience"),
    ("train-data-missing", ["train", "--data", "{in}/gone.h5", "--arch", "simple", "--out",
                            "{out}/run"], "gone.h5"),
    ("train-data-dir", ["train", "--data", "{in}/adir.h5", "--arch", "simple", "--out",
                        "{out}/run"], "adir.h5"),
    ("train-data-text", ["train", "--data", "{in}/notes.h5", "--arch", "simple", "--out",
                         "{out}/run"], "notes.h5"),
    ("train-data-unlabelled", ["train", "--data", "{in}/cands.h5", "--arch", "simple", "--out",
                               "{out}/run", "--batch-size", "8"], "cands.h5"),
    ("train-data-labels-2", ["train", "--data", "{in}/labels2.h5", "--arch", "simple", "--out",
                             "{out}/run", "--batch-size", "8"], "labels2.h5"),
    ("train-data-scores-dataset", ["train", "--data", "{in}/scores_dataset.h5", "--arch", "simple",
                                   "--out", "{out}/run", "--batch-size", "8"], "scores_dataset.h5"),
    ("train-data-filter", ["train", "--data", "{in}/needs_filter.h5", "--arch", "simple",
                           "--out", "{out}/run", "--batch-size", "8"], "needs_filter.h5"),
    ("train-out-is-file", [*TRAIN[:-1], "{in}/notes.txt", "--batch-size", "8"], "notes.txt"),
    ("train-out-readonly", [*TRAIN[:-1], "{ro}/run", "--batch-size", "8"], "run"),
    ("train-config-missing", [*TRAIN, "--config", "{in}/gone.toml"], "gone.toml"),
    ("train-config-bad", [*TRAIN, "--config", "{in}/bad.toml"], "bad.toml"),
    ("train-config-unknown", [*TRAIN, "--config", "{in}/unknown.toml"], "frobnicate"),
    ("train-config-data-list", ["train", "--config", "{in}/data_list.toml", "--out", "{out}/run"],
     "data_list.toml"),
    ("train-config-epochs-str", ["train", "--config", "{in}/epochs_str.toml", "--out", "{out}/run"],
     "epochs"),
    ("train-config-lr-negative", ["train", "--config", "{in}/lr_neg.toml", "--out", "{out}/run"],
     "learning_rate"),
    ("train-config-seed-negative", ["train", "--config", "{in}/seed_neg.toml", "--out",
                                    "{out}/run"], "seed"),
    # ---- models, report
    ("models-size-zero", ["models", "--stamp-size", "0"], "--stamp-size"),
    ("models-size-text", ["models", "--stamp-size", "big"], "--stamp-size"),
    ("models-size-huge", ["models", "--stamp-size", "100000"], "--stamp-size"),
    ("models-size-tiny", ["models", "--stamp-size", "1"], "--stamp-size"),
    ("report-missing", ["report", "{in}/gone"], "gone"),
    ("report-file", ["report", "{in}/notes.txt"], "notes.txt"),
    ("report-no-runs", ["report", "{in}/runs"], "runs"),
    ("report-readonly", ["report", "{ro}"], "ro"),
    # ---- score
    ("score-no-model", ["score", "{in}/cands.h5"], "--model"),
    ("score-model-missing", ["score", "{in}/cands.h5", "--model", "{in}/gone.keras"], "gone.keras"),
    ("score-model-empty-dir", ["score", "{in}/cands.h5", "--model", "{in}/emptyrun"], "emptyrun"),
    ("score-model-pickle", ["score", "{in}/cands.h5", "--model", "{in}/pickle.keras"],
     "pickle.keras"),
    ("score-model-text", ["score", "{in}/cands.h5", "--model", "{in}/text.keras"], "text.keras"),
    ("score-model-legacy-h5", ["score", "{in}/cands.h5", "--model", "{in}/legacy.h5"], "legacy.h5"),
    ("score-model-npy", ["score", "{in}/cands.h5", "--model", "{in}/sources.npy"], "sources.npy"),
    ("score-cands-missing", ["score", "{in}/gone.h5", "--model", "{in}/fake.keras"], "gone.h5"),
    ("score-cands-text", ["score", "{in}/notes.h5", "--model", "{in}/fake.keras"], "notes.h5"),
    ("score-cands-dir", ["score", "{in}/adir.h5", "--model", "{in}/fake.keras"], "adir.h5"),
    ("score-cands-empty", ["score", "{in}/empty.h5", "--model", "{in}/fake.keras"], "empty.h5"),
    ("score-cands-side-file", ["score", "{in}/side.scores.h5", "--model", "{in}/fake.keras"],
     "side.scores.h5"),
    ("score-cands-scores-dataset", ["score", "{in}/scores_dataset.h5", "--model",
                                    "{in}/fake.keras"], "/scores"),
    ("score-cands-filter", ["score", "{in}/needs_filter.h5", "--model", "{in}/fake.keras"],
     "filter 200"),
    ("score-cands-scalar-shape", ["score", "{in}/scalar_shape.h5", "--model", "{in}/fake.keras"],
     "stamp_shape"),
    ("score-cands-readonly", ["score", "{ro}/cands.h5", "--model", "{in}/fake.keras"], "--out"),
    ("score-cands-broken-link", ["score", "{in}/broken.h5", "--model", "{in}/fake.keras"],
     "broken.h5"),
    ("score-cands-unicode-missing", ["score", "{in}/données absentes.h5", "--model",
                                     "{in}/fake.keras"], "données absentes.h5"),
    ("score-glob-nothing", ["score", "{in}/zz*.h5", "--model", "{in}/fake.keras"], "zz*.h5"),
    ("score-list-missing", ["score", "@{in}/gone.list", "--model", "{in}/fake.keras"], "gone.list"),
    ("score-list-entries-missing", ["score", "@{in}/missing.list", "--model", "{in}/fake.keras"],
     "gone1.h5"),
    ("score-list-empty", ["score", "@{in}/empty.list", "--model", "{in}/fake.keras"],
     "candidate"),
    ("score-list-binary", ["score", "@{in}/notes.bin", "--model", "{in}/fake.keras"], "notes.bin"),
    ("score-same-side-file", ["score", "{in}/cands.h5", "{ro}/cands.h5", "--model",
                              "{in}/fake.keras", "--out", "{in}/emptyrun"], "cands.scores.h5"),
    ("score-out-is-file", [*SCORE, "--out", "{in}/notes.txt"], "notes.txt"),
    ("score-occlusion-bad", [*SCORE, "--occlusion", "some"], "--occlusion"),
    ("score-occlusion-above-2", [*SCORE, "--occlusion", "above:2"], "--occlusion"),
    ("score-occlusion-above-neg", [*SCORE, "--occlusion", "above:-1"], "--occlusion"),
    ("score-occlusion-above-nan", [*SCORE, "--occlusion", "above:nan"], "--occlusion"),
    ("score-patch-zero", [*SCORE, "--occlusion-patch", "0"], "--occlusion-patch"),
    ("score-patch-text", [*SCORE, "--occlusion", "all", "--occlusion-patch", "five"],
     "--occlusion-patch"),
    ("score-chunk-zero", [*SCORE, "--chunk-size", "0"], "--chunk-size"),
    ("score-chunk-negative", [*SCORE, "--chunk-size", "-8"], "--chunk-size"),
    ("score-workers-zero", [*SCORE, "--workers", "0"], "--workers"),
    ("score-threads-zero", [*SCORE, "--threads-per-worker", "0"], "--threads-per-worker"),
    ("score-gpus-negative", [*SCORE, "--gpus", "-1"], "--gpus"),
    ("score-gpus-no-slurm", [*SCORE, "--gpus", "1"], "--gpus"),
    ("score-partition-no-slurm", [*SCORE, "--partition", "debug"], "--partition"),
    ("score-scheduler-and-slurm", [*SCORE, "--slurm", "--scheduler", "tcp://x:1"], "--scheduler"),
    ("score-walltime-bad", [*SCORE, "--walltime", "1h"], "--walltime"),
    ("score-cores-zero", [*SCORE, "--cores", "0"], "--cores"),
    ("score-threshold-on-hdf5", [*SCORE, "--threshold", "fpr:0.01"], "--threshold"),
    ("score-column-on-hdf5", [*SCORE, "--column", "nonexistent"], "--column"),
    ("score-walltime-no-slurm", [*SCORE, "--walltime", "99:99:99"], "--walltime"),
    ("score-cores-no-slurm", [*SCORE, "--cores", "8"], "--cores"),
    ("score-memory-no-slurm", [*SCORE, "--memory", "64GB"], "--memory"),
    ("score-log-dir-no-slurm", [*SCORE, "--slurm-log-dir", "{out}/logs"], "--slurm-log-dir"),
    ("score-account-no-slurm", [*SCORE, "--account", "astro"], "--account"),
    ("score-threads-with-slurm", [*SCORE, "--slurm", "--threads-per-worker", "2"],
     "--threads-per-worker"),
    ("score-dashboard-with-scheduler", [*SCORE, "--scheduler", "tcp://127.0.0.1:1",
                                        "--dashboard", ":0"], "--dashboard"),
    ("score-workers-with-scheduler", [*SCORE, "--scheduler", "tcp://127.0.0.1:1", "--workers",
                                      "2"], "--workers"),
    ("score-start-timeout-zero", [*SCORE, "--start-timeout", "0"], "--start-timeout"),
    ("score-start-timeout-inf", [*SCORE, "--start-timeout", "inf"], "--start-timeout"),
    ("score-start-timeout-text", [*SCORE, "--start-timeout", "2m"], "--start-timeout"),
    ("score-start-timeout-local", [*SCORE, "--start-timeout", "30"], "--start-timeout"),
    ("score-backend-bad", [*SCORE, "--backend", "cuda"], "--backend"),
    ("score-precision-int8", [*SCORE, "--precision", "int8"], "--precision"),
    ("score-name-empty", [*SCORE, "--name", ""], "--name"),
    ("score-name-newline", [*SCORE, "--name", "a\nb"], "--name"),
    ("score-name-long", [*SCORE, "--name", "n" * 300], "--name"),
    ("score-name-slash", [*SCORE, "--name", "a/b"], "--name"),
    ("score-name-two-models", [*SCORE, "--model", "{in}/fake.keras", "--name", "x"], "--name"),
    # ---- plot-occlusion
    ("plot-file-missing", ["plot-occlusion", "{in}/gone.h5", "--model", "m", "--top", "1",
                           "--out", "{out}/p.png"], "gone.h5"),
    ("plot-file-text", ["plot-occlusion", "{in}/notes.h5", "--model", "m", "--top", "1",
                        "--out", "{out}/p.png"], "notes.h5"),
    ("plot-model-missing", ["plot-occlusion", "{in}/scored.h5", "--model", "nope", "--top", "1",
                            "--out", "{out}/p.png"], "nope"),
    ("plot-no-maps", ["plot-occlusion", "{in}/nomaps.h5", "--model", "m", "--top", "1",
                      "--out", "{out}/p.png"], "nomaps.h5"),
    ("plot-unscored", ["plot-occlusion", "{in}/cands.h5", "--model", "m", "--top", "1",
                       "--out", "{out}/p.png"], "cands.h5"),
    ("plot-scores-dataset", ["plot-occlusion", "{in}/scores_dataset.h5", "--model", "m", "--top",
                             "1", "--out", "{out}/p.png"], "/scores is a dataset"),
    ("plot-scores-noprob", ["plot-occlusion", "{in}/scores_noprob.h5", "--model", "m", "--top",
                            "1", "--out", "{out}/p.png"], "/scores/m"),
    ("plot-top-zero", [*PLOT, "--top", "0"], "--top"),
    ("plot-top-1000", [*PLOT, "--top", "1000"], "--top"),
    ("plot-rows-text", [*PLOT, "--rows", "a,b"], "--rows"),
    ("plot-rows-negative", [*PLOT, "--rows", "-1"], "--rows"),
    ("plot-rows-empty", [*PLOT, "--rows", ","], "--rows"),
    ("plot-rows-unmapped", [*PLOT, "--rows", "7"], "7"),
    ("plot-rows-beyond", [*PLOT, "--rows", "4000"], "4000"),
    ("plot-rows-and-top", [*PLOT, "--rows", "1", "--top", "1"], "--top"),
    ("plot-no-selection", [*PLOT], "--rows"),
    ("plot-out-under-a-file", ["plot-occlusion", "{in}/scored.h5", "--model", "m", "--top", "1",
                               "--out", "{in}/notes.txt/p.png"], "notes.txt"),
    ("plot-out-empty", [*PLOT[:-2], "--out", "", "--top", "1"], "--out"),
    ("plot-out-dir", ["plot-occlusion", "{in}/scored.h5", "--model", "m", "--top", "1",
                      "--out", "{in}/emptyrun"], "emptyrun"),
    ("plot-out-readonly", ["plot-occlusion", "{in}/scored.h5", "--model", "m", "--top", "1",
                           "--out", "{ro}/p.png"], "p.png"),
    ("plot-candidates-missing", [*PLOT, "--top", "1", "--candidates", "{in}/gone.h5"], "gone.h5"),
    ("plot-candidates-wrong-length", [*PLOT, "--top", "1", "--candidates", "{in}/labelled.h5"],
     "labelled.h5"),
    # ---- KBMOD Results tables (ingest --kbmod, score TABLE): issue 29
    ("ing-kb-dup-column", [*KB, "{in}/kb_dup_column.parquet"], "'x' appear more than once"),
    ("ing-kb-nested", [*KB, "{in}/kb_nested.parquet"], "holds nested lists"),
    ("ing-kb-ragged", [*KB, "{in}/kb_ragged.parquet"], "is ragged: row 0 holds 625 values, row 3"),
    ("ing-kb-null-row", [*KB, "{in}/kb_null_row.parquet"], "e.g. row 7 (no values)"),
    ("ing-kb-null-uuid", [*KB, "{in}/kb_null_uuid.parquet"], "null or empty uuid, e.g. row 2"),
    ("ing-kb-empty-uuid", [*KB, "{in}/kb_empty_uuid.ecsv"], "null or empty uuid, e.g. row 5"),
    ("ing-kb-no-uuid", [*KB, "{in}/kb_no_uuid.parquet"], "has no 'uuid' column"),
    ("ing-kb-dup-uuid", [*KB, "{in}/kb_dup_uuid.ecsv"], "duplicate uuid"),
    ("ing-kb-column-missing", [*KB, "{in}/kb.parquet", "--column", "coadd_nope"], "coadd_nope"),
    ("ing-kb-column-scalar", [*KB, "{in}/kb.parquet", "--column", "flux"], "'flux'"),
    ("ing-kb-too-small", [*KB, "{in}/kb_small.parquet"], "smaller than the model's 21x21"),
    ("ing-kb-label-missing", [*KB, "{in}/kb.parquet", "--label-column", "truth"], "'truth'"),
    ("ing-kb-label-words", [*KB, "{in}/kb.ecsv", "--label-column", "user_class"], "maybe"),
    ("ing-kb-truncated", [*KB, "{in}/kb_truncated.parquet"], "kb_truncated.parquet"),
    ("ing-kb-empty-file", [*KB, "{in}/kb_empty.parquet"], "kb_empty.parquet"),
    ("ing-kb-text", [*KB, "{in}/kb_text.ecsv"], "kb_text.ecsv"),
    ("ing-kb-fits", [*KB, "{in}/kb.fits"], "unsupported suffix '.fits'"),
    ("ing-kb-missing", [*KB, "{in}/kb_gone.parquet"], "kb_gone.parquet"),
    ("ing-kb-and-candidates", [*KB, "{in}/kb.parquet", "--candidates", "{in}/cands.npy"],
     "--kbmod"),
    ("score-kb-dup-column", ["score", "{in}/kb_dup_column.parquet", "--model",
                             "{in}/fake.keras"], "'x' appear more than once"),
    ("score-kb-already-scored", ["score", "{in}/kb_scored.parquet", "--model", "{in}/fake.keras",
                                 "--out", "{out}"], "already has column(s) prob_real"),
    ("score-kb-cnn-class", ["score", "{in}/kb_cnn_class.ecsv", "--model", "{in}/fake.keras",
                            "--out", "{out}"], "already has column(s) cnn_class"),
    ("score-kb-null-uuid", ["score", "{in}/kb_null_uuid.parquet", "--model", "{in}/fake.keras",
                            "--out", "{out}"], "null or empty uuid"),
    ("score-kb-no-uuid", ["score", "{in}/kb_no_uuid.parquet", "--model", "{in}/fake.keras",
                          "--out", "{out}"], "has no 'uuid' column"),
    ("score-kb-out-is-file", ["score", "{in}/kb.parquet", "--model", "{in}/fake.keras",
                              "--out", "{in}/kb.ecsv"], "--out"),
    ("score-kb-two-models", ["score", "{in}/kb.parquet", "--model", "{in}/fake.keras",
                             "--model", "{in}/fake.keras"], "one --model"),
    ("score-kb-and-hdf5", ["score", "{in}/kb.parquet", "{in}/cands.h5", "--model",
                           "{in}/fake.keras"], "separate runs"),
    ("score-kb-truncated", ["score", "{in}/kb_truncated.parquet", "--model", "{in}/fake.keras"],
     "kb_truncated.parquet"),
    # ---- evaluate (everything here fails before the model is loaded)
    ("eval-run-missing", ["evaluate", "{in}/gone", "--data", "{in}/labelled.h5"], "gone"),
    ("eval-run-empty", ["evaluate", "{in}/emptyrun", "--data", "{in}/labelled.h5"], "emptyrun"),
    ("eval-no-metrics", ["evaluate", "{in}/nometrics", "--data", "{in}/labelled.h5"],
     "metrics.json"),
    ("eval-model-replaced", ["evaluate", "{in}/swappedrun", "--data", "{in}/labelled.h5"],
     "is not the model"),
    ("eval-data-missing", ["evaluate", "{in}/fakerun", "--data", "{in}/gone.h5"], "gone.h5"),
    ("eval-data-unlabelled", ["evaluate", "{in}/fakerun", "--data", "{in}/cands.h5"], "cands.h5"),
    ("eval-data-one-class", ["evaluate", "{in}/fakerun", "--data", "{in}/all_sources.h5"],
     "both classes"),
    ("eval-data-text", ["evaluate", "{in}/fakerun", "--data", "{in}/notes.h5"], "notes.h5"),
    ("eval-by-unknown", ["evaluate", "{in}/fakerun", "--data", "{in}/labelled.h5", "--by",
                         "colour"], "colour"),
    ("score-model-replaced", ["score", "{in}/cands.h5", "--model", "{in}/swappedrun"],
     "is not the model"),
    # ---- launch, status, collect (everything here fails before Slurm is asked)
    ("launch-spec-missing", ["launch", "{in}/gone.toml"], "gone.toml"),
    ("launch-spec-bad-toml", ["launch", "{in}/bad.toml"], "bad.toml"),
    ("launch-epochs-zero", ["launch", "--data", "{in}/labelled.h5", "--arch", "simple",
                            "--epochs", "0"], "--epochs"),
    ("launch-poll-zero", ["launch", "--data", "{in}/labelled.h5", "--arch", "simple",
                          "--poll", "0"], "--poll"),
    ("launch-poll-inf", ["launch", "--data", "{in}/labelled.h5", "--arch", "simple",
                         "--poll", "inf"], "--poll"),
    ("launch-executor-bad", ["launch", "--data", "{in}/labelled.h5", "--arch", "simple",
                             "--executor", "k8s"], "--executor"),
    ("launch-nothing", ["launch", "--dry-run"], "--data"),
    ("launch-data-missing", ["launch", "--data", "{in}/gone.h5", "--arch", "simple", "--dry-run"],
     "gone.h5"),
    ("launch-data-unlabelled", ["launch", "--data", "{in}/cands.h5", "--arch", "simple",
                                "--dry-run"], "cands.h5"),
    ("launch-data-scores-dataset", ["launch", "--data", "{in}/scores_dataset.h5", "--arch",
                                    "simple", "--dry-run"], "scores_dataset.h5"),
    ("launch-arch-unknown", ["launch", "--data", "{in}/labelled.h5", "--arch", "nope",
                             "--dry-run"], "nope"),
    ("launch-spec-type", ["launch", "{in}/launch_data_type.toml", "--dry-run"], "data"),
    ("launch-spec-nested-type", ["launch", "{in}/launch_epochs_type.toml", "--dry-run"], "epochs"),
    ("launch-spec-dir", ["launch", "{in}/runs", "--dry-run"], "runs"),
    ("status-empty-dir", ["status", "{in}/runs"], "runs"),
    ("collect-empty-dir", ["collect", "{in}/runs"], "runs"),
    ("status-missing", ["status", "{in}/gone"], "gone"),
    ("status-file", ["status", "{in}/notes.txt"], "notes.txt"),
    ("collect-missing", ["collect", "{in}/gone"], "gone"),
    ("collect-file", ["collect", "{in}/notes.txt"], "notes.txt"),
]


def _fill(ws: dict, items: list[str]) -> list[str]:
    return [s.replace("{in}", ws["in"]).replace("{out}", ws["out"]).replace("{ro}", ws["ro"])
            for s in items]


def _check(rc: object, err: str, names: str, before: dict, after: dict) -> None:
    assert isinstance(rc, int) and rc != 0, f"exit {rc!r}; stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"expected one line on stderr, got {err!r}"
    assert names in lines[0], f"{names!r} not named in {lines[0]!r}"
    assert after == before, "the workspace changed: " + repr(
        {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
         if before.get(k) != after.get(k)})


@pytest.mark.parametrize("row_id, argv, names", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(ws, capsys, row_id, argv, names):
    before = snapshot(ws["root"])
    try:
        rc = cli.main(_fill(ws, argv))
    except SystemExit as exc:  # argparse: a usage error
        rc = exc.code
    err = capsys.readouterr().err
    _check(rc, err, _fill(ws, [names])[0], before, snapshot(ws["root"]))


SUBPROCESS_ROWS = [r for r in ROWS if r[0] in (
    "sim-n-zero", "insp-missing", "fetch-timeout-inf", "ing-same-file", "score-model-missing",
    "insp-scores-dataset", "train-config-data-list")]


@pytest.mark.parametrize("row_id, argv, names", SUBPROCESS_ROWS, ids=[r[0] for r in SUBPROCESS_ROWS])
def test_bad_input_as_a_real_process(ws, row_id, argv, names):
    """The same contract from a real ``stampbatch`` process (entry point, signals, exit code)."""
    before = snapshot(ws["root"])
    proc = subprocess.run([sys.executable, "-m", "stampbatch", *_fill(ws, argv)],
                          capture_output=True, text=True, timeout=120, cwd=ws["out"])
    _check(proc.returncode, proc.stderr, _fill(ws, [names])[0], before, snapshot(ws["root"]))
    assert proc.stdout == ""


def test_the_table_is_large_enough():
    assert len(ROWS) >= 150 and len({r[0] for r in ROWS}) == len(ROWS)
