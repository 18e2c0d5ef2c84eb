"""The KBMOD Results format itself: open a Results file by its suffix, read its columns in
bounded batches, reshape and centre-crop its image columns, and write it back with new
columns — the original columns, rows and meta untouched (Parquet: Arrow arrays streamed
through, the astropy YAML header spliced; ECSV/HDF5: astropy, as KBMOD writes them)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stampbatch import store
from stampbatch.errors import KbmodError, TableDataError

FORMATS = {".parquet": "parquet", ".parq": "parquet", ".ecsv": "ecsv", ".hdf5": "hdf5"}
REQUIRED_COLUMNS = ("x", "y", "vx", "vy", "likelihood", "flux", "obs_count")
UUID = "uuid"
SHAPES_KEY = "image_column_shapes"
YAML_KEY = b"table_meta_yaml"
HDF5_PATH = "__astropy_table__"
BATCH_BYTES = 64 << 20          # bytes of table read per Parquet batch
MAX_BATCH_ROWS = 65536
READ_BUFFER = 4 << 20           # Parquet read buffer (bytes)
NEW_COLUMNS = ("prob_real", "prob_bogus", "cnn_class")
META_KEY = "stampbatch"


def fail(path: Path | str, problem: str, cls: type[KbmodError] = KbmodError) -> KbmodError:
    """The KbmodError (or ``cls``) for ``path``: one line naming the file and the problem."""
    return cls(f"{path}: {problem}")


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
        return max(1, sum(c.dtype.itemsize * math.prod(c.shape[1:])
                          for c in self.table.columns.values()))

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
        raise fail(path, f"unreadable astropy table meta ({' '.join(str(exc).split())[:150]})") from exc


def _open_parquet(path: Path) -> ResultsTable:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # pre_buffer off and a small read buffer: pages are read as the batches need them
        # (pre-buffering holds whole row groups, which astropy writes up to 1 Mi rows long)
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER)
    except (OSError, pa.ArrowException) as exc:
        raise fail(path, f"not a readable Parquet file, truncated? ({' '.join(str(exc).split())[:150]})") from exc
    names = pf.schema_arrow.names
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise fail(path, f"column name(s) {', '.join(repr(n) for n in dup)} appear more than "
                          "once; a Results table needs unique column names")
    header = _yaml_header(path, pf.schema_arrow.metadata)
    shapes: dict[str, tuple[int, ...]] = {}
    for f in pf.schema_arrow:
        if pa.types.is_fixed_size_list(f.type):
            shapes[f.name] = (f.type.list_size,)
        elif pa.types.is_list(f.type) or pa.types.is_large_list(f.type):
            shapes[f.name] = (-1,)                  # variable length per row
        else:
            shapes[f.name] = ()
        if shapes[f.name] and _nested(f.type):
            shapes[f.name] = (-2,)                  # lists of lists: refused where used
    return ResultsTable(path, "parquet", pf.metadata.num_rows, tuple(pf.schema_arrow.names),
                        dict(header.get("meta") or {}), shapes, parquet=pf)


def _nested(arrow_type: Any) -> bool:
    """A list type whose values are lists again (list<list<float>>, as pandas writes 2-D)."""
    import pyarrow as pa

    value = arrow_type.value_type
    return pa.types.is_list(value) or pa.types.is_large_list(value) or \
        pa.types.is_fixed_size_list(value)


def _open_astropy(path: Path, fmt: str) -> ResultsTable:
    from astropy.table import Table

    kwargs = {"path": HDF5_PATH} if fmt == "hdf5" else {}
    try:
        table = Table.read(path, format="ascii.ecsv" if fmt == "ecsv" else "hdf5", **kwargs)
    except Exception as exc:  # noqa: BLE001 - astropy raises many types for a bad file
        raise fail(path, f"not a readable {fmt.upper()} results table "
                          f"({' '.join(str(exc).split())[:150]})") from exc
    shapes = {name: tuple(int(s) for s in table[name].shape[1:]) for name in table.colnames}
    return ResultsTable(path, fmt, len(table), tuple(table.colnames), dict(table.meta), shapes,
                        table=table)


def open_results(path: Path | str) -> ResultsTable:
    """Open a KBMOD Results file by its suffix; refuse what KBMOD would not read."""
    path = Path(path)
    fmt = results_format(path)
    if fmt is None:
        raise fail(path, f"unsupported suffix '{path.suffix}': a KBMOD Results file is "
                          f"{', '.join(FORMATS)}")
    if not path.is_file():
        raise fail(path, "no such file" if not path.exists() else "is not a file")
    table = _open_parquet(path) if fmt == "parquet" else _open_astropy(path, fmt)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise fail(path, f"not a KBMOD Results table: required column(s) {missing} missing")
    if table.n_rows == 0:
        raise fail(path, "has no rows")
    return table


def _column_values(table: ResultsTable, batch: Any, name: str, first_row: int = 0) -> np.ndarray:
    """One column of a batch as numpy: (n,) scalars, (n, k) flattened cells; strings as str."""
    if table.fmt != "parquet":
        return _astropy_values(batch[name])
    import pyarrow as pa

    col = batch.column(name)
    if pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type):
        n = len(col)
        if col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise fail(table.path, f"column '{name}' is null in {col.null_count:,} row(s) of "
                                    f"this batch, e.g. row {first_row + row:,} (no values); "
                                    "drop or fill those rows", TableDataError)
        if _nested(col.type):
            raise fail(table.path, f"column '{name}' holds nested lists ({col.type}); KBMOD "
                                    "stores an image column as one flat list per row with its "
                                    f"shape in the table meta '{SHAPES_KEY}'", TableDataError)
        if pa.types.is_list(col.type) and n:
            lengths = col.value_lengths().to_numpy(zero_copy_only=False)
            if (lengths != lengths[0]).any():
                row = int(np.flatnonzero(lengths != lengths[0])[0])
                raise fail(table.path, f"column '{name}' is ragged: row {first_row:,} holds "
                                        f"{int(lengths[0]):,} values, row {first_row + row:,} "
                                        f"{int(lengths[row]):,}", TableDataError)
        flat = col.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(n, -1) if n else flat.reshape(0, 0)
    if col.null_count and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.fill_null("")                     # a null id reads as empty, not "None"
    values = col.to_numpy(zero_copy_only=False)
    if values.dtype.kind == "O":
        values = values.astype(str)
    return values


def _astropy_values(col: Any) -> np.ndarray:
    """An astropy column as numpy, masked cells (ECSV ``null``, astropy-HDF5 ``.mask``) as
    NaN in numbers and "" in strings (their stored value is a placeholder, often 0, never
    data: a masked pixel read as 0 would be scored as sky)."""
    values = np.asarray(col)
    if values.dtype.kind == "S":
        values = np.char.decode(values, "utf-8")
    mask = getattr(col, "mask", None)
    if mask is None or not np.any(mask):
        return values
    mask = np.asarray(mask, dtype=bool)
    if values.dtype.kind in "US":
        return np.where(mask, "", values)
    if values.dtype.kind in "iub":
        values = values.astype(np.float64)
    return np.where(mask, np.nan, values)


def _parquet_batches(table: ResultsTable, columns: Sequence[str],
                     batch_rows: int) -> Iterator[tuple[int, Any]]:
    """``(first_row, Arrow record batch)`` of a Parquet table; a read failure as one line."""
    import pyarrow as pa

    start = 0
    try:
        for batch in table.parquet.iter_batches(batch_size=batch_rows, columns=list(columns)):
            yield start, batch
            start += batch.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise fail(table.path, f"unreadable Parquet data at row {start} "
                                f"({' '.join(str(exc).split())[:150]})",
                    TableDataError) from exc


def iter_batches(table: ResultsTable, columns: Sequence[str],
                 batch_rows: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield ``(first_row, {column: values})`` over the table, ``batch_rows`` rows at a time."""
    rows = batch_rows or table.batch_rows()
    if table.fmt == "parquet":
        for start, batch in _parquet_batches(table, columns, rows):
            yield start, {c: _column_values(table, batch, c, start) for c in columns}
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
        raise fail(table.path, f"has no column '{column}' (image columns: "
                                f"{', '.join(have) if have else 'none'})")
    shape = table.image_shape(column)
    stored = table.cell_shapes.get(column, ())
    if shape is None:
        if len(stored) == 1:
            raise fail(table.path, f"column '{column}' is flattened to {stored[0]} values per "
                                    f"row and the table meta has no '{SHAPES_KEY}' entry for it")
        raise fail(table.path, f"column '{column}' is not an image column (image columns: "
                                f"{', '.join(table.image_columns()) or 'none'})")
    if stored == (-2,):
        raise fail(table.path, f"column '{column}' holds nested lists (a list of lists per "
                                "row); KBMOD stores an image column as one flat list per row "
                                f"with its shape in the table meta '{SHAPES_KEY}'")
    if len(shape) != 2:
        raise fail(table.path, f"column '{column}' holds {shape} arrays per row, not one 2-D "
                                "co-added stamp (choose a coadd_* column)")
    if stored == (-1,):
        pass    # a variable-length list: each batch checks its rows hold h*w values
    elif math.prod(stored) != math.prod(shape):
        raise fail(table.path, f"column '{column}' holds {math.prod(stored)} values per row but "
                                f"'{SHAPES_KEY}' says {shape[0]}x{shape[1]}")
    h, w = shape
    H, W = stamp_shape
    if h < H or w < W:
        raise fail(table.path, f"column '{column}' stamps are {h}x{w}, smaller than the "
                                f"model's {H}x{W} input")
    if (h - H) % 2 or (w - W) % 2:
        raise fail(table.path, f"column '{column}' stamps are {h}x{w}: cannot centre-crop to "
                                f"{H}x{W} (the difference must be even)")
    return h, w


