"""Writing stores: atomic creation (temporary name, fsync, rename) and the streaming writer."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stampbatch import fileio
from stampbatch.store._schema import (
    ATTR_SCHEMA,
    ATTR_SHAPE,
    COMPRESSIONS,
    DEFAULT_CHUNK_ROWS,
    DEFAULT_STAMP_SHAPE,
    INDEX,
    LABELS,
    META,
    RETIRED,
    SCHEMA_VERSION,
    STAMPS,
    StoreInfo,
    add_scores_link,
    fail,
    link_target,
    model_file_name,
    new_store_id,
    read_store_id,
    scores_link,
)
from stampbatch.store._validate import (
    check_labels,
    check_stamps,
    open_store,
)


def _as_storable_column(path: Path | str, name: str, values: Any, n: int) -> np.ndarray:
    """Metadata columns are numeric, boolean or short strings (stored as fixed-width bytes)."""
    arr = np.asarray(values)
    if arr.ndim != 1 or len(arr) != n:
        raise fail(path, f"metadata column '{name}' has shape {arr.shape}, expected ({n},)")
    if arr.dtype.kind == "U":
        arr = np.char.encode(arr, "utf-8")
    if arr.dtype.kind == "O":
        raise fail(path, f"metadata column '{name}' holds Python objects; use numbers or strings")
    if arr.dtype.kind not in "fiubS":
        raise fail(path, f"metadata column '{name}' has unsupported dtype {arr.dtype}")
    return arr


# --------------------------------------------------------------------------- writing


def atomic_path(path: Path | str, *, overwrite: bool = False,
                suffix: str = ".h5") -> contextlib.AbstractContextManager[Path]:
    """:func:`stampbatch.fileio.atomic_path` with refusals as :class:`StoreError`."""
    return fileio.atomic_path(path, overwrite=overwrite, suffix=suffix, fail=fail)


def discard_unfinished(h5: h5py.File | None, ctx: Any, exc: BaseException) -> None:
    """Close a file still being written and drop its temporary name (``ctx`` is the
    :func:`atomic_path` context it was written under): the destination stays as it was."""
    if h5 is not None:
        with contextlib.suppress(Exception):
            h5.close()
    if ctx is not None:
        with contextlib.suppress(BaseException):
            ctx.__exit__(type(exc), exc, exc.__traceback__)


def write_index(folder: Path, models: Sequence[str]) -> None:
    """Replace the index of a scores folder by one linking ``models`` (atomic, durable); the
    folder is made if missing (and its making made durable)."""
    if folder.parent.exists() and not folder.parent.is_dir():
        raise fail(folder.parent, "is a file where stampbatch keeps scores; remove or rename it")
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        fileio.fsync_dir(folder.parent)
        fileio.fsync_dir(folder.parent.parent)
    with atomic_path(folder / INDEX, overwrite=True) as tmp, h5py.File(tmp, "w") as h5:
        for model in sorted(set(models)):
            h5[model] = h5py.ExternalLink(model_file_name(model), "/")


def retire_folder(folder: Path) -> None:
    """Delete a store's scores folder so that no kill leaves part of it under its name: it is
    renamed to a hidden ``.retired-*`` name (made durable), then deleted; a kill during the
    deletion leaves the hidden name, which :func:`sweep_retired` clears."""
    if not folder.is_dir() or folder.is_symlink():
        return
    doomed = folder.with_name(f"{RETIRED}{folder.name}-{uuid.uuid4().hex[:8]}")
    os.replace(folder, doomed)
    fileio.fsync_dir(folder.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def sweep_retired(root: Path) -> None:
    """Finish the retirements under a ``<file>.scores/`` folder that a kill interrupted."""
    for leftover in root.glob(f"{RETIRED}*") if root.is_dir() else ():
        shutil.rmtree(leftover, ignore_errors=True)


def home_folder(real: Path, store_id: str) -> Path:
    """``<file>.scores/<store id>/``: where the scores of the file at ``real`` belong."""
    return real.parent / Path(link_target(real.name, store_id)).parent


def own_folder(path: Path) -> Path | None:
    """The scores folder a stampbatch file at ``path`` owns (its link names it), or None."""
    with contextlib.suppress(Exception), h5py.File(path, "r") as h5:
        sid, link = read_store_id(h5), scores_link(h5)
        if sid is not None and link is not None and link.filename == link_target(path.name, sid):
            return home_folder(path, sid)
    return None


class StoreWriter:
    """Stream batches of stamps into a new store, atomically.

    >>> with StoreWriter("train.h5", labelled=True) as w:   # doctest: +SKIP
    ...     w.append(stamps, labels, {"snr": snr})

    The file appears under its real name only when the ``with`` block ends without an error.
    Every batch must carry the same metadata columns. Each new store gets a random store id
    and its (empty) scores folder ``<name>.scores/<id>/index.h5`` before it appears, so its
    ``/scores`` link always resolves; a store it replaces (``overwrite``) has its own scores
    folder retired.
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
            raise fail(path, f"unknown compression {compression!r}; choose from none, lzf, gzip")
        if chunk_rows < 1:
            raise fail(path, f"chunk_rows must be positive, got {chunk_rows}")
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
        self.store_id = new_store_id()

    def __enter__(self) -> StoreWriter:
        self._ctx = atomic_path(self.path, overwrite=self.overwrite)
        tmp = self._ctx.__enter__()
        try:
            self._h5 = h5py.File(tmp, "w")
            h, w = self.stamp_shape
            self._h5.create_dataset(
                STAMPS, shape=(0, h, w), maxshape=(None, h, w), dtype=np.float32,
                chunks=(self.chunk_rows, h, w), compression=self.compression,
            )
            if self.labelled:
                self._h5.create_dataset(LABELS, shape=(0,), maxshape=(None,), dtype=np.int8,
                                        chunks=(max(self.chunk_rows, 1024),))
            self._h5.create_group(META)
            add_scores_link(self._h5, self.path.name, self.store_id)
            self._h5.attrs[ATTR_SCHEMA] = SCHEMA_VERSION
            self._h5.attrs[ATTR_SHAPE] = np.asarray(self.stamp_shape, dtype=np.int64)
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
            raise fail(self.path, f"metadata columns changed between batches: "
                                   f"{list(self._meta_names)} then {list(names)}")
        columns = {k: _as_storable_column(self.path, k, v, n) for k, v in meta.items()}
        if self.labelled:
            if labels is None:
                raise fail(self.path, "labels are required for a labelled store")
            lab = check_labels(self.path, labels, n)
        elif labels is not None:
            raise fail(self.path, "labels given for an unlabelled (candidate) store")
        start, stop = self.n, self.n + n
        ds = self._h5[STAMPS]
        ds.resize(stop, axis=0)
        ds[start:stop] = arr
        if self.labelled:
            ds_l = self._h5[LABELS]
            ds_l.resize(stop, axis=0)
            ds_l[start:stop] = lab
        group = self._h5[META]
        for name, col in columns.items():
            if name not in group:
                if start != 0:
                    raise fail(self.path, f"metadata column '{name}' appeared after row 0")
                group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=col.dtype,
                                     chunks=(max(self.chunk_rows, 1024),))
            elif group[name].dtype.kind == "S" and col.dtype.itemsize > group[name].dtype.itemsize:
                raise fail(self.path, f"metadata column '{name}' strings grew longer than "
                                       f"{group[name].dtype.itemsize} bytes")
            group[name].resize(stop, axis=0)
            group[name][start:stop] = col
        self.n = stop

    def _abort(self, exc: BaseException) -> None:
        h5, ctx, self._h5, self._ctx = self._h5, self._ctx, None, None
        discard_unfinished(h5, ctx, exc)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if exc is None and self.n == 0:
            exc = fail(self.path, "no stamps were written")
            self._abort(exc)
            raise exc
        if exc is not None:
            self._abort(exc)
            return
        assert self._h5 is not None and self._ctx is not None
        self._h5.close()
        self._h5 = None
        real = Path(os.path.realpath(self.path))
        home = home_folder(real, self.store_id)
        try:
            old = own_folder(real) if real.exists() else None
            write_index(home, [])
        except BaseException as err:
            self._abort(err)
            shutil.rmtree(home, ignore_errors=True)        # nothing of a failed store is left
            with contextlib.suppress(OSError):
                home.parent.rmdir()                        # (only if it is empty)
            raise
        ctx, self._ctx = self._ctx, None
        ctx.__exit__(None, None, None)
        if old is not None:
            retire_folder(old)


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
