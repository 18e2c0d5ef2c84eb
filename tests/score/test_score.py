"""The Dask scorer on real files, a real tiny trained model, real Dask (and the real Slurm)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, gaussian_stamps

from stampbatch import store
from stampbatch.errors import StampbatchError, UsageError
from stampbatch.score import cluster, inference, tasks
from stampbatch.score import run as score
from stampbatch.score.occlusion import occlusion_maps
from stampbatch.score.tasks import ChunkTask, OcclusionMode
from stampbatch.train import preprocess

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- fixtures


def _train(run_dir: Path, arch: str, seed: int) -> Path:
    """A real (tiny, briefly trained) model saved as a run directory."""
    import keras

    from stampbatch.train import models

    n = 1200
    labels = (np.arange(n) % 2).astype(np.int8)
    x = preprocess.normalize(gaussian_stamps(n, seed=seed, sources=labels == 1, amplitude=5.0))
    keras.utils.set_random_seed(seed)
    model = models.build_model(arch)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    model.fit(x[..., None], keras.utils.to_categorical(labels, 2), epochs=3, batch_size=16,
              verbose=0)
    run_dir.mkdir(parents=True)
    model.save(run_dir / "model.keras")
    (run_dir / "config.toml").write_text(f'architecture = "{arch}"\n')
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {"vgg6": _train(root / "vgg6", "vgg6", 0),
            "simple": _train(root / "simple", "simple", 1)}


@pytest.fixture(scope="module")
def keras_models(runs):
    return {name: inference.load_keras(run / "model.keras") for name, run in runs.items()}


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                           dashboard_address=None)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def candidates(path: Path, n: int, *, seed: int = 11, chunk_rows: int = 256,
               shape=(21, 21)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    stamps = gaussian_stamps(n, seed=seed, sources=rng.random(n) < 0.4, amplitude=5.0,
                             shape=shape)
    store.create_store(path, stamps, chunk_rows=chunk_rows)
    return stamps


def expected_p(model, stamps: np.ndarray) -> np.ndarray:
    return model.predict(preprocess.normalize(stamps)[..., None], verbose=0,
                         batch_size=512)[:, 1]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def quiet(_message: str) -> None:
    pass


def opts(**kwargs) -> score.ScoreOptions:
    """Options of a quiet run (no progress line, no log)."""
    return score.ScoreOptions(**{"progress": False, "log": quiet, **kwargs})


def run_cli(*args: str, env_extra: dict | None = None, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="1",
               **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "stampbatch", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


# --------------------------------------------------------------------------- results


def test_probabilities_equal_model_predict_and_provenance(tmp_path, runs, keras_models, client):
    path = tmp_path / "cand.h5"
    stamps = candidates(path, 1500)
    summary = score.score_files([path], [runs["vgg6"]], opts(chunk_size=500, client=client))
    s = store.read_scores(path, "vgg6")
    p = expected_p(keras_models["vgg6"], stamps)
    assert np.ptp(p) > 0.05                      # a model whose outputs vary
    np.testing.assert_allclose(s.probability, p, rtol=0, atol=1e-5)
    assert len(s.occlusion_index) == 0 and s.occlusion.shape == (0, 21, 21)
    attrs = s.attrs
    assert attrs["model_sha256"] == sha(runs["vgg6"] / "model.keras")
    assert attrs["architecture"] == "vgg6"
    assert attrs["occlusion_mode"] == "none" and attrs["n_unscorable"] == 0
    assert attrs["chunk_rows"] == 512            # 500 rounded to the file's 256-row chunks
    assert attrs["backend"] == "onnx" and attrs["stampbatch_version"]
    assert attrs["scored_at"].endswith("Z")                # UTC, fileio.utc_now()
    # the stamps are untouched and the journal and lock are gone
    np.testing.assert_array_equal(store.read_stamps(path), stamps)
    assert not list(tmp_path.glob("*.stampbatch-journal")) and not list(tmp_path.glob("*.lock"))
    m = summary.models["vgg6"]
    assert summary.stamps_scored == 1500 and m.stamps == 1500
    assert m.above_half == int((s.probability >= 0.5).sum())


def test_above_threshold_selects_rows_and_maps_match(tmp_path, runs, keras_models, client):
    path = tmp_path / "cand.h5"
    stamps = candidates(path, 700, seed=12)
    p = expected_p(keras_models["vgg6"], stamps)
    cut = float(np.quantile(p, 0.9))
    score.score_files([path], [runs["vgg6"]], opts(occlusion=f"above:{cut}", chunk_size=256, client=client))
    s = store.read_scores(path, "vgg6")
    np.testing.assert_array_equal(s.occlusion_index, np.flatnonzero(s.probability >= cut))
    assert 40 < len(s.occlusion_index) < 100
    assert s.attrs["occlusion_mode"] == f"above:{cut:g}" and s.attrs["occlusion_patch"] == 5
    model = keras_models["vgg6"]
    rows = s.occlusion_index[:6]
    ref = occlusion_maps(preprocess.normalize(stamps[rows]),
                         lambda x: model.predict(x, verbose=0, batch_size=2048)[:, 1])
    np.testing.assert_allclose(s.occlusion[:6], ref, rtol=0, atol=1e-5)
    got = store.read_occlusion(path, "vgg6", [int(rows[2])])
    np.testing.assert_array_equal(got[int(rows[2])], s.occlusion[2])


def test_many_files_many_models_globs_and_list_files(tmp_path, runs, keras_models, client):
    """Three files and several models through globs and @list files in one run (~20 s: every
    model scores every file on the shared Dask client)."""
    a, b, c = (tmp_path / f"{x}.h5" for x in "abc")
    sa, sb, sc = candidates(a, 200, seed=1), candidates(b, 300, seed=2), candidates(c, 60, seed=3)
    (tmp_path / "list.txt").write_text("# survey night 2\nc.h5\n")
    summary = score.score_files([str(tmp_path / "[ab].h5"), f"@{tmp_path / 'list.txt'}"],
                                [runs["vgg6"], runs["simple"] / "model.keras"],
                                    opts(occlusion="above:0.5", patch=7, chunk_size=256, client=client))
    assert sorted(summary.files) == [a, b, c]
    for path, stamps in ((a, sa), (b, sb), (c, sc)):
        assert store.list_scores(path) == ["simple", "vgg6"]
        for name in ("vgg6", "simple"):
            s = store.read_scores(path, name)
            np.testing.assert_allclose(s.probability, expected_p(keras_models[name], stamps),
                                       atol=1e-5)
            np.testing.assert_array_equal(s.occlusion_index, np.flatnonzero(s.probability >= .5))
            assert s.attrs["occlusion_patch"] == 7 and s.occlusion.shape[1:] == (21, 21)
    assert summary.models["simple"].stamps == 560
    assert summary.models["vgg6"].maps == sum(
        len(store.read_scores(p, "vgg6").occlusion_index) for p in (a, b, c)) > 100


def test_each_worker_loads_each_model_once(tmp_path, runs, client):
    path = tmp_path / "cand.h5"
    candidates(path, 2560, chunk_rows=128)
    for _ in range(2):
        score.score_files([path], [runs["vgg6"], runs["simple"]], opts(chunk_size=128, client=client, force=True))
    counts = client.run(inference.load_counts)
    shas = {sha(runs[n] / "model.keras") for n in ("vgg6", "simple")}
    assert counts and all(set(c) >= shas for c in counts.values())
    assert all(c[s] == 1 for c in counts.values() for s in shas)   # 2 runs x 20 chunks, 1 load


def test_in_process_threads_match_dask_workers_bit_for_bit(tmp_path, runs, keras_models,
                                                            client, monkeypatch):
    """Small runs score on threads of the driver: the same probabilities and maps, bit for
    bit, as on a Dask worker of the same shape (1 x 2 threads here); two models, maps; the
    run's last chunks cut into parts that the threads share."""
    stamps = candidates(tmp_path / "a.h5", 3000, seed=31, chunk_rows=256)
    store.create_store(tmp_path / "b.h5", stamps, chunk_rows=256)
    cut = f"{np.quantile(expected_p(keras_models['vgg6'], stamps), 0.97):.6f}"
    models = [runs["vgg6"], runs["simple"]]
    ranges = []
    monkeypatch.setattr(score, "score_chunk", lambda task, n=None: ranges.append(
        (task.start, task.stop)) or tasks.score_chunk(task, n))
    ours = score.score_files([tmp_path / "a.h5"], models,
                             opts(occlusion=f"above:{cut}", chunk_size=256,
                                  cluster=cluster.ClusterOptions(threads_per_worker=2)))
    monkeypatch.undo()
    theirs = score.score_files([tmp_path / "b.h5"], models,
                               opts(occlusion=f"above:{cut}", chunk_size=256, client=client))
    assert ours.scheduler == "in-process (2 thread(s))" and theirs.scheduler == "given Dask client"
    assert sorted(ranges)[-4:] == [(2560, 2688), (2688, 2816), (2816, 2944), (2944, 3000)]
    assert sorted(ranges)[:2] == [(0, 256), (256, 512)]
    for name in ("vgg6", "simple"):
        a, b = store.read_scores(tmp_path / "a.h5", name), store.read_scores(tmp_path / "b.h5", name)
        np.testing.assert_array_equal(a.probability, b.probability)
        np.testing.assert_array_equal(a.occlusion_index, b.occlusion_index)
        np.testing.assert_array_equal(a.occlusion, b.occlusion)
    assert len(store.read_scores(tmp_path / "a.h5", "vgg6").occlusion_index) > 50


