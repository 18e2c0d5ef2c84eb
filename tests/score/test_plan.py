"""ScoreOptions, the one typed set of options of HDF5 and KBMOD scoring: checked when made,
unknown names refused (the scoring runs themselves are in test_score and test_kbmod)."""

from __future__ import annotations

import pytest

from stampbatch import kbmod
from stampbatch.errors import UsageError
from stampbatch.score.cluster import ClusterOptions
from stampbatch.score.plan import ScoreOptions
from stampbatch.score.tasks import OcclusionMode


@pytest.mark.parametrize("fields, message", [
    (dict(backend="onnxx"), "unknown backend 'onnxx'; choose from auto, onnx, tf"),
    (dict(chunk_size=64.5), "chunk size must be positive, got 64.5"),
    (dict(chunk_size="64"), "chunk size must be positive, got '64'"),
    (dict(patch=True), "occlusion patch must be a positive number of pixels, got True"),
    (dict(name=3), "name 3: give a model name (text) or None"),
    (dict(cluster={"n_workers": 2}), "cluster {'n_workers': 2}: expected a ClusterOptions"),
    (dict(log="stderr"), "log 'stderr': expected a function of one message"),
])
def test_invalid_values_are_refused_when_the_options_are_made(fields, message):
    with pytest.raises(UsageError) as err:
        ScoreOptions(**fields)
    assert str(err.value) == message


def test_with_fields_checks_the_new_values_and_refuses_unknown_names():
    base = ScoreOptions(chunk_size=128, progress=False)
    changed = base.with_fields({"occlusion": "above:0.6", "backend": "tf"})
    assert changed.occ == OcclusionMode("above", 0.6) and changed.backend == "tf"
    assert changed.chunk_size == 128 and changed.progress is False and base.backend == "auto"
    with pytest.raises(UsageError, match=r"^unknown scoring option\(s\) chunk_sise; the "
                                         r"options are name, occlusion, patch, chunk_size, "):
        base.with_fields({"chunk_sise": 64})
    with pytest.raises(UsageError, match="occlusion patch must be a positive"):
        base.with_fields({"patch": 0})
    assert base.with_fields({}) == base and isinstance(base.cluster, ClusterOptions)


def test_kbmod_scoring_takes_the_same_options_and_refuses_unknown_or_twice_given_ones(tmp_path):
    """Refused before any file is opened (the paths here do not exist)."""
    src, run = tmp_path / "results.parquet", tmp_path / "run"
    with pytest.raises(UsageError, match=r"^unknown scoring option\(s\) chunk_sise;"):
        kbmod.score_results(src, run, scorer_options={"chunk_sise": 64})
    with pytest.raises(UsageError, match=r"^scoring option occlusion given twice"):
        kbmod.score_results(src, run, occlusion="all", scorer_options={"occlusion": "none"})
    with pytest.raises(UsageError, match=r"^unknown backend 'onnxx'"):
        kbmod.score_results(src, run, ScoreOptions(), backend="onnxx")
    with pytest.raises(kbmod.KbmodError, match="results.parquet"):   # typed options: on to the file
        kbmod.score_results(src, run, ScoreOptions(chunk_size=64, progress=False))
