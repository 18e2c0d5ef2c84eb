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
_ATTR_STORE_ID = "stampbatch_store_id"  # root: a random id, new whenever the stamps are written
_ATTR_MODEL_STORE_ID = "store_id"        # a model's scores: the id of the file they belong to
_ATTR_SOURCE_STORE_ID = "source_store_id"  # a --out side file: the id of the candidate file
_INDEX = "index.h5"
_MODEL_PREFIX = "model-"                # model-<name>.h5: never collides with index.h5
_RETIRED = ".retired-"                  # <target>.scores/.retired-<id>-<rand>: being deleted
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


def _decode_column(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "S":
        return np.char.decode(arr, "utf-8")
    return arr


# --------------------------------------------------------------------------- opening


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


def _scores_link(h5: h5py.File) -> h5py.ExternalLink | None:
    link = h5.get(_SCORES, getlink=True)
    return link if isinstance(link, h5py.ExternalLink) else None


def _new_store_id() -> str:
    import uuid

    return uuid.uuid4().hex


def _store_id(h5: h5py.File) -> str | None:
    value = h5.attrs.get(_ATTR_STORE_ID)
    return None if value is None else str(_decode_attr(value))


def _link_target(final_name: str, store_id: str) -> str:
    """Where the /scores link of a file named ``final_name`` with ``store_id`` points."""
    return f"{final_name}{SCORES_DIR_SUFFIX}/{store_id}/{_INDEX}"


def _add_scores_link(h5: h5py.File, final_name: str, store_id: str) -> None:
    h5.attrs[_ATTR_STORE_ID] = store_id
    h5[_SCORES] = h5py.ExternalLink(_link_target(final_name, store_id), "/")


def _model_file_name(model: str) -> str:
    return f"{_MODEL_PREFIX}{model}.h5"


def _score_groups(h5: h5py.File) -> dict[str, h5py.Group]:
    """The /scores/<model> groups that resolve (a link to a missing file does not)."""
    scores = h5.get(_SCORES)
    if not isinstance(scores, h5py.Group):
        return {}
    return {name: obj for name, obj in _score_members(scores) if isinstance(obj, h5py.Group)}


def _score_members(scores: h5py.Group) -> Iterator[tuple[str, h5py.HLObject | None]]:
    """Each member of /scores, resolved; None where it does not resolve (an external link
    to a missing or unreadable file)."""
    for name in scores:
        try:
            yield name, scores.get(name)
        except (KeyError, OSError):
            yield name, None


def _complete(grp: h5py.Group) -> bool:
    return bool(grp.attrs.get(_ATTR_COMPLETE, False))
