"""Train one architecture on a labelled stamp store, evaluate it, and write a run directory.

The stages of :func:`train_run`:

1. split the store's rows 70/10/20 (by default) into train/validation/test, stratified by
   class and reproducible from the seed (scikit-learn ``train_test_split`` twice); the row
   indices are kept in ``split.npz`` so a resumed run never trains on its test stamps;
2. stream training batches from the HDF5 store through ``tf.data``: blocks of training rows
   are read, normalised (vectorised, :func:`stampbatch.preprocess.normalize_with_mask`),
   shuffled in memory, randomly flipped/rotated by multiples of 90 degrees (a point source
   at the centre looks the same; the network should not learn the orientation of noise or
   artefacts), and batched while the model trains on the previous batch. Memory is bounded
   by the shuffle buffer, not the store size. Stamps with NaN/Inf pixels are dropped;
3. ``keras.Model.fit`` with categorical cross-entropy on one-hot labels (as the reference),
   SGD with momentum by default, "balanced" class weights, early stopping on the
   validation loss; after every epoch a checkpoint (model + optimizer state, history, best
   weights) is written atomically, and a rerun on the same directory resumes from it — a
   preempted Slurm job that is requeued simply carries on;
4. restore the best weights, predict the test split, compute the metrics (ROC AUC,
   completeness against SNR, the threshold for a target false-positive rate, false
   positives by kind of negative) and draw the figures.

Every file is written under a temporary name and renamed into place, and ``metrics.json``
comes last: a directory holding ``metrics.json`` is a finished run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stampbatch import store
from stampbatch.config import from_mapping, load_toml, to_toml
from stampbatch.errors import StampbatchError, UsageError
from stampbatch.export import export_for_scoring
from stampbatch.models import build_model, check_architecture, count_macs
from stampbatch.preprocess import normalize_with_mask

SNR_BIN_EDGES: tuple[float, ...] = (3, 5, 7, 10, 15, 20, 30, 50, 100)
SNR_SUMMARY_MIN = 7.0
OPTIMIZERS = ("sgd", "adam")
CLASS_WEIGHTS = ("balanced", "none")

# Streaming: rows read per HDF5 access, and stamps shuffled together in memory.
READ_BLOCK_ROWS = 4096
SHUFFLE_STAMPS = 65536
PREDICT_ROWS = 16384
PREDICT_BATCH = 1024

# Run directory layout.
MODEL_FILE = "model.keras"
CONFIG_FILE = "config.toml"
HISTORY_FILE = "history.json"
SPLIT_FILE = "split.npz"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.npz"
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
FAILED_FILE = "FAILED"
FIGURES = ("confusion_matrix.png", "history.png", "roc.png", "completeness_snr.png",
           "examples.png")
HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")
# Options that may change when a run is resumed (they do not change what was trained so far).
RESUMABLE_CHANGES = ("epochs", "patience", "target_fpr")


class TrainError(StampbatchError):
    """Training cannot start or go on (bad store, bad split, a clashing run directory)."""


@dataclass
class TrainConfig:
    """Settings of one training run.

    The optimiser defaults to SGD with learning rate 0.01 (Keras's default, as in the
    reference notebook) plus momentum 0.9, which reaches the reference's accuracy in far
    fewer epochs; ``adam`` ignores ``momentum``. ``class_weight="balanced"`` weights each
    class by N / (2 N_class) of the training split. ``patience`` is the number of epochs
    without a lower validation loss before stopping early (0: never stop early); the best
    weights are restored at the end either way. ``augment`` applies random flips and
    rotations by multiples of 90 degrees to training stamps.
    """

    epochs: int = 20
    batch_size: int = 256
    optimizer: str = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.9
    class_weight: str = "balanced"
    patience: int = 5
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    target_fpr: float = 0.01
    augment: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first invalid option."""
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, "
                             f"got {self.optimizer!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.class_weight not in CLASS_WEIGHTS:
            raise ValueError(f"class_weight must be one of {', '.join(CLASS_WEIGHTS)}, "
                             f"got {self.class_weight!r}")
        if self.patience < 0:
            raise ValueError(f"patience must be 0 (no early stopping) or more, got {self.patience}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be below 1, got "
                             f"{self.val_fraction} + {self.test_fraction}")
        if not 0.0 < self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be between 0 and 1, got {self.target_fpr}")


# --------------------------------------------------------------------------- small helpers


def _atomic(path: Path) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary path beside ``path`` (same suffix, as Keras insists on ``.keras`` and
    ``.weights.h5``); rename it onto ``path`` on success. A reader sees the old file or the
    complete new one, never a partial one."""
    path = Path(path)
    suffix = ".weights.h5" if path.name.endswith(".weights.h5") else path.suffix
    return store.atomic_path(path, overwrite=True, suffix=suffix)


def _write_bytes(path: Path, data: bytes) -> None:
    with _atomic(path) as tmp:
        tmp.write_bytes(data)


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(path, (json.dumps(_jsonable(obj), indent=1, allow_nan=False) + "\n").encode())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrainError(f"{path}: unreadable ({exc})") from exc


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; NaN and infinities become null."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def configure_tensorflow() -> None:
    """oneDNN on, quiet logs, and one intra-op thread per available core (before TF starts)."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(cores or 1))
        tf.config.threading.set_inter_op_parallelism_threads(min(2, int(cores or 1)))
    except RuntimeError:  # TensorFlow already running in this process: keep its pools
        pass


