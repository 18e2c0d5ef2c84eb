"""benchmarks/bench_quality.py: the default-trained model is set beside the in-distribution
reference of each test set it has one for."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_quality  # noqa: E402


def _row(arch: str, train_set: str, aucs: dict[str, float]) -> dict:
    return {"architecture": arch, "train_set": train_set,
            "tests": {name: {"roc_auc": auc} for name, auc in aucs.items()}}


def test_each_reference_is_compared_on_its_own_test_set_only():
    results = [_row("vgg6", "default", {"shifted": 0.9650, "neighbour_free": 0.9929, "default": 0.9843}),
               _row("vgg6", "shifted", {"shifted": 0.9681, "neighbour_free": 0.9929, "default": 0.9843}),
               _row("vgg6", "neighbour_free", {"shifted": 0.8233, "neighbour_free": 0.9965, "default": 0.86}),
               _row("simple", "shifted", {"shifted": 0.95, "neighbour_free": 0.99, "default": 0.97})]
    lines = bench_quality.generalisation_gaps(results)
    assert lines == [
        "vgg6 on test_shifted: trained on its own configuration 0.9681, on the defaults 0.9650 "
        "(gap +0.0031)",
        "vgg6 on test_neighbour_free: trained on its own configuration 0.9965, on the defaults "
        "0.9929 (gap +0.0036)",
    ]  # simple has no default-trained run to compare with: no line
