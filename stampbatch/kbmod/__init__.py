"""KBMOD Results tables in and out: ingest their co-added stamps, score them, write them back.

A KBMOD search ends with a ``Results`` table written by ``Results.write_table``: an astropy
``Table`` whose format follows the suffix (``.parquet``/``.parq``, ``.ecsv``, or ``.hdf5``
under the path ``__astropy_table__``), one row per candidate trajectory, ``uuid`` as the
row's identity and co-added stamps as image columns (``coadd_mean``, ``coadd_median``, …,
per night ``coadd_mean_<day>``). Parquet flattens image columns to 1-D; KBMOD records their
shapes in the table meta as ``image_column_shapes: {column: [h, w]}`` (inside the YAML
``table_meta_yaml`` of the Arrow schema metadata) and reshapes on read. This package owns
that format (reading and writing it in ``kbmod.table``; ingest, thresholds and scoring
here): nothing else in stampbatch knows it.

* Stamps are centre-cropped to the classifier's input (KBMOD's co-add radius is often
  larger than 10): rows and columns ``(h - H) / 2`` are dropped on each side, so the
  trajectory's pixel stays the centre pixel.
* Parquet is streamed in row batches (``ParquetFile.iter_batches``) sized to a fixed number
  of bytes, so memory stays bounded whatever the table's width. ECSV and astropy-HDF5 are
  not streamable formats; they are read whole, as KBMOD reads them.
* Scoring is one pass over the table: each batch is read once (all its columns), its
  stamps cropped and scored in chunks by the scorer's own chunk task
  (:func:`stampbatch.score.tasks.score_stamps`, through the scorer's own executor,
  :mod:`stampbatch.score.executor`: on threads of this process or on the Dask cluster
  ``stampbatch score`` would use, several chunks in flight), and written with its
  new columns into the output under a temporary name, fsynced and renamed when every row
  is in. Each finished chunk is journaled durably beside the output
  (:mod:`stampbatch.score.journal`, ``<out>.stampbatch-journal/<model>/``), so a killed run
  resumes: journaled chunks are read back, not scored again; the journal is removed last.
* Masked pixels (NaN, Inf, fill values) are filled with the stamp's sky by
  :func:`stampbatch.train.preprocess.normalize_with_mask`, as every scoring path does (KBMOD's own
  filter sets NaN to 0 first, flux-free pixels far below an unsubtracted sky). Stamps it
  cannot classify honestly (a masked pixel in the central 3x3, over half masked, no noise
  to measure) are never fed to the model: ``prob_real`` and ``prob_bogus`` are NaN,
  ``cnn_class`` is False, and the rows are counted.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stampbatch import __version__, fileio, store
from stampbatch.errors import KbmodError, TableDataError, UsageError
from stampbatch.kbmod.table import (
    FORMATS,
    NEW_COLUMNS,
    REQUIRED_COLUMNS,
    SHAPES_KEY,
    NewColumns,
    ResultsTable,
    ResultsWriter,
    check_uuids,
    crop_center,
    fail,
    iter_batches,
    open_results,
    read_stamp_batches,
    results_format,
    stamp_geometry,
)
from stampbatch.train.rundir import METRICS_FILE, MODEL_FILE

if TYPE_CHECKING:
    from stampbatch.score.inference import ModelSpec
    from stampbatch.score.journal import Journal
    from stampbatch.score.plan import ScoreOptions

__all__ = ["FORMATS", "REQUIRED_COLUMNS", "SHAPES_KEY", "KbmodError", "KbmodSummary",
           "ResultsTable", "ResultsWriter", "check_uuids", "crop_center", "ingest_results",
           "iter_batches", "open_results", "output_path", "read_stamp_batches",
           "resolve_threshold", "results_format", "score_results", "stamp_geometry"]

OUTPUT_INFIX = ".scored"        # results.parquet -> results.scored.parquet


_TRUE = {"1", "true", "real", "source", "yes", "good"}
_FALSE = {"0", "false", "bogus", "noise", "no", "bad"}


def _labels(path: Path, column: str, values: np.ndarray) -> np.ndarray:
    """0/1 labels from a label column: booleans, 0/1 numbers, or words (real/bogus, true/false)."""
    if values.dtype.kind in "US":
        words = np.char.lower(np.char.strip(values.astype(str)))
        bad = ~np.isin(words, list(_TRUE | _FALSE))
        if bad.any():
            raise fail(path, f"label column '{column}' holds {sorted(set(words[bad]))[:5]}; "
                              f"expected 0/1, true/false or real/bogus")
        return np.isin(words, list(_TRUE)).astype(np.int8)
    return store.check_labels(path, values, len(values))


def _meta_columns(table: ResultsTable, exclude: Sequence[str]) -> list[str]:
    """Scalar columns kept in /meta: uuid, the required trajectory columns, every other scalar."""
    return [c for c in table.scalar_columns() if c not in exclude]


def ingest_results(
    out: Path | str,
    results: Path | str,
    *,
    column: str = "coadd_mean",
    label_column: str | None = None,
    stamp_shape: tuple[int, int] = store.DEFAULT_STAMP_SHAPE,
    chunk_rows: int = store.DEFAULT_CHUNK_ROWS,
    compression: str | None = None,
    overwrite: bool = False,
    attrs: dict[str, Any] | None = None,
) -> store.StoreInfo:
    """Stream one co-add column of a KBMOD Results file into a stamp store (centre-cropped).

    ``uuid``, the trajectory columns and every scalar column go to ``/meta``; with
    ``label_column`` the store is labelled from that column. Everything is validated before
    anything is written; nothing appears at ``out`` unless the whole store was written.
    """
    table = open_results(results)
    stamp_geometry(table, column, stamp_shape)
    check_uuids(table)
    if label_column is not None and table.cell_shapes.get(label_column) != ():
        raise fail(table.path, f"has no scalar label column '{label_column}'")
    meta_cols = _meta_columns(table, [label_column] if label_column else [])
    return _write_store(table, out, column, stamp_shape, meta_cols, label_column,
                        chunk_rows=chunk_rows, compression=compression, overwrite=overwrite,
                        attrs=attrs)


def _write_store(table: ResultsTable, out: Path | str, column: str,
                 stamp_shape: tuple[int, int], meta_cols: Sequence[str],
                 label_column: str | None = None, **writer_options: Any) -> store.StoreInfo:
    """Stream a validated table's co-add column (cropped), meta and labels into a new store."""
    wanted = [column, *meta_cols] + ([label_column] if label_column else [])
    writer_options["chunk_rows"] = min(writer_options.get("chunk_rows", store.DEFAULT_CHUNK_ROWS),
                                       table.n_rows)
    shape = table.image_shape(column)
    assert shape is not None, f"{column} is not an image column"   # callers validated it
    with store.StoreWriter(out, labelled=label_column is not None, stamp_shape=stamp_shape,
                           **writer_options) as writer:
        for _, batch in iter_batches(table, wanted):
            stamps = batch[column].reshape(-1, *shape)
            labels = _labels(table.path, label_column, batch[label_column]) if label_column else None
            writer.append(crop_center(stamps, stamp_shape), labels,
                          {c: batch[c] for c in meta_cols})
    return store.open_store(out)


