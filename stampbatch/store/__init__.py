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

The package: ``_schema`` (names, records), ``_validate``, ``_write``, ``_read``,
``_scores`` and ``_pack`` (one self-contained file from a store and its scores); everything
public is imported here, so callers write ``store.open_store``.
"""

from __future__ import annotations

from stampbatch.errors import StoreError
from stampbatch.store._pack import (
    PACKED_SUFFIX,
    Packed,
    check_packable,
    pack,
    packed_path,
)
from stampbatch.store._read import (
    read_attrs,
    read_labels,
    read_meta,
    read_rows,
    read_stamps,
)
from stampbatch.store._schema import (
    COMPRESSIONS,
    DEFAULT_CHUNK_ROWS,
    DEFAULT_STAMP_SHAPE,
    LOCK_SUFFIX,
    META_BACKGROUND,
    META_COMPANION,
    META_FIELD_DENSITY,
    META_HALF_LIGHT_RADIUS,
    META_IMAGE_TYPE,
    META_KIND,
    META_N_FIELD,
    META_NN_DISTANCE,
    META_NN_SNR,
    META_PROFILE,
    META_SNR,
    META_TRUE_LABEL,
    SCHEMA_VERSION,
    SCORES_DIR_SUFFIX,
    Scores,
    StoreInfo,
)
from stampbatch.store._scores import (
    ScoreWriter,
    check_scores,
    committed_models,
    create_score_file,
    ensure_home,
    home_problem,
    link_scores,
    list_scores,
    needs_home,
    read_occlusion,
    read_occlusion_range,
    read_scores,
    repair_scores,
    score_status,
    score_target,
    scores_dir,
    scores_file,
    stamps_fingerprint,
    store_id,
    sweep_partial,
    take_lock,
)
from stampbatch.store._sidecar import ScoresReport
from stampbatch.store._validate import (
    check_labels,
    check_stamps,
    open_store,
)
from stampbatch.store._write import (
    StoreWriter,
    atomic_path,
    create_store,
)

__all__ = [
    "COMPRESSIONS",
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_STAMP_SHAPE",
    "LOCK_SUFFIX",
    "META_BACKGROUND",
    "META_COMPANION",
    "META_FIELD_DENSITY",
    "META_HALF_LIGHT_RADIUS",
    "META_IMAGE_TYPE",
    "META_KIND",
    "META_NN_DISTANCE",
    "META_NN_SNR",
    "META_N_FIELD",
    "META_PROFILE",
    "META_SNR",
    "META_TRUE_LABEL",
    "PACKED_SUFFIX",
    "SCHEMA_VERSION",
    "SCORES_DIR_SUFFIX",
    "Packed",
    "ScoreWriter",
    "Scores",
    "ScoresReport",
    "StoreError",
    "StoreInfo",
    "StoreWriter",
    "atomic_path",
    "check_labels",
    "check_scores",
    "check_packable",
    "check_stamps",
    "committed_models",
    "create_score_file",
    "create_store",
    "ensure_home",
    "home_problem",
    "link_scores",
    "needs_home",
    "list_scores",
    "open_store",
    "pack",
    "packed_path",
    "read_attrs",
    "read_labels",
    "read_meta",
    "read_occlusion",
    "read_occlusion_range",
    "read_rows",
    "read_scores",
    "read_stamps",
    "repair_scores",
    "score_status",
    "score_target",
    "scores_dir",
    "scores_file",
    "stamps_fingerprint",
    "store_id",
    "sweep_partial",
    "take_lock",
]