def test_an_in_process_chunk_failure_is_one_line_and_skip_bad_goes_on(tmp_path, runs):
    """A chunk that cannot be decompressed, scored on the driver's threads: the same one-line
    error as from a Dask worker; with skip_bad the other file is still scored."""
    import h5py

    bad, good = tmp_path / "bad.h5", tmp_path / "good.h5"
    store.create_store(bad, gaussian_stamps(2000, seed=3), chunk_rows=128, compression="gzip")
    candidates(good, 512)
    with h5py.File(bad, "r") as h5:
        info = h5["stamps"].id.get_chunk_info_by_coord((384, 0, 0))
    with open(bad, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * info.size)
    with pytest.raises(score.ScoreError, match=r"bad.h5: scoring rows 384..512 failed"):
        score.score_files([bad], [runs["vgg6"]], opts(chunk_size=128))
    summary = score.score_files([bad, good], [runs["vgg6"]], opts(chunk_size=128,
                                                                  skip_bad=True))
    assert summary.scheduler.startswith("in-process")
    assert [p.name for p, _ in summary.skipped] == ["bad.h5"] and summary.files == [good]
    assert store.read_scores(good, "vgg6").probability.shape == (512,)
    assert store.list_scores(bad) == []


def test_in_process_is_chosen_only_for_small_local_runs():
    auto = cluster.ClusterOptions(threads_per_worker=2)
    assert cluster.in_process_threads(auto, cluster.IN_PROCESS_MAX_WORK) == 2
    assert cluster.in_process_threads(auto, cluster.IN_PROCESS_MAX_WORK + 1) is None
    for asked in (cluster.ClusterOptions(n_workers=1), cluster.ClusterOptions(dashboard=":0"),
                  cluster.ClusterOptions(scheduler="tcp://x:1"),
                  cluster.ClusterOptions(in_process=False)):
        assert cluster.in_process_threads(asked, 10) is None
    forced = cluster.ClusterOptions(in_process=True, threads_per_worker=3)
    assert cluster.in_process_threads(forced, 10**9) == 3


