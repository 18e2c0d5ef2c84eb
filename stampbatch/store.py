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
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stampbatch import fileio
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
_ATTR_FINGERPRINT = "source_fingerprint"
_INDEX = "index.h5"
SCORES_DIR_SUFFIX = ".scores"           # <target>.scores/<model>.h5: one file per model
LOCK_SUFFIX = ".stampbatch.lock"        # <resolved target>.stampbatch.lock: one writer per file

# Metadata columns (/meta/<name>) that stampbatch reads or writes; other modules use these
# names, never the strings. The simulator writes all of them but IMAGE_TYPE; ingested real
# stores carry whichever their per-stamp table has.
META_SNR = "snr"  # matched-filter SNR of the signal that made the stamp's kind
META_KIND = "kind"  # source, background, offcentre, hot_pixel, cosmic_ray, streak, dipole
META_TRUE_LABEL = "true_label"  # the truth of a candidate file (no /labels)
META_PROFILE = "profile"  # centre source: none, point, galaxy, saturated
META_BACKGROUND = "background"  # science, sky_subtracted, difference
META_N_FIELD = "n_field"  # field sources on the stamp
META_NN_DISTANCE = "nn_distance"  # px from the centre to the nearest field source
META_NN_SNR = "nn_snr"  # point-source SNR of that neighbour
META_FIELD_DENSITY = "field_density"  # field sources per 100 px^2
META_HALF_LIGHT_RADIUS = "half_light_radius"  # centre galaxies, px (circularised)
META_IMAGE_TYPE = "image_type"  # real stores: science, difference, single_epoch, coadd


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


def atomic_path(path: Path | str, *, overwrite: bool = False,
                suffix: str = ".h5") -> contextlib.AbstractContextManager[Path]:
    """:func:`stampbatch.fileio.atomic_path` with refusals as :class:`StoreError`."""
    return fileio.atomic_path(path, overwrite=overwrite, suffix=suffix, fail=_fail)


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
            _add_scores_link(self._h5, self.path.name)
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


# Metadata columns that summaries and evaluation read as numbers.
_NUMERIC_META = ("snr", "true_label", "source_row")


def _schema_version(path: Path, h5: h5py.File) -> int:
    version = h5.attrs.get(_ATTR_SCHEMA)
    if version is None:
        raise _fail(path, f"not a stampbatch store (no '{_ATTR_SCHEMA}' attribute)")
    value = np.asarray(version)
    if value.shape != () or value.dtype.kind not in "iu":
        raise _fail(path, f"attribute '{_ATTR_SCHEMA}' is {_decode_attr(version)!r}, expected the "
                          f"integer {SCHEMA_VERSION} (the file was not written by stampbatch, or "
                          f"was edited)")
    if int(value) != SCHEMA_VERSION:
        raise _fail(path, f"schema version {int(value)} is not supported "
                          f"(this stampbatch reads {SCHEMA_VERSION})")
    return int(value)


def _stamp_shape_attr(path: Path, h5: h5py.File) -> tuple[int, int]:
    value = h5.attrs.get(_ATTR_SHAPE)
    arr = np.asarray(value) if value is not None else None
    if arr is None or arr.shape != (2,) or arr.dtype.kind not in "iu" or (arr < 1).any():
        found = "missing" if value is None else repr(_decode_attr(value))
        raise _fail(path, f"attribute '{_ATTR_SHAPE}' is {found}, expected two positive "
                          f"integers (stamp height, width)")
    return int(arr[0]), int(arr[1])


def _check_filters(path: Path, ds: h5py.Dataset) -> None:
    """Refuse a dataset whose HDF5 filters (compression plugins) are not available here."""
    plist = ds.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        code, _flags, _values, name = plist.get_filter(i)
        if not h5py.h5z.filter_avail(code):
            label = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
            raise _fail(path, f"/{ds.name.lstrip('/')} needs HDF5 filter {code}"
                              f"{f' ({label})' if label else ''}, which is not installed here; "
                              f"install its plugin (e.g. pip install hdf5plugin) or re-ingest "
                              f"the stamps without compression")


