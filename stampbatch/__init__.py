"""stampbatch: train CNNs on astronomical image stamps and score survey-scale candidate sets.

The public API, for notebooks and scripts (the README's "Python API" section runs it end to
end)::

    import stampbatch as sb

    sb.write_simulated("train.h5", 2000, config=sb.SimConfig(), seed=1)    # a labelled store
    info = sb.open_store("train.h5")                  # StoreInfo: n_stamps, meta_columns, ...
    stamps, labels = sb.read_stamps("train.h5", 0, 100), sb.read_labels("train.h5")
    metrics = sb.train_run("train.h5", "simple", "runs/simple", sb.TrainConfig(epochs=1))
    summary = sb.score_files(["cands.h5"], ["runs/simple"], sb.ScoreOptions(progress=False))
    scores = sb.read_scores("cands.h5", "simple")    # Scores: probability, occlusion maps
    result = sb.evaluate_run("runs/simple", "test.h5")

Every expected failure raises a :class:`StampbatchError` (``StoreError`` for a bad store)
whose message is one line naming the file and the problem.

The names are resolved on first use (PEP 562 ``__getattr__``): ``import stampbatch`` loads
neither TensorFlow, Dask nor h5py, and each name imports only the module that defines it
(none of which imports TensorFlow or Dask at import time). The modules are named by string
in ``_EXPORTS`` rather than imported, so this package's ``__init__`` imports no module of
its own (every module imports ``__version__`` from here: a real import would be a cycle);
type checkers read the ``TYPE_CHECKING`` imports below, which must name the same modules
(``tests/test_api.py`` checks both).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module it is imported from (the module's own public name).
_EXPORTS: dict[str, str] = {
    # stores: open, read
    "StoreInfo": "stampbatch.store",
    "open_store": "stampbatch.store",
    "read_stamps": "stampbatch.store",
    "read_labels": "stampbatch.store",
    "read_meta": "stampbatch.store",
    # simulate
    "SimConfig": "stampbatch.sim.simulate",
    "write_simulated": "stampbatch.sim.simulate",
    # train
    "TrainConfig": "stampbatch.train.loop",
    "train_run": "stampbatch.train.loop",
    # score
    "ClusterOptions": "stampbatch.score.run",
    "ScoreOptions": "stampbatch.score.run",
    "ScoreSummary": "stampbatch.score.run",
    "score_files": "stampbatch.score.run",
    # read scores
    "Scores": "stampbatch.store",
    "list_scores": "stampbatch.store",
    "read_scores": "stampbatch.store",
    # evaluate
    "evaluate_run": "stampbatch.report.evaluate",
    # errors
    "StampbatchError": "stampbatch.errors",
    "StoreError": "stampbatch.store",
}

if TYPE_CHECKING:
    from stampbatch.errors import StampbatchError
    from stampbatch.report.evaluate import evaluate_run
    from stampbatch.score.run import ClusterOptions, ScoreOptions, ScoreSummary, score_files
    from stampbatch.sim.simulate import SimConfig, write_simulated
    from stampbatch.store import (
        Scores,
        StoreError,
        StoreInfo,
        list_scores,
        open_store,
        read_labels,
        read_meta,
        read_scores,
        read_stamps,
    )
    from stampbatch.train.loop import TrainConfig, train_run

__all__ = [
    "ClusterOptions",
    "ScoreOptions",
    "ScoreSummary",
    "Scores",
    "SimConfig",
    "StampbatchError",
    "StoreError",
    "StoreInfo",
    "TrainConfig",
    "__version__",
    "evaluate_run",
    "list_scores",
    "open_store",
    "read_labels",
    "read_meta",
    "read_scores",
    "read_stamps",
    "score_files",
    "train_run",
    "write_simulated",
]


def __getattr__(name: str) -> Any:
    """Import the module that defines a public name on its first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stampbatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value    # later lookups find it without calling __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
