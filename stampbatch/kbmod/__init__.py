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
* Scoring reuses the Dask scorer: the chosen column is streamed into a normal candidate
  store in a work directory beside the output (``<out>.stampbatch-work/``, with ``uuid`` in
  ``/meta``), scored there (its journal makes a killed run resume), and the original table
  plus the new columns is streamed into the output under a temporary name, fsynced and
  renamed; the work directory is removed last.
* Stamps with NaN/Inf pixels are never fed to the model (KBMOD's own filter sets NaN to 0
  first, which invents flux-free pixels the classifier never saw): ``prob_real`` and
  ``prob_bogus`` are NaN, ``cnn_class`` is False, and the rows are counted.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stampbatch import __version__, fileio, store
from stampbatch.errors import StampbatchError, UsageError
from stampbatch.kbmod.table import (
    FORMATS,
    REQUIRED_COLUMNS,
    SHAPES_KEY,
    UUID,
    KbmodError,
    NewColumns,
    ResultsTable,
    _fail,
    check_uuids,
    crop_center,
    iter_batches,
    open_results,
    results_format,
    stamp_geometry,
    write_results,
)

__all__ = ["FORMATS", "REQUIRED_COLUMNS", "SHAPES_KEY", "KbmodError", "KbmodSummary",
           "ResultsTable", "check_uuids", "crop_center", "ingest_results", "iter_batches",
           "open_results", "output_path", "resolve_threshold", "results_format",
           "score_results", "stamp_geometry", "work_dir", "write_results"]

WORK_SUFFIX = ".stampbatch-work"
WORK_STORE = "stamps.h5"
OUTPUT_INFIX = ".scored"        # results.parquet -> results.scored.parquet


_TRUE = {"1", "true", "real", "source", "yes", "good"}
_FALSE = {"0", "false", "bogus", "noise", "no", "bad"}