# --------------------------------------------------------------------------- thresholds


def _fpr_thresholds(metrics: dict[str, Any]) -> dict[float, float]:
    """target FPR -> threshold from a run's metrics.json.

    Read, in order: ``thresholds`` (a mapping like ``{"0.01": t}``/``{"fpr:0.01": t}``, or a list
    of ``{"target_fpr", "threshold"}``) and ``operating_point`` (``{"target_fpr", "threshold"}``,
    written by ``stampbatch train``).
    """
    found: dict[float, float] = {}
    stored = metrics.get("thresholds")
    items = stored.items() if isinstance(stored, dict) else []
    for key, value in items:
        with contextlib.suppress(TypeError, ValueError):
            t: Any = value.get("threshold") if isinstance(value, dict) else value   # float(None): skipped
            found[float(str(key).replace("fpr", "").strip(":_= "))] = float(t)
    for entry in ([*stored] if isinstance(stored, list) else []) + [metrics.get("operating_point")]:
        if isinstance(entry, dict) and "target_fpr" in entry and "threshold" in entry:
            found.setdefault(float(entry["target_fpr"]), float(entry["threshold"]))
    return found


def resolve_threshold(text: str, model: Path | str) -> tuple[float, str]:
    """``0.5`` or ``fpr:0.01`` (the run's stored threshold for that FPR) -> (threshold, origin)."""
    text = str(text).strip()
    if not text.startswith("fpr:"):
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"--threshold {text!r}: give a probability (e.g. 0.5) or fpr:F")
        return value, "given"
    try:
        target = float(text[4:])
    except ValueError:
        raise UsageError(f"--threshold {text!r}: expected fpr:F, e.g. fpr:0.01") from None
    run = Path(model)
    metrics_file = run / METRICS_FILE if run.is_dir() else run.parent / METRICS_FILE
    try:
        metrics = json.loads(metrics_file.read_text())
    except (OSError, ValueError) as exc:
        raise KbmodError(f"{metrics_file}: cannot read the run's thresholds for --threshold "
                         f"{text} ({type(exc).__name__})") from exc
    table = _fpr_thresholds(metrics)
    match = [t for f, t in table.items() if math.isclose(f, target, rel_tol=1e-6)]
    if not match:
        raise KbmodError(f"{metrics_file}: no threshold stored for FPR {target:g} (has "
                         f"{sorted(table) or 'none'}); use --threshold P")
    from stampbatch.score.inference import check_run_model

    if not check_run_model(metrics_file.parent, model=run / MODEL_FILE if run.is_dir() else run):
        print(f"warning: {metrics_file}: records no sha256 of its model (a run from before "
              f"they were recorded): --threshold {text} is used unchecked", file=sys.stderr)
    return match[0], f"{metrics_file.name}: FPR {target:g}"


