"""Score candidate stamp files with trained models on Dask: probabilities and occlusion maps.

The work is split into chunks of rows aligned with the files' HDF5 chunking. Each Dask task
reads one chunk, normalises it, scores it with every model that still needs it and computes
occlusion maps for the rows that qualify (``none``, ``all`` or ``above:P`` = P(source) >= P).
Workers load each model once per process (:class:`stampbatch.score.plugin.ModelPlugin`, a
distributed worker plugin, backed by :func:`stampbatch.score.inference.cached_predictor`).

The public entry point is :func:`score_files` (candidate files, models, a
:class:`ScoreOptions`) → :class:`ScoreSummary`. A run has three stages, each a few short
functions here: **plan** (models resolved, files validated, locked, what is done and what
is not), **run** (chunk tasks through :func:`stampbatch.score.executor.chunk_executor`, on
threads of this process for a small local run or on a Dask cluster, each result recorded in the
:mod:`stampbatch.score.journal`), **finalise** (a file's journals written into its scores files,
which are then linked into the target).

Nothing here trusts a process to finish (SIGKILL included):

* finished chunks are journaled durably (:mod:`stampbatch.score.journal`); a rerun skips them,
  and chunk boundaries are fixed by the manifest, so the results are bit-identical to an
  uninterrupted run. A journal of another input, model or backend is discarded;
* each model's scores are written into a file of their own,
  ``<file>.scores/<store id>/model-<model>.h5``, complete before it is renamed into place
  (:class:`stampbatch.store.ScoreWriter`); only then is the journal removed; then the
  folder's ``index.h5`` is replaced whole, linking every committed model;
* the candidate file itself is never written by scoring, with one exception made once: a
  file without a scores folder of its own (a copy, a renamed file, a file of another program
  or an older stampbatch) first gets one by copy-and-swap, keeping its owner, group, mode,
  times and xattrs, so that scoring it never changes what another file shows
  (:func:`stampbatch.store.ensure_home`); the stamps are never rewritten;
* scores are shown only where they belong: every model's scores file records the store id
  and stamps fingerprint it was computed from, and every reader checks both;
* one writer per scores folder: an exclusive ``flock`` on ``<resolved target>.stampbatch.lock``
  (:func:`stampbatch.store.take_lock`), whatever HDF5's own locking is set to — a writer
  only ever writes the folder named after the resolved target, so this is the folder's
  lock — and a refusal at the start when another process holds the file open for writing.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from stampbatch import __version__, fileio, store
from stampbatch.errors import ScoreError, StampbatchError
from stampbatch.score.candidates import expand_candidates
from stampbatch.score.cluster import ClusterOptions, SlurmOptions
from stampbatch.score.executor import ChunkExecutor, chunk_executor, chunk_result
from stampbatch.score.inference import ORT_BATCH_CPU, ModelSpec
from stampbatch.score.journal import (
    LATER_KEYS,
    ChunkResult,
    Journal,
    disk_error,
    journal_root,
)
from stampbatch.score.plan import (
    BadFiles,
    FileWork,
    Plan,
    ScoreOptions,
    ScoreSummary,
    lock_target,
    log_stderr,
    plan_run,
)
from stampbatch.score.tasks import ChunkTask, OcclusionMode, score_chunk

__all__ = ["ChunkResult", "ClusterOptions", "Journal", "OcclusionMode", "Plan", "ScoreError",
           "ScoreOptions", "ScoreSummary", "SlurmOptions", "expand_candidates",
           "finish_journals", "score_files"]


# --------------------------------------------------------------------------- the run


def score_files(candidates: Sequence[str | Path], models: Sequence[str | Path],
                options: ScoreOptions | None = None) -> ScoreSummary:
    """Score candidate files with models; ``/scores/<model>`` of each file (or of a side file)
    then shows them, through the file's scores folder.

    ``candidates``: files, globs or ``@list.txt``. ``models``: run directories or .keras
    files. Everything else is in ``options``. Returns a :class:`ScoreSummary`.
    """
    options = options or ScoreOptions()
    t0 = time.monotonic()
    bad = BadFiles(options.skip_bad, options.log)
    summary = ScoreSummary()
    with contextlib.ExitStack() as stack:    # the targets' locks, held until the end
        files, prepared = plan_run(expand_candidates(candidates), models, options, bad,
                                   summary, stack)
        _compute(files, prepared, options, bad, summary)
        summary.skipped = bad.skipped
    summary.wall_s = time.monotonic() - t0
    return summary


def _compute(files: list[FileWork], prepared: dict[str, ModelSpec], options: ScoreOptions,
             bad: BadFiles, summary: ScoreSummary) -> None:
    """Compute what is missing, journal it, finalise each file when its last chunk is in."""
    remaining: dict[int, int] = {}
    total = 0
    for fw in files:
        starts = set().union(*(mw.todo for mw in fw.models.values()))
        remaining[id(fw)] = len(starts)
        total += sum(min(lo + fw.chunk_rows, fw.n_stamps) - lo for lo in starts)
        if not starts:                 # everything journaled before: just write it
            _finalise(fw, summary)
    if not total:
        return
    tasks = ((fw, task) for fw in files if remaining[id(fw)]
             for task in _chunk_tasks(fw, options))
    work = len(prepared) * options.occ.evaluations(total)
    with contextlib.ExitStack() as stack:
        try:
            ex = stack.enter_context(chunk_executor(options, list(prepared.values()), work,
                                                    completion_order=True))
        except BaseException:   # no cluster (or Ctrl-C while waiting): nothing computed
            _drop_empty_journals(files)
            raise
        summary.scheduler = ex.where
        _run(ex, tasks, total, remaining, options, bad, summary)


def _drop_empty_journals(files: list[FileWork]) -> None:
    """Remove the journals that hold no chunk (started by this run's plan, nothing to
    resume): a run that never got a cluster leaves no journal behind."""
    for fw in files:
        for mw in fw.models.values():
            if not mw.journal.finished_chunks():
                mw.journal.remove()


def _chunk_tasks(fw: FileWork, options: ScoreOptions) -> Iterator[ChunkTask]:
    """The chunks of one file that some model still needs, in row order."""
    path = str(fw.candidates.resolve())
    for lo, hi in fw.chunks():
        specs = tuple(mw.spec for mw in fw.models.values() if lo in mw.todo and mw.spec)
        if specs:
            yield ChunkTask(path, lo, hi, specs, options.occ, options.patch)


def _failure(task: ChunkTask, fut: Any) -> tuple[dict[str, ChunkResult] | None,
                                                 StampbatchError | None]:
    """A finished future's result, or its failure as one line."""
    try:
        return chunk_result(fut, task.path, task.start, task.stop, ScoreError), None
    except StampbatchError as exc:
        return None, exc


