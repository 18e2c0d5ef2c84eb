"""The demo's job file and its stage-time summary (the demo itself runs as `make demo`)."""

from __future__ import annotations

import numpy as np
from conftest import write_labelled_store

from stampbatch import demo
from stampbatch.slurm import launch
from stampbatch.train import models, rundir


def test_demo_spec_trains_every_architecture_longest_first_with_resnet50_on_a_subset(tmp_path):
    """Every registered architecture is in the demo's array; resnet50, the costly one, starts
    first and learns from a subset of the training split; the others from all of it."""
    data = write_labelled_store(tmp_path / "train.h5", n=200)
    spec = launch.apply_options(launch.load_spec(demo.DEMO_SPEC), data=data, runs=tmp_path / "runs")
    plans = {p.arch: p.config for p in launch.resolve(spec)}
    assert sorted(plans) == sorted(models.architecture_names())
    assert spec.architectures[0] == "resnet50"
    assert plans["resnet50"].train_stamps > 0 and plans["resnet50"].epochs < plans["vgg6"].epochs
    assert all(plans[a].train_stamps == 0 for a in plans if a != "resnet50")


def test_stage_table_sums_the_stages_in_order():
    stages = demo.Stages()
    stages.add("simulate", 10.0)
    stages.add("train", 100.25)
    stages.add("simulate", 5.0)
    lines = stages.table().splitlines()
    assert [line.split()[0] for line in lines] == ["simulate", "train", "total"]
    assert lines[0].endswith("15.0 s") and lines[1].endswith("100.2 s")
    assert lines[2].endswith("115.2 s")


def test_costly_occlusion_threshold_aims_at_the_asked_number_of_maps(tmp_path):
    """P is set so that about K of N noise candidates pass, judged by the run's test negatives
    (sources and stamps the run could not score do not count); never below 0.5."""
    rng = np.random.default_rng(0)
    noise = rng.permutation(np.arange(1000) / 1000.0)             # 0.000 ... 0.999
    probability = np.r_[noise, np.ones(200), np.full(50, np.nan)].astype(np.float32)
    labels = np.r_[np.zeros(1000), np.ones(200), np.zeros(50)].astype(np.int8)
    np.savez(tmp_path / rundir.PREDICTIONS_FILE, rows=np.arange(1250), labels=labels,
             probability=probability, finite=np.isfinite(probability))
    assert demo.costly_occlusion(tmp_path, 100_000, 500) == "above:0.995"
    above = float(demo.costly_occlusion(tmp_path, 100_000, 500).split(":")[1])
    assert (noise >= above).mean() * 100_000 == 500
    assert demo.costly_occlusion(tmp_path, 1_000, 900) == "above:0.5"


def test_costly_occlusion_gives_no_maps_when_the_noise_ties_at_the_top(tmp_path):
    """An overconfident model (a fifth of the noise at P = 1.0) cannot be thresholded to a
    few maps: none are made rather than thousands."""
    probability = np.r_[np.linspace(0, 0.9, 800), np.ones(200)].astype(np.float32)
    np.savez(tmp_path / rundir.PREDICTIONS_FILE, rows=np.arange(1000), labels=np.zeros(1000, np.int8),
             probability=probability, finite=np.ones(1000, bool))
    assert demo.costly_occlusion(tmp_path, 100_000, 24) == "none"
