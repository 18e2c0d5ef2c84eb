"""Whose scores a file shows: its ``/scores`` (a link to ``<file>.scores/<store id>/index.h5``
or, in a packed or older file, groups inside it) resolved by hand and checked, model by model,
against the file's store id and stamps fingerprint.

Nothing here follows HDF5's own link resolution (which falls back to the working directory),
and nothing here raises on a broken or foreign scores folder: every problem becomes one line
in :class:`ScoresReport`, naming the file and what to run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stampbatch.store._schema import (
    ATTR_FINGERPRINT,
    ATTR_MODEL_STORE_ID,
    ATTR_SOURCE,
    INDEX,
    MODEL_PREFIX,
    OCCLUSION,
    OCCLUSION_INDEX,
    PROBABILITY,
    SCORES,
    SCORES_DIR_SUFFIX,
    STAMPS,
    decode_attr,
    is_complete,
    link_target,
    read_store_id,
    scores_link,
)

MOVED_ALONE = ("moved without `{root}/`? copy that folder beside it, or `stampbatch score "
               "--force`; `stampbatch pack` makes one self-contained file")
REBUILD = "`stampbatch score --force` rebuilds it"


def fingerprint_of(h5: h5py.File) -> str:
    """A digest of /stamps (shape, dtype and the first, middle and last 256 rows)."""
    ds = h5[STAMPS]
    n = int(ds.shape[0])
    digest = hashlib.sha256(repr((tuple(ds.shape), str(ds.dtype))).encode())
    k = min(n, 256)
    for lo in sorted({0, (n - k) // 2, n - k}):
        digest.update(np.ascontiguousarray(ds[lo:lo + k], dtype=np.float32).tobytes())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class Owner:
    """What the scores shown by a file must have been computed from."""

    store_id: str | None        # None: a file of an older stampbatch (fingerprint only)
    fingerprint: str | None
    n_stamps: int | None


def owner_of(h5: h5py.File) -> Owner:
    """The store's own identity; for a ``--out`` side file, the candidate's it recorded."""
    sid = read_store_id(h5)
    if STAMPS in h5 and isinstance(h5[STAMPS], h5py.Dataset):
        try:
            fingerprint: str | None = fingerprint_of(h5)
        except OSError:     # damaged stamp chunks: the id and the length still decide, and
            fingerprint = None  # whatever reads the stamps says which file is damaged
        return Owner(sid, fingerprint, int(h5[STAMPS].shape[0]))
    fp = h5.attrs.get(ATTR_FINGERPRINT)
    n = h5.attrs.get("n_stamps")
    return Owner(sid, None if fp is None else str(decode_attr(fp)),
                 None if n is None else int(np.asarray(n).item()) or None)


def foreign_reason(attrs: Any, owner: Owner, grp: h5py.Group) -> str | None:
    """Why a complete model's scores do not belong to ``owner`` (None: they do)."""
    sid = attrs.get(ATTR_MODEL_STORE_ID)
    if sid is not None and owner.store_id is not None and str(decode_attr(sid)) != owner.store_id:
        return "store id"
    fp = attrs.get(ATTR_FINGERPRINT)
    if fp is not None and owner.fingerprint is not None \
            and str(decode_attr(fp)) != owner.fingerprint:
        return "stamps fingerprint"
    prob = grp.get(PROBABILITY)
    if isinstance(prob, h5py.Dataset) and owner.n_stamps is not None \
            and prob.shape != (owner.n_stamps,):
        return f"length {prob.shape[0] if prob.ndim else '?'}, the file has {owner.n_stamps}"
    return None


def _missing_dataset(grp: h5py.Group) -> str | None:
    for name in (PROBABILITY, OCCLUSION_INDEX, OCCLUSION):
        if not isinstance(grp.get(name), h5py.Dataset):
            return name
    return None


@dataclass
class ScoresReport:
    """What ``/scores`` of one file holds, checked.

    ``owned``: complete scores that belong to the file's stamps, model → where they are (a
    model file, or the in-file group ``/scores/<model>``); ``unlinked``: the same for model
    files in the file's folder that its index does not list yet (a run killed before linking);
    ``incomplete``: models marked incomplete; ``problems``: model → one line ("" for the
    whole folder), each naming the file and what to run.
    """

    path: Path
    folder: Path | None = None            # the scores folder the link names (None: in-file)
    at_home: bool = True                  # the link names <this file's name>.scores/<its id>
    linked: bool = False
    owner: Owner | None = None
    owned: dict[str, Path | str] = field(default_factory=dict)
    unlinked: dict[str, Path] = field(default_factory=dict)
    incomplete: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def broken(self) -> str | None:
        """The problem of the folder as a whole (None: it reads)."""
        return self.problems.get("")

    def problem(self, model: str, what: str) -> None:
        self.problems[model] = f"{self.path}: {what}"