class _Results:
    """What the driver does with each finished chunk task, wherever it ran."""

    def __init__(self, remaining: dict[int, int], bad: BadFiles, summary: ScoreSummary) -> None:
        self.remaining, self.bad, self.summary = remaining, bad, summary
        self.failed: set[int] = set()

    def wanted(self, fw: FileWork) -> bool:
        return id(fw) not in self.failed

    def take(self, fw: FileWork, task: ChunkTask, fut: Any) -> int:
        """Journal one finished task (or report its file); the stamps it adds to progress."""
        result, failure = _failure(task, fut)
        if id(fw) in self.failed:
            return 0
        if failure is not None:
            self.bad.report(fw.candidates, failure)     # raises unless --skip-bad
            self.failed.add(id(fw))
            self.summary.files = [p for p in self.summary.files if p != fw.candidates]
            self.summary.targets = [p for p in self.summary.targets if p != fw.target]
            return 0
        assert result is not None                       # _failure gives a result or a failure
        _journal_chunk(fw, task, result, self.remaining, self.summary)
        return task.stop - task.start


PART_ROWS = ORT_BATCH_CPU   # tail parts are whole ONNX Runtime calls, so a part's scores are
                           # the bytes its chunk's would have been


def _parts(task: ChunkTask, pieces: int) -> list[ChunkTask]:
    """``task`` cut into up to ``pieces`` row ranges on the PART_ROWS grid (one if small)."""
    size = -(-(task.stop - task.start) // max(1, pieces))
    size = max(PART_ROWS, -(-size // PART_ROWS) * PART_ROWS)
    return [replace(task, start=lo, stop=min(lo + size, task.stop))
            for lo in range(task.start, task.stop, size)]


class _Joined:
    """The parts of one chunk task, as the one future :meth:`_Results.take` reads once the
    last of them is in (``pending`` counts those still out)."""

    def __init__(self) -> None:
        self.parts: list[Any] = []
        self.pending = 0

    def add(self, fut: Any) -> None:
        self.parts.append(fut)
        self.pending += 1

    def result(self) -> dict[str, ChunkResult]:
        pieces = [fut.result() for fut in self.parts]      # the first failure raises
        if len(pieces) == 1:                               # an uncut chunk: no copy
            whole: dict[str, ChunkResult] = pieces[0]
            return whole
        return {name: ChunkResult(np.concatenate([p[name].probability for p in pieces]),
                                  np.concatenate([p[name].occlusion_rows for p in pieces]),
                                  np.concatenate([p[name].occlusion_maps for p in pieces]))
                for name in pieces[0]}


def _run(ex: ChunkExecutor, tasks: Iterator[tuple[FileWork, ChunkTask]], total: int,
         remaining: dict[int, int], options: ScoreOptions, bad: BadFiles,
         summary: ScoreSummary) -> None:
    """Chunk tasks through the executor in its window, journaled as they finish (each file
    finalised with its last chunk).

    On threads of this process the last chunks of the run are cut into parts that the
    threads share, so that every core works until the end instead of one finishing the
    last chunk alone (on two cores a 100 k-stamp file lost ~0.1 s, 3 %, that way). A chunk
    is journaled when all its parts are in, as one result, identical to the uncut chunk's.
    """
    from stampbatch.progress import Progress

    results = _Results(remaining, bad, summary)
    owner: dict[Any, tuple[FileWork, ChunkTask, _Joined]] = {}
    to_submit = total
    cut = ex.threads if ex.threads is not None and ex.threads > 1 else 0

    def submit_more() -> None:
        nonlocal to_submit
        window = ex.window()
        while len(owner) < window:
            item = next(tasks, None)
            if item is None:
                return
            fw, task = item
            if not results.wanted(fw):
                continue
            rows = task.stop - task.start
            to_submit -= rows
            tail = cut and to_submit < cut * rows       # among the run's last chunks
            joined = _Joined()
            for part in _parts(task, 2 * cut) if tail else [task]:
                fut = ex.submit(score_chunk, part)
                joined.add(fut)
                owner[fut] = (fw, task, joined)

    with Progress(total, "scoring", "stamps", enabled=options.progress) as bar:
        submit_more()
        while owner:
            fw, task, joined = owner.pop(ex.next_done())
            joined.pending -= 1
            if not joined.pending:
                bar.update(results.take(fw, task, joined))
                for fut in joined.parts:
                    ex.release(fut)
            submit_more()


def _journal_chunk(fw: FileWork, task: ChunkTask, result: dict[str, ChunkResult],
                   remaining: dict[int, int], summary: ScoreSummary) -> None:
    for name, res in result.items():
        fw.models[name].journal.record(task.start, task.stop, res)
        fw.models[name].todo.discard(task.start)
    summary.stamps_scored += task.stop - task.start
    remaining[id(fw)] -= 1
    if remaining[id(fw)] == 0:
        _finalise(fw, summary)


# --------------------------------------------------------------------------- finalising


def _check_space(target: Path, journal: Journal, model: str) -> None:
    """Refuse to start writing scores when the disk cannot hold them.

    HDF5 does not survive running out of space mid-write (the library may even crash the
    process), so the driver checks first: the journal's size is the data to be written.
    """
    need = sum(p.stat().st_size for p in journal.dir.glob("chunk-*.npz"))
    need = int(need * 1.1) + (1 << 20)        # chunk indexes and metadata
    st = os.statvfs(target.parent)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise ScoreError(f"{target}: disk full: /scores/{model} needs about {need / 1e6:,.1f} MB, "
                         f"{free / 1e6:,.1f} MB free; finished chunks are kept in {journal.dir} "
                         "and the candidate stamps are untouched; free space and rerun")


def _provenance(manifest: dict[str, Any], n_unscorable: int) -> dict[str, Any]:
    """The attributes of committed scores, all from the journal's manifest (so a rewrite
    from the same journal is identical)."""
    return {
        "model_sha256": manifest["model_sha256"], "model_file": manifest["model_file"],
        "architecture": manifest["architecture"], "stampbatch_version": __version__,
        "scored_at": manifest["started_at"], "occlusion_mode": manifest["occlusion"],
        "occlusion_patch": int(manifest["occlusion_patch"]),
        "chunk_rows": int(manifest["chunk_rows"]), "backend": manifest["backend"],
        "precision": {**LATER_KEYS, **manifest}["precision"],
        "n_unscorable": int(n_unscorable), "source_file": manifest["source"],
        "source_fingerprint": manifest["source_identity"]["stamps"],
    }


def _commit_journal(target: Path, journal: Journal) -> tuple[int, int, int, int]:
    """Write one complete journal into the model's scores file, then remove the journal.

    Returns (stamps, unscorable, with P >= 0.5, maps).
    """
    manifest = journal.manifest() or {}
    model = journal.dir.name
    n, rows = int(manifest.get("n_stamps", 0)), int(manifest.get("chunk_rows", 1))
    expected = {lo: min(lo + rows, n) for lo in range(0, n, rows)}
    done = journal.finished_chunks()
    if not manifest or done != expected:
        missing = sorted(set(expected) - set(done))[:3]
        raise ScoreError(f"{target}: journal {journal.dir} is incomplete (chunks starting at "
                         f"{missing} missing); rerun")
    _check_space(target, journal, model)
    n_nan = n_above = n_maps = 0
    try:
        with store.ScoreWriter(target, model, n, tuple(manifest["stamp_shape"]),
                               chunk_rows=rows, locked=True) as writer:
            for lo in sorted(done):
                res = journal.load(lo, done[lo])
                writer.write_probability(lo, res.probability)
                writer.append_occlusion(res.occlusion_rows, res.occlusion_maps)
                n_nan += int(np.isnan(res.probability).sum())
                n_above += int((res.probability >= 0.5).sum())
                n_maps += len(res.occlusion_rows)
            writer.commit(_provenance(manifest, n_nan), link=False)
    except StampbatchError:
        raise
    except (OSError, RuntimeError) as exc:
        raise disk_error(exc if isinstance(exc, OSError) else OSError(str(exc)), target,
                         f"/scores/{model}", journal.dir) from exc
    journal.remove()
    return n, n_nan, n_above, n_maps


def _finalise(fw: FileWork, summary: ScoreSummary) -> None:
    """Commit every model's journal of one file, then link all its scores in one step."""
    for name, mw in fw.models.items():
        stamps, n_nan, n_above, n_maps = _commit_journal(fw.target, mw.journal)
        ms = summary.models[name]
        ms.stamps += stamps
        ms.unscorable += n_nan
        ms.above_half += n_above
        ms.maps += n_maps
    store.link_scores(fw.target, [*fw.models, *store.committed_models(fw.target, log_stderr)])


def finish_journals(target: Path | str) -> list[str]:
    """Commit every complete journal of ``target`` and link all its scores; no model needed.

    What a run does after its last chunk, on its own (it takes the target's lock): recovers
    a file whose scorer was killed after computing everything, and is the small process
    the fault-injection tests kill at every write. Returns the models committed now.
    """
    target = Path(target)
    lock = lock_target(target)
    try:
        root = journal_root(target)
        fileio.sweep_removed(root)
        store.sweep_partial(target)
        committed = []
        for folder in sorted(root.iterdir()) if root.is_dir() else ():
            journal = Journal(target, folder.name)
            if folder.is_dir() and not folder.name.startswith(".") and journal.manifest():
                _commit_journal(target, journal)
                committed.append(folder.name)
        store.link_scores(target, [*committed, *store.committed_models(target, log_stderr)])
        return committed
    finally:
        lock.release()