def crop_center(stamps: np.ndarray, stamp_shape: tuple[int, int]) -> np.ndarray:
    """The central ``stamp_shape`` pixels of (N, h, w) stamps (h - H and w - W even)."""
    from stampbatch.train.preprocess import SENTINEL_ABS

    h, w = stamps.shape[1:]
    dy, dx = (h - stamp_shape[0]) // 2, (w - stamp_shape[1]) // 2
    crop = stamps[:, dy:dy + stamp_shape[0], dx:dx + stamp_shape[1]]
    if crop.dtype.kind == "f" and crop.dtype.itemsize > 4:
        # fill values beyond float32 (1e300) are masked pixels: NaN, not an overflow to inf
        with np.errstate(invalid="ignore"):
            crop = np.where(np.abs(crop) < SENTINEL_ABS, crop, np.nan)
    return np.ascontiguousarray(crop, dtype=np.float32)


def check_uuids(table: ResultsTable) -> None:
    """Refuse a table without ``uuid`` (the join key is never invented) or with duplicates."""
    if UUID not in table.columns:
        raise fail(table.path, "has no 'uuid' column, the join key (refused, not generated: "
                                "Results.read_table(f).write_table(f) in KBMOD adds one)")
    ids = np.concatenate([np.char.encode(b[UUID].astype(str), "utf-8")
                          for _, b in iter_batches(table, [UUID], MAX_BATCH_ROWS * 4)])
    empty = np.flatnonzero(np.char.strip(ids) == b"")
    if len(empty):
        raise fail(table.path, f"{len(empty):,} row(s) have a null or empty uuid, e.g. row "
                                f"{int(empty[0]):,}; uuid must identify each row")
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dup = uniq[counts > 1]
        raise fail(table.path, f"{len(dup):,} duplicate uuid(s), e.g. {dup[0].decode()!r}; "
                                "uuid must identify each row")