# --------------------------------------------------------------------------- split


def split_rows(labels: np.ndarray, config: TrainConfig, source: str = "store"
               ) -> dict[str, np.ndarray]:
    """Stratified, seeded train/val/test split of row indices (each sorted, int64).

    Raises TrainError when a split would miss a class.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    rows = np.arange(len(labels), dtype=np.int64)
    try:
        rest, test = train_test_split(rows, test_size=config.test_fraction,
                                      stratify=labels, random_state=config.seed)
        val_share = config.val_fraction / (1.0 - config.test_fraction)
        train, val = train_test_split(rest, test_size=val_share, stratify=labels[rest],
                                      random_state=config.seed)
    except ValueError as exc:
        raise TrainError(f"{source}: cannot split {len(labels)} stamps with val_fraction="
                         f"{config.val_fraction} and test_fraction={config.test_fraction} "
                         f"({exc})") from exc
    out = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
    for name, part in out.items():
        present = set(np.unique(labels[part]).tolist())
        for cls, cname in ((0, "no-source"), (1, "source")):
            if cls not in present:
                raise TrainError(f"{source}: the {name} split would hold no {cname} stamps "
                                 f"(val_fraction={config.val_fraction}, test_fraction="
                                 f"{config.test_fraction}, {len(labels)} stamps); use more "
                                 f"stamps or larger fractions")
    return out


def class_weights(labels: np.ndarray, mode: str) -> np.ndarray:
    """Weight per class (index = class): N / (2 N_class) for "balanced", ones for "none"."""
    if mode == "none":
        return np.ones(2, dtype=np.float32)
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=2).astype(np.float64)
    return (counts.sum() / (2.0 * np.maximum(counts, 1.0))).astype(np.float32)


# --------------------------------------------------------------------------- streaming


def augment_dihedral(stamps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply a random flip/rotation by 90-degree multiples to each stamp (N, H, W), in place.

    Square stamps get one of the 8 symmetries of the square; others one of the 4 that keep
    the shape. Loops over the symmetries, not the stamps.
    """
    n, h, w = stamps.shape
    choices = np.arange(8) if h == w else np.array([0, 2, 4, 6])
    which = rng.choice(choices, size=n)
    for t in choices[1:]:
        sel = np.flatnonzero(which == t)
        if len(sel) == 0:
            continue
        block = stamps[sel]
        if t % 4:
            block = np.rot90(block, k=int(t % 4), axes=(1, 2))
        if t >= 4:
            block = block[:, :, ::-1]
        stamps[sel] = block
    return stamps