def _check_scores(path: Path, h5: h5py.File, n: int | None) -> tuple[str, ...]:
    """Models under /scores that resolve; each must be a group, and a complete one must hold
    its datasets (a link to a side file that is gone is not a model)."""
    try:
        scores = h5.get(_SCORES)
    except (KeyError, OSError):  # the link to the scores index resolves to nothing yet
        scores = None
    if scores is None:
        return ()
    if not isinstance(scores, h5py.Group):
        raise _fail(path, f"/{_SCORES} is a dataset, expected a group of models (remove it, "
                          f"e.g. with h5py, and score again)")
    for model in scores:
        try:
            obj = scores.get(model)
        except (KeyError, OSError):
            obj = None
        if isinstance(obj, h5py.Dataset):
            raise _fail(path, f"/{_SCORES}/{model} is a dataset, expected a group")
    groups = _score_groups(h5)
    for model, grp in groups.items():
        if not _complete(grp):
            continue  # an interrupted run: reported as incomplete and replaced by the next one
        for name in (_PROBABILITY, _OCCLUSION_INDEX, _OCCLUSION):
            if not isinstance(grp.get(name), h5py.Dataset):
                raise _fail(path, f"/{_SCORES}/{model} is marked complete but has no '{name}' "
                                  f"dataset (rescore with --force)")
        prob = grp[_PROBABILITY]
        if n is not None and prob.shape != (n,):
            raise _fail(path, f"/{_SCORES}/{model}/{_PROBABILITY} has shape {prob.shape}, "
                              f"expected ({n},)")
    return tuple(sorted(groups))


def _check_meta(path: Path, h5: h5py.File, n: int) -> tuple[str, ...]:
    if _META not in h5:
        return ()
    if not isinstance(h5[_META], h5py.Group):
        raise _fail(path, f"/{_META} is a dataset, expected a group of columns")
    names: list[str] = []
    for name, col in h5[_META].items():
        if not isinstance(col, h5py.Dataset) or col.ndim != 1 or col.shape[0] != n:
            shape = getattr(col, "shape", "a group")
            raise _fail(path, f"/meta/{name} has shape {shape}, expected ({n},)")
        if name in _NUMERIC_META and col.dtype.kind not in "fiub":
            raise _fail(path, f"/meta/{name} has dtype {col.dtype}, expected numbers")
        names.append(name)
    return tuple(sorted(names))


