"""The demo's job file and its stage-time summary (the demo itself runs as `make demo`)."""

from __future__ import annotations

from conftest import write_labelled_store

from stampbatch import demo, launch, models


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