def test_tf_and_onnx_backends_agree(tmp_path, runs, client):
    """~30-60 s on 2 cores: vgg6 occlusion maps of every stamp above 0.5 (441 patches each),
    computed twice, once per backend, so the two can be compared map for map."""
    path = tmp_path / "cand.h5"
    candidates(path, 300, seed=5)
    for backend in ("tf", "onnx"):
        score.score_files([path], [runs["vgg6"]],
                          opts(name=f"vgg6_{backend}", backend=backend, occlusion="above:0.5",
                               chunk_size=256, client=client))
    t, o = store.read_scores(path, "vgg6_tf"), store.read_scores(path, "vgg6_onnx")
    assert t.attrs["backend"] == "tf" and o.attrs["backend"] == "onnx"
    np.testing.assert_allclose(t.probability, o.probability, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(t.occlusion_index, o.occlusion_index)
    assert len(o.occlusion_index) > 50
    np.testing.assert_allclose(t.occlusion, o.occlusion, rtol=0, atol=1e-5)


def test_masked_stamps_are_filled_or_flagged_and_the_rest_scored(tmp_path, runs, keras_models,
                                                                   client):
    """~20 s on 2 cores: occlusion maps of all 200 stamps (vgg6, 441 patches each): a masked
    pixel must be filled in the maps too, not only in the probability."""
    path = tmp_path / "cand.h5"
    rng = np.random.default_rng(4)
    stamps = gaussian_stamps(200, seed=4, sources=rng.random(200) < 0.5, amplitude=5.0)
    bad = np.array([77, 120, 150, 180])
    stamps[3, 4, 4] = np.nan            # off the centre: filled with the stamp's sky, scored
    stamps[40, :, 0] = -3.4e38          # a masked edge column: filled, scored
    stamps[77, 10, 10] = np.inf         # the centre: no fill stands in for it
    stamps[120, :9] = np.nan            # over half the stamp (285 pixels), centre intact
    stamps[120, 9:, :8] = np.nan
    stamps[150] = np.nan
    stamps[180] = 0.0                   # an all-zero co-add (no data): no noise to measure
    store.create_store(path, stamps, chunk_rows=64)
    summary = score.score_files([path], [runs["vgg6"]], opts(occlusion="all", client=client))
    s = store.read_scores(path, "vgg6")
    assert np.flatnonzero(np.isnan(s.probability)).tolist() == bad.tolist()
    good = np.setdiff1d(np.arange(200), bad)
    np.testing.assert_array_equal(s.occlusion_index, good)
    np.testing.assert_allclose(s.probability[good],
                               expected_p(keras_models["vgg6"], stamps[good]), atol=1e-5)
    filled = stamps[[3, 40]].copy()
    even = (np.indices((21, 21)).sum(axis=0) % 2) == 0
    for f in filled:   # masked pixels take the others' quartiles, in a checkerboard
        hole = ~(np.abs(f) < 1e30)
        q25, q75 = np.percentile(f[~hole], [25, 75])
        f[hole] = np.where(even, q25, q75)[hole]
    np.testing.assert_allclose(s.probability[[3, 40]], expected_p(keras_models["vgg6"], filled),
                               atol=1e-5)
    assert np.isfinite(s.occlusion[np.searchsorted(good, [3, 40])]).all()
    assert s.attrs["n_unscorable"] == 4 and summary.unscorable == 4


def test_rescoring_is_a_no_op_and_another_model_under_the_same_name_is_refused(
        tmp_path, runs, client):
    path = tmp_path / "cand.h5"
    candidates(path, 300)
    score.score_files([path], [runs["vgg6"]], opts(client=client))
    first = store.read_scores(path, "vgg6")
    messages: list[str] = []
    again = score.score_files([path], [runs["vgg6"]],
                              score.ScoreOptions(client=client, progress=False, log=messages.append))
    assert again.stamps_scored == 0 and again.up_to_date == [(path, "vgg6")]
    assert "already scored" in messages[0] and "--force" in messages[0]
    assert store.read_scores(path, "vgg6").attrs["scored_at"] == first.attrs["scored_at"]
    other = tmp_path / "vgg6.keras"          # a different model file named vgg6
    shutil.copy(runs["simple"] / "model.keras", other)
    with pytest.raises(score.ScoreError, match="different model file"):
        score.score_files([path], [other], opts(client=client))
    score.score_files([path], [other], opts(force=True, client=client))
    assert store.read_scores(path, "vgg6").attrs["model_sha256"] == sha(other)


def test_side_file_for_a_read_only_candidate(tmp_path, runs, keras_models, client):
    path = tmp_path / "cand.h5"
    stamps = candidates(path, 300)
    os.chmod(path, 0o444)          # root could still write: the mode bits are what we honour
    before = sha(path)
    with pytest.raises(score.ScoreError, match="read-only.*--out"):
        score.score_files([path], [runs["vgg6"]], opts(client=client))
    assert not list(tmp_path.glob("*.stampbatch-journal"))
    out = tmp_path / "scores"
    summary = score.score_files([path], [runs["vgg6"]], opts(out_dir=out, client=client))
    side = out / "cand.scores.h5"
    assert summary.targets == [side] and sha(path) == before
    np.testing.assert_allclose(store.read_scores(side, "vgg6").probability,
                               expected_p(keras_models["vgg6"], stamps), atol=1e-5)
    assert store.open_store(side).is_score_file


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")
def test_candidate_on_a_read_only_mount(tmp_path, runs, client):
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    candidates(src / "cand.h5", 100)
    subprocess.run(["mount", "--bind", str(src), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        with pytest.raises(score.ScoreError, match="read-only file system"):
            score.score_files([ro / "cand.h5"], [runs["vgg6"]], opts(client=client))
        score.score_files([ro / "cand.h5"], [runs["vgg6"]], opts(out_dir=tmp_path / "out", client=client))
        assert store.list_scores(tmp_path / "out" / "cand.scores.h5") == ["vgg6"]
    finally:
        subprocess.run(["umount", str(ro)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")
def test_onnx_cache_beside_the_model_or_in_the_user_cache(tmp_path, runs, monkeypatch):
    monkeypatch.setenv("STAMPBATCH_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "models"
    src.mkdir()
    shutil.copy(runs["simple"] / "model.keras", src / "m.keras")
    spec = inference.prepare_model(inference.resolve_model(src / "m.keras"), "onnx")
    digest = sha(src / "m.keras")
    assert spec.onnx_path == str(src / f"m.{digest[:12]}.onnx")          # beside the model
    again = inference.prepare_model(inference.resolve_model(src / "m.keras"), "auto")
    assert again == spec                                                 # cached, verified
    ro = tmp_path / "ro"
    ro.mkdir()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(src / "m.keras", fresh / "m.keras")
    subprocess.run(["mount", "--bind", str(fresh), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        spec_ro = inference.prepare_model(inference.resolve_model(ro / "m.keras"), "onnx")
        assert spec_ro.onnx_path == str(tmp_path / "cache" / "onnx" / f"{digest}.onnx")
        x = inference.probe_stamps((21, 21))
        np.testing.assert_allclose(inference.load_predictor(spec_ro)(x),
                                   inference.load_predictor(spec)(x), atol=1e-6)
    finally:
        subprocess.run(["umount", str(ro)], check=False)


# --------------------------------------------------------------------------- bad input


def test_bad_models_are_refused_with_one_line(tmp_path, runs):
    pkl = tmp_path / "model.keras"
    pkl.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(inference.ModelError, match="pickle"):
        inference.resolve_model(pkl)
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(inference.ModelError, match="not a Keras model file"):
        inference.resolve_model(junk)
    zipped = tmp_path / "other.keras"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(inference.ModelError, match="no config.json"):
        inference.resolve_model(zipped)
    with pytest.raises(inference.ModelError, match="not a Keras model file"):
        inference.resolve_model(REPO / "pyproject.toml")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(inference.ModelError, match="without model.keras"):
        inference.resolve_model(tmp_path / "empty_run")
    with pytest.raises(inference.ModelError, match="no such"):
        inference.resolve_model(tmp_path / "missing")
    # a run directory whose model.keras is a pickle is refused the same way
    with pytest.raises(inference.ModelError, match="pickle"):
        inference.resolve_model(tmp_path)


def test_a_logit_model_is_refused(tmp_path):
    import keras

    model = keras.Sequential([keras.Input((21, 21, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(2)])       # no softmax: logits
    path = tmp_path / "logits.keras"
    model.save(path)
    with pytest.raises(inference.ModelError, match="softmax"):
        inference.prepare_model(inference.resolve_model(path))


def test_stamp_shape_mismatch_and_missing_files(tmp_path, runs, client):
    good = tmp_path / "good.h5"
    small = tmp_path / "small.h5"
    candidates(good, 200)
    candidates(small, 50, shape=(15, 15))
    with pytest.raises(score.ScoreError, match=r"15x15 but model vgg6 .* takes 21x21"):
        score.score_files([small], [runs["vgg6"]], opts(client=client))
    missing = tmp_path / "night3.h5"
    with pytest.raises(StampbatchError, match="night3.h5: no such file"):
        score.score_files([good, missing], [runs["vgg6"]], opts(client=client))
    assert store.list_scores(good) == []             # nothing scored
    summary = score.score_files([good, missing, small], [runs["vgg6"]], opts(skip_bad=True, client=client))
    assert summary.files == [good] and store.list_scores(good) == ["vgg6"]
    assert [p for p, _ in summary.skipped] == [missing, small]
    assert "no such file" in summary.skipped[0][1] and "15x15" in summary.skipped[1][1]
    with pytest.raises(UsageError, match="one model only"):
        score.score_files([good], [runs["vgg6"], runs["simple"]], score.ScoreOptions(name="x"))
    with pytest.raises(UsageError, match="between 0 and 1"):
        score.score_files([good], [runs["vgg6"]], score.ScoreOptions(occlusion="above:1.5"))


def test_occlusion_mode_and_candidate_expansion(tmp_path):
    assert str(score.OcclusionMode.parse("above:0.5")) == "above:0.5"
    assert score.OcclusionMode.parse("all").kind == "all"
    with pytest.raises(UsageError):
        score.OcclusionMode.parse("top:3")
    for name in ("a.h5", "b.h5"):
        (tmp_path / name).touch()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "list.txt").write_text("../a.h5\n\n# comment\n/abs/missing.h5\n")
    got = score.expand_candidates([str(tmp_path / "*.h5"), f"@{tmp_path / 'sub' / 'list.txt'}",
                                   str(tmp_path / "none*.h5")])
    assert [os.path.abspath(p) for p in got] == [str(tmp_path / "a.h5"), str(tmp_path / "b.h5"),
                                                 "/abs/missing.h5", str(tmp_path / "none*.h5")]
    with pytest.raises(UsageError, match="no such list file"):
        score.expand_candidates(["@" + str(tmp_path / "nope.txt")])
    assert [cluster.walltime_seconds(t) for t in ("01:00:00", "30:00", "1-02:30", "2-00:00:10", "30",
                                                     "2-3")] \
        == [3600, 1800, 95400, 172810, 1800, 183600]
    from stampbatch import cli

    args = cli.build_parser().parse_args(["score", "c.h5", "--model", "m", "--slurm",
                                          "--walltime", "30"])
    assert cluster._hms(cluster.walltime_seconds(args.walltime)) == "0-00:30:00"   # as Slurm
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["score", "c.h5", "--model", "m", "--walltime", "1:xx"])


def test_journal_with_other_settings_is_refused_unless_force(tmp_path, runs, client):
    path = tmp_path / "cand.h5"
    candidates(path, 600)
    journal = score.Journal(path, "vgg6")
    journal.dir.mkdir(parents=True)
    (journal.dir / "manifest.json").write_text('{"format": 1, "chunk_rows": 999}')
    with pytest.raises(score.ScoreError, match="unfinished run.*--force"):
        score.score_files([path], [runs["vgg6"]], opts(client=client))
    score.score_files([path], [runs["vgg6"]], opts(force=True, client=client))
    assert store.list_scores(path) == ["vgg6"] and not journal.dir.exists()


def test_a_crash_while_writing_scores_is_repaired_from_the_journal(
        tmp_path, runs, client, monkeypatch):
    """Dying after /scores was half written (before commit) leaves it incomplete; a rerun
    rewrites it from the journal, which is deleted only after the commit."""
    ref, path = tmp_path / "ref.h5", tmp_path / "cand.h5"
    stamps = candidates(ref, 500)
    store.create_store(path, stamps, chunk_rows=256)
    score.score_files([ref], [runs["vgg6"]], opts(occlusion="above:0.5", chunk_size=256, client=client))

    def die(self, attrs, **kwargs):
        raise KeyboardInterrupt      # as abrupt as it gets in-process: nothing is committed

    monkeypatch.setattr(store.ScoreWriter, "commit", die)
    with pytest.raises(KeyboardInterrupt):
        score.score_files([path], [runs["vgg6"]], opts(occlusion="above:0.5", chunk_size=256, client=client))
    monkeypatch.undo()
    assert store.list_scores(path) == [] and store.score_status(path, "vgg6") is None
    journal = score.Journal(path, "vgg6")
    assert sorted(journal.finished_chunks()) == [0, 256]
    assert not (tmp_path / "cand.h5.stampbatch.lock").exists()       # released on the way out
    summary = score.score_files([path], [runs["vgg6"]], opts(occlusion="above:0.5", chunk_size=256, client=client))
    assert summary.stamps_scored == 0 and summary.targets == [path]   # nothing recomputed
    a, b = store.read_scores(ref, "vgg6"), store.read_scores(path, "vgg6")
    np.testing.assert_array_equal(a.probability, b.probability)
    np.testing.assert_array_equal(a.occlusion_index, b.occlusion_index)
    np.testing.assert_array_equal(a.occlusion, b.occlusion)
    assert not journal.dir.exists()


def _crash_at_commit(monkeypatch, *args, **kwargs) -> None:
    """A run that journals everything and dies before any scores are committed."""
    def die(self, attrs, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(store.ScoreWriter, "commit", die)
    with pytest.raises(KeyboardInterrupt):
        score.score_files(*args, **kwargs)
    monkeypatch.undo()


def test_a_corrupt_journal_chunk_is_recomputed_and_a_symlink_shares_the_journal(
        tmp_path, runs, client, monkeypatch):
    ref, path = tmp_path / "ref.h5", tmp_path / "cand.h5"
    stamps = candidates(ref, 500)
    store.create_store(path, stamps, chunk_rows=256)
    (tmp_path / "alias.h5").symlink_to(path)
    score.score_files([ref], [runs["vgg6"]], opts(chunk_size=256, client=client))
    _crash_at_commit(monkeypatch, [tmp_path / "alias.h5"], [runs["vgg6"]],
                     opts(chunk_size=256, client=client))
    journal = score.Journal(path, "vgg6")                 # the real path's journal
    assert journal.finished_chunks() == {0: 256, 256: 500}
    chunk = journal.dir / "chunk-000000000256-000000000500.npz"
    chunk.write_bytes(chunk.read_bytes()[:200])            # truncated, as by a full disk
    messages: list[str] = []
    summary = score.score_files([path], [runs["vgg6"]],
                                opts(chunk_size=256, client=client, log=messages.append))
    assert summary.stamps_scored == 244                    # only the damaged chunk again
    assert [m for m in messages if "unreadable journal chunk" in m and "recomputing" in m]
    np.testing.assert_array_equal(store.read_scores(path, "vgg6").probability,
                                  store.read_scores(ref, "vgg6").probability)


def test_precision_is_fp32_recorded_with_the_scores_and_a_resume_never_mixes_precisions(
        tmp_path, runs, client, monkeypatch):
    """Only FP32 is offered (no reduced precision qualified, BENCHMARKS.md): auto is FP32,
    others are refused in one line; the precision goes into the scores' attributes and the
    journal's identity, so a journal of another precision is discarded, never resumed."""
    with pytest.raises(UsageError, match="precision 'int8' is not offered: only fp32"):
        opts(precision="int8")
    assert opts().precision == "fp32" and opts(precision="auto").precision == "fp32"
    path = tmp_path / "cand.h5"
    candidates(path, 500, seed=5)
    _crash_at_commit(monkeypatch, [path], [runs["vgg6"]], opts(chunk_size=256, client=client))
    journal = score.Journal(path, "vgg6")
    manifest = json.loads((journal.dir / "manifest.json").read_text())
    assert manifest["precision"] == "fp32" and journal.finished_chunks()
    manifest["precision"] = "bf16"                          # a run in another precision
    (journal.dir / "manifest.json").write_text(json.dumps(manifest))
    messages: list[str] = []
    summary = score.score_files([path], [runs["vgg6"]],
                                opts(chunk_size=256, client=client, log=messages.append))
    assert summary.stamps_scored == 500                    # all of it again, none reused
    assert [m for m in messages if "discarding the journal of vgg6 (precision" in m]
    assert store.read_scores(path, "vgg6").attrs["precision"] == "fp32"
    # a journal written before the option existed (no precision) was FP32: it resumes
    path2 = tmp_path / "cand2.h5"
    candidates(path2, 500, seed=5)
    _crash_at_commit(monkeypatch, [path2], [runs["vgg6"]], opts(chunk_size=256, client=client))
    journal = score.Journal(path2, "vgg6")
    manifest = json.loads((journal.dir / "manifest.json").read_text())
    del manifest["precision"]
    (journal.dir / "manifest.json").write_text(json.dumps(manifest))
    done = sum(hi - lo for lo, hi in journal.finished_chunks().items())
    summary = score.score_files([path2], [runs["vgg6"]], opts(chunk_size=256, client=client))
    assert 0 < done and summary.stamps_scored == 500 - done
    np.testing.assert_array_equal(store.read_scores(path2, "vgg6").probability,
                                  store.read_scores(path, "vgg6").probability)


def test_journals_of_other_stamps_are_discarded_and_force_always_restarts(
        tmp_path, runs, client, monkeypatch):
    path, ref = tmp_path / "cand.h5", tmp_path / "ref.h5"
    candidates(path, 500, seed=3)
    _crash_at_commit(monkeypatch, [path], [runs["vgg6"]], opts(chunk_size=256, client=client))
    other = candidates(ref, 500, seed=4)
    with h5py.File(path, "r+") as h5:                      # regenerated in place: same inode
        h5["stamps"][:] = other
    messages: list[str] = []
    summary = score.score_files([path], [runs["vgg6"]],
                                opts(chunk_size=256, client=client, log=messages.append))
    assert summary.stamps_scored == 500
    assert [m for m in messages if "discarding the journal of vgg6 (source_identity" in m]
    score.score_files([ref], [runs["vgg6"]], opts(chunk_size=256, client=client))
    np.testing.assert_array_equal(store.read_scores(path, "vgg6").probability,
                                  store.read_scores(ref, "vgg6").probability)
    # a journal of this very run is still thrown away by --force
    _crash_at_commit(monkeypatch, [path], [runs["vgg6"]],
                     opts(chunk_size=256, client=client, force=True))
    assert score.Journal(path, "vgg6").finished_chunks()
    summary = score.score_files([path], [runs["vgg6"]],
                                opts(chunk_size=256, client=client, force=True))
    assert summary.stamps_scored == 500


def test_a_replaced_candidate_file_is_rescored_and_plots_refuse_other_stamps(
        tmp_path, runs, client, capsys):
    """~30 s on 2 cores: two full scorings with occlusion maps of all 300 stamps (vgg6): the
    first file's and its replacement's."""
    from stampbatch import cli

    path, out = tmp_path / "cand.h5", tmp_path / "out"
    candidates(path, 300, seed=1)
    score.score_files([path], [runs["vgg6"]], opts(out_dir=out, occlusion="all", client=client))
    side = out / "cand.scores.h5"
    first = store.read_scores(side, "vgg6").probability
    kept = tmp_path / "first.h5"
    shutil.copy(path, kept)
    path.unlink()
    candidates(path, 300, seed=2)                          # other stamps, the same count
    messages: list[str] = []
    summary = score.score_files([path], [runs["vgg6"]], opts(out_dir=out, occlusion="all",
                                                             client=client, log=messages.append))
    assert summary.stamps_scored == 300 and [m for m in messages if "other stamps" in m]
    assert not np.array_equal(store.read_scores(side, "vgg6").probability, first)
    fig = tmp_path / "x.png"
    args = ["plot-occlusion", str(side), "--model", "vgg6", "--top", "2", "--out", str(fig)]
    assert cli.main([*args, "--candidates", str(kept)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds other stamps than the ones /scores/vgg6" in err
    assert not fig.exists()
    assert cli.main([*args, "--candidates", str(path)]) == 0 and fig.exists()


def test_a_file_open_for_writing_elsewhere_is_refused_before_any_compute(tmp_path, runs):
    path = tmp_path / "cand.h5"
    candidates(path, 100)
    code = (f"import h5py, sys\nf = h5py.File({str(path)!r}, 'r+')\nprint('open', flush=True)\n"
            "sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, HDF5_USE_FILE_LOCKING="FALSE"))
    try:
        assert holder.stdout.readline().strip() == "open"
        t0 = time.monotonic()
        with pytest.raises(score.ScoreError,
                           match=rf"open for writing by another process \(pid {holder.pid}\)"):
            score.score_files([path], [runs["vgg6"]], opts())     # no cluster was started
        assert time.monotonic() - t0 < 20
    finally:
        holder.communicate("")


def test_a_model_replaced_mid_run_is_refused_and_a_broken_onnx_cache_rebuilt(tmp_path, runs):
    from stampbatch import fileio

    model = tmp_path / "m.keras"
    shutil.copy(runs["vgg6"] / "model.keras", model)
    src = inference.resolve_model(model)
    spec = inference.prepare_model(src, "auto")
    assert spec.backend == "onnx" and spec.onnx_sha256 == fileio.sha256_file(spec.onnx_path)
    Path(spec.onnx_path).write_bytes(b"not an onnx file")  # a broken cache entry
    again = inference.prepare_model(src, "auto")
    assert again.backend == "onnx" and Path(again.onnx_path).read_bytes() != b"not an onnx file"
    inference.load_predictor(again)
    tf_spec = inference.prepare_model(src, "tf")
    inference.load_predictor(tf_spec)
    shutil.copy(runs["simple"] / "model.keras", model)    # replaced after preparation
    with pytest.raises(inference.ModelError, match="changed during the run"):
        inference.load_predictor(tf_spec)


def test_a_worker_failure_is_one_line_without_dask_tracebacks(tmp_path, runs):
    """A chunk that cannot be decompressed fails on the worker: the CLI prints our one line,
    no "Compute Failed" block, no traceback, no dashboard port warning."""
    import h5py

    path = tmp_path / "cand.h5"
    stamps = gaussian_stamps(2000, seed=3, sources=np.arange(2000) % 2 == 0, amplitude=5.0)
    store.create_store(path, stamps, chunk_rows=128, compression="gzip")
    with h5py.File(path, "r") as h5:     # a chunk the planner's stamps digest does not read
        info = h5["stamps"].id.get_chunk_info_by_coord((384, 0, 0))
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * info.size)
    proc = run_cli("score", str(path), "--model", str(runs["vgg6"]), "--chunk-size", "128",
                   "--workers", "1", "--quiet")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    ours = [ln for ln in err.splitlines() if ln.startswith("stampbatch score: error: ")]
    assert len(ours) == 1 and "scoring rows 384..512 failed" in ours[0], err
    assert "Compute Failed" not in err and "Traceback" not in err and "8787" not in err


def _tmpfs(where: Path, size: str) -> None:
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                   check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
@pytest.mark.parametrize("free_kib", [200, 700])
def test_disk_full_keeps_stamps_and_journal_then_resumes(tmp_path, runs, client, free_kib):
    """A real full disk (tmpfs) while journaling (200 KiB free: the journal needs ~0.4 MB) or
    before writing /scores (700 KiB free: the journal fits, /scores would not)."""
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    stamps = candidates(ref_dir / "cand.h5", 600, chunk_rows=128)
    size_kib = os.path.getsize(ref_dir / "cand.h5") // 1024 + free_kib
    score.score_files([ref_dir / "cand.h5"], [runs["vgg6"]], opts(occlusion="above:0.5", client=client, chunk_size=128))
    ref = store.read_scores(ref_dir / "cand.h5", "vgg6")
    disk = tmp_path / "disk"
    _tmpfs(disk, f"{size_kib}k")
    try:
        path = disk / "cand.h5"
        store.create_store(path, stamps, chunk_rows=128)
        with pytest.raises(score.ScoreError, match="disk full") as info:
            score.score_files([path], [runs["vgg6"]], opts(occlusion="above:0.5", client=client, chunk_size=128))
        assert "\n" not in str(info.value) and "rerun" in str(info.value)
        np.testing.assert_array_equal(store.read_stamps(path), stamps)   # stamps intact
        journal = score.Journal(path, "vgg6")
        done = journal.finished_chunks()
        assert done, "some chunks were journaled before the disk filled"
        assert (len(done) < 5) == (free_kib < 500)
        for lo, hi in done.items():
            np.testing.assert_array_equal(journal.load(lo, hi).probability,
                                          ref.probability[lo:hi])
        assert store.list_scores(path) == []
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        score.score_files([path], [runs["vgg6"]], opts(occlusion="above:0.5", client=client, chunk_size=128))
        got = store.read_scores(path, "vgg6")
        np.testing.assert_array_equal(got.probability, ref.probability)
        np.testing.assert_array_equal(got.occlusion_index, ref.occlusion_index)
        np.testing.assert_array_equal(got.occlusion, ref.occlusion)
        np.testing.assert_array_equal(store.read_stamps(path), stamps)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# --------------------------------------------------------------------------- processes


def _wait_for(condition, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"scorer exited early ({proc.returncode}): {err[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def test_sigkill_resume_is_identical_and_a_second_scorer_is_refused(
        tmp_path, runs, keras_models, client):
    """Kill -9 the scorer mid-run; a second scorer meanwhile is refused; the rerun matches."""
    n, rows = 8192, 64
    ref_path = tmp_path / "ref.h5"
    stamps = candidates(ref_path, n, seed=21, chunk_rows=rows)
    path = tmp_path / "cand.h5"
    store.create_store(path, stamps, chunk_rows=rows)
    cut = f"{np.quantile(expected_p(keras_models['vgg6'], stamps), 0.98):.6f}"  # ~160 maps
    occ = f"above:{cut}"
    args = ["score", str(path), "--model", str(runs["vgg6"]), "--chunk-size", str(rows),
            "--occlusion", occ, "--quiet"]
    proc = run_cli(*args)
    journal = score.Journal(path, "vgg6")
    try:
        _wait_for(lambda: len(journal.finished_chunks()) >= 4, 240, proc)
        # a second scorer on the same file, from this process, is refused at once
        with pytest.raises(score.ScoreError,
                           match=rf"being scored by another stampbatch process \(pid {proc.pid}\)"):
            score.score_files([path], [runs["vgg6"]], opts(client=client))
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    n_done = len(journal.finished_chunks())
    assert 4 <= n_done < n // rows, n_done
    assert store.list_scores(path) == []
    np.testing.assert_array_equal(store.read_stamps(path), stamps)
    # the uninterrupted reference, then the resumed run (a new process)
    score.score_files([ref_path], [runs["vgg6"]], opts(chunk_size=rows, occlusion=occ, client=client))
    again = run_cli(*args)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"scored {n - rows * n_done:,} stamps" in out
    ref, got = store.read_scores(ref_path, "vgg6"), store.read_scores(path, "vgg6")
    np.testing.assert_array_equal(got.probability, ref.probability)
    np.testing.assert_array_equal(got.occlusion_index, ref.occlusion_index)
    np.testing.assert_array_equal(got.occlusion, ref.occlusion)
    assert len(ref.occlusion_index) > 0
    assert not journal.dir.exists()


def test_cli_summary_scheduler_address_inspect_and_plot(tmp_path, runs, client):
    """~30 s on 2 cores: the real command line on a running Dask scheduler, with vgg6
    occlusion maps of all 500 stamps (the plots need maps to draw)."""
    from stampbatch import cli

    path = tmp_path / "cand.h5"
    candidates(path, 500)
    code = cli.main(["score", str(path), "--model", str(runs["vgg6"]), "--occlusion", "all",
                     "--scheduler", client.scheduler.address, "--quiet"])
    assert code == 0
    s = store.read_scores(path, "vgg6")
    assert len(s.occlusion_index) == 500
    fig = tmp_path / "occ.png"
    assert cli.main(["plot-occlusion", str(path), "--model", "vgg6", "--top", "3",
                     "--out", str(fig)]) == 0
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig2 = tmp_path / "occ2.png"
    assert cli.main(["plot-occlusion", str(path), "--model", "vgg6", "--rows", "4,2",
                     "--out", str(fig2)]) == 0 and fig2.stat().st_size > 1000


def test_cli_output_and_errors(tmp_path, runs, capsys):
    from stampbatch import cli

    path = tmp_path / "cand.h5"
    candidates(path, 300)
    assert cli.main(["score", str(path), "--model", str(runs["vgg6"]), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "scored 300 stamps from 1 file(s)" in out and "in-process (" in out
    assert "vgg6 (onnx, sha256" in out and "with P(source) >= 0.5" in out
    assert cli.main(["score", str(path), "--model", str(tmp_path / "nope.keras")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.keras: no such model file" in err
    assert cli.main(["score", str(path), "--model", str(runs["vgg6"]), "--gpus", "1"]) == 2
    assert "--gpus need --slurm" in capsys.readouterr().err
    assert cli.main(["inspect", str(path)]) == 0
    assert "scores/vgg6: 300 scored" in capsys.readouterr().out


@pytest.mark.slurm
def test_scoring_on_slurm_workers(tmp_path, runs, keras_models, slurm_cluster):
    """~35 s: a real Dask worker started as a Slurm job (dask-jobqueue), TensorFlow loaded
    in it, 1,200 stamps scored there."""
    path = tmp_path / "cand.h5"
    stamps = candidates(path, 1200)
    logs = tmp_path / "slurm-logs"
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    summary = score.score_files(
        [path], [runs["vgg6"]],
        opts(occlusion="above:0.5", chunk_size=256, cluster=score.ClusterOptions(
            slurm=score.SlurmOptions(workers=1, gpus=1, cores=1, memory="2GB",
                                     partition=slurm_cluster, walltime="00:10:00",
                                     log_directory=str(logs), start_timeout=120))))
    assert summary.scheduler.startswith("Slurm (1 job(s) x 1 cores")
    # a GPU was asked for: ONNX Runtime only if it has CUDA, else TensorFlow (which can use it)
    want = "onnx" if inference._ort_has_cuda() else "tf"
    assert summary.models["vgg6"].backend == want
    s = store.read_scores(path, "vgg6")
    np.testing.assert_allclose(s.probability, expected_p(keras_models["vgg6"], stamps),
                               atol=1e-5)
    np.testing.assert_array_equal(s.occlusion_index, np.flatnonzero(s.probability >= 0.5))
    # the worker ran as a Slurm job that asked for one GPU (accounting lags: poll)
    assert list(logs.glob("stampbatch-score-*.err"))
    end, tres = time.monotonic() + 30, ""
    while time.monotonic() < end and "gres/gpu=1" not in tres:
        tres = subprocess.run(["sacct", "-n", "-X", "--name", "stampbatch-score", "-S", started,
                               "-o", "ReqTRES%80"], capture_output=True, text=True).stdout
        time.sleep(1)
    assert "gres/gpu=1" in tres


def test_tail_parts_cover_a_chunk_on_whole_onnx_calls():
    """The last chunks of an in-process run are cut for the threads to share: the parts are
    contiguous, cover the chunk exactly, and start on the ONNX Runtime call grid."""
    task = ChunkTask("x.h5", 4096, 8192, (), OcclusionMode(), 5)
    parts = score._parts(task, 4)
    assert [(p.start, p.stop) for p in parts] == [(4096, 5120), (5120, 6144), (6144, 7168),
                                                 (7168, 8192)]
    short = score._parts(ChunkTask("x.h5", 98304, 100000, (), OcclusionMode(), 5), 4)
    assert [(p.start, p.stop) for p in short] == [(98304, 98816), (98816, 99328),
                                                  (99328, 99840), (99840, 100000)]
    assert all((p.start - task.start) % score.PART_ROWS == 0 for p in parts + short)
    assert [(p.start, p.stop) for p in score._parts(ChunkTask("x.h5", 0, 100, (), OcclusionMode(),
                                                              5), 4)] == [(0, 100)]


# --------------------------------------------------------------------------- ownership (issue 26)


def test_a_copy_scored_with_another_model_never_changes_the_original(tmp_path, runs):
    """cp cand.h5 copy.h5; score copy.h5 with another model: the copy gets a scores folder of
    its own (keeping what it showed); the original and its folder are byte-identical."""
    path, copy = tmp_path / "cand.h5", tmp_path / "copy.h5"
    candidates(path, 300)
    score.score_files([path], [runs["vgg6"]], opts())
    shutil.copy(path, copy)
    before = {p: sha(p) for p in [path, *sorted((tmp_path / "cand.h5.scores").rglob("*.h5"))]}
    messages: list[str] = []
    summary = score.score_files([copy], [runs["simple"], runs["vgg6"]], opts(log=messages.append))
    assert summary.up_to_date == [(copy, "vgg6")]               # carried over, not recomputed
    assert any("scores folder of its own" in m for m in messages)
    assert store.list_scores(path) == ["vgg6"]
    assert store.list_scores(copy) == ["simple", "vgg6"]
    assert {p: sha(p) for p in before} == before
    np.testing.assert_array_equal(store.read_scores(copy, "vgg6").probability,
                                  store.read_scores(path, "vgg6").probability)


def test_a_hard_linked_file_is_left_untouched_and_scored_beside_it(tmp_path, runs):
    path = tmp_path / "cand.h5"
    stamps = np.random.default_rng(5).normal(size=(200, 21, 21)).astype(np.float32)
    with h5py.File(path, "w") as h5:                  # another program's file: no /scores link
        h5.create_dataset("stamps", data=stamps, chunks=(100, 21, 21))
        h5.attrs["stampbatch_schema"] = 1
        h5.attrs["stamp_shape"] = np.array([21, 21])
    os.link(path, tmp_path / "alias.h5")
    before, inode = sha(path), os.stat(path).st_ino
    messages: list[str] = []
    summary = score.score_files([path], [runs["vgg6"]], opts(log=messages.append))
    side = tmp_path / "cand.scores.h5"
    assert summary.targets == [side] and store.list_scores(side) == ["vgg6"]
    assert sha(path) == before and os.stat(path).st_ino == inode and os.stat(path).st_nlink == 2
    assert [m for m in messages if "hard links" in m and "left untouched" in m and str(side) in m]


def test_a_read_only_scores_folder_is_refused_before_any_compute(tmp_path, runs):
    path = tmp_path / "cand.h5"
    candidates(path, 300)
    folder = store.scores_dir(path)
    os.chmod(folder, 0o555)             # root could still write: the mode bits are what we honour
    try:
        with pytest.raises(score.ScoreError, match=f"scores folder {folder} .*read-only.*--out"):
            score.score_files([path], [runs["vgg6"]], opts())
    finally:
        os.chmod(folder, 0o755)
    assert not list(tmp_path.glob("*.stampbatch-journal/*"))


def test_appended_stamps_and_a_broken_index_are_recovered_by_force(tmp_path, runs):
    path = tmp_path / "cand.h5"
    candidates(path, 300)
    score.score_files([path], [runs["vgg6"]], opts())
    with h5py.File(path, "r+") as h5:                       # stamps appended to a scored file
        h5["stamps"].resize(400, axis=0)
        h5["stamps"][300:] = h5["stamps"][:100]
    messages: list[str] = []
    summary = score.score_files([path], [runs["vgg6"]], opts(log=messages.append))
    assert summary.stamps_scored == 400 and [m for m in messages if "other stamps" in m]
    assert store.read_scores(path, "vgg6").probability.shape == (400,)
    index = store.scores_dir(path) / "index.h5"
    index.write_bytes(b"garbage")
    with pytest.raises(score.ScoreError, match="index.h5 is unreadable.*score --force"):
        score.score_files([path], [runs["simple"]], opts())
    score.score_files([path], [runs["simple"]], opts(force=True))
    assert store.list_scores(path) == ["simple", "vgg6"]