def _validate(path: Path, h5: h5py.File) -> StoreInfo:
    _schema_version(path, h5)
    is_score_file = _ATTR_SOURCE in h5.attrs and _STAMPS not in h5
    stamp_shape = _stamp_shape_attr(path, h5)
    if is_score_file:
        n = int(np.asarray(h5.attrs.get("n_stamps", 0)).item())
        models = _check_scores(path, h5, n or None)
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
    _check_filters(path, ds)
    labelled = _LABELS in h5
    if labelled:
        lab = h5[_LABELS]
        if not isinstance(lab, h5py.Dataset) or lab.ndim != 1 or lab.shape[0] != n:
            raise _fail(path, f"/labels has shape {getattr(lab, 'shape', 'a group')}, expected ({n},) "
                              f"to match /stamps")
        if lab.dtype.kind not in "iu":
            raise _fail(path, f"/labels has dtype {lab.dtype}, expected integers")
        _check_filters(path, lab)
    meta_cols = _check_meta(path, h5, n)
    models = _check_scores(path, h5, n)
    chunk_rows = int(ds.chunks[0]) if ds.chunks else n
    return StoreInfo(path, n, stamp_shape, labelled, meta_cols, models,
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
#
# Each model's scores live in a file of their own, ``<target>.scores/<model>.h5``, with
# ``probability``, ``occlusion`` and ``occlusion_index`` at its root; it is written under a
# temporary name, fsynced and renamed, so it is either absent or complete. The folder's
# ``index.h5`` holds one external link per model (``<model>`` → ``<model>.h5:/``) and is
# replaced whole (copy, change, fsync, rename) when a model is added. The target holds
# only ``/scores``, an external link to ``index.h5:/`` that a store gets when it is created,
# so scoring never writes the candidate file. Readers opening ``/scores/<model>/…`` follow
# the two links; a link whose file is missing reads as "not scored".


def _scores_link(h5: h5py.File) -> h5py.ExternalLink | None:
    link = h5.get(_SCORES, getlink=True)
    return link if isinstance(link, h5py.ExternalLink) else None


def scores_dir(target: Path | str) -> Path:
    """The folder of the target's scores files (where its ``/scores`` link points)."""
    real = Path(os.path.realpath(target))
    with contextlib.suppress(StampbatchError, OSError), _open_h5(real) as h5:
        link = _scores_link(h5)
        if link is not None:
            return real.parent / Path(link.filename).parent
    return real.with_name(real.name + SCORES_DIR_SUFFIX)


def scores_file(target: Path | str, model: str) -> Path:
    """The file holding one model's scores of ``target``."""
    return scores_dir(target) / f"{model}.h5"


def _add_scores_link(h5: h5py.File, final_name: str) -> None:
    h5[_SCORES] = h5py.ExternalLink(f"{final_name}{SCORES_DIR_SUFFIX}/{_INDEX}", "/")


def score_target(candidates: Path | str, out_dir: Path | str | None) -> Path:
    """Where the scores of a candidate file go: the file itself, or a side file in ``out_dir``."""
    candidates = Path(candidates)
    if out_dir is None:
        return candidates
    return Path(out_dir) / f"{candidates.stem}.scores.h5"


def stamps_fingerprint(path: Path | str) -> str:
    """A digest of /stamps (shape, dtype and the first, middle and last 256 rows).

    Cheap at any size; two stores of the same count but other stamps differ in it, while a
    copy (or a repack) of the same store keeps it.
    """
    path = Path(path)
    with _open_h5(path) as h5:
        info = _validate(path, h5)
        if info.is_score_file:
            raise _fail(path, "is a score side file, not a candidate file")
        ds, n = h5[_STAMPS], info.n_stamps
        digest = hashlib.sha256(repr((tuple(ds.shape), str(ds.dtype))).encode())
        k = min(n, 256)
        for lo in sorted({0, (n - k) // 2, n - k}):
            digest.update(np.ascontiguousarray(ds[lo:lo + k], dtype=np.float32).tobytes())
        return digest.hexdigest()[:32]


def create_score_file(path: Path | str, source: Path | str, n_stamps: int,
                      stamp_shape: tuple[int, int], *, overwrite: bool = False) -> None:
    """Create an empty side file that will hold /scores for a read-only candidate file."""
    with atomic_path(path, overwrite=overwrite) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs[_ATTR_SCHEMA] = SCHEMA_VERSION
        h5.attrs[_ATTR_SHAPE] = np.asarray(stamp_shape, dtype=np.int64)
        h5.attrs[_ATTR_SOURCE] = str(Path(source).resolve())
        h5.attrs[_ATTR_FINGERPRINT] = stamps_fingerprint(source)
        h5.attrs["n_stamps"] = int(n_stamps)
        _add_scores_link(h5, Path(path).name)


def _score_groups(h5: h5py.File) -> dict[str, h5py.Group]:
    """The /scores/<model> groups that resolve (a link to a missing file does not)."""
    scores = h5.get(_SCORES)
    if not isinstance(scores, h5py.Group):
        return {}
    out = {}
    for name in scores:
        try:
            obj = scores.get(name)
        except (KeyError, OSError):
            obj = None
        if isinstance(obj, h5py.Group):
            out[name] = obj
    return out


def _complete(grp: h5py.Group) -> bool:
    return bool(grp.attrs.get(_ATTR_COMPLETE, False))


def score_status(path: Path | str, model: str) -> dict[str, Any] | None:
    """Provenance attributes of a complete ``/scores/<model>``; None when absent or incomplete.

    Looks at the model's scores file itself, so scores committed by a run that was killed
    before it linked them count (the next run only adds the link).
    """
    own = scores_file(path, model)
    if own.is_file():
        with _open_h5(own) as h5:
            return {k: _decode_attr(v) for k, v in h5.attrs.items()} if _complete(h5) else None
    with _open_h5(path) as h5:
        grp = _score_groups(h5).get(model)
        if grp is None or not _complete(grp):
            return None
        return {k: _decode_attr(v) for k, v in grp.attrs.items()}


def list_scores(path: Path | str) -> list[str]:
    """Names of the models whose complete scores the file holds (links that resolve)."""
    with _open_h5(path) as h5:
        return sorted(m for m, g in _score_groups(h5).items() if _complete(g))


def committed_models(target: Path | str) -> list[str]:
    """Models whose complete scores file of ``target`` exists (linked or not yet)."""
    folder = scores_dir(target)
    names = []
    for p in sorted(folder.glob("*.h5")) if folder.is_dir() else ():
        if p.name.startswith(".") or p.name == _INDEX:
            continue
        with contextlib.suppress(StampbatchError, OSError), _open_h5(p) as h5:
            if _complete(h5):
                names.append(p.stem)
    return names


def sweep_partial(target: Path | str) -> None:
    """Delete scores files that a killed writer left under temporary names."""
    folder = scores_dir(target)
    real = Path(os.path.realpath(target))
    leftovers = [*real.parent.glob(f".{real.name}.*.partial.h5"),   # a copy-and-swap
                 *(folder.glob(".*.partial.h5") if folder.is_dir() else ())]
    for p in leftovers:
        with contextlib.suppress(OSError):
            p.unlink()


def link_scores(target: Path | str, models: Sequence[str]) -> list[str]:
    """Make ``/scores/<model>`` of ``target`` resolve to each model's scores file.

    Adds the models missing from the index (the index is replaced whole, never edited in
    place). A target without the ``/scores`` link (made by another program or an older
    stampbatch) gets it once by copy-and-swap: the whole file copied, the link added to
    the copy, fsynced and renamed over the original, whose groups of older scores are
    first moved into scores files of their own. Returns the models linked now.
    """
    target = Path(target)
    with _open_h5(target) as h5:
        has_link = _scores_link(h5) is not None
    if not has_link:
        models = [*models, *_convert(target)]
    folder = scores_dir(target)
    have = _indexed(folder)
    missing = [m for m in models if m not in have]
    if missing or not (folder / _INDEX).is_file():
        _write_index(folder, [*have, *models])
    return missing


def _indexed(folder: Path) -> list[str]:
    if not (folder / _INDEX).is_file():
        return []
    with _open_h5(folder / _INDEX) as h5:
        return list(h5.keys())


def _write_index(folder: Path, models: Sequence[str]) -> None:
    """Replace the index of a scores folder by one linking ``models`` (atomic, durable)."""
    folder.mkdir(exist_ok=True)
    with atomic_path(folder / _INDEX, overwrite=True) as tmp, h5py.File(tmp, "w") as h5:
        for model in sorted(set(models)):
            h5[model] = h5py.ExternalLink(f"{model}.h5", "/")


def _convert(target: Path) -> list[str]:
    """Give a store made elsewhere its ``/scores`` link, by copy-and-swap (see link_scores).

    Returns the models whose older scores were moved into scores files of their own.
    """
    import shutil

    moved = []
    real = Path(os.path.realpath(target))
    folder = real.with_name(real.name + SCORES_DIR_SUFFIX)
    folder.mkdir(exist_ok=True)
    with atomic_path(real, overwrite=True) as tmp:
        shutil.copyfile(real, tmp)
        shutil.copymode(real, tmp)
        with h5py.File(tmp, "r+") as h5:
            old = h5.get(_SCORES)
            for model, grp in (old.items() if isinstance(old, h5py.Group) else ()):
                if isinstance(grp, h5py.Group) and _complete(grp) \
                        and not (folder / f"{model}.h5").exists():
                    with atomic_path(folder / f"{model}.h5") as own, h5py.File(own, "w") as out:
                        for name, obj in grp.items():
                            h5.copy(obj, out, name)
                        out.attrs.update(grp.attrs)
                    moved.append(model)
            if _SCORES in h5 or h5.get(_SCORES, getlink=True) is not None:
                del h5[_SCORES]
            _add_scores_link(h5, real.name)
        _write_index(folder, [*_indexed(folder), *moved])   # before the swap: no gap
    return moved


class ScoreWriter:
    """Write one model's scores of ``target`` into its own file, chunk by chunk.

    The file is built under a temporary name (``complete=False``); probabilities are
    written by row range, occlusion maps appended; :meth:`commit` stores the provenance
    attributes, flips ``complete`` to True, fsyncs and renames the file into place, and
    (with ``link=True``) links it into the target. Closing without a commit leaves nothing.
    Unless the caller holds the target's lock (``locked=True``), the writer takes it, so a
    second writer on the same file is refused.
    """

    def __init__(self, path: Path | str, model: str, n_stamps: int,
                 stamp_shape: tuple[int, int], *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 locked: bool = False) -> None:
        self.path = Path(path)
        self.model = model
        self.final = scores_file(self.path, model)
        if not os.access(self.path, os.W_OK):
            raise _fail(self.path, "is read-only; write the scores to a side file with --out DIR")
        self._lock = None if locked else take_lock(self.path)
        self._h5: h5py.File | None = None
        self._ctx: contextlib.AbstractContextManager[Path] | None = None
        try:
            self.final.parent.mkdir(exist_ok=True)
            fileio.fsync_dir(self.final.parent.parent)
            self._ctx = atomic_path(self.final, overwrite=True)
            self._h5 = h5py.File(self._ctx.__enter__(), "w")
            self._h5.attrs[_ATTR_SCHEMA] = SCHEMA_VERSION
            self._h5.attrs[_ATTR_COMPLETE] = False
            h, w = stamp_shape
            self._h5.create_dataset(_PROBABILITY, shape=(n_stamps,), dtype=np.float32,
                                    chunks=(min(max(chunk_rows, 1024), n_stamps),),
                                    fillvalue=np.nan)
            self._h5.create_dataset(_OCCLUSION, shape=(0, h, w), maxshape=(None, h, w),
                                    dtype=np.float32, chunks=(min(chunk_rows, 1024), h, w))
            self._h5.create_dataset(_OCCLUSION_INDEX, shape=(0,), maxshape=(None,),
                                    dtype=np.int64, chunks=(4096,))
        except BaseException:
            self.close()
            raise

    def write_probability(self, start: int, probability: np.ndarray) -> None:
        self._h5[_PROBABILITY][start:start + len(probability)] = probability.astype(np.float32)

    def append_occlusion(self, rows: np.ndarray, maps: np.ndarray) -> None:
        if len(rows) == 0:
            return
        ds, ix = self._h5[_OCCLUSION], self._h5[_OCCLUSION_INDEX]
        m = ds.shape[0]
        ds.resize(m + len(rows), axis=0)
        ds[m:] = maps.astype(np.float32)
        ix.resize(m + len(rows), axis=0)
        ix[m:] = rows.astype(np.int64)

    def commit(self, attrs: Mapping[str, Any], *, link: bool = True) -> None:
        """Provenance attributes, ``complete=True``, the file in place; then the link."""
        assert self._h5 is not None and self._ctx is not None, "commit once, before close"
        for key, value in attrs.items():
            self._h5.attrs[key] = value
        self._h5.attrs[_ATTR_COMPLETE] = True
        self._h5.close()
        self._h5 = None
        ctx, self._ctx = self._ctx, None
        ctx.__exit__(None, None, None)
        if link:
            link_scores(self.path, [self.model])

    def close(self) -> None:
        if self._h5 is not None:
            with contextlib.suppress(Exception):
                self._h5.close()
            self._h5 = None
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            abort = StoreError("not committed")
            with contextlib.suppress(BaseException):
                ctx.__exit__(StoreError, abort, None)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> ScoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def take_lock(target: Path | str) -> fileio.FileLock:
    """The target's write lock (one writer per file), or a StoreError naming the holder."""
    lock = fileio.FileLock(target, LOCK_SUFFIX)
    try:
        lock.acquire()
    except fileio.Locked as exc:
        raise _fail(target, f"is locked by another process (pid {exc.holder}; is a scorer "
                            "still running on it?)") from None
    except OSError as exc:
        raise _fail(target, f"cannot create the lock file {lock.path} "
                            f"({exc.strerror}); use --out DIR") from exc
    return lock


def _scores_group(path: Path | str, h5: h5py.File, model: str) -> h5py.Group:
    grp = _score_groups(h5).get(model)
    if grp is None:
        raise _fail(path, f"has no scores for model '{model}' (has {sorted(_score_groups(h5))})")
    if not _complete(grp):
        raise _fail(path, f"scores for model '{model}' are incomplete (an interrupted run; "
                          "rerun score)")
    return grp


def read_scores(path: Path | str, model: str, *, with_maps: bool = True) -> Scores:
    """Read the complete scores of one model (maps optional: they can be large)."""
    with _open_h5(path) as h5:
        _check_scores(Path(path), h5, None)
        grp = _scores_group(path, h5, model)
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
        _check_scores(Path(path), h5, None)
        grp = _scores_group(path, h5, model)
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
        _check_scores(Path(path), h5, None)
        grp = _scores_group(path, h5, model)
        index = grp[_OCCLUSION_INDEX][:]
        lo, hi = np.searchsorted(index, [start, stop])
        return index[lo:hi], grp[_OCCLUSION][lo:hi]
