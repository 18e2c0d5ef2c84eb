"""The store's names (datasets, attributes, metadata columns), its error and record types, and the
small helpers every part of the store shares."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
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
META_COMPANION = "companion"  # none, offcentre, streak: off the centre, in either class
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


def _add_scores_link(h5: h5py.File, final_name: str) -> None:
    h5[_SCORES] = h5py.ExternalLink(f"{final_name}{SCORES_DIR_SUFFIX}/{_INDEX}", "/")


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


def _scores_group(path: Path | str, h5: h5py.File, model: str) -> h5py.Group:
    grp = _score_groups(h5).get(model)
    if grp is None:
        raise _fail(path, f"has no scores for model '{model}' (has {sorted(_score_groups(h5))})")
    if not _complete(grp):
        raise _fail(path, f"scores for model '{model}' are incomplete (an interrupted run; "
                          "rerun score)")
    return grp
