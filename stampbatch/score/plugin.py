"""The Dask worker plugin that loads every model once per worker process.

Kept apart from :mod:`stampbatch.score.tasks` because it imports ``distributed`` (most of a
second of start-up) and only the driver of a run needs it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from distributed.diagnostics.plugin import WorkerPlugin

from stampbatch import fileio
from stampbatch.score import inference
from stampbatch.score.inference import ModelSpec
from stampbatch.score.tasks import PLUGIN_NAME


class ModelPlugin(WorkerPlugin):
    """Loads every model once when a worker starts (or joins later), before its first task."""

    name = PLUGIN_NAME
    idempotent = False

    def __init__(self, specs: Sequence[ModelSpec], *, quiet: bool = False) -> None:
        self.specs = tuple(specs)
        self.quiet = quiet

    async def setup(self, worker) -> None:  # noqa: ANN001 - distributed.Worker
        if self.quiet:   # workers sharing our console: a failed task is the driver's one line
            logging.getLogger("distributed.worker").setLevel(logging.CRITICAL)
        loop = asyncio.get_running_loop()
        threads = max(1, fileio.cores() // max(1, worker.state.nthreads))
        for spec in self.specs:   # off the event loop: a TensorFlow load takes seconds
            await loop.run_in_executor(None, inference.cached_predictor, spec, threads)
