"""KBMOD Results tables in and out: ingest their co-added stamps, score them, write them back.

A KBMOD search ends with a ``Results`` table written by ``Results.write_table``: an astropy
``Table`` whose format follows the suffix (``.parquet``/``.parq``, ``.ecsv``, or ``.hdf5``
under the path ``__astropy_table__``), one row per candidate trajectory, ``uuid`` as the
row's identity and co-added stamps as image columns (``coadd_mean``, ``coadd_median``, …,
per night ``coadd_mean_<day>``). Parquet flattens image columns to 1-D; KBMOD records their
shapes in the table meta as ``image_column_shapes: {column: [h, w]}`` (inside the YAML
``table_meta_yaml`` of the Arrow schema metadata) and reshapes on read. This module owns
that format: nothing else in stampbatch knows it.

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
import datetime as _dt
import json
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stampbatch import __version__, store
from stampbatch.errors import StampbatchError, UsageError

FORMATS = {".parquet": "parquet", ".parq": "parquet", ".ecsv": "ecsv", ".hdf5": "hdf5"}
REQUIRED_COLUMNS = ("x", "y", "vx", "vy", "likelihood", "flux", "obs_count")
UUID = "uuid"
SHAPES_KEY = "image_column_shapes"
YAML_KEY = b"table_meta_yaml"
HDF5_PATH = "__astropy_table__"
WORK_SUFFIX = ".stampbatch-work"
WORK_STORE = "stamps.h5"
OUTPUT_INFIX = ".scored"        # results.parquet -> results.scored.parquet
BATCH_BYTES = 64 << 20          # bytes of table read per Parquet batch
MAX_BATCH_ROWS = 65536
NEW_COLUMNS = ("prob_real", "prob_bogus", "cnn_class")
META_KEY = "stampbatch"


class KbmodError(StampbatchError):
    """A KBMOD Results file cannot be used; the one-line message names the file and problem."""


def _fail(path: Path | str, problem: str) -> KbmodError:
    return KbmodError(f"{path}: {problem}")


# --------------------------------------------------------------------------- reading


@dataclass
class ResultsTable:
    """An opened KBMOD Results file: its layout, not its data (except ECSV/HDF5, read whole)."""

    path: Path
    fmt: str                                   # "parquet", "ecsv" or "hdf5"
    n_rows: int
    columns: tuple[str, ...]
    meta: dict[str, Any]
    cell_shapes: dict[str, tuple[int, ...]]    # per-row shape of each column as stored
    table: Any = field(default=None, repr=False)   # astropy Table (ECSV/HDF5 only)
    parquet: Any = field(default=None, repr=False)  # pyarrow ParquetFile (Parquet only)

    def image_shape(self, column: str) -> tuple[int, ...] | None:
        """The image shape of a column: from ``image_column_shapes``, else as stored (ndim>=2)."""
        declared = (self.meta.get(SHAPES_KEY) or {}).get(column)
        if declared is not None:
            return tuple(int(s) for s in declared)
        shape = self.cell_shapes.get(column, ())
        return shape if len(shape) >= 2 else None

    def image_columns(self) -> list[str]:
        """Columns holding one image (or a stack of images) per row."""
        return [c for c in self.columns if self.image_shape(c) is not None]

    def scalar_columns(self) -> list[str]:
        return [c for c in self.columns if self.cell_shapes.get(c) == ()]

    def row_bytes(self) -> int:
        """About how many bytes one row takes in memory (for sizing batches)."""
        if self.parquet is not None:
            md = self.parquet.metadata
            total = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
            return max(1, total // max(1, self.n_rows))
        return max(1, self.table.as_array().dtype.itemsize) if self.n_rows else 1

    def batch_rows(self, limit: int | None = None) -> int:
        rows = max(1, min(MAX_BATCH_ROWS, BATCH_BYTES // self.row_bytes()))
        return min(rows, limit) if limit else rows


def results_format(path: Path | str) -> str | None:
    """``parquet``, ``ecsv`` or ``hdf5`` for a KBMOD Results suffix, else None."""
    return FORMATS.get(Path(path).suffix.lower())


def _yaml_header(path: Path, schema_metadata: dict | None) -> dict[str, Any]:
    """The astropy YAML header (``datatype`` list and ``meta``) of a Parquet file."""
    from astropy.table import meta as table_meta

    if not schema_metadata or YAML_KEY not in schema_metadata:
        return {"datatype": [], "meta": {}}
    try:
        return table_meta.get_header_from_yaml(schema_metadata[YAML_KEY].decode().splitlines())
    except Exception as exc:  # noqa: BLE001 - yaml raises many types
        raise _fail(path, f"unreadable astropy table meta ({' '.join(str(exc).split())[:150]})") from exc


def _open_parquet(path: Path) -> ResultsTable:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise _fail(path, f"not a readable Parquet file, truncated? ({' '.join(str(exc).split())[:150]})") from exc
    header = _yaml_header(path, pf.schema_arrow.metadata)
    shapes: dict[str, tuple[int, ...]] = {}
    for f in pf.schema_arrow:
        if pa.types.is_fixed_size_list(f.type):
            shapes[f.name] = (f.type.list_size,)
        elif pa.types.is_list(f.type) or pa.types.is_large_list(f.type):
            shapes[f.name] = (-1,)                  # variable length per row
        else:
            shapes[f.name] = ()
    return ResultsTable(path, "parquet", pf.metadata.num_rows, tuple(pf.schema_arrow.names),
                        dict(header.get("meta") or {}), shapes, parquet=pf)


def _open_astropy(path: Path, fmt: str) -> ResultsTable:
    from astropy.table import Table

    kwargs = {"path": HDF5_PATH} if fmt == "hdf5" else {}
    try:
        table = Table.read(path, format="ascii.ecsv" if fmt == "ecsv" else "hdf5", **kwargs)
    except Exception as exc:  # noqa: BLE001 - astropy raises many types for a bad file
        raise _fail(path, f"not a readable {fmt.upper()} results table "
                          f"({' '.join(str(exc).split())[:150]})") from exc
    shapes = {name: tuple(int(s) for s in table[name].shape[1:]) for name in table.colnames}
    return ResultsTable(path, fmt, len(table), tuple(table.colnames), dict(table.meta), shapes,
                        table=table)


def open_results(path: Path | str) -> ResultsTable:
    """Open a KBMOD Results file by its suffix; refuse what KBMOD would not read."""
    path = Path(path)
    fmt = results_format(path)
    if fmt is None:
        raise _fail(path, f"unsupported suffix '{path.suffix}': a KBMOD Results file is "
                          f"{', '.join(FORMATS)}")
    if not path.is_file():
        raise _fail(path, "no such file" if not path.exists() else "is not a file")
    table = _open_parquet(path) if fmt == "parquet" else _open_astropy(path, fmt)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise _fail(path, f"not a KBMOD Results table: required column(s) {missing} missing")
    if table.n_rows == 0:
        raise _fail(path, "has no rows")
    return table


def _column_values(table: ResultsTable, batch: Any, name: str) -> np.ndarray:
    """One column of a batch as numpy: (n,) scalars, (n, k) flattened cells; strings as str."""
    if table.fmt != "parquet":
        values = np.asarray(batch[name])
        return np.char.decode(values, "utf-8") if values.dtype.kind == "S" else values
    import pyarrow as pa

    col = batch.column(name)
    if pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type):
        n = len(col)
        flat = col.flatten().to_numpy(zero_copy_only=False)
        if n and flat.size % n:
            raise _fail(table.path, f"column '{name}' has cells of different lengths")
        return flat.reshape(n, -1) if n else flat.reshape(0, 0)
    values = col.to_numpy(zero_copy_only=False)
    if values.dtype.kind == "O":
        values = values.astype(str)
    return values


def iter_batches(table: ResultsTable, columns: Sequence[str],
                 batch_rows: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield ``(first_row, {column: values})`` over the table, ``batch_rows`` rows at a time."""
    rows = batch_rows or table.batch_rows()
    if table.fmt == "parquet":
        start = 0
        try:
            for batch in table.parquet.iter_batches(batch_size=rows, columns=list(columns)):
                yield start, {c: _column_values(table, batch, c) for c in columns}
                start += batch.num_rows
        except OSError as exc:
            raise _fail(table.path, f"unreadable Parquet data at row {start} "
                                    f"({' '.join(str(exc).split())[:150]})") from exc
        return
    for lo in range(0, table.n_rows, rows):
        part = table.table[lo:lo + rows]
        yield lo, {c: _column_values(table, part, c) for c in columns}


