"""Validation of stores and of arrays on their way in: one-line errors naming the file and part."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stampbatch.store._schema import (
    ATTR_SCHEMA,
    ATTR_SHAPE,
    ATTR_SOURCE,
    LABELS,
    META,
    OCCLUSION,
    OCCLUSION_INDEX,
    PROBABILITY,
    SCHEMA_VERSION,
    SCORES,
    STAMPS,
    StoreInfo,
    decode_attr,
    fail,
    is_complete,
    open_h5,
    score_groups,
    score_members,
)
from stampbatch.store._sidecar import scores_report


def check_stamps(path: Path | str, stamps: Any, stamp_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Return ``stamps`` as float32 (N, H, W), or raise a StoreError saying what is wrong."""
    arr = np.asarray(stamps)
    if arr.dtype.kind == "O":
        raise fail(path, "stamps are Python objects, not numbers")
    if arr.dtype.kind not in "fiu":
        raise fail(path, f"stamps have dtype {arr.dtype}, expected a numeric array")
    if arr.ndim != 3:
        raise fail(path, f"stamps have shape {arr.shape}, expected (N, H, W)")
    if arr.shape[0] == 0:
        raise fail(path, "no stamps (the array is empty)")
    if stamp_shape is not None and tuple(arr.shape[1:]) != tuple(stamp_shape):
        raise fail(path, f"stamps are {arr.shape[1]}x{arr.shape[2]}, expected "
                          f"{stamp_shape[0]}x{stamp_shape[1]}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def check_labels(path: Path | str, labels: Any, n: int) -> np.ndarray:
    """Return labels as int8 of length n holding only 0 and 1, or raise a StoreError."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or len(arr) != n:
        raise fail(path, f"labels have shape {arr.shape}, expected ({n},) to match the stamps")
    if arr.dtype.kind not in "iub" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise fail(path, f"labels have dtype {arr.dtype}, expected integers 0/1")
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        raise fail(path, f"labels must be 0 or 1; found {np.unique(arr[bad])[:5].tolist()}")
    return arr.astype(np.int8)


# Metadata columns that summaries and evaluation read as numbers.
_NUMERIC_META = ("snr", "true_label", "source_row")


def _schema_version(path: Path, h5: h5py.File) -> int:
    version = h5.attrs.get(ATTR_SCHEMA)
    if version is None:
        raise fail(path, f"not a stampbatch store (no '{ATTR_SCHEMA}' attribute)")
    value = np.asarray(version)
    if value.shape != () or value.dtype.kind not in "iu":
        raise fail(path, f"attribute '{ATTR_SCHEMA}' is {decode_attr(version)!r}, expected the "
                          f"integer {SCHEMA_VERSION} (the file was not written by stampbatch, or "
                          f"was edited)")
    if int(value) != SCHEMA_VERSION:
        raise fail(path, f"schema version {int(value)} is not supported "
                          f"(this stampbatch reads {SCHEMA_VERSION})")
    return int(value)


def _stamp_shape_attr(path: Path, h5: h5py.File) -> tuple[int, int]:
    value = h5.attrs.get(ATTR_SHAPE)
    arr = np.asarray(value) if value is not None else None
    if arr is None or arr.shape != (2,) or arr.dtype.kind not in "iu" or (arr < 1).any():
        found = "missing" if value is None else repr(decode_attr(value))
        raise fail(path, f"attribute '{ATTR_SHAPE}' is {found}, expected two positive "
                          f"integers (stamp height, width)")
    return int(arr[0]), int(arr[1])


def _check_filters(path: Path, ds: h5py.Dataset) -> None:
    """Refuse a dataset whose HDF5 filters (compression plugins) are not available here."""
    plist = ds.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        code, _flags, _values, name = plist.get_filter(i)
        if not h5py.h5z.filter_avail(code):
            label = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
            raise fail(path, f"/{ds.name.lstrip('/')} needs HDF5 filter {code}"
                              f"{f' ({label})' if label else ''}, which is not installed here; "
                              f"install its plugin (e.g. pip install hdf5plugin) or re-ingest "
                              f"the stamps without compression")


def in_file_models(path: Path, h5: h5py.File, n: int | None) -> tuple[str, ...]:
    """Models in an in-file /scores group (a packed file, an older one); each must be a
    group, and a complete one must hold its datasets. A /scores link to a scores folder is
    not followed here (the store's own checks stay cheap): :func:`open_store` and the score
    readers check that folder, model by model, against the file's identity."""
    if isinstance(h5.get(SCORES, getlink=True), h5py.ExternalLink):
        return ()
    try:
        scores = h5.get(SCORES)
    except (KeyError, OSError):  # the link to the scores index resolves to nothing yet
        scores = None
    if scores is None:
        return ()
    if not isinstance(scores, h5py.Group):
        raise fail(path, f"/{SCORES} is a dataset, expected a group of models (remove it, "
                          f"e.g. with h5py, and score again)")
    for model, obj in score_members(scores):
        if isinstance(obj, h5py.Dataset):
            raise fail(path, f"/{SCORES}/{model} is a dataset, expected a group")
    groups = score_groups(h5)
    for model, grp in groups.items():
        if not is_complete(grp):
            continue  # an interrupted run: reported as incomplete and replaced by the next one
        for name in (PROBABILITY, OCCLUSION_INDEX, OCCLUSION):
            if not isinstance(grp.get(name), h5py.Dataset):
                raise fail(path, f"/{SCORES}/{model} is marked complete but has no '{name}' "
                                  f"dataset (rescore with --force)")
        # a length other than the stamps' is scores of other stamps: shown as such, not fatal
    return tuple(sorted(groups))


def _check_meta(path: Path, h5: h5py.File, n: int) -> tuple[str, ...]:
    if META not in h5:
        return ()
    if not isinstance(h5[META], h5py.Group):
        raise fail(path, f"/{META} is a dataset, expected a group of columns")
    names: list[str] = []
    for name, col in h5[META].items():
        if not isinstance(col, h5py.Dataset) or col.ndim != 1 or col.shape[0] != n:
            shape = getattr(col, "shape", "a group")
            raise fail(path, f"/meta/{name} has shape {shape}, expected ({n},)")
        if name in _NUMERIC_META and col.dtype.kind not in "fiub":
            raise fail(path, f"/meta/{name} has dtype {col.dtype}, expected numbers")
        names.append(name)
    return tuple(sorted(names))


def store_info(path: Path, h5: h5py.File) -> StoreInfo:
    """Validate an open store (or score side file) against the schema; its StoreInfo."""
    _schema_version(path, h5)
    is_score_file = ATTR_SOURCE in h5.attrs and STAMPS not in h5
    stamp_shape = _stamp_shape_attr(path, h5)
    if is_score_file:
        n = int(np.asarray(h5.attrs.get("n_stamps", 0)).item())
        models = in_file_models(path, h5, n or None)
        return StoreInfo(path, n, stamp_shape, False, (), models, 0, None, True)
    if STAMPS not in h5 or not isinstance(h5[STAMPS], h5py.Dataset):
        raise fail(path, "has no /stamps dataset")
    ds = h5[STAMPS]
    if ds.dtype != np.float32:
        raise fail(path, f"/stamps has dtype {ds.dtype}, expected float32")
    if ds.ndim != 3 or tuple(ds.shape[1:]) != stamp_shape:
        raise fail(path, f"/stamps has shape {ds.shape}, expected (N, {stamp_shape[0]}, {stamp_shape[1]})")
    n = int(ds.shape[0])
    if n == 0:
        raise fail(path, "/stamps is empty")
    _check_filters(path, ds)
    labelled = LABELS in h5
    if labelled:
        lab = h5[LABELS]
        if not isinstance(lab, h5py.Dataset) or lab.ndim != 1 or lab.shape[0] != n:
            raise fail(path, f"/labels has shape {getattr(lab, 'shape', 'a group')}, expected ({n},) "
                              f"to match /stamps")
        if lab.dtype.kind not in "iu":
            raise fail(path, f"/labels has dtype {lab.dtype}, expected integers")
        _check_filters(path, lab)
    meta_cols = _check_meta(path, h5, n)
    models = in_file_models(path, h5, n)
    chunk_rows = int(ds.chunks[0]) if ds.chunks else n
    return StoreInfo(path, n, stamp_shape, labelled, meta_cols, models,
                     chunk_rows, ds.compression, False)


def open_store(path: Path | str, *, check_labels_values: bool = False) -> StoreInfo:
    """Open and validate a store; raise StoreError naming the file and the first problem.

    With ``check_labels_values`` the labels are also read (in chunks) and checked to hold
    only 0 and 1 — worth it before training, not needed for scoring.
    """
    path = Path(path)
    with open_h5(path) as h5:
        info = store_info(path, h5)
        report = scores_report(path, h5)
        info = dataclasses.replace(info, scored_models=tuple(sorted(
            {*report.owned, *report.incomplete})))
        if check_labels_values and info.labelled:
            lab = h5[LABELS]
            step = 1 << 20
            for start in range(0, info.n_stamps, step):
                block = lab[start:start + step]
                bad = ~np.isin(block, (0, 1))
                if bad.any():
                    raise fail(path, f"/labels must be 0 or 1; found {np.unique(block[bad])[:5].tolist()}")
    return info