class StampStream:
    """Batches of normalised stamps read from a store by row index (generators for tf.data).

    Training batches (:meth:`training_batches`) drop stamps with NaN/Inf pixels and carry
    the class weight of each stamp. Evaluation batches (:meth:`evaluation_batches`) keep
    such stamps (flat after normalisation) with weight 0, so the number of batches is known
    in advance. Exceptions raised inside a generator reach Keras wrapped by TensorFlow; they
    are kept in :attr:`error` so the caller can re-raise the original one-line error.
    """

    def __init__(self, path: Path, rows: np.ndarray, batch_size: int, stamp_shape: tuple[int, int],
                 *, weights: np.ndarray | None = None, seed: int = 0, augment: bool = False,
                 read_rows: int = READ_BLOCK_ROWS, shuffle_stamps: int = SHUFFLE_STAMPS) -> None:
        self.path = Path(path)
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))
        self.batch_size = int(batch_size)
        self.stamp_shape = (int(stamp_shape[0]), int(stamp_shape[1]))
        self.weights = (np.ones(2, dtype=np.float32) if weights is None
                        else np.asarray(weights, dtype=np.float32))
        self.seed = int(seed)
        self.augment = augment
        self.blocks = [self.rows[i:i + read_rows] for i in range(0, len(self.rows), read_rows)]
        self.blocks_per_buffer = max(1, shuffle_stamps // max(read_rows, 1))
        self.dropped_first_pass: int | None = None
        self.error: BaseException | None = None

    def _read(self, block_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = [store.read_rows(self.path, self.blocks[i]) for i in block_ids]
        raw = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        stamps, valid = normalize_with_mask(raw)
        return stamps, labels.astype(np.int64), valid

    def _pack(self, x: np.ndarray, y: np.ndarray, valid: np.ndarray | None = None):
        onehot = np.zeros((len(y), 2), dtype=np.float32)
        onehot[np.arange(len(y)), y] = 1.0
        w = self.weights[y]
        if valid is not None:
            w = w * valid
        return x[..., None], onehot, w

    def _empty(self) -> tuple[np.ndarray, np.ndarray]:
        return np.empty((0, *self.stamp_shape), np.float32), np.empty(0, np.int64)

    def training_batches(self, start_epoch: int = 0) -> Iterator[tuple[np.ndarray, ...]]:
        """Endless shuffled, augmented, full batches; pass ``e`` is shuffled with seed (seed, e)."""
        try:
            epoch = start_epoch
            carry_x, carry_y = self._empty()
            while True:
                rng = np.random.default_rng([self.seed, epoch])
                order = rng.permutation(len(self.blocks))
                kept = dropped = 0
                for g in range(0, len(order), self.blocks_per_buffer):
                    x, y, valid = self._read(order[g:g + self.blocks_per_buffer])
                    if not valid.all():
                        dropped += int((~valid).sum())
                        x, y = x[valid], y[valid]
                    kept += len(y)
                    perm = rng.permutation(len(y))
                    x, y = x[perm], y[perm]
                    if self.augment:
                        augment_dihedral(x, rng)
                    if len(carry_y):
                        x, y = np.concatenate([carry_x, x]), np.concatenate([carry_y, y])
                    full = len(y) - len(y) % self.batch_size
                    for s in range(0, full, self.batch_size):
                        yield self._pack(x[s:s + self.batch_size], y[s:s + self.batch_size])
                    carry_x, carry_y = x[full:], y[full:]
                if self.dropped_first_pass is None:
                    self.dropped_first_pass = dropped
                if kept == 0:
                    raise TrainError(f"{self.path}: every training stamp has NaN or Inf pixels "
                                     f"or sentinel values (|x| >= 1e30)")
                epoch += 1
        except Exception as exc:
            self.error = exc
            raise

    def n_evaluation_batches(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def evaluation_batches(self) -> Iterator[tuple[np.ndarray, ...]]:
        """One ordered pass, no shuffling or augmentation; the last batch may be short."""
        try:
            carry_x, carry_y = self._empty()
            carry_v = np.empty(0, dtype=bool)
            for g in range(0, len(self.blocks), self.blocks_per_buffer):
                x, y, v = self._read(range(g, min(g + self.blocks_per_buffer, len(self.blocks))))
                if len(carry_y):
                    x, y = np.concatenate([carry_x, x]), np.concatenate([carry_y, y])
                    v = np.concatenate([carry_v, v])
                full = len(y) - len(y) % self.batch_size
                for s in range(0, full, self.batch_size):
                    sl = slice(s, s + self.batch_size)
                    yield self._pack(x[sl], y[sl], v[sl])
                carry_x, carry_y, carry_v = x[full:], y[full:], v[full:]
            if len(carry_y):
                yield self._pack(carry_x, carry_y, carry_v)
        except Exception as exc:
            self.error = exc
            raise

    def dataset(self, training: bool, start_epoch: int = 0):
        """A prefetching ``tf.data.Dataset`` of (stamps, one-hot labels, weights) batches."""
        import tensorflow as tf

        h, w = self.stamp_shape
        spec = (tf.TensorSpec((None, h, w, 1), tf.float32), tf.TensorSpec((None, 2), tf.float32),
                tf.TensorSpec((None,), tf.float32))
        if training:
            ds = tf.data.Dataset.from_generator(lambda: self.training_batches(start_epoch),
                                                output_signature=spec)
        else:
            ds = tf.data.Dataset.from_generator(self.evaluation_batches, output_signature=spec)
            ds = ds.apply(tf.data.experimental.assert_cardinality(self.n_evaluation_batches()))
        return ds.prefetch(2)


def predict_rows(model, path: Path, rows: np.ndarray, *, read_rows: int = PREDICT_ROWS,
                 batch_size: int = PREDICT_BATCH) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P(source) of the given store rows, in blocks: (probability float32, labels, finite mask).

    Stamps with NaN/Inf pixels get probability NaN and False in the mask.
    """
    rows = np.asarray(rows, dtype=np.int64)
    prob = np.full(len(rows), np.nan, dtype=np.float32)
    labels = np.zeros(len(rows), dtype=np.int8)
    finite = np.zeros(len(rows), dtype=bool)
    for lo in range(0, len(rows), read_rows):
        raw, lab = store.read_rows(path, rows[lo:lo + read_rows])
        stamps, valid = normalize_with_mask(raw)
        if lab is not None:
            labels[lo:lo + len(lab)] = lab
        finite[lo:lo + len(valid)] = valid
        if valid.any():
            out = model.predict(stamps[valid][..., None], batch_size=batch_size, verbose=0)
            prob[lo + np.flatnonzero(valid)] = out[:, 1]
    return prob, labels, finite


# --------------------------------------------------------------------------- metrics


def operating_point(labels: np.ndarray, probabilities: np.ndarray, target_fpr: float
                    ) -> dict[str, float]:
    """The lowest threshold whose false-positive rate (P >= threshold) is at most target_fpr.

    Returns ``{"target_fpr", "threshold", "fpr", "completeness"}``. When even the highest
    score of a negative is shared by too many negatives, the threshold lies just above all
    scores (nothing is selected).
    """
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(labels, probabilities, drop_intermediate=False)
    i = int(np.flatnonzero(fpr <= target_fpr)[-1])
    threshold = float(thr[i])
    if not math.isfinite(threshold):
        threshold = float(np.nextafter(np.float64(np.max(probabilities)), np.inf))
    return {"target_fpr": float(target_fpr), "threshold": threshold, "fpr": float(fpr[i]),
            "completeness": float(tpr[i])}


def _thin_curve(fpr: np.ndarray, tpr: np.ndarray, max_points: int = 400
                ) -> dict[str, list[float]]:
    if len(fpr) > max_points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": [round(float(v), 6) for v in fpr], "tpr": [round(float(v), 6) for v in tpr]}


def _binned_completeness(snr: np.ndarray, detected: np.ndarray, edges: np.ndarray
                         ) -> tuple[list[float | None], list[int]]:
    nb = len(edges) - 1
    idx = np.searchsorted(edges, snr, side="right") - 1
    idx[snr == edges[-1]] = nb - 1  # the last bin is closed, as in np.histogram
    inside = (idx >= 0) & (idx < nb)
    counts = np.bincount(idx[inside], minlength=nb)
    hits = np.bincount(idx[inside], weights=detected[inside].astype(np.float64), minlength=nb)
    completeness = [float(h / c) if c else None for h, c in zip(hits, counts, strict=True)]
    return completeness, [int(c) for c in counts]


def compute_metrics(labels: np.ndarray, probabilities: np.ndarray, snr: np.ndarray | None = None,
                    kind: np.ndarray | None = None, target_fpr: float = 0.01,
                    bin_edges: Sequence[float] = SNR_BIN_EDGES) -> dict[str, Any]:
    """Classification metrics of P(source) against true labels (both classes must be present).

    At threshold 0.5 (P >= 0.5 is "source"): accuracy, precision, recall, confusion matrix
    (rows = true class 0/1, columns = predicted), completeness of the sources in SNR bins
    (``snr``: per-stamp SNR, used for label-1 stamps) and the false-positive rate of each
    kind of negative (``kind``: per-stamp string, used for label-0 stamps). Threshold-free:
    ROC AUC and a thinned ROC curve. At the operating point (the threshold giving
    FPR <= ``target_fpr`` on the negatives): completeness overall and per SNR bin.
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        precision_score,
        recall_score,
        roc_auc_score,
        roc_curve,
    )

    y = np.asarray(labels).astype(np.int64).ravel()
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{len(y)} labels but {len(p)} probabilities")
    if not np.isfinite(p).all():
        raise ValueError("probabilities must be finite (drop unscorable stamps first)")
    if set(np.unique(y).tolist()) != {0, 1}:
        raise ValueError("labels must hold both classes (0 and 1)")
    pred = (p >= 0.5).astype(np.int64)
    fpr, tpr, _ = roc_curve(y, p)
    op = operating_point(y, p, target_fpr)
    out: dict[str, Any] = {
        "accuracy": float(accuracy_score(y, pred)),
        "roc_auc": float(roc_auc_score(y, p)),
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
        "confusion_matrix": confusion_matrix(y, pred, labels=[0, 1]).tolist(),
        "operating_point": op,
        "roc_curve": _thin_curve(fpr, tpr),
    }
    if snr is not None:
        s = np.asarray(snr, dtype=np.float64).ravel()
        if s.shape != y.shape:
            raise ValueError(f"{len(s)} SNR values for {len(y)} stamps")
        pos = (y == 1) & np.isfinite(s)
        edges = np.asarray(bin_edges, dtype=np.float64)
        comp, counts = _binned_completeness(s[pos], pred[pos] == 1, edges)
        comp_op, _ = _binned_completeness(s[pos], p[pos] >= op["threshold"], edges)
        bright = pos & (s >= SNR_SUMMARY_MIN)
        n_bright = int(bright.sum())
        out["completeness_vs_snr"] = {
            "bin_edges": [float(e) for e in edges], "completeness": comp, "counts": counts,
            "threshold": 0.5, "completeness_at_operating_point": comp_op,
            "above_snr": {
                "snr_min": SNR_SUMMARY_MIN, "count": n_bright,
                "completeness": float(pred[bright].mean()) if n_bright else None,
                "completeness_at_operating_point":
                    float((p[bright] >= op["threshold"]).mean()) if n_bright else None,
            },
        }
    if kind is not None:
        k = np.asarray(kind).astype(str).ravel()
        if k.shape != y.shape:
            raise ValueError(f"{len(k)} kinds for {len(y)} stamps")
        neg, pos = y == 0, y == 1
        out["fpr_by_kind"] = {str(name): float(pred[neg & (k == name)].mean())
                              for name in np.unique(k[neg])}
        out["negatives_by_kind"] = {str(name): int((neg & (k == name)).sum())
                                    for name in np.unique(k[neg])}
        out["completeness_by_kind"] = {str(name): float(pred[pos & (k == name)].mean())
                                       for name in np.unique(k[pos])}
    return out


# --------------------------------------------------------------------------- run directory


def read_run_config(out_dir: Path) -> tuple[str, str, TrainConfig]:
    """(architecture, data path, TrainConfig) from a run directory's config.toml."""
    path = Path(out_dir) / CONFIG_FILE
    data = load_toml(path)
    arch, store_path = data.pop("architecture", None), data.pop("data", None)
    if not isinstance(arch, str) or not isinstance(store_path, str):
        raise TrainError(f"{path}: missing 'architecture' or 'data'")
    return arch, store_path, from_mapping(TrainConfig, data, str(path))


def _config_text(arch: str, data: str, config: TrainConfig) -> str:
    return to_toml({"architecture": arch, "data": data, **dataclasses.asdict(config)})


def run_state(out_dir: Path) -> dict[str, Any]:
    """Where a run directory stands: new, training (checkpointed or started), done, failed."""
    out_dir = Path(out_dir)
    state: dict[str, Any] = {"status": "new", "epoch": 0, "epochs": 0, "best_val_loss": None,
                             "best_val_accuracy": None, "architecture": None}
    config_path = out_dir / CONFIG_FILE
    if config_path.is_file():
        try:
            arch, _, config = read_run_config(out_dir)
            state.update(status="training", architecture=arch, epochs=config.epochs)
        except StampbatchError:
            state["status"] = "training"
    ckpt = out_dir / CHECKPOINT_DIR / STATE_FILE
    if ckpt.is_file():
        saved = _read_json(ckpt)
        state.update(status="training", epoch=int(saved.get("epoch", 0)),
                     epochs=int(saved.get("epochs", state["epochs"])),
                     best_val_loss=saved.get("best_val_loss"),
                     best_val_accuracy=saved.get("best_val_accuracy"),
                     architecture=saved.get("architecture", state["architecture"]))
    if (out_dir / FAILED_FILE).is_file():
        state["status"] = "failed"
        state["message"] = (out_dir / FAILED_FILE).read_text().strip()
    if (out_dir / METRICS_FILE).is_file():
        metrics = _read_json(out_dir / METRICS_FILE)
        state.update(status="done", epoch=int(metrics.get("epochs_run", 0)),
                     epochs=int(metrics.get("epochs", 0)),
                     best_val_loss=metrics.get("best_val_loss"),
                     best_val_accuracy=metrics.get("best_val_accuracy"),
                     architecture=metrics.get("architecture"))
        state.pop("message", None)
    return state


def _check_run_dir(out_dir: Path, arch: str, data: str, config: TrainConfig) -> str:
    """Decide what to do with ``out_dir``: "new", "resume" or "done"; refuse clashes."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"{out_dir}: exists and is not a directory")
    if not (out_dir / CONFIG_FILE).is_file():
        ours = [n for n in (MODEL_FILE, METRICS_FILE, SPLIT_FILE, CHECKPOINT_DIR, HISTORY_FILE)
                if (out_dir / n).exists()]
        if ours:
            raise TrainError(f"{out_dir}: holds {', '.join(ours)} but no {CONFIG_FILE}; not a "
                             f"stampbatch run directory (choose another output directory)")
        return "new"
    old_arch, old_data, old = read_run_config(out_dir)
    finished = (out_dir / METRICS_FILE).is_file()
    what = "a finished run" if finished else "a checkpoint"
    if old_arch != arch:
        raise TrainError(f"{out_dir}: holds {what} of architecture '{old_arch}', not '{arch}'; "
                         f"choose another output directory")
    if old_data != data:
        raise TrainError(f"{out_dir}: holds {what} trained on {old_data}, not {data}; choose "
                         f"another output directory")
    new_d, old_d = dataclasses.asdict(config), dataclasses.asdict(old)
    allowed = () if finished else RESUMABLE_CHANGES
    changed = [k for k in new_d if new_d[k] != old_d[k] and k not in allowed]
    if changed:
        diff = ", ".join(f"{k} {old_d[k]!r} -> {new_d[k]!r}" for k in changed)
        raise TrainError(f"{out_dir}: holds {what} with other settings ({diff}); use the same "
                         f"settings to resume, or another output directory")
    state_path = out_dir / CHECKPOINT_DIR / STATE_FILE
    if not finished and state_path.is_file():
        done = int(_read_json(state_path).get("epoch", 0))
        if config.epochs < done:
            raise TrainError(f"{out_dir}: holds a checkpoint after {done} epochs; cannot resume "
                             f"it with epochs={config.epochs}")
    return "done" if finished else "resume"


def _load_split(out_dir: Path, n_stamps: int) -> dict[str, np.ndarray]:
    path = out_dir / SPLIT_FILE
    try:
        with np.load(path, allow_pickle=False) as npz:
            split = {k: np.asarray(npz[k], dtype=np.int64) for k in ("train", "val", "test")}
    except (OSError, KeyError, ValueError) as exc:
        raise TrainError(f"{path}: unreadable split file ({exc})") from exc
    top = max(int(v.max()) for v in split.values() if len(v))
    if top >= n_stamps:
        raise TrainError(f"{path}: row {top} beyond the store's {n_stamps} stamps (another store?)")
    return split


def _save_split(path: Path, split: dict[str, np.ndarray]) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **split)
    _write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- training loop


def _make_callbacks(out_dir: Path, state: dict[str, Any],
                    config: TrainConfig, steps: int, arch: str, progress: bool):
    import keras

    from stampbatch.progress import Progress

    ckpt_dir = out_dir / CHECKPOINT_DIR

    class Checkpoint(keras.callbacks.Callback):
        """History, early stopping and an atomic checkpoint after every epoch."""

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.monotonic()
            self._bar = Progress(steps, f"{arch} epoch {epoch + 1}/{config.epochs}", "batches",
                                 enabled=progress and sys.stderr.isatty())

        def on_train_batch_end(self, batch, logs=None):
            self._bar.update(1)

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            elapsed = time.monotonic() - self._t0
            if "val_loss" not in logs:
                raise TrainError(f"{out_dir}: the validation split yielded no finite stamps")
            if not math.isfinite(float(logs.get("loss", math.nan))):
                raise TrainError(f"{out_dir}: training diverged (loss {logs.get('loss')} at epoch "
                                 f"{epoch + 1}); lower the learning rate")
            for key in HISTORY_KEYS:
                state["history"].setdefault(key, []).append(float(logs.get(key, math.nan)))
            state["epoch"] = epoch + 1
            state["train_time_s"] = float(state.get("train_time_s", 0.0)) + elapsed
            val_loss = float(logs["val_loss"])
            improved = state["best_val_loss"] is None or val_loss < state["best_val_loss"]
            if improved:
                state.update(best_val_loss=val_loss, best_epoch=epoch + 1, wait=0,
                             best_val_accuracy=float(logs.get("val_accuracy", math.nan)))
                best_name = f"best-{epoch + 1:04d}.weights.h5"
                with _atomic(ckpt_dir / best_name) as tmp:
                    self.model.save_weights(tmp)
                state["best_file"] = best_name
            else:
                state["wait"] = int(state.get("wait", 0)) + 1
            if config.patience and state["wait"] >= config.patience:
                state["stopped_early"] = True
                self.model.stop_training = True
            model_name = f"epoch-{epoch + 1:04d}.keras"
            with _atomic(ckpt_dir / model_name) as tmp:
                self.model.save(tmp)
            state["model_file"] = model_name
            _write_json(out_dir / HISTORY_FILE, state["history"])
            _write_json(ckpt_dir / STATE_FILE, state)  # the commit point of this epoch
            for stale in ckpt_dir.iterdir():
                if stale.name not in (model_name, state["best_file"], STATE_FILE) and \
                        (stale.name.startswith("epoch-") or stale.name.startswith("best-")):
                    stale.unlink(missing_ok=True)
            if progress:
                self._bar.enabled = False
                rate = steps * config.batch_size / max(elapsed, 1e-9)
                if sys.stderr.isatty():
                    sys.stderr.write("\r\033[K")
                print(f"{arch} epoch {epoch + 1}/{config.epochs}: loss {logs.get('loss', 0):.4f} "
                      f"acc {logs.get('accuracy', 0):.4f} val_loss {val_loss:.4f} "
                      f"val_acc {logs.get('val_accuracy', 0):.4f}, {elapsed:.1f} s, "
                      f"{rate:,.0f} stamps/s" + (" *" if improved else "")
                      + (" (early stop)" if state.get("stopped_early") else ""),
                      file=sys.stderr, flush=True)

    return [Checkpoint()]


def compile_model(model, config: TrainConfig) -> None:
    """Compile for one-hot labels: categorical cross-entropy, accuracy, SGD+momentum or Adam."""
    import keras

    if config.optimizer == "sgd":
        opt = keras.optimizers.SGD(learning_rate=config.learning_rate, momentum=config.momentum)
    else:
        opt = keras.optimizers.Adam(learning_rate=config.learning_rate)
    model.compile(optimizer=opt, loss="categorical_crossentropy", metrics=["accuracy"])


def _unwrap_stream_error(exc: BaseException, *streams: StampStream) -> BaseException:
    for s in streams:
        if s.error is not None:
            return s.error
    return exc


def train_run(store_path: Path, arch: str, out_dir: Path, config: TrainConfig, *,
              progress: bool = True, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train ``arch`` on the labelled store, evaluate it on the test split, fill ``out_dir``.

    Resumes from ``out_dir``'s checkpoint when there is one (history continued; ``epochs``,
    ``patience`` and ``target_fpr`` may differ from the first attempt, nothing else), and
    returns the saved metrics of a finished run without retraining. ``callbacks`` are extra
    Keras callbacks run after the checkpoint of each epoch. Returns the metrics dict.
    """
    t_start = time.monotonic()
    check_architecture(arch)
    try:
        config.validate()
    except ValueError as exc:
        raise UsageError(f"training configuration: {exc}") from exc
    store_path = Path(store_path)
    out_dir = Path(out_dir)
    info = store.open_store(store_path, check_labels_values=True)
    if info.is_score_file:
        raise TrainError(f"{store_path}: is a score side file, not a stamp store")
    if not info.labelled:
        raise TrainError(f"{store_path}: has no /labels (a candidate file?); training needs a "
                         f"labelled store")
    data = str(store_path.resolve())
    mode = _check_run_dir(out_dir, arch, data, config)
    if mode == "done":
        return _read_json(out_dir / METRICS_FILE)

    labels = store.read_labels(store_path).astype(np.int64)
    present = np.unique(labels)
    if len(present) < 2:
        only = "source" if present[0] == 1 else "no-source"
        raise TrainError(f"{store_path}: every label is {present[0]} ({only}); training needs "
                         f"both classes")
    if mode == "resume" and (out_dir / SPLIT_FILE).is_file():
        split = _load_split(out_dir, info.n_stamps)
    else:
        split = split_rows(labels, config, str(store_path))
    # Nothing has been written before this point.
    configure_tensorflow()
    import keras

    ckpt_dir = out_dir / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / SPLIT_FILE).is_file():
        _save_split(out_dir / SPLIT_FILE, split)
    _write_bytes(out_dir / CONFIG_FILE, _config_text(arch, data, config).encode())
    (out_dir / FAILED_FILE).unlink(missing_ok=True)
    try:
        metrics = _train_and_evaluate(store_path, arch, out_dir, config, info, labels, split,
                                      data, progress, callbacks, t_start, keras)
    except Exception as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        _write_bytes(out_dir / FAILED_FILE, (message + "\n").encode())
        raise
    export_for_scoring(out_dir)   # the ONNX form, once, after the final model.keras
    return metrics


def _train_and_evaluate(store_path, arch, out_dir, config, info, labels, split, data, progress,
                        callbacks, t_start, keras) -> dict[str, Any]:
    ckpt_dir = out_dir / CHECKPOINT_DIR
    state_path = ckpt_dir / STATE_FILE
    if state_path.is_file():
        state = _read_json(state_path)
        state["epochs"] = config.epochs
        model = keras.models.load_model(ckpt_dir / state["model_file"], safe_mode=True)
        if progress:
            print(f"{arch}: resuming from epoch {state['epoch']} of {config.epochs} "
                  f"({out_dir / CHECKPOINT_DIR})", file=sys.stderr, flush=True)
    else:
        state = {"architecture": arch, "data": data, "epoch": 0, "epochs": config.epochs,
                 "history": {k: [] for k in HISTORY_KEYS}, "best_val_loss": None,
                 "best_val_accuracy": None, "best_epoch": None, "best_file": None, "wait": 0,
                 "stopped_early": False, "model_file": None, "train_time_s": 0.0}
        keras.utils.set_random_seed(config.seed)
        model = build_model(arch, info.stamp_shape)
        compile_model(model, config)
    start_epoch = int(state["epoch"])
    if config.patience and int(state.get("wait", 0)) >= config.patience:
        state["stopped_early"] = True
    train_labels = labels[split["train"]]
    weights = class_weights(train_labels, config.class_weight)
    train_stream = StampStream(store_path, split["train"], config.batch_size, info.stamp_shape,
                               weights=weights, seed=config.seed, augment=config.augment)
    val_stream = StampStream(store_path, split["val"], max(config.batch_size, 256),
                             info.stamp_shape)
    steps = max(1, math.ceil(len(split["train"]) / config.batch_size))
    if start_epoch < config.epochs and not state.get("stopped_early"):
        keras.utils.set_random_seed(config.seed + start_epoch)
        cbs = _make_callbacks(out_dir, state, config, steps, arch, progress) + list(callbacks)
        try:
            model.fit(train_stream.dataset(True, start_epoch), epochs=config.epochs,
                      initial_epoch=start_epoch, steps_per_epoch=steps,
                      validation_data=val_stream.dataset(False), callbacks=cbs, shuffle=False,
                      verbose=0)
        except Exception as exc:
            original = _unwrap_stream_error(exc, train_stream, val_stream)
            if original is not exc:
                raise original from None
            raise
        finally:
            # Finalise the suspended endless generator behind tf.data now, while the
            # interpreter is fully alive: left to interpreter shutdown it can deadlock
            # (tensorflow/tensorflow#22632, #21277).
            gc.collect()
        if train_stream.dropped_first_pass:
            print(f"warning: {store_path}: {train_stream.dropped_first_pass} training stamps have "
                  f"NaN or Inf pixels or sentinel values (|x| >= 1e30) and were skipped", file=sys.stderr)
    if state.get("best_file"):
        model.load_weights(ckpt_dir / state["best_file"])
    with _atomic(out_dir / MODEL_FILE) as tmp:
        model.save(tmp)
    _write_json(out_dir / HISTORY_FILE, state["history"])
    return _evaluate(model, store_path, arch, out_dir, config, info, split, data, state, t_start)


def _evaluate(model, store_path: Path, arch: str, out_dir: Path, config: TrainConfig,
              info, split: dict[str, np.ndarray], data: str, state: dict[str, Any],
              t_start: float) -> dict[str, Any]:
    from stampbatch import plots

    test = split["test"]
    prob, labels, finite = predict_rows(model, store_path, test)
    buf_rows = {"rows": test, "labels": labels, "probability": prob, "finite": finite}
    _save_npz(out_dir / PREDICTIONS_FILE, buf_rows)
    meta_cols = [c for c in ("snr", "kind") if c in info.meta_columns]
    meta = store.read_meta(store_path, meta_cols) if meta_cols else {}
    snr = meta["snr"][test][finite] if "snr" in meta else None
    kind = meta["kind"][test][finite] if "kind" in meta else None
    y, p = labels[finite], prob[finite]
    try:
        scores = compute_metrics(y, p, snr=snr, kind=kind, target_fpr=config.target_fpr)
    except ValueError as exc:
        raise TrainError(f"{store_path}: cannot evaluate the test split ({exc})") from exc
    metrics: dict[str, Any] = {
        "architecture": arch, "data": data, "n_train": len(split["train"]),
        "n_val": len(split["val"]), "n_test": len(test),
        "n_test_unscorable": int((~finite).sum()),
        "epochs_run": int(state["epoch"]), "epochs": config.epochs,
        "stopped_early": bool(state.get("stopped_early", False)),
        "best_epoch": state.get("best_epoch"),
        "parameters": int(model.count_params()), "macs_per_stamp": count_macs(model),
        **scores,
        "best_val_loss": state.get("best_val_loss"),
        "best_val_accuracy": state.get("best_val_accuracy"),
    }
    title = f"{arch} ({out_dir.name})"
    plots.plot_confusion_matrix(np.asarray(scores["confusion_matrix"]),
                                out_dir / "confusion_matrix.png", title=f"{title}: test split")
    plots.plot_history(state["history"], out_dir / "history.png", title=title)
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    op = scores["operating_point"]
    plots.plot_roc(fpr, tpr, out_dir / "roc.png", auc=scores["roc_auc"],
                   operating_point=(op["fpr"], op["completeness"]), title=f"{title}: ROC")
    _plot_completeness(plots, scores, out_dir / "completeness_snr.png", title)
    _plot_examples(plots, store_path, test[finite], y, p, out_dir / "examples.png", title,
                   config.seed)
    metrics["wall_time_s"] = float(state.get("train_time_s", 0.0)) + (time.monotonic() - t_start)
    _write_json(out_dir / METRICS_FILE, metrics)  # last: marks the run as done
    return json.loads(json.dumps(_jsonable(metrics)))


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _write_bytes(path, buf.getvalue())


def _plot_completeness(plots, scores: dict[str, Any], path: Path, title: str) -> None:
    cvs = scores.get("completeness_vs_snr")
    if cvs is None:  # no SNR in the store: completeness of all sources in one bin
        edges = [1.0, 1000.0]
        rec = scores["confusion_matrix"][1]
        n = rec[0] + rec[1]
        comp, counts = [rec[1] / n if n else None], [n]
        extra = {f"at FPR {scores['operating_point']['target_fpr']:g}":
                 [scores["operating_point"]["completeness"]]}
        plots.plot_completeness(edges, comp, counts, path, extra=extra,
                                title=f"{title}: no SNR in the store, all sources")
        return
    op = scores["operating_point"]
    plots.plot_completeness(
        cvs["bin_edges"], cvs["completeness"], cvs["counts"], path,
        extra={f"at FPR {op['target_fpr']:g} (P >= {op['threshold']:.3g})":
               cvs["completeness_at_operating_point"]},
        title=f"{title}: completeness of test sources (P >= 0.5)")


def _plot_examples(plots, store_path: Path, rows: np.ndarray, y: np.ndarray, p: np.ndarray,
                   path: Path, title: str, seed: int, n: int = 32) -> None:
    rng = np.random.default_rng(seed)
    wrong = np.flatnonzero((p >= 0.5).astype(np.int64) != y)
    right = np.flatnonzero((p >= 0.5).astype(np.int64) == y)
    pick_wrong = rng.permutation(wrong)[: n // 2]
    pick = np.concatenate([pick_wrong, rng.permutation(right)[: n - len(pick_wrong)]])
    raw, _ = store.read_rows(store_path, rows[pick])
    stamps, _ = normalize_with_mask(raw)
    plots.plot_stamp_grid(stamps, y[pick], p[pick], path, max_stamps=n,
                          title=f"{title}: test stamps (normalised)")