def _labels(path: Path, column: str, values: np.ndarray) -> np.ndarray:
    """0/1 labels from a label column: booleans, 0/1 numbers, or words (real/bogus, true/false)."""
    if values.dtype.kind in "US":
        words = np.char.lower(np.char.strip(values.astype(str)))
        bad = ~np.isin(words, list(_TRUE | _FALSE))
        if bad.any():
            raise _fail(path, f"label column '{column}' holds {sorted(set(words[bad]))[:5]}; "
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
        raise _fail(table.path, f"has no scalar label column '{label_column}'")
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
    with store.StoreWriter(out, labelled=label_column is not None, stamp_shape=stamp_shape,
                           **writer_options) as writer:
        for _, batch in iter_batches(table, wanted):
            stamps = batch[column].reshape(-1, *table.image_shape(column))
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
            t = value.get("threshold") if isinstance(value, dict) else value
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
    metrics_file = run / "metrics.json" if run.is_dir() else run.parent / "metrics.json"
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
    return match[0], f"{metrics_file.name}: FPR {target:g}"


# --------------------------------------------------------------------------- scoring


def output_path(results: Path | str, out_dir: Path | str | None = None) -> Path:
    """``DIR/<stem>.scored<suffix>`` (beside the input by default).

    Not ``<stem>_scored``: KBMOD's ``read_table(load_aux_files=True)`` would take any
    ``<stem>_*`` file beside the results for an auxiliary column.
    """
    results = Path(results)
    return Path(out_dir or results.parent) / f"{results.stem}{OUTPUT_INFIX}{results.suffix}"


def work_dir(output: Path) -> Path:
    """Where the stamps are staged and scored (removed once the output is in place)."""
    return output.with_name(output.name + WORK_SUFFIX)


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
    phases_s: dict[str, float] = field(default_factory=dict)   # check, stage, score, write

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else 0.0


def _signature(table: ResultsTable, column: str, stamp_shape: tuple[int, int],
               run: dict[str, Any]) -> str:
    """Identity of a staged run: another input, column, model or occlusion setting starts over;
    the same one resumes from the scorer's journal."""
    st = table.path.stat()
    return json.dumps({"source": str(table.path.resolve()), "size": st.st_size,
                       "mtime_ns": st.st_mtime_ns, "column": column,
                       "stamp_shape": list(stamp_shape), **run}, sort_keys=True)


def _stage(table: ResultsTable, work: Path, column: str, stamp_shape: tuple[int, int],
           run: dict[str, Any], chunk_rows: int) -> Path:
    """The work store holding the cropped stamps (reused when a killed run left it); its HDF5
    chunks are the scorer's tasks, so they follow the scorer's chunk size."""
    path = work / WORK_STORE
    signature = _signature(table, column, stamp_shape, run)
    if path.exists():
        with contextlib.suppress(StampbatchError):
            if store.read_attrs(path).get("kbmod_signature") == signature:
                return path
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    _write_store(table, path, column, stamp_shape, [UUID], chunk_rows=chunk_rows,
                 attrs={"kbmod_signature": signature})
    return path


def _run_scorer(work_store: Path, model: Path | str, name: str, occlusion: str, patch: int,
                backend: str, options: dict[str, Any]) -> Any:
    """The one call into the Dask scorer (journaled, resumable) for the staged stamps;
    ``options`` are further :class:`stampbatch.score.ScoreOptions` fields (cluster, client,
    chunk size, progress)."""
    from stampbatch import score

    run = score.ScoreOptions(name=name, occlusion=occlusion, patch=patch, backend=backend,
                             **options)
    return score.score_files([work_store], [model], run)


def _provenance(source: Any, spec: Any, column: str, threshold: float, origin: str,
                scores: store.Scores) -> dict[str, Any]:
    """What the output's table meta records under ``stampbatch``: which model, how."""
    return {"model": source.name, "model_sha256": source.sha256,
            "architecture": spec.architecture, "column": column,
            "crop": list(spec.stamp_shape), "threshold": float(threshold),
            "threshold_from": origin, "occlusion": str(scores.attrs.get("occlusion_mode", "none")),
            "occlusion_patch": int(scores.attrs.get("occlusion_patch", 0)),
            "precision": str(scores.attrs.get("precision", "fp32")),
            "unscorable": int(np.isnan(scores.probability).sum()),
            "stampbatch_version": __version__,
            "scored_at": fileio.utc_now()}


def score_results(
    results: Path | str,
    model: Path | str,
    *,
    column: str = "coadd_mean",
    out_dir: Path | str | None = None,
    threshold: str = "0.5",
    occlusion: str = "none",
    patch: int = 5,
    name: str | None = None,
    backend: str = "auto",
    force: bool = False,
    scorer_options: dict[str, Any] | None = None,
) -> KbmodSummary:
    """Score one co-add column of a KBMOD Results file; write ``<stem>.scored<suffix>``.

    The output holds every original column, row and meta entry unchanged, plus
    ``prob_real`` (P(source)), ``prob_bogus`` (1 - prob_real), ``cnn_class``
    (prob_real >= threshold), with ``occlusion`` an image column ``occlusion_<model>``
    (NaN where a row has no map), and the model's name and sha256 under the meta key
    ``stampbatch``. Everything is checked before anything is written.
    """
    from stampbatch import inference

    t0 = time.monotonic()
    table = open_results(results)
    output = output_path(table.path, out_dir)
    if output.exists() and not force:
        raise _fail(output, "already exists (pass --force to replace it)")
    if not output.parent.is_dir():
        raise _fail(output, f"directory {output.parent} does not exist")
    thr, origin = resolve_threshold(threshold, model)
    source = inference.resolve_model(model, name)
    spec = inference.prepare_model(source, backend)
    stamp_geometry(table, column, spec.stamp_shape)
    check_uuids(table)
    lock = store.take_lock(output)
    phases = {"check": time.monotonic() - t0}
    try:
        work = work_dir(output)
        options = dict(scorer_options or {})
        run_id = {"model_sha256": source.sha256, "occlusion": occlusion, "patch": patch}
        t1 = time.monotonic()
        staged = _stage(table, work, column, spec.stamp_shape, run_id,
                        int(options.get("chunk_size", store.DEFAULT_CHUNK_ROWS)))
        t2 = time.monotonic()
        run = _run_scorer(staged, model, source.name, occlusion, patch, backend, options)
        t3 = time.monotonic()
        scores = store.read_scores(staged, source.name, with_maps=False)
        mode = str(scores.attrs.get("occlusion_mode", "none"))
        scored = NewColumns(scores.probability, thr, spec.stamp_shape, staged, source.name,
                            f"occlusion_{source.name}" if mode != "none" else None)
        info = _provenance(source, spec, column, thr, origin, scores)
        write_results(table, output, scored, info, overwrite=force)
        shutil.rmtree(work, ignore_errors=True)
        phases.update(stage=t2 - t1, score=t3 - t2, write=time.monotonic() - t3)
    finally:
        lock.release()
    p = scores.probability
    return KbmodSummary(table.path, output, source.name, source.sha256, column, table.n_rows,
                        info["unscorable"], int((p[np.isfinite(p)] >= thr).sum()),
                        thr, origin, len(scores.occlusion_index), run.stamps_scored,
                        time.monotonic() - t0, run.scheduler or "(already scored)", phases)


