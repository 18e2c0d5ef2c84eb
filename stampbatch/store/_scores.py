"""Scores: one file per model beside the target, an index of links, the target's /scores link
(see ARCHITECTURE.md, 'crash safety'), the score writer and readers."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stampbatch import fileio
from stampbatch.errors import StampbatchError, StoreError
from stampbatch.store._schema import (
    ATTR_COMPLETE,
    ATTR_FINGERPRINT,
    ATTR_MODEL_STORE_ID,
    ATTR_SCHEMA,
    ATTR_SHAPE,
    ATTR_SOURCE,
    ATTR_SOURCE_STORE_ID,
    DEFAULT_CHUNK_ROWS,
    INDEX,
    LOCK_SUFFIX,
    MODEL_PREFIX,
    OCCLUSION,
    OCCLUSION_INDEX,
    PROBABILITY,
    SCHEMA_VERSION,
    SCORES,
    Scores,
    add_scores_link,
    decode_attr,
    fail,
    model_file_name,
    new_store_id,
    open_h5,
    read_store_id,
    scores_link,
)
from stampbatch.store._sidecar import (
    ScoresReport,
    fingerprint_of,
    open_model,
    owner_of,
    root_of,
    scores_report,
)
from stampbatch.store._validate import (
    in_file_models,
    store_info,
)
from stampbatch.store._write import (
    atomic_path,
    discard_unfinished,
    home_folder,
    own_folder,
    retire_folder,
    sweep_retired,
    write_index,
)


def _real(path: Path | str) -> Path:
    return Path(os.path.realpath(path))


def scores_dir(target: Path | str) -> Path:
    """The folder of the target's scores files: the one its ``/scores`` link names, resolved
    beside the file itself (never through the working directory)."""
    real = _real(target)
    if not real.exists():                      # a side file not made yet
        return root_of(real)
    with open_h5(real) as h5:                 # an unreadable target is an error, not a guess
        link = scores_link(h5)
        if link is not None:
            return real.parent / Path(link.filename).parent
    return root_of(real)


def scores_file(target: Path | str, model: str) -> Path:
    """The file holding one model's scores of ``target``."""
    return scores_dir(target) / model_file_name(model)


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
    with open_h5(path) as h5:
        info = store_info(path, h5)
        if info.is_score_file:
            raise fail(path, "is a score side file, not a candidate file")
        return fingerprint_of(h5)


def store_id(path: Path | str) -> str | None:
    """The store id of a file (None: written by an older stampbatch or another program)."""
    with open_h5(path) as h5:
        return read_store_id(h5)


def create_score_file(path: Path | str, source: Path | str, n_stamps: int,
                      stamp_shape: tuple[int, int], *, overwrite: bool = False) -> None:
    """Create an empty side file that will hold /scores for a read-only candidate file.

    It records the candidate's path, store id and stamps fingerprint, and gets a store id and
    an (empty) scores folder of its own, as a new store does; a side file it replaces has its
    scores folder retired.
    """
    path = Path(path)
    sid = new_store_id()
    real = _real(path)
    old = own_folder(real) if real.exists() else None
    src_id = store_id(source)
    with atomic_path(path, overwrite=overwrite) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs[ATTR_SCHEMA] = SCHEMA_VERSION
            h5.attrs[ATTR_SHAPE] = np.asarray(stamp_shape, dtype=np.int64)
            h5.attrs[ATTR_SOURCE] = str(Path(source).resolve())
            h5.attrs[ATTR_FINGERPRINT] = stamps_fingerprint(source)
            if src_id is not None:
                h5.attrs[ATTR_SOURCE_STORE_ID] = src_id
            h5.attrs["n_stamps"] = int(n_stamps)
            add_scores_link(h5, path.name, sid)
        write_index(home_folder(real, sid), [])
    if old is not None:
        retire_folder(old)


def check_scores(path: Path | str) -> ScoresReport:
    """What a file's ``/scores`` shows, checked against its store id and stamps: the models
    whose scores belong to it, and one line per broken or foreign part (never raises)."""
    return scores_report(path)


def _attrs_of(path: Path | str, where: Path | str) -> dict[str, Any]:
    with open_h5(path) as h5, open_model(path, h5, where) as grp:
        return {k: decode_attr(v) for k, v in grp.attrs.items()}


def score_status(path: Path | str, model: str) -> dict[str, Any] | None:
    """Provenance attributes of complete scores of ``model`` that belong to the file's stamps;
    None when absent, incomplete, broken or made from other stamps.

    Model files of the file's own folder that the index does not list yet count (scores
    committed by a run that was killed before it linked them: the next run only links them).
    """
    report = scores_report(path)
    where = report.owned.get(model) or report.unlinked.get(model)
    if where is None:
        return None
    try:
        return _attrs_of(path, where)
    except (StampbatchError, OSError):
        return None