# --------------------------------------------------------------------------- stamps


def stamp_geometry(table: ResultsTable, column: str, stamp_shape: tuple[int, int]
                   ) -> tuple[int, int]:
    """Check ``column`` holds one 2-D image per row that can be centre-cropped to stamp_shape."""
    if column not in table.columns:
        have = table.image_columns()
        raise _fail(table.path, f"has no column '{column}' (image columns: "
                                f"{', '.join(have) if have else 'none'})")
    shape = table.image_shape(column)
    stored = table.cell_shapes.get(column, ())
    if shape is None:
        if len(stored) == 1:
            raise _fail(table.path, f"column '{column}' is flattened to {stored[0]} values per "
                                    f"row and the table meta has no '{SHAPES_KEY}' entry for it")
        raise _fail(table.path, f"column '{column}' is not an image column (image columns: "
                                f"{', '.join(table.image_columns()) or 'none'})")
    if len(shape) != 2:
        raise _fail(table.path, f"column '{column}' holds {shape} arrays per row, not one 2-D "
                                "co-added stamp (choose a coadd_* column)")
    if math.prod(stored) != math.prod(shape):
        raise _fail(table.path, f"column '{column}' holds {math.prod(stored)} values per row but "
                                f"'{SHAPES_KEY}' says {shape[0]}x{shape[1]}")
    h, w = shape
    H, W = stamp_shape
    if h < H or w < W:
        raise _fail(table.path, f"column '{column}' stamps are {h}x{w}, smaller than the "
                                f"model's {H}x{W} input")
    if (h - H) % 2 or (w - W) % 2:
        raise _fail(table.path, f"column '{column}' stamps are {h}x{w}: cannot centre-crop to "
                                f"{H}x{W} (the difference must be even)")
    return h, w


