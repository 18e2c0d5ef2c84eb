"""The HDF5 stamp store (schema version 1) — the only module that knows dataset names.

A store holds raw co-added stamps (``/stamps``, float32 (N, H, W), chunked along N),
optional class labels (``/labels``, int8, 1 = source at the centre, 0 = no source),
per-stamp metadata columns (``/meta/<column>``, 1-D of length N) and the scores that
trained models gave the stamps (``/scores/<model>/...``).

Guarantees kept here:

* a new store is written under a temporary name in the same directory and renamed into
  place only when complete, so a crash never leaves a half-written store under the real
  name, and an existing file is never replaced unless asked (``overwrite=True``);
* every problem with an input file surfaces as :class:`StoreError` whose one-line message
  names the file and what is wrong;
* reading is chunked: nothing here loads a whole store into memory unless asked.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stampbatch.errors import StampbatchError

SCHEMA_VERSION = 1
DEFAULT_STAMP_SHAPE = (21, 21)
DEFAULT_CHUNK_ROWS = 4096
COMPRESSIONS = (None, "lzf", "gzip")

# Dataset and attribute names: private to this module.
_STAMPS = "stamps"
_LABELS = "labels"
_META = "meta"
_SCORES = "scores"
_PROBABILITY = "probability"
_OCCLUSION = "occlusion"
_OCCLUSION_INDEX = "occlusion_index"
_ATTR_SCHEMA = "stampbatch_schema"
_ATTR_SHAPE = "stamp_shape"
_ATTR_COMPLETE = "complete"
_ATTR_SOURCE = "source_file"


class StoreError(StampbatchError, ValueError):
    """A stamp store (or an array meant to become one) is unusable; the message is one line."""


@dataclass(frozen=True)
class StoreInfo:
    """What a validated store contains, without its data."""

    path: Path
    n_stamps: int
    stamp_shape: tuple[int, int]
    labelled: bool
    meta_columns: tuple[str, ...]
    scored_models: tuple[str, ...]
    chunk_rows: int
    compression: str | None
    is_score_file: bool = False


@dataclass
class Chunk:
    """A contiguous block of rows ``[start, stop)`` read from a store."""

    start: int
    stop: int
    stamps: np.ndarray
    labels: np.ndarray | None = None
    meta: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Scores:
    """The scores one model gave a store: probabilities for every row, maps for some."""

    model: str
    probability: np.ndarray
    occlusion_index: np.ndarray
    occlusion: np.ndarray | None
    attrs: dict[str, Any]


# --------------------------------------------------------------------------- helpers


def _fail(path: Path | str, problem: str) -> StoreError:
    return StoreError(f"{path}: {problem}")


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _as_storable_column(path: Path | str, name: str, values: Any, n: int) -> np.ndarray:
    """Metadata columns are numeric, boolean or short strings (stored as fixed-width bytes)."""
    arr = np.asarray(values)
    if arr.ndim != 1 or len(arr) != n:
        raise _fail(path, f"metadata column '{name}' has shape {arr.shape}, expected ({n},)")
    if arr.dtype.kind == "U":
        arr = np.char.encode(arr, "utf-8")
    if arr.dtype.kind == "O":
        raise _fail(path, f"metadata column '{name}' holds Python objects; use numbers or strings")
    if arr.dtype.kind not in "fiubS":
        raise _fail(path, f"metadata column '{name}' has unsupported dtype {arr.dtype}")
    return arr


def _decode_column(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "S":
        return np.char.decode(arr, "utf-8")
    return arr


def check_stamps(path: Path | str, stamps: Any, stamp_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Return ``stamps`` as float32 (N, H, W), or raise a StoreError saying what is wrong."""
    arr = np.asarray(stamps)
    if arr.dtype.kind == "O":
        raise _fail(path, "stamps are Python objects, not numbers")
    if arr.dtype.kind not in "fiu":
        raise _fail(path, f"stamps have dtype {arr.dtype}, expected a numeric array")
    if arr.ndim != 3:
        raise _fail(path, f"stamps have shape {arr.shape}, expected (N, H, W)")
    if arr.shape[0] == 0:
        raise _fail(path, "no stamps (the array is empty)")
    if stamp_shape is not None and tuple(arr.shape[1:]) != tuple(stamp_shape):
        raise _fail(path, f"stamps are {arr.shape[1]}x{arr.shape[2]}, expected "
                          f"{stamp_shape[0]}x{stamp_shape[1]}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def check_labels(path: Path | str, labels: Any, n: int) -> np.ndarray:
    """Return labels as int8 of length n holding only 0 and 1, or raise a StoreError."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or len(arr) != n:
        raise _fail(path, f"labels have shape {arr.shape}, expected ({n},) to match the stamps")
    if arr.dtype.kind not in "iub" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise _fail(path, f"labels have dtype {arr.dtype}, expected integers 0/1")
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        raise _fail(path, f"labels must be 0 or 1; found {np.unique(arr[bad])[:5].tolist()}")
    return arr.astype(np.int8)


# --------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_path(path: Path | str, *, overwrite: bool = False, suffix: str = ".h5") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The destination directory must be writable; an existing destination is refused unless
    ``overwrite``. On any exception the temporary file is removed and the destination is
    left exactly as it was.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists() and not overwrite:
        raise _fail(path, "already exists (pass --overwrite to replace it)")
    if path.is_dir():
        raise _fail(path, "is a directory")
    if not parent.is_dir():
        raise _fail(path, f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise _fail(path, f"directory {parent} is not writable")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial" + suffix, dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp makes the file private (0600); a store is shared data: honour the umask instead.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class StoreWriter:
    """Stream batches of stamps into a new store, atomically.

    >>> with StoreWriter("train.h5", labelled=True) as w:   # doctest: +SKIP
    ...     w.append(stamps, labels, {"snr": snr})

    The file appears under its real name only when the ``with`` block ends without an error.
    Every batch must carry the same metadata columns.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        labelled: bool,
        stamp_shape: tuple[int, int] = DEFAULT_STAMP_SHAPE,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        compression: str | None = None,
        overwrite: bool = False,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        if compression not in COMPRESSIONS:
            raise _fail(path, f"unknown compression {compression!r}; choose from none, lzf, gzip")
        if chunk_rows < 1:
            raise _fail(path, f"chunk_rows must be positive, got {chunk_rows}")
        self.path = Path(path)
        self.labelled = labelled
        self.stamp_shape = (int(stamp_shape[0]), int(stamp_shape[1]))
        self.chunk_rows = int(chunk_rows)
        self.compression = compression
        self.overwrite = overwrite
        self.attrs = dict(attrs or {})
        self.n = 0
        self._meta_names: tuple[str, ...] | None = None
        self._ctx: contextlib.AbstractContextManager[Path] | None = None
        self._h5: h5py.File | None = None

    def __enter__(self) -> StoreWriter:
        self._ctx = atomic_path(self.path, overwrite=self.overwrite)
        tmp = self._ctx.__enter__()
        try:
            self._h5 = h5py.File(tmp, "w")
            h, w = self.stamp_shape
            self._h5.create_dataset(
                _STAMPS, shape=(0, h, w), maxshape=(None, h, w), dtype=np.float32,
                chunks=(self.chunk_rows, h, w), compression=self.compression,
            )
            if self.labelled:
                self._h5.create_dataset(_LABELS, shape=(0,), maxshape=(None,), dtype=np.int8,
                                        chunks=(max(self.chunk_rows, 1024),))
            self._h5.create_group(_META)
            self._h5.attrs[_ATTR_SCHEMA] = SCHEMA_VERSION
            self._h5.attrs[_ATTR_SHAPE] = np.asarray(self.stamp_shape, dtype=np.int64)
            for key, value in self.attrs.items():
                self._h5.attrs[key] = value
        except BaseException as exc:
            self._abort(exc)
            raise
        return self

    def append(
        self,
        stamps: Any,
        labels: Any = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Add a batch of stamps (with labels when the store is labelled) and metadata."""
        assert self._h5 is not None, "use StoreWriter inside a with block"
        arr = check_stamps(self.path, stamps, self.stamp_shape)
        n = arr.shape[0]
        meta = dict(meta or {})
        names = tuple(sorted(meta))
        if self._meta_names is None:
            self._meta_names = names
        elif names != self._meta_names:
            raise _fail(self.path, f"metadata columns changed between batches: "
                                   f"{list(self._meta_names)} then {list(names)}")
        columns = {k: _as_storable_column(self.path, k, v, n) for k, v in meta.items()}
        if self.labelled:
            if labels is None:
                raise _fail(self.path, "labels are required for a labelled store")
            lab = check_labels(self.path, labels, n)
        elif labels is not None:
            raise _fail(self.path, "labels given for an unlabelled (candidate) store")
        start, stop = self.n, self.n + n
        ds = self._h5[_STAMPS]
        ds.resize(stop, axis=0)
        ds[start:stop] = arr
        if self.labelled:
            ds_l = self._h5[_LABELS]
            ds_l.resize(stop, axis=0)
            ds_l[start:stop] = lab
        group = self._h5[_META]
        for name, col in columns.items():
            if name not in group:
                if start != 0:
                    raise _fail(self.path, f"metadata column '{name}' appeared after row 0")
                group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=col.dtype,
                                     chunks=(max(self.chunk_rows, 1024),))
            elif group[name].dtype.kind == "S" and col.dtype.itemsize > group[name].dtype.itemsize:
                raise _fail(self.path, f"metadata column '{name}' strings grew longer than "
                                       f"{group[name].dtype.itemsize} bytes")
            group[name].resize(stop, axis=0)
            group[name][start:stop] = col
        self.n = stop

    def _abort(self, exc: BaseException) -> None:
        if self._h5 is not None:
            with contextlib.suppress(Exception):
                self._h5.close()
            self._h5 = None
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            with contextlib.suppress(BaseException):
                ctx.__exit__(type(exc), exc, exc.__traceback__)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None and self.n == 0:
            exc = _fail(self.path, "no stamps were written")
            self._abort(exc)
            raise exc
        if exc is not None:
            self._abort(exc)
            return
        assert self._h5 is not None and self._ctx is not None
        self._h5.close()
        self._h5 = None
        ctx, self._ctx = self._ctx, None
        ctx.__exit__(None, None, None)


def create_store(
    path: Path | str,
    stamps: Any,
    labels: Any = None,
    meta: Mapping[str, Any] | None = None,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    compression: str | None = None,
    overwrite: bool = False,
) -> StoreInfo:
    """Write a whole in-memory array of stamps as a new store (atomically) and validate it."""
    arr = check_stamps(path, stamps)
    with StoreWriter(path, labelled=labels is not None, stamp_shape=arr.shape[1:],
                     chunk_rows=min(chunk_rows, len(arr)) or 1, compression=compression,
                     overwrite=overwrite) as writer:
        writer.append(arr, labels, meta)
    return open_store(path)


# --------------------------------------------------------------------------- reading


def _open_h5(path: Path | str, mode: str = "r") -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "is a directory, not an HDF5 file")
    if not h5py.is_hdf5(path):
        raise _fail(path, "not an HDF5 file")
    try:
        return h5py.File(path, mode)
    except PermissionError as exc:
        raise _fail(path, f"cannot open for {'writing' if mode != 'r' else 'reading'}: permission denied") from exc
    except OSError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "unable to lock file" in first.lower() or "file locking" in first.lower():
            raise _fail(path, "is locked by another process (is a scorer still running on it?)") from exc
        raise _fail(path, f"unreadable or truncated HDF5 file ({first})") from exc


def _validate(path: Path, h5: h5py.File) -> StoreInfo:
    version = h5.attrs.get(_ATTR_SCHEMA)
    is_score_file = _ATTR_SOURCE in h5.attrs and _STAMPS not in h5
    if version is None:
        raise _fail(path, f"not a stampbatch store (no '{_ATTR_SCHEMA}' attribute)")
    if int(version) != SCHEMA_VERSION:
        raise _fail(path, f"schema version {int(version)} is not supported (this stampbatch reads {SCHEMA_VERSION})")
    shape_attr = h5.attrs.get(_ATTR_SHAPE)
    if shape_attr is None or len(shape_attr) != 2:
        raise _fail(path, f"missing or malformed '{_ATTR_SHAPE}' attribute")
    stamp_shape = (int(shape_attr[0]), int(shape_attr[1]))
    models = tuple(sorted(h5[_SCORES].keys())) if _SCORES in h5 else ()
    if is_score_file:
        n = int(h5.attrs.get("n_stamps", 0))
        return StoreInfo(path, n, stamp_shape, False, (), models, 0, None, True)
    if _STAMPS not in h5 or not isinstance(h5[_STAMPS], h5py.Dataset):
        raise _fail(path, "has no /stamps dataset")
    ds = h5[_STAMPS]
    if ds.dtype != np.float32:
        raise _fail(path, f"/stamps has dtype {ds.dtype}, expected float32")
    if ds.ndim != 3 or tuple(ds.shape[1:]) != stamp_shape:
        raise _fail(path, f"/stamps has shape {ds.shape}, expected (N, {stamp_shape[0]}, {stamp_shape[1]})")
    n = int(ds.shape[0])
    if n == 0:
        raise _fail(path, "/stamps is empty")
    labelled = _LABELS in h5
    if labelled:
        lab = h5[_LABELS]
        if lab.ndim != 1 or lab.shape[0] != n:
            raise _fail(path, f"/labels has shape {lab.shape}, expected ({n},) to match /stamps")
        if lab.dtype.kind not in "iu":
            raise _fail(path, f"/labels has dtype {lab.dtype}, expected integers")
    meta_cols: list[str] = []
    if _META in h5:
        for name, col in h5[_META].items():
            if not isinstance(col, h5py.Dataset) or col.ndim != 1 or col.shape[0] != n:
                shape = getattr(col, "shape", "a group")
                raise _fail(path, f"/meta/{name} has shape {shape}, expected ({n},)")
            meta_cols.append(name)
    for model in models:
        grp = h5[_SCORES][model]
        if _PROBABILITY in grp and grp[_PROBABILITY].shape != (n,):
            raise _fail(path, f"/scores/{model}/probability has shape {grp[_PROBABILITY].shape}, expected ({n},)")
    chunk_rows = int(ds.chunks[0]) if ds.chunks else n
    return StoreInfo(path, n, stamp_shape, labelled, tuple(sorted(meta_cols)), models,
                     chunk_rows, ds.compression, False)


def open_store(path: Path | str, *, check_labels_values: bool = False) -> StoreInfo:
    """Open and validate a store; raise StoreError naming the file and the first problem.

    With ``check_labels_values`` the labels are also read (in chunks) and checked to hold
    only 0 and 1 — worth it before training, not needed for scoring.
    """
    path = Path(path)
    with _open_h5(path) as h5:
        info = _validate(path, h5)
        if check_labels_values and info.labelled:
            lab = h5[_LABELS]
            step = 1 << 20
            for start in range(0, info.n_stamps, step):
                block = lab[start:start + step]
                bad = ~np.isin(block, (0, 1))
                if bad.any():
                    raise _fail(path, f"/labels must be 0 or 1; found {np.unique(block[bad])[:5].tolist()}")
    return info


def iter_chunks(
    path: Path | str,
    chunk_rows: int | None = None,
    *,
    start: int = 0,
    stop: int | None = None,
    with_labels: bool = True,
    meta_columns: Sequence[str] = (),
) -> Iterator[Chunk]:
    """Yield the store's rows in contiguous chunks (default: the HDF5 chunk size).

    Memory is bounded by ``chunk_rows``; the file stays open only while iterating.
    """
    path = Path(path)
    with _open_h5(path) as h5:
        info = _validate(path, h5)
        rows = chunk_rows or info.chunk_rows
        stop = info.n_stamps if stop is None else min(stop, info.n_stamps)
        for name in meta_columns:
            if name not in info.meta_columns:
                raise _fail(path, f"has no metadata column '{name}' (has {list(info.meta_columns)})")
        for lo in range(start, stop, rows):
            hi = min(lo + rows, stop)
            yield Chunk(
                start=lo,
                stop=hi,
                stamps=h5[_STAMPS][lo:hi],
                labels=h5[_LABELS][lo:hi] if (with_labels and info.labelled) else None,
                meta={c: _decode_column(h5[_META][c][lo:hi]) for c in meta_columns},
            )


def read_stamps(path: Path | str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Read rows ``[start, stop)`` of /stamps as float32 (N, H, W)."""
    with _open_h5(path) as h5:
        _validate(Path(path), h5)
        return h5[_STAMPS][start:stop]


def read_rows(path: Path | str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Read the stamps (and labels, if any) at the given row indices, in the order given.

    HDF5 fancy indexing needs increasing indices; we sort, read, and undo the sort.
    """
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    with _open_h5(path) as h5:
        info = _validate(Path(path), h5)
        if len(rows) and (sorted_rows[0] < 0 or sorted_rows[-1] >= info.n_stamps):
            raise _fail(path, f"row index out of range 0..{info.n_stamps - 1}")
        stamps = _read_sorted(h5[_STAMPS], sorted_rows)
        labels = _read_sorted(h5[_LABELS], sorted_rows) if info.labelled else None
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return stamps[inverse], (labels[inverse] if labels is not None else None)


def _read_sorted(ds: h5py.Dataset, sorted_rows: np.ndarray) -> np.ndarray:
    """Read sorted (possibly repeated) rows; contiguous runs become slices, which is far faster."""
    if len(sorted_rows) == 0:
        return np.empty((0, *ds.shape[1:]), dtype=ds.dtype)
    lo, hi = int(sorted_rows[0]), int(sorted_rows[-1]) + 1
    # Dense enough: read the covering block once and index in memory.
    if hi - lo <= 4 * len(sorted_rows):
        return ds[lo:hi][sorted_rows - lo]
    uniq, inv = np.unique(sorted_rows, return_inverse=True)
    return ds[uniq][inv]


def read_labels(path: Path | str) -> np.ndarray:
    """All labels of a labelled store (int8, small: one byte per stamp)."""
    with _open_h5(path) as h5:
        info = _validate(Path(path), h5)
        if not info.labelled:
            raise _fail(path, "has no /labels (a candidate file?); training needs a labelled store")
        return h5[_LABELS][:]


def read_meta(path: Path | str, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Whole metadata columns (1-D, small compared with the stamps); strings come back as str."""
    with _open_h5(path) as h5:
        info = _validate(Path(path), h5)
        names = info.meta_columns if columns is None else tuple(columns)
        missing = [c for c in names if c not in info.meta_columns]
        if missing:
            raise _fail(path, f"has no metadata column(s) {missing} (has {list(info.meta_columns)})")
        return {c: _decode_column(h5[_META][c][:]) for c in names}


def read_attrs(path: Path | str) -> dict[str, Any]:
    """The store's root attributes (schema version, stamp shape, simulator settings …)."""
    with _open_h5(path) as h5:
        _validate(Path(path), h5)
        return {k: _decode_attr(v) for k, v in h5.attrs.items()}


# --------------------------------------------------------------------------- scores


def score_target(candidates: Path | str, out_dir: Path | str | None) -> Path:
    """Where the scores of a candidate file go: the file itself, or a side file in ``out_dir``."""
    candidates = Path(candidates)
    if out_dir is None:
        return candidates
    return Path(out_dir) / f"{candidates.stem}.scores.h5"


def create_score_file(path: Path | str, source: Path | str, n_stamps: int,
                      stamp_shape: tuple[int, int]) -> None:
    """Create an empty side file that will hold /scores for a read-only candidate file."""
    with atomic_path(path, overwrite=False) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs[_ATTR_SCHEMA] = SCHEMA_VERSION
        h5.attrs[_ATTR_SHAPE] = np.asarray(stamp_shape, dtype=np.int64)
        h5.attrs[_ATTR_SOURCE] = str(Path(source).resolve())
        h5.attrs["n_stamps"] = int(n_stamps)
        h5.create_group(_SCORES)


def score_status(path: Path | str, model: str) -> dict[str, Any] | None:
    """Provenance attributes of a complete ``/scores/<model>``; None when absent or incomplete."""
    with _open_h5(path) as h5:
        if _SCORES not in h5 or model not in h5[_SCORES]:
            return None
        grp = h5[_SCORES][model]
        if not bool(grp.attrs.get(_ATTR_COMPLETE, False)):
            return None
        return {k: _decode_attr(v) for k, v in grp.attrs.items()}


def list_scores(path: Path | str) -> list[str]:
    """Names of the models whose complete scores the file holds."""
    with _open_h5(path) as h5:
        if _SCORES not in h5:
            return []
        return sorted(m for m, g in h5[_SCORES].items() if bool(g.attrs.get(_ATTR_COMPLETE, False)))


class ScoreWriter:
    """Write ``/scores/<model>`` into an existing store or side file, chunk by chunk.

    The group is created with ``complete=False``; probabilities are written by row range,
    occlusion maps appended; :meth:`commit` stores the provenance attributes and flips
    ``complete`` to True. A group left incomplete by a crash is replaced on the next run.
    Opening takes HDF5's file lock, so a second writer on the same file is refused.
    """

    def __init__(self, path: Path | str, model: str, n_stamps: int,
                 stamp_shape: tuple[int, int], *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        self.path = Path(path)
        self.model = model
        if not os.access(self.path, os.W_OK):
            raise _fail(self.path, "is read-only; write the scores to a side file with --out DIR")
        self._h5 = _open_h5(self.path, "r+")
        try:
            scores = self._h5.require_group(_SCORES)
            if model in scores:
                del scores[model]
            grp = scores.create_group(model)
            grp.attrs[_ATTR_COMPLETE] = False
            h, w = stamp_shape
            grp.create_dataset(_PROBABILITY, shape=(n_stamps,), dtype=np.float32,
                               chunks=(min(max(chunk_rows, 1024), n_stamps),), fillvalue=np.nan)
            grp.create_dataset(_OCCLUSION, shape=(0, h, w), maxshape=(None, h, w),
                               dtype=np.float32, chunks=(min(chunk_rows, 1024), h, w))
            grp.create_dataset(_OCCLUSION_INDEX, shape=(0,), maxshape=(None,), dtype=np.int64,
                               chunks=(4096,))
            self._grp = grp
        except BaseException:
            self._h5.close()
            raise

    def write_probability(self, start: int, probability: np.ndarray) -> None:
        self._grp[_PROBABILITY][start:start + len(probability)] = probability.astype(np.float32)

    def append_occlusion(self, rows: np.ndarray, maps: np.ndarray) -> None:
        if len(rows) == 0:
            return
        ds, ix = self._grp[_OCCLUSION], self._grp[_OCCLUSION_INDEX]
        m = ds.shape[0]
        ds.resize(m + len(rows), axis=0)
        ds[m:] = maps.astype(np.float32)
        ix.resize(m + len(rows), axis=0)
        ix[m:] = rows.astype(np.int64)

    def commit(self, attrs: Mapping[str, Any]) -> None:
        for key, value in attrs.items():
            self._grp.attrs[key] = value
        self._grp.attrs[_ATTR_COMPLETE] = True
        self._h5.flush()

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> ScoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def read_scores(path: Path | str, model: str, *, with_maps: bool = True) -> Scores:
    """Read the complete scores of one model (maps optional: they can be large)."""
    with _open_h5(path) as h5:
        if _SCORES not in h5 or model not in h5[_SCORES]:
            have = sorted(h5[_SCORES].keys()) if _SCORES in h5 else []
            raise _fail(path, f"has no scores for model '{model}' (has {have})")
        grp = h5[_SCORES][model]
        if not bool(grp.attrs.get(_ATTR_COMPLETE, False)):
            raise _fail(path, f"scores for model '{model}' are incomplete (an interrupted run; rerun score)")
        return Scores(
            model=model,
            probability=grp[_PROBABILITY][:],
            occlusion_index=grp[_OCCLUSION_INDEX][:],
            occlusion=grp[_OCCLUSION][:] if with_maps else None,
            attrs={k: _decode_attr(v) for k, v in grp.attrs.items()},
        )


def read_occlusion(path: Path | str, model: str, rows: Sequence[int]) -> dict[int, np.ndarray]:
    """Occlusion maps of the given stamp rows (those that have one), keyed by row."""
    with _open_h5(path) as h5:
        grp = h5[_SCORES][model] if (_SCORES in h5 and model in h5[_SCORES]) else None
        if grp is None:
            raise _fail(path, f"has no scores for model '{model}'")
        index = grp[_OCCLUSION_INDEX][:]
        where = {int(r): i for i, r in enumerate(index)}
        out = {}
        for row in rows:
            if int(row) in where:
                out[int(row)] = grp[_OCCLUSION][where[int(row)]]
        return out


def read_occlusion_range(path: Path | str, model: str, start: int, stop: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The occlusion maps of the stamp rows in ``[start, stop)``: (rows, maps), rows increasing.

    One slice read (the index is increasing), so memory is bounded by the maps in the range.
    """
    with _open_h5(path) as h5:
        if _SCORES not in h5 or model not in h5[_SCORES]:
            raise _fail(path, f"has no scores for model '{model}'")
        grp = h5[_SCORES][model]
        index = grp[_OCCLUSION_INDEX][:]
        lo, hi = np.searchsorted(index, [start, stop])
        return index[lo:hi], grp[_OCCLUSION][lo:hi]
