"""The store's names (datasets, attributes, metadata columns), its error and record types, and the
small helpers every part of the store shares."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stampbatch.errors import StoreError

SCHEMA_VERSION = 1
DEFAULT_STAMP_SHAPE = (21, 21)
DEFAULT_CHUNK_ROWS = 4096
COMPRESSIONS = (None, "lzf", "gzip")

# Dataset and attribute names: public to the store package's modules (which alone may use
# them), never exported by ``stampbatch.store``.
STAMPS = "stamps"
LABELS = "labels"
META = "meta"
SCORES = "scores"
PROBABILITY = "probability"
OCCLUSION = "occlusion"
OCCLUSION_INDEX = "occlusion_index"
ATTR_SCHEMA = "stampbatch_schema"
ATTR_SHAPE = "stamp_shape"
ATTR_COMPLETE = "complete"
ATTR_SOURCE = "source_file"
ATTR_FINGERPRINT = "source_fingerprint"
ATTR_STORE_ID = "stampbatch_store_id"  # root: a random id, new whenever the stamps are written
ATTR_MODEL_STORE_ID = "store_id"        # a model's scores: the id of the file they belong to
ATTR_SOURCE_STORE_ID = "source_store_id"  # a --out side file: the id of the candidate file
INDEX = "index.h5"
MODEL_PREFIX = "model-"                # model-<name>.h5: never collides with index.h5
RETIRED = ".retired-"                  # <target>.scores/.retired-<id>-<rand>: being deleted
SCORES_DIR_SUFFIX = ".scores"           # <target>.scores/<store id>/model-<model>.h5
LOCK_SUFFIX = ".stampbatch.lock"        # <resolved target>.stampbatch.lock: one writer per file

# Metadata columns (/meta/<name>) that stampbatch reads or writes; other modules use these
# names, never the strings. The simulator writes all of them but IMAGE_TYPE; ingested real
# stores carry whichever their per-stamp table has.
META_SNR = "snr"  # matched-filter SNR of the signal that made the stamp's kind
META_KIND = "kind"  # source, background, offcentre, hot_pixel, cosmic_ray, streak, dipole
META_TRUE_LABEL = "true_label"  # the truth of a candidate file (no /labels)
META_PROFILE = "profile"  # centre source: none, point, galaxy, saturated
META_BACKGROUND = "background"  # science, sky_subtracted, difference
META_COMPANION = "companion"  # none, offcentre, streak: off the centre, in either class
META_N_FIELD = "n_field"  # field sources on the stamp
META_NN_DISTANCE = "nn_distance"  # px from the centre to the nearest field source
META_NN_SNR = "nn_snr"  # point-source SNR of that neighbour
META_FIELD_DENSITY = "field_density"  # field sources per 100 px^2
META_HALF_LIGHT_RADIUS = "half_light_radius"  # centre galaxies, px (circularised)
META_IMAGE_TYPE = "image_type"  # real stores: science, difference, single_epoch, coadd


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


def fail(path: Path | str, problem: str) -> StoreError:
    """The StoreError for ``path``: one line naming the file and the problem."""
    return StoreError(f"{path}: {problem}")


def decode_attr(value: Any) -> Any:
    """An HDF5 attribute value as plain Python (bytes decoded, arrays as lists)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def decode_column(arr: np.ndarray) -> np.ndarray:
    """A /meta column with byte strings decoded to str."""
    if arr.dtype.kind == "S":
        return np.char.decode(arr, "utf-8")
    return arr


# --------------------------------------------------------------------------- opening


def open_h5(path: Path | str, mode: str = "r") -> h5py.File:
    """Open an HDF5 file, every failure a StoreError naming the file (no checks of the schema)."""
    path = Path(path)
    if not path.exists():
        raise fail(path, "no such file")
    if path.is_dir():
        raise fail(path, "is a directory, not an HDF5 file")
    if not h5py.is_hdf5(path):
        raise fail(path, "not an HDF5 file")
    try:
        return h5py.File(path, mode)
    except PermissionError as exc:
        raise fail(path, f"cannot open for {'writing' if mode != 'r' else 'reading'}: permission denied") from exc
    except OSError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "unable to lock file" in first.lower() or "file locking" in first.lower():
            raise fail(path, "is locked by another process (is a scorer still running on it?)") from exc
        raise fail(path, f"unreadable or truncated HDF5 file ({first})") from exc


# --------------------------------------------------------------------------- scores
#
# Each model's scores live in a file of their own, ``<target>.scores/<store id>/model-<model>.h5``,
# with ``probability``, ``occlusion`` and ``occlusion_index`` at its root and the ``store_id``
# and ``source_fingerprint`` of the stamps they were computed from; it is written under a
# temporary name, fsynced and renamed, so it is either absent or complete. The folder's
# ``index.h5`` holds one external link per model (``<model>`` → ``model-<model>.h5:/``) and is
# replaced whole (fsync, rename) when a model is added. The target holds only ``/scores``, an
# external link to ``<name>.scores/<store id>/index.h5:/`` that a store gets, with the empty
# index, when it is created, so scoring never writes the candidate file. stampbatch's readers
# resolve that link beside the file themselves and check each model's ownership
# (``_sidecar``); plain h5py follows the two links, and the store id in the path keeps HDF5's
# working-directory fallback from finding any other store's folder.


def scores_link(h5: h5py.File) -> h5py.ExternalLink | None:
    """The file's /scores external link, or None (no /scores, or an in-file group)."""
    link = h5.get(SCORES, getlink=True)
    return link if isinstance(link, h5py.ExternalLink) else None


def new_store_id() -> str:
    """A fresh random store id."""
    import uuid

    return uuid.uuid4().hex


def read_store_id(h5: h5py.File) -> str | None:
    """The store id of an open file (None: none recorded)."""
    value = h5.attrs.get(ATTR_STORE_ID)
    return None if value is None else str(decode_attr(value))


def link_target(final_name: str, store_id: str) -> str:
    """Where the /scores link of a file named ``final_name`` with ``store_id`` points."""
    return f"{final_name}{SCORES_DIR_SUFFIX}/{store_id}/{INDEX}"


def add_scores_link(h5: h5py.File, final_name: str, store_id: str) -> None:
    """Record ``store_id`` in the file and point its /scores at that id's scores folder."""
    h5.attrs[ATTR_STORE_ID] = store_id
    h5[SCORES] = h5py.ExternalLink(link_target(final_name, store_id), "/")


def model_file_name(model: str) -> str:
    """The name of the file holding ``model``'s scores in a scores folder."""
    return f"{MODEL_PREFIX}{model}.h5"


def score_groups(h5: h5py.File) -> dict[str, h5py.Group]:
    """The /scores/<model> groups that resolve (a link to a missing file does not)."""
    scores = h5.get(SCORES)
    if not isinstance(scores, h5py.Group):
        return {}
    return {name: obj for name, obj in score_members(scores) if isinstance(obj, h5py.Group)}


def score_members(scores: h5py.Group) -> Iterator[tuple[str, h5py.HLObject | None]]:
    """Each member of /scores, resolved; None where it does not resolve (an external link
    to a missing or unreadable file)."""
    for name in scores:
        try:
            yield name, scores.get(name)
        except (KeyError, OSError):
            yield name, None


def is_complete(grp: h5py.Group) -> bool:
    """Whether a model's scores group was marked complete."""
    return bool(grp.attrs.get(ATTR_COMPLETE, False))
