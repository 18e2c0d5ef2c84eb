"""The training data: stores, splits and the stream of batches that feeds Keras.

* :class:`Stores`: one or several labelled stores seen as one table of *global rows*
  (store 0's rows first, then store 1's, ...); every read groups the rows by store and reads
  each store's rows sorted (HDF5 fancy indexing), returning them in the order asked.
* :func:`split_stores`: a seeded train/validation/test split, stratified per store *and* per
  class, so every store and both classes keep their shares in every split.
* :class:`StampStream`: batches of normalised stamps for ``tf.data``. Each training epoch is
  a random permutation of all the training rows (optionally resampled so that each store
  makes a given share of the epoch, ``store_weights``), read in windows of
  ``shuffle_stamps`` rows — each window's rows sorted for the read, then used in the
  permutation's order — so every batch is a uniform random sample of the whole training
  set, whatever order the store was written in (``ingest`` writes all sources first). An
  epoch is exactly ``ceil(N / batch_size)`` full batches (the permutation wraps around to
  fill the last), and epoch ``e``'s order is a pure function of ``(seed, e)``: a run resumed
  at epoch ``e`` sees exactly the batches an uninterrupted run would. Stamps with NaN/Inf
  pixels stay in place with weight 0 (flat after normalisation), so they neither train the
  network nor change the order. Stamps are randomly flipped/rotated by multiples of 90
  degrees (``augment``).

Reading a window of scattered rows costs one HDF5 read per store; on an uncompressed store
HDF5 reads only the selected rows, on a compressed one every chunk a window touches is
decompressed (larger windows then amortise better).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stampbatch import store
from stampbatch.errors import TrainError
from stampbatch.train.config import TrainConfig
from stampbatch.train.preprocess import UNUSABLE, normalize_with_mask

# Rows read per window of a training epoch, and per block of a prediction pass.
READ_BLOCK_ROWS = 4096
SHUFFLE_STAMPS = 65536
PREDICT_ROWS = 16384
PREDICT_BATCH = 1024


class Stores:
    """Several stores as one table of global rows (store ``i`` starts at ``offsets[i]``)."""

    def __init__(self, paths: Sequence[Path | str]) -> None:
        if not paths:
            raise TrainError("no training store given")
        self.paths = [Path(p) for p in paths]
        self.infos = [store.open_store(p, check_labels_values=True) for p in self.paths]
        shapes = {info.stamp_shape for info in self.infos}
        if len(shapes) > 1:
            raise TrainError("stores hold stamps of different shapes: " + ", ".join(
                f"{p} {i.stamp_shape[0]}x{i.stamp_shape[1]}" for p, i in zip(self.paths, self.infos)))
        self.sizes = np.array([info.n_stamps for info in self.infos], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.weights: np.ndarray | None = None   # each store's share of an epoch (train sets it)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def stamp_shape(self) -> tuple[int, int]:
        return self.infos[0].stamp_shape

    def store_of(self, rows: np.ndarray) -> np.ndarray:
        """Index of the store each global row lies in."""
        return np.searchsorted(self.offsets, np.asarray(rows, np.int64), side="right") - 1

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Stamps and labels of the global rows, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        which = self.store_of(rows)
        stamps = np.empty((len(rows), *self.stamp_shape), dtype=np.float32)
        labels: np.ndarray | None = np.zeros(len(rows), dtype=np.int8)
        for s in np.unique(which):
            sel = np.flatnonzero(which == s)
            raw, lab = store.read_rows(self.paths[s], rows[sel] - self.offsets[s])
            stamps[sel] = raw
            if lab is None:
                labels = None
            elif labels is not None:
                labels[sel] = lab
        return stamps, labels

    def labels(self) -> list[np.ndarray]:
        """The labels of each store (int64)."""
        return [store.read_labels(p).astype(np.int64) for p in self.paths]




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




def split_stores(labels: Sequence[np.ndarray], config: TrainConfig,
                 sources: Sequence[str]) -> dict[str, np.ndarray]:
    """:func:`split_rows` of each store (stratified by class), as sorted global rows."""
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    splits = [split_rows(lab, config, source)
              for lab, source in zip(labels, sources, strict=True)]
    n_train = sum(len(s["train"]) for s in splits)
    offset = 0
    for lab, source, split in zip(labels, sources, splits, strict=True):
        if 0 < config.train_stamps < n_train:
            share = max(2, round(config.train_stamps * len(split["train"]) / n_train))
            split["train"] = subsample_rows(split["train"], lab, share, config.seed, source)
        for name in parts:
            parts[name].append(split[name] + offset)
        offset += len(lab)
    return {name: np.sort(np.concatenate(p)) for name, p in parts.items()}


def subsample_rows(rows: np.ndarray, labels: np.ndarray, keep: int, seed: int,
                   source: str = "store") -> np.ndarray:
    """``keep`` of ``rows`` (sorted), drawn at random from the seed, stratified by class.

    ``train_stamps`` trains on such a subset of the training split: a costly architecture
    (resnet50 on a CPU) then learns from fewer stamps while its validation and test
    stamps, and so its figures, stay those of every other run on the store.
    """
    from sklearn.model_selection import train_test_split

    if keep >= len(rows):
        return rows
    try:
        kept, _ = train_test_split(rows, train_size=keep, stratify=labels[rows],
                                   random_state=seed)
    except ValueError as exc:
        raise TrainError(f"{source}: cannot draw {keep} training stamps of both classes "
                         f"from {len(rows)} ({exc}); raise train_stamps") from exc
    return np.sort(kept)


def split_summary(stores: Stores, labels: Sequence[np.ndarray],
                  split: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per store: its path, stamps, and sources/negatives in each split (for the run)."""
    out = []
    for i, (path, lab) in enumerate(zip(stores.paths, labels, strict=True)):
        row: dict[str, Any] = {"path": str(path.resolve()), "n_stamps": int(len(lab))}
        for name, rows in split.items():
            local = rows[stores.store_of(rows) == i] - stores.offsets[i]
            row[name] = {"sources": int((lab[local] == 1).sum()),
                         "negatives": int((lab[local] == 0).sum())}
        out.append(row)
    return out