def list_scores(path: Path | str) -> list[str]:
    """Names of the models whose complete scores the file shows and that belong to its stamps."""
    return sorted(scores_report(path).owned)


def committed_models(target: Path | str, log: Callable[[str], None] | None = None) -> list[str]:
    """Models whose complete scores file of ``target``, belonging to its stamps, is in its own
    folder (linked or not yet). Broken or foreign files are reported to ``log``, not skipped
    in silence."""
    report = scores_report(target)
    if log is not None:
        for line in report.problems.values():
            log(line)
    return sorted(m for m, w in [*report.owned.items(), *report.unlinked.items()]
                  if isinstance(w, Path))


def sweep_partial(target: Path | str) -> None:
    """Delete scores files that a killed writer left under temporary names, and finish the
    retirement of scores folders that a kill interrupted."""
    real = _real(target)
    fileio.remove_partials(real)      # a copy-and-swap
    root = root_of(real)
    sweep_retired(root)
    folders = {scores_dir(target)}    # only writers of this name (we hold its lock) write here:
    if root.is_dir():                 # its own folder, one a killed copy-and-swap was filling
        folders |= {p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    for folder in folders:
        for p in folder.glob(".*.partial.h5") if folder.is_dir() else ():
            with contextlib.suppress(OSError):
                p.unlink()


def needs_home(target: Path | str) -> bool:
    """Whether ``target`` must first get a scores folder of its own (a copy, a renamed file,
    a file of another program or of an older stampbatch, a packed file)."""
    report = scores_report(target)
    return not (report.linked and report.at_home)


def home_problem(target: Path | str) -> str | None:
    """Why ``target`` cannot be given its own link by copy-and-swap without losing something
    of it (None: it can): hard links, or an owner or group this process cannot give a file."""
    st = os.stat(_real(target))
    if st.st_nlink > 1:
        return f"has {st.st_nlink} hard links (a copy-and-swap would split them)"
    if os.geteuid() != 0:
        if st.st_uid != os.geteuid():
            return f"belongs to user {st.st_uid} (a copy-and-swap would make it ours)"
        if st.st_gid not in {os.getegid(), *os.getgroups()}:
            return f"belongs to group {st.st_gid}, which we are not in"
    return None


def ensure_home(target: Path | str) -> list[str]:
    """Give ``target`` a scores folder of its own unless it has one (see :func:`_convert`);
    the models carried over. Refuses a file that would lose something to the swap."""
    if not needs_home(target):
        return []
    problem = home_problem(target)
    if problem is not None:
        raise fail(target, f"{problem}; left untouched: write its scores beside it with "
                            f"--out DIR")
    return _convert(Path(target))


def repair_scores(target: Path | str) -> None:
    """``score --force``: make a broken scores folder usable again (the index rebuilt from the
    model files that belong to the file; a file or folder squatting our names removed)."""
    real = _real(target)
    report = scores_report(real)
    if report.broken is None or not report.at_home or report.folder is None:
        return
    root = root_of(real)
    if root.exists() and not root.is_dir():
        root.unlink()
        fileio.fsync_dir(root.parent)
    index = report.folder / INDEX
    if index.is_dir():
        fileio.remove_tree(index)
    unlinked = scores_report(real).unlinked     # once, now that the index is out of the way
    write_index(report.folder, [m for m in _models_in(report.folder) if m in unlinked])


def _models_in(folder: Path) -> list[str]:
    return [p.name[len(MODEL_PREFIX):-3] for p in sorted(folder.glob(f"{MODEL_PREFIX}*.h5"))]


def link_scores(target: Path | str, models: Sequence[str]) -> list[str]:
    """Make ``/scores/<model>`` of ``target`` resolve to each model's scores file.

    Adds the models missing from the index (the index is replaced whole, never edited in
    place; entries it already has stay, a broken one included, so it stays reported). A
    target without a scores folder of its own first gets one (:func:`ensure_home`). Returns
    the models linked now.
    """
    target = Path(target)
    models = [*models, *ensure_home(target)]
    folder = scores_dir(target)
    have = _indexed(folder)
    missing = [m for m in models if m not in have]
    if missing or not (folder / INDEX).is_file():
        write_index(folder, [*have, *models])
    return missing


def _indexed(folder: Path) -> list[str]:
    """The models an index lists ([] for a missing or unreadable one: it is rebuilt)."""
    index = folder / INDEX
    if not index.is_file():
        return []
    try:
        with h5py.File(index, "r", locking=False) as h5:
            return list(h5.keys())
    except OSError:
        return []


def _preserve(st: os.stat_result, real: Path, tmp: Path) -> None:
    """Give ``tmp`` the owner, group, mode, times (``st``: taken before we read the file) and
    extended attributes (ACLs included) of ``real``, where the file system allows; the swap
    must not change who can read the file nor when it says it was written."""
    with contextlib.suppress(PermissionError):
        os.chown(tmp, st.st_uid, st.st_gid)
    shutil.copystat(real, tmp)      # xattrs (system.posix_acl_*), mode
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))