# --------------------------------------------------------------------------- scoring


def output_path(results: Path | str, out_dir: Path | str | None = None) -> Path:
    """``DIR/<stem>.scored<suffix>`` (beside the input by default).

    Not ``<stem>_scored``: KBMOD's ``read_table(load_aux_files=True)`` would take any
    ``<stem>_*`` file beside the results for an auxiliary column.
    """
    results = Path(results)
    return Path(out_dir or results.parent) / f"{results.stem}{OUTPUT_INFIX}{results.suffix}"


@dataclass
class KbmodSummary:
    """What ``score_results`` did."""

    results: Path
    output: Path
    model: str
    sha256: str
    column: str
    rows: int
    unscorable: int
    positives: int
    threshold: float
    threshold_from: str
    maps: int
    stamps_scored: int          # rows computed in this run (fewer when resuming)
    wall_s: float
    scheduler: str
    phases_s: dict[str, float] = field(default_factory=dict)   # check, pass (read, score,
    #                                                         write), commit (fsync, rename)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else 0.0


def _manifest(table: ResultsTable, column: str, spec: ModelSpec, options: ScoreOptions,
              batch_rows: int) -> dict[str, Any]:
    """What identifies a KBMOD run's journal: another input file (path, size, mtime), column,
    batching, model, backend, precision or occlusion setting starts over; the same resumes."""
    from stampbatch.score.plan import journal_manifest

    st = table.path.stat()
    return journal_manifest(spec, options, source=table.path,
                            identity={"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                      "column": column, "batch_rows": batch_rows},
                            n_stamps=table.n_rows, stamp_shape=spec.stamp_shape,
                            chunk_rows=options.chunk_size)


@dataclass
class _Counts:
    unscorable: int = 0
    positives: int = 0
    maps: int = 0
    computed: int = 0


def _score_stream(table: ResultsTable, column: str, spec: ModelSpec, options: ScoreOptions,
                  journal: Journal, writer: ResultsWriter, scored: NewColumns,
                  batch_rows: int) -> tuple[_Counts, str]:
    """One pass over the table: each batch's stamps are cropped and scored in chunks of
    ``options.chunk_size`` rows (on threads or on Dask, several chunks in flight while this
    thread reads and writes; :func:`stampbatch.score.executor.chunk_executor`), each chunk's
    result is journaled durably, and the batch is
    written with its new columns in row order. Chunks journaled by a killed run are read
    back instead of scored."""
    from collections import deque

    from stampbatch.progress import Progress
    from stampbatch.score.executor import chunk_executor, chunk_result
    from stampbatch.score.tasks import score_stamps

    done = journal.finished_chunks()
    rows = options.chunk_size
    work = options.occ.evaluations(table.n_rows)
    counts = _Counts()
    pending: deque = deque()            # (raw batch, first row, [(lo, hi, future | None)])
    in_flight = 0

    def flush_head() -> None:
        nonlocal in_flight
        raw, first, parts = pending.popleft()
        probability, map_rows, maps = [], [], []
        for lo, hi, fut in parts:
            if fut is None:
                res = journal.load(lo, hi)
            else:
                res = chunk_result(fut, table.path, lo, hi, KbmodError)[spec.name]
                ex.release(fut)
                journal.record(lo, hi, res)
                in_flight -= 1
                counts.computed += hi - lo
            probability.append(res.probability)
            map_rows.append(res.occlusion_rows - first)
            maps.append(res.occlusion_maps)
        p = np.concatenate(probability)
        new = scored.values(p, np.concatenate(map_rows), np.concatenate(maps))
        writer.write(raw, new)
        bar.update(len(p))
        counts.unscorable += int(np.isnan(p).sum())
        counts.positives += int(new["cnn_class"].sum())
        counts.maps += sum(len(r) for r in map_rows)

    models, occ, patch = (spec,), options.occ, options.patch
    with chunk_executor(options, models, work) as ex, \
            Progress(table.n_rows, "scoring", "rows", enabled=options.progress) as bar:
        for first, raw, stamps in read_stamp_batches(table, column, spec.stamp_shape,
                                                     batch_rows, with_rows=True):
            window = ex.window()
            parts = []
            for lo in range(first, first + len(stamps), rows):
                # chunks on the fixed grid of `rows`, cut at batch ends should a batch end
                # off the grid (a short read); a resume matches chunks by (start, stop)
                hi = min((lo // rows + 1) * rows, first + len(stamps))
                if done.get(lo) == hi:
                    parts.append((lo, hi, None))
                else:
                    parts.append((lo, hi, ex.submit(score_stamps, stamps[lo - first:hi - first],
                                                    lo, models, occ, patch)))
                    in_flight += 1
            pending.append((raw, first, parts))
            # the batch before this one is written while this one is scored (and the next
            # read): flush it once it is done, or to keep the chunks in flight bounded
            while len(pending) > 1 and (in_flight > window or all(
                    f is None or f.done() for _, _, f in pending[0][2])):
                flush_head()
        while pending:
            flush_head()
    return counts, ex.where


def _provenance(source: Any, spec: ModelSpec, column: str, threshold: float, origin: str,
                options: ScoreOptions) -> dict[str, Any]:
    """What the output's table meta records under ``stampbatch``: which model, how (the count
    of unscorable rows is not here: it is the number of NaN in prob_real)."""
    return {"model": source.name, "model_sha256": source.sha256,
            "architecture": spec.architecture, "column": column,
            "crop": list(spec.stamp_shape), "threshold": float(threshold),
            "threshold_from": origin, "occlusion": str(options.occ),
            "occlusion_patch": options.patch_used, "precision": options.precision,
            "stampbatch_version": __version__,
            "scored_at": fileio.utc_now()}


def _options(options: ScoreOptions | None, fields: Mapping[str, Any] | None,
             **keywords: Any) -> ScoreOptions:
    """``options`` (default ones) changed by ``fields`` and by the keywords given (not None)."""
    from stampbatch.score.plan import ScoreOptions

    changes = dict(fields or {})
    for key, value in keywords.items():
        if value is None:
            continue
        if key in changes:
            raise UsageError(f"scoring option {key} given twice (as a keyword and in "
                             "scorer_options)")
        changes[key] = value
    return (options or ScoreOptions()).with_fields(changes)


def score_results(
    results: Path | str,
    model: Path | str,
    options: ScoreOptions | None = None,
    *,
    column: str = "coadd_mean",
    threshold: str = "0.5",
    out_dir: Path | str | None = None,
    occlusion: str | None = None,
    patch: int | None = None,
    name: str | None = None,
    backend: str | None = None,
    force: bool | None = None,
    scorer_options: Mapping[str, Any] | None = None,
) -> KbmodSummary:
    """Score one co-add column of a KBMOD Results file; write ``<stem>.scored<suffix>``.

    The output holds every original column, row and meta entry unchanged, plus
    ``prob_real`` (P(source)), ``prob_bogus`` (1 - prob_real), ``cnn_class``
    (prob_real >= threshold), with ``occlusion`` an image column ``occlusion_<model>``
    (NaN where a row has no map), and the model's name and sha256 under the meta key
    ``stampbatch``. Everything is checked before anything is written. One pass over the
    table; finished chunks are journaled beside the output, so a killed run resumes.

    How to score is ``options`` (a :class:`stampbatch.score.plan.ScoreOptions`, as ``stampbatch
    score`` builds it: ``out_dir`` is the output's directory, beside the input by
    default). ``out_dir``, ``occlusion``, ``patch``, ``name``, ``backend``, ``force`` and the
    fields named in ``scorer_options`` change those options; a name that is no field, or a
    field given twice, is refused.
    """
    from stampbatch.score import inference
    from stampbatch.score.journal import Journal

    t0 = time.monotonic()
    options = _options(options, scorer_options, out_dir=out_dir, occlusion=occlusion,
                       patch=patch, name=name, backend=backend, force=force)
    out_dir, name, backend, force = options.out_dir, options.name, options.backend, options.force
    table = open_results(results)
    output = output_path(table.path, out_dir)
    if output.exists() and not force:
        raise fail(output, "already exists (pass --force to replace it)")
    had = [c for c in (*NEW_COLUMNS, f"occlusion_{name or Path(model).stem}") if c in table.columns]
    if had and not force:
        raise fail(table.path, f"already has column(s) {', '.join(had)} (scored before?); "
                                "pass --force to replace them in the output")
    check_uuids(table)                               # the table's own checks before the model
    if not output.parent.is_dir():
        raise fail(output, f"directory {output.parent} does not exist")
    source = inference.resolve_model(model, name)   # checks the run describes its model
    thr, origin = resolve_threshold(threshold, model)
    slurm = options.cluster.slurm
    spec = inference.prepare_model(source, backend, gpu=slurm is not None and slurm.gpus > 0)
    stamp_geometry(table, column, spec.stamp_shape)
    lock = store.take_lock(output)
    phases = {"check": time.monotonic() - t0}
    try:
        # batches a multiple of the chunk rows: each batch is whole chunks
        rows = options.chunk_size
        batch_rows = max(rows, table.batch_rows() // rows * rows)
        # what a killed run left of the output (written during the whole pass; the
        # journal, not the partial file, is what resumes)
        fileio.remove_partials(output, suffix=output.suffix)
        journal = Journal(output, source.name)
        if force:                       # from scratch, as for HDF5 files
            journal.remove()
        journal.start(_manifest(table, column, spec, options, batch_rows))
        journal.drop_unreadable(options.log)
        before = sum(hi - lo for lo, hi in journal.finished_chunks().items())
        if before:
            options.log(f"{output}: resuming: {before:,} of {table.n_rows:,} rows were scored "
                        f"by an earlier run ({journal.dir})")
        scored = NewColumns(thr, spec.stamp_shape,
                            f"occlusion_{source.name}" if options.occ.kind != "none" else None)
        info = _provenance(source, spec, column, thr, origin, options)
        t1 = time.monotonic()
        try:
            with ResultsWriter(table, output, scored, info, overwrite=force) as writer:
                counts, where = _score_stream(table, column, spec, options, journal, writer,
                                              scored, batch_rows)
                t2 = time.monotonic()
        except BaseException as exc:
            # nothing to resume (no cluster), or bad rows: a fixed table is another file
            # (size, mtime) whose journal would be discarded anyway
            if isinstance(exc, TableDataError) or not journal.finished_chunks():
                journal.remove()
            raise
        journal.remove()
        phases.update({"pass": t2 - t1, "commit": time.monotonic() - t2})
    finally:
        lock.release()
    return KbmodSummary(table.path, output, source.name, source.sha256, column, table.n_rows,
                        counts.unscorable, counts.positives, thr, origin, counts.maps,
                        counts.computed, time.monotonic() - t0, where, phases)
