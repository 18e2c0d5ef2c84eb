"""The work a Dask worker does: score one chunk of a candidate file with every model.

A :class:`ChunkTask` names rows [start, stop) of one file; :func:`score_chunk` reads them,
normalises them, scores them with each model (loaded once per worker process by
:class:`stampbatch.score.plugin.ModelPlugin` and :func:`stampbatch.score.inference.cached_predictor`)
and computes occlusion maps for the rows an :class:`OcclusionMode` selects. Importing
this module does not import Dask.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from stampbatch import fileio, store
from stampbatch.errors import UsageError
from stampbatch.score import inference
from stampbatch.score.inference import ModelSpec
from stampbatch.score.journal import ChunkResult
from stampbatch.score.occlusion import occlusion_maps
from stampbatch.train.preprocess import normalize_with_mask

PLUGIN_NAME = "stampbatch-models"
MAP_EVALUATIONS = 289   # an occlusion map: a 5x5 patch at 17 x 17 positions of 21x21


@dataclass(frozen=True)
class OcclusionMode:
    """Which rows get an occlusion map: ``none``, ``all`` or ``above:P`` (P(source) >= P)."""

    kind: str = "none"
    threshold: float | None = None

    @classmethod
    def parse(cls, text: str) -> OcclusionMode:
        text = str(text).strip()
        if text in ("none", "all"):
            return cls(text)
        if text.startswith("above:"):
            try:
                value = float(text.split(":", 1)[1])
            except ValueError:
                value = float("nan")
            if not 0.0 <= value <= 1.0:
                raise UsageError(f"occlusion {text!r}: the threshold must be a probability "
                                 "between 0 and 1 (e.g. above:0.5)")
            return cls("above", value)
        raise UsageError(f"occlusion {text!r}: choose none, all or above:P (e.g. above:0.5)")

    def __str__(self) -> str:
        return self.kind if self.kind != "above" else f"above:{self.threshold:g}"

    def evaluations(self, n_stamps: int) -> int:
        """Model evaluations to score ``n_stamps`` with one model, for sizing a run: a map
        counts as MAP_EVALUATIONS; ``above:P`` maps are not known in advance (counted 0)."""
        return n_stamps * (1 + (MAP_EVALUATIONS if self.kind == "all" else 0))

    def select(self, probability: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Boolean mask of the rows that get a map (never the unscorable ones)."""
        if self.kind == "none":
            return np.zeros(len(probability), dtype=bool)
        if self.kind == "all":
            return valid.copy()
        return valid & (probability >= self.threshold)


@dataclass(frozen=True)
class ChunkTask:
    """Rows [start, stop) of one candidate file, to score with ``models``."""

    path: str
    start: int
    stop: int
    models: tuple[ModelSpec, ...]
    occlusion: OcclusionMode
    patch: int


def _task_threads(nthreads: int | None = None) -> tuple[int, int]:
    """(inference threads per call, occlusion pipelines per task) in this process.

    ``nthreads`` tasks run at once (given when the tasks run on threads of the driver; read
    from the Dask worker otherwise), so each call of the model gets cores // nthreads
    intra-op threads. Occlusion maps are split over ``nthreads`` pipelines inside the task
    too, so a chunk alone still uses every core; when all tasks compute maps this
    oversubscribes by at most nthreads x (measured cost on 2 cores: 3 %).
    """
    if nthreads is None:
        if "distributed" not in sys.modules:    # not on a Dask worker: never import Dask
            return 1, 1
        try:
            from distributed import get_worker

            nthreads = get_worker().state.nthreads
        except ValueError:
            return 1, 1
    nthreads = max(1, int(nthreads))
    return max(1, fileio.cores() // nthreads), nthreads


def score_chunk(task: ChunkTask, nthreads: int | None = None) -> dict[str, ChunkResult]:
    """Read, normalise and score one chunk with every model of the task.

    Runs on a Dask worker, or on one of ``nthreads`` threads of the driver (in-process runs).
    """
    return score_stamps(store.read_stamps(task.path, task.start, task.stop), task.start,
                        task.models, task.occlusion, task.patch, nthreads)


def score_stamps(stamps: np.ndarray, start: int, models: tuple[ModelSpec, ...],
                 occlusion: OcclusionMode, patch: int,
                 nthreads: int | None = None) -> dict[str, ChunkResult]:
    """Normalise and score rows ``start …`` of some input, already in memory, with every
    model: P(source) (NaN for unscorable stamps) and the occlusion maps ``occlusion`` selects.

    What a chunk task does after reading its rows; also the task of inputs that are streamed
    rather than read by row range (KBMOD Results tables).
    """
    normalised, valid = normalize_with_mask(stamps)
    threads, pipelines = _task_threads(nthreads)
    h, w = normalised.shape[1:]
    results: dict[str, ChunkResult] = {}
    for spec in models:
        predict = inference.cached_predictor(spec, threads)
        p = predict(normalised)
        p[~valid] = np.nan
        rows = np.flatnonzero(occlusion.select(p, valid))
        maps = (occlusion_maps(normalised[rows], predict, patch, threads=pipelines)
                if len(rows) else np.empty((0, h, w), dtype=np.float32))
        results[spec.name] = ChunkResult(p, (rows + start).astype(np.int64), maps)
    return results