def crop_center(stamps: np.ndarray, stamp_shape: tuple[int, int]) -> np.ndarray:
    """The central ``stamp_shape`` pixels of (N, h, w) stamps (h - H and w - W even)."""
    h, w = stamps.shape[1:]
    dy, dx = (h - stamp_shape[0]) // 2, (w - stamp_shape[1]) // 2
    return np.ascontiguousarray(stamps[:, dy:dy + stamp_shape[0], dx:dx + stamp_shape[1]],
                                dtype=np.float32)


def check_uuids(table: ResultsTable) -> None:
    """Refuse a table without ``uuid`` (the join key is never invented) or with duplicates."""
    if UUID not in table.columns:
        raise _fail(table.path, "has no 'uuid' column, the join key (refused, not generated: "
                                "Results.read_table(f).write_table(f) in KBMOD adds one)")
    ids = np.concatenate([np.char.encode(b[UUID].astype(str), "utf-8")
                          for _, b in iter_batches(table, [UUID], MAX_BATCH_ROWS * 4)])
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dup = uniq[counts > 1]
        raise _fail(table.path, f"{len(dup):,} duplicate uuid(s), e.g. {dup[0].decode()!r}; "
                                "uuid must identify each row")


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
    wanted = [column, *meta_cols] + ([label_column] if label_column else [])
    with store.StoreWriter(out, labelled=label_column is not None, stamp_shape=stamp_shape,
                           chunk_rows=min(chunk_rows, table.n_rows), compression=compression,
                           overwrite=overwrite, attrs=attrs) as writer:
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

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class _Scored:
    """The new columns, computed batch by batch from the work store's scores."""

    probability: np.ndarray
    threshold: float
    stamp_shape: tuple[int, int]
    work_store: Path
    model: str
    occlusion_column: str | None

    @property
    def names(self) -> tuple[str, ...]:
        return NEW_COLUMNS + ((self.occlusion_column,) if self.occlusion_column else ())

    def values(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        p = self.probability[lo:hi].astype(np.float32)
        finite = np.isfinite(p)
        out = {"prob_real": p, "prob_bogus": (np.float32(1) - p).astype(np.float32),
               "cnn_class": np.greater_equal(p, self.threshold, where=finite,
                                             out=np.zeros(len(p), dtype=bool))}
        if self.occlusion_column:
            maps = np.full((hi - lo, *self.stamp_shape), np.nan, dtype=np.float32)
            rows, found = store.read_occlusion_range(self.work_store, self.model, lo, hi)
            maps[rows - lo] = found
            out[self.occlusion_column] = maps
        return out


def _signature(table: ResultsTable, column: str, stamp_shape: tuple[int, int]) -> str:
    """Identity of the staged stamps: a changed input or column means staging again."""
    st = table.path.stat()
    return json.dumps({"source": str(table.path.resolve()), "size": st.st_size,
                       "mtime_ns": st.st_mtime_ns, "column": column,
                       "stamp_shape": list(stamp_shape)}, sort_keys=True)


def _stage(table: ResultsTable, work: Path, column: str, stamp_shape: tuple[int, int],
           force: bool, chunk_rows: int) -> Path:
    """The work store holding the cropped stamps (reused when a killed run left it); its HDF5
    chunks are the scorer's tasks, so they follow the scorer's chunk size."""
    path = work / WORK_STORE
    signature = _signature(table, column, stamp_shape)
    if work.exists() and not force and path.exists():
        with contextlib.suppress(StampbatchError):
            if store.read_attrs(path).get("kbmod_signature") == signature:
                return path
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ingest_results(path, table.path, column=column, stamp_shape=stamp_shape,
                   chunk_rows=chunk_rows, attrs={"kbmod_signature": signature})
    return path


def _run_scorer(work_store: Path, model: Path | str, name: str, occlusion: str, patch: int,
                backend: str, options: dict[str, Any]) -> Any:
    """The one call into the Dask scorer (journaled, resumable) for the staged stamps."""
    from stampbatch import score

    return score.score_files([work_store], [model], name=name, occlusion=occlusion, patch=patch,
                             backend=backend, **options)


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
    from stampbatch import inference, score

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
    lock = score.TargetLock(output)
    lock.acquire()
    try:
        work = work_dir(output)
        options = dict(scorer_options or {})
        staged = _stage(table, work, column, spec.stamp_shape, force,
                        int(options.get("chunk_size", store.DEFAULT_CHUNK_ROWS)))
        run = _run_scorer(staged, model, source.name, occlusion, patch, backend, options)
        scores = store.read_scores(staged, source.name, with_maps=False)
        mode = str(scores.attrs.get("occlusion_mode", "none"))
        scored = _Scored(scores.probability, thr, spec.stamp_shape, staged, source.name,
                         f"occlusion_{source.name}" if mode != "none" else None)
        info = {"model": source.name, "model_sha256": source.sha256,
                "architecture": spec.architecture, "column": column,
                "crop": list(spec.stamp_shape), "threshold": float(thr),
                "threshold_from": origin, "occlusion": mode,
                "occlusion_patch": int(scores.attrs.get("occlusion_patch", 0)),
                "unscorable": int(np.isnan(scores.probability).sum()),
                "stampbatch_version": __version__,
                "scored_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
        write_results(table, output, scored, info, overwrite=force)
        shutil.rmtree(work, ignore_errors=True)
    finally:
        lock.release()
    p = scores.probability
    return KbmodSummary(table.path, output, source.name, source.sha256, column, table.n_rows,
                        info["unscorable"], int((p[np.isfinite(p)] >= thr).sum()),
                        thr, origin, len(scores.occlusion_index), run.stamps_scored,
                        time.monotonic() - t0, run.scheduler or "(already scored)")


# --------------------------------------------------------------------------- writing


def _new_meta(meta: dict[str, Any], scored: _Scored, info: dict[str, Any]) -> dict[str, Any]:
    out = dict(meta)
    if scored.occlusion_column:
        shapes = dict(out.get(SHAPES_KEY) or {})
        shapes[scored.occlusion_column] = list(scored.stamp_shape)
        out[SHAPES_KEY] = shapes
    out[META_KEY] = info
    return out


def write_results(table: ResultsTable, output: Path, scored: _Scored, info: dict[str, Any], *,
                  overwrite: bool = False) -> None:
    """Write the table plus the new columns to ``output`` (temporary name, fsync, rename)."""
    meta = _new_meta(table.meta, scored, info)
    with store.atomic_path(output, overwrite=overwrite, suffix=output.suffix) as tmp:
        if table.fmt == "parquet":
            _write_parquet(table, tmp, scored, meta)
        else:
            _write_astropy(table, tmp, scored, meta)


def _write_astropy(table: ResultsTable, tmp: Path, scored: _Scored, meta: dict[str, Any]) -> None:
    """ECSV / astropy-HDF5: the table in memory (as KBMOD holds it), written as KBMOD writes it."""
    t = table.table.copy(copy_data=False)
    t.remove_columns([c for c in scored.names if c in t.colnames])
    for name, values in scored.values(0, table.n_rows).items():
        t[name] = values
    t.meta = meta
    if table.fmt == "hdf5":
        t.write(tmp, format="hdf5", path=HDF5_PATH, serialize_meta=True, overwrite=True)
    else:
        t.write(tmp, format="ascii.ecsv", overwrite=True)


def _yaml_sections(lines: list[str]) -> list[tuple[str, list[str]]]:
    """Top-level sections (``datatype:``, ``meta:``, …) of an astropy YAML header, in order."""
    sections: list[tuple[str, list[str]]] = []
    for line in lines:
        if line and not line.startswith((" ", "-")):
            sections.append((line.split(":", 1)[0], [line]))
        elif sections:
            sections[-1][1].append(line)
    return sections


def _entries(section: list[str]) -> list[list[str]]:
    """The ``- …`` items of a YAML list section (continuation lines included)."""
    items: list[list[str]] = []
    for line in section[1:]:
        if line.startswith("- ") or not items:
            items.append([line])
        else:
            items[-1].append(line)
    return items


def _header_yaml(table: ResultsTable, scored: _Scored, meta: dict[str, Any]) -> str:
    """The original YAML header with the replaced columns' entries dropped, the new columns'
    entries appended (as astropy writes them) and the meta section rewritten (astropy's
    dumper is deterministic: the original keys come out as they were)."""
    from astropy.table import Table
    from astropy.table import meta as table_meta

    old_lines = table.parquet.schema_arrow.metadata[YAML_KEY].decode().splitlines() \
        if YAML_KEY in (table.parquet.schema_arrow.metadata or {}) else ["datatype:"]
    old = _yaml_sections(old_lines)
    names = [d["name"] for d in table_meta.get_header_from_yaml(old_lines).get("datatype", [])]
    zero = scored.values(0, 0)
    new = Table({k: zero[k] for k in scored.names}, meta=meta)
    new_sections = dict(_yaml_sections(table_meta.get_yaml_from_table(new)))
    out: list[str] = []
    for key, lines in old:
        if key == "datatype":
            kept = [e for n, e in zip(names, _entries(lines)) if n not in scored.names]
            out += ["datatype:", *[x for e in kept for x in e], *new_sections["datatype"][1:]]
        elif key == "meta":
            out += new_sections["meta"]
        else:
            out += lines
    if "meta" not in dict(old):
        out += new_sections["meta"]
    return "\n".join(out)


def _write_parquet(table: ResultsTable, tmp: Path, scored: _Scored, meta: dict[str, Any]) -> None:
    """Stream the original columns through unchanged (Arrow arrays, no conversion) and append
    the new ones, one bounded batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = table.parquet.schema_arrow
    keep = [f for f in schema if f.name not in scored.names]
    h, w = scored.stamp_shape
    new_fields = [pa.field("prob_real", pa.float32()), pa.field("prob_bogus", pa.float32()),
                  pa.field("cnn_class", pa.bool_())]
    if scored.occlusion_column:
        new_fields.append(pa.field(scored.occlusion_column, pa.list_(pa.float32(), h * w)))
    dropped = {f"table::len::{n}".encode() for n in scored.names}
    metadata = {k: v for k, v in (schema.metadata or {}).items() if k not in dropped}
    metadata[YAML_KEY] = _header_yaml(table, scored, meta).encode()
    out_schema = pa.schema(keep + new_fields, metadata=metadata)
    rows = table.batch_rows()
    start = 0
    with pq.ParquetWriter(tmp, out_schema, version="2.4") as writer:
        for batch in table.parquet.iter_batches(batch_size=rows, columns=[f.name for f in keep]):
            n = batch.num_rows
            new = scored.values(start, start + n)
            arrays = [batch.column(f.name) for f in keep]
            arrays += [pa.array(new[f.name]) for f in new_fields[:3]]
            if scored.occlusion_column:
                arrays.append(pa.FixedSizeListArray.from_arrays(
                    pa.array(new[scored.occlusion_column].reshape(-1)), h * w))
            writer.write_table(pa.Table.from_arrays(arrays, schema=out_schema), row_group_size=rows)
            start += n
    if start != table.n_rows:
        raise _fail(table.path, f"read {start:,} rows of {table.n_rows:,} (truncated?)")