def read_stamp_batches(table: ResultsTable, column: str, stamp_shape: tuple[int, int],
                       batch_rows: int, *, with_rows: bool = False
                       ) -> Iterator[tuple[int, Any, np.ndarray]]:
    """Yield ``(first_row, raw, stamps)``: the centre-cropped stamps of ``column`` in batches
    of at most ``batch_rows``, and with ``with_rows`` the batch's raw Arrow record (every original column, for
    :class:`ResultsWriter`; None for ECSV/HDF5, which are held whole)."""
    shape = table.image_shape(column)
    assert shape is not None, f"{column} is not an image column"   # callers validated it
    if table.fmt != "parquet":
        for lo, batch in iter_batches(table, [column], batch_rows):
            yield lo, None, crop_center(batch[column].reshape(-1, *shape), stamp_shape)
        return
    names = list(table.columns) if with_rows else [column]
    read = 0
    for start, batch in _parquet_batches(table, names, batch_rows):
        stamps = _column_values(table, batch, column, start).reshape(-1, *shape)
        yield start, batch if with_rows else None, crop_center(stamps, stamp_shape)
        read = start + batch.num_rows
    if read != table.n_rows:
        raise fail(table.path, f"read {read:,} rows of {table.n_rows:,} (truncated?)",
                    TableDataError)