def _carry(report: ScoresReport, path: Path, folder: Path, new_id: str) -> list[str]:
    """Copy each model's scores that belong to the file into its new folder (atomic files)."""
    moved = []
    with open_h5(path) as h5:
        for model, where in sorted(report.owned.items()):
            with open_model(path, h5, where) as grp, \
                    atomic_path(folder / model_file_name(model), overwrite=True) as own, \
                    h5py.File(own, "w") as out:
                for name, obj in grp.items():
                    grp.copy(obj, out, name)
                out.attrs.update(grp.attrs)     # as they were (older scores may record
                if ATTR_MODEL_STORE_ID in grp.attrs:   # no id: checked by length alone)
                    out.attrs[ATTR_MODEL_STORE_ID] = new_id
            moved.append(model)
    return moved


def _swap_id(real: Path, report: ScoresReport) -> str:
    """The store id a file gets when it is given a folder of its own: new (another path, or
    other stamps, than the id it has was issued for), and the same on a rerun after a kill
    mid-swap, which then finishes the same folder instead of leaving a second one."""
    owner = report.owner
    key = "\0".join([str(real), owner.store_id or "", owner.fingerprint or ""] if owner else
                     [str(real)])
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _convert(target: Path) -> list[str]:
    """Give a file a scores folder of its own, by copy-and-swap.

    For a copy, a renamed file, a file of another program or of an older stampbatch, or a
    packed file. A new store id is issued (so no two files that have been scored share one),
    the scores it shows that belong to its stamps (checked by store id and fingerprint) are
    copied into ``<name>.scores/<new id>/`` with their index; then the whole file is copied,
    its ``/scores`` replaced by the link to that folder, its owner, group, mode, times and
    xattrs restored, fsynced and renamed over the original. Whatever folder the file named
    before is never changed. Returns the models carried over.
    """
    real = _real(target)
    st = os.stat(real)
    report = scores_report(real)
    new_id = _swap_id(real, report)
    folder = home_folder(real, new_id)
    if root_of(real).exists() and not root_of(real).is_dir():
        raise fail(target, f"{root_of(real)} is a file, not a scores folder; "
                            "`stampbatch score --force` removes it")
    folder.mkdir(parents=True, exist_ok=True)
    fileio.fsync_dir(folder.parent)
    fileio.fsync_dir(real.parent)
    moved = _carry(report, real, folder, new_id)
    write_index(folder, moved)
    with atomic_path(real, overwrite=True) as tmp:
        shutil.copyfile(real, tmp)
        with h5py.File(tmp, "r+") as h5:
            if SCORES in h5 or h5.get(SCORES, getlink=True) is not None:
                del h5[SCORES]
            add_scores_link(h5, real.name, new_id)
        _preserve(st, real, tmp)
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
        if not os.access(self.path, os.W_OK):
            raise fail(self.path, "is read-only; write the scores to a side file with --out DIR")
        self._lock = None if locked else take_lock(self.path)
        self._h5: h5py.File | None = None
        self._ctx: contextlib.AbstractContextManager[Path] | None = None
        try:
            ensure_home(self.path)              # a copy or a foreign file: its own folder first
            with open_h5(self.path) as h5:
                self.owner = owner_of(h5)
            self.final = scores_file(self.path, model)
            if not self.final.parent.is_dir():
                write_index(self.final.parent, [])
            self._ctx = atomic_path(self.final, overwrite=True)
            self._h5 = h5py.File(self._ctx.__enter__(), "w")
            self._h5.attrs[ATTR_SCHEMA] = SCHEMA_VERSION
            self._h5.attrs[ATTR_COMPLETE] = False
            h, w = stamp_shape
            self._h5.create_dataset(PROBABILITY, shape=(n_stamps,), dtype=np.float32,
                                    chunks=(min(max(chunk_rows, 1024), n_stamps),),
                                    fillvalue=np.nan)
            self._h5.create_dataset(OCCLUSION, shape=(0, h, w), maxshape=(None, h, w),
                                    dtype=np.float32, chunks=(min(chunk_rows, 1024), h, w))
            self._h5.create_dataset(OCCLUSION_INDEX, shape=(0,), maxshape=(None,),
                                    dtype=np.int64, chunks=(4096,))
        except BaseException:
            self.close()
            raise

    def write_probability(self, start: int, probability: np.ndarray) -> None:
        assert self._h5 is not None, "ScoreWriter used after close"
        self._h5[PROBABILITY][start:start + len(probability)] = probability.astype(np.float32)

    def append_occlusion(self, rows: np.ndarray, maps: np.ndarray) -> None:
        if len(rows) == 0:
            return
        assert self._h5 is not None, "ScoreWriter used after close"
        ds, ix = self._h5[OCCLUSION], self._h5[OCCLUSION_INDEX]
        m = ds.shape[0]
        ds.resize(m + len(rows), axis=0)
        ds[m:] = maps.astype(np.float32)
        ix.resize(m + len(rows), axis=0)
        ix[m:] = rows.astype(np.int64)

    def commit(self, attrs: Mapping[str, Any], *, link: bool = True) -> None:
        """Provenance attributes, ``complete=True``, the file in place; then the link."""
        assert self._h5 is not None and self._ctx is not None, "commit once, before close"
        if self.owner.store_id is not None:
            self._h5.attrs[ATTR_MODEL_STORE_ID] = self.owner.store_id
        if self.owner.fingerprint is not None:
            self._h5.attrs[ATTR_FINGERPRINT] = self.owner.fingerprint
        for key, value in attrs.items():
            self._h5.attrs[key] = value
        self._h5.attrs[ATTR_COMPLETE] = True
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

    def __exit__(self, *exc: object) -> None:
        self.close()