def _check_group(report: ScoresReport, model: str, grp: h5py.Group, where: Path | str,
                 label: str) -> None:
    assert report.owner is not None
    if not is_complete(grp):
        report.incomplete.append(model)
        return
    missing = _missing_dataset(grp)
    if missing is not None:
        report.problem(model, f"{label} is marked complete but has no '{missing}' dataset "
                              f"(rescore with --force)")
        return
    why = foreign_reason(grp.attrs, report.owner, grp)
    if why is not None:
        where_ = f"{where.parent} ({where.name})" if isinstance(where, Path) else label
        report.problem(model, f"scores in {where_} belong to other stamps ({why} differs); "
                              f"`stampbatch score` scores them afresh")
        return
    report.owned[model] = where


def _model_file(report: ScoresReport, model: str, file: Path, *, linked: bool) -> None:
    label = str(file)
    if file.is_dir():
        report.problem(model, f"{label} is a folder, not a scores file; {REBUILD}")
        return
    if not file.is_file():
        report.problem(model, f"/scores/{model}: {label} is missing; {REBUILD}")
        return
    try:
        h5 = _open_ro(file)
    except OSError as exc:
        report.problem(model, f"{label} is unreadable ({_first_line(exc)}); {REBUILD}")
        return
    with h5:
        if not linked:
            if not is_complete(h5):
                return
            missing = _missing_dataset(h5)
            assert report.owner is not None
            if missing is None and foreign_reason(h5.attrs, report.owner, h5) is None:
                report.unlinked[model] = file
            return
        _check_group(report, model, h5, file, label)


def _open_ro(file: Path) -> h5py.File:
    """Open a scores folder's index or model file for reading. Without HDF5's file lock:
    these files are never written in place (each is replaced whole by a rename), and a lock
    held by another process — or inherited by a forked child — must not make a good file
    read as broken."""
    return h5py.File(file, "r", locking=False)


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()
    return text[0] if text and text[0] else type(exc).__name__


def scores_report(path: Path | str, h5: h5py.File | None = None) -> ScoresReport:
    """Check what ``/scores`` of ``path`` shows (``h5``: the file, already open)."""
    path = Path(path)
    if h5 is None:
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            report = ScoresReport(path)
            report.problem("", f"unreadable ({_first_line(exc)})")
            return report
        with f:
            return scores_report(path, f)
    owner = owner_of(h5)
    report = ScoresReport(path, owner=owner)
    link = scores_link(h5)
    if link is None:
        try:
            scores = h5.get(SCORES)
        except (KeyError, OSError):
            scores = None
        if isinstance(scores, h5py.Group):
            for model in scores:
                grp = scores.get(model)
                if isinstance(grp, h5py.Group):
                    _check_group(report, model, grp, f"/{SCORES}/{model}",
                                 f"/{SCORES}/{model}")
        return report
    real = Path(os.path.realpath(path))
    rel = Path(link.filename)
    report.linked = True
    report.folder = real.parent / rel.parent
    sid = owner.store_id
    report.at_home = sid is not None and link.filename == link_target(real.name, sid)
    root = real.parent / rel.parts[0] if len(rel.parts) > 1 else real.parent
    if root.exists() and not root.is_dir():
        report.problem("", f"{root} is a file, not the scores folder; {REBUILD}")
        return report
    if not report.folder.exists():
        if sid is not None:      # an older file without an id may simply never have been scored
            report.problem("", f"scores folder {report.folder} is missing: "
                               + MOVED_ALONE.format(root=rel.parts[0]))
        return report
    index = report.folder / INDEX
    if index.is_dir():
        report.problem("", f"{index} is a folder, not the scores index; {REBUILD}")
        return report
    if not index.exists():
        if sid is not None:
            report.problem("", f"{index} is missing; {REBUILD}")
        _unlinked(report, set())
        return report
    try:
        idx = _open_ro(index)
    except OSError as exc:
        report.problem("", f"{index} is unreadable ({_first_line(exc)}); {REBUILD}")
        return report
    listed = set()
    with idx:
        for model in idx:
            entry = idx.get(model, getlink=True)
            listed.add(model)
            if isinstance(entry, h5py.ExternalLink):
                _model_file(report, model, report.folder / entry.filename, linked=True)
            else:
                report.problem(model, f"{index}: /{model} is not a link to a scores file; "
                                      f"{REBUILD}")
    _unlinked(report, listed)
    return report


def _unlinked(report: ScoresReport, listed: set[str]) -> None:
    assert report.folder is not None
    for file in sorted(report.folder.glob(f"{MODEL_PREFIX}*.h5")):
        model = file.name[len(MODEL_PREFIX):-3]
        if model not in listed:
            with contextlib.suppress(OSError):
                _model_file(report, model, file, linked=False)
    # an older layout (<model>.h5 beside index.h5, no prefix): read through the index only


@contextlib.contextmanager
def open_model(path: Path | str, h5: h5py.File, where: Path | str) -> Iterator[h5py.Group]:
    """The group of one model's scores: a model file's root, or ``/scores/<model>`` in ``h5``."""
    if isinstance(where, Path):
        with _open_ro(where) as f:
            yield f
    else:
        yield h5[where]


def is_side_file(h5: h5py.File) -> bool:
    return ATTR_SOURCE in h5.attrs and STAMPS not in h5


def root_of(real: Path) -> Path:
    """``<file>.scores``: the folder of every store id a file of this name has had."""
    return real.with_name(real.name + SCORES_DIR_SUFFIX)