@dataclass(frozen=True)
class NewColumns:
    """The columns scoring adds: prob_real, prob_bogus, cnn_class (at ``threshold``) and,
    when maps are made, the image column ``occlusion_column``."""

    threshold: float
    stamp_shape: tuple[int, int]
    occlusion_column: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return NEW_COLUMNS + ((self.occlusion_column,) if self.occlusion_column else ())

    def values(self, probability: np.ndarray, map_rows: np.ndarray | None = None,
               maps: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The new columns of a run of rows: their P(source), and the maps of the rows
        ``map_rows`` (counted from the first of them); NaN where a row has no map."""
        p = np.asarray(probability, dtype=np.float32)
        finite = np.isfinite(p)
        out = {"prob_real": p, "prob_bogus": (np.float32(1) - p).astype(np.float32),
               "cnn_class": np.greater_equal(p, self.threshold, where=finite,
                                             out=np.zeros(len(p), dtype=bool))}
        if self.occlusion_column:
            full = np.full((len(p), *self.stamp_shape), np.nan, dtype=np.float32)
            if map_rows is not None and len(map_rows):
                full[map_rows] = maps
            out[self.occlusion_column] = full
        return out


# --------------------------------------------------------------------------- writing


def _new_meta(meta: dict[str, Any], scored: NewColumns, info: dict[str, Any]) -> dict[str, Any]:
    out = dict(meta)
    if scored.occlusion_column:
        shapes = dict(out.get(SHAPES_KEY) or {})
        shapes[scored.occlusion_column] = list(scored.stamp_shape)
        out[SHAPES_KEY] = shapes
    out[META_KEY] = info
    return out


class ResultsWriter:
    """Write the table plus the new columns to ``output``, batch by batch as they are scored,
    under a temporary name that is fsynced and renamed only when every row is in.

    Parquet streams: each batch's original Arrow columns go through unchanged beside its new
    columns. ECSV/astropy-HDF5 are written whole at the end, as KBMOD writes them.

    >>> with ResultsWriter(table, out, scored, info) as w:     # doctest: +SKIP
    ...     w.write(raw_batch, scored.values(p))
    """

    def __init__(self, table: ResultsTable, output: Path, scored: NewColumns,
                 info: dict[str, Any], *, overwrite: bool = False) -> None:
        self.table, self.output, self.scored = table, output, scored
        self.meta = _new_meta(table.meta, scored, info)
        self.overwrite = overwrite
        self.rows = 0
        self._parts: list[dict[str, np.ndarray]] = []
        self._ctx: Any = None
        self._writer: Any = None

    def __enter__(self) -> ResultsWriter:
        self._ctx = store.atomic_path(self.output, overwrite=self.overwrite,
                                      suffix=self.output.suffix)
        self._tmp = self._ctx.__enter__()
        if self.table.fmt == "parquet":
            self._writer, self._fields = _parquet_writer(self.table, self._tmp, self.scored,
                                                         self.meta)
        return self

    def write(self, raw: Any, new: dict[str, np.ndarray]) -> None:
        """One batch: its raw Arrow record (Parquet; None otherwise) and its new columns."""
        n = len(new["prob_real"])
        if self._writer is None:
            self._parts.append(new)
        else:
            import pyarrow as pa

            keep, added = self._fields
            arrays = [raw.column(f.name) for f in keep]
            arrays += [pa.array(new[f.name]) for f in added[:3]]
            if self.scored.occlusion_column:
                arrays.append(pa.FixedSizeListArray.from_arrays(
                    pa.array(new[self.scored.occlusion_column].reshape(-1)),
                    added[3].type.list_size))
            self._writer.write_table(pa.Table.from_arrays(arrays, schema=self._writer.schema),
                                     row_group_size=max(1, n))
        self.rows += n

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
            if exc_type is None and self.rows != self.table.n_rows:
                raise fail(self.table.path, f"wrote {self.rows:,} rows of "
                                             f"{self.table.n_rows:,} (truncated?)")
            if exc_type is None and self._writer is None:
                new = {k: np.concatenate([p[k] for p in self._parts]) for k in self.scored.names}
                _write_astropy(self.table, self._tmp, new, self.meta)
        except BaseException as err:
            self._ctx.__exit__(type(err), err, err.__traceback__)
            raise
        self._ctx.__exit__(exc_type, exc, tb)


def _write_astropy(table: ResultsTable, tmp: Path, new: dict[str, np.ndarray],
                   meta: dict[str, Any]) -> None:
    """ECSV / astropy-HDF5: the table in memory (as KBMOD holds it), written as KBMOD writes it."""
    t = table.table.copy(copy_data=False)
    t.remove_columns([c for c in new if c in t.colnames])
    for name, values in new.items():
        t[name] = values
    t.meta = meta
    if table.fmt == "hdf5":
        import warnings

        with warnings.catch_warnings():   # KBMOD's path is astropy's default, which it warns of
            warnings.filterwarnings("ignore", message="table path was not set",
                                    category=UserWarning)
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


def _header_yaml(table: ResultsTable, scored: NewColumns, meta: dict[str, Any]) -> str:
    """The original YAML header with the replaced columns' entries dropped, the new columns'
    entries appended (as astropy writes them) and the meta section rewritten (astropy's
    dumper is deterministic: the original keys come out as they were)."""
    from astropy.table import Table
    from astropy.table import meta as table_meta

    old_lines = table.parquet.schema_arrow.metadata[YAML_KEY].decode().splitlines() \
        if YAML_KEY in (table.parquet.schema_arrow.metadata or {}) else ["datatype:"]
    old = _yaml_sections(old_lines)
    names = [d["name"] for d in table_meta.get_header_from_yaml(old_lines).get("datatype", [])]
    zero = scored.values(np.empty(0, dtype=np.float32))
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


def _parquet_writer(table: ResultsTable, tmp: Path, scored: NewColumns,
                    meta: dict[str, Any]) -> tuple[Any, tuple[list[Any], list[Any]]]:
    """A ParquetWriter for the output schema: the original fields (less any column the new
    ones replace), the new fields, the astropy YAML header spliced; and (kept, new) fields."""
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
    # no dictionary attempt and no min/max statistics on image columns: noisy pixels never
    # fit a dictionary, and nothing filters on a pixel's range; both only cost time
    scalars = [f.name for f in out_schema if not pa.types.is_fixed_size_list(f.type)
               and not pa.types.is_list(f.type)]
    writer = pq.ParquetWriter(tmp, out_schema, version="2.4", use_dictionary=scalars,
                              write_statistics=scalars)
    return writer, (keep, new_fields)