def class_weights(labels: np.ndarray, mode: str) -> np.ndarray:
    """Weight per class (index = class): N / (2 N_class) for "balanced", ones for "none"."""
    if mode == "none":
        return np.ones(2, dtype=np.float32)
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=2).astype(np.float64)
    return (counts.sum() / (2.0 * np.maximum(counts, 1.0))).astype(np.float32)


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




def epoch_order(rows: np.ndarray, seed: int, epoch: int, *, store_of: np.ndarray | None = None,
                store_weights: np.ndarray | None = None) -> np.ndarray:
    """The training rows of epoch ``epoch`` in the order they are used: a pure function of
    (rows, seed, epoch). With ``store_weights`` (one per store, summing to 1) store ``s``
    makes ``round(w_s N)`` of the epoch's N rows: its rows permuted and, if it has fewer,
    repeated (each repetition in a new random order)."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    rows = np.asarray(rows, dtype=np.int64)
    if store_weights is None or store_of is None:
        return rows[rng.permutation(len(rows))]
    n = len(rows)
    counts = np.floor(np.asarray(store_weights) * n + 0.5).astype(np.int64)
    counts[-1] = n - counts[:-1].sum()
    parts = []
    for s, k in enumerate(counts):
        mine = rows[store_of == s]
        if k <= 0 or not len(mine):
            continue
        reps = [mine[rng.permutation(len(mine))] for _ in range(math.ceil(k / len(mine)))]
        parts.append(np.concatenate(reps)[:k])
    sample = np.concatenate(parts)
    return sample[rng.permutation(len(sample))]


class StampStream:
    """Batches of normalised stamps read from one or several stores by global row.

    Training batches (:meth:`training_batches`): see the module docstring; each carries the
    class weight of its stamps (0 for stamps with NaN/Inf pixels). Evaluation batches
    (:meth:`evaluation_batches`) keep the rows' order, the last one may be short.
    Exceptions raised inside a generator reach Keras wrapped by TensorFlow; they are kept in
    :attr:`error` so the caller can re-raise the original one-line error.
    """

    def __init__(self, stores: Stores | Path | str, rows: np.ndarray, batch_size: int,
                 stamp_shape: tuple[int, int] | None = None, *, weights: np.ndarray | None = None,
                 seed: int = 0, augment: bool = False, read_rows: int = READ_BLOCK_ROWS,
                 shuffle_stamps: int = SHUFFLE_STAMPS,
                 store_weights: Sequence[float] | np.ndarray | None = None) -> None:
        self.stores = stores if isinstance(stores, Stores) else Stores([stores])
        self.path = self.stores.paths[0] if len(self.stores.paths) == 1 else None
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))
        self.batch_size = int(batch_size)
        self.stamp_shape = tuple(stamp_shape or self.stores.stamp_shape)
        self.weights = (np.ones(2, dtype=np.float32) if weights is None
                        else np.asarray(weights, dtype=np.float32))
        self.seed = int(seed)
        self.augment = augment
        self.read_rows = max(1, int(read_rows))
        self.window = max(self.batch_size, int(shuffle_stamps))
        self.store_weights = None if store_weights is None else np.asarray(store_weights, float)
        self.steps_per_epoch = max(1, math.ceil(len(self.rows) / self.batch_size))
        self.dropped_first_pass: int | None = None
        self.error: BaseException | None = None

    def _read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raw, labels = self.stores.read(rows)
        if labels is None:
            raise TrainError(f"{self.stores.paths}: a store has no /labels")
        stamps, valid = normalize_with_mask(raw)
        return stamps, labels.astype(np.int64), valid

    def _pack(self, x: np.ndarray, y: np.ndarray, valid: np.ndarray | None = None):
        onehot = np.zeros((len(y), 2), dtype=np.float32)
        onehot[np.arange(len(y)), y] = 1.0
        w = self.weights[y]
        if valid is not None:
            w = w * valid
        return x[..., None], onehot, w

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s rows in batch order, wrapped to ``steps_per_epoch`` full batches."""
        store_of = self.stores.store_of(self.rows) if self.store_weights is not None else None
        order = epoch_order(self.rows, self.seed, epoch, store_of=store_of,
                            store_weights=self.store_weights)
        need = self.steps_per_epoch * self.batch_size
        return np.resize(order, need) if len(order) != need else order

    def training_batches(self, start_epoch: int = 0) -> Iterator[tuple[np.ndarray, ...]]:
        """Endless batches from epoch ``start_epoch`` on; epoch ``e`` is epoch_rows(e)."""
        try:
            epoch = start_epoch
            while True:
                order = self.epoch_rows(epoch)
                rng = np.random.default_rng([self.seed, epoch, 1])  # augmentation only
                bad = 0
                window = self.window - self.window % self.batch_size or self.batch_size
                for lo in range(0, len(order), window):
                    x, y, valid = self._read(order[lo:lo + window])
                    bad += int((~valid).sum())
                    if self.augment:
                        augment_dihedral(x, rng)
                    for s in range(0, len(y), self.batch_size):
                        sl = slice(s, s + self.batch_size)
                        yield self._pack(x[sl], y[sl], valid[sl])
                if self.dropped_first_pass is None:
                    self.dropped_first_pass = bad
                    if bad >= len(order):
                        raise TrainError(f"{self.stores.paths[0]}: every training stamp has "
                                         f"{UNUSABLE}")
                epoch += 1
        except Exception as exc:
            self.error = exc
            raise

    def n_evaluation_batches(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def evaluation_batches(self) -> Iterator[tuple[np.ndarray, ...]]:
        """One ordered pass, no shuffling or augmentation; the last batch may be short."""
        try:
            step = max(self.batch_size, self.read_rows - self.read_rows % self.batch_size)
            for lo in range(0, len(self.rows), step):
                x, y, v = self._read(self.rows[lo:lo + step])
                for s in range(0, len(y), self.batch_size):
                    sl = slice(s, s + self.batch_size)
                    yield self._pack(x[sl], y[sl], v[sl])
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


def predict_rows(model, stores: Stores | Path | str, rows: np.ndarray, *,
                 read_rows: int = PREDICT_ROWS, batch_size: int = PREDICT_BATCH
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P(source) of the given (global) rows, in blocks: (probability float32, labels, finite).

    Stamps with NaN/Inf pixels get probability NaN and False in the mask; labels are 0 for
    an unlabelled store.
    """
    stores = stores if isinstance(stores, Stores) else Stores([stores])
    rows = np.asarray(rows, dtype=np.int64)
    prob = np.full(len(rows), np.nan, dtype=np.float32)
    labels = np.zeros(len(rows), dtype=np.int8)
    finite = np.zeros(len(rows), dtype=bool)
    for lo in range(0, len(rows), read_rows):
        raw, lab = stores.read(rows[lo:lo + read_rows])
        stamps, valid = normalize_with_mask(raw)
        if lab is not None:
            labels[lo:lo + len(lab)] = lab
        finite[lo:lo + len(valid)] = valid
        if valid.any():
            out = model.predict(stamps[valid][..., None], batch_size=batch_size, verbose=0)
            prob[lo + np.flatnonzero(valid)] = out[:, 1]
    return prob, labels, finite
