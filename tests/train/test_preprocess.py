"""The vectorised normalisation against the per-stamp reference, and degenerate stamps."""

import re

import numpy as np
import pytest

from stampbatch.train import preprocess


def notebook_normalize(image: np.ndarray) -> np.ndarray:
    """The teaching notebook's per-stamp code, verbatim in spirit (float64, in place)."""
    image = np.array(image, dtype=np.float64)
    per25, per50, per75 = np.percentile(image, [25, 50, 75])
    sigma_g = 0.7413 * (per75 - per25)
    image[image < (per50 - 2 * sigma_g)] = per50 - 2 * sigma_g
    image -= np.min(image)
    image /= np.sum(image)
    return image


def test_matches_per_stamp_reference_bit_for_bit_in_float32():
    rng = np.random.default_rng(3)
    stamps = (rng.normal(100.0, 5.0, size=(500, 21, 21))).astype(np.float32)
    stamps[:, 10, 10] += rng.uniform(0, 200, size=500).astype(np.float32)
    fast = preprocess.normalize(stamps)
    loop = np.stack([preprocess.normalize_reference(s) for s in stamps])
    assert fast.dtype == np.float32 and fast.shape == stamps.shape
    np.testing.assert_array_equal(fast, loop)


def test_matches_the_notebook_float64_code_to_float32_tolerance():
    rng = np.random.default_rng(4)
    stamps = rng.normal(0.0, 1.0, size=(200, 21, 21)).astype(np.float32)
    fast = preprocess.normalize(stamps)
    ref = np.stack([notebook_normalize(s) for s in stamps])
    np.testing.assert_allclose(fast, ref, rtol=2e-6, atol=1e-9)


