"""KBMOD Results tables in and out, written exactly as KBMOD's ``Results.write_table`` writes
them (astropy ``Table.write``), scored with a real tiny model on a real Dask cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.table import Table
from conftest import REPO, gaussian_stamps
from test_score import _train, client  # noqa: F401 - the module's Dask client fixture

from stampbatch import cli, kbmod, store
from stampbatch.kbmod import table as kbtable
from stampbatch.score import run as score

pytestmark = pytest.mark.slow

NIGHTS = ("2024-03-01", "2024-03-02")
MJD = np.array([60370.10, 60370.12, 60371.11, 60371.13])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("runs") / "simple", "simple", 1)


def write_results(path: Path, n: int = 240, *, seed: int = 3, radius: int = 12,
                  nan_rows: tuple[int, ...] = (5, 17), shapes_meta: bool = True,
                  uuids: list[str] | None = None, drop: tuple[str, ...] = ()) -> Table:
    """A Results table as KBMOD's write_table writes it: trajectory columns, uuid, 2-D co-adds
    (also per night), light curves, wcs/mjd meta and image_column_shapes for the 2-D columns."""
    rng = np.random.default_rng(seed)
    width = 2 * radius + 1
    t = Table()
    t["x"] = rng.integers(0, 4000, n)
    t["y"] = rng.integers(0, 4000, n)
    t["vx"] = rng.normal(0, 50, n)
    t["vy"] = rng.normal(0, 50, n)
    t["likelihood"] = rng.uniform(5, 50, n)
    t["flux"] = rng.uniform(100, 1000, n)
    t["obs_count"] = rng.integers(3, 5, n)
    t["uuid"] = uuids if uuids is not None else [f"{v:032x}" for v in rng.integers(0, 2**62, n)]
    coadd = gaussian_stamps(n, seed=seed, shape=(width, width), amplitude=5.0,
                            sources=rng.random(n) < 0.4)
    coadd[list(nan_rows), radius, radius] = np.nan        # the centre: unscorable
    coadd[11, radius, radius - 7] = np.nan                # inside the crop, off the centre:
    coadd[9, 0, 1] = np.nan                               # filled; cropped away: both scored
    t["coadd_mean"] = coadd
    t["coadd_median"] = coadd * np.float32(0.9)
    for night in NIGHTS:
        t[f"coadd_mean_{night}"] = coadd + np.float32(0.5)
    t["psi_curve"] = rng.normal(size=(n, len(MJD))).astype(np.float32)
    t["obs_valid"] = rng.random((n, len(MJD))) < 0.9
    t["user_class"] = np.where(rng.random(n) < 0.5, "real", "bogus")
    t.remove_columns(list(drop))
    t.meta["wcs"] = json.dumps({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 201.5,
                                "CRVAL2": -11.2, "CRPIX1": 2048.0, "CRPIX2": 2048.0})
    t.meta["mjd_mid"] = MJD
    t.meta["mjd_utc_mid"] = MJD
    t.meta["mjd_tai_mid"] = MJD + 37.0 / 86400
    if shapes_meta:    # Results._detect_image_columns: every column with 2-D+ cells
        t.meta["image_column_shapes"] = {c: [width, width] for c in t.colnames
                                         if t[c].ndim >= 3}
    kwargs = {"path": "__astropy_table__", "serialize_meta": True} if path.suffix == ".hdf5" else {}
    t.write(path, overwrite=True, **kwargs)
    return t


def hdf5_reference(tmp_path: Path, table: Table, run_dir: Path, client_, **kw) -> store.Scores:
    """The same stamps, centre-cropped, scored by the plain HDF5 path."""
    path = tmp_path / "reference.h5"
    store.create_store(path, kbmod.crop_center(np.asarray(table["coadd_mean"]), (21, 21)),
                       chunk_rows=128)
    score.score_files([path], [run_dir], score.ScoreOptions(
        chunk_size=128, client=client_, progress=False, log=lambda _m: None, **kw))
    return store.read_scores(path, run_dir.name)


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def _arrow_same(a, b) -> bool:
    """Same Arrow type and the same values, floats compared byte for byte (NaN included)."""
    import pyarrow as pa

    a = a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
    b = b.combine_chunks() if isinstance(b, pa.ChunkedArray) else b
    if a.type != b.type or len(a) != len(b):
        return False
    if pa.types.is_fixed_size_list(a.type) or pa.types.is_list(a.type):
        return _arrow_same(a.flatten(), b.flatten())
    va, vb = a.to_numpy(zero_copy_only=False), b.to_numpy(zero_copy_only=False)
    return va.tobytes() == vb.tobytes() if va.dtype.kind == "f" else np.array_equal(va, vb)


def _meta_entries(yaml_text: str) -> list[str]:
    sections = dict(kbtable._yaml_sections(yaml_text.splitlines()))
    return ["\n".join(e) for e in kbtable._entries(sections["meta"])]


@pytest.mark.parametrize("suffix", [".parquet", ".ecsv", ".hdf5"])
def test_score_round_trip_every_format(tmp_path, run, client, suffix):  # noqa: F811
    src = tmp_path / f"results{suffix}"
    written = write_results(src)
    summary = kbmod.score_results(src, run, occlusion="above:0.6", threshold="0.5",
                                  scorer_options={"client": client, "chunk_size": 128,
                                                  "progress": False, "log": lambda _m: None})
    out = tmp_path / f"results.scored{suffix}"
    assert summary.output == out and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, src.name])  # no work dir
    before, after = Table.read(src), Table.read(out)
    assert after.colnames == before.colnames + ["prob_real", "prob_bogus", "cnn_class",
                                                "occlusion_simple"]
    for name in before.colnames:                       # every original column, row order kept
        assert _same(after[name], before[name]), name
        assert after[name].dtype == before[name].dtype, name
    shapes = dict(before.meta["image_column_shapes"], occlusion_simple=[21, 21])
    assert after.meta["image_column_shapes"] == shapes
    for key in ("wcs", "mjd_mid", "mjd_utc_mid", "mjd_tai_mid"):
        assert _same(after.meta[key], written.meta[key]) and \
            np.asarray(after.meta[key]).tobytes() == np.asarray(written.meta[key]).tobytes()
    info = after.meta["stampbatch"]
    assert info["model"] == "simple" and len(info["model_sha256"]) == 64
    assert info["column"] == "coadd_mean" and info["crop"] == [21, 21]

    ref = hdf5_reference(tmp_path, written, run, client, occlusion="above:0.6")
    p = np.asarray(after["prob_real"])
    assert p.dtype == np.float32 and _same(p, ref.probability)
    assert np.flatnonzero(np.isnan(p)).tolist() == [5, 17] and summary.unscorable == 2
    assert np.isfinite(p[[9, 11]]).all()
    assert _same(after["prob_bogus"], np.float32(1) - ref.probability)
    assert _same(after["cnn_class"], np.nan_to_num(ref.probability, nan=-1) >= 0.5)
    assert summary.positives == int(np.asarray(after["cnn_class"]).sum()) > 20
    occ = np.asarray(after["occlusion_simple"]).reshape(-1, 21, 21)
    assert summary.maps == len(ref.occlusion_index) > 5
    assert _same(occ[ref.occlusion_index], ref.occlusion)
    others = np.setdiff1d(np.arange(len(p)), ref.occlusion_index)
    assert np.isnan(occ[others]).all()
    if suffix == ".parquet":    # the Arrow level: columns, schema metadata, header bytes
        a, b = pq.read_table(src), pq.read_table(out)
        for name in a.column_names:
            assert _arrow_same(b.column(name), a.column(name)), name
        ma, mb = a.schema.metadata, b.schema.metadata
        assert {k: v for k, v in mb.items() if k != b"table_meta_yaml"} == \
            {k: v for k, v in ma.items() if k != b"table_meta_yaml"}
        ya, yb = ma[b"table_meta_yaml"].decode(), mb[b"table_meta_yaml"].decode()
        old_types = dict(kbtable._yaml_sections(ya.splitlines()))["datatype"]
        assert dict(kbtable._yaml_sections(yb.splitlines()))["datatype"][:len(old_types)] == old_types
        kept = [e for e in _meta_entries(ya) if not e.startswith("- image_column_shapes")]
        assert set(kept) <= set(_meta_entries(yb))   # wcs, mjd_*: byte for byte


def test_one_pass_on_threads_over_row_groups_equals_the_hdf5_path(tmp_path, run, client):  # noqa: F811
    """Scored on threads of the process (no Dask), from a file of 50-row row groups in
    64-row chunks: the same probabilities and maps as the HDF5 path."""
    src = tmp_path / "results.parquet"
    written = write_results(src, n=300, nan_rows=(3,))
    pq.write_table(pq.read_table(src), src, row_group_size=50)     # astropy's schema kept
    summary = kbmod.score_results(src, run, occlusion="above:0.6", scorer_options={
        "chunk_size": 64, "progress": False, "log": lambda _m: None})
    assert summary.scheduler.startswith("in-process") and summary.stamps_scored == 300
    ref = hdf5_reference(tmp_path, written, run, client, occlusion="above:0.6")
    scored = pq.read_table(tmp_path / "results.scored.parquet")
    assert _same(scored.column("prob_real").to_numpy(), ref.probability)
    occ = np.stack(scored.column("occlusion_simple").to_numpy(zero_copy_only=False))
    assert len(ref.occlusion_index) > 5 and summary.maps == len(ref.occlusion_index)
    assert _same(occ.reshape(-1, 21, 21)[ref.occlusion_index], ref.occlusion)
    assert Table.read(tmp_path / "results.scored.parquet").meta["wcs"] == written.meta["wcs"]


def test_a_journaled_chunk_is_read_back_not_rescored_unless_force(tmp_path, run):
    """What a rerun does with a killed run's journal: the chunk it holds is taken as is
    (marked here by impossible probabilities), and --force scores everything again."""
    from stampbatch.score import inference
    from stampbatch.score.journal import ChunkResult, Journal

    src = tmp_path / "results.parquet"
    write_results(src, n=200, nan_rows=())
    opts = {"chunk_size": 64, "progress": False, "log": lambda _m: None}
    table = kbmod.open_results(src)
    out = kbmod.output_path(src)
    spec = inference.prepare_model(inference.resolve_model(run), "auto")
    manifest = kbmod._manifest(table, "coadd_mean", spec, score.ScoreOptions(**opts),
                               max(64, table.batch_rows() // 64 * 64))
    journal = Journal(out, spec.name)
    journal.start(manifest)
    marked = np.full(64, 0.25, dtype=np.float32)
    journal.record(64, 128, ChunkResult(marked, np.empty(0, np.int64),
                                        np.empty((0, 21, 21), np.float32)))
    summary = kbmod.score_results(src, run, scorer_options=opts)
    p = pq.read_table(out).column("prob_real").to_numpy()
    assert summary.stamps_scored == 136 and (p[64:128] == 0.25).all()
    assert not (p[:64] == 0.25).any() and not journal.dir.exists()
    journal.start(manifest)
    journal.record(64, 128, ChunkResult(marked, np.empty(0, np.int64),
                                        np.empty((0, 21, 21), np.float32)))
    again = kbmod.score_results(src, run, scorer_options=opts, force=True)
    p = pq.read_table(out).column("prob_real").to_numpy()
    assert again.stamps_scored == 200 and not (p == 0.25).any()


def test_ingest_kbmod_crops_keeps_meta_and_labels(tmp_path):
    src = tmp_path / "results.parquet"
    written = write_results(src, n=90, radius=14)
    out = tmp_path / "train.h5"
    assert cli.main(["ingest", str(out), "--kbmod", str(src), "--label-column", "user_class",
                     "--column", "coadd_median"]) == 0
    info = store.open_store(out)
    assert info.n_stamps == 90 and info.labelled and info.stamp_shape == (21, 21)
    stamps = store.read_stamps(out)
    assert _same(stamps, np.asarray(written["coadd_median"])[:, 4:25, 4:25])
    meta = store.read_meta(out)
    for name in ("uuid", "x", "y", "vx", "vy", "likelihood", "flux", "obs_count"):
        assert _same(meta[name], written[name]), name
    assert "psi_curve" not in meta and "user_class" not in meta
    assert _same(store.read_labels(out), (written["user_class"] == "real").astype(np.int8))


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD = {
    "missing column": (dict(), ["--column", "coadd_weighted"],
                       "has no column 'coadd_weighted' (image columns: coadd_mean, coadd_median, "
                       "coadd_mean_2024-03-01, coadd_mean_2024-03-02)"),
    "flat without shapes": (dict(shapes_meta=False), [],
                            "flattened to 625 values per row and the table meta has no "
                            "'image_column_shapes' entry"),
    "too small": (dict(radius=8), [], "stamps are 17x17, smaller than the model's 21x21"),
    "no uuid": (dict(drop=("uuid",)), [], "has no 'uuid' column, the join key (refused"),
    "duplicate uuid": (dict(n=40, uuids=[f"{i % 39:032x}" for i in range(40)]), [],
                       "1 duplicate uuid(s), e.g. '00000000000000000000000000000000'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_results_tables_one_line_nothing_written(tmp_path, run, capsys, case):
    kwargs, extra, message = BAD[case]
    src = tmp_path / "results.parquet"
    write_results(src, **kwargs)
    listing = sorted(tmp_path.iterdir())
    assert cli.main(["score", str(src), "--model", str(run), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(src) in err and message in err, err
    assert sorted(tmp_path.iterdir()) == listing
    assert cli.main(["ingest", str(tmp_path / "x.h5"), "--kbmod", str(src), *extra]) == 1
    assert message in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == listing


def test_wrong_shape_suffix_truncation_and_existing_output(tmp_path, run, capsys):
    src = tmp_path / "results.parquet"
    t = write_results(src, n=30)
    t.meta["image_column_shapes"]["coadd_mean"] = [21, 21]
    t.write(src, overwrite=True)
    ecsv = tmp_path / "other.ecsv"
    write_results(ecsv, n=30)
    (tmp_path / "other.scored.ecsv").write_text("keep me")
    fits = tmp_path / "results.fits"
    fits.write_bytes(b"SIMPLE  =")
    cut = tmp_path / "cut.parquet"
    write_results(cut, n=30)
    _cut(cut)
    listing = sorted(tmp_path.iterdir())
    score_it = ["score", "--model", str(run)]
    ingest = ["ingest", str(tmp_path / "x.h5"), "--kbmod"]
    cases = [
        (score_it, src, "holds 625 values per row but 'image_column_shapes' says 21x21"),
        (ingest, fits, "unsupported suffix '.fits': a KBMOD Results file is .parquet, .parq, "
                       ".ecsv, .hdf5"),
        (score_it, fits, "results.fits: not an HDF5 file"),   # not a results suffix: a store?
        (score_it, cut, "not a readable Parquet file, truncated?"),
        (ingest, cut, "not a readable Parquet file, truncated?"),
        (score_it, ecsv, "other.scored.ecsv: already exists (pass --force to replace it)"),
    ]
    for command, path, message in cases:
        assert cli.main([*command, str(path)]) != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert sorted(tmp_path.iterdir()) == listing
    assert (tmp_path / "other.scored.ecsv").read_text() == "keep me"


def test_a_stampbatch_store_named_hdf5_stays_on_the_hdf5_path(tmp_path):
    from stampbatch.commands import _kbmod

    store.create_store(tmp_path / "cands.hdf5", gaussian_stamps(8))
    write_results(tmp_path / "results.hdf5", n=20)
    assert not _kbmod.is_results_table(tmp_path / "cands.hdf5")
    assert _kbmod.is_results_table(tmp_path / "results.hdf5")
    assert _kbmod.is_results_table(tmp_path / "results.parq")
    assert not _kbmod.is_results_table(tmp_path / "cands.h5")


def test_threshold_from_the_runs_metrics(tmp_path, run):
    (run / "metrics.json").write_text(json.dumps(
        {"operating_point": {"target_fpr": 0.01, "threshold": 0.83, "fpr": 0.009}}))
    assert kbmod.resolve_threshold("fpr:0.01", run) == (0.83, "metrics.json: FPR 0.01")
    assert kbmod.resolve_threshold("0.3", run) == (0.3, "given")
    (run / "metrics.json").write_text(json.dumps({"thresholds": {"fpr:0.001": 0.97}}))
    assert kbmod.resolve_threshold("fpr:0.001", run)[0] == 0.97
    with pytest.raises(kbmod.KbmodError, match=r"no threshold stored for FPR 0.01 \(has \[0.001\]\)"):
        kbmod.resolve_threshold("fpr:0.01", run)
    (run / "metrics.json").unlink()


def test_killed_run_resumes_to_the_same_table(tmp_path, run, client):  # noqa: F811
    """A real scorer process SIGKILLed mid-table resumes to the same table (~70 s: two scorer
    processes, each importing TensorFlow and ONNX Runtime, and the reference run)."""
    src = tmp_path / "results.parquet"
    written = write_results(src, n=1536, nan_rows=(7,))
    out = tmp_path / "results.scored.parquet"
    journal = tmp_path / "results.scored.parquet.stampbatch-journal"
    args = [sys.executable, "-m", "stampbatch", "score", str(src), "--model", str(run),
            "--chunk-size", "128", "--occlusion", "above:0.9", "--workers", "1", "--quiet"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while len(list(journal.glob("*/chunk-*.npz"))) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(journal.glob("*/chunk-*.npz")))
    assert not out.exists() and 2 <= done < 1536 // 128
    assert len(list(tmp_path.glob(".results.scored.parquet.*.partial.parquet"))) == 1
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "1 rows unscorable" in again.stdout
    ref = hdf5_reference(tmp_path, written, run, client, occlusion="above:0.9")
    scored = pq.read_table(out)
    assert _same(scored.column("prob_real").to_numpy(), ref.probability)
    occ = np.stack(scored.column("occlusion_simple").to_numpy(zero_copy_only=False))
    assert len(ref.occlusion_index) > 10
    assert _same(occ.reshape(-1, 21, 21)[ref.occlusion_index], ref.occlusion)
    assert not journal.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("reference")) \
        == [src.name, out.name]                       # no partial output left by the kill


def _mask_cells(path: Path, written: Table, cells: dict[int, tuple[int, int]]) -> None:
    """Rewrite an ECSV/astropy-HDF5 table with its coadd_mean masked at ``{row: (y, x)}``, as
    astropy writes masked cells (ECSV ``null``, an HDF5 ``.mask`` column); the stored value
    under each mask is 0.0 in ECSV."""
    from astropy.table import MaskedColumn

    data = np.asarray(written["coadd_mean"])
    mask = np.zeros(data.shape, dtype=bool)
    for row, (y, x) in cells.items():
        mask[row, y, x] = True
    written["coadd_mean"] = MaskedColumn(data, mask=mask)
    kwargs = {"path": "__astropy_table__", "serialize_meta": True} if path.suffix == ".hdf5" else {}
    written.write(path, overwrite=True, **kwargs)


@pytest.mark.parametrize("suffix", [".ecsv", ".hdf5"])
def test_masked_cells_are_nan_not_zero_in_ingest_and_score(tmp_path, run, suffix):
    """A masked centre pixel gives NaN (not a score of a 0.0 pixel); a masked pixel off the
    centre is filled with the sky like a NaN; ingest --kbmod stores NaN."""
    src = tmp_path / f"results{suffix}"
    written = write_results(src, n=40, nan_rows=())
    _mask_cells(src, written, {3: (12, 12), 8: (12, 6)})
    out = tmp_path / "cands.h5"
    assert cli.main(["ingest", str(out), "--kbmod", str(src)]) == 0
    stamps = store.read_stamps(out)
    assert np.isnan(stamps[3, 10, 10]) and np.isnan(stamps[8, 10, 4])
    assert np.isnan(stamps).sum() == 3            # and write_results' own NaN in row 11
    summary = kbmod.score_results(src, run, scorer_options={"progress": False,
                                                              "log": lambda _m: None})
    p = np.asarray(Table.read(summary.output)["prob_real"])
    assert np.flatnonzero(np.isnan(p)).tolist() == [3] and summary.unscorable == 1


def _edit_parquet(src: Path, dest: Path, edit) -> Path:
    """A copy of an astropy-written Parquet table changed at the Arrow level (schema
    metadata, the astropy header, kept)."""
    import pyarrow as pa

    t = pq.read_table(src)
    t = edit(t, pa)
    pq.write_table(t.replace_schema_metadata(pq.read_table(src).schema.metadata), dest)
    return dest


def _replace(t, pa, name: str, array):
    return t.set_column(t.column_names.index(name), name, array)


def _coadd_rows(t) -> list:
    return t.column("coadd_mean").to_pylist()


def test_tables_other_tools_write_are_refused_with_a_true_message(tmp_path, run, capsys):
    """Duplicated column names (before any compute), nested list<list<float>> and ragged
    image columns, null rows, null or empty uuids, an already-scored table without --force:
    one line each, saying what is wrong, with nothing left behind (no journal)."""
    src = tmp_path / "src" / "results.parquet"
    src.parent.mkdir()
    write_results(src, n=40)
    work = tmp_path / "work"
    work.mkdir()

    def nested(t, pa):
        rows = [np.asarray(r, np.float32).reshape(25, 25).tolist() for r in _coadd_rows(t)]
        return _replace(t, pa, "coadd_mean", pa.array(rows, pa.list_(pa.list_(pa.float32()))))

    def ragged(t, pa):
        rows = _coadd_rows(t)
        rows[9] = rows[9][:-5]
        return _replace(t, pa, "coadd_mean", pa.array(rows, pa.list_(pa.float32())))

    def null_row(t, pa):
        rows = _coadd_rows(t)
        rows[30] = None
        return _replace(t, pa, "coadd_mean", pa.array(rows, pa.list_(pa.float32(), 625)))

    def null_uuid(t, pa):
        ids = t.column("uuid").to_pylist()
        ids[4] = None
        return _replace(t, pa, "uuid", pa.array(ids, pa.string()))

    def empty_uuid(t, pa):
        ids = t.column("uuid").to_pylist()
        ids[6] = ""
        return _replace(t, pa, "uuid", pa.array(ids, pa.string()))

    cases = {
        "dup.parquet": (lambda t, pa: t.append_column("x", t.column("y")),
                        "column name(s) 'x' appear more than once"),
        "nested.parquet": (nested, "column 'coadd_mean' holds nested lists"),
        "ragged.parquet": (ragged, "column 'coadd_mean' is ragged: row 0 holds 625 values, "
                                   "row 9 620"),
        "null.parquet": (null_row, "column 'coadd_mean' is null in 1 row(s) of this batch, "
                                   "e.g. row 30 (no values)"),
        "null_uuid.parquet": (null_uuid, "1 row(s) have a null or empty uuid, e.g. row 4"),
        "empty_uuid.parquet": (empty_uuid, "1 row(s) have a null or empty uuid, e.g. row 6"),
        "scored.parquet": (lambda t, pa: t.append_column("prob_real", pa.array(
            np.zeros(40, np.float32))), "already has column(s) prob_real (scored before?); "
                                        "pass --force"),
    }
    for name, (edit, _) in cases.items():
        _edit_parquet(src, work / name, edit)
    listing = sorted(work.iterdir())
    for name, (_, message) in cases.items():
        for argv in (["score", str(work / name), "--model", str(run), "--quiet"],
                     ["ingest", str(work / "x.h5"), "--kbmod", str(work / name)]):
            if name == "scored.parquet" and argv[0] == "ingest":
                continue
            assert cli.main(argv) == 1, (name, argv[0])
            err = capsys.readouterr().err
            assert len(err.splitlines()) == 1 and f"{work / name}: {message}" in err, err
            assert sorted(work.iterdir()) == listing, (name, argv[0])  # no journal, no output


def test_fill_values_beyond_float32_and_the_hdf5_writer_are_quiet(tmp_path, run):
    """A 1e300 fill value is a masked pixel (NaN), cast without an overflow warning; the
    astropy-HDF5 output is written at KBMOD's path without astropy's 'path not set' warning."""
    import warnings

    src = tmp_path / "results.ecsv"
    t = write_results(src, n=20, nan_rows=())
    coadd = np.asarray(t["coadd_mean"], np.float64)
    coadd[2, 12, 12] = 1e300                   # the centre: unscorable
    coadd[3, 12, 8] = -1e300                   # off the centre: filled
    t["coadd_mean"] = coadd
    t.write(src, overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = kbmod.open_results(src)
        _, _, stamps = next(kbmod.read_stamp_batches(table, "coadd_mean", (21, 21), 64))
    assert np.isnan(stamps[2, 10, 10]) and np.isnan(stamps[3, 10, 6])
    assert np.isnan(stamps).sum() == 3         # and write_results' own NaN in row 11
    hdf5 = tmp_path / "results.hdf5"
    write_results(hdf5, n=20)
    table = kbmod.open_results(hdf5)
    scored = kbtable.NewColumns(0.5, (21, 21))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with kbmod.ResultsWriter(table, tmp_path / "out.hdf5", scored, {"model": "m"}) as w:
            w.write(None, scored.values(np.full(20, 0.25, np.float32)))
    assert [str(x.message) for x in seen] == []
    assert np.asarray(Table.read(tmp_path / "out.hdf5", path="__astropy_table__")["prob_real"]
                      ).tolist() == [0.25] * 20
