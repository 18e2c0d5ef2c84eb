"""The training data: stores as one table, stratified splits, the shuffled batch stream."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import gaussian_stamps, write_labelled_store

from stampbatch import store
from stampbatch.errors import TrainError
from stampbatch.train.dataset import (
    StampStream,
    Stores,
    augment_dihedral,
    class_weights,
    epoch_order,
    split_rows,
    split_stores,
    split_summary,
)
from stampbatch.train.loop import TrainConfig


def sorted_store(path: Path, n_pos: int, n_neg: int, *, chunk_rows: int = 512) -> Path:
    """A class-sorted store as ``ingest`` writes it: every source first, then the noise;
    each stamp carries its row number in pixel (0, 0) so the order can be read back."""
    labels = np.r_[np.ones(n_pos, np.int8), np.zeros(n_neg, np.int8)]
    stamps = gaussian_stamps(len(labels), seed=2, sources=labels == 1)
    stamps[:, 0, 0] = np.arange(len(labels))
    store.create_store(path, stamps, labels, chunk_rows=chunk_rows)
    return path


def test_split_is_stratified_disjoint_and_reproducible():
    labels = np.r_[np.zeros(700, np.int8), np.ones(300, np.int8)]
    config = TrainConfig(seed=3)
    split = split_rows(labels, config)
    sizes = {k: len(v) for k, v in split.items()}
    assert sizes == {"train": 700, "val": 100, "test": 200}
    everything = np.concatenate(list(split.values()))
    assert np.array_equal(np.sort(everything), np.arange(1000))
    for part in split.values():
        assert np.all(np.diff(part) > 0)
        assert labels[part].mean() == pytest.approx(0.3, abs=0.011)
    again = split_rows(labels, config)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    other = split_rows(labels, TrainConfig(seed=4))
    assert not np.array_equal(split["test"], other["test"])


def test_split_that_empties_a_class_is_refused():
    labels = np.r_[np.zeros(300, np.int8), np.ones(4, np.int8)]
    with pytest.raises(TrainError, match="train.h5: .*(val|split)"):
        split_rows(labels, TrainConfig(val_fraction=0.05, test_fraction=0.05), "train.h5")


def test_train_stamps_subsets_the_training_split_alone():
    """train_stamps keeps that many training rows (stratified, seeded, shared among the stores
    in proportion) and leaves the validation and test rows exactly those of the full split."""
    first = np.r_[np.zeros(1400, np.int8), np.ones(600, np.int8)]
    second = np.r_[np.zeros(500, np.int8), np.ones(500, np.int8)]
    full = split_stores([first, second], TrainConfig(seed=5), ["a.h5", "b.h5"])
    part = split_stores([first, second], TrainConfig(seed=5, train_stamps=600), ["a.h5", "b.h5"])
    assert np.array_equal(part["val"], full["val"]) and np.array_equal(part["test"], full["test"])
    assert len(part["train"]) == 600 and np.all(np.diff(part["train"]) > 0)
    assert np.isin(part["train"], full["train"]).all()
    in_first = part["train"] < len(first)
    assert in_first.sum() == 400            # 1,400 of the 2,100 training rows came from a.h5
    assert first[part["train"][in_first]].mean() == pytest.approx(0.3, abs=0.01)
    assert second[part["train"][~in_first] - len(first)].mean() == pytest.approx(0.5, abs=0.01)
    again = split_stores([first, second], TrainConfig(seed=5, train_stamps=600), ["a.h5", "b.h5"])
    assert np.array_equal(part["train"], again["train"])
    more = split_stores([first, second], TrainConfig(seed=5, train_stamps=5000), ["a.h5", "b.h5"])
    assert np.array_equal(more["train"], full["train"])
    with pytest.raises(ValueError, match="train_stamps"):
        TrainConfig(train_stamps=-1).validate()


def test_class_weights_balance_the_classes():
    labels = np.r_[np.zeros(75), np.ones(25)].astype(np.int8)
    w = class_weights(labels, "balanced")
    np.testing.assert_allclose(w, [100 / 150, 100 / 50])
    assert w[0] * 75 == pytest.approx(w[1] * 25)
    np.testing.assert_array_equal(class_weights(labels, "none"), [1.0, 1.0])


def test_augmentation_applies_the_symmetries_of_the_square():
    rng = np.random.default_rng(0)
    stamps = rng.random((4000, 5, 5)).astype(np.float32)
    original = stamps.copy()
    out = augment_dihedral(stamps, np.random.default_rng(1))
    variants = [np.rot90(original, k, axes=(1, 2)) for k in range(4)]
    variants += [v[:, :, ::-1] for v in variants]
    which = np.full(len(out), -1)
    for t, v in enumerate(variants):
        which[np.all(out == v, axis=(1, 2))] = t
    assert np.all(which >= 0)  # every stamp is one of the 8 symmetric images of itself
    counts = np.bincount(which, minlength=8)
    assert counts.min() > 400  # all 8 used, about equally
    # a centred symmetric source is unchanged by every symmetry
    yy, xx = np.mgrid[:5, :5]
    blob = np.exp(-((yy - 2) ** 2 + (xx - 2) ** 2) / 2.0).astype(np.float32)
    same = augment_dihedral(np.repeat(blob[None], 50, axis=0), np.random.default_rng(2))
    np.testing.assert_array_equal(same, np.repeat(blob[None], 50, axis=0))
    # non-square stamps keep their shape
    rect = augment_dihedral(rng.random((100, 3, 5)).astype(np.float32), rng)
    assert rect.shape == (100, 3, 5)


def test_training_stream_batches_and_weights_out_nonfinite_stamps(tmp_path):
    path = write_labelled_store(tmp_path / "nan.h5", 200, nan_rows=(0, 1, 2, 3, 4))
    rows = np.arange(200)
    weights = np.array([0.5, 2.0], np.float32)
    stream = StampStream(path, rows, 16, (21, 21), weights=weights, seed=0, augment=True,
                         read_rows=40, shuffle_stamps=80)
    gen = stream.training_batches()
    batches = [next(gen) for _ in range(stream.steps_per_epoch)]  # ceil(200 / 16) = 13
    assert stream.steps_per_epoch == 13
    nan_weight = 0
    for x, y, w in batches:
        assert x.shape == (16, 21, 21, 1) and x.dtype == np.float32
        assert np.isfinite(x).all()
        np.testing.assert_allclose(x.sum(axis=(1, 2, 3)), 1.0, rtol=1e-4)
        np.testing.assert_array_equal(y.sum(axis=1), 1.0)
        expected = weights[y.argmax(axis=1)]
        nan_weight += int((w == 0).sum())
        assert ((w == expected) | (w == 0)).all()
    next(gen)  # the first batch of the next epoch: the first pass is counted
    assert stream.dropped_first_pass == nan_weight == 5  # each NaN row once, weight 0
    # evaluation: every row once, in order, non-finite ones with weight 0
    ev = StampStream(path, rows, 64, (21, 21), read_rows=40, shuffle_stamps=80)
    parts = list(ev.evaluation_batches())
    assert len(parts) == ev.n_evaluation_batches() == 4
    w = np.concatenate([p[2] for p in parts])
    assert len(w) == 200 and np.flatnonzero(w == 0).tolist() == [0, 1, 2, 3, 4]
    labels = np.concatenate([p[1] for p in parts]).argmax(axis=1)
    np.testing.assert_array_equal(labels, store.read_labels(path))


def test_training_passes_are_reshuffled(tmp_path):
    path = write_labelled_store(tmp_path / "s.h5", 128)
    stream = StampStream(path, np.arange(128), 128, (21, 21), seed=0, read_rows=32,
                         shuffle_stamps=64)
    gen = stream.training_batches()
    first, second = next(gen)[0], next(gen)[0]
    assert not np.array_equal(first, second)
    again = StampStream(path, np.arange(128), 128, (21, 21), seed=0, read_rows=32,
                        shuffle_stamps=64).training_batches()
    np.testing.assert_array_equal(next(again)[0], first)  # reproducible from the seed




def test_class_sorted_store_gives_binomial_class_mix_per_batch(tmp_path):
    """Issue 12 item 7: on a store written sources-first, every batch is a random sample."""
    path = sorted_store(tmp_path / "sorted.h5", 6000, 14000)
    bs = 1000
    stream = StampStream(path, np.arange(20000), bs, seed=3, read_rows=4096,
                         shuffle_stamps=4096)
    gen = stream.training_batches()
    frac = np.array([next(gen)[1][:, 1].mean() for _ in range(2 * stream.steps_per_epoch)])
    p, sigma = 0.3, math.sqrt(0.3 * 0.7 / bs)
    assert np.all(np.abs(frac - p) <= 3 * sigma)  # +-4.3 %: within 3 sigma, every batch
    assert abs(frac.std() / sigma - 1.0) < 0.4  # and spread like a binomial, not blocky
    assert abs(frac.mean() - p) < 0.01


def test_an_epoch_is_a_permutation_and_a_pure_function_of_seed_and_epoch(tmp_path):
    path = sorted_store(tmp_path / "p.h5", 300, 700, chunk_rows=128)
    rows = np.arange(0, 1000, 2)  # a split: every other row
    stream = StampStream(path, rows, 64, seed=9, shuffle_stamps=128)
    first = np.concatenate([stream.epoch_rows(e) for e in range(3)])
    per_epoch = stream.steps_per_epoch * 64
    assert per_epoch == 512 and len(first) == 3 * 512
    for e in range(3):
        got = first[e * 512:(e + 1) * 512]
        assert sorted(set(got.tolist())) == rows.tolist()  # every training row, wrapped to fill
        np.testing.assert_array_equal(got[:500], epoch_order(rows, 9, e))
    assert not np.array_equal(first[:512], first[512:1024])  # reshuffled each epoch
    # The stamps themselves follow that order: pixel (0, 0) carries the row number.
    gen = stream.training_batches()
    seen = np.concatenate([next(gen)[0][:, 0, 0, 0] for _ in range(2 * stream.steps_per_epoch)])
    raw = store.read_stamps(path)
    from stampbatch.train.preprocess import normalize

    expected = normalize(raw[first[:2 * 512]])[:, 0, 0]
    np.testing.assert_allclose(seen, expected, rtol=1e-6)
    # A stream resumed at epoch 2 yields exactly what the uninterrupted one yields there.
    again = StampStream(path, rows, 64, seed=9, shuffle_stamps=128).training_batches(2)
    resumed = np.concatenate([next(again)[1] for _ in range(stream.steps_per_epoch)])
    whole = stream.training_batches(0)
    for _ in range(2 * stream.steps_per_epoch):
        next(whole)
    straight = np.concatenate([next(whole)[1] for _ in range(stream.steps_per_epoch)])
    np.testing.assert_array_equal(resumed, straight)


def test_several_stores_one_table_and_a_split_stratified_per_store_and_class(tmp_path):
    a = sorted_store(tmp_path / "a.h5", 200, 600)
    b = write_labelled_store(tmp_path / "b.h5", 300)
    stores = Stores([a, b])
    assert len(stores) == 1100 and stores.offsets.tolist() == [0, 800, 1100]
    rows = np.array([1099, 0, 805, 799])
    stamps, labels = stores.read(rows)
    np.testing.assert_array_equal(stamps[1], store.read_stamps(a, 0, 1)[0])
    np.testing.assert_array_equal(stamps[0], store.read_stamps(b, 299, 300)[0])
    assert labels.tolist() == [store.read_labels(b)[299], 1, store.read_labels(b)[5], 0]
    labs = stores.labels()
    split = split_stores(labs, TrainConfig(), ["a", "b"])
    assert sorted(np.concatenate(list(split.values()))) == list(range(1100))
    summary = split_summary(stores, labs, split)
    for row, (n_pos, n_neg) in zip(summary, [(200, 600), (150, 150)], strict=True):
        for name, share in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
            assert abs(row[name]["sources"] - share * n_pos) <= 1
            assert abs(row[name]["negatives"] - share * n_neg) <= 1
    with pytest.raises(TrainError, match="different shapes"):
        small = tmp_path / "small.h5"
        store.create_store(small, np.zeros((4, 11, 11), np.float32), np.array([0, 1, 0, 1]))
        Stores([a, small])


def test_store_weights_set_each_stores_share_of_an_epoch(tmp_path):
    a = sorted_store(tmp_path / "a.h5", 500, 500)
    b = write_labelled_store(tmp_path / "b.h5", 200)
    stores = Stores([a, b])
    rows = np.arange(1200)
    stream = StampStream(stores, rows, 100, seed=1, store_weights=[0.3, 0.7])
    for e in range(2):
        order = stream.epoch_rows(e)
        share_b = (stores.store_of(order) == 1).mean()
        assert share_b == pytest.approx(0.7, abs=0.01)
        # the small store's 200 rows are each used 4 or 5 times (840 / 200)
        counts = np.bincount(order[order >= 1000] - 1000, minlength=200)
        assert counts.min() >= 4 and counts.max() <= 5
