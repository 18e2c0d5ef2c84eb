"""The one chunk executor of HDF5 and KBMOD scoring: real threads of this process and a real
Dask LocalCluster (the HDF5 and KBMOD round trips through it are in test_score/test_kbmod)."""

from __future__ import annotations

import threading
import time

import pytest
from test_score import client  # noqa: F401 - the module's Dask client fixture

from stampbatch.errors import StampbatchError, UsageError
from stampbatch.score.cluster import ClusterOptions
from stampbatch.score.executor import chunk_executor, chunk_result
from stampbatch.score.journal import ScoreError
from stampbatch.score.plan import ScoreOptions


def opts(**kwargs) -> ScoreOptions:
    return ScoreOptions(**{"progress": False, "log": lambda _m: None, **kwargs})


def echo(value, nthreads=None):
    return value, nthreads


def wait_for(gate, value, nthreads=None):
    gate.wait(30)
    return value, nthreads


def sleep_then(seconds, nthreads=None):
    time.sleep(seconds)
    return seconds


def broken(nthreads=None):
    raise ValueError("no good\n  second line")


def refused(nthreads=None):
    raise UsageError("x.h5: a refusal of our own")


def test_threads_here_get_their_count_and_finish_in_completion_order():
    options = opts(cluster=ClusterOptions(threads_per_worker=2))
    gate = threading.Event()
    with chunk_executor(options, [], 100, completion_order=True) as ex:
        assert (ex.where, ex.threads, ex.window()) == ("in-process (2 thread(s))", 2, 6)
        slow = ex.submit(wait_for, gate, "slow")
        fast = ex.submit(echo, "fast")
        assert ex.next_done() is fast          # not the order of submission
        gate.set()
        assert ex.next_done() is slow
        assert (fast.result(), slow.result()) == (("fast", 2), ("slow", 2))


def test_one_thread_keeps_four_in_flight_and_leaving_cancels_the_queued_tasks():
    options = opts(cluster=ClusterOptions(threads_per_worker=1))
    gate = threading.Event()
    with chunk_executor(options, [], 100) as ex:
        assert ex.threads == 1 and ex.window() == 4
        first = ex.submit(wait_for, gate, 0)
        queued = [ex.submit(echo, i) for i in range(1, 6)]
        threading.Timer(0.5, gate.set).start()     # leaving waits for the running task only
    assert first.result() == (0, 1)
    assert all(f.cancelled() for f in queued)


def test_a_failed_task_is_one_line_naming_the_input_and_rows():
    with chunk_executor(opts(), [], 100) as ex:
        fut, ours = ex.submit(broken), ex.submit(refused)
        with pytest.raises(ScoreError) as err:
            chunk_result(fut, "/data/c.h5", 256, 512, ScoreError)
        assert str(err.value) == "/data/c.h5: scoring rows 256..512 failed (no good second line)"
        with pytest.raises(UsageError, match=r"^x\.h5: a refusal of our own$"):
            chunk_result(ours, "/data/c.h5", 0, 256, ScoreError)   # ours: as raised
        assert chunk_result(ex.submit(echo, 7), "c.h5", 0, 1, StampbatchError) == (7, ex.threads)


def test_on_a_given_client_tasks_run_under_run_keys_with_the_plugin_until_the_end(client):  # noqa: F811
    """On Dask the worker knows its threads (none passed); the models' plugin has a name of
    this run while it lasts; a task still out at the end is cancelled."""
    plugins = lambda: client.run(lambda dask_worker: sorted(dask_worker.plugins))  # noqa: E731
    with chunk_executor(opts(client=client), [], 10**9, completion_order=True) as ex:
        assert (ex.where, ex.threads, ex.window()) == ("given Dask client", None, 6)
        name = f"stampbatch-models-{ex.token}"
        assert all(name in p for p in plugins().values())
        done = ex.submit(echo, "x")
        assert ex.next_done() is done and done.result() == ("x", None)
        assert done.key.startswith(f"stampbatch-score-{ex.token}-")
        ex.release(done)
        left = ex.submit(sleep_then, 3)
    assert all(name not in p for p in plugins().values())
    deadline = time.monotonic() + 10
    while left.status != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left.status == "cancelled"
