"""The one chunk executor of every scoring path: HDF5 candidate files and KBMOD Results tables.

:mod:`stampbatch.score.run` (chunks of HDF5 files, read by the task itself) and
:mod:`stampbatch.kbmod` (chunks of a streamed table, sent with the task) hand their chunk
tasks to :func:`chunk_executor`. A chunk task is a function of :mod:`stampbatch.score.tasks`
whose last parameter is ``nthreads`` (:func:`~stampbatch.score.tasks.score_chunk`,
:func:`~stampbatch.score.tasks.score_stamps`) and its other arguments. The executor runs them

* on threads of this process, for a local run of modest size (no Dask start-up; chosen by
  :func:`stampbatch.score.cluster.in_process_threads`), each call given ``nthreads``, the threads
  of one local worker, so the results are the same bit for bit as on that worker; or
* on a Dask client: the one given (``ScoreOptions.client``) or one started from the run's
  cluster options (local, ``--scheduler`` or ``--slurm``, :func:`stampbatch.score.cluster.dask_client`),
  each task with one retry, under keys of this run.

Either way the same rules hold, which both callers rely on:

* every model is loaded before the first task (here, or on each worker by a
  :class:`stampbatch.score.plugin.ModelPlugin` registered under a name of this run's own, so
  runs sharing a client do not clash);
* backpressure: the caller keeps at most :meth:`ChunkExecutor.window` tasks in flight,
  ``max(4, 3 x threads)`` with threads those of this process or of the cluster now;
* results come back in completion order (:meth:`ChunkExecutor.next_done`, for callers
  that journal chunks as they finish) or in the caller's own order (``future.done()``,
  ``future.result()``, for callers that write rows in order); a failed task is one line
  naming the input and rows (:func:`chunk_result`);
* on leaving, tasks still out are cancelled, the plugin is unregistered, the threads are
  joined and a cluster started here is closed.

The caller does the journaling (:mod:`stampbatch.score.journal`) and the progress bar.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from stampbatch import fileio
from stampbatch.errors import StampbatchError
from stampbatch.score import cluster, inference
from stampbatch.score.tasks import PLUGIN_NAME

if TYPE_CHECKING:
    from stampbatch.score.inference import ModelSpec
    from stampbatch.score.plan import ScoreOptions


class ChunkExecutor:
    """Chunk tasks in flight, on threads of this process or on a Dask client (see the module)."""

    def __init__(self, where: str, *, threads: int | None = None, client: Any = None,
                 completion_order: bool = False) -> None:
        self.where = where                  # for the summary: in-process / Dask scheduler ...
        self.threads = threads              # threads of this process, None on Dask
        self._client = client
        self.token = uuid.uuid4().hex[:8]       # names this run's keys and plugin
        self._count = itertools.count()
        self._out: dict[int, Any] = {}      # id -> future, submitted and not yet taken back
        self._done: Any = None              # finished futures, when asked in completion order
        self._pool: ThreadPoolExecutor | None = None
        if threads is not None:
            self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stampbatch")
            if completion_order:
                self._done = queue.Queue()
        elif completion_order:
            from distributed import as_completed

            self._done = as_completed()

    def window(self) -> int:
        """Tasks to keep in flight: three per thread (this process's, or the cluster's now)."""
        threads = self.threads if self.threads is not None else cluster.total_threads(self._client)
        return max(4, 3 * threads)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args, nthreads)`` on a thread here, or ``fn(*args)`` on a Dask worker
        (which knows its own threads); a future with ``done()`` and ``result()``."""
        if self._pool is not None:
            fut = self._pool.submit(fn, *args, self.threads)
            if self._done is not None:
                fut.add_done_callback(self._done.put)
        else:
            fut = self._client.submit(fn, *args, key=f"stampbatch-score-{self.token}-"
                                      f"{next(self._count)}", pure=False, retries=1)
            if self._done is not None:
                self._done.add(fut)
        self._out[id(fut)] = fut
        return fut

    def next_done(self) -> Any:
        """The next task to finish (executors made with ``completion_order``)."""
        fut = self._done.get() if self._pool is not None else next(self._done)
        self._out.pop(id(fut), None)
        return fut

    def release(self, fut: Any) -> None:
        """Forget a future whose result was taken (a Dask worker may drop the result)."""
        self._out.pop(id(fut), None)
        with contextlib.suppress(AttributeError):
            fut.release()

    def close(self) -> None:
        """Cancel the tasks still out and join the threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        else:
            pending = [f for f in self._out.values() if not f.done()]
            if pending:
                with contextlib.suppress(Exception):
                    self._client.cancel(pending)
        self._out.clear()


def chunk_result(fut: Any, path: Any, start: int, stop: int,
                 error: type[StampbatchError]) -> Any:
    """A finished chunk task's result, or its failure: a StampbatchError as raised, any
    other exception (worker errors come in every type) as ``error`` in one line."""
    try:
        return fut.result()
    except StampbatchError:
        raise
    except Exception as exc:  # noqa: BLE001 - worker errors come in every type
        raise error(f"{path}: scoring rows {start}..{stop} failed "
                    f"({fileio.one_line(exc)})") from exc


@contextlib.contextmanager
def chunk_executor(options: ScoreOptions, specs: Sequence[ModelSpec], work: int, *,
                   completion_order: bool = False) -> Iterator[ChunkExecutor]:
    """The executor for a run of ``work`` model evaluations with ``specs`` (see the module).

    Raises what :func:`stampbatch.score.cluster.dask_client` raises when no cluster starts;
    nothing was submitted then.
    """
    specs = sorted(specs, key=lambda s: s.name)     # the same load order everywhere
    threads = None if options.client is not None else cluster.in_process_threads(
        options.cluster, work)
    if threads is not None:
        per_call = max(1, fileio.cores() // threads)
        for spec in specs:                          # as the worker plugin does
            inference.cached_predictor(spec, per_call)
        ex = ChunkExecutor(f"in-process ({threads} thread(s))", threads=threads,
                           completion_order=completion_order)
        try:
            yield ex
        finally:
            ex.close()
        return
    with contextlib.ExitStack() as stack:
        client, where = options.client, "given Dask client"
        if client is None:
            client, where = stack.enter_context(cluster.dask_client(options.cluster,
                                                                     options.log))
        yield from _on_dask(client, where, options, specs, completion_order)


def _on_dask(client: Any, where: str, options: ScoreOptions, specs: Sequence[ModelSpec],
             completion_order: bool) -> Iterator[ChunkExecutor]:
    from stampbatch.score.plugin import ModelPlugin

    ex = ChunkExecutor(where, client=client, completion_order=completion_order)
    plugin_name = f"{PLUGIN_NAME}-{ex.token}"     # runs sharing a client do not clash
    local = options.client is None and options.cluster.scheduler is None \
        and options.cluster.slurm is None          # its workers print on our console
    client.register_plugin(ModelPlugin(specs, quiet=local), name=plugin_name)
    try:
        yield ex
    finally:
        ex.close()
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(plugin_name)