def test_properties_unit_sum_zero_floor_and_clipping():
    rng = np.random.default_rng(5)
    stamps = rng.normal(0.0, 1.0, size=(50, 21, 21)).astype(np.float32)
    out = preprocess.normalize(stamps)
    np.testing.assert_allclose(out.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert np.all(out.min(axis=(1, 2)) == 0.0)
    # The lowest pixels were raised to a common floor: several pixels share the minimum.
    assert np.all((out == 0).sum(axis=(1, 2)) >= 2)


def test_input_is_not_modified_and_other_stamp_sizes_work():
    rng = np.random.default_rng(6)
    stamps = rng.normal(size=(7, 15, 15)).astype(np.float32)
    before = stamps.copy()
    out = preprocess.normalize(stamps)
    np.testing.assert_array_equal(stamps, before)
    ref = np.stack([preprocess.normalize_reference(s) for s in stamps])
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_non_square_pixel_count_uses_interpolated_percentiles():
    rng = np.random.default_rng(7)
    stamps = rng.normal(size=(20, 10, 10)).astype(np.float32)  # 100 pixels: fractional positions
    out = preprocess.normalize(stamps)
    ref = np.stack([notebook_normalize(s) for s in stamps])
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("value", [0.0, 7.5, -3.0])
def test_constant_stamps_have_no_noise_to_measure_and_are_flagged_flat(value):
    """An all-zero co-add (a trajectory with no data) is not an empty sky: vgg6 gave it
    P = 0.51. It comes back flat and unusable, and normalize refuses it in one line."""
    stamps = np.full((3, 21, 21), value, dtype=np.float32)
    out, valid = preprocess.normalize_with_mask(stamps)
    assert not valid.any()
    np.testing.assert_array_equal(out, np.float32(1.0 / 441))
    with pytest.raises(ValueError, match=r"^3 stamp\(s\) have .*no noise to measure.*first at row 0\)$"):
        preprocess.normalize(stamps)


def test_stamps_whose_middle_half_is_one_value_are_unusable_the_rest_normalised():
    rng = np.random.default_rng(11)
    stamps = rng.normal(100.0, 5.0, size=(6, 21, 21)).astype(np.float32)
    stamps[0, :, :17] = 0.0       # 81 % zero-filled (no data)
    stamps[1, :, 4:] = 3.0e4      # 81 % a saturated plateau
    stamps[2, :, :] = 3.0e4       # all of it
    stamps[3, :, 9:] = 3.0e4      # 57 % saturated: the quartiles still straddle the sky
    stamps[4, :, :12] = 0.0       # 57 % zero-filled: likewise
    out, valid = preprocess.normalize_with_mask(stamps)
    assert valid.tolist() == [False, False, False, True, True, True]
    np.testing.assert_array_equal(out[:3], np.float32(1.0 / 441))
    ref = np.stack([notebook_normalize(s) for s in stamps[3:]])
    np.testing.assert_allclose(out[3:], ref, rtol=2e-6, atol=1e-9)
    # exactly the rule: p25 == p75
    p25, p75 = np.percentile(stamps.reshape(6, -1), [25, 75], axis=1)
    assert ((p75 > p25) == valid).all()


def _filled(stamp: np.ndarray) -> np.ndarray:
    """The stamp with its masked pixels replaced by sky: the others' lower and upper
    quartiles on the even and odd squares of a checkerboard."""
    out = stamp.astype(np.float64)
    masked = ~(np.abs(out) < 1e30)
    q25, q75 = np.percentile(out[~masked], [25, 75])
    rows, cols = np.indices(out.shape)
    out[masked] = np.where((rows + cols) % 2 == 0, q25, q75)[masked]
    return out.astype(np.float32)


@pytest.mark.parametrize("columns", [2, 5, 9])
def test_a_masked_ccd_edge_leaves_the_stamps_noise_level_unbiased(columns):
    """A flat median fill shrank sigma_G to 0.88 / 0.66 / 0.23 of the truth with 2 / 5 / 9
    columns masked; the quartile fill keeps every stamp's median and sigma_G those of its
    measured pixels, and so the noise the network sees that of an unmasked stamp."""
    rng = np.random.default_rng(21)
    stamps = rng.normal(50.0, 3.0, size=(300, 21, 21)).astype(np.float32)
    stamps[:, :, :columns] = np.nan
    out, valid = preprocess.normalize_with_mask(stamps)
    assert valid.all()
    clean, _ = preprocess.normalize_with_mask(rng.normal(50.0, 3.0, size=(300, 21, 21)).astype(np.float32))

    def sigma_g(x):
        q25, q75 = np.percentile(x.reshape(len(x), -1), [25, 75], axis=1)
        return 0.7413 * (q75 - q25)

    filled = np.stack([_filled(s) for s in stamps])
    measured = stamps[:, :, columns:].reshape(len(stamps), -1)
    step = np.diff(np.sort(measured, axis=1), axis=1).max(axis=1)  # one order statistic, at most
    assert np.all(np.abs(sigma_g(filled) - sigma_g(measured)) <= 0.7413 * 2 * step)
    assert np.all(np.abs(np.median(filled.reshape(len(filled), -1), axis=1)
                         - np.median(measured, axis=1)) <= step)

    # in normalised units (what the network sees): the same noise as an unmasked stamp
    ratio = sigma_g(out).mean() / sigma_g(clean).mean()
    assert 0.95 < ratio < 1.05, ratio


def test_masked_pixels_off_the_centre_are_filled_with_the_stamps_sky():
    stamps = np.random.default_rng(8).normal(size=(6, 21, 21)).astype(np.float32)
    stamps[1, 3, 3] = np.nan            # a masked pixel
    stamps[2, :, 0] = np.inf            # a bad column at the edge
    stamps[3, 4:7, 14:17] = np.nan      # a masked block
    # every kind of mask at once, low and high, an even and an odd number of good pixels
    stamps[4, 0, :5] = [np.nan, np.inf, -np.inf, 3e38, -3.4e38]
    stamps[5, 0, :4] = [np.nan, -np.inf, -np.inf, 1e30]
    out, valid = preprocess.normalize_with_mask(stamps)
    assert valid.all() and np.isfinite(out).all()
    ref = np.stack([preprocess.normalize_reference(_filled(s)) for s in stamps])
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-9)
    np.testing.assert_array_equal(preprocess.normalize(stamps), out)
    # the fill is the sky: a bad column (21 pixels) alternates between the others' quartiles,
    # in the normalised stamp the network sees
    q25, q75 = np.percentile(out[2][:, 1:], [25, 75])
    column = out[2][:, 0]
    np.testing.assert_allclose(column[0::2], q25, rtol=1e-5)
    np.testing.assert_allclose(column[1::2], q75, rtol=1e-5)


@pytest.mark.parametrize("where", ["centre", "centre_corner", "too_many"])
def test_stamps_masked_at_the_centre_or_over_half_are_refused_or_flagged(where):
    stamps = np.random.default_rng(8).normal(size=(3, 21, 21)).astype(np.float32)
    if where == "centre":
        stamps[1, 10, 10] = np.nan
    elif where == "centre_corner":
        stamps[1, 11, 9] = -np.inf      # still inside the central 3x3
    else:
        stamps[1, :, :9] = np.nan
        stamps[1, :8, 9:] = np.nan      # 189 + 96 of 441 pixels: over half, centre intact
    stamps[1, 0, 0] = np.nan
    assert preprocess.UNUSABLE.startswith("masked pixels (NaN, Inf or |x| >= 1e+30) in the central 3x3 "
                                          "or over 50% of the stamp")
    with pytest.raises(ValueError, match=re.escape(f"1 stamp(s) have {preprocess.UNUSABLE} (first at row 1)")):
        preprocess.normalize(stamps)
    out, valid = preprocess.normalize_with_mask(stamps)
    assert valid.tolist() == [True, False, True]
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[1], 1.0 / 441)
    np.testing.assert_array_equal(out[0], preprocess.normalize(stamps[[0]])[0])


