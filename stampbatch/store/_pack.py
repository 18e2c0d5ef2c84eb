"""Packing: one self-contained HDF5 file from a store and the scores in its sidecar folder.

A scored store keeps its scores beside it (``<name>.scores/``, reached through the external
link ``/scores``), which is what makes scoring crash-safe, but a file moved or sent alone
loses them. :func:`pack` writes a new file that holds everything: the store's datasets and
attributes, and ``/scores/<model>/{probability, occlusion, occlusion_index}`` as ordinary
groups carrying each model's scores-file attributes. The store's readers read such a file
as they read a linked one (an in-file ``/scores`` group is also what older stampbatch wrote).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py

from stampbatch import fileio
from stampbatch.errors import StoreError
from stampbatch.store._schema import (
    SCORES,
    fail,
    open_h5,
)
from stampbatch.store._sidecar import open_model, scores_report
from stampbatch.store._validate import store_info
from stampbatch.store._write import atomic_path

PACKED_SUFFIX = ".packed.h5"     # the default output: <stem>.packed.h5 beside the input


@dataclass(frozen=True)
class Packed:
    """What :func:`pack` wrote: the output, its models, and the incomplete ones left out."""

    path: Path
    models: tuple[str, ...]
    skipped: tuple[str, ...]


def packed_path(path: Path | str, out_dir: Path | str | None = None) -> Path:
    """Where :func:`pack` writes by default: ``<stem>.packed.h5`` beside the input (a new
    name, so the original and its sidecar stay in use for further scoring), or the input's
    own name in ``out_dir`` (a folder of files to ship as they were called)."""
    path = Path(path)
    if out_dir is not None:
        return Path(out_dir) / path.name
    return path.with_name(path.stem + PACKED_SUFFIX)


def _models_to_pack(path: Path, h5: h5py.File) -> tuple[dict[str, Path | str], list[str]]:
    """(model -> where its scores are, for every model whose complete scores the file shows
    and that belong to its store id and stamps; the incomplete ones); a StoreError, the
    scores check's own line, for a scores folder or model that is broken or belongs to
    other stamps (nothing is written then: a pack never drops scores in silence)."""
    report = scores_report(path, h5)
    if report.problems:
        line = report.broken or next(iter(report.problems.values()))
        raise StoreError(f"{line}; nothing packed")
    if not report.owned:
        raise fail(path, "has no scores to pack"
                          + (f" ({', '.join(report.incomplete)} interrupted: rerun score)"
                             if report.incomplete else " (score it first)"))
    return dict(sorted(report.owned.items())), sorted(report.incomplete)


def check_packable(path: Path | str, out: Path | str | None = None, *,
                   overwrite: bool = False) -> Packed:
    """What :func:`pack` would write, checked without writing anything: a StoreError for an
    input that is not a store, whose scores do not resolve or belong to other stamps, or
    that holds no complete scores, and for an output that exists (unless ``overwrite``),
    is the input itself, or whose folder is missing or not writable."""
    path = Path(path)
    out = packed_path(path) if out is None else Path(out)
    with open_h5(path) as h5:
        info = store_info(path, h5)
        if info.is_score_file:
            raise fail(path, "is a score side file (written with --out); pack the candidate "
                              "file it scores instead")
        models, skipped = _models_to_pack(path, h5)
    if out.exists() and os.path.samefile(out, path):
        raise fail(out, "is the input itself; choose another output")
    if out.exists() and not overwrite:
        raise fail(out, "already exists (pass --overwrite to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise fail(out, f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise fail(out, f"directory {parent} is not writable")
    return Packed(out, tuple(models), tuple(skipped))


def pack(path: Path | str, out: Path | str | None = None, *, overwrite: bool = False) -> Packed:
    """Write ``path`` and its scores as one self-contained file ``out`` (default
    :func:`packed_path`), crash-safe: built under a temporary name beside ``out``, fsynced,
    renamed, directory fsynced; a killed pack leaves ``out`` absent (or as it was) and its
    temporary file is removed by the next pack to ``out``. Datasets are copied by HDF5
    itself (``H5Ocopy``), chunk by chunk and without decompressing, so memory stays small
    at any size and every value is bit-identical. Every model whose complete scores belong
    to the stamps is packed (incomplete ones, from an interrupted run, are left out and
    listed). Refusals are :func:`check_packable`'s, before anything is written.
    """
    path = Path(path)
    plan = check_packable(path, out, overwrite=overwrite)
    fileio.remove_partials(plan.path)                    # what a killed pack left
    with open_h5(path) as h5, atomic_path(plan.path, overwrite=overwrite) as tmp, \
            h5py.File(tmp, "w") as dst:
        models, _ = _models_to_pack(path, h5)           # the same check, on the file as read
        dst.attrs.update(h5.attrs)
        for name in h5:
            if name != SCORES:
                h5.copy(h5[name], dst, name, expand_external=True, expand_soft=True)
        scores = dst.create_group(SCORES)
        for model, where in models.items():
            with open_model(path, h5, where) as grp:
                grp.file.copy(grp, scores, model, expand_external=True, expand_soft=True)
        links: list[str] = []
        dst.visititems_links(lambda name, link: links.append(name)
                             if isinstance(link, h5py.ExternalLink) else None)
        if links:
            raise fail(path, f"cannot be packed: /{links[0]} is an external link that HDF5 "
                              "did not copy")
    return Packed(plan.path, tuple(models), plan.skipped)
