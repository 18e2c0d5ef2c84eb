"""Scores: one file per model beside the target, an index of links, the target's /scores link
(see ARCHITECTURE.md, 'crash safety'), the score writer and readers."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stampbatch import fileio
from stampbatch.errors import StampbatchError
from stampbatch.store._schema import (
    _ATTR_COMPLETE,
    _ATTR_FINGERPRINT,
    _ATTR_SCHEMA,
    _ATTR_SHAPE,
    _ATTR_SOURCE,
    _INDEX,
    _OCCLUSION,
    _OCCLUSION_INDEX,
    _PROBABILITY,
    _SCORES,
    _STAMPS,
    DEFAULT_CHUNK_ROWS,
    LOCK_SUFFIX,
    SCHEMA_VERSION,
    SCORES_DIR_SUFFIX,
    Scores,
    StoreError,
    _add_scores_link,
    _complete,
    _decode_attr,
    _fail,
    _open_h5,
    _score_groups,
    _scores_group,
    _scores_link,
)
from stampbatch.store._validate import (
    _check_scores,
    _validate,
)
from stampbatch.store._write import (
    atomic_path,
    discard_unfinished,
)


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
    fileio.remove_partials(os.path.realpath(target))      # a copy-and-swap
    folder = scores_dir(target)
    for p in folder.glob(".*.partial.h5") if folder.is_dir() else ():
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
        h5, ctx, self._h5, self._ctx = self._h5, self._ctx, None, None
        discard_unfinished(h5, ctx, StoreError("not committed"))
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