def test_half_masked_with_the_centre_intact_is_still_classified():
    stamps = np.random.default_rng(12).normal(size=(2, 21, 21)).astype(np.float32)
    stamps[0, :, :9] = np.nan                        # 9 columns off a CCD's edge: 43 %
    outside = np.ones((21, 21), dtype=bool)
    outside[9:12, 9:12] = False
    pixels = np.flatnonzero(outside.ravel())         # the centre's 3x3 kept
    stamps[1].ravel()[pixels[:220]] = np.nan         # exactly 220 = 0.5 * 441 (rounded down)
    out, valid = preprocess.normalize_with_mask(stamps)
    assert valid.tolist() == [True, True]
    stamps[1].ravel()[pixels[220]] = np.nan          # one more: past the limit
    assert preprocess.normalize_with_mask(stamps)[1].tolist() == [True, False]


def test_integer_input_and_empty_batch():
    stamps = np.arange(2 * 21 * 21, dtype=np.int32).reshape(2, 21, 21)
    out = preprocess.normalize(stamps)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert preprocess.normalize(np.zeros((0, 21, 21))).shape == (0, 21, 21)


def test_wrong_rank_is_refused():
    with pytest.raises(ValueError, match="shape"):
        preprocess.normalize(np.zeros((21, 21)))


@pytest.mark.parametrize("value", [-3.4e38, 3.4e38, -3e38, 1e30, -1e30, np.finfo(np.float32).max])
def test_sentinel_pixels_are_masked_like_nan(value):
    """A -3.4e38 fill pixel used to normalise to an all-zero stamp scored as valid, and +-3e38
    overflowed float32 to NaN stamps that the model then turned into NaN probabilities. Now a
    sentinel is a masked pixel: filled off the centre, unusable in a stamp made of them."""
    stamps = np.random.default_rng(9).normal(size=(5, 21, 21)).astype(np.float32)
    stamps[2, 4, 4] = value
    stamps[4] = value
    with pytest.raises(ValueError, match="1 stamp\\(s\\) have masked pixels .*first at row 4"):
        preprocess.normalize(stamps)
    with np.errstate(all="raise"):
        out, valid = preprocess.normalize_with_mask(stamps)
    assert valid.tolist() == [True, True, True, True, False]
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[~valid], np.float32(1 / 441))
    ref = np.stack([preprocess.normalize_reference(_filled(s)) for s in stamps[valid]])
    np.testing.assert_allclose(out[valid], ref, rtol=2e-6, atol=1e-9)


def test_huge_but_ordinary_pixels_do_not_overflow():
    """Pixels just below the sentinel threshold: the clipped range and the sum stay finite."""
    rng = np.random.default_rng(10)
    stamps = (rng.normal(size=(4, 21, 21)) * 1e29).astype(np.float32)
    stamps[:, 10, 10] = 9.9e29
    with np.errstate(all="raise"):
        out = preprocess.normalize(stamps)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out.sum(axis=(1, 2)), 1.0, rtol=1e-5)


def test_training_stream_drops_sentinel_stamps(tmp_path):
    """Three +-3e38 stamps in a training store made training 'diverge'; now they are counted
    and carry weight 0 like NaN stamps (dataset.StampStream normalises with the mask), so every
    batch is finite and they have no effect on training. Sentinels at the centre and a stamp
    made of them: unusable; a sentinel in a corner is a masked pixel, filled and trained on."""
    from stampbatch import store
    from stampbatch.train.dataset import StampStream

    labels = (np.arange(120) % 2).astype(np.int8)
    stamps = np.random.default_rng(11).normal(size=(120, 21, 21)).astype(np.float32)
    stamps[5, 10, 10], stamps[6, 9, 11], stamps[7] = 3e38, -3e38, -3.4e38
    stamps[8, 0, 0] = 3e38
    path = tmp_path / "sentinel.h5"
    store.create_store(path, stamps, labels, chunk_rows=32)
    stream = StampStream(path, np.arange(120), 16, (21, 21), seed=0, read_rows=40,
                         shuffle_stamps=40)
    order = stream.epoch_rows(0)
    sentinel_in_epoch = int(np.isin(order, [5, 6, 7]).sum())
    assert sentinel_in_epoch >= 3
    gen = stream.training_batches()
    zero_weight = 0
    for _ in range(stream.steps_per_epoch):
        x, _, w = next(gen)
        assert np.isfinite(x).all()
        zero_weight += int((w == 0).sum())
    next(gen)  # the first batch of epoch 1: epoch 0's count is final
    assert zero_weight == sentinel_in_epoch == stream.dropped_first_pass