def take_lock(target: Path | str) -> fileio.FileLock:
    """The target's write lock (one writer per file), or a StoreError naming the holder."""
    return fileio.FileLock(
        target, LOCK_SUFFIX,
        busy=lambda pid: fail(target, f"is locked by another process (pid {pid}; is a scorer "
                                       "still running on it?)"),
        failed=lambda exc: fail(target, f"cannot create the lock file {exc.filename} "
                                         f"({exc.strerror}); use --out DIR")).acquire()


def _locate(path: Path | str, model: str) -> tuple[ScoresReport, Path | str]:
    """Where one model's scores of ``path`` are, or the one-line reason they cannot be read."""
    report = scores_report(path)
    where = report.owned.get(model)
    if where is not None:
        return report, where
    if model in report.problems:
        raise StoreError(report.problems[model])
    if model in report.incomplete:
        raise fail(path, f"scores for model '{model}' are incomplete (an interrupted run; "
                          "rerun score)")
    if report.broken is not None:
        raise StoreError(report.broken)
    raise fail(path, f"has no scores for model '{model}' (has {sorted(report.owned)})")


@contextlib.contextmanager
def _model_group(path: Path | str, model: str) -> Iterator[h5py.Group]:
    with open_h5(path) as h5:
        in_file_models(Path(path), h5, None)
    _, where = _locate(path, model)
    with open_h5(path) as h5, open_model(path, h5, where) as grp:
        yield grp


def read_scores(path: Path | str, model: str, *, with_maps: bool = True) -> Scores:
    """Read the complete scores of one model (maps optional: they can be large).

    Only scores that belong to the file's stamps (store id and fingerprint) are read; any
    other, broken or missing ones raise a one-line StoreError saying what to run.
    """
    with _model_group(path, model) as grp:
        return Scores(
            model=model,
            probability=grp[PROBABILITY][:],
            occlusion_index=grp[OCCLUSION_INDEX][:],
            occlusion=grp[OCCLUSION][:] if with_maps else None,
            attrs={k: decode_attr(v) for k, v in grp.attrs.items()},
        )


def read_occlusion(path: Path | str, model: str, rows: Sequence[int]) -> dict[int, np.ndarray]:
    """Occlusion maps of the given stamp rows (those that have one), keyed by row."""
    with _model_group(path, model) as grp:
        index = grp[OCCLUSION_INDEX][:]
        where = {int(r): i for i, r in enumerate(index)}
        out = {}
        for row in rows:
            if int(row) in where:
                out[int(row)] = grp[OCCLUSION][where[int(row)]]
        return out


def read_occlusion_range(path: Path | str, model: str, start: int, stop: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The occlusion maps of the stamp rows in ``[start, stop)``: (rows, maps), rows increasing.

    One slice read (the index is increasing), so memory is bounded by the maps in the range.
    """
    with _model_group(path, model) as grp:
        index = grp[OCCLUSION_INDEX][:]
        lo, hi = np.searchsorted(index, [start, stop])
        return index[lo:hi], grp[OCCLUSION][lo:hi]
